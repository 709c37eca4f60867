//! Remote records: map entries that point into objects held outside the store (packs in an
//! S3-compatible bucket), for volumes restored lazily from a remote checkpoint.
//!
//! A remote location is a one-block [`Loc`] whose segment id is at or above
//! [`REMOTE_SEGMENT_BASE`]: `segment - REMOTE_SEGMENT_BASE` names a *pack* registered with
//! [`Store::register_remote_pack`] (an opaque descriptor the daemon understands: remote,
//! object key, length), `page` holds the record's byte offset in that pack, `len_flags` its
//! stored length and lz4 flag, `crc` the crc32 of its stored bytes. Because remote
//! locations are part of the persisted map, a volume's hydration state *is* its map: a
//! restart continues with whatever blocks are still remote.
//!
//! [`BlockRecord`] is the per-block view of stored records that pushing a checkpoint works
//! with: every mapped block, its location and the crc32 of its stored bytes.
//!
//! The engine never talks to the network itself: the daemon installs a [`RemoteFetcher`].

use crate::codec;
use crate::inner::cf;
use crate::map::{Loc, PAGE_SIZE};
use crate::{Error, Result, Snapshot, Store};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;

/// Segment ids from here up name remote packs, not local segment files.
pub const REMOTE_SEGMENT_BASE: u32 = crate::map::REMOTE_BASE;
/// Largest byte range fetched for one group of adjacent remote records.
const MAX_FETCH: u64 = 8 << 20;

const KEY_PREFIX: &[u8] = b"remote-pack/";

/// Fetches byte ranges of remote packs. Implemented by the daemon (object storage); called
/// from IO threads, so it blocks.
pub trait RemoteFetcher: Send + Sync + std::fmt::Debug {
    /// Returns exactly `len` bytes at `offset` of the pack `pack` describes, or a message
    /// naming what failed (never containing credentials).
    fn fetch(&self, pack: &[u8], offset: u64, len: u64) -> std::result::Result<Vec<u8>, String>;
}

/// Where a block's record lives in a remote pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteExtent {
    /// A pack id from [`Store::register_remote_pack`].
    pub pack: u32,
    /// Byte offset of the record in the pack.
    pub offset: u32,
    pub stored_len: u32,
    pub lz4: bool,
    /// crc32 (IEEE) of the stored bytes.
    pub crc: u32,
}

impl RemoteExtent {
    pub(crate) fn loc(&self) -> Loc {
        Loc {
            segment: REMOTE_SEGMENT_BASE + self.pack,
            page: self.offset,
            len_flags: self.stored_len | if self.lz4 { Loc::LZ4 } else { 0 },
            crc: self.crc,
        }
    }
}

/// One mapped block's stored record: where it is, how long, and the crc32 of its stored
/// bytes (raw blocks: the block; lz4: the compressed bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockRecord {
    /// Data segment, or `REMOTE_SEGMENT_BASE + pack` for a record in a remote pack.
    pub segment: u32,
    /// First page in the segment, or byte offset in the pack.
    pub page: u32,
    /// Stored length in bytes; bit 31 set = lz4.
    pub len_flags: u32,
    pub crc: u32,
}

impl BlockRecord {
    pub fn stored_len(&self) -> u32 {
        self.len_flags & !Loc::LZ4
    }

    pub fn is_lz4(&self) -> bool {
        self.len_flags & Loc::LZ4 != 0
    }

    /// Pages the record occupies in its segment.
    pub fn pages(&self) -> u32 {
        self.stored_len().div_ceil(PAGE_SIZE as u32)
    }

    /// True when the record lives in a remote pack.
    pub fn is_remote(&self) -> bool {
        self.segment >= REMOTE_SEGMENT_BASE
    }

    /// The remote location, for remote records.
    pub fn remote(&self) -> Option<RemoteExtent> {
        self.is_remote().then(|| RemoteExtent {
            pack: self.segment - REMOTE_SEGMENT_BASE,
            offset: self.page,
            stored_len: self.stored_len(),
            lz4: self.is_lz4(),
            crc: self.crc,
        })
    }

