//! The bodies of stored batches: append-only files beside the state database.
//!
//! A batch of messages (tens of KiB) is written once and read rarely (history, lagging
//! subscribers), then dropped whole by the sweep. In sled such values cost far more than their
//! bytes: they are rewritten with the tree nodes that hold them, spill into blob files, and keep
//! the page cache large. So the database holds only where a body is ([`BodyLocation`]), and the
//! bodies go here, back to back, each sealed with its checksum ([`crate::checksum`]), in files
//! named by increasing number (`00000000000000000001.batches`). Measured with
//! `switchboard-bench --only W1` (docs/BENCHMARKS.md): broker peak RSS 150 → 23 MB, broker CPU
//! per run down a third.
//!
//! Durability: the raft log is the durable record, and the database is not synced per entry, so
//! neither are these files — but a location must never become durable before its body does.
//! Only the newest file is ever written: every run starts a new file, so a file that a crash may
//! have cut short is never written again. Every 4 MiB appended, and when a file fills up, its
//! sync starts on a thread of its own: a 64 MiB file synced at once held the apply (or, on ext4,
//! the log's next sync, whose journal commit writes the file's new blocks first) for 25–50 ms.
//! [`BatchFiles::sync`] syncs the files that filled up again (at no cost once that thread is
//! done) and the newest one before the database is synced. The state machine
//! trusts the files only after a clean stop (which ends with that sync); after a crash it rebuilds
//! the store from its snapshot and the log, so a body a crash cut short is never read as stored.
//!
//! Space: a file no batch points into any more is removed, but only after the next sync has made
//! that durable in the database, so a crash can never bring back a pointer to a removed file.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::checksum;

/// A file that has reached this many bytes takes no more bodies: few files, yet the space of
/// expired batches comes back in steps no bigger than this. The broker sets a smaller size for a
/// small `retention.max_bytes` ([`BatchFiles::set_file_bytes`]).
pub(crate) const FILE_BYTES: u64 = 64 << 20;

/// Every this many bytes appended, the file's sync starts ahead of time, so no later sync finds
/// more than about this much to write. `publish_load 30000 4096 1` (docs/BENCHMARKS.md): the
/// longest ack 32–42 ms → 5–18 ms; with 1 KiB messages and 256 unacknowledged the rate moves
/// within its spread (~2% lower on average) and the ack p99 rises from ~2–3 to ~3.5 ms. 16 MiB
/// was worse on both.
const SYNC_AHEAD_BYTES: u64 = 4 << 20;

const SUFFIX: &str = ".batches";

/// Where one batch's body is: the database's value under the batch's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct BodyLocation {
    /// Number of the file.
    pub file: u64,
    /// Byte position in the file.
    pub pos: u64,
    /// Length of the sealed body.
    pub len: u32,
}

/// The batch files of one state database.
pub(crate) struct BatchFiles {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Size at which a file takes no more bodies.
    file_bytes: std::sync::atomic::AtomicU64,
}

struct Inner {
    /// The file appended to, once this run has written a body.
    current: Option<Current>,
    /// Files that filled up since the last [`BatchFiles::sync`], which syncs them.
    filled: Vec<Arc<File>>,
    /// The last thread started to sync a file ahead of time (see [`start_sync_ahead`]).
    syncing_ahead: Option<JoinHandle<()>>,
    /// The number the next new file gets.
    next_file: u64,
    /// Read handles of every file present.
    files: BTreeMap<u64, Arc<File>>,
    /// How many stored batches point into each file; a file with none has no entry.
    live: BTreeMap<u64, u64>,
    /// Holds taken ([`BatchFiles::hold`]): while there is one, no file is removed.
    holds: usize,
}

impl Inner {
    /// Files present that no batch points into and that take no appends: what the next
    /// [`BatchFiles::sync`] removes.
    fn unreferenced(&self) -> Vec<u64> {
        let current = self.current.as_ref().map(|c| c.number);
        self.files
            .keys()
            .copied()
            .filter(|n| Some(*n) != current && !self.live.contains_key(n))
            .collect()
    }
}

