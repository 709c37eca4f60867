//! Metadata operations: volumes, checkpoints, restore, fork, diff and space accounting.
//!
//! Each operation changes the in-memory catalog under the commit lock and ends with a synced
//! commit carrying its RocksDB changes, so it is durable when it returns. Checkpoint, restore
//! and fork touch a fixed number of records and clone one map root (or none, for a volume
//! whose map is not loaded): O(1) in the size of the volume and of its map.
//!
//! A frozen layer's own records in RocksDB are complete (the checkpoint that froze it wrote
//! its dirty chunks), so operations on checkpoints read them from there; a head's records
//! lag its map until the next commit, so a loaded head is read from memory.

use crate::catalog::{Catalog, CheckpointMeta, FrozenLayer, HeadMap, VolumeState};
use crate::codec::{self, CheckpointRecord, ExtentKey, LayerRecord, VolumeRecord};
use crate::inner::{cf, snapshot_dirty_locked, DbOp, Inner};
use crate::map::{Chunk, Extent, Tree, CHUNK_BLOCKS};
use crate::volume::SECTOR;
use crate::{names, Error, Result, Volume};
use rocksdb::{Direction, IteratorMode};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Default block size of an uncompressed volume.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Default block size of an lz4 volume: compression saves whole 4 KiB pages, so it needs
/// blocks larger than one page to save anything.
pub const DEFAULT_LZ4_BLOCK_SIZE: u32 = 64 * 1024;
pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Largest volume: 2^50 bytes (1 PiB).
pub const MAX_VOLUME_SIZE: u64 = 1 << 50;
/// Size of every tree volume: the address space the filesystem format lays out (inode table,
/// directories, file contents; see docs/design/trees.md). Thin, so it costs nothing.
pub const TREE_VOLUME_SIZE: u64 = 1 << 62;

/// Options for a new volume.
#[derive(Clone, Copy, Debug, Default)]
pub struct VolumeOptions {
    /// Block size in bytes: a power of two from 4 KiB to 1 MiB. Default 4 KiB (64 KiB with lz4).
    pub block_size: Option<u32>,
    /// Store blocks lz4-compressed.
    pub lz4: bool,
    /// Delete the volume when its last handle closes, or at the next store open.
    pub ephemeral: bool,
    /// A sandbox tree volume: its size must be [`TREE_VOLUME_SIZE`] and its blocks hold a
    /// Strata filesystem (written by the FUSE frontend, not by the engine).
    pub tree: bool,
}

/// What `volume info` reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    pub lz4: bool,
    pub ephemeral: bool,
    /// A sandbox tree volume (served by `strata mount`, not as a disk).
    pub tree: bool,
    /// Bytes of the live volume that are mapped (not holes).
    pub mapped_bytes: u64,
    pub checkpoints: usize,
    /// `VOL@CKPT` the live volume descends from, if any.
    pub base: Option<String>,
    pub created_unix: u64,
    pub open_handles: usize,
}

/// What `checkpoint list` reports for one checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointInfo {
    pub volume: String,
    pub name: String,
    pub size: u64,
    pub mapped_bytes: u64,
    /// Bytes on disk only this checkpoint holds: what deleting it would free.
    pub exclusive_bytes: u64,
    /// The checkpoint this one descends from, as `VOL@CKPT`.
    pub parent: Option<String>,
    /// True for the checkpoint the live volume currently descends from.
    pub is_base: bool,
    pub created_unix: u64,
}

/// Either side of a diff.
#[derive(Clone, Copy, Debug)]
pub enum MapRef<'a> {
    Live(&'a str),
    Checkpoint(&'a str, &'a str),
}

/// A byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(SECTOR) {
        return Err(Error::InvalidArgument(format!(
            "size {size} must be a positive multiple of 512"
        )));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(Error::InvalidArgument(format!(
            "size {size} exceeds the 1 PiB limit"
        )));
    }
    Ok(())
}

fn ckpt_err(vol: &str, name: &str) -> Error {
    Error::NoSuchCheckpoint {
        volume: vol.to_string(),
        name: name.to_string(),
    }
}

