//! Strata's storage engine: thin-provisioned, copy-on-write volumes whose extent maps live in
//! RocksDB and whose data lives in segment files of checksummed pages, with O(1) checkpoint,
//! restore and fork.
//!
//! Start with [`Store::open`]; see `docs/ARCHITECTURE.md` for how the files fit together and
//! `docs/design/` for the on-disk format and the durability contract.

mod catalog;
mod check;
mod codec;
mod defrag;
mod error;
mod handle;
mod inner;
pub mod io;
mod journal;
mod load;
pub mod map;
mod names;
mod ops;
pub mod qos;
mod record;
mod refmap;
mod remote;
mod scrub;
mod segment;
mod space;
mod store;
mod upgrade;
mod volume;

pub use check::{CheckReport, CountMismatch};
pub use codec::FORMAT_VERSION;
pub use defrag::DefragReport;
pub use error::{Error, Result};
pub use handle::{Snapshot, Source, Volume};
pub use map::PAGE_SIZE;
pub use names::validate as validate_name;
pub use ops::{
    ByteRange, CheckpointEntry, CheckpointInfo, MapRef, VolumeInfo, VolumeOptions,
    DEFAULT_BLOCK_SIZE, DEFAULT_LZ4_BLOCK_SIZE, MAX_VOLUME_SIZE, TREE_VOLUME_SIZE,
};
pub use remote::{BlockRecord, RemoteExtent, RemoteFetcher, RemoteSharing, REMOTE_SEGMENT_BASE};
pub use scrub::{ScrubProblem, ScrubReport};
pub use segment::DEFAULT_REUSE_BYTES;
pub use space::RESERVE_BYTES;
pub use store::{Store, StoreOptions};
pub use volume::SECTOR;

/// Store-wide figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStats {
    pub volumes: usize,
    pub checkpoints: usize,
    /// Bytes of block data referenced by any volume or checkpoint.
    pub live_bytes: u64,
    pub segment_files: usize,
    pub io_engine: &'static str,
    /// Bytes of new records written into freed pages since open (reused: cached, allocated).
    pub reused_bytes: u64,
    /// Bytes of new records appended to fresh pages since open.
    pub appended_bytes: u64,
    /// Dead bytes not punched yet (kept for reuse, or waiting for an idle moment).
    pub dead_bytes: u64,
}

