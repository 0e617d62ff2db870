//! A lazy disk for power-loss tests: a FUSE file system that passes everything through to a
//! backing folder, but remembers what every write or truncation since a file's last
//! `fsync`/`fdatasync` replaced, so that a simulated power cut can take it back.
//!
//! A `kill -9` cannot test what a power loss does: the page cache survives the process, so a
//! write the broker never synced is still there at the restart. Here every write reaches the
//! backing file at once (the broker reads its own writes, as it would from the page cache), and an
//! undo record — the offset, the bytes the write overwrote and the file's length before it — is
//! kept per file until the file is synced, which forgets them. [`LazyDisk::power_cut`], called
//! once the processes using the disk were killed, unmounts it, puts back every file as its last
//! sync left it (newest record first), and mounts it again. [`Cut::Torn`] keeps instead a random
//! prefix of each file's unsynced writes, the last kept one possibly cut at a 512-byte sector
//! boundary inside it, its remainder either gone or zero-filled (a file grown whose new blocks were never written) — the order a
//! disk writes out one file's dirty pages is not the order they were written, but a prefix is
//! what the broker's torn-write rules speak about. The seed is printed, so a failure can be
//! replayed.
//!
//! The model's limits:
//! - the namespace is durable at once: a created, renamed or removed file or folder stays so
//!   after a cut (a real file system loses those too unless the folder was synced; the broker
//!   syncs its folders where it relies on them, which this model cannot check);
//! - a file's writes are undone as a whole file's: pages are not dropped independently, and a
//!   sync of one file never covers another;
//! - `sync_file_range` does not reach a FUSE file system, so it makes nothing durable here (as the
//!   man page warns it may not on a real one);
//! - one thread serves the requests; this is a correctness tool, not a fast disk.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

/// How long the kernel may cache names and attributes. Every change goes through this file
/// system, and a cut remounts it, so nothing cached goes stale.
const TTL: Duration = Duration::from_secs(1);

/// What a disk writes whole or not at all: a torn write is cut only at a multiple of this.
const SECTOR: u64 = 512;

/// What one write or truncation replaced: enough to put the file back as it was before it.
#[derive(Debug, Clone)]
struct Undo {
    /// The file's length before.
    len_before: u64,
    /// Where the change began.
    offset: u64,
    /// The bytes it overwrote that existed before (those below `len_before`).
    replaced: Vec<u8>,
    /// How many bytes it wrote (0 for a truncation).
    written: u64,
}

impl Undo {
    /// Takes the whole change back.
    fn undo(&self, file: &File) -> io::Result<()> {
        file.set_len(self.len_before)?;
        file.write_all_at(&self.replaced, self.offset)
    }

    /// Keeps the first `kept` bytes of a write and takes back the rest: the bytes it overwrote
    /// return, and what it added past the old end is cut off or, with `zero_fill`, reads as
    /// zeros.
    fn tear(&self, file: &File, kept: u64, zero_fill: bool) -> io::Result<()> {
        let end = self.offset + self.written;
        let from = self.offset + kept;
        if end > self.len_before {
            if zero_fill {
                let zeros_from = from.max(self.len_before);
                let zeros = vec![0u8; usize::try_from(end - zeros_from).unwrap_or(0)];
                file.write_all_at(&zeros, zeros_from)?;
            } else {
                file.set_len(self.len_before.max(from))?;
            }
        }
        let kept = usize::try_from(kept).unwrap_or(usize::MAX);
        if let Some(rest) = self.replaced.get(kept..) {
            file.write_all_at(rest, from)?;
        }
        Ok(())
    }
}

/// What a power cut does with the writes since each file's last sync.
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    /// Every one is lost.
    Clean,
    /// A random prefix of each file's survives, the last perhaps in part (seeded).
    Torn {
        /// The seed of the choices, printed with the cut.
        seed: u64,
    },
}

/// What a cut took back.
#[derive(Debug, Default, Clone)]
pub struct CutReport {
    /// Files that had unsynced writes.
    pub files: usize,
    /// Unsynced writes and truncations, and how many of them were taken back whole.
    pub changes: usize,
    /// How many were taken back whole.
    pub undone: usize,
    /// How many were kept in part (torn).
    pub torn: usize,
    /// Per file (path inside the disk): changes kept of changes made since its last sync.
    pub per_file: Vec<(PathBuf, usize, usize)>,
}

