//! Volume IO: read, write, write-zeroes, discard and flush at 512-byte-aligned byte offsets.
//!
//! A write stores each block as a new record (never in place), then, holding the store's gate
//! shared and the volume's map lock, points the map at the new records and reserves journal
//! entries; the journal entries are written before the write returns. A partial-block write
//! reads the old block, patches it and installs the result only if the block still maps to
//! what it read (compare-and-set), retrying otherwise, so two overlapping writes never lose
//! each other's bytes.
//!
//! Concurrency contract: operations on different blocks are independent. Concurrent writes
//! that overlap are each atomic per block: a block ends up wholly as one of them (patched by
//! any partial writes that serialized after it), never a mix within a 512-byte sector. A
//! multi-block write is not atomic as a whole.

use crate::codec::JournalEntry;
use crate::io::Op;
use crate::journal::Journal;
use crate::segment::PAGE_SIZE;
use crate::store::Inner;
use crate::tree::{leaf_index, leaf_slot, Entry, Tree};
use crate::{Error, Result};
use parking_lot::RwLock;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Sector size: offsets and lengths are multiples of it.
pub const SECTOR: u64 = 512;
/// Bound on compare-and-set retries of one partial-block write.
const MAX_CAS_RETRIES: usize = 64;
/// Bound on re-reads of a block whose record was replaced while being read.
const MAX_READ_RETRIES: usize = 8;
/// Largest run of blocks one unmap journal entry covers.
const UNMAP_CHUNK: u64 = 1 << 16;

/// The mutable view of a volume: its head layer.
#[derive(Debug)]
pub(crate) struct HeadMap {
    pub layer: u64,
    pub parent: u64,
    pub tree: Tree,
    /// Leaves this layer has (or will have at the next commit) its own records for.
    pub own: HashSet<u64>,
    /// Leaves changed since the last commit snapshot.
    pub dirty: HashSet<u64>,
    pub mapped_blocks: u64,
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
    /// Set when the map may hold remote entries (remote entries installed, loaded or
    /// replayed; or, in a store with remote packs registered, after a fork or restore),
    /// cleared by
    /// [`VolumeState::count_remote`] finding none: reads then look for remote blocks to
    /// hydrate. Only a hint, so that setting it costs no map walk; reads are correct either way.
    pub maybe_remote: AtomicBool,
}

impl VolumeState {
    pub fn new(
        rec: &crate::codec::VolumeRecord,
        name: String,
        head: HeadMap,
        maybe_remote: bool,
    ) -> Self {
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

    /// Blocks of the live map still held remotely (walks the map); clears the
    /// `maybe_remote` hint when there are none.
    pub fn count_remote(&self) -> u64 {
        let n: u64 = self
            .map
            .read()
            .tree
            .leaves()
            .iter()
            .map(|(_, l)| l.entries().iter().filter(|e| e.is_remote()).count() as u64)
            .sum();
        if n == 0 {
            self.maybe_remote.store(false, Ordering::Relaxed);
        }
        n
    }
}

/// One change to a block's mapping.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Change {
    pub block: u64,
    /// Blocks covered (unmaps only; a mapping covers one).
    pub count: u64,
    pub new: Option<Entry>,
    /// For compare-and-set: the mapping the new content was derived from.
    pub expect: Option<Option<Entry>>,
}

/// Applies `changes` to a head map. Caller holds the gate shared and the map exclusively.
/// Returns, per change, whether it was applied, and the journal entries to write.
pub(crate) fn apply_changes(
    inner: &Inner,
    map: &mut HeadMap,
    changes: &[Change],
) -> (Vec<bool>, Vec<JournalEntry>) {
    let mut applied = Vec::with_capacity(changes.len());
    let mut journal = Vec::with_capacity(changes.len());
    let mut released = Vec::new();
    for c in changes {
        if let Some(expect) = c.expect {
            if map.tree.get(c.block) != expect {
                applied.push(false);
                continue;
            }
        }
        match c.new {
            Some(e) => {
                make_own(inner, map, leaf_index(c.block));
                inner.segments.incref(&e);
                let old = map
                    .tree
                    .update_leaf(leaf_index(c.block), |l| l.insert(leaf_slot(c.block), e));
                match old {
                    Some(o) => released.push(o),
                    None => map.mapped_blocks += 1,
                }
            }
            None => unmap_run(inner, map, c.block, c.count, &mut released),
        }
        let count = u32::try_from(c.count).unwrap_or(u32::MAX);
        journal.push(JournalEntry {
            seq: 0,
            layer: map.layer,
            object: 0,
            block: c.block,
            count,
            entry: c.new,
            index: 0,
            more: false,
        });
        applied.push(true);
    }
    // One group, consecutive sequence numbers: replay applies all of it or none.
    let n = journal.len();
    let first = inner.seq.fetch_add(n as u64, Ordering::Relaxed) + 1;
    for (i, j) in journal.iter_mut().enumerate() {
        j.seq = first + i as u64;
        j.index = u32::try_from(i).unwrap_or(u32::MAX);
        j.more = i + 1 < n;
    }
    inner.release(released);
    (applied, journal)
}

/// Copy-on-write bookkeeping before a leaf is changed: the first change a layer makes to a
/// leaf gives it its own record, which references every entry the leaf holds.
fn make_own(inner: &Inner, map: &mut HeadMap, idx: u64) {
    if map.own.insert(idx) {
        if let Some(leaf) = map.tree.leaf(idx) {
            for e in leaf.entries() {
                inner.segments.incref(e);
            }
        }
    }
    map.dirty.insert(idx);
}

