#![allow(clippy::unwrap_used, clippy::needless_range_loop)]
//! Scenario: an IO error in the middle of work. The Nth data/journal write, or the Nth sync,
//! fails once. The failing call returns a clean error, every later write and flush is refused
//! (the store is poisoned until reopened), and after reopening every write acknowledged
//! before the failure reads back; the failed write reads old or new. Also: a corrupted byte in
//! a data file is reported as a checksum error naming the volume and offset, never returned as
//! data, and a store written by another format version is refused.

mod common;
use common::*;
use std::sync::Arc;
use strata_engine::io::{FaultEngine, FaultPlan, SyncEngine};
use strata_engine::{Error, Store, StoreOptions, VolumeOptions};

const BS: usize = 4096;

fn opts(engine: Arc<dyn strata_engine::io::IoEngine>) -> StoreOptions {
    StoreOptions {
        create: true,
        engine: Some(engine),
        segment_bytes: 1 << 20,
        commit_interval: None,
        ..StoreOptions::default()
    }
}

fn run_with_failure(kind: &'static str, fail_at: u64) {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path(), opts(Arc::new(SyncEngine::new()))).unwrap();
        s.create_volume("v", 64 * BS as u64, VolumeOptions::default())
            .unwrap();
    }
    let plan = FaultPlan {
        fail_at: Some(fail_at),
        fail_kind: Some(kind),
        ..Default::default()
    };
    let engine = Arc::new(FaultEngine::new(FaultPlan::default()));
    let store = Store::open(dir.path(), opts(engine.clone())).unwrap();
    let vol = store.open_volume("v").unwrap();
    // Counted from here: the Nth operation of the writes below fails.
    engine.arm(plan);
    let mut acked: Vec<Option<Vec<u8>>> = vec![None; 64];
    let mut failed = None;
    for i in 0..64usize {
        let data = pattern(i as u64 + 1, BS);
        let r = if i % 5 == 4 {
            vol.flush()
        } else {
            vol.write((i * BS) as u64, &data)
        };
        match r {
            Ok(()) if i % 5 != 4 => acked[i] = Some(data),
            Ok(()) => {}
            Err(e) => {
                assert!(
                    matches!(e, Error::Io { .. }),
                    "{kind}#{fail_at}: first failure should be the IO error, got {e}"
                );
                failed = Some((i, data));
                break;
            }
        }
    }
    let (i, data) = failed.unwrap_or_else(|| panic!("{kind}#{fail_at}: no operation failed"));
    assert!(
        matches!(vol.write(0, &[1; BS]), Err(Error::Poisoned)),
        "writes must be refused after a failure"
    );
    assert!(matches!(vol.flush(), Err(Error::Poisoned)));
    assert!(matches!(store.checkpoint("v", "c"), Err(Error::Poisoned)));
    // Acknowledged data still reads while poisoned.
    for (b, want) in acked.iter().enumerate() {
        if let Some(want) = want {
            let mut buf = vec![0u8; BS];
            vol.read((b * BS) as u64, &mut buf).unwrap();
            assert!(&buf == want);
        }
    }
    drop(vol);
    drop(store);
    let store = Store::open(dir.path(), opts(Arc::new(SyncEngine::new()))).unwrap();
    let vol = store.open_volume("v").unwrap();
    for (b, want) in acked.iter().enumerate() {
        let mut buf = vec![0u8; BS];
        vol.read((b * BS) as u64, &mut buf).unwrap();
        match want {
            Some(w) => assert!(&buf == w, "{kind}#{fail_at}: acknowledged block {b} lost"),
            None if b == i => assert!(
                buf == data || buf.iter().all(|&x| x == 0),
                "failed write is neither old nor new"
            ),
            None => assert!(buf.iter().all(|&x| x == 0)),
        }
    }
    vol.write(0, &[3; BS]).unwrap();
    vol.flush().unwrap();
}

#[test]
fn failed_writes_poison_and_lose_nothing() {
    for n in [0, 1, 2, 5, 9, 20, 31] {
        run_with_failure("write", n);
    }
}

#[test]
fn failed_syncs_poison_and_lose_nothing() {
    for n in [0, 1, 3] {
        run_with_failure("sync", n);
    }
}

#[test]
fn corrupt_data_is_a_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = open(dir.path(), Arc::new(SyncEngine::new()));
        s.create_volume("v", 16 * BS as u64, VolumeOptions::default())
            .unwrap();
        let v = s.open_volume("v").unwrap();
        v.write(3 * BS as u64, &pattern(7, BS)).unwrap();
        v.write(5 * BS as u64, &pattern(8, BS)).unwrap();
        v.flush().unwrap();
    }
    // Flip one byte of the first record in the first data segment (its first data page
    // follows the header and a one-page checksum table), as the media would: the page cache
    // is dropped so the next read comes from the disk.
    let mut segs: Vec<_> = std::fs::read_dir(dir.path().join("data"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    segs.sort();
    corrupt_on_media(&segs[0], 2 * 4096 + 100);
    let s = open(dir.path(), Arc::new(SyncEngine::new()));
    let v = s.open_volume("v").unwrap();
    let mut buf = vec![0u8; BS];
    match v.read(3 * BS as u64, &mut buf) {
        Err(Error::Checksum { volume, offset }) => {
            assert_eq!(volume, "v");
            assert_eq!(offset, 3 * BS as u64);
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
    v.read(5 * BS as u64, &mut buf).unwrap();
    assert_eq!(buf, pattern(8, BS));
    let report = s.scrub().unwrap();
    assert_eq!(report.records, 2);
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.problems[0].offset, 3 * BS as u64);
}

#[test]
fn other_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path(), Arc::new(SyncEngine::new())));
    {
        let mut o = rocksdb::Options::default();
        o.create_if_missing(false);
        let cfs = ["meta", "volumes", "checkpoints", "layers", "extents"];
        let db = rocksdb::DB::open_cf(&o, dir.path().join("meta"), cfs).unwrap();
        let meta = db.cf_handle("meta").unwrap();
        let mut v = db.get_cf(meta, b"format").unwrap().unwrap();
        // Version 99 with a valid checksum: a store from a future release.
        v[8..12].copy_from_slice(&99u32.to_be_bytes());
        let crc = crc32fast::hash(&v[..12]);
        v[12..16].copy_from_slice(&crc.to_be_bytes());
        db.put_cf(meta, b"format", v).unwrap();
        // And a damaged state record is reported too, on a second copy below.
    }
    match Store::open(dir.path(), opts(Arc::new(SyncEngine::new()))) {
        Err(Error::FormatVersion {
            found: 99,
            expected: 2,
        }) => {}
        other => panic!("expected a format version error, got {other:?}"),
    }
}

/// Flips one byte of `path` at `offset` behind the page cache's back: written, synced, and
/// evicted, so that the next read of it comes from the disk, as after media damage.
fn corrupt_on_media(path: &std::path::Path, offset: u64) {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
    // SAFETY: posix_fadvise on an open fd with plain integers.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}
