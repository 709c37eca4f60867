//! The in-memory extent map: a persistent (structurally shared) radix tree from block index
//! to [`Entry`].
//!
//! Every node sits behind an `Arc`. Cloning a [`Tree`] copies one pointer, which is what makes
//! checkpoint, fork and restore O(1): the clone shares every node with the original, and the
//! first write to a shared path copies only that path (`Arc::make_mut`), never the whole map.
//!
//! Leaves hold [`LEAF_SLOTS`] consecutive blocks; inner nodes have [`LEAF_SLOTS`] children.
//! Both are sparse (a presence bitmap plus a dense vector), so a sparsely written volume costs
//! memory in proportion to what is mapped, not to its size. A leaf is also the unit of
//! persistence: RocksDB stores whole leaves (see `codec.rs`).

use std::sync::Arc;

/// Bits of block index consumed per level.
pub const LEVEL_BITS: u32 = 6;
/// Blocks per leaf and children per inner node.
pub const LEAF_SLOTS: usize = 1 << LEVEL_BITS;
const SLOT_MASK: u64 = (LEAF_SLOTS as u64) - 1;

/// Where one stored block lives and how to check it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Data segment holding the record.
    pub segment: u32,
    /// Offset of the record in the segment, in 4 KiB pages.
    pub page: u32,
    /// Stored length in bytes; the top bit marks an lz4-compressed record.
    pub len_flags: u32,
    /// crc32 of the stored bytes.
    pub crc: u32,
}

impl Entry {
    const LZ4: u32 = 1 << 31;

    pub fn new(segment: u32, page: u32, stored_len: u32, lz4: bool, crc: u32) -> Self {
        debug_assert!(stored_len & Self::LZ4 == 0);
        let flag = if lz4 { Self::LZ4 } else { 0 };
        Self {
            segment,
            page,
            len_flags: stored_len | flag,
            crc,
        }
    }

    pub fn stored_len(&self) -> u32 {
        self.len_flags & !Self::LZ4
    }

    pub fn is_lz4(&self) -> bool {
        self.len_flags & Self::LZ4 != 0
    }

    /// Pages the record occupies in its segment.
    pub fn pages(&self) -> u32 {
        self.stored_len().div_ceil(crate::segment::PAGE_SIZE as u32)
    }
}

/// One leaf: up to [`LEAF_SLOTS`] entries, present slots marked in `bitmap`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leaf {
    bitmap: u64,
    entries: Vec<Entry>,
}

impl Leaf {
    pub fn from_parts(bitmap: u64, entries: Vec<Entry>) -> Option<Self> {
        (bitmap.count_ones() as usize == entries.len()).then_some(Self { bitmap, entries })
    }

    pub fn bitmap(&self) -> u64 {
        self.bitmap
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn rank(&self, slot: usize) -> usize {
        (self.bitmap & ((1u64 << slot) - 1)).count_ones() as usize
    }

    pub fn get(&self, slot: usize) -> Option<Entry> {
        (self.bitmap >> slot & 1 == 1).then(|| self.entries[self.rank(slot)])
    }

    /// Sets `slot`, returning what it held.
    pub fn insert(&mut self, slot: usize, entry: Entry) -> Option<Entry> {
        let i = self.rank(slot);
        if self.bitmap >> slot & 1 == 1 {
            return Some(std::mem::replace(&mut self.entries[i], entry));
        }
        self.bitmap |= 1 << slot;
        self.entries.insert(i, entry);
        None
    }

    /// Clears `slot`, returning what it held.
    pub fn remove(&mut self, slot: usize) -> Option<Entry> {
        if self.bitmap >> slot & 1 == 0 {
            return None;
        }
        let i = self.rank(slot);
        self.bitmap &= !(1 << slot);
        Some(self.entries.remove(i))
    }

    /// Present slots and their entries, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, Entry)> + '_ {
        BitIter(self.bitmap).zip(self.entries.iter().copied())
    }
}

struct BitIter(u64);

impl Iterator for BitIter {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let slot = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(slot)
    }
}

/// A reference to a leaf that keeps it alive and unchanged (writers copy it first).
#[derive(Clone, Debug)]
pub struct SharedLeaf(Arc<Node>);

impl SharedLeaf {
    pub fn leaf(&self) -> &Leaf {
        static EMPTY: Leaf = Leaf {
            bitmap: 0,
            entries: Vec::new(),
        };
        match self.0.as_ref() {
            Node::Leaf(l) => l,
            Node::Inner { .. } => &EMPTY,
        }
    }
}

#[derive(Clone, Debug)]
enum Node {
    Inner { bitmap: u64, kids: Vec<Arc<Node>> },
    Leaf(Leaf),
}

impl Node {
    fn empty_inner() -> Self {
        Node::Inner {
            bitmap: 0,
            kids: Vec::new(),
        }
    }
}

