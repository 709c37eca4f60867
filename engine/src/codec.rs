//! Every encoding of bytes the engine persists: RocksDB keys and values, extent records,
//! journal entries and segment headers. Keys are big-endian so RocksDB's byte order is
//! numeric order. Every value ends in a crc32 of the bytes before it, so damaged metadata is
//! reported, never trusted. The layout is documented in docs/design/on-disk-format.md; keep
//! the two in step.
//!
//! Format 1 (per-block map entries in 64-block leaves, segments without checksum tables) is
//! still decoded here, for the one-time upgrade at open (`upgrade.rs`).

use crate::map::{Loc, CHUNK_BLOCKS};
use crate::{Error, Result};

/// Bumped on any incompatible change to what this module writes.
pub const FORMAT_VERSION: u32 = 2;
/// The format-1 stores this build upgrades when it opens them.
pub const FORMAT_V1: u32 = 1;
pub const MAGIC: &[u8; 8] = b"STRATA01";

pub const CF_META: &str = "meta";
pub const CF_VOLUMES: &str = "volumes";
pub const CF_CHECKPOINTS: &str = "checkpoints";
pub const CF_LAYERS: &str = "layers";
pub const CF_EXTENTS: &str = "extents";
/// Format 1's per-block leaves; read by the upgrade, then dropped.
pub const CF_LEAVES_V1: &str = "leaves";
pub const ALL_CFS: [&str; 5] = [CF_META, CF_VOLUMES, CF_CHECKPOINTS, CF_LAYERS, CF_EXTENTS];

pub const KEY_FORMAT: &[u8] = b"format";
pub const KEY_STATE: &[u8] = b"state";

/// Size of one journal entry on disk.
pub const JOURNAL_ENTRY_SIZE: usize = 64;

struct Writer(Vec<u8>);

impl Writer {
    fn new() -> Self {
        Writer(Vec::with_capacity(64))
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn sealed(mut self) -> Vec<u8> {
        let crc = crc32fast::hash(&self.0);
        self.0.extend_from_slice(&crc.to_be_bytes());
        self.0
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Checks the trailing crc and returns a reader over the payload.
    fn sealed(value: &'a [u8], what: &'static str) -> Result<Self> {
        let bad = || Error::Corrupt(format!("{what} record fails its checksum"));
        let split = value.len().checked_sub(4).ok_or_else(bad)?;
        let (payload, crc) = value.split_at(split);
        let stored = u32::from_be_bytes(crc.try_into().map_err(|_| bad())?);
        if crc32fast::hash(payload) != stored {
            return Err(bad());
        }
        Ok(Reader { buf: payload, what })
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(Error::Corrupt(format!("{} record is truncated", self.what)));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    fn loc(&mut self) -> Result<Loc> {
        Ok(Loc {
            segment: self.u32()?,
            page: self.u32()?,
            len_flags: self.u32()?,
            crc: self.u32()?,
        })
    }
    fn done(self) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(Error::Corrupt(format!(
                "{} record has trailing bytes",
                self.what
            )))
        }
    }
}

/// An opaque value sealed with a trailing crc32 (remote pack descriptors).
pub fn with_crc(v: Vec<u8>) -> Vec<u8> {
    Writer(v).sealed()
}

/// The payload of a value sealed by [`with_crc`], checked.
pub fn strip_crc(v: &[u8]) -> Result<&[u8]> {
    Ok(Reader::sealed(v, "remote pack")?.buf)
}

/// `meta/format`.
pub fn encode_format() -> Vec<u8> {
    encode_format_version(FORMAT_VERSION)
}

pub fn encode_format_version(version: u32) -> Vec<u8> {
    let mut w = Writer::new();
    w.0.extend_from_slice(MAGIC);
    w.u32(version).sealed()
}

/// Returns the format version stored in `meta/format`.
pub fn decode_format(v: &[u8]) -> Result<u32> {
    let mut r = Reader::sealed(v, "format")?;
    if r.take(8)? != MAGIC {
        return Err(Error::Corrupt("format record has the wrong magic".into()));
    }
    let version = r.u32()?;
    r.done()?;
    Ok(version)
}

/// `meta/state`: counters and the commit point, rewritten by every commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateRecord {
    /// Every journal entry with a sequence number up to this one is in RocksDB.
    pub committed_seq: u64,
    pub next_layer: u64,
    pub next_volume: u64,
    pub next_segment: u32,
}