    fn loc(&self) -> Loc {
        Loc {
            segment: self.segment,
            page: self.page,
            len_flags: self.len_flags,
            crc: self.crc,
        }
    }
}

/// Registered packs, the fetcher, and the local copies of fetched records.
#[derive(Debug, Default)]
pub(crate) struct Remotes {
    packs: RwLock<HashMap<u32, Arc<[u8]>>>,
    fetcher: RwLock<Option<Arc<dyn RemoteFetcher>>>,
    register: Mutex<()>,
    pub kept: Kept,
}

/// Remembered local copies beyond which the table starts over (about 70 bytes each with
/// their keys and the index by location: 4 Mi cover 16 GiB of 4 KiB records).
const KEPT_MAX: usize = 4 << 20;

/// A remote record, as a key of [`Kept`]: pack id and byte offset.
type RecordKey = (u32, u32);

/// Where a remote record was kept locally, so that every volume on this store that maps the
/// same record (lazy forks of one golden checkpoint, lazy restores of one remote
/// checkpoint) shares one local copy instead of fetching and storing its own.
///
/// Not persisted: after a restart, the first volume to need a record fetches it again. An
/// entry vouches for nothing by itself: a user pins the location with
/// [`crate::segment::Segments::pin_live`] and compares the segment's reuse generation with
/// the one taken before the copy was first installed (see [`LocalCopy::gen`]); when it moved
/// (pages of that segment were reused), the pinned record is read and checked against its
/// journal check. A record since freed, or whose pages now hold another, is fetched anew.
///
/// Fetches of one record are single-flight: a hydration that finds a record in flight waits
/// for it (after finishing its own fetches, so two never wait on each other).
#[derive(Debug, Default)]
pub(crate) struct Kept {
    state: Mutex<KeptState>,
    done: parking_lot::Condvar,
    /// Stored bytes of remote records installed from a copy instead of fetched.
    pub shared_bytes: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct KeptState {
    copies: HashMap<RecordKey, LocalCopy>,
    /// Every copy's local (segment, page).
    locals: std::collections::HashSet<(u32, u32)>,
    in_flight: std::collections::HashSet<RecordKey>,
}

/// One remote record's local copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LocalCopy {
    /// The remote record's crc32 and stored length | lz4 (a key is only reused with both).
    pub remote_crc: u32,
    pub remote_len_flags: u32,
    /// The local record, one block of `block_size` bytes.
    pub local: Loc,
    pub block_size: u32,
    /// Its journal check (crc over its pages' checksums).
    pub check: u32,
    /// The local segment's reuse generation read before the copy was first installed.
    pub gen: u64,
}

/// How [`Kept::sort`] found remote records: a copy to share, fetched by this caller (now
/// in flight: [`Kept::finish`] ends that), or in flight elsewhere.
#[derive(Debug, Default)]
pub(crate) struct Sorted {
    pub shared: Vec<(u64, Loc, LocalCopy)>,
    pub mine: Vec<(u64, Loc)>,
    pub waiting: Vec<(u64, Loc)>,
}

fn record_key(l: &Loc) -> RecordKey {
    (l.segment - REMOTE_SEGMENT_BASE, l.page)
}

impl Kept {
    /// Sorts remote `items` (block, remote location); the ones returned in `mine` are in
    /// flight for the caller until it calls [`Kept::finish`] with them.
    pub fn sort(&self, items: &[(u64, Loc)], block_size: u32) -> Sorted {
        let mut out = Sorted::default();
        let mut st = self.state.lock();
        for &(b, l) in items {
            let k = record_key(&l);
            match st.copies.get(&k) {
                Some(c)
                    if c.remote_crc == l.crc
                        && c.remote_len_flags == l.len_flags
                        && c.block_size == block_size =>
                {
                    out.shared.push((b, l, *c));
                    continue;
                }
                _ => {}
            }
            if st.in_flight.contains(&k) {
                out.waiting.push((b, l));
            } else {
                st.in_flight.insert(k);
                out.mine.push((b, l));
            }
        }
        out
    }

