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
use std::io;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError,
    StorageIOError, Vote,
};

use super::sync::SledSync;
use super::TypeConfig;
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

/// The log store. Clones share the same trees (the reader openraft asks for is a clone).
#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    sync: Arc<SledSync>,
    flusher: mpsc::SyncSender<LogFlushed<TypeConfig>>,
    policy: FsyncPolicy,
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
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_bytes)
            .open()
            .map_err(io_other)?;
        let log = db.open_tree("log").map_err(io_other)?;
        let meta = db.open_tree("raft_meta").map_err(io_other)?;
        let sync = Arc::new(SledSync::open(db, dir)?);
        let (flusher, waiting) = mpsc::sync_channel(FLUSH_QUEUE);
        let thread_sync = Arc::clone(&sync);
        std::thread::Builder::new()
            .name("log-flusher".into())
            .spawn(move || flusher_loop(&thread_sync, &waiting, policy, sync_interval))?;
        Ok(LogStore {
            log,
            meta,
            sync,
            flusher,
            policy,
        })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> StorageResult<Option<T>> {
        match self.meta.get(key).map_err(read_err)? {
            Some(bytes) => bincode::deserialize(&bytes)
                .map(Some)
                .map_err(|e| read_err(io_other(e))),
            None => Ok(None),
        }
    }

    fn put_meta<T: serde::Serialize>(&self, key: &[u8], value: &T) -> StorageResult<()> {
        let bytes = bincode::serialize(value).map_err(|e| write_err(io_other(e)))?;
        self.meta.insert(key, bytes).map_err(write_err)?;
        Ok(())
    }

    fn last_entry_id(&self) -> StorageResult<Option<LogId<u64>>> {
        match self.log.last().map_err(read_err)? {
            Some((_, bytes)) => {
                let entry: Entry<TypeConfig> =
                    bincode::deserialize(&bytes).map_err(|e| read_err(io_other(e)))?;
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
    waiting: &mpsc::Receiver<LogFlushed<TypeConfig>>,
    policy: FsyncPolicy,
    interval: Duration,
) {
    match policy {
        FsyncPolicy::Always => {
            while let Ok(first) = waiting.recv() {
                let mut batch = vec![first];
                batch.extend(waiting.try_iter());
                let result = sync.sync();
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
                    if let Err(e) = sync.sync() {
                        tracing::error!(error = %e, "periodic log sync failed");
                    }
                }
            }
        },
    }
    // The store is gone: a last sync so a clean shutdown leaves nothing unsynced.
    let _ = sync.sync();
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
            entries.push(bincode::deserialize(&v).map_err(|e| read_err(io_other(e)))?);
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
        for entry in entries {
            let bytes = bincode::serialize(&entry).map_err(|e| write_err(io_other(e)))?;
            batch.insert(&entry.log_id.index.to_be_bytes(), bytes);
        }
        self.log.apply_batch(batch).map_err(write_err)?;
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
