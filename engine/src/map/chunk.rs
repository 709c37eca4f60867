//! A chunk: the extents of [`CHUNK_BLOCKS`] consecutive blocks, and the layer that owns them.
//!
//! Extents are kept sorted by start and never overlap; they never cross the chunk's edges
//! (a longer run is stored as one extent per chunk it covers). A change replaces a range:
//! extents it overlaps are trimmed or split, the new extent goes in, and it is merged with a
//! neighbour stored right before or after it, so a file written sequentially stays one extent
//! per chunk.
//!
//! Positions inside a chunk are relative to its first block (`rel`, below `CHUNK_BLOCKS`).

use super::extent::{Extent, Loc, Piece, CHUNK_BLOCKS};

/// One extent, relative to the chunk's first block. 20 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    start: u16,
    len: u16,
    loc: Loc,
}

impl Slot {
    fn end(&self) -> u32 {
        u32::from(self.start) + u32::from(self.len)
    }
}

/// Extents of one chunk. `owner` is the layer whose own record this chunk is (see
/// [`crate::map::Tree`]); a layer changing a chunk it does not own copies it first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chunk {
    owner: u64,
    slots: Vec<Slot>,
}

/// What [`Chunk::replace`] took out: each removed part of an extent loses one reference.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replaced {
    /// Location of the first removed block and the number of blocks, per removed part.
    pub removed: Vec<(Loc, u64)>,
    /// Blocks mapped after the change minus blocks mapped before it.
    pub mapped_delta: i64,
}

fn rel16(v: u32) -> u16 {
    debug_assert!(u64::from(v) <= CHUNK_BLOCKS);
    v as u16
}

impl Chunk {
    pub fn new(owner: u64) -> Self {
        Chunk {
            owner,
            slots: Vec::new(),
        }
    }

    /// An empty chunk owned by no layer.
    pub const fn empty() -> Self {
        Chunk {
            owner: 0,
            slots: Vec::new(),
        }
    }

    pub fn owner(&self) -> u64 {
        self.owner
    }

    pub fn set_owner(&mut self, owner: u64) {
        self.owner = owner;
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn mapped_blocks(&self) -> u64 {
        self.slots.iter().map(|s| u64::from(s.len)).sum()
    }

    /// The extents, with absolute starts (`base` is the chunk's first block).
    pub fn extents(&self, base: u64) -> impl Iterator<Item = Extent> + '_ {
        self.slots.iter().map(move |s| Extent {
            start: base + u64::from(s.start),
            len: u64::from(s.len),
            loc: s.loc,
        })
    }

    /// Index of the first extent that ends after `rel`.
    fn first_after(&self, rel: u32) -> usize {
        self.slots.partition_point(|s| s.end() <= rel)
    }

    /// Location of block `rel`, if mapped.
    pub fn get(&self, rel: u32, ppb: u32) -> Option<Loc> {
        let s = self.slots.get(self.first_after(rel))?;
        (u32::from(s.start) <= rel).then(|| s.loc.advance(u64::from(rel - u32::from(s.start)), ppb))
    }

    /// Appends the pieces of `[from, to)` (relative) to `out`: extents cut to the range and
    /// the holes between them.
    pub fn lookup(&self, base: u64, from: u32, to: u32, ppb: u32, out: &mut Vec<Piece>) {
        let mut at = from;
        for s in &self.slots[self.first_after(from)..] {
            if u32::from(s.start) >= to {
                break;
            }
            let a = u32::from(s.start).max(at);
            if a > at {
                out.push(Piece {
                    block: base + u64::from(at),
                    blocks: u64::from(a - at),
                    loc: None,
                });
            }
            let b = s.end().min(to);
            out.push(Piece {
                block: base + u64::from(a),
                blocks: u64::from(b - a),
                loc: Some(s.loc.advance(u64::from(a - u32::from(s.start)), ppb)),
            });
            at = b;
        }
        if at < to {
            out.push(Piece {
                block: base + u64::from(at),
                blocks: u64::from(to - at),
                loc: None,
            });
        }
    }