    /// Ends the caller's fetches of `mine`, remembering the copies it kept.
    pub fn finish(&self, mine: &[(u64, Loc)], copies: &[(Loc, LocalCopy)]) {
        let mut st = self.state.lock();
        for (_, l) in mine {
            st.in_flight.remove(&record_key(l));
        }
        if st.copies.len() + copies.len() > KEPT_MAX {
            st.copies.clear();
            st.locals.clear();
        }
        for (l, c) in copies {
            if let Some(old) = st.copies.insert(record_key(l), *c) {
                st.locals.remove(&(old.local.segment, old.local.page));
            }
            st.locals.insert((c.local.segment, c.local.page));
        }
        drop(st);
        self.done.notify_all();
    }

    /// Forgets a copy found freed or reused.
    pub fn forget(&self, l: &Loc, c: &LocalCopy) {
        let mut st = self.state.lock();
        if st.copies.get(&record_key(l)) == Some(c) {
            st.copies.remove(&record_key(l));
            st.locals.remove(&(c.local.segment, c.local.page));
        }
    }

    /// A copy verified again at reuse generation `gen`.
    pub fn refresh(&self, l: &Loc, c: &LocalCopy, gen: u64) {
        let mut st = self.state.lock();
        if let Some(e) = st.copies.get_mut(&record_key(l)) {
            if e == c {
                e.gen = gen;
            }
        }
    }

    /// Waits until none of `items` is in flight (at most `limit`).
    pub fn wait(&self, items: &[(u64, Loc)], limit: std::time::Duration) {
        let deadline = std::time::Instant::now() + limit;
        let mut st = self.state.lock();
        while items
            .iter()
            .any(|(_, l)| st.in_flight.contains(&record_key(l)))
        {
            if self.done.wait_until(&mut st, deadline).timed_out() {
                return;
            }
        }
    }

    /// Whether every location is where a remembered copy starts.
    pub fn all_copies(&self, locs: impl Iterator<Item = Loc>) -> bool {
        let st = self.state.lock();
        let mut any = false;
        for l in locs {
            if !st.locals.contains(&(l.segment, l.page)) {
                return false;
            }
            any = true;
        }
        any
    }

    /// Copies remembered.
    pub fn len(&self) -> usize {
        self.state.lock().copies.len()
    }
}

