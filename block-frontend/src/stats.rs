//! Per-export IO counters and a latency histogram, read by the daemon's metrics endpoint.
//! Shared by both frontends: the FUSE export counts its operations with [`Op`] too.

use crate::request::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds (the last bucket is unbounded).
pub const LATENCY_BUCKETS_US: [u64; 10] =
    [10, 25, 50, 100, 250, 500, 1_000, 5_000, 10_000, 100_000];

/// Request kinds counted separately.
pub const OPS: [&str; 6] = ["read", "write", "flush", "discard", "write_zeroes", "other"];

/// Index into [`OPS`] and the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read = 0,
    Write = 1,
    Flush = 2,
    Discard = 3,
    WriteZeroes = 4,
    Other = 5,
}

#[derive(Debug, Default)]
pub struct IoStats {
    pub ops: [AtomicU64; 6],
    pub bytes: [AtomicU64; 6],
    pub errors: [AtomicU64; 6],
    /// Cumulative-style buckets are computed at export; these count per bucket.
    pub latency: [[AtomicU64; LATENCY_BUCKETS_US.len() + 1]; 6],
    pub latency_sum_us: [AtomicU64; 6],
}

fn op_of(kind: u32) -> Op {
    match kind {
        VIRTIO_BLK_T_IN => Op::Read,
        VIRTIO_BLK_T_OUT => Op::Write,
        VIRTIO_BLK_T_FLUSH => Op::Flush,
        VIRTIO_BLK_T_DISCARD => Op::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => Op::WriteZeroes,
        _ => Op::Other,
    }
}

impl IoStats {
    /// Counts a virtio-blk request of type `kind`.
    pub fn record(&self, kind: u32, bytes: u64, ok: bool, latency: Duration) {
        self.record_op(op_of(kind), bytes, ok, latency);
    }

    pub fn record_op(&self, op: Op, bytes: u64, ok: bool, latency: Duration) {
        let i = op as usize;
        self.ops[i].fetch_add(1, Ordering::Relaxed);
        self.bytes[i].fetch_add(bytes, Ordering::Relaxed);
        if !ok {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let b = LATENCY_BUCKETS_US
            .iter()
            .position(|&le| us <= le)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[i][b].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us[i].fetch_add(us, Ordering::Relaxed);
    }
}
