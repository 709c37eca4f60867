//! How fast a push may upload: the `--push-rate` ceiling, and below it a rate that backs
//! off while the store's guests see their IO slow down (docs/design/protection.md, "Push
//! budget").
//!
//! A push on the guests' own host competes with them for CPU (reading and packing records,
//! the S3 client, and a remote on the same machine) and for the network. The governor
//! watches the mean latency of each kind of guest request the frontends serve (reads,
//! writes, flushes...: every volume's [`strata_engine::qos::IoStats`]), in windows of
//! [`WINDOW`]: a window in which some kind's mean is well above what that kind's means
//! were in the last [`BASELINE`] (their lower quartile: the guests' latency when nothing
//! disturbs them, not their luckiest window) halves the rate, any other window raises it
//! by [`STEP`] — additive increase, multiplicative decrease, as TCP backs off from a
//! congested link. A window also counts as disturbed when the host's CPUs were contended
//! (some runnable task waiting, `/proc/pressure/cpu`) for [`STALL_MARGIN`] more of it than
//! usual while guests sent requests: a guest waiting for a CPU before it sends its next
//! request slows down without any request taking longer in the daemon. Kinds with too few
//! requests in a window to measure are left out, and a
//! window with none doubles the rate: idle guests leave a push its full speed. A push that
//! starts after a quiet spell (or the first one) looks for [`PROBE`] whether the guests
//! send requests: if they do, it starts at [`START`], so that the governor sees their
//! undisturbed latency before it pushes hard; if not, at full speed. When guests wake up
//! during a push, the rate drops to [`START`] at once instead of halving its way down. The
//! rate never drops below [`FLOOR`], so protection always moves. While paced with busy
//! guests, a push cuts smaller packs ([`Governor::pack_bytes`]), so that what it hands the
//! remote follows the rate instead of coming in 16 MiB bursts.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use strata_engine::qos::{IoLoad, GUEST_OPS};

/// Length of one measurement window.
pub const WINDOW: Duration = Duration::from_millis(100);
/// How long a push that starts after a quiet spell looks for guest requests first.
pub const PROBE: Duration = Duration::from_millis(10);
/// How far back the undisturbed latency is looked for.
pub const BASELINE: Duration = Duration::from_secs(30);
/// Fewer requests of a kind than this in a window: that kind is not measured in it.
pub const MIN_OPS: u64 = 16;
/// Bytes per second a push starts at after a quiet spell if the guests are busy, and what
/// the rate drops to when they wake up.
pub const START: u64 = 16 << 20;
/// Added to the rate after each undisturbed window.
pub const STEP: u64 = 4 << 20;
/// The rate never goes below this.
pub const FLOOR: u64 = 2 << 20;
/// At or above this (with no ceiling) a push is not paced at all.
pub const UNPACED: u64 = 1 << 30;

/// How much more of a window than usual (its share of the window, 0..1) the host's CPUs
/// may have had a runnable task waiting (`/proc/pressure/cpu`, "some") before the window
/// counts as disturbed: the queueing for CPU that the guests' request latency, measured
/// inside the daemon, does not see.
pub const STALL_MARGIN: f64 = 0.2;

/// What a push samples at the end of each window: the guests' request counters and the
/// host's CPU pressure.
#[derive(Clone, Copy, Debug, Default)]
pub struct Load {
    pub io: IoLoad,
    /// Microseconds in which some runnable task waited for a CPU, since boot (the "some"
    /// total of `/proc/pressure/cpu`); `None` on a kernel without pressure stall
    /// information.
    pub cpu_stall_us: Option<u64>,
}

impl Load {
    /// `io` with the host's CPU pressure now.
    pub fn now(io: IoLoad) -> Load {
        Load {
            io,
            cpu_stall_us: cpu_stall_us(),
        }
    }
}