pub(crate) fn create_volume(
    inner: &Inner,
    name: &str,
    size: u64,
    opts: VolumeOptions,
) -> Result<VolumeInfo> {
    names::validate("volume", name)?;
    let default_bs = if opts.lz4 {
        DEFAULT_LZ4_BLOCK_SIZE
    } else {
        DEFAULT_BLOCK_SIZE
    };
    let bs = opts.block_size.unwrap_or(default_bs);
    if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
        return Err(Error::InvalidArgument(format!(
            "block size {bs} must be a power of two from 4096 to 1048576"
        )));
    }
    if opts.tree {
        if size != TREE_VOLUME_SIZE || opts.block_size.is_some_and(|b| b != DEFAULT_BLOCK_SIZE) {
            return Err(Error::InvalidArgument(format!(
                "a tree volume has size {TREE_VOLUME_SIZE} and {DEFAULT_BLOCK_SIZE}-byte blocks"
            )));
        }
    } else {
        check_size(size)?;
    }
    inner.check_poisoned()?;
    let guard = inner.commit.lock();
    let ops = {
        let mut cat = inner.catalog.lock();
        if cat.volumes.contains_key(name) {
            return Err(Error::VolumeExists(name.to_string()));
        }
        let id = cat.next_volume;
        cat.next_volume += 1;
        let layer = cat.alloc_layer();
        let rec = VolumeRecord {
            id,
            size,
            block_size: bs,
            lz4: opts.lz4,
            ephemeral: opts.ephemeral,
            tree: opts.tree,
            head: layer,
            created_unix: crate::store::now_unix(),
        };
        let tree = Tree::new(
            size.div_ceil(u64::from(bs)),
            bs / crate::map::PAGE_SIZE as u32,
        );
        let vol = Arc::new(VolumeState::new(
            &rec,
            name.to_string(),
            HeadMap::loaded(layer, 0, tree, 0),
            false,
        ));
        cat.volumes.insert(name.to_string(), vol);
        vec![
            DbOp::Put(codec::CF_VOLUMES, name.as_bytes().to_vec(), rec.encode()),
            Inner::layer_record(
                layer,
                LayerRecord {
                    parent: 0,
                    volume: id,
                    frozen: false,
                    mapped_blocks: 0,
                },
            ),
        ]
    };
    inner.commit_locked(&guard, ops)?;
    drop(guard);
    volume_info(inner, name)
}

pub(crate) fn volume_info(inner: &Inner, name: &str) -> Result<VolumeInfo> {
    let cat = inner.catalog.lock();
    let vol = cat.volume(name)?;
    Ok(info_of(&cat, vol))
}

fn info_of(cat: &Catalog, vol: &VolumeState) -> VolumeInfo {
    let (mapped, parent) = {
        let m = vol.map.read();
        (m.mapped_blocks, m.parent)
    };
    VolumeInfo {
        name: vol.name.clone(),
        size: vol.size(),
        block_size: vol.block_size,
        lz4: vol.lz4,
        ephemeral: vol.ephemeral,
        tree: vol.tree,
        mapped_bytes: mapped * u64::from(vol.block_size),
        checkpoints: cat.checkpoints.keys().filter(|(v, _)| *v == vol.id).count(),
        base: checkpoint_ref(cat, parent),
        created_unix: vol.created_unix,
        open_handles: vol.handles.load(Ordering::Relaxed),
    }
}

/// `VOL@CKPT` naming the checkpoint whose layer is `layer`.
fn checkpoint_ref(cat: &Catalog, layer: u64) -> Option<String> {
    let ((vid, name), _) = cat.checkpoints.iter().find(|(_, c)| c.layer == layer)?;
    let vol = cat
        .volume_by_id(*vid)
        .map(|v| v.name.clone())
        .unwrap_or_else(|| format!("#{vid}"));
    Some(format!("{vol}@{name}"))
}

