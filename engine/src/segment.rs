//! Data segments: append-only files holding block records at 4 KiB page granularity.
//!
//! Writers take space from the active segment with one atomic add; records are never
//! overwritten in place, so a crash can never tear a block that a committed map points to.
//! Each record carries a reference count (how many persisted leaves point at it); when it
//! drops to zero the record's pages are queued for a hole punch after the next commit, and a
//! sealed segment with no live pages is deleted.

use crate::io::{IoEngine, IoFile, Op};
use crate::tree::Entry;
use crate::{Error, Result};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Allocation unit inside a segment.
pub const PAGE_SIZE: usize = 4096;
/// Dead pages (64 MiB) that make a busy store punch its sealed segments.
pub const PUNCH_BATCH_PAGES: u64 = 16 * 1024;

/// Dead space (256 MiB) a busy store keeps for reuse instead of punching it. New records go
/// there first: the pages are usually still in the page cache, and overwriting a cached page
/// costs one copy, while appending costs a fresh page (allocation, buffer heads, delayed
/// allocation) — about ten times more on the machines we measured.
pub const DEFAULT_REUSE_BYTES: u64 = 256 << 20;

/// How many of the most recently freed runs an allocation looks at.
const FREE_SEARCH: usize = 32;

#[derive(Debug)]
pub struct Segment {
    pub id: u32,
    pub file: Arc<IoFile>,
    capacity_pages: u32,
    next_page: AtomicU64,
    /// Reference count per record, indexed by the record's first page.
    refs: Box<[AtomicU32]>,
    live_pages: AtomicU64,
    /// Dead page ranges waiting for the segment to be sealed before they are punched.
    deferred: Mutex<Vec<(u32, u32)>>,
    /// Written since the last commit (needs an fdatasync).
    unsynced: AtomicBool,
    /// Pages handed out by [`Segments::allocate`] whose records are not installed yet: the
    /// segment is not deleted while any are.
    reserved: AtomicU64,
    /// Pages of records that died but have not been through [`Segments::reclaim`] yet, i.e.
    /// that the last durable map may still reference: the segment is not deleted while any
    /// are.
    pending_dead: AtomicU64,
}

impl Segment {
    fn new(id: u32, file: Arc<IoFile>, capacity_pages: u32, first_free: u64) -> Self {
        let refs = (0..capacity_pages).map(|_| AtomicU32::new(0)).collect();
        Segment {
            id,
            file,
            capacity_pages,
            next_page: AtomicU64::new(first_free),
            refs,
            live_pages: AtomicU64::new(0),
            deferred: Mutex::new(Vec::new()),
            unsynced: AtomicBool::new(false),
            reserved: AtomicU64::new(0),
            pending_dead: AtomicU64::new(0),
        }
    }

    pub fn live_pages(&self) -> u64 {
        self.live_pages.load(Ordering::Relaxed)
    }

    fn try_alloc(&self, pages: u32) -> Option<u32> {
        let start = self
            .next_page
            .fetch_add(u64::from(pages), Ordering::Relaxed);
        let end = start + u64::from(pages);
        (end <= u64::from(self.capacity_pages)).then_some(start as u32)
    }

    fn ref_slot(&self, page: u32) -> Option<&AtomicU32> {
        self.refs.get(page as usize)
    }
}

/// All segments of a store.
#[derive(Debug)]
pub struct Segments {
    dir: PathBuf,
    engine: Arc<dyn IoEngine>,
    capacity_pages: u32,
    all: RwLock<HashMap<u32, Arc<Segment>>>,
    active: RwLock<Arc<Segment>>,
    roll: Mutex<()>,
    next_id: AtomicU32,
    /// Pages in every segment's `deferred` list.
    deferred_pages: AtomicU64,
    /// Dead runs `(segment, first page, pages)` kept for reuse, oldest first; at most
    /// `free_cap` pages.
    free: Mutex<FreeRuns>,
    free_cap: u64,
    /// Readers hold it shared from map lookup to the end of their IO; [`Segments::reclaim`]
    /// takes it exclusively before dead pages become reusable, so no reader still holding an
    /// entry that died can read a page rewritten with other data.
    reuse_gate: RwLock<()>,
}