    /// Makes `[from, to)` (relative) map to `new` (a hole for `None`). A multi-block `new`
    /// must be a raw location.
    pub fn replace(&mut self, from: u32, to: u32, new: Option<Loc>, ppb: u32) -> Replaced {
        debug_assert!(from < to && u64::from(to) <= CHUNK_BLOCKS);
        debug_assert!(new.is_none_or(|l| l.is_raw() || to - from == 1));
        let i = self.first_after(from);
        let mut k = i;
        let mut out = Replaced::default();
        let mut left = None;
        let mut right = None;
        while k < self.slots.len() && u32::from(self.slots[k].start) < to {
            let s = self.slots[k];
            let (a, b) = (u32::from(s.start), s.end());
            if a < from {
                left = Some(Slot {
                    start: s.start,
                    len: rel16(from - a),
                    loc: s.loc,
                });
            }
            if b > to {
                right = Some(Slot {
                    start: rel16(to),
                    len: rel16(b - to),
                    loc: s.loc.advance(u64::from(to - a), ppb),
                });
            }
            let (ra, rb) = (a.max(from), b.min(to));
            out.removed
                .push((s.loc.advance(u64::from(ra - a), ppb), u64::from(rb - ra)));
            out.mapped_delta -= i64::from(rb - ra);
            k += 1;
        }
        let middle = new.map(|loc| Slot {
            start: rel16(from),
            len: rel16(to - from),
            loc,
        });
        if middle.is_some() {
            out.mapped_delta += i64::from(to - from);
        }
        let at = i + usize::from(left.is_some());
        self.slots
            .splice(i..k, left.into_iter().chain(middle).chain(right));
        if middle.is_some() {
            // Merge with the extent after, then the one before (indices stay valid).
            self.merge_at(at, ppb);
            if at > 0 {
                self.merge_at(at - 1, ppb);
            }
        }
        out
    }

    /// Merges extent `i` with extent `i + 1` when the second continues the first on disk.
    fn merge_at(&mut self, i: usize, ppb: u32) {
        let (Some(a), Some(b)) = (self.slots.get(i), self.slots.get(i + 1)) else {
            return;
        };
        if a.end() == u32::from(b.start) && a.loc.continues(u64::from(a.len), &b.loc, ppb) {
            let len = a.len + b.len;
            self.slots[i].len = len;
            self.slots.remove(i + 1);
        }
    }

    /// Adds an extent while a chunk is rebuilt from its persisted records: `rel` and `len`
    /// relative to the chunk; extents must come in order. False (and nothing added) for an
    /// extent that overlaps the previous one, leaves the chunk, or is longer than one block
    /// without being raw.
    pub fn push_loaded(&mut self, rel: u64, len: u64, loc: Loc) -> bool {
        let ok = len > 0
            && rel.checked_add(len).is_some_and(|e| e <= CHUNK_BLOCKS)
            && (loc.is_raw() || len == 1)
            && self.slots.last().is_none_or(|p| u64::from(p.end()) <= rel);
        if ok {
            self.slots.push(Slot {
                start: rel16(rel as u32),
                len: rel16(len as u32),
                loc,
            });
        }
        ok
    }

    /// First mapped position at or after `rel`.
    pub fn next_mapped(&self, rel: u32) -> Option<u32> {
        let s = self.slots.get(self.first_after(rel))?;
        Some(u32::from(s.start).max(rel))
    }

