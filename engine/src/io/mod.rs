//! The IO-engine seam: every byte of block data and journal goes through an [`IoEngine`].
//!
//! Operations carry their buffers and hand them back with the result — the ownership model
//! io_uring needs, since the kernel reads and writes the buffer after `submit` returns to the
//! ring. A buffer is either owned by the operation or borrowed from the caller for the
//! duration of [`IoEngine::submit`] (which returns only once every operation completed), so
//! reads can land straight in the caller's memory and writes can go straight from it. A batch
//! is submitted at once and completes as a whole; engines may run its operations in any order
//! and concurrently, so a batch never holds two operations that depend on each other.
//!
//! * [`SyncEngine`] (`engine_sync.rs`): plain `pread`/`pwrite`, one syscall per operation.
//! * [`UringEngine`] (`engine_uring.rs`): one io_uring per thread, a batch is one submission.
//! * [`FaultEngine`] (`engine_fault.rs`): for tests; tracks what is durable and simulates
//!   power loss and IO errors.

mod engine_fault;
mod engine_sync;
mod engine_uring;

pub use engine_fault::{CrashReport, FaultEngine, FaultPlan};
pub use engine_sync::SyncEngine;
pub use engine_uring::UringEngine;

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// A file opened through an engine.
#[derive(Debug)]
pub struct IoFile {
    file: File,
    id: u64,
}

impl IoFile {
    pub fn new(file: File, id: u64) -> Self {
        Self { file, id }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Engine-assigned identity (used by the fault engine to track durability).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    /// Tells the kernel not to read ahead: pages of this file enter the page cache only
    /// through reads and writes of the pages themselves (see `volume.rs` on trusted reads).
    pub fn no_readahead(&self) {
        self.advise(0, 0, libc::POSIX_FADV_RANDOM);
    }

    /// Drops clean cached pages of a byte range, so the next read comes from the device.
    pub fn evict(&self, offset: u64, len: u64) {
        self.advise(offset, len, libc::POSIX_FADV_DONTNEED);
    }

    fn advise(&self, offset: u64, len: u64, advice: libc::c_int) {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: posix_fadvise takes a valid open fd (borrowed from `file` for the call) and
        // plain integers; it touches no memory of ours. It is advice: failure changes nothing
        // we rely on for correctness beyond what callers handle.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), off, len, advice) };
    }
}

/// A buffer an operation reads into.
#[derive(Debug)]
pub enum Buf<'a> {
    Owned(Vec<u8>),
    /// The caller's memory, for the duration of the submission.
    Slice(&'a mut [u8]),
}

impl Buf<'_> {
    pub fn len(&self) -> usize {
        match self {
            Buf::Owned(v) => v.len(),
            Buf::Slice(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Buf::Owned(v) => v,
            Buf::Slice(s) => s,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Buf::Owned(v) => v,
            Buf::Slice(s) => s,
        }
    }
}

/// Bytes an operation writes.
#[derive(Debug)]
pub enum Data<'a> {
    Owned(Vec<u8>),
    /// The caller's memory, for the duration of the submission.
    Slice(&'a [u8]),
}

impl Data<'_> {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Data::Owned(v) => v,
            Data::Slice(s) => s,
        }
    }
}

/// One IO operation with its buffer.
#[derive(Debug)]
pub enum Op<'a> {
    /// Fill `buf` from `offset`. Reading past the end of the file is an error.
    Read {
        file: Arc<IoFile>,
        offset: u64,
        buf: Buf<'a>,
    },
    /// Read what the page cache already holds, without waiting for the device
    /// (`RWF_NOWAIT`): fills a prefix of `buf` — all of it, part, or nothing — and completes
    /// with the number of bytes read.
    ReadCached {
        file: Arc<IoFile>,
        offset: u64,
        buf: Buf<'a>,
    },
    /// Write all of `buf` at `offset`.
    Write {
        file: Arc<IoFile>,
        offset: u64,
        buf: Data<'a>,
    },
    /// `fdatasync`.
    Sync { file: Arc<IoFile> },
    /// Deallocate a byte range (`FALLOC_FL_PUNCH_HOLE`); it reads as zeros afterwards.
    Punch {
        file: Arc<IoFile>,
        offset: u64,
        len: u64,
    },
}

impl<'a> Op<'a> {
    pub fn file(&self) -> &Arc<IoFile> {
        match self {
            Op::Read { file, .. }
            | Op::ReadCached { file, .. }
            | Op::Write { file, .. }
            | Op::Sync { file }
            | Op::Punch { file, .. } => file,
        }
    }

    /// An owned read buffer back (empty for everything else).
    pub fn into_buf(self) -> Vec<u8> {
        match self {
            Op::Read {
                buf: Buf::Owned(v), ..
            }
            | Op::ReadCached {
                buf: Buf::Owned(v), ..
            }
            | Op::Write {
                buf: Data::Owned(v),
                ..
            } => v,
            _ => Vec::new(),
        }
    }

    /// A read of `len` bytes at `offset` into a new owned buffer.
    pub fn read(file: &Arc<IoFile>, offset: u64, len: usize) -> Op<'a> {
        Op::Read {
            file: file.clone(),
            offset,
            buf: Buf::Owned(take_buf(len)),
        }
    }
}

