#![allow(clippy::unwrap_used)]
//! Scenario: remote entries (lazy restore). A checkpoint's records are copied into an
//! in-memory "pack" served by a fake fetcher; a second volume is pointed at them with
//! `install_remote`. Reads return the source's bytes and keep what they fetched; hydration
//! copies the rest; the state survives a reopen; a damaged pack is an error, never data.

mod common;
use common::*;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use strata_engine::{Error, RemoteExtent, RemoteFetcher, Store, VolumeOptions};

const MIB: u64 = 1 << 20;

#[derive(Debug, Default)]
struct FakeRemote {
    packs: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    fetched: AtomicU64,
}

impl RemoteFetcher for FakeRemote {
    fn fetch(&self, pack: &[u8], offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let packs = self.packs.lock();
        let p = packs.get(pack).ok_or("no such object")?;
        let end = (offset + len) as usize;
        if end > p.len() {
            return Err("range beyond the object".into());
        }
        self.fetched.fetch_add(len, Ordering::Relaxed);
        Ok(p[offset as usize..end].to_vec())
    }
}

/// Writes a pattern into `src`, checkpoints it, and packs the checkpoint's records.
fn pack_source(
    store: &Store,
    remote: &FakeRemote,
    lz4: bool,
) -> (Vec<u8>, Vec<(u64, RemoteExtent)>) {
    let opts = VolumeOptions {
        lz4,
        ..Default::default()
    };
    store.create_volume("src", 8 * MIB, opts).unwrap();
    let vol = store.open_volume("src").unwrap();
    // Compressible and incompressible blocks, and holes.
    for i in 0..40u64 {
        let off = i * 192 * 1024;
        let data = if i % 3 == 0 {
            vec![(i as u8) | 1; 64 * 1024]
        } else {
            pattern(i, 64 * 1024)
        };
        vol.write(off, &data).unwrap();
    }
    let mut image = vec![0u8; 8 * MIB as usize];
    vol.read(0, &mut image).unwrap();
    store.checkpoint("src", "c").unwrap();
    let snap = store.open_checkpoint("src", "c").unwrap();
    let id = store.register_remote_pack(b"pack-0").unwrap();
    let mut pack = Vec::new();
    let mut extents = Vec::new();
    for (blk, e) in snap.records().unwrap() {
        let stored = store.read_record(&e).unwrap();
        extents.push((
            blk,
            RemoteExtent {
                pack: id,
                offset: pack.len() as u32,
                stored_len: stored.len() as u32,
                lz4: e.is_lz4(),
                crc: e.crc,
            },
        ));
        pack.extend_from_slice(&stored);
    }
    // The batched reader returns the same bytes (coalescing adjacent records).
    let entries: Vec<_> = snap
        .records()
        .unwrap()
        .into_iter()
        .map(|(_, e)| e)
        .collect();
    let mut batched = Vec::new();
    store.read_records(&entries, &mut batched).unwrap();
    assert!(batched == pack, "read_records differs from read_record");
    // A record whose bytes do not match the crc it was listed with is an error, not data.
    for e in &entries[..2] {
        let mut bad = *e;
        bad.crc ^= 1;
        let mut out = Vec::new();
        assert!(
            matches!(
                store.read_records(&[bad], &mut out),
                Err(Error::Checksum { .. })
            ),
            "a record that fails its crc was returned (lz4: {})",
            e.is_lz4()
        );
    }
    remote.packs.lock().insert(b"pack-0".to_vec(), pack);
    (image, extents)
}

#[test]
fn lazy_volume_reads_hydrates_and_survives_reopen() {
    for lz4 in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(FakeRemote::default());
        let (image, extents) = {
            let store = open(dir.path(), engines()[0].1.clone());
            store.set_remote_fetcher(remote.clone());
            let (image, extents) = pack_source(&store, &remote, lz4);
            let bs = store.volume_info("src").unwrap().block_size;
            let opts = VolumeOptions {
                lz4,
                block_size: Some(bs),
                ..Default::default()
            };
            store.create_volume("lazy", 8 * MIB, opts).unwrap();
            let lazy = store.open_volume("lazy").unwrap();
            lazy.install_remote(&extents).unwrap();
            assert_eq!(lazy.remote_blocks(), extents.len() as u64);
            // Reads return the source's bytes and keep what they fetched.
            let mut buf = vec![0u8; 256 * 1024];
            lazy.read(MIB, &mut buf).unwrap();
            assert_eq!(buf, image[MIB as usize..MIB as usize + buf.len()]);
            let after_read = lazy.remote_blocks();
            assert!(
                after_read < extents.len() as u64,
                "a read hydrates what it fetched"
            );
            let fetched = remote.fetched.load(Ordering::Relaxed);
            lazy.read(MIB, &mut buf).unwrap();
            assert_eq!(
                remote.fetched.load(Ordering::Relaxed),
                fetched,
                "kept, not fetched again"
            );
            // A partial write over a remote block patches the remote content.
            lazy.write(3 * MIB + 512, &[0xAB; 512]).unwrap();
            let mut expect = image.clone();
            expect[3 * MIB as usize + 512..3 * MIB as usize + 1024].fill(0xAB);
            lazy.flush().unwrap();
            (expect, extents)
        };
        // Reopen: the remote entries are part of the persisted map.
        let store = open(dir.path(), engines()[0].1.clone());
        store.set_remote_fetcher(remote.clone());
        let lazy = store.open_volume("lazy").unwrap();
        assert!(lazy.remote_blocks() > 0);
        let mut from = Some(0);
        while let Some(f) = from {
            from = lazy.hydrate_step(f, u64::MAX, 256 * 1024).unwrap().0;
        }
        assert_eq!(lazy.remote_blocks(), 0, "lz4={lz4}");
        let mut all = vec![0u8; 8 * MIB as usize];
        lazy.read(0, &mut all).unwrap();
        assert!(
            all == image,
            "lz4={lz4}: hydrated volume differs from the source"
        );
        // Hydrated: no further fetches, and scrub verifies local records only.
        let before = remote.fetched.load(Ordering::Relaxed);
        lazy.read(0, &mut all).unwrap();
        assert_eq!(remote.fetched.load(Ordering::Relaxed), before);
        assert!(store.scrub().unwrap().problems.is_empty());
        assert!(!extents.is_empty());
    }
}