/// The "some" total of `/proc/pressure/cpu` (µs), if the kernel has it.
pub fn cpu_stall_us() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    text.lines()
        .find(|l| l.starts_with("some "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

/// Whether a window's mean latency (µs) of one kind of request shows the guests disturbed,
/// against that kind's recent undisturbed mean: 1.5 times it, and 10 µs more (a few µs of
/// scheduling noise on a 10 µs write is no disturbance).
pub fn disturbed(mean_us: f64, baseline_us: f64) -> bool {
    mean_us > baseline_us * 1.5 + 10.0
}

type Means = [Option<f64>; GUEST_OPS];

#[derive(Debug)]
struct State {
    /// Bytes per second now.
    rate: u64,
    /// When the last window began, and the counters then.
    since: Option<(Instant, Load)>,
    /// Mean latency per kind of each window in the last [`BASELINE`], oldest first, and
    /// the share of the window the host's CPUs were contended (windows with busy guests).
    means: VecDeque<(Instant, Means, Option<f64>)>,
    /// Windows that halved the rate, since the daemon started (for /metrics).
    backoffs: u64,
    /// The last window measured some guest requests.
    busy: bool,
}

#[derive(Debug)]
pub struct Governor {
    /// `--push-rate`: never faster than this (bytes per second).
    ceiling: Option<u64>,
    /// Off (`--no-push-yield`): pushes go at the ceiling, whatever the guests see.
    adaptive: bool,
    state: Mutex<State>,
}

impl Governor {
    pub fn new(ceiling: Option<u64>, adaptive: bool) -> Governor {
        Governor {
            ceiling: ceiling.filter(|r| *r > 0),
            adaptive,
            state: Mutex::new(State {
                rate: START,
                since: None,
                means: VecDeque::new(),
                backoffs: 0,
                busy: false,
            }),
        }
    }

    fn cap(&self) -> u64 {
        self.ceiling.unwrap_or(UNPACED)
    }

    /// The rate `st` allows (`None`: unpaced).
    fn allowed(&self, st: &State) -> Option<u64> {
        if !self.adaptive {
            return self.ceiling;
        }
        let rate = st.rate.min(self.cap());
        (self.ceiling.is_some() || rate < UNPACED).then_some(rate)
    }

    /// The rate a push may go at now, after folding in the window that ended (if one did);
    /// `None`: unpaced. `load` reads the guests' counters.
    pub fn rate(&self, load: impl Fn() -> Load) -> Option<u64> {
        if !self.adaptive {
            return self.ceiling;
        }
        let now = Instant::now();
        let mut st = self.state.lock();
        match st.since {
            Some((t, _)) if now.duration_since(t) <= BASELINE => {}
            _ => {
                // The first push, or the first after a quiet spell: whether the guests send
                // requests right now decides how it starts (at START with busy guests, at
                // the ceiling with idle ones).
                let before = load();
                std::thread::sleep(PROBE);
                let after = load();
                st.means.clear();
                st.busy = after.io.ops.iter().sum::<u64>() > before.io.ops.iter().sum::<u64>();
                st.rate = if st.busy { START } else { UNPACED }.min(self.cap());
                st.since = Some((Instant::now(), after));
            }
        }
        match st.since {
            Some((t, prev)) if now.duration_since(t) >= WINDOW => {
                let cur = load();
                st.since = Some((now, cur));
                let mut means: Means = [None; GUEST_OPS];
                for (k, m) in means.iter_mut().enumerate() {
                    let ops = cur.io.ops[k].saturating_sub(prev.io.ops[k]);
                    if ops >= MIN_OPS {
                        let us = cur.io.latency_us[k].saturating_sub(prev.io.latency_us[k]);
                        *m = Some(us as f64 / ops as f64);
                    }
                }
                let busy = means.iter().any(Option::is_some);
                // Contention only matters while guests run: an idle host's pressure is the
                // push's own threads and the remote's.
                let stall = match (busy, cur.cpu_stall_us, prev.cpu_stall_us) {
                    (true, Some(c), Some(p)) => {
                        let window_us = now.duration_since(t).as_micros().max(1) as f64;
                        Some((c.saturating_sub(p) as f64 / window_us).min(1.0))
                    }
                    _ => None,
                };
                while st
                    .means
                    .front()
                    .is_some_and(|(at, _, _)| now.duration_since(*at) > BASELINE)
                {
                    st.means.pop_front();
                }
                st.means.push_back((now, means, stall));
                let slower = means.iter().enumerate().any(|(k, m)| {
                    m.is_some_and(|mean| {
                        disturbed(mean, lower_quartile(st.means.iter().filter_map(|w| w.1[k])))
                    })
                });
                let contended = stall.is_some_and(|f| {
                    f > lower_quartile(st.means.iter().filter_map(|w| w.2)) + STALL_MARGIN
                });
                let worse = slower || contended;
                let was_busy = std::mem::replace(&mut st.busy, busy);
                if st.busy && !was_busy {
                    // The guests woke up after an idle spell in which the rate climbed
                    // freely: start again from where a push after a quiet spell does.
                    st.rate = st.rate.min(START);
                }
                st.rate = if worse {
                    st.backoffs += 1;
                    (st.rate / 2).max(FLOOR)
                } else if st.busy {
                    st.rate.saturating_add(STEP).min(self.cap())
                } else {
                    // Nobody to disturb: double.
                    st.rate.saturating_mul(2).min(self.cap())
                };
            }
            _ => {}
        }
        self.allowed(&st)
    }

    /// How large a push should let a pack grow before it hands it to the uploads: `full`
    /// when unpaced or while no guest sends requests, else about a fifth of a second at the
    /// current rate (1 MiB at least).
    pub fn pack_bytes(&self, full: usize) -> usize {
        let st = self.state.lock();
        match self.allowed(&st) {
            Some(rate) if st.busy || !self.adaptive => usize::try_from(rate / 5)
                .unwrap_or(full)
                .clamp(1 << 20, full),
            _ => full,
        }
    }

    /// Bytes per second now (0: unpaced) and the back-offs so far, for /metrics.
    pub fn status(&self) -> (u64, u64) {
        let st = self.state.lock();
        (self.allowed(&st).unwrap_or(0), st.backoffs)
    }
}

/// The lower quartile of `values` (at least one).
fn lower_quartile(values: impl Iterator<Item = f64>) -> f64 {
    let mut seen: Vec<f64> = values.collect();
    seen.sort_by(f64::total_cmp);
    seen.get(seen.len().saturating_sub(1) / 4)
        .copied()
        .unwrap_or(0.0)
}

/// One push's pacing: [`Pacer::pace`] before each `len` bytes it sends.
pub struct Pacer<'a> {
    gov: &'a Governor,
    /// Bytes sent that the rate has not yet paid for.
    debt: f64,
    last: Instant,
}

impl<'a> Pacer<'a> {
    pub fn new(gov: &'a Governor) -> Pacer<'a> {
        Pacer {
            gov,
            debt: 0.0,
            last: Instant::now(),
        }
    }

    /// Waits until the rate allows `len` more bytes (in steps of at most 50 ms, the rate
    /// read again at each), unless `stop` is set.
    pub fn pace(&mut self, len: usize, load: &dyn Fn() -> Load, stop: &AtomicBool) {
        self.debt += len as f64;
        loop {
            let now = Instant::now();
            let rate = self.gov.rate(load);
            let Some(rate) = rate else {
                self.debt = 0.0;
                self.last = now;
                return;
            };
            self.debt =
                (self.debt - now.duration_since(self.last).as_secs_f64() * rate as f64).max(0.0);
            self.last = now;
            if self.debt <= 0.0 || stop.load(Ordering::Relaxed) {
                return;
            }
            let wait = (self.debt / rate as f64).min(0.05);
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(ops: u64, latency_us: u64) -> Load {
        Load {
            io: IoLoad {
                ops: [0, ops, 0, 0, 0],
                latency_us: [0, latency_us, 0, 0, 0],
            },
            cpu_stall_us: None,
        }
    }

    /// Feeds one window of `ops` writes of `us` µs each, `WINDOW` after the last.
    fn window(g: &Governor, total: &mut Load, ops: u64, us: u64) -> Option<u64> {
        window_of(g, total, 1, ops, us)
    }

    fn window_of(g: &Governor, total: &mut Load, kind: usize, ops: u64, us: u64) -> Option<u64> {
        {
            let mut st = g.state.lock();
            if let Some((t, _)) = st.since.as_mut() {
                *t -= WINDOW;
            }
        }
        total.io.ops[kind] += ops;
        total.io.latency_us[kind] += ops * us;
        let t = *total;
        g.rate(|| t)
    }

    /// Counters that show one more guest request at each look (a push's start probe sees
    /// busy guests), with the CPU pressure `stall`.
    fn busy_probe(stall: Option<u64>) -> impl Fn() -> Load {
        let calls = std::cell::Cell::new(0u64);
        move || {
            calls.set(calls.get() + 1);
            let mut l = load(calls.get() - 1, 0);
            l.cpu_stall_us = stall;
            l
        }
    }

    /// [`window`] in which the host's CPUs were contended for `stalled` of the window.
    fn window_stalled(g: &Governor, total: &mut Load, ops: u64, stalled: f64) -> Option<u64> {
        let us = WINDOW.as_micros() as f64 * stalled;
        total.cpu_stall_us = total.cpu_stall_us.map(|s| s + us as u64);
        window(g, total, ops, 20)
    }

    #[test]
    fn backs_off_while_the_hosts_cpus_are_contended() {
        let g = Governor::new(None, true);
        // Busy guests from the start (a request while the push probes).
        assert_eq!(g.rate(busy_probe(Some(1_000_000))), Some(START));
        let mut total = load(1, 0);
        total.cpu_stall_us = Some(1_000_000);
        // CPUs contended 5% of the time, as usual: the rate climbs.
        for i in 1..=4u64 {
            assert_eq!(
                window_stalled(&g, &mut total, 1000, 0.05),
                Some(START + i * STEP)
            );
        }
        // Contended 40% of a window, at unchanged request latency: the push halves.
        let r = START + 4 * STEP;
        assert_eq!(window_stalled(&g, &mut total, 1000, 0.4), Some(r / 2));
        // 20% (within the margin over the usual 5%): undisturbed.
        let r = r / 2 + STEP;
        assert_eq!(window_stalled(&g, &mut total, 1000, 0.2), Some(r));
        // Idle guests: contention is the push's own (and the remote's), no reason to slow
        // down.
        assert_eq!(window_stalled(&g, &mut total, 0, 0.9), Some(2 * r));
        // A kernel without pressure information: latency alone decides (guests waking up
        // after the idle window: START, then the climb).
        total.cpu_stall_us = None;
        assert_eq!(
            window_stalled(&g, &mut total, 1000, 0.9),
            Some(START.min(2 * r) + STEP)
        );
        assert!(
            cpu_stall_us().is_some() || !std::path::Path::new("/proc/pressure/cpu").exists(),
            "/proc/pressure/cpu exists but was not read"
        );
    }

    #[test]
    fn backs_off_while_guests_slow_down_and_recovers_after() {
        let g = Governor::new(None, true);
        // A guest sends a request while the first push looks: it starts carefully.
        assert_eq!(
            g.rate(busy_probe(None)),
            Some(START),
            "busy guests: a push starts carefully"
        );
        let mut total = load(1, 0);
        // Undisturbed guests (20 µs): the rate climbs by STEP per window.
        for i in 1..=4u64 {
            assert_eq!(window(&g, &mut total, 1000, 20), Some(START + i * STEP));
        }
        // The guests' requests take 200 µs now: the rate halves per window, to the floor.
        let before = START + 4 * STEP;
        assert_eq!(window(&g, &mut total, 1000, 200), Some(before / 2));
        assert_eq!(window(&g, &mut total, 1000, 200), Some(before / 4));
        for _ in 0..10 {
            window(&g, &mut total, 1000, 200);
        }
        assert_eq!(g.rate(|| total), Some(FLOOR));
        assert_eq!(g.status().1, 12);
        // Back to 35 µs (within 1.5x + 10 µs of 20): it climbs again.
        assert_eq!(window(&g, &mut total, 1000, 35), Some(FLOOR + STEP));
        // An idle guest (too few requests to measure) is no reason to slow down: the rate
        // doubles, and packs are full size.
        assert_eq!(window(&g, &mut total, 3, 5000), Some(2 * (FLOOR + STEP)));
        assert_eq!(g.pack_bytes(16 << 20), 16 << 20);
        // Kinds are judged apart: flushes at their usual 500 µs beside 20 µs writes are
        // undisturbed; flushes at 2 ms are not, whatever the writes do.
        let r = 2 * (FLOOR + STEP);
        assert!(r < START);
        assert_eq!(window_of(&g, &mut total, 2, 100, 500), Some(r + STEP));
        assert_eq!(window_of(&g, &mut total, 2, 100, 600), Some(r + 2 * STEP));
        assert_eq!(
            window_of(&g, &mut total, 2, 100, 2000),
            Some((r + 2 * STEP) / 2)
        );
        assert_eq!(
            g.pack_bytes(16 << 20) as u64,
            (r + 2 * STEP) / 2 / 5,
            "paced: packs of a fifth of a second"
        );
        // A slowdown that lasts whatever the push does becomes the guests' usual latency
        // once it fills most of the recent windows: the push climbs again.
        let low = (r + 2 * STEP) / 2;
        let mut rates = Vec::new();
        for _ in 0..8 {
            rates.push(window_of(&g, &mut total, 2, 100, 2000).unwrap_or(0));
        }
        assert!(rates[0] < low, "{rates:?}");
        assert!(rates[7] > rates[6], "{rates:?}");
        let g = Governor::new(Some(2 << 20), false);
        assert_eq!(g.pack_bytes(16 << 20), 1 << 20, "1 MiB packs at least");
    }

    #[test]
    fn an_idle_store_reaches_unpaced_and_a_ceiling_holds() {
        let g = Governor::new(None, true);
        let mut total = load(0, 0);
        assert_eq!(g.rate(|| total), None, "idle guests: a push starts unpaced");
        let mut last = Some(START);
        for _ in 0..6 {
            last = window(&g, &mut total, 0, 0);
        }
        assert_eq!(last, None, "idle guests: unpaced within a second");
        assert_eq!(g.status().0, 0);
        assert_eq!(g.pack_bytes(16 << 20), 16 << 20);

        let g = Governor::new(Some(50 << 20), true);
        let mut total = load(0, 0);
        g.rate(|| total);
        for _ in 0..200 {
            last = window(&g, &mut total, 0, 0);
        }
        assert_eq!(last, Some(50 << 20), "the ceiling caps the climb");
        assert_eq!(g.pack_bytes(16 << 20), 16 << 20, "idle guests: full packs");
        // Guests wake up: back to START, then the usual climb and halving.
        assert_eq!(window(&g, &mut total, 1000, 20), Some(START + STEP));
        assert_eq!(g.pack_bytes(16 << 20) as u64, (START + STEP) / 5);
        assert_eq!(window(&g, &mut total, 1000, 500), Some((START + STEP) / 2));

        let g = Governor::new(Some(40 << 20), false);
        assert_eq!(
            g.rate(|| panic!("not adaptive: no need to look")),
            Some(40 << 20)
        );
        let g = Governor::new(None, false);
        assert_eq!(g.rate(|| panic!("not adaptive: no need to look")), None);
    }

    #[test]
    fn pacing_holds_the_rate() {
        let g = Governor::new(Some(8 << 20), false);
        let mut p = Pacer::new(&g);
        let stop = AtomicBool::new(false);
        let t = Instant::now();
        for _ in 0..4 {
            p.pace(1 << 20, &|| load(0, 0), &stop);
        }
        let took = t.elapsed();
        // 4 MiB at 8 MiB/s: half a second (sleeps only ever overshoot).
        assert!(took >= Duration::from_millis(490), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
}