impl StateRecord {
    pub fn encode(&self) -> Vec<u8> {
        Writer::new()
            .u64(self.committed_seq)
            .u64(self.next_layer)
            .u64(self.next_volume)
            .u32(self.next_segment)
            .sealed()
    }
    pub fn decode(v: &[u8]) -> Result<Self> {
        let mut r = Reader::sealed(v, "state")?;
        let s = StateRecord {
            committed_seq: r.u64()?,
            next_layer: r.u64()?,
            next_volume: r.u64()?,
            next_segment: r.u32()?,
        };
        r.done()?;
        Ok(s)
    }
}

/// `volumes/<name>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: u64,
    pub size: u64,
    pub block_size: u32,
    pub lz4: bool,
    pub ephemeral: bool,
    /// A sandbox tree volume (its content is a Strata filesystem, see docs/design/trees.md).
    pub tree: bool,
    pub head: u64,
    pub created_unix: u64,
}

impl VolumeRecord {
    pub fn encode(&self) -> Vec<u8> {
        let flags = u8::from(self.lz4) | u8::from(self.ephemeral) << 1 | u8::from(self.tree) << 2;
        Writer::new()
            .u64(self.id)
            .u64(self.size)
            .u32(self.block_size)
            .u8(flags)
            .u64(self.head)
            .u64(self.created_unix)
            .sealed()
    }
    pub fn decode(v: &[u8]) -> Result<Self> {
        let mut r = Reader::sealed(v, "volume")?;
        let id = r.u64()?;
        let size = r.u64()?;
        let block_size = r.u32()?;
        let flags = r.u8()?;
        let rec = VolumeRecord {
            id,
            size,
            block_size,
            lz4: flags & 1 != 0,
            ephemeral: flags & 2 != 0,
            tree: flags & 4 != 0,
            head: r.u64()?,
            created_unix: r.u64()?,
        };
        r.done()?;
        if !rec.block_size.is_power_of_two() || rec.block_size < crate::map::PAGE_SIZE as u32 {
            return Err(Error::Corrupt(format!(
                "volume record has block size {}",
                rec.block_size
            )));
        }
        Ok(rec)
    }
}

/// `checkpoints/<volume id><name>`.
pub fn checkpoint_key(volume: u64, name: &str) -> Vec<u8> {
    let mut k = volume.to_be_bytes().to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn decode_checkpoint_key(k: &[u8]) -> Result<(u64, String)> {
    let bad = || Error::Corrupt("checkpoint key is malformed".into());
    let (id, name) = k.split_at_checked(8).ok_or_else(bad)?;
    let id = u64::from_be_bytes(id.try_into().map_err(|_| bad())?);
    let name = String::from_utf8(name.to_vec()).map_err(|_| bad())?;
    Ok((id, name))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointRecord {
    pub layer: u64,
    /// The volume's size when the checkpoint was taken.
    pub size: u64,
    pub created_unix: u64,
}

impl CheckpointRecord {
    pub fn encode(&self) -> Vec<u8> {
        Writer::new()
            .u64(self.layer)
            .u64(self.size)
            .u64(self.created_unix)
            .sealed()
    }
    pub fn decode(v: &[u8]) -> Result<Self> {
        let mut r = Reader::sealed(v, "checkpoint")?;
        let c = CheckpointRecord {
            layer: r.u64()?,
            size: r.u64()?,
            created_unix: r.u64()?,
        };
        r.done()?;
        Ok(c)
    }
}

/// `layers/<layer id>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerRecord {
    /// 0 for a root layer.
    pub parent: u64,
    pub volume: u64,
    pub frozen: bool,
    /// Blocks mapped in the layer's view, as of its last commit.
    pub mapped_blocks: u64,
}

impl LayerRecord {
    pub fn encode(&self) -> Vec<u8> {
        Writer::new()
            .u64(self.parent)
            .u64(self.volume)
            .u8(u8::from(self.frozen))
            .u64(self.mapped_blocks)
            .sealed()
    }
    pub fn decode(v: &[u8]) -> Result<Self> {
        let mut r = Reader::sealed(v, "layer")?;
        let l = LayerRecord {
            parent: r.u64()?,
            volume: r.u64()?,
            frozen: r.u8()? != 0,
            mapped_blocks: r.u64()?,
        };
        r.done()?;
        Ok(l)
    }
}

pub fn layer_key(layer: u64) -> [u8; 8] {
    layer.to_be_bytes()
}

pub fn decode_u64_key(k: &[u8]) -> Result<u64> {
    let a: [u8; 8] = k
        .try_into()
        .map_err(|_| Error::Corrupt("id key is malformed".into()))?;
    Ok(u64::from_be_bytes(a))
}

/// What an `extents` key names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKey {
    /// The layer has its own record of chunk `idx` (its extents follow; none = all holes).
    Chunk { idx: u64 },
    /// An extent of the layer starting at block `start`.
    Extent { start: u64 },
}

