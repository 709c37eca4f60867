//! A persistent radix tree of chunks: the whole extent map of one layer.
//!
//! Every node sits behind an `Arc`. Cloning a [`Tree`] copies one pointer, which is what makes
//! checkpoint, fork and restore O(1): the clone shares every node with the original, and the
//! first change to a shared path copies only that path, never the whole map.
//!
//! Inner nodes have 64 children (a presence bitmap plus a dense vector), so a sparse volume
//! costs memory in proportion to what is mapped. Chunks are the leaves.
//!
//! **Ownership.** Every node carries the id of the layer that created it. A chunk owned by
//! layer L is L's own record of that chunk; a layer changing a chunk it does not own takes it
//! over ([`Tree::edit`] reports the extents it now references too). Path copying stamps the
//! inner nodes it copies with the editing layer, so every chunk L owns hangs below inner
//! nodes stamped L (or [`ANY_OWNER`], for roots added when the tree grows): [`Tree::owned`]
//! visits only those, and costs what L owns, not the map's size.

use super::chunk::{Chunk, Replaced};
use super::extent::{Extent, Loc, Piece, CHUNK_BITS, CHUNK_BLOCKS};
use std::sync::Arc;

const FAN_BITS: u32 = 6;
const FAN: u64 = 1 << FAN_BITS;
/// Owner of inner nodes that any layer's walk must enter (roots added by [`Tree::reserve`]).
pub const ANY_OWNER: u64 = u64::MAX;

#[derive(Clone, Debug)]
enum Node {
    Inner {
        owner: u64,
        bitmap: u64,
        kids: Vec<Arc<Node>>,
    },
    Chunk(Chunk),
}

/// A reference to a chunk that keeps it alive and unchanged (writers copy it first).
#[derive(Clone, Debug)]
pub struct SharedChunk(Arc<Node>);

impl SharedChunk {
    pub fn chunk(&self) -> &Chunk {
        static EMPTY: Chunk = Chunk::empty();
        match self.0.as_ref() {
            Node::Chunk(c) => c,
            Node::Inner { .. } => &EMPTY,
        }
    }

    /// True when both refer to the very same chunk object.
    pub fn same(&self, other: &SharedChunk) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// The extent map of one layer. `Clone` is O(1).
#[derive(Clone, Debug)]
pub struct Tree {
    root: Option<Arc<Node>>,
    /// Inner levels above the chunks: the tree addresses `64^height` chunks.
    height: u32,
    /// Pages per block (block size / 4096): raw locations advance by this per block.
    ppb: u32,
}

fn bit_rank(bitmap: u64, slot: u64) -> usize {
    (bitmap & ((1u64 << slot) - 1)).count_ones() as usize
}

fn kid_slot(chunk_idx: u64, level: u32) -> u64 {
    (chunk_idx >> ((level - 1) * FAN_BITS)) & (FAN - 1)
}

struct BitIter(u64);

impl Iterator for BitIter {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        if self.0 == 0 {
            return None;
        }
        let slot = u64::from(self.0.trailing_zeros());
        self.0 &= self.0 - 1;
        Some(slot)
    }
}

/// Chunk index of a block, and its position inside the chunk.
pub fn split_block(block: u64) -> (u64, u32) {
    (block >> CHUNK_BITS, (block & (CHUNK_BLOCKS - 1)) as u32)
}

impl Tree {
    /// An empty tree able to address `blocks` blocks of `ppb` pages each.
    pub fn new(blocks: u64, ppb: u32) -> Self {
        let mut t = Tree {
            root: None,
            height: 0,
            ppb: ppb.max(1),
        };
        t.reserve(blocks);
        t
    }

    pub fn ppb(&self) -> u32 {
        self.ppb
    }

    fn capacity_chunks(&self) -> u64 {
        let bits = FAN_BITS * self.height;
        if bits >= 64 {
            u64::MAX
        } else {
            1u64 << bits
        }
    }

    /// Blocks this tree can address without growing.
    pub fn capacity(&self) -> u64 {
        self.capacity_chunks().saturating_mul(CHUNK_BLOCKS)
    }

