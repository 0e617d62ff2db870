//! The state machine: openraft's `RaftStateMachine` over the message store.
//!
//! Each committed entry is applied by [`crate::apply::apply_command`] into the store's writes,
//! followed by the new last-applied id. The state database is not synced per entry — the log is
//! the durable record — but it is synced before a snapshot is reported, because openraft purges
//! the log behind a snapshot.
//!
//! The writes of an entry are not atomic ([`crate::store`] says why), so the store is known to be
//! whole only after a clean stop, which syncs it and leaves a marker ([`SledSync::stop`]). A start
//! without the marker (a crash, a kill, a power loss, a failed write) rebuilds the store from the
//! current snapshot — or empties it when there is none — and openraft applies the log from there
//! again: it keeps every entry after the snapshot. Restarting after a crash therefore takes a
//! snapshot load and a replay of at most `raft.snapshot_every_entries` entries.
//!
//! After an entry is in the store its messages go to the [`Hub`], so a subscriber that then reads
//! the store finds everything the hub has announced.
//!
//! A snapshot is a dump of the store's records to a file. It is taken while apply is paused
//! (sled has no point-in-time view), which is acceptable while snapshots are rare; see
//! docs/ARCHITECTURE.md.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use tokio::sync::watch;

use super::sync::SledSync;
use super::TypeConfig;
use crate::apply::{apply_command, StateMeta};
use crate::hub::Hub;
use crate::message::CommandOutcome;
use crate::observability::metrics;
use crate::store::{MessageStore, WriteBatch};

type StorageResult<T> = Result<T, StorageError<u64>>;
type Entry = openraft::Entry<TypeConfig>;

/// What readers (Info, subscriptions) need to know about the applied state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppliedProgress {
    /// Highest offset given (0 when none).
    pub last_offset: u64,
    /// Encoded bytes of stored batches.
    pub stored_bytes: u64,
    /// Index of the last applied log entry.
    pub applied_index: u64,
    /// Publishes refused as loops so far.
    pub loops_detected: u64,
}

impl From<&StateMeta> for AppliedProgress {
    fn from(meta: &StateMeta) -> Self {
        AppliedProgress {
            last_offset: meta.last_offset(),
            stored_bytes: meta.stored_bytes,
            applied_index: meta.last_applied.map(|l| l.index).unwrap_or(0),
            loops_detected: meta.loops_detected,
        }
    }
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

/// The state machine.
pub struct StateMachine {
    store: MessageStore,
    meta: StateMeta,
    sync: Arc<SledSync>,
    hub: Hub,
    progress: watch::Sender<AppliedProgress>,
    snapshot_dir: PathBuf,
    /// The file a snapshot from the leader is being received into.
    receiving: Option<PathBuf>,
}

/// Name of the file describing the current snapshot, beside the snapshot files.
const CURRENT: &str = "current";
/// Present while a snapshot is being installed; names it, so a crash mid-install is finished at
/// the next start instead of leaving a half-replaced store.
const INSTALLING: &str = "installing";

impl StateMachine {
    /// Opens the state database in `dir` (sled) with its batch files in `dir/batches`, and sets
    /// `hub` to the store's last offset.
    ///
    /// # Errors
    /// The database cannot be opened or read.
    pub fn open(
        db: sled::Db,
        dir: &Path,
        hub: Hub,
        progress: watch::Sender<AppliedProgress>,
    ) -> anyhow::Result<StateMachine> {
        let store = MessageStore::open(&db, &dir.join("batches"))?;
        let sync = Arc::new(SledSync::open(db, store.clone(), dir)?);
        let stopped_cleanly = sync.take_clean_stop()?;
        let snapshot_dir = dir.join("snapshots");
        std::fs::create_dir_all(&snapshot_dir)?;
        let mut machine = StateMachine {
            meta: StateMeta::load(&store)?,
            store,
            sync,
            hub,
            progress,
            snapshot_dir,
            receiving: None,
        };
        // A crash while installing a snapshot leaves the store half replaced: finish the job from
        // the snapshot file the marker names before anyone reads the store.
        if let Some(meta) = machine.read_marker()? {
            tracing::warn!(snapshot = %meta.snapshot_id, "finishing a snapshot install interrupted by a crash");
            machine.load_snapshot(&meta)?;
        } else if !stopped_cleanly {
            machine.rebuild()?;
        }
        machine.hub.reset(machine.meta.last_offset());
        machine
            .progress
            .send_replace(AppliedProgress::from(&machine.meta));
        Ok(machine)
    }

