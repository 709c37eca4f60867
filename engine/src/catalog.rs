//! What the store knows about its volumes, checkpoints and layers, in memory.
//!
//! Every volume's history is a tree of layers (docs/design/checkpoints.md): one mutable head
//! per volume, and frozen layers for checkpoints. A layer's extent map is its parent's with
//! the layer's own chunk records laid over it. Maps are loaded lazily (`load.rs`): the
//! catalog itself — names, sizes, the layer tree, mapped-block counts — is read at open, a
//! layer's [`Tree`] only when something needs it.

use crate::codec::VolumeRecord;
use crate::error::{Error, Result};
use crate::map::Tree;
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// The mutable view of a volume: its head layer.
#[derive(Debug)]
pub(crate) struct HeadMap {
    pub layer: u64,
    pub parent: u64,
    /// The map, once loaded; empty until then.
    pub tree: Tree,
    pub loaded: bool,
    /// The map as of the last commit snapshot: what RocksDB holds for this layer's own
    /// chunks (a commit writes the difference between the two for each dirty chunk).
    pub committed: Tree,
    /// Chunks changed since the last commit snapshot.
    pub dirty: HashSet<u64>,
    pub mapped_blocks: u64,
}

impl HeadMap {
    /// A head whose map is not loaded yet.
    pub fn unloaded(layer: u64, parent: u64, mapped_blocks: u64) -> Self {
        HeadMap {
            layer,
            parent,
            tree: Tree::default(),
            loaded: false,
            committed: Tree::default(),
            dirty: HashSet::new(),
            mapped_blocks,
        }
    }

    /// A head whose map is `tree` (as committed), mapping `mapped_blocks` blocks.
    pub fn loaded(layer: u64, parent: u64, tree: Tree, mapped_blocks: u64) -> Self {
        HeadMap {
            layer,
            parent,
            committed: tree.clone(),
            tree,
            loaded: true,
            dirty: HashSet::new(),
            mapped_blocks,
        }
    }

    /// The map, or an error naming the volume if it is not loaded (a bug in the caller).
    pub fn tree(&self, name: &str) -> Result<&Tree> {
        if self.loaded {
            Ok(&self.tree)
        } else {
            Err(Error::Corrupt(format!(
                "map of volume {name} used before it was loaded"
            )))
        }
    }
}

#[derive(Debug)]
pub(crate) struct VolumeState {
    pub id: u64,
    pub name: String,
    pub block_size: u32,
    pub lz4: bool,
    pub ephemeral: bool,
    pub tree: bool,
    pub created_unix: u64,
    size: AtomicU64,
    pub map: RwLock<HeadMap>,
    pub handles: AtomicUsize,
    pub deleted: AtomicBool,
    /// Set when the map may hold remote locations (installed, loaded or replayed; or, in a
    /// store with remote packs registered, after a fork or restore), cleared by
    /// `count_remote` finding none: reads then look for remote blocks to hydrate. Only a
    /// hint, so that setting it costs no map walk; reads are correct either way.
    pub maybe_remote: AtomicBool,
    /// IO statistics and limits, shared by every handle and export of the volume.
    pub io: std::sync::Arc<crate::qos::VolumeIo>,
}

impl VolumeState {
    pub fn new(rec: &VolumeRecord, name: String, head: HeadMap, maybe_remote: bool) -> Self {
        VolumeState {
            id: rec.id,
            name,
            block_size: rec.block_size,
            lz4: rec.lz4,
            ephemeral: rec.ephemeral,
            tree: rec.tree,
            created_unix: rec.created_unix,
            size: AtomicU64::new(rec.size),
            map: RwLock::new(head),
            handles: AtomicUsize::new(0),
            deleted: AtomicBool::new(false),
            maybe_remote: AtomicBool::new(maybe_remote),
            io: Default::default(),
        }
    }

    /// Name, block size and current size, for the read and write paths.
    pub(crate) fn geometry(&self) -> crate::volume::Geometry<'_> {
        crate::volume::Geometry {
            name: &self.name,
            block_size: self.block_size,
            size: self.size(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Relaxed);
    }

    pub fn blocks(&self) -> u64 {
        self.size().div_ceil(u64::from(self.block_size))
    }

    /// Pages per block.
    pub fn ppb(&self) -> u32 {
        self.block_size / crate::map::PAGE_SIZE as u32
    }

    pub fn record(&self, head: u64) -> VolumeRecord {
        VolumeRecord {
            id: self.id,
            size: self.size(),
            block_size: self.block_size,
            lz4: self.lz4,
            ephemeral: self.ephemeral,
            tree: self.tree,
            head,
            created_unix: self.created_unix,
        }
    }
}

/// A layer that is no longer a volume's head: a checkpoint's frozen view.
#[derive(Debug)]
pub(crate) struct FrozenLayer {
    pub parent: u64,
    pub volume: u64,
    /// The map, once loaded.
    pub tree: Option<Tree>,
    pub mapped_blocks: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct CheckpointMeta {
    pub layer: u64,
    pub size: u64,
    pub created_unix: u64,
    /// Open [`crate::Snapshot`]s of the checkpoint: it cannot be deleted while any are.
    pub pins: Arc<AtomicUsize>,
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
    /// Per layer, how many times a metadata operation rewrote its records (a child adopting
    /// a deleted checkpoint's chunks): a map loaded from an older RocksDB snapshot is stale.
    pub layer_gen: HashMap<u64, u64>,
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

    /// Notes that `layer`'s persisted records changed outside a commit of its own map.
    pub fn touch_layer(&mut self, layer: u64) {
        *self.layer_gen.entry(layer).or_default() += 1;
    }

    pub fn layer_gen(&self, layer: u64) -> u64 {
        self.layer_gen.get(&layer).copied().unwrap_or(0)
    }

    /// The volume whose head is `layer`.
    pub fn head_of(&self, layer: u64) -> Option<&Arc<VolumeState>> {
        self.volumes.values().find(|v| v.map.read().layer == layer)
    }

    /// Parent of a layer (frozen or head), or `None` for an unknown layer.
    pub fn parent_of(&self, layer: u64) -> Option<u64> {
        if let Some(f) = self.frozen.get(&layer) {
            return Some(f.parent);
        }
        self.head_of(layer).map(|v| v.map.read().parent)
    }

    /// A loaded map of `layer` (frozen or head), cloned (O(1)).
    pub fn loaded_tree(&self, layer: u64) -> Option<Tree> {
        if let Some(f) = self.frozen.get(&layer) {
            return f.tree.clone();
        }
        let v = self.head_of(layer)?;
        let m = v.map.read();
        m.loaded.then(|| m.tree.clone())
    }
}
