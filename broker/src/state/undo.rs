//! The undo log: what the entries applied since the store was last flushed overwrote, so that
//! a process crash is undone at the next start instead of rebuilding the whole state from the
//! snapshot.
//!
//! An entry's writes to the store are not atomic ([`super::store`] says why), the meta record
//! (the applied position) is the last of them, and sled keeps recent writes in buffers of its
//! own until it writes them out. So after a `kill -9` the store holds the writes sled had
//! written out: the state after some entry `k` (its meta record), plus perhaps part of the
//! entries after it. Before the first write of each entry, its before-images — each key it
//! writes, with the value it held, or none — are appended to `state/undo` (no sync: the operating
//! system keeps it through a crash of the process), with this boot's id. Every second or so the
//! store is flushed (its buffers written out) and the log starts over with a record saying at
//! which entry it was flushed.
//!
//! ```text
//! ([payload length, u32 LE] [sealed bincode (boot id, kind, entry index, before-images)])*
//! ```
//!
//! At the next start, the records of the entries after `k` are undone newest first: every key
//! they wrote gets back the value it had after `k`, and openraft applies the log from `k + 1`
//! on — a replay bounded by what was applied since the last flush, not by the data. Anything less
//! certain goes back to the snapshot as before: a log from another boot (a power loss or a reboot
//! may have dropped writes the log cannot speak for), a log that does not say where it was
//! flushed or does not fit the meta record, or a store being replaced (a snapshot install or a
//! clear writes a record that says so first).
//!
//! This rests on sled recovering, after its process was killed, a prefix of the writes it was
//! given (it writes its log in order and stops recovery at the first incomplete message);
//! `tests/e2e/persistence.rs` kills brokers in the middle of writes and checks every offset,
//! idempotency key and entity version.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::checksum;

/// The undo log's file name in the state folder.
const FILE: &str = "undo";

/// The store is flushed and the log started over once this many bytes were appended since...
pub(crate) const FLUSH_BYTES: u64 = 4 << 20;
/// ...or this long after, whichever is first.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// One key an entry writes, and what it held before (`None`: absent).
pub(crate) type BeforeImage = (sled::IVec, Option<sled::IVec>);

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Kind {
    /// The store was flushed with the state after `index` in it (`u64::MAX`: no entry).
    Flushed,
    /// The before-images of entry `index`.
    Entry,
    /// The whole store is being replaced.
    Replacing,
}

#[derive(Serialize)]
struct RecordOut<'a> {
    boot: &'a str,
    kind: Kind,
    index: u64,
    images: Vec<(&'a [u8], Option<&'a [u8]>)>,
}

#[derive(Deserialize)]
struct RecordIn {
    boot: String,
    kind: Kind,
    index: u64,
    images: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// An index of a `Flushed` record for an empty store.
const NO_ENTRY: u64 = u64::MAX;

/// The undo log of a state folder. Written by the apply thread only.
pub(crate) struct UndoFile {
    file: File,
    /// This boot's id; `None` where the system has none (then no crash is undone).
    boot: Option<String>,
    /// Where the next record goes.
    end: AtomicU64,
    /// When the log last started over.
    started: std::sync::Mutex<Instant>,
}

/// Names a file to read the boot id from instead of the kernel's: the power-loss tests
/// (`tests/e2e/power_loss.rs`) simulate a power cut on a disk of their own without rebooting the
/// machine, and rewrite this file at each cut so the broker sees the new boot a real power loss
/// would bring. Not for production: pointing it at a file that never changes would make the
/// broker trust the undo log after a real power loss.
const BOOT_ID_FILE_ENV: &str = "SWITCHBOARD_BOOT_ID_FILE";

/// This boot's id (Linux: `/proc/sys/kernel/random/boot_id`, or the file
/// `SWITCHBOARD_BOOT_ID_FILE` names).
fn boot_id() -> Option<String> {
    boot_id_from(std::env::var_os(BOOT_ID_FILE_ENV))
}

/// The boot id in the file `file` names, or in the kernel's when `None`.
fn boot_id_from(file: Option<std::ffi::OsString>) -> Option<String> {
    let path = file.map_or_else(
        || "/proc/sys/kernel/random/boot_id".into(),
        std::path::PathBuf::from,
    );
    std::fs::read_to_string(path)
        .ok()
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
}

/// What the undo log says about the store after a crash.
#[derive(Debug, PartialEq)]
pub(crate) enum AfterCrash {
    /// The store is the state after its meta record's entry once these before-images are put
    /// back, in this order.
    Undoable(Vec<(Vec<u8>, Option<Vec<u8>>)>),
    /// Nothing can be said: go back to the snapshot.
    Unknown(&'static str),
}

impl UndoFile {
    /// Opens (or creates) the undo log in the state folder `dir`, leaving what it holds for
    /// [`UndoFile::after_crash`].
    ///
    /// # Errors
    /// The file cannot be opened.
    pub(crate) fn open(dir: &Path) -> io::Result<UndoFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(FILE))?;
        let end = file.metadata()?.len();
        Ok(UndoFile {
            file,
            boot: boot_id(),
            end: AtomicU64::new(end),
            started: std::sync::Mutex::new(Instant::now()),
        })
    }

