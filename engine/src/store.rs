//! The store: opening and loading, the commit protocol, and the background committer.
//!
//! Lock order, outermost first: `commit` → `catalog` → `gate` → a volume's `map`.
//! Writers hold `gate` shared while they change a map; a commit holds it exclusively for the
//! moment it takes its snapshot, so every journal entry with a sequence number up to the
//! snapshot's is in that commit and none after it is.

use crate::codec::{self, StateRecord, VolumeRecord};
use crate::io::{default_engine, IoEngine};
use crate::journal::Journal;
use crate::segment::Segments;
use crate::tree::{Entry, SharedLeaf, Tree};
use crate::volume::{HeadMap, VolumeState};
use crate::{Error, Result};
use parking_lot::{Condvar, Mutex, RwLock};
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
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
/// Commit early once this much data was written since the last commit.
const DIRTY_COMMIT_BYTES: u64 = 256 << 20;
/// Commit intervals without writes after which free runs kept for reuse are punched.
const FREE_RUNS_IDLE_PERIODS: u32 = 5;

/// How to open a store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Create the store if the directory is empty or missing.
    pub create: bool,
    /// IO engine; `None` picks io_uring when available, else pread/pwrite.
    pub engine: Option<Arc<dyn IoEngine>>,
    /// Size of each data segment file.
    pub segment_bytes: u64,
    /// Background commit period; `None` commits only on flush and metadata operations.
    pub commit_interval: Option<Duration>,
    /// Freed space (bytes) kept for reuse by new writes instead of punched at once; it is
    /// punched when the store goes idle (with a background committer) or closes. `0` punches
    /// every freed page at the next opportunity.
    pub reuse_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            create: true,
            engine: None,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            commit_interval: Some(Duration::from_secs(1)),
            reuse_bytes: crate::segment::DEFAULT_REUSE_BYTES,
        }
    }
}

/// A layer that is no longer a volume's head: a checkpoint's frozen view.
#[derive(Debug)]
pub(crate) struct FrozenLayer {
    pub parent: u64,
    pub volume: u64,
    pub tree: Tree,
    /// Leaves this layer has records for.
    pub own: HashSet<u64>,
    pub mapped_blocks: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct CheckpointMeta {
    pub layer: u64,
    pub size: u64,
    pub created_unix: u64,
    /// Open [`crate::Snapshot`]s of the checkpoint: it cannot be deleted while any are.
    pub pins: Arc<std::sync::atomic::AtomicUsize>,
}

/// Metadata held in memory, mirrored in RocksDB.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    pub volumes: HashMap<String, Arc<VolumeState>>,
    pub frozen: HashMap<u64, FrozenLayer>,
    /// (volume id, name) → checkpoint.
    pub checkpoints: BTreeMap<(u64, String), CheckpointMeta>,
    pub next_layer: u64,
    pub next_volume: u64,
}

impl Catalog {
    pub fn volume(&self, name: &str) -> Result<&Arc<VolumeState>> {
        self.volumes
            .get(name)
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))
    }

    pub fn volume_by_id(&self, id: u64) -> Option<&Arc<VolumeState>> {
        self.volumes.values().find(|v| v.id == id)
    }

    pub fn alloc_layer(&mut self) -> u64 {
        let id = self.next_layer;
        self.next_layer += 1;
        id
    }
}

