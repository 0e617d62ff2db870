//! The broker's state as raft drives it: [`BrokerState`] implements
//! [`AppliedState`] over the message store.
//!
//! Each committed entry is decided by [`super::apply::apply_command`] into the store's writes,
//! followed by the meta record (the new [`Position`] and raft's bookkeeping). The state database
//! is not synced per entry — the log is the durable record — but it is synced before a snapshot is
//! reported, because openraft purges the log behind a snapshot.
//!
//! The writes of an entry are not atomic ([`super::store`] says why), so the store is known to be
//! whole only after a clean stop, which syncs it and leaves a marker ([`SledSync::stop`]); raft's
//! adapter goes back to a snapshot when it is not.
//!
//! After an entry is in the store its messages are announced ([`Announce`]), so a subscriber that
//! then reads the store finds everything the hub has announced.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use super::apply::apply_command;
use super::position::{self, Position};
use super::sled_sync::SledSync;
use super::snapshot_file;
use super::store::{self, MessageStore, WriteBatch};
use super::undo::{AfterCrash, UndoFile};
use super::Announce;
use crate::error::BrokerError;
use crate::message::{Command, CommandOutcome};
use crate::raft::state_machine::{describe, AppliedState, Bookkeeping, SnapshotJob};

/// What readers (Info, subscriptions, the sweeper) need to know about the applied state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AppliedProgress {
    /// Highest offset given (0 when none).
    pub last_offset: u64,
    /// Encoded bytes of stored batches.
    pub stored_bytes: u64,
    /// Index of the last applied log entry.
    pub applied_index: u64,
    /// Publishes refused as loops so far.
    pub loops_detected: u64,
}

impl AppliedProgress {
    fn new(position: &Position, bookkeeping: &Bookkeeping) -> AppliedProgress {
        AppliedProgress {
            last_offset: position.last_offset(),
            stored_bytes: position.stored_bytes,
            applied_index: bookkeeping.last_applied.map(|l| l.index).unwrap_or(0),
            loops_detected: position.loops_detected,
        }
    }
}

/// The message store with its position, as the replicated log has made it.
pub(crate) struct BrokerState {
    store: MessageStore,
    position: Position,
    /// Raft's bookkeeping, as last saved with the position.
    bookkeeping: Bookkeeping,
    sync: Arc<SledSync>,
    announce: Arc<dyn Announce>,
    progress: watch::Sender<AppliedProgress>,
    /// Whether the store is whole at open: the last run stopped cleanly, or its crash was undone.
    whole: bool,
    /// The before-images of the entries applied since the store was last written out.
    undo: UndoFile,
}

impl BrokerState {
    /// Opens the state database in `dir` (sled) with its batch files in `dir/batches`, and
    /// announces the store's last offset.
    ///
    /// # Errors
    /// The database cannot be opened or read, or its meta record is damaged.
    pub(crate) fn open(
        db: sled::Db,
        dir: &Path,
        announce: Arc<dyn Announce>,
        progress: watch::Sender<AppliedProgress>,
    ) -> anyhow::Result<BrokerState> {
        // Whether the store is whole is decided on the bare tree, and a crash undone there,
        // before the batch files are opened: they remove the files nothing points into, and an
        // undone sweep points into files again.
        let tree = store::tree(&db)?;
        let undo = UndoFile::open(dir)?;
        let meta = store::meta(&tree)?;
        let mut whole = SledSync::take_clean_stop(dir, meta.as_deref())?;
        if !whole && !tree.is_empty() {
            let applied = match &meta {
                Some(bytes) => position::decode(bytes)?.0.last_applied.map(|l| l.index),
                None => None,
            };
            match undo.after_crash(applied) {
                AfterCrash::Undoable(images) => {
                    if !images.is_empty() {
                        tracing::warn!(
                            keys = images.len(),
                            "undoing the entries a crash cut short"
                        );
                        store::put_back(&tree, images)?;
                    }
                    tracing::info!(
                        "the state store was not stopped cleanly, but it is whole: the log is applied from its position on"
                    );
                    whole = true;
                }
                AfterCrash::Unknown(why) => {
                    tracing::info!(why, "the state store cannot be recovered in place");
                }
            }
        }
        let store = MessageStore::open(&db, &dir.join("batches"))?;
        let sync = Arc::new(SledSync::open(db, store.clone(), dir)?);
        let (bookkeeping, position) = position::load(&store)?;
        if whole || store.is_empty() {
            // What the store holds is in the files now: the undo log starts over from it.
            sync.write_out()?;
            undo.restart(bookkeeping.last_applied.map(|l| l.index))?;
        }
        let state = BrokerState {
            store,
            position,
            bookkeeping,
            sync,
            announce,
            progress,
            whole,
            undo,
        };
        state.announce_position();
        Ok(state)
    }

    /// The message store, for readers.
    pub(crate) fn store(&self) -> MessageStore {
        self.store.clone()
    }

