//! The FUSE filesystem: one directory holding the live volume's image file and one read-only
//! image file per checkpoint.

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use strata_engine::qos::Op;
use strata_engine::{CheckpointEntry, Snapshot, Store, Volume};

/// The mount's directory.
pub const ROOT_INO: u64 = 1;
/// `VOL.img`, the live volume.
pub const VOLUME_INO: u64 = 2;
/// `VOL@CKPT.img` has inode `CHECKPOINT_INO_BASE + id`, the checkpoint's store-unique id: a
/// checkpoint deleted and taken again under the same name is a new inode, so no cached page
/// of the old one is ever served for it.
pub const CHECKPOINT_INO_BASE: u64 = 16;

/// How long the kernel may trust names and attributes. Content changes behind the mount
/// (restores, new or deleted checkpoints) are pushed to the kernel explicitly; this bounds
/// what a missed notification could cost.
const TTL: Duration = Duration::from_secs(1);

/// Largest request: the kernel's own limit for one FUSE request is 256 pages.
const MAX_IO: u32 = 1 << 20;

pub(crate) fn volume_file_name(vol: &str) -> String {
    format!("{vol}.img")
}

pub(crate) fn checkpoint_file_name(vol: &str, ck: &str) -> String {
    format!("{vol}@{ck}.img")
}

struct OpenCheckpoint {
    name: String,
    snap: Snapshot,
}

