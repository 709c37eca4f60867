//! The store's shared state and the commit protocol.
//!
//! Lock order, outermost first: `commit` → `catalog` → `gate` → a volume's `map`, and
//! `gate` → `sync`.
//! Writers hold `gate` shared while they change a map and write its journal entries; a
//! commit holds it exclusively for the moment it takes its snapshot, so every journal entry
//! with a sequence number up to the snapshot's is in that commit and none after it is, and a
//! flush holds it exclusively for the moment it decides what it syncs, so every write
//! acknowledged before the flush has its journal entry in a file the flush syncs.

use crate::catalog::{Catalog, HeadMap, VolumeState};
use crate::codec::{self, ExtentKey, LayerRecord, StateRecord};
use crate::journal::Journal;
use crate::map::{Extent, Loc, SharedChunk, Tree, CHUNK_BLOCKS};
use crate::segment::{PageRun, Segments};
use crate::{Error, Result};
use parking_lot::{Condvar, Mutex, RwLock};
use rocksdb::{WriteBatch, WriteOptions, DB};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Commit once this much data written since the last commit is still referenced (pages
/// reused before a commit no longer count): bounds what a replay after a crash reads and
/// verifies (see docs/design/durability.md, "Commit policy").
pub(crate) const DIRTY_COMMIT_BYTES: u64 = 2 << 30;
/// Commit once this many journal entries were written since the last commit (64 MiB of
/// journal).
pub(crate) const JOURNAL_COMMIT_ENTRIES: u64 = 1 << 20;
/// Data written since writeback was last started that makes the committer start it again
/// (see [`crate::segment::Segments::start_writeback`]).
pub(crate) const WRITEBACK_KICK_BYTES: u64 = 32 << 20;
/// Fresh dead pages (64 KiB) that make a writer hand them back for reuse.
const FRESH_RECLAIM_PAGES: u64 = 16;

/// A RocksDB change carried by a commit.
#[derive(Debug)]
pub(crate) enum DbOp {
    Put(&'static str, Vec<u8>, Vec<u8>),
    Delete(&'static str, Vec<u8>),
    DeleteRange(&'static str, Vec<u8>, Vec<u8>),
    /// Chunk `idx` of `layer` is now `new` (the layer's own record); `old` is what RocksDB
    /// holds for it, `None` when the layer had no record of that chunk yet.
    Chunk {
        layer: u64,
        idx: u64,
        old: Option<SharedChunk>,
        new: SharedChunk,
    },
}

/// Whether the store has finished counting what its maps reference (`load.rs`).
#[derive(Debug, Default)]
pub(crate) struct SpaceReady {
    pub done: Mutex<bool>,
    pub cv: Condvar,
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
    /// Page runs whose last reference went away since the last commit snapshot.
    pub dead: Mutex<Vec<PageRun>>,
    /// Held from taking the segments' unsynced marks to the end of their sync, by commits
    /// and flushes alike: a commit never finds a segment's data "synced" while another
    /// thread's sync of it is still running.
    pub sync: Mutex<()>,
    /// Freed bytes awaiting a commit that make one due (`StoreOptions::dead_commit_bytes`).
    pub dead_commit_bytes: u64,
    /// Flushes may sync the journal instead of committing.
    pub journal_flush: bool,
    /// Fresh dead pages were handed back for reuse since the last commit: a journal entry
    /// the next flush would make durable may name pages that now hold other data, so that
    /// flush commits instead (set and cleared under the `fresh_dead` lock).
    pub fresh_reused: AtomicBool,
    /// Dead runs that no durable map references (allocated since the last commit
    /// snapshot): reusable without a commit, once no reader can still hold them.
    pub fresh_dead: Mutex<(Vec<PageRun>, u64)>,
    /// Journal entries written since the last commit snapshot.
    pub journal_entries: AtomicU64,
    /// When the oldest change not yet committed was made (ms since open; 0 = none).
    pub dirty_since_ms: AtomicU64,
    pub opened: std::time::Instant,
    pub poisoned: AtomicBool,
    pub dirty_bytes: AtomicU64,
    /// Bytes written since writeback was last started.
    pub unkicked_bytes: AtomicU64,
    /// `seq` as of the last completed commit.
    pub committed_seq: AtomicU64,
    /// Dead runs of durable commits, waiting for the committer thread to punch them.
    pub reclaim_queue: Mutex<Vec<PageRun>>,
    /// True while the committer thread runs.
    pub background: AtomicBool,
    pub wake: (Mutex<bool>, Condvar),
    /// Remote packs and the fetcher for lazily restored volumes.
    pub remote: crate::remote::Remotes,
    /// The reserve and the low-space state (see [`crate::space`]).
    pub reserve: Arc<crate::space::Reserve>,
    pub space: SpaceReady,
    pub defrag: crate::defrag::Defrag,
}

pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily> {
    db.cf_handle(name)
        .ok_or_else(|| Error::Corrupt(format!("column family {name} is missing")))
}

impl Inner {
    /// Punches what durable commits left dead; `idle` includes the active segment.
    pub fn drain_reclaim(&self, punch: crate::segment::Punch) {
        let dead = std::mem::take(&mut *self.reclaim_queue.lock());
        if let Err(e) = self.segments.reclaim(&dead, punch) {
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
        if matches!(e, Error::NoSpace) {
            self.reserve.on_full();
            self.wake.1.notify_all();
        } else {
            tracing::error!(error = %e, "IO failure; store refuses writes until reopened");
            self.poisoned.store(true, Ordering::Relaxed);
        }
        e
    }

    /// Records that `bytes` of data were written, waking the committer when enough piled up.
    pub fn note_dirty(&self, bytes: u64) {
        let before = self.dirty_bytes.fetch_add(bytes, Ordering::Relaxed);
        let unkicked = self.unkicked_bytes.fetch_add(bytes, Ordering::Relaxed);
        if (before < DIRTY_COMMIT_BYTES && before + bytes >= DIRTY_COMMIT_BYTES)
            || (unkicked < WRITEBACK_KICK_BYTES && unkicked + bytes >= WRITEBACK_KICK_BYTES)
        {
            self.wake.1.notify_all();
        }
    }

    /// Records `n` journal entries written, and when the first uncommitted change came.
    pub fn note_journal(&self, n: u64) {
        let before = self.journal_entries.fetch_add(n, Ordering::Relaxed);
        if before < JOURNAL_COMMIT_ENTRIES && before + n >= JOURNAL_COMMIT_ENTRIES {
            self.wake.1.notify_all();
        }
        let now = self.opened.elapsed().as_millis() as u64 + 1;
        let _ = self
            .dirty_since_ms
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Whether the commit policy calls for a commit now (see docs/design/durability.md):
    /// enough data or journal since the last commit, or its oldest change older than
    /// `max_age`.
    pub fn commit_due(&self, max_age: std::time::Duration) -> bool {
        if self.dirty_bytes.load(Ordering::Relaxed) >= DIRTY_COMMIT_BYTES
            || self.journal_entries.load(Ordering::Relaxed) >= JOURNAL_COMMIT_ENTRIES
            || self.dead_pending_bytes() >= self.dead_commit_bytes
        {
            return true;
        }
        let since = self.dirty_since_ms.load(Ordering::Relaxed);
        since != 0
            && self.opened.elapsed().as_millis() as u64 + 1 - since >= max_age.as_millis() as u64
    }

    /// Hands fresh dead runs back for reuse once enough piled up (or `all`). Called with no
    /// lock held: reclaiming waits for in-flight readers.
    pub fn reuse_fresh(&self, all: bool) {
        let runs = {
            let mut f = self.fresh_dead.lock();
            if f.0.is_empty() || (!all && f.1 < FRESH_RECLAIM_PAGES) {
                return;
            }
            let pages = std::mem::take(&mut f.1);
            self.fresh_reused.store(true, Ordering::Relaxed);
            // Those records will not be replayed: they no longer count towards a commit.
            let bytes = pages * crate::map::PAGE_SIZE as u64;
            let _ = self
                .dirty_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(bytes))
                });
            std::mem::take(&mut f.0)
        };
        if let Err(e) = self.segments.reclaim(&runs, crate::segment::Punch::No) {
            tracing::warn!(error = %e, "reusing freed pages failed");
        }
    }

    /// Waits until every reference the committed maps hold is counted (right after open,
    /// a background pass does that): space figures are exact from then on.
    pub fn wait_space_counted(&self) {
        let mut done = self.space.done.lock();
        while !*done {
            self.space.cv.wait(&mut done);
        }
    }

    /// Adds `delta` references to the local pages of a run of `blocks` blocks at `loc`.
    pub fn reference(&self, loc: &Loc, blocks: u64, ppb: u32, delta: i32) {
        if loc.is_remote() {
            return;
        }
        let (mut dead, mut fresh) = (Vec::new(), Vec::new());
        self.segments.reference(
            loc.segment,
            loc.page,
            loc.pages(blocks, ppb),
            delta,
            &mut dead,
            &mut fresh,
        );
        if !dead.is_empty() {
            self.dead.lock().extend(dead);
        }
        self.add_fresh(fresh);
    }

    /// Dead runs no durable map references, for [`Inner::reuse_fresh`].
    pub fn add_fresh(&self, runs: Vec<PageRun>) {
        if runs.is_empty() {
            return;
        }
        let mut f = self.fresh_dead.lock();
        f.1 += runs.iter().map(|r| u64::from(r.pages)).sum::<u64>();
        f.0.extend(runs);
    }

    /// One more reference to each extent (a layer took over a chunk holding them), a
    /// segment's extents under one lock.
    pub fn reference_all(&self, extents: &[Extent], ppb: u32) {
        let mut by_seg: Vec<(u32, u32, u32)> = extents
            .iter()
            .filter(|e| !e.loc.is_remote())
            .map(|e| (e.loc.segment, e.loc.page, e.loc.pages(e.len, ppb)))
            .collect();
        by_seg.sort_unstable();
        let (mut dead, mut fresh) = (Vec::new(), Vec::new());
        for group in by_seg.chunk_by(|a, b| a.0 == b.0) {
            let ranges: Vec<(u32, u32)> = group.iter().map(|g| (g.1, g.2)).collect();
            self.segments
                .reference_many(group[0].0, &ranges, 1, &mut dead, &mut fresh);
        }
        if !dead.is_empty() {
            self.dead.lock().extend(dead);
        }
        self.add_fresh(fresh);
    }

    /// Drops the references of every chunk `layer` owns in `tree` (the layer is going away).
    pub fn release_layer(&self, tree: &Tree, layer: u64) {
        let ppb = tree.ppb();
        for (idx, c) in tree.owned(layer) {
            for e in c.extents(idx * CHUNK_BLOCKS) {
                self.reference(&e.loc, e.len, ppb, -1);
            }
        }
    }

    /// Commits with the commit lock taken here.
    pub fn commit(&self, extra: Vec<DbOp>) -> Result<()> {
        let guard = self.commit.lock();
        self.commit_locked(&guard, extra)
    }

    /// Bytes of freed pages that become reusable at the next commit.
    pub fn dead_pending_bytes(&self) -> u64 {
        let pages: u64 = self.dead.lock().iter().map(|r| u64::from(r.pages)).sum();
        pages * crate::map::PAGE_SIZE as u64
    }

    /// Makes every write acknowledged so far durable (a guest FLUSH, an `fsync`): syncs the
    /// data segments written since the last sync and the journal files holding their
    /// entries, without a commit — RocksDB work (chunk records, a synced batch) stays with
    /// the committer, off the flushing writer's path. Without a committer thread, or with
    /// `dead_commit_bytes` of freed pages waiting for one, it commits instead.
    /// docs/design/durability.md, "Flush".
    pub fn flush(&self) -> Result<()> {
        self.check_poisoned()?;
        if !self.journal_flush
            || (!self.background.load(Ordering::Relaxed)
                && self.dead_pending_bytes() >= self.dead_commit_bytes)
        {
            return self.commit(Vec::new());
        }
        let (mut ops, files, sync) = {
            let gate = self.gate.write();
            {
                let mut f = self.fresh_dead.lock();
                if self.fresh_reused.load(Ordering::Relaxed) {
                    // A record written since the last commit was reused after it died: its
                    // entries (and its group's) may no longer replay. Commit instead.
                    drop(f);
                    drop(gate);
                    return self.commit(Vec::new());
                }
                // Every record written so far may be named by an entry this flush makes
                // durable and be needed by a replay (its group's other records, blocks it
                // still maps): once dead, its pages wait for a commit like a committed
                // record's, and those already dead but not yet reused do too.
                self.segments.forget_fresh();
                let runs = std::mem::take(&mut f.0);
                f.1 = 0;
                if !runs.is_empty() {
                    self.dead.lock().extend(runs);
                }
            }
            let sync = self.sync.lock();
            (
                self.segments.take_unsynced(),
                self.journal.live_files(),
                sync,
            )
        };
        self.journal.sync_dir(&files).map_err(|e| self.poison(e))?;
        ops.extend(files.iter().map(|f| crate::io::Op::Sync {
            file: f.file.clone(),
        }));
        for done in self.segments.engine().submit(ops) {
            done.result
                .map_err(|e| self.poison(Error::io("syncing data and journal", e)))?;
        }
        drop(sync);
        Ok(())
    }

    /// The commit protocol: snapshot the dirty chunks under the gate, make the data they
    /// point at durable, write them and `extra` in one synced RocksDB batch, then reclaim
    /// what the batch stopped referencing.
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
                snapshot_dirty(vol, &mut ops);
            }
            let state = StateRecord {
                committed_seq: self.seq.load(Ordering::Relaxed),
                next_layer: cat.next_layer,
                next_volume: cat.next_volume,
                next_segment: self.segments.next_id(),
            };
            self.dirty_bytes.store(0, Ordering::Relaxed);
            self.journal_entries.store(0, Ordering::Relaxed);
            self.dirty_since_ms.store(0, Ordering::Relaxed);
            // Every record installed so far is in this snapshot: once it is durable, a dead
            // record's pages wait for the next commit again. Fresh runs already dead stay
            // reusable (the snapshot does not reference them).
            self.segments.forget_fresh();
            {
                let _f = self.fresh_dead.lock();
                self.fresh_reused.store(false, Ordering::Relaxed);
            }
            (
                state,
                std::mem::take(&mut *self.dead.lock()),
                (self.sync.lock(), self.segments.take_unsynced()),
                generation,
            )
        };
        let (sync, syncs) = syncs;
        for done in self.segments.engine().submit(syncs) {
            done.result
                .map_err(|e| self.poison(Error::io("syncing data", e)))?;
        }
        drop(sync);
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
            self.segments.reclaim(
                &dead,
                crate::segment::Punch::Large {
                    active: true,
                    budget: None,
                },
            )
        }
    }

    fn build_batch(&self, ops: Vec<DbOp>, state: &StateRecord) -> Result<WriteBatch> {
        let mut b = WriteBatch::default();
        let extents = cf(&self.db, codec::CF_EXTENTS)?;
        for op in ops {
            match op {
                DbOp::Put(c, k, v) => b.put_cf(cf(&self.db, c)?, k, v),
                DbOp::Delete(c, k) => b.delete_cf(cf(&self.db, c)?, k),
                DbOp::DeleteRange(c, from, to) => b.delete_range_cf(cf(&self.db, c)?, from, to),
                DbOp::Chunk {
                    layer,
                    idx,
                    old,
                    new,
                } => chunk_changes(&mut b, extents, layer, idx, old.as_ref(), &new),
            }
        }
        b.put_cf(
            cf(&self.db, codec::CF_META)?,
            codec::KEY_STATE,
            state.encode(),
        );
        Ok(b)
    }

    pub fn volume_record(vol: &VolumeState, head: u64) -> DbOp {
        DbOp::Put(
            codec::CF_VOLUMES,
            vol.name.as_bytes().to_vec(),
            vol.record(head).encode(),
        )
    }

    pub fn layer_record(id: u64, rec: LayerRecord) -> DbOp {
        DbOp::Put(
            codec::CF_LAYERS,
            codec::layer_key(id).to_vec(),
            rec.encode(),
        )
    }

    pub fn delete_layer_ops(id: u64) -> [DbOp; 2] {
        let (from, to) = codec::layer_extent_range(id);
        [
            DbOp::Delete(codec::CF_LAYERS, codec::layer_key(id).to_vec()),
            DbOp::DeleteRange(codec::CF_EXTENTS, from.to_vec(), to.to_vec()),
        ]
    }
}

