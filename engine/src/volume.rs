//! Volume IO: read, write, write-zeroes, discard at byte offsets, over a loaded map.
//!
//! **Writes.** A write stores its whole blocks as one record per run of non-zero blocks
//! (up to 16 MiB; all-zero blocks are unmapped instead), puts each page's crc32 in the
//! segment's table, then, holding the store's gate shared and the volume's map lock, points
//! the map at the new extents and reserves journal entries (one per extent); the entries are
//! written before the write returns. A partial block is read, patched and installed only if
//! the block still maps to what was read (compare-and-set), retrying otherwise, so two
//! overlapping writes never lose each other's bytes.
//!
//! **Reads.** A read looks up the pieces of its range and reads each run of blocks stored
//! back to back with one IO, straight into the caller's buffer. It first asks only for what
//! the host's page cache holds (`RWF_NOWAIT`): those pages are trusted, because segment files
//! are read without kernel readahead, so a page is cached only because Strata wrote it or
//! read and verified it. Whatever comes from the device is read again with its checksums and
//! verified (and dropped from the cache if it fails); a cached read that overlaps such an
//! in-flight verification verifies too. Holes read as zeros.
//!
//! Concurrency contract: operations on different blocks are independent. Concurrent writes
//! that overlap are each atomic per block: a block ends up wholly as one of them (patched by
//! any partial writes that serialized after it), never a mix within a 512-byte sector. A
//! multi-block write is not atomic as a whole (except [`Writer::write_blocks`]).

use crate::catalog::{HeadMap, VolumeState};
use crate::codec::{self, JournalEntry};
use crate::inner::Inner;
use crate::io::{Buf, Data, Op};
use crate::journal::Journal;
use crate::map::{Loc, Piece, Tree, PAGE_SIZE};
use crate::record::{self, Bad};
use crate::{Error, Result};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

/// Sector size: offsets and lengths of block requests are multiples of it.
pub const SECTOR: u64 = 512;
/// Bound on compare-and-set retries of one partial-block write.
const MAX_CAS_RETRIES: usize = 64;
/// Bound on re-reads of a range whose record was replaced while being read.
const MAX_READ_RETRIES: usize = 8;
/// Largest run of blocks one unmap journal entry covers.
const UNMAP_CHUNK: u64 = 1 << 16;
/// Largest record (pages) one write stores: 16 MiB.
const MAX_RECORD_PAGES: u32 = 4096;

/// Remote records a hydration fetches: in flight for it until dropped, which remembers the
/// copies it kept and wakes hydrations waiting for them (see [`crate::remote::Kept`]).
struct InFlight<'a> {
    kept: &'a crate::remote::Kept,
    mine: &'a [(u64, Loc)],
    copies: Vec<(Loc, crate::remote::LocalCopy)>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.kept.finish(self.mine, &self.copies);
    }
}

/// One change to a range's mapping.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Change {
    pub block: u64,
    /// Blocks covered.
    pub count: u64,
    pub new: Option<Loc>,
    /// For compare-and-set (one block): the mapping the new content was derived from.
    pub expect: Option<Option<Loc>>,
    /// What replay checks the record against (see [`JournalEntry::check`]).
    pub check: u32,
}

/// A whole group's compare-and-set: the group is installed only if `[first, first + blocks)`
/// still maps exactly to `pieces` (a defragmenting rewrite of what was read) and no dead
/// pages were handed back for reuse since the lookup (`epoch`, [`Segments::reuse_epoch`]):
/// a location whose pages were reused may be mapped again with other bytes, so equal
/// locations alone do not prove equal content once the lookup's reuse guard is gone.
///
/// [`Segments::reuse_epoch`]: crate::segment::Segments::reuse_epoch
#[derive(Debug, Clone)]
pub(crate) struct RangeGuard {
    pub first: u64,
    pub blocks: u64,
    pub pieces: Vec<Piece>,
    pub epoch: u64,
}