fn unmap_run(inner: &Inner, map: &mut HeadMap, first: u64, count: u64, released: &mut Vec<Entry>) {
    let end = first.saturating_add(count);
    let mut at = first;
    while let Some(b) = map.tree.next_mapped(at) {
        if b >= end {
            break;
        }
        let idx = leaf_index(b);
        make_own(inner, map, idx);
        let leaf_end = ((idx + 1) << crate::tree::LEVEL_BITS).min(end);
        let removed: Vec<Entry> = map.tree.update_leaf(idx, |l| {
            (b..leaf_end)
                .filter_map(|blk| l.remove(leaf_slot(blk)))
                .collect()
        });
        map.mapped_blocks -= removed.len() as u64;
        released.extend(removed);
        at = leaf_end;
    }
}

/// Where a read finds its mappings.
pub(crate) enum MapSource<'a> {
    Head(&'a VolumeState),
    Frozen(&'a Tree),
}

impl MapSource<'_> {
    fn lookup(&self, first: u64, n: u64) -> Vec<Option<Entry>> {
        match self {
            MapSource::Head(v) => {
                let m = v.map.read();
                (first..first + n).map(|b| m.tree.get(b)).collect()
            }
            MapSource::Frozen(t) => (first..first + n).map(|b| t.get(b)).collect(),
        }
    }
}

/// Geometry and identity of what is being read or written.
#[derive(Clone, Copy)]
pub(crate) struct Geometry<'a> {
    pub name: &'a str,
    pub block_size: u32,
    pub size: u64,
}

/// Whether a request must be whole 512-byte sectors (block frontends) or may be any bytes
/// (file frontends: partial blocks are read-modify-written like any other partial block).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Align {
    Sector,
    Byte,
}

pub(crate) fn check_range(g: &Geometry<'_>, offset: u64, len: u64, align: Align) -> Result<()> {
    if align == Align::Sector && (offset % SECTOR != 0 || len % SECTOR != 0) {
        return Err(Error::Misaligned { offset, len });
    }
    if offset.checked_add(len).is_none_or(|end| end > g.size) {
        return Err(Error::OutOfRange {
            volume: g.name.to_string(),
            offset,
            len,
            size: g.size,
        });
    }
    Ok(())
}

/// Largest single read when coalescing records that sit next to each other on disk.
const MAX_COALESCED_READ: usize = 4 << 20;

/// True when `b` is stored right after `a` and both are raw whole blocks, so one read
/// fetches both.
fn contiguous(a: &Entry, b: &Entry, block_size: u32) -> bool {
    a.segment == b.segment
        && !a.is_lz4()
        && !b.is_lz4()
        && a.stored_len() == block_size
        && b.stored_len() == block_size
        && a.page + a.pages() == b.page
}

/// Decompresses an lz4 record into `out` (one block), verifying its checksum first.
fn decode_lz4(stored: &[u8], e: &Entry, out: &mut [u8]) -> bool {
    crc32fast::hash(stored) == e.crc
        && matches!(lz4_flex::block::decompress_into(stored, out), Ok(n) if n == out.len())
}

fn read_op(inner: &Inner, e: &Entry) -> Result<Op> {
    let seg = inner.segments.get(e.segment).ok_or_else(|| {
        Error::Corrupt(format!("map points at missing data segment {}", e.segment))
    })?;
    Ok(Op::Read {
        file: seg.file.clone(),
        offset: u64::from(e.page) * PAGE_SIZE as u64,
        buf: crate::io::take_buf(e.stored_len() as usize),
    })
}

/// Block `blk`'s content as record `e` holds it, decoded. `None` when a local record does not
/// verify (it may have been freed and its pages reused since `e` was looked up); a remote one
/// that does not verify is an error.
fn read_entry(
    inner: &Inner,
    name: &str,
    block_size: u32,
    blk: u64,
    e: &Entry,
) -> Result<Option<Vec<u8>>> {
    let bs = block_size as usize;
    let stored = if e.is_remote() {
        let mut v = crate::remote::fetch_records(inner, name, block_size, &[(blk, *e)])?;
        v.pop().unwrap_or_default()
    } else {
        let _reuse = inner.segments.read_guard();
        let done = inner.segments.engine().run(read_op(inner, e)?);
        if done.result.is_err() {
            return Ok(None);
        }
        done.op.into_buf()
    };
    let mut block = vec![0u8; bs];
    let ok = if e.is_lz4() {
        decode_lz4(&stored, e, &mut block)
    } else if stored.len() == bs && crc32fast::hash(&stored) == e.crc {
        block.copy_from_slice(&stored);
        true
    } else {
        false
    };
    match (ok, e.is_remote()) {
        (true, _) => Ok(Some(block)),
        (false, false) => Ok(None),
        (false, true) => Err(Error::Remote {
            volume: name.to_string(),
            offset: blk * u64::from(block_size),
            detail: "remote record does not decode to a block".into(),
        }),
    }
}

