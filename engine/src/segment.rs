//! Data segments: files of 4 KiB pages holding records, each page checked by a crc32 in the
//! segment's own checksum table.
//!
//! Layout (format 2): page 0 is a header (id, capacity, table size), pages `1..1+T` the table
//! (the big-endian crc32 of page `p` at byte `4p`), then data pages. Writers take space from
//! the active segment with one atomic add, or from runs freed before the last commit; a live
//! page is never overwritten, so a crash can never tear a page that a committed map points
//! to. Segments written by format 1 have no header and no table; their records carry their
//! crc in the map (see `upgrade.rs`).
//!
//! Every page has a reference count (`refmap.rs`): how many extents of layers' own chunks
//! cover it. When it drops to zero the page run is dead; after the next commit it is reused or
//! punched, and a sealed segment with no live page is deleted.

use crate::codec::SegmentHeader;
use crate::io::{IoEngine, IoFile, Op};
use crate::map::PAGE_SIZE;
use crate::refmap::{coalesce_ranges, CountRuns, RefMap};
use crate::{Error, Result};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Smallest hole (64 KiB) punched unless the store has been idle for long or closes: a punch
/// takes the file's inode lock and, on a filesystem mounted with `discard`, waits for the
/// device, which stalls writers to that file for little space when the hole is one page.
/// Smaller dead runs wait (and a segment whose pages all die is deleted whole).
const PUNCH_MIN_PAGES: u32 = 16;
/// Dead pages waiting to be punched (4 GiB) beyond which a busy store punches too.
pub const BUSY_PUNCH_PAGES: u64 = 1 << 20;

/// What a [`Segments::reclaim`] call may punch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Punch {
    /// Nothing: dead runs become free runs (up to the reuse cap) or wait.
    No,
    /// Dead ranges of at least 64 KiB, in sealed segments (and the active one with
    /// `active`), for at most `budget`.
    Large {
        active: bool,
        budget: Option<std::time::Duration>,
    },
    /// Everything, keeping no free runs, for at most `budget`.
    All { budget: Option<std::time::Duration> },
}

/// Dead space (1 GiB) a store keeps for reuse instead of punching it. New records go there
/// first: the pages are usually still in the page cache and their blocks allocated, and
/// overwriting a cached page costs one copy, while appending costs a fresh page (allocation,
/// buffer heads, delayed allocation, a new block at writeback) — several times more on the
/// machines we measured (engine-bench seq, docs/BENCHMARKS.md). Kept until the store has
/// been idle for a while, then punched.
pub const DEFAULT_REUSE_BYTES: u64 = 1 << 30;

/// How many of the most recently freed runs an allocation looks at.
const FREE_SEARCH: usize = 32;

/// A run of pages in one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PageRun {
    pub segment: u32,
    pub page: u32,
    pub pages: u32,
}

#[derive(Debug)]
struct Refs {
    map: RefMap,
    /// The base counts (what the committed maps reference) are still being added: counts
    /// are deltas, and nothing is reported dead.
    counting: bool,
}

#[derive(Debug)]
pub struct Segment {
    pub id: u32,
    pub file: Arc<IoFile>,
    /// `None` for a format-1 segment (or one whose header never reached the disk): no
    /// checksum table, never appended to.
    header: Option<SegmentHeader>,
    capacity_pages: u32,
    next_page: AtomicU64,
    refs: Mutex<Refs>,
    live_pages: AtomicU64,
    /// Dead page ranges waiting for the segment to be sealed before they are punched.
    deferred: Mutex<Vec<(u32, u32)>>,
    /// Written since the last commit (needs an fdatasync).
    unsynced: AtomicBool,
    /// Pages handed out by [`Segments::allocate`] whose records are not installed yet: the
    /// segment is not deleted while any are.
    reserved: AtomicU64,
    /// Pages that died but have not been through [`Segments::reclaim`] yet, i.e. that the
    /// last durable map may still reference: the segment is not deleted while any are.
    pending_dead: AtomicU64,
    /// Pages of this segment in the free-run list (changed under its lock).
    free_pages: AtomicU64,
    /// Written since writeback was last started on it (see [`Segments::start_writeback`]).
    unkicked: AtomicBool,
    /// Reads of this segment in flight that fetched pages from the device and have not
    /// verified them yet (see `volume.rs`: cached reads are trusted unless one is).
    verifying: AtomicU32,
    /// Page ranges allocated since the last commit snapshot (start → pages): records there
    /// are in no durable map, so when they die their pages can be reused at once.
    fresh: Mutex<std::collections::BTreeMap<u32, u32>>,
    /// Bumped before pages of this segment are handed out again from free runs: a location
    /// remembered together with the value it had then (see [`Segments::pin_live`]) still
    /// holds the same record while the value has not moved.
    reuse_gen: AtomicU64,
}

