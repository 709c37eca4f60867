#![allow(clippy::unwrap_used, clippy::needless_range_loop)]
//! Scenario: thin provisioning gives space back for real. Overwrites, discards and deletions
//! make the store's usage on disk (`du`) drop; per-checkpoint exclusive bytes say what a
//! delete would free; after deleting every volume and checkpoint the store returns to the
//! empty store's size give or take a small constant. Ephemeral volumes vanish on close and
//! on the next open.

mod common;
use common::*;
use strata_engine::{Store, VolumeOptions};

const MIB: u64 = 1 << 20;
/// Slack allowed above the empty store's size (RocksDB's WAL and SST bookkeeping).
const SLACK: u64 = 4 * MIB;

#[test]
fn overwrites_reuse_freed_space() {
    // With the default reuse cap, freed pages are kept and new writes land in them: a volume
    // overwritten again and again stays within one generation of dead space.
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(engines().remove(1).1);
    opts.segment_bytes = 8 * MIB;
    let store = Store::open(dir.path(), opts).unwrap();
    store
        .create_volume("v", 32 * MIB, VolumeOptions::default())
        .unwrap();
    let vol = store.open_volume("v").unwrap();
    for i in 0..32 {
        vol.write(i * MIB, &pattern(i, MIB as usize)).unwrap();
    }
    vol.flush().unwrap();
    let full = du(dir.path());
    for round in 1..=8u64 {
        for i in 0..32 {
            vol.write(i * MIB, &pattern(round * 100 + i, MIB as usize))
                .unwrap();
        }
        vol.flush().unwrap();
    }
    let after = du(dir.path());
    assert!(
        after <= full + 32 * MIB + SLACK,
        "8 overwrites of 32 MiB grew du from {full} to {after}"
    );
    // The writes went into freed pages, not into new segment files: 256 MiB appended would
    // have needed 37 more 8 MiB segments. An 8 MiB segment holds 7 records of 1 MiB (after
    // its header and checksum table), so the fill takes 5 segments and the first round of
    // overwrites 5 more (nothing it frees is reusable before its flush); later rounds reuse.
    let newest = std::fs::read_dir(dir.path().join("data"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_prefix("seg-")?
                .strip_suffix(".dat")?
                .parse::<u32>()
                .ok()
        })
        .max()
        .unwrap();
    assert!(
        newest <= 10,
        "segment {newest} was created: freed space was not reused"
    );
    for i in 0..32 {
        let mut buf = vec![0u8; MIB as usize];
        vol.read(i * MIB, &mut buf).unwrap();
        assert!(buf == pattern(800 + i, MIB as usize), "block {i}");
    }
    // Closing punches what was kept, including what the final commit freed: the last round
    // is not flushed before the store closes.
    for i in 0..32 {
        vol.write(i * MIB, &pattern(900 + i, MIB as usize)).unwrap();
    }
    drop(vol);
    drop(store);
    let closed = du(dir.path());
    assert!(closed <= full + SLACK, "after close: {closed} vs {full}");
}