#[derive(Debug, Default)]
struct FreeRuns {
    runs: std::collections::VecDeque<(u32, u32, u32)>,
    pages: u64,
}

/// Pages reserved by [`Segments::allocate`]: the caller keeps it until the records written
/// there are installed in the map (or abandoned), so the segment is not deleted under them.
#[derive(Debug)]
pub struct Allocation {
    pub seg: Arc<Segment>,
    pub page: u32,
    pages: u32,
}

impl Drop for Allocation {
    fn drop(&mut self) {
        self.seg
            .reserved
            .fetch_sub(u64::from(self.pages), Ordering::AcqRel);
    }
}

pub fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("seg-{id:08}.dat"))
}

fn parse_segment_name(name: &str) -> Option<u32> {
    name.strip_prefix("seg-")?
        .strip_suffix(".dat")?
        .parse()
        .ok()
}

impl Segments {
    /// Opens every segment in `dir` and starts a fresh active segment numbered at least
    /// `next_id`.
    pub fn open(
        dir: &Path,
        engine: Arc<dyn IoEngine>,
        capacity_bytes: u64,
        reuse_bytes: u64,
        next_id: u32,
    ) -> Result<Self> {
        let capacity_pages = u32::try_from(capacity_bytes / PAGE_SIZE as u64)
            .map_err(|_| Error::InvalidArgument("segment size too large".into()))?
            .max(16);
        let mut all = HashMap::new();
        let mut max_id = 0;
        let listing = std::fs::read_dir(dir).map_err(|e| Error::io("listing data segments", e))?;
        for ent in listing {
            let ent = ent.map_err(|e| Error::io("listing data segments", e))?;
            let Some(id) = ent.file_name().to_str().and_then(parse_segment_name) else {
                continue;
            };
            let file = engine
                .open(&ent.path(), false)
                .map_err(|e| Error::io("opening segment", e))?;
            let len_pages = file
                .size_bytes()
                .map_err(|e| Error::io("sizing segment", e))?
                .div_ceil(PAGE_SIZE as u64);
            let cap = capacity_pages.max(u32::try_from(len_pages).unwrap_or(u32::MAX));
            // Old segments are sealed: nothing more is appended to them.
            all.insert(id, Arc::new(Segment::new(id, file, cap, u64::from(cap))));
            max_id = max_id.max(id);
        }
        let first = next_id.max(max_id + 1).max(1);
        let active = Self::create(dir, &engine, first, capacity_pages)?;
        all.insert(first, active.clone());
        Ok(Segments {
            dir: dir.to_path_buf(),
            engine,
            capacity_pages,
            all: RwLock::new(all),
            active: RwLock::new(active),
            roll: Mutex::new(()),
            next_id: AtomicU32::new(first + 1),
            deferred_pages: AtomicU64::new(0),
            free: Mutex::new(FreeRuns::default()),
            free_cap: reuse_bytes / PAGE_SIZE as u64,
            reuse_gate: RwLock::new(()),
        })
    }

    fn create(
        dir: &Path,
        engine: &Arc<dyn IoEngine>,
        id: u32,
        capacity_pages: u32,
    ) -> Result<Arc<Segment>> {
        let file = engine
            .open(&segment_path(dir, id), true)
            .map_err(|e| Error::io("creating segment", e))?;
        engine
            .sync_dir(dir)
            .map_err(|e| Error::io("syncing data directory", e))?;
        Ok(Arc::new(Segment::new(id, file, capacity_pages, 0)))
    }

    /// Next segment id to persist, so ids are never reused.
    pub fn next_id(&self) -> u32 {
        self.next_id.load(Ordering::Relaxed)
    }

    pub fn get(&self, id: u32) -> Option<Arc<Segment>> {
        self.all.read().get(&id).cloned()
    }