pub(crate) fn list_volumes(inner: &Inner) -> Vec<VolumeInfo> {
    let cat = inner.catalog.lock();
    let mut v: Vec<VolumeInfo> = cat.volumes.values().map(|vol| info_of(&cat, vol)).collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Opens a volume for IO, loading its map first if needed.
pub(crate) fn open_volume(inner: &Arc<Inner>, name: &str) -> Result<Volume> {
    let state = inner.catalog.lock().volume(name)?.clone();
    crate::load::ensure_loaded(inner, &state)?;
    state.handles.fetch_add(1, Ordering::Relaxed);
    if state.deleted.load(Ordering::Relaxed) {
        state.handles.fetch_sub(1, Ordering::Relaxed);
        return Err(Error::NoSuchVolume(name.to_string()));
    }
    Ok(Volume {
        inner: inner.clone(),
        state,
    })
}

pub(crate) fn grow_volume(inner: &Inner, name: &str, new_size: u64) -> Result<VolumeInfo> {
    inner.check_poisoned()?;
    let guard = inner.commit.lock();
    let ops = {
        let cat = inner.catalog.lock();
        let vol = cat.volume(name)?;
        check_size(new_size)?;
        if new_size < vol.size() {
            return Err(Error::InvalidArgument(format!(
                "volume {name} is {} bytes; shrinking to {new_size} is not supported",
                vol.size()
            )));
        }
        let mut map = vol.map.write();
        vol.set_size(new_size);
        let blocks = vol.blocks();
        map.tree.reserve(blocks);
        map.committed.reserve(blocks);
        vec![Inner::volume_record(vol, map.layer)]
    };
    inner.commit_locked(&guard, ops)?;
    drop(guard);
    volume_info(inner, name)
}

/// Layers whose parent is `layer`: (frozen layer ids, volumes whose head descends from it).
fn children(cat: &Catalog, layer: u64) -> (Vec<u64>, Vec<Arc<VolumeState>>) {
    let frozen = cat
        .frozen
        .iter()
        .filter(|(_, f)| f.parent == layer)
        .map(|(id, _)| *id)
        .collect();
    let heads = cat
        .volumes
        .values()
        .filter(|v| v.map.read().parent == layer)
        .cloned()
        .collect();
    (frozen, heads)
}

/// A layer's own chunk records as RocksDB holds them: chunk index → its extents. Complete
/// for frozen layers and for heads whose map is not loaded.
pub(crate) fn own_chunks_db(inner: &Inner, layer: u64) -> Result<BTreeMap<u64, Vec<Extent>>> {
    let (from, to) = codec::layer_extent_range(layer);
    let mut out: BTreeMap<u64, Vec<Extent>> = BTreeMap::new();
    for item in inner.db.iterator_cf(
        cf(&inner.db, codec::CF_EXTENTS)?,
        IteratorMode::From(&from, Direction::Forward),
    ) {
        let (k, v) = item?;
        if k[..] >= to[..] {
            break;
        }
        match codec::decode_extent_key(&k)?.2 {
            ExtentKey::Chunk { idx } => {
                out.entry(idx).or_default();
            }
            ExtentKey::Extent { start } => {
                let (len, loc) = codec::decode_extent(start, &v)?;
                out.entry(start / CHUNK_BLOCKS)
                    .or_default()
                    .push(Extent { start, len, loc });
            }
        }
    }
    Ok(out)
}

/// Whether `layer` has its own record of chunk `idx`: from its map if loaded, else from
/// RocksDB.
fn owns_chunk(inner: &Inner, cat: &Catalog, layer: u64, idx: u64) -> Result<bool> {
    if let Some(t) = cat.loaded_tree(layer) {
        return Ok(t.chunk(idx).is_some_and(|c| c.owner() == layer));
    }
    let k = codec::extent_key(layer, 0, ExtentKey::Chunk { idx });
    Ok(inner
        .db
        .get_cf(cf(&inner.db, codec::CF_EXTENTS)?, k)?
        .is_some())
}

/// Drops the references a layer's own chunks hold: from its map if loaded, else from the
/// records RocksDB holds for it.
fn release_layer(inner: &Inner, tree: Option<&Tree>, layer: u64, ppb: u32) -> Result<()> {
    match tree {
        Some(t) => inner.release_layer(t, layer),
        None => {
            for exts in own_chunks_db(inner, layer)?.values() {
                for e in exts {
                    inner.reference(&e.loc, e.len, ppb, -1);
                }
            }
        }
    }
    Ok(())
}

/// Gives `child` its own copy of chunk `idx` (holding `exts`): the record in RocksDB, a
/// reference on each extent, and ownership in its map if loaded.
fn adopt(
    inner: &Inner,
    cat: &mut Catalog,
    child: u64,
    idx: u64,
    exts: &[Extent],
    ppb: u32,
    ops: &mut Vec<DbOp>,
) {
    let mut chunk = Chunk::new(child);
    for e in exts {
        chunk.push_loaded(e.start % CHUNK_BLOCKS, e.len, e.loc);
    }
    let mut tree = Tree::new((idx + 1) * CHUNK_BLOCKS, ppb);
    tree.set_chunk(idx, chunk);
    if let Some(new) = tree.shared_chunk(idx) {
        ops.push(DbOp::Chunk {
            layer: child,
            idx,
            old: None,
            new,
        });
    }
    inner.reference_all(exts, ppb);
    cat.touch_layer(child);
    let take = |t: &mut Tree| {
        t.reserve((idx + 1) * CHUNK_BLOCKS);
        let _ = t.edit(idx, child, |_, _| ());
    };
    if let Some(f) = cat.frozen.get_mut(&child) {
        if let Some(t) = f.tree.as_mut() {
            take(t);
        }
    } else if let Some(v) = cat.head_of(child) {
        let mut m = v.map.write();
        if m.loaded {
            take(&mut m.tree);
            take(&mut m.committed);
        }
    }
}

/// Removes frozen layer `id`, first giving each child its own copy of every chunk it
/// inherited from it. The layer's references are dropped here (they go dead with the commit
/// that carries `ops`).
fn remove_frozen_layer(
    cat: &mut Catalog,
    inner: &Inner,
    id: u64,
    ppb: u32,
    ops: &mut Vec<DbOp>,
) -> Result<()> {
    let Some(gone) = cat.frozen.remove(&id) else {
        return Ok(());
    };
    let own = own_chunks_db(inner, id)?;
    let (frozen_kids, head_kids) = children(cat, id);
    let kids: Vec<u64> = frozen_kids
        .iter()
        .copied()
        .chain(head_kids.iter().map(|v| v.map.read().layer))
        .collect();
    for kid in kids {
        for (idx, exts) in &own {
            if !owns_chunk(inner, cat, kid, *idx)? {
                adopt(inner, cat, kid, *idx, exts, ppb, ops);
            }
        }
    }
    for kid in frozen_kids {
        if let Some(f) = cat.frozen.get_mut(&kid) {
            f.parent = gone.parent;
            let rec = LayerRecord {
                parent: f.parent,
                volume: f.volume,
                frozen: true,
                mapped_blocks: f.mapped_blocks,
            };
            ops.push(Inner::layer_record(kid, rec));
        }
    }
    for vol in head_kids {
        let mut map = vol.map.write();
        map.parent = gone.parent;
        let rec = LayerRecord {
            parent: gone.parent,
            volume: vol.id,
            frozen: false,
            mapped_blocks: map.mapped_blocks,
        };
        ops.push(Inner::layer_record(map.layer, rec));
    }
    for exts in own.values() {
        for e in exts {
            inner.reference(&e.loc, e.len, ppb, -1);
        }
    }
    cat.touch_layer(id);
    ops.extend(Inner::delete_layer_ops(id));
    Ok(())
}

pub(crate) fn delete_volume(inner: &Inner, name: &str, internal: bool) -> Result<()> {
    inner.check_poisoned()?;
    let guard = inner.commit.lock();
    let mut ops = Vec::new();
    {
        let mut cat = inner.catalog.lock();
        let vol = cat.volume(name)?.clone();
        if !internal && vol.handles.load(Ordering::Relaxed) > 0 {
            return Err(Error::VolumeBusy(name.to_string()));
        }
        vol.deleted.store(true, Ordering::Relaxed);
        cat.volumes.remove(name);
        let (head, tree) = {
            let mut map = vol.map.write();
            map.dirty.clear();
            let tree = map.loaded.then(|| std::mem::take(&mut map.tree));
            (map.layer, tree)
        };
        release_layer(inner, tree.as_ref(), head, vol.ppb())?;
        cat.touch_layer(head);
        ops.extend(Inner::delete_layer_ops(head));
        // Delete checkpoints children-first so that chunk records are moved as little as
        // possible.
        let mut mine: Vec<(String, u64)> = cat
            .checkpoints
            .iter()
            .filter(|((v, _), _)| *v == vol.id)
            .map(|((_, n), c)| (n.clone(), c.layer))
            .collect();
        while !mine.is_empty() {
            let pick = mine
                .iter()
                .position(|(_, l)| {
                    !mine
                        .iter()
                        .any(|(_, o)| cat.frozen.get(o).is_some_and(|f| f.parent == *l))
                })
                .unwrap_or(0);
            let (ck, layer) = mine.swap_remove(pick);
            cat.checkpoints.remove(&(vol.id, ck.clone()));
            ops.push(DbOp::Delete(
                codec::CF_CHECKPOINTS,
                codec::checkpoint_key(vol.id, &ck),
            ));
            remove_frozen_layer(&mut cat, inner, layer, vol.ppb(), &mut ops)?;
        }
        ops.push(DbOp::Delete(codec::CF_VOLUMES, name.as_bytes().to_vec()));
    }
    inner.commit_locked(&guard, ops)
}

pub(crate) fn checkpoint(inner: &Inner, vol_name: &str, name: &str) -> Result<CheckpointInfo> {
    names::validate("checkpoint", name)?;
    inner.check_poisoned()?;
    let guard = inner.commit.lock();
    let ops = {
        let mut cat = inner.catalog.lock();
        let vol = cat.volume(vol_name)?.clone();
        if cat.checkpoints.contains_key(&(vol.id, name.to_string())) {
            return Err(Error::CheckpointExists {
                volume: vol_name.to_string(),
                name: name.to_string(),
            });
        }
        let new = cat.alloc_layer();
        let mut ops = Vec::new();
        let (old, frozen) = {
            // The head's dirty chunks go into this commit, under the same map lock as the
            // layer swap: the frozen layer's records are then exactly its map. (A write
            // between the two would change a chunk the frozen layer owns and leave its
            // records without it, and the commit would write that chunk under the new
            // head's key: the checkpoint loses the write after a restart, and deleting it
            // releases pages it no longer holds.)
            let mut map = vol.map.write();
            snapshot_dirty_locked(vol.id, &mut map, &mut ops);
            let old = map.layer;
            let frozen = FrozenLayer {
                parent: map.parent,
                volume: vol.id,
                tree: map.loaded.then(|| map.tree.clone()),
                mapped_blocks: map.mapped_blocks,
            };
            map.layer = new;
            map.parent = old;
            (old, frozen)
        };
        let size = vol.size();
        let created_unix = crate::store::now_unix();
        ops.push(Inner::layer_record(
            old,
            LayerRecord {
                parent: frozen.parent,
                volume: vol.id,
                frozen: true,
                mapped_blocks: frozen.mapped_blocks,
            },
        ));
        ops.push(Inner::layer_record(
            new,
            LayerRecord {
                parent: old,
                volume: vol.id,
                frozen: false,
                mapped_blocks: frozen.mapped_blocks,
            },
        ));
        ops.push(Inner::volume_record(&vol, new));
        let rec = CheckpointRecord {
            layer: old,
            size,
            created_unix,
        };
        ops.push(DbOp::Put(
            codec::CF_CHECKPOINTS,
            codec::checkpoint_key(vol.id, name),
            rec.encode(),
        ));
        cat.frozen.insert(old, frozen);
        cat.checkpoints.insert(
            (vol.id, name.to_string()),
            CheckpointMeta {
                layer: old,
                size,
                created_unix,
                pins: Default::default(),
            },
        );
        ops
    };
    inner.commit_locked(&guard, ops)?;
    drop(guard);
    let cat = inner.catalog.lock();
    let vol = cat.volume(vol_name)?.clone();
    checkpoint_info(&cat, inner, &vol, name)
}

fn find_checkpoint<'a>(
    cat: &'a Catalog,
    vol: &str,
    name: &str,
) -> Result<(&'a Arc<VolumeState>, &'a CheckpointMeta)> {
    let v = cat.volume(vol)?;
    let c = cat
        .checkpoints
        .get(&(v.id, name.to_string()))
        .ok_or_else(|| ckpt_err(vol, name))?;
    Ok((v, c))
}

