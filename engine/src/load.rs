//! Opening a store and loading maps.
//!
//! * At open, only the catalog is read ([`load_catalog`]): volumes, checkpoints and the layer
//!   tree, with each layer's mapped-block count. That is O(volumes + checkpoints), not O(data).
//! * A layer's map is built when something needs it ([`layer_tree`], [`ensure_loaded`]): its
//!   parent's map (an O(1) clone, loaded first if needed) with the layer's own chunk records
//!   laid over it, read from a RocksDB snapshot outside every lock, so loading one volume
//!   never holds up another volume's IO or commits.
//! * The journal is replayed into the heads it names ([`replay`]).
//! * What the committed maps reference is counted in the background ([`count_references`]):
//!   until it finishes, freed space is held back rather than reused (see `segment.rs`).

use crate::catalog::{CheckpointMeta, FrozenLayer, HeadMap, VolumeState};
use crate::codec::{
    self, CheckpointRecord, ExtentKey, JournalEntry, LayerRecord, StateRecord, VolumeRecord,
};
use crate::inner::{cf, Inner};
use crate::map::{Chunk, Loc, Tree, CHUNK_BLOCKS};
use crate::volume::{apply_changes, Change};
use crate::{Error, Result};
use rocksdb::{Direction, IteratorMode};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// How often a map load is retried when a metadata operation rewrote one of its layers
/// meanwhile.
const MAX_LOAD_ATTEMPTS: usize = 16;

fn scan<T>(
    inner: &Inner,
    cf_name: &str,
    mut f: impl FnMut(&[u8], &[u8]) -> Result<T>,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for item in inner
        .db
        .iterator_cf(cf(&inner.db, cf_name)?, IteratorMode::Start)
    {
        let (k, v) = item?;
        out.push(f(&k, &v)?);
    }
    Ok(out)
}

/// Reads volumes, checkpoints and layers into the catalog. No map is loaded.
pub(crate) fn load_catalog(inner: &Inner, state: &StateRecord) -> Result<()> {
    let layers: HashMap<u64, LayerRecord> = scan(inner, codec::CF_LAYERS, |k, v| {
        Ok((codec::decode_u64_key(k)?, LayerRecord::decode(v)?))
    })?
    .into_iter()
    .collect();
    let volumes = scan(inner, codec::CF_VOLUMES, |k, v| {
        let name =
            String::from_utf8(k.to_vec()).map_err(|_| Error::Corrupt("volume name".into()))?;
        Ok((name, VolumeRecord::decode(v)?))
    })?;
    let checkpoints = scan(inner, codec::CF_CHECKPOINTS, |k, v| {
        Ok((
            codec::decode_checkpoint_key(k)?,
            CheckpointRecord::decode(v)?,
        ))
    })?;
    let mut cat = inner.catalog.lock();
    cat.next_layer = state
        .next_layer
        .max(layers.keys().max().map_or(1, |m| m + 1));
    cat.next_volume = state
        .next_volume
        .max(volumes.iter().map(|(_, r)| r.id + 1).max().unwrap_or(1));
    let mut heads = std::collections::HashSet::new();
    for (name, rec) in &volumes {
        let l = layers
            .get(&rec.head)
            .ok_or_else(|| Error::Corrupt(format!("volume {name} has no head layer")))?;
        heads.insert(rec.head);
        let head = HeadMap::unloaded(rec.head, l.parent, l.mapped_blocks);
        cat.volumes.insert(
            name.clone(),
            Arc::new(VolumeState::new(
                rec,
                name.clone(),
                head,
                inner.remote.any(),
            )),
        );
    }
    for ((vid, name), rec) in checkpoints {
        cat.checkpoints.insert(
            (vid, name),
            CheckpointMeta {
                layer: rec.layer,
                size: rec.size,
                created_unix: rec.created_unix,
                pins: Default::default(),
            },
        );
    }
    for (id, l) in &layers {
        if heads.contains(id) {
            continue;
        }
        cat.frozen.insert(
            *id,
            FrozenLayer {
                parent: l.parent,
                volume: l.volume,
                tree: None,
                mapped_blocks: l.mapped_blocks,
            },
        );
    }
    Ok(())
}