/// A persistent map from block index to [`Entry`]. `Clone` is O(1).
#[derive(Clone, Debug, Default)]
pub struct Tree {
    root: Option<Arc<Node>>,
    /// Inner levels above the leaves; the tree addresses `64^(height+1)` blocks.
    height: u32,
}

/// Index of a leaf: `block / LEAF_SLOTS`.
pub fn leaf_index(block: u64) -> u64 {
    block >> LEVEL_BITS
}

/// Slot of a block inside its leaf.
pub fn leaf_slot(block: u64) -> usize {
    (block & SLOT_MASK) as usize
}

fn child_slot(leaf_idx: u64, level: u32) -> usize {
    // level 1 is the inner level right above the leaves.
    ((leaf_idx >> ((level - 1) * LEVEL_BITS)) & SLOT_MASK) as usize
}

fn bit_rank(bitmap: u64, slot: usize) -> usize {
    (bitmap & ((1u64 << slot) - 1)).count_ones() as usize
}

impl Tree {
    /// An empty tree able to address `blocks` blocks.
    pub fn with_capacity(blocks: u64) -> Self {
        let mut t = Tree::default();
        t.reserve(blocks);
        t
    }

    /// Blocks this tree can address without growing.
    pub fn capacity(&self) -> u64 {
        let bits = LEVEL_BITS * (self.height + 1);
        if bits >= 64 {
            u64::MAX
        } else {
            1u64 << bits
        }
    }

    /// Makes the tree able to address `blocks` blocks by adding levels on top: O(levels).
    pub fn reserve(&mut self, blocks: u64) {
        while self.capacity() < blocks {
            if let Some(old) = self.root.take() {
                self.root = Some(Arc::new(Node::Inner {
                    bitmap: 1,
                    kids: vec![old],
                }));
            }
            self.height += 1;
        }
    }

    pub fn get(&self, block: u64) -> Option<Entry> {
        self.leaf(leaf_index(block))?.get(leaf_slot(block))
    }

    /// The leaf holding `leaf_idx`, if any block of it is mapped.
    pub fn leaf(&self, leaf_idx: u64) -> Option<&Leaf> {
        match self.leaf_arc(leaf_idx)?.as_ref() {
            Node::Leaf(l) => Some(l),
            Node::Inner { .. } => None,
        }
    }

    fn leaf_arc(&self, leaf_idx: u64) -> Option<&Arc<Node>> {
        if leaf_idx >= self.capacity() >> LEVEL_BITS {
            return None;
        }
        let mut node = self.root.as_ref()?;
        for level in (1..=self.height).rev() {
            let Node::Inner { bitmap, kids } = node.as_ref() else {
                return None;
            };
            let slot = child_slot(leaf_idx, level);
            if bitmap >> slot & 1 == 0 {
                return None;
            }
            node = &kids[bit_rank(*bitmap, slot)];
        }
        Some(node)
    }

    /// A shared handle on the leaf object at `leaf_idx` (O(1): one reference count).
    pub fn shared_leaf(&self, leaf_idx: u64) -> Option<SharedLeaf> {
        self.leaf_arc(leaf_idx).map(|a| SharedLeaf(a.clone()))
    }

