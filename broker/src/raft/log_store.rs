//! The replicated log: openraft's `RaftLogStorage` over segment files.
//!
//! Entries go to append-only segment files ([`super::segment`]); the vote, the committed id and
//! the purge point to a small file replaced atomically, and the highest index made durable to a
//! watermark file ([`super::log_meta`]). An append writes its entries with one write and hands the
//! completion callback to the flusher thread, which gathers every callback waiting, makes them all
//! durable with one fdatasync per segment written (and a sync of the folder when a segment was
//! created), records the watermark, and only then reports them flushed — so openraft commits (and
//! the broker acknowledges) only what is on disk, and concurrent appends share one fdatasync.
//!
//! Sharing: clones (the reader openraft asks for is one) share one [`SegmentLog`] behind a mutex
//! that is held only to change or look up the index, never across a sync; reads copy out where
//! their records are and read them without it. The first read of entries just appended takes them
//! from memory instead ([`super::recent`]).

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError,
    StorageIOError, Vote,
};

use super::log_meta::{LogMeta, MetaFile, Watermark};
use super::recent::RecentEntries;
use super::segment::{damaged, sync_dir, RecordError, SegmentLog, Unsynced};
use super::TypeConfig;
use crate::config::FsyncPolicy;

/// Callbacks waiting for the flusher; bounded, as openraft bounds its in-flight appends.
const FLUSH_QUEUE: usize = 4096;

/// Taken (as an advisory lock) by the process that has the log open: two processes appending to
/// the same segments, or one cutting off what it takes for a torn tail while the other writes it,
/// would destroy the log.
const LOCK_FILE: &str = "lock";

type StorageResult<T> = Result<T, StorageError<u64>>;

fn write_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_logs(&e).into()
}