/// What a load reads, planned under the locks.
struct Plan {
    /// Layers to build, target first, each with its generation at planning time.
    chain: Vec<(u64, u64)>,
    /// The map of the nearest loaded ancestor, if any.
    base: Option<Tree>,
    /// Blocks the target's volume addresses, and pages per block.
    blocks: u64,
    ppb: u32,
}

fn plan(inner: &Inner, layer: u64) -> Result<std::result::Result<Tree, Plan>> {
    let cat = inner.catalog.lock();
    if let Some(t) = cat.loaded_tree(layer) {
        return Ok(Ok(t));
    }
    let volume_of = |l: u64| -> Option<&Arc<VolumeState>> {
        match cat.frozen.get(&l) {
            Some(f) => cat.volume_by_id(f.volume),
            None => cat.head_of(l),
        }
    };
    let vol = volume_of(layer)
        .ok_or_else(|| Error::Corrupt(format!("layer {layer} belongs to no volume")))?;
    let (mut blocks, ppb) = (vol.blocks(), vol.ppb());
    let mut chain = Vec::new();
    let mut at = layer;
    let base = loop {
        if let Some(t) = cat.loaded_tree(at) {
            break Some(t);
        }
        if chain.len() > cat.frozen.len() + cat.volumes.len() {
            return Err(Error::Corrupt("layer parents form a cycle".into()));
        }
        chain.push((at, cat.layer_gen(at)));
        if let Some(v) = volume_of(at) {
            blocks = blocks.max(v.blocks());
        }
        match cat.parent_of(at) {
            Some(0) | None => break None,
            Some(p) => at = p,
        }
    };
    // Checkpoints may be larger than their volume now is (a restore to an older size).
    for ck in cat.checkpoints.values() {
        if chain.iter().any(|(l, _)| *l == ck.layer) {
            blocks = blocks.max(ck.size.div_ceil(u64::from(vol.block_size)));
        }
    }
    Ok(Err(Plan {
        chain,
        base,
        blocks,
        ppb,
    }))
}

/// The map of `layer` (frozen or a head), loading it and any unloaded ancestors from RocksDB
/// first. O(1) once loaded.
pub(crate) fn layer_tree(inner: &Inner, layer: u64) -> Result<Tree> {
    for _ in 0..MAX_LOAD_ATTEMPTS {
        // A RocksDB snapshot taken under the commit lock matches the catalog: every metadata
        // operation holds that lock from its change in memory to its commit.
        let (plan, snapshot) = {
            let _c = inner.commit.lock();
            match plan(inner, layer)? {
                Ok(t) => return Ok(t),
                Err(p) => (p, inner.db.snapshot()),
            }
        };
        let mut tree = plan
            .base
            .clone()
            .unwrap_or_else(|| Tree::new(plan.blocks, plan.ppb));
        let mut built = Vec::with_capacity(plan.chain.len());
        for &(l, gen) in plan.chain.iter().rev() {
            tree.reserve(plan.blocks);
            read_own_chunks(inner, &snapshot, l, &mut tree)?;
            built.push((l, gen, tree.clone()));
        }
        drop(snapshot);
        if install(inner, built) {
            return Ok(tree);
        }
    }
    Err(Error::Corrupt(format!(
        "the records of layer {layer} kept changing while its map was loaded"
    )))
}

/// Puts freshly built maps in the catalog; false when a layer's records changed since the
/// snapshot they were read from (the caller loads again).
fn install(inner: &Inner, built: Vec<(u64, u64, Tree)>) -> bool {
    let mut cat = inner.catalog.lock();
    if built.iter().any(|(l, gen, _)| cat.layer_gen(*l) != *gen) {
        return false;
    }
    for (l, _, t) in built {
        if let Some(f) = cat.frozen.get_mut(&l) {
            f.mapped_blocks = t.mapped_blocks();
            f.tree.get_or_insert(t);
            continue;
        }
        if let Some(v) = cat.head_of(l) {
            let mut m = v.map.write();
            if !m.loaded {
                let remote = inner.remote.any() && t.extents().any(|e| e.loc.is_remote());
                v.maybe_remote.store(remote, Ordering::Relaxed);
                let mapped = t.mapped_blocks();
                *m = HeadMap::loaded(m.layer, m.parent, t, mapped);
            }
        }
    }
    true
}