/// Moves a loaded head's dirty chunks into `ops` and makes its committed map the current one.
pub(crate) fn snapshot_dirty(vol: &VolumeState, ops: &mut Vec<DbOp>) {
    snapshot_dirty_locked(vol.id, &mut vol.map.write(), ops);
}

/// [`snapshot_dirty`] with the volume's map lock already held (`map`): a caller that goes
/// on to change the map's layer must not let a write in between.
pub(crate) fn snapshot_dirty_locked(volume: u64, map: &mut HeadMap, ops: &mut Vec<DbOp>) {
    if !map.loaded || map.dirty.is_empty() {
        return;
    }
    let layer = map.layer;
    let mut dirty: Vec<u64> = map.dirty.drain().collect();
    dirty.sort_unstable();
    for idx in dirty {
        let Some(new) = map.tree.shared_chunk(idx) else {
            continue;
        };
        let old = map
            .committed
            .shared_chunk(idx)
            .filter(|c| c.chunk().owner() == layer);
        ops.push(DbOp::Chunk {
            layer,
            idx,
            old,
            new,
        });
    }
    ops.push(Inner::layer_record(
        layer,
        LayerRecord {
            parent: map.parent,
            volume,
            frozen: false,
            mapped_blocks: map.mapped_blocks,
        },
    ));
    map.committed = map.tree.clone();
}