    /// Makes the tree able to address `blocks` blocks by adding levels on top: O(levels).
    pub fn reserve(&mut self, blocks: u64) {
        while self.capacity() < blocks {
            self.add_level();
        }
    }

    fn add_level(&mut self) {
        if let Some(old) = self.root.take() {
            self.root = Some(Arc::new(Node::Inner {
                owner: ANY_OWNER,
                bitmap: 1,
                kids: vec![old],
            }));
        }
        self.height += 1;
    }

    fn chunk_node(&self, idx: u64) -> Option<&Arc<Node>> {
        if idx >= self.capacity_chunks() {
            return None;
        }
        let mut node = self.root.as_ref()?;
        for level in (1..=self.height).rev() {
            let Node::Inner { bitmap, kids, .. } = node.as_ref() else {
                return None;
            };
            let slot = kid_slot(idx, level);
            if bitmap >> slot & 1 == 0 {
                return None;
            }
            node = &kids[bit_rank(*bitmap, slot)];
        }
        Some(node)
    }

    /// The chunk at index `idx`, if present.
    pub fn chunk(&self, idx: u64) -> Option<&Chunk> {
        match self.chunk_node(idx)?.as_ref() {
            Node::Chunk(c) => Some(c),
            Node::Inner { .. } => None,
        }
    }

    /// A shared handle on the chunk object at `idx` (O(1): one reference count).
    pub fn shared_chunk(&self, idx: u64) -> Option<SharedChunk> {
        self.chunk_node(idx).map(|a| SharedChunk(a.clone()))
    }

    /// True when both trees hold the very same chunk object at `idx` (or neither has one).
    pub fn shares_chunk(&self, other: &Tree, idx: u64) -> bool {
        match (self.chunk_node(idx), other.chunk_node(idx)) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Location of `block`, if mapped.
    pub fn get(&self, block: u64) -> Option<Loc> {
        let (idx, rel) = split_block(block);
        self.chunk(idx)?.get(rel, self.ppb)
    }

    /// The pieces covering `[first, first + count)` in order: extents cut to the range, and
    /// holes.
    pub fn lookup(&self, first: u64, count: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        let end = first.saturating_add(count);
        let mut at = first;
        while at < end {
            let (idx, rel) = split_block(at);
            let chunk_end = (idx + 1) * CHUNK_BLOCKS;
            let to = end.min(chunk_end);
            let rel_to = (to - idx * CHUNK_BLOCKS) as u32;
            match self.chunk(idx) {
                Some(c) => c.lookup(idx * CHUNK_BLOCKS, rel, rel_to, self.ppb, &mut out),
                None => out.push(Piece {
                    block: at,
                    blocks: to - at,
                    loc: None,
                }),
            }
            at = to;
        }
        // Neighbouring holes (from absent chunks) read better as one.
        out.dedup_by(|b, a| {
            if a.loc.is_none() && b.loc.is_none() && a.block + a.blocks == b.block {
                a.blocks += b.blocks;
                true
            } else {
                false
            }
        });
        out
    }

    /// Applies `f` to the chunk at `idx` on behalf of layer `layer`, copying shared nodes on
    /// the path first and creating the chunk if absent. When `layer` did not own the chunk it
    /// does now, and the extents the chunk held before `f` are returned: the layer's new
    /// record references each of them.
    pub fn edit<R>(
        &mut self,
        idx: u64,
        layer: u64,
        f: impl FnOnce(&mut Chunk, u32) -> R,
    ) -> (R, Option<Vec<Extent>>) {
        assert!(
            idx < self.capacity_chunks(),
            "chunk index beyond tree capacity"
        );
        let height = self.height;
        let ppb = self.ppb;
        let root = self
            .root
            .get_or_insert_with(|| Arc::new(fresh(height, layer)));
        let chunk = descend_mut(root, height, idx, layer);
        let taken = (chunk.owner() != layer).then(|| {
            chunk.set_owner(layer);
            chunk.extents(idx * CHUNK_BLOCKS).collect()
        });
        (f(chunk, ppb), taken)
    }

    /// Makes `[first, first + count)` map to `new` (a raw run, or a single block of any kind)
    /// or to a hole, on behalf of `layer`. Returns, per chunk touched: the chunk index, what
    /// the change took out, and the extents the layer took over (see [`Tree::edit`]).
    pub fn replace(
        &mut self,
        first: u64,
        count: u64,
        new: Option<Loc>,
        layer: u64,
    ) -> Vec<(u64, Replaced, Option<Vec<Extent>>)> {
        let mut out = Vec::new();
        let end = first.saturating_add(count);
        let mut at = first;
        while at < end {
            let (idx, rel) = split_block(at);
            let to = end.min((idx + 1) * CHUNK_BLOCKS);
            let rel_to = (to - idx * CHUNK_BLOCKS) as u32;
            let loc = new.map(|l| l.advance(at - first, self.ppb));
            let (r, taken) = self.edit(idx, layer, |c, ppb| c.replace(rel, rel_to, loc, ppb));
            out.push((idx, r, taken));
            at = to;
        }
        out
    }

    /// Puts `chunk` at `idx`, replacing whatever was there (rebuilding a layer from its
    /// records). Inner nodes on the path are stamped with the chunk's owner.
    pub fn set_chunk(&mut self, idx: u64, chunk: Chunk) {
        let _ = self.edit(idx, chunk.owner(), |c, _| *c = chunk);
    }

    /// Chunks owned by `layer`, with their indices, in order. Meaningful on `layer`'s own
    /// tree (another layer's tree may hold them below nodes stamped with its own id).
    pub fn owned(&self, layer: u64) -> Vec<(u64, &Chunk)> {
        let mut out = Vec::new();
        if let Some(root) = &self.root {
            walk(
                root,
                self.height,
                0,
                &mut |idx, c| {
                    if c.owner() == layer {
                        out.push((idx, c));
                    }
                },
                Some(layer),
            );
        }
        out
    }

    /// Every chunk with its index, in order.
    pub fn chunks(&self) -> Vec<(u64, &Chunk)> {
        let mut out = Vec::new();
        if let Some(root) = &self.root {
            walk(root, self.height, 0, &mut |idx, c| out.push((idx, c)), None);
        }
        out
    }

    /// Every extent, in block order.
    pub fn extents(&self) -> impl Iterator<Item = Extent> + '_ {
        self.chunks()
            .into_iter()
            .flat_map(|(idx, c)| c.extents(idx * CHUNK_BLOCKS))
    }

