#![allow(clippy::unwrap_used, clippy::needless_range_loop)]
//! Scenario: many threads on one volume, and many volumes open at once, on both engines.
//! Proves the stated semantics of concurrent writes (volume.rs): writes to different sectors
//! of the same block never lose each other (partial-block writes are compare-and-set);
//! overlapping whole-block writes leave exactly one writer's block, never a mix; checkpoints
//! taken while writers run are consistent with every write completed before them.

mod common;
use common::*;
use std::sync::Arc;
use strata_engine::VolumeOptions;

const BS: usize = 4096;

#[test]
fn sector_writes_to_shared_blocks_are_never_lost() {
    for (_, engine) in engines() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), engine);
        store
            .create_volume("v", 16 * BS as u64, VolumeOptions::default())
            .unwrap();
        let vol = store.open_volume("v").unwrap();
        // 8 threads, each owns sector t of every block and rewrites it many times.
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let vol = vol.clone();
                s.spawn(move || {
                    for round in 0..50u64 {
                        for b in 0..16u64 {
                            let data = vec![(t * 31 + round) as u8; 512];
                            vol.write(b * BS as u64 + t * 512, &data).unwrap();
                        }
                    }
                });
            }
        });
        let mut buf = vec![0u8; 16 * BS];
        vol.read(0, &mut buf).unwrap();
        for b in 0..16 {
            for t in 0..8 {
                let at = b * BS + t * 512;
                assert!(
                    buf[at..at + 512]
                        .iter()
                        .all(|&x| x == (t as u64 * 31 + 49) as u8),
                    "block {b} sector {t} lost its last write"
                );
            }
        }
    }
}

#[test]
fn overlapping_block_writes_never_mix() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), engines().remove(1).1);
    store
        .create_volume("v", 64 * BS as u64, VolumeOptions::default())
        .unwrap();
    let vol = store.open_volume("v").unwrap();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let vol = vol.clone();
            s.spawn(move || {
                for _ in 0..100 {
                    vol.write(0, &vec![t + 1; 64 * BS]).unwrap();
                }
            });
        }
    });
    let mut buf = vec![0u8; 64 * BS];
    vol.read(0, &mut buf).unwrap();
    for block in buf.chunks(BS) {
        assert!(
            block.iter().all(|&x| x == block[0]) && block[0] != 0,
            "a block mixes two writers"
        );
    }
}

