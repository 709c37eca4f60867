//! Every encoding of bytes the engine persists: RocksDB keys and values, leaves and journal
//! entries. Keys are big-endian so RocksDB's byte order is numeric order. Every value ends in
//! a crc32 of the bytes before it, so damaged metadata is reported, never trusted.
//! The layout is documented in docs/design/on-disk-format.md; keep the two in step.

use crate::tree::{Entry, Leaf};
use crate::{Error, Result};

/// Bumped on any incompatible change to what this module writes.
pub const FORMAT_VERSION: u32 = 1;
pub const MAGIC: &[u8; 8] = b"STRATA01";

pub const CF_META: &str = "meta";
pub const CF_VOLUMES: &str = "volumes";
pub const CF_CHECKPOINTS: &str = "checkpoints";
pub const CF_LAYERS: &str = "layers";
pub const CF_LEAVES: &str = "leaves";
pub const ALL_CFS: [&str; 5] = [CF_META, CF_VOLUMES, CF_CHECKPOINTS, CF_LAYERS, CF_LEAVES];

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
    let mut w = Writer::new();
    w.0.extend_from_slice(MAGIC);
    w.u32(FORMAT_VERSION).sealed()
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

/// `leaves/<layer><object><leaf index>`: the whole leaf as this layer sees it.
pub fn leaf_key(layer: u64, object: u64, leaf_idx: u64) -> [u8; 24] {
    let mut k = [0u8; 24];
    k[..8].copy_from_slice(&layer.to_be_bytes());
    k[8..16].copy_from_slice(&object.to_be_bytes());
    k[16..].copy_from_slice(&leaf_idx.to_be_bytes());
    k
}

pub fn decode_leaf_key(k: &[u8]) -> Result<(u64, u64, u64)> {
    if k.len() != 24 {
        return Err(Error::Corrupt("leaf key is malformed".into()));
    }
    let word = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&k[i * 8..i * 8 + 8]);
        u64::from_be_bytes(a)
    };
    Ok((word(0), word(1), word(2)))
}

pub fn encode_leaf(leaf: &Leaf) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(12 + leaf.len() * 16));
    w = w.u64(leaf.bitmap());
    for e in leaf.entries() {
        w = w.u32(e.segment).u32(e.page).u32(e.len_flags).u32(e.crc);
    }
    w.sealed()
}

pub fn decode_leaf(v: &[u8]) -> Result<Leaf> {
    let mut r = Reader::sealed(v, "leaf")?;
    let bitmap = r.u64()?;
    let n = bitmap.count_ones() as usize;
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        entries.push(Entry {
            segment: r.u32()?,
            page: r.u32()?,
            len_flags: r.u32()?,
            crc: r.u32()?,
        });
    }
    r.done()?;
    Leaf::from_parts(bitmap, entries).ok_or_else(|| Error::Corrupt("leaf bitmap".into()))
}

/// One journal entry: a mapping change made after the last commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalEntry {
    pub seq: u64,
    pub layer: u64,
    pub object: u64,
    pub block: u64,
    /// Blocks covered: 1 for a mapping; an unmap may cover a run of blocks.
    pub count: u32,
    /// `None` unmaps the blocks (discard, write-zeroes).
    pub entry: Option<Entry>,
    /// Position in its group: the entries one install wrote together, with consecutive
    /// sequence numbers. Replay applies a group whole or not at all.
    pub index: u32,
    /// More entries of the group follow this one.
    pub more: bool,
}

const JOURNAL_MAGIC: u16 = 0x534a; // "SJ"