fn pack_key(id: u32) -> Vec<u8> {
    let mut k = KEY_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

impl Remotes {
    /// Loads the registered packs from RocksDB.
    pub fn load(&self, db: &rocksdb::DB) -> Result<()> {
        let meta = cf(db, codec::CF_META)?;
        let mut packs = self.packs.write();
        for item in db.prefix_iterator_cf(meta, KEY_PREFIX) {
            let (k, v) = item?;
            if !k.starts_with(KEY_PREFIX) {
                break;
            }
            let id = k[KEY_PREFIX.len()..]
                .try_into()
                .map(u32::from_be_bytes)
                .map_err(|_| Error::Corrupt("remote pack key".into()))?;
            let desc = codec::strip_crc(&v)?;
            packs.insert(id, desc.into());
        }
        Ok(())
    }

    /// Whether any remote pack is registered: without one, no map holds remote entries.
    pub fn any(&self) -> bool {
        !self.packs.read().is_empty()
    }

    pub fn has_pack(&self, id: u32) -> bool {
        self.packs.read().contains_key(&id)
    }

    fn pack(&self, id: u32) -> Option<Arc<[u8]>> {
        self.packs.read().get(&id).cloned()
    }
}

/// Fetches the records of `entries` (all remote), coalescing records that sit next to each
/// other in one pack into one range, and verifies each record's crc32. `label` and
/// `block_size` name the volume and locate a bad block in errors.
pub(crate) fn fetch_records(
    remotes: &Remotes,
    label: &str,
    block_size: u32,
    entries: &[(u64, Loc)],
) -> Result<Vec<Vec<u8>>> {
    let fetcher = remotes.fetcher.read().clone();
    let err = |blk: u64, detail: String| Error::Remote {
        volume: label.to_string(),
        offset: blk * u64::from(block_size),
        detail,
    };
    let mut out = Vec::with_capacity(entries.len());
    let mut i = 0;
    while i < entries.len() {
        let (blk, e) = entries[i];
        let x = remote_of(&e).ok_or_else(|| err(blk, "not a remote record".into()))?;
        if x.stored_len == 0 || x.stored_len > block_size {
            return Err(err(blk, format!("bad stored length {}", x.stored_len)));
        }
        let mut j = i + 1;
        let mut end = u64::from(x.offset) + u64::from(x.stored_len);
        while j < entries.len() {
            let Some(y) = remote_of(&entries[j].1) else {
                break;
            };
            if y.pack != x.pack
                || u64::from(y.offset) != end
                || end + u64::from(y.stored_len) - u64::from(x.offset) > MAX_FETCH
                || y.stored_len == 0
                || y.stored_len > block_size
            {
                break;
            }
            end += u64::from(y.stored_len);
            j += 1;
        }
        let desc = remotes
            .pack(x.pack)
            .ok_or_else(|| err(blk, format!("remote pack {} is not registered", x.pack)))?;
        let f = fetcher
            .as_ref()
            .ok_or_else(|| err(blk, "no remote fetcher is configured".into()))?;
        let len = end - u64::from(x.offset);
        let data = f
            .fetch(&desc, u64::from(x.offset), len)
            .map_err(|d| err(blk, d))?;
        if data.len() as u64 != len {
            return Err(err(
                blk,
                format!("remote returned {} bytes, expected {len}", data.len()),
            ));
        }
        let mut at = 0usize;
        for &(b, e) in &entries[i..j] {
            let n = e.stored_len() as usize;
            let rec = &data[at..at + n];
            at += n;
            if crc32fast::hash(rec) != e.crc {
                return Err(err(
                    b,
                    format!(
                        "checksum mismatch in remote data (pack {})",
                        String::from_utf8_lossy(&desc)
                    ),
                ));
            }
            out.push(rec.to_vec());
        }
        i = j;
    }
    Ok(out)
}

/// How lazily restored volumes of a store share local copies of remote records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteSharing {
    /// Remote records whose local copy is remembered for sharing.
    pub copies: u64,
    /// Stored bytes of remote records installed from another volume's copy instead of being
    /// fetched, since the store was opened.
    pub shared_bytes: u64,
}

