#![allow(dead_code, clippy::unwrap_used, clippy::needless_range_loop)]
//! Helpers shared by the engine's integration tests.

use std::sync::Arc;
use strata_engine::io::{IoEngine, SyncEngine, UringEngine};
use strata_engine::{Store, StoreOptions};

/// Both production engines, so every scenario runs against each.
pub fn engines() -> Vec<(&'static str, Arc<dyn IoEngine>)> {
    vec![
        ("sync", Arc::new(SyncEngine::new())),
        ("io_uring", Arc::new(UringEngine::new())),
    ]
}

pub fn options(engine: Arc<dyn IoEngine>) -> StoreOptions {
    StoreOptions {
        create: true,
        engine: Some(engine),
        segment_bytes: 1 << 20,
        commit_interval: None,
        // Every flush commits (the journal-only flush is exercised by power_loss.rs).
        dead_commit_bytes: 0,
        ..StoreOptions::default()
    }
}

pub fn open(dir: &std::path::Path, engine: Arc<dyn IoEngine>) -> Store {
    Store::open(dir, options(engine)).unwrap()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Disk usage of a directory tree in bytes, as `du` counts it (allocated blocks).
pub fn du(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for ent in std::fs::read_dir(path).unwrap().flatten() {
        let md = ent.metadata().unwrap();
        total += md.blocks() * 512;
        if md.is_dir() {
            total += du(&ent.path());
        }
    }
    total
}