#[test]
fn disk_usage_follows_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(engines().remove(1).1);
    opts.segment_bytes = 8 * MIB;
    // Exact accounting: freed pages are punched at once rather than kept for reuse.
    opts.reuse_bytes = 0;
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    store.flush().unwrap();
    let empty = du(dir.path());

    store
        .create_volume("v", 64 * MIB, VolumeOptions::default())
        .unwrap();
    let vol = store.open_volume("v").unwrap();
    for i in 0..32 {
        vol.write(i * MIB, &pattern(i, MIB as usize)).unwrap();
    }
    vol.flush().unwrap();
    let full = du(dir.path());
    assert!(
        full >= empty + 32 * MIB,
        "32 MiB written, du grew by {}",
        full - empty
    );
    assert_eq!(vol.mapped_bytes(), 32 * MIB);

    // Overwriting in place must not grow usage by the overwritten amount for long.
    for i in 0..16 {
        vol.write(i * MIB, &pattern(100 + i, MIB as usize)).unwrap();
    }
    vol.flush().unwrap();
    store.flush().unwrap();
    let after_overwrite = du(dir.path());
    assert!(
        after_overwrite < full + 4 * MIB,
        "overwrite leaked: {full} -> {after_overwrite}"
    );

    // A checkpoint pins data: the exclusive bytes are what deleting it frees.
    store.checkpoint("v", "c1").unwrap();
    vol.discard(0, 16 * MIB).unwrap();
    vol.flush().unwrap();
    let c1 = &store.list_checkpoints("v").unwrap()[0];
    assert_eq!(
        c1.exclusive_bytes,
        16 * MIB,
        "c1 alone holds the discarded 16 MiB"
    );
    let pinned = du(dir.path());
    store.delete_checkpoint("v", "c1").unwrap();
    store.flush().unwrap();
    let freed = du(dir.path());
    assert!(
        freed + 15 * MIB <= pinned,
        "deleting c1 freed only {} bytes",
        pinned - freed
    );

    // Discard without a checkpoint frees at once.
    vol.discard(16 * MIB, 8 * MIB).unwrap();
    vol.flush().unwrap();
    assert!(du(dir.path()) + 7 * MIB <= freed);

    store.checkpoint("v", "c2").unwrap();
    store.fork("v", "c2", "f", false).unwrap();
    drop(vol);
    store.delete_volume("v").unwrap();
    store.delete_volume("f").unwrap();
    store.flush().unwrap();
    assert_eq!(store.stats().live_bytes, 0);
    drop(store);
    let store = Store::open(dir.path(), opts).unwrap();
    store.flush().unwrap();
    let end = du(dir.path());
    println!("du: empty {empty}, full {full}, end {end}");
    assert!(
        end <= empty + SLACK,
        "store did not return to its empty size: {empty} -> {end}"
    );
}

#[test]
fn ephemeral_volumes_are_discarded() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engines().remove(0).1;
    let store = open(dir.path(), engine.clone());
    store
        .create_volume("golden", 4 * MIB, VolumeOptions::default())
        .unwrap();
    let g = store.open_volume("golden").unwrap();
    g.write(0, &pattern(1, MIB as usize)).unwrap();
    store.checkpoint("golden", "base").unwrap();
    store.fork("golden", "base", "sandbox", true).unwrap();
    {
        let sb = store.open_volume("sandbox").unwrap();
        sb.write(MIB, &pattern(2, MIB as usize)).unwrap();
        let mut buf = vec![0u8; MIB as usize];
        sb.read(0, &mut buf).unwrap();
        assert_eq!(buf, pattern(1, MIB as usize));
    }
    assert!(
        store.volume_info("sandbox").is_err(),
        "closing the last handle discards it"
    );
    // Never opened: discarded at the next store open.
    store.fork("golden", "base", "sandbox2", true).unwrap();
    store
        .create_volume(
            "scratch",
            MIB,
            VolumeOptions {
                ephemeral: true,
                ..Default::default()
            },
        )
        .unwrap();
    drop(g);
    drop(store);
    let store = open(dir.path(), engine);
    let names: Vec<String> = store.list_volumes().into_iter().map(|v| v.name).collect();
    assert_eq!(names, vec!["golden".to_string()]);
}