/// The file system's bookkeeping, shared with the [`LazyDisk`] that applies a cut.
#[derive(Default)]
struct Inner {
    /// Inode number → path inside the disk (the root is `""`).
    paths: HashMap<u64, PathBuf>,
    inodes: HashMap<PathBuf, u64>,
    next_inode: u64,
    /// Open files: handle → (inode, the backing file).
    handles: HashMap<u64, (u64, Arc<File>)>,
    next_handle: u64,
    /// Per inode, what its writes since its last sync replaced, oldest first.
    unsynced: HashMap<u64, Vec<Undo>>,
}

impl Inner {
    fn new() -> Inner {
        let mut inner = Inner {
            next_inode: 2,
            next_handle: 1,
            ..Inner::default()
        };
        inner.paths.insert(INodeNo::ROOT.0, PathBuf::new());
        inner.inodes.insert(PathBuf::new(), INodeNo::ROOT.0);
        inner
    }

    fn inode_for(&mut self, path: &Path) -> u64 {
        if let Some(inode) = self.inodes.get(path) {
            return *inode;
        }
        let inode = self.next_inode;
        self.next_inode += 1;
        self.paths.insert(inode, path.to_owned());
        self.inodes.insert(path.to_owned(), inode);
        inode
    }

    fn forget_path(&mut self, path: &Path) {
        if let Some(inode) = self.inodes.remove(path) {
            self.paths.remove(&inode);
            self.unsynced.remove(&inode);
        }
    }

    /// A rename: every path at or under `from` moves under `to`.
    fn move_paths(&mut self, from: &Path, to: &Path) {
        let moved: Vec<(PathBuf, u64)> = self
            .inodes
            .iter()
            .filter(|(path, _)| path.starts_with(from))
            .map(|(path, inode)| (path.clone(), *inode))
            .collect();
        for (path, inode) in moved {
            let Ok(rest) = path.strip_prefix(from) else {
                continue;
            };
            let new = if rest.as_os_str().is_empty() {
                to.to_owned()
            } else {
                to.join(rest)
            };
            self.inodes.remove(&path);
            self.inodes.insert(new.clone(), inode);
            self.paths.insert(inode, new);
        }
    }
}

