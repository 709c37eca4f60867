//! Remote records: map entries that point into objects held outside the store (packs in an
//! S3-compatible bucket), for volumes restored lazily from a remote checkpoint.
//!
//! A remote entry is an ordinary 16-byte map entry whose segment id is at or above
//! [`REMOTE_SEGMENT_BASE`]: `segment - REMOTE_SEGMENT_BASE` names a *pack* registered with
//! [`Store::register_remote_pack`] (an opaque descriptor the daemon understands: remote,
//! object key, length), and the `page` field holds the record's byte offset in that pack.
//! Length, lz4 flag and crc32 keep their meaning, so a fetched record is verified exactly like
//! a local one. Because remote entries are part of the persisted map, a volume's hydration
//! state *is* its map: a restart continues with whatever entries are still remote.
//!
//! The engine never talks to the network itself: the daemon installs a [`RemoteFetcher`].

use crate::codec;
use crate::store::{cf, Inner};
use crate::tree::Entry;
use crate::{Error, Result, Store};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;

/// Segment ids from here up name remote packs, not local segment files.
pub const REMOTE_SEGMENT_BASE: u32 = 0xF000_0000;
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

impl Entry {
    /// True when the record lives in a remote pack.
    pub fn is_remote(&self) -> bool {
        self.segment >= REMOTE_SEGMENT_BASE
    }

    /// The remote location, for remote entries.
    pub fn remote(&self) -> Option<RemoteExtent> {
        self.is_remote().then(|| RemoteExtent {
            pack: self.segment - REMOTE_SEGMENT_BASE,
            offset: self.page,
            stored_len: self.stored_len(),
            lz4: self.is_lz4(),
            crc: self.crc,
        })
    }
}

impl RemoteExtent {
    pub(crate) fn entry(&self) -> Entry {
        Entry::new(
            REMOTE_SEGMENT_BASE + self.pack,
            self.offset,
            self.stored_len,
            self.lz4,
            self.crc,
        )
    }
}

/// Registered packs and the fetcher.
#[derive(Debug, Default)]
pub(crate) struct Remotes {
    packs: RwLock<HashMap<u32, Arc<[u8]>>>,
    fetcher: RwLock<Option<Arc<dyn RemoteFetcher>>>,
    register: Mutex<()>,
}

fn pack_key(id: u32) -> Vec<u8> {
    let mut k = KEY_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

impl Remotes {
    /// Loads the registered packs from RocksDB.
    pub fn load(inner: &Inner) -> Result<()> {
        let meta = cf(&inner.db, codec::CF_META)?;
        let mut packs = inner.remote.packs.write();
        for item in inner.db.prefix_iterator_cf(meta, KEY_PREFIX) {
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
    inner: &Inner,
    label: &str,
    block_size: u32,
    entries: &[(u64, Entry)],
) -> Result<Vec<Vec<u8>>> {
    let fetcher = inner.remote.fetcher.read().clone();
    let err = |blk: u64, detail: String| Error::Remote {
        volume: label.to_string(),
        offset: blk * u64::from(block_size),
        detail,
    };
    let mut out = Vec::with_capacity(entries.len());
    let mut i = 0;
    while i < entries.len() {
        let (blk, e) = entries[i];
        let x = e
            .remote()
            .ok_or_else(|| err(blk, "not a remote record".into()))?;
        if x.stored_len == 0 || x.stored_len > block_size {
            return Err(err(blk, format!("bad stored length {}", x.stored_len)));
        }
        let mut j = i + 1;
        let mut end = u64::from(x.offset) + u64::from(x.stored_len);
        while j < entries.len() {
            let Some(y) = entries[j].1.remote() else {
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
        let desc = inner
            .remote
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

impl Store {
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
    pub fn read_records(&self, entries: &[Entry], out: &mut Vec<u8>) -> Result<()> {
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
                    let items: Vec<(u64, Entry)> = run.iter().map(|e| (0, *e)).collect();
                    for rec in fetch_records(&self.inner, "record", 1 << 30, &items)? {
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
            ops.push(crate::io::Op::Read {
                file: seg.file.clone(),
                offset: u64::from(*first) * crate::PAGE_SIZE as u64,
                buf: crate::io::take_buf(*pages as usize * crate::PAGE_SIZE),
            });
        }
        for (done, (first, _, range)) in inner.segments.engine().submit(ops).into_iter().zip(spans)
        {
            done.result
                .map_err(|err| Error::io("reading records", err))?;
            let data = done.op.into_buf();
            for e in &entries[range] {
                let at = (e.page - first) as usize * crate::PAGE_SIZE;
                let rec = &data[at..at + e.stored_len() as usize];
                if crc32fast::hash(rec) != e.crc {
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

    /// Reads one record's stored bytes (raw or lz4, exactly as stored) and verifies its crc32:
    /// local records from their segment, remote ones through the fetcher. For pushing a
    /// checkpoint's records elsewhere; `e` must be referenced by an open view (a
    /// [`crate::Snapshot`]) so it cannot be freed meanwhile.
    pub fn read_record(&self, e: &Entry) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(e.stored_len() as usize);
        self.read_records(std::slice::from_ref(e), &mut out)?;
        Ok(out)
    }
}
