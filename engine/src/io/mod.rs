//! The IO-engine seam: every byte of block data and journal goes through an [`IoEngine`].
//!
//! Operations take owned buffers and hand them back with their result — the ownership model
//! io_uring needs, since the kernel reads and writes the buffer after `submit` returns to the
//! ring. A batch is submitted at once and completes as a whole; engines may run its operations
//! in any order and concurrently, so a batch never holds two operations that depend on each
//! other.
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
}

/// One IO operation with its buffer.
#[derive(Debug)]
pub enum Op {
    /// Fill `buf` from `offset`. Reading past the end of the file is an error.
    Read {
        file: Arc<IoFile>,
        offset: u64,
        buf: Vec<u8>,
    },
    /// Write all of `buf` at `offset`.
    Write {
        file: Arc<IoFile>,
        offset: u64,
        buf: Vec<u8>,
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

impl Op {
    pub fn file(&self) -> &Arc<IoFile> {
        match self {
            Op::Read { file, .. } | Op::Write { file, .. } | Op::Sync { file } => file,
            Op::Punch { file, .. } => file,
        }
    }

    /// The buffer, for reads and writes.
    pub fn into_buf(self) -> Vec<u8> {
        match self {
            Op::Read { buf, .. } | Op::Write { buf, .. } => buf,
            Op::Sync { .. } | Op::Punch { .. } => Vec::new(),
        }
    }
}

/// A completed operation: the operation (with its buffer) and its outcome.
#[derive(Debug)]
pub struct Done {
    pub op: Op,
    pub result: io::Result<()>,
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

    /// Runs a batch; results come back in submission order.
    fn submit(&self, ops: Vec<Op>) -> Vec<Done>;

    /// Runs one operation.
    fn run(&self, op: Op) -> Done {
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

/// Executes one operation with plain syscalls; shared by the sync engine and fallbacks.
pub(crate) fn run_blocking(op: &mut Op) -> io::Result<()> {
    match op {
        Op::Read { file, offset, buf } => file.file.read_exact_at(buf, *offset),
        Op::Write { file, offset, buf } => file.file.write_all_at(buf, *offset),
        Op::Sync { file } => file.file.sync_data(),
        Op::Punch { file, offset, len } => punch_hole(&file.file, *offset, *len),
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
const POOL_MAX_BYTES: usize = 8 << 20;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn pooled_empty(len: usize) -> Option<Vec<u8>> {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        // The smallest buffer that fits, so small requests do not take the big buffers.
        let i = (0..p.len())
            .filter(|&i| p[i].capacity() >= len)
            .min_by_key(|&i| p[i].capacity())?;
        let mut b = p.swap_remove(i);
        b.clear();
        Some(b)
    })
}

/// A buffer of `len` bytes to read into, reusing one returned with [`give_buf`] when
/// possible. Its content is unspecified (a reused buffer keeps old bytes): every read fills
/// it completely or fails.
pub fn take_buf(len: usize) -> Vec<u8> {
    match POOL.with(|p| {
        let mut p = p.borrow_mut();
        let i = (0..p.len())
            .filter(|&i| p[i].capacity() >= len)
            .min_by_key(|&i| p[i].capacity())?;
        Some(p.swap_remove(i))
    }) {
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
    pooled_empty(len).unwrap_or_else(|| Vec::with_capacity(len))
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