/// The FUSE side: a passthrough to `backing` that records undo information.
struct LazyFs {
    backing: PathBuf,
    inner: Arc<Mutex<Inner>>,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn errno(e: &io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn system_time(secs: i64, nanos: i64) -> SystemTime {
    let nanos = u32::try_from(nanos).unwrap_or(0);
    match u64::try_from(secs) {
        Ok(secs) => UNIX_EPOCH + Duration::new(secs, nanos),
        Err(_) => UNIX_EPOCH,
    }
}

fn attr(inode: u64, meta: &std::fs::Metadata) -> FileAttr {
    let kind = FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile);
    FileAttr {
        ino: INodeNo(inode),
        size: meta.len(),
        blocks: meta.blocks(),
        atime: system_time(meta.atime(), meta.atime_nsec()),
        mtime: system_time(meta.mtime(), meta.mtime_nsec()),
        ctime: system_time(meta.ctime(), meta.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind,
        perm: u16::try_from(meta.mode() & 0o7777).unwrap_or(0o644),
        nlink: u32::try_from(meta.nlink()).unwrap_or(1),
        uid: meta.uid(),
        gid: meta.gid(),
        rdev: u32::try_from(meta.rdev()).unwrap_or(0),
        blksize: 4096,
        flags: 0,
    }
}

/// Records what a change of `file` over `offset..end` (`written` bytes; a truncation writes
/// none) will replace.
fn before_change(file: &File, offset: u64, end: u64, written: u64) -> io::Result<Undo> {
    let len_before = file.metadata()?.len();
    let replaced_end = end.min(len_before);
    let mut replaced = Vec::new();
    if replaced_end > offset {
        replaced = vec![0u8; usize::try_from(replaced_end - offset).map_err(io::Error::other)?];
        file.read_exact_at(&mut replaced, offset)?;
    }
    Ok(Undo {
        len_before,
        offset,
        replaced,
        written,
    })
}

impl LazyFs {
    fn path(&self, inode: INodeNo) -> Result<PathBuf, Errno> {
        lock(&self.inner)
            .paths
            .get(&inode.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<PathBuf, Errno> {
        Ok(self.path(parent)?.join(name))
    }

    fn entry(&self, path: &Path) -> Result<FileAttr, Errno> {
        let meta = std::fs::symlink_metadata(self.backing.join(path)).map_err(|e| errno(&e))?;
        let inode = lock(&self.inner).inode_for(path);
        Ok(attr(inode, &meta))
    }

    fn open_handle(&self, inode: u64, file: File) -> FileHandle {
        let mut inner = lock(&self.inner);
        let handle = inner.next_handle;
        inner.next_handle += 1;
        inner.handles.insert(handle, (inode, Arc::new(file)));
        FileHandle(handle)
    }

    fn handle(&self, handle: FileHandle) -> Result<(u64, Arc<File>), Errno> {
        lock(&self.inner)
            .handles
            .get(&handle.0)
            .cloned()
            .ok_or(Errno::EBADF)
    }

    /// Changes the length of `file` (inode `inode`) to `len`, recording what it replaces.
    fn truncate(&self, inode: u64, file: &File, len: u64) -> io::Result<()> {
        let before = file.metadata()?.len();
        if before == len {
            return Ok(());
        }
        let undo = before_change(file, len, before, 0)?;
        file.set_len(len)?;
        lock(&self.inner)
            .unsynced
            .entry(inode)
            .or_default()
            .push(undo);
        Ok(())
    }

    fn setattr_inner(
        &self,
        inode: INodeNo,
        mode: Option<u32>,
        size: Option<u64>,
        times: (Option<TimeOrNow>, Option<TimeOrNow>),
        handle: Option<FileHandle>,
    ) -> Result<FileAttr, Errno> {
        let path = self.path(inode)?;
        let full = self.backing.join(&path);
        if let Some(mode) = mode {
            std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(|e| errno(&e))?;
        }
        if size.is_some() || times.0.is_some() || times.1.is_some() {
            let file = match handle {
                Some(handle) => self.handle(handle)?.1,
                None => Arc::new(
                    OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&full)
                        .map_err(|e| errno(&e))?,
                ),
            };
            if let Some(size) = size {
                self.truncate(inode.0, &file, size).map_err(|e| errno(&e))?;
            }
            let when = |t: TimeOrNow| match t {
                TimeOrNow::SpecificTime(t) => t,
                TimeOrNow::Now => SystemTime::now(),
            };
            let mut file_times = std::fs::FileTimes::new();
            if let Some(atime) = times.0 {
                file_times = file_times.set_accessed(when(atime));
            }
            if let Some(mtime) = times.1 {
                file_times = file_times.set_modified(when(mtime));
            }
            file.set_times(file_times).map_err(|e| errno(&e))?;
        }
        self.entry(&path)
    }
}

impl Filesystem for LazyFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.child(parent, name).and_then(|path| self.entry(&path)) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, inode: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.path(inode).and_then(|path| self.entry(&path)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        inode: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.setattr_inner(inode, mode, size, (atime, mtime), fh) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let made = self.child(parent, name).and_then(|path| {
            std::fs::DirBuilder::new()
                .mode(mode & !umask & 0o7777)
                .create(self.backing.join(&path))
                .map_err(|e| errno(&e))?;
            self.entry(&path)
        });
        match made {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let removed = self.child(parent, name).and_then(|path| {
            std::fs::remove_file(self.backing.join(&path)).map_err(|e| errno(&e))?;
            lock(&self.inner).forget_path(&path);
            Ok(())
        });
        match removed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let removed = self.child(parent, name).and_then(|path| {
            std::fs::remove_dir(self.backing.join(&path)).map_err(|e| errno(&e))?;
            lock(&self.inner).forget_path(&path);
            Ok(())
        });
        match removed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if !flags.is_empty() {
            reply.error(Errno::EINVAL);
            return;
        }
        let renamed = self.child(parent, name).and_then(|from| {
            let to = self.child(new_parent, new_name)?;
            std::fs::rename(self.backing.join(&from), self.backing.join(&to))
                .map_err(|e| errno(&e))?;
            let mut inner = lock(&self.inner);
            // The file replaced is gone, with what it had not synced.
            inner.forget_path(&to);
            inner.move_paths(&from, &to);
            Ok(())
        });
        match renamed {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, inode: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let opened = self.path(inode).and_then(|path| {
            let writable = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
            // Always readable: a write's undo record reads what it overwrites.
            let file = OpenOptions::new()
                .read(true)
                .write(writable)
                .open(self.backing.join(&path))
                .map_err(|e| errno(&e))?;
            if flags.0 & libc::O_TRUNC != 0 && writable {
                self.truncate(inode.0, &file, 0).map_err(|e| errno(&e))?;
            }
            Ok(self.open_handle(inode.0, file))
        });
        match opened {
            Ok(handle) => reply.opened(handle, FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let created = self.child(parent, name).and_then(|path| {
            let mut options = OpenOptions::new();
            options.read(true).write(true).mode(mode & !umask & 0o7777);
            if flags & libc::O_EXCL != 0 {
                options.create_new(true);
            } else {
                options.create(true);
            }
            let file = options
                .open(self.backing.join(&path))
                .map_err(|e| errno(&e))?;
            let attr = self.entry(&path)?;
            if flags & libc::O_TRUNC != 0 {
                self.truncate(attr.ino.0, &file, 0).map_err(|e| errno(&e))?;
            }
            let handle = self.open_handle(attr.ino.0, file);
            Ok((attr, handle))
        });
        match created {
            Ok((attr, handle)) => {
                reply.created(&TTL, &attr, Generation(0), handle, FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _inode: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let read = self.handle(fh).and_then(|(_, file)| {
            let mut buf = vec![0u8; size as usize];
            let mut filled = 0;
            while filled < buf.len() {
                match file.read_at(&mut buf[filled..], offset + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(errno(&e)),
                }
            }
            buf.truncate(filled);
            Ok(buf)
        });
        match read {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _inode: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let written = self.handle(fh).and_then(|(inode, file)| {
            let len = data.len() as u64;
            let undo = before_change(&file, offset, offset + len, len).map_err(|e| errno(&e))?;
            file.write_all_at(data, offset).map_err(|e| errno(&e))?;
            lock(&self.inner)
                .unsynced
                .entry(inode)
                .or_default()
                .push(undo);
            u32::try_from(data.len()).map_err(|_| Errno::EINVAL)
        });
        match written {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _inode: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _inode: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.inner).handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        inode: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // What the file holds now is what a power cut leaves. The backing file is not synced:
        // the machine does not lose power, only this model of it does.
        lock(&self.inner).unsynced.remove(&inode.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _inode: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // The namespace is durable at once in this model.
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        inode: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self.path(inode).and_then(|path| {
            let mut entries = vec![
                (inode.0, FileType::Directory, ".".into()),
                (inode.0, FileType::Directory, "..".into()),
            ];
            let dir = std::fs::read_dir(self.backing.join(&path)).map_err(|e| errno(&e))?;
            for entry in dir {
                let entry = entry.map_err(|e| errno(&e))?;
                let kind = entry
                    .file_type()
                    .ok()
                    .and_then(FileType::from_std)
                    .unwrap_or(FileType::RegularFile);
                let child = lock(&self.inner).inode_for(&path.join(entry.file_name()));
                entries.push((child, kind, entry.file_name()));
            }
            Ok(entries)
        });
        match listed {
            Ok(entries) => {
                let skip = usize::try_from(offset).unwrap_or(usize::MAX);
                for (i, (child, kind, name)) in entries.into_iter().enumerate().skip(skip) {
                    if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _inode: INodeNo, reply: ReplyStatfs) {
        // The backing file system's space, so the broker's free-space admission sees real
        // numbers.
        match fs2::statvfs(&self.backing) {
            Ok(stats) => {
                let block = 4096;
                reply.statfs(
                    stats.total_space() / block,
                    stats.free_space() / block,
                    stats.available_space() / block,
                    1 << 20,
                    1 << 20,
                    4096,
                    255,
                    4096,
                );
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// A folder whose writes are lost at a simulated power cut unless they were synced.
pub struct LazyDisk {
    /// Where it is mounted: give this to the broker as its data folder.
    pub path: PathBuf,
    backing: PathBuf,
    inner: Arc<Mutex<Inner>>,
    session: Option<BackgroundSession>,
}

impl LazyDisk {
    /// Mounts a lazy disk at `path` (created if missing) over the folder `backing` (created if
    /// missing).
    ///
    /// # Errors
    /// FUSE cannot be mounted here (no `/dev/fuse`, no `fusermount3`, or not allowed).
    pub fn mount(backing: &Path, path: &Path) -> Result<LazyDisk> {
        std::fs::create_dir_all(backing)?;
        std::fs::create_dir_all(path)?;
        let mut disk = LazyDisk {
            path: path.to_owned(),
            backing: backing.canonicalize()?,
            inner: Arc::new(Mutex::new(Inner::new())),
            session: None,
        };
        disk.mount_again()?;
        Ok(disk)
    }

    fn mount_again(&mut self) -> Result<()> {
        *lock(&self.inner) = Inner::new();
        let fs = LazyFs {
            backing: self.backing.clone(),
            inner: Arc::clone(&self.inner),
        };
        let mut config = Config::default();
        config.mount_options = vec![MountOption::FSName("switchboard-lazy-disk".into())];
        let session = fuser::spawn_mount(fs, &self.path, &config).with_context(|| {
            format!("cannot mount a FUSE file system at {}", self.path.display())
        })?;
        self.session = Some(session);
        // Mounted once a stat of the folder answers from the new file system.
        let deadline = std::time::Instant::now() + crate::DEADLINE;
        while std::fs::metadata(&self.path).ok().map(|m| m.ino()) != Some(INodeNo::ROOT.0) {
            if std::time::Instant::now() > deadline {
                bail!("the lazy disk at {} did not answer", self.path.display());
            }
            std::thread::park_timeout(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Mounts one for a test, or says why the test is skipped (`None`); under CI (`CI` set) a
    /// disk that cannot be mounted fails the test instead.
    pub fn for_test(backing: &Path, path: &Path) -> Option<LazyDisk> {
        match LazyDisk::mount(backing, path) {
            Ok(disk) => Some(disk),
            Err(e) if std::env::var_os("CI").is_some() => panic!("{e:#}"),
            Err(e) => {
                eprintln!(
                    "skipped: {e:#} (needs /dev/fuse and fusermount3, e.g. as root with the \
                     `fuse3` package)"
                );
                None
            }
        }
    }

    /// Unsynced changes (writes and truncations) now, over all files.
    pub fn unsynced_changes(&self) -> usize {
        lock(&self.inner).unsynced.values().map(Vec::len).sum()
    }

    /// The power goes out: call it once every process using the disk was killed (SIGKILL). The
    /// disk is unmounted, every change since each file's last sync is taken back (or, for
    /// [`Cut::Torn`], all but a random prefix of them), and the disk is mounted again.
    ///
    /// # Errors
    /// The disk cannot be unmounted (a process still has files open) or mounted again, or a
    /// backing file cannot be written.
    pub fn power_cut(&mut self, cut: Cut) -> Result<CutReport> {
        if let Some(session) = self.session.take() {
            session
                .umount_and_join()
                .with_context(|| format!("cannot unmount {}", self.path.display()))?;
        }
        let (paths, unsynced) = {
            let mut inner = lock(&self.inner);
            (inner.paths.clone(), std::mem::take(&mut inner.unsynced))
        };
        let mut rng = match cut {
            Cut::Clean => None,
            Cut::Torn { seed } => Some(SplitMix(seed)),
        };
        let mut files: Vec<(PathBuf, Vec<Undo>)> = unsynced
            .into_iter()
            .filter_map(|(inode, undo)| Some((paths.get(&inode)?.clone(), undo)))
            .filter(|(_, undo)| !undo.is_empty())
            .collect();
        // The same order every time, so a seed replays the same cut.
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let mut report = CutReport {
            files: files.len(),
            ..CutReport::default()
        };
        for (path, changes) in files {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.backing.join(&path))
                .with_context(|| format!("cannot open {} to cut it", path.display()))?;
            let n = changes.len();
            // Changes [0, kept) survive whole; change `kept` (when there is one) in part.
            let kept = rng
                .as_mut()
                .map_or(0, |rng| rng.below(n as u64 + 1) as usize);
            for change in changes[kept..].iter().skip(1).rev() {
                change.undo(&file)?;
                report.undone += 1;
            }
            if let Some(change) = changes.get(kept) {
                // A write is torn only at a sector boundary inside it: a disk writes a sector
                // whole or not at all.
                let end = change.offset + change.written;
                let first_boundary = (change.offset / SECTOR + 1) * SECTOR;
                match rng.as_mut() {
                    Some(rng) if first_boundary < end => {
                        let boundaries = (end - 1 - first_boundary) / SECTOR + 1;
                        let at = first_boundary + rng.below(boundaries) * SECTOR;
                        let zero_fill = rng.below(2) == 1;
                        change.tear(&file, at - change.offset, zero_fill)?;
                        report.torn += 1;
                    }
                    _ => {
                        change.undo(&file)?;
                        report.undone += 1;
                    }
                }
            }
            report.changes += n;
            report.per_file.push((path, kept, n));
        }
        self.mount_again()?;
        Ok(report)
    }
}

impl Drop for LazyDisk {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = session.umount_and_join();
        }
    }
}

/// A boot id file the brokers read (`SWITCHBOARD_BOOT_ID_FILE`) instead of the kernel's: a
/// simulated power cut must also look like a new boot, or the broker would trust its undo log
/// (which speaks only for a crash of the process).
pub struct BootId {
    /// The file.
    pub path: PathBuf,
    boots: u64,
}

impl BootId {
    /// Writes a first boot id to `path`.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn create(path: &Path) -> Result<BootId> {
        let mut boot = BootId {
            path: path.to_owned(),
            boots: 0,
        };
        boot.new_boot()?;
        Ok(boot)
    }

    /// A new boot: every broker started after this sees another boot id.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn new_boot(&mut self) -> Result<()> {
        self.boots += 1;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        std::fs::write(
            &self.path,
            format!("simulated-boot-{}-{nanos}\n", self.boots),
        )?;
        Ok(())
    }
}

/// A small seeded generator (SplitMix64): a torn cut is replayed from its printed seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// In `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(dir: &Path, content: &[u8]) -> File {
        let path = dir.join("f");
        std::fs::write(&path, content).unwrap();
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    fn content(file: &File) -> Vec<u8> {
        let len = file.metadata().unwrap().len() as usize;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    #[test]
    fn undoing_changes_newest_first_gives_the_file_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with(dir.path(), b"hello");
        let mut changes = Vec::new();
        // An overwrite that grows the file, a truncation, a write past the end (a hole).
        for (offset, data) in [(3u64, &b"p me"[..]), (9, b"!!")] {
            changes.push(
                before_change(&file, offset, offset + data.len() as u64, data.len() as u64)
                    .unwrap(),
            );
            file.write_all_at(data, offset).unwrap();
        }
        assert_eq!(content(&file), b"help me\0\0!!");
        changes.push(before_change(&file, 2, 11, 0).unwrap());
        file.set_len(2).unwrap();
        for change in changes.iter().rev() {
            change.undo(&file).unwrap();
        }
        assert_eq!(content(&file), b"hello");
    }

    #[test]
    fn a_torn_write_keeps_a_prefix_then_the_old_bytes_or_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let file = file_with(dir.path(), b"abcd");
        let change = before_change(&file, 2, 8, 6).unwrap();
        file.write_all_at(b"XYZUVW", 2).unwrap();
        change.tear(&file, 1, false).unwrap();
        assert_eq!(content(&file), b"abXd", "cut off past the old end");

        let file = file_with(dir.path(), b"abcd");
        let change = before_change(&file, 2, 8, 6).unwrap();
        file.write_all_at(b"XYZUVW", 2).unwrap();
        change.tear(&file, 3, true).unwrap();
        assert_eq!(
            content(&file),
            b"abXYZ\0\0\0",
            "zero-filled past the kept bytes"
        );
    }
}
