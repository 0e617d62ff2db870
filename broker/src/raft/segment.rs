//! The raft log's entries on disk: append-only segment files and the index over them.
//!
//! A segment is named by the index of its first entry, zero-padded so names sort like indexes
//! (`00000000000000000001.seg`), and holds records of consecutive entries:
//!
//! ```text
//! [payload length, u32 LE] [crc32 of the payload, u32 LE] [bincode Entry<TypeConfig>]
//! ```
//!
//! An append encodes all its entries into one buffer and writes it with one call, so the kernel
//! sees one write per raft append rather than one per entry; a new segment is started once the
//! last one has reached [`SEGMENT_BYTES`]. The index in memory is one `(offset, length)` per entry
//! of every segment present, and purging removes whole segments, so it stays as small as the log
//! openraft keeps behind its snapshots (plus at most one segment).
//!
//! Durability is not decided here: [`SegmentLog::take_unsynced`] hands the flusher the files
//! written (and whether the folder changed) since its last sync.
//!
//! Opening scans every segment. Only one kind of damage is repaired: a record cut short or failing
//! its check at the very end of the last segment, above the index known to be durable, is what a
//! crash during a write leaves, and is cut off. Anything else refuses to start, because serving or
//! voting from a log with a hole or bad data could undo acknowledged writes.

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::{Entry, LogId};

use super::TypeConfig;
use crate::checksum::{self, CorruptRecord};

/// A segment that has reached this many bytes takes no more appends: big enough that segment
/// files stay few, small enough that purging frees space soon after a snapshot.
pub(crate) const SEGMENT_BYTES: u64 = 64 << 20;

/// The append buffer is kept between appends up to this capacity.
const KEEP_BUFFER: usize = 4 << 20;

/// Length and checksum before each payload.
const HEADER: usize = 8;

const SUFFIX: &str = ".seg";

