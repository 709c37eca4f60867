#![allow(clippy::unwrap_used, clippy::needless_range_loop)]
//! Scenario: the volume lifecycle and IO semantics on both IO engines — create, write, read
//! back (partial blocks, holes), discard, write-zeroes, grow, reopen, checkpoint, restore,
//! fork, diff, delete; and the errors for bad input.

mod common;
use common::*;
use strata_engine::{Error, MapRef, VolumeOptions};

const MIB: u64 = 1 << 20;

#[test]
fn lifecycle_on_every_engine() {
    for (name, engine) in engines() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), engine.clone());
        assert_eq!(store.engine_name(), name);
        store
            .create_volume("vm", 8 * MIB, VolumeOptions::default())
            .unwrap();
        let vol = store.open_volume("vm").unwrap();
        let data = pattern(1, 64 * 1024);
        vol.write(4096, &data).unwrap();
        // Partial-block write in the middle of a block.
        vol.write(4096 + 512, &[7u8; 1024]).unwrap();
        let mut back = vec![0u8; 64 * 1024];
        vol.read(4096, &mut back).unwrap();
        let mut expect = data.clone();
        expect[512..1536].fill(7);
        assert_eq!(back, expect, "{name}");
        // Holes read as zeros.
        let mut hole = vec![1u8; 4096];
        vol.read(0, &mut hole).unwrap();
        assert!(hole.iter().all(|&b| b == 0));
        assert_eq!(vol.mapped_bytes(), 64 * 1024);

        store.checkpoint("vm", "c1").unwrap();
        vol.discard(4096, 8192).unwrap();
        vol.write_zeroes(4096 * 3 + 512, 512).unwrap();
        let mut b = vec![1u8; 8192];
        vol.read(4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        let diffs = store
            .diff(MapRef::Checkpoint("vm", "c1"), MapRef::Live("vm"))
            .unwrap();
        assert_eq!(
            diffs.iter().map(|r| (r.offset, r.len)).collect::<Vec<_>>(),
            vec![(4096, 3 * 4096)]
        );

        let fork = store.fork("vm", "c1", "vm2", false).unwrap();
        assert_eq!(fork.mapped_bytes, 64 * 1024);
        let v2 = store.open_volume("vm2").unwrap();
        let mut f = vec![0u8; 64 * 1024];
        v2.read(4096, &mut f).unwrap();
        assert_eq!(f, expect);

        store.restore("vm", "c1").unwrap();
        vol.read(4096, &mut back).unwrap();
        assert_eq!(back, expect);
        drop((vol, v2));

        store.grow_volume("vm", 16 * MIB).unwrap();
        drop(store);
        let store = open(dir.path(), engine.clone());
        let vol = store.open_volume("vm").unwrap();
        assert_eq!(vol.size(), 16 * MIB);
        vol.read(4096, &mut back).unwrap();
        assert_eq!(back, expect, "{name} after reopen");
        let ck = store.list_checkpoints("vm").unwrap();
        assert_eq!(ck.len(), 1);
        assert!(ck[0].is_base);
        assert_eq!(store.scrub().unwrap().problems, vec![]);
        drop(vol);
        store.delete_volume("vm").unwrap();
        // The fork keeps the shared data after its origin is gone.
        let v2 = store.open_volume("vm2").unwrap();
        v2.read(4096, &mut f).unwrap();
        assert_eq!(f, expect);
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), engines().remove(0).1);
    store
        .create_volume("v", MIB, VolumeOptions::default())
        .unwrap();
    let vol = store.open_volume("v").unwrap();
    assert!(matches!(
        vol.write(100, &[0; 512]),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        vol.write(0, &[0; 100]),
        Err(Error::Misaligned { .. })
    ));
    assert!(matches!(
        vol.write(MIB, &[0; 512]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.read(MIB - 512, &mut [0; 1024]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.discard(u64::MAX - 511, 512),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        store.open_volume("nope"),
        Err(Error::NoSuchVolume(_))
    ));
    assert!(matches!(
        store.create_volume("v", MIB, VolumeOptions::default()),
        Err(Error::VolumeExists(_))
    ));
    assert!(matches!(
        store.create_volume("a/b", MIB, VolumeOptions::default()),
        Err(Error::InvalidName { .. })
    ));
    assert!(matches!(
        store.create_volume("z", 1000, VolumeOptions::default()),
        Err(Error::InvalidArgument(_))
    ));
    let bad_bs = VolumeOptions {
        block_size: Some(3000),
        ..Default::default()
    };
    assert!(matches!(
        store.create_volume("z", MIB, bad_bs),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        store.restore("v", "nope"),
        Err(Error::NoSuchCheckpoint { .. })
    ));
    assert!(matches!(
        store.grow_volume("v", MIB / 2),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        store.delete_volume("v"),
        Err(Error::VolumeBusy(_))
    ));
    store.checkpoint("v", "c").unwrap();
    assert!(matches!(
        store.checkpoint("v", "c"),
        Err(Error::CheckpointExists { .. })
    ));
    // Nothing was lost by the failed calls.
    assert_eq!(store.list_volumes().len(), 1);
}

#[test]
fn compressed_volumes_round_trip_and_save_space() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), engines().remove(1).1);
    store
        .create_volume(
            "z",
            8 * MIB,
            VolumeOptions {
                lz4: true,
                ..Default::default()
            },
        )
        .unwrap();
    let vol = store.open_volume("z").unwrap();
    assert_eq!(vol.block_size(), 64 * 1024);
    // Compressible text-like data.
    let data: Vec<u8> = (0..4 * MIB as usize)
        .map(|i| b"strata checkpoint "[i % 18])
        .collect();
    vol.write(0, &data).unwrap();
    vol.write(512, &[9u8; 512]).unwrap();
    let mut back = vec![0u8; data.len()];
    vol.read(0, &mut back).unwrap();
    let mut expect = data.clone();
    expect[512..1024].fill(9);
    assert_eq!(back, expect);
    let stats = store.stats();
    assert!(
        stats.live_bytes < 4 * MIB / 4,
        "lz4 stored {} bytes for 4 MiB",
        stats.live_bytes
    );
}

#[test]
fn store_errors_on_open() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("unrelated"), b"x").unwrap();
    assert!(matches!(
        strata_engine::Store::open(dir.path(), options(engines().remove(0).1)),
        Err(Error::NotAStore { .. })
    ));
    let empty = tempfile::tempdir().unwrap();
    let opts = strata_engine::StoreOptions {
        create: false,
        ..options(engines().remove(0).1)
    };
    assert!(matches!(
        strata_engine::Store::open(empty.path().join("x"), opts),
        Err(Error::NoStore { .. })
    ));
}

#[test]
fn an_open_checkpoint_view_cannot_be_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), engines().remove(0).1);
    store
        .create_volume("v", 1 << 20, VolumeOptions::default())
        .unwrap();
    let vol = store.open_volume("v").unwrap();
    vol.write(0, &[7u8; 4096]).unwrap();
    store.checkpoint("v", "c").unwrap();
    let snap = store.open_checkpoint("v", "c").unwrap();
    assert!(matches!(
        store.delete_checkpoint("v", "c"),
        Err(Error::CheckpointBusy { .. })
    ));
    let mut buf = vec![0u8; 4096];
    snap.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![7u8; 4096]);
    drop(snap);
    store.delete_checkpoint("v", "c").unwrap();
}
