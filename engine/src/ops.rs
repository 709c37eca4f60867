//! Metadata operations: volumes, checkpoints, restore, fork, diff and space accounting.
//!
//! Each operation changes the in-memory catalog under the commit lock and ends with a synced
//! commit carrying its RocksDB changes, so it is durable when it returns. Checkpoint, restore
//! and fork touch a fixed number of records and clone one tree root: O(1) in the size of the
//! volume and of its map.

use crate::codec::{self, CheckpointRecord, LayerRecord, VolumeRecord};
use crate::store::{now_unix, Catalog, CheckpointMeta, DbOp, FrozenLayer, Inner};
use crate::tree::{Entry, Tree, LEAF_SLOTS};
use crate::volume::{HeadMap, Volume, VolumeState, SECTOR};
use crate::{names, Error, Result};
use std::collections::HashSet;
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
    if size == 0 || size % SECTOR != 0 {
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
            created_unix: now_unix(),
        };
        let head = HeadMap {
            layer,
            parent: 0,
            tree: Tree::with_capacity(size.div_ceil(u64::from(bs))),
            own: HashSet::new(),
            dirty: HashSet::new(),
            mapped_blocks: 0,
        };
        let vol = Arc::new(VolumeState::new(&rec, name.to_string(), head, false));
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