impl Store {
    /// See [`RemoteSharing`].
    pub fn remote_sharing(&self) -> RemoteSharing {
        let k = &self.inner.remote.kept;
        RemoteSharing {
            copies: k.len() as u64,
            shared_bytes: k.shared_bytes.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Installs the fetcher that remote entries are read through.
    pub fn set_remote_fetcher(&self, fetcher: Arc<dyn RemoteFetcher>) {
        *self.inner.remote.fetcher.write() = Some(fetcher);
    }

    /// Registers a remote pack by its descriptor (durable when this returns) and returns its
    /// id; an identical descriptor registered before returns the same id.
    pub fn register_remote_pack(&self, desc: &[u8]) -> Result<u32> {
        Ok(self.register_remote_packs(&[desc])?[0])
    }

    /// [`Store::register_remote_pack`] for many descriptors, in one synced write.
    pub fn register_remote_packs(&self, descs: &[&[u8]]) -> Result<Vec<u32>> {
        let inner = &self.inner;
        let _one = inner.remote.register.lock();
        let mut known: HashMap<Vec<u8>, u32> = inner
            .remote
            .packs
            .read()
            .iter()
            .map(|(id, d)| (d.to_vec(), *id))
            .collect();
        let mut next = known.values().max().map_or(0, |m| m + 1);
        let mut batch = rocksdb::WriteBatch::default();
        let meta = cf(&inner.db, codec::CF_META)?;
        let mut ids = Vec::with_capacity(descs.len());
        let mut new = Vec::new();
        for d in descs {
            if let Some(id) = known.get(*d) {
                ids.push(*id);
                continue;
            }
            if next >= u32::MAX - REMOTE_SEGMENT_BASE {
                return Err(Error::InvalidArgument("too many remote packs".into()));
            }
            batch.put_cf(meta, pack_key(next), codec::with_crc(d.to_vec()));
            known.insert(d.to_vec(), next);
            new.push((next, *d));
            ids.push(next);
            next += 1;
        }
        if !new.is_empty() {
            let mut wo = rocksdb::WriteOptions::default();
            wo.set_sync(true);
            inner.db.write_opt(batch, &wo)?;
            let mut packs = inner.remote.packs.write();
            for (id, d) in new {
                packs.insert(id, d.into());
            }
        }
        Ok(ids)
    }

    /// The descriptor of a registered pack.
    pub fn remote_pack(&self, id: u32) -> Option<Vec<u8>> {
        self.inner.remote.pack(id).map(|d| d.to_vec())
    }

    /// [`Store::read_record`] for many records, appended to `out` back to back (no padding),
    /// in order. Local records that sit next to each other in a segment are read with one IO
    /// of up to 4 MiB, and the IOs of a call are submitted together.
    pub fn read_records(&self, entries: &[BlockRecord], out: &mut Vec<u8>) -> Result<()> {
        const SPAN: u32 = (4 << 20) / crate::PAGE_SIZE as u32;
        if entries.iter().any(|e| e.is_remote()) {
            // Records still remote come from the fetcher (verified there); the local ones
            // between them are read as below, one run at a time.
            let mut at = 0;
            while at < entries.len() {
                let remote = entries[at].is_remote();
                let n = entries[at..]
                    .iter()
                    .take_while(|e| e.is_remote() == remote)
                    .count();
                let run = &entries[at..at + n];
                if remote {
                    let items: Vec<(u64, Loc)> = run.iter().map(|e| (0, e.loc())).collect();
                    for rec in fetch_records(&self.inner.remote, "record", 1 << 30, &items)? {
                        out.extend_from_slice(&rec);
                    }
                } else {
                    self.read_records(run, out)?;
                }
                at += n;
            }
            return Ok(());
        }
        let inner = &self.inner;
        let _reuse = inner.segments.read_guard();
        // (first page, pages, entries) per IO.
        let mut spans: Vec<(u32, u32, std::ops::Range<usize>)> = Vec::new();
        let mut ops = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if let Some((first, pages, range)) = spans.last_mut() {
                let prev = entries[range.end - 1];
                if prev.segment == e.segment
                    && *first + *pages == e.page
                    && *pages + e.pages() <= SPAN
                {
                    *pages += e.pages();
                    range.end = i + 1;
                    continue;
                }
            }
            spans.push((e.page, e.pages(), i..i + 1));
        }
        for (first, pages, range) in &spans {
            let seg_id = entries[range.start].segment;
            let seg = inner.segments.get(seg_id).ok_or_else(|| {
                Error::Corrupt(format!("map points at missing data segment {seg_id}"))
            })?;
            ops.push(crate::io::Op::read(
                &seg.file,
                u64::from(*first) * crate::PAGE_SIZE as u64,
                *pages as usize * crate::PAGE_SIZE,
            ));
        }
        for (done, (first, _, range)) in inner.segments.engine().submit(ops).into_iter().zip(spans)
        {
            done.result
                .map_err(|err| Error::io("reading records", err))?;
            let data = done.op.into_buf();
            for e in &entries[range] {
                let at = (e.page - first) as usize * crate::PAGE_SIZE;
                let rec = &data[at..at + e.stored_len() as usize];
                let crc = crc32fast::hash(rec);
                if crc != e.crc {
                    self.log_mismatch(e, crc);
                    return Err(Error::Checksum {
                        volume: format!("segment {}", e.segment),
                        offset: u64::from(e.page) * crate::PAGE_SIZE as u64,
                    });
                }
                out.extend_from_slice(rec);
            }
            crate::io::give_buf(data);
        }
        Ok(())
    }

    /// Logs what a record that failed its crc looks like now: its table entries and its
    /// bytes read again, and its segment's reuse generation (see
    /// [`crate::segment::Segments::pin_live`]), so that a page rewritten since the crc was
    /// taken (table changed too) can be told from bytes that changed under a table that did
    /// not.
    fn log_mismatch(&self, e: &BlockRecord, read_crc: u32) {
        let segs = &self.inner.segments;
        let Some(seg) = segs.get(e.segment) else {
            tracing::error!(
                segment = e.segment,
                page = e.page,
                "record crc mismatch; segment gone"
            );
            return;
        };
        let table = segs
            .engine()
            .run(crate::record::table_read(&seg, e.page, e.pages()));
        let table_now: Vec<u32> = match table.result {
            Ok(_) => crate::record::table_crcs(&table.op.into_buf()).collect(),
            Err(_) => Vec::new(),
        };
        let again = segs.engine().run(crate::io::Op::read(
            &seg.file,
            u64::from(e.page) * crate::PAGE_SIZE as u64,
            e.pages() as usize * crate::PAGE_SIZE,
        ));
        let crc_now = match again.result {
            Ok(_) => Some(crc32fast::hash(
                &again.op.into_buf()[..e.stored_len() as usize],
            )),
            Err(_) => None,
        };
        tracing::error!(
            segment = e.segment,
            page = e.page,
            stored_len = e.stored_len(),
            lz4 = e.is_lz4(),
            expected = e.crc,
            read = read_crc,
            read_again = ?crc_now,
            table_now = ?table_now,
            reuse_gen = ?segs.reuse_gen(e.segment),
            reuse_epoch = segs.reuse_epoch(),
            "record crc mismatch while reading a checkpoint's records"
        );
    }

    /// Reads one record's stored bytes (raw or lz4, exactly as stored) and verifies its crc32:
    /// local records from their segment, remote ones through the fetcher. For pushing a
    /// checkpoint's records elsewhere; `e` must be referenced by an open view (a
    /// [`crate::Snapshot`]) so it cannot be freed meanwhile.
    pub fn read_record(&self, e: &BlockRecord) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(e.stored_len() as usize);
        self.read_records(std::slice::from_ref(e), &mut out)?;
        Ok(out)
    }
}