#[test]
fn damaged_or_missing_remote_data_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(FakeRemote::default());
    let store = open(dir.path(), engines()[0].1.clone());
    let (_, extents) = pack_source(&store, &remote, false);
    let bs = store.volume_info("src").unwrap().block_size;
    let opts = VolumeOptions {
        block_size: Some(bs),
        ..Default::default()
    };
    store.create_volume("lazy", 8 * MIB, opts).unwrap();
    let lazy = store.open_volume("lazy").unwrap();
    lazy.install_remote(&extents).unwrap();
    // No fetcher yet: a clear error.
    let mut buf = vec![0u8; 4096];
    let (blk, x) = extents[5];
    let err = lazy.read(blk * u64::from(bs), &mut buf).unwrap_err();
    assert!(matches!(err, Error::Remote { .. }), "{err}");
    store.set_remote_fetcher(remote.clone());
    // One flipped byte in the pack: the block's read fails its checksum.
    remote.packs.lock().get_mut(&b"pack-0".to_vec()).unwrap()[x.offset as usize + 7] ^= 1;
    let err = lazy.read(blk * u64::from(bs), &mut buf).unwrap_err();
    assert!(
        err.to_string().contains("checksum mismatch in remote data"),
        "{err}"
    );
    assert_eq!(
        lazy.remote_blocks(),
        extents.len() as u64,
        "nothing bad was kept"
    );
    // The object gone: an error naming it.
    remote.packs.lock().clear();
    let err = lazy.read(blk * u64::from(bs), &mut buf).unwrap_err();
    assert!(err.to_string().contains("no such object"), "{err}");
    // Extents for unregistered packs or outside the volume are refused.
    let mut bad = extents[0].1;
    bad.pack = 99;
    assert!(lazy.install_remote(&[(0, bad)]).is_err());
    assert!(lazy.install_remote(&[(1 << 40, extents[0].1)]).is_err());
}

#[test]
fn changed_since_and_ancestors() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), engines()[0].1.clone());
    store
        .create_volume("v", 8 * MIB, VolumeOptions::default())
        .unwrap();
    let vol = store.open_volume("v").unwrap();
    vol.write(0, &pattern(1, MIB as usize)).unwrap();
    store.checkpoint("v", "a").unwrap();
    vol.write(4096 * 10, &pattern(2, 8192)).unwrap();
    vol.discard(4096 * 100, 4096).unwrap();
    store.checkpoint("v", "b").unwrap();
    let a = store.open_checkpoint("v", "a").unwrap();
    let b = store.open_checkpoint("v", "b").unwrap();
    assert_eq!(b.changed_since(&a), vec![10, 11, 100]);
    assert_eq!(b.ancestors(), vec![a.id()]);
    store.fork("v", "b", "f", false).unwrap();
    store.checkpoint("f", "c").unwrap();
    let c = store.open_checkpoint("f", "c").unwrap();
    assert_eq!(c.ancestors(), vec![b.id(), a.id()]);
    assert!(c.changed_since(&b).is_empty());
    assert_eq!(store.open_checkpoint_id(b.id()).unwrap().name(), "v@b");
}

/// A lazy volume pointed at `extents` of the source's pack.
fn lazy_from(store: &Store, name: &str, bs: u32, lz4: bool, extents: &[(u64, RemoteExtent)]) {
    let opts = VolumeOptions {
        lz4,
        block_size: Some(bs),
        ..Default::default()
    };
    store.create_volume(name, 8 * MIB, opts).unwrap();
    store
        .open_volume(name)
        .unwrap()
        .install_remote(extents)
        .unwrap();
}

