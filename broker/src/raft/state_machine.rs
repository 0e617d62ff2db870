//! openraft's state machine: the adapter between openraft and the broker's state.
//!
//! Raft drives the state through [`AppliedState`], which [`crate::state`] implements; this file
//! knows nothing of messages, stores or subscribers. What it owns is raft's side of applying:
//!
//! - the **bookkeeping** ([`Bookkeeping`]: the last applied log id and membership) of each entry,
//!   which it hands the state to save with its own writes and keep (the one copy);
//! - **snapshots as files** in `<data>/state/snapshots`: `current` names the snapshot in force,
//!   `installing` marks an install in progress so a crash half way is finished at the next start,
//!   and a snapshot received from the leader is written to a `.partial` file first.
//!
//! The state is written without atomic batches, so it is whole only after a clean stop
//! ([`AppliedState::is_whole`]). A start without one (a crash, a kill, a power loss, a failed
//! write) goes back to the current snapshot — or to an empty state when there is none — and
//! openraft applies the log from there again: it keeps every entry after the snapshot. Restarting
//! after a crash therefore takes a snapshot load and a replay of at most
//! `raft.snapshot_every_entries` entries.
//!
//! A snapshot is taken while openraft holds apply (the state has no point-in-time view), which is
//! acceptable while snapshots are rare; see docs/ARCHITECTURE.md.

use std::io::Write;
use std::path::{Path, PathBuf};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::{Member, TypeConfig};
use crate::error::BrokerError;
use crate::message::{Command, CommandOutcome};
use crate::observability::metrics;

type StorageResult<T> = Result<T, StorageError<u64>>;
type Entry = openraft::Entry<TypeConfig>;

/// Raft's record of what the state holds: saved by the state with every apply, in the same
/// record as its own position, and handed back at the next start.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Bookkeeping {
    /// The last log entry whose effects are in the state.
    pub last_applied: Option<LogId<u64>>,
    /// The last membership applied.
    pub membership: StoredMembership<u64, Member>,
}

/// Writes a snapshot of the state to the path it is given, made durable; run on a blocking thread.
pub(crate) type SnapshotJob = Box<dyn FnOnce(&Path) -> std::io::Result<()> + Send>;

/// What raft hands committed entries to: the broker's state ([`crate::state`]).
///
/// Each call that changes the state saves the [`Bookkeeping`] it is given with its own writes and
/// keeps it: [`AppliedState::bookkeeping`] is the one copy, also after a restart.
pub(crate) trait AppliedState: Send + Sync + 'static {
    /// Whether the state on disk was whole when it was opened (the last run stopped cleanly).
    fn is_whole(&self) -> bool;
    /// Whether the state holds nothing at all.
    fn is_empty(&self) -> bool;
    /// The bookkeeping saved last (the default for an empty state).
    fn bookkeeping(&self) -> &Bookkeeping;
    /// Applies one committed entry — `None` for an entry that carries nothing for the state (a
    /// blank or a membership change) — and saves `bookkeeping` with its writes.
    ///
    /// # Errors
    /// The state cannot be written; it may then hold part of the entry.
    fn apply(
        &mut self,
        command: Option<&Command>,
        bookkeeping: Bookkeeping,
    ) -> Result<CommandOutcome, BrokerError>;
    /// Called once after every group of applied entries.
    fn applied(&mut self);
    /// A job that makes the state durable and writes all of it to a snapshot file: taken while
    /// apply is held, run on a blocking thread.
    fn snapshot_job(&self) -> SnapshotJob;
    /// Replaces the state with the snapshot file at `path` and saves `bookkeeping`; durable when it
    /// returns.
    ///
    /// # Errors
    /// The file cannot be read or the state cannot be written.
    fn install(&mut self, path: &Path, bookkeeping: Bookkeeping) -> Result<(), BrokerError>;
    /// Empties the state, durably (its bookkeeping back to the default).
    ///
    /// # Errors
    /// The state cannot be written.
    fn clear(&mut self) -> Result<(), BrokerError>;
}

fn sm_write_err(e: impl std::fmt::Display) -> StorageError<u64> {
    StorageIOError::write_state_machine(AnyError::error(e)).into()
}

fn sm_read_err(e: impl std::fmt::Display) -> StorageError<u64> {
    StorageIOError::read_state_machine(AnyError::error(e)).into()
}

fn snapshot_err(e: impl std::fmt::Display) -> StorageError<u64> {
    StorageIOError::write_snapshot(None, AnyError::error(e)).into()
}

/// The state machine openraft runs: the snapshot files around an [`AppliedState`].
pub(crate) struct StateMachine<S> {
    state: S,
    snapshot_dir: PathBuf,
    /// The file a snapshot from the leader is being received into.
    receiving: Option<PathBuf>,
}