/// A stored entry failed its check (or did not decode): openraft treats the storage error as
/// fatal and stops raft on this node, so it neither serves nor votes from damaged data.
fn corrupt_err(index: u64, e: &RecordError) -> StorageError<u64> {
    tracing::error!(
        index,
        error = %e,
        "the raft log is damaged: this node stops raft rather than serve or vote from bad data; \
         rebuild it from the other nodes (wipe its data folder) or restore it"
    );
    StorageIOError::read_log_at_index(index, &io::Error::other(format!("damaged entry: {e}")))
        .into()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// What every clone of the store and the flusher thread share.
struct Shared {
    dir: PathBuf,
    log: Mutex<SegmentLog>,
    meta: Mutex<LogMeta>,
    /// Serialises replacements of the meta file (held across its syncs; nothing else waits on it).
    meta_file: Mutex<MetaFile>,
    watermark: Watermark,
    /// Entries just appended, so the first reader of them need not decode them again.
    recent: Mutex<RecentEntries>,
    /// Holds the advisory lock on [`LOCK_FILE`] while the store is open.
    _lock: File,
}

impl Shared {
    /// Makes every entry appended so far durable, then records the watermark.
    fn sync_and_record(&self) -> io::Result<()> {
        let _held = lock(&self.watermark.lock);
        let (appended, unsynced) = {
            let mut log = lock(&self.log);
            (
                self.watermark.appended.load(Ordering::SeqCst),
                log.take_unsynced(),
            )
        };
        let started = std::time::Instant::now();
        let synced = sync_all(&self.dir, &unsynced);
        crate::observability::metrics::log_sync(started.elapsed().as_secs_f64());
        match synced {
            Ok(()) => self.watermark.write(appended),
            Err(e) => {
                lock(&self.log).restore_unsynced(unsynced);
                Err(e)
            }
        }
    }

    /// Replaces the meta file with the in-memory metadata changed by `change`, then makes the
    /// change visible.
    fn write_meta(&self, change: impl FnOnce(&mut LogMeta)) -> io::Result<()> {
        let file = lock(&self.meta_file);
        let mut meta = lock(&self.meta).clone();
        change(&mut meta);
        file.write(&meta)?;
        *lock(&self.meta) = meta;
        Ok(())
    }

    fn meta(&self) -> LogMeta {
        lock(&self.meta).clone()
    }
}

fn sync_all(dir: &Path, unsynced: &Unsynced) -> io::Result<()> {
    for file in &unsynced.files {
        file.sync_data()?;
    }
    if unsynced.folder {
        sync_dir(dir)?;
    }
    Ok(())
}

/// The flusher thread and the queue to it; dropped with the last clone of the store, which ends
/// the thread after a last sync and waits for it, so the files are quiet once the store is gone.
struct Flusher {
    queue: Option<mpsc::SyncSender<LogFlushed<TypeConfig>>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The log store. Clones share the same files and index (the reader openraft asks for is a clone).
#[derive(Clone)]
pub(crate) struct LogStore {
    shared: Arc<Shared>,
    flusher: Arc<Flusher>,
    policy: FsyncPolicy,
}

impl LogStore {
    /// [`LogStore::open_with`] with segments of the largest size.
    #[cfg(test)]
    pub(crate) fn open(
        dir: &Path,
        policy: FsyncPolicy,
        sync_interval: Duration,
    ) -> io::Result<LogStore> {
        LogStore::open_with(dir, policy, sync_interval, super::segment::SEGMENT_BYTES)
    }

    /// Opens (or creates) the log in `dir`, checking it, and starts its flusher thread; segment
    /// files fill up at `segment_bytes`.
    ///
    /// # Errors
    /// `InvalidData` when the log is damaged, lost its tail or is in the old sled format; another
    /// process has it open; any I/O error.
    pub(crate) fn open_with(
        dir: &Path,
        policy: FsyncPolicy,
        sync_interval: Duration,
        segment_bytes: u64,
    ) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        if dir.join("db").exists() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} holds a raft log in the sled format of earlier versions, which this \
                     version does not read: rebuild this node from the others (wipe its data \
                     folder)",
                    dir.display()
                ),
            ));
        }
        let lock_file = File::create(dir.join(LOCK_FILE))?;
        lock_file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::WouldBlock => io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("another process has the raft log in {} open", dir.display()),
            ),
            std::fs::TryLockError::Error(e) => e,
        })?;
        let (meta_file, meta) = MetaFile::open(dir)?;
        let (watermark, durable) = Watermark::open(dir)?;
        let mut log =
            SegmentLog::open(dir, durable, meta.purged.map(|id| id.index), segment_bytes)?;
        if let Some(purged) = meta.purged {
            // Segments a crash kept from being removed after the purge point was recorded.
            if log.purge(purged.index)? {
                sync_dir(dir)?;
            }
        }
        let last = log
            .last()
            .map(|id| id.index)
            .max(meta.purged.map(|id| id.index))
            .unwrap_or(0);
        if let Some(durable) = durable {
            if durable > last {
                return Err(damaged(format!(
                    "it ends at index {last}, but entries up to {durable} were made durable: its \
                     files lost their tail"
                )));
            }
        }
        watermark.appended.store(last, Ordering::SeqCst);
        // What was recovered is on disk: record it, so the check holds from now on. A new file is
        // synced once, so a power failure cannot leave it present but empty.
        if durable.is_none_or(|durable| durable < last) {
            watermark.write(last)?;
        }
        if durable.is_none() {
            watermark.file.sync_data()?;
        }
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            log: Mutex::new(log),
            meta: Mutex::new(meta),
            meta_file: Mutex::new(meta_file),
            watermark,
            recent: Mutex::new(RecentEntries::default()),
            _lock: lock_file,
        });
        let (queue, waiting) = mpsc::sync_channel(FLUSH_QUEUE);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("log-flusher".into())
            .spawn(move || flusher_loop(&thread_shared, &waiting, policy, sync_interval))?;
        Ok(LogStore {
            shared,
            flusher: Arc::new(Flusher {
                queue: Some(queue),
                thread: Some(thread),
            }),
            policy,
        })
    }

    /// The last log id: of the last entry present, or the purge point when that is later.
    fn last_log_id(&self, purged: Option<LogId<u64>>) -> Option<LogId<u64>> {
        let last = lock(&self.shared.log).last();
        match (last, purged) {
            (Some(last), Some(purged)) if purged.index >= last.index => Some(purged),
            (last, purged) => last.or(purged),
        }
    }
}