    fn read_marker(&self) -> StorageResult<Option<SnapshotMeta<u64, crate::raft::Member>>> {
        match std::fs::read(self.snapshot_dir.join(INSTALLING)) {
            Ok(bytes) => bincode::deserialize(&bytes).map(Some).map_err(sm_read_err),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(sm_read_err(e)),
        }
    }

    /// Replaces the store with the snapshot `meta` names, crash-safely: a durable marker is
    /// written first and removed last, and [`StateMachine::open`] finishes an install it finds
    /// marked.
    fn load_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, crate::raft::Member>,
    ) -> StorageResult<()> {
        let marker = bincode::serialize(meta).map_err(snapshot_err)?;
        write_durably(&self.snapshot_dir, INSTALLING, &marker).map_err(snapshot_err)?;
        let path = self.snapshot_path(&meta.snapshot_id);
        load_store(&self.store, &path).map_err(snapshot_err)?;
        self.meta = StateMeta::load(&self.store).map_err(sm_read_err)?;
        self.meta.last_applied = meta.last_log_id;
        self.meta.membership = meta.last_membership.clone();
        let mut batch = WriteBatch::default();
        self.meta.write(&mut batch).map_err(sm_write_err)?;
        self.store.apply(batch).map_err(sm_write_err)?;
        self.sync.sync().map_err(snapshot_err)?;
        self.set_current(meta)?;
        std::fs::remove_file(self.snapshot_dir.join(INSTALLING)).map_err(snapshot_err)?;
        std::fs::File::open(&self.snapshot_dir)
            .and_then(|d| d.sync_all())
            .map_err(snapshot_err)?;
        Ok(())
    }

    /// Goes back to the current snapshot (or to an empty store when there is none) after a start
    /// that did not follow a clean stop: the store may hold part of an entry. openraft then
    /// applies the log from there again: the log keeps every entry after the snapshot.
    fn rebuild(&mut self) -> StorageResult<()> {
        let snapshot = self.read_current()?;
        if snapshot.is_none() && self.store.is_empty() {
            // A new state folder: nothing to rebuild (batch files no record points into were
            // removed when the store opened).
            return Ok(());
        }
        tracing::warn!(
            from_snapshot = snapshot.as_ref().map(|m| m.snapshot_id.as_str()),
            applied_before = ?self.meta.last_applied,
            "the state store was not stopped cleanly; rebuilding it from the snapshot and the log"
        );
        match snapshot {
            Some(meta) => self.load_snapshot(&meta),
            None => {
                self.store.clear().map_err(sm_write_err)?;
                self.meta = StateMeta::load(&self.store).map_err(sm_read_err)?;
                self.sync.sync().map_err(sm_write_err)
            }
        }
    }

    /// The message store, for readers.
    pub fn store(&self) -> MessageStore {
        self.store.clone()
    }

    /// The sync handle of the state database (used at shutdown).
    pub fn sync_handle(&self) -> Arc<SledSync> {
        Arc::clone(&self.sync)
    }

    /// Runs `write` while the store is open to the state machine's writes: never after a stop
    /// marked it whole ([`SledSync::begin_writes`]).
    fn while_open<T>(
        &mut self,
        write: impl FnOnce(&mut Self) -> StorageResult<T>,
    ) -> StorageResult<T> {
        let sync = Arc::clone(&self.sync);
        let _writing = sync
            .begin_writes()
            .ok_or_else(|| sm_write_err("the state store is closed: the broker is stopping"))?;
        write(self)
    }

    fn apply_entry(&mut self, entry: &Entry) -> StorageResult<CommandOutcome> {
        let mut batch = WriteBatch::default();
        let mut meta = self.meta.clone();
        let (outcome, messages) = match &entry.payload {
            EntryPayload::Blank => (CommandOutcome::Nothing, Vec::new()),
            EntryPayload::Normal(command) => {
                apply_command(&self.store, &mut meta, command, &mut batch).map_err(|e| {
                    StorageError::from(StorageIOError::apply(entry.log_id, AnyError::error(e)))
                })?
            }
            EntryPayload::Membership(membership) => {
                meta.membership = StoredMembership::new(Some(entry.log_id), membership.clone());
                (CommandOutcome::Nothing, Vec::new())
            }
        };
        meta.last_applied = Some(entry.log_id);
        meta.write(&mut batch).map_err(sm_write_err)?;
        if let Err(e) = self.store.apply(batch) {
            self.sync.mark_torn();
            return Err(sm_write_err(e));
        }
        self.meta = meta;
        if !messages.is_empty() {
            if crate::observability::trace::enabled() {
                for m in &messages {
                    crate::observability::trace::applied(&m.message.headers, m.offset);
                }
            }
            self.hub.dispatch(&messages);
        }
        Ok(outcome)
    }

