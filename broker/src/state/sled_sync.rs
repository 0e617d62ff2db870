//! A real sync for a sled database (the state store; the raft log has its own files and syncs).
//!
//! sled 0.34's `flush()` writes its buffers and calls `sync_file_range`, which flushes neither the
//! disk's cache nor the file's metadata; sled's own `fsync` runs only in a background thread every
//! 500 ms. Values too big for a log segment go to separate files under `blobs/`, which sled never
//! syncs at all. An acknowledgement that followed `flush()` alone could be lost on power failure.
//!
//! [`SledSync::sync`] therefore first syncs the message store's batch files (a location must not
//! become durable before its body), then flushes, then `fdatasync`s the data file, every blob
//! file written since the last sync, and the blob folder (so the new names survive too).
//!
//! The state store is written without atomic batches (see [`crate::state::store`]), so it is whole only
//! after a clean stop: [`SledSync::stop`] syncs and then leaves a durable marker, and
//! [`SledSync::take_clean_stop`] at the next start tells whether the marker was there, removing
//! it before anything else is applied.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::state::store::MessageStore;

/// The marker a clean stop leaves in the state folder: the store there is whole.
const CLEAN_STOP: &str = "clean-stop";

/// Makes everything written to one sled database so far durable.
pub(crate) struct SledSync {
    db: sled::Db,
    store: MessageStore,
    data_file: File,
    dir: PathBuf,
    blobs_dir: PathBuf,
    /// Set once a write to the store failed part way: the store may hold half an entry, and a
    /// stop must then not call it whole.
    torn: AtomicBool,
    /// Held while the state machine writes the store; `true` once [`SledSync::stop`] closed it.
    /// openraft's shutdown does not wait for its state machine worker, so without this a last
    /// apply could still be writing when the store is marked whole.
    writes: Mutex<bool>,
    /// Highest blob id already synced, and its length then: blob files are named by increasing log
    /// sequence numbers, and one still being written when it was synced has grown since.
    last_blob: Mutex<(u64, u64)>,
}

impl SledSync {
    /// Prepares to sync `db`, which was opened at `dir`. Syncs `dir` itself once so the database's
    /// files are known to exist after a crash.
    ///
    /// # Errors
    /// The data file cannot be opened or `dir` cannot be synced.
    pub(crate) fn open(db: sled::Db, store: MessageStore, dir: &Path) -> io::Result<SledSync> {
        let data_file = File::open(dir.join("db"))?;
        File::open(dir)?.sync_all()?;
        Ok(SledSync {
            db,
            store,
            data_file,
            dir: dir.to_owned(),
            blobs_dir: dir.join("blobs"),
            torn: AtomicBool::new(false),
            writes: Mutex::new(false),
            last_blob: Mutex::new((0, 0)),
        })
    }

    /// Flushes sled's buffers and makes them durable.
    ///
    /// # Errors
    /// Any I/O error; the caller must treat the data written since the last sync as not durable.
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.store.sync(|| {
            self.db.flush().map_err(io::Error::other)?;
            self.data_file.sync_data()?;
            self.sync_new_blobs()
        })
    }

    /// Writes sled's buffers out to its files (no sync): what a crash of the process then loses
    /// is only what is written after.
    ///
    /// # Errors
    /// sled's error.
    pub(crate) fn write_out(&self) -> io::Result<()> {
        self.db.flush().map(|_| ()).map_err(io::Error::other)
    }

    /// Whether the last run stopped cleanly and left the store in `dir` as it is now (whole: its
    /// meta record is `meta_now`), removing the marker durably so that a crash from now on is
    /// seen as one.
    ///
    /// The marker holds the store's meta record (its applied position) as it was at the stop: a
    /// store that reads another one now (a file cut short, replaced or rolled back since, which
    /// sled may open as an older prefix of itself, torn mid-entry) is not whole. A marker of an
    /// earlier version is empty and says only that the stop was clean.
    ///
    /// # Errors
    /// The marker or the store cannot be read, the marker cannot be removed or the folder cannot
    /// be synced.
    pub(crate) fn take_clean_stop(dir: &Path, meta_now: Option<&[u8]>) -> io::Result<bool> {
        let path = dir.join(CLEAN_STOP);
        let recorded = match std::fs::read(&path) {
            Ok(recorded) => recorded,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        std::fs::remove_file(&path)?;
        File::open(dir)?.sync_all()?;
        if recorded.is_empty() || meta_now == Some(recorded.as_slice()) {
            return Ok(true);
        }
        tracing::warn!(
            "the state store (state/db) is not as it was stopped: its applied position differs \
             from the one recorded at the clean stop (the file was cut short, replaced or rolled \
             back)"
        );
        Ok(false)
    }

    /// Records that a write to the store failed part way, so [`SledSync::stop`] leaves no marker.
    pub(crate) fn mark_torn(&self) {
        self.torn.store(true, Ordering::Release);
    }

    /// Lets the state machine write the store until the guard is dropped; `None` once the store
    /// was closed by [`SledSync::stop`] (nothing may be written after it is marked whole).
    pub(crate) fn begin_writes(&self) -> Option<MutexGuard<'_, bool>> {
        let closed = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        (!*closed).then_some(closed)
    }

    /// Closes the store to writes (waiting for one in progress), syncs, and marks the store whole
    /// for the next start.
    ///
    /// # Errors
    /// Any I/O error; the next start then rebuilds the store, as after a crash.
    pub(crate) fn stop(&self) -> io::Result<()> {
        let mut closed = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        *closed = true;
        self.sync()?;
        if self.torn.load(Ordering::Acquire) {
            tracing::warn!(
                "a write to the state store failed earlier; the next start rebuilds it from the \
                 snapshot and the log"
            );
            return Ok(());
        }
        let position = self.store.meta().map_err(io::Error::other)?;
        let mut marker = File::create(self.dir.join(CLEAN_STOP))?;
        std::io::Write::write_all(&mut marker, position.as_deref().unwrap_or_default())?;
        marker.sync_all()?;
        File::open(&self.dir)?.sync_all()
    }

    fn sync_new_blobs(&self) -> io::Result<()> {
        let mut last = self.last_blob.lock().unwrap_or_else(|p| p.into_inner());
        let entries = match std::fs::read_dir(&self.blobs_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut newest = *last;
        let mut synced_any = false;
        for entry in entries {
            let entry = entry?;
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            // Older blobs were synced already and are never written again: skip them before the
            // `stat`, which for a folder of thousands of blobs was most of this thread's time.
            if id < last.0 {
                continue;
            }
            let len = match entry.metadata() {
                Ok(m) => m.len(),
                // sled removes blobs it no longer needs; one gone since readdir needs no sync.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if id > last.0 || (id == last.0 && len != last.1) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                synced_any = true;
                if id >= newest.0 {
                    newest = (id, len);
                }
            }
        }
        if synced_any {
            File::open(&self.blobs_dir)?.sync_all()?;
            *last = newest;
        }
        Ok(())
    }
}
