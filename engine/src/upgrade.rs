//! The one-time upgrade of a format-1 store at open (docs/design/on-disk-format.md).
//!
//! Format 1 mapped every block separately, in leaves of 64 blocks, each leaf record the whole
//! leaf as its layer sees it; records carried their crc32 in the map and segments had no
//! checksum table. The upgrade rewrites the metadata only, in one RocksDB batch: each layer's
//! own leaves become its own chunk records (1024 blocks each; a chunk it owns part of gets its
//! whole view of that chunk), each format-1 entry a one-block extent whose location keeps the
//! record's crc ([`Loc::inline`]). Data stays where it is; format-1 segments are read as they
//! are and never appended to. Format-1 journal entries still decode and are replayed as such.
//! A crash during the upgrade leaves the store as format 1 (the batch is atomic).

use crate::codec::{self, ExtentKey, LayerRecord, V1Entry};
use crate::inner::cf;
use crate::map::{Loc, CHUNK_BLOCKS};
use crate::{Error, Result};
use rocksdb::{IteratorMode, WriteBatch, WriteOptions, DB};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Blocks per format-1 leaf.
const V1_LEAF: u64 = 64;

type Leaf = Vec<(u32, V1Entry)>;

/// Rewrites a format-1 store's maps as format 2 and bumps its format record. Returns the
/// number of layers converted.
pub(crate) fn upgrade_v1(db: &DB) -> Result<usize> {
    let leaves_cf = cf(db, codec::CF_LEAVES_V1)?;
    let layers_cf = cf(db, codec::CF_LAYERS)?;
    let mut layers: BTreeMap<u64, LayerRecord> = BTreeMap::new();
    for item in db.iterator_cf(layers_cf, IteratorMode::Start) {
        let (k, v) = item?;
        layers.insert(codec::decode_u64_key(&k)?, LayerRecord::decode(&v)?);
    }
    let mut own: HashMap<u64, BTreeMap<u64, Leaf>> = HashMap::new();
    for item in db.iterator_cf(leaves_cf, IteratorMode::Start) {
        let (k, v) = item?;
        let (layer, object, idx) = codec::decode_v1_leaf_key(&k)?;
        if object != 0 {
            return Err(Error::Corrupt(format!("format-1 leaf of object {object}")));
        }
        if layers.contains_key(&layer) {
            own.entry(layer)
                .or_default()
                .insert(idx, codec::decode_v1_leaf(&v)?);
        }
    }
    // A layer's view of a leaf: its own record, else its parent's view.
    let view = |mut layer: u64, idx: u64| -> Option<&Leaf> {
        for _ in 0..=layers.len() {
            if let Some(l) = own.get(&layer).and_then(|m| m.get(&idx)) {
                return Some(l);
            }
            layer = layers.get(&layer).map_or(0, |l| l.parent);
            if layer == 0 {
                return None;
            }
        }
        None
    };
    let ext_cf = cf(db, codec::CF_EXTENTS)?;
    let mut batch = WriteBatch::default();
    let per_chunk = CHUNK_BLOCKS / V1_LEAF;
    for (&layer, rec) in &layers {
        let chunks: BTreeSet<u64> = own
            .get(&layer)
            .map(|m| m.keys().map(|i| i / per_chunk).collect())
            .unwrap_or_default();
        for c in &chunks {
            batch.put_cf(
                ext_cf,
                codec::extent_key(layer, 0, ExtentKey::Chunk { idx: *c }),
                codec::encode_chunk_marker(),
            );
            for leaf in c * per_chunk..(c + 1) * per_chunk {
                for (slot, e) in view(layer, leaf).map(|l| l.as_slice()).unwrap_or_default() {
                    let block = leaf * V1_LEAF + u64::from(*slot);
                    let loc = v1_loc(e);
                    batch.put_cf(
                        ext_cf,
                        codec::extent_key(layer, 0, ExtentKey::Extent { start: block }),
                        codec::encode_extent(1, &loc),
                    );
                }
            }
        }
        // Mapped blocks of the layer's view, for `volume info` before the map is loaded.
        let mut mapped = 0u64;
        let mut seen = BTreeSet::new();
        let mut at = layer;
        for _ in 0..=layers.len() {
            if let Some(m) = own.get(&at) {
                for (idx, l) in m {
                    if seen.insert(*idx) {
                        mapped += l.len() as u64;
                    }
                }
            }
            at = layers.get(&at).map_or(0, |l| l.parent);
            if at == 0 {
                break;
            }
        }
        let rec = LayerRecord {
            mapped_blocks: mapped,
            ..*rec
        };
        batch.put_cf(layers_cf, codec::layer_key(layer), rec.encode());
    }
    batch.delete_range_cf(leaves_cf, vec![0u8; 24], vec![0xffu8; 25]);
    batch.put_cf(
        cf(db, codec::CF_META)?,
        codec::KEY_FORMAT,
        codec::encode_format(),
    );
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(batch, &wo)?;
    Ok(layers.len())
}

/// The location of a format-1 record.
fn v1_loc(e: &V1Entry) -> Loc {
    let lz4 = e.len_flags & Loc::LZ4 != 0;
    let len = e.len_flags & !Loc::LZ4;
    if e.segment >= crate::map::REMOTE_BASE {
        return Loc {
            segment: e.segment,
            page: e.page,
            len_flags: len | if lz4 { Loc::LZ4 } else { 0 },
            crc: e.crc,
        };
    }
    Loc::inline(e.segment, e.page, len, lz4, e.crc)
}