#[test]
fn checkpoints_under_concurrent_writers_are_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path(), engines().remove(1).1));
    store
        .create_volume("v", 256 * BS as u64, VolumeOptions::default())
        .unwrap();
    let vol = store.open_volume("v").unwrap();
    // Each writer owns a stripe of blocks and writes an increasing counter into them; a
    // checkpoint must hold, per block, a counter at least as new as the last one completed
    // before the checkpoint call began.
    let done: Vec<Arc<std::sync::atomic::AtomicU64>> =
        (0..4).map(|_| Arc::new(Default::default())).collect();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let vol = vol.clone();
            let done = done[t as usize].clone();
            s.spawn(move || {
                for n in 1..=300u64 {
                    let b = t * 64 + n % 64;
                    let mut data = vec![0u8; BS];
                    data[..8].copy_from_slice(&n.to_le_bytes());
                    vol.write(b * BS as u64, &data).unwrap();
                    done.store(n, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
        for c in 0..10 {
            let floor: Vec<u64> = done
                .iter()
                .map(|d| d.load(std::sync::atomic::Ordering::SeqCst))
                .collect();
            store.checkpoint("v", &format!("c{c}")).unwrap();
            let snap = store.open_checkpoint("v", &format!("c{c}")).unwrap();
            for (t, &n) in floor.iter().enumerate() {
                if n == 0 {
                    continue;
                }
                let b = t as u64 * 64 + n % 64;
                let mut buf = vec![0u8; BS];
                snap.read(b * BS as u64, &mut buf).unwrap();
                let got = u64::from_le_bytes(buf[..8].try_into().unwrap());
                assert!(
                    got >= n,
                    "checkpoint c{c} misses a write completed before it"
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    });
}

/// Sets the flag when dropped: a failing assertion on the main thread of a `thread::scope`
/// then stops the writer threads instead of leaving the scope waiting for them forever.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The whole content of volume `v`'s head (`"v"`) and of each checkpoint named, by name.
fn read_layers(
    store: &strata_engine::Store,
    names: &[String],
    size: u64,
) -> Vec<(String, Vec<u8>)> {
    names
        .iter()
        .map(|name| {
            let mut all = vec![0u8; size as usize];
            if name == "v" {
                store.open_volume("v").unwrap().read(0, &mut all).unwrap();
            } else {
                store
                    .open_checkpoint("v", name)
                    .unwrap()
                    .read(0, &mut all)
                    .unwrap();
            }
            (name.clone(), all)
        })
        .collect()
}

/// Reopens the store in `dir`: every layer in `kept` reads as it did, and the metadata
/// check is clean. `what` labels failures.
fn assert_layers_survive_reopen(
    dir: &std::path::Path,
    size: u64,
    kept: &[(String, Vec<u8>)],
    what: &str,
) {
    let store = open(dir, engines().remove(1).1);
    let names: Vec<String> = kept.iter().map(|(n, _)| n.clone()).collect();
    for ((name, want), (_, got)) in kept.iter().zip(read_layers(&store, &names, size)) {
        let first = got.iter().zip(want).position(|(a, b)| a != b);
        assert_eq!(
            first, None,
            "{what}: {name} reads differently after a reopen (byte offset)"
        );
    }
    let report = store.check().unwrap();
    assert!(report.is_clean(), "{what}, after reopen: {report:#?}");
}

/// Checkpoints taken and deleted while writers rewrite the same chunks: every map's
/// committed records match the map in memory, every page's reference count matches the
/// records (`Store::check`), and after a reopen each layer reads as it did before.
#[test]
fn checkpoints_taken_and_deleted_under_writers_keep_maps_and_counts_exact() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 4 * 1024u64;
    let (checkpoints, keep) = (60, 3);
    let size = blocks * BS as u64;
    let kept = {
        let store = Arc::new(open(dir.path(), engines().remove(1).1));
        store
            .create_volume("v", blocks * BS as u64, VolumeOptions::default())
            .unwrap();
        let vol = store.open_volume("v").unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for t in 0..2u64 {
                let (vol, stop) = (vol.clone(), &stop);
                s.spawn(move || {
                    let mut n = t;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        n = n
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let b = (n >> 33) % blocks;
                        vol.write(b * BS as u64, &pattern(n, BS)).unwrap();
                    }
                });
            }
            let _stop = StopOnDrop(&stop);
            for c in 0..checkpoints {
                store.checkpoint("v", &format!("c{c}")).unwrap();
                if c >= keep {
                    store
                        .delete_checkpoint("v", &format!("c{}", c - keep))
                        .unwrap();
                }
            }
        });
        let report = store.check().unwrap();
        assert!(report.is_clean(), "{report:#?}");
        assert!(report.extents > 0 && report.layers as usize == keep + 1);
        let names: Vec<String> = std::iter::once("v".to_string())
            .chain((checkpoints - keep..checkpoints).map(|c| format!("c{c}")))
            .collect();
        let kept = read_layers(&store, &names, size);
        store.flush().unwrap();
        kept
    };
    assert_layers_survive_reopen(dir.path(), size, &kept, "checkpoints under writers");
}