/// The remote extent a remote location names.
fn remote_of(l: &Loc) -> Option<RemoteExtent> {
    l.is_remote().then(|| RemoteExtent {
        pack: l.segment - REMOTE_SEGMENT_BASE,
        offset: l.page,
        stored_len: l.stored_len(),
        lz4: l.is_lz4(),
        crc: l.crc,
    })
}

impl Snapshot {
    /// Every mapped block and its record, in block order, with the crc32 of its stored bytes
    /// (from the segments' checksum tables for raw blocks; lz4 records are read).
    pub fn records(&self) -> Result<Vec<(u64, BlockRecord)>> {
        self.records_of(self.tree.extents().collect())
    }

    /// The records of the mapped blocks inside `runs` (`(first block, blocks)`, sorted and
    /// not overlapping, as [`Snapshot::changed_runs_since`] returns them), as
    /// [`Snapshot::records`]: costs what the runs cover, not the whole map.
    pub fn records_in(&self, runs: &[(u64, u64)]) -> Result<Vec<(u64, BlockRecord)>> {
        let extents = runs
            .iter()
            .flat_map(|&(first, n)| self.tree.lookup(first, n))
            .filter_map(|p| {
                p.loc.map(|loc| crate::map::Extent {
                    start: p.block,
                    len: p.blocks,
                    loc,
                })
            })
            .collect();
        self.records_of(extents)
    }

    /// Blocks the checkpoint maps.
    pub fn mapped_blocks(&self) -> u64 {
        self.tree.mapped_blocks()
    }