pub(crate) fn open_volume(inner: &Arc<Inner>, name: &str) -> Result<Volume> {
    let cat = inner.catalog.lock();
    let state = cat.volume(name)?.clone();
    state.handles.fetch_add(1, Ordering::Relaxed);
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
        map.tree.reserve(vol.blocks());
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

/// Removes frozen layer `id`, first giving each child the leaf records it inherited from it.
/// Returns the entries to release once the change is committed.
fn remove_frozen_layer(
    cat: &mut Catalog,
    inner: &Inner,
    id: u64,
    ops: &mut Vec<DbOp>,
) -> Option<FrozenLayer> {
    let gone = cat.frozen.remove(&id)?;
    let (frozen_kids, head_kids) = children(cat, id);
    let adopt = |own: &mut HashSet<u64>, child: u64, ops: &mut Vec<DbOp>| {
        for &idx in &gone.own {
            if own.insert(idx) {
                if let Some(leaf) = gone.tree.leaf(idx) {
                    leaf.entries().iter().for_each(|e| inner.segments.incref(e));
                }
                ops.push(DbOp::Leaf(child, idx, gone.tree.shared_leaf(idx)));
            }
        }
    };
    for kid in frozen_kids {
        if let Some(f) = cat.frozen.get_mut(&kid) {
            adopt(&mut f.own, kid, ops);
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
        let layer = map.layer;
        adopt(&mut map.own, layer, ops);
        map.parent = gone.parent;
        let rec = LayerRecord {
            parent: gone.parent,
            volume: vol.id,
            frozen: false,
            mapped_blocks: 0,
        };
        ops.push(Inner::layer_record(layer, rec));
    }
    ops.extend(Inner::delete_layer_ops(id));
    Some(gone)
}

pub(crate) fn delete_volume(inner: &Inner, name: &str, internal: bool) -> Result<()> {
    inner.check_poisoned()?;
    let guard = inner.commit.lock();
    let mut ops = Vec::new();
    let mut released: Vec<(Tree, HashSet<u64>)> = Vec::new();
    {
        let mut cat = inner.catalog.lock();
        let vol = cat.volume(name)?.clone();
        if !internal && vol.handles.load(Ordering::Relaxed) > 0 {
            return Err(Error::VolumeBusy(name.to_string()));
        }
        vol.deleted.store(true, Ordering::Relaxed);
        cat.volumes.remove(name);
        let head = {
            let mut map = vol.map.write();
            let tree = std::mem::take(&mut map.tree);
            (map.layer, tree, std::mem::take(&mut map.own))
        };
        ops.extend(Inner::delete_layer_ops(head.0));
        released.push((head.1, head.2));
        // Delete checkpoints children-first so that leaf records are moved as little as possible.
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
            if let Some(f) = remove_frozen_layer(&mut cat, inner, layer, &mut ops) {
                released.push((f.tree, f.own));
            }
        }
        ops.push(DbOp::Delete(codec::CF_VOLUMES, name.as_bytes().to_vec()));
    }
    for (tree, own) in &released {
        inner.release_layer(tree, own);
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
        let frozen = {
            let mut map = vol.map.write();
            let old = map.layer;
            for idx in map.dirty.drain().collect::<Vec<_>>() {
                ops.push(DbOp::Leaf(old, idx, map.tree.shared_leaf(idx)));
            }
            let frozen = FrozenLayer {
                parent: map.parent,
                volume: vol.id,
                tree: map.tree.clone(),
                own: std::mem::take(&mut map.own),
                mapped_blocks: map.mapped_blocks,
            };
            map.layer = new;
            map.parent = old;
            (old, frozen)
        };
        let (old, f) = frozen;
        let size = vol.size();
        let created_unix = now_unix();
        ops.push(Inner::layer_record(
            old,
            LayerRecord {
                parent: f.parent,
                volume: vol.id,
                frozen: true,
                mapped_blocks: f.mapped_blocks,
            },
        ));
        ops.push(Inner::layer_record(
            new,
            LayerRecord {
                parent: old,
                volume: vol.id,
                frozen: false,
                mapped_blocks: 0,
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
        cat.frozen.insert(old, f);
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

pub(crate) fn restore(inner: &Inner, vol_name: &str, name: &str) -> Result<()> {
    inner.check_poisoned()?;
    let guard = inner.commit.lock();
    let (ops, old_tree, old_own) = {
        let mut cat = inner.catalog.lock();
        let new = cat.alloc_layer();
        let (vol, ck) = find_checkpoint(&cat, vol_name, name)?;
        let (vol, ck) = (vol.clone(), ck.clone());
        let frozen = cat
            .frozen
            .get(&ck.layer)
            .ok_or_else(|| Error::Corrupt(format!("checkpoint {vol_name}@{name} has no layer")))?;
        let mut tree = frozen.tree.clone();
        let mut map = vol.map.write();
        vol.set_size(ck.size);
        tree.reserve(vol.blocks());
        let old_layer = map.layer;
        let old_tree = std::mem::replace(&mut map.tree, tree);
        let old_own = std::mem::take(&mut map.own);
        map.dirty.clear();
        map.layer = new;
        map.parent = ck.layer;
        map.mapped_blocks = frozen.mapped_blocks;
        vol.maybe_remote
            .store(inner.remote.any(), Ordering::Relaxed);
        let mut ops: Vec<DbOp> = Inner::delete_layer_ops(old_layer).into();
        ops.push(Inner::layer_record(
            new,
            LayerRecord {
                parent: ck.layer,
                volume: vol.id,
                frozen: false,
                mapped_blocks: 0,
            },
        ));
        ops.push(Inner::volume_record(&vol, new));
        (ops, old_tree, old_own)
    };
    inner.commit_locked(&guard, ops)?;
    drop(guard);
    // The discarded head's records are freed by the next commit.
    inner.release_layer(&old_tree, &old_own);
    Ok(())
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
        let mut tree = frozen.tree.clone();
        let mapped_blocks = frozen.mapped_blocks;
        tree.reserve(ck.size.div_ceil(u64::from(src.block_size)));
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
            created_unix: now_unix(),
        };
        let head = HeadMap {
            layer,
            parent: ck.layer,
            tree,
            own: HashSet::new(),
            dirty: HashSet::new(),
            mapped_blocks,
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
                    mapped_blocks: 0,
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
    let gone = {
        let mut cat = inner.catalog.lock();
        let (vol, ck) = find_checkpoint(&cat, vol_name, name)?;
        if ck.pins.load(Ordering::Acquire) > 0 {
            return Err(Error::CheckpointBusy {
                volume: vol_name.to_string(),
                name: name.to_string(),
            });
        }
        let (vid, layer) = (vol.id, ck.layer);
        cat.checkpoints.remove(&(vid, name.to_string()));
        ops.push(DbOp::Delete(
            codec::CF_CHECKPOINTS,
            codec::checkpoint_key(vid, name),
        ));
        remove_frozen_layer(&mut cat, inner, layer, &mut ops)
    };
    if let Some(f) = &gone {
        inner.release_layer(&f.tree, &f.own);
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
        exclusive_bytes: exclusive_bytes(cat, inner, ck.layer),
        parent: checkpoint_ref(cat, f.parent),
        is_base: vol.map.read().parent == ck.layer,
        created_unix: ck.created_unix,
    })
}

/// Bytes deleting frozen layer `layer` would free: records in leaves it owns that no child
/// inherits and that no other leaf record references.
fn exclusive_bytes(cat: &Catalog, inner: &Inner, layer: u64) -> u64 {
    let Some(f) = cat.frozen.get(&layer) else {
        return 0;
    };
    let (frozen_kids, head_kids) = children(cat, layer);
    let inherited = |idx: u64| {
        frozen_kids
            .iter()
            .any(|k| cat.frozen.get(k).is_some_and(|c| !c.own.contains(&idx)))
            || head_kids.iter().any(|v| !v.map.read().own.contains(&idx))
    };
    let mut bytes = 0u64;
    for &idx in &f.own {
        if inherited(idx) {
            continue;
        }
        for e in f.tree.leaf(idx).map(|l| l.entries()).unwrap_or_default() {
            if inner.segments.refcount(e) == 1 {
                bytes += u64::from(e.pages()) * crate::segment::PAGE_SIZE as u64;
            }
        }
    }
    bytes
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

/// Resolves `r`; with `pin`, a checkpoint is also pinned (under the same lock, so it cannot be
/// deleted in between) and the caller must unpin it.
pub(crate) fn resolve(inner: &Inner, r: MapRef<'_>, pin: bool) -> Result<Resolved> {
    let cat = inner.catalog.lock();
    match r {
        MapRef::Live(v) => {
            let vol = cat.volume(v)?;
            let map = vol.map.read();
            Ok(Resolved {
                tree: map.tree.clone(),
                block_size: vol.block_size,
                lz4: vol.lz4,
                size: vol.size(),
                id: map.layer,
                pin: None,
            })
        }
        MapRef::Checkpoint(v, n) => {
            let (vol, ck) = find_checkpoint(&cat, v, n)?;
            let f = cat.frozen.get(&ck.layer).ok_or_else(|| ckpt_err(v, n))?;
            Ok(Resolved {
                tree: f.tree.clone(),
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
    let mut push = |blk: u64| {
        let offset = blk * bs;
        if offset >= limit {
            return;
        }
        let len = bs.min(limit - offset);
        match out.last_mut() {
            Some(r) if r.offset + r.len == offset => r.len += len,
            _ => out.push(ByteRange { offset, len }),
        }
    };
    for blk in changed_blocks(&ta, &tb) {
        push(blk);
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

/// Blocks whose entry differs between `a` and `b`, in order: costs what differs, since
/// subtrees the two share are skipped.
pub(crate) fn changed_blocks(a: &Tree, b: &Tree) -> Vec<u64> {
    let mut out = Vec::new();
    let empty = crate::tree::Leaf::default();
    for idx in a.diff_leaves(b) {
        let la = a.leaf(idx).unwrap_or(&empty);
        let lb = b.leaf(idx).unwrap_or(&empty);
        for slot in 0..LEAF_SLOTS {
            if la.get(slot) != lb.get(slot) {
                out.push(idx * LEAF_SLOTS as u64 + slot as u64);
            }
        }
    }
    out
}

/// Every distinct record referenced by any layer, with one place that references it.
/// Whether block `blk` of `label` (a volume, or `VOL@CKPT`) still maps to `e`.
pub(crate) fn still_mapped(inner: &Inner, label: &str, blk: u64, e: &Entry) -> bool {
    let cat = inner.catalog.lock();
    match label.split_once('@') {
        None => cat
            .volume(label)
            .is_ok_and(|v| v.map.read().tree.get(blk) == Some(*e)),
        Some((v, c)) => find_checkpoint(&cat, v, c)
            .ok()
            .and_then(|(_, ck)| cat.frozen.get(&ck.layer))
            .is_some_and(|f| f.tree.get(blk) == Some(*e)),
    }
}

pub(crate) fn all_records(inner: &Inner) -> Vec<(Entry, String, u64)> {
    let cat = inner.catalog.lock();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut visit = |tree: &Tree, own: &HashSet<u64>, label: String| {
        for &idx in own {
            for (slot, e) in tree
                .leaf(idx)
                .map(|l| l.iter().collect::<Vec<_>>())
                .unwrap_or_default()
            {
                if seen.insert((e.segment, e.page)) {
                    out.push((e, label.clone(), idx * LEAF_SLOTS as u64 + slot as u64));
                }
            }
        }
    };
    for vol in cat.volumes.values() {
        let m = vol.map.read();
        visit(&m.tree, &m.own, vol.name.clone());
    }
    for ((vid, name), ck) in &cat.checkpoints {
        let vol = cat
            .volume_by_id(*vid)
            .map(|v| v.name.clone())
            .unwrap_or_default();
        if let Some(f) = cat.frozen.get(&ck.layer) {
            visit(&f.tree, &f.own, format!("{vol}@{name}"));
        }
    }
    out
}