impl Store {
    /// Creates a volume of `size` bytes (a multiple of 512).
    pub fn create_volume(&self, name: &str, size: u64, opts: VolumeOptions) -> Result<VolumeInfo> {
        ops::create_volume(&self.inner, name, size, opts)
    }

    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        ops::list_volumes(&self.inner)
    }

    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        ops::volume_info(&self.inner, name)
    }

    /// Grows a volume; shrinking is refused.
    pub fn grow_volume(&self, name: &str, new_size: u64) -> Result<VolumeInfo> {
        ops::grow_volume(&self.inner, name, new_size)
    }

    /// Deletes a volume and its checkpoints (volumes forked from them keep their data).
    /// Refused while the volume is open.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        ops::delete_volume(&self.inner, name, false)
    }

    /// Opens a volume for IO.
    pub fn open_volume(&self, name: &str) -> Result<Volume> {
        ops::open_volume(&self.inner, name)
    }

    /// Takes a checkpoint of `volume` named `name`: O(1), durable when it returns, and
    /// consistent with every write that completed before the call.
    pub fn checkpoint(&self, volume: &str, name: &str) -> Result<CheckpointInfo> {
        ops::checkpoint(&self.inner, volume, name)
    }

    /// Makes the live volume equal to checkpoint `name` again: O(1). Writes since the last
    /// checkpoint are discarded; every checkpoint, older or newer, stays.
    pub fn restore(&self, volume: &str, name: &str) -> Result<()> {
        ops::restore(&self.inner, volume, name)
    }

    /// Creates volume `new_volume` from checkpoint `volume@name`: O(1), sharing every block.
    pub fn fork(
        &self,
        volume: &str,
        name: &str,
        new_volume: &str,
        ephemeral: bool,
    ) -> Result<VolumeInfo> {
        ops::fork(&self.inner, volume, name, new_volume, ephemeral)
    }

    /// Deletes a checkpoint, freeing every block nothing else references. Refused
    /// ([`Error::CheckpointBusy`]) while a [`Snapshot`] of it is open.
    pub fn delete_checkpoint(&self, volume: &str, name: &str) -> Result<()> {
        ops::delete_checkpoint(&self.inner, volume, name)
    }

    /// A volume's checkpoints, oldest first, each naming its parent (the history tree).
    pub fn list_checkpoints(&self, volume: &str) -> Result<Vec<CheckpointInfo>> {
        ops::list_checkpoints(&self.inner, volume)
    }

    /// Byte ranges whose content differs between `a` and `b`.
    pub fn diff(&self, a: MapRef<'_>, b: MapRef<'_>) -> Result<Vec<ByteRange>> {
        ops::diff(&self.inner, a, b)
    }

    /// A read-only view of a checkpoint. The checkpoint cannot be deleted while the view is
    /// open.
    pub fn open_checkpoint(&self, volume: &str, name: &str) -> Result<Snapshot> {
        let r = ops::resolve(&self.inner, MapRef::Checkpoint(volume, name), true)?;
        Ok(Snapshot::new(
            self.inner.clone(),
            format!("{volume}@{name}"),
            r,
        ))
    }

    /// Opens a checkpoint by its id ([`Snapshot::id`]), as [`Store::open_checkpoint`].
    pub fn open_checkpoint_id(&self, id: u64) -> Result<Snapshot> {
        let (v, n) = ops::checkpoint_by_id(&self.inner, id)?;
        let s = self.open_checkpoint(&v, &n)?;
        if s.id() != id {
            return Err(Error::InvalidArgument(format!(
                "no checkpoint with id {id}"
            )));
        }
        Ok(s)
    }

    /// A volume's checkpoints by name, with their ids: cheap, for frontends that list them
    /// often. [`Store::list_checkpoints`] adds the history tree and space accounting.
    pub fn checkpoint_entries(&self, volume: &str) -> Result<Vec<CheckpointEntry>> {
        ops::checkpoint_entries(&self.inner, volume)
    }

    /// The IO statistics and limits of `volume` (see [`qos`]), shared by every handle and
    /// export of it; a volume deleted and created again gets new ones.
    pub fn volume_io(&self, volume: &str) -> Result<std::sync::Arc<qos::VolumeIo>> {
        Ok(self.inner.catalog.lock().volume(volume)?.io.clone())
    }

    /// Guest IO requests served on every volume so far and their summed latency, as the
    /// frontends record them (see [`qos::IoStats`]): what background work (a push) watches to
    /// see whether it slows the guests down. Counts reads, writes, flushes, discards and
    /// write-zeroes.
    pub fn io_load(&self) -> qos::IoLoad {
        let cat = self.inner.catalog.lock();
        let mut load = qos::IoLoad::default();
        for vol in cat.volumes.values() {
            load.add(&vol.io.stats);
        }
        load
    }

    /// Blocks of the live volume still held only in remote packs (a lazy restore not yet
    /// hydrated). Does not open the volume (its map is loaded if it is not yet).
    pub fn remote_blocks(&self, volume: &str) -> Result<u64> {
        let vol = self.inner.catalog.lock().volume(volume)?.clone();
        if !vol.maybe_remote.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(0);
        }
        load::ensure_loaded(&self.inner, &vol)?;
        Ok(volume::count_remote(&vol))
    }

    /// Hydrates remote blocks of `volume` in `[from, to)`: fetches up to about `max_bytes`
    /// of them (scanning at most 64 Ki blocks) and stores them locally. Returns where to go on
    /// from, or `None` once `to` (or the end of the map) is reached, and the bytes fetched.
    /// Takes no handle: background hydration neither keeps a volume busy nor ends an
    /// ephemeral one.
    pub fn hydrate_step(
        &self,
        volume: &str,
        from: u64,
        to: u64,
        max_bytes: u64,
    ) -> Result<(Option<u64>, u64)> {
        let vol = self.inner.catalog.lock().volume(volume)?.clone();
        volume::hydrate_step(&self.inner, &vol, from, to, max_bytes)
    }

    /// The first mapped block of the live `volume` at or after `from` (a skip over holes:
    /// a walk of a sparse volume costs its mapped blocks, not its size).
    pub fn next_mapped_block(&self, volume: &str, from: u64) -> Result<Option<u64>> {
        let vol = self.inner.catalog.lock().volume(volume)?.clone();
        volume::next_mapped_block(&self.inner, &vol, from)
    }

    /// Whether the live volume may hold remote entries: O(1), conservative (true means
    /// "walk it to know"; false means none).
    pub fn may_read_remote(&self, volume: &str) -> Result<bool> {
        let cat = self.inner.catalog.lock();
        Ok(cat
            .volume(volume)?
            .maybe_remote
            .load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Remote packs the volume or any of its checkpoints still references.
    pub fn remote_packs_of(&self, volume: &str) -> Result<Vec<u32>> {
        let layers: Vec<u64> = {
            let cat = self.inner.catalog.lock();
            let vol = cat.volume(volume)?;
            let mut l = vec![vol.map.read().layer];
            for ((v, _), ck) in &cat.checkpoints {
                if *v == vol.id {
                    l.push(ck.layer);
                }
            }
            l
        };
        let mut packs = std::collections::BTreeSet::new();
        for layer in layers {
            for e in load::layer_tree(&self.inner, layer)?.extents() {
                if e.loc.is_remote() {
                    packs.insert(e.loc.segment - REMOTE_SEGMENT_BASE);
                }
            }
        }
        Ok(packs.into_iter().collect())
    }

    /// Rewrites every fragmented chunk the live volume owns as one record each (reading it
    /// through the normal read path), stopping after about `max_bytes`. A range written
    /// meanwhile is skipped. See `defrag.rs`.
    pub fn defragment(&self, volume: &str, max_bytes: u64) -> Result<DefragReport> {
        let vol = self.inner.catalog.lock().volume(volume)?.clone();
        defrag::defragment(&self.inner, &vol, max_bytes)
    }

    /// Sets the background defragmenter's budget in bytes per second (0 pauses it).
    pub fn set_defrag_rate(&self, bytes_per_sec: u64) {
        self.inner
            .defrag
            .rate
            .store(bytes_per_sec, std::sync::atomic::Ordering::Relaxed);
    }

    /// What the background defragmenter has rewritten since open (read-triggered).
    pub fn defrag_stats(&self) -> DefragReport {
        let d = &self.inner.defrag;
        let o = std::sync::atomic::Ordering::Relaxed;
        DefragReport {
            ranges: d.rewritten.load(o),
            bytes: d.bytes.load(o),
            skipped: d.skipped.load(o),
        }
    }

    /// Waits until the background defragmenter has nothing queued (or `timeout` passes).
    pub fn wait_defrag_idle(&self, timeout: std::time::Duration) {
        let t = std::time::Instant::now();
        while self.inner.defrag.pending() && t.elapsed() < timeout {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Reads and verifies every stored block.
    pub fn scrub(&self) -> Result<ScrubReport> {
        scrub::scrub(&self.inner)
    }

    /// Checks the store's metadata: every loaded map against its committed records, and
    /// every page's reference count against what the committed maps hold (see
    /// [`CheckReport`]). Commits first, then holds writes off while it compares (chunks
    /// written after that commit count as mapped); safe under live IO.
    pub fn check(&self) -> Result<CheckReport> {
        check::check(&self.inner)
    }

    /// Store-wide figures (waits until the space the store references is counted, which a
    /// background pass does right after open).
    pub fn stats(&self) -> StoreStats {
        self.inner.wait_space_counted();
        let (live_bytes, segment_files) = self.inner.segments.usage();
        let cat = self.inner.catalog.lock();
        StoreStats {
            volumes: cat.volumes.len(),
            checkpoints: cat.checkpoints.len(),
            live_bytes,
            segment_files,
            io_engine: self.engine_name(),
            reused_bytes: self.inner.segments.reused_pages() * PAGE_SIZE as u64,
            appended_bytes: self.inner.segments.appended_pages() * PAGE_SIZE as u64,
            dead_bytes: self.inner.segments.held_pages() * PAGE_SIZE as u64,
        }
    }
}
