//! io_uring engine: one ring per thread; a batch of several reads (or several syncs) is a
//! single submission, anything else runs as plain syscalls (see `worth_a_ring`).
//!
//! The ring lives in a thread-local, so threads never contend on it and `submit` needs no
//! lock. A batch larger than the ring is fed in chunks. Buffers stay owned by the `Op`s in
//! `submit`'s frame until their completions are reaped, which is what keeps the kernel's
//! pointers valid.

use super::{open_file, run_blocking, Done, IoEngine, IoFile, Op};
use io_uring::{opcode, types, IoUring};
use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const RING_DEPTH: u32 = 128;
/// Bound on consecutive failed `io_uring_enter` calls while completions are still owed.
const MAX_ENTER_RETRIES: u32 = 10_000;

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

#[derive(Debug, Default)]
pub struct UringEngine {
    next_id: AtomicU64,
}

impl UringEngine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks that the kernel lets this process create a ring and run a no-op on it.
    pub fn probe() -> io::Result<()> {
        let mut ring = IoUring::new(2)?;
        let nop = opcode::Nop::new().build().user_data(0);
        // SAFETY: a Nop references no memory.
        unsafe { ring.submission().push(&nop) }.map_err(|_| io::Error::other("ring full"))?;
        ring.submit_and_wait(1)?;
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| io::Error::other("no completion"))?;
        if cqe.result() < 0 {
            return Err(io::Error::from_raw_os_error(-cqe.result()));
        }
        Ok(())
    }
}

fn build_sqe(op: &mut Op<'_>, index: usize) -> Option<io_uring::squeue::Entry> {
    let fd = types::Fd(op.file().file().as_raw_fd());
    let sqe = match op {
        Op::Read { offset, buf, .. } => {
            let b = buf.bytes_mut();
            let len = u32::try_from(b.len()).ok()?;
            opcode::Read::new(fd, b.as_mut_ptr(), len)
                .offset(*offset)
                .build()
        }
        Op::ReadCached { offset, buf, .. } => {
            let b = buf.bytes_mut();
            let len = u32::try_from(b.len()).ok()?;
            opcode::Read::new(fd, b.as_mut_ptr(), len)
                .offset(*offset)
                .rw_flags(libc::RWF_NOWAIT)
                .build()
        }
        Op::Write { offset, buf, .. } => {
            let b = buf.bytes();
            let len = u32::try_from(b.len()).ok()?;
            opcode::Write::new(fd, b.as_ptr(), len)
                .offset(*offset)
                .build()
        }
        Op::Sync { .. } => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Op::Punch { offset, len, .. } => opcode::Fallocate::new(fd, *len)
            .offset(*offset)
            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .build(),
    };
    Some(sqe.user_data(index as u64))
}

/// Turns a completion into the op's result, finishing short transfers with plain syscalls
/// (except cached reads, whose short count is their answer).
fn finish(op: &mut Op<'_>, res: i32) -> io::Result<usize> {
    if res < 0 {
        if matches!(op, Op::ReadCached { .. })
            && matches!(-res, libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL)
        {
            return Ok(0);
        }
        return Err(io::Error::from_raw_os_error(-res));
    }
    let done = res as usize;
    match op {
        Op::Read { file, offset, buf } => {
            let b = buf.bytes_mut();
            if done < b.len() {
                file.file()
                    .read_exact_at(&mut b[done..], *offset + done as u64)?;
            }
            Ok(b.len())
        }
        Op::Write { file, offset, buf } => {
            let b = buf.bytes();
            if done < b.len() {
                file.file()
                    .write_all_at(&b[done..], *offset + done as u64)?;
            }
            Ok(b.len())
        }
        _ => Ok(done),
    }
}

fn run_on_ring(ring: &mut IoUring, ops: &mut [Op<'_>], results: &mut [Option<io::Result<usize>>]) {
    let mut next = 0;
    let mut inflight = 0usize;
    let mut retries = 0u32;
    while next < ops.len() || inflight > 0 {
        while next < ops.len() && inflight < RING_DEPTH as usize {
            let Some(sqe) = build_sqe(&mut ops[next], next) else {
                results[next] = Some(run_blocking(&mut ops[next]));
                next += 1;
                continue;
            };
            // SAFETY: the SQE points into `ops[next]`'s buffer (owned by the op, or borrowed
            // by it for the lifetime of the `ops` vector, which outlives this call), which
            // stays alive and unmoved (the slice is not touched except through `finish` after
            // its completion) until the completion with this user_data is reaped below; the
            // fd is owned by the op's `Arc<IoFile>`, alive for the same span.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                break;
            }
            inflight += 1;
            next += 1;
        }
        match ring.submit_and_wait(1) {
            Ok(_) => retries = 0,
            Err(e) => {
                retries += 1;
                if retries > MAX_ENTER_RETRIES {
                    // Completions are owed for buffers we own: returning would free memory the
                    // kernel may still write. Nothing safe is left to do.
                    tracing::error!(error = %e, "io_uring_enter keeps failing with IO in flight");
                    std::process::abort();
                }
                continue;
            }
        }
        for cqe in ring.completion() {
            let i = cqe.user_data() as usize;
            results[i] = Some(finish(&mut ops[i], cqe.result()));
            inflight -= 1;
        }
    }
}

/// Whether a batch goes through the ring. Reads that hit the page cache complete inline in
/// one submission, and syncs of several files run in parallel in the kernel's workers; but a
/// buffered write that cannot complete inline is handed to a kernel worker thread (a wakeup
/// and a context switch per write, measured at several times the cost of the `pwrite`), and a
/// lone operation gains nothing from the ring. So: two or more reads, or two or more syncs,
/// and nothing else.
fn worth_a_ring(ops: &[Op<'_>]) -> bool {
    let reads = ops
        .iter()
        .filter(|o| matches!(o, Op::Read { .. } | Op::ReadCached { .. }))
        .count();
    let syncs = ops.iter().filter(|o| matches!(o, Op::Sync { .. })).count();
    (reads >= 2 && reads == ops.len()) || (syncs >= 2 && syncs == ops.len())
}

impl IoEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<IoFile>> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(IoFile::new(open_file(path, create)?, id)))
    }

    fn submit<'a>(&self, mut ops: Vec<Op<'a>>) -> Vec<Done<'a>> {
        if !worth_a_ring(&ops) {
            return ops
                .into_iter()
                .map(|mut op| {
                    let result = run_blocking(&mut op);
                    Done { op, result }
                })
                .collect();
        }
        let mut results: Vec<Option<io::Result<usize>>> = (0..ops.len()).map(|_| None).collect();
        RING.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot = IoUring::new(RING_DEPTH).ok();
            }
            match slot.as_mut() {
                Some(ring) => run_on_ring(ring, &mut ops, &mut results),
                None => {
                    for (op, r) in ops.iter_mut().zip(results.iter_mut()) {
                        *r = Some(run_blocking(op));
                    }
                }
            }
        });
        ops.into_iter()
            .zip(results)
            .map(|(op, r)| Done {
                op,
                result: r.unwrap_or_else(|| Err(io::Error::other("operation never completed"))),
            })
            .collect()
    }
}