    /// First unmapped position at or after `rel`, or `None` if every block from `rel` to the
    /// chunk's end is mapped.
    pub fn next_unmapped(&self, rel: u32) -> Option<u32> {
        let mut at = rel;
        for s in &self.slots[self.first_after(rel)..] {
            if u32::from(s.start) > at {
                return Some(at);
            }
            at = s.end();
        }
        (u64::from(at) < CHUNK_BLOCKS).then_some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Block-by-block model: rel → (segment, page) of that block.
    fn model_of(c: &Chunk, ppb: u32) -> Vec<Option<Loc>> {
        (0..CHUNK_BLOCKS as u32).map(|r| c.get(r, ppb)).collect()
    }

    fn check_invariants(c: &Chunk, ppb: u32) {
        for w in c.slots.windows(2) {
            assert!(w[0].end() <= u32::from(w[1].start), "overlap or disorder");
            let touching = w[0].end() == u32::from(w[1].start);
            assert!(
                !(touching && w[0].loc.continues(u64::from(w[0].len), &w[1].loc, ppb)),
                "mergeable neighbours left apart: {w:?}"
            );
        }
        for s in &c.slots {
            assert!(s.len > 0 && u64::from(s.end()) <= CHUNK_BLOCKS);
        }
    }

    proptest! {
        #[test]
        fn replace_matches_a_block_model(
            ops in proptest::collection::vec((0u32..1024, 1u32..200, 0u8..4, 0u32..3), 1..60),
            ppb in prop_oneof![Just(1u32), Just(4u32)],
        ) {
            let mut c = Chunk::new(1);
            let mut model: Vec<Option<Loc>> = vec![None; CHUNK_BLOCKS as usize];
            let mut next_page = 1000u32;
            let mut mapped = 0i64;
            for (from, n, kind, seg) in ops {
                let to = (from + n).min(CHUNK_BLOCKS as u32);
                let new = match kind {
                    0 => None,
                    // Sometimes continue the previous write on disk, to exercise merging.
                    1 => Some(Loc::raw(seg, next_page - (to - from) * ppb * u32::from(from % 2 == 0))),
                    _ => { let l = Loc::raw(seg, next_page); next_page += (to - from) * ppb; Some(l) }
                };
                let before: Vec<Option<Loc>> = model[from as usize..to as usize].to_vec();
                let r = c.replace(from, to, new, ppb);
                mapped += r.mapped_delta;
                // Removed parts are exactly the blocks that were mapped.
                let mut removed: Vec<Option<Loc>> = Vec::new();
                for (loc, blocks) in &r.removed {
                    for b in 0..*blocks { removed.push(Some(loc.advance(b, ppb))); }
                }
                let was: Vec<Option<Loc>> = before.iter().copied().filter(Option::is_some).collect();
                prop_assert_eq!(removed, was);
                for (i, b) in (from..to).enumerate() {
                    model[b as usize] = new.map(|l| l.advance(i as u64, ppb));
                }
                check_invariants(&c, ppb);
                prop_assert_eq!(&model_of(&c, ppb), &model);
                prop_assert_eq!(c.mapped_blocks() as i64, mapped);
            }
            // lookup covers the range exactly and agrees with get.
            let mut pieces = Vec::new();
            c.lookup(4096, 10, 900, ppb, &mut pieces);
            let mut at = 4096 + 10;
            for p in &pieces {
                prop_assert_eq!(p.block, at);
                for b in 0..p.blocks {
                    let want = model[(p.block - 4096 + b) as usize];
                    prop_assert_eq!(p.loc.map(|l| l.advance(b, ppb)), want);
                }
                at += p.blocks;
            }
            prop_assert_eq!(at, 4096 + 900);
            for r in [0u32, 5, 100, 1023] {
                let nm = (r..CHUNK_BLOCKS as u32).find(|&b| model[b as usize].is_some());
                prop_assert_eq!(c.next_mapped(r), nm);
                let nu = (r..CHUNK_BLOCKS as u32).find(|&b| model[b as usize].is_none());
                prop_assert_eq!(c.next_unmapped(r), nu);
            }
        }
    }

    #[test]
    fn sequential_writes_stored_back_to_back_are_one_extent() {
        let mut c = Chunk::new(1);
        for i in 0..4u32 {
            c.replace(i * 256, (i + 1) * 256, Some(Loc::raw(7, 100 + i * 256)), 1);
        }
        assert_eq!(c.len(), 1);
        assert_eq!(c.mapped_blocks(), 1024);
        // A 4 KiB overwrite in the middle splits it in three.
        let r = c.replace(500, 501, Some(Loc::raw(8, 0)), 1);
        assert_eq!(c.len(), 3);
        assert_eq!(r.removed, vec![(Loc::raw(7, 600), 1)]);
        assert_eq!(r.mapped_delta, 0);
    }

    #[test]
    fn loaded_extents_are_checked() {
        let mut c = Chunk::new(1);
        assert!(c.push_loaded(0, 10, Loc::raw(1, 0)));
        assert!(!c.push_loaded(5, 2, Loc::raw(1, 50)), "overlap");
        assert!(
            !c.push_loaded(1020, 10, Loc::raw(1, 50)),
            "leaves the chunk"
        );
        assert!(
            !c.push_loaded(20, 2, Loc::lz4(1, 5, 100)),
            "multi-block lz4"
        );
        assert!(!c.push_loaded(20, 0, Loc::raw(1, 5)), "empty");
        assert!(c.push_loaded(10, 1, Loc::lz4(1, 5, 100)));
        assert_eq!(c.len(), 2);
    }
}
