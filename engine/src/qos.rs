//! Per-volume IO statistics and QoS limits: one mechanism under every frontend.
//!
//! Each volume has one [`VolumeIo`], shared by every handle and export of it: the counters
//! and latency histogram the metrics endpoint reports, and the volume's limits. Limits are
//! token buckets, as QEMU's throttle groups and Firecracker's rate limiters are: IOPS and
//! bytes per second, reads and writes separately, each with a burst (the bucket's size, in
//! seconds of its rate). A frontend asks [`Qos::admit`] before it serves a request and waits
//! the time it answers on the volume's own thread, never on a thread other volumes share.
//!
//! A request that finds its bucket empty still takes its tokens (the bucket goes into debt)
//! and waits until the debt is paid: requests are admitted in arrival order at exactly the
//! rate, however large each one is. Flushes are never throttled; discards and write-zeroes
//! count as write operations of zero bytes. Limits live in memory: the daemon keeps them
//! (docs/design/qos.md) and sets them again when it starts.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

/// IO counters and a latency histogram per request kind.
#[derive(Debug, Default)]
pub struct IoStats {
    pub ops: [AtomicU64; 6],
    pub bytes: [AtomicU64; 6],
    pub errors: [AtomicU64; 6],
    /// Requests per latency bucket (not cumulative: the exporter sums them).
    pub latency: [[AtomicU64; LATENCY_BUCKETS_US.len() + 1]; 6],
    pub latency_sum_us: [AtomicU64; 6],
}

impl IoStats {
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

/// The kinds of [`OPS`] a guest sends (all but `other`, the last).
pub const GUEST_OPS: usize = OPS.len() - 1;

/// Requests and their summed latency per guest kind (indexed like [`OPS`]), over volumes
/// (see `Store::io_load`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoLoad {
    pub ops: [u64; GUEST_OPS],
    pub latency_us: [u64; GUEST_OPS],
}

impl IoLoad {
    /// Adds `stats`' guest requests.
    pub fn add(&mut self, stats: &IoStats) {
        for i in 0..GUEST_OPS {
            self.ops[i] += stats.ops[i].load(Ordering::Relaxed);
            self.latency_us[i] += stats.latency_sum_us[i].load(Ordering::Relaxed);
        }
    }
}

/// Which way a request moves data, for limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Read = 0,
    Write = 1,
}

impl Op {
    /// The limits a request of this kind is held to (`None`: not throttled).
    pub fn dir(self) -> Option<Dir> {
        match self {
            Op::Read => Some(Dir::Read),
            Op::Write | Op::Discard | Op::WriteZeroes => Some(Dir::Write),
            Op::Flush | Op::Other => None,
        }
    }
}

/// A volume's limits; 0 means unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QosLimits {
    pub read_iops: u64,
    pub write_iops: u64,
    /// Bytes per second.
    pub read_bps: u64,
    pub write_bps: u64,
    /// Size of each bucket in milliseconds of its rate (0: [`QosLimits::DEFAULT_BURST_MS`]).
    pub burst_ms: u64,
}

impl QosLimits {
    /// A bucket holds this much of its rate unless told otherwise (QEMU's default too).
    pub const DEFAULT_BURST_MS: u64 = 100;

    pub fn is_unlimited(&self) -> bool {
        self.read_iops == 0 && self.write_iops == 0 && self.read_bps == 0 && self.write_bps == 0
    }

    fn burst(&self) -> f64 {
        let ms = if self.burst_ms == 0 {
            Self::DEFAULT_BURST_MS
        } else {
            self.burst_ms
        };
        ms as f64 / 1000.0
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens per second; 0 = no limit.
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, burst: f64, now: Instant) -> Self {
        let rate = rate as f64;
        // At least one whole request's worth fits, whatever the burst.
        let capacity = (rate * burst).max(1.0);
        Bucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// Takes `n` tokens (into debt if need be); returns how long until the debt is paid.
    fn take(&mut self, n: f64, now: Instant) -> f64 {
        if self.rate == 0.0 {
            return 0.0;
        }
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.capacity) - n;
        if self.tokens >= 0.0 {
            0.0
        } else {
            -self.tokens / self.rate
        }
    }
}

/// Token buckets of one volume: IOPS and bytes per second, per direction.
#[derive(Debug)]
pub struct Qos {
    state: Mutex<(QosLimits, [Bucket; 4])>,
    /// Any limit set (read without the lock on every request).
    limited: std::sync::atomic::AtomicBool,
    /// Microseconds requests were held back, and requests held, per [`Dir`].
    throttled_us: [AtomicU64; 2],
    throttled_ops: [AtomicU64; 2],
}

impl Default for Qos {
    fn default() -> Self {
        let now = Instant::now();
        let l = QosLimits::default();
        Qos {
            state: Mutex::new((l, Self::buckets(&l, now))),
            limited: Default::default(),
            throttled_us: Default::default(),
            throttled_ops: Default::default(),
        }
    }
}

impl Qos {
    fn buckets(l: &QosLimits, now: Instant) -> [Bucket; 4] {
        let b = l.burst();
        [
            Bucket::new(l.read_iops, b, now),
            Bucket::new(l.read_bps, b, now),
            Bucket::new(l.write_iops, b, now),
            Bucket::new(l.write_bps, b, now),
        ]
    }