/// Reads `buf.len()` bytes at `offset` (already range-checked).
pub(crate) fn read(
    inner: &Inner,
    src: &MapSource<'_>,
    g: &Geometry<'_>,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    if buf.is_empty() {
        return Ok(());
    }
    let bs = u64::from(g.block_size);
    let first = offset / bs;
    let last = (offset + buf.len() as u64 - 1) / bs;
    // Records still in a remote pack are fetched (and verified) before the reuse guard is
    // taken: a slow network must not hold off page reuse for the whole store.
    let mut prefetched: std::collections::HashMap<u64, (Entry, Vec<u8>)> = Default::default();
    let may_be_remote = match src {
        MapSource::Head(v) => v.maybe_remote.load(Ordering::Relaxed),
        // A checkpoint's map carries no hint: any registered pack may be in it.
        MapSource::Frozen(_) => inner.remote.any(),
    };
    if may_be_remote {
        let remote: Vec<(u64, Entry)> = src
            .lookup(first, last - first + 1)
            .into_iter()
            .enumerate()
            .filter_map(|(i, e)| e.filter(|e| e.is_remote()).map(|e| (first + i as u64, e)))
            .collect();
        if !remote.is_empty() {
            let data = crate::remote::fetch_records(inner, g.name, g.block_size, &remote)?;
            prefetched.extend(remote.into_iter().zip(data).map(|((b, e), d)| (b, (e, d))));
        }
    }
    // From lookup to the end of the IO: pages of entries looked up here are not handed to
    // writers meanwhile (see `Segments::reclaim`).
    let _reuse = inner.segments.read_guard();
    let mut entries = src.lookup(first, last - first + 1);
    let mut pending: Vec<usize> = (0..entries.len()).collect();
    for attempt in 0..=MAX_READ_RETRIES {
        let mut ops = Vec::new();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut remote = Vec::new();
        for &i in &pending {
            let Some(e) = entries[i] else {
                copy_block(g, offset, first + i as u64, None, buf);
                continue;
            };
            if e.is_remote() {
                remote.push((first + i as u64, e));
                continue;
            }
            if let (Some(group), Some(Op::Read { buf: rbuf, .. })) =
                (groups.last_mut(), ops.last_mut())
            {
                let prev = entries[group[group.len() - 1]].unwrap_or(e);
                if group[group.len() - 1] + 1 == i
                    && contiguous(&prev, &e, g.block_size)
                    && rbuf.len() < MAX_COALESCED_READ
                {
                    rbuf.resize(rbuf.len() + g.block_size as usize, 0);
                    group.push(i);
                    continue;
                }
            }
            ops.push(read_op(inner, &e)?);
            groups.push(vec![i]);
        }
        let mut retry = Vec::new();
        // Only lz4 records need a block to decompress into.
        let mut block = Vec::new();
        if !remote.is_empty() {
            // Verified against their crc32 by the fetch; a failure is an error, never data.
            // Fetched above unless the map changed since (then fetched here, under the guard).
            let missing: Vec<(u64, Entry)> = remote
                .iter()
                .filter(|(b, e)| prefetched.get(b).is_none_or(|(pe, _)| pe != e))
                .copied()
                .collect();
            let mut late =
                crate::remote::fetch_records(inner, g.name, g.block_size, &missing)?.into_iter();
            let fetched: Vec<Vec<u8>> = remote
                .iter()
                .map(|(b, e)| match prefetched.remove(b) {
                    Some((pe, d)) if pe == *e => d,
                    _ => late.next().unwrap_or_default(),
                })
                .collect();
            for ((blk, e), stored) in remote.iter().zip(fetched) {
                if e.is_lz4() {
                    block.resize(g.block_size as usize, 0);
                    if !decode_lz4(&stored, e, &mut block) {
                        return Err(Error::Remote {
                            volume: g.name.to_string(),
                            offset: blk * bs,
                            detail: "lz4 record does not decode".into(),
                        });
                    }
                    copy_block(g, offset, *blk, Some(&block), buf);
                } else if stored.len() == g.block_size as usize {
                    copy_block(g, offset, *blk, Some(&stored), buf);
                } else {
                    return Err(Error::Remote {
                        volume: g.name.to_string(),
                        offset: blk * bs,
                        detail: format!("raw record of {} bytes", stored.len()),
                    });
                }
            }
        }
        for (done, group) in inner.segments.engine().submit(ops).into_iter().zip(groups) {
            let ok = done.result.is_ok();
            let data = done.op.into_buf();
            let mut at = 0usize;
            for i in group {
                let e = entries[i].unwrap_or(Entry {
                    segment: 0,
                    page: 0,
                    len_flags: 0,
                    crc: 0,
                });
                let stored = &data[at..at + e.stored_len() as usize];
                at += e.stored_len() as usize;
                let raw = !e.is_lz4() && stored.len() == g.block_size as usize;
                if ok && raw && crc32fast::hash(stored) == e.crc {
                    copy_block(g, offset, first + i as u64, Some(stored), buf);
                } else if ok && e.is_lz4() && {
                    block.resize(g.block_size as usize, 0);
                    decode_lz4(stored, &e, &mut block)
                } {
                    copy_block(g, offset, first + i as u64, Some(&block), buf);
                } else {
                    retry.push(i);
                }
            }
            crate::io::give_buf(data);
        }
        if retry.is_empty() {
            return Ok(());
        }
        // A record replaced (and punched) while we read it fails its checksum; look again.
        let mut still_bad = None;
        for &i in &retry {
            let now = src.lookup(first + i as u64, 1)[0];
            if now == entries[i] || attempt == MAX_READ_RETRIES {
                still_bad.get_or_insert(i);
            }
            entries[i] = now;
        }
        if let Some(i) = still_bad {
            return Err(Error::Checksum {
                volume: g.name.to_string(),
                offset: (first + i as u64) * bs,
            });
        }
        pending = retry;
    }
    Err(Error::Checksum {
        volume: g.name.to_string(),
        offset: first * bs,
    })
}