/// The layer of checkpoint `vol@name`, and whether `vol`'s map is loaded.
fn checkpoint_layer(inner: &Inner, vol: &str, name: &str) -> Result<(u64, bool)> {
    let cat = inner.catalog.lock();
    let (v, c) = find_checkpoint(&cat, vol, name)?;
    let loaded = v.map.read().loaded;
    Ok((c.layer, loaded))
}

pub(crate) fn restore(inner: &Inner, vol_name: &str, name: &str) -> Result<()> {
    inner.check_poisoned()?;
    // A loaded volume stays loaded: its new map is the checkpoint's, loaded first (outside
    // the commit lock) if it is not yet.
    let (ck_layer, loaded) = checkpoint_layer(inner, vol_name, name)?;
    if loaded {
        crate::load::layer_tree(inner, ck_layer)?;
    }
    let guard = inner.commit.lock();
    let (ops, old) = {
        let mut cat = inner.catalog.lock();
        let new = cat.alloc_layer();
        let (vol, ck) = find_checkpoint(&cat, vol_name, name)?;
        let (vol, ck) = (vol.clone(), ck.clone());
        let frozen = cat
            .frozen
            .get(&ck.layer)
            .ok_or_else(|| Error::Corrupt(format!("checkpoint {vol_name}@{name} has no layer")))?;
        let mapped = frozen.mapped_blocks;
        let ck_tree = frozen.tree.clone();
        let mut map = vol.map.write();
        vol.set_size(ck.size);
        let old_layer = map.layer;
        let old_tree = map.loaded.then(|| std::mem::take(&mut map.tree));
        *map = match ck_tree {
            Some(mut t) if old_tree.is_some() => {
                t.reserve(vol.blocks());
                HeadMap::loaded(new, ck.layer, t, mapped)
            }
            _ => HeadMap::unloaded(new, ck.layer, mapped),
        };
        vol.maybe_remote
            .store(inner.remote.any(), Ordering::Relaxed);
        cat.touch_layer(old_layer);
        let mut ops: Vec<DbOp> = Inner::delete_layer_ops(old_layer).into();
        ops.push(Inner::layer_record(
            new,
            LayerRecord {
                parent: ck.layer,
                volume: vol.id,
                frozen: false,
                mapped_blocks: mapped,
            },
        ));
        ops.push(Inner::volume_record(&vol, new));
        drop(map);
        (ops, (old_layer, old_tree, vol.ppb()))
    };
    // The discarded head's records die with this commit (its RocksDB records are read
    // before the commit deletes them).
    let (old_layer, old_tree, ppb) = old;
    release_layer(inner, old_tree.as_ref(), old_layer, ppb)?;
    inner.commit_locked(&guard, ops)
}

