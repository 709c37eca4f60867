//! Defragmentation: rewriting a fragmented range of a live volume as one record.
//!
//! Random overwrites scatter a range's blocks over many records, and a sequential read of it
//! then needs one IO per piece. Two ways put such ranges back in one piece:
//!
//! * **After a read** ([`after_read`]): a whole-block read of a live volume that needed many
//!   IOs for few blocks hands a copy of what it read to a background thread, which stores it
//!   as one new record and installs it only if the range still maps to exactly what was read
//!   (a compare-and-set over the whole range, `volume::RangeGuard`). Ranges that are read
//!   sequentially become contiguous after the first read; nothing else is touched.
//! * **On request** ([`defragment`], `Store::defragment`): a pass over a volume's map that
//!   reads and rewrites every fragmented chunk the volume owns.
//!
//! Both only rewrite chunks of the volume's own history — its own records or its own
//! checkpoints': a range it shares with another volume's checkpoint (a fork reading its
//! golden image) is left alone, so forks keep sharing; so is a range made of local copies of
//! remote records that other volumes share (lazy forks of one remote golden,
//! `remote::Kept`). A rewrite of data one of its own
//! checkpoints shares is correct — the checkpoint keeps its records; only the live map
//! moves — it just stops sharing those pages (at most one more copy of the range). A rewrite is an ordinary write (new pages,
//! checksums, one journal group), never inside a checkpoint's critical section (it holds the
//! gate shared only while installing), and a crash at any point leaves the old or the new
//! copy of the same bytes. The background thread spends at most `defrag_bytes_per_sec`.

use crate::catalog::VolumeState;
use crate::inner::Inner;
use crate::map::{Piece, CHUNK_BLOCKS};
use crate::volume::{io_runs, RangeGuard, Writer};
use crate::Result;
use parking_lot::{Condvar, Mutex};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A range counts as fragmented when reading it takes at least this many IOs...
const MIN_RUNS: usize = 8;
/// ...averaging fewer blocks than this per IO.
const MAX_BLOCKS_PER_RUN: u64 = 64;
/// Bytes of copies waiting for the background thread; reads beyond it do not queue.
const QUEUE_BYTES: usize = 64 << 20;

struct Job {
    vol: Arc<VolumeState>,
    data: Vec<u8>,
    guard: RangeGuard,
}

/// Rewrites waiting for the background thread.
#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Bytes of copies in `jobs`.
    bytes: usize,
    /// (volume id, first block, blocks) of every job queued or running: a range read again
    /// before its rewrite is not queued twice (the second copy would only be skipped, and
    /// would take queue room from ranges not seen yet).
    ranges: HashSet<(u64, u64, u64)>,
}

/// The background defragmenter's queue, budget and counters.
#[derive(Default)]
pub(crate) struct Defrag {
    queue: Mutex<Queue>,
    cv: Condvar,
    /// Bytes per second the background thread may write; 0 turns read-triggered rewrites off.
    pub rate: AtomicU64,
    stop: Mutex<bool>,
    /// Ranges rewritten, bytes rewritten, ranges skipped (changed since read).
    pub rewritten: AtomicU64,
    pub bytes: AtomicU64,
    pub skipped: AtomicU64,
}

impl std::fmt::Debug for Defrag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Defrag")
            .field("rate", &self.rate.load(Ordering::Relaxed))
            .field("rewritten", &self.rewritten.load(Ordering::Relaxed))
            .finish()
    }
}

/// What a defragmentation pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DefragReport {
    /// Fragmented ranges rewritten as one record each.
    pub ranges: u64,
    pub bytes: u64,
    /// Fragmented ranges left as they were (written meanwhile, or shared with a checkpoint).
    pub skipped: u64,
}

fn fragmented(pieces: &[Piece], ppb: u32) -> bool {
    let runs = io_runs(pieces, ppb);
    let mapped: u64 = pieces
        .iter()
        .filter(|p| p.loc.is_some())
        .map(|p| p.blocks)
        .sum();
    runs >= MIN_RUNS && mapped < runs as u64 * MAX_BLOCKS_PER_RUN
}