/// Name of the file describing the current snapshot, beside the snapshot files.
const CURRENT: &str = "current";
/// Present while a snapshot is being installed; names it, so a crash mid-install is finished at
/// the next start instead of leaving a half-replaced state.
pub(crate) const INSTALLING: &str = "installing";

impl<S: AppliedState> StateMachine<S> {
    /// Wraps `state`, with its snapshots in `snapshot_dir`. Finishes a snapshot install a crash
    /// interrupted, and goes back to the current snapshot when the state is not whole.
    ///
    /// # Errors
    /// The state or the snapshot files cannot be read or written.
    pub(crate) fn open(state: S, snapshot_dir: &Path) -> anyhow::Result<StateMachine<S>> {
        std::fs::create_dir_all(snapshot_dir)?;
        let mut machine = StateMachine {
            state,
            snapshot_dir: snapshot_dir.to_owned(),
            receiving: None,
        };
        // A crash while installing a snapshot leaves the state half replaced: finish the job from
        // the snapshot file the marker names before anyone reads the state.
        if let Some(meta) = machine.read_marker()? {
            tracing::warn!(snapshot = %meta.snapshot_id, "finishing a snapshot install interrupted by a crash");
            machine.load_snapshot(&meta)?;
        } else if !machine.state.is_whole() {
            machine.rebuild()?;
        }
        Ok(machine)
    }

    /// The state raft drives.
    #[cfg(test)]
    pub(crate) fn state(&self) -> &S {
        &self.state
    }

    /// The bookkeeping of what the state holds.
    #[cfg(test)]
    pub(crate) fn bookkeeping(&self) -> &Bookkeeping {
        self.state.bookkeeping()
    }

    /// Where the snapshot files are.
    #[cfg(test)]
    pub(crate) fn snapshot_dir(&self) -> &Path {
        &self.snapshot_dir
    }

    fn read_marker(&self) -> StorageResult<Option<SnapshotMeta<u64, Member>>> {
        match std::fs::read(self.snapshot_dir.join(INSTALLING)) {
            Ok(bytes) => bincode::deserialize(&bytes).map(Some).map_err(sm_read_err),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(sm_read_err(e)),
        }
    }