pub(crate) fn fork(
    inner: &Inner,
    vol_name: &str,
    name: &str,
    new_name: &str,
    ephemeral: bool,
) -> Result<VolumeInfo> {
    names::validate("volume", new_name)?;
    inner.check_poisoned()?;
    let guard = inner.commit.lock();
    let ops = {
        let mut cat = inner.catalog.lock();
        if cat.volumes.contains_key(new_name) {
            return Err(Error::VolumeExists(new_name.to_string()));
        }
        let (src, ck) = find_checkpoint(&cat, vol_name, name)?;
        let (src, ck) = (src.clone(), ck.clone());
        let frozen = cat
            .frozen
            .get(&ck.layer)
            .ok_or_else(|| Error::Corrupt(format!("checkpoint {vol_name}@{name} has no layer")))?;
        let mapped_blocks = frozen.mapped_blocks;
        let tree = frozen.tree.clone();
        let id = cat.next_volume;
        cat.next_volume += 1;
        let layer = cat.alloc_layer();
        let rec = VolumeRecord {
            id,
            size: ck.size,
            block_size: src.block_size,
            lz4: src.lz4,
            ephemeral,
            tree: src.tree,
            head: layer,
            created_unix: crate::store::now_unix(),
        };
        let head = match tree {
            Some(mut t) => {
                t.reserve(ck.size.div_ceil(u64::from(src.block_size)));
                HeadMap::loaded(layer, ck.layer, t, mapped_blocks)
            }
            None => HeadMap::unloaded(layer, ck.layer, mapped_blocks),
        };
        cat.volumes.insert(
            new_name.to_string(),
            Arc::new(VolumeState::new(
                &rec,
                new_name.to_string(),
                head,
                inner.remote.any(),
            )),
        );
        vec![
            DbOp::Put(
                codec::CF_VOLUMES,
                new_name.as_bytes().to_vec(),
                rec.encode(),
            ),
            Inner::layer_record(
                layer,
                LayerRecord {
                    parent: ck.layer,
                    volume: id,
                    frozen: false,
                    mapped_blocks,
                },
            ),
        ]
    };
    inner.commit_locked(&guard, ops)?;
    drop(guard);
    volume_info(inner, new_name)
}