/// Gathers waiting callbacks and completes them after one sync. With the periodic policy the
/// callbacks were already completed at append time and this only syncs on a timer.
fn flusher_loop(
    shared: &Shared,
    waiting: &mpsc::Receiver<LogFlushed<TypeConfig>>,
    policy: FsyncPolicy,
    interval: Duration,
) {
    match policy {
        FsyncPolicy::Always => {
            while let Ok(first) = waiting.recv() {
                let mut batch = vec![first];
                batch.extend(waiting.try_iter());
                let result = shared.sync_and_record();
                if let Err(e) = &result {
                    tracing::error!(error = %e, "log sync failed; the entries are not acknowledged");
                }
                for callback in batch {
                    callback.log_io_completed(
                        result
                            .as_ref()
                            .map(|_| ())
                            .map_err(|e| io::Error::new(e.kind(), e.to_string())),
                    );
                }
            }
        }
        FsyncPolicy::Periodic => loop {
            match waiting.recv_timeout(interval) {
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                _ => {
                    if let Err(e) = shared.sync_and_record() {
                        tracing::error!(error = %e, "periodic log sync failed");
                    }
                }
            }
        },
    }
    // The store is gone: a last sync so a clean shutdown leaves nothing unsynced, and the lazily
    // saved committed id written down.
    if let Err(e) = shared.sync_and_record() {
        tracing::error!(error = %e, "the last log sync failed");
    }
    if let Err(e) = shared.write_meta(|_| {}) {
        tracing::warn!(error = %e, "cannot save the committed log id at shutdown");
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        // Entries at or below the purge point may still be in a segment; they are gone all the
        // same.
        let purged = lock(&self.shared.meta).purged;
        let start = purged.map_or(start, |p| start.max(p.index.saturating_add(1)));
        if let Some(entries) = lock(&self.shared.recent).take(start, end) {
            return Ok(entries);
        }
        let records = lock(&self.shared.log).locate(start, end);
        let mut entries = Vec::with_capacity(records.len());
        for record in records {
            entries.push(record.read().map_err(|e| corrupt_err(record.index, &e))?);
        }
        Ok(entries)
    }
}

