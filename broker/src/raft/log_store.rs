//! The replicated log on sled: openraft's `RaftLogStorage`.
//!
//! Entries live in the `log` tree keyed by index (u64 BE); the vote, the committed id and the last
//! purged id in the `raft_meta` tree. An append writes the entries in one sled batch and hands the
//! completion callback to the flusher thread, which gathers every callback waiting, makes them all
//! durable with one [`SledSync::sync`], and only then reports them flushed — so openraft commits
//! (and the broker acknowledges) only what is on disk, and concurrent appends share one fdatasync.
//!
//! This is one implementation behind openraft's trait: a segmented append-only log could replace it
//! without touching anything else.

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError,
    StorageIOError, Vote,
};

use super::sync::SledSync;
use super::TypeConfig;
use crate::checksum;
use crate::config::FsyncPolicy;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// Callbacks waiting for the flusher; bounded, as openraft bounds its in-flight appends.
const FLUSH_QUEUE: usize = 4096;

type StorageResult<T> = Result<T, StorageError<u64>>;

fn read_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::write_logs(&e).into()
}

fn io_other(e: impl ToString) -> io::Error {
    io::Error::other(e.to_string())
}

/// A stored log value failed its check (or did not decode): openraft treats the storage error as
/// fatal and stops raft on this node, so it neither serves nor votes from damaged data.
fn corrupt_err(what: &str, key: &[u8], e: &checksum::DecodeError) -> StorageError<u64> {
    tracing::error!(
        what,
        key = ?key,
        error = %e,
        "the raft log is damaged: this node stops raft rather than serve or vote from bad data; \
         rebuild it from the other nodes (wipe its data folder) or restore it"
    );
    read_err(io_other(format!("damaged {what} in the raft log: {e}")))
}

/// The log store. Clones share the same trees (the reader openraft asks for is a clone).
#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    sync: Arc<SledSync>,
    flusher: mpsc::SyncSender<LogFlushed<TypeConfig>>,
    policy: FsyncPolicy,
    watermark: Arc<Watermark>,
}

/// File beside sled's, holding the highest log index known to be durable.
const WATERMARK_FILE: &str = "durable_index";

/// The highest log index made durable, kept outside sled: sled recovers a data file that lost its
/// tail by quietly dropping the entries in it (seen: 759 of 20,000 gone after cutting 100 KB off
/// the end), so the log alone cannot tell that it lost acknowledged entries.
///
/// The flusher records the index after each sync with one small write and no sync of its own: a
/// process crash keeps it (the page cache survives), a power failure may leave it older, which only
/// weakens the check (it is a lower bound) and never raises a false alarm. Truncation lowers it,
/// durably, before removing entries.
struct Watermark {
    file: std::fs::File,
    /// The last index appended to sled (entries up to it are in sled's buffers or on disk).
    appended: AtomicU64,
    /// Held across "read appended, sync, record" and across a truncation, so a sync never records
    /// an index a concurrent truncation has just removed.
    lock: Mutex<()>,
}

impl Watermark {
    /// Opens (or creates) the watermark file in `dir`, and reads the index it holds.
    fn open(dir: &Path) -> io::Result<(Watermark, Option<u64>)> {
        let path = dir.join(WATERMARK_FILE);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let bytes = std::fs::read(&path)?;
        let durable = if bytes.is_empty() {
            None
        } else {
            let index: u64 = checksum::decode(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is damaged: {e}", path.display()),
                )
            })?;
            Some(index)
        };
        File::open(dir)?.sync_all()?;
        let watermark = Watermark {
            file,
            appended: AtomicU64::new(0),
            lock: Mutex::new(()),
        };
        Ok((watermark, durable))
    }

    /// Writes `index` over the file's content (a fixed-size record at offset 0).
    fn write(&self, index: u64) -> io::Result<()> {
        let record = checksum::encode(&index).map_err(io_other)?;
        self.file.write_all_at(&record, 0)
    }

    /// Syncs `sync`, then records every index appended before it as durable.
    fn sync_and_record(&self, sync: &SledSync) -> io::Result<()> {
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let appended = self.appended.load(Ordering::SeqCst);
        sync.sync()?;
        self.write(appended)
    }
}