pub(crate) fn delete_checkpoint(inner: &Inner, vol_name: &str, name: &str) -> Result<()> {
    inner.check_poisoned()?;
    let guard = inner.commit.lock();
    let mut ops = Vec::new();
    {
        let mut cat = inner.catalog.lock();
        let (vol, ck) = find_checkpoint(&cat, vol_name, name)?;
        if ck.pins.load(Ordering::Acquire) > 0 {
            return Err(Error::CheckpointBusy {
                volume: vol_name.to_string(),
                name: name.to_string(),
            });
        }
        let (vid, layer, ppb) = (vol.id, ck.layer, vol.ppb());
        cat.checkpoints.remove(&(vid, name.to_string()));
        ops.push(DbOp::Delete(
            codec::CF_CHECKPOINTS,
            codec::checkpoint_key(vid, name),
        ));
        remove_frozen_layer(&mut cat, inner, layer, ppb, &mut ops)?;
    }
    inner.commit_locked(&guard, ops)
}

fn checkpoint_info(
    cat: &Catalog,
    inner: &Inner,
    vol: &VolumeState,
    name: &str,
) -> Result<CheckpointInfo> {
    let ck = cat
        .checkpoints
        .get(&(vol.id, name.to_string()))
        .ok_or_else(|| ckpt_err(&vol.name, name))?;
    let f = cat
        .frozen
        .get(&ck.layer)
        .ok_or_else(|| ckpt_err(&vol.name, name))?;
    Ok(CheckpointInfo {
        volume: vol.name.clone(),
        name: name.to_string(),
        size: ck.size,
        mapped_bytes: f.mapped_blocks * u64::from(vol.block_size),
        exclusive_bytes: exclusive_bytes(cat, inner, ck.layer, vol.ppb())?,
        parent: checkpoint_ref(cat, f.parent),
        is_base: vol.map.read().parent == ck.layer,
        created_unix: ck.created_unix,
    })
}

/// Whether `layer` has no chunk record of its own (cheap for loaded maps: the walk stops at
/// the first node the layer did not copy).
fn owns_nothing(inner: &Inner, cat: &Catalog, layer: u64) -> Result<bool> {
    if let Some(t) = cat.loaded_tree(layer) {
        return Ok(t.owned(layer).is_empty());
    }
    let (from, _) = codec::layer_extent_range(layer);
    let mut it = inner.db.iterator_cf(
        cf(&inner.db, codec::CF_EXTENTS)?,
        IteratorMode::From(&from, Direction::Forward),
    );
    Ok(match it.next() {
        Some(item) => codec::decode_extent_key(&item?.0)?.0 != layer,
        None => true,
    })
}

