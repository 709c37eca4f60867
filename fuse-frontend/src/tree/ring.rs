//! FUSE over io_uring for tree mounts (Linux 6.14+, `fuse.enable_uring`).
//!
//! With `/dev/fuse`, a request is queued on one list for the whole mount and a serving
//! thread, woken wherever the scheduler puts it, reads it: on a virtual machine most
//! requests then cost a cross-CPU wakeup each way. Over io_uring the kernel keeps a queue
//! per CPU and hands a request to a serving thread of the CPU the caller runs on; the
//! threads here are pinned to their CPU, so the caller sleeps and the server runs on the
//! same core, and a request costs one `io_uring_enter` (commit the reply, wait for the next
//! request) instead of a `read` and a `writev`. Measured on the 2-CPU bench machine:
//! docs/BENCHMARKS.md.
//!
//! fuser still mounts and answers `INIT` (asking for `FUSE_OVER_IO_URING`), and its thread
//! still serves what the kernel sends through `/dev/fuse` on a ring mount: `FORGET` and
//! `INTERRUPT`. Every other request comes here, decoded from the ring entry's buffers (the
//! fixed per-operation header in `op_in`, names and data in the payload) and answered by
//! the same [`TreeFs`] methods fuser's path calls.
//!
//! The kernel holds requests until every CPU's queue has an entry registered. If this
//! side cannot set a queue up, it makes a registration fail on purpose: the kernel then
//! turns io_uring off for the mount and serves it through `/dev/fuse`.