impl LogStore {
    /// Opens the log database in `dir` and starts its flusher thread.
    ///
    /// # Errors
    /// The database cannot be opened or its files synced.
    pub fn open(
        dir: &Path,
        cache_bytes: u64,
        policy: FsyncPolicy,
        sync_interval: Duration,
    ) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let config = sled::Config::new().path(dir).cache_capacity(cache_bytes);
        // sled 0.34 panics ("tried to serialize Uninitialized") on some data files cut short
        // instead of returning an error: turn that into a refusal to start with a clear reason.
        let db = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()))
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the raft log database in {} cannot be recovered (sled panicked reading \
                         it; its data file is probably truncated): rebuild this node from the \
                         others (wipe its data folder) or restore its files",
                        dir.display()
                    ),
                )
            })?
            .map_err(io_other)?;
        let log = db.open_tree("log").map_err(io_other)?;
        let meta = db.open_tree("raft_meta").map_err(io_other)?;
        let sync = Arc::new(SledSync::open(db, dir)?);
        let (watermark, durable) = Watermark::open(dir)?;
        let (flusher, waiting) = mpsc::sync_channel(FLUSH_QUEUE);
        let store = LogStore {
            log,
            meta,
            sync,
            flusher,
            policy,
            watermark: Arc::new(watermark),
        };
        store.verify()?;
        let last = store.last_index().map_err(io_other)?;
        if let Some(durable) = durable {
            if durable > last {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the raft log is damaged (it ends at index {last}, but entries up to \
                         {durable} were made durable: its files lost their tail); refusing to \
                         start from it: rebuild this node from the others (wipe its data folder) \
                         or restore its files"
                    ),
                ));
            }
        }
        store.watermark.appended.store(last, Ordering::SeqCst);
        // What sled recovered is on disk: record it, so the check holds from now on. A new file
        // is synced once, so a power failure cannot leave it present but empty.
        if durable.is_none_or(|durable| durable < last) {
            store.watermark.write(last)?;
        }
        if durable.is_none() {
            store.watermark.file.sync_data()?;
        }
        let thread_sync = Arc::clone(&store.sync);
        let thread_watermark = Arc::clone(&store.watermark);
        std::thread::Builder::new()
            .name("log-flusher".into())
            .spawn(move || {
                flusher_loop(
                    &thread_sync,
                    &thread_watermark,
                    &waiting,
                    policy,
                    sync_interval,
                );
            })?;
        Ok(store)
    }

    /// The highest index the log has covered: its last entry, else its purge point, else 0.
    fn last_index(&self) -> StorageResult<u64> {
        let purged: Option<LogId<u64>> = self.get_meta(LAST_PURGED)?;
        let last = self.last_entry_id()?.or(purged);
        Ok(last.map_or(0, |id| id.index))
    }

    /// Checks every stored value, and that the entries' indexes match their keys with no gap, so
    /// a node with a damaged log refuses to start instead of serving or voting from it. The log
    /// is purged behind snapshots, so this reads a bounded number of entries.
    ///
    /// # Errors
    /// `InvalidData` naming the first damaged record.
    pub fn verify(&self) -> io::Result<()> {
        let damaged = |what: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the raft log is damaged ({what}); refusing to start from it: rebuild this \
                     node from the others (wipe its data folder) or restore its files"
                ),
            )
        };
        for kv in self.meta.iter() {
            let (key, value) = kv.map_err(io_other)?;
            checksum::open(&value).map_err(|e| {
                damaged(format!("metadata {:?}: {e}", String::from_utf8_lossy(&key)))
            })?;
        }
        let mut previous: Option<u64> = None;
        for kv in self.log.iter() {
            let (key, value) = kv.map_err(io_other)?;
            let index = <[u8; 8]>::try_from(key.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| damaged(format!("a log key of {} bytes", key.len())))?;
            let entry: Entry<TypeConfig> =
                checksum::decode(&value).map_err(|e| damaged(format!("entry {index}: {e}")))?;
            if entry.log_id.index != index {
                return Err(damaged(format!(
                    "entry under key {index} says it is {}",
                    entry.log_id.index
                )));
            }
            if let Some(previous) = previous {
                if index != previous + 1 {
                    return Err(damaged(format!(
                        "entries {previous} and {index} with a gap between"
                    )));
                }
            }
            previous = Some(index);
        }
        Ok(())
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        match self.meta.get(key).map_err(read_err)? {
            Some(bytes) => checksum::decode(&bytes)
                .map(Some)
                .map_err(|e| corrupt_err("raft metadata", key, &e)),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> StorageResult<()> {
        let bytes = checksum::encode(value).map_err(|e| write_err(io_other(e)))?;
        self.meta.insert(key, bytes).map_err(write_err)?;
        Ok(())
    }

    fn last_entry_id(&self) -> StorageResult<Option<LogId<u64>>> {
        match self.log.last().map_err(read_err)? {
            Some((key, bytes)) => {
                let entry: Entry<TypeConfig> =
                    checksum::decode(&bytes).map_err(|e| corrupt_err("entry", &key, &e))?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }
}

/// Gathers waiting callbacks and completes them after one sync. With the periodic policy the
/// callbacks were already completed at append time and this only syncs on a timer.
fn flusher_loop(
    sync: &SledSync,
    watermark: &Watermark,
    waiting: &mpsc::Receiver<LogFlushed<TypeConfig>>,
    policy: FsyncPolicy,
    interval: Duration,
) {
    match policy {
        FsyncPolicy::Always => {
            while let Ok(first) = waiting.recv() {
                let mut batch = vec![first];
                batch.extend(waiting.try_iter());
                let result = watermark.sync_and_record(sync);
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
                    if let Err(e) = watermark.sync_and_record(sync) {
                        tracing::error!(error = %e, "periodic log sync failed");
                    }
                }
            }
        },
    }
    // The store is gone: a last sync so a clean shutdown leaves nothing unsynced.
    let _ = watermark.sync_and_record(sync);
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut entries = Vec::new();
        for kv in self.log.range(start.to_be_bytes()..) {
            let (k, v) = kv.map_err(read_err)?;
            let index = u64::from_be_bytes(
                k.as_ref()
                    .try_into()
                    .map_err(|_| read_err(io_other("log key is not 8 bytes")))?,
            );
            if !range.contains(&index) {
                break;
            }
            entries.push(checksum::decode(&v).map_err(|e| corrupt_err("entry", &k, &e))?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<u64>> = self.get_meta(LAST_PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> StorageResult<()> {
        self.put_meta(VOTE, vote)?;
        // A vote must survive a crash, or a node could vote twice in one term.
        self.sync.sync().map_err(|e| StorageError::IO {
            source: StorageIOError::new(ErrorSubject::Vote, ErrorVerb::Write, &e),
        })
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<u64>>> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<u64>>) -> StorageResult<()> {
        // Made durable by the next sync; losing it only means re-deriving it after a restart.
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<u64>>> {
        Ok(self.get_meta::<Option<LogId<u64>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        let mut last = None;
        for entry in entries {
            let bytes = checksum::encode(&entry).map_err(|e| write_err(io_other(e)))?;
            batch.insert(&entry.log_id.index.to_be_bytes(), bytes);
            last = Some(entry.log_id.index);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
        if let Some(last) = last {
            self.watermark.appended.fetch_max(last, Ordering::SeqCst);
        }
        match self.policy {
            FsyncPolicy::Always => self
                .flusher
                .send(callback)
                .map_err(|_| write_err(io_other("log flusher thread has stopped")))?,
            FsyncPolicy::Periodic => callback.log_io_completed(Ok(())),
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        // Lower the durable watermark first, durably: a crash after the removal must not find a
        // watermark above the log's end and call that damage.
        let _held = self
            .watermark
            .lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let below = log_id.index.saturating_sub(1);
        self.watermark.appended.store(below, Ordering::SeqCst);
        self.watermark
            .write(below)
            .and_then(|()| self.watermark.file.sync_data())
            .map_err(write_err)?;
        let mut batch = sled::Batch::default();
        for kv in self.log.range(log_id.index.to_be_bytes()..) {
            let (k, _) = kv.map_err(read_err)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> StorageResult<()> {
        // Record the purge point first: a crash in between leaves extra entries, never a hole.
        self.put_meta(LAST_PURGED, &log_id)?;
        let mut batch = sled::Batch::default();
        for kv in self.log.range(..=log_id.index.to_be_bytes()) {
            let (k, _) = kv.map_err(read_err)?;
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(write_err)
    }
}

#[cfg(test)]
// The guard of `one_at_a_time` is held across awaits on purpose: it serialises whole tests, each
// on its own runtime.
#[allow(clippy::await_holding_lock)]
pub(crate) mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    /// Retries `attempt` while sled reports its folder locked: a dropped database's threads
    /// release the lock a moment later, and the next open must not fail for that.
    pub(crate) fn while_locked<T, E: std::fmt::Display>(
        mut attempt: impl FnMut() -> Result<T, E>,
    ) -> Result<T, E> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match attempt() {
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::park_timeout(Duration::from_millis(10));
                }
                result => return result,
            }
        }
    }

    fn open_db(dir: &Path) -> sled::Db {
        while_locked(|| sled::Config::new().path(dir).open()).unwrap()
    }

    /// Taken by every test here that reopens a sled folder: sled's shared I/O threads can hold a
    /// dropped database (and its folder lock) while other tests keep them busy writing.
    pub(crate) fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        static SLED_TESTS: Mutex<()> = Mutex::new(());
        SLED_TESTS.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes entries `1..=n` straight into a log database at `dir`, as the store would.
    fn write_entries(dir: &Path, n: u64) {
        let db = open_db(dir);
        let log = db.open_tree("log").unwrap();
        for index in 1..=n {
            let entry: Entry<TypeConfig> = Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
                payload: EntryPayload::Blank,
            };
            log.insert(index.to_be_bytes(), checksum::encode(&entry).unwrap())
                .unwrap();
        }
        db.flush().unwrap();
    }

    /// Changes the stored value of entry `index` with `damage`.
    fn damage_entry(dir: &Path, index: u64, damage: impl FnOnce(&mut Vec<u8>)) {
        let db = open_db(dir);
        let log = db.open_tree("log").unwrap();
        let mut value = log.get(index.to_be_bytes()).unwrap().unwrap().to_vec();
        damage(&mut value);
        log.insert(index.to_be_bytes(), value).unwrap();
        db.flush().unwrap();
    }

    /// Opens the store at `dir`, retrying while a just-dropped database still holds the folder
    /// lock (as [`open_db`] does).
    fn open(dir: &Path) -> io::Result<LogStore> {
        while_locked(|| {
            LogStore::open(
                dir,
                1 << 20,
                FsyncPolicy::Always,
                Duration::from_millis(200),
            )
        })
    }

    #[tokio::test]
    async fn an_intact_log_opens_and_reads() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 5);
        let mut store = open(dir.path()).unwrap();
        let entries = store.try_get_log_entries(1..=5).await.unwrap();
        assert_eq!(
            entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
    }

    #[test]
    fn a_flipped_byte_in_an_entry_refuses_the_start() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 5);
        damage_entry(dir.path(), 3, |v| {
            let last = v.len() - 1;
            v[last] ^= 0x01;
        });
        let err = open(dir.path()).err().expect("a damaged log must not open");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains("entry 3") && err.to_string().contains("checksum mismatch"),
            "{err}"
        );
    }

    #[test]
    fn a_truncated_entry_refuses_the_start() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 5);
        damage_entry(dir.path(), 5, |v| v.truncate(v.len() / 2));
        let err = open(dir.path())
            .err()
            .expect("a truncated entry must not open");
        assert!(err.to_string().contains("entry 5"), "{err}");
    }

    #[test]
    fn a_missing_entry_in_the_middle_refuses_the_start() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 5);
        {
            let db = open_db(dir.path());
            db.open_tree("log")
                .unwrap()
                .remove(3u64.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let err = open(dir.path())
            .err()
            .expect("a log with a hole must not open");
        assert!(err.to_string().contains("gap"), "{err}");
    }

    #[tokio::test]
    async fn a_damaged_entry_read_at_run_time_is_a_storage_error() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 5);
        let mut store = open(dir.path()).unwrap();
        // Damaged behind the running store's back (as a disk would).
        let mut value = store.log.get(2u64.to_be_bytes()).unwrap().unwrap().to_vec();
        value[OVERHEAD_FIRST_PAYLOAD_BYTE] ^= 0x80;
        store.log.insert(2u64.to_be_bytes(), value).unwrap();
        assert!(store.try_get_log_entries(1..=5).await.is_err());
    }

    const OVERHEAD_FIRST_PAYLOAD_BYTE: usize = checksum::OVERHEAD;

    /// Cuts `dir/db` to `len(db) - cut_from_end` bytes (or to `keep` bytes).
    fn cut_data_file(dir: &Path, new_len: impl FnOnce(u64) -> u64) {
        let file = dir.join("db");
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(new_len(len))
            .unwrap();
    }

    /// As the flusher leaves it after syncing entries up to `index`.
    fn record_durable(dir: &Path, index: u64) {
        std::fs::write(dir.join(WATERMARK_FILE), checksum::encode(&index).unwrap()).unwrap();
    }

    /// sled recovers a data file that lost its tail by dropping the entries in it (measured:
    /// DURABILITY.md), and the log left looks whole: no gap, every checksum good. The durable
    /// watermark notices. The tail is removed through sled here, as its recovery leaves it,
    /// because where a cut file makes sled drop entries rather than panic depends on its layout.
    #[test]
    fn a_data_file_that_lost_its_tail_refuses_the_start() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 20);
        record_durable(dir.path(), 20);
        {
            let db = open_db(dir.path());
            let log = db.open_tree("log").unwrap();
            for index in 16..=20u64 {
                log.remove(index.to_be_bytes()).unwrap();
            }
            db.flush().unwrap();
        }
        let err = open(dir.path())
            .err()
            .expect("a log that lost its tail must not open");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains("ends at index 15")
                && err.to_string().contains("lost their tail"),
            "{err}"
        );
        // Without the watermark the same files would open: it is what notices.
        std::fs::remove_file(dir.path().join(WATERMARK_FILE)).unwrap();
        assert!(open(dir.path()).is_ok());
    }

    /// On other cuts sled panics or reports corruption; either way the store refuses to open.
    #[test]
    fn a_data_file_cut_in_half_or_to_nothing_refuses_the_start() {
        let _serial = one_at_a_time();
        for keep in [|len: u64| len / 2, |_| 100] {
            let dir = tempfile::tempdir().unwrap();
            write_entries(dir.path(), 20_000);
            record_durable(dir.path(), 20_000);
            cut_data_file(dir.path(), keep);
            assert!(open(dir.path()).is_err());
        }
    }

    #[tokio::test]
    async fn the_watermark_follows_appends_and_truncation() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 5);
        let read = |dir: &Path| -> u64 {
            checksum::decode(&std::fs::read(dir.join(WATERMARK_FILE)).unwrap()).unwrap()
        };
        let mut store = open(dir.path()).unwrap();
        // Opening records what sled recovered.
        assert_eq!(read(dir.path()), 5);
        store
            .truncate(LogId::new(CommittedLeaderId::new(1, 1), 4))
            .await
            .unwrap();
        assert_eq!(read(dir.path()), 3);
        assert_eq!(store.last_index().unwrap(), 3);
    }

    #[test]
    fn a_damaged_watermark_refuses_the_start() {
        let _serial = one_at_a_time();
        let dir = tempfile::tempdir().unwrap();
        write_entries(dir.path(), 5);
        std::fs::write(dir.path().join(WATERMARK_FILE), b"garbage").unwrap();
        assert!(open(dir.path()).is_err());
    }
}