impl Segment {
    fn new(
        id: u32,
        file: Arc<IoFile>,
        header: Option<SegmentHeader>,
        cap: u32,
        next: u64,
        counting: bool,
    ) -> Self {
        Segment {
            id,
            file,
            header,
            capacity_pages: cap,
            next_page: AtomicU64::new(next),
            refs: Mutex::new(Refs {
                map: RefMap::new(cap),
                counting,
            }),
            live_pages: AtomicU64::new(0),
            deferred: Mutex::new(Vec::new()),
            unsynced: AtomicBool::new(false),
            reserved: AtomicU64::new(0),
            pending_dead: AtomicU64::new(0),
            free_pages: AtomicU64::new(0),
            unkicked: AtomicBool::new(false),
            verifying: AtomicU32::new(0),
            fresh: Mutex::new(Default::default()),
            reuse_gen: AtomicU64::new(0),
        }
    }

    pub fn live_pages(&self) -> u64 {
        self.live_pages.load(Ordering::Relaxed)
    }

    /// Whether pages of this segment are checked against a checksum table (format 2).
    pub fn has_table(&self) -> bool {
        self.header.is_some()
    }

    /// First page records may use.
    pub fn data_start(&self) -> u32 {
        self.header.map_or(0, |h| h.data_start())
    }

    /// Byte offset of page `page`'s checksum in the table.
    pub fn table_offset(page: u32) -> u64 {
        PAGE_SIZE as u64 + 4 * u64::from(page)
    }

    /// Whether the page range lies in this segment's data area.
    pub fn holds(&self, page: u32, pages: u32) -> bool {
        page >= self.data_start()
            && u64::from(page) + u64::from(pages) <= u64::from(self.capacity_pages)
    }

    fn try_alloc(&self, pages: u32) -> Option<u32> {
        let start = self
            .next_page
            .fetch_add(u64::from(pages), Ordering::Relaxed);
        let end = start + u64::from(pages);
        (end <= u64::from(self.capacity_pages)).then_some(start as u32)
    }

    /// A read of this segment that will verify what it fetched from the device starts; the
    /// guard ends it.
    pub fn verifying(&self) -> VerifyGuard<'_> {
        self.verifying.fetch_add(1, Ordering::SeqCst);
        VerifyGuard(self)
    }

    /// True while any read of this segment has unverified pages in the page cache.
    pub fn unverified_reads(&self) -> bool {
        self.verifying.load(Ordering::SeqCst) > 0
    }

    fn note_fresh(&self, page: u32, pages: u32) {
        let mut f = self.fresh.lock();
        if let Some((&s, l)) = f.range_mut(..=page).next_back() {
            if page + pages <= s + *l {
                // Reused pages inside a range already fresh.
                return;
            }
            if page <= s + *l {
                *l = page + pages - s;
                return;
            }
        }
        f.insert(page, pages);
    }

    /// Whether every page of the range was allocated since the last commit snapshot.
    fn is_fresh(&self, page: u32, pages: u32) -> bool {
        let f = self.fresh.lock();
        f.range(..=page)
            .next_back()
            .is_some_and(|(&s, &l)| page + pages <= s + l)
    }

    /// Pages of `[page, page + pages)` counted exactly `count` times.
    pub fn pages_with_count(&self, page: u32, pages: u32, count: i32) -> u32 {
        self.refs.lock().map.pages_with_count(page, pages, count)
    }
}

/// See [`Segment::verifying`].
#[derive(Debug)]
pub struct VerifyGuard<'a>(&'a Segment);

impl Drop for VerifyGuard<'_> {
    fn drop(&mut self) {
        self.0.verifying.fetch_sub(1, Ordering::SeqCst);
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
    /// Dead runs kept for reuse, oldest first; at most `free_cap` pages.
    free: Mutex<FreeRuns>,
    free_cap: u64,
    /// Readers hold it shared from map lookup to the end of their IO; [`Segments::reclaim`]
    /// takes it exclusively before dead pages become reusable, so no reader still holding a
    /// location that died can read a page rewritten with other data.
    reuse_gate: RwLock<()>,
    /// Bumped each time dead runs are handed back for reuse (after `reuse_gate`'s barrier).
    /// A compare-and-set that outlives the reuse guard (a queued defragmenting rewrite)
    /// compares it: the same location can hold other bytes once its pages were reused.
    reuse_epoch: AtomicU64,
    /// Reference counting is on (off while an open replays its journal: the counts are built
    /// from what that open commits).
    counting_on: AtomicBool,
    /// Pages handed out from free runs, and appended, since open.
    reused: AtomicU64,
    appended: AtomicU64,
    /// Whether segments may grow (see [`crate::space`]).
    reserve: std::sync::OnceLock<Arc<crate::space::Reserve>>,
}

