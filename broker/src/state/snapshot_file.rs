//! The state's snapshot file: every record of the store, in key order, framed so that damage is
//! found before the file replaces anything.
//!
//! ```text
//! [magic "SBSNAP" 0x00 0x02]
//! ([key length u32 LE] [key] [value length u32 LE] [value])*
//! [0xFFFF_FFFF] [record count u64 LE] [crc32 of every byte before it, u32 LE]
//! ```
//!
//! A batch record carries the batch's body rather than its location (bodies live in batch files
//! of their own). The file holds the store's meta record too, so it says itself which log entry
//! it is the state after ([`Checked::meta`]): a snapshot is never taken for another one's.
//!
//! Files written before this format have neither magic nor trailer (the first four bytes are the
//! first key's length, which is never the magic's): they are still read, but a file of that kind
//! cut at a record boundary cannot be told from a whole one.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use super::store::{MessageStore, SnapshotView};

/// First bytes of a framed snapshot file.
const MAGIC: &[u8; 8] = b"SBSNAP\x00\x02";
/// A key length no record has: the trailer follows.
const END: u32 = u32::MAX;
/// The store's meta record key (`state::store`), looked for while checking.
const META_KEY: &[u8] = b"m";

/// Writes every record of `view` to `path` and syncs the file.
///
/// # Errors
/// The store cannot be read or the file written.
pub(crate) fn write(view: &SnapshotView, path: &Path) -> io::Result<()> {
    let mut out = Hashing::new(BufWriter::new(File::create(path)?));
    out.write_all(MAGIC)?;
    let mut count = 0u64;
    for kv in view.records() {
        let (key, value) = kv.map_err(io::Error::other)?;
        for part in [key, value.as_slice()] {
            let len = u32::try_from(part.len())
                .ok()
                .filter(|&len| len != END)
                .ok_or_else(|| io::Error::other("a record too large for a snapshot"))?;
            out.write_all(&len.to_le_bytes())?;
            out.write_all(part)?;
        }
        count += 1;
    }
    out.write_all(&END.to_le_bytes())?;
    out.write_all(&count.to_le_bytes())?;
    let crc = out.hasher.clone().finalize();
    let mut inner = out.inner;
    inner.write_all(&crc.to_le_bytes())?;
    let file = inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

/// What reading a snapshot file through found.
#[derive(Debug)]
pub(crate) struct Checked {
    /// The store's meta record as the file holds it (`None`: the snapshot of an empty store).
    pub meta: Option<Vec<u8>>,
}

/// Reads the file at `path` through and checks it: framing, record count and checksum (only the
/// framing for a file of an earlier version).
///
/// # Errors
/// `InvalidData` naming what is wrong, or the I/O error reading it.
pub(crate) fn check(path: &Path) -> io::Result<Checked> {
    let mut meta = None;
    read(path, |key, value| {
        if key == META_KEY {
            meta = Some(value.to_vec());
        }
        Ok(())
    })?;
    Ok(Checked { meta })
}

/// Replaces everything in `store` with the records of the file at `path`, which is checked
/// whole first: a damaged file changes nothing.
///
/// # Errors
/// The file is damaged (`InvalidData`) or cannot be read, or the store cannot be written (it may
/// then hold part of the file).
pub(crate) fn load(store: &MessageStore, path: &Path) -> io::Result<()> {
    check(path)?;
    store.clear().map_err(io::Error::other)?;
    read(path, |key, value| {
        store
            .insert_snapshot_record(key, value)
            .map_err(io::Error::other)
    })
}

fn damaged(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Calls `record` with every record of the file at `path`, in order, failing at the first sign of
/// damage (but a framed file's checksum is known only at its end: [`load`] checks first).
fn read(path: &Path, mut record: impl FnMut(&[u8], &[u8]) -> io::Result<()>) -> io::Result<()> {
    let mut input = Hashing::new(BufReader::new(File::open(path)?));
    let mut first = [0u8; 4];
    if !input.read_full(&mut first)? {
        // An empty file: a store with no records, in the earlier format.
        return Ok(());
    }
    let framed = first == MAGIC[..4];
    if framed {
        let mut rest = [0u8; 4];
        if !input.read_full(&mut rest)? || rest != MAGIC[4..] {
            return Err(damaged("its header is not a snapshot's"));
        }
    }
    let mut key = Vec::new();
    let mut value = Vec::new();
    let mut count = 0u64;
    let mut pending_len = (!framed).then_some(u32::from_le_bytes(first));
    loop {
        let len = match pending_len.take() {
            Some(len) => len,
            None => {
                let mut len = [0u8; 4];
                if !input.read_full(&mut len)? {
                    if framed {
                        return Err(damaged(format!(
                            "it ends after {count} records without its trailer (cut short)"
                        )));
                    }
                    return Ok(());
                }
                u32::from_le_bytes(len)
            }
        };
        if framed && len == END {
            return finish(input, count);
        }
        read_part(&mut input, len, &mut key, count)?;
        let mut value_len = [0u8; 4];
        if !input.read_full(&mut value_len)? {
            return Err(damaged(format!("it ends inside record {count}")));
        }
        read_part(&mut input, u32::from_le_bytes(value_len), &mut value, count)?;
        record(&key, &value)?;
        count += 1;
    }
}

/// Reads `len` bytes into `buf`; a length beyond what is left of the file is damage, not an
/// allocation to attempt.
fn read_part(
    input: &mut Hashing<BufReader<File>>,
    len: u32,
    buf: &mut Vec<u8>,
    count: u64,
) -> io::Result<()> {
    let len = len as usize;
    buf.clear();
    let read = input.by_ref().take(len as u64).read_to_end(buf)?;
    if read < len {
        return Err(damaged(format!("it ends inside record {count}")));
    }
    Ok(())
}

fn finish(mut input: Hashing<BufReader<File>>, count: u64) -> io::Result<()> {
    let mut stored_count = [0u8; 8];
    if !input.read_full(&mut stored_count)? {
        return Err(damaged("its trailer is cut short"));
    }
    let computed = input.hasher.clone().finalize();
    let mut stored = [0u8; 4];
    // The checksum is not part of what it covers: read past the hashing.
    input
        .inner
        .read_exact(&mut stored)
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => damaged("its trailer is cut short"),
            _ => e,
        })?;
    let stored = u32::from_le_bytes(stored);
    let stored_count = u64::from_le_bytes(stored_count);
    if stored_count != count {
        return Err(damaged(format!(
            "its trailer counts {stored_count} records, the file holds {count}"
        )));
    }
    if stored != computed {
        return Err(damaged(format!(
            "checksum mismatch: stored {stored:08x}, computed {computed:08x}"
        )));
    }
    let mut extra = [0u8; 1];
    if input.inner.read(&mut extra)? != 0 {
        return Err(damaged("bytes follow its trailer"));
    }
    Ok(())
}