/// A record of the log that cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RecordError {
    /// The record ends past the end of its file, or declares an impossible length.
    #[error("record cut short")]
    Short,
    /// The payload does not match its checksum.
    #[error(transparent)]
    Corrupt(#[from] CorruptRecord),
    /// The checked payload does not decode (written by an incompatible version).
    #[error("cannot decode: {0}")]
    Decode(#[from] bincode::Error),
    /// An entry too big for the length field.
    #[error("an entry of {0} bytes is too big for one record")]
    TooLarge(usize),
    /// The record holds another index than the one its place says.
    #[error("the record at index {expected} holds entry {found}")]
    WrongIndex {
        /// Index its position in the segment implies.
        expected: u64,
        /// Index found in the entry.
        found: u64,
    },
    /// An append that does not follow the entries before it.
    #[error("append of entry {index} where entry {expected} (or a later one) was expected")]
    NotNext {
        /// The index appended.
        index: u64,
        /// The lowest index that could follow.
        expected: u64,
    },
    /// Reading it failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Appends the record of `entry` to `buf`.
///
/// # Errors
/// The entry does not encode or is bigger than a record can hold.
pub(crate) fn encode_record(
    buf: &mut Vec<u8>,
    entry: &Entry<TypeConfig>,
) -> Result<(), RecordError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    bincode::serialize_into(&mut *buf, entry)?;
    let payload = &buf[start + HEADER..];
    let len = u32::try_from(payload.len()).map_err(|_| RecordError::TooLarge(payload.len()))?;
    let crc = crc32fast::hash(payload);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Decodes a whole record (header and payload) after checking it, and that it holds `expected`.
///
/// # Errors
/// The record is short, fails its check, does not decode or holds another index.
pub(crate) fn decode_record(
    record: &[u8],
    expected: u64,
) -> Result<Entry<TypeConfig>, RecordError> {
    let (header, payload) = record.split_at_checked(HEADER).ok_or(RecordError::Short)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len != payload.len() {
        return Err(RecordError::Short);
    }
    let stored = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    checksum::verify(stored, payload)?;
    let entry: Entry<TypeConfig> = bincode::deserialize(payload)?;
    if entry.log_id.index != expected {
        return Err(RecordError::WrongIndex {
            expected,
            found: entry.log_id.index,
        });
    }
    Ok(entry)
}

/// The entry of the record at the start of `bytes`, if it is whole, checks out and holds `index`.
fn read_one(bytes: &[u8], index: u64) -> Option<Entry<TypeConfig>> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let record = bytes.get(..HEADER.checked_add(len)?)?;
    decode_record(record, index).ok()
}

/// Where one record is, for a read that runs without the log's lock: the file stays readable
/// through the `Arc` even if a purge removes its name meanwhile.
pub(crate) struct RecordRef {
    /// The segment file.
    pub file: Arc<File>,
    /// Index of the entry.
    pub index: u64,
    /// Byte offset of the record.
    pub offset: u64,
    /// Length of the whole record, header included.
    pub len: u32,
}

impl RecordRef {
    /// Reads and checks the entry.
    ///
    /// # Errors
    /// The read fails or the record is damaged.
    pub(crate) fn read(&self) -> Result<Entry<TypeConfig>, RecordError> {
        let mut record = vec![0; self.len as usize];
        self.file.read_exact_at(&mut record, self.offset)?;
        decode_record(&record, self.index)
    }
}

/// One segment file.
struct Segment {
    /// Index of its first entry (its name).
    first: u64,
    file: Arc<File>,
    path: PathBuf,
    /// Bytes of whole records: where the next append goes.
    len: u64,
    /// Offset and length of entry `first + i`.
    records: VecDeque<(u64, u32)>,
}

impl Segment {
    fn next_index(&self) -> u64 {
        self.first + self.records.len() as u64
    }

    fn last_index(&self) -> Option<u64> {
        self.next_index()
            .checked_sub(1)
            .filter(|_| !self.records.is_empty())
    }

    fn record(&self, index: u64) -> Option<RecordRef> {
        let i = usize::try_from(index.checked_sub(self.first)?).ok()?;
        let (offset, len) = *self.records.get(i)?;
        Some(RecordRef {
            file: Arc::clone(&self.file),
            index,
            offset,
            len,
        })
    }
}

/// Files the flusher must sync to make everything appended so far durable.
#[derive(Default)]
pub(crate) struct Unsynced {
    /// Segment files written since the last sync.
    pub files: Vec<Arc<File>>,
    /// Whether a segment was created or removed (its name must be made durable too).
    pub folder: bool,
}

/// The segments of one log folder and the index over them.
pub(crate) struct SegmentLog {
    dir: PathBuf,
    /// [`SEGMENT_BYTES`], smaller in tests that need many segments.
    segment_bytes: u64,
    segments: Vec<Segment>,
    last: Option<LogId<u64>>,
    unsynced: Unsynced,
    /// Reused for every append, so encoding allocates only when a batch is bigger than any before.
    buf: Vec<u8>,
}

/// The refusal to start from a damaged log, naming what is wrong and the way back.
pub(super) fn damaged(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "the raft log is damaged ({what}); refusing to start from it: rebuild this node from \
             the others (wipe its data folder) or restore its files"
        ),
    )
}

/// The first index of a segment file named `name`, or `None` for another file.
fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}{SUFFIX}"))
}

fn open_segment_file(path: &Path, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(create)
        .open(path)
}