/// Lays `layer`'s own chunk records (from `snap`) over `tree`.
fn read_own_chunks(
    inner: &Inner,
    snap: &rocksdb::Snapshot<'_>,
    layer: u64,
    tree: &mut Tree,
) -> Result<()> {
    let (from, to) = codec::layer_extent_range(layer);
    let mut chunks: BTreeMap<u64, Chunk> = BTreeMap::new();
    let iter = snap.iterator_cf(
        cf(&inner.db, codec::CF_EXTENTS)?,
        IteratorMode::From(&from, Direction::Forward),
    );
    for item in iter {
        let (k, v) = item?;
        if k[..] >= to[..] {
            break;
        }
        let (_, object, key) = codec::decode_extent_key(&k)?;
        if object != 0 {
            return Err(Error::Corrupt(format!(
                "layer {layer} has records of object {object}"
            )));
        }
        match key {
            ExtentKey::Chunk { idx } => {
                codec::decode_chunk_marker(&v)?;
                chunks.insert(idx, Chunk::new(layer));
            }
            ExtentKey::Extent { start } => {
                let (len, loc) = codec::decode_extent(start, &v)?;
                let idx = start / CHUNK_BLOCKS;
                let c = chunks.get_mut(&idx).ok_or_else(|| {
                    Error::Corrupt(format!(
                        "layer {layer} has an extent at block {start} outside its chunks"
                    ))
                })?;
                if !c.push_loaded(start % CHUNK_BLOCKS, len, loc) {
                    return Err(Error::Corrupt(format!(
                        "layer {layer} has overlapping extents at block {start}"
                    )));
                }
            }
        }
    }
    for (idx, c) in chunks {
        tree.reserve((idx + 1) * CHUNK_BLOCKS);
        tree.set_chunk(idx, c);
    }
    Ok(())
}

/// Makes sure `vol`'s head map is loaded (a restore or checkpoint meanwhile may move the head:
/// loads until the current one is).
pub(crate) fn ensure_loaded(inner: &Inner, vol: &VolumeState) -> Result<()> {
    for _ in 0..MAX_LOAD_ATTEMPTS {
        let layer = {
            let m = vol.map.read();
            if m.loaded {
                return Ok(());
            }
            m.layer
        };
        if vol.deleted.load(Ordering::Relaxed) {
            return Err(Error::NoSuchVolume(vol.name.clone()));
        }
        layer_tree(inner, layer)?;
    }
    Err(Error::Corrupt(format!(
        "the map of volume {} could not be loaded",
        vol.name
    )))
}

/// Applies journal entries newer than the last commit whose data verifies, a group (the
/// entries of one install) at a time: a group with a missing entry or a record that does not
/// verify is dropped whole, so a multi-extent change is never half-replayed. Volumes the
/// journal names are loaded.
pub(crate) fn replay(inner: &Inner, committed: u64, journal: Vec<JournalEntry>) -> Result<usize> {
    let mut applied = 0;
    let mut max_seq = committed;
    let journal: Vec<JournalEntry> = journal.into_iter().filter(|j| j.seq > committed).collect();
    let mut i = 0;
    while i < journal.len() {
        let head = journal[i];
        let end = group_end(&journal, i);
        let group = &journal[i..end.unwrap_or(i + 1)];
        for j in group {
            max_seq = max_seq.max(j.seq);
        }
        i += group.len();
        if end.is_none() {
            continue;
        }
        let vol = inner.catalog.lock().head_of(head.layer).cloned();
        let Some(vol) = vol else { continue };
        ensure_loaded(inner, &vol)?;
        let ppb = vol.ppb();
        let loc_of = |j: &JournalEntry| -> Option<Loc> {
            let l = j.loc?;
            Some(if j.v1 && !l.is_remote() {
                Loc::inline(l.segment, l.page, l.stored_len(), l.is_lz4(), j.check)
            } else {
                l
            })
        };
        let ok = group.iter().all(|j| {
            j.layer == head.layer
                && j.count > 0
                && j.block + u64::from(j.count) <= vol.blocks()
                && loc_of(j).is_none_or(|l| entry_verifies(inner, &l, j, ppb, vol.block_size))
        });
        if !ok {
            continue;
        }
        let _gate = inner.gate.read();
        let mut map = vol.map.write();
        for j in group {
            let loc = loc_of(j);
            if let Some(l) = loc {
                // The record may sit only in the page cache (a process crash); the commit
                // that ends the open must sync it before its mapping goes to RocksDB.
                if let Some(seg) = inner.segments.get(l.segment) {
                    inner.segments.mark_written(&seg);
                }
                if l.is_remote() {
                    vol.maybe_remote.store(true, Ordering::Relaxed);
                }
            }
            let change = Change {
                block: j.block,
                count: u64::from(j.count),
                new: loc,
                expect: None,
                check: j.check,
            };
            apply_changes(inner, &vol, &mut map, &[change]);
            applied += 1;
        }
    }
    // Sequence numbers keep growing past anything seen, committed or not.
    inner.seq.fetch_max(max_seq, Ordering::Relaxed);
    Ok(applied)
}