const KIND_CHUNK: u8 = 0;
const KIND_EXTENT: u8 = 1;

/// `extents/<layer><object><kind><position>`.
pub fn extent_key(layer: u64, object: u64, k: ExtentKey) -> [u8; 25] {
    let (kind, pos) = match k {
        ExtentKey::Chunk { idx } => (KIND_CHUNK, idx),
        ExtentKey::Extent { start } => (KIND_EXTENT, start),
    };
    let mut out = [0u8; 25];
    out[..8].copy_from_slice(&layer.to_be_bytes());
    out[8..16].copy_from_slice(&object.to_be_bytes());
    out[16] = kind;
    out[17..].copy_from_slice(&pos.to_be_bytes());
    out
}

/// First key of `layer`'s records, and the first key past them.
pub fn layer_extent_range(layer: u64) -> ([u8; 8], [u8; 8]) {
    (layer.to_be_bytes(), (layer + 1).to_be_bytes())
}

pub fn decode_extent_key(k: &[u8]) -> Result<(u64, u64, ExtentKey)> {
    if k.len() != 25 {
        return Err(Error::Corrupt("extent key is malformed".into()));
    }
    let word = |at: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&k[at..at + 8]);
        u64::from_be_bytes(a)
    };
    let key = match k[16] {
        KIND_CHUNK => ExtentKey::Chunk { idx: word(17) },
        KIND_EXTENT => ExtentKey::Extent { start: word(17) },
        _ => return Err(Error::Corrupt("extent key has an unknown kind".into())),
    };
    Ok((word(0), word(8), key))
}

/// The value of a chunk key: nothing but its crc.
pub fn encode_chunk_marker() -> Vec<u8> {
    Writer::new().sealed()
}

pub fn decode_chunk_marker(v: &[u8]) -> Result<()> {
    Reader::sealed(v, "chunk")?.done()
}

/// The value of an extent key: length in blocks and location.
pub fn encode_extent(len: u64, loc: &Loc) -> Vec<u8> {
    Writer::new()
        .u32(u32::try_from(len).unwrap_or(u32::MAX))
        .u32(loc.segment)
        .u32(loc.page)
        .u32(loc.len_flags)
        .u32(loc.crc)
        .sealed()
}

/// Decodes an extent value, checking it fits one chunk and that only raw runs are longer
/// than a block.
pub fn decode_extent(start: u64, v: &[u8]) -> Result<(u64, Loc)> {
    let mut r = Reader::sealed(v, "extent")?;
    let len = u64::from(r.u32()?);
    let loc = r.loc()?;
    r.done()?;
    let rel = start % CHUNK_BLOCKS;
    if len == 0 || rel + len > CHUNK_BLOCKS || (len > 1 && !loc.is_raw()) {
        return Err(Error::Corrupt(format!(
            "extent at block {start} of {len} blocks is malformed"
        )));
    }
    Ok((len, loc))
}

/// One journal entry: a mapping change made after the last commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalEntry {
    pub seq: u64,
    pub layer: u64,
    pub object: u64,
    pub block: u64,
    /// Blocks covered.
    pub count: u32,
    /// `None` unmaps the blocks (discard, write-zeroes).
    pub loc: Option<Loc>,
    /// What replay checks the stored bytes against: for a local location, the crc32 of the
    /// big-endian page checksums its pages have in their segment's table (see
    /// [`table_crc`]); for a remote one, `loc.crc` itself.
    pub check: u32,
    /// Position in its group: the entries one install wrote together, with consecutive
    /// sequence numbers. Replay applies a group whole or not at all.
    pub index: u32,
    /// More entries of the group follow this one.
    pub more: bool,
    /// Written by format 1 (one block per mapping, crc of the stored record in `check`).
    pub v1: bool,
}

const JOURNAL_MAGIC: u16 = 0x534b; // "SK"
const JOURNAL_MAGIC_V1: u16 = 0x534a; // "SJ"

