//! The raft log's two small files beside its segments.
//!
//! - `meta`: the vote, the committed id and the purge point, sealed with a checksum and replaced
//!   atomically (temp file, fdatasync, rename, folder sync), so a crash leaves the old content or
//!   the new, never a mix; a damaged one refuses the start like a damaged segment.
//! - `durable_index` ([`Watermark`]): the highest log index made durable, so a log whose files
//!   lost their tail is noticed rather than served.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use openraft::{LogId, Vote};
use serde::{Deserialize, Serialize};

use super::segment::sync_dir;
use crate::checksum;

const META_FILE: &str = "meta";
const META_TEMP: &str = "meta.tmp";
/// File holding the highest log index known to be durable.
pub(crate) const WATERMARK_FILE: &str = "durable_index";

/// What the log keeps besides its entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LogMeta {
    /// The last vote saved.
    pub vote: Option<Vote<u64>>,
    /// The last committed id saved (lazily: it may lag).
    pub committed: Option<LogId<u64>>,
    /// Entries up to this id are purged.
    pub purged: Option<LogId<u64>>,
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "the raft log is damaged ({} is unreadable: {e}); refusing to start from it: rebuild \
             this node from the others (wipe its data folder) or restore its files",
            path.display()
        ),
    )
}

/// The `meta` file of one log folder.
pub(crate) struct MetaFile {
    dir: PathBuf,
}

impl MetaFile {
    /// Reads the metadata in `dir` (all empty when there is no file yet).
    ///
    /// # Errors
    /// `InvalidData` when the file fails its check; any I/O error.
    pub(crate) fn open(dir: &Path) -> io::Result<(MetaFile, LogMeta)> {
        let path = dir.join(META_FILE);
        let meta = match std::fs::read(&path) {
            Ok(bytes) => checksum::decode(&bytes).map_err(|e| invalid(&path, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => LogMeta::default(),
            Err(e) => return Err(e),
        };
        // A temp file left by a crash before its rename holds nothing the old file lacks.
        match std::fs::remove_file(dir.join(META_TEMP)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok((
            MetaFile {
                dir: dir.to_path_buf(),
            },
            meta,
        ))
    }

    /// Replaces the file with `meta`, durably.
    ///
    /// # Errors
    /// Any I/O error; the old content may then still be the one on disk.
    pub(crate) fn write(&self, meta: &LogMeta) -> io::Result<()> {
        let bytes = checksum::encode(meta).map_err(io::Error::other)?;
        let temp = self.dir.join(META_TEMP);
        let mut file = File::create(&temp)?;
        file.write_all(&bytes)?;
        file.sync_data()?;
        std::fs::rename(&temp, self.dir.join(META_FILE))?;
        sync_dir(&self.dir)
    }
}

/// The highest log index made durable, kept in its own file: a segment that lost its tail (a
/// disk or file system that dropped writes it had confirmed, a file cut by hand) looks like a
/// shorter, whole log, and only this record says it was once longer.
///
/// The flusher records the index after each sync with one small write and no sync of its own: a
/// process crash keeps it (the page cache survives), a power failure may leave it older, which only
/// weakens the check (it is a lower bound) and never raises a false alarm. Truncation lowers it,
/// durably, before removing entries.
pub(crate) struct Watermark {
    pub(super) file: File,
    /// The last index appended (entries up to it are in the page cache or on disk).
    pub(super) appended: AtomicU64,
    /// Held across "read appended, sync, record" and across a truncation, so a sync never records
    /// an index a concurrent truncation has just removed. Nothing else is taken while holding the
    /// log's own lock, so appends and reads go on during a sync.
    pub(super) lock: Mutex<()>,
}

impl Watermark {
    /// Opens (or creates) the watermark file in `dir`, and reads the index it holds.
    ///
    /// # Errors
    /// `InvalidData` when the file fails its check; any I/O error.
    pub(crate) fn open(dir: &Path) -> io::Result<(Watermark, Option<u64>)> {
        let path = dir.join(WATERMARK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let bytes = std::fs::read(&path)?;
        let durable = if bytes.is_empty() {
            None
        } else {
            Some(checksum::decode::<u64>(&bytes).map_err(|e| invalid(&path, e))?)
        };
        sync_dir(dir)?;
        let watermark = Watermark {
            file,
            appended: AtomicU64::new(0),
            lock: Mutex::new(()),
        };
        Ok((watermark, durable))
    }

    /// Writes `index` over the file's content (a fixed-size record at offset 0).
    ///
    /// # Errors
    /// Any I/O error.
    pub(crate) fn write(&self, index: u64) -> io::Result<()> {
        let record = checksum::encode(&index).map_err(io::Error::other)?;
        self.file.write_all_at(&record, 0)
    }
}