#[derive(Debug, Default)]
struct FreeRuns {
    runs: std::collections::VecDeque<PageRun>,
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
    /// Opens every segment in `dir` (sealed: nothing more is appended to them) and starts a
    /// fresh active segment numbered at least `next_id`.
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
            let seg = Self::open_sealed(&engine, id, file, capacity_pages)?;
            all.insert(id, Arc::new(seg));
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
            reuse_epoch: AtomicU64::new(0),
            counting_on: AtomicBool::new(false),
            reused: AtomicU64::new(0),
            appended: AtomicU64::new(0),
            reserve: std::sync::OnceLock::new(),
        })
    }

    fn open_sealed(
        engine: &Arc<dyn IoEngine>,
        id: u32,
        file: Arc<IoFile>,
        default_cap: u32,
    ) -> Result<Segment> {
        // Before the first read: readahead would cache pages nobody verified.
        file.no_readahead();
        let len = file
            .size_bytes()
            .map_err(|e| Error::io("sizing segment", e))?;
        let len_pages = u32::try_from(len.div_ceil(PAGE_SIZE as u64)).unwrap_or(u32::MAX);
        let header = if len >= PAGE_SIZE as u64 {
            let done = engine.run(Op::read(&file, 0, PAGE_SIZE));
            done.result
                .map_err(|e| Error::io("reading segment header", e))?;
            let page = done.op.into_buf();
            match SegmentHeader::decode(&page) {
                Ok(Some(h)) if h.id == id => Some(h),
                Ok(Some(h)) => {
                    return Err(Error::Corrupt(format!(
                        "segment file {id} has the header of segment {}",
                        h.id
                    )))
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::warn!(segment = id, error = %e, "segment header is damaged; treating the segment as holding no checksummed data");
                    None
                }
            }
        } else {
            None
        };
        let cap = match header {
            Some(h) => h.capacity_pages.max(len_pages),
            None => default_cap.max(len_pages),
        };
        Ok(Segment::new(id, file, header, cap, u64::from(cap), true))
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
        file.no_readahead();
        let header = SegmentHeader::new(id, capacity_pages);
        // The header is durable before any record goes in: a segment on disk either has a
        // valid header or held nothing a commit could reference.
        let done = engine.submit(vec![Op::Write {
            file: file.clone(),
            offset: 0,
            buf: crate::io::Data::Owned(header.encode()),
        }]);
        for d in done {
            d.result
                .map_err(|e| Error::io("writing segment header", e))?;
        }
        engine
            .run(Op::Sync { file: file.clone() })
            .result
            .map_err(|e| Error::io("syncing segment header", e))?;
        engine
            .sync_dir(dir)
            .map_err(|e| Error::io("syncing data directory", e))?;
        let seg = Segment::new(
            id,
            file,
            Some(header),
            capacity_pages,
            u64::from(header.data_start()),
            false,
        );
        Ok(Arc::new(seg))
    }

    /// Next segment id to persist, so ids are never reused.
    pub fn next_id(&self) -> u32 {
        self.next_id.load(Ordering::Relaxed)
    }

    pub fn get(&self, id: u32) -> Option<Arc<Segment>> {
        self.all.read().get(&id).cloned()
    }

    /// The store's reserve, which says whether segments may grow (see [`crate::space`]).
    pub fn set_reserve(&self, r: Arc<crate::space::Reserve>) {
        let _ = self.reserve.set(r);
    }

    /// Largest record one allocation can hold, in pages.
    pub fn max_record_pages(&self) -> u32 {
        self.capacity_pages - SegmentHeader::new(0, self.capacity_pages).data_start()
    }

    /// Reserves `pages` contiguous pages for new records: from the most recently freed runs
    /// when one is large enough, else at the end of the active segment.
    pub fn allocate(&self, pages: u32) -> Result<Allocation> {
        if pages == 0 || pages > self.max_record_pages() {
            return Err(Error::InvalidArgument(format!(
                "a record of {pages} pages does not fit a data segment"
            )));
        }
        if let Some(a) = self.allocate_free(pages) {
            self.reused.fetch_add(u64::from(pages), Ordering::Relaxed);
            return Ok(a);
        }
        // Low on space: segments do not grow into the room RocksDB and the journal need.
        if self.reserve.get().is_some_and(|r| !r.may_grow()) {
            return Err(Error::NoSpace);
        }
        self.appended.fetch_add(u64::from(pages), Ordering::Relaxed);
        loop {
            let seg = self.active.read().clone();
            // Reserved before the pages are taken, and only while the segment is still the
            // active one: a segment sealed before the reservation may be deleted by then
            // (empty sealed segments go, see `delete_dead_segments`), so take the next.
            seg.reserved.fetch_add(u64::from(pages), Ordering::AcqRel);
            let mut a = Allocation {
                seg: seg.clone(),
                page: 0,
                pages,
            };
            if !Arc::ptr_eq(&seg, &self.active.read()) {
                continue;
            }
            if let Some(page) = seg.try_alloc(pages) {
                a.page = page;
                seg.note_fresh(page, pages);
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
            .find(|&i| free.runs[i].pages >= pages)?;
        let run = free.runs[i];
        let Some(seg) = self.get(run.segment) else {
            // Cannot happen (a segment with free runs is not deleted); drop the run.
            free.runs.remove(i);
            free.pages -= u64::from(run.pages);
            return None;
        };
        seg.free_pages
            .fetch_sub(u64::from(pages), Ordering::Relaxed);
        seg.reuse_gen.fetch_add(1, Ordering::SeqCst);
        if run.pages == pages {
            free.runs.remove(i);
        } else {
            free.runs[i] = PageRun {
                page: run.page + pages,
                pages: run.pages - pages,
                ..run
            };
        }
        free.pages -= u64::from(pages);
        seg.reserved.fetch_add(u64::from(pages), Ordering::AcqRel);
        seg.note_fresh(run.page, pages);
        Some(Allocation {
            seg,
            page: run.page,
            pages,
        })
    }

    /// Records that data was written to `seg`. Called after the write completes and before
    /// the map points at it, so a commit whose snapshot includes the mapping also syncs the
    /// data (marking at allocation could be cleared by a snapshot taken mid-write).
    pub fn mark_written(&self, seg: &Segment) {
        seg.unsynced.store(true, Ordering::Release);
        seg.unkicked.store(true, Ordering::Relaxed);
    }

    /// Starts writeback of every segment written since the last call, without waiting: the
    /// device works while writes go on, and the next commit's `fdatasync` finds less to do.
    pub fn start_writeback(&self) {
        let segs: Vec<Arc<Segment>> = self
            .all
            .read()
            .values()
            .filter(|s| s.unkicked.swap(false, Ordering::Relaxed))
            .cloned()
            .collect();
        for s in segs {
            if let Err(e) = self.engine.start_writeback(&s.file) {
                tracing::debug!(segment = s.id, error = %e, "starting writeback failed");
            }
        }
    }

    /// Sync operations for the segments written since the last call.
    pub fn take_unsynced(&self) -> Vec<Op<'static>> {
        self.all
            .read()
            .values()
            .filter(|s| s.unsynced.swap(false, Ordering::AcqRel))
            .map(|s| Op::Sync {
                file: s.file.clone(),
            })
            .collect()
    }

    /// Turns reference counting on: from now on every change is counted. Segments that
    /// exist now count deltas until [`Segments::finish_counting`] has added their base.
    pub fn start_counting(&self) {
        self.counting_on.store(true, Ordering::SeqCst);
    }

    /// Adds `delta` references to `[page, page + pages)` of `segment`; runs that lose their
    /// last reference are appended to `dead` (and keep their segment until reclaimed) —
    /// or to `fresh` when they were allocated since the last commit snapshot: no durable
    /// map references those, so they may be reused without waiting for a commit.
    pub fn reference(
        &self,
        segment: u32,
        page: u32,
        pages: u32,
        delta: i32,
        dead: &mut Vec<PageRun>,
        fresh: &mut Vec<PageRun>,
    ) {
        if pages == 0 || !self.counting_on.load(Ordering::Acquire) {
            return;
        }
        let Some(seg) = self.get(segment) else {
            return;
        };
        let mut died = Vec::new();
        {
            let mut r = seg.refs.lock();
            let report = !r.counting;
            r.map.add(page, pages, delta, report, &mut died);
            seg.live_pages.store(r.map.live_pages(), Ordering::Relaxed);
        }
        for (p, n) in died {
            seg.pending_dead.fetch_add(u64::from(n), Ordering::AcqRel);
            let run = PageRun {
                segment,
                page: p,
                pages: n,
            };
            if seg.is_fresh(p, n) {
                fresh.push(run);
            } else {
                dead.push(run);
            }
        }
    }

    /// [`Segments::reference`] for several ranges of one segment, under one lock.
    pub fn reference_many(
        &self,
        segment: u32,
        ranges: &[(u32, u32)],
        delta: i32,
        dead: &mut Vec<PageRun>,
        fresh: &mut Vec<PageRun>,
    ) {
        if !self.counting_on.load(Ordering::Acquire) {
            return;
        }
        let Some(seg) = self.get(segment) else {
            return;
        };
        let mut died = Vec::new();
        {
            let mut r = seg.refs.lock();
            let report = !r.counting;
            for &(page, pages) in ranges {
                r.map.add(page, pages, delta, report, &mut died);
            }
            seg.live_pages.store(r.map.live_pages(), Ordering::Relaxed);
        }
        for (p, n) in died {
            seg.pending_dead.fetch_add(u64::from(n), Ordering::AcqRel);
            let run = PageRun {
                segment,
                page: p,
                pages: n,
            };
            if seg.is_fresh(p, n) {
                fresh.push(run);
            } else {
                dead.push(run);
            }
        }
    }

    /// One more reference to `[page, page + pages)` of `segment`, taken only if every page
    /// of it is referenced now (a dead run is never revived: its pages may be on their way
    /// to another record). Returns the segment's reuse generation read after the reference
    /// is taken: if it equals the one read before the record was first installed, the
    /// pages were never handed out again since, so they still hold that record. `None`: not
    /// pinned (a page unreferenced, the segment gone, counts not known yet). The caller
    /// drops the reference with [`crate::inner::Inner::reference`].
    pub fn pin_live(&self, segment: u32, page: u32, pages: u32) -> Option<u64> {
        if pages == 0 || !self.counting_on.load(Ordering::Acquire) {
            return None;
        }
        let seg = self.get(segment)?;
        if !seg.holds(page, pages) {
            return None;
        }
        let mut r = seg.refs.lock();
        if r.counting || !r.map.all_referenced(page, pages) {
            return None;
        }
        r.map.add(page, pages, 1, true, &mut Vec::new());
        seg.live_pages.store(r.map.live_pages(), Ordering::Relaxed);
        Some(seg.reuse_gen.load(Ordering::SeqCst))
    }

    /// Whether every page of `[page, page + pages)` of `segment` is referenced more than
    /// once (shared between maps).
    pub fn shared(&self, segment: u32, page: u32, pages: u32) -> bool {
        self.get(segment).is_some_and(|s| {
            let r = s.refs.lock();
            !r.counting && r.map.all_counted(page, pages, 2)
        })
    }

    /// The reuse generation of `segment` (see [`Segments::pin_live`]).
    pub fn reuse_gen(&self, segment: u32) -> Option<u64> {
        self.get(segment)
            .map(|s| s.reuse_gen.load(Ordering::SeqCst))
    }

    /// Whether a dead run lies in pages allocated since the last commit snapshot.
    pub fn is_fresh(&self, run: &PageRun) -> bool {
        self.get(run.segment)
            .is_some_and(|s| s.is_fresh(run.page, run.pages))
    }

    /// A commit snapshot: everything allocated so far may be in the durable map from now on.
    pub fn forget_fresh(&self) {
        for s in self.all.read().values() {
            s.fresh.lock().clear();
        }
    }

    /// Adds one base reference while counting what the committed maps reference.
    pub fn count_base(&self, segment: u32, page: u32, pages: u32) {
        let Some(seg) = self.get(segment) else {
            return;
        };
        let mut r = seg.refs.lock();
        if r.counting {
            r.map.add(page, pages, 1, false, &mut Vec::new());
        }
    }

    /// Ends counting: every segment that was counting deltas gets exact counts. Runs whose
    /// references all went since the count began are returned as dead (the last durable map
    /// may still reference them, so they go through a commit first); pages no map
    /// referenced at all are punched now, and empty segments deleted.
    pub fn finish_counting(&self) -> Result<Vec<PageRun>> {
        let mut dead = Vec::new();
        let mut punch = Vec::new();
        let segs: Vec<Arc<Segment>> = self.all.read().values().cloned().collect();
        for seg in segs {
            let mut r = seg.refs.lock();
            if !r.counting {
                continue;
            }
            let (gone, negative) = r.map.take_unreferenced();
            if negative > 0 {
                tracing::error!(
                    segment = seg.id,
                    pages = negative,
                    "reference counts went below zero; keeping the pages"
                );
            }
            let mut keep = r.map.live_runs();
            keep.extend(gone.iter().copied());
            coalesce_ranges(&mut keep);
            let mut cursor = seg.data_start();
            for (start, len) in keep.into_iter().chain([(seg.capacity_pages, 0)]) {
                if start > cursor {
                    punch.push(Op::Punch {
                        file: seg.file.clone(),
                        offset: u64::from(cursor) * PAGE_SIZE as u64,
                        len: u64::from(start - cursor) * PAGE_SIZE as u64,
                    });
                }
                cursor = cursor.max(start + len);
            }
            for (p, n) in gone {
                if negative == 0 {
                    seg.pending_dead.fetch_add(u64::from(n), Ordering::AcqRel);
                    dead.push(PageRun {
                        segment: seg.id,
                        page: p,
                        pages: n,
                    });
                }
            }
            seg.live_pages.store(r.map.live_pages(), Ordering::Relaxed);
            r.counting = false;
        }
        for d in self.engine.submit(punch) {
            // A failed punch loses space, not data; the next open's count retries it.
            if let Err(e) = d.result {
                tracing::warn!(error = %e, "punching unreferenced pages failed");
            }
        }
        self.delete_dead_segments()?;
        Ok(dead)
    }

    /// Notes pages of `seg` that died without ever being referenced (a record that lost its
    /// compare-and-set): they wait for a commit like any other dead run.
    pub fn note_pending_dead(&self, seg: &Segment, pages: u32) {
        seg.pending_dead
            .fetch_add(u64::from(pages), Ordering::AcqRel);
    }

    /// Held by a reader from its map lookup to the end of its IO (see `reuse_gate`). Not
    /// reentrant: a thread holding it must not take it again (a waiting reclaim would
    /// deadlock them).
    pub fn read_guard(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.reuse_gate.read()
    }

    /// How many times dead runs were handed back for reuse (see `reuse_epoch`). Read it
    /// with the read guard held, before the lookup it vouches for.
    pub fn reuse_epoch(&self) -> u64 {
        self.reuse_epoch.load(Ordering::SeqCst)
    }

    /// Queues dead runs for reuse or punching, and punches what `punch` allows.
    ///
    /// A punch takes the file's inode lock and, on a filesystem mounted with `discard`,
    /// waits for the device: done while writes flow, it stalls writers appending to the same
    /// file and queues ahead of the flushes that checkpoints and guest fsyncs wait for. So
    /// the committer punches only when the store is idle, large holes first, within a time
    /// budget per call (see `store.rs`).
    ///
    /// Dead runs first become free runs for reuse, up to the reuse cap; [`Punch::All`] (a long
    /// idle, a close) sends every free run to punching.
    pub fn reclaim(&self, dead: &[PageRun], punch: Punch) -> Result<()> {
        self.reclaim_runs(dead, punch, true)
    }

    /// Hands back runs of records that no map ever pointed at (written, then abandoned when
    /// their compare-and-set lost): no reader can hold their locations, so there is no one
    /// to wait for and no compare-and-set to warn (see `reuse_epoch`). Warning them would do
    /// harm: a defragmenting rewrite that lost hands its pages back, and bumping the epoch
    /// for that would make the next queued rewrite lose too, and so on.
    pub fn reclaim_unmapped(&self, runs: &[PageRun]) -> Result<()> {
        self.reclaim_runs(runs, Punch::No, false)
    }

    fn reclaim_runs(&self, dead: &[PageRun], punch: Punch, mapped: bool) -> Result<()> {
        let retain = !matches!(punch, Punch::All { .. });
        let mut sorted: Vec<PageRun> = dead
            .iter()
            .filter(|r| self.get(r.segment).is_some())
            .copied()
            .collect();
        sorted.sort_unstable();
        let mut evicted = Vec::new();
        {
            // Every reader that could still hold one of these locations finishes first.
            if mapped {
                drop(self.reuse_gate.write());
            }
            if mapped && !sorted.is_empty() {
                self.reuse_epoch.fetch_add(1, Ordering::SeqCst);
            }
            let mut free = self.free.lock();
            for run in sorted {
                if let Some(seg) = self.get(run.segment) {
                    let _ =
                        seg.pending_dead
                            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                                Some(v.saturating_sub(u64::from(run.pages)))
                            });
                    seg.free_pages
                        .fetch_add(u64::from(run.pages), Ordering::Relaxed);
                }
                free.pages += u64::from(run.pages);
                match free.runs.back_mut() {
                    Some(b) if b.segment == run.segment && b.page + b.pages == run.page => {
                        b.pages += run.pages
                    }
                    _ => free.runs.push_back(run),
                }
            }
            while free.pages > if retain { self.free_cap } else { 0 } {
                let Some(run) = free.runs.pop_front() else {
                    break;
                };
                free.pages -= u64::from(run.pages);
                if let Some(seg) = self.get(run.segment) {
                    seg.free_pages
                        .fetch_sub(u64::from(run.pages), Ordering::Relaxed);
                }
                evicted.push(run);
            }
        }
        for run in evicted {
            if let Some(seg) = self.get(run.segment) {
                seg.deferred.lock().push((run.page, run.pages));
                self.deferred_pages
                    .fetch_add(u64::from(run.pages), Ordering::Relaxed);
            }
        }
        let (min, active_too, budget) = match punch {
            Punch::No => return self.delete_dead_segments(),
            Punch::Large { active, budget } => (PUNCH_MIN_PAGES, active, budget),
            Punch::All { budget } => (1, true, budget),
        };
        let started = std::time::Instant::now();
        let active = self.active.read().id;
        let segs: Vec<Arc<Segment>> = self.all.read().values().cloned().collect();
        'segments: for seg in segs {
            if seg.id == active && !active_too {
                continue;
            }
            let ranges = {
                let mut deferred = seg.deferred.lock();
                coalesce_ranges(&mut deferred);
                let (big, small): (Vec<_>, Vec<_>) = deferred.iter().partition(|r| r.1 >= min);
                *deferred = small;
                big
            };
            for (i, &(start, len)) in ranges.iter().enumerate() {
                if budget.is_some_and(|b| started.elapsed() >= b) {
                    // Out of time: the rest waits for the next call.
                    seg.deferred.lock().extend_from_slice(&ranges[i..]);
                    break 'segments;
                }
                self.deferred_pages
                    .fetch_sub(u64::from(len), Ordering::Relaxed);
                // A dead range is never referenced. If some of it is, a run was handed back
                // twice and its pages are live again: punching would zero them. Keep the
                // whole range (space leaks, no data) and say so.
                let referenced = {
                    let r = seg.refs.lock();
                    if r.counting {
                        0
                    } else {
                        r.map.pages_referenced(start, len)
                    }
                };
                if referenced > 0 {
                    tracing::error!(
                        segment = seg.id,
                        page = start,
                        pages = len,
                        referenced,
                        "a freed range holds referenced pages; not punching it"
                    );
                    continue;
                }
                let d = self.engine.run(Op::Punch {
                    file: seg.file.clone(),
                    offset: u64::from(start) * PAGE_SIZE as u64,
                    len: u64::from(len) * PAGE_SIZE as u64,
                });
                // A failed punch loses space, not data; the next open's count retries it.
                if let Err(e) = d.result {
                    tracing::warn!(error = %e, "punching freed pages failed");
                }
            }
        }
        self.delete_dead_segments()
    }

    /// Dead pages waiting to be punched.
    pub fn deferred_pages(&self) -> u64 {
        self.deferred_pages.load(Ordering::Relaxed)
    }

    /// Dead pages not punched yet: free runs kept for reuse and holes waiting.
    pub fn held_pages(&self) -> u64 {
        self.deferred_pages() + self.free.lock().pages
    }

    pub fn reused_pages(&self) -> u64 {
        self.reused.load(Ordering::Relaxed)
    }

    pub fn appended_pages(&self) -> u64 {
        self.appended.load(Ordering::Relaxed)
    }

    /// Deletes sealed segments with nothing in them: no live page, none reserved, dead or
    /// kept for reuse. Under the roll lock, so the active segment is the one read here and
    /// every other segment is sealed; an allocation reserves pages of a segment only while
    /// it is active (see [`Segments::allocate`]), so a sealed segment's reservations are all
    /// visible here. A roll in progress: nothing is deleted now, a later call does it.
    fn delete_dead_segments(&self) -> Result<()> {
        let Some(_roll) = self.roll.try_lock() else {
            return Ok(());
        };
        let active = self.active.read().id;
        let candidates: Vec<u32> = self
            .all
            .read()
            .values()
            .filter(|s| {
                s.id != active
                    && s.live_pages() == 0
                    && s.reserved.load(Ordering::Acquire) == 0
                    && s.pending_dead.load(Ordering::Acquire) == 0
                    && !s.refs.lock().counting
            })
            .map(|s| s.id)
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        // Under the free-run lock, so no allocation takes pages of a segment being deleted.
        // A segment with free runs is kept: its pages (cached, their blocks allocated) are
        // about to be written again; once nothing is kept for reuse (a long idle, a close) it
        // goes like any other.
        let free = self.free.lock();
        let dead: Vec<u32> = candidates
            .into_iter()
            .filter(|id| {
                self.get(*id).is_some_and(|s| {
                    s.free_pages.load(Ordering::Relaxed) == 0
                        && s.live_pages() == 0
                        && s.reserved.load(Ordering::Acquire) == 0
                        && s.pending_dead.load(Ordering::Acquire) == 0
                })
            })
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        for id in &dead {
            if let Some(seg) = self.all.write().remove(id) {
                // Holes waiting to be punched go with the file.
                let held: u64 = seg.deferred.lock().iter().map(|r| u64::from(r.1)).sum();
                self.deferred_pages.fetch_sub(held, Ordering::Relaxed);
            }
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

    /// Live bytes and file count, for stats.
    pub fn usage(&self) -> (u64, usize) {
        let all = self.all.read();
        let live = all
            .values()
            .map(|s| s.live_pages() * PAGE_SIZE as u64)
            .sum();
        (live, all.len())
    }

    /// Heap bytes of reference counts, over all segments.
    pub fn ref_heap_bytes(&self) -> usize {
        self.all
            .read()
            .values()
            .map(|s| s.refs.lock().map.heap_bytes())
            .sum()
    }

    /// Every segment's counted pages (see [`RefMap::count_runs`]) and its capacity in
    /// pages; `None` while the base counts are still being added.
    pub fn count_runs(&self) -> Option<BTreeMap<u32, (u32, CountRuns)>> {
        let mut out = BTreeMap::new();
        for seg in self.all.read().values() {
            let r = seg.refs.lock();
            if r.counting {
                return None;
            }
            out.insert(seg.id, (seg.capacity_pages, r.map.count_runs()));
        }
        Some(out)
    }

    pub fn engine(&self) -> &Arc<dyn IoEngine> {
        &self.engine
    }
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
        segs.start_counting();
        let room = segs.max_record_pages();
        let a = segs.allocate(room).unwrap();
        let first = a.seg.id;
        let mut dead = Vec::new();
        let mut fresh = Vec::new();
        segs.reference(first, a.page, room, 1, &mut dead, &mut fresh);
        let page = a.page;
        drop(a);
        // The next allocation rolls to a new active segment.
        drop(segs.allocate(1).unwrap());
        // As after a commit: the record is in the durable map.
        segs.forget_fresh();
        segs.reference(first, page, room, -1, &mut dead, &mut fresh);
        assert!(fresh.is_empty());
        assert_eq!(
            dead,
            vec![PageRun {
                segment: first,
                page,
                pages: room
            }]
        );
        segs.reclaim(&[], Punch::All { budget: None }).unwrap();
        assert!(
            segs.get(first).is_some(),
            "deleted before its dead pages were reclaimed"
        );
        segs.reclaim(&dead, Punch::All { budget: None }).unwrap();
        assert!(segs.get(first).is_none(), "empty and reclaimed: deleted");
    }

    #[test]
    fn empty_segments_are_deleted_but_never_one_being_allocated_from() {
        // Allocations roll to new segments while another thread deletes empty ones: a
        // segment that was just made active, or that an allocation is taking pages from,
        // is never deleted (records written there would be installed into a missing file).
        let dir = tempfile::tempdir().unwrap();
        let engine: Arc<dyn IoEngine> = Arc::new(crate::io::SyncEngine::new());
        let segs = Segments::open(dir.path(), engine, 16 * PAGE_SIZE as u64, 0, 1).unwrap();
        let room = segs.max_record_pages();
        let stop = AtomicBool::new(false);
        let deleted = AtomicU64::new(0);
        /// Stops the deleting thread however the test ends (a failed assertion too).
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        std::thread::scope(|s| {
            let _stop = Stop(&stop);
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let before = segs.all.read().len();
                    segs.reclaim_unmapped(&[]).unwrap();
                    let after = segs.all.read().len();
                    deleted.fetch_add(before.saturating_sub(after) as u64, Ordering::Relaxed);
                }
            });
            let small = s.spawn(|| {
                for _ in 0..20_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let a = segs.allocate(1).unwrap();
                    assert!(
                        segs.get(a.seg.id).is_some(),
                        "segment {} deleted under a one-page allocation",
                        a.seg.id
                    );
                }
            });
            // Every whole-segment allocation rolls to a new segment.
            for _ in 0..1000 {
                let a = segs.allocate(room).unwrap();
                assert!(
                    segs.get(a.seg.id).is_some(),
                    "segment {} deleted under a whole-segment allocation",
                    a.seg.id
                );
            }
            drop(_stop);
            small.join().unwrap();
        });
        assert!(
            deleted.load(Ordering::Relaxed) > 100,
            "empty sealed segments were not deleted ({} were)",
            deleted.load(Ordering::Relaxed)
        );
    }

    #[test]
    fn a_range_handed_back_while_referenced_is_not_punched() {
        // A run handed back twice (once reused and referenced again, once waiting to be
        // punched) must not zero the live record: the punch checks the counts first.
        let dir = tempfile::tempdir().unwrap();
        let engine: Arc<dyn IoEngine> = Arc::new(crate::io::SyncEngine::new());
        let segs = Segments::open(dir.path(), engine.clone(), 1 << 20, 0, 1).unwrap();
        segs.start_counting();
        let a = segs.allocate(4).unwrap();
        let at = u64::from(a.page) * PAGE_SIZE as u64;
        let data = vec![0x5au8; 4 * PAGE_SIZE];
        for d in engine.submit(vec![Op::Write {
            file: a.seg.file.clone(),
            offset: at,
            buf: crate::io::Data::Owned(data.clone()),
        }]) {
            d.result.unwrap();
        }
        let (mut dead, mut fresh) = (Vec::new(), Vec::new());
        segs.reference(a.seg.id, a.page, 4, 1, &mut dead, &mut fresh);
        let run = PageRun {
            segment: a.seg.id,
            page: a.page,
            pages: 4,
        };
        let file = a.seg.file.clone();
        drop(a);
        segs.reclaim(&[run], Punch::All { budget: None }).unwrap();
        let back = engine.run(Op::read(&file, at, 4 * PAGE_SIZE));
        back.result.unwrap();
        assert!(back.op.into_buf() == data, "a referenced range was punched");
    }

    #[test]
    fn pages_reused_inside_a_fresh_range_keep_it_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let engine: Arc<dyn IoEngine> = Arc::new(crate::io::SyncEngine::new());
        let segs = Segments::open(dir.path(), engine, 1 << 20, 1 << 20, 1).unwrap();
        let a = segs.allocate(64).unwrap();
        let seg = a.seg.clone();
        assert!(seg.is_fresh(a.page, 64));
        seg.note_fresh(a.page, 16);
        assert!(
            seg.is_fresh(a.page, 64),
            "a reuse inside the range shrank it"
        );
        seg.note_fresh(a.page + 64, 8);
        assert!(seg.is_fresh(a.page, 72));
        segs.forget_fresh();
        assert!(!seg.is_fresh(a.page, 1));
    }

    #[test]
    fn new_segments_start_with_a_header_and_reopen_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let engine: Arc<dyn IoEngine> = Arc::new(crate::io::SyncEngine::new());
        let id = {
            let segs = Segments::open(dir.path(), engine.clone(), 1 << 20, 0, 1).unwrap();
            let a = segs.allocate(4).unwrap();
            assert_eq!(a.page, 2, "header page and a one-page table come first");
            a.seg.id
        };
        let segs = Segments::open(dir.path(), engine, 1 << 20, 0, 1).unwrap();
        let s = segs.get(id).unwrap();
        assert!(s.has_table());
        assert_eq!(s.data_start(), 2);
        assert_ne!(segs.active.read().id, id, "a reopened segment is sealed");
    }
}