/// crc32 over the big-endian page checksums `crcs`: what a journal entry carries to verify
/// a local record at replay.
pub fn table_crc(crcs: &[u32]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for c in crcs {
        h.update(&c.to_be_bytes());
    }
    h.finalize()
}

impl JournalEntry {
    pub fn encode(&self) -> [u8; JOURNAL_ENTRY_SIZE] {
        let l = self.loc.unwrap_or(Loc {
            segment: 0,
            page: 0,
            len_flags: 0,
            crc: 0,
        });
        // A remote location's own crc is what replay checks; local ones carry the table crc.
        let crc_field = if l.is_remote() { l.crc } else { self.check };
        let w = Writer(Vec::with_capacity(JOURNAL_ENTRY_SIZE));
        let w = w
            .u32(
                u32::from(JOURNAL_MAGIC) << 16
                    | u32::from(self.loc.is_some())
                    | u32::from(self.more) << 1,
            )
            .u64(self.seq)
            .u64(self.layer)
            .u64(self.object)
            .u64(self.block)
            .u32(l.segment)
            .u32(l.page)
            .u32(l.len_flags)
            .u32(crc_field)
            .u32(self.count)
            .u32(self.index);
        let mut bytes = w.0;
        bytes.resize(JOURNAL_ENTRY_SIZE - 4, 0);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_be_bytes());
        let mut out = [0u8; JOURNAL_ENTRY_SIZE];
        out.copy_from_slice(&bytes);
        out
    }

    /// `None` for anything that is not a whole, intact entry (torn or never written).
    /// Format-1 entries decode with `v1` set: their mapping's stored length and lz4 flag are
    /// in `loc.len_flags`, the record's crc32 in `check`.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = Reader::sealed(b.get(..JOURNAL_ENTRY_SIZE)?, "journal").ok()?;
        let head = r.u32().ok()?;
        let v1 = match (head >> 16) as u16 {
            JOURNAL_MAGIC => false,
            JOURNAL_MAGIC_V1 => true,
            _ => return None,
        };
        let mapped = head & 1 == 1;
        let (seq, layer, object, block) =
            (r.u64().ok()?, r.u64().ok()?, r.u64().ok()?, r.u64().ok()?);
        let (segment, page, len_flags, crc) =
            (r.u32().ok()?, r.u32().ok()?, r.u32().ok()?, r.u32().ok()?);
        let count = r.u32().ok()?;
        let index = r.u32().ok()?;
        let is_remote = segment >= crate::map::REMOTE_BASE;
        let loc = Loc {
            segment,
            page,
            len_flags,
            crc: if is_remote || v1 { crc } else { 0 },
        };
        Some(JournalEntry {
            seq,
            layer,
            object,
            block,
            count,
            loc: mapped.then_some(loc),
            check: crc,
            index,
            more: head & 2 != 0,
            v1,
        })
    }
}

/// Header of a data segment (its page 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub id: u32,
    /// Pages the segment may hold, header and table included.
    pub capacity_pages: u32,
    /// Pages of the checksum table, from page 1.
    pub table_pages: u32,
}

const SEGMENT_MAGIC: &[u8; 8] = b"STRASEG2";

impl SegmentHeader {
    /// A header for a segment of `capacity_pages`, with a table large enough for all of them.
    pub fn new(id: u32, capacity_pages: u32) -> Self {
        let table_pages = (capacity_pages * 4).div_ceil(crate::map::PAGE_SIZE as u32);
        SegmentHeader {
            id,
            capacity_pages,
            table_pages,
        }
    }

    /// First page records may use.
    pub fn data_start(&self) -> u32 {
        1 + self.table_pages
    }

    /// The header page (4096 bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.0.extend_from_slice(SEGMENT_MAGIC);
        let mut page = w
            .u32(self.id)
            .u32(self.capacity_pages)
            .u32(self.table_pages)
            .sealed();
        page.resize(crate::map::PAGE_SIZE, 0);
        page
    }

    /// `Ok(None)` for a page that does not start with a segment header at all (a format-1
    /// segment, or one whose header never reached the disk).
    pub fn decode(page: &[u8]) -> Result<Option<Self>> {
        if page.len() < 24 || &page[..8] != SEGMENT_MAGIC {
            return Ok(None);
        }
        let mut r = Reader::sealed(&page[..24], "segment header")?;
        r.take(8)?;
        let h = SegmentHeader {
            id: r.u32()?,
            capacity_pages: r.u32()?,
            table_pages: r.u32()?,
        };
        r.done()?;
        if h != SegmentHeader::new(h.id, h.capacity_pages) {
            return Err(Error::Corrupt(format!(
                "segment {} header has a table of {} pages for {} pages",
                h.id, h.table_pages, h.capacity_pages
            )));
        }
        Ok(Some(h))
    }
}