    /// Reserves `pages` contiguous pages for new records: from the most recently freed runs
    /// when one is large enough, else at the end of the active segment.
    pub fn allocate(&self, pages: u32) -> Result<Allocation> {
        if pages > self.capacity_pages {
            return Err(Error::InvalidArgument(
                "request larger than a data segment".into(),
            ));
        }
        if let Some(a) = self.allocate_free(pages) {
            return Ok(a);
        }
        loop {
            let seg = self.active.read().clone();
            // Reserved before the pages are taken, so a segment sealed meanwhile is not
            // deleted between the two.
            seg.reserved.fetch_add(u64::from(pages), Ordering::AcqRel);
            let mut a = Allocation {
                seg: seg.clone(),
                page: 0,
                pages,
            };
            if let Some(page) = seg.try_alloc(pages) {
                a.page = page;
                return Ok(a);
            }
            drop(a);
            let _g = self.roll.lock();
            if !Arc::ptr_eq(&seg, &self.active.read()) {
                continue;
            }
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let new = Self::create(&self.dir, &self.engine, id, self.capacity_pages)?;
            self.all.write().insert(id, new.clone());
            *self.active.write() = new;
        }
    }

    fn allocate_free(&self, pages: u32) -> Option<Allocation> {
        let mut free = self.free.lock();
        let n = free.runs.len();
        let i = (n.saturating_sub(FREE_SEARCH)..n)
            .rev()
            .find(|&i| free.runs[i].2 >= pages)?;
        let (id, start, len) = free.runs[i];
        let Some(seg) = self.get(id) else {
            // Cannot happen (a segment with free runs is not deleted); drop the run.
            free.runs.remove(i);
            free.pages -= u64::from(len);
            return None;
        };
        if len == pages {
            free.runs.remove(i);
        } else {
            free.runs[i] = (id, start + pages, len - pages);
        }
        free.pages -= u64::from(pages);
        seg.reserved.fetch_add(u64::from(pages), Ordering::AcqRel);
        Some(Allocation {
            seg,
            page: start,
            pages,
        })
    }

    /// Records that data was written to `seg`. Called after the write completes and before
    /// the map points at it, so a commit whose snapshot includes the mapping also syncs the
    /// data (marking at allocation could be cleared by a snapshot taken mid-write).
    pub fn mark_written(&self, seg: &Segment) {
        seg.unsynced.store(true, Ordering::Release);
    }

    /// Sync operations for the segments written since the last call.
    pub fn take_unsynced(&self) -> Vec<Op> {
        self.all
            .read()
            .values()
            .filter(|s| s.unsynced.swap(false, Ordering::AcqRel))
            .map(|s| Op::Sync {
                file: s.file.clone(),
            })
            .collect()
    }

    /// Counts one more reference to the record `e`.
    pub fn incref(&self, e: &Entry) {
        if let Some(seg) = self.get(e.segment) {
            if let Some(slot) = seg.ref_slot(e.page) {
                if slot.fetch_add(1, Ordering::Relaxed) == 0 {
                    seg.live_pages
                        .fetch_add(u64::from(e.pages()), Ordering::Relaxed);
                }
            }
        }
    }

    /// Notes that record `e` died (its last reference went, or it lost its compare-and-set
    /// and was never referenced): its segment is kept until the record is reclaimed.
    pub fn mark_dead(&self, e: &Entry) {
        if let Some(seg) = self.get(e.segment) {
            seg.pending_dead
                .fetch_add(u64::from(e.pages()), Ordering::AcqRel);
        }
    }

    /// Held by a reader from its map lookup to the end of its IO (see `reuse_gate`).
    pub fn read_guard(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.reuse_gate.read()
    }

    /// Drops one reference to `e`; true when it was the last one.
    pub fn decref(&self, e: &Entry) -> bool {
        let Some(seg) = self.get(e.segment) else {
            return false;
        };
        let Some(slot) = seg.ref_slot(e.page) else {
            return false;
        };
        let prev = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        if prev == Ok(1) {
            seg.live_pages
                .fetch_sub(u64::from(e.pages()), Ordering::Relaxed);
            return true;
        }
        false
    }