/// Syncs a folder, so names created or removed in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl SegmentLog {
    /// Opens the segments in `dir`, checking every record and cutting off a torn last record.
    /// `durable` is the highest index known to have been made durable: a record at or below it
    /// cannot be torn, only damaged. Segments wholly at or below `purged` are removed unread.
    ///
    /// # Errors
    /// `InvalidData` when the log is damaged (see the module docs); any I/O error.
    pub(crate) fn open(
        dir: &Path,
        durable: Option<u64>,
        purged: Option<u64>,
        segment_bytes: u64,
    ) -> io::Result<SegmentLog> {
        let mut firsts = Vec::new();
        for dirent in std::fs::read_dir(dir)? {
            let dirent = dirent?;
            if let Some(first) = dirent.file_name().to_str().and_then(parse_name) {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        // A purge removes segments oldest first, but a crash can keep any of those removals from
        // reaching the disk: a segment is wholly purged when the next one starts at or below the
        // entry after the purge point, whatever is missing between them.
        if let Some(purged) = purged {
            let keep_from = firsts
                .windows(2)
                .take_while(|pair| pair[1] <= purged.saturating_add(1))
                .count();
            if keep_from > 0 {
                for first in firsts.drain(..keep_from) {
                    std::fs::remove_file(segment_path(dir, first))?;
                }
                sync_dir(dir)?;
            }
        }
        let mut log = SegmentLog {
            dir: dir.to_path_buf(),
            segment_bytes,
            segments: Vec::with_capacity(firsts.len()),
            last: None,
            unsynced: Unsynced::default(),
            buf: Vec::new(),
        };
        let count = firsts.len();
        for (n, first) in firsts.into_iter().enumerate() {
            if let Some(previous) = log.segments.last() {
                if previous.next_index() != first {
                    return Err(damaged(format!(
                        "segment {first} follows one that ends before index {}",
                        previous.next_index()
                    )));
                }
            }
            let is_last = n + 1 == count;
            log.scan(first, is_last, durable)?;
        }
        // A last segment left empty (created just before a crash, or all of it torn) would only
        // be in the way of the next append.
        if log.segments.last().is_some_and(|s| s.records.is_empty()) {
            if let Some(segment) = log.segments.pop() {
                std::fs::remove_file(&segment.path)?;
                sync_dir(dir)?;
            }
        }
        Ok(log)
    }

    /// Reads one segment file, adding its records to the index.
    fn scan(&mut self, first: u64, is_last: bool, durable: Option<u64>) -> io::Result<()> {
        let path = segment_path(&self.dir, first);
        let file = open_segment_file(&path, false)?;
        let mut bytes = Vec::new();
        (&file).read_to_end(&mut bytes)?;
        let mut segment = Segment {
            first,
            file: Arc::new(file),
            path,
            len: 0,
            records: VecDeque::new(),
        };
        let mut offset = 0usize;
        while offset < bytes.len() {
            let index = segment.next_index();
            let rest = &bytes[offset..];
            let declared = rest
                .get(..4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
            // A header that does not fit, a zero length (a zero-filled tail) or a length past the
            // end: the record was never completely written.
            let end = declared
                .filter(|len| *len > 0)
                .map(|len| HEADER + len)
                .filter(|end| *end <= rest.len());
            let result = match end {
                Some(end) => decode_record(&rest[..end], index).map(|entry| (entry, end)),
                None => Err(RecordError::Short),
            };
            match result {
                Ok((entry, end)) => {
                    segment.records.push_back((offset as u64, end as u32));
                    self.last = Some(entry.log_id);
                    offset += end;
                }
                Err(e) => {
                    // A bad record followed by a good one is damage in the middle of the log. One
                    // followed by nothing usable is where a write stopped: a crash can leave
                    // anything (a part, zeros where the file had grown) after the last sync.
                    let followed = end.is_some_and(|end| {
                        end < rest.len() && read_one(&rest[end..], index + 1).is_some()
                    });
                    let torn = is_last
                        && !followed
                        && matches!(e, RecordError::Short | RecordError::Corrupt(_))
                        && durable.is_none_or(|durable| index > durable);
                    if !torn {
                        return Err(damaged(format!(
                            "entry {index} in {}: {e}",
                            segment.path.display()
                        )));
                    }
                    tracing::warn!(
                        segment = %segment.path.display(),
                        index,
                        offset,
                        bytes = rest.len(),
                        error = %e,
                        "cutting off a record torn by a crash at the end of the raft log; it \
                         was never acknowledged"
                    );
                    segment.file.set_len(offset as u64)?;
                    segment.file.sync_all()?;
                    break;
                }
            }
        }
        segment.len = offset as u64;
        self.segments.push(segment);
        Ok(())
    }

    /// The id of the last entry present.
    pub(crate) fn last(&self) -> Option<LogId<u64>> {
        self.last
    }

    /// Whether the next append starts a new segment because the last one is full. The caller
    /// syncs what was written before then: a torn write is only recognised at the end of the
    /// last segment, so no unsynced tail may be left behind in an earlier one.
    pub(crate) fn is_full(&self) -> bool {
        self.segments
            .last()
            .is_some_and(|s| s.len >= self.segment_bytes)
    }

    /// Appends `entries` (consecutive, and above the last one present) with one write. Returns the
    /// encoded length of each entry appended, in order (none when `entries` is empty).
    ///
    /// Entries that leave a hole after the last one present start a new segment. Raft never does
    /// that (it appends after its last entry, or to a log purged empty), and opening refuses such
    /// a log; openraft's storage test suite does it to probe reads, and gets a log that reads as
    /// it wrote.
    ///
    /// # Errors
    /// The entries do not follow the log, do not encode, or the write fails (the log is then left
    /// as it was).
    pub(crate) fn append<E: Borrow<Entry<TypeConfig>>>(
        &mut self,
        entries: impl IntoIterator<Item = E>,
    ) -> Result<Vec<u32>, RecordError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let result = self.append_with(&mut buf, entries);
        // Kept for the next append, unless one unusually big append grew it.
        if buf.capacity() <= KEEP_BUFFER {
            self.buf = buf;
        }
        result
    }

    fn append_with<E: Borrow<Entry<TypeConfig>>>(
        &mut self,
        buf: &mut Vec<u8>,
        entries: impl IntoIterator<Item = E>,
    ) -> Result<Vec<u32>, RecordError> {
        let mut ends = Vec::new();
        let mut first = None;
        let mut last: Option<LogId<u64>> = None;
        for entry in entries {
            let entry = entry.borrow();
            let index = entry.log_id.index;
            match (last, self.last) {
                (Some(previous), _) if index != previous.index + 1 => {
                    return Err(RecordError::NotNext {
                        index,
                        expected: previous.index + 1,
                    });
                }
                // openraft truncates before it writes over entries.
                (None, Some(present)) if index <= present.index => {
                    return Err(RecordError::NotNext {
                        index,
                        expected: present.index + 1,
                    });
                }
                _ => {}
            }
            encode_record(buf, entry)?;
            ends.push(buf.len());
            first.get_or_insert(index);
            last = Some(entry.log_id);
        }
        let (Some(first), Some(last)) = (first, last) else {
            return Ok(Vec::new());
        };
        let roll = self
            .segments
            .last()
            .is_none_or(|s| s.len >= self.segment_bytes || s.next_index() != first);
        if roll {
            let path = segment_path(&self.dir, first);
            let file = open_segment_file(&path, true)?;
            self.segments.push(Segment {
                first,
                file: Arc::new(file),
                path,
                len: 0,
                records: VecDeque::new(),
            });
            self.unsynced.folder = true;
        }
        let Some(segment) = self.segments.last_mut() else {
            return Err(io::Error::other("no segment to append to").into());
        };
        if let Err(e) = segment.file.write_all_at(buf, segment.len) {
            // A part written would otherwise sit past the end and confuse the next open.
            let _ = segment.file.set_len(segment.len);
            return Err(e.into());
        }
        let mut lengths = Vec::with_capacity(ends.len());
        let mut start = 0;
        for end in ends {
            let length = (end - start) as u32;
            segment
                .records
                .push_back((segment.len + start as u64, length));
            lengths.push(length);
            start = end;
        }
        segment.len += buf.len() as u64;
        if !self
            .unsynced
            .files
            .iter()
            .any(|f| Arc::ptr_eq(f, &segment.file))
        {
            self.unsynced.files.push(Arc::clone(&segment.file));
        }
        self.last = Some(last);
        Ok(lengths)
    }

    /// Where the entries with indexes in `start..end` are (as many as are present, in order).
    pub(crate) fn locate(&self, start: u64, end: u64) -> Vec<RecordRef> {
        let mut found = Vec::new();
        for segment in &self.segments {
            let Some(last) = segment.last_index() else {
                continue;
            };
            if last < start || segment.first >= end {
                continue;
            }
            let from = start.max(segment.first);
            let to = end.min(last + 1);
            found.extend((from..to).filter_map(|index| segment.record(index)));
        }
        found
    }

    /// Removes the segments that start at `index` or later, the first step of removing the
    /// entries from `index` on. Returns whether any was: their removal must be durable before the
    /// segment holding `index` is cut ([`SegmentLog::cut`]), or a crash in between could leave
    /// the later segments after a hole.
    ///
    /// # Errors
    /// Any I/O error.
    pub(crate) fn remove_from(&mut self, index: u64) -> io::Result<bool> {
        let mut removed = false;
        while let Some(segment) = self.segments.last() {
            if segment.first < index {
                break;
            }
            std::fs::remove_file(&segment.path)?;
            self.segments.pop();
            removed = true;
        }
        if self.segments.iter().all(|s| s.records.is_empty()) {
            self.last = None;
        }
        Ok(removed)
    }

    /// Cuts the last segment at entry `index` (after [`SegmentLog::remove_from`]). Returns the file
    /// to sync when it was cut. The caller then reads the new last entry and sets it with
    /// [`SegmentLog::set_last`].
    ///
    /// # Errors
    /// Any I/O error.
    pub(crate) fn cut(&mut self, index: u64) -> io::Result<Option<Arc<File>>> {
        let Some(segment) = self.segments.last_mut() else {
            return Ok(None);
        };
        let keep = usize::try_from(index.saturating_sub(segment.first)).unwrap_or(usize::MAX);
        let Some(&(offset, _)) = segment.records.get(keep) else {
            return Ok(None);
        };
        segment.file.set_len(offset)?;
        segment.records.truncate(keep);
        segment.len = offset;
        if self.segments.iter().all(|s| s.records.is_empty()) {
            self.last = None;
        }
        Ok(self.segments.last().map(|s| Arc::clone(&s.file)))
    }

    /// The record of the last entry present.
    pub(crate) fn last_record(&self) -> Option<RecordRef> {
        let segment = self.segments.iter().rev().find(|s| !s.records.is_empty())?;
        segment.record(segment.last_index()?)
    }

    /// Sets the id of the last entry present, after a truncation.
    pub(crate) fn set_last(&mut self, last: Option<LogId<u64>>) {
        self.last = last;
    }

    /// Bytes of the records of the entries after `index` (all of them for `None`).
    pub(crate) fn bytes_after(&self, index: Option<u64>) -> u64 {
        self.segments
            .iter()
            .map(|segment| match index {
                None => segment.len,
                Some(index) if segment.first > index => segment.len,
                Some(index) => segment
                    .record(index + 1)
                    .map_or(0, |record| segment.len.saturating_sub(record.offset)),
            })
            .sum()
    }

    /// Removes the segments whose entries are all at or below `index`. Returns whether any was.
    ///
    /// # Errors
    /// A file cannot be removed (the segments before it were).
    pub(crate) fn purge(&mut self, index: u64) -> io::Result<bool> {
        let mut removed = false;
        while let Some(segment) = self.segments.first() {
            if segment.last_index().is_some_and(|last| last > index) {
                break;
            }
            std::fs::remove_file(&segment.path)?;
            self.segments.remove(0);
            removed = true;
        }
        if self.segments.is_empty() {
            self.last = None;
        }
        Ok(removed)
    }

    /// Takes the list of what was written since the last call, for the flusher to sync.
    pub(crate) fn take_unsynced(&mut self) -> Unsynced {
        std::mem::take(&mut self.unsynced)
    }

    /// Puts back what a failed sync did not make durable.
    pub(crate) fn restore_unsynced(&mut self, unsynced: Unsynced) {
        for file in unsynced.files {
            if !self.unsynced.files.iter().any(|f| Arc::ptr_eq(f, &file)) {
                self.unsynced.files.push(file);
            }
        }
        self.unsynced.folder |= unsynced.folder;
    }
}