    /// The sync handle of the state database (used at shutdown).
    pub(crate) fn sync_handle(&self) -> Arc<SledSync> {
        Arc::clone(&self.sync)
    }

    /// Tells readers and the hub where the state now is, after it was replaced or reopened.
    fn announce_position(&self) {
        self.announce.reset(self.position.last_offset());
        self.progress
            .send_replace(AppliedProgress::new(&self.position, &self.bookkeeping));
    }

    /// Runs `write` while the store is open to writes: never after a stop marked it whole
    /// ([`SledSync::begin_writes`]).
    fn while_open<T>(
        &mut self,
        write: impl FnOnce(&mut Self) -> Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        let sync = Arc::clone(&self.sync);
        let _writing = sync.begin_writes().ok_or_else(|| {
            BrokerError::Storage("the state store is closed: the broker is stopping".into())
        })?;
        write(self)
    }

    /// Writes `batch`, the writes of entry `index`, to the store, its before-images recorded
    /// first ([`super::undo`]); a failure part way marks the store torn, so no stop calls it
    /// whole (the next start undoes it).
    fn write(&self, index: u64, batch: WriteBatch) -> Result<(), BrokerError> {
        let images = self.store.before_images(&batch)?;
        self.undo
            .record(index, &images)
            .map_err(|e| BrokerError::Storage(format!("cannot write the undo record: {e}")))?;
        self.store
            .apply(batch)
            .inspect_err(|_| self.sync.mark_torn())
    }

    /// Records that the whole store is about to be replaced, so a crash before the next entry
    /// goes back to the snapshot rather than trusting a half-replaced store.
    fn replacing(&self) -> Result<(), BrokerError> {
        self.undo
            .replacing()
            .map_err(|e| BrokerError::Storage(format!("cannot write the undo record: {e}")))
    }
}

impl AppliedState for BrokerState {
    fn is_whole(&self) -> bool {
        self.whole
    }

    fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    fn bookkeeping(&self) -> &Bookkeeping {
        &self.bookkeeping
    }

    fn apply(
        &mut self,
        command: Option<&Command>,
        bookkeeping: Bookkeeping,
    ) -> Result<CommandOutcome, BrokerError> {
        self.while_open(|state| {
            let mut batch = WriteBatch::default();
            let mut position = state.position.clone();
            let (outcome, messages) = match command {
                Some(command) => apply_command(&state.store, &mut position, command, &mut batch)?,
                None => (CommandOutcome::Nothing, Vec::new()),
            };
            position.write(&bookkeeping, &mut batch)?;
            let index = bookkeeping.last_applied.map_or(0, |l| l.index);
            state.write(index, batch)?;
            state.position = position;
            state.bookkeeping = bookkeeping;
            if !messages.is_empty() {
                if crate::observability::trace::enabled() {
                    for m in &messages {
                        crate::observability::trace::applied(
                            &m.message.headers,
                            &m.message.channel,
                            m.offset,
                        );
                    }
                }
                state.announce.applied(&messages);
            }
            Ok(outcome)
        })
    }

    fn applied(&mut self) {
        self.progress
            .send_replace(AppliedProgress::new(&self.position, &self.bookkeeping));
        if self.undo.due() {
            // The store's buffers written out, the entries so far need no undoing.
            let restarted = self.sync.write_out().and_then(|()| {
                self.undo
                    .restart(self.bookkeeping.last_applied.map(|l| l.index))
            });
            if let Err(e) = restarted {
                tracing::warn!(error = %e, "cannot start the undo log over; it grows until it can");
            }
        }
    }

    fn snapshot_job(&self) -> SnapshotJob {
        // The view is all that is taken while apply is held; the bodies are read and written
        // after, while entries go on being applied.
        let view = self.store.snapshot_view();
        let sync = Arc::clone(&self.sync);
        Box::new(move |path| {
            let view = view.map_err(std::io::Error::other)?;
            snapshot_file::write(&view, path)?;
            // Released first, so the sync can remove the batch files freed meanwhile.
            drop(view);
            sync.sync()
        })
    }

    fn snapshot_bookkeeping(&self, path: &Path) -> Result<Bookkeeping, BrokerError> {
        snapshot_bookkeeping(path)
    }

    fn install(&mut self, path: &Path, bookkeeping: Bookkeeping) -> Result<(), BrokerError> {
        self.while_open(|state| {
            state.replacing()?;
            snapshot_file::load(&state.store, path).map_err(|e| snapshot_error(path, e))?;
            let (holds, position) = position::load(&state.store)?;
            // The file names the entry it is the state after: one recorded as another (a
            // damaged pointer, a renamed file) would replay the log from the wrong place. The
            // adapter checks before it marks the install; this catches a file changed since.
            if holds.last_applied != bookkeeping.last_applied {
                state.sync.mark_torn();
                return Err(BrokerError::Corrupt(format!(
                    "the snapshot {} holds the state after log entry {} but is recorded as the \
                     state after {}",
                    path.display(),
                    describe(holds.last_applied),
                    describe(bookkeeping.last_applied),
                )));
            }
            let mut batch = WriteBatch::default();
            position.write(&bookkeeping, &mut batch)?;
            state.store.apply(batch)?;
            state.sync_now()?;
            state.restart_undo(bookkeeping.last_applied)?;
            state.position = position;
            state.bookkeeping = bookkeeping;
            Ok(())
        })?;
        self.announce_position();
        Ok(())
    }