impl LogStore {
    /// Bytes of the log's entries after `index` (all of them for `None`): what a crash replays
    /// on top of the snapshot at `index`.
    pub(crate) fn bytes_after(&self, index: Option<u64>) -> u64 {
        lock(&self.shared.log).bytes_after(index)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id = lock(&self.shared.meta).purged;
        Ok(LogState {
            last_purged_log_id,
            last_log_id: self.last_log_id(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        let vote_err = |e: io::Error| StorageError::IO {
            source: StorageIOError::new(ErrorSubject::Vote, ErrorVerb::Write, &e),
        };
        // openraft's writes must land in order: entries appended before the vote are made
        // durable before it.
        self.shared.sync_and_record().map_err(vote_err)?;
        // Durable before returning, or a node could vote twice in one term.
        let vote = *vote;
        self.shared
            .write_meta(|meta| meta.vote = Some(vote))
            .map_err(vote_err)
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        Ok(self.shared.meta().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StorageResult<()> {
        // Written with the next vote, purge or shutdown; losing it only means re-deriving it
        // after a restart.
        lock(&self.shared.meta).committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<u64>>> {
        Ok(self.shared.meta().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let full = lock(&self.shared.log).is_full();
        if full {
            // Once per segment: the one ending is made durable before the next one gets a byte.
            self.shared.sync_and_record().map_err(write_err)?;
        }
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let lengths = {
            let mut log = lock(&self.shared.log);
            let lengths = log.append(&entries).map_err(write_err)?;
            if let Some(last) = entries.last() {
                // Under the log's lock, so the flusher reads it together with the files written.
                self.shared
                    .watermark
                    .appended
                    .store(last.log_id.index, Ordering::SeqCst);
            }
            lengths
        };
        // Before the flush is reported: the entries are read (to be applied) only after it.
        lock(&self.shared.recent).push(entries, &lengths);
        match self.policy {
            FsyncPolicy::Always => self
                .flusher
                .queue
                .as_ref()
                .ok_or_else(|| write_err(io::Error::other("log flusher thread has stopped")))?
                .send(callback)
                .map_err(|_| write_err(io::Error::other("log flusher thread has stopped")))?,
            FsyncPolicy::Periodic => callback.log_io_completed(Ok(())),
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        let index = log_id.index;
        // Lower the durable watermark first, durably: a crash after the removal must not find a
        // watermark above the log's end and call that damage.
        let _held = lock(&self.shared.watermark.lock);
        let below = {
            let _log = lock(&self.shared.log);
            let appended = &self.shared.watermark.appended;
            // Never raised: a truncation past the end removes nothing.
            let below = index.saturating_sub(1).min(appended.load(Ordering::SeqCst));
            appended.store(below, Ordering::SeqCst);
            below
        };
        self.shared
            .watermark
            .write(below)
            .and_then(|()| self.shared.watermark.file.sync_data())
            .map_err(write_err)?;
        lock(&self.shared.recent).truncate(index);
        let removed = lock(&self.shared.log)
            .remove_from(index)
            .map_err(write_err)?;
        if removed {
            sync_dir(&self.shared.dir).map_err(write_err)?;
        }
        let cut = lock(&self.shared.log).cut(index).map_err(write_err)?;
        if let Some(file) = cut {
            file.sync_data().map_err(write_err)?;
        }
        let last_record = lock(&self.shared.log).last_record();
        let last = match last_record {
            Some(record) => Some(
                record
                    .read()
                    .map_err(|e| corrupt_err(record.index, &e))?
                    .log_id,
            ),
            None => None,
        };
        lock(&self.shared.log).set_last(last);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        // Record the purge point first: a crash in between leaves extra entries, never a hole.
        self.shared
            .write_meta(|meta| meta.purged = Some(log_id))
            .map_err(write_err)?;
        lock(&self.shared.recent).purge(log_id.index);
        let removed = lock(&self.shared.log)
            .purge(log_id.index)
            .map_err(write_err)?;
        if removed {
            sync_dir(&self.shared.dir).map_err(write_err)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::log_meta::WATERMARK_FILE;
    use super::super::segment::encode_record;
    use super::*;
    use crate::checksum;
    use openraft::storage::RaftLogStorageExt;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn id(index: u64) -> LogId<u64> {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: id(index),
            payload: EntryPayload::Blank,
        }
    }

    fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<Entry<TypeConfig>> {
        range.map(entry).collect()
    }

    fn open(dir: &Path) -> io::Result<LogStore> {
        LogStore::open(dir, FsyncPolicy::Always, Duration::from_millis(200))
    }

    /// A store whose every append starts a new segment.
    fn open_tiny_segments(dir: &Path) -> io::Result<LogStore> {
        LogStore::open_with(dir, FsyncPolicy::Always, Duration::from_millis(200), 1)
    }

    /// Appends `1..=n` through a store at `dir` and closes it (its watermark then says `n`).
    async fn write_entries(dir: &Path, n: u64) {
        let mut store = open(dir).unwrap();
        store.blocking_append(entries(1..=n)).await.unwrap();
    }

    async fn indexes(store: &mut LogStore, range: std::ops::RangeInclusive<u64>) -> Vec<u64> {
        let got = store.try_get_log_entries(range).await.unwrap();
        got.iter().map(|e| e.log_id.index).collect()
    }

    /// The segment files in `dir`, by name.
    fn segments(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".seg"))
            .collect();
        names.sort();
        names
    }

    fn segment(dir: &Path, first: u64) -> PathBuf {
        dir.join(format!("{first:020}.seg"))
    }

    /// Where the record of entry `index` starts in a log of blank entries from 1 in one segment.
    fn offset_of(index: u64) -> u64 {
        let mut buf = Vec::new();
        encode_record(&mut buf, &entry(1)).unwrap();
        (index - 1) * buf.len() as u64
    }

    fn watermark(dir: &Path) -> u64 {
        checksum::decode(&std::fs::read(dir.join(WATERMARK_FILE)).unwrap()).unwrap()
    }

    fn refusal(result: io::Result<LogStore>) -> String {
        let err = result.err().expect("a damaged log must not open");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("refusing to start"), "{err}");
        err.to_string()
    }

    #[tokio::test]
    async fn reopening_keeps_entries_vote_committed_and_purge_point() {
        let dir = tempfile::tempdir().unwrap();
        let vote = Vote::new_committed(3, 2);
        {
            let mut store = open(dir.path()).unwrap();
            store.blocking_append(entries(1..=5)).await.unwrap();
            store.save_vote(&vote).await.unwrap();
            store.save_committed(Some(id(4))).await.unwrap();
            store.purge(id(2)).await.unwrap();
        }
        let mut store = open(dir.path()).unwrap();
        assert_eq!(indexes(&mut store, 0..=10).await, [3, 4, 5]);
        assert_eq!(store.read_vote().await.unwrap(), Some(vote));
        assert_eq!(store.read_committed().await.unwrap(), Some(id(4)));
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(id(2)));
        assert_eq!(state.last_log_id, Some(id(5)));
        // And it goes on from there.
        store.blocking_append(entries(6..=6)).await.unwrap();
        assert_eq!(indexes(&mut store, 0..=10).await, [3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn a_vote_is_on_disk_when_save_vote_returns() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path()).unwrap();
        let vote = Vote::new(7, 1);
        store.save_vote(&vote).await.unwrap();
        // Read from the file while the store is still open: nothing left for a shutdown to write.
        let (_, meta) = MetaFile::open(dir.path()).unwrap();
        assert_eq!(meta.vote, Some(vote));
    }

    #[tokio::test]
    async fn a_torn_last_record_above_the_watermark_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 5).await;
        let file = segment(dir.path(), 1);
        let intact = std::fs::metadata(&file).unwrap().len();
        let mut record = Vec::new();
        encode_record(&mut record, &entry(6)).unwrap();
        for torn in [
            record[..3].to_vec(),
            record[..record.len() - 1].to_vec(),
            // Whole length, but the payload never reached the disk.
            [&record[..8], &vec![0; record.len() - 8][..]].concat(),
            // A zero-filled tail, as a power failure can leave after the file grew.
            vec![0; 4096],
            // A header that made it, then zeros past the record's end.
            [&record[..8], &vec![0; 3 * record.len()][..]].concat(),
        ] {
            let mut bytes = std::fs::read(&file).unwrap();
            bytes.extend_from_slice(&torn);
            std::fs::write(&file, bytes).unwrap();
            let mut store = open(dir.path()).unwrap();
            assert_eq!(indexes(&mut store, 0..=10).await, [1, 2, 3, 4, 5]);
            assert_eq!(std::fs::metadata(&file).unwrap().len(), intact);
        }
        let mut store = open(dir.path()).unwrap();
        store.blocking_append(entries(6..=6)).await.unwrap();
        assert_eq!(indexes(&mut store, 0..=10).await, [1, 2, 3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn a_corrupt_record_in_the_middle_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 5).await;
        let file = segment(dir.path(), 1);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[offset_of(3) as usize + 9] ^= 0x01;
        std::fs::write(&file, bytes).unwrap();
        let err = refusal(open(dir.path()));
        assert!(
            err.contains("entry 3") && err.contains("checksum mismatch"),
            "{err}"
        );
    }

    /// Above the watermark too, a bad record that a good one follows is damage, not a torn write.
    #[tokio::test]
    async fn a_bad_record_followed_by_a_good_one_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 5).await;
        let file = segment(dir.path(), 1);
        let mut bytes = std::fs::read(&file).unwrap();
        let sixth = bytes.len();
        encode_record(&mut bytes, &entry(6)).unwrap();
        encode_record(&mut bytes, &entry(7)).unwrap();
        bytes[sixth + 9] ^= 0x04;
        std::fs::write(&file, bytes).unwrap();
        let err = refusal(open(dir.path()));
        assert!(err.contains("entry 6"), "{err}");
    }

    /// A record the watermark says was durable cannot be a torn write, even at the very end.
    #[tokio::test]
    async fn a_damaged_last_record_below_the_watermark_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 5).await;
        let file = segment(dir.path(), 1);
        let len = std::fs::metadata(&file).unwrap().len();
        let handle = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        handle.set_len(len - 1).unwrap();
        let err = refusal(open(dir.path()));
        assert!(
            err.contains("entry 5") && err.contains("cut short"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_log_cut_below_the_watermark_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 20).await;
        assert_eq!(watermark(dir.path()), 20);
        let file = segment(dir.path(), 1);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(offset_of(16))
            .unwrap();
        let err = refusal(open(dir.path()));
        assert!(
            err.contains("ends at index 15") && err.contains("lost their tail"),
            "{err}"
        );
        // Without the watermark the same files would open: it is what notices.
        std::fs::remove_file(dir.path().join(WATERMARK_FILE)).unwrap();
        let mut store = open(dir.path()).unwrap();
        assert_eq!(
            indexes(&mut store, 0..=30).await,
            (1..=15).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_record_holding_the_wrong_index_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 5).await;
        let file = segment(dir.path(), 1);
        let mut bytes = std::fs::read(&file).unwrap();
        encode_record(&mut bytes, &entry(9)).unwrap();
        std::fs::write(&file, bytes).unwrap();
        let err = refusal(open(dir.path()));
        assert!(err.contains("holds entry 9"), "{err}");
    }

    #[tokio::test]
    async fn a_missing_segment_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = open_tiny_segments(dir.path()).unwrap();
            for first in [1, 4, 7] {
                store
                    .blocking_append(entries(first..=first + 2))
                    .await
                    .unwrap();
            }
        }
        std::fs::remove_file(segment(dir.path(), 4)).unwrap();
        let err = refusal(open(dir.path()));
        assert!(err.contains("segment 7"), "{err}");
    }