    /// Replaces the state with the snapshot `meta` names, crash-safely: a durable marker is
    /// written first and removed last, and [`StateMachine::open`] finishes an install it finds
    /// marked.
    fn load_snapshot(&mut self, meta: &SnapshotMeta<u64, Member>) -> StorageResult<()> {
        let marker = bincode::serialize(meta).map_err(snapshot_err)?;
        write_durably(&self.snapshot_dir, INSTALLING, &marker).map_err(snapshot_err)?;
        let bookkeeping = Bookkeeping {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
        let path = self.snapshot_path(&meta.snapshot_id);
        self.state
            .install(&path, bookkeeping)
            .map_err(snapshot_err)?;
        self.set_current(meta)?;
        std::fs::remove_file(self.snapshot_dir.join(INSTALLING)).map_err(snapshot_err)?;
        std::fs::File::open(&self.snapshot_dir)
            .and_then(|d| d.sync_all())
            .map_err(snapshot_err)?;
        Ok(())
    }

    /// Goes back to the current snapshot (or to an empty state when there is none) after a start
    /// that did not follow a clean stop: the state may hold part of an entry. openraft then
    /// applies the log from there again: the log keeps every entry after the snapshot.
    fn rebuild(&mut self) -> StorageResult<()> {
        let snapshot = self.read_current()?;
        if snapshot.is_none() && self.state.is_empty() {
            // A new state folder: nothing to rebuild.
            return Ok(());
        }
        tracing::warn!(
            from_snapshot = snapshot.as_ref().map(|m| m.snapshot_id.as_str()),
            applied_before = ?self.state.bookkeeping().last_applied,
            "the state store was not stopped cleanly; rebuilding it from the snapshot and the log"
        );
        match snapshot {
            Some(meta) => self.load_snapshot(&meta),
            None => self.state.clear().map_err(sm_write_err),
        }
    }

    fn apply_entry(&mut self, entry: &Entry) -> StorageResult<CommandOutcome> {
        let mut bookkeeping = Bookkeeping {
            last_applied: Some(entry.log_id),
            membership: self.state.bookkeeping().membership.clone(),
        };
        let command = match &entry.payload {
            EntryPayload::Blank => None,
            EntryPayload::Normal(command) => Some(command),
            EntryPayload::Membership(membership) => {
                bookkeeping.membership =
                    StoredMembership::new(Some(entry.log_id), membership.clone());
                None
            }
        };
        self.state.apply(command, bookkeeping).map_err(|e| {
            StorageError::from(StorageIOError::apply(entry.log_id, AnyError::error(e)))
        })
    }

    fn snapshot_path(&self, id: &str) -> PathBuf {
        self.snapshot_dir.join(format!("{id}.snap"))
    }

    fn read_current(&self) -> StorageResult<Option<SnapshotMeta<u64, Member>>> {
        match std::fs::read(self.snapshot_dir.join(CURRENT)) {
            Ok(bytes) => bincode::deserialize(&bytes).map(Some).map_err(sm_read_err),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(sm_read_err(e)),
        }
    }

    /// Records `meta` as the current snapshot and removes older snapshot files.
    fn set_current(&self, meta: &SnapshotMeta<u64, Member>) -> StorageResult<()> {
        let bytes = bincode::serialize(meta).map_err(snapshot_err)?;
        write_durably(&self.snapshot_dir, CURRENT, &bytes).map_err(snapshot_err)?;
        let keep = format!("{}.snap", meta.snapshot_id);
        if let Ok(entries) = std::fs::read_dir(&self.snapshot_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                // Received (`.partial`) files are left to the install that owns them.
                if (name.ends_with(".snap") && name != keep) || name.ends_with(".snap.tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }
}

/// Writes `bytes` to `dir/name` so that after a crash the file holds either the old or the new
/// content: a temporary file, fsync, rename, fsync of the folder.
pub(crate) fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// A finished snapshot: what it covers, and its file.
type TakenSnapshot = (SnapshotMeta<u64, Member>, PathBuf);

/// Hands openraft the snapshot taken when the builder was made, or the error that prevented it.
pub(crate) struct SnapshotBuilder {
    snapshot: Option<Result<TakenSnapshot, String>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (meta, path) = self
            .snapshot
            .take()
            .ok_or_else(|| snapshot_err("snapshot builder used twice"))?
            .map_err(snapshot_err)?;
        let file = tokio::fs::File::open(&path).await.map_err(snapshot_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

impl<S: AppliedState> RaftStateMachine<TypeConfig> for StateMachine<S> {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(Option<LogId<u64>>, StoredMembership<u64, Member>)> {
        let bookkeeping = self.state.bookkeeping();
        Ok((bookkeeping.last_applied, bookkeeping.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandOutcome>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let started = std::time::Instant::now();
        let outcomes = entries
            .into_iter()
            .map(|entry| self.apply_entry(&entry))
            .collect::<StorageResult<Vec<_>>>();
        self.state.applied();
        metrics::apply(started.elapsed().as_secs_f64());
        outcomes
    }

    /// Takes the snapshot here, while openraft holds apply, so it is exactly the state at
    /// `last_applied`; the returned builder only opens the finished file.
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let bookkeeping = self.state.bookkeeping();
        let signature = bookkeeping.last_applied;
        let meta = SnapshotMeta {
            last_log_id: signature,
            last_membership: bookkeeping.membership.clone(),
            snapshot_id: format!(
                "{}-{}",
                signature.map(|l| l.leader_id.term).unwrap_or(0),
                signature.map(|l| l.index).unwrap_or(0)
            ),
        };
        let path = self.snapshot_path(&meta.snapshot_id);
        let job = self.state.snapshot_job();
        let dump_path = path.clone();
        // The state must be durable before openraft purges the log entries it covers (the job
        // syncs it first). The dump goes to a temporary name, so a crash never leaves a partial
        // file under the name `current` points at.
        let result = tokio::task::spawn_blocking(move || {
            let tmp = dump_path.with_extension("snap.tmp");
            job(&tmp)?;
            std::fs::rename(&tmp, &dump_path)
        })
        .await;
        let snapshot = match result {
            Ok(Ok(())) => self
                .set_current(&meta)
                .map(|()| (meta, path))
                .map_err(|e| format!("cannot record the snapshot: {e}")),
            Ok(Err(e)) => Err(format!("cannot write a snapshot: {e}")),
            Err(e) => Err(format!("snapshot task failed: {e}")),
        };
        if let Err(e) = &snapshot {
            tracing::error!(error = %e, "snapshot failed");
        }
        SnapshotBuilder {
            snapshot: Some(snapshot),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<tokio::fs::File>> {
        let path = self
            .snapshot_dir
            .join(format!("incoming-{}.partial", crate::message::now_us()));
        let file = tokio::fs::File::create(&path).await.map_err(snapshot_err)?;
        self.receiving = Some(path);
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, Member>,
        snapshot: Box<tokio::fs::File>,
    ) -> StorageResult<()> {
        let mut file = *snapshot;
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .map_err(snapshot_err)?;
        let std_file = file.into_std().await;
        std_file.sync_all().map_err(snapshot_err)?;
        drop(std_file);
        let incoming = self
            .receiving
            .take()
            .ok_or_else(|| snapshot_err("no snapshot is being received"))?;
        let path = self.snapshot_path(&meta.snapshot_id);
        std::fs::rename(&incoming, &path).map_err(snapshot_err)?;
        self.load_snapshot(meta)
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let Some(meta) = self.read_current()? else {
            return Ok(None);
        };
        let path = self.snapshot_path(&meta.snapshot_id);
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(file),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(sm_read_err(e)),
        }
    }
}