    fn clear(&mut self) -> Result<(), BrokerError> {
        self.while_open(|state| {
            state.replacing()?;
            state.store.clear()?;
            state.sync_now()?;
            state.restart_undo(None)?;
            state.position = Position::default();
            state.bookkeeping = Bookkeeping::default();
            Ok(())
        })?;
        self.announce_position();
        Ok(())
    }
}

/// Which entry the snapshot file at `path` is the state after, from the meta record it holds;
/// the file is checked whole.
fn snapshot_bookkeeping(path: &Path) -> Result<Bookkeeping, BrokerError> {
    let checked = snapshot_file::check(path).map_err(|e| snapshot_error(path, e))?;
    match checked.meta {
        Some(bytes) => position::decode(&bytes)
            .map(|(bookkeeping, _)| bookkeeping)
            .map_err(|e| BrokerError::Corrupt(format!("the snapshot {}: {e}", path.display()))),
        None => Ok(Bookkeeping::default()),
    }
}

fn snapshot_error(path: &Path, e: std::io::Error) -> BrokerError {
    match e.kind() {
        std::io::ErrorKind::InvalidData => {
            BrokerError::Corrupt(format!("the snapshot {} is damaged: {e}", path.display()))
        }
        _ => BrokerError::Storage(format!("cannot read the snapshot {}: {e}", path.display())),
    }
}

impl BrokerState {
    /// Starts the undo log over after the store was synced holding the state after `applied`.
    fn restart_undo(&self, applied: Option<openraft::LogId<u64>>) -> Result<(), BrokerError> {
        self.undo
            .restart(applied.map(|l| l.index))
            .map_err(|e| BrokerError::Storage(format!("cannot write the undo log: {e}")))
    }

    fn sync_now(&self) -> Result<(), BrokerError> {
        self.sync
            .sync()
            .map_err(|e| BrokerError::Storage(format!("cannot sync the state store: {e}")))
    }
}

#[cfg(test)]
// Tests that reopen sled folders are serialised by a guard held across awaits on purpose.
#[allow(clippy::await_holding_lock)]
mod tests {
    use super::*;
    use crate::message::{Item, NewMessage, Rules};
    use crate::raft::state_machine::{write_durably, StateMachine, INSTALLING};
    use crate::raft::TypeConfig;
    use openraft::storage::{LogState, RaftSnapshotBuilder, RaftStateMachine, Snapshot};
    use openraft::{CommittedLeaderId, Entry as RaftEntry, EntryPayload, LogId};

    type Entry = openraft::Entry<TypeConfig>;
    type Machine = StateMachine<BrokerState>;

    /// Announces to no one.
    struct Nobody;

    impl Announce for Nobody {
        fn applied(&self, _: &[Arc<crate::message::StoredMessage>]) {}
        fn reset(&self, _: u64) {}
    }

    fn entry(index: u64, channel: &str) -> Entry {
        keyed_entry(index, channel, "")
    }