/// Copies the part of block `blk` inside the request into `buf` (zeros for `None`).
fn copy_block(g: &Geometry<'_>, offset: u64, blk: u64, data: Option<&[u8]>, buf: &mut [u8]) {
    let bs = u64::from(g.block_size);
    let start = (blk * bs).max(offset);
    let end = ((blk + 1) * bs).min(offset + buf.len() as u64);
    let dst = &mut buf[(start - offset) as usize..(end - offset) as usize];
    match data {
        Some(d) => dst.copy_from_slice(&d[(start - blk * bs) as usize..(end - blk * bs) as usize]),
        None => dst.fill(0),
    }
}

/// A block's new content, ready to store.
struct Record<'a> {
    block: u64,
    payload: std::borrow::Cow<'a, [u8]>,
    lz4: bool,
    crc: u32,
    expect: Option<Option<Entry>>,
}

fn encode_record(
    block: u64,
    data: std::borrow::Cow<'_, [u8]>,
    lz4: bool,
    expect: Option<Option<Entry>>,
) -> Record<'_> {
    let bs = data.len();
    if lz4 {
        let c = lz4_flex::block::compress(&data);
        // Worth it only if it saves at least one page.
        if c.len().div_ceil(PAGE_SIZE) < bs.div_ceil(PAGE_SIZE) {
            let crc = crc32fast::hash(&c);
            return Record {
                block,
                crc,
                payload: c.into(),
                lz4: true,
                expect,
            };
        }
    }
    Record {
        block,
        crc: crc32fast::hash(&data),
        payload: data,
        lz4: false,
        expect,
    }
}

/// What a write request asks of one block.
enum BlockWrite<'a> {
    Full(&'a [u8]),
    /// Patch `data` at `at` bytes into the block.
    Partial {
        at: usize,
        data: &'a [u8],
    },
}

pub(crate) struct Writer<'a> {
    pub inner: &'a Inner,
    pub vol: &'a VolumeState,
}