    /// Replaces the limits; buckets start full.
    pub fn set(&self, limits: QosLimits) {
        let mut st = self.state.lock();
        *st = (limits, Self::buckets(&limits, Instant::now()));
        self.limited
            .store(!limits.is_unlimited(), Ordering::Relaxed);
    }

    /// Whether any limit is set: a frontend skips working out a request's size otherwise.
    pub fn is_limited(&self) -> bool {
        self.limited.load(Ordering::Relaxed)
    }

    pub fn limits(&self) -> QosLimits {
        self.state.lock().0
    }

    /// Admits one request of `bytes` in direction `dir`: returns how long the caller must
    /// wait before serving it (zero when within the limits).
    pub fn admit(&self, dir: Dir, bytes: u64) -> Duration {
        if !self.is_limited() {
            return Duration::ZERO;
        }
        let wait = {
            let mut st = self.state.lock();
            if st.0.is_unlimited() {
                return Duration::ZERO;
            }
            let now = Instant::now();
            let i = dir as usize * 2;
            let a = st.1[i].take(1.0, now);
            let b = st.1[i + 1].take(bytes as f64, now);
            a.max(b)
        };
        if wait <= 0.0 {
            return Duration::ZERO;
        }
        let d = Duration::from_secs_f64(wait.min(3600.0));
        self.throttled_us[dir as usize].fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.throttled_ops[dir as usize].fetch_add(1, Ordering::Relaxed);
        d
    }

    /// [`Qos::admit`], then waits on this thread.
    pub fn throttle(&self, dir: Dir, bytes: u64) {
        let d = self.admit(dir, bytes);
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }

    /// Seconds requests of `dir` were held back, and how many were, since the volume was
    /// opened by this process.
    pub fn throttled(&self, dir: Dir) -> (f64, u64) {
        (
            self.throttled_us[dir as usize].load(Ordering::Relaxed) as f64 / 1e6,
            self.throttled_ops[dir as usize].load(Ordering::Relaxed),
        )
    }
}

/// One volume's IO statistics and limits, shared by its handles and exports.
#[derive(Debug, Default)]
pub struct VolumeIo {
    pub stats: IoStats,
    pub qos: Qos,
    pub quota: Quota,
}

/// A volume's quota on allocated bytes: the bytes its live map may map (written and not
/// discarded), shared with checkpoints and other volumes or not, as ZFS's `refquota` counts.
/// A write that would map blocks beyond it fails with [`crate::Error::QuotaExceeded`] (a
/// full disk to the guest); overwriting mapped blocks and discarding always work.
/// docs/design/qos.md, "Quotas".
#[derive(Debug, Default)]
pub struct Quota {
    /// Bytes; 0 = none.
    bytes: AtomicU64,
    /// Writes refused.
    refused: AtomicU64,
}

impl Quota {
    pub fn set(&self, bytes: u64) {
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    /// The quota in bytes, 0 for none.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Writes refused for crossing the quota since the volume was opened by this process.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Whether mapping `growth` more blocks of `block_size` beside the `mapped` ones stays
    /// within the quota; counts a refusal when it does not.
    pub fn admits(&self, mapped: u64, growth: u64, block_size: u32) -> bool {
        let q = self.bytes();
        if q == 0 || growth == 0 {
            return true;
        }
        let ok = (mapped + growth).saturating_mul(u64::from(block_size)) <= q;
        if !ok {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }
}

impl VolumeIo {
    /// Holds a request of kind `op` and `bytes` to the volume's limits (waits on this thread).
    pub fn throttle(&self, op: Op, bytes: u64) {
        if let Some(d) = op.dir() {
            self.qos.throttle(d, bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_admits_its_rate_and_its_burst() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, 0.1, t0);
        // The burst (10 tokens) goes at once; the next request waits 1/rate.
        for _ in 0..10 {
            assert_eq!(b.take(1.0, t0), 0.0);
        }
        let w = b.take(1.0, t0);
        assert!((w - 0.01).abs() < 1e-9, "{w}");
        // Debt accumulates: the 12th waits twice as long.
        let w = b.take(1.0, t0);
        assert!((w - 0.02).abs() < 1e-9, "{w}");
        // A second later the debt is paid and the bucket is full again, never fuller.
        let t1 = t0 + Duration::from_secs(1);
        for _ in 0..10 {
            assert_eq!(b.take(1.0, t1), 0.0);
        }
        assert!(b.take(1.0, t1) > 0.0);
    }

    #[test]
    fn limits_hold_over_a_second_of_requests() {
        let q = Qos::default();
        q.set(QosLimits {
            write_iops: 1000,
            read_bps: 10 << 20,
            ..Default::default()
        });
        // 2000 writes admitted back to back: the last one waits about 2 s less the burst.
        let mut last = Duration::ZERO;
        for _ in 0..2000 {
            last = q.admit(Dir::Write, 4096);
        }
        let want = (2000.0 - 100.0) / 1000.0;
        assert!((last.as_secs_f64() - want).abs() < 0.05, "{last:?}");
        // Reads are held by bytes, not operations: 1 MiB reads at 10 MiB/s.
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = q.admit(Dir::Read, 1 << 20);
        }
        assert!((last.as_secs_f64() - 1.9).abs() < 0.05, "{last:?}");
        // Unlimited again: nothing waits.
        q.set(QosLimits::default());
        assert!(q.admit(Dir::Write, 1 << 30).is_zero());
        assert!(q.throttled(Dir::Write).1 > 1000);
    }
}
