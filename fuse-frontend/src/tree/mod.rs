//! Sandbox root trees: a whole POSIX tree stored in a tree volume, served over FUSE.
//!
//! [`core`] is the filesystem (namespace, attributes, xattrs, file IO) on top of the engine;
//! [`format`] is its on-volume layout. This module maps FUSE requests onto it and owns the
//! mount: [`TreeMount::start`], [`TreeMount::restore`] (swaps the volume's content under the
//! mount and invalidates what the kernel cached), [`TreeMount::stop`].

mod core;
pub mod diff;
mod format;
pub mod import;
pub mod layer;
mod ring;

use self::core::{Core, NewNode, SetAttr, R};
use format::{Inode, Ts};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use strata_engine::Volume;

use crate::{FuseError, FuseOptions, MountSession};

/// How long the kernel may trust names and attributes. This mount is the only writer: the
/// kernel learns of every change it makes from the replies, and what changes the tree
/// behind the kernel's back tells the kernel what to drop ([`TreeMount::restore`], and
/// [`TreeHandle::import`] through a [`TreeMount::handle`]).
const TTL: Duration = Duration::from_secs(3600);
const MAX_IO: u32 = 1 << 20;
/// How files are opened: cached pages stay valid across opens (this mount is the only
/// writer, and a restore invalidates), and `close` costs no round trip (no FLUSH: this
/// mount keeps no POSIX locks, and what `flush` did, writing timestamps held in memory,
/// is done at `release`, which the kernel sends without waiting).
const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);
/// Directories: listings cached by the kernel (see `opendir`).
const DIR_OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_CACHE_DIR);

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn attr(ino: u64, i: &Inode) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: i.size,
        blocks: if i.is_dir() { 8 } else { i.size.div_ceil(512) },
        atime: i.atime.to_system(),
        mtime: i.mtime.to_system(),
        ctime: i.ctime.to_system(),
        crtime: i.btime.to_system(),
        kind: file_type(i.mode),
        perm: (i.mode & 0o7777) as u16,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: i.rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> Option<Ts> {
    match t {
        TimeOrNow::SpecificTime(t) => Some(Ts::from(t)),
        TimeOrNow::Now => None,
    }
}

struct TreeFs {
    core: Arc<Core>,
    /// The mount's notifier, once the session runs: a write that clears set-id bits tells
    /// the kernel to drop the attributes it holds (its write path does not).
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// Ask for FUSE over io_uring at `INIT`; set to whether the kernel agreed.
    uring: Arc<std::sync::atomic::AtomicBool>,
}

impl TreeFs {
    fn entry(&self, r: R<(u64, Inode)>, reply: ReplyEntry) {
        match r {
            Ok((ino, i)) => reply.entry(
                &TTL,
                &attr(ino, &i),
                Generation(self.entry_generation(ino, &i)),
            ),
            Err(e) => reply.error(e),
        }
    }

    /// Creates a node owned by the caller (`uid`, `gid`): `mode` is the type (regular when
    /// 0) and the permission bits.
    #[allow(clippy::too_many_arguments)]
    fn node(
        &self,
        (uid, gid): (u32, u32),
        parent: u64,
        name: &[u8],
        mode: u32,
        umask: u32,
        rdev: u64,
        target: Option<&[u8]>,
    ) -> R<(u64, Inode)> {
        let kind = match mode & libc::S_IFMT {
            0 => libc::S_IFREG,
            k => k,
        };
        let n = NewNode {
            mode: kind | (mode & 0o7777),
            umask,
            rdev,
            uid,
            gid,
            target,
        };
        self.core.create(parent, name, n)
    }

    /// A name's entry; `(0, _)` for a name that does not exist but may be cached as such.
    fn lookup_entry(&self, parent: u64, name: &[u8]) -> R<(u64, Inode)> {
        match self.core.lookup(parent, name) {
            // A name that does not exist is cached as such (a negative entry: inode 0), so
            // probing for it again (a compiler's include path, a module resolver, `git
            // status`) is no round trip. The kernel replaces it when the name is created
            // through the mount; a restore drops the ones it makes wrong. Not under the
            // root, whose names an import adds behind the kernel's back.
            Err(Errno::ENOENT) if parent != format::ROOT_INO => Ok((0, Inode::default())),
            r => r,
        }
    }

