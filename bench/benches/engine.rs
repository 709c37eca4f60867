//! Criterion benchmarks of the engine's O(1) metadata operations and 4 KiB IO on a filled
//! volume. `engine-bench` (src/bin) measures the same at scale and against the plain-file
//! floor; these are the quick, statistically summarised view.

use criterion::{criterion_group, criterion_main, Criterion};
use strata_engine::{Store, StoreOptions, VolumeOptions};

const SIZE: u64 = 256 << 20;
const BS: u64 = 4096;

fn filled() -> (tempfile::TempDir, Store) {
    let dir = tempfile::Builder::new()
        .prefix("strata-crit")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let store = Store::open(dir.path(), StoreOptions::default()).expect("open");
    store
        .create_volume("v", SIZE, VolumeOptions::default())
        .expect("create");
    let vol = store.open_volume("v").expect("open volume");
    let chunk = vec![0x5au8; 1 << 20];
    for off in (0..SIZE).step_by(1 << 20) {
        vol.write(off, &chunk).expect("fill");
    }
    vol.flush().expect("flush");
    (dir, store)
}

fn metadata_ops(c: &mut Criterion) {
    let (_dir, store) = filled();
    let vol = store.open_volume("v").expect("open volume");
    let mut n = 0u64;
    c.bench_function("checkpoint (256 MiB mapped)", |b| {
        b.iter(|| {
            n += 1;
            vol.write((n * 7919 % (SIZE / BS)) * BS, &[1u8; 4096])
                .expect("write");
            store.checkpoint("v", &format!("c{n}")).expect("checkpoint");
        })
    });
    c.bench_function("fork + delete fork", |b| {
        b.iter(|| {
            store.fork("v", "c1", "f", false).expect("fork");
            store.delete_volume("f").expect("delete");
        })
    });
    c.bench_function("restore", |b| {
        b.iter(|| store.restore("v", "c1").expect("restore"))
    });
}

fn io(c: &mut Criterion) {
    let (_dir, store) = filled();
    let vol = store.open_volume("v").expect("open volume");
    let mut x = 1u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % (SIZE / BS)) * BS
    };
    let mut buf = vec![0u8; 4096];
    c.bench_function("4K random read", |b| {
        b.iter(|| vol.read(next(), &mut buf).expect("read"))
    });
    let data = vec![7u8; 4096];
    c.bench_function("4K random write", |b| {
        b.iter(|| vol.write(next(), &data).expect("write"))
    });
}

criterion_group!(benches, metadata_ops, io);
criterion_main!(benches);