/// A reader or writer that keeps the crc32 of every byte through it.
struct Hashing<T> {
    inner: T,
    hasher: crc32fast::Hasher,
}

impl<T> Hashing<T> {
    fn new(inner: T) -> Hashing<T> {
        Hashing {
            inner,
            hasher: crc32fast::Hasher::new(),
        }
    }
}

impl<T: Read> Hashing<T> {
    /// Fills `buf`: `false` at the end of the input before the first byte, `InvalidData` when the
    /// input ends part way.
    fn read_full(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(damaged("it ends part way through a field")),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

impl<T: Read> Read for Hashing<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

impl<T: Write> Write for Hashing<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store holding `records` (none of them batches), in a folder of its own.
    fn store_with(records: &[(&[u8], &[u8])]) -> (tempfile::TempDir, MessageStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let store = MessageStore::open(&db, &dir.path().join("batches")).unwrap();
        for (key, value) in records {
            store.insert_snapshot_record(key, value).unwrap();
        }
        (dir, store)
    }

    fn records(store: &MessageStore) -> Vec<(Vec<u8>, Vec<u8>)> {
        store
            .snapshot_view()
            .unwrap()
            .records()
            .map(|kv| kv.map(|(k, v)| (k.to_vec(), v)).unwrap())
            .collect()
    }

    const RECORDS: &[(&[u8], &[u8])] = &[(b"k1", b"one"), (b"m", b"meta"), (b"z", b"")];

    #[test]
    fn a_written_file_loads_the_same_records_and_names_its_meta() {
        let (dir, store) = store_with(RECORDS);
        let path = dir.path().join("s.snap");
        write(&store.snapshot_view().unwrap(), &path).unwrap();
        assert_eq!(check(&path).unwrap().meta.as_deref(), Some(&b"meta"[..]));
        let (_other_dir, other) = store_with(&[(b"gone", b"x")]);
        load(&other, &path).unwrap();
        assert_eq!(records(&other), records(&store));
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_found_before_anything_changes() {
        let (dir, store) = store_with(RECORDS);
        let path = dir.path().join("s.snap");
        write(&store.snapshot_view().unwrap(), &path).unwrap();
        let whole = std::fs::read(&path).unwrap();
        let (_other_dir, other) = store_with(&[(b"kept", b"x")]);
        let damaged_path = dir.path().join("damaged.snap");
        let mut damaged_files: Vec<Vec<u8>> =
            (0..whole.len()).map(|n| whole[..n].to_vec()).collect();
        damaged_files.extend((0..whole.len()).map(|at| {
            let mut bytes = whole.clone();
            bytes[at] ^= 0x10;
            bytes
        }));
        let mut longer = whole.clone();
        longer.push(0);
        damaged_files.push(longer);
        for bytes in damaged_files {
            std::fs::write(&damaged_path, &bytes).unwrap();
            if bytes.is_empty() {
                // An empty file is an empty store of the earlier format.
                continue;
            }
            let err = load(&other, &damaged_path).expect_err("damage must be found");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
            assert_eq!(records(&other), vec![(b"kept".to_vec(), b"x".to_vec())]);
        }
    }

    #[test]
    fn a_file_of_an_earlier_version_still_loads() {
        let (dir, store) = store_with(RECORDS);
        // Records only: no magic, no trailer.
        let mut bytes = Vec::new();
        for (key, value) in RECORDS {
            for part in [*key, *value] {
                bytes.extend_from_slice(&(part.len() as u32).to_le_bytes());
                bytes.extend_from_slice(part);
            }
        }
        let path = dir.path().join("old.snap");
        std::fs::write(&path, &bytes).unwrap();
        let (_other_dir, other) = store_with(&[]);
        load(&other, &path).unwrap();
        assert_eq!(records(&other), records(&store));
        assert_eq!(check(&path).unwrap().meta.as_deref(), Some(&b"meta"[..]));
        // Cut inside a record, it is still refused.
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        assert!(check(&path).is_err());
    }
}