/// A completed operation: the operation (with its buffer) and its outcome — bytes
/// transferred for reads and writes (always the whole buffer except for
/// [`Op::ReadCached`]), 0 otherwise.
#[derive(Debug)]
pub struct Done<'a> {
    pub op: Op<'a>,
    pub result: io::Result<usize>,
}

/// Executes batches of file operations.
pub trait IoEngine: Send + Sync + fmt::Debug {
    /// Short name for logs ("io_uring", "sync", "fault").
    fn name(&self) -> &'static str;

    /// Opens (and with `create`, creates) a file for engine IO.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<IoFile>>;

    /// Removes a file.
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    /// Makes directory entries (file creation and removal) in `dir` durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }

    /// Starts writing back the file's dirty pages without waiting for them
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): no durability promise, only less left
    /// for the next `fdatasync` to do.
    fn start_writeback(&self, file: &IoFile) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor `file` keeps open; no memory is passed.
        let r = unsafe {
            libc::sync_file_range(file.file().as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Runs a batch; results come back in submission order. Returns only once every
    /// operation has completed, so borrowed buffers are free again.
    fn submit<'a>(&self, ops: Vec<Op<'a>>) -> Vec<Done<'a>>;

    /// Runs one operation.
    fn run<'a>(&self, op: Op<'a>) -> Done<'a> {
        let mut done = self.submit(vec![op]);
        done.pop().unwrap_or_else(|| Done {
            op: Op::Sync {
                file: Arc::new(IoFile::new(dummy_file(), 0)),
            },
            result: Err(io::Error::other("engine returned no completion")),
        })
    }
}

fn dummy_file() -> File {
    // Only reached if an engine breaks its contract; /dev/null always opens on Linux.
    File::open("/dev/null").unwrap_or_else(|_| std::process::abort())
}

/// `preadv2(RWF_NOWAIT)`: bytes read from the page cache (0 when none are cached).
pub(crate) fn read_cached(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let off = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, which is valid for writes of its length and outlives the
    // call; the fd is borrowed from `file` for the call.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if n >= 0 {
        return Ok(n as usize);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // Not cached, or a kernel or filesystem without RWF_NOWAIT for buffered reads.
        Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => Ok(0),
        _ => Err(e),
    }
}

/// Executes one operation with plain syscalls; shared by the sync engine and fallbacks.
pub(crate) fn run_blocking(op: &mut Op<'_>) -> io::Result<usize> {
    match op {
        Op::Read { file, offset, buf } => {
            let b = buf.bytes_mut();
            file.file.read_exact_at(b, *offset).map(|_| b.len())
        }
        Op::ReadCached { file, offset, buf } => read_cached(&file.file, *offset, buf.bytes_mut()),
        Op::Write { file, offset, buf } => {
            let b = buf.bytes();
            file.file.write_all_at(b, *offset).map(|_| b.len())
        }
        Op::Sync { file } => file.file.sync_data().map(|_| 0),
        Op::Punch { file, offset, len } => punch_hole(&file.file, *offset, *len).map(|_| 0),
    }
}

pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate takes a valid open fd (borrowed from `file` for the call) and plain
    // integers; it touches no memory of ours.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Picks the engine for a store: io_uring when the kernel offers it, else plain syscalls.
pub fn default_engine() -> Arc<dyn IoEngine> {
    match UringEngine::probe() {
        Ok(()) => Arc::new(UringEngine::new()),
        Err(e) => {
            tracing::warn!(error = %e, "io_uring unavailable, using pread/pwrite");
            Arc::new(SyncEngine::new())
        }
    }
}

/// Buffers kept per thread for reuse: a fresh multi-megabyte `Vec` is a fresh `mmap`, and
/// the page faults of first touching it cost more than the IO it carries.
const POOL_BUFFERS: usize = 8;
const POOL_MAX_BYTES: usize = 16 << 20;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn pooled(len: usize) -> Option<Vec<u8>> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        // The smallest buffer that fits, so small requests do not take the big buffers.
        let i = (0..p.len())
            .filter(|&i| p[i].capacity() >= len)
            .min_by_key(|&i| p[i].capacity())?;
        Some(p.swap_remove(i))
    })
}

/// A buffer of `len` bytes to read into, reusing one returned with [`give_buf`] when
/// possible. Its content is unspecified (a reused buffer keeps old bytes): every read fills
/// it completely or fails.
pub fn take_buf(len: usize) -> Vec<u8> {
    match pooled(len) {
        Some(mut b) => {
            // Only bytes past the old length need initialising; shrinking costs nothing.
            b.resize(len, 0);
            b
        }
        None => vec![0; len],
    }
}

/// An empty buffer with room for `len` bytes, reusing a pooled one when possible.
pub fn take_empty_buf(len: usize) -> Vec<u8> {
    match pooled(len) {
        Some(mut b) => {
            b.clear();
            b
        }
        None => Vec::with_capacity(len),
    }
}

/// Returns a buffer to this thread's pool.
pub fn give_buf(buf: Vec<u8>) {
    if buf.capacity() == 0 || buf.capacity() > POOL_MAX_BYTES {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_BUFFERS {
            p.push(buf);
        }
    });
}

pub(crate) fn open_file(path: &Path, create: bool) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
}
