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
//! A snapshot is built off the apply path: while openraft holds apply, the state hands over a job
//! that has captured a view of it ([`AppliedState::snapshot_job`]); openraft runs the builder in a
//! task of its own while entries go on being applied.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogState, RaftStateMachine, Snapshot};
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
pub(crate) type SnapshotJob = Box<dyn FnOnce(&Path) -> std::io::Result<()> + Send + Sync>;

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
    /// A job that writes the state as it is now to a snapshot file: taken while apply is held
    /// (it must capture its view of the state then), run on a blocking thread while entries go
    /// on being applied.
    fn snapshot_job(&self) -> SnapshotJob;
    /// Which entry the snapshot file at `path` is the state after, read from the file itself
    /// (checked whole): how a damaged pointer is repaired, and how a file is told from another.
    ///
    /// # Errors
    /// The file is damaged or cannot be read.
    fn snapshot_bookkeeping(&self, path: &Path) -> Result<Bookkeeping, BrokerError>;
    /// Replaces the state with the snapshot file at `path` and saves `bookkeeping`; durable when it
    /// returns. A file that is damaged, or is not the state after `bookkeeping.last_applied`,
    /// changes nothing.
    ///
    /// # Errors
    /// The file is damaged, is another snapshot, or cannot be read, or the state cannot be
    /// written.
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
    /// Held while `current` is read and replaced: snapshots are built in tasks of their own.
    pointer: Arc<Mutex<()>>,
}

/// Name of the file describing the current snapshot, beside the snapshot files.
const CURRENT: &str = "current";
/// Present while a snapshot is being installed; names it, so a crash mid-install is finished at
/// the next start instead of leaving a half-replaced state.
pub(crate) const INSTALLING: &str = "installing";

impl<S: AppliedState> StateMachine<S> {
    /// Wraps `state`, with its snapshots in `snapshot_dir`, for a log that holds `log`. Finishes a
    /// snapshot install a crash interrupted, goes back to the current snapshot when the state is
    /// not whole, and checks that the log continues the state: a state behind the log's first
    /// entry (a damaged or lost state store) is rebuilt from a snapshot that covers the gap,
    /// anything else that does not fit is refused, naming the file.
    ///
    /// # Errors
    /// The state or the snapshot files cannot be read or written, or are damaged beyond repair.
    pub(crate) fn open(
        state: S,
        snapshot_dir: &Path,
        log: &LogState<TypeConfig>,
    ) -> anyhow::Result<StateMachine<S>> {
        std::fs::create_dir_all(snapshot_dir)?;
        let mut machine = StateMachine {
            state,
            snapshot_dir: snapshot_dir.to_owned(),
            receiving: None,
            pointer: Arc::default(),
        };
        machine.remove_leftovers();
        // A crash while installing a snapshot leaves the state half replaced: finish the job from
        // the snapshot file the marker names before anyone reads the state.
        match machine.read_pointer(INSTALLING) {
            Ok(Some(meta)) => {
                tracing::warn!(snapshot = %meta.snapshot_id, "finishing a snapshot install interrupted by a crash");
                machine.load_snapshot(&meta)?;
            }
            Ok(None) if machine.state.is_whole() => {
                // Not needed to start, but checked now: openraft reads it when it sends a
                // snapshot, and a damaged one found then would stop raft.
                machine.current_or_repair()?;
            }
            Ok(None) => machine.rebuild()?,
            Err(damage) => {
                // The install it marks was cut short: the state is half replaced whatever the
                // marker said, and the snapshot files themselves say what they hold.
                tracing::warn!(%damage, "the snapshot install marker is damaged; rebuilding the state");
                machine.rebuild()?;
            }
        }
        machine.check_against_log(log)?;
        Ok(machine)
    }