/// The RocksDB changes that turn `old` (the layer's record of chunk `idx`, if any) into `new`:
/// only extents that differ are written or deleted.
fn chunk_changes(
    b: &mut WriteBatch,
    cf: &rocksdb::ColumnFamily,
    layer: u64,
    idx: u64,
    old: Option<&SharedChunk>,
    new: &SharedChunk,
) {
    let base = idx * CHUNK_BLOCKS;
    let key = |start: u64| codec::extent_key(layer, 0, ExtentKey::Extent { start });
    let put = |b: &mut WriteBatch, e: &Extent| {
        b.put_cf(cf, key(e.start), codec::encode_extent(e.len, &e.loc))
    };
    let newv: Vec<Extent> = new.chunk().extents(base).collect();
    let Some(old) = old else {
        b.put_cf(
            cf,
            codec::extent_key(layer, 0, ExtentKey::Chunk { idx }),
            codec::encode_chunk_marker(),
        );
        for e in &newv {
            put(b, e);
        }
        return;
    };
    if old.same(new) {
        return;
    }
    let oldv: Vec<Extent> = old.chunk().extents(base).collect();
    let (mut i, mut j) = (0, 0);
    while i < oldv.len() || j < newv.len() {
        match (oldv.get(i), newv.get(j)) {
            (Some(o), Some(n)) if o.start == n.start => {
                if o != n {
                    put(b, n);
                }
                i += 1;
                j += 1;
            }
            (Some(o), Some(n)) if o.start < n.start => {
                b.delete_cf(cf, key(o.start));
                i += 1;
            }
            (Some(o), None) => {
                b.delete_cf(cf, key(o.start));
                i += 1;
            }
            (_, Some(n)) => {
                put(b, n);
                j += 1;
            }
            (None, None) => break,
        }
    }
}