#[test]
fn idle_store_returns_space_held_in_the_active_segment() {
    // With the background committer, dead records in the segment being appended to are
    // punched once writes pause for a commit interval.
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(engines().remove(1).1);
    opts.commit_interval = Some(std::time::Duration::from_millis(200));
    opts.segment_bytes = 256 * MIB;
    let store = Store::open(dir.path(), opts).unwrap();
    store
        .create_volume("v", 64 * MIB, VolumeOptions::default())
        .unwrap();
    let vol = store.open_volume("v").unwrap();
    for round in 0..4 {
        for i in 0..16 {
            vol.write(i * MIB, &pattern(round * 100 + i, MIB as usize))
                .unwrap();
        }
    }
    vol.flush().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let base = du(&dir.path().join("data"));
    while du(&dir.path().join("data")) > 20 * MIB {
        assert!(
            std::time::Instant::now() < deadline,
            "64 MiB written over 16 MiB: data still uses {base} bytes"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_quota_holds_allocated_bytes_like_a_full_disk() {
    // A 64 MiB thin volume held to 1 MiB of allocated bytes: writes that would map more fail
    // with QuotaExceeded and leave nothing behind; overwrites and discards keep working; a
    // fork starts with its own (no) quota, and one set on it counts what it maps, shared or not.
    for (lz4, name) in [(false, "raw"), (true, "lz4")] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), engines().remove(0).1);
        let opts = VolumeOptions {
            lz4,
            ..Default::default()
        };
        store.create_volume("v", 64 * MIB, opts).unwrap();
        let vol = store.open_volume("v").unwrap();
        let bs = u64::from(vol.block_size());
        vol.io().quota.set(MIB);
        let data = pattern(1, MIB as usize);
        vol.write(0, &data).unwrap();
        assert_eq!(vol.mapped_bytes(), MIB, "{name}");
        let quota_err = |r: strata_engine::Result<()>| {
            assert!(
                matches!(r, Err(strata_engine::Error::QuotaExceeded { quota, .. }) if quota % (MIB / 2) == 0),
                "{name}: {r:?}"
            )
        };
        // One block more, whole or partial, alone or in a write that is mostly overwrite.
        quota_err(vol.write(MIB, &pattern(2, bs as usize)));
        quota_err(vol.write(8 * MIB + 512, &[7u8; 512]));
        quota_err(vol.write(MIB / 2, &pattern(3, MIB as usize)));
        quota_err(vol.write_blocks(&[(0, &data[..bs as usize]), (MIB, &data[..bs as usize])]));
        assert_eq!(vol.io().quota.refused(), 4, "{name}");
        // Nothing of the refused writes landed.
        let mut back = vec![0u8; 2 * MIB as usize];
        vol.read(0, &mut back).unwrap();
        assert!(
            back[..MIB as usize] == data[..],
            "{name}: refused writes changed data"
        );
        assert!(back[MIB as usize..].iter().all(|b| *b == 0), "{name}");
        assert_eq!(vol.mapped_bytes(), MIB, "{name}");
        // Overwriting mapped blocks always works; discarding gives room back.
        let over = pattern(4, MIB as usize);
        vol.write(0, &over).unwrap();
        vol.discard(0, 256 * 1024).unwrap();
        vol.write(32 * MIB, &pattern(5, 256 * 1024)).unwrap();
        quota_err(vol.write(40 * MIB, &pattern(6, bs as usize)));
        // Zeros map nothing, so they are not refused.
        vol.write(48 * MIB, &vec![0u8; MIB as usize]).unwrap();
        vol.write(48 * MIB, &[0u8; 512]).unwrap();
        // Lifting the quota lifts the limit.
        vol.io().quota.set(0);
        vol.write(40 * MIB, &pattern(6, bs as usize)).unwrap();
        vol.io().quota.set(MIB);
        vol.flush().unwrap();
        // A fork maps what its checkpoint maps; a quota on it below that refuses growth only.
        store.checkpoint("v", "c").unwrap();
        store.fork("v", "c", "w", false).unwrap();
        let w = store.open_volume("w").unwrap();
        assert_eq!(w.io().quota.bytes(), 0, "{name}: a fork inherited a quota");
        w.write(50 * MIB, &pattern(7, bs as usize)).unwrap();
        w.io().quota.set(MIB / 2);
        w.write(32 * MIB, &pattern(8, 256 * 1024)).unwrap();
        quota_err(w.write(60 * MIB, &pattern(9, bs as usize)));
        let mut b = vec![0u8; 256 * 1024];
        w.read(32 * MIB, &mut b).unwrap();
        assert!(b == pattern(8, 256 * 1024), "{name}");
        w.flush().unwrap();
        drop((vol, w));
        let report = store.scrub().unwrap();
        assert!(report.problems.is_empty(), "{name}: {:?}", report.problems);
    }
}