/// Applies `changes` to a loaded head map. Caller holds the gate shared and the map
/// exclusively. Returns, per change, whether it was applied, and the journal entries to
/// write.
pub(crate) fn apply_changes(
    inner: &Inner,
    vol: &VolumeState,
    map: &mut HeadMap,
    changes: &[Change],
) -> (Vec<bool>, Vec<JournalEntry>) {
    let ppb = vol.ppb();
    let mut applied = Vec::with_capacity(changes.len());
    let mut journal = Vec::with_capacity(changes.len());
    for c in changes {
        if let Some(expect) = c.expect {
            if map.tree.get(c.block) != expect {
                applied.push(false);
                continue;
            }
        }
        let layer = map.layer;
        let edits = map.tree.replace(c.block, c.count, c.new, layer);
        // References first go up (chunks taken over, the new extent), then down (what the
        // change took out), so no run is seen dead on the way.
        for (idx, _, taken) in &edits {
            if let Some(t) = taken {
                inner.reference_all(t, ppb);
            }
            map.dirty.insert(*idx);
        }
        if let Some(l) = &c.new {
            inner.reference(l, c.count, ppb, 1);
        }
        let mut delta = 0i64;
        for (_, r, _) in &edits {
            for (loc, blocks) in &r.removed {
                inner.reference(loc, *blocks, ppb, -1);
            }
            delta += r.mapped_delta;
        }
        map.mapped_blocks = (map.mapped_blocks as i64 + delta).max(0) as u64;
        journal.push(JournalEntry {
            seq: 0,
            layer,
            object: 0,
            block: c.block,
            count: u32::try_from(c.count).unwrap_or(u32::MAX),
            loc: c.new,
            check: c.check,
            index: 0,
            more: false,
            v1: false,
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
    (applied, journal)
}

/// Blocks of `[first, first + count)` that `tree` does not map.
fn unmapped(tree: &Tree, first: u64, count: u64) -> u64 {
    let mapped: u64 = tree
        .lookup(first, count)
        .iter()
        .filter(|p| p.loc.is_some())
        .map(|p| p.blocks)
        .sum();
    count.saturating_sub(mapped)
}

/// Blocks of the live map still held remotely (walks the map); clears the `maybe_remote`
/// hint when there are none.
pub(crate) fn count_remote(vol: &VolumeState) -> u64 {
    let n: u64 = {
        let m = vol.map.read();
        if !m.loaded {
            return 0;
        }
        m.tree
            .extents()
            .filter(|e| e.loc.is_remote())
            .map(|e| e.len)
            .sum()
    };
    if n == 0 {
        vol.maybe_remote.store(false, Ordering::Relaxed);
    }
    n
}

/// Where a read finds its mappings.
pub(crate) enum MapSource<'a> {
    Head(&'a VolumeState),
    Frozen(&'a Tree),
}

impl MapSource<'_> {
    fn lookup(&self, first: u64, n: u64) -> Result<Vec<Piece>> {
        match self {
            MapSource::Head(v) => {
                let m = v.map.read();
                Ok(m.tree(&v.name)?.lookup(first, n))
            }
            MapSource::Frozen(t) => Ok(t.lookup(first, n)),
        }
    }

    fn get(&self, block: u64) -> Result<Option<Loc>> {
        Ok(self.lookup(block, 1)?.first().and_then(|p| p.loc))
    }
}

/// IOs a read of `pieces` issues: runs of raw pieces stored back to back count once, every
/// other stored piece once.
pub(crate) fn io_runs(pieces: &[Piece], ppb: u32) -> usize {
    let mut runs = 0;
    let mut prev: Option<&Piece> = None;
    for p in pieces {
        if let Some(l) = p.loc {
            let continues = prev
                .and_then(|q| q.loc.map(|ql| (q, ql)))
                .is_some_and(|(q, ql)| {
                    q.block + q.blocks == p.block && ql.continues(q.blocks, &l, ppb)
                });
            if !continues {
                runs += 1;
            }
        }
        prev = Some(p);
    }
    runs
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
    if align == Align::Sector && (!offset.is_multiple_of(SECTOR) || !len.is_multiple_of(SECTOR)) {
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

/// Decompresses an lz4 block into `out` (one block).
fn decode_lz4(stored: &[u8], out: &mut [u8]) -> bool {
    matches!(lz4_flex::block::decompress_into(stored, out), Ok(n) if n == out.len())
}

fn missing_segment(seg: u32) -> Error {
    Error::Corrupt(format!("map points at missing data segment {seg}"))
}

/// A run of pieces stored back to back in one segment: read with one IO.
struct Run {
    /// Byte range of the request it fills.
    dst: std::ops::Range<usize>,
    loc: Loc,
    /// Byte offset in the segment file.
    offset: u64,
    /// First block, for error reports.
    block: u64,
}

/// What went wrong with a piece: its first block.
struct Stale(u64);

/// Reads `buf.len()` bytes at `offset` (already range-checked). Returns the pieces the
/// range mapped to when it was read, and the reuse epoch of that lookup (see [`RangeGuard`]).
pub(crate) fn read(
    inner: &Inner,
    src: &MapSource<'_>,
    g: &Geometry<'_>,
    offset: u64,
    buf: &mut [u8],
) -> Result<(Vec<Piece>, u64)> {
    if buf.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let bs = u64::from(g.block_size);
    let first = offset / bs;
    let last = (offset + buf.len() as u64 - 1) / bs;
    // Records still in a remote pack are fetched (and verified) before the reuse guard is
    // taken: a slow network must not hold off page reuse for the whole store.
    let mut prefetched: HashMap<u64, (Loc, Vec<u8>)> = HashMap::new();
    let may_be_remote = match src {
        MapSource::Head(v) => v.maybe_remote.load(Ordering::Relaxed),
        // A checkpoint's map carries no hint: any registered pack may be in it.
        MapSource::Frozen(_) => inner.remote.any(),
    };
    if may_be_remote {
        let remote: Vec<(u64, Loc)> = src
            .lookup(first, last - first + 1)?
            .into_iter()
            .filter_map(|p| p.loc.filter(Loc::is_remote).map(|l| (p.block, l)))
            .collect();
        if !remote.is_empty() {
            let data = crate::remote::fetch_records(&inner.remote, g.name, g.block_size, &remote)?;
            prefetched.extend(remote.into_iter().zip(data).map(|((b, l), d)| (b, (l, d))));
        }
    }
    for attempt in 0..=MAX_READ_RETRIES {
        // From lookup to the end of the IO: pages of locations looked up here are not handed
        // to writers meanwhile (see `Segments::reclaim`).
        let reuse = inner.segments.read_guard();
        let epoch = inner.segments.reuse_epoch();
        let pieces = src.lookup(first, last - first + 1)?;
        let bad = match read_pieces(inner, g, offset, buf, &pieces, &prefetched)? {
            None => return Ok((pieces, epoch)),
            Some(Stale(b)) => b,
        };
        drop(reuse);
        // A record replaced (and its pages reused) since the lookup fails its checksum; look
        // again. Still mapped the same: it is damaged.
        let then = pieces
            .iter()
            .find(|p| p.block <= bad && bad < p.block + p.blocks)
            .and_then(|p| {
                p.loc
                    .map(|l| l.advance(bad - p.block, g.block_size / PAGE_SIZE as u32))
            });
        if src.get(bad)? == then || attempt == MAX_READ_RETRIES {
            return Err(Error::Checksum {
                volume: g.name.to_string(),
                offset: bad * bs,
            });
        }
    }
    Err(Error::Checksum {
        volume: g.name.to_string(),
        offset: first * bs,
    })
}

/// Reads `pieces` into `buf` (which starts at byte `offset` of the volume). `Some` names a
/// block whose bytes did not verify.
fn read_pieces(
    inner: &Inner,
    g: &Geometry<'_>,
    offset: u64,
    buf: &mut [u8],
    pieces: &[Piece],
    prefetched: &HashMap<u64, (Loc, Vec<u8>)>,
) -> Result<Option<Stale>> {
    let bs = u64::from(g.block_size);
    let end = offset + buf.len() as u64;
    let mut runs: Vec<Run> = Vec::new();
    let mut others: Vec<(std::ops::Range<usize>, u64, Loc)> = Vec::new();
    for p in pieces {
        let from = (p.block * bs).max(offset);
        let to = ((p.block + p.blocks) * bs).min(end);
        let dst = (from - offset) as usize..(to - offset) as usize;
        match p.loc {
            None => buf[dst].fill(0),
            Some(l) if l.is_raw() => {
                let seg_off = u64::from(l.page) * PAGE_SIZE as u64 + (from - p.block * bs);
                match runs.last_mut() {
                    Some(r)
                        if r.loc.segment == l.segment
                            && r.dst.end == dst.start
                            && r.offset + r.dst.len() as u64 == seg_off =>
                    {
                        r.dst.end = dst.end
                    }
                    _ => runs.push(Run {
                        dst,
                        loc: l,
                        offset: seg_off,
                        block: p.block,
                    }),
                }
            }
            Some(l) => others.push((dst, p.block, l)),
        }
    }
    for (dst, block, l) in others {
        let Some(data) = read_block(inner, g, block, &l, prefetched)? else {
            return Ok(Some(Stale(block)));
        };
        let at = ((block * bs).max(offset) - block * bs) as usize;
        let n = dst.len();
        buf[dst].copy_from_slice(&data[at..at + n]);
    }
    if runs.is_empty() {
        return Ok(None);
    }
    // One IO per run, straight into the caller's buffer, from the page cache only.
    let mut segs = Vec::with_capacity(runs.len());
    for r in &runs {
        segs.push(
            inner
                .segments
                .get(r.loc.segment)
                .ok_or_else(|| missing_segment(r.loc.segment))?,
        );
    }
    let mut ops = Vec::with_capacity(runs.len());
    let mut rest: &mut [u8] = buf;
    let mut at = 0usize;
    for (r, seg) in runs.iter().zip(&segs) {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.dst.start - at);
        let (dst, tail) = tail.split_at_mut(r.dst.len());
        rest = tail;
        at = r.dst.end;
        ops.push(record::cached_read(seg, r.offset, dst));
    }
    let mut bad = None;
    for ((done, r), seg) in inner
        .segments
        .engine()
        .submit(ops)
        .into_iter()
        .zip(&runs)
        .zip(&segs)
    {
        let got = done.result.map_err(|e| Error::io("reading data", e))?;
        let Op::ReadCached {
            buf: Buf::Slice(dst),
            ..
        } = done.op
        else {
            continue;
        };
        // A page brought in by a read still verifying it is not trusted yet.
        let from = if seg.unverified_reads() { 0 } else { got };
        if from < dst.len() && !verify_into(inner, seg, r.offset + from as u64, &mut dst[from..])? {
            bad.get_or_insert(Stale(r.block + (from as u64) / bs));
        }
    }
    Ok(bad)
}

/// Fills `dst` from byte `offset` of `seg`, reading the pages it covers from the device and
/// checking them against the table. False when they do not verify.
fn verify_into(
    inner: &Inner,
    seg: &crate::segment::Segment,
    offset: u64,
    dst: &mut [u8],
) -> Result<bool> {
    let page = offset / PAGE_SIZE as u64;
    let end = offset + dst.len() as u64;
    let pages = end.div_ceil(PAGE_SIZE as u64) - page;
    let (Ok(page32), Ok(pages32)) = (u32::try_from(page), u32::try_from(pages)) else {
        return Ok(false);
    };
    match record::read_verified(inner.segments.engine(), seg, page32, pages32) {
        Ok(data) => {
            let at = (offset - page * PAGE_SIZE as u64) as usize;
            dst.copy_from_slice(&data[at..at + dst.len()]);
            crate::io::give_buf(data);
            Ok(true)
        }
        Err(Bad::Checksum) => Ok(false),
        Err(Bad::Io(e)) => Err(Error::io("reading data", e)),
        Err(Bad::NoSegment) => Err(missing_segment(seg.id)),
        Err(Bad::OutOfSegment) => Err(Error::Corrupt(format!(
            "map points past the end of data segment {}",
            seg.id
        ))),
    }
}

/// Block `blk`'s content as `loc` holds it, decoded and verified. `None` when a local record
/// does not verify (it may have been freed and its pages reused since `loc` was looked up);
/// a remote one that does not verify is an error.
fn read_block(
    inner: &Inner,
    g: &Geometry<'_>,
    blk: u64,
    loc: &Loc,
    prefetched: &HashMap<u64, (Loc, Vec<u8>)>,
) -> Result<Option<Vec<u8>>> {
    let bs = g.block_size as usize;
    let remote_err = |detail: String| Error::Remote {
        volume: g.name.to_string(),
        offset: blk * bs as u64,
        detail,
    };
    let stored = if loc.is_remote() {
        match prefetched.get(&blk) {
            Some((l, d)) if l == loc => d.clone(),
            _ => crate::remote::fetch_records(&inner.remote, g.name, g.block_size, &[(blk, *loc)])?
                .pop()
                .unwrap_or_default(),
        }
    } else if loc.is_raw() {
        let seg = inner
            .segments
            .get(loc.segment)
            .ok_or_else(|| missing_segment(loc.segment))?;
        let mut block = vec![0u8; bs];
        let offset = u64::from(loc.page) * PAGE_SIZE as u64;
        let got = inner
            .segments
            .engine()
            .run(record::cached_read(&seg, offset, &mut block))
            .result;
        let got = got.map_err(|e| Error::io("reading data", e))?;
        let from = if seg.unverified_reads() { 0 } else { got };
        if from < bs && !verify_into(inner, &seg, offset + from as u64, &mut block[from..])? {
            return Ok(None);
        }
        return Ok(Some(block));
    } else {
        match record::read_single(&inner.segments, loc) {
            Ok(d) => d,
            Err(Bad::Checksum) => return Ok(None),
            Err(Bad::Io(e)) => return Err(Error::io("reading data", e)),
            Err(Bad::NoSegment) => return Err(missing_segment(loc.segment)),
            Err(Bad::OutOfSegment) => {
                return Err(Error::Corrupt(format!(
                    "map points past the end of data segment {}",
                    loc.segment
                )))
            }
        }
    };
    if loc.is_lz4() {
        let mut block = vec![0u8; bs];
        if decode_lz4(&stored, &mut block) {
            return Ok(Some(block));
        }
        if loc.is_remote() {
            return Err(remote_err("lz4 record does not decode".into()));
        }
        return Ok(None);
    }
    if stored.len() != bs {
        if loc.is_remote() {
            return Err(remote_err(format!("raw record of {} bytes", stored.len())));
        }
        return Ok(None);
    }
    Ok(Some(stored))
}

/// A run of blocks' new content, ready to store.
struct Rec<'a> {
    block: u64,
    /// Whole blocks (plain), or one lz4-compressed block as stored (hydration).
    data: Cow<'a, [u8]>,
    stored_lz4: bool,
    /// For compare-and-set (one block): the mapping the content was derived from.
    expect: Option<Option<Loc>>,
}

/// What a write request asks of one block.
enum BlockWrite<'a> {
    /// Whole blocks from `block` on.
    Full(&'a [u8]),
    /// Patch `data` at `at` bytes into the block.
    Partial { at: usize, data: &'a [u8] },
}

fn is_zero(b: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets the aligned
        // middle of the byte slice, which stays borrowed for the same lifetime.
        unsafe { b.align_to::<u128>() }
    };
    head.iter().all(|&x| x == 0) && body.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

/// A run of blocks to store as one record (or one lz4 block), as it will be stored.
struct Stored<'a> {
    block: u64,
    blocks: u64,
    bytes: Cow<'a, [u8]>,
    lz4: bool,
    expect: Option<Option<Loc>>,
}

/// A piece written to disk: where it went, and its pages' crcs.
struct Placed {
    block: u64,
    blocks: u64,
    loc: Loc,
    expect: Option<Option<Loc>>,
    crcs: Vec<u32>,
}

/// Splits records into the pieces to store, in allocations of at most `max_pages` pages,
/// and the unmaps of all-zero blocks of plain content (thin provisioning).
fn lay_out<'d>(
    records: &'d [Rec<'_>],
    bs: usize,
    lz4: bool,
    max_pages: u32,
) -> (Vec<Vec<Stored<'d>>>, Vec<Change>) {
    let mut unmaps = Vec::new();
    let mut pieces = Vec::new();
    for r in records {
        if r.stored_lz4 {
            pieces.push(Stored {
                block: r.block,
                blocks: 1,
                bytes: Cow::Borrowed(&r.data),
                lz4: true,
                expect: r.expect,
            });
            continue;
        }
        for (first, run) in nonzero_runs(&r.data, bs, |i| {
            unmaps.push(Change {
                block: r.block + i,
                count: 1,
                new: None,
                expect: r.expect,
                check: 0,
            })
        }) {
            split_run(
                r.block + first,
                run,
                bs,
                lz4,
                max_pages,
                r.expect,
                &mut pieces,
            );
        }
    }
    let mut batches: Vec<(u32, Vec<Stored<'d>>)> = Vec::new();
    for p in pieces {
        let pages = p.bytes.len().div_ceil(PAGE_SIZE) as u32;
        match batches.last_mut() {
            Some((n, b)) if *n + pages <= max_pages => {
                *n += pages;
                b.push(p);
            }
            _ => batches.push((pages, vec![p])),
        }
    }
    (batches.into_iter().map(|(_, b)| b).collect(), unmaps)
}

/// The runs of non-zero blocks of `data` (first block index, bytes); `zero` is called with
/// the index of each all-zero block.
fn nonzero_runs(data: &[u8], bs: usize, mut zero: impl FnMut(u64)) -> Vec<(u64, &[u8])> {
    let n = data.len() / bs;
    let mut out = Vec::new();
    let mut start = None;
    for i in 0..=n {
        let is_zero = i < n && is_zero(&data[i * bs..(i + 1) * bs]);
        if i == n || is_zero {
            if let Some(s) = start.take() {
                out.push((s as u64, &data[s * bs..i * bs]));
            }
            if is_zero {
                zero(i as u64);
            }
        } else if start.is_none() {
            start = Some(i);
        }
    }
    out
}

/// Cuts a run of plain blocks into pieces: one per block for lz4 volumes (compressed when
/// that saves a page), else runs that fit an allocation.
fn split_run<'d>(
    block: u64,
    run: &'d [u8],
    bs: usize,
    lz4: bool,
    max_pages: u32,
    expect: Option<Option<Loc>>,
    out: &mut Vec<Stored<'d>>,
) {
    if lz4 {
        for (i, plain) in run.chunks(bs).enumerate() {
            let c = lz4_flex::block::compress(plain);
            let saves = c.len().div_ceil(PAGE_SIZE) < bs.div_ceil(PAGE_SIZE);
            let (bytes, lz4) = if saves {
                (Cow::Owned(c), true)
            } else {
                (Cow::Borrowed(plain), false)
            };
            out.push(Stored {
                block: block + i as u64,
                blocks: 1,
                bytes,
                lz4,
                expect,
            });
        }
        return;
    }
    let per = (max_pages as usize * PAGE_SIZE / bs).max(1);
    for (i, part) in run.chunks(per * bs).enumerate() {
        out.push(Stored {
            block: block + (i * per) as u64,
            blocks: (part.len() / bs) as u64,
            bytes: Cow::Borrowed(part),
            lz4: false,
            expect,
        });
    }
}

/// Turns placed pieces into changes: pieces stored back to back become one extent and one
/// journal entry.
fn changes_of(placed: Vec<Placed>, ppb: u32) -> Vec<Change> {
    let mut merged: Vec<Placed> = Vec::new();
    for p in placed {
        match merged.last_mut() {
            Some(q)
                if q.expect.is_none()
                    && p.expect.is_none()
                    && q.block + q.blocks == p.block
                    && q.loc.continues(q.blocks, &p.loc, ppb) =>
            {
                q.blocks += p.blocks;
                q.crcs.extend(p.crcs);
            }
            _ => merged.push(p),
        }
    }
    merged
        .iter()
        .map(|p| Change {
            block: p.block,
            count: p.blocks,
            new: Some(p.loc),
            expect: p.expect,
            check: codec::table_crc(&p.crcs),
        })
        .collect()
}

/// Lays `batch` out in `alloc`: its pages' crcs, where each piece went, and the writes: one
/// for the data (the caller's buffer itself when the batch is one whole-page piece of it,
/// else the pieces gathered and padded in one buffer) and one for the checksum table.
fn place<'a>(
    alloc: &crate::segment::Allocation,
    batch: &'a [Stored<'a>],
    placed: &mut Vec<Placed>,
    ops: &mut Vec<Op<'a>>,
) {
    let seg = &alloc.seg;
    let mut crcs = Vec::new();
    let mut page = alloc.page;
    for p in batch {
        let mut mine = Vec::with_capacity(p.bytes.len().div_ceil(PAGE_SIZE));
        record::page_crcs(&p.bytes, &mut mine);
        let loc = if p.lz4 {
            Loc::lz4(seg.id, page, p.bytes.len() as u32)
        } else {
            Loc::raw(seg.id, page)
        };
        page += mine.len() as u32;
        crcs.extend_from_slice(&mine);
        placed.push(Placed {
            block: p.block,
            blocks: p.blocks,
            loc,
            expect: p.expect,
            crcs: mine,
        });
    }
    let buf = match batch {
        [p] if p.bytes.len() % PAGE_SIZE == 0 => Data::Slice(&p.bytes),
        _ => {
            let mut g = crate::io::take_empty_buf(crcs.len() * PAGE_SIZE);
            for p in batch {
                g.extend_from_slice(&p.bytes);
                g.resize(g.len().next_multiple_of(PAGE_SIZE), 0);
            }
            Data::Owned(g)
        }
    };
    ops.push(Op::Write {
        file: seg.file.clone(),
        offset: u64::from(alloc.page) * PAGE_SIZE as u64,
        buf,
    });
    ops.push(record::table_write(seg, alloc.page, &crcs));
}