/// State shared by the serving threads and the [`crate::FuseExport`] handle.
pub(crate) struct Shared {
    store: Weak<Store>,
    pub(crate) vol: Volume,
    read_only: bool,
    uid: u32,
    gid: u32,
    mounted: SystemTime,
    /// Live volume's mtime, nanoseconds since the epoch.
    mtime_ns: AtomicU64,
    handles: Mutex<HashMap<u64, Arc<OpenCheckpoint>>>,
    next_fh: AtomicU64,
    pub(crate) readahead: crate::prefetch::Prefetcher,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("volume", &self.vol.name())
            .field("read_only", &self.read_only)
            .finish()
    }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Shared {
    pub(crate) fn new(store: Weak<Store>, vol: Volume, read_only: bool) -> Self {
        let now = SystemTime::now();
        // SAFETY: geteuid and getegid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Shared {
            store,
            vol,
            read_only,
            uid,
            gid,
            mounted: now,
            mtime_ns: AtomicU64::new(nanos(now)),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            readahead: crate::prefetch::Prefetcher::new(),
        }
    }

    pub(crate) fn volume_name(&self) -> &str {
        self.vol.name()
    }

    /// Call after anything changed the live volume (also after a failed change: part of it
    /// may have landed): bumps the mtime and drops prefetched data.
    pub(crate) fn touch(&self) {
        self.readahead.invalidate();
        self.mtime_ns
            .store(nanos(SystemTime::now()), Ordering::Relaxed);
    }

    /// Starts the read-ahead thread (needs the `Arc` the serving threads share).
    pub(crate) fn start_readahead(self: &Arc<Self>) {
        self.readahead
            .start(Arc::downgrade(self), |s: &Shared| (&s.readahead, &s.vol));
    }

    pub(crate) fn checkpoint_open(&self, ck: &str) -> bool {
        self.handles.lock().values().any(|h| h.name == ck)
    }

    fn checkpoints(&self) -> Result<Vec<CheckpointEntry>, Errno> {
        let store = self.store.upgrade().ok_or(Errno::ESHUTDOWN)?;
        let mut list = store
            .checkpoint_entries(self.vol.name())
            .map_err(|e| engine_errno("listing checkpoints", &e))?;
        list.sort_by(|a, b| (a.created_unix, &a.name).cmp(&(b.created_unix, &b.name)));
        Ok(list)
    }

    fn checkpoint_by_ino(&self, ino: u64) -> Result<CheckpointEntry, Errno> {
        let id = ino.checked_sub(CHECKPOINT_INO_BASE).ok_or(Errno::ENOENT)?;
        self.checkpoints()?
            .into_iter()
            .find(|c| c.id == id)
            .ok_or(Errno::ENOENT)
    }

    fn attr(&self, ino: u64, size: u64, mapped: u64, perm: u16, mtime: SystemTime) -> FileAttr {
        let (kind, nlink) = if ino == ROOT_INO {
            (FileType::Directory, 2)
        } else {
            (FileType::RegularFile, 1)
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: mapped / 512,
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: self.vol.block_size(),
            flags: 0,
        }
    }

    fn root_attr(&self) -> FileAttr {
        self.attr(ROOT_INO, 0, 0, 0o755, self.mounted)
    }

    fn volume_attr(&self) -> FileAttr {
        let mtime = UNIX_EPOCH + Duration::from_nanos(self.mtime_ns.load(Ordering::Relaxed));
        let perm = if self.read_only { 0o444 } else { 0o644 };
        self.attr(
            VOLUME_INO,
            self.vol.size(),
            self.vol.mapped_bytes(),
            perm,
            mtime,
        )
    }

    fn checkpoint_attr(&self, c: &CheckpointEntry) -> FileAttr {
        self.attr(
            CHECKPOINT_INO_BASE + c.id,
            c.size,
            c.mapped_bytes,
            0o444,
            UNIX_EPOCH + Duration::from_secs(c.created_unix),
        )
    }

    fn getattr(&self, ino: u64) -> Result<FileAttr, Errno> {
        match ino {
            ROOT_INO => Ok(self.root_attr()),
            VOLUME_INO => Ok(self.volume_attr()),
            _ => Ok(self.checkpoint_attr(&self.checkpoint_by_ino(ino)?)),
        }
    }

    fn lookup(&self, name: &OsStr) -> Result<FileAttr, Errno> {
        let name = name.to_str().ok_or(Errno::ENOENT)?;
        let vol = self.vol.name();
        if name == volume_file_name(vol) {
            return Ok(self.volume_attr());
        }
        let ck = name
            .strip_prefix(vol)
            .and_then(|r| r.strip_prefix('@'))
            .and_then(|r| r.strip_suffix(".img"))
            .ok_or(Errno::ENOENT)?;
        self.checkpoints()?
            .iter()
            .find(|c| c.name == ck)
            .map(|c| self.checkpoint_attr(c))
            .ok_or(Errno::ENOENT)
    }

    fn open_checkpoint(&self, ino: u64) -> Result<u64, Errno> {
        let c = self.checkpoint_by_ino(ino)?;
        let store = self.store.upgrade().ok_or(Errno::ESHUTDOWN)?;
        let snap = store
            .open_checkpoint(self.vol.name(), &c.name)
            .map_err(|e| engine_errno("opening checkpoint", &e))?;
        if snap.id() != c.id {
            // Deleted and retaken between the two calls: the inode is gone.
            return Err(Errno::ENOENT);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles
            .lock()
            .insert(fh, Arc::new(OpenCheckpoint { name: c.name, snap }));
        Ok(fh)
    }

    fn handle(&self, fh: u64) -> Result<Arc<OpenCheckpoint>, Errno> {
        self.handles.lock().get(&fh).cloned().ok_or(Errno::EBADF)
    }

    /// Reads up to `size` bytes at `offset` (short at the end of the file) and hands them to
    /// `done` straight from a reused per-thread buffer.
    fn read(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        size: u32,
        done: impl FnOnce(Result<&[u8], Errno>),
    ) {
        let n_max = u64::from(size.min(MAX_IO));
        if ino == VOLUME_INO {
            let size = self.vol.size();
            let n = size.saturating_sub(offset).min(n_max) as usize;
            if n == 0 {
                // At or past the end (the kernel's idea of the size may be stale after a
                // restore): end of file, not an error.
                return done(Ok(&[]));
            }
            let prefetched = self.readahead.take(offset, n);
            // Queue the next range first, so it is read while this one travels back.
            self.readahead.note_read(offset, n, size);
            if let Some(data) = prefetched {
                done(Ok(&data));
                return self.readahead.recycle(data);
            }
            return with_buf(n, |buf| {
                let r = self.vol.read_bytes(offset, buf);
                done(r.map(|()| &*buf).map_err(|e| engine_errno("read", &e)))
            });
        }
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return done(Err(e)),
        };
        let n = h.snap.size().saturating_sub(offset).min(n_max) as usize;
        if n == 0 {
            return done(Ok(&[]));
        }
        with_buf(n, |buf| {
            let r = h.snap.read_bytes(offset, buf);
            done(r.map(|()| &*buf).map_err(|e| engine_errno("read", &e)))
        })
    }

    fn writable(&self, ino: u64) -> Result<(), Errno> {
        if ino != VOLUME_INO || self.read_only {
            return Err(Errno::EROFS);
        }
        Ok(())
    }

    fn write(&self, ino: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        self.writable(ino)?;
        let size = self.vol.size();
        if data.is_empty() {
            return Ok(0);
        }
        if offset >= size {
            // A volume has a fixed size (grow it with truncate): like a block device.
            return Err(Errno::ENOSPC);
        }
        let n = (size - offset).min(data.len() as u64) as usize;
        let r = self.vol.write_bytes(offset, &data[..n]);
        self.touch();
        r.map_err(|e| engine_errno("write", &e))?;
        u32::try_from(n).map_err(|_| Errno::EINVAL)
    }

    fn fallocate(&self, ino: u64, offset: u64, len: u64, mode: i32) -> Result<(), Errno> {
        self.writable(ino)?;
        let end = offset.checked_add(len).ok_or(Errno::EFBIG)?;
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let size = self.vol.size();
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let op = mode & !libc::FALLOC_FL_KEEP_SIZE;
        if end > size && !keep_size {
            // Extending the file would change the volume's size: truncate does that.
            return Err(Errno::ENOSPC);
        }
        let end = end.min(size);
        match op {
            // Plain allocation: the volume is thin-provisioned, so there is nothing to
            // reserve (documented: space is not guaranteed).
            0 => Ok(()),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE => {
                if offset < end {
                    let r = self.vol.unmap_bytes(offset, end - offset);
                    self.touch();
                    r.map_err(|e| engine_errno("unmap", &e))?;
                }
                Ok(())
            }
            _ => Err(Errno::EOPNOTSUPP),
        }
    }

    fn lseek(&self, ino: u64, fh: u64, offset: i64, whence: i32) -> Result<i64, Errno> {
        let off = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
        let (size, data, hole) = if ino == VOLUME_INO {
            (
                self.vol.size(),
                self.vol.next_data(off),
                self.vol.next_hole(off),
            )
        } else {
            let h = self.handle(fh)?;
            (h.snap.size(), h.snap.next_data(off), h.snap.next_hole(off))
        };
        if off >= size {
            return Err(Errno::ENXIO);
        }
        let at = match whence {
            libc::SEEK_DATA => data.ok_or(Errno::ENXIO)?,
            libc::SEEK_HOLE => hole,
            _ => return Err(Errno::EINVAL),
        };
        i64::try_from(at).map_err(|_| Errno::EOVERFLOW)
    }

    fn set_size(&self, ino: u64, size: u64) -> Result<(), Errno> {
        self.writable(ino)?;
        let cur = self.vol.size();
        if size == cur {
            return Ok(());
        }
        if size < cur {
            tracing::warn!(
                volume = self.vol.name(),
                size,
                current = cur,
                "refused truncate: volumes do not shrink"
            );
            return Err(Errno::EPERM);
        }
        if !size.is_multiple_of(512) {
            return Err(Errno::EINVAL);
        }
        let store = self.store.upgrade().ok_or(Errno::ESHUTDOWN)?;
        store
            .grow_volume(self.vol.name(), size)
            .map_err(|e| engine_errno("grow", &e))?;
        self.touch();
        Ok(())
    }

    fn statfs(&self) -> (u64, u64, u64, u32) {
        let Some(store) = self.store.upgrade() else {
            return (0, 0, 0, 4096);
        };
        let Ok(path) = std::ffi::CString::new(store.path().as_os_str().as_encoded_bytes()) else {
            return (0, 0, 0, 4096);
        };
        // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated and `st` is a valid, writable statvfs.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return (0, 0, 0, 4096);
        }
        let frsize = st.f_frsize as u32;
        (st.f_blocks, st.f_bfree, st.f_bavail, frsize)
    }
}