    pub fn refcount(&self, e: &Entry) -> u32 {
        self.get(e.segment)
            .and_then(|s| s.ref_slot(e.page).map(|r| r.load(Ordering::Relaxed)))
            .unwrap_or(0)
    }

    /// Queues dead records for punching, and punches when it is cheap to.
    ///
    /// A punch takes the file's inode lock and, on a filesystem mounted with `discard`,
    /// waits for the device: done eagerly, it stalls writers appending to the same file and
    /// queues ahead of the flushes that checkpoints and guest fsyncs wait for. So dead pages
    /// are punched in batches: everything when the store is `idle` (no write since the last
    /// look), else only sealed segments and only once [`PUNCH_BATCH_PAGES`] have piled up.
    ///
    /// Dead records first become free runs for reuse, up to the reuse cap; `retain: false`
    /// (an idle or closing store) sends every free run to punching.
    pub fn reclaim(&self, dead: &[Entry], retain: bool, idle: bool) -> Result<()> {
        // Dead records become free runs for reuse (in page order, so runs coalesce);
        // what exceeds the cap, and everything once the store is idle, goes to punching.
        let mut sorted: Vec<(u32, u32, u32)> = dead
            .iter()
            .filter(|e| self.get(e.segment).is_some())
            .map(|e| (e.segment, e.page, e.pages()))
            .collect();
        sorted.sort_unstable();
        let mut evicted = Vec::new();
        {
            // Every reader that could still hold one of these entries finishes first.
            drop(self.reuse_gate.write());
            let mut free = self.free.lock();
            for (id, start, len) in sorted {
                if let Some(seg) = self.get(id) {
                    let _ =
                        seg.pending_dead
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                                Some(v.saturating_sub(u64::from(len)))
                            });
                }
                free.pages += u64::from(len);
                match free.runs.back_mut() {
                    Some((bid, bs, bl)) if *bid == id && *bs + *bl == start => *bl += len,
                    _ => free.runs.push_back((id, start, len)),
                }
            }
            while free.pages > if retain { self.free_cap } else { 0 } {
                let Some(run) = free.runs.pop_front() else {
                    break;
                };
                free.pages -= u64::from(run.2);
                evicted.push(run);
            }
        }
        for (id, start, len) in evicted {
            if let Some(seg) = self.get(id) {
                seg.deferred.lock().push((start, len));
                self.deferred_pages
                    .fetch_add(u64::from(len), Ordering::Relaxed);
            }
        }
        if !idle && self.deferred_pages.load(Ordering::Relaxed) < PUNCH_BATCH_PAGES {
            return Ok(());
        }
        let active = self.active.read().id;
        let mut ops = Vec::new();
        for seg in self.all.read().values() {
            if seg.id == active && !idle {
                continue;
            }
            let mut ranges = std::mem::take(&mut *seg.deferred.lock());
            if ranges.is_empty() {
                continue;
            }
            let pages: u64 = ranges.iter().map(|r| u64::from(r.1)).sum();
            self.deferred_pages.fetch_sub(pages, Ordering::Relaxed);
            ranges.sort_unstable();
            for (start, len) in coalesce(&ranges) {
                ops.push(Op::Punch {
                    file: seg.file.clone(),
                    offset: u64::from(start) * PAGE_SIZE as u64,
                    len: u64::from(len) * PAGE_SIZE as u64,
                });
            }
        }
        for d in self.engine.submit(ops) {
            // A failed punch loses space, not data; the next open's sweep retries it.
            if let Err(e) = d.result {
                tracing::warn!(error = %e, "punching freed pages failed");
            }
        }
        self.delete_dead_segments()
    }

    fn delete_dead_segments(&self) -> Result<()> {
        let active = self.active.read().id;
        // Under the free-run lock, so no allocation takes pages of a segment being deleted.
        // A segment with free runs is kept: its pages are about to be written again.
        let free = self.free.lock();
        let with_runs: std::collections::HashSet<u32> = free.runs.iter().map(|r| r.0).collect();
        let dead: Vec<u32> = self
            .all
            .read()
            .values()
            .filter(|s| {
                s.id != active
                    && s.live_pages() == 0
                    && s.reserved.load(Ordering::Acquire) == 0
                    && s.pending_dead.load(Ordering::Acquire) == 0
                    && !with_runs.contains(&s.id)
            })
            .map(|s| s.id)
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        for id in &dead {
            self.all.write().remove(id);
        }
        drop(free);
        for id in &dead {
            self.engine
                .remove(&segment_path(&self.dir, *id))
                .map_err(|e| Error::io("removing empty segment", e))?;
        }
        self.engine
            .sync_dir(&self.dir)
            .map_err(|e| Error::io("syncing data directory", e))
    }

    /// After open: punches every page no record references (left by writes that never
    /// committed, or frees a crash interrupted) and deletes segments with nothing live.
    pub fn sweep(&self, live: &HashMap<u32, Vec<(u32, u32)>>) -> Result<u64> {
        let mut ops = Vec::new();
        let mut punched = 0u64;
        let active = self.active.read().id;
        for seg in self.all.read().values() {
            if seg.id == active {
                continue;
            }
            let mut ranges = live.get(&seg.id).cloned().unwrap_or_default();
            ranges.sort_unstable();
            let mut cursor = 0u32;
            for (start, len) in coalesce(&ranges)
                .into_iter()
                .chain([(seg.capacity_pages, 0)])
            {
                if start > cursor {
                    punched += u64::from(start - cursor);
                    ops.push(Op::Punch {
                        file: seg.file.clone(),
                        offset: u64::from(cursor) * PAGE_SIZE as u64,
                        len: u64::from(start - cursor) * PAGE_SIZE as u64,
                    });
                }
                cursor = cursor.max(start + len);
            }
        }
        for d in self.engine.submit(ops) {
            d.result
                .map_err(|e| Error::io("punching unreferenced pages", e))?;
        }
        self.delete_dead_segments()?;
        Ok(punched)
    }

    /// Live bytes and file count, for stats.
    pub fn usage(&self) -> (u64, usize) {
        let all = self.all.read();
        let live = all
            .values()
            .map(|s| s.live_pages() * PAGE_SIZE as u64)
            .sum();
        (live, all.len())
    }

    pub fn engine(&self) -> &Arc<dyn IoEngine> {
        &self.engine
    }
}