    /// The generation the kernel is told for an entry (0 for a negative one).
    fn entry_generation(&self, ino: u64, i: &Inode) -> u64 {
        if ino == 0 {
            0
        } else {
            self.core.generation(ino, i)
        }
    }

    /// `setattr` for a caller (`uid`, `gid`); `a.kill_setid` is filled in here.
    fn set_attr(&self, caller: (u32, u32), ino: u64, mut a: SetAttr) -> R<Inode> {
        // What the kernel asks for with FATTR_KILL_SUIDGID, which fuser does not pass
        // on: always on a chown, on a truncation when the caller lacks CAP_FSETID
        // (taken as: is not root). Applied to non-directories only.
        a.kill_setid = (a.uid.is_some() || a.gid.is_some() || (a.size.is_some() && caller.0 != 0))
            .then_some(caller);
        self.core.setattr(ino, &a)
    }

    /// `open`: files only.
    fn open_file(&self, ino: u64) -> R<()> {
        match self.core.getattr(ino) {
            Ok(i) if i.is_dir() => Err(Errno::EISDIR),
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `opendir`: directories only. The kernel keeps a listing in the directory's page
    /// cache across opens (DIR_OPEN_FLAGS); it drops it when the directory's mtime changes
    /// (every entry change here sets it) and on a restore (which invalidates every
    /// directory it holds).
    fn open_dir(&self, ino: u64) -> R<()> {
        match self.core.getattr(ino) {
            Ok(i) if i.is_dir() => Ok(()),
            Ok(_) => Err(Errno::ENOTDIR),
            Err(e) => Err(e),
        }
    }

    /// Writes for a caller (`uid`, `gid`); `kill`: the kernel asked for set-id bits to be
    /// cleared.
    fn write_data(&self, ino: u64, offset: u64, data: &[u8], kill: Option<(u32, u32)>) -> R<u32> {
        // Held to the tree volume's limits (docs/design/qos.md) on this serving thread.
        self.core
            .vol
            .io()
            .throttle(strata_engine::qos::Op::Write, data.len() as u64);
        let (n, killed) = self.core.write(ino, offset, data, kill)?;
        // Before the reply: the writer may look at the mode as soon as it returns.
        // (Attributes only: no page lock is taken, the writer holds none we need.)
        if killed {
            if let Some(notifier) = self.notifier.get() {
                let _ = notifier.inval_inode(INodeNo(ino), -1, 0);
            }
        }
        Ok(n)
    }

    /// (blocks, free blocks, available blocks, inodes, free inodes), in 4 KiB blocks.
    fn stat_fs(&self) -> (u64, u64, u64, u64, u64) {
        let (used, free_inodes) = self.core.inode_counts();
        let (blocks, bfree, bavail) = store_space(&self.core.store_dir);
        (blocks, bfree, bavail, used + free_inodes, free_inodes)
    }

    fn seek(&self, ino: u64, offset: i64, whence: i32) -> R<u64> {
        let off = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        self.core.lseek(ino, off, whence)
    }
}

/// What an xattr read answers: the size wanted (`size` 0), or the value.
enum XattrOut {
    Size(u32),
    Data(Vec<u8>),
}

fn xattr_out(r: R<Vec<u8>>, size: u32) -> R<XattrOut> {
    match r {
        Ok(v) if size == 0 => Ok(XattrOut::Size(v.len() as u32)),
        Ok(v) if v.len() > size as usize => Err(Errno::ERANGE),
        Ok(v) => Ok(XattrOut::Data(v)),
        Err(e) => Err(e),
    }
}

fn ok(r: R<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn xattr_reply(r: R<Vec<u8>>, size: u32, reply: ReplyXattr) {
    match xattr_out(r, size) {
        Ok(XattrOut::Size(n)) => reply.size(n),
        Ok(XattrOut::Data(v)) => reply.data(&v),
        Err(e) => reply.error(e),
    }
}

impl Filesystem for TreeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        // The daemon clears set-id bits on write, truncate and chown (`core::kill_setid`):
        // the kernel then marks inodes without them as needing no check, instead of asking
        // for security.capability before every write and for the mode before every chown.
        // (It still removes a security.capability attribute itself.)
        let _ = config.add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        // Not FUSE_WRITEBACK_CACHE: under it the kernel answers SEEK_DATA / SEEK_HOLE from
        // the daemon while the data may still be dirty in its own page cache (a `cp` would
        // skip written data), and keeps a cached file's size as its own across a restore.
        // Listing a directory returns its entries' attributes too (no LOOKUP per entry),
        // when the kernel judges it useful (a stat storm after a readdir).
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // Requests over per-CPU io_uring queues (see `ring`), when wanted and offered.
        let uring = self.uring.load(std::sync::atomic::Ordering::Relaxed)
            && config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
        self.uring
            .store(uring, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(self.lookup_entry(parent.0, name.as_bytes()), reply)
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.core.getattr(ino.0) {
            Ok(i) => reply.attr(&TTL, &attr(ino.0, &i)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let a = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time),
            mtime: mtime.map(time),
            kill_setid: None,
        };
        match self.set_attr((req.uid(), req.gid()), ino.0, a) {
            Ok(i) => reply.attr(&TTL, &attr(ino.0, &i)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.core.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.node(
            (req.uid(), req.gid()),
            parent.0,
            name.as_bytes(),
            mode,
            umask,
            u64::from(rdev),
            None,
        );
        self.entry(r, reply)
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.node(
            (req.uid(), req.gid()),
            parent.0,
            name.as_bytes(),
            libc::S_IFDIR | mode,
            umask,
            0,
            None,
        );
        self.entry(r, reply)
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        ok(self.core.remove(parent.0, name.as_bytes(), false), reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        ok(self.core.remove(parent.0, name.as_bytes(), true), reply)
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let target = Some(target.as_os_str().as_bytes());
        let r = self.node(
            (req.uid(), req.gid()),
            parent.0,
            link_name.as_bytes(),
            libc::S_IFLNK | 0o777,
            0,
            0,
            target,
        );
        self.entry(r, reply)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        ok(
            self.core.rename(
                parent.0,
                name.as_bytes(),
                newparent.0,
                newname.as_bytes(),
                flags.bits(),
            ),
            reply,
        )
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let r = self
            .core
            .link(ino.0, newparent.0, newname.as_bytes())
            .map(|i| (ino.0, i));
        self.entry(r, reply)
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.open_file(ino.0) {
            Ok(()) => reply.opened(FileHandle(0), OPEN_FLAGS),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.node(
            (req.uid(), req.gid()),
            parent.0,
            name.as_bytes(),
            mode,
            umask,
            0,
            None,
        ) {
            Ok((ino, i)) => reply.created(
                &TTL,
                &attr(ino, &i),
                Generation(self.core.generation(ino, &i)),
                FileHandle(0),
                OPEN_FLAGS,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        thread_local! {
            // One read buffer per serving thread, kept between reads.
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        self.core
            .vol
            .io()
            .throttle(strata_engine::qos::Op::Read, u64::from(size));
        BUF.with_borrow_mut(|buf| match self.core.read_into(ino.0, offset, size, buf) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(e),
        })
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags
            .contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            .then(|| (req.uid(), req.gid()));
        match self.write_data(ino.0, offset, data, kill) {
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
        // Not sent for files opened here (FOPEN_NOFLUSH); kept for any that are.
        ok(self.core.sync_times(), reply)
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // close(2) promises no durability; timestamps held in memory are written when the
        // last handle of a file goes (the kernel sends this without waiting for it), so
        // that a closed file's times survive a crash of the daemon.
        ok(self.core.sync_times(), reply)
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        ok(self.core.fsync(), reply)
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ds: bool,
        reply: ReplyEmpty,
    ) {
        ok(self.core.fsync(), reply)
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.open_dir(ino.0) {
            Ok(()) => reply.opened(FileHandle(0), DIR_OPEN_FLAGS),
            Err(e) => reply.error(e),
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
        let r = self.core.readdir(ino.0, offset, false, |e, _| {
            reply.add(
                INodeNo(e.ino),
                e.next,
                file_type(e.kind),
                OsStr::from_bytes(&e.name),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let r = self.core.readdir(ino.0, offset, true, |e, i| {
            let Some((i, generation)) = i else {
                return true;
            };
            reply.add(
                INodeNo(e.ino),
                e.next,
                OsStr::from_bytes(&e.name),
                &TTL,
                &attr(e.ino, i),
                Generation(generation),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (blocks, bfree, bavail, files, ffree) = self.stat_fs();
        reply.statfs(blocks, bfree, bavail, files, ffree, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        reply.ok();
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        ok(
            self.core
                .setxattr(ino.0, name.as_bytes(), Some(value), flags),
            reply,
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr_reply(self.core.getxattr(ino.0, name.as_bytes()), size, reply)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(self.core.listxattr(ino.0), size, reply)
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        ok(self.core.setxattr(ino.0, name.as_bytes(), None, 0), reply)
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
        ok(self.core.fallocate(ino.0, offset, length, mode), reply)
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.seek(ino.0, offset, whence) {
            Ok(at) => reply.offset(at as i64),
            Err(e) => reply.error(e),
        }
    }
}

/// The tree of a volume, for work outside FUSE: the mount's own (so both see one cache and
/// one inode allocator), or one opened on an unmounted volume — which the caller must keep
/// from being mounted while the handle lives. Dropping a handle opened on an unmounted
/// volume writes what it staged and closes its volume handle before the drop returns.
#[derive(Debug)]
pub struct TreeHandle {
    core: Arc<Core>,
    /// The mount's channel to the kernel, when the tree is mounted: what the handle changes
    /// behind the kernel's back is invalidated there.
    notifier: Option<fuser::Notifier>,
    /// Opened by [`TreeHandle::open`]: the handle owns the tree, and its drop ends it.
    owned: bool,
}

impl Drop for TreeHandle {
    fn drop(&mut self) {
        if self.owned {
            // With the committer gone, `core` is the last reference: the core's drop
            // (its final commit, its volume handle) runs here, when the field drops.
            self.core.stop_committer();
        }
    }
}

impl TreeHandle {
    /// Opens the tree of an unmounted volume (a new tree is formatted first).
    pub fn open(volume: Volume, store_dir: &Path) -> Result<TreeHandle, String> {
        Ok(TreeHandle {
            core: Core::open(volume, store_dir.to_path_buf())?,
            notifier: None,
            owned: true,
        })
    }

    /// Copies the contents of directory `src` into the tree (see [`import::import_dir`]),
    /// then makes it durable. `done` counts file bytes copied.
    pub fn import(
        &self,
        src: &Path,
        done: &std::sync::atomic::AtomicU64,
    ) -> Result<import::ImportStats, String> {
        let stats = import::import_dir(&self.core, src, done);
        if let Some(n) = &self.notifier {
            // New entries need nothing (they go under the root, where the kernel keeps no
            // negative entries, or into directories the import created), but the
            // directories they went into changed size, link count, times and listing: the
            // kernel drops the attributes and pages it holds (and the root's, whose
            // attributes an import sets). A directory's pages are its cached listing.
            for ino in self
                .core
                .known_inodes()
                .into_iter()
                .chain([format::ROOT_INO])
            {
                let _ = n.inval_inode(INodeNo(ino), 0, 0);
            }
        }
        let stats = stats?;
        self.core
            .fsync()
            .map_err(|e| format!("making the import durable: {e:?}"))?;
        Ok(stats)
    }
}

impl TreeHandle {
    /// Applies a container image layer (an uncompressed tar stream; see [`layer`]) onto the
    /// tree, then makes it durable. `done` counts file bytes written. The tree must not be
    /// mounted (the kernel would not learn of the changes).
    pub fn apply_layer(
        &self,
        r: impl std::io::Read,
        done: &std::sync::atomic::AtomicU64,
    ) -> Result<layer::LayerStats, String> {
        if self.notifier.is_some() {
            return Err("the tree is mounted; unmount it to apply a layer".into());
        }
        let stats = layer::apply(&self.core, r, done)?;
        self.core
            .fsync()
            .map_err(|e| format!("making the layer durable: {e:?}"))?;
        Ok(stats)
    }
}

/// (total, free, available) 4 KiB blocks of the filesystem holding the store.
fn store_space(dir: &Path) -> (u64, u64, u64) {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return (0, 0, 0);
    };
    // SAFETY: statvfs is plain old data; zeroed is a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `s` a valid out-pointer for the call.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return (0, 0, 0);
    }
    let scale = |n: u64| n * s.f_frsize / 4096;
    (scale(s.f_blocks), scale(s.f_bfree), scale(s.f_bavail))
}

/// How long [`TreeMount::stop`] waits for the io_uring threads to see the unmount.
const RING_EXIT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A mounted tree. [`TreeMount::stop`] unmounts it; dropping it without stopping detaches
/// the mount lazily.
#[derive(Debug)]
pub struct TreeMount {
    core: Arc<Core>,
    mount: MountSession,
    notifier: fuser::Notifier,
    /// Whether requests come over io_uring.
    uring: Arc<std::sync::atomic::AtomicBool>,
    /// The io_uring serving threads (they end when the mount goes away).
    ring_threads: Vec<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("volume", &self.vol.name())
            .finish()
    }
}

impl TreeMount {
    /// Mounts the tree held by `volume` at `mountpoint` (an existing empty directory).
    /// `store_dir` is where statfs reads free space from.
    pub fn start(
        volume: Volume,
        store_dir: &Path,
        mountpoint: &Path,
        opts: &FuseOptions,
    ) -> Result<TreeMount, FuseError> {
        let checked = crate::prepare_mountpoint(mountpoint)?;
        let name = volume.name().to_string();
        let core = Core::open(volume, store_dir.to_path_buf()).map_err(|e| FuseError::Io {
            path: checked.clone(),
            source: std::io::Error::other(e),
        })?;
        // A sandbox's root tree holds device nodes and set-id programs; only root mounts.
        let extra = vec![fuser::MountOption::Dev, fuser::MountOption::Suid];
        let cell = Arc::new(std::sync::OnceLock::new());
        let want_uring = opts.uring && ring::available();
        let uring = Arc::new(std::sync::atomic::AtomicBool::new(want_uring));
        let fs = TreeFs {
            core: core.clone(),
            notifier: cell.clone(),
            uring: uring.clone(),
        };
        let mut opts = opts.clone();
        let per_queue = opts.threads.div_ceil(2).clamp(1, 8);
        if want_uring {
            // Over io_uring, /dev/fuse carries only FORGET and INTERRUPT.
            opts.threads = 1;
        }
        let mut ring_threads = Vec::new();
        let on_init = |session: &fuser::Session<TreeFs>| {
            if !uring.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            let ring_fs = Arc::new(TreeFs {
                core: core.clone(),
                notifier: cell.clone(),
                uring: uring.clone(),
            });
            match std::os::fd::AsFd::as_fd(session).try_clone_to_owned() {
                Ok(dev) => ring::start(
                    ring_fs,
                    dev,
                    per_queue,
                    !opts.allow_other,
                    &mut ring_threads,
                ),
                Err(e) => {
                    tracing::error!(error = %e, "duplicating /dev/fuse for io_uring");
                }
            }
        };
        let (mount, notifier) =
            MountSession::start(fs, &name, checked, &opts, extra, "tree", on_init)?;
        let _ = cell.set(notifier.clone());
        Ok(TreeMount {
            core,
            mount,
            notifier,
            uring,
            ring_threads,
        })
    }

    pub fn mountpoint(&self) -> &Path {
        self.mount.mountpoint()
    }

    /// How the kernel's requests reach the tree: `"io_uring"` (per-CPU queues) or
    /// `"/dev/fuse"`.
    pub fn transport(&self) -> &'static str {
        if self.uring.load(std::sync::atomic::Ordering::Relaxed) {
            "io_uring"
        } else {
            "/dev/fuse"
        }
    }

    /// A handle on the mounted tree for work outside FUSE (an import).
    pub fn handle(&self) -> TreeHandle {
        TreeHandle {
            core: self.core.clone(),
            notifier: Some(self.notifier.clone()),
            owned: false,
        }
    }

    /// The mounted volume (a handle: for reading the live tree, e.g. a diff), after the
    /// kernel wrote back what it held dirty ([`TreeMount::sync`]) and the tree wrote what it
    /// had staged.
    pub fn volume(&self) -> Result<&Volume, Errno> {
        self.sync()?;
        self.core.commit()?;
        Ok(&self.core.vol)
    }

    /// Makes the kernel write back every page it holds dirty for this mount (pages written
    /// through a shared writable `mmap` stay in the kernel until writeback, `msync`, `fsync`
    /// or `syncfs`), so the volume holds every write made before the call. Must not run on
    /// a thread that serves this mount's requests.
    pub fn sync(&self) -> Result<(), Errno> {
        let dir = std::fs::File::open(self.mount.mountpoint()).map_err(|e| {
            tracing::warn!(error = %e, "opening the mountpoint to sync it");
            Errno::EIO
        })?;
        // SAFETY: `dir` is an open descriptor for the duration of the call.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) } != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!(error = %e, "syncfs of the mounted tree");
            return Err(Errno::EIO);
        }
        Ok(())
    }

    /// Runs `f` (a checkpoint of the volume) with every operation of the mount held off, so
    /// the checkpoint holds no half-done operation, every timestamp, and every write made
    /// before the call (the kernel's dirty pages are written back first).
    pub fn checkpoint<T>(&self, f: impl FnOnce() -> T) -> Result<T, Errno> {
        self.sync()?;
        self.core.quiesce(f)
    }

    /// Runs `f` (a restore of the volume) with every operation held off, then drops every
    /// cache and tells the kernel to forget what it cached: names it looked up and inodes'
    /// attributes and pages. Processes then see the restored tree; a file they hold open
    /// that the restored tree does not have answers ENOENT. Pages the kernel held dirty
    /// are written back first, so none lands in the restored tree.
    pub fn restore<T>(
        &self,
        diff: impl FnOnce() -> Option<Vec<strata_engine::ByteRange>>,
        f: impl FnOnce() -> T,
    ) -> Result<T, Errno> {
        self.sync()?;
        let (out, stale) = self.core.restore(diff, f)?;
        if stale.all_names {
            // Those under the root are enough: the kernel drops the cached subtree of each.
            for name in self.core.known_top_entries() {
                let _ = self
                    .notifier
                    .inval_entry(INodeNo(format::ROOT_INO), OsStr::from_bytes(&name));
            }
        }
        for (dir, name) in &stale.entries {
            let _ = self
                .notifier
                .inval_entry(INodeNo(*dir), OsStr::from_bytes(name));
        }
        // Inodes: what the restore replaced or changed (directories: their listings);
        // other cached inodes are the same files with the same content.
        for ino in stale.inodes {
            let _ = self.notifier.inval_inode(INodeNo(ino), 0, 0);
        }
        let _ = self.notifier.inval_inode(INodeNo(format::ROOT_INO), 0, 0);
        Ok(out)
    }

    /// Unmounts and waits for the serving threads; refused with [`FuseError::Busy`] while
    /// a file in the tree is open or a process has its working directory there. A tree
    /// still mounted elsewhere (a bind mount of the mountpoint, in this or another mount
    /// namespace) is unmounted from its mountpoint and goes on serving that mount: its
    /// volume stays open until the kernel lets go of it.
    pub fn stop(&mut self) -> Result<(), FuseError> {
        // Timestamps held in memory go to the volume first, and again after the last
        // request was served.
        let _ = self.core.commit();
        if !self.mount.stop()? {
            // Mounted elsewhere too (a bind mount): the tree goes on serving that mount
            // and lets go of its volume when it goes.
            return Ok(());
        }
        // The kernel ends the ring threads' commands when the connection goes; they hold
        // the core (and its volume handle) until then. A stopped mount lets go of its
        // volume before this returns, so the caller can delete, restore or mount it.
        let deadline = std::time::Instant::now() + RING_EXIT_WAIT;
        for t in std::mem::take(&mut self.ring_threads) {
            if crate::finished_by(&t, deadline) {
                let _ = t.join();
            } else {
                tracing::warn!("a FUSE io_uring thread did not end after the unmount");
            }
        }
        self.core.stop_committer();
        let _ = self.core.commit();
        Ok(())
    }

    /// Unmounts even when busy (lazily), for daemon shutdown.
    pub fn detach(self) {
        // A lazily detached mount cannot write back once the daemon is gone.
        let _ = self.sync();
        let _ = self.core.commit();
        self.mount.detach()
    }
}
