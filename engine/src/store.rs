//! The store handle: opening (and recovering) a store, the background committer, closing.
//!
//! Opening reads the catalog, replays the journal into the volumes it names, commits, and
//! returns: it costs the catalog and the journal, not the data mapped. A background pass then
//! counts what the committed maps reference (`load::count_references`); until it is done,
//! space freed by overwrites is held back, not reused.

use crate::codec::{self, StateRecord};
use crate::inner::{cf, Inner, SpaceReady};
use crate::io::{default_engine, IoEngine};
use crate::journal::Journal;
use crate::segment::Segments;
use crate::{Error, Result};
use parking_lot::{Condvar, Mutex, RwLock};
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

const DB_DIR: &str = "meta";
const DATA_DIR: &str = "data";
const JOURNAL_DIR: &str = "journal";
/// Data segment size: the most dead space an active segment holds back before it is sealed
/// and punched (see `Segments::reclaim`), and 4 open files per GiB stored.
pub const DEFAULT_SEGMENT_BYTES: u64 = 256 << 20;
/// Commit intervals without writes after which free runs kept for reuse are punched.
const FREE_RUNS_IDLE_PERIODS: u32 = 5;
/// A change is committed at the latest this long after it was made, even under load.
const MAX_COMMIT_AGE: Duration = Duration::from_secs(30);

/// How to open a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Create the store if the directory is empty or missing.
    pub create: bool,
    /// IO engine; `None` picks io_uring when available, else pread/pwrite.
    pub engine: Option<Arc<dyn IoEngine>>,
    /// Size of each data segment file.
    pub segment_bytes: u64,
    /// How long the store may be quiet with changes not yet committed before a background
    /// commit makes them durable (under load, commits come from metadata operations, 2 GiB
    /// of data, `dead_commit_bytes` of freed pages or 30 s; flushes sync the journal; see
    /// docs/design/durability.md). `None`: no background thread; commits on metadata
    /// operations and on flushes that find `dead_commit_bytes` of freed pages waiting.
    pub commit_interval: Option<Duration>,
    /// Freed space (bytes) kept for reuse by new writes instead of punched at once; it is
    /// punched when the store goes idle (with a background committer) or closes. `0` punches
    /// every freed page at the next opportunity.
    pub reuse_bytes: u64,
    /// Count what the committed maps reference in a background thread after open (the
    /// default), or before `Store::open` returns.
    pub count_in_background: bool,
    /// Bytes per second the background defragmenter may rewrite (ranges a read found
    /// fragmented; see `defrag.rs`); 0 turns it off.
    pub defrag_bytes_per_sec: u64,
    /// Freed bytes waiting for a commit (they become reusable only after one) that make the
    /// committer commit; without a committer, a flush commits once this much waits (0: a
    /// flush commits whenever anything does). Flushes otherwise sync the journal only.
    pub dead_commit_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            create: true,
            engine: None,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            commit_interval: Some(Duration::from_secs(1)),
            reuse_bytes: crate::segment::DEFAULT_REUSE_BYTES,
            count_in_background: true,
            defrag_bytes_per_sec: 512 << 20,
            dead_commit_bytes: 64 << 20,
        }
    }
}

/// An open store. Dropping it stops the background threads and commits once more.
#[derive(Debug)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
    committer: Option<JoinHandle<()>>,
    counter: Option<JoinHandle<()>>,
    defragger: Option<JoinHandle<()>>,
}

pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn dir_is_empty(path: &Path) -> Result<bool> {
    match std::fs::read_dir(path) {
        Ok(mut it) => Ok(it.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(Error::StoreDir {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::StoreDir {
        path: path.to_path_buf(),
        source: e,
    })
}

fn open_db(path: &Path, create: bool) -> Result<DB> {
    let mut opts = Options::default();
    opts.create_if_missing(create);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    // RocksDB preallocates write_buffer_size * 1.1 (~70 MB by default) per WAL file, which
    // `du` counts against even an empty store. Capping the WAL caps the preallocation; map
    // metadata is small, so 16 MiB memtables are plenty.
    opts.set_max_total_wal_size(16 << 20);
    opts.set_write_buffer_size(16 << 20);
    // Every column family present (a format-1 store also has `leaves`) must be opened.
    let mut names: Vec<String> = codec::ALL_CFS.iter().map(|s| s.to_string()).collect();
    if !create {
        if let Ok(existing) = DB::list_cf(&opts, path) {
            for n in existing {
                if n != "default" && !names.contains(&n) {
                    names.push(n);
                }
            }
        }
    }
    let cfs = names
        .iter()
        .map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
    Ok(DB::open_cf_descriptors(&opts, path, cfs)?)
}

/// Reads the format record, upgrading a format-1 store in place; returns the state record.
fn check_format(db: &DB, path: &Path) -> Result<StateRecord> {
    let meta = cf(db, codec::CF_META)?;
    let fmt = db
        .get_cf(meta, codec::KEY_FORMAT)?
        .ok_or_else(|| Error::Corrupt("no format record".into()))?;
    let version = codec::decode_format(&fmt)?;
    if version == codec::FORMAT_V1 {
        let layers = crate::upgrade::upgrade_v1(db)?;
        tracing::info!(store = %path.display(), layers, "upgraded the store from format 1 to format 2");
    } else if version != codec::FORMAT_VERSION {
        return Err(Error::FormatVersion {
            found: version,
            expected: codec::FORMAT_VERSION,
        });
    }
    let st = db
        .get_cf(meta, codec::KEY_STATE)?
        .ok_or_else(|| Error::Corrupt("no state record".into()))?;
    StateRecord::decode(&st)
}

impl Store {
    /// Opens the store at `path`, creating it when `opts.create` is set and the directory is
    /// empty or absent.
    pub fn open(path: impl AsRef<Path>, opts: StoreOptions) -> Result<Store> {
        let path = path.as_ref().to_path_buf();
        let db_path = path.join(DB_DIR);
        let fresh = !db_path.exists();
        if fresh {
            if !dir_is_empty(&path)? {
                return Err(Error::NotAStore { path });
            }
            if !opts.create {
                return Err(Error::NoStore { path });
            }
            for d in [&path, &path.join(DATA_DIR), &path.join(JOURNAL_DIR)] {
                mkdir(d)?;
            }
        }
        // Before RocksDB opens: on a full filesystem, the reserve makes room for it.
        let reserve = Arc::new(crate::space::Reserve::open(&path));
        let mut db = open_db(&db_path, fresh)?;
        let state = if fresh {
            let state = StateRecord {
                committed_seq: 0,
                next_layer: 1,
                next_volume: 1,
                next_segment: 1,
            };
            let meta = cf(&db, codec::CF_META)?;
            let mut b = WriteBatch::default();
            b.put_cf(meta, codec::KEY_FORMAT, codec::encode_format());
            b.put_cf(meta, codec::KEY_STATE, state.encode());
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.write_opt(b, &wo)?;
            state
        } else {
            check_format(&db, &path)?
        };
        if db.cf_handle(codec::CF_LEAVES_V1).is_some() {
            // Emptied by the upgrade (in this open or an earlier one).
            db.drop_cf(codec::CF_LEAVES_V1)?;
        }
        let engine = opts.engine.clone().unwrap_or_else(default_engine);
        tracing::info!(store = %path.display(), engine = engine.name(), "opening store");
        for d in [path.join(DATA_DIR), path.join(JOURNAL_DIR)] {
            mkdir(&d)?;
        }
        let segments = Segments::open(
            &path.join(DATA_DIR),
            engine.clone(),
            opts.segment_bytes,
            opts.reuse_bytes,
            state.next_segment,
        )?;
        segments.set_reserve(reserve.clone());
        // Flushes sync the journal rather than commit unless told to commit every time.
        let journal_flush = opts.commit_interval.is_some() || opts.dead_commit_bytes > 0;
        let (journal, recovered) = Journal::open(&path.join(JOURNAL_DIR), engine)?;
        let remote = crate::remote::Remotes::default();
        remote.load(&db)?;
        let inner = Arc::new(Inner {
            path,
            db,
            segments,
            journal,
            gate: RwLock::new(()),
            commit: Mutex::new(()),
            catalog: Mutex::new(Default::default()),
            seq: AtomicU64::new(state.committed_seq),
            dead: Mutex::new(Vec::new()),
            sync: Mutex::new(()),
            dead_commit_bytes: opts.dead_commit_bytes,
            journal_flush,
            fresh_reused: AtomicBool::new(false),
            fresh_dead: Mutex::new((Vec::new(), 0)),
            journal_entries: AtomicU64::new(0),
            dirty_since_ms: AtomicU64::new(0),
            opened: std::time::Instant::now(),
            poisoned: AtomicBool::new(false),
            dirty_bytes: AtomicU64::new(0),
            unkicked_bytes: AtomicU64::new(0),
            committed_seq: AtomicU64::new(state.committed_seq),
            reclaim_queue: Mutex::new(Vec::new()),
            background: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
            remote,
            reserve,
            space: SpaceReady::default(),
            defrag: Default::default(),
        });
        inner
            .defrag
            .rate
            .store(opts.defrag_bytes_per_sec, Ordering::Relaxed);
        crate::load::load_catalog(&inner, &state)?;
        let replayed = crate::load::replay(&inner, state.committed_seq, recovered.entries)?;
        // Ephemeral volumes left from a previous run go before anything is counted: their
        // pages are then simply unreferenced.
        let ephemeral: Vec<String> = inner
            .catalog
            .lock()
            .volumes
            .values()
            .filter(|v| v.ephemeral)
            .map(|v| v.name.clone())
            .collect();
        for name in &ephemeral {
            tracing::info!(volume = %name, "discarding ephemeral volume left from a previous run");
            crate::ops::delete_volume(&inner, name, true)?;
        }
        inner.commit(Vec::new())?;
        tracing::info!(replayed, "store opened");
        let counter = start_counting(&inner, opts.count_in_background)?;
        let committer = opts
            .commit_interval
            .and_then(|period| spawn_committer(&inner, period));
        let weak = Arc::downgrade(&inner);
        let defragger = (opts.defrag_bytes_per_sec > 0)
            .then(|| {
                std::thread::Builder::new()
                    .name("strata-defrag".into())
                    .spawn(move || crate::defrag::run_thread(weak))
                    .map_err(|e| tracing::error!(error = %e, "cannot start the defragmenter"))
                    .ok()
            })
            .flatten();
        if defragger.is_none() {
            inner.defrag.rate.store(0, Ordering::Relaxed);
        }
        Ok(Store {
            inner,
            committer,
            counter,
            defragger,
        })
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Which IO engine serves this store.
    pub fn engine_name(&self) -> &'static str {
        self.inner.segments.engine().name()
    }

    /// Makes every acknowledged write and every checkpoint durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    /// Waits until the references the store's committed maps hold have been counted (a
    /// background pass after open): from then on freed space is reused and returned, and
    /// space figures are exact.
    pub fn wait_space_counted(&self) {
        self.inner.wait_space_counted();
    }

    /// Heap bytes of the store's reference counts (for benches).
    pub fn reference_heap_bytes(&self) -> usize {
        self.inner.segments.ref_heap_bytes()
    }
}

/// Turns reference counting on, with the base counts taken from the committed state right
/// now: in a background thread, or here.
fn start_counting(inner: &Arc<Inner>, background: bool) -> Result<Option<JoinHandle<()>>> {
    let ppb = crate::load::layer_ppb(inner);
    // No commit may happen between the snapshot the counts come from and counting on: the
    // commit lock is held across both.
    let guard = inner.commit.lock();
    if !background {
        let snap = inner.db.snapshot();
        inner.segments.start_counting();
        drop(guard);
        let r = crate::load::count_references(inner, &snap, &ppb);
        drop(snap);
        finish(inner, r);
        return Ok(None);
    }
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let spawned = std::thread::Builder::new()
        .name("strata-count".into())
        .spawn(move || {
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let snap = inner.db.snapshot();
            let _ = tx.send(());
            let t = std::time::Instant::now();
            let r = crate::load::count_references(&inner, &snap, &ppb);
            drop(snap);
            if let Ok(n) = &r {
                tracing::info!(extents = n, elapsed = ?t.elapsed(), "space accounting loaded");
            }
            finish(&inner, r);
        });
    let h = spawned.map_err(|e| Error::io("starting the counting thread", e))?;
    rx.recv()
        .map_err(|_| Error::Corrupt("the counting thread stopped before its snapshot".into()))?;
    inner.segments.start_counting();
    drop(guard);
    Ok(Some(h))
}

fn finish(inner: &Inner, r: Result<u64>) {
    if let Err(e) = r {
        // Without a complete count nothing may be freed; reads and writes go on.
        tracing::error!(error = %e, "counting referenced space failed; freed space is kept until the next open");
    }
    *inner.space.done.lock() = true;
    inner.space.cv.notify_all();
}

impl Drop for Store {
    fn drop(&mut self) {
        {
            let mut stop = self.inner.wake.0.lock();
            *stop = true;
            self.inner.wake.1.notify_all();
        }
        if let Some(h) = self.committer.take() {
            let _ = h.join();
        }
        if let Some(h) = self.counter.take() {
            let _ = h.join();
        }
        self.inner.defrag.stop();
        if let Some(h) = self.defragger.take() {
            let _ = h.join();
        }
        self.inner.background.store(false, Ordering::Relaxed);
        self.inner
            .drain_reclaim(crate::segment::Punch::All { budget: None });
        if !self.inner.poisoned.load(Ordering::Relaxed) {
            if let Err(e) = self.inner.commit(Vec::new()) {
                tracing::warn!(error = %e, "final commit failed");
            }
        }
        // The final commit kept what it freed for reuse; nothing will reuse it now.
        if let Err(e) = self
            .inner
            .segments
            .reclaim(&[], crate::segment::Punch::All { budget: None })
        {
            tracing::warn!(error = %e, "returning freed space at close failed");
        }
    }
}

/// What the committer may punch: nothing while writes flow (unless dead space piles up past
/// 4 GiB), large holes once writes paused, everything after a longer quiet spell — each
/// within a time budget, so a writer coming back never waits long behind punches.
fn punch_policy(idle: bool, long_idle: bool, deferred: u64) -> crate::segment::Punch {
    use crate::segment::{Punch, BUSY_PUNCH_PAGES};
    let budget = Some(Duration::from_millis(100));
    match (idle, long_idle) {
        (false, _) if deferred < BUSY_PUNCH_PAGES => Punch::No,
        (false, _) => Punch::Large {
            active: false,
            budget,
        },
        (true, false) => Punch::Large {
            active: true,
            budget,
        },
        (true, true) => Punch::All { budget },
    }
}

fn spawn_committer(strong: &Arc<Inner>, period: Duration) -> Option<JoinHandle<()>> {
    let inner: Weak<Inner> = Arc::downgrade(strong);
    let spawned = std::thread::Builder::new()
        .name("strata-commit".into())
        .spawn(move || {
            let mut last = std::time::Instant::now();
            let mut looked = std::time::Instant::now();
            let mut last_seq = u64::MAX;
            let mut quiet_since = std::time::Instant::now();
            loop {
                let Some(strong) = inner.upgrade() else {
                    return;
                };
                {
                    // One look per period (sooner when woken: enough data to commit).
                    let mut stop = strong.wake.0.lock();
                    if *stop {
                        return;
                    }
                    strong
                        .wake
                        .1
                        .wait_for(&mut stop, period.saturating_sub(looked.elapsed()));
                    if *stop {
                        return;
                    }
                }
                looked = std::time::Instant::now();
                // Enough written since the last time: let the device start on it now rather
                // than all at the next flush (writes keep going meanwhile).
                if strong.unkicked_bytes.load(Ordering::Relaxed)
                    >= crate::inner::WRITEBACK_KICK_BYTES
                {
                    strong.unkicked_bytes.store(0, Ordering::Relaxed);
                    strong.segments.start_writeback();
                }
                // No write since the last look: the active segment can be punched too. Free
                // runs kept for reuse are punched only after a longer quiet spell, so a pause
                // between bursts of writes does not throw them away (and a read-heavy phase
                // right after writes does not compete with a burst of punching).
                let seq = strong.seq.load(Ordering::Relaxed);
                let idle = seq == last_seq;
                if !idle {
                    quiet_since = std::time::Instant::now();
                }
                // Low on space: every freed page goes back to the filesystem at once.
                let policy = if strong.reserve.recover() {
                    crate::segment::Punch::All { budget: None }
                } else {
                    punch_policy(
                        idle,
                        quiet_since.elapsed() >= period * FREE_RUNS_IDLE_PERIODS,
                        strong.segments.deferred_pages(),
                    )
                };
                strong.drain_reclaim(policy);
                last_seq = seq;
                // Commit when asked to by the amount or age of what is uncommitted, or once
                // writes pause: never on a timer under load, where a commit's fdatasync would
                // throttle writers to the device while a guest's own flushes already commit.
                let pending = strong.seq.load(Ordering::Relaxed)
                    != strong.committed_seq.load(Ordering::Relaxed)
                    || !strong.dead.lock().is_empty();
                let due = strong.commit_due(MAX_COMMIT_AGE)
                    || (idle && pending && last.elapsed() >= period);
                if !due || !pending || strong.poisoned.load(Ordering::Relaxed) {
                    continue;
                }
                last = std::time::Instant::now();
                if let Err(e) = strong.commit(Vec::new()) {
                    tracing::error!(error = %e, "background commit failed");
                }
            }
        });
    match spawned {
        Ok(h) => {
            strong.background.store(true, Ordering::Relaxed);
            Some(h)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start the commit thread; commits happen on flush only");
            None
        }
    }
}