/// Whether every chunk of the range belongs to the volume's own history: the live volume's
/// own record, or one of its own checkpoints' — not another volume's checkpoint it was
/// forked from (every fork of a golden image rewriting its copy would stop them sharing it).
fn own_history(inner: &Inner, vol: &VolumeState, first: u64, blocks: u64) -> bool {
    let cat = inner.catalog.lock();
    let m = vol.map.read();
    (first / CHUNK_BLOCKS..=(first + blocks - 1) / CHUNK_BLOCKS).all(|idx| {
        m.tree.chunk(idx).is_some_and(|c| {
            c.owner() == m.layer
                || cat
                    .frozen
                    .get(&c.owner())
                    .is_some_and(|f| f.volume == vol.id)
        })
    })
}

/// Whether the range's records are local copies of remote records that other volumes share
/// (lazy forks of one golden, see `remote::Kept`), every one of them referenced more than
/// once: a rewrite would only add a copy.
fn shared_copies(inner: &Inner, pieces: &[Piece], ppb: u32) -> bool {
    let mapped = || pieces.iter().filter_map(|p| p.loc.map(|l| (l, p.blocks)));
    inner.remote.kept.all_copies(mapped().map(|(l, _)| l))
        && mapped().all(|(l, n)| inner.segments.shared(l.segment, l.page, l.pages(n, ppb)))
}

/// Called after a live read of `buf` at `offset` that found `pieces`: queues a rewrite of a
/// fragmented whole-block range.
pub(crate) fn after_read(
    inner: &Inner,
    vol: &Arc<VolumeState>,
    offset: u64,
    buf: &[u8],
    pieces: Vec<Piece>,
    epoch: u64,
) {
    let bs = u64::from(vol.block_size);
    let d = &inner.defrag;
    if d.rate.load(Ordering::Relaxed) == 0
        || buf.is_empty()
        || !offset.is_multiple_of(bs)
        || !(buf.len() as u64).is_multiple_of(bs)
        || !fragmented(&pieces, vol.ppb())
    {
        return;
    }
    let (first, blocks) = (offset / bs, buf.len() as u64 / bs);
    if !own_history(inner, vol, first, blocks) || shared_copies(inner, &pieces, vol.ppb()) {
        return;
    }
    let mut q = d.queue.lock();
    if q.bytes + buf.len() > QUEUE_BYTES || !q.ranges.insert((vol.id, first, blocks)) {
        return;
    }
    q.bytes += buf.len();
    q.jobs.push_back(Job {
        vol: vol.clone(),
        data: buf.to_vec(),
        guard: RangeGuard {
            first,
            blocks,
            pieces,
            epoch,
        },
    });
    d.cv.notify_one();
}

/// Rewrites one job's range; counts what happened.
fn run_job(inner: &Inner, job: &mut Job) {
    let d = &inner.defrag;
    let vol = job.vol.clone();
    let w = Writer { inner, vol: &vol };
    let mut done = w.rewrite(&job.data, &job.guard);
    if matches!(done, Ok(false)) && reread(inner, job) {
        // Pages were handed back for reuse since the read (a commit's reclaim, say) but the
        // range maps as it did: read it again under a fresh guard and retry once.
        done = w.rewrite(&job.data, &job.guard);
    }
    match done {
        Ok(true) => {
            d.rewritten.fetch_add(1, Ordering::Relaxed);
            d.bytes.fetch_add(job.data.len() as u64, Ordering::Relaxed);
        }
        Ok(false) => {
            d.skipped.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            d.skipped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(volume = %job.vol.name, error = %e, "defragmenting rewrite not done");
        }
    }
}

/// Reads a job's range again when it still maps to what the job read (only the reuse epoch
/// moved on), refreshing its data and guard. False when the range changed, or the read
/// failed: the job is dropped.
fn reread(inner: &Inner, job: &mut Job) -> bool {
    let g = &job.guard;
    let same = job.vol.map.read().tree.lookup(g.first, g.blocks) == g.pieces;
    if !same {
        return false;
    }
    let first = g.first;
    match read_head(inner, &job.vol, first, &mut job.data) {
        Ok((pieces, epoch)) => {
            job.guard.pieces = pieces;
            job.guard.epoch = epoch;
            true
        }
        Err(_) => false,
    }
}