impl JournalEntry {
    pub fn encode(&self) -> [u8; JOURNAL_ENTRY_SIZE] {
        let e = self.entry.unwrap_or(Entry {
            segment: 0,
            page: 0,
            len_flags: 0,
            crc: 0,
        });
        let w = Writer(Vec::with_capacity(JOURNAL_ENTRY_SIZE));
        let mut w = w.u32(
            u32::from(JOURNAL_MAGIC) << 16
                | u32::from(self.entry.is_some())
                | u32::from(self.more) << 1,
        );
        w = w
            .u64(self.seq)
            .u64(self.layer)
            .u64(self.object)
            .u64(self.block);
        w = w
            .u32(e.segment)
            .u32(e.page)
            .u32(e.len_flags)
            .u32(e.crc)
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
    pub fn decode(b: &[u8]) -> Option<Self> {
        let r = Reader::sealed(b.get(..JOURNAL_ENTRY_SIZE)?, "journal").ok()?;
        let mut r = r;
        let head = r.u32().ok()?;
        if head >> 16 != u32::from(JOURNAL_MAGIC) {
            return None;
        }
        let mapped = head & 1 == 1;
        let (seq, layer, object, block) =
            (r.u64().ok()?, r.u64().ok()?, r.u64().ok()?, r.u64().ok()?);
        let e = Entry {
            segment: r.u32().ok()?,
            page: r.u32().ok()?,
            len_flags: r.u32().ok()?,
            crc: r.u32().ok()?,
        };
        let count = r.u32().ok()?;
        let index = r.u32().ok()?;
        Some(JournalEntry {
            seq,
            layer,
            object,
            block,
            count,
            entry: mapped.then_some(e),
            index,
            more: head & 2 != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (any::<u32>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
            |(segment, page, len_flags, crc)| Entry {
                segment,
                page,
                len_flags,
                crc,
            },
        )
    }

    proptest! {
        #[test]
        fn leaf_roundtrip(slots in proptest::collection::btree_map(0usize..64, arb_entry(), 0..64)) {
            let mut leaf = Leaf::default();
            for (s, e) in &slots {
                leaf.insert(*s, *e);
            }
            let enc = encode_leaf(&leaf);
            prop_assert_eq!(decode_leaf(&enc).unwrap(), leaf);
        }

        #[test]
        fn leaf_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_leaf(&bytes);
        }

        #[test]
        fn journal_roundtrip(seq in any::<u64>(), layer in any::<u64>(), block in any::<u64>(),
                             e in proptest::option::of(arb_entry()), index in any::<u32>(),
                             more in any::<bool>()) {
            let j = JournalEntry { seq, layer, object: 0, block, count: 1, entry: e, index, more };
            prop_assert_eq!(JournalEntry::decode(&j.encode()), Some(j));
        }

        #[test]
        fn leaf_keys_sort_numerically(a in any::<(u64, u64)>(), b in any::<(u64, u64)>()) {
            let ka = leaf_key(a.0, 0, a.1);
            let kb = leaf_key(b.0, 0, b.1);
            prop_assert_eq!(ka.cmp(&kb), a.cmp(&b));
            prop_assert_eq!(decode_leaf_key(&ka).unwrap(), (a.0, 0, a.1));
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
            entry: None,
            index: 0,
            more: false,
        };
        let mut b = j.encode();
        b[20] ^= 1;
        assert_eq!(JournalEntry::decode(&b), None);
        assert_eq!(JournalEntry::decode(&[0u8; 64]), None);
    }

    const PINNED_JOURNAL_CRC: u32 = 3_360_223_871;
    const PINNED_LEAF_CRC: u32 = 2_968_333_532;

    #[test]
    fn format_is_pinned() {
        // Changing what the store writes must bump FORMAT_VERSION; these pin version 1 bytes.
        // (A single-entry group, index 0 without `more`, encodes exactly as before groups.)
        let j = JournalEntry {
            seq: 1,
            layer: 2,
            object: 0,
            block: 3,
            count: 1,
            entry: None,
            index: 0,
            more: false,
        };
        assert_eq!(crc32fast::hash(&j.encode()), PINNED_JOURNAL_CRC);
        let mut leaf = Leaf::default();
        leaf.insert(
            3,
            Entry {
                segment: 1,
                page: 2,
                len_flags: 4096,
                crc: 0xdead_beef,
            },
        );
        assert_eq!(crc32fast::hash(&encode_leaf(&leaf)), PINNED_LEAF_CRC);
        assert_eq!(decode_format(&encode_format()).unwrap(), 1);
        assert_eq!(&encode_format()[..8], b"STRATA01");
    }
}