/// Bytes deleting frozen layer `layer` would free: pages of extents in chunks it owns that no
/// child inherits and that nothing else references. Exact once the store has counted its
/// references (waits for that).
fn exclusive_bytes(cat: &Catalog, inner: &Inner, layer: u64, ppb: u32) -> Result<u64> {
    if !cat.frozen.contains_key(&layer) {
        return Ok(0);
    }
    let (frozen_kids, head_kids) = children(cat, layer);
    let kids: Vec<u64> = frozen_kids
        .into_iter()
        .chain(head_kids.iter().map(|v| v.map.read().layer))
        .collect();
    // A child with no chunk of its own inherits everything (a checkpoint just taken).
    for k in &kids {
        if owns_nothing(inner, cat, *k)? {
            return Ok(0);
        }
    }
    inner.wait_space_counted();
    let mut bytes = 0u64;
    for (idx, exts) in own_chunks_db(inner, layer)? {
        let mut inherited = false;
        for k in &kids {
            if !owns_chunk(inner, cat, *k, idx)? {
                inherited = true;
                break;
            }
        }
        if inherited {
            continue;
        }
        for e in exts.iter().filter(|e| !e.loc.is_remote()) {
            if let Some(seg) = inner.segments.get(e.loc.segment) {
                let pages = seg.pages_with_count(e.loc.page, e.loc.pages(e.len, ppb), 1);
                bytes += u64::from(pages) * crate::map::PAGE_SIZE as u64;
            }
        }
    }
    Ok(bytes)
}

pub(crate) fn list_checkpoints(inner: &Inner, vol_name: &str) -> Result<Vec<CheckpointInfo>> {
    let cat = inner.catalog.lock();
    let vol = cat.volume(vol_name)?.clone();
    let names: Vec<String> = cat
        .checkpoints
        .keys()
        .filter(|(v, _)| *v == vol.id)
        .map(|(_, n)| n.clone())
        .collect();
    let mut out = names
        .iter()
        .map(|n| checkpoint_info(&cat, inner, &vol, n))
        .collect::<Result<Vec<_>>>()?;
    out.sort_by(|a, b| (a.created_unix, &a.name).cmp(&(b.created_unix, &b.name)));
    Ok(out)
}

/// A map a [`MapRef`] names: its tree (an O(1) clone) and geometry.
pub(crate) struct Resolved {
    pub tree: Tree,
    pub block_size: u32,
    /// The volume stores lz4-compressed records.
    pub lz4: bool,
    pub size: u64,
    /// The layer id (the head layer for a live volume).
    pub id: u64,
    /// For a checkpoint resolved with `pin`: its pin count, already incremented.
    pub pin: Option<Arc<std::sync::atomic::AtomicUsize>>,
}

/// Resolves `r`, loading its map if needed; with `pin`, a checkpoint is also pinned (under
/// the same lock, so it cannot be deleted in between) and the caller must unpin it.
pub(crate) fn resolve(inner: &Inner, r: MapRef<'_>, pin: bool) -> Result<Resolved> {
    match r {
        MapRef::Live(v) => {
            let vol = inner.catalog.lock().volume(v)?.clone();
            crate::load::ensure_loaded(inner, &vol)?;
            let map = vol.map.read();
            Ok(Resolved {
                tree: map.tree(v)?.clone(),
                block_size: vol.block_size,
                lz4: vol.lz4,
                size: vol.size(),
                id: map.layer,
                pin: None,
            })
        }
        MapRef::Checkpoint(v, n) => {
            let (layer, _) = checkpoint_layer(inner, v, n)?;
            let tree = crate::load::layer_tree(inner, layer)?;
            let cat = inner.catalog.lock();
            let (vol, ck) = find_checkpoint(&cat, v, n)?;
            if ck.layer != layer {
                return Err(ckpt_err(v, n));
            }
            Ok(Resolved {
                tree,
                block_size: vol.block_size,
                lz4: vol.lz4,
                size: ck.size,
                id: ck.layer,
                pin: pin.then(|| {
                    ck.pins.fetch_add(1, Ordering::AcqRel);
                    ck.pins.clone()
                }),
            })
        }
    }
}

/// Ids (layers) of the checkpoints `layer` descends from, nearest first: the parent chain of
/// frozen layers, through forks, keeping only layers some checkpoint names.
pub(crate) fn checkpoint_ancestors(inner: &Inner, layer: u64) -> Vec<u64> {
    let cat = inner.catalog.lock();
    let named: HashSet<u64> = cat.checkpoints.values().map(|c| c.layer).collect();
    let mut out = Vec::new();
    let mut at = cat.frozen.get(&layer).map_or(0, |f| f.parent);
    let mut steps = 0;
    while at != 0 && steps <= cat.frozen.len() {
        steps += 1;
        if named.contains(&at) {
            out.push(at);
        }
        at = cat.frozen.get(&at).map_or(0, |f| f.parent);
    }
    out
}