    /// Blocks mapped (walks every chunk).
    pub fn mapped_blocks(&self) -> u64 {
        self.chunks().iter().map(|(_, c)| c.mapped_blocks()).sum()
    }

    /// Chunk indices whose contents may differ between `self` and `other`, in order.
    /// Subtrees shared by both are skipped, so the cost follows what changed.
    pub fn diff_chunks(&self, other: &Tree) -> Vec<u64> {
        let mut a = self.clone();
        let mut b = other.clone();
        let h = a.height.max(b.height);
        while a.height < h {
            a.add_level();
        }
        while b.height < h {
            b.add_level();
        }
        let mut out = Vec::new();
        diff_rec(a.root.as_ref(), b.root.as_ref(), h, 0, &mut out);
        out
    }

    /// First mapped block at or after `block`, if any.
    pub fn next_mapped(&self, block: u64) -> Option<u64> {
        self.next_mapped_before(block, u64::MAX)
    }

    /// First mapped block in `[block, end)`, if any. Costs what lies in that range, not what
    /// lies past it (chunks a volume unmapped stay in the tree until it is rewritten).
    pub fn next_mapped_before(&self, block: u64, end: u64) -> Option<u64> {
        let root = self.root.as_ref()?;
        next_mapped_rec(root, self.height, 0, block, end).filter(|b| *b < end)
    }

    /// First unmapped block at or after `block` (every block past the last mapped one is
    /// unmapped). Costs one lookup per full chunk skipped.
    pub fn next_unmapped(&self, block: u64) -> u64 {
        let mut b = block;
        loop {
            let (idx, rel) = split_block(b);
            let Some(c) = self.chunk(idx) else {
                return b;
            };
            match c.next_unmapped(rel) {
                Some(r) => return idx * CHUNK_BLOCKS + u64::from(r),
                None => b = (idx + 1) * CHUNK_BLOCKS,
            }
        }
    }
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new(0, 1)
    }
}