/// A format-1 map entry: one block's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct V1Entry {
    pub segment: u32,
    pub page: u32,
    /// Stored length; bit 31 = lz4.
    pub len_flags: u32,
    pub crc: u32,
}

/// Format-1 `leaves/<layer><object><leaf index>` key.
pub fn decode_v1_leaf_key(k: &[u8]) -> Result<(u64, u64, u64)> {
    if k.len() != 24 {
        return Err(Error::Corrupt("format-1 leaf key is malformed".into()));
    }
    let word = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&k[i * 8..i * 8 + 8]);
        u64::from_be_bytes(a)
    };
    Ok((word(0), word(1), word(2)))
}

/// A format-1 leaf: the entries of 64 consecutive blocks, as (slot, entry).
pub fn decode_v1_leaf(v: &[u8]) -> Result<Vec<(u32, V1Entry)>> {
    let mut r = Reader::sealed(v, "format-1 leaf")?;
    let bitmap = r.u64()?;
    let mut out = Vec::with_capacity(bitmap.count_ones() as usize);
    for slot in 0..64u32 {
        if bitmap >> slot & 1 == 1 {
            out.push((
                slot,
                V1Entry {
                    segment: r.u32()?,
                    page: r.u32()?,
                    len_flags: r.u32()?,
                    crc: r.u32()?,
                },
            ));
        }
    }
    r.done()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_loc() -> impl Strategy<Value = Loc> {
        prop_oneof![
            (1u32..1000, any::<u32>()).prop_map(|(s, p)| Loc::raw(s, p)),
            (1u32..1000, any::<u32>(), 1u32..65536).prop_map(|(s, p, n)| Loc::lz4(s, p, n)),
            (0u32..1000, any::<u32>(), 1u32..65536, any::<u32>()).prop_map(|(s, p, n, c)| Loc {
                segment: crate::map::REMOTE_BASE + s,
                page: p,
                len_flags: n,
                crc: c
            }),
        ]
    }

    proptest! {
        #[test]
        fn extent_roundtrip(start in any::<u64>(), loc in arb_loc(), len in 1u64..1024) {
            let len = if loc.is_raw() { len.min(CHUNK_BLOCKS - start % CHUNK_BLOCKS) } else { 1 };
            let v = encode_extent(len, &loc);
            prop_assert_eq!(decode_extent(start, &v).unwrap(), (len, loc));
        }

        #[test]
        fn extent_decode_never_panics(start in any::<u64>(), bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_extent(start, &bytes);
            let _ = decode_v1_leaf(&bytes);
            let _ = SegmentHeader::decode(&bytes);
        }

        #[test]
        fn journal_roundtrip(seq in any::<u64>(), layer in any::<u64>(), block in any::<u64>(),
                             loc in proptest::option::of(arb_loc()), check in any::<u32>(),
                             index in any::<u32>(), more in any::<bool>(), count in 1u32..4096) {
            let mut j = JournalEntry { seq, layer, object: 0, block, count, loc, check, index, more, v1: false };
            if let Some(l) = loc.filter(|l| l.is_remote()) {
                j.check = l.crc;
            }
            prop_assert_eq!(JournalEntry::decode(&j.encode()), Some(j));
        }

        #[test]
        fn extent_keys_sort_numerically(a in any::<(u64, u64)>(), b in any::<(u64, u64)>()) {
            let ka = extent_key(a.0, 0, ExtentKey::Extent { start: a.1 });
            let kb = extent_key(b.0, 0, ExtentKey::Extent { start: b.1 });
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(decode_extent_key(&ka).unwrap(), (a.0, 0, ExtentKey::Extent { start: a.1 }));
            // A layer's chunk keys sort before its extents, and all of it inside its range.
            let kc = extent_key(a.0, 0, ExtentKey::Chunk { idx: u64::MAX });
            let first = extent_key(a.0, 0, ExtentKey::Extent { start: 0 });
            prop_assert!(kc < first);
            let (lo, hi) = layer_extent_range(a.0 % (u64::MAX - 1));
            let k = extent_key(a.0 % (u64::MAX - 1), 0, ExtentKey::Extent { start: a.1 });
            let inside = k[..] >= lo[..] && k[..] < hi[..];
            prop_assert!(inside);
        }

        #[test]
        fn records_roundtrip(id in any::<u64>(), size in any::<u64>(), head in any::<u64>(),
                             lz4 in any::<bool>(), eph in any::<bool>()) {
            let v = VolumeRecord { id, size, block_size: 4096, lz4, ephemeral: eph, tree: !eph, head, created_unix: 7 };
            prop_assert_eq!(VolumeRecord::decode(&v.encode()).unwrap(), v);
            let l = LayerRecord { parent: id, volume: head, frozen: lz4, mapped_blocks: size };
            prop_assert_eq!(LayerRecord::decode(&l.encode()).unwrap(), l);
            let s = StateRecord { committed_seq: id, next_layer: size, next_volume: head, next_segment: 3 };
            prop_assert_eq!(StateRecord::decode(&s.encode()).unwrap(), s);
        }
    }

    #[test]
    fn torn_journal_entry_is_rejected() {
        let j = JournalEntry {
            seq: 9,
            layer: 1,
            object: 0,
            block: 5,
            count: 3,
            loc: None,
            check: 0,
            index: 0,
            more: false,
            v1: false,
        };
        let mut b = j.encode();
        b[20] ^= 1;
        assert_eq!(JournalEntry::decode(&b), None);
        assert_eq!(JournalEntry::decode(&[0u8; 64]), None);
    }

    #[test]
    fn segment_header_roundtrip_and_rejects() {
        let h = SegmentHeader::new(7, 65536);
        assert_eq!(h.table_pages, 64);
        assert_eq!(h.data_start(), 65);
        let page = h.encode();
        assert_eq!(page.len(), 4096);
        assert_eq!(SegmentHeader::decode(&page).unwrap(), Some(h));
        assert_eq!(SegmentHeader::decode(&[0u8; 4096]).unwrap(), None);
        let mut bad = page.clone();
        bad[12] ^= 1;
        assert!(SegmentHeader::decode(&bad).is_err());
    }

    const PINNED_JOURNAL_CRC: u32 = 1_315_305_730;
    const PINNED_EXTENT_CRC: u32 = 3_505_796_842;
    const PINNED_HEADER_CRC: u32 = 4_181_087_053;

    #[test]
    fn format_is_pinned() {
        // Changing what the store writes must bump FORMAT_VERSION; these pin version 2 bytes.
        let j = JournalEntry {
            seq: 1,
            layer: 2,
            object: 0,
            block: 3,
            count: 4,
            loc: Some(Loc::raw(5, 6)),
            check: 0xdead_beef,
            index: 0,
            more: false,
            v1: false,
        };
        let e = encode_extent(4, &Loc::raw(5, 6));
        let h = SegmentHeader::new(9, 65536).encode();
        let got = (
            crc32fast::hash(&j.encode()),
            crc32fast::hash(&e),
            crc32fast::hash(&h),
        );
        assert_eq!(
            got,
            (PINNED_JOURNAL_CRC, PINNED_EXTENT_CRC, PINNED_HEADER_CRC),
            "format 2 bytes changed"
        );
        assert_eq!(decode_format(&encode_format()).unwrap(), 2);
        assert_eq!(&encode_format()[..8], b"STRATA01");
        // A format-1 journal entry (as that format wrote it) still decodes.
        let v1: [u8; 64] = v1_journal_entry();
        let d = JournalEntry::decode(&v1).expect("format-1 entry decodes");
        assert!(d.v1 && d.loc.is_some() && d.count == 1 && d.block == 3);
    }

    /// A format-1 journal entry for block 3 of layer 2 mapped to segment 1 page 2, 4096 raw
    /// bytes with crc 0xdeadbeef, built byte by byte as format 1 laid it out.
    fn v1_journal_entry() -> [u8; 64] {
        let mut b = Vec::new();
        b.extend_from_slice(&(0x534a_u32 << 16 | 1).to_be_bytes());
        for v in [1u64, 2, 0, 3] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        for v in [1u32, 2, 4096, 0xdead_beef, 1, 0] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.resize(60, 0);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b.try_into().unwrap_or([0; 64])
    }
}