thread_local! {
    /// Per-thread read buffer: reads of up to 1 MiB would otherwise allocate (and zero) a
    /// fresh buffer each time.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn with_buf(n: usize, f: impl FnOnce(&mut [u8])) {
    READ_BUF.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < n {
            b.resize(n, 0);
        }
        f(&mut b[..n])
    })
}

fn engine_errno(what: &str, e: &strata_engine::Error) -> Errno {
    use strata_engine::Error as E;
    let errno = match e {
        E::NoSpace | E::QuotaExceeded { .. } => Errno::ENOSPC,
        E::NoSuchCheckpoint { .. } | E::NoSuchVolume(_) => Errno::ENOENT,
        E::InvalidArgument(_) | E::Misaligned { .. } | E::OutOfRange { .. } => Errno::EINVAL,
        E::Contention(_) => Errno::EAGAIN,
        _ => Errno::EIO,
    };
    if errno == Errno::EIO {
        tracing::warn!(error = %e, "FUSE {what} failed");
    } else {
        tracing::debug!(error = %e, "FUSE {what} failed");
    }
    errno
}

/// The `fuser` filesystem. Every method runs on one of the session's serving threads.
pub(crate) struct ImageFs {
    shared: Arc<Shared>,
}

impl ImageFs {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        ImageFs { shared }
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // Direct IO from one file descriptor is sent as concurrent requests (QD > 1).
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT_INO {
            return reply.error(Errno::ENOENT);
        }
        match self.shared.lookup(name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.shared.getattr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = &self.shared;
        let r = (|| {
            if mode.is_some() || uid.is_some() || gid.is_some() {
                // Ownership and mode follow the daemon; the image files are not a general
                // filesystem.
                return Err(if ino.0 == VOLUME_INO {
                    Errno::EPERM
                } else {
                    Errno::EROFS
                });
            }
            if let Some(size) = size {
                s.set_size(ino.0, size)?;
            }
            if let Some(t) = mtime {
                s.writable(ino.0)?;
                let t = match t {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                };
                s.mtime_ns.store(nanos(t), Ordering::Relaxed);
            }
            s.getattr(ino.0)
        })();
        match r {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let wants_write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let r = match ino.0 {
            VOLUME_INO if wants_write && self.shared.read_only => Err(Errno::EROFS),
            VOLUME_INO => Ok(0),
            ROOT_INO => Err(Errno::EISDIR),
            _ if wants_write => Err(Errno::EROFS),
            _ => self.shared.open_checkpoint(ino.0),
        };
        match r {
            // Cached pages stay valid across opens: the only writer is this mount, and a
            // restore invalidates them explicitly. Checkpoint content never changes.
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh.0 != 0 {
            self.shared.handles.lock().remove(&fh.0);
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.shared.vol.io().throttle(Op::Read, u64::from(size));
        let t = std::time::Instant::now();
        self.shared.read(ino.0, fh.0, offset, size, |r| match r {
            Ok(data) => {
                let n = data.len() as u64;
                reply.data(data);
                self.shared
                    .vol
                    .io()
                    .stats
                    .record_op(Op::Read, n, true, t.elapsed());
            }
            Err(e) => {
                reply.error(e);
                self.shared
                    .vol
                    .io()
                    .stats
                    .record_op(Op::Read, 0, false, t.elapsed());
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.shared.vol.io().throttle(Op::Write, data.len() as u64);
        let t = std::time::Instant::now();
        let r = self.shared.write(ino.0, offset, data);
        let (n, ok) = r.map_or((0, false), |n| (u64::from(n), true));
        self.shared
            .vol
            .io()
            .stats
            .record_op(Op::Write, n, ok, t.elapsed());
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) promises no durability; fsync does.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if ino.0 != VOLUME_INO {
            return reply.ok();
        }
        let t = std::time::Instant::now();
        let r = self.shared.vol.flush();
        self.shared
            .vol
            .io()
            .stats
            .record_op(Op::Flush, 0, r.is_ok(), t.elapsed());
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(engine_errno("fsync", &e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino.0 != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let s = &self.shared;
        let cks = match s.checkpoints() {
            Ok(c) => c,
            Err(e) => return reply.error(e),
        };
        let vol = s.vol.name();
        let mut entries = vec![
            (ROOT_INO, FileType::Directory, ".".to_string()),
            (ROOT_INO, FileType::Directory, "..".to_string()),
            (VOLUME_INO, FileType::RegularFile, volume_file_name(vol)),
        ];
        entries.extend(cks.iter().map(|c| {
            (
                CHECKPOINT_INO_BASE + c.id,
                FileType::RegularFile,
                checkpoint_file_name(vol, &c.name),
            )
        }));
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(skip) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, bfree, bavail, frsize) = self.shared.statfs();
        reply.statfs(blocks, bfree, bavail, 0, 0, frsize, 255, frsize);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let op = if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
            Op::Discard
        } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
            Op::WriteZeroes
        } else {
            Op::Other
        };
        self.shared.vol.io().throttle(op, 0);
        let t = std::time::Instant::now();
        let r = self.shared.fallocate(ino.0, offset, length, mode);
        let bytes = if r.is_ok() { length } else { 0 };
        self.shared
            .vol
            .io()
            .stats
            .record_op(op, bytes, r.is_ok(), t.elapsed());
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.shared.lseek(ino.0, fh.0, offset, whence) {
            Ok(at) => reply.offset(at),
            Err(e) => reply.error(e),
        }
    }

    // No extended attributes: ENOSYS tells the kernel once, and it stops asking.
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Block-device ioctls (mkfs probes BLKGETSIZE64 and friends) do not apply to a file.
        reply.error(Errno::ENOTTY);
    }

    // The directory's entries are the store's volume and checkpoints: they are created and
    // removed with `strata`, not with file operations.
    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EPERM);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::AtomicBool;
    use strata_engine::{StoreOptions, VolumeOptions};

    const MIB: u64 = 1 << 20;

    fn setup(size: u64) -> (tempfile::TempDir, Arc<Store>, Arc<Shared>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), StoreOptions::default()).unwrap());
        store
            .create_volume("v", size, VolumeOptions::default())
            .unwrap();
        let vol = store.open_volume("v").unwrap();
        let shared = Arc::new(Shared::new(Arc::downgrade(&store), vol, false));
        shared.start_readahead();
        (dir, store, shared)
    }

    fn stamp(v: u64, len: usize) -> Vec<u8> {
        (0..len / 8).flat_map(|_| v.to_le_bytes()).collect()
    }

    fn read(s: &Shared, offset: u64, len: u32) -> Vec<u8> {
        let mut out = Vec::new();
        s.read(VOLUME_INO, 0, offset, len, |r| out = r.unwrap().to_vec());
        out
    }

    #[test]
    fn a_write_after_a_prefetch_is_what_the_next_read_sees() {
        let (_dir, _store, s) = setup(8 * MIB);
        for i in 0..8 {
            s.write(VOLUME_INO, i * MIB, &stamp(1, MIB as usize))
                .unwrap();
        }
        assert_eq!(read(&s, 0, MIB as u32), stamp(1, MIB as usize));
        // Sequential: the range at 2 MiB is prefetched while this one is served.
        assert_eq!(read(&s, MIB, MIB as u32), stamp(1, MIB as usize));
        s.write(VOLUME_INO, 2 * MIB, &stamp(2, MIB as usize))
            .unwrap();
        assert_eq!(read(&s, 2 * MIB, MIB as u32), stamp(2, MIB as usize));
        // And an unchanged range keeps being served correctly from the prefetch.
        assert_eq!(read(&s, 3 * MIB, MIB as u32), stamp(1, MIB as usize));
        assert_eq!(read(&s, 4 * MIB, MIB as u32), stamp(1, MIB as usize));
        // Reads at or past the end are empty, not errors.
        assert!(read(&s, 8 * MIB, 4096).is_empty());
        assert!(read(&s, 8 * MIB + 12345, 4096).is_empty());
        assert_eq!(read(&s, 8 * MIB - 100, 4096).len(), 100);
    }

    #[test]
    fn sequential_reader_never_sees_data_older_than_a_completed_write() {
        // Each 1 MiB chunk holds a version stamp. A writer rewrites random chunks with
        // increasing versions and records each version once its write returned; a reader
        // going through the volume sequentially (so read-ahead is active) checks that every
        // block it reads is at least as new as the version completed before its read began.
        const CHUNKS: u64 = 16;
        let (_dir, _store, s) = setup(CHUNKS * MIB);
        let done: Arc<Vec<AtomicU64>> = Arc::new((0..CHUNKS).map(|_| AtomicU64::new(0)).collect());
        for c in 0..CHUNKS {
            s.write(VOLUME_INO, c * MIB, &stamp(0, MIB as usize))
                .unwrap();
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (s, done, stop) = (s.clone(), done.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64;
                let mut v = 1;
                while !stop.load(Ordering::Relaxed) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let c = x % CHUNKS;
                    s.write(VOLUME_INO, c * MIB, &stamp(v, MIB as usize))
                        .unwrap();
                    done[c as usize].store(v, Ordering::Release);
                    v += 1;
                }
                v
            })
        };
        let mut checked = 0u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            for c in 0..CHUNKS {
                let floor = done[c as usize].load(Ordering::Acquire);
                let data = read(&s, c * MIB, MIB as u32);
                for (i, w) in data.chunks_exact(8).enumerate() {
                    let got = u64::from_le_bytes(w.try_into().unwrap());
                    assert!(
                        got >= floor,
                        "chunk {c} word {i}: version {got} read after version {floor} was written"
                    );
                }
                checked += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let writes = writer.join().unwrap();
        assert!(
            writes > 10 && checked > 10,
            "{writes} writes, {checked} reads"
        );
    }
}