impl Writer<'_> {
    fn geometry(&self) -> Geometry<'_> {
        Geometry {
            name: &self.vol.name,
            block_size: self.vol.block_size,
            size: self.vol.size(),
        }
    }

    pub fn write(&self, offset: u64, data: &[u8], align: Align) -> Result<()> {
        let g = self.geometry();
        check_range(&g, offset, data.len() as u64, align)?;
        self.inner.check_poisoned()?;
        let bs = u64::from(g.block_size);
        let mut reqs = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let blk = abs / bs;
            let at = (abs - blk * bs) as usize;
            let n = (bs as usize - at).min(data.len() - pos);
            let chunk = &data[pos..pos + n];
            reqs.push((
                blk,
                if n == bs as usize {
                    BlockWrite::Full(chunk)
                } else {
                    BlockWrite::Partial { at, data: chunk }
                },
            ));
            pos += n;
        }
        self.write_blocks(reqs)
    }

    fn write_blocks(&self, mut reqs: Vec<(u64, BlockWrite<'_>)>) -> Result<()> {
        for _ in 0..MAX_CAS_RETRIES {
            let records = self.prepare(&reqs)?;
            let conflicted = self.store_and_map(records)?;
            if conflicted.is_empty() {
                return Ok(());
            }
            reqs.retain(|(b, _)| conflicted.contains(b));
        }
        Err(Error::Contention(self.vol.name.clone()))
    }

    /// Builds the new content of each block (reading old content for partial blocks).
    fn prepare<'d>(&self, reqs: &[(u64, BlockWrite<'d>)]) -> Result<Vec<Record<'d>>> {
        let mut out = Vec::with_capacity(reqs.len());
        for (blk, w) in reqs {
            match w {
                BlockWrite::Full(d) => {
                    out.push(encode_record(*blk, (*d).into(), self.vol.lz4, None))
                }
                BlockWrite::Partial { at, data } => {
                    // The old content is read from the very record the compare-and-set
                    // below expects (`cur`), not through the map again: whatever happens to
                    // the block meanwhile (a write, a restore bringing `cur` back), the
                    // patch applies to `cur`'s bytes, or the install fails and the write is
                    // redone.
                    let (cur, mut block) = self.old_content(*blk)?;
                    block[*at..*at + data.len()].copy_from_slice(data);
                    out.push(encode_record(*blk, block.into(), self.vol.lz4, Some(cur)));
                }
            }
        }
        Ok(out)
    }

    /// Block `blk`'s current record and its content (zeros for a hole), read by entry.
    fn old_content(&self, blk: u64) -> Result<(Option<Entry>, Vec<u8>)> {
        let bs = self.vol.block_size as usize;
        for _ in 0..=MAX_READ_RETRIES {
            let cur = self.vol.map.read().tree.get(blk);
            let Some(e) = cur else {
                return Ok((None, vec![0u8; bs]));
            };
            if let Some(d) = read_entry(self.inner, &self.vol.name, self.vol.block_size, blk, &e)? {
                return Ok((cur, d));
            }
            // The record did not verify: freed and reused since the lookup (look again),
            // or damaged (still mapped: report it).
            if self.vol.map.read().tree.get(blk) == cur {
                break;
            }
        }
        Err(Error::Checksum {
            volume: self.vol.name.clone(),
            offset: blk * bs as u64,
        })
    }

    /// Writes the records' data, installs their mappings, writes the journal. Returns the
    /// blocks whose compare-and-set lost.
    fn store_and_map(&self, records: Vec<Record<'_>>) -> Result<HashSet<u64>> {
        let inner = self.inner;
        let bs = self.vol.block_size as usize;
        // All-zero blocks are unmapped instead of stored (thin provisioning); decided once.
        let zero: Vec<bool> = records
            .iter()
            .map(|r| !r.lz4 && r.payload.len() == bs && r.payload.iter().all(|&b| b == 0))
            .collect();
        let stored = || {
            records
                .iter()
                .zip(&zero)
                .filter(|(_, z)| !**z)
                .map(|(r, _)| r)
        };
        let pages: u32 = stored()
            .map(|r| r.payload.len().div_ceil(PAGE_SIZE) as u32)
            .sum();
        let mut changes = Vec::with_capacity(records.len());
        let mut written = Vec::new();
        // Held until the records are installed (or abandoned): see `Allocation`.
        let mut _reservation = None;
        if pages > 0 {
            let alloc = inner.segments.allocate(pages)?;
            let (seg, first_page) = (alloc.seg.clone(), alloc.page);
            _reservation = Some(alloc);
            let mut buf = crate::io::take_empty_buf(pages as usize * PAGE_SIZE);
            let mut page = first_page;
            for r in stored() {
                let e = Entry::new(seg.id, page, r.payload.len() as u32, r.lz4, r.crc);
                buf.extend_from_slice(&r.payload);
                buf.resize(buf.len().next_multiple_of(PAGE_SIZE), 0);
                page += e.pages();
                written.push(e);
            }
            let op = Op::Write {
                file: seg.file.clone(),
                offset: u64::from(first_page) * PAGE_SIZE as u64,
                buf,
            };
            let done = inner.segments.engine().run(op);
            if let Err(e) = done.result {
                return Err(inner.poison(Error::io("writing data", e)));
            }
            crate::io::give_buf(done.op.into_buf());
            inner.segments.mark_written(&seg);
            inner.note_dirty(u64::from(pages) * PAGE_SIZE as u64);
        }
        let mut w = written.iter();
        for (r, z) in records.iter().zip(&zero) {
            let new = if *z { None } else { w.next().copied() };
            changes.push(Change {
                block: r.block,
                count: 1,
                new,
                expect: r.expect,
            });
        }
        let applied = self.install(&changes)?;
        let mut conflicted = HashSet::new();
        let mut orphans = Vec::new();
        for (c, ok) in changes.iter().zip(applied) {
            if !ok {
                conflicted.insert(c.block);
                orphans.extend(c.new);
            }
        }
        // Records that lost their compare-and-set were never referenced.
        for e in &orphans {
            inner.segments.mark_dead(e);
        }
        inner.dead.lock().extend(orphans);
        Ok(conflicted)
    }

    /// Replaces remote entries by local copies of their records: fetches and verifies them,
    /// stores them and installs each with compare-and-set against the remote entry (a block
    /// written meanwhile keeps the new write). Returns the bytes fetched.
    pub(crate) fn hydrate(&self, items: &[(u64, Entry)]) -> Result<u64> {
        if items.is_empty() {
            return Ok(0);
        }
        self.inner.check_poisoned()?;
        let data =
            crate::remote::fetch_records(self.inner, &self.vol.name, self.vol.block_size, items)?;
        // Only records that decode to a block are kept (a hostile manifest can describe a
        // record whose crc matches but which is not one).
        let bs = self.vol.block_size as usize;
        let mut scratch = vec![0u8; bs];
        for ((blk, e), d) in items.iter().zip(&data) {
            let fits = if e.is_lz4() {
                decode_lz4(d, e, &mut scratch)
            } else {
                d.len() == bs
            };
            if !fits {
                return Err(Error::Remote {
                    volume: self.vol.name.clone(),
                    offset: blk * bs as u64,
                    detail: "remote record does not decode to a block".into(),
                });
            }
        }
        let bytes = data.iter().map(|d| d.len() as u64).sum();
        let records = items
            .iter()
            .zip(data)
            .map(|(&(block, e), d)| Record {
                block,
                payload: d.into(),
                lz4: e.is_lz4(),
                crc: e.crc,
                expect: Some(Some(e)),
            })
            .collect();
        self.store_and_map(records)?;
        Ok(bytes)
    }

    /// Installs changes in the map and writes their journal entries.
    pub(crate) fn install(&self, changes: &[Change]) -> Result<Vec<bool>> {
        let inner = self.inner;
        let (applied, entries, reservation) = {
            let _gate = inner.gate.read();
            let mut map = self.vol.map.write();
            if self.vol.deleted.load(Ordering::Relaxed) {
                return Err(Error::NoSuchVolume(self.vol.name.clone()));
            }
            let (applied, entries) = apply_changes(inner, &mut map, changes);
            let reservation = (!entries.is_empty()).then(|| inner.journal.reserve(entries.len()));
            (applied, entries, reservation)
        };
        if let Some((file, off)) = reservation {
            let op = Journal::write_op(&file, off, &entries);
            if let Err(e) = inner.segments.engine().run(op).result {
                return Err(inner.poison(Error::io("writing journal", e)));
            }
        }
        Ok(applied)
    }

    /// Unmaps `[offset, offset+len)`: whole blocks lose their mapping, partial blocks at the
    /// edges are rewritten with zeros in the range. Serves discard and write-zeroes alike.
    pub fn unmap(&self, offset: u64, len: u64, align: Align) -> Result<()> {
        let g = self.geometry();
        check_range(&g, offset, len, align)?;
        self.inner.check_poisoned()?;
        if len == 0 {
            return Ok(());
        }
        let bs = u64::from(g.block_size);
        let end = offset + len;
        let first_full = offset.div_ceil(bs);
        let end_full = end / bs;
        if first_full >= end_full {
            return self.zero_partial(offset, end);
        }
        if offset < first_full * bs {
            self.zero_partial(offset, first_full * bs)?;
        }
        if end_full * bs < end {
            self.zero_partial(end_full * bs, end)?;
        }
        let mut b = first_full;
        while b < end_full {
            let n = (end_full - b).min(UNMAP_CHUNK);
            self.install(&[Change {
                block: b,
                count: n,
                new: None,
                expect: None,
            }])?;
            b += n;
        }
        Ok(())
    }

    /// Zeros `[from, to)` inside mapped blocks by rewriting them (unmapped blocks already
    /// read as zeros).
    fn zero_partial(&self, from: u64, to: u64) -> Result<()> {
        let bs = u64::from(self.vol.block_size);
        let zeros = vec![0u8; (to - from).min(bs) as usize];
        let mut at = from;
        while at < to {
            let blk = at / bs;
            let end = ((blk + 1) * bs).min(to);
            if self.vol.map.read().tree.get(blk).is_some() {
                let w = BlockWrite::Partial {
                    at: (at - blk * bs) as usize,
                    data: &zeros[..(end - at) as usize],
                };
                self.write_blocks(vec![(blk, w)])?;
            }
            at = end;
        }
        Ok(())
    }
}