fn hydrate_all(store: &Store, name: &str) {
    let mut from = Some(0);
    while let Some(f) = from {
        from = store.hydrate_step(name, f, u64::MAX, 256 * 1024).unwrap().0;
    }
    assert_eq!(store.remote_blocks(name).unwrap(), 0);
}

fn image_of(store: &Store, name: &str) -> Vec<u8> {
    let mut all = vec![0u8; 8 * MIB as usize];
    store.open_volume(name).unwrap().read(0, &mut all).unwrap();
    all
}

#[test]
fn volumes_mapping_one_remote_record_share_one_local_copy() {
    for lz4 in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let remote = Arc::new(FakeRemote::default());
        let store = open(dir.path(), engines()[0].1.clone());
        store.set_remote_fetcher(remote.clone());
        let (image, extents) = pack_source(&store, &remote, lz4);
        let bs = store.volume_info("src").unwrap().block_size;
        let pack_bytes: u64 = extents.iter().map(|(_, x)| u64::from(x.stored_len)).sum();
        for n in ["a", "b", "c"] {
            lazy_from(&store, n, bs, lz4, &extents);
        }
        let live = || store.stats().live_bytes;
        let base = live();
        hydrate_all(&store, "a");
        assert_eq!(remote.fetched.load(Ordering::Relaxed), pack_bytes);
        let one_copy = live() - base;
        assert!(one_copy > 0);
        // The second volume shares every record: nothing fetched, nothing stored.
        assert_eq!(store.remote_sharing().shared_bytes, 0);
        hydrate_all(&store, "b");
        assert_eq!(
            remote.fetched.load(Ordering::Relaxed),
            pack_bytes,
            "lz4={lz4}"
        );
        assert_eq!(store.remote_sharing().shared_bytes, pack_bytes);
        assert_eq!(live() - base, one_copy, "lz4={lz4}: b stored its own copy");
        assert!(image_of(&store, "b") == image, "lz4={lz4}: b differs");
        // Reading b's scattered runs does not make the defragmenter rewrite the copies.
        store.wait_defrag_idle(std::time::Duration::from_secs(10));
        assert_eq!(
            live() - base,
            one_copy,
            "lz4={lz4}: b's read rewrote shared copies"
        );
        // A's guest overwrites everything and A goes: b's copy stays; c shares it still.
        let a = store.open_volume("a").unwrap();
        a.write(0, &vec![0x5A; 8 * MIB as usize]).unwrap();
        a.flush().unwrap();
        drop(a);
        store.delete_volume("a").unwrap();
        hydrate_all(&store, "c");
        assert_eq!(
            remote.fetched.load(Ordering::Relaxed),
            pack_bytes,
            "lz4={lz4}"
        );
        assert!(image_of(&store, "c") == image, "lz4={lz4}: c differs");
        // Every copy freed, then its pages reused by other data: a new volume fetches again
        // and reads the remote bytes, never what reused the pages.
        store.delete_volume("b").unwrap();
        store.delete_volume("c").unwrap();
        store.flush().unwrap();
        store
            .create_volume("noise", 8 * MIB, VolumeOptions::default())
            .unwrap();
        let noise = store.open_volume("noise").unwrap();
        for round in 0..4u64 {
            noise
                .write(0, &pattern(100 + round, 8 * MIB as usize))
                .unwrap();
            noise.flush().unwrap();
            store.flush().unwrap();
        }
        assert!(store.stats().reused_bytes > 0, "the test must reuse pages");
        lazy_from(&store, "d", bs, lz4, &extents);
        hydrate_all(&store, "d");
        assert!(
            image_of(&store, "d") == image,
            "lz4={lz4}: d read reused pages"
        );
        assert!(remote.fetched.load(Ordering::Relaxed) > pack_bytes);
        assert!(store.scrub().unwrap().problems.is_empty());
        // Reopened, the shared records are ordinary references.
        drop(noise);
        drop(store);
        let store = open(dir.path(), engines()[0].1.clone());
        store.set_remote_fetcher(remote.clone());
        assert!(image_of(&store, "d") == image);
        assert!(store.scrub().unwrap().problems.is_empty());
    }
}

#[test]
fn concurrent_hydrations_fetch_each_record_once() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(FakeRemote::default());
    let store = Arc::new(open(dir.path(), engines()[0].1.clone()));
    store.set_remote_fetcher(remote.clone());
    let (image, extents) = pack_source(&store, &remote, false);
    let bs = store.volume_info("src").unwrap().block_size;
    let pack_bytes: u64 = extents.iter().map(|(_, x)| u64::from(x.stored_len)).sum();
    let names: Vec<String> = (0..8).map(|i| format!("fork{i}")).collect();
    for n in &names {
        lazy_from(&store, n, bs, false, &extents);
    }
    std::thread::scope(|s| {
        for n in &names {
            let store = store.clone();
            s.spawn(move || hydrate_all(&store, n));
        }
    });
    assert_eq!(remote.fetched.load(Ordering::Relaxed), pack_bytes);
    for n in &names {
        assert!(image_of(&store, n) == image, "{n} differs");
    }
}