/// The end of the group starting at `i` when it is complete (index 0, then consecutive
/// sequence numbers and indexes until an entry without `more`).
fn group_end(journal: &[JournalEntry], i: usize) -> Option<usize> {
    let mut last = journal[i];
    if last.index != 0 {
        return None;
    }
    let mut end = i + 1;
    while last.more {
        let n = journal.get(end)?;
        if n.seq != last.seq + 1 || n.index != last.index + 1 {
            return None;
        }
        last = *n;
        end += 1;
    }
    Some(end)
}

fn entry_verifies(inner: &Inner, l: &Loc, j: &JournalEntry, ppb: u32, block_size: u32) -> bool {
    if l.is_remote() {
        // A remote record has no local bytes: it is verified when fetched.
        return j.count == 1
            && inner.remote.has_pack(l.segment - crate::map::REMOTE_BASE)
            && l.stored_len() > 0
            && l.stored_len() <= block_size;
    }
    if !l.is_raw() && (j.count != 1 || l.stored_len() == 0 || l.stored_len() > block_size) {
        return false;
    }
    crate::record::verifies(&inner.segments, l, u64::from(j.count), ppb, j.check)
}

/// Pages per block of every layer's volume, for counting references by layer.
pub(crate) fn layer_ppb(inner: &Inner) -> HashMap<u64, u32> {
    layer_ppb_of(&inner.catalog.lock())
}

/// [`layer_ppb`] with the catalog already locked.
pub(crate) fn layer_ppb_of(cat: &crate::catalog::Catalog) -> HashMap<u64, u32> {
    let mut out = HashMap::new();
    for v in cat.volumes.values() {
        out.insert(v.map.read().layer, v.ppb());
    }
    for (id, f) in &cat.frozen {
        if let Some(v) = cat.volume_by_id(f.volume) {
            out.insert(*id, v.ppb());
        }
    }
    out
}

/// Counts, from `snap` (the committed state at open), every page each layer's own extents
/// reference, then ends counting (`Segments::finish_counting`): from then on freed space is
/// reused and returned, and space figures are exact.
pub(crate) fn count_references(
    inner: &Inner,
    snap: &rocksdb::Snapshot<'_>,
    ppb: &HashMap<u64, u32>,
) -> Result<u64> {
    let mut extents = 0u64;
    for item in snap.iterator_cf(cf(&inner.db, codec::CF_EXTENTS)?, IteratorMode::Start) {
        let (k, v) = item?;
        let (layer, _, key) = codec::decode_extent_key(&k)?;
        let ExtentKey::Extent { start } = key else {
            continue;
        };
        let (len, loc) = codec::decode_extent(start, &v)?;
        if loc.is_remote() {
            continue;
        }
        let Some(&p) = ppb.get(&layer) else {
            return Err(Error::Corrupt(format!(
                "extent records of unknown layer {layer}"
            )));
        };
        inner
            .segments
            .count_base(loc.segment, loc.page, loc.pages(len, p));
        extents += 1;
    }
    let dead = inner.segments.finish_counting()?;
    inner.dead.lock().extend(dead);
    Ok(extents)
}