/// Hydrates remote blocks of `vol` in `[from, to)`: fetches up to about `max_bytes` of them
/// (scanning at most 64 Ki blocks) and stores them locally. Returns where to go on from, or
/// `None` once `to` (or the end of the map) is reached, and the bytes fetched.
pub(crate) fn hydrate_step(
    inner: &Inner,
    vol: &VolumeState,
    from: u64,
    to: u64,
    max_bytes: u64,
) -> Result<(Option<u64>, u64)> {
    const SCAN: u64 = 1 << 16;
    let (items, next) = {
        let m = vol.map.read();
        let mut items = Vec::new();
        let mut bytes = 0u64;
        let mut at = from;
        let limit = from.saturating_add(SCAN).min(to);
        let next = loop {
            let Some(b) = m.tree.next_mapped(at) else {
                break None;
            };
            if b >= to {
                break None;
            }
            if b >= limit || bytes >= max_bytes {
                break Some(b);
            }
            if let Some(e) = m.tree.get(b).filter(|e| e.is_remote()) {
                bytes += u64::from(e.stored_len());
                items.push((b, e));
            }
            at = b + 1;
        };
        (items, next)
    };
    let fetched = Writer { inner, vol }.hydrate(&items)?;
    Ok((next, fetched))
}

/// An open volume: read, write and flush. Cheap to clone; an ephemeral volume is deleted
/// when its last handle is dropped.
#[derive(Debug)]
pub struct Volume {
    pub(crate) inner: Arc<Inner>,
    pub(crate) state: Arc<VolumeState>,
}

impl Clone for Volume {
    fn clone(&self) -> Self {
        self.state.handles.fetch_add(1, Ordering::Relaxed);
        Volume {
            inner: self.inner.clone(),
            state: self.state.clone(),
        }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let last = self.state.handles.fetch_sub(1, Ordering::AcqRel) == 1;
        if last && self.state.ephemeral && !self.state.deleted.load(Ordering::Relaxed) {
            if let Err(e) = crate::ops::delete_volume(&self.inner, &self.state.name, true) {
                tracing::warn!(volume = %self.state.name, error = %e, "discarding ephemeral volume failed");
            }
        }
    }
}

impl Volume {
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// Logical size in bytes.
    pub fn size(&self) -> u64 {
        self.state.size()
    }

    pub fn block_size(&self) -> u32 {
        self.state.block_size
    }