    #[tokio::test]
    async fn segments_roll_over_are_truncated_across_a_boundary_and_purged_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let mut store = open_tiny_segments(path).unwrap();
        for first in [1, 4, 7] {
            store
                .blocking_append(entries(first..=first + 2))
                .await
                .unwrap();
        }
        let names = |firsts: &[u64]| -> Vec<String> {
            firsts.iter().map(|f| format!("{f:020}.seg")).collect()
        };
        assert_eq!(segments(path), names(&[1, 4, 7]));
        assert_eq!(indexes(&mut store, 2..=8).await, [2, 3, 4, 5, 6, 7, 8]);

        // At a segment's first entry: that segment and the later ones go.
        store.truncate(id(4)).await.unwrap();
        assert_eq!(segments(path), names(&[1]));
        assert_eq!(
            store.get_log_state().await.unwrap().last_log_id,
            Some(id(3))
        );
        // Inside a segment: it is cut at that record.
        store.truncate(id(3)).await.unwrap();
        assert_eq!(indexes(&mut store, 0..=10).await, [1, 2]);
        assert_eq!(
            std::fs::metadata(segment(path, 1)).unwrap().len(),
            offset_of(3)
        );
        assert_eq!(watermark(path), 2);

        store.blocking_append(entries(3..=5)).await.unwrap();
        store.blocking_append(entries(6..=8)).await.unwrap();
        assert_eq!(segments(path), names(&[1, 3, 6]));
        // Entries 1..=4: only the segment of 1..=2 lies wholly below; 3..=5 stays for 5.
        store.purge(id(4)).await.unwrap();
        assert_eq!(segments(path), names(&[3, 6]));
        assert_eq!(indexes(&mut store, 0..=10).await, [5, 6, 7, 8]);
        store.purge(id(5)).await.unwrap();
        assert_eq!(segments(path), names(&[6]));
        drop(store);