    fn snapshot_path(&self, id: &str) -> PathBuf {
        self.snapshot_dir.join(format!("{id}.snap"))
    }

    fn read_current(&self) -> StorageResult<Option<SnapshotMeta<u64, crate::raft::Member>>> {
        match std::fs::read(self.snapshot_dir.join(CURRENT)) {
            Ok(bytes) => bincode::deserialize(&bytes).map(Some).map_err(sm_read_err),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(sm_read_err(e)),
        }
    }

    /// Records `meta` as the current snapshot and removes older snapshot files.
    fn set_current(&self, meta: &SnapshotMeta<u64, crate::raft::Member>) -> StorageResult<()> {
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
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// Snapshot file format: records of (key length u32 LE, key, value length u32 LE, value), every
/// record of the store, in key order.
fn dump_store(store: &MessageStore, path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::create(path)?;
    let mut out = BufWriter::new(file);
    for kv in store.snapshot_records() {
        let (k, v) = kv.map_err(std::io::Error::other)?;
        for part in [k.as_ref(), v.as_ref()] {
            let len = u32::try_from(part.len()).map_err(std::io::Error::other)?;
            out.write_all(&len.to_le_bytes())?;
            out.write_all(part)?;
        }
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

fn load_store(store: &MessageStore, path: &Path) -> std::io::Result<()> {
    let mut input = BufReader::new(std::fs::File::open(path)?);
    store.clear().map_err(std::io::Error::other)?;
    let read_part = |input: &mut BufReader<std::fs::File>| -> std::io::Result<Option<Vec<u8>>> {
        let mut len = [0u8; 4];
        match input.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
        input.read_exact(&mut buf)?;
        Ok(Some(buf))
    };
    while let Some(key) = read_part(&mut input)? {
        let value = read_part(&mut input)?.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "snapshot ends inside a record",
            )
        })?;
        store
            .insert_snapshot_record(&key, &value)
            .map_err(std::io::Error::other)?;
    }
    Ok(())
}

/// A finished snapshot: what it covers, and its file.
type TakenSnapshot = (SnapshotMeta<u64, crate::raft::Member>, PathBuf);

/// Hands openraft the snapshot taken when the builder was made, or the error that prevented it.
pub struct SnapshotBuilder {
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

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> StorageResult<(
        Option<LogId<u64>>,
        StoredMembership<u64, crate::raft::Member>,
    )> {
        Ok((self.meta.last_applied, self.meta.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandOutcome>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let started = std::time::Instant::now();
        let outcomes = self.while_open(|machine| {
            entries
                .into_iter()
                .map(|entry| machine.apply_entry(&entry))
                .collect::<StorageResult<Vec<_>>>()
        })?;
        self.progress
            .send_replace(AppliedProgress::from(&self.meta));
        metrics::apply(started.elapsed().as_secs_f64());
        Ok(outcomes)
    }

    /// Takes the snapshot here, while openraft holds apply, so it is exactly the state at
    /// `last_applied`; the returned builder only opens the finished file.
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let signature = self.meta.last_applied;
        let meta = SnapshotMeta {
            last_log_id: self.meta.last_applied,
            last_membership: self.meta.membership.clone(),
            snapshot_id: format!(
                "{}-{}",
                signature.map(|l| l.leader_id.term).unwrap_or(0),
                signature.map(|l| l.index).unwrap_or(0)
            ),
        };
        let path = self.snapshot_path(&meta.snapshot_id);
        let store = self.store.clone();
        let sync = Arc::clone(&self.sync);
        let dump_path = path.clone();
        // The state must be durable before openraft purges the log entries it covers. The dump
        // goes to a temporary name first, so a crash never leaves a partial file under the name
        // `current` points at.
        let result = tokio::task::spawn_blocking(move || {
            sync.sync()?;
            let tmp = dump_path.with_extension("snap.tmp");
            dump_store(&store, &tmp)?;
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
        meta: &SnapshotMeta<u64, crate::raft::Member>,
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
        self.while_open(|machine| machine.load_snapshot(meta))?;
        self.hub.reset(self.meta.last_offset());
        self.progress
            .send_replace(AppliedProgress::from(&self.meta));
        Ok(())
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

#[cfg(test)]
// Tests that reopen sled folders are serialised by a guard held across awaits on purpose.
#[allow(clippy::await_holding_lock)]
mod tests {
    use super::*;
    use crate::message::{Command, Item, NewMessage, Rules};
    use openraft::{CommittedLeaderId, Entry as RaftEntry};

    fn entry(index: u64, channel: &str) -> Entry {
        let message = NewMessage {
            content_type: "application/json".into(),
            schema_version: "1.0.0".into(),
            ..NewMessage::on_channel(channel, bytes::Bytes::from_static(b"{}"))
        };
        RaftEntry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::Batch {
                stamped_at_us: index * 1_000,
                rules: Rules {
                    dedup_window_us: 0,
                    loop_window_us: 0,
                    max_hops: 16,
                    max_clock_skew_ms: 0,
                },
                items: vec![Item::Publish(message)],
            }),
        }
    }

    /// Retries `attempt` while sled reports its folder locked: a dropped database's threads
    /// release the lock a moment later, and the next open must not fail for that.
    fn while_locked<T, E: std::fmt::Display>(
        mut attempt: impl FnMut() -> Result<T, E>,
    ) -> Result<T, E> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match attempt() {
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::park_timeout(std::time::Duration::from_millis(10));
                }
                result => return result,
            }
        }
    }