fn fresh(height: u32, layer: u64) -> Node {
    if height == 0 {
        Node::Chunk(Chunk::new(layer))
    } else {
        Node::Inner {
            owner: layer,
            bitmap: 0,
            kids: Vec::new(),
        }
    }
}

/// The chunk at `idx` below `node` (at `level`), made exclusive to this tree: shared nodes on
/// the way are copied, and inner nodes are stamped with `layer`.
fn descend_mut(node: &mut Arc<Node>, level: u32, idx: u64, layer: u64) -> &mut Chunk {
    match Arc::make_mut(node) {
        Node::Chunk(c) => c,
        Node::Inner {
            owner,
            bitmap,
            kids,
        } => {
            *owner = layer;
            let slot = kid_slot(idx, level);
            let i = bit_rank(*bitmap, slot);
            if *bitmap >> slot & 1 == 0 {
                *bitmap |= 1 << slot;
                kids.insert(i, Arc::new(fresh(level - 1, layer)));
            }
            descend_mut(&mut kids[i], level - 1, idx, layer)
        }
    }
}

fn walk<'a>(
    node: &'a Arc<Node>,
    level: u32,
    base: u64,
    f: &mut dyn FnMut(u64, &'a Chunk),
    only: Option<u64>,
) {
    match node.as_ref() {
        Node::Chunk(c) => f(base, c),
        Node::Inner {
            owner,
            bitmap,
            kids,
        } => {
            if only.is_some_and(|l| *owner != l && *owner != ANY_OWNER) {
                return;
            }
            for (slot, kid) in BitIter(*bitmap).zip(kids) {
                walk(
                    kid,
                    level - 1,
                    base | slot << ((level - 1) * FAN_BITS),
                    f,
                    only,
                );
            }
        }
    }
}

fn kid_at(node: Option<&Arc<Node>>, slot: u64) -> Option<&Arc<Node>> {
    match node?.as_ref() {
        Node::Inner { bitmap, kids, .. } if bitmap >> slot & 1 == 1 => {
            Some(&kids[bit_rank(*bitmap, slot)])
        }
        _ => None,
    }
}

fn diff_rec(
    a: Option<&Arc<Node>>,
    b: Option<&Arc<Node>>,
    level: u32,
    base: u64,
    out: &mut Vec<u64>,
) {
    match (a, b) {
        (None, None) => return,
        (Some(x), Some(y)) if Arc::ptr_eq(x, y) => return,
        _ => {}
    }
    if level == 0 {
        out.push(base);
        return;
    }
    let present = |n: Option<&Arc<Node>>| match n.map(|n| n.as_ref()) {
        Some(Node::Inner { bitmap, .. }) => *bitmap,
        _ => 0,
    };
    for slot in BitIter(present(a) | present(b)) {
        let child = base | slot << ((level - 1) * FAN_BITS);
        diff_rec(kid_at(a, slot), kid_at(b, slot), level - 1, child, out);
    }
}