    fn records_of(&self, extents: Vec<crate::map::Extent>) -> Result<Vec<(u64, BlockRecord)>> {
        let inner = &self.inner;
        let ppb = self.tree.ppb();
        let bs = self.block_size();
        let mut out = Vec::new();
        let _reuse = inner.segments.read_guard();
        // Table slices of raw extents, read in batches.
        for batch in extents.chunks(256) {
            let mut ops = Vec::new();
            let mut raw = Vec::new();
            for (i, e) in batch.iter().enumerate() {
                if e.loc.is_raw() {
                    let seg = inner.segments.get(e.loc.segment).ok_or_else(|| {
                        Error::Corrupt(format!(
                            "map points at missing data segment {}",
                            e.loc.segment
                        ))
                    })?;
                    ops.push(crate::record::table_read(
                        &seg,
                        e.loc.page,
                        e.loc.pages(e.len, ppb),
                    ));
                    raw.push(i);
                }
            }
            let mut tables = inner.segments.engine().submit(ops).into_iter();
            let mut raw = raw.into_iter().peekable();
            for (i, e) in batch.iter().enumerate() {
                if raw.peek() == Some(&i) {
                    raw.next();
                    let done = tables
                        .next()
                        .ok_or_else(|| Error::Corrupt("lost a table read".into()))?;
                    done.result
                        .map_err(|err| Error::io("reading checksums", err))?;
                    let table = done.op.into_buf();
                    for b in 0..e.len {
                        let mut h: Option<crc32fast::Hasher> = None;
                        for p in 0..u64::from(ppb) {
                            let at = ((b * u64::from(ppb) + p) * 4) as usize;
                            let c = u32::from_be_bytes([
                                table[at],
                                table[at + 1],
                                table[at + 2],
                                table[at + 3],
                            ]);
                            let part = crc32fast::Hasher::new_with_initial_len(c, PAGE_SIZE as u64);
                            match h.as_mut() {
                                None => h = Some(part),
                                Some(h) => h.combine(&part),
                            }
                        }
                        let l = e.loc.advance(b, ppb);
                        out.push((
                            e.start + b,
                            BlockRecord {
                                segment: l.segment,
                                page: l.page,
                                len_flags: bs,
                                crc: h.map_or(0, |h| h.finalize()),
                            },
                        ));
                    }
                    continue;
                }
                out.push((e.start, self.block_record(&e.loc)?));
            }
        }
        Ok(out)
    }

    /// The record of a one-block location.
    fn block_record(&self, l: &Loc) -> Result<BlockRecord> {
        let flags = l.len_flags & (Loc::LZ4 | ((1 << 30) - 1));
        let crc = if l.is_remote() || l.is_inline() {
            l.crc
        } else {
            let stored =
                crate::record::read_single(&self.inner.segments, l).map_err(|b| match b {
                    crate::record::Bad::Io(e) => Error::io("reading records", e),
                    _ => Error::Checksum {
                        volume: self.name().to_string(),
                        offset: 0,
                    },
                })?;
            crc32fast::hash(&stored)
        };
        Ok(BlockRecord {
            segment: l.segment,
            page: l.page,
            len_flags: flags,
            crc,
        })
    }

    /// The record block `block` maps to, if any.
    pub fn record(&self, block: u64) -> Result<Option<BlockRecord>> {
        let Some(l) = self.tree.get(block) else {
            return Ok(None);
        };
        if !l.is_raw() {
            return self.block_record(&l).map(Some);
        }
        let seg = self.inner.segments.get(l.segment).ok_or_else(|| {
            Error::Corrupt(format!("map points at missing data segment {}", l.segment))
        })?;
        let ppb = self.tree.ppb();
        let done = self
            .inner
            .segments
            .engine()
            .run(crate::record::table_read(&seg, l.page, ppb));
        done.result
            .map_err(|err| Error::io("reading checksums", err))?;
        let table = done.op.into_buf();
        let mut h: Option<crc32fast::Hasher> = None;
        for c in crate::record::table_crcs(&table) {
            let part = crc32fast::Hasher::new_with_initial_len(c, PAGE_SIZE as u64);
            match h.as_mut() {
                None => h = Some(part),
                Some(h) => h.combine(&part),
            }
        }
        Ok(Some(BlockRecord {
            segment: l.segment,
            page: l.page,
            len_flags: self.block_size(),
            crc: h.map_or(0, |h| h.finalize()),
        }))
    }

    /// Blocks whose location differs from `base`'s (mapped, unmapped or replaced), in block
    /// order. Costs what differs: subtrees the two share are skipped.
    pub fn changed_since(&self, base: &Snapshot) -> Vec<u64> {
        crate::ops::changed_blocks(&self.tree, &base.tree)
    }

    /// The blocks whose location differs from `base`'s as runs `(first block, blocks)`, in
    /// order ([`Snapshot::changed_since`] without expanding them).
    pub fn changed_runs_since(&self, base: &Snapshot) -> Vec<(u64, u64)> {
        crate::ops::changed_runs(&self.tree, &base.tree)
    }
}