/// Merges sorted `(start, len)` page ranges that touch.
fn coalesce(sorted: &[(u32, u32)]) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    for &(s, l) in sorted {
        match out.last_mut() {
            Some((ps, pl)) if *ps + *pl >= s => *pl = (*pl).max(s + l - *ps),
            _ => out.push((s, l)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_segment_emptied_by_uncommitted_deaths_is_kept_until_they_are_reclaimed() {
        // Records die in memory before the commit that stops referencing them is durable;
        // until `reclaim` sees them, the last durable map may still point into the segment.
        let dir = tempfile::tempdir().unwrap();
        let engine: Arc<dyn IoEngine> = Arc::new(crate::io::SyncEngine::new());
        let segs = Segments::open(dir.path(), engine, 16 * PAGE_SIZE as u64, 0, 1).unwrap();
        let a = segs.allocate(16).unwrap();
        let first = a.seg.id;
        let e = Entry::new(first, a.page, PAGE_SIZE as u32, false, 0);
        segs.incref(&e);
        drop(a);
        // Fill the rest so the next allocation rolls to a new active segment.
        drop(segs.allocate(1).unwrap());
        assert!(segs.decref(&e));
        segs.mark_dead(&e);
        segs.reclaim(&[], false, true).unwrap();
        assert!(
            segs.get(first).is_some(),
            "deleted before its dead record was reclaimed"
        );
        segs.reclaim(&[e], false, true).unwrap();
        assert!(segs.get(first).is_none(), "empty and reclaimed: deleted");
    }

    #[test]
    fn coalesce_merges_touching_ranges() {
        assert_eq!(
            coalesce(&[(0, 2), (2, 1), (5, 1), (5, 3)]),
            vec![(0, 3), (5, 3)]
        );
        assert_eq!(coalesce(&[]), vec![]);
    }
}