fn next_mapped_rec(node: &Arc<Node>, level: u32, base: u64, from: u64, end: u64) -> Option<u64> {
    match node.as_ref() {
        Node::Chunk(c) => {
            let first = base * CHUNK_BLOCKS;
            let rel = from.saturating_sub(first);
            if rel >= CHUNK_BLOCKS {
                return None;
            }
            c.next_mapped(rel as u32).map(|r| first + u64::from(r))
        }
        Node::Inner { bitmap, kids, .. } => {
            let shift = (level - 1) * FAN_BITS;
            for (slot, kid) in BitIter(*bitmap).zip(kids) {
                let child = base | slot << shift;
                let child_chunks = 1u64 << shift;
                let child_end = (child + child_chunks).saturating_mul(CHUNK_BLOCKS);
                if child_end <= from {
                    continue;
                }
                if child.saturating_mul(CHUNK_BLOCKS) >= end {
                    return None;
                }
                if let Some(b) = next_mapped_rec(kid, level - 1, child, from, end) {
                    return Some(b);
                }
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn apply(
        t: &mut Tree,
        m: &mut BTreeMap<u64, Loc>,
        first: u64,
        n: u64,
        new: Option<Loc>,
        layer: u64,
    ) {
        t.replace(first, n, new, layer);
        for b in first..first + n {
            match new {
                Some(l) => {
                    m.insert(b, l.advance(b - first, t.ppb()));
                }
                None => {
                    m.remove(&b);
                }
            }
        }
    }

    #[test]
    fn replace_get_lookup_against_a_block_map() {
        let mut t = Tree::new(1 << 22, 1);
        let mut m = BTreeMap::new();
        let mut x: u64 = 12345;
        let mut page = 0u32;
        for i in 0..3000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let first = (x >> 33) % (1 << 22);
            let n = 1 + (x >> 20) % 3000;
            let n = n.min((1 << 22) - first);
            if i % 4 == 0 {
                apply(&mut t, &mut m, first, n, None, 1);
            } else {
                apply(&mut t, &mut m, first, n, Some(Loc::raw(1, page)), 1);
                page += n as u32;
            }
        }
        for (b, l) in m.iter().step_by(97) {
            assert_eq!(t.get(*b), Some(*l));
        }
        assert_eq!(t.mapped_blocks(), m.len() as u64);
        for probe in [0u64, 100, 5000, 77777, 1 << 21] {
            assert_eq!(
                t.next_mapped(probe),
                m.range(probe..).next().map(|(k, _)| *k)
            );
            let nu = (probe..).find(|b| !m.contains_key(b)).unwrap();
            assert_eq!(t.next_unmapped(probe), nu);
        }
        let pieces = t.lookup(1000, 50_000);
        let mut at = 1000;
        for p in pieces {
            assert_eq!(p.block, at);
            for b in 0..p.blocks {
                assert_eq!(p.loc.map(|l| l.advance(b, 1)), m.get(&(at + b)).copied());
            }
            at += p.blocks;
        }
        assert_eq!(at, 51_000);
    }

    #[test]
    fn clones_are_isolated_and_ownership_follows_edits() {
        let mut a = Tree::new(1 << 20, 1);
        a.replace(0, 8192, Some(Loc::raw(1, 0)), 1);
        assert_eq!(a.owned(1).len(), 8);
        let snap = a.clone();
        // Layer 2 (the head after a checkpoint) writes one block: it takes over that chunk.
        let out = a.replace(1500, 1, Some(Loc::raw(2, 0)), 2);
        assert_eq!(out.len(), 1);
        let taken = out[0].2.as_ref().expect("chunk taken over");
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].start, 1024);
        assert_eq!(snap.get(1500), Some(Loc::raw(1, 1500)));
        assert_eq!(a.get(1500), Some(Loc::raw(2, 0)));
        assert_eq!(
            a.owned(2).iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(snap.owned(1).len(), 8);
        assert_eq!(snap.diff_chunks(&a), vec![1]);
        assert!(a.shares_chunk(&snap, 0));
        assert!(!a.shares_chunk(&snap, 1));
        // A second write to the same chunk takes nothing over.
        assert!(a.replace(1501, 1, None, 2)[0].2.is_none());
    }

    #[test]
    fn growing_keeps_contents_and_walks_still_find_owned_chunks() {
        let mut t = Tree::new(1024, 1);
        t.replace(5, 1, Some(Loc::raw(1, 5)), 1);
        t.reserve(1 << 40);
        assert_eq!(t.get(5), Some(Loc::raw(1, 5)));
        assert_eq!(t.owned(1).len(), 1);
        t.replace(1 << 39, 1, Some(Loc::raw(1, 9)), 1);
        assert_eq!(t.get(1 << 39), Some(Loc::raw(1, 9)));
        assert_eq!(t.owned(1).len(), 2);
        let empty = Tree::new(1 << 40, 1);
        assert_eq!(t.diff_chunks(&empty).len(), 2);
    }

    #[test]
    fn sequential_fill_costs_one_extent_per_chunk() {
        let mut t = Tree::new(1 << 18, 1);
        for i in 0..1024u64 {
            t.replace(i * 256, 256, Some(Loc::raw(1, (i * 256) as u32)), 1);
        }
        assert_eq!(t.chunks().len(), 256);
        assert_eq!(t.extents().count(), 256);
    }
}