/// Every metadata operation racing two writers (writes of 1 to 8 blocks, sector writes,
/// discards, zeroes, flushes) on each volume layout (4 KiB raw, 64 KiB lz4): checkpoints,
/// deletions, restores, forks written to and deleted, defragmenting passes, metadata checks
/// (which must be clean with the writers running). At the end every
/// map equals its records and every page count the records (`Store::check`), and every layer
/// reads the same after a reopen.
#[test]
fn every_operation_racing_writers_keeps_maps_and_counts_exact() {
    for lz4 in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let size = 16u64 << 20;
        let kept = {
            let store = Arc::new(open(dir.path(), engines().remove(1).1));
            let opts = VolumeOptions {
                lz4,
                ..VolumeOptions::default()
            };
            store.create_volume("v", size, opts).unwrap();
            let vol = store.open_volume("v").unwrap();
            let stop = std::sync::atomic::AtomicBool::new(false);
            let mut rng = 0x5EED_u64 + u64::from(lz4);
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut ckpts: Vec<String> = Vec::new();
            let (mut live_checks, mut live_dirty) = (0, 0);
            std::thread::scope(|s| {
                for t in 0..2u64 {
                    let (vol, stop) = (vol.clone(), &stop);
                    s.spawn(move || {
                        let mut n = t + 1;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            n = n
                                .wrapping_mul(6364136223846793005)
                                .wrapping_add(1442695040888963407);
                            let r = n >> 20;
                            let sector = (r % (size / 512)) * 512;
                            let len = ((r >> 24) % 8 + 1) * 4096;
                            let at = (sector / 4096 * 4096).min(size - len);
                            match r % 16 {
                                0 => vol.discard(at, len).unwrap(),
                                1 => vol.write_zeroes(at, len).unwrap(),
                                2 => vol.write_bytes(sector, &pattern(n, 512)).unwrap(),
                                3 => vol.flush().unwrap(),
                                _ => vol.write(at, &pattern(n, len as usize)).unwrap(),
                            }
                        }
                    });
                }
                let _stop = StopOnDrop(&stop);
                for i in 0..60 {
                    match next() % 9 {
                        0..=2 => {
                            let name = format!("c{i}");
                            store.checkpoint("v", &name).unwrap();
                            ckpts.push(name);
                        }
                        3 if ckpts.len() > 2 => {
                            let at = (next() % ckpts.len() as u64) as usize;
                            store.delete_checkpoint("v", &ckpts.remove(at)).unwrap();
                        }
                        4 if !ckpts.is_empty() => {
                            let c = &ckpts[(next() % ckpts.len() as u64) as usize];
                            store.restore("v", c).unwrap();
                        }
                        5 if !ckpts.is_empty() => {
                            let c = &ckpts[(next() % ckpts.len() as u64) as usize];
                            store.fork("v", c, "f", false).unwrap();
                            let f = store.open_volume("f").unwrap();
                            f.write(4096 * (next() % 64), &pattern(i, 4096)).unwrap();
                            drop(f);
                            if next() % 2 == 0 {
                                store.checkpoint("f", "fc").unwrap();
                            }
                            store.delete_volume("f").unwrap();
                        }
                        6 => {
                            store.defragment("v", 4 << 20).unwrap();
                        }
                        7 => {
                            // Under live writes: their dirty chunks count from the map.
                            let r = store.check().unwrap();
                            assert!(r.is_clean(), "lz4={lz4}, writers running: {r:#?}");
                            live_checks += 1;
                            live_dirty += r.dirty_chunks;
                        }
                        _ => store.flush().unwrap(),
                    }
                }
            });
            assert!(live_checks > 0, "lz4={lz4}: no check ran under the writers");
            eprintln!(
                "lz4={lz4}: {live_checks} checks under the writers saw {live_dirty} dirty chunks"
            );
            let report = store.check().unwrap();
            assert!(report.is_clean(), "lz4={lz4}: {report:#?}");
            let names: Vec<String> = std::iter::once("v".to_string()).chain(ckpts).collect();
            let kept = read_layers(&store, &names, size);
            store.flush().unwrap();
            kept
        };
        assert_layers_survive_reopen(dir.path(), size, &kept, &format!("lz4={lz4}"));
    }
}

#[test]
fn many_volumes_open_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), engines().remove(1).1);
    let vols: Vec<_> = (0..32)
        .map(|i| {
            store
                .create_volume(&format!("v{i}"), 64 * BS as u64, VolumeOptions::default())
                .unwrap();
            store.open_volume(&format!("v{i}")).unwrap()
        })
        .collect();
    std::thread::scope(|s| {
        for (i, v) in vols.iter().enumerate() {
            s.spawn(move || v.write(0, &pattern(i as u64, 8 * BS)).unwrap());
        }
    });
    for (i, v) in vols.iter().enumerate() {
        let mut buf = vec![0u8; 8 * BS];
        v.read(0, &mut buf).unwrap();
        assert_eq!(buf, pattern(i as u64, 8 * BS));
    }
}