    /// Taken by every test here that reopens a sled folder: sled's shared I/O threads can hold a
    /// dropped database (and its folder lock) while other tests keep them busy writing.
    fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        static SLED_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());
        SLED_TESTS.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens sled at `dir`, waiting for a dropped database's threads to release its lock.
    fn open_db(dir: &Path) -> sled::Db {
        while_locked(|| sled::Config::new().path(dir).open()).unwrap()
    }

    fn open(dir: &Path) -> StateMachine {
        let db = open_db(dir);
        let (progress, _) = watch::channel(AppliedProgress::default());
        StateMachine::open(db, dir, Hub::new(0, 16, 1 << 20), progress).unwrap()
    }

    /// Stops `sm` cleanly, as the broker does at shutdown.
    fn stop(sm: StateMachine) {
        sm.sync.stop().unwrap();
    }

    fn channels(store: &MessageStore) -> Vec<String> {
        store
            .batches_from(0)
            .flat_map(|b| b.unwrap().messages)
            .map(|m| m.message.channel)
            .collect()
    }

    /// A state machine at `dir` that applied `a.one` and `a.two`.
    async fn two_entries(dir: &Path) -> StateMachine {
        let mut sm = open(dir);
        sm.apply(vec![entry(1, "a.one"), entry(2, "a.two")])
            .await
            .unwrap();
        sm
    }

    /// The same, and a snapshot of them.
    async fn two_entries_and_a_snapshot(dir: &Path) -> (StateMachine, Snapshot<TypeConfig>) {
        let mut sm = two_entries(dir).await;
        let mut builder = sm.get_snapshot_builder().await;
        let snapshot = builder.build_snapshot().await.unwrap();
        (sm, snapshot)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_crash_during_snapshot_install_is_finished_at_the_next_start() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let snapshot_meta = {
            let (mut sm, snapshot) = two_entries_and_a_snapshot(dir.path()).await;
            sm.apply(vec![entry(3, "a.three")]).await.unwrap();
            assert_eq!(channels(&sm.store), vec!["a.one", "a.two", "a.three"]);
            // The install crashes half way: marker written, store cleared, nothing loaded yet.
            let marker = bincode::serialize(&snapshot.meta).unwrap();
            write_durably(&sm.snapshot_dir, INSTALLING, &marker).unwrap();
            sm.store.clear().unwrap();
            sm.sync.sync().unwrap();
            snapshot.meta
        };
        let sm = open(dir.path());
        assert_eq!(
            channels(&sm.store),
            vec!["a.one", "a.two"],
            "the snapshot's state, whole"
        );
        assert_eq!(sm.meta.last_applied, snapshot_meta.last_log_id);
        assert_eq!(sm.meta.next_offset, 3);
        assert!(
            !sm.snapshot_dir.join(INSTALLING).exists(),
            "the marker is gone"
        );
    }