    /// Removes what a crash left half written: snapshot dumps (`.snap.tmp`) and snapshots being
    /// received (`.partial`).
    fn remove_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.snapshot_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".snap.tmp") || name.ends_with(".partial") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
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

    /// The snapshot meta in the pointer file `name` (`current` or `installing`), checked; `None`
    /// when there is no such file.
    ///
    /// # Errors
    /// What is wrong with it, naming it.
    fn read_pointer(&self, name: &str) -> Result<Option<SnapshotMeta<u64, Member>>, String> {
        let path = self.snapshot_dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => decode_pointer(&bytes)
                .map(Some)
                .map_err(|what| format!("{} is damaged: {what}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// The snapshot in force: the one `current` names or, when that file is damaged, the newest
    /// snapshot file that reads whole (written back to `current`).
    ///
    /// # Errors
    /// `current` is damaged and no snapshot file is whole.
    fn current_or_repair(&self) -> anyhow::Result<Option<SnapshotMeta<u64, Member>>> {
        match self.read_pointer(CURRENT) {
            Ok(meta) => Ok(meta),
            Err(damage) => match self.newest_whole_snapshot() {
                Some(meta) => {
                    tracing::warn!(
                        %damage,
                        snapshot = %meta.snapshot_id,
                        "the snapshot pointer is damaged; repaired from the newest whole snapshot file"
                    );
                    self.set_current(&meta)?;
                    Ok(Some(meta))
                }
                None => anyhow::bail!(
                    "{damage}, and no snapshot file beside it reads whole: this node cannot tell \
                     which state the log continues. {WAY_BACK}"
                ),
            },
        }
    }

    /// The newest snapshot file in the folder that reads whole, with the meta it holds.
    fn newest_whole_snapshot(&self) -> Option<SnapshotMeta<u64, Member>> {
        let entries = std::fs::read_dir(&self.snapshot_dir).ok()?;
        let mut newest: Option<SnapshotMeta<u64, Member>> = None;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".snap")) else {
                continue;
            };
            let bookkeeping = match self.state.snapshot_bookkeeping(&entry.path()) {
                Ok(bookkeeping) => bookkeeping,
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "a snapshot file is not whole");
                    continue;
                }
            };
            if snapshot_id(bookkeeping.last_applied) != id {
                tracing::warn!(file = %entry.path().display(), "a snapshot file holds another snapshot than its name says");
                continue;
            }
            if newest
                .as_ref()
                .is_some_and(|n| n.last_log_id >= bookkeeping.last_applied)
            {
                continue;
            }
            newest = Some(SnapshotMeta {
                last_log_id: bookkeeping.last_applied,
                last_membership: bookkeeping.membership,
                snapshot_id: id.to_owned(),
            });
        }
        newest
    }

    /// Refuses a state the log does not continue. A state behind the log's first entry lost what
    /// the purged entries did: it is rebuilt from the newest whole snapshot that covers them.
    fn check_against_log(&mut self, log: &LogState<TypeConfig>) -> anyhow::Result<()> {
        let applied = self.state.bookkeeping().last_applied;
        let index = |id: Option<LogId<u64>>| id.map(|id| id.index);
        if index(applied) < index(log.last_purged_log_id) {
            let purged = describe(log.last_purged_log_id);
            // The newest whole file, whatever `current` says: it is `current`'s own file when
            // that one is whole and newest.
            let snapshot = self
                .newest_whole_snapshot()
                .filter(|meta| index(meta.last_log_id) >= index(log.last_purged_log_id));
            let Some(meta) = snapshot else {
                anyhow::bail!(
                    "the state store (state/db) holds the state after log entry {} but the raft \
                     log (log/) starts after entry {purged}, and no snapshot in {} covers the \
                     entries between: the state store is damaged or was lost, or the snapshots \
                     were. {WAY_BACK}",
                    describe(applied),
                    self.snapshot_dir.display(),
                );
            };
            tracing::warn!(
                applied = %describe(applied),
                log_starts_after = %purged,
                snapshot = %meta.snapshot_id,
                "the state store (state/db) is behind the raft log (damaged or lost); rebuilding it from a snapshot"
            );
            self.load_snapshot(&meta)?;
        }
        let applied = self.state.bookkeeping().last_applied;
        if index(applied) > index(log.last_log_id) {
            anyhow::bail!(
                "the state store (state/db) holds the state after log entry {} but the raft log \
                 (log/) ends at entry {}: the log lost entries the state was built from (damaged, \
                 replaced or removed). {WAY_BACK}",
                describe(applied),
                describe(log.last_log_id),
            );
        }
        Ok(())
    }

    /// Replaces the state with the snapshot `meta` names, crash-safely: a durable marker is
    /// written first and removed last, and [`StateMachine::open`] finishes an install it finds
    /// marked.
    fn load_snapshot(&mut self, meta: &SnapshotMeta<u64, Member>) -> StorageResult<()> {
        // Checked before the marker: a damaged file, or one holding another state than `meta`
        // says, changes nothing (and is not retried at every start).
        let path = self.snapshot_path(&meta.snapshot_id);
        let holds = self
            .state
            .snapshot_bookkeeping(&path)
            .map_err(snapshot_err)?;
        if holds.last_applied != meta.last_log_id {
            return Err(snapshot_err(format!(
                "the snapshot {} holds the state after log entry {} but is recorded as the state \
                 after {}",
                path.display(),
                describe(holds.last_applied),
                describe(meta.last_log_id),
            )));
        }
        write_durably(&self.snapshot_dir, INSTALLING, &encode_pointer(meta)?)
            .map_err(snapshot_err)?;
        let bookkeeping = Bookkeeping {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
        };
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
    fn rebuild(&mut self) -> anyhow::Result<()> {
        let snapshot = self.current_or_repair()?;
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
            Some(meta) => Ok(self.load_snapshot(&meta)?),
            None => Ok(self.state.clear().map_err(sm_write_err)?),
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
        snapshot_path(&self.snapshot_dir, id)
    }

    /// The current snapshot, for openraft (a damaged pointer is a storage error here: it was
    /// repaired or refused at start, so damage now happened while running).
    fn read_current(&self) -> StorageResult<Option<SnapshotMeta<u64, Member>>> {
        self.read_pointer(CURRENT).map_err(sm_read_err)
    }

    /// Records `meta` as the current snapshot and removes older snapshot files.
    fn set_current(&self, meta: &SnapshotMeta<u64, Member>) -> StorageResult<()> {
        record_current(&self.snapshot_dir, meta, &self.pointer)
    }
}