/// A RocksDB change carried by a commit.
#[derive(Debug)]
pub(crate) enum DbOp {
    Put(&'static str, Vec<u8>, Vec<u8>),
    Delete(&'static str, Vec<u8>),
    DeleteRange(&'static str, Vec<u8>, Vec<u8>),
    /// A leaf record for (layer, leaf index); `None` writes an empty leaf.
    Leaf(u64, u64, Option<SharedLeaf>),
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub path: PathBuf,
    pub db: DB,
    pub segments: Segments,
    pub journal: Journal,
    pub gate: RwLock<()>,
    pub commit: Mutex<()>,
    pub catalog: Mutex<Catalog>,
    pub seq: AtomicU64,
    /// Records whose last reference went away since the last commit snapshot.
    pub dead: Mutex<Vec<Entry>>,
    pub poisoned: AtomicBool,
    pub dirty_bytes: AtomicU64,
    /// `seq` as of the last completed commit.
    committed_seq: AtomicU64,
    /// Dead records of durable commits, waiting for the committer thread to punch them.
    reclaim_queue: Mutex<Vec<Entry>>,
    /// True while the committer thread runs.
    background: AtomicBool,
    wake: (Mutex<bool>, Condvar),
    /// Remote packs and the fetcher for lazily restored volumes.
    pub remote: crate::remote::Remotes,
}

/// An open store. Dropping it stops the background committer and commits once more.
#[derive(Debug)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
    committer: Option<JoinHandle<()>>,
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

pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily> {
    db.cf_handle(name)
        .ok_or_else(|| Error::Corrupt(format!("column family {name} is missing")))
}

fn open_db(path: &Path, create: bool) -> Result<DB> {
    let mut opts = Options::default();
    opts.create_if_missing(create);
    opts.create_missing_column_families(create);
    opts.set_max_background_jobs(2);
    // RocksDB preallocates write_buffer_size * 1.1 (~70 MB by default) per WAL file, which
    // `du` counts against even an empty store. Capping the WAL caps the preallocation; map
    // metadata is small, so 16 MiB memtables are plenty.
    opts.set_max_total_wal_size(16 << 20);
    opts.set_write_buffer_size(16 << 20);
    let cfs = codec::ALL_CFS
        .iter()
        .map(|n| ColumnFamilyDescriptor::new(*n, Options::default()));
    Ok(DB::open_cf_descriptors(&opts, path, cfs)?)
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
        let db = open_db(&db_path, fresh)?;
        let meta = cf(&db, codec::CF_META)?;
        let state = if fresh {
            let state = StateRecord {
                committed_seq: 0,
                next_layer: 1,
                next_volume: 1,
                next_segment: 1,
            };
            let mut b = WriteBatch::default();
            b.put_cf(meta, codec::KEY_FORMAT, codec::encode_format());
            b.put_cf(meta, codec::KEY_STATE, state.encode());
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.write_opt(b, &wo)?;
            state
        } else {
            let fmt = db
                .get_cf(meta, codec::KEY_FORMAT)?
                .ok_or_else(|| Error::Corrupt("no format record".into()))?;
            let version = codec::decode_format(&fmt)?;
            if version != codec::FORMAT_VERSION {
                return Err(Error::FormatVersion {
                    found: version,
                    expected: codec::FORMAT_VERSION,
                });
            }
            let st = db
                .get_cf(meta, codec::KEY_STATE)?
                .ok_or_else(|| Error::Corrupt("no state record".into()))?;
            StateRecord::decode(&st)?
        };
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
        let (journal, recovered) = Journal::open(&path.join(JOURNAL_DIR), engine)?;
        let inner = Arc::new(Inner {
            path,
            db,
            segments,
            journal,
            gate: RwLock::new(()),
            commit: Mutex::new(()),
            catalog: Mutex::new(Catalog::default()),
            seq: AtomicU64::new(state.committed_seq),
            dead: Mutex::new(Vec::new()),
            poisoned: AtomicBool::new(false),
            dirty_bytes: AtomicU64::new(0),
            committed_seq: AtomicU64::new(state.committed_seq),
            reclaim_queue: Mutex::new(Vec::new()),
            background: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
            remote: Default::default(),
        });
        crate::remote::Remotes::load(&inner)?;
        crate::load::load(&inner, &state, recovered.entries)?;
        let committer = opts
            .commit_interval
            .and_then(|period| spawn_committer(&inner, period));
        Ok(Store { inner, committer })
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
        self.inner.commit(Vec::new())
    }
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
        self.inner.background.store(false, Ordering::Relaxed);
        self.inner.drain_reclaim(true, false);
        if !self.inner.poisoned.load(Ordering::Relaxed) {
            if let Err(e) = self.inner.commit(Vec::new()) {
                tracing::warn!(error = %e, "final commit failed");
            }
        }
        // The final commit kept what it freed for reuse; nothing will reuse it now.
        if let Err(e) = self.inner.segments.reclaim(&[], false, true) {
            tracing::warn!(error = %e, "returning freed space at close failed");
        }
    }
}

fn spawn_committer(strong: &Arc<Inner>, period: Duration) -> Option<JoinHandle<()>> {
    let inner: Weak<Inner> = Arc::downgrade(strong);
    let spawned = std::thread::Builder::new()
        .name("strata-commit".into())
        .spawn(move || {
            let mut last = std::time::Instant::now();
            let mut last_seq = u64::MAX;
            let mut quiet_since = std::time::Instant::now();
            loop {
                let Some(strong) = inner.upgrade() else {
                    return;
                };
                {
                    let mut stop = strong.wake.0.lock();
                    if *stop {
                        return;
                    }
                    strong
                        .wake
                        .1
                        .wait_for(&mut stop, period.saturating_sub(last.elapsed()));
                    if *stop {
                        return;
                    }
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
                let retain = quiet_since.elapsed() < period * FREE_RUNS_IDLE_PERIODS;
                strong.drain_reclaim(idle, retain);
                last_seq = seq;
                let due = last.elapsed() >= period
                    || strong.dirty_bytes.load(Ordering::Relaxed) >= DIRTY_COMMIT_BYTES;
                if !due || strong.poisoned.load(Ordering::Relaxed) {
                    continue;
                }
                last = std::time::Instant::now();
                let idle = strong.seq.load(Ordering::Relaxed)
                    == strong.committed_seq.load(Ordering::Relaxed);
                if idle && strong.dead.lock().is_empty() {
                    continue;
                }
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

impl Inner {
    /// Punches what durable commits left dead; `idle` includes the active segment.
    fn drain_reclaim(&self, idle: bool, retain: bool) {
        let dead = std::mem::take(&mut *self.reclaim_queue.lock());
        if let Err(e) = self.segments.reclaim(&dead, retain, idle) {
            tracing::warn!(error = %e, "reclaiming space failed");
        }
    }

    pub fn check_poisoned(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Relaxed) {
            Err(Error::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Marks the store failed: no more writes until it is reopened.
    pub fn poison(&self, e: Error) -> Error {
        if !matches!(e, Error::NoSpace) {
            tracing::error!(error = %e, "IO failure; store refuses writes until reopened");
            self.poisoned.store(true, Ordering::Relaxed);
        }
        e
    }

    /// Records that `bytes` of data were written, waking the committer when enough piled up.
    pub fn note_dirty(&self, bytes: u64) {
        let before = self.dirty_bytes.fetch_add(bytes, Ordering::Relaxed);
        if before < DIRTY_COMMIT_BYTES && before + bytes >= DIRTY_COMMIT_BYTES {
            self.wake.1.notify_all();
        }
    }

    /// Commits with the commit lock taken here.
    pub fn commit(&self, extra: Vec<DbOp>) -> Result<()> {
        let guard = self.commit.lock();
        self.commit_locked(&guard, extra)
    }

    /// The commit protocol: snapshot the dirty map under the gate, make the data it points at
    /// durable, write the map and `extra` in one synced RocksDB batch, then reclaim what the
    /// batch stopped referencing.
    pub fn commit_locked(
        &self,
        _commit: &parking_lot::MutexGuard<'_, ()>,
        extra: Vec<DbOp>,
    ) -> Result<()> {
        self.check_poisoned()?;
        let mut ops = extra;
        let (state, dead, syncs, generation) = {
            let cat = self.catalog.lock();
            let _gate = self.gate.write();
            let generation = self.journal.rotate().map_err(|e| self.poison(e))?;
            for vol in cat.volumes.values() {
                let mut map = vol.map.write();
                let HeadMap {
                    layer, tree, dirty, ..
                } = &mut *map;
                for idx in dirty.drain() {
                    ops.push(DbOp::Leaf(*layer, idx, tree.shared_leaf(idx)));
                }
            }
            let state = StateRecord {
                committed_seq: self.seq.load(Ordering::Relaxed),
                next_layer: cat.next_layer,
                next_volume: cat.next_volume,
                next_segment: self.segments.next_id(),
            };
            self.dirty_bytes.store(0, Ordering::Relaxed);
            (
                state,
                std::mem::take(&mut *self.dead.lock()),
                self.segments.take_unsynced(),
                generation,
            )
        };
        for done in self.segments.engine().submit(syncs) {
            done.result
                .map_err(|e| self.poison(Error::io("syncing data", e)))?;
        }
        let batch = self.build_batch(ops, &state)?;
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db
            .write_opt(batch, &wo)
            .map_err(|e| self.poison(Error::Db(e)))?;
        self.committed_seq
            .store(state.committed_seq, Ordering::Relaxed);
        self.journal.remove_before(generation)?;
        if self.background.load(Ordering::Relaxed) {
            // Punching can wait on the device; the committer thread does it off the caller's path.
            self.reclaim_queue.lock().extend(dead);
            self.wake.1.notify_all();
            Ok(())
        } else {
            // No committer to punch later: freed pages beyond the reuse cap are punched now.
            self.segments.reclaim(&dead, true, true)
        }
    }

    fn build_batch(&self, ops: Vec<DbOp>, state: &StateRecord) -> Result<WriteBatch> {
        let mut b = WriteBatch::default();
        for op in ops {
            match op {
                DbOp::Put(c, k, v) => b.put_cf(cf(&self.db, c)?, k, v),
                DbOp::Delete(c, k) => b.delete_cf(cf(&self.db, c)?, k),
                DbOp::DeleteRange(c, from, to) => b.delete_range_cf(cf(&self.db, c)?, from, to),
                DbOp::Leaf(layer, idx, leaf) => {
                    let v = match &leaf {
                        Some(l) => codec::encode_leaf(l.leaf()),
                        None => codec::encode_leaf(&Default::default()),
                    };
                    b.put_cf(
                        cf(&self.db, codec::CF_LEAVES)?,
                        codec::leaf_key(layer, 0, idx),
                        v,
                    );
                }
            }
        }
        b.put_cf(
            cf(&self.db, codec::CF_META)?,
            codec::KEY_STATE,
            state.encode(),
        );
        Ok(b)
    }

    /// Adds records that lost their last reference; they are punched after the next commit.
    pub fn release(&self, entries: impl IntoIterator<Item = Entry>) {
        let mut dead = Vec::new();
        for e in entries {
            if self.segments.decref(&e) {
                self.segments.mark_dead(&e);
                dead.push(e);
            }
        }
        if !dead.is_empty() {
            self.dead.lock().extend(dead);
        }
    }

    /// Drops every leaf record a layer owns (its entries lose one reference each).
    pub fn release_layer(&self, tree: &Tree, own: &HashSet<u64>) {
        for idx in own {
            if let Some(leaf) = tree.leaf(*idx) {
                self.release(leaf.entries().iter().copied());
            }
        }
    }

    pub fn volume_record(vol: &VolumeState, head: u64) -> DbOp {
        let rec = VolumeRecord {
            id: vol.id,
            size: vol.size(),
            block_size: vol.block_size,
            lz4: vol.lz4,
            ephemeral: vol.ephemeral,
            tree: vol.tree,
            head,
            created_unix: vol.created_unix,
        };
        DbOp::Put(
            codec::CF_VOLUMES,
            vol.name.as_bytes().to_vec(),
            rec.encode(),
        )
    }

    pub fn layer_record(id: u64, rec: codec::LayerRecord) -> DbOp {
        DbOp::Put(
            codec::CF_LAYERS,
            codec::layer_key(id).to_vec(),
            rec.encode(),
        )
    }

    pub fn delete_layer_ops(id: u64) -> [DbOp; 2] {
        [
            DbOp::Delete(codec::CF_LAYERS, codec::layer_key(id).to_vec()),
            DbOp::DeleteRange(
                codec::CF_LEAVES,
                codec::leaf_key(id, 0, 0).to_vec(),
                codec::leaf_key(id + 1, 0, 0).to_vec(),
            ),
        ]
    }
}