    fn writer(&self) -> Writer<'_> {
        Writer {
            inner: &self.inner,
            vol: &self.state,
        }
    }

    fn read_aligned(&self, offset: u64, buf: &mut [u8], align: Align) -> Result<()> {
        let g = Geometry {
            name: &self.state.name,
            block_size: self.state.block_size,
            size: self.state.size(),
        };
        check_range(&g, offset, buf.len() as u64, align)?;
        if !buf.is_empty() && self.state.maybe_remote.load(Ordering::Relaxed) {
            // Blocks still remote are fetched once and kept (hydrated), not fetched per read.
            let bs = u64::from(g.block_size);
            let (first, last) = (offset / bs, (offset + buf.len() as u64 - 1) / bs);
            let remote: Vec<(u64, Entry)> = {
                let m = self.state.map.read();
                (first..=last)
                    .filter_map(|b| m.tree.get(b).filter(|e| e.is_remote()).map(|e| (b, e)))
                    .collect()
            };
            match self.writer().hydrate(&remote) {
                // The remote failed (or sent bad data): that is the read's answer.
                Err(e @ Error::Remote { .. }) => return Err(e),
                // Keeping the blocks failed (a full disk, a store refusing writes): the read
                // below still fetches and serves them.
                Err(e) => {
                    tracing::debug!(volume = %self.state.name, error = %e, "blocks read but not kept")
                }
                Ok(_) => {}
            }
        }
        read(&self.inner, &MapSource::Head(&self.state), &g, offset, buf)
    }

    /// Points blocks at records in remote packs (a lazy restore): reads fetch them on demand
    /// and [`Volume::hydrate_step`] copies them in. Each block must be inside the volume and
    /// each pack registered. Durable after the next flush, like a write.
    pub fn install_remote(&self, extents: &[(u64, crate::RemoteExtent)]) -> Result<()> {
        let blocks = self.state.blocks();
        let mut changes = Vec::with_capacity(extents.len().min(4096));
        for (i, (blk, x)) in extents.iter().enumerate() {
            if *blk >= blocks {
                return Err(Error::InvalidArgument(format!(
                    "remote extent for block {blk} is beyond the volume's {blocks} blocks"
                )));
            }
            if !self.inner.remote.has_pack(x.pack) {
                return Err(Error::InvalidArgument(format!(
                    "remote pack {} is not registered",
                    x.pack
                )));
            }
            if x.stored_len == 0 || x.stored_len > self.state.block_size {
                return Err(Error::InvalidArgument(format!(
                    "remote extent for block {blk} has stored length {}",
                    x.stored_len
                )));
            }
            changes.push(Change {
                block: *blk,
                count: 1,
                new: Some(x.entry()),
                expect: None,
            });
            if changes.len() == 4096 || i + 1 == extents.len() {
                self.state.maybe_remote.store(true, Ordering::Relaxed);
                self.writer().install(&changes)?;
                changes.clear();
            }
        }
        Ok(())
    }

    /// Hydrates remote blocks in `[from, to)`: see [`crate::Store::hydrate_step`], which does
    /// the same without a handle.
    pub fn hydrate_step(&self, from: u64, to: u64, max_bytes: u64) -> Result<(Option<u64>, u64)> {
        hydrate_step(&self.inner, &self.state, from, to, max_bytes)
    }

    /// Blocks of the live volume still held only remotely.
    pub fn remote_blocks(&self) -> u64 {
        self.state.count_remote()
    }

    /// Reads `buf.len()` bytes at `offset` (both multiples of 512). Never-written and
    /// discarded ranges read as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_aligned(offset, buf, Align::Sector)
    }

    /// Writes `data` at `offset` (both multiples of 512). Once this returns the data survives
    /// a crash of this process; after a [`Volume::flush`] it survives a power cut.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.writer().write(offset, data, Align::Sector)
    }

    /// Makes the range read as zeros, releasing its space.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.writer().unmap(offset, len, Align::Sector)
    }

    /// Releases the range's space; it reads as zeros afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writer().unmap(offset, len, Align::Sector)
    }

    /// [`Volume::read`] at any byte offset and length, for frontends that serve the volume
    /// as a file.
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_aligned(offset, buf, Align::Byte)
    }

    /// [`Volume::write`] at any byte offset and length: partial blocks are
    /// read-modify-written atomically with respect to other writes.
    pub fn write_bytes(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.writer().write(offset, data, Align::Byte)
    }

    /// Writes whole blocks at block-aligned byte offsets (distinct blocks, in any order) as
    /// one change: one journal group, so after a crash of the process, or after a power cut
    /// before the next flush, either every block has its new content or none has. All-zero
    /// blocks are unmapped. Durability as [`Volume::write`].
    pub fn write_blocks(&self, blocks: &[(u64, &[u8])]) -> Result<()> {
        let bs = u64::from(self.state.block_size);
        let size = self.state.size();
        let mut seen = HashSet::with_capacity(blocks.len());
        let mut reqs = Vec::with_capacity(blocks.len());
        for (off, data) in blocks {
            if off % bs != 0
                || data.len() as u64 != bs
                || off.checked_add(bs).is_none_or(|e| e > size)
            {
                return Err(Error::InvalidArgument(format!(
                    "block write at {off} of {} bytes: must be one whole {bs}-byte block inside the volume",
                    data.len()
                )));
            }
            if !seen.insert(off / bs) {
                return Err(Error::InvalidArgument(format!(
                    "block write names offset {off} twice"
                )));
            }
            reqs.push((off / bs, BlockWrite::Full(data)));
        }
        self.inner.check_poisoned()?;
        self.writer().write_blocks(reqs)
    }

    /// Whether this is a sandbox tree volume.
    pub fn is_tree(&self) -> bool {
        self.state.tree
    }

    /// [`Volume::discard`] at any byte offset and length: whole blocks are released, the
    /// partial blocks at either edge are rewritten with zeros in the range.
    pub fn unmap_bytes(&self, offset: u64, len: u64) -> Result<()> {
        self.writer().unmap(offset, len, Align::Byte)
    }

    /// Makes every write acknowledged before this call durable against power loss.
    pub fn flush(&self) -> Result<()> {
        self.inner.commit(Vec::new())
    }

    /// Bytes currently mapped (stored) in the live volume.
    pub fn mapped_bytes(&self) -> u64 {
        self.state.map.read().mapped_blocks * u64::from(self.state.block_size)
    }

    /// First mapped byte offset at or after `offset` (`None`: only holes remain): for
    /// SEEK_DATA / SEEK_HOLE.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        let bs = u64::from(self.state.block_size);
        let b = self.state.map.read().tree.next_mapped(offset / bs)?;
        Some((b * bs).max(offset)).filter(|o| *o < self.size())
    }

    /// First byte offset at or after `offset` that lies in a hole, or the size when none
    /// does: for SEEK_HOLE (the end of the volume counts as a hole).
    pub fn next_hole(&self, offset: u64) -> u64 {
        let bs = u64::from(self.state.block_size);
        let b = self.state.map.read().tree.next_unmapped(offset / bs);
        (b * bs).max(offset).min(self.size())
    }
}

