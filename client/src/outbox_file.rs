//! The on-disk journal of an [`Outbox`](crate::Outbox) opened with
//! [`Client::outbox_on_disk`](crate::Client::outbox_on_disk): an append-only file the outbox owns
//! (an exclusive lock on `<file>.lock` keeps a second outbox off it), so that messages queued but
//! not yet acknowledged survive the process and are sent, with their idempotency keys, by the next
//! outbox opened on the file.
//!
//! The file is a sequence of records, each `[length u32 LE][crc32 u32 LE][kind u8][body]`, the
//! length counting the body and the checksum covering the kind and the body:
//! - `QUEUED` (1): the body is an encoded `PublishRequest` (its idempotency key set). Written and
//!   `fdatasync`ed before `Outbox::publish` returns: a message the caller was told is queued is on
//!   disk.
//! - `DONE` (2): the body is a `u64` LE, how many `QUEUED` records of the file (from its start)
//!   the broker has answered (stored or refused for good); the outbox answers in order, so they are
//!   always the first ones. Not synced: lost in a crash, it only makes the next outbox send again
//!   a message that was stored, which its key turns into a `duplicate` answer.
//!
//! When everything queued is answered the file is truncated to nothing (and synced), so it does
//! not grow while the broker keeps up. Opening replays it: the records up to the first one that is
//! incomplete or fails its checksum (a write torn by a crash or a power cut) are read, that damaged
//! tail is dropped with a warning, and the file is rewritten (a new file, synced, renamed over the
//! old) with only the messages not yet answered.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use fs2::FileExt;
use prost::Message as _;
use switchboard_proto::v1::PublishRequest;

use crate::error::Error;

const HEADER_BYTES: usize = 9;
const KIND_QUEUED: u8 = 1;
const KIND_DONE: u8 = 2;
/// No record is larger: a length past it is damage, not a record to allocate for.
const MAX_RECORD_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    file: File,
    /// Held for the journal's life: the exclusive lock on `<file>.lock`.
    _lock: File,
    /// The file's length after the last complete record.
    len: u64,
    /// `QUEUED` records in the file, and how many of them are answered.
    queued: u64,
    done: u64,
}

/// What opening a journal found.
#[derive(Debug)]
pub(crate) struct Replayed {
    pub(crate) journal: Journal,
    /// The messages queued and not answered, in order.
    pub(crate) pending: Vec<PublishRequest>,
    /// Bytes dropped from a damaged tail (0 when the file was whole).
    pub(crate) dropped_bytes: u64,
}

fn storage_error(path: &Path, what: &str, error: impl std::fmt::Display) -> Error {
    Error::OutboxStorage {
        path: path.display().to_string(),
        message: format!("{what}: {error}"),
    }
}

/// `path` with `suffix` after its whole name: `outbox.log` → `outbox.log.lock`.
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn record(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut checksum = crc32fast::Hasher::new();
    checksum.update(&[kind]);
    checksum.update(body);
    let length = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&checksum.finalize().to_le_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    out
}

/// The records of `bytes` up to the first damaged one: the queued messages, how many of them are
/// answered, and where the whole records end.
fn parse(bytes: &[u8]) -> (Vec<PublishRequest>, u64, usize) {
    let mut queued = Vec::new();
    let mut done: u64 = 0;
    let mut at = 0;
    while bytes.len() - at >= HEADER_BYTES {
        let header = &bytes[at..at + HEADER_BYTES];
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let expected = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let kind = header[8];
        if length > MAX_RECORD_BYTES || bytes.len() - at - HEADER_BYTES < length {
            break;
        }
        let body = &bytes[at + HEADER_BYTES..at + HEADER_BYTES + length];
        let mut checksum = crc32fast::Hasher::new();
        checksum.update(&[kind]);
        checksum.update(body);
        if checksum.finalize() != expected {
            break;
        }
        match kind {
            KIND_QUEUED => match PublishRequest::decode(body) {
                Ok(request) => queued.push(request),
                Err(_) => break,
            },
            KIND_DONE if body.len() == 8 => {
                let mut count = [0u8; 8];
                count.copy_from_slice(body);
                done = done.max(u64::from_le_bytes(count));
            }
            _ => break,
        }
        at += HEADER_BYTES + length;
    }
    (queued, done, at)
}

impl Journal {
    /// Opens (or creates) the journal at `path`, replays it and compacts it.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when the file cannot be read or rewritten, or another outbox holds
    /// it.
    pub(crate) fn open(path: &Path) -> Result<Replayed, Error> {
        let lock_path = with_suffix(path, ".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| storage_error(&lock_path, "cannot open the lock file", e))?;
        lock.try_lock_exclusive()
            .map_err(|e| storage_error(path, "another outbox has this file open", e))?;

        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(mut file) => {
                file.read_to_end(&mut bytes)
                    .map_err(|e| storage_error(path, "cannot read", e))?;
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(storage_error(path, "cannot open", error)),
        }
        let (queued, done, whole) = parse(&bytes);
        let dropped_bytes = (bytes.len() - whole) as u64;
        if dropped_bytes > 0 {
            tracing::warn!(
                path = %path.display(),
                offset = whole,
                dropped_bytes,
                "outbox file: a damaged record at the end (a torn write?) was dropped"
            );
        }
        let answered = usize::try_from(done)
            .unwrap_or(usize::MAX)
            .min(queued.len());
        let pending: Vec<PublishRequest> = queued.into_iter().skip(answered).collect();

        // Rewrite with only what is pending: a new file, synced, renamed over the old one, so a
        // crash now leaves either file whole.
        let fresh = with_suffix(path, ".compacting");
        let mut contents = Vec::new();
        for request in &pending {
            contents.extend(record(KIND_QUEUED, &request.encode_to_vec()));
        }
        {
            let mut file =
                File::create(&fresh).map_err(|e| storage_error(&fresh, "cannot create", e))?;
            file.write_all(&contents)
                .and_then(|()| file.sync_all())
                .map_err(|e| storage_error(&fresh, "cannot write", e))?;
        }
        std::fs::rename(&fresh, path).map_err(|e| storage_error(path, "cannot replace", e))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(dir) = File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| storage_error(path, "cannot open", e))?;
        let journal = Journal {
            path: path.to_owned(),
            file,
            _lock: lock,
            len: contents.len() as u64,
            queued: pending.len() as u64,
            done: 0,
        };
        Ok(Replayed {
            journal,
            pending,
            dropped_bytes,
        })
    }

