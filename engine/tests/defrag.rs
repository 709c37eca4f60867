#![allow(clippy::unwrap_used, clippy::needless_range_loop)]
//! Scenario: the defragmenter. Random 4 KiB overwrites scatter a sequentially written
//! volume; sequential reads then queue rewrites of the fragmented ranges they meet, and a
//! background thread stores each as one record. Proves, on both IO engines: the rewrites
//! happen (extents drop, sequential reads need few IOs again) and change no byte of the
//! volume or of the checkpoints that share its old records, before and after a reopen, with
//! a clean scrub; a rewrite never undoes a write made while it was queued (a writer races
//! the readers and every block ends as its last write); a fork reading its golden image
//! rewrites nothing (forks keep sharing the golden's records); an explicit
//! `Store::defragment` pass does the same work without reads.

mod common;
use common::*;
use std::time::Duration;
use strata_engine::{Store, VolumeOptions};

const BS: usize = 4096;
const MIB: usize = 1 << 20;
/// 8 MiB: eight chunks of 1024 blocks.
const SIZE: usize = 8 * MIB;

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A volume filled sequentially, then aged by `writes` random 4 KiB overwrites, with a
/// checkpoint `aged` at the end; returns its content.
fn aged(store: &Store, name: &str, writes: usize) -> Vec<u8> {
    store
        .create_volume(name, SIZE as u64, VolumeOptions::default())
        .unwrap();
    let vol = store.open_volume(name).unwrap();
    let mut content = pattern(1, SIZE);
    for (i, mib) in content.chunks(MIB).enumerate() {
        vol.write((i * MIB) as u64, mib).unwrap();
    }
    let mut r = Rng(7);
    for i in 0..writes {
        let b = r.below((SIZE / BS) as u64) as usize;
        let data = pattern(100 + i as u64, BS);
        vol.write((b * BS) as u64, &data).unwrap();
        content[b * BS..(b + 1) * BS].copy_from_slice(&data);
    }
    vol.flush().unwrap();
    store.checkpoint(name, "aged").unwrap();
    content
}

fn read_all(store: &Store, name: &str) -> Vec<u8> {
    let vol = store.open_volume(name).unwrap();
    let mut out = vec![0u8; SIZE];
    for (i, mib) in out.chunks_mut(MIB).enumerate() {
        vol.read((i * MIB) as u64, mib).unwrap();
    }
    out
}

fn read_checkpoint(store: &Store, name: &str) -> Vec<u8> {
    let snap = store.open_checkpoint(name, "aged").unwrap();
    let mut out = vec![0u8; SIZE];
    snap.read(0, &mut out).unwrap();
    out
}

#[test]
fn reads_defragment_what_they_find_scattered_and_change_no_byte() {
    for (engine_name, engine) in engines() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), engine.clone());
        let content = aged(&store, "v", 1500);
        let vol = store.open_volume("v").unwrap();
        let before = vol.extent_count();
        assert!(before > 1000, "{engine_name}: aging left {before} extents");
        // Sequential passes until the rewrites stop (each pass queues what it finds).
        for _ in 0..5 {
            assert!(
                read_all(&store, "v") == content,
                "{engine_name}: read while defragmenting"
            );
            store.wait_defrag_idle(Duration::from_secs(30));
        }
        let stats = store.defrag_stats();
        let after = vol.extent_count();
        assert!(stats.ranges >= 8, "{engine_name}: {stats:?}");
        assert!(
            after * 10 < before,
            "{engine_name}: {before} extents before, {after} after: {stats:?}"
        );
        assert!(
            read_all(&store, "v") == content,
            "{engine_name}: volume changed"
        );
        assert!(
            read_checkpoint(&store, "v") == content,
            "{engine_name}: the checkpoint sharing the old records changed"
        );
        drop(vol);
        store.flush().unwrap();
        drop(store);
        let store = open(dir.path(), engine);
        assert!(
            read_all(&store, "v") == content,
            "{engine_name}: after reopen"
        );
        assert!(
            read_checkpoint(&store, "v") == content,
            "{engine_name}: checkpoint after reopen"
        );
        let scrub = store.scrub().unwrap();
        assert!(
            scrub.problems.is_empty(),
            "{engine_name}: {:?}",
            scrub.problems
        );
    }
}

#[test]
fn a_rewrite_never_undoes_a_write_made_while_it_was_queued() {
    for (engine_name, engine) in engines() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), engine);
        let mut content = aged(&store, "v", 1500);
        let vol = store.open_volume("v").unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let written = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut buf = vec![0u8; MIB];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for i in 0..SIZE / MIB {
                        vol.read((i * MIB) as u64, &mut buf).unwrap();
                    }
                }
            });
            let mut r = Rng(99);
            let mut written = Vec::new();
            for i in 0..3000u64 {
                let b = r.below((SIZE / BS) as u64) as usize;
                let data = pattern(10_000 + i, BS);
                vol.write((b * BS) as u64, &data).unwrap();
                written.push((b, data));
                if i % 256 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            reader.join().unwrap();
            written
        });
        store.wait_defrag_idle(Duration::from_secs(30));
        for (b, data) in written {
            content[b * BS..(b + 1) * BS].copy_from_slice(&data);
        }
        let got = read_all(&store, "v");
        for b in 0..SIZE / BS {
            assert!(
                got[b * BS..(b + 1) * BS] == content[b * BS..(b + 1) * BS],
                "{engine_name}: block {b} lost its last write ({:?})",
                store.defrag_stats()
            );
        }
        assert!(
            store.defrag_stats().ranges > 0,
            "{engine_name}: nothing was rewritten"
        );
    }
}

#[test]
fn a_fork_reading_its_golden_image_rewrites_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), engines().remove(1).1);
    let content = aged(&store, "golden", 1500);
    store.fork("golden", "aged", "sandbox", false).unwrap();
    let live_before = store.stats().live_bytes;
    for _ in 0..3 {
        assert!(read_all(&store, "sandbox") == content);
        store.wait_defrag_idle(Duration::from_secs(30));
    }
    assert_eq!(
        store.defrag_stats().ranges,
        0,
        "a fork rewrote its golden's ranges"
    );
    assert_eq!(
        store.stats().live_bytes,
        live_before,
        "the fork stopped sharing"
    );
}

#[test]
fn an_explicit_pass_defragments_without_reads() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), engines().remove(0).1);
    let content = aged(&store, "v", 1500);
    let before = store.open_volume("v").unwrap().extent_count();
    let report = store.defragment("v", u64::MAX).unwrap();
    let after = store.open_volume("v").unwrap().extent_count();
    assert_eq!(report.ranges, (SIZE / BS / 1024) as u64, "{report:?}");
    assert!(after * 10 < before, "{before} -> {after}");
    assert!(read_all(&store, "v") == content);
    assert!(read_checkpoint(&store, "v") == content);
    // Nothing fragmented is left: a second pass rewrites nothing.
    assert_eq!(store.defragment("v", u64::MAX).unwrap().ranges, 0);
    assert!(matches!(
        store.defragment("nope", u64::MAX),
        Err(strata_engine::Error::NoSuchVolume(_))
    ));
}