    /// True when both trees hold the very same leaf object at `leaf_idx` (or neither has one).
    pub fn shares_leaf(&self, other: &Tree, leaf_idx: u64) -> bool {
        match (self.leaf_arc(leaf_idx), other.leaf_arc(leaf_idx)) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Applies `f` to the leaf at `leaf_idx`, copying shared nodes on the path first and
    /// creating the leaf if absent. An emptied leaf is unlinked.
    pub fn update_leaf<R>(&mut self, leaf_idx: u64, f: impl FnOnce(&mut Leaf) -> R) -> R {
        assert!(
            leaf_idx < self.capacity() >> LEVEL_BITS,
            "leaf index beyond tree capacity"
        );
        let root = self
            .root
            .get_or_insert_with(|| Arc::new(initial_node(self.height)));
        let (r, now_empty) = update_rec(root, self.height, leaf_idx, f);
        if now_empty {
            self.root = None;
        }
        r
    }

    /// Replaces the leaf at `leaf_idx` wholesale (an empty leaf unlinks it).
    pub fn set_leaf(&mut self, leaf_idx: u64, leaf: Leaf) {
        self.update_leaf(leaf_idx, |l| *l = leaf);
    }

    /// Takes the leaf object of `other` at `leaf_idx` into this tree, sharing it.
    pub fn adopt_leaf(&mut self, other: &Tree, leaf_idx: u64) {
        let Some(src) = other.leaf_arc(leaf_idx).cloned() else {
            self.update_leaf(leaf_idx, |l| *l = Leaf::default());
            return;
        };
        let root = self
            .root
            .get_or_insert_with(|| Arc::new(initial_node(self.height)));
        replace_rec(root, self.height, leaf_idx, src);
    }

    /// Every present leaf with its index, in index order.
    pub fn leaves(&self) -> Vec<(u64, &Leaf)> {
        let mut out = Vec::new();
        if let Some(root) = &self.root {
            collect(root, self.height, 0, &mut out);
        }
        out
    }

    /// Leaf indices whose contents may differ between `self` and `other`, in order. Subtrees
    /// shared by both are skipped, so the cost follows what changed, not the map's size.
    pub fn diff_leaves(&self, other: &Tree) -> Vec<u64> {
        let mut a = self.clone();
        let mut b = other.clone();
        let h = a.height.max(b.height);
        a.reserve_height(h);
        b.reserve_height(h);
        let mut out = Vec::new();
        diff_rec(a.root.as_ref(), b.root.as_ref(), h, 0, &mut out);
        out
    }

    fn reserve_height(&mut self, height: u32) {
        while self.height < height {
            if let Some(old) = self.root.take() {
                self.root = Some(Arc::new(Node::Inner {
                    bitmap: 1,
                    kids: vec![old],
                }));
            }
            self.height += 1;
        }
    }

    /// First mapped block at or after `block`, if any.
    pub fn next_mapped(&self, block: u64) -> Option<u64> {
        let root = self.root.as_ref()?;
        next_rec(root, self.height, 0, block)
    }

    /// First unmapped block at or after `block` (every block past the last mapped one is
    /// unmapped). Costs one lookup per full leaf skipped.
    pub fn next_unmapped(&self, block: u64) -> u64 {
        let mut b = block;
        loop {
            let Some(leaf) = self.leaf(leaf_index(b)) else {
                return b;
            };
            let slot = leaf_slot(b);
            // Unmapped slots at or after `slot`.
            let free = !leaf.bitmap() & (u64::MAX << slot);
            if free != 0 {
                return (b - slot as u64) + u64::from(free.trailing_zeros());
            }
            b = (leaf_index(b) + 1) * LEAF_SLOTS as u64;
        }
    }
}

fn initial_node(height: u32) -> Node {
    if height == 0 {
        Node::Leaf(Leaf::default())
    } else {
        Node::empty_inner()
    }
}

fn update_rec<R>(
    node: &mut Arc<Node>,
    level: u32,
    leaf_idx: u64,
    f: impl FnOnce(&mut Leaf) -> R,
) -> (R, bool) {
    match Arc::make_mut(node) {
        Node::Leaf(leaf) => {
            let r = f(leaf);
            (r, leaf.is_empty())
        }
        Node::Inner { bitmap, kids } => {
            let slot = child_slot(leaf_idx, level);
            let i = bit_rank(*bitmap, slot);
            if *bitmap >> slot & 1 == 0 {
                *bitmap |= 1 << slot;
                kids.insert(i, Arc::new(initial_node(level - 1)));
            }
            let (r, child_empty) = update_rec(&mut kids[i], level - 1, leaf_idx, f);
            if child_empty {
                *bitmap &= !(1 << slot);
                kids.remove(i);
            }
            (r, *bitmap == 0)
        }
    }
}

fn replace_rec(node: &mut Arc<Node>, level: u32, leaf_idx: u64, leaf: Arc<Node>) {
    if level == 0 {
        *node = leaf;
        return;
    }
    let Node::Inner { bitmap, kids } = Arc::make_mut(node) else {
        return;
    };
    let slot = child_slot(leaf_idx, level);
    let i = bit_rank(*bitmap, slot);
    if *bitmap >> slot & 1 == 0 {
        *bitmap |= 1 << slot;
        kids.insert(i, Arc::new(initial_node(level - 1)));
    }
    replace_rec(&mut kids[i], level - 1, leaf_idx, leaf);
}

fn collect<'a>(node: &'a Arc<Node>, level: u32, base: u64, out: &mut Vec<(u64, &'a Leaf)>) {
    match node.as_ref() {
        Node::Leaf(l) => out.push((base, l)),
        Node::Inner { bitmap, kids } => {
            for (slot, kid) in BitIter(*bitmap).zip(kids) {
                let child_base = base | (slot as u64) << ((level - 1) * LEVEL_BITS);
                collect(kid, level - 1, child_base, out);
            }
        }
    }
}

fn kid_at(node: Option<&Arc<Node>>, slot: usize) -> Option<&Arc<Node>> {
    match node?.as_ref() {
        Node::Inner { bitmap, kids } if bitmap >> slot & 1 == 1 => {
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
        let child_base = base | (slot as u64) << ((level - 1) * LEVEL_BITS);
        diff_rec(kid_at(a, slot), kid_at(b, slot), level - 1, child_base, out);
    }
}

fn next_rec(node: &Arc<Node>, level: u32, base: u64, from: u64) -> Option<u64> {
    match node.as_ref() {
        Node::Leaf(l) => {
            let first_block = base << LEVEL_BITS;
            let min_slot = from.saturating_sub(first_block);
            if min_slot >= LEAF_SLOTS as u64 {
                return None;
            }
            let mask = !0u64 << min_slot;
            let bits = l.bitmap & mask;
            (bits != 0).then(|| first_block + bits.trailing_zeros() as u64)
        }
        Node::Inner { bitmap, kids } => {
            let shift = (level - 1) * LEVEL_BITS;
            for (slot, kid) in BitIter(*bitmap).zip(kids) {
                let child_base = base | (slot as u64) << shift;
                let child_blocks = 1u64 << (shift + LEVEL_BITS);
                let child_first = child_base << LEVEL_BITS;
                if child_first.saturating_add(child_blocks) <= from {
                    continue;
                }
                if let Some(b) = next_rec(kid, level - 1, child_base, from) {
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

    fn e(n: u32) -> Entry {
        Entry::new(1, n, 4096, false, n)
    }

    #[test]
    fn insert_get_remove_against_btreemap() {
        let mut t = Tree::with_capacity(1 << 20);
        let mut m = BTreeMap::new();
        let mut x: u64 = 12345;
        for i in 0..20_000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let b = (x >> 33) % (1 << 20);
            if i % 3 == 0 {
                let old = t.update_leaf(leaf_index(b), |l| l.remove(leaf_slot(b)));
                assert_eq!(old, m.remove(&b));
            } else {
                let old = t.update_leaf(leaf_index(b), |l| l.insert(leaf_slot(b), e(i)));
                assert_eq!(old, m.insert(b, e(i)));
            }
        }
        for (b, v) in &m {
            assert_eq!(t.get(*b), Some(*v));
        }
        let count: usize = t.leaves().iter().map(|(_, l)| l.len()).sum();
        assert_eq!(count, m.len());
        let first = m.keys().next().copied();
        assert_eq!(t.next_mapped(0), first);
        for probe in [0u64, 100, 5000, 77777, 1 << 19] {
            assert_eq!(
                t.next_mapped(probe),
                m.range(probe..).next().map(|(k, _)| *k)
            );
        }
    }

    #[test]
    fn next_unmapped_against_btreemap() {
        let mut t = Tree::with_capacity(1 << 14);
        let mut m = std::collections::BTreeSet::new();
        // Full leaves (a run of 300 blocks across five leaves), a lone block, sparse tail.
        for b in (100..400u64).chain([1000]).chain((2000..2200).step_by(3)) {
            t.update_leaf(leaf_index(b), |l| l.insert(leaf_slot(b), e(b as u32)));
            m.insert(b);
        }
        for probe in 0..2300u64 {
            let want = (probe..).find(|b| !m.contains(b)).unwrap_or(probe);
            assert_eq!(t.next_unmapped(probe), want, "probe {probe}");
        }
    }

    #[test]
    fn clone_is_isolated_and_diff_follows_changes() {
        let mut a = Tree::with_capacity(1 << 16);
        for b in 0..4096u64 {
            a.update_leaf(leaf_index(b), |l| l.insert(leaf_slot(b), e(b as u32)));
        }
        let snap = a.clone();
        a.update_leaf(leaf_index(130), |l| l.insert(leaf_slot(130), e(9)));
        a.update_leaf(leaf_index(4000), |l| l.remove(leaf_slot(4000)));
        assert_eq!(snap.get(130), Some(e(130)));
        assert_eq!(a.get(130), Some(e(9)));
        assert_eq!(
            snap.diff_leaves(&a),
            vec![leaf_index(130), leaf_index(4000)]
        );
        assert!(a.shares_leaf(&snap, 0));
        assert!(!a.shares_leaf(&snap, leaf_index(130)));
    }

    #[test]
    fn grow_keeps_contents() {
        let mut t = Tree::with_capacity(64);
        t.update_leaf(0, |l| l.insert(5, e(5)));
        t.reserve(1 << 30);
        assert_eq!(t.get(5), Some(e(5)));
        t.update_leaf(leaf_index(1 << 29), |l| l.insert(0, e(1)));
        assert_eq!(t.get(1 << 29), Some(e(1)));
    }

    #[test]
    fn emptied_leaves_are_unlinked() {
        let mut t = Tree::with_capacity(1 << 12);
        t.update_leaf(3, |l| l.insert(1, e(1)));
        t.update_leaf(3, |l| l.remove(1));
        assert!(t.leaves().is_empty());
        assert_eq!(t.next_mapped(0), None);
    }
}