use super::core::SetAttr;
use super::format::{Inode, Ts};
use super::{xattr_out, TreeFs, XattrOut, DIR_OPEN_FLAGS, OPEN_FLAGS, TTL};
use fuser::Errno;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// The module parameter that lets servers use io_uring.
const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_uring_req_header`: the in/out header, the per-operation header, and
/// `struct fuse_uring_ent_in_out` (flags, commit id, payload size).
#[repr(C, align(8))]
struct Header {
    in_out: [u8; 128],
    op_in: [u8; 128],
    ent: [u8; 32],
}

/// Payload buffer per entry: at least the kernel's `max(max_write, max_pages * 4096)`.
const PAYLOAD: usize = super::MAX_IO as usize + 4096;

// Request opcodes served here (`enum fuse_opcode`).
const LOOKUP: u32 = 1;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const READLINK: u32 = 5;
const SYMLINK: u32 = 6;
const MKNOD: u32 = 8;
const MKDIR: u32 = 9;
const UNLINK: u32 = 10;
const RMDIR: u32 = 11;
const RENAME: u32 = 12;
const LINK: u32 = 13;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const STATFS: u32 = 17;
const RELEASE: u32 = 18;
const FSYNC: u32 = 20;
const SETXATTR: u32 = 21;
const GETXATTR: u32 = 22;
const LISTXATTR: u32 = 23;
const REMOVEXATTR: u32 = 24;
const FLUSH: u32 = 25;
const OPENDIR: u32 = 27;
const READDIR: u32 = 28;
const RELEASEDIR: u32 = 29;
const FSYNCDIR: u32 = 30;
const ACCESS: u32 = 34;
const CREATE: u32 = 35;
const DESTROY: u32 = 38;
const FALLOCATE: u32 = 43;
const READDIRPLUS: u32 = 44;
const RENAME2: u32 = 45;
const LSEEK: u32 = 46;

// `fuse_setattr_in.valid` bits.
const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;
/// `fuse_write_in.write_flags`: clear set-id bits (caller lacks CAP_FSETID).
const WRITE_KILL_SUIDGID: u32 = 1 << 2;

/// Whether a tree mount should ask for io_uring: the kernel has it and allows it (the
/// module parameter is turned on when it is off and this process may), and an io_uring
/// with 128-byte entries can be created.
pub(super) fn available() -> bool {
    let Ok(v) = std::fs::read_to_string(PARAM) else {
        return false;
    };
    if v.trim() != "Y" {
        if let Err(e) = std::fs::write(PARAM, "Y") {
            tracing::info!(error = %e, "FUSE over io_uring is off ({PARAM}) and cannot be turned on; trees use /dev/fuse");
            return false;
        }
        tracing::info!("turned on FUSE over io_uring ({PARAM})");
    }
    match new_ring() {
        Ok(_) => true,
        Err(e) => {
            tracing::info!(error = %e, "no io_uring for FUSE; trees use /dev/fuse");
            false
        }
    }
}

fn new_ring() -> std::io::Result<IoUring<squeue::Entry128, cqueue::Entry>> {
    IoUring::<squeue::Entry128, cqueue::Entry>::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(4)
}

/// The kernel's queue count: one per possible CPU.
fn possible_cpus() -> usize {
    let parse = |s: &str| -> Option<usize> {
        let mut n = 0;
        for part in s.trim().split(',') {
            n += match part.split_once('-') {
                Some((a, b)) => b.parse::<usize>().ok()? - a.parse::<usize>().ok()? + 1,
                None => {
                    part.parse::<usize>().ok()?;
                    1
                }
            };
        }
        Some(n)
    };
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| parse(&s))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Starts `per_queue` serving threads for each CPU's queue on the mount's `/dev/fuse`
/// (`dev`, a duplicate the threads keep). Every thread registers one entry; the kernel
/// serves the mount over io_uring once each queue has one. On failure (a thread or ring
/// cannot be made), the mount falls back to `/dev/fuse`. The threads go into `threads`
/// (they end when the mount goes away).
pub(super) fn start(
    fs: Arc<TreeFs>,
    dev: OwnedFd,
    per_queue: usize,
    owner_only: bool,
    threads: &mut Vec<std::thread::JoinHandle<()>>,
) {
    let dev = Arc::new(dev);
    let queues = possible_cpus();
    for qid in 0..queues {
        for k in 0..per_queue.max(1) {
            let (tfs, tdev) = (fs.clone(), dev.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("tree-ring-{qid}.{k}"))
                .spawn(move || serve(&tfs, &tdev, qid as u16, owner_only));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    tracing::error!(error = %e, "starting a FUSE io_uring thread");
                    give_up(&fs, &dev);
                    return;
                }
            }
        }
    }
    tracing::info!(queues, per_queue, "tree mount served over io_uring");
}

/// Makes the kernel stop waiting for io_uring on this mount: a registration it refuses
/// (a header buffer too short) turns io_uring off for the connection.
fn give_up(fs: &TreeFs, dev: &OwnedFd) {
    fs.uring.store(false, std::sync::atomic::Ordering::Relaxed);
    let Ok(mut ring) = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(2) else {
        tracing::error!("cannot fall back from FUSE io_uring: no ring; the mount may hang");
        return;
    };
    let mut short = [0u8; 8];
    let iov = [
        libc::iovec {
            iov_base: short.as_mut_ptr().cast(),
            iov_len: short.len(),
        },
        libc::iovec {
            iov_base: short.as_mut_ptr().cast(),
            iov_len: short.len(),
        },
    ];
    let sqe = cmd_sqe(dev, CMD_REGISTER, 0, 0, &iov);
    // SAFETY: the iovecs and buffers outlive the submission, which the kernel completes
    // (with an error) before `submit_and_wait` returns.
    unsafe {
        let _ = ring.submission().push(&sqe);
    }
    let _ = ring.submit_and_wait(1);
    tracing::warn!("FUSE io_uring set-up failed: the tree is served through /dev/fuse");
}

/// An `IORING_OP_URING_CMD` for `/dev/fuse`: `struct fuse_uring_cmd_req` in the command
/// area, the entry's two iovecs (headers, payload) in `addr`/`len`.
fn cmd_sqe(
    dev: &OwnedFd,
    op: u32,
    commit_id: u64,
    qid: u16,
    iov: &[libc::iovec; 2],
) -> squeue::Entry128 {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    cmd[16..18].copy_from_slice(&qid.to_ne_bytes());
    let sqe = opcode::UringCmd80::new(types::Fd(dev.as_raw_fd()), op)
        .cmd(cmd)
        .addr(Some(iov.as_ptr() as u64))
        .build();
    // The iovec count goes in the SQE's `len` (a u32 at byte 24), which the opcode
    // builder does not set.
    // SAFETY: `Entry128` is `repr(C)` over the 64-byte `io_uring_sqe` and 64 more bytes;
    // every bit pattern of it is a valid value.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&2u32.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// Pins the calling thread to `cpu` (best effort: the kernel queues by the caller's CPU,
/// and the point is to serve there).
fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; the calls only read and write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// One serving thread: registers an entry for queue `qid`, then answers requests until the
/// mount goes away.
fn serve(fs: &TreeFs, dev: &OwnedFd, qid: u16, owner_only: bool) {
    pin(usize::from(qid));
    let mut ring = match new_ring() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "creating a FUSE io_uring");
            give_up(fs, dev);
            return;
        }
    };
    let mut header = Box::new(Header {
        in_out: [0; 128],
        op_in: [0; 128],
        ent: [0; 32],
    });
    let mut payload = vec![0u8; PAYLOAD];
    let iov = [
        libc::iovec {
            iov_base: std::ptr::from_mut::<Header>(&mut header).cast(),
            iov_len: std::mem::size_of::<Header>(),
        },
        libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        },
    ];
    let owner = if owner_only {
        // SAFETY: geteuid has no preconditions.
        Some(unsafe { libc::geteuid() })
    } else {
        None
    };
    let mut sqe = cmd_sqe(dev, CMD_REGISTER, 0, qid, &iov);
    loop {
        // SAFETY: the header and payload buffers and the iovecs naming them live until
        // this function returns, and the kernel is done with an entry once the ring is
        // dropped (below) or the connection has ended.
        if unsafe { ring.submission().push(&sqe) }.is_err() {
            tracing::error!("FUSE io_uring submission queue full");
            break;
        }
        let cqe = loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::error!(error = %e, "waiting for a FUSE request over io_uring");
                    return;
                }
            }
            if let Some(c) = ring.completion().next() {
                break c;
            }
        };
        let res = cqe.result();
        if res < 0 {
            // ENOTCONN: the mount is gone (unmounted or aborted); the rest are errors.
            if res != -libc::ENOTCONN && res != -libc::ECANCELED {
                let e = std::io::Error::from_raw_os_error(-res);
                tracing::warn!(error = %e, qid, "FUSE io_uring entry ended");
            }
            return;
        }
        let commit_id = u64::from_ne_bytes(header.ent[8..16].try_into().unwrap_or_default());
        let in_len = (u32_at(&header.ent, 16) as usize).min(payload.len());
        let (unique, out) = handle(fs, &header, &mut payload, in_len, owner);
        let (len, error) = match out {
            Ok(n) => (n, 0i32),
            Err(e) => (0, -e.code()),
        };
        header.in_out[..16].fill(0);
        header.in_out[0..4].copy_from_slice(&((16 + len) as u32).to_ne_bytes());
        header.in_out[4..8].copy_from_slice(&error.to_ne_bytes());
        header.in_out[8..16].copy_from_slice(&unique.to_ne_bytes());
        header.ent[16..20].copy_from_slice(&(len as u32).to_ne_bytes());
        sqe = cmd_sqe(dev, CMD_COMMIT_AND_FETCH, commit_id, qid, &iov);
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_ne_bytes)
}

/// The NUL-terminated string at the start of `b`, and what follows it.
fn cstr(b: &[u8]) -> Result<(&[u8], &[u8]), Errno> {
    let n = b.iter().position(|&c| c == 0).ok_or(Errno::EINVAL)?;
    Ok((&b[..n], &b[n + 1..]))
}

/// Appends little records into a reply buffer.
struct Out<'a> {
    buf: &'a mut [u8],
    at: usize,
}

/// The type bits of a mode as `struct fuse_attr` carries them (regular when unknown, as
/// `file_type` reads them); `>> 12` gives the `DT_*` of a directory entry.
fn type_bits(mode: u32) -> u32 {
    match mode & libc::S_IFMT {
        t @ (libc::S_IFDIR
        | libc::S_IFLNK
        | libc::S_IFCHR
        | libc::S_IFBLK
        | libc::S_IFIFO
        | libc::S_IFSOCK) => t,
        _ => libc::S_IFREG,
    }
}

impl<'a> Out<'a> {
    fn new(buf: &'a mut [u8]) -> Out<'a> {
        Out { buf, at: 0 }
    }

    fn bytes(&mut self, b: &[u8]) -> Result<(), Errno> {
        let end = self.at + b.len();
        self.buf
            .get_mut(self.at..end)
            .ok_or(Errno::EIO)?
            .copy_from_slice(b);
        self.at = end;
        Ok(())
    }
    fn u32(&mut self, v: u32) -> Result<(), Errno> {
        self.bytes(&v.to_ne_bytes())
    }
    fn u64(&mut self, v: u64) -> Result<(), Errno> {
        self.bytes(&v.to_ne_bytes())
    }
    /// `struct fuse_attr` (88 bytes).
    fn attr(&mut self, ino: u64, i: &Inode) -> Result<(), Errno> {
        let a = super::attr(ino, i);
        let t = |t: &Ts| (t.sec as u64, t.nsec);
        let (at, mt, ct) = (t(&i.atime), t(&i.mtime), t(&i.ctime));
        self.u64(ino)?;
        self.u64(a.size)?;
        self.u64(a.blocks)?;
        self.u64(at.0)?;
        self.u64(mt.0)?;
        self.u64(ct.0)?;
        self.u32(at.1)?;
        self.u32(mt.1)?;
        self.u32(ct.1)?;
        self.u32(type_bits(i.mode) | u32::from(a.perm))?;
        self.u32(a.nlink)?;
        self.u32(a.uid)?;
        self.u32(a.gid)?;
        self.u32(a.rdev)?;
        self.u32(a.blksize)?;
        self.u32(0)
    }
    /// `struct fuse_entry_out` (128 bytes).
    fn entry(&mut self, ino: u64, generation: u64, i: &Inode) -> Result<(), Errno> {
        self.u64(ino)?;
        self.u64(generation)?;
        self.u64(TTL.as_secs())?;
        self.u64(TTL.as_secs())?;
        self.u32(0)?;
        self.u32(0)?;
        self.attr(ino, i)
    }
    /// `struct fuse_attr_out` (104 bytes).
    fn attr_out(&mut self, ino: u64, i: &Inode) -> Result<(), Errno> {
        self.u64(TTL.as_secs())?;
        self.u32(0)?;
        self.u32(0)?;
        self.attr(ino, i)
    }
    /// `struct fuse_open_out` (16 bytes).
    fn open(&mut self, flags: u32) -> Result<(), Errno> {
        self.u64(0)?;
        self.u32(flags)?;
        self.u32(0)
    }
    /// `struct fuse_dirent` and its name, padded to 8 bytes; false when it does not fit in
    /// `limit` bytes.
    fn dirent(&mut self, limit: usize, ino: u64, next: u64, kind: u32, name: &[u8]) -> bool {
        let len = (24 + name.len()).next_multiple_of(8);
        if self.at + len > limit.min(self.buf.len()) {
            return false;
        }
        let typ = type_bits(kind) >> 12;
        let start = self.at;
        let ok = self.u64(ino).is_ok()
            && self.u64(next).is_ok()
            && self.u32(name.len() as u32).is_ok()
            && self.u32(typ).is_ok()
            && self.bytes(name).is_ok();
        self.buf[self.at..start + len].fill(0);
        self.at = start + len;
        ok
    }
}

/// Answers one request: returns its `unique` and the reply's payload length or error.
/// The reply goes to the start of `payload` (which held the request's names and data).
fn handle(
    fs: &TreeFs,
    h: &Header,
    payload: &mut [u8],
    in_len: usize,
    owner: Option<u32>,
) -> (u64, Result<usize, Errno>) {
    let op = u32_at(&h.in_out, 4);
    let unique = u64_at(&h.in_out, 8);
    let node = u64_at(&h.in_out, 16);
    let caller = (u32_at(&h.in_out, 24), u32_at(&h.in_out, 28));
    // As fuser does for a mount without allow_other: requests from other users are
    // refused, except those the kernel sends on its own account.
    if let Some(owner) = owner {
        let kernel_own = matches!(
            op,
            DESTROY
                | READ
                | READDIR
                | READDIRPLUS
                | WRITE
                | FSYNC
                | FSYNCDIR
                | RELEASE
                | RELEASEDIR
        );
        if caller.0 != owner && !kernel_own {
            return (unique, Err(Errno::EACCES));
        }
    }
    (
        unique,
        dispatch(fs, op, node, caller, &h.op_in, payload, in_len),
    )
}

#[allow(clippy::too_many_lines)]
fn dispatch(
    fs: &TreeFs,
    op: u32,
    node: u64,
    caller: (u32, u32),
    arg: &[u8; 128],
    payload: &mut [u8],
    in_len: usize,
) -> Result<usize, Errno> {
    let core = &fs.core;
    let input = &payload[..in_len];
    let empty = |r: Result<(), Errno>| r.map(|()| 0);
    // The entry of a created or found node, written over the request.
    let entry = |payload: &mut [u8], r: Result<(u64, Inode), Errno>| {
        let (ino, i) = r?;
        let mut o = Out::new(payload);
        o.entry(ino, fs.entry_generation(ino, &i), &i)?;
        Ok(o.at)
    };
    match op {
        LOOKUP => {
            let r = fs.lookup_entry(node, cstr(input)?.0);
            entry(payload, r)
        }
        GETATTR => {
            let i = core.getattr(node)?;
            let mut o = Out::new(payload);
            o.attr_out(node, &i)?;
            Ok(o.at)
        }
        SETATTR => {
            let valid = u32_at(arg, 0);
            let has = |bit: u32| valid & bit != 0;
            let time = |set: u32, now: u32, sec: usize, nsec: usize| {
                has(set).then(|| {
                    (!has(now)).then(|| Ts {
                        sec: u64_at(arg, sec) as i64,
                        nsec: u32_at(arg, nsec),
                    })
                })
            };
            let a = SetAttr {
                mode: has(FATTR_MODE).then(|| u32_at(arg, 68)),
                uid: has(FATTR_UID).then(|| u32_at(arg, 76)),
                gid: has(FATTR_GID).then(|| u32_at(arg, 80)),
                size: has(FATTR_SIZE).then(|| u64_at(arg, 16)),
                atime: time(FATTR_ATIME, FATTR_ATIME_NOW, 32, 56),
                mtime: time(FATTR_MTIME, FATTR_MTIME_NOW, 40, 60),
                kill_setid: None,
            };
            let i = fs.set_attr(caller, node, a)?;
            let mut o = Out::new(payload);
            o.attr_out(node, &i)?;
            Ok(o.at)
        }
        READLINK => {
            let t = core.readlink(node)?;
            let mut o = Out::new(payload);
            o.bytes(&t)?;
            Ok(o.at)
        }
        SYMLINK => {
            let r = {
                let (name, rest) = cstr(input)?;
                let target = cstr(rest)?.0;
                fs.node(
                    caller,
                    node,
                    name,
                    libc::S_IFLNK | 0o777,
                    0,
                    0,
                    Some(target),
                )
            };
            entry(payload, r)
        }
        MKNOD => {
            let (mode, rdev, umask) = (u32_at(arg, 0), u32_at(arg, 4), u32_at(arg, 8));
            let r = fs.node(
                caller,
                node,
                cstr(input)?.0,
                mode,
                umask,
                u64::from(rdev),
                None,
            );
            entry(payload, r)
        }
        MKDIR => {
            let (mode, umask) = (u32_at(arg, 0), u32_at(arg, 4));
            let r = fs.node(
                caller,
                node,
                cstr(input)?.0,
                libc::S_IFDIR | mode,
                umask,
                0,
                None,
            );
            entry(payload, r)
        }
        UNLINK | RMDIR => empty(core.remove(node, cstr(input)?.0, op == RMDIR)),
        RENAME | RENAME2 => {
            let newdir = u64_at(arg, 0);
            let flags = if op == RENAME2 { u32_at(arg, 8) } else { 0 };
            let (old, rest) = cstr(input)?;
            let new = cstr(rest)?.0;
            empty(core.rename(node, old, newdir, new, flags))
        }
        LINK => {
            let ino = u64_at(arg, 0);
            let r = core.link(ino, node, cstr(input)?.0).map(|i| (ino, i));
            entry(payload, r)
        }
        OPEN | OPENDIR => {
            let flags = if op == OPEN {
                fs.open_file(node)?;
                OPEN_FLAGS.bits()
            } else {
                fs.open_dir(node)?;
                DIR_OPEN_FLAGS.bits()
            };
            let mut o = Out::new(payload);
            o.open(flags)?;
            Ok(o.at)
        }
        CREATE => {
            let (mode, umask) = (u32_at(arg, 4), u32_at(arg, 8));
            let (ino, i) = fs.node(caller, node, cstr(input)?.0, mode, umask, 0, None)?;
            let mut o = Out::new(payload);
            o.entry(ino, fs.entry_generation(ino, &i), &i)?;
            o.open(OPEN_FLAGS.bits())?;
            Ok(o.at)
        }
        READ => {
            let (offset, size) = (u64_at(arg, 8), u32_at(arg, 16) as usize);
            let end = size.min(payload.len());
            // Held to the tree volume's limits (docs/design/qos.md) on this ring's thread.
            core.vol
                .io()
                .throttle(strata_engine::qos::Op::Read, end as u64);
            core.read_slice(node, offset, &mut payload[..end])
        }
        WRITE => {
            let (offset, size) = (u64_at(arg, 8), u32_at(arg, 16) as usize);
            let kill = (u32_at(arg, 20) & WRITE_KILL_SUIDGID != 0).then_some(caller);
            let data = input.get(..size).ok_or(Errno::EINVAL)?;
            let n = fs.write_data(node, offset, data, kill)?;
            let mut o = Out::new(payload);
            o.u32(n)?;
            o.u32(0)?;
            Ok(o.at)
        }
        STATFS => {
            let (blocks, bfree, bavail, files, ffree) = fs.stat_fs();
            let mut o = Out::new(payload);
            for v in [blocks, bfree, bavail, files, ffree] {
                o.u64(v)?;
            }
            for v in [4096, 255, 4096, 0, 0, 0, 0, 0, 0, 0] {
                o.u32(v)?;
            }
            Ok(o.at)
        }
        // close(2) promises no durability; timestamps held in memory are written when the
        // last handle of a file goes (see `TreeFs::release`).
        RELEASE | FLUSH => empty(core.sync_times()),
        RELEASEDIR | ACCESS | DESTROY => Ok(0),
        FSYNC | FSYNCDIR => empty(core.fsync()),
        SETXATTR => {
            let (size, flags) = (u32_at(arg, 0) as usize, u32_at(arg, 4) as i32);
            let (name, rest) = cstr(input)?;
            let value = rest.get(..size).ok_or(Errno::EINVAL)?;
            empty(core.setxattr(node, name, Some(value), flags))
        }
        REMOVEXATTR => empty(core.setxattr(node, cstr(input)?.0, None, 0)),
        GETXATTR | LISTXATTR => {
            let size = u32_at(arg, 0);
            let v = if op == GETXATTR {
                core.getxattr(node, cstr(input)?.0)
            } else {
                core.listxattr(node)
            };
            let mut o = Out::new(payload);
            match xattr_out(v, size)? {
                XattrOut::Size(n) => {
                    o.u32(n)?;
                    o.u32(0)?;
                }
                XattrOut::Data(v) => o.bytes(&v)?,
            }
            Ok(o.at)
        }
        READDIR | READDIRPLUS => {
            let (offset, size) = (u64_at(arg, 8), u32_at(arg, 16) as usize);
            let plus = op == READDIRPLUS;
            let mut o = Out::new(payload);
            core.readdir(node, offset, plus, |e, i| {
                // Returns true when the reply is full.
                if !plus {
                    return !o.dirent(size, e.ino, e.next, e.kind, &e.name);
                }
                let Some((i, generation)) = i else {
                    return true;
                };
                let start = o.at;
                if start + 128 + (24 + e.name.len()).next_multiple_of(8) > size
                    || o.entry(e.ino, generation, i).is_err()
                    || !o.dirent(size, e.ino, e.next, e.kind, &e.name)
                {
                    o.at = start;
                    return true;
                }
                false
            })?;
            Ok(o.at)
        }
        FALLOCATE => {
            let (offset, len, mode) = (u64_at(arg, 8), u64_at(arg, 16), u32_at(arg, 24) as i32);
            empty(core.fallocate(node, offset, len, mode))
        }
        LSEEK => {
            let (offset, whence) = (u64_at(arg, 8) as i64, u32_at(arg, 16) as i32);
            let at = fs.seek(node, offset, whence)?;
            let mut o = Out::new(payload);
            o.u64(at)?;
            Ok(o.at)
        }
        _ => Err(Errno::ENOSYS),
    }
}
