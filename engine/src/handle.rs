//! The public handles: [`Volume`] (live IO), [`Snapshot`] (a checkpoint's read-only view) and
//! [`Source`] (either).

use crate::catalog::VolumeState;
use crate::inner::Inner;
use crate::map::{Loc, Tree};
use crate::volume::{check_range, read, Align, Geometry, MapSource, Writer};
use crate::{Error, RemoteExtent, Result};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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

    /// The volume's IO statistics and limits (see [`crate::qos`]).
    pub fn io(&self) -> &std::sync::Arc<crate::qos::VolumeIo> {
        &self.state.io
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

    fn geometry(&self) -> Geometry<'_> {
        self.state.geometry()
    }

    fn read_aligned(&self, offset: u64, buf: &mut [u8], align: Align) -> Result<()> {
        let g = self.geometry();
        check_range(&g, offset, buf.len() as u64, align)?;
        if !buf.is_empty() && self.state.maybe_remote.load(Ordering::Relaxed) {
            // Blocks still remote are fetched once and kept (hydrated), not fetched per read.
            let bs = u64::from(g.block_size);
            let (first, last) = (offset / bs, (offset + buf.len() as u64 - 1) / bs);
            let remote: Vec<(u64, Loc)> = {
                let m = self.state.map.read();
                m.tree(&self.state.name)?
                    .lookup(first, last - first + 1)
                    .into_iter()
                    .filter_map(|p| p.loc.filter(Loc::is_remote).map(|l| (p.block, l)))
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
        let (pieces, epoch) = read(&self.inner, &MapSource::Head(&self.state), &g, offset, buf)?;
        crate::defrag::after_read(&self.inner, &self.state, offset, buf, pieces, epoch);
        Ok(())
    }

    /// Points blocks at records in remote packs (a lazy restore): reads fetch them on demand
    /// and [`Volume::hydrate_step`] copies them in. Each block must be inside the volume and
    /// each pack registered. Durable after the next flush, like a write.
    pub fn install_remote(&self, extents: &[(u64, RemoteExtent)]) -> Result<()> {
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
            let loc = x.loc();
            changes.push(crate::volume::Change {
                block: *blk,
                count: 1,
                new: Some(loc),
                expect: None,
                check: loc.crc,
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
        crate::volume::hydrate_step(&self.inner, &self.state, from, to, max_bytes)
    }

    /// Blocks of the live volume still held only remotely.
    pub fn remote_blocks(&self) -> u64 {
        crate::volume::count_remote(&self.state)
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

    /// [`Volume::read`] into several buffers, filled in order from `offset` (a request's
    /// scatter-gather list: only the total must be a multiple of 512). Each buffer is read
    /// into directly.
    pub fn read_vectored(&self, offset: u64, bufs: &mut [&mut [u8]]) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        check_range(&self.geometry(), offset, total, Align::Sector)?;
        let mut at = offset;
        for b in bufs.iter_mut() {
            self.read_aligned(at, b, Align::Byte)?;
            at += b.len() as u64;
        }
        Ok(())
    }

    /// [`Volume::write`] of several buffers, in order, from `offset` (only the total must be
    /// a multiple of 512), for memory another party may change while the write runs (a
    /// guest's): the bytes are copied first, so the checksums stored are those of the bytes
    /// stored, whatever happens to the buffers meanwhile (a guest without stable pages may
    /// change a page it is writing). One record and one journal group, as for one buffer.
    pub fn write_vectored(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        let total = bufs.iter().map(|b| b.len()).sum();
        let mut own = crate::io::take_empty_buf(total);
        for b in bufs {
            own.extend_from_slice(b);
        }
        let r = self.write(offset, &own);
        crate::io::give_buf(own);
        r
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
            reqs.push((off / bs, *data));
        }
        self.inner.check_poisoned()?;
        self.writer().write_blocks(&reqs)
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
        self.inner.flush()
    }

    /// Bytes currently mapped (stored) in the live volume.
    pub fn mapped_bytes(&self) -> u64 {
        self.state.map.read().mapped_blocks * u64::from(self.state.block_size)
    }

    /// Extents of the live map (for tests and benches: how fragmented it is).
    pub fn extent_count(&self) -> usize {
        self.state.map.read().tree.extents().count()
    }

    /// First mapped byte offset at or after `offset` (`None`: only holes remain): for
    /// SEEK_DATA / SEEK_HOLE.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        self.next_data_before(offset, u64::MAX)
    }

    /// [`Volume::next_data`] limited to offsets before `end`: costs what the map holds in
    /// `[offset, end)`, whatever lies past it.
    pub fn next_data_before(&self, offset: u64, end: u64) -> Option<u64> {
        let bs = u64::from(self.state.block_size);
        let end = end.min(self.size());
        let b = self
            .state
            .map
            .read()
            .tree
            .next_mapped_before(offset / bs, end.div_ceil(bs))?;
        Some((b * bs).max(offset)).filter(|o| *o < end)
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
    pub(crate) inner: Arc<Inner>,
    name: String,
    pub(crate) tree: Tree,
    block_size: u32,
    lz4: bool,
    size: u64,
    id: u64,
    pin: Option<Arc<AtomicUsize>>,
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
        read(&self.inner, &MapSource::Frozen(&self.tree), &g, offset, buf).map(|_| ())
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

    /// Ids of the checkpoints this one descends from (through forks too), nearest first.
    pub fn ancestors(&self) -> Vec<u64> {
        crate::ops::checkpoint_ancestors(&self.inner, self.id)
    }

    /// First mapped byte offset at or after `offset`.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        self.next_data_before(offset, u64::MAX)
    }

    /// First byte offset in `[offset, end)` holding data: see [`Volume::next_data_before`].
    pub fn next_data_before(&self, offset: u64, end: u64) -> Option<u64> {
        let bs = u64::from(self.block_size);
        let end = end.min(self.size);
        let b = self
            .tree
            .next_mapped_before(offset / bs, end.div_ceil(bs))?;
        Some((b * bs).max(offset)).filter(|o| *o < end)
    }

    /// First byte offset at or after `offset` in a hole, or the size: see
    /// [`Volume::next_hole`].
    pub fn next_hole(&self, offset: u64) -> u64 {
        let bs = u64::from(self.block_size);
        (self.tree.next_unmapped(offset / bs) * bs)
            .max(offset)
            .min(self.size)
    }

    /// Extents of the checkpoint's map.
    pub fn extent_count(&self) -> usize {
        self.tree.extents().count()
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

    /// First byte offset in `[offset, end)` holding data.
    pub fn next_data_before(&self, offset: u64, end: u64) -> Option<u64> {
        match self {
            Source::Live(v) => v.next_data_before(offset, end),
            Source::Checkpoint(s) => s.next_data_before(offset, end),
        }
    }
}