struct Current {
    number: u64,
    file: Arc<File>,
    len: u64,
    /// `len` when a sync of this file last started ahead of time.
    synced_ahead: u64,
}

fn file_name(number: u64) -> String {
    format!("{number:020}{SUFFIX}")
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Records `file`, which takes no more bodies, for the next [`BatchFiles::sync`], and starts its
/// sync ahead of time; while an earlier sync started ahead still runs (a disk slower than the
/// appends), the sync is done here instead.
fn file_filled(inner: &mut Inner, file: Arc<File>) -> io::Result<()> {
    inner.filled.push(Arc::clone(&file));
    if start_sync_ahead(inner, Arc::clone(&file)) {
        Ok(())
    } else {
        file.sync_data()
    }
}

/// Starts a sync of `file` on a thread of its own, so a later sync finds little left to write;
/// false when one started earlier still runs (one such thread at a time) or none could start.
fn start_sync_ahead(inner: &mut Inner, file: Arc<File>) -> bool {
    if inner
        .syncing_ahead
        .as_ref()
        .is_some_and(|thread| !thread.is_finished())
    {
        return false;
    }
    let spawned = std::thread::Builder::new()
        .name("batch-file-sync".into())
        .spawn(move || {
            // Only ahead of time: the next `BatchFiles::sync` syncs the file again and reports.
            if let Err(e) = file.sync_data() {
                tracing::warn!(error = %e, "syncing a batch file ahead of time failed");
            }
        });
    match spawned {
        Ok(thread) => {
            inner.syncing_ahead = Some(thread);
            true
        }
        Err(_) => false,
    }
}

impl BatchFiles {
    /// Opens the batch files in `dir` (created if missing) for a database whose batches point at
    /// `locations`. Files nothing points into are removed.
    ///
    /// # Errors
    /// The folder cannot be read or created, or a file cannot be opened or removed.
    pub(crate) fn open(dir: &Path, locations: &[BodyLocation]) -> io::Result<BatchFiles> {
        std::fs::create_dir_all(dir)?;
        let mut present = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(number) = name
                .to_str()
                .and_then(|n| n.strip_suffix(SUFFIX))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            present.insert(number, entry.path());
        }
        let mut live: BTreeMap<u64, u64> = BTreeMap::new();
        for loc in locations {
            *live.entry(loc.file).or_default() += 1;
        }
        let newest = present.keys().next_back().copied();
        let mut files = BTreeMap::new();
        let mut removed_any = false;
        for (number, path) in &present {
            if live.contains_key(number) {
                files.insert(*number, Arc::new(File::open(path)?));
            } else {
                std::fs::remove_file(path)?;
                removed_any = true;
            }
        }
        if removed_any {
            sync_dir(dir)?;
        }
        let next_file = newest.map_or(1, |n| n + 1);
        Ok(BatchFiles {
            dir: dir.to_owned(),
            file_bytes: std::sync::atomic::AtomicU64::new(FILE_BYTES),
            inner: Mutex::new(Inner {
                current: None,
                filled: Vec::new(),
                syncing_ahead: None,
                next_file,
                files,
                live,
                holds: 0,
            }),
        })
    }

    /// Keeps every file present until the hold is dropped (a snapshot being written from a view
    /// of the store reads bodies the store may release meanwhile); the files freed meanwhile go
    /// at the first sync after.
    pub(crate) fn hold(self: &Arc<Self>) -> FilesHold {
        self.lock().holds += 1;
        FilesHold {
            files: Arc::clone(self),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Files fill up at `bytes` from now on (the space of expired batches comes back in steps of
    /// this size).
    pub(crate) fn set_file_bytes(&self, bytes: u64) {
        self.file_bytes
            .store(bytes.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the next [`BatchFiles::sync`] would remove a file.
    pub(crate) fn has_removable(&self) -> bool {
        let inner = self.lock();
        inner.holds == 0 && !inner.unreferenced().is_empty()
    }

    /// Appends a sealed body; it is readable at once and durable after the next [`sync`].
    ///
    /// # Errors
    /// Writing or starting a file failed; the body is then not stored.
    ///
    /// [`sync`]: BatchFiles::sync
    pub(crate) fn append(&self, sealed: &[u8]) -> io::Result<BodyLocation> {
        let len = u32::try_from(sealed.len())
            .map_err(|_| io::Error::other("a batch body of 4 GiB or more"))?;
        let file_bytes = self.file_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let mut inner = self.lock();
        let full = inner
            .current
            .as_ref()
            .is_none_or(|c| c.len > 0 && c.len + u64::from(len) > file_bytes);
        if full {
            self.start_file(&mut inner)?;
        }
        let current = inner
            .current
            .as_mut()
            .ok_or_else(|| io::Error::other("no batch file to append to"))?;
        // Positioned writes: a write cut short by an error leaves bytes nothing points at.
        current.file.write_all_at(sealed, current.len)?;
        let loc = BodyLocation {
            file: current.number,
            pos: current.len,
            len,
        };
        current.len += u64::from(len);
        if current.len - current.synced_ahead >= SYNC_AHEAD_BYTES {
            current.synced_ahead = current.len;
            let file = Arc::clone(&current.file);
            start_sync_ahead(&mut inner, file);
        }
        Ok(loc)
    }

    /// Starts the next file; the one it replaces is synced ahead of the next [`BatchFiles::sync`].
    fn start_file(&self, inner: &mut Inner) -> io::Result<()> {
        if let Some(old) = inner.current.take() {
            file_filled(inner, old.file)?;
        }
        let number = inner.next_file;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(self.dir.join(file_name(number)))?;
        sync_dir(&self.dir)?;
        let file = Arc::new(file);
        inner.files.insert(number, Arc::clone(&file));
        inner.next_file = number + 1;
        inner.current = Some(Current {
            number,
            file,
            len: 0,
            synced_ahead: 0,
        });
        Ok(())
    }

    /// Reads a body and checks it; returns the sealed bytes.
    ///
    /// # Errors
    /// The file is missing, the body is cut short, or it fails its check.
    pub(crate) fn read(&self, loc: &BodyLocation) -> io::Result<Vec<u8>> {
        let file = self
            .lock()
            .files
            .get(&loc.file)
            .cloned()
            .ok_or_else(|| io::Error::other(format!("batch file {} is missing", loc.file)))?;
        read_body(&file, loc)
    }

    /// Records the bodies the database points at since its last write (`added`) and those it no
    /// longer points at (`released`), once that write has been applied. A file left with no
    /// batches is removed by the next [`sync`]; a body appended but never committed is just
    /// bytes nothing points at.
    ///
    /// [`sync`]: BatchFiles::sync
    pub(crate) fn commit(&self, added: &[BodyLocation], released: &[BodyLocation]) {
        let mut inner = self.lock();
        for loc in added {
            *inner.live.entry(loc.file).or_default() += 1;
        }
        for loc in released {
            if let Some(n) = inner.live.get_mut(&loc.file) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    inner.live.remove(&loc.file);
                }
            }
        }
    }

    /// Makes every body appended so far durable, then runs `sync_database` (which must make the
    /// database durable), then removes the files that no batch pointed into before it ran.
    ///
    /// # Errors
    /// A sync or a removal failed; what was appended since the last sync is then not durable.
    pub(crate) fn sync(&self, sync_database: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let (filled, current, unreferenced) = {
            let mut inner = self.lock();
            (
                std::mem::take(&mut inner.filled),
                inner.current.as_ref().map(|c| Arc::clone(&c.file)),
                inner.unreferenced(),
            )
        };
        if let Err(e) = filled
            .iter()
            .chain(current.as_ref())
            .try_for_each(|file| file.sync_data())
        {
            // Still to be synced by the next attempt.
            self.lock().filled.extend(filled);
            return Err(e);
        }
        sync_database()?;
        // A file counted unreferenced may have had a body committed since (one appended just
        // before its file filled up): only the files still without batches go.
        let removable: Vec<u64> = {
            let mut inner = self.lock();
            let still = inner.unreferenced();
            let removable: Vec<u64> = unreferenced
                .into_iter()
                .filter(|n| still.contains(n) && inner.holds == 0)
                .collect();
            for number in &removable {
                inner.files.remove(number);
            }
            removable
        };
        if removable.is_empty() {
            return Ok(());
        }
        self.remove_files(&removable)
    }

    /// Removes every file (the database is being cleared for a snapshot install, and a marker
    /// makes a crash in between finish the install at the next start).
    ///
    /// # Errors
    /// A file cannot be removed.
    pub(crate) fn clear(&self) -> io::Result<()> {
        let mut inner = self.lock();
        inner.current = None;
        inner.filled.clear();
        inner.live.clear();
        let numbers: Vec<u64> = std::mem::take(&mut inner.files).into_keys().collect();
        self.remove_files(&numbers)
    }

    /// Removes the files `numbers` (one already gone is fine) and syncs the folder.
    fn remove_files(&self, numbers: &[u64]) -> io::Result<()> {
        for number in numbers {
            match std::fs::remove_file(self.dir.join(file_name(*number))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        sync_dir(&self.dir)
    }

    /// Numbers of the files present, oldest first.
    #[cfg(test)]
    pub(crate) fn file_numbers(&self) -> Vec<u64> {
        self.lock().files.keys().copied().collect()
    }
}

/// Keeps the batch files from removal while it lives ([`BatchFiles::hold`]).
pub(crate) struct FilesHold {
    files: Arc<BatchFiles>,
}

impl Drop for FilesHold {
    fn drop(&mut self) {
        let mut inner = self.files.lock();
        inner.holds = inner.holds.saturating_sub(1);
    }
}

fn read_body(file: &File, loc: &BodyLocation) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; loc.len as usize];
    file.read_exact_at(&mut buf, loc.pos)?;
    checksum::open(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(fill: u8, len: usize) -> Vec<u8> {
        checksum::seal(&vec![fill; len])
    }

    #[test]
    fn bodies_read_back_as_appended_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let files = BatchFiles::open(dir.path(), &[]).unwrap();
        let a = files.append(&body(1, 100)).unwrap();
        let b = files.append(&body(2, 5_000)).unwrap();
        assert_eq!(files.read(&a).unwrap(), body(1, 100));
        assert_eq!(files.read(&b).unwrap(), body(2, 5_000));
        drop(files);

        let files = BatchFiles::open(dir.path(), &[a, b]).unwrap();
        assert_eq!(files.read(&b).unwrap(), body(2, 5_000));
        // A new run never appends to an old file.
        let c = files.append(&body(3, 10)).unwrap();
        assert_eq!(c.file, a.file + 1);
    }

    #[test]
    fn a_damaged_body_fails_its_check_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let files = BatchFiles::open(dir.path(), &[]).unwrap();
        let a = files.append(&body(1, 100)).unwrap();
        let path = dir.path().join(file_name(a.file));
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff], a.pos + 50).unwrap();
        let err = files.read(&a).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_held_file_stays_readable_until_the_hold_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let files = Arc::new(BatchFiles::open(dir.path(), &[]).unwrap());
        let big = body(9, (FILE_BYTES / 2) as usize - 16);
        let first = files.append(&big).unwrap();
        let second = files.append(&big).unwrap();
        let third = files.append(&big).unwrap();
        files.commit(&[first, second, third], &[]);
        // A snapshot's view is taken, then the first file's batches are released and synced.
        let hold = files.hold();
        files.commit(&[], &[first, second]);
        files.sync(|| Ok(())).unwrap();
        assert_eq!(
            files.read(&first).unwrap(),
            big,
            "still readable for the view"
        );
        drop(hold);
        files.sync(|| Ok(())).unwrap();
        assert_eq!(
            files.file_numbers(),
            vec![third.file],
            "removed once released"
        );
    }

    #[test]
    fn a_file_with_no_batches_left_goes_at_the_sync_after_it_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let files = BatchFiles::open(dir.path(), &[]).unwrap();
        let big = body(9, (FILE_BYTES / 2) as usize - 16);
        let first = files.append(&big).unwrap();
        let second = files.append(&big).unwrap();
        let third = files.append(&big).unwrap();
        assert_eq!(first.file, second.file);
        assert_eq!(
            third.file,
            first.file + 1,
            "a full file makes way for a new one"
        );
        files.commit(&[first, second, third], &[]);
        files.sync(|| Ok(())).unwrap();
        assert_eq!(files.file_numbers(), vec![first.file, third.file]);
        files.commit(&[], &[first, second]);
        assert_eq!(files.file_numbers(), vec![first.file, third.file]);

        let mut database_synced = false;
        files
            .sync(|| {
                // The old file is still there while the database syncs its removal.
                assert!(dir.path().join(file_name(first.file)).exists());
                database_synced = true;
                Ok(())
            })
            .unwrap();
        assert!(database_synced);
        assert_eq!(files.file_numbers(), vec![third.file]);
        assert!(!dir.path().join(file_name(first.file)).exists());
        assert_eq!(files.read(&third).unwrap(), big);
        assert!(files.read(&first).is_err());
    }

    #[test]
    fn a_filled_file_is_synced_ahead_and_again_by_the_next_sync() {
        let dir = tempfile::tempdir().unwrap();
        let files = BatchFiles::open(dir.path(), &[]).unwrap();
        let big = body(9, (FILE_BYTES / 2) as usize - 16);
        let written: Vec<_> = (0..3).map(|_| files.append(&big).unwrap()).collect();
        {
            let inner = files.lock();
            assert_eq!(
                inner.filled.len(),
                1,
                "the file that filled up waits for the sync"
            );
            assert!(
                inner.syncing_ahead.is_some(),
                "and its sync has started ahead"
            );
        }
        files.commit(&written, &[]);
        files.sync(|| Ok(())).unwrap();
        assert!(files.lock().filled.is_empty());
        for loc in &written {
            assert_eq!(files.read(loc).unwrap(), big);
        }
    }

    #[test]
    fn a_body_committed_after_its_file_filled_up_keeps_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = BatchFiles::open(dir.path(), &[]).unwrap();
        let big = body(9, (FILE_BYTES / 2) as usize - 16);
        // One entry's bodies: the second fills the first file, the third starts another, and
        // only then is the entry committed.
        let written: Vec<_> = (0..3).map(|_| files.append(&big).unwrap()).collect();
        files.commit(&written, &[]);
        files.sync(|| Ok(())).unwrap();
        for loc in &written {
            assert_eq!(files.read(loc).unwrap(), big);
        }
    }

    #[test]
    fn files_nothing_points_into_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let files = BatchFiles::open(dir.path(), &[]).unwrap();
        let orphan = files.append(&body(1, 10)).unwrap();
        drop(files);
        let reopened = BatchFiles::open(dir.path(), &[]).unwrap();
        assert!(reopened.file_numbers().is_empty());
        assert!(!dir.path().join(file_name(orphan.file)).exists());
    }

    #[test]
    fn clear_removes_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = BatchFiles::open(dir.path(), &[]).unwrap();
        let a = files.append(&body(1, 10)).unwrap();
        files.clear().unwrap();
        assert!(files.read(&a).is_err());
        assert!(!dir.path().join(file_name(a.file)).exists());
        let b = files.append(&body(2, 10)).unwrap();
        assert_eq!(files.read(&b).unwrap(), body(2, 10));
    }
}