    /// Appends `request` as queued and syncs it.
    ///
    /// # Errors
    /// [`Error::OutboxStorage`] when it cannot be written; the file is cut back to its last whole
    /// record, so nothing half written stays in the middle.
    pub(crate) fn append_queued(&mut self, request: &PublishRequest) -> Result<(), Error> {
        let bytes = record(KIND_QUEUED, &request.encode_to_vec());
        let written = self
            .file
            .write_all(&bytes)
            .and_then(|()| self.file.sync_data());
        if let Err(error) = written {
            let _ = self.file.set_len(self.len);
            return Err(storage_error(&self.path, "cannot append", error));
        }
        self.len += bytes.len() as u64;
        self.queued += 1;
        Ok(())
    }

    /// Records that the broker answered the oldest unanswered message; when that was the last,
    /// truncates the file.
    pub(crate) fn mark_done(&mut self) {
        self.done = (self.done + 1).min(self.queued);
        let outcome = if self.done == self.queued {
            self.file
                .set_len(0)
                .and_then(|()| self.file.sync_data())
                .map(|()| {
                    self.len = 0;
                    self.queued = 0;
                    self.done = 0;
                })
        } else {
            let bytes = record(KIND_DONE, &self.done.to_le_bytes());
            self.file
                .write_all(&bytes)
                .map(|()| self.len += bytes.len() as u64)
        };
        if let Err(error) = outcome {
            // Not fatal: the next outbox on this file sends the answered messages again, and their
            // keys make the broker answer `duplicate`.
            tracing::warn!(path = %self.path.display(), %error, "outbox file: cannot record an answered message");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: u32) -> PublishRequest {
        PublishRequest {
            channel: "t.a.b".to_owned(),
            payload: n.to_string().into_bytes().into(),
            idempotency_key: format!("key-{n}"),
            ..PublishRequest::default()
        }
    }

    fn payloads(pending: &[PublishRequest]) -> Vec<String> {
        pending
            .iter()
            .map(|r| String::from_utf8_lossy(&r.payload).into_owned())
            .collect()
    }

    #[test]
    fn replays_what_is_not_answered_and_truncates_when_everything_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut opened = Journal::open(&path).unwrap();
        assert!(opened.pending.is_empty());
        for n in 0..4 {
            opened.journal.append_queued(&message(n)).unwrap();
        }
        opened.journal.mark_done();
        drop(opened);

        let mut again = Journal::open(&path).unwrap();
        assert_eq!(payloads(&again.pending), ["1", "2", "3"]);
        assert_eq!(again.pending[0].idempotency_key, "key-1");
        assert_eq!(again.dropped_bytes, 0);
        for _ in 0..3 {
            again.journal.mark_done();
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "truncated");
        drop(again);
        assert!(Journal::open(&path).unwrap().pending.is_empty());
    }

    #[test]
    fn a_second_outbox_cannot_open_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let first = Journal::open(&path).unwrap();
        let error = Journal::open(&path).unwrap_err();
        assert!(matches!(error, Error::OutboxStorage { .. }), "{error}");
        drop(first);
        Journal::open(&path).unwrap();
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_dropped_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.log");
        let mut opened = Journal::open(&path).unwrap();
        for n in 0..3 {
            opened.journal.append_queued(&message(n)).unwrap();
        }
        drop(opened);
        let whole = std::fs::read(&path).unwrap();

        // A record cut short (a torn write): the first half of a fourth one.
        let torn = record(KIND_QUEUED, &message(3).encode_to_vec());
        let mut bytes = whole.clone();
        bytes.extend_from_slice(&torn[..torn.len() / 2]);
        std::fs::write(&path, &bytes).unwrap();
        let replayed = Journal::open(&path).unwrap();
        assert_eq!(payloads(&replayed.pending), ["0", "1", "2"]);
        assert_eq!(replayed.dropped_bytes, (torn.len() / 2) as u64);
        drop(replayed);
        assert_eq!(std::fs::read(&path).unwrap(), whole, "rewritten without it");

        // A whole record whose body was damaged: its checksum fails; it and what follows go.
        let mut bytes = whole.clone();
        let mut damaged = torn.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0xff;
        bytes.extend_from_slice(&damaged);
        bytes.extend_from_slice(&record(KIND_QUEUED, &message(4).encode_to_vec()));
        std::fs::write(&path, &bytes).unwrap();
        let replayed = Journal::open(&path).unwrap();
        assert_eq!(payloads(&replayed.pending), ["0", "1", "2"]);
        drop(replayed);

        // A length past the end of the file, and garbage.
        let mut bytes = whole.clone();
        bytes.extend_from_slice(&[0xff; 20]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Journal::open(&path).unwrap().pending.len(), 3);
    }
}