    /// An entry publishing one message on `channel`, with `key` as its idempotency key (none
    /// when empty), under a dedup window of a minute.
    fn keyed_entry(index: u64, channel: &str, key: &str) -> Entry {
        let message = NewMessage {
            content_type: "application/json".into(),
            schema_version: "1.0.0".into(),
            idempotency_key: key.into(),
            ..NewMessage::on_channel(channel, bytes::Bytes::from_static(b"{}"))
        };
        batch_entry(index, 0, Item::Publish(message))
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

    fn open_state(dir: &Path) -> anyhow::Result<Machine> {
        open_with_log(dir, &log_with(None, 1_000))
    }

    fn open_with_log(dir: &Path, log: &LogState<TypeConfig>) -> anyhow::Result<Machine> {
        let db = open_db(dir);
        let (progress, _) = watch::channel(AppliedProgress::default());
        let state = BrokerState::open(db, dir, Arc::new(Nobody), progress)?;
        StateMachine::open(state, &dir.join("snapshots"), log)
    }

    /// What a raft log holds, for the state machine's start-up checks: entries after `purged`
    /// through `last`.
    fn log_with(purged: Option<u64>, last: u64) -> LogState<TypeConfig> {
        let id = |index| LogId::new(CommittedLeaderId::new(1, 1), index);
        LogState {
            last_purged_log_id: purged.map(id),
            last_log_id: Some(id(last)),
        }
    }

    fn open(dir: &Path) -> Machine {
        open_state(dir).unwrap()
    }

    /// Ends `sm` as a crash the undo record cannot speak for (a reboot or a power loss after it):
    /// the next start goes back to the snapshot.
    fn crash_beyond_undo(sm: Machine, dir: &Path) {
        drop(sm);
        std::fs::remove_file(dir.join("undo")).unwrap();
    }

    /// Stops `sm` cleanly, as the broker does at shutdown.
    fn stop(sm: Machine) {
        sm.state().sync.stop().unwrap();
    }

    fn store(sm: &Machine) -> &MessageStore {
        &sm.state().store
    }

    fn channels(store: &MessageStore) -> Vec<String> {
        store
            .batches_from(0)
            .flat_map(|b| b.unwrap().messages)
            .map(|m| m.message.channel)
            .collect()
    }

    /// A state machine at `dir` that applied `a.one` and `a.two`.
    async fn two_entries(dir: &Path) -> Machine {
        let mut sm = open(dir);
        sm.apply(vec![entry(1, "a.one"), entry(2, "a.two")])
            .await
            .unwrap();
        sm
    }

    /// The same, and a snapshot of them.
    async fn two_entries_and_a_snapshot(dir: &Path) -> (Machine, Snapshot<TypeConfig>) {
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
            assert_eq!(channels(store(&sm)), vec!["a.one", "a.two", "a.three"]);
            // The install crashes half way: marker written, store cleared, nothing loaded yet.
            let marker = bincode::serialize(&snapshot.meta).unwrap();
            write_durably(sm.snapshot_dir(), INSTALLING, &marker).unwrap();
            store(&sm).clear().unwrap();
            sm.state().sync.sync().unwrap();
            snapshot.meta
        };
        let sm = open(dir.path());
        assert_eq!(
            channels(store(&sm)),
            vec!["a.one", "a.two"],
            "the snapshot's state, whole"
        );
        assert_eq!(sm.bookkeeping().last_applied, snapshot_meta.last_log_id);
        assert_eq!(sm.state().position.next_offset, 3);
        assert!(
            !sm.snapshot_dir().join(INSTALLING).exists(),
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
            store(&sm).batch(1),
            Err(crate::error::BrokerError::Corrupt(_))
        ));
        // The intact batch is still served.
        assert_eq!(store(&sm).batch(2).unwrap().unwrap().messages.len(), 1);
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
        assert_eq!(channels(store(&sm)), vec!["a.one", "a.two"]);
        assert_eq!(sm.bookkeeping().last_applied.map(|l| l.index), Some(2));
        // The marker was taken at the start: a crash of this run is a crash.
        sm.apply(vec![entry(3, "a.three")]).await.unwrap();
        crash_beyond_undo(sm, dir.path());
        let sm = open(dir.path());
        assert!(
            channels(store(&sm)).is_empty(),
            "no snapshot: rebuilt empty"
        );
        assert_eq!(sm.bookkeeping().last_applied, None);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_crash_rebuilds_the_store_from_the_snapshot() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let snapshot_meta = {
            let (mut sm, snapshot) = two_entries_and_a_snapshot(dir.path()).await;
            sm.apply(vec![entry(3, "a.three")]).await.unwrap();
            // Synced, even: only a clean stop (or an undo record) says the store is whole.
            sm.state().sync.sync().unwrap();
            crash_beyond_undo(sm, dir.path());
            snapshot.meta
        };
        let mut sm = open(dir.path());
        assert_eq!(channels(store(&sm)), vec!["a.one", "a.two"]);
        assert_eq!(sm.bookkeeping().last_applied, snapshot_meta.last_log_id);
        // openraft applies the log after the snapshot again; the offset is given again.
        sm.apply(vec![entry(3, "a.three")]).await.unwrap();
        assert_eq!(offsets(store(&sm)), vec![1, 2, 3]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_crash_before_any_snapshot_empties_the_store_for_a_full_replay() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        crash_beyond_undo(two_entries(dir.path()).await, dir.path());
        let mut sm = open(dir.path());
        assert!(channels(store(&sm)).is_empty());
        assert_eq!(sm.bookkeeping().last_applied, None);
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
        assert_eq!(channels(store(&sm)), vec!["a.one", "a.two"]);
        assert_eq!(offsets(store(&sm)), vec![1, 2]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn nothing_is_applied_after_the_store_was_marked_whole() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        {
            let mut sm = two_entries(dir.path()).await;
            sm.state().sync.stop().unwrap();
            // openraft's shutdown does not wait for its apply worker: a late apply is refused.
            assert!(sm.apply(vec![entry(3, "a.three")]).await.is_err());
        }
        let sm = open(dir.path());
        assert_eq!(channels(store(&sm)), vec!["a.one", "a.two"]);
        assert_eq!(sm.bookkeeping().last_applied.map(|l| l.index), Some(2));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_failed_write_leaves_no_clean_marker() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        {
            let sm = two_entries(dir.path()).await;
            sm.state().sync.mark_torn();
            sm.state().sync.stop().unwrap();
        }
        assert!(!dir.path().join("clean-stop").exists(), "not called whole");
        // The next start goes by the undo record (here: the last entry was whole).
        let sm = open(dir.path());
        assert_eq!(channels(store(&sm)), vec!["a.one", "a.two"]);
        crash_beyond_undo(sm, dir.path());
        let sm = open(dir.path());
        assert!(channels(store(&sm)).is_empty(), "without it, rebuilt");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_crash_part_way_through_an_entry_is_undone_and_the_entry_applied_again() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let third = keyed_entry(3, "a.three", "key-3");
        {
            let sm = two_entries(dir.path()).await;
            // Entry 3 begins as apply would: its undo record, then the first half of its writes
            // (its batch and its dedup record, not yet the applied position).
            let batch = begin_applying(&sm, &third);
            let state = sm.state();
            state.store.apply(batch.first_half()).unwrap();
            // The process dies here.
        }
        let mut sm = open(dir.path());
        assert_eq!(channels(store(&sm)), vec!["a.one", "a.two"], "undone");
        assert_eq!(sm.bookkeeping().last_applied.map(|l| l.index), Some(2));
        // openraft applies entry 3 again: stored once, not taken for its own duplicate.
        let outcomes = sm.apply(vec![third]).await.unwrap();
        assert_eq!(channels(store(&sm)), vec!["a.one", "a.two", "a.three"]);
        assert_eq!(offsets(store(&sm)), vec![1, 2, 3]);
        let CommandOutcome::Batch(items) = &outcomes[0] else {
            panic!("{outcomes:?}")
        };
        assert!(
            matches!(
                items[0],
                crate::message::ItemOutcome::Stored { offset: 3, .. }
            ),
            "{items:?}"
        );
    }

    /// Begins applying `entry` as apply would: its writes decided and its undo record written.
    /// The caller then stores part or all of the returned writes and "crashes".
    fn begin_applying(sm: &Machine, entry: &Entry) -> WriteBatch {
        let state = sm.state();
        let mut position = state.position.clone();
        let mut batch = WriteBatch::default();
        let EntryPayload::Normal(command) = &entry.payload else {
            unreachable!()
        };
        apply_command(&state.store, &mut position, command, &mut batch).unwrap();
        state
            .undo
            .record(
                entry.log_id.index,
                &state.store.before_images(&batch).unwrap(),
            )
            .unwrap();
        batch
    }

    /// An entry updating entity `contact/42` with `n` stamped `ts` by the broker's clock.
    fn entity_entry(index: u64, n: u64) -> Entry {
        batch_entry(
            index,
            60_000,
            Item::Entity(crate::message::EntityWrite {
                entity_type: "contact".into(),
                id: "42".into(),
                change: crate::entity::Change::Update(
                    [("n".to_owned(), n.to_string())].into_iter().collect(),
                ),
                stamp: crate::entity::Stamp {
                    timestamp_ms: 0,
                    version: 0,
                    writer: "w".into(),
                },
                expected_version: None,
            }),
        )
    }

    /// Entry `index` of one batch holding `item`, stamped `index` ms, under a dedup window of a
    /// minute and a clock skew allowance of `max_clock_skew_ms`.
    fn batch_entry(index: u64, max_clock_skew_ms: u64, item: Item) -> Entry {
        RaftEntry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::Batch {
                stamped_at_us: index * 1_000,
                rules: Rules {
                    dedup_window_us: 60_000_000,
                    loop_window_us: 0,
                    max_hops: 16,
                    max_clock_skew_ms,
                },
                items: vec![item],
            }),
        }
    }

    fn entity_version(outcomes: &[CommandOutcome]) -> u64 {
        match outcomes {
            [CommandOutcome::Batch(items)] => match &items[..] {
                [crate::message::ItemOutcome::Entity(state)] => state.version,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
    }

    /// The entity merged into after a crash is the undone one, never a copy kept from before.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_entity_update_a_crash_cut_short_is_undone_and_merged_again() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let third = entity_entry(3, 3);
        {
            let mut sm = open(dir.path());
            sm.apply(vec![entity_entry(1, 1), entity_entry(2, 2)])
                .await
                .unwrap();
            let batch = begin_applying(&sm, &third);
            let state = sm.state();
            // All of the entry's writes but the applied position: the entity is at version 3.
            state.store.apply(batch).unwrap();
            assert_eq!(
                store(&sm).entity("contact", "42").unwrap().unwrap().version,
                3
            );
            // The process dies here.
        }
        let mut sm = open(dir.path());
        assert_eq!(
            store(&sm).entity("contact", "42").unwrap().unwrap().version,
            2,
            "undone"
        );
        let outcomes = sm.apply(vec![third]).await.unwrap();
        assert_eq!(entity_version(&outcomes), 3, "merged into the undone state");
        let outcomes = sm.apply(vec![entity_entry(4, 4)]).await.unwrap();
        assert_eq!(entity_version(&outcomes), 4);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_snapshot_is_the_state_when_its_view_was_taken_though_apply_goes_on() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let mut sm = two_entries(dir.path()).await;
        let mut builder = sm.get_snapshot_builder().await;
        // Applied while the snapshot is being built.
        sm.apply(vec![entry(3, "a.three")]).await.unwrap();
        let snapshot = builder.build_snapshot().await.unwrap();
        assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(2));

        let follower = tempfile::tempdir().unwrap();
        let mut other = open(follower.path());
        let mut receiving = other.begin_receiving_snapshot().await.unwrap();
        let mut file = *snapshot.snapshot;
        tokio::io::copy(&mut file, &mut *receiving).await.unwrap();
        other
            .install_snapshot(&snapshot.meta, receiving)
            .await
            .unwrap();
        assert_eq!(channels(store(&other)), vec!["a.one", "a.two"]);
        assert_eq!(other.bookkeeping().last_applied.map(|l| l.index), Some(2));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn schema_registrations_travel_in_a_snapshot_and_the_installed_registry_is_seen() {
        use crate::message::{SchemaPolicy, SchemaWrite};

        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let mut sm = two_entries(dir.path()).await;
        let put = RaftEntry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 3),
            payload: EntryPayload::Normal(Command::Batch {
                stamped_at_us: 3_000,
                rules: Rules {
                    dedup_window_us: 0,
                    loop_window_us: 0,
                    max_hops: 16,
                    max_clock_skew_ms: 0,
                },
                items: vec![Item::Schema(SchemaWrite::Put {
                    pattern: "a.*".into(),
                    version: "1.0.0".into(),
                    document: r#"{"required":["id"]}"#.into(),
                    policy: SchemaPolicy::Enforce,
                    registered_by: None,
                })],
            }),
        };
        sm.apply(vec![put]).await.unwrap();
        let snapshot = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();

        let follower = tempfile::tempdir().unwrap();
        let mut other = open(follower.path());
        let registry = crate::schema::SchemaRegistry::new(store(&other).clone());
        let message = NewMessage {
            content_type: "application/json".into(),
            schema_version: "1.0.0".into(),
            ..NewMessage::on_channel("a.one", bytes::Bytes::from_static(b"{}"))
        };
        assert!(matches!(registry.check(&message), Ok(None)), "nothing yet");
        let mut receiving = other.begin_receiving_snapshot().await.unwrap();
        let mut file = *snapshot.snapshot;
        tokio::io::copy(&mut file, &mut *receiving).await.unwrap();
        other
            .install_snapshot(&snapshot.meta, receiving)
            .await
            .unwrap();
        let record = store(&other).schema("a.*", "1.0.0").unwrap().unwrap();
        assert_eq!(record.registered_at_us, 3_000);
        assert!(
            registry.check(&message).is_err(),
            "a registry compiled before the install sees the installed schema"
        );
    }

    /// A state machine at `dir` that took a snapshot of entries 1–2, applied entry 3 and crashed:
    /// its next start goes back to the snapshot. Returns the snapshot's meta.
    async fn crashed_after_a_snapshot(
        dir: &Path,
    ) -> openraft::SnapshotMeta<u64, crate::raft::Member> {
        let (mut sm, snapshot) = two_entries_and_a_snapshot(dir).await;
        sm.apply(vec![entry(3, "a.three")]).await.unwrap();
        crash_beyond_undo(sm, dir);
        snapshot.meta
    }

    fn pointer(dir: &Path) -> std::path::PathBuf {
        dir.join("snapshots").join("current")
    }

    /// The start went back to the snapshot of entries 1–2, whatever the pointer said.
    fn assert_back_at_the_snapshot(sm: &Machine) {
        assert_eq!(channels(store(sm)), vec!["a.one", "a.two"]);
        assert_eq!(sm.bookkeeping().last_applied.map(|l| l.index), Some(2));
        assert_eq!(sm.state().position.next_offset, 3);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_damaged_snapshot_pointer_is_repaired_from_the_snapshot_file() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        crashed_after_a_snapshot(dir.path()).await;
        let sealed = std::fs::read(pointer(dir.path())).unwrap();
        // A flipped byte anywhere: in the header, the index, the membership, the id.
        for at in [0, 3, 6, 12, sealed.len() / 2, sealed.len() - 1] {
            let mut bytes = sealed.clone();
            bytes[at] ^= 0x04;
            std::fs::write(pointer(dir.path()), &bytes).unwrap();
            let sm = open(dir.path());
            assert_back_at_the_snapshot(&sm);
            assert_eq!(
                std::fs::read(pointer(dir.path())).unwrap(),
                sealed,
                "the pointer is written back (byte {at})"
            );
            // No clean stop: the next start is a crash again.
            drop(sm);
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_unsealed_pointer_of_an_earlier_version_is_read_and_checked() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let meta = crashed_after_a_snapshot(dir.path()).await;
        // As earlier versions wrote it: plain bincode.
        std::fs::write(pointer(dir.path()), bincode::serialize(&meta).unwrap()).unwrap();
        assert_back_at_the_snapshot(&open(dir.path()));

        // Its index edited, up or down: it no longer matches the snapshot it names, and is
        // repaired from the file rather than trusted (which would lose or replay entries).
        for index in [52, 1] {
            let mut edited = meta.clone();
            edited.last_log_id = Some(LogId::new(CommittedLeaderId::new(1, 1), index));
            std::fs::write(pointer(dir.path()), bincode::serialize(&edited).unwrap()).unwrap();
            assert_back_at_the_snapshot(&open(dir.path()));
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_pointer_naming_another_state_than_its_file_holds_is_refused() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let meta = crashed_after_a_snapshot(dir.path()).await;
        // Consistent in itself (id and index agree) but not with the file: the file is renamed
        // to match, as a tool or a person might.
        let mut edited = meta.clone();
        edited.last_log_id = Some(LogId::new(CommittedLeaderId::new(1, 1), 52));
        edited.snapshot_id = "1-52".into();
        let snapshots = dir.path().join("snapshots");
        std::fs::rename(snapshots.join("1-2.snap"), snapshots.join("1-52.snap")).unwrap();
        std::fs::write(pointer(dir.path()), bincode::serialize(&edited).unwrap()).unwrap();
        let err = open_state(dir.path()).err().expect("must not start");
        let text = format!("{err:#}");
        assert!(
            text.contains("1-52.snap holds the state after log entry 1-2 but is recorded as the state after 1-52"),
            "{text}"
        );
        assert!(!snapshots.join(INSTALLING).exists(), "nothing was started");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_damaged_pointer_and_no_whole_snapshot_is_refused_naming_the_pointer() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        crashed_after_a_snapshot(dir.path()).await;
        let snap = dir.path().join("snapshots").join("1-2.snap");
        let len = std::fs::metadata(&snap).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&snap).unwrap();
        file.set_len(len - 3).unwrap();
        let mut bytes = std::fs::read(pointer(dir.path())).unwrap();
        bytes[10] ^= 0xff;
        std::fs::write(pointer(dir.path()), &bytes).unwrap();
        let err = open_state(dir.path()).err().expect("must not start");
        let text = format!("{err:#}");
        assert!(text.contains("snapshots/current is damaged"), "{text}");
        assert!(
            text.contains("no snapshot file beside it reads whole"),
            "{text}"
        );
        assert!(text.contains("The way back"), "{text}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_truncated_or_flipped_snapshot_file_is_refused_naming_it() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        crashed_after_a_snapshot(dir.path()).await;
        let snap = dir.path().join("snapshots").join("1-2.snap");
        let whole = std::fs::read(&snap).unwrap();
        for (what, bytes) in [
            ("cut short", whole[..whole.len() - 20].to_vec()),
            ("cut at a record", whole[..12].to_vec()),
            ("flipped", {
                let mut b = whole.clone();
                b[whole.len() / 2] ^= 1;
                b
            }),
        ] {
            std::fs::write(&snap, &bytes).unwrap();
            let err = open_state(dir.path()).err().expect(what);
            let text = format!("{err:#}");
            assert!(text.contains("1-2.snap is damaged"), "{what}: {text}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_state_store_behind_the_log_is_rebuilt_from_a_snapshot_or_refused() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut sm, _) = two_entries_and_a_snapshot(dir.path()).await;
            sm.apply(vec![entry(3, "a.three")]).await.unwrap();
            stop(sm);
        }
        // The state database lost (deleted, or a damaged file sled could only read the start
        // of): the clean-stop marker says whole, but the store holds nothing of entries 1–2,
        // which the log no longer has.
        std::fs::remove_file(dir.path().join("db")).unwrap();
        let purged_through_2 = log_with(Some(2), 3);
        let sm = open_with_log(dir.path(), &purged_through_2).unwrap();
        assert_back_at_the_snapshot(&sm);
        stop(sm);

        // Without a snapshot that covers the purged entries, it is refused.
        std::fs::remove_file(dir.path().join("db")).unwrap();
        std::fs::remove_dir_all(dir.path().join("snapshots")).unwrap();
        let err = open_with_log(dir.path(), &purged_through_2)
            .err()
            .expect("must not start");
        let text = format!("{err:#}");
        assert!(text.contains("the state store (state/db) holds the state after log entry none but the raft log (log/) starts after entry 1-2"), "{text}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_state_ahead_of_the_log_is_refused() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        stop(two_entries(dir.path()).await);
        let err = open_with_log(dir.path(), &log_with(None, 1))
            .err()
            .expect("must not start");
        let text = format!("{err:#}");
        assert!(
            text.contains("the raft log (log/) ends at entry 1-1"),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_received_snapshot_that_is_not_what_it_claims_changes_nothing() {
        let _serial = one_at_a_time();
        let leader = tempfile::tempdir().unwrap();
        let (_leader, snapshot) = two_entries_and_a_snapshot(leader.path()).await;
        let file = leader.path().join("snapshots").join("1-2.snap");
        let follower = tempfile::tempdir().unwrap();
        let mut sm = open(follower.path());
        sm.apply(vec![entry(1, "b.one")]).await.unwrap();
        let mut claims = snapshot.meta.clone();
        claims.last_log_id = Some(LogId::new(CommittedLeaderId::new(1, 1), 9));
        claims.snapshot_id = "1-9".into();
        for (meta, bytes) in [
            (claims, std::fs::read(&file).unwrap()),
            (
                snapshot.meta.clone(),
                std::fs::read(&file).unwrap()[..30].to_vec(),
            ),
        ] {
            let mut receiving = sm.begin_receiving_snapshot().await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut receiving, &bytes)
                .await
                .unwrap();
            assert!(sm.install_snapshot(&meta, receiving).await.is_err());
            assert_eq!(
                channels(store(&sm)),
                vec!["b.one"],
                "the state is untouched"
            );
            assert!(!sm.snapshot_dir().join(INSTALLING).exists());
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_store_rolled_back_after_a_clean_stop_is_undone_or_rebuilt_not_trusted() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        let after_one = {
            let mut sm = open(dir.path());
            sm.apply(vec![entry(1, "a.one")]).await.unwrap();
            let after_one = store(&sm).meta().unwrap().unwrap();
            sm.apply(vec![entry(2, "a.two")]).await.unwrap();
            stop(sm);
            after_one
        };
        // What sled opening an older prefix of its file looks like: entry 2's batch is there,
        // but the applied position is entry 1's. Trusted, entry 2 would be applied twice.
        {
            let db = open_db(dir.path());
            let tree = db.open_tree("messages").unwrap();
            tree.insert(b"m", after_one).unwrap();
            db.flush().unwrap();
        }
        // The undo record (entry 2's) fits the position it now holds: entry 2 is undone, and
        // openraft applies it again. Without the record, the store is rebuilt.
        let sm = open(dir.path());
        assert_eq!(channels(store(&sm)), vec!["a.one"]);
        assert_eq!(sm.bookkeeping().last_applied.map(|l| l.index), Some(1));
        crash_beyond_undo(sm, dir.path());
        let sm = open(dir.path());
        assert!(channels(store(&sm)).is_empty(), "rebuilt for a full replay");
        assert_eq!(sm.bookkeeping().last_applied, None);
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
        let err = open_state(dir.path())
            .err()
            .expect("a damaged state meta must not open");
        assert!(err.to_string().contains("checksum mismatch"), "{err:#}");
    }
}

/// openraft's own storage test suite, run against the segment log store and this state machine:
/// the same checks every openraft storage implementation must pass (log state, purge, truncate,
/// vote, membership, apply, snapshot transfer).
#[cfg(test)]
mod storage_suite {
    use std::sync::Arc;

    use openraft::testing::{StoreBuilder, Suite};
    use openraft::StorageError;

    use super::BrokerState;
    use crate::config::FsyncPolicy;
    use crate::fanout::hub::Hub;
    use crate::raft::log_store::LogStore;
    use crate::raft::state_machine::StateMachine;
    use crate::raft::TypeConfig;

    struct TempDirBuilder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine<BrokerState>, tempfile::TempDir>
        for TempDirBuilder
    {
        async fn build(
            &self,
        ) -> Result<(tempfile::TempDir, LogStore, StateMachine<BrokerState>), StorageError<u64>>
        {
            let dir = tempfile::tempdir().expect("temp dir");
            let log = LogStore::open(
                &dir.path().join("log"),
                FsyncPolicy::Always,
                std::time::Duration::from_millis(100),
            )
            .expect("log store opens");
            let state_dir = dir.path().join("state");
            let db = sled::Config::new()
                .path(&state_dir)
                .cache_capacity(8 << 20)
                .open()
                .expect("state db opens");
            let (progress, _) = tokio::sync::watch::channel(Default::default());
            let state = BrokerState::open(
                db,
                &state_dir,
                Arc::new(Hub::new(
                    0,
                    16,
                    1 << 20,
                    crate::fanout::catch_up_budget::CatchUpBudget::new(1 << 20),
                )),
                progress,
            )
            .expect("state opens");
            let sm = StateMachine::open(state, &state_dir.join("snapshots"), &Default::default())
                .expect("state machine opens");
            Ok((dir, log, sm))
        }
    }

    #[test]
    fn openraft_storage_suite_passes() {
        Suite::test_all(TempDirBuilder).expect("storage suite");
    }
}