    /// Flips the last byte of the state record under `key`, as a damaged disk would.
    fn damage(dir: &Path, key: &[u8]) {
        let db = open_db(dir);
        let tree = db.open_tree("messages").unwrap();
        let mut value = tree.get(key).unwrap().expect("record present").to_vec();
        let last = value.len() - 1;
        value[last] ^= 0x20;
        tree.insert(key, value).unwrap();
        db.flush().unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_damaged_batch_is_refused_not_served() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        stop(two_entries(dir.path()).await);
        damage(dir.path(), &batch_key(1));
        let sm = open(dir.path());
        assert!(matches!(
            sm.store.batch(1),
            Err(crate::error::BrokerError::Corrupt(_))
        ));
        // The intact batch is still served.
        assert_eq!(sm.store.batch(2).unwrap().unwrap().messages.len(), 1);
    }

    /// The state tree's key of the batch whose first offset is `first_offset`.
    fn batch_key(first_offset: u64) -> Vec<u8> {
        let mut key = vec![b'b'];
        key.extend_from_slice(&first_offset.to_be_bytes());
        key
    }

    fn offsets(store: &MessageStore) -> Vec<u64> {
        store
            .batches_from(0)
            .flat_map(|b| b.unwrap().messages)
            .map(|m| m.offset)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_clean_stop_keeps_the_store_and_the_next_crash_is_still_seen() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        stop(two_entries(dir.path()).await);
        let mut sm = open(dir.path());
        assert_eq!(channels(&sm.store), vec!["a.one", "a.two"]);
        assert_eq!(sm.meta.last_applied.map(|l| l.index), Some(2));
        // The marker was taken at the start: a crash of this run is a crash.
        sm.apply(vec![entry(3, "a.three")]).await.unwrap();
        drop(sm);
        let sm = open(dir.path());
        assert!(channels(&sm.store).is_empty(), "no snapshot: rebuilt empty");
        assert_eq!(sm.meta.last_applied, None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_crash_rebuilds_the_store_from_the_snapshot() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let snapshot_meta = {
            let (mut sm, snapshot) = two_entries_and_a_snapshot(dir.path()).await;
            sm.apply(vec![entry(3, "a.three")]).await.unwrap();
            // Synced, even: only a clean stop says the store is whole.
            sm.sync.sync().unwrap();
            snapshot.meta
        };
        let mut sm = open(dir.path());
        assert_eq!(channels(&sm.store), vec!["a.one", "a.two"]);
        assert_eq!(sm.meta.last_applied, snapshot_meta.last_log_id);
        // openraft applies the log after the snapshot again; the offset is given again.
        sm.apply(vec![entry(3, "a.three")]).await.unwrap();
        assert_eq!(offsets(&sm.store), vec![1, 2, 3]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_crash_before_any_snapshot_empties_the_store_for_a_full_replay() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        drop(two_entries(dir.path()).await);
        let mut sm = open(dir.path());
        assert!(channels(&sm.store).is_empty());
        assert_eq!(sm.meta.last_applied, None);
        assert!(
            std::fs::read_dir(dir.path().join("batches"))
                .unwrap()
                .next()
                .is_none(),
            "no batch file is left behind"
        );
        // The replay writes the same state again, from offset 1.
        sm.apply(vec![entry(1, "a.one"), entry(2, "a.two")])
            .await
            .unwrap();
        assert_eq!(channels(&sm.store), vec!["a.one", "a.two"]);
        assert_eq!(offsets(&sm.store), vec![1, 2]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn nothing_is_applied_after_the_store_was_marked_whole() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        {
            let mut sm = two_entries(dir.path()).await;
            sm.sync.stop().unwrap();
            // openraft's shutdown does not wait for its apply worker: a late apply is refused.
            assert!(sm.apply(vec![entry(3, "a.three")]).await.is_err());
        }
        let sm = open(dir.path());
        assert_eq!(channels(&sm.store), vec!["a.one", "a.two"]);
        assert_eq!(sm.meta.last_applied.map(|l| l.index), Some(2));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_failed_write_leaves_no_clean_marker() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        {
            let sm = two_entries(dir.path()).await;
            sm.sync.mark_torn();
            sm.sync.stop().unwrap();
        }
        let sm = open(dir.path());
        assert!(channels(&sm.store).is_empty(), "rebuilt, not trusted");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_damaged_applied_position_refuses_the_start() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        {
            let mut sm = open(dir.path());
            sm.apply(vec![entry(1, "a.one")]).await.unwrap();
            stop(sm);
        }
        damage(dir.path(), b"m");
        let db = open_db(dir.path());
        let (progress, _) = watch::channel(AppliedProgress::default());
        let err = StateMachine::open(db, dir.path(), Hub::new(0, 16, 1 << 20), progress)
            .err()
            .expect("a damaged state meta must not open");
        assert!(err.to_string().contains("checksum mismatch"), "{err:#}");
    }
}