/// A read-only view of a checkpoint (its map is an O(1) clone, unaffected by later writes).
#[derive(Debug)]
pub struct Snapshot {
    inner: Arc<Inner>,
    name: String,
    tree: Tree,
    block_size: u32,
    lz4: bool,
    size: u64,
    id: u64,
    pin: Option<Arc<std::sync::atomic::AtomicUsize>>,
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Some(p) = &self.pin {
            p.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Snapshot {
    pub(crate) fn new(inner: Arc<Inner>, name: String, r: crate::ops::Resolved) -> Self {
        Snapshot {
            inner,
            name,
            tree: r.tree,
            block_size: r.block_size,
            lz4: r.lz4,
            size: r.size,
            id: r.id,
            pin: r.pin,
        }
    }

    /// `VOL@CKPT`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `buf.len()` bytes at `offset` (both multiples of 512).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_aligned(offset, buf, Align::Sector)
    }

    /// [`Snapshot::read`] at any byte offset and length.
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_aligned(offset, buf, Align::Byte)
    }

    fn read_aligned(&self, offset: u64, buf: &mut [u8], align: Align) -> Result<()> {
        let g = Geometry {
            name: &self.name,
            block_size: self.block_size,
            size: self.size,
        };
        check_range(&g, offset, buf.len() as u64, align)?;
        read(&self.inner, &MapSource::Frozen(&self.tree), &g, offset, buf)
    }

    /// The checkpoint's id: unique in the store and never reused, so a checkpoint deleted
    /// and taken again under the same name has a new id.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Whether the volume stores lz4-compressed records.
    pub fn lz4(&self) -> bool {
        self.lz4
    }

    /// Every mapped block and its record, in block order.
    pub fn records(&self) -> Vec<(u64, Entry)> {
        let mut out = Vec::new();
        for (idx, leaf) in self.tree.leaves() {
            for (slot, e) in leaf.iter() {
                out.push((idx * crate::tree::LEAF_SLOTS as u64 + slot as u64, e));
            }
        }
        out.sort_unstable_by_key(|(b, _)| *b);
        out
    }

    /// Blocks whose record differs from `base`'s (mapped, unmapped or replaced), in block
    /// order. Costs what differs: subtrees the two share are skipped.
    pub fn changed_since(&self, base: &Snapshot) -> Vec<u64> {
        crate::ops::changed_blocks(&self.tree, &base.tree)
    }

    /// The record block `block` maps to, if any.
    pub fn record(&self, block: u64) -> Option<Entry> {
        self.tree.get(block)
    }

    /// Ids of the checkpoints this one descends from (through forks too), nearest first.
    pub fn ancestors(&self) -> Vec<u64> {
        crate::ops::checkpoint_ancestors(&self.inner, self.id)
    }

    /// First mapped byte offset at or after `offset`.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        let bs = u64::from(self.block_size);
        let b = self.tree.next_mapped(offset / bs)?;
        Some((b * bs).max(offset)).filter(|o| *o < self.size)
    }

    /// First byte offset at or after `offset` in a hole, or the size: see
    /// [`Volume::next_hole`].
    pub fn next_hole(&self, offset: u64) -> u64 {
        let bs = u64::from(self.block_size);
        (self.tree.next_unmapped(offset / bs) * bs)
            .max(offset)
            .min(self.size)
    }
}

/// What to read from: a live volume or a checkpoint (image export, tree diffs).
#[derive(Debug)]
pub enum Source {
    Live(Volume),
    Checkpoint(Snapshot),
}

impl Source {
    pub fn size(&self) -> u64 {
        match self {
            Source::Live(v) => v.size(),
            Source::Checkpoint(s) => s.size(),
        }
    }

    /// [`Volume::read`]: offset and length multiples of 512.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Source::Live(v) => v.read(offset, buf),
            Source::Checkpoint(s) => s.read(offset, buf),
        }
    }

    /// [`Volume::read_bytes`]: any offset and length.
    pub fn read_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Source::Live(v) => v.read_bytes(offset, buf),
            Source::Checkpoint(s) => s.read_bytes(offset, buf),
        }
    }

    pub fn next_data(&self, offset: u64) -> Option<u64> {
        match self {
            Source::Live(v) => v.next_data(offset),
            Source::Checkpoint(s) => s.next_data(offset),
        }
    }
}
