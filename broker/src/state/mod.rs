//! The state: what the committed log amounts to, decided the same way on every replica.
//!
//! - [`machine`]: [`BrokerState`], what raft applies committed entries to
//!   ([`crate::raft::AppliedState`]), and the progress readers watch.
//! - [`apply`]: the only place that decides — a committed command becomes store writes; each
//!   rule it applies has its own module: [`dedup`] (idempotent retries), [`loops`] (loop
//!   detection), [`ttl`] (expiry and retention sweeps), [`entity_doc`] (the published state of an
//!   entity; the merge itself is [`crate::entity`]).
//! - [`position`]: the next offset, latest publish time and totals, saved with raft's bookkeeping.
//! - [`store`]: the on-disk layout (one sled tree) and the reads History and subscribers make;
//!   [`batch_files`] hold the message bodies.
//! - [`sled_sync`]: the real fdatasync sled's `flush()` lacks, and the clean-stop marker.
//! - [`undo`]: the before-images of the entry being applied, so a crash part way through it is
//!   undone at the next start rather than rebuilt from the snapshot.
//! - [`snapshot_file`]: the snapshot's file format, checked whole before it replaces anything.
//!
//! Applied messages leave the state through [`Announce`], which the fan-out's hub implements: the
//! state does not know who listens.

pub(crate) mod apply;
pub(crate) mod batch_files;
pub(crate) mod dedup;
pub(crate) mod entity_doc;
pub(crate) mod loops;
pub(crate) mod machine;
pub(crate) mod position;
pub(crate) mod sled_sync;
pub(crate) mod snapshot_file;
pub(crate) mod store;
pub(crate) mod ttl;
pub(crate) mod undo;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;

pub(crate) use machine::{AppliedProgress, BrokerState};

use crate::config::Config;
use crate::message::StoredMessage;

/// Where applied messages go: told after their entry is in the store, in offset order.
pub(crate) trait Announce: Send + Sync + 'static {
    /// `messages` were applied, in offset order.
    fn applied(&self, messages: &[Arc<StoredMessage>]);
    /// The state was replaced (opened, rebuilt, or a snapshot installed): `last_offset` is now the
    /// highest offset given.
    fn reset(&self, last_offset: u64);
}

/// The state folder's place in the data folder.
pub(crate) fn state_dir(config: &Config) -> PathBuf {
    config.data_dir.join("state")
}

/// Where raft keeps the state's snapshots.
pub(crate) fn snapshot_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("snapshots")
}

/// Opens the state database under `config.data_dir`, announcing to `announce`.
///
/// A database sled finds damaged is not fatal: the state is what the log and the snapshots
/// amount to, so its files are set aside (into `state/damaged-<time>/`, kept for a post-mortem)
/// and an empty one is opened; raft's adapter then rebuilds it from the snapshot and the log, or
/// refuses the start when they no longer cover it.
///
/// # Errors
/// The folder or the database cannot be opened, or its meta record is damaged.
pub(crate) fn open(
    config: &Config,
    announce: Arc<dyn Announce>,
) -> anyhow::Result<(BrokerState, watch::Receiver<AppliedProgress>)> {
    let dir = state_dir(config);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let open_db = || {
        sled::Config::new()
            .path(&dir)
            .cache_capacity(config.store.cache_bytes)
            .open()
    };
    let db = match open_db() {
        Ok(db) => db,
        Err(damage @ sled::Error::Corruption { .. }) => {
            let aside = set_aside(&dir).with_context(|| {
                format!("the state store (state/db) is damaged ({damage}) and cannot be set aside")
            })?;
            tracing::warn!(
                %damage,
                set_aside = %aside.display(),
                "the state store (state/db) is damaged; set aside, to be rebuilt from the snapshot and the log"
            );
            open_db()
                .with_context(|| format!("cannot open a new state store in {}", dir.display()))?
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!(
                    "cannot open the state store (state/db) in {}",
                    dir.display()
                )
            })
        }
    };
    let (progress_tx, progress) = watch::channel(AppliedProgress::default());
    let state = BrokerState::open(db, &dir, announce, progress_tx)
        .with_context(|| format!("the state store (state/db) in {} is damaged", dir.display()))?;
    // Space of expired batches comes back a file at a time: small files for a small retention
    // bound, so the folder stays near it (docs/DURABILITY.md).
    state
        .store()
        .set_batch_file_bytes(batch_file_bytes(config.retention.max_bytes));
    Ok((state, progress))
}

/// Batch files of a sixteenth of `retention.max_bytes`, between 1 and 64 MiB.
fn batch_file_bytes(retention_max_bytes: u64) -> u64 {
    (retention_max_bytes / 16).clamp(1 << 20, batch_files::FILE_BYTES)
}

/// Moves everything in the state folder but the snapshots into a new `damaged-<time>` folder
/// there, and returns it.
fn set_aside(dir: &Path) -> std::io::Result<PathBuf> {
    let aside = dir.join(format!("damaged-{}", crate::message::now_us()));
    std::fs::create_dir(&aside)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let keep = name == "snapshots" || name.to_string_lossy().starts_with("damaged-");
        if !keep {
            std::fs::rename(entry.path(), aside.join(&name))?;
        }
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(aside)
}