pub(crate) struct Writer<'a> {
    pub inner: &'a Inner,
    pub vol: &'a VolumeState,
}

impl Writer<'_> {
    fn geometry(&self) -> Geometry<'_> {
        self.vol.geometry()
    }

    pub fn write(&self, offset: u64, data: &[u8], align: Align) -> Result<()> {
        let g = self.geometry();
        check_range(&g, offset, data.len() as u64, align)?;
        self.inner.check_poisoned()?;
        if data.is_empty() {
            return Ok(());
        }
        let bs = u64::from(g.block_size);
        let end = offset + data.len() as u64;
        let mut reqs = Vec::new();
        let mut pos = offset;
        while pos < end {
            let blk = pos / bs;
            let at = (pos - blk * bs) as usize;
            let slice = &data[(pos - offset) as usize..];
            if at == 0 && end - pos >= bs {
                // As many whole blocks as the request holds, in one piece.
                let n = (end - pos) / bs;
                reqs.push((blk, BlockWrite::Full(&slice[..(n * bs) as usize])));
                pos += n * bs;
            } else {
                let n = (bs as usize - at).min((end - pos) as usize);
                reqs.push((
                    blk,
                    BlockWrite::Partial {
                        at,
                        data: &slice[..n],
                    },
                ));
                pos += n as u64;
            }
        }
        self.write_reqs(reqs)
    }

    fn write_reqs(&self, reqs: Vec<(u64, BlockWrite<'_>)>) -> Result<()> {
        let done = self.write_reqs_cas(reqs);
        // Outside the reuse guard: handing pages back waits for every guard holder.
        self.inner.reuse_fresh(false);
        done
    }

    fn write_reqs_cas(&self, mut reqs: Vec<(u64, BlockWrite<'_>)>) -> Result<()> {
        for _ in 0..MAX_CAS_RETRIES {
            let partial = reqs
                .iter()
                .any(|(_, w)| matches!(w, BlockWrite::Partial { .. }));
            let conflicted = {
                // From the lookup of a partial block's old location to the install that
                // compares against it: that location's pages are not reused meanwhile, so
                // it cannot come back mapped with other bytes and pass the compare (ABA).
                let _reuse = partial.then(|| self.inner.segments.read_guard());
                self.check_quota(&reqs)?;
                let records = self.prepare(&reqs)?;
                self.store_and_map(records)?
            };
            if conflicted.is_empty() {
                return Ok(());
            }
            reqs.retain(|(b, _)| conflicted.contains(b));
        }
        Err(Error::Contention(self.vol.name.clone()))
    }

    /// Refuses requests that would map blocks beyond the volume's quota before their data is
    /// written (the install checks again, exactly: [`Writer::install_guarded`]).
    fn check_quota(&self, reqs: &[(u64, BlockWrite<'_>)]) -> Result<()> {
        let quota = &self.vol.io.quota;
        if quota.bytes() == 0 {
            return Ok(());
        }
        let bs = self.vol.block_size as usize;
        let m = self.vol.map.read();
        let tree = m.tree(&self.vol.name)?;
        // Non-zero blocks the map does not map now (all-zero blocks are unmapped, not
        // stored): one lookup per request.
        let mut growth = 0u64;
        for (blk, w) in reqs {
            let data: &[u8] = match w {
                BlockWrite::Full(d) => d,
                BlockWrite::Partial { data, .. } => data,
            };
            let n = (data.len().div_ceil(bs)) as u64;
            for p in tree.lookup(*blk, n).iter().filter(|p| p.loc.is_none()) {
                let from = ((p.block - blk) as usize) * bs;
                let to = (from + p.blocks as usize * bs).min(data.len());
                growth += match w {
                    BlockWrite::Full(_) => {
                        data[from..to].chunks(bs).filter(|b| !is_zero(b)).count() as u64
                    }
                    BlockWrite::Partial { .. } => u64::from(!is_zero(data)),
                };
            }
        }
        if quota.admits(m.mapped_blocks, growth, self.vol.block_size) {
            Ok(())
        } else {
            Err(self.quota_exceeded())
        }
    }

    fn quota_exceeded(&self) -> Error {
        Error::QuotaExceeded {
            volume: self.vol.name.clone(),
            quota: self.vol.io.quota.bytes(),
        }
    }

    /// Builds the new content of each request (reading old content for partial blocks).
    fn prepare<'d>(&self, reqs: &[(u64, BlockWrite<'d>)]) -> Result<Vec<Rec<'d>>> {
        let mut out = Vec::with_capacity(reqs.len());
        for (blk, w) in reqs {
            match w {
                BlockWrite::Full(d) => out.push(Rec {
                    block: *blk,
                    data: Cow::Borrowed(d),
                    stored_lz4: false,
                    expect: None,
                }),
                BlockWrite::Partial { at, data } => {
                    // The old content is read from the very location the compare-and-set
                    // below expects (`cur`), not through the map again: whatever happens to
                    // the block meanwhile (a write, a restore bringing `cur` back), the patch
                    // applies to `cur`'s bytes, or the install fails and the write is redone.
                    let (cur, mut block) = self.old_content(*blk)?;
                    block[*at..*at + data.len()].copy_from_slice(data);
                    out.push(Rec {
                        block: *blk,
                        data: Cow::Owned(block),
                        stored_lz4: false,
                        expect: Some(cur),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Block `blk`'s current location and its content (zeros for a hole), read by location.
    /// The caller holds the reuse guard.
    fn old_content(&self, blk: u64) -> Result<(Option<Loc>, Vec<u8>)> {
        let g = self.geometry();
        let bs = g.block_size as usize;
        for _ in 0..=MAX_READ_RETRIES {
            let cur = self.vol.map.read().tree(&self.vol.name)?.get(blk);
            let Some(l) = cur else {
                return Ok((None, vec![0u8; bs]));
            };
            if let Some(d) = read_block(self.inner, &g, blk, &l, &HashMap::new())? {
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

    /// Writes the records' data and checksums, installs their mappings, writes the journal.
    /// Returns the blocks whose compare-and-set lost.
    fn store_and_map(&self, records: Vec<Rec<'_>>) -> Result<HashSet<u64>> {
        self.store_guarded(records, None, None)
    }

    /// Stores `data` (the current content of blocks from `first`, as read) as new records
    /// and installs them only if the range still maps to what was read (`guard`): a
    /// defragmenting rewrite. Only the mapped runs of the range are stored. Returns whether
    /// it was installed.
    pub(crate) fn rewrite(&self, data: &[u8], guard: &RangeGuard) -> Result<bool> {
        // Written meanwhile: nothing to do (checked again, under the lock, at install).
        if self
            .vol
            .map
            .read()
            .tree(&self.vol.name)?
            .lookup(guard.first, guard.blocks)
            != guard.pieces
        {
            return Ok(false);
        }
        let bs = self.vol.block_size as usize;
        let mut records = Vec::new();
        let mut run: Option<(u64, u64)> = None;
        for p in guard.pieces.iter().chain([&Piece {
            block: u64::MAX,
            blocks: 0,
            loc: None,
        }]) {
            match (run, p.loc) {
                (Some((s, n)), Some(_)) if s + n == p.block => run = Some((s, n + p.blocks)),
                (r, loc) => {
                    if let Some((s, n)) = r {
                        let at = ((s - guard.first) as usize) * bs;
                        records.push(Rec {
                            block: s,
                            data: Cow::Borrowed(&data[at..at + n as usize * bs]),
                            stored_lz4: false,
                            expect: None,
                        });
                    }
                    run = loc.map(|_| (p.block, p.blocks));
                }
            }
        }
        if records.is_empty() {
            return Ok(false);
        }
        let done = self.store_guarded(records, Some(guard), None);
        self.inner.reuse_fresh(false);
        Ok(done?.is_empty())
    }

    /// [`Writer::store_and_map`] under `guard`; `installed` receives the changes installed,
    /// each with its segment's reuse generation read before the install (see
    /// [`crate::segment::Segments::pin_live`]).
    fn store_guarded(
        &self,
        records: Vec<Rec<'_>>,
        guard: Option<&RangeGuard>,
        installed: Option<&mut Vec<(Change, u64)>>,
    ) -> Result<HashSet<u64>> {
        let inner = self.inner;
        let bs = self.vol.block_size as usize;
        let max_pages = MAX_RECORD_PAGES.min(inner.segments.max_record_pages());
        let (batches, mut changes) = lay_out(&records, bs, self.vol.lz4, max_pages);
        // Held until the records are installed (or abandoned): see `Allocation`.
        let mut reservations = Vec::with_capacity(batches.len());
        let mut placed = Vec::new();
        let mut ops: Vec<Op<'_>> = Vec::new();
        for batch in &batches {
            let pages = batch
                .iter()
                .map(|p| p.bytes.len().div_ceil(PAGE_SIZE) as u32)
                .sum();
            let alloc = inner.segments.allocate(pages)?;
            place(&alloc, batch, &mut placed, &mut ops);
            reservations.push(alloc);
        }
        for done in inner.segments.engine().submit(ops) {
            if let Err(e) = done.result {
                return Err(inner.poison(Error::io("writing data", e)));
            }
        }
        for a in &reservations {
            inner.segments.mark_written(&a.seg);
        }
        let stored: u64 = placed.iter().map(|p| p.crcs.len() as u64).sum();
        inner.note_dirty(stored * PAGE_SIZE as u64);
        changes.extend(changes_of(placed, self.vol.ppb()));
        changes.sort_by_key(|c| c.block);
        let gens: Vec<u64> = match installed {
            Some(_) => changes
                .iter()
                .map(|c| {
                    c.new
                        .and_then(|l| inner.segments.reuse_gen(l.segment))
                        .unwrap_or(u64::MAX)
                })
                .collect(),
            None => Vec::new(),
        };
        let applied = match self.install_guarded(&changes, guard) {
            Err(e @ Error::QuotaExceeded { .. }) => {
                // Nothing installed: the new records' pages go back like a lost install's.
                drop(reservations);
                self.abandon_lost(&changes, &vec![false; changes.len()]);
                return Err(e);
            }
            r => r?,
        };
        drop(reservations);
        if let Some(out) = installed {
            out.extend(
                changes
                    .iter()
                    .zip(&applied)
                    .zip(gens)
                    .filter(|((_, ok), gen)| **ok && *gen != u64::MAX)
                    .map(|((c, _), gen)| (*c, gen)),
            );
        }
        Ok(self.abandon_lost(&changes, &applied))
    }

    /// Blocks whose compare-and-set lost; their new records were never referenced, so their
    /// pages are free once the next commit is durable, like any other dead run.
    fn abandon_lost(&self, changes: &[Change], applied: &[bool]) -> HashSet<u64> {
        let ppb = self.vol.ppb();
        let mut conflicted = HashSet::new();
        let (mut orphans, mut fresh) = (Vec::new(), Vec::new());
        for (c, ok) in changes.iter().zip(applied) {
            if *ok {
                continue;
            }
            conflicted.insert(c.block);
            if let Some(l) = c.new {
                let run = crate::segment::PageRun {
                    segment: l.segment,
                    page: l.page,
                    pages: l.pages(c.count, ppb),
                };
                if let Some(seg) = self.inner.segments.get(run.segment) {
                    self.inner.segments.note_pending_dead(&seg, run.pages);
                }
                if self.inner.segments.is_fresh(&run) {
                    fresh.push(run);
                } else {
                    orphans.push(run);
                }
            }
        }
        if !orphans.is_empty() {
            self.inner.dead.lock().extend(orphans);
        }
        if let Err(e) = self.inner.segments.reclaim_unmapped(&fresh) {
            tracing::warn!(error = %e, "reusing abandoned pages failed");
        }
        conflicted
    }

    /// Writes whole blocks (distinct, any order) as one journal group.
    pub fn write_blocks(&self, blocks: &[(u64, &[u8])]) -> Result<()> {
        let mut sorted: Vec<(u64, &[u8])> = blocks.to_vec();
        sorted.sort_by_key(|(b, _)| *b);
        let records = sorted
            .into_iter()
            .map(|(block, d)| Rec {
                block,
                data: Cow::Borrowed(d),
                stored_lz4: false,
                expect: None,
            })
            .collect();
        let done = self.store_and_map(records).map(|_| ());
        self.inner.reuse_fresh(false);
        done
    }

    /// Replaces remote locations by local copies of their records, installing each with
    /// compare-and-set against the remote location (a block written meanwhile keeps the new
    /// write). A record another volume of this store already keeps locally is shared (one
    /// more reference to that copy, see [`crate::remote::Kept`]); the others are fetched,
    /// verified and stored, and remembered for the next volume that needs them. Returns the
    /// bytes fetched.
    pub(crate) fn hydrate(&self, items: &[(u64, Loc)]) -> Result<u64> {
        /// Rounds of waiting for records in flight elsewhere before fetching them anyway.
        const ROUNDS: usize = 8;
        const WAIT: std::time::Duration = std::time::Duration::from_secs(30);
        if items.is_empty() {
            return Ok(0);
        }
        self.inner.check_poisoned()?;
        let kept = &self.inner.remote.kept;
        let mut todo = items.to_vec();
        let mut fetched = 0;
        for _ in 0..ROUNDS {
            let sorted = kept.sort(&todo, self.vol.block_size);
            let mut again = self.share(&sorted.shared)?;
            {
                let mut flight = InFlight {
                    kept,
                    mine: &sorted.mine,
                    copies: Vec::new(),
                };
                fetched += self.fetch_and_keep(&sorted.mine, Some(&mut flight.copies))?;
            }
            if sorted.waiting.is_empty() && again.is_empty() {
                return Ok(fetched);
            }
            kept.wait(&sorted.waiting, WAIT);
            again.extend(sorted.waiting);
            again.sort_by_key(|(b, _)| *b);
            todo = again;
        }
        Ok(fetched + self.fetch_and_keep(&todo, None)?)
    }

    /// Installs copies other volumes keep (see [`Writer::hydrate`]). Returns the items whose
    /// copy was found freed or reused since (forgotten now).
    fn share(&self, shared: &[(u64, Loc, crate::remote::LocalCopy)]) -> Result<Vec<(u64, Loc)>> {
        let inner = self.inner;
        let ppb = self.vol.ppb();
        let mut changes = Vec::with_capacity(shared.len());
        let mut pinned = Vec::with_capacity(shared.len());
        let mut stale = Vec::new();
        for &(block, remote, c) in shared {
            let pages = c.local.pages(1, ppb);
            if let Some(gen) = inner
                .segments
                .pin_live(c.local.segment, c.local.page, pages)
            {
                pinned.push(c.local);
                // Pages of that segment were handed out again since: this record's may have
                // been among them. Pinned now, its pages cannot change while read: the
                // record is still the copy if they verify against its journal check.
                let same =
                    gen == c.gen || record::verifies(&inner.segments, &c.local, 1, ppb, c.check);
                if same {
                    if gen != c.gen {
                        inner.remote.kept.refresh(&remote, &c, gen);
                    }
                    changes.push(Change {
                        block,
                        count: 1,
                        new: Some(c.local),
                        expect: Some(Some(remote)),
                        check: c.check,
                    });
                    continue;
                }
            }
            inner.remote.kept.forget(&remote, &c);
            stale.push((block, remote));
        }
        let installed = self.install(&changes);
        if let Ok(applied) = &installed {
            let bytes: u64 = changes
                .iter()
                .zip(applied)
                .filter(|(_, ok)| **ok)
                .filter_map(|(c, _)| c.expect.flatten().map(|l| u64::from(l.stored_len())))
                .sum();
            inner
                .remote
                .kept
                .shared_bytes
                .fetch_add(bytes, Ordering::Relaxed);
        }
        // The pins go only once the map holds its own references.
        for l in &pinned {
            inner.reference(l, 1, ppb, -1);
        }
        self.inner.reuse_fresh(false);
        installed?;
        Ok(stale)
    }

    /// Fetches, verifies and stores remote records (see [`Writer::hydrate`]); `copies`
    /// receives the ones installed, for other volumes to share.
    fn fetch_and_keep(
        &self,
        items: &[(u64, Loc)],
        copies: Option<&mut Vec<(Loc, crate::remote::LocalCopy)>>,
    ) -> Result<u64> {
        if items.is_empty() {
            return Ok(0);
        }
        let data = crate::remote::fetch_records(
            &self.inner.remote,
            &self.vol.name,
            self.vol.block_size,
            items,
        )?;
        // Only records that decode to a block are kept (a hostile manifest can describe a
        // record whose crc matches but which is not one).
        let bs = self.vol.block_size as usize;
        let mut scratch = vec![0u8; bs];
        for ((blk, l), d) in items.iter().zip(&data) {
            let fits = if l.is_lz4() {
                decode_lz4(d, &mut scratch)
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
            .map(|(&(block, l), d)| Rec {
                block,
                data: Cow::Owned(d),
                stored_lz4: l.is_lz4(),
                expect: Some(Some(l)),
            })
            .collect();
        let mut installed = Vec::new();
        let done = self.store_guarded(records, None, copies.is_some().then_some(&mut installed));
        self.inner.reuse_fresh(false);
        done?;
        if let Some(copies) = copies {
            copies.extend(installed.into_iter().filter_map(|(c, gen)| {
                let (Some(local), Some(Some(remote))) = (c.new, c.expect) else {
                    return None;
                };
                (c.count == 1 && remote.is_remote()).then_some((
                    remote,
                    crate::remote::LocalCopy {
                        remote_crc: remote.crc,
                        remote_len_flags: remote.len_flags,
                        local,
                        block_size: self.vol.block_size,
                        check: c.check,
                        gen,
                    },
                ))
            }));
        }
        Ok(bytes)
    }

    /// Installs changes in the map and writes their journal entries.
    pub(crate) fn install(&self, changes: &[Change]) -> Result<Vec<bool>> {
        self.install_guarded(changes, None)
    }

    /// [`Writer::install`], all or nothing under `guard`.
    fn install_guarded(&self, changes: &[Change], guard: Option<&RangeGuard>) -> Result<Vec<bool>> {
        let inner = self.inner;
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        // Held until the journal entries are written, not only while the map changes: a
        // flush (which takes the gate exclusively) then syncs a journal that holds them.
        let gate = inner.gate.read();
        let (applied, entries, reservation) = {
            let mut map = self.vol.map.write();
            if self.vol.deleted.load(Ordering::Relaxed) {
                return Err(Error::NoSuchVolume(self.vol.name.clone()));
            }
            let tree = map.tree(&self.vol.name)?;
            if guard.is_some_and(|g| {
                inner.segments.reuse_epoch() != g.epoch
                    || tree.lookup(g.first, g.blocks) != g.pieces
            }) {
                return Ok(vec![false; changes.len()]);
            }
            let quota = &self.vol.io.quota;
            if quota.bytes() != 0 {
                let growth = changes
                    .iter()
                    .filter(|c| c.new.is_some())
                    .map(|c| unmapped(tree, c.block, c.count))
                    .sum();
                if !quota.admits(map.mapped_blocks, growth, self.vol.block_size) {
                    return Err(self.quota_exceeded());
                }
            }
            let (applied, entries) = apply_changes(inner, self.vol, &mut map, changes);
            let reservation = (!entries.is_empty()).then(|| inner.journal.reserve(entries.len()));
            (applied, entries, reservation)
        };
        if let Some((file, off)) = reservation {
            let op = Journal::write_op(&file, off, &entries);
            if let Err(e) = inner.segments.engine().run(op).result {
                return Err(inner.poison(Error::io("writing journal", e)));
            }
            inner.note_journal(entries.len() as u64);
        }
        drop(gate);
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
                check: 0,
            }])?;
            b += n;
        }
        self.inner.reuse_fresh(false);
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
            if self.vol.map.read().tree(&self.vol.name)?.get(blk).is_some() {
                let w = BlockWrite::Partial {
                    at: (at - blk * bs) as usize,
                    data: &zeros[..(end - at) as usize],
                };
                self.write_reqs(vec![(blk, w)])?;
            }
            at = end;
        }
        Ok(())
    }
}

/// The first mapped block of `vol` at or after `from`, if any.
pub(crate) fn next_mapped_block(
    inner: &Inner,
    vol: &VolumeState,
    from: u64,
) -> Result<Option<u64>> {
    crate::load::ensure_loaded(inner, vol)?;
    let m = vol.map.read();
    Ok(m.tree(&vol.name)?.next_mapped_before(from, u64::MAX))
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
    crate::load::ensure_loaded(inner, vol)?;
    let (items, next) = {
        let m = vol.map.read();
        let limit = from.saturating_add(SCAN).min(to);
        let mut items = Vec::new();
        let mut bytes = 0u64;
        let mut next = None;
        for p in m.tree(&vol.name)?.lookup(from, limit.saturating_sub(from)) {
            let Some(l) = p.loc else { continue };
            if !l.is_remote() {
                continue;
            }
            if bytes >= max_bytes {
                next = Some(p.block);
                break;
            }
            bytes += u64::from(l.stored_len());
            items.push((p.block, l));
        }
        if next.is_none() && limit < to {
            next = m.tree.next_mapped_before(limit, to);
        }
        (items, next)
    };
    let fetched = Writer { inner, vol }.hydrate(&items)?;
    Ok((next, fetched))
}