        let mut store = open(path).unwrap();
        assert_eq!(indexes(&mut store, 0..=10).await, [6, 7, 8]);
        // Purged past its end, the log is empty and continues after the purge point.
        store.purge(id(12)).await.unwrap();
        assert!(segments(path).is_empty());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(id(12)));
        store.blocking_append(entries(13..=14)).await.unwrap();
        drop(store);
        let mut store = open(path).unwrap();
        assert_eq!(indexes(&mut store, 0..=20).await, [13, 14]);
    }

    /// The purge point is recorded before any segment is removed, and the removals may reach the
    /// disk in any order: what a crash leaves must open.
    #[tokio::test]
    async fn segments_left_by_a_crash_during_a_purge_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = open_tiny_segments(dir.path()).unwrap();
            for first in [1, 4, 7, 10] {
                store
                    .blocking_append(entries(first..=first + 2))
                    .await
                    .unwrap();
            }
            store
                .shared
                .write_meta(|meta| meta.purged = Some(id(9)))
                .unwrap();
        }
        // Of the three segments to remove, only the middle one's removal reached the disk.
        std::fs::remove_file(segment(dir.path(), 4)).unwrap();
        let mut store = open(dir.path()).unwrap();
        assert_eq!(indexes(&mut store, 0..=20).await, [10, 11, 12]);
        assert_eq!(segments(dir.path()), [format!("{:020}.seg", 10)]);
    }

    /// Even when appends are synced only on a timer, a segment is durable before the next one
    /// starts, so a torn write can only ever be at the end of the last segment.
    #[tokio::test]
    async fn a_full_segment_is_synced_before_the_next_one_starts() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = LogStore::open_with(
            dir.path(),
            FsyncPolicy::Periodic,
            Duration::from_secs(3600),
            1,
        )
        .unwrap();
        store.blocking_append(entries(1..=3)).await.unwrap();
        assert_eq!(
            watermark(dir.path()),
            0,
            "not synced yet: the timer is an hour away"
        );
        store.blocking_append(entries(4..=6)).await.unwrap();
        assert_eq!(watermark(dir.path()), 3);
        assert_eq!(lock(&store.shared.log).take_unsynced().files.len(), 1);
    }

    #[tokio::test]
    async fn a_read_in_progress_survives_a_purge_of_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open_tiny_segments(dir.path()).unwrap();
        store.blocking_append(entries(1..=3)).await.unwrap();
        store.blocking_append(entries(4..=6)).await.unwrap();
        // A reader has found its records (the step done under the lock), then the purge runs
        // before it reads them.
        let located = lock(&store.shared.log).locate(1, 7);
        store.purge(id(3)).await.unwrap();
        assert!(!segment(dir.path(), 1).exists());
        let read: Vec<u64> = located
            .iter()
            .map(|r| r.read().unwrap().log_id.index)
            .collect();
        assert_eq!(read, [1, 2, 3, 4, 5, 6]);
        // A read starting now sees only what is left.
        assert_eq!(indexes(&mut store, 0..=10).await, [4, 5, 6]);
    }

    #[tokio::test]
    async fn a_damaged_entry_read_at_run_time_is_a_storage_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path()).unwrap();
        store.blocking_append(entries(1..=5)).await.unwrap();
        // The first read takes the entries from memory; later ones read the files.
        assert_eq!(indexes(&mut store, 1..=5).await, [1, 2, 3, 4, 5]);
        // Damaged behind the running store's back (as a disk would).
        let file = segment(dir.path(), 1);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[offset_of(2) as usize + 9] ^= 0x80;
        std::fs::write(&file, bytes).unwrap();
        assert!(store.try_get_log_entries(1..=5).await.is_err());
        assert_eq!(indexes(&mut store, 3..=5).await, [3, 4, 5]);
    }

    #[tokio::test]
    async fn the_first_read_of_entries_just_appended_does_not_decode_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path()).unwrap();
        store.blocking_append(entries(1..=5)).await.unwrap();
        let file = segment(dir.path(), 1);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[offset_of(2) as usize + 9] ^= 0x80;
        bytes[offset_of(4) as usize + 9] ^= 0x80;
        std::fs::write(&file, bytes).unwrap();
        // Served from memory: the damage is not even seen.
        assert_eq!(indexes(&mut store, 2..=3).await, [2, 3]);
        // Taken: the same entries again, and the older ones, come from the files.
        assert!(store.try_get_log_entries(2..=3).await.is_err());
        assert!(store.try_get_log_entries(1..=1).await.is_ok());
        // The rest is still in memory (entry 4 is damaged in the file), up to the log's end.
        let rest = store.try_get_log_entries(4..).await.unwrap();
        assert_eq!(
            rest.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            [4, 5]
        );
    }

    #[tokio::test]
    async fn the_watermark_follows_appends_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path()).unwrap();
        store.blocking_append(entries(1..=5)).await.unwrap();
        // Recorded by the flusher before the append was reported flushed.
        assert_eq!(watermark(dir.path()), 5);
        store.truncate(id(4)).await.unwrap();
        assert_eq!(watermark(dir.path()), 3);
        // Past the end it removes nothing, and must not claim more than the log holds.
        store.truncate(id(9)).await.unwrap();
        assert_eq!(watermark(dir.path()), 3);
        drop(store);
        let mut store = open(dir.path()).unwrap();
        assert_eq!(indexes(&mut store, 0..=10).await, [1, 2, 3]);
    }

    #[tokio::test]
    async fn damaged_metadata_or_watermark_refuses_the_start() {
        for file in ["meta", WATERMARK_FILE] {
            let dir = tempfile::tempdir().unwrap();
            {
                let mut store = open(dir.path()).unwrap();
                store.blocking_append(entries(1..=2)).await.unwrap();
                store.save_vote(&Vote::new(1, 1)).await.unwrap();
            }
            std::fs::write(dir.path().join(file), b"garbage").unwrap();
            refusal(open(dir.path()));
        }
    }

    #[test]
    fn a_sled_log_of_an_earlier_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"sled").unwrap();
        let err = open(dir.path()).err().expect("must not open");
        assert!(err.to_string().contains("sled format"), "{err}");
    }

    #[test]
    fn a_log_open_in_another_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path()).unwrap();
        let err = open(dir.path()).err().expect("must not open twice");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "{err}");
    }
}
