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
pub(crate) mod store;
pub(crate) mod ttl;

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
/// # Errors
/// The folder or the database cannot be opened, or its meta record is damaged.
pub(crate) fn open(
    config: &Config,
    announce: Arc<dyn Announce>,
) -> anyhow::Result<(BrokerState, watch::Receiver<AppliedProgress>)> {
    let dir = state_dir(config);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let db = sled::Config::new()
        .path(&dir)
        .cache_capacity(config.store.cache_bytes)
        .open()
        .with_context(|| format!("cannot open the state store in {}", dir.display()))?;
    let (progress_tx, progress) = watch::channel(AppliedProgress::default());
    let state = BrokerState::open(db, &dir, announce, progress_tx)?;
    Ok((state, progress))
}