    fn append(&self, kind: Kind, index: u64, images: &[BeforeImage]) -> io::Result<()> {
        let record = RecordOut {
            boot: self.boot.as_deref().unwrap_or_default(),
            kind,
            index,
            images: images
                .iter()
                .map(|(key, value)| (key.as_ref(), value.as_deref()))
                .collect(),
        };
        let payload = checksum::encode(&record).map_err(io::Error::other)?;
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::other("an undo record of 4 GiB or more"))?;
        let mut out = Vec::with_capacity(4 + payload.len());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&payload);
        let at = self.end.load(Ordering::Relaxed);
        self.file.write_all_at(&out, at)?;
        self.end.store(at + out.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Appends the before-images of entry `index`, before its first write.
    ///
    /// # Errors
    /// The record cannot be written; the entry must not be applied then.
    pub(crate) fn record(&self, index: u64, images: &[BeforeImage]) -> io::Result<()> {
        self.append(Kind::Entry, index, images)
    }

    /// Appends a record saying the whole store is being replaced (a snapshot install, a clear):
    /// a crash before the log starts over is not undone.
    ///
    /// # Errors
    /// The record cannot be written.
    pub(crate) fn replacing(&self) -> io::Result<()> {
        self.append(Kind::Replacing, NO_ENTRY, &[])
    }

    /// Whether the store should be flushed and the log started over now.
    pub(crate) fn due(&self) -> bool {
        self.end.load(Ordering::Relaxed) >= FLUSH_BYTES
            || self
                .started
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
                >= FLUSH_EVERY
    }

    /// Starts the log over: the store was just flushed (its buffers written out) holding the
    /// state after `applied`.
    ///
    /// # Errors
    /// The file cannot be written.
    pub(crate) fn restart(&self, applied: Option<u64>) -> io::Result<()> {
        self.file.set_len(0)?;
        self.end.store(0, Ordering::Relaxed);
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.append(Kind::Flushed, applied.unwrap_or(NO_ENTRY), &[])
    }

    /// What the log says about a store whose meta record says it holds the state after
    /// `applied` (`None`: no entry), after a run that did not stop cleanly.
    pub(crate) fn after_crash(&self, applied: Option<u64>) -> AfterCrash {
        let Some(boot) = &self.boot else {
            return AfterCrash::Unknown("this system has no boot id");
        };
        let records = self.read();
        let Some((first, entries)) = records.split_first() else {
            return AfterCrash::Unknown("no undo log");
        };
        if first.boot != *boot || entries.iter().any(|r| r.boot != *boot) {
            return AfterCrash::Unknown(
                "the last run was in another boot (a reboot or a power loss)",
            );
        }
        if first.kind != Kind::Flushed {
            return AfterCrash::Unknown("the undo log does not say where the store was flushed");
        }
        if entries.iter().any(|r| r.kind != Kind::Entry) {
            return AfterCrash::Unknown("the store was being replaced");
        }
        // Entries follow the flush point in order (every entry applied since has its record).
        let flushed = (first.index != NO_ENTRY).then_some(first.index);
        let mut last = flushed;
        for record in entries {
            if Some(record.index) <= last {
                return AfterCrash::Unknown("the undo log is out of order");
            }
            last = Some(record.index);
        }
        // The store holds at least what was flushed, at most what was recorded.
        let index = |i: Option<u64>| i.map_or(0, |i| i + 1);
        if index(applied) < index(flushed) || index(applied) > index(last) {
            return AfterCrash::Unknown("the undo log does not fit the applied position");
        }
        let images = entries
            .iter()
            .rev()
            .filter(|r| Some(r.index) > applied)
            .flat_map(|r| r.images.iter().cloned())
            .collect();
        AfterCrash::Undoable(images)
    }

    /// The records in order, up to the first one cut short or damaged (a crash while it was
    /// appended: its entry had not begun).
    fn read(&self) -> Vec<RecordIn> {
        let mut records = Vec::new();
        let size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut at = 0u64;
        while at + 4 <= size {
            let mut len = [0u8; 4];
            if self.file.read_exact_at(&mut len, at).is_err() {
                break;
            }
            let len = u64::from(u32::from_le_bytes(len));
            if at + 4 + len > size {
                break;
            }
            let mut payload = vec![0u8; len as usize];
            if self.file.read_exact_at(&mut payload, at + 4).is_err() {
                break;
            }
            match checksum::decode::<RecordIn>(&payload) {
                Ok(record) => records.push(record),
                Err(_) => break,
            }
            at += 4 + len;
        }
        records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(pairs: &[(&[u8], Option<&[u8]>)]) -> Vec<BeforeImage> {
        pairs
            .iter()
            .map(|(k, v)| (sled::IVec::from(*k), v.map(sled::IVec::from)))
            .collect()
    }

    fn owned(pairs: &[(&[u8], Option<&[u8]>)]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
            .collect()
    }

    #[test]
    fn the_entries_after_the_applied_position_are_undone_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let undo = UndoFile::open(dir.path()).unwrap();
        if undo.boot.is_none() {
            assert!(matches!(undo.after_crash(Some(1)), AfterCrash::Unknown(_)));
            return;
        }
        assert!(
            matches!(undo.after_crash(None), AfterCrash::Unknown(_)),
            "no log"
        );
        undo.restart(Some(6)).unwrap();
        undo.record(7, &images(&[(b"a", Some(b"a6"))])).unwrap();
        undo.record(8, &images(&[(b"a", Some(b"a7")), (b"b", None)]))
            .unwrap();
        // The store reached entry 6, 7 or 8 before the crash.
        assert_eq!(
            undo.after_crash(Some(6)),
            AfterCrash::Undoable(owned(&[
                (b"a", Some(b"a7")),
                (b"b", None),
                (b"a", Some(b"a6"))
            ]))
        );
        assert_eq!(
            undo.after_crash(Some(7)),
            AfterCrash::Undoable(owned(&[(b"a", Some(b"a7")), (b"b", None)]))
        );
        assert_eq!(undo.after_crash(Some(8)), AfterCrash::Undoable(Vec::new()));
        // Below the flush point or past the last record: not this log's store.
        assert!(matches!(undo.after_crash(Some(5)), AfterCrash::Unknown(_)));
        assert!(matches!(undo.after_crash(Some(9)), AfterCrash::Unknown(_)));

        // Started over after a flush: the old records are gone.
        undo.restart(Some(8)).unwrap();
        assert_eq!(undo.after_crash(Some(8)), AfterCrash::Undoable(Vec::new()));
        undo.replacing().unwrap();
        assert!(matches!(undo.after_crash(Some(8)), AfterCrash::Unknown(_)));
    }

    #[test]
    fn the_boot_id_file_override_is_read_and_a_missing_one_gives_no_boot_id() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("boot_id");
        std::fs::write(&file, "simulated-boot-2\n").unwrap();
        assert_eq!(
            boot_id_from(Some(file.into_os_string())),
            Some("simulated-boot-2".to_owned())
        );
        // Unreadable: no boot id, so no crash is undone in place (the safe side).
        assert_eq!(
            boot_id_from(Some(dir.path().join("missing").into_os_string())),
            None
        );
    }

    #[test]
    fn a_log_from_another_boot_out_of_order_or_with_a_damaged_tail_is_read_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let mut undo = UndoFile::open(dir.path()).unwrap();
        if undo.boot.is_none() {
            return;
        }
        undo.restart(None).unwrap();
        undo.record(0, &images(&[(b"k", None)])).unwrap();
        assert_eq!(
            undo.after_crash(None),
            AfterCrash::Undoable(owned(&[(b"k", None)]))
        );
        undo.boot = Some("another-boot".into());
        assert!(matches!(undo.after_crash(None), AfterCrash::Unknown(_)));
        undo.boot = boot_id();

        // A damaged last record: its entry had not begun; the records before it still count.
        undo.record(1, &images(&[(b"j", None)])).unwrap();
        let path = dir.path().join(FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(undo.after_crash(Some(0)), AfterCrash::Undoable(Vec::new()));

        let other = tempfile::tempdir().unwrap();
        let undo = UndoFile::open(other.path()).unwrap();
        undo.restart(Some(3)).unwrap();
        undo.record(3, &[]).unwrap();
        assert!(matches!(undo.after_crash(Some(3)), AfterCrash::Unknown(_)));
    }
}