/// The file of snapshot `id` in `dir`.
fn snapshot_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.snap"))
}

/// Records `meta` as the current snapshot in `dir` unless a later one is recorded already (a
/// snapshot installed while this one was being built), and removes the other snapshot files.
fn record_current(
    dir: &Path,
    meta: &SnapshotMeta<u64, Member>,
    pointer: &Mutex<()>,
) -> StorageResult<()> {
    let _recording = pointer.lock().unwrap_or_else(|p| p.into_inner());
    if let Ok(bytes) = std::fs::read(dir.join(CURRENT)) {
        if decode_pointer(&bytes).is_ok_and(|current| current.last_log_id > meta.last_log_id) {
            return Ok(());
        }
    }
    write_durably(dir, CURRENT, &encode_pointer(meta)?).map_err(snapshot_err)?;
    // Only older snapshots go: a newer one may have just been received and be about to be
    // installed. Files being written (`.snap.tmp`) or received (`.partial`) are left to whoever
    // writes them; the start removes those a crash left.
    let this = meta.last_log_id.map(|id| id.index);
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let older = name
                .to_str()
                .and_then(|n| n.strip_suffix(".snap"))
                .and_then(|id| id.split_once('-'))
                .and_then(|(_, index)| index.parse::<u64>().ok())
                .is_some_and(|index| Some(index) < this);
            if older {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
}

/// What to do about a data folder that cannot be trusted (docs/DURABILITY.md says more).
const WAY_BACK: &str =
    "The way back: in a cluster, stop this node, wipe its data folder and start \
     it again, and it is rebuilt from the others; a single node has no others: restore its data \
     folder from a backup (see docs/DURABILITY.md)";

/// The id of the snapshot of the state after `last_applied`; also its file's name.
fn snapshot_id(last_applied: Option<LogId<u64>>) -> String {
    format!(
        "{}-{}",
        last_applied.map(|l| l.leader_id.term).unwrap_or(0),
        last_applied.map(|l| l.index).unwrap_or(0)
    )
}

/// A log position for a message: `term-index`, or `none`.
pub(crate) fn describe(id: Option<LogId<u64>>) -> String {
    id.map_or_else(
        || "none".into(),
        |id| format!("{}-{}", id.leader_id.term, id.index),
    )
}

/// A snapshot pointer (`current`, `installing`) as stored: the sealed bincode of the meta.
fn encode_pointer(meta: &SnapshotMeta<u64, Member>) -> StorageResult<Vec<u8>> {
    crate::checksum::encode(meta).map_err(snapshot_err)
}

/// Reads a snapshot pointer, sealed or as earlier versions wrote it (plain bincode), and checks
/// that it says one consistent thing.
///
/// # Errors
/// What is wrong with it.
fn decode_pointer(bytes: &[u8]) -> Result<SnapshotMeta<u64, Member>, String> {
    let meta: SnapshotMeta<u64, Member> = match crate::checksum::open(bytes) {
        Ok(payload) => {
            bincode::deserialize(payload).map_err(|e| format!("cannot decode it: {e}"))?
        }
        // Unsealed bincode starts with the tag of an `Option` (the last log id): 0 or 1.
        Err(crate::checksum::CorruptRecord::UnknownFormat { found: 0 | 1 }) => {
            bincode::deserialize(bytes).map_err(|e| format!("cannot decode it: {e}"))?
        }
        Err(e) => return Err(e.to_string()),
    };
    if meta.snapshot_id != snapshot_id(meta.last_log_id) {
        return Err(format!(
            "it names snapshot {:?} as the state after log entry {}",
            meta.snapshot_id,
            describe(meta.last_log_id)
        ));
    }
    if meta.last_membership.log_id() > &meta.last_log_id {
        return Err("its membership is later than the state it names".into());
    }
    let membership = meta.last_membership.membership();
    if let Some(voter) = membership
        .voter_ids()
        .find(|id| membership.get_node(id).is_none())
    {
        return Err(format!(
            "its membership names voter {voter} without its address"
        ));
    }
    Ok(meta)
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

/// Whether the open `file` is the file at `path`.
fn same_file(file: &std::fs::File, path: &Path) -> std::io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let (open, named) = (file.metadata()?, std::fs::metadata(path)?);
        Ok((open.dev(), open.ino()) == (named.dev(), named.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = (file, path);
        Ok(true)
    }
}

/// Builds the snapshot whose view was taken when the builder was made, off the apply path.
pub(crate) struct SnapshotBuilder {
    meta: SnapshotMeta<u64, Member>,
    snapshot_dir: PathBuf,
    job: Option<SnapshotJob>,
    /// Shared with the state machine: `current` is read and replaced under it.
    pointer: Arc<Mutex<()>>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let job = self
            .job
            .take()
            .ok_or_else(|| snapshot_err("snapshot builder used twice"))?;
        let path = snapshot_path(&self.snapshot_dir, &self.meta.snapshot_id);
        let dump_path = path.clone();
        // The dump goes to a temporary name, so a crash never leaves a partial file under the
        // name `current` points at.
        let result = tokio::task::spawn_blocking(move || {
            let tmp = dump_path.with_extension("snap.tmp");
            job(&tmp)?;
            std::fs::rename(&tmp, &dump_path)
        })
        .await;
        let recorded = match result {
            Ok(Ok(())) => record_current(&self.snapshot_dir, &self.meta, &self.pointer)
                .map_err(|e| format!("cannot record the snapshot: {e}")),
            Ok(Err(e)) => Err(format!("cannot write a snapshot: {e}")),
            Err(e) => Err(format!("snapshot task failed: {e}")),
        };
        if let Err(e) = recorded {
            tracing::error!(error = %e, "snapshot failed");
            return Err(snapshot_err(e));
        }
        let file = tokio::fs::File::open(&path).await.map_err(snapshot_err)?;
        Ok(Snapshot {
            meta: self.meta.clone(),
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

    /// Takes the view of the state here, while openraft holds apply, so the snapshot is exactly
    /// the state at `last_applied`; openraft builds it in a task of its own while apply goes on.
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let bookkeeping = self.state.bookkeeping();
        let signature = bookkeeping.last_applied;
        SnapshotBuilder {
            meta: SnapshotMeta {
                last_log_id: signature,
                last_membership: bookkeeping.membership.clone(),
                snapshot_id: snapshot_id(signature),
            },
            snapshot_dir: self.snapshot_dir.clone(),
            job: Some(self.state.snapshot_job()),
            pointer: Arc::clone(&self.pointer),
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
        let mut std_file = file.into_std().await;
        let incoming = self
            .receiving
            .take()
            .ok_or_else(|| snapshot_err("no snapshot is being received"))?;
        // openraft may hand back another file than the one it was given to receive into (its
        // storage suite passes the leader's own snapshot file): then that file is the snapshot.
        if !same_file(&std_file, &incoming).map_err(snapshot_err)? {
            use std::io::Seek;
            std_file.rewind().map_err(snapshot_err)?;
            let mut copy = std::fs::File::create(&incoming).map_err(snapshot_err)?;
            std::io::copy(&mut std_file, &mut copy).map_err(snapshot_err)?;
            std_file = copy;
        }
        std_file.sync_all().map_err(snapshot_err)?;
        drop(std_file);
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
