#![allow(clippy::unwrap_used)]
//! Scenario: a store written by format 1 (the fixture `fixtures/format1-store.tar.gz`, made
//! by the generator beside it with the format-1 engine, and left with unflushed writes in its
//! journal) opens with this build: it is upgraded in place, every volume and checkpoint reads
//! what format 1 stored (the journal's writes replayed), the store takes new writes and
//! checkpoints, the scrub is clean, reopening finds format 2, and deleting everything gives
//! every byte back.

mod common;
use common::*;
use std::path::Path;
use std::sync::Arc;
use strata_engine::io::SyncEngine;
use strata_engine::{Store, VolumeOptions, FORMAT_VERSION};

const KIB: usize = 1024;

fn unpack(dir: &Path) -> std::path::PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format1-store.tar.gz");
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(dir)
        .arg("-xzf")
        .arg(&fixture)
        .status()
        .expect("tar must be installed");
    assert!(st.success(), "unpacking {fixture:?}");
    dir.join("v1store")
}

/// What the generator wrote, replayed on byte vectors.
struct Expected {
    base: Vec<u8>,
    later: Vec<u8>,
    live: Vec<u8>,
    fork: Vec<u8>,
    z: Vec<u8>,
}

fn expected() -> Expected {
    let put = |v: &mut Vec<u8>, off: usize, d: &[u8]| v[off..off + d.len()].copy_from_slice(d);
    let mut disk = vec![0u8; 4 << 20];
    for i in 0..4u64 {
        put(
            &mut disk,
            i as usize * 64 * KIB,
            &pattern(100 + i, 64 * KIB),
        );
    }
    let base = disk.clone();
    for (k, b) in [3usize, 17, 30, 50, 63, 900].iter().enumerate() {
        put(&mut disk, b * 4096, &pattern(200 + k as u64, 4096));
    }
    disk[128 * KIB..160 * KIB].fill(0);
    put(&mut disk, 3 << 20, &pattern(300, 512));
    let later = disk.clone();
    put(&mut disk, 40 * 4096, &pattern(600, 3 * 4096));
    let mut fork = base.clone();
    put(&mut fork, 8192, &pattern(400, 8192));
    put(&mut fork, 0, &pattern(601, 4096));
    let mut z = vec![0u8; 2 << 20];
    z[..128 * KIB].fill(7);
    put(&mut z, 128 * KIB, &pattern(500, 64 * KIB));
    Expected {
        base,
        later,
        live: disk,
        fork,
        z,
    }
}

fn read_all(store: &Store, name: &str) -> Vec<u8> {
    match name.split_once('@') {
        None => {
            let v = store.open_volume(name).unwrap();
            let mut b = vec![0u8; v.size() as usize];
            v.read(0, &mut b).unwrap();
            b
        }
        Some((v, c)) => {
            let s = store.open_checkpoint(v, c).unwrap();
            let mut b = vec![0u8; s.size() as usize];
            s.read(0, &mut b).unwrap();
            b
        }
    }
}

fn check(store: &Store, ex: &Expected) {
    for (name, want) in [
        ("disk", &ex.live),
        ("disk@base", &ex.base),
        ("disk@later", &ex.later),
        ("fork", &ex.fork),
        ("z", &ex.z),
    ] {
        assert!(
            read_all(store, name) == *want,
            "{name} differs from what format 1 stored"
        );
    }
}

#[test]
fn a_format_1_store_is_upgraded_and_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let path = unpack(tmp.path());
    let ex = expected();
    {
        let store = Store::open(&path, options(Arc::new(SyncEngine::new()))).unwrap();
        check(&store, &ex);
        assert_eq!(store.list_checkpoints("disk").unwrap().len(), 2);
        let info = store.volume_info("fork").unwrap();
        assert_eq!(info.base.as_deref(), Some("disk@base"));
        // New writes and checkpoints on the upgraded store.
        let v = store.open_volume("disk").unwrap();
        v.write(1 << 20, &pattern(700, 256 * KIB)).unwrap();
        store.checkpoint("disk", "after").unwrap();
        let report = store.scrub().unwrap();
        assert!(report.problems.is_empty(), "scrub: {:?}", report.problems);
    }
    let store = Store::open(&path, options(Arc::new(SyncEngine::new()))).unwrap();
    let mut live = ex.live.clone();
    live[1 << 20..(1 << 20) + 256 * KIB].copy_from_slice(&pattern(700, 256 * KIB));
    assert!(read_all(&store, "disk") == live);
    assert!(read_all(&store, "disk@after") == live);
    assert!(read_all(&store, "disk@base") == ex.base);
    {
        let db = store.path().join("meta");
        drop(store);
        // Format 2 on disk now.
        let mut o = rocksdb::Options::default();
        o.create_if_missing(false);
        let cfs = ["meta", "volumes", "checkpoints", "layers", "extents"];
        let db = rocksdb::DB::open_cf_for_read_only(&o, db, cfs, false).unwrap();
        let v = db
            .get_cf(db.cf_handle("meta").unwrap(), b"format")
            .unwrap()
            .unwrap();
        assert_eq!(
            u32::from_be_bytes(v[8..12].try_into().unwrap()),
            FORMAT_VERSION
        );
    }
    let store = Store::open(&path, options(Arc::new(SyncEngine::new()))).unwrap();
    for v in ["fork", "disk", "z"] {
        store.delete_volume(v).unwrap();
    }
    store.flush().unwrap();
    assert_eq!(
        store.stats().live_bytes,
        0,
        "deleting everything frees every page"
    );
    store
        .create_volume("again", 1 << 20, VolumeOptions::default())
        .unwrap();
}