/// The volume and name of the checkpoint whose layer is `id`.
pub(crate) fn checkpoint_by_id(inner: &Inner, id: u64) -> Result<(String, String)> {
    let cat = inner.catalog.lock();
    cat.checkpoints
        .iter()
        .find(|(_, c)| c.layer == id)
        .and_then(|((vid, name), _)| {
            cat.volume_by_id(*vid)
                .map(|v| (v.name.clone(), name.clone()))
        })
        .ok_or_else(|| Error::InvalidArgument(format!("no checkpoint with id {id}")))
}

/// A checkpoint's identity and geometry, without the per-checkpoint space accounting that
/// [`list_checkpoints`] computes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointEntry {
    pub name: String,
    /// Unique in the store and never reused.
    pub id: u64,
    pub size: u64,
    /// Bytes mapped (stored) in the checkpoint.
    pub mapped_bytes: u64,
    pub created_unix: u64,
}

pub(crate) fn checkpoint_entries(inner: &Inner, vol_name: &str) -> Result<Vec<CheckpointEntry>> {
    let cat = inner.catalog.lock();
    let vol = cat.volume(vol_name)?;
    Ok(cat
        .checkpoints
        .range((vol.id, String::new())..)
        .take_while(|((v, _), _)| *v == vol.id)
        .map(|((_, name), c)| CheckpointEntry {
            name: name.clone(),
            id: c.layer,
            size: c.size,
            mapped_bytes: cat
                .frozen
                .get(&c.layer)
                .map_or(0, |f| f.mapped_blocks * u64::from(vol.block_size)),
            created_unix: c.created_unix,
        })
        .collect())
}

pub(crate) fn diff(inner: &Inner, a: MapRef<'_>, b: MapRef<'_>) -> Result<Vec<ByteRange>> {
    let Resolved {
        tree: ta,
        block_size: bsa,
        size: sa,
        ..
    } = resolve(inner, a, false)?;
    let Resolved {
        tree: tb,
        block_size: bsb,
        size: sb,
        ..
    } = resolve(inner, b, false)?;
    if bsa != bsb {
        return Err(Error::InvalidArgument(
            "cannot diff volumes with different block sizes".into(),
        ));
    }
    let bs = u64::from(bsa);
    let limit = sa.max(sb);
    let mut out: Vec<ByteRange> = Vec::new();
    for (first, n) in changed_runs(&ta, &tb) {
        let offset = first * bs;
        if offset >= limit {
            continue;
        }
        let len = (n * bs).min(limit - offset);
        match out.last_mut() {
            Some(r) if r.offset + r.len == offset => r.len += len,
            _ => out.push(ByteRange { offset, len }),
        }
    }
    // Size changes show as differences past the smaller end.
    if sa != sb {
        let from = sa.min(sb);
        match out.last_mut() {
            Some(r) if r.offset + r.len >= from => r.len = r.len.max(limit - r.offset),
            _ => out.push(ByteRange {
                offset: from,
                len: limit - from,
            }),
        }
    }
    Ok(out)
}

/// Runs of blocks whose location differs between `a` and `b`, in order: costs what differs,
/// since subtrees the two share are skipped, and runs follow extents, not blocks.
pub(crate) fn changed_runs(a: &Tree, b: &Tree) -> Vec<(u64, u64)> {
    let ppb = a.ppb();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |first: u64, n: u64| match out.last_mut() {
        Some((f, l)) if *f + *l == first => *l += n,
        _ => out.push((first, n)),
    };
    for idx in a.diff_chunks(b) {
        let base = idx * CHUNK_BLOCKS;
        let pa = a.lookup(base, CHUNK_BLOCKS);
        let pb = b.lookup(base, CHUNK_BLOCKS);
        let (mut i, mut j) = (0, 0);
        let mut at = base;
        while i < pa.len() && j < pb.len() {
            let (x, y) = (&pa[i], &pb[j]);
            let end = (x.block + x.blocks).min(y.block + y.blocks);
            let lx = x.loc.map(|l| l.advance(at - x.block, ppb));
            let ly = y.loc.map(|l| l.advance(at - y.block, ppb));
            if lx != ly {
                // Single-block kinds differ block by block only where they differ.
                push(at, end - at);
            }
            at = end;
            if x.block + x.blocks == end {
                i += 1;
            }
            if y.block + y.blocks == end {
                j += 1;
            }
        }
    }
    out
}

/// Blocks whose location differs between `a` and `b`, in order.
pub(crate) fn changed_blocks(a: &Tree, b: &Tree) -> Vec<u64> {
    changed_runs(a, b)
        .into_iter()
        .flat_map(|(f, n)| f..f + n)
        .collect()
}