/// Reads `data.len()` bytes of the volume's head from block `first`: the pieces read and the
/// reuse epoch they were read at (what a [`RangeGuard`] holds).
fn read_head(
    inner: &Inner,
    vol: &VolumeState,
    first: u64,
    data: &mut [u8],
) -> Result<(Vec<Piece>, u64)> {
    crate::volume::read(
        inner,
        &crate::volume::MapSource::Head(vol),
        &vol.geometry(),
        first * u64::from(vol.block_size),
        data,
    )
}

/// The background thread: takes queued jobs, paces them to the byte budget, rewrites.
pub(crate) fn run_thread(inner: std::sync::Weak<Inner>) {
    let mut window = Instant::now();
    let mut spent = 0u64;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let mut job = {
            let d = &strong.defrag;
            let mut q = d.queue.lock();
            loop {
                if *d.stop.lock() {
                    return;
                }
                if let Some(j) = q.jobs.pop_front() {
                    q.bytes -= j.data.len();
                    break j;
                }
                d.cv.wait_for(&mut q, Duration::from_millis(200));
            }
        };
        let rate = strong.defrag.rate.load(Ordering::Relaxed).max(1);
        // At most `rate` bytes per second, measured over one-second windows.
        if window.elapsed() >= Duration::from_secs(1) {
            window = Instant::now();
            spent = 0;
        }
        if spent >= rate {
            std::thread::sleep(Duration::from_secs(1).saturating_sub(window.elapsed()));
            window = Instant::now();
            spent = 0;
        }
        if strong.check_poisoned().is_ok() {
            run_job(&strong, &mut job);
        }
        spent += job.data.len() as u64;
        strong
            .defrag
            .queue
            .lock()
            .ranges
            .remove(&(job.vol.id, job.guard.first, job.guard.blocks));
    }
}

impl Defrag {
    /// Stops the background thread (at its next look at the queue).
    pub fn stop(&self) {
        *self.stop.lock() = true;
        self.cv.notify_all();
    }

    /// Whether read-triggered rewrites are waiting or running.
    pub fn pending(&self) -> bool {
        !self.queue.lock().ranges.is_empty()
    }
}

/// Rewrites every fragmented chunk of `vol`'s own history (see [`own_history`]), reading
/// each through the normal read path; stops after about `max_bytes`.
pub(crate) fn defragment(
    inner: &Inner,
    vol: &Arc<VolumeState>,
    max_bytes: u64,
) -> Result<DefragReport> {
    crate::load::ensure_loaded(inner, vol)?;
    let mut report = DefragReport::default();
    let bs = u64::from(vol.block_size);
    let ppb = vol.ppb();
    let chunks: Vec<u64> = {
        let m = vol.map.read();
        m.tree
            .chunks()
            .into_iter()
            .filter(|(_, c)| !c.is_empty())
            .map(|(idx, _)| idx)
            .collect()
    };
    for idx in chunks {
        if report.bytes >= max_bytes {
            break;
        }
        let first = idx * CHUNK_BLOCKS;
        let blocks = CHUNK_BLOCKS.min(vol.blocks().saturating_sub(first));
        if blocks == 0 {
            continue;
        }
        let pieces = vol.map.read().tree.lookup(first, blocks);
        if !fragmented(&pieces, ppb) {
            continue;
        }
        if !own_history(inner, vol, first, blocks) || shared_copies(inner, &pieces, ppb) {
            report.skipped += 1;
            continue;
        }
        let mut data = vec![0u8; (blocks * bs) as usize];
        let (read, epoch) = read_head(inner, vol, first, &mut data)?;
        let mapped: u64 = read
            .iter()
            .filter(|p| p.loc.is_some())
            .map(|p| p.blocks)
            .sum();
        let guard = RangeGuard {
            first,
            blocks,
            pieces: read,
            epoch,
        };
        let w = Writer { inner, vol };
        if w.rewrite(&data, &guard)? {
            report.ranges += 1;
            report.bytes += mapped * bs;
        } else {
            report.skipped += 1;
        }
    }
    Ok(report)
}
