//! Reference counts of one segment's pages, kept as maximal runs of equal counts.
//!
//! A page's count is the number of extents, over all layers' own chunks, whose location
//! covers it. A sequentially written segment is one run however many extents point into it;
//! a fragmented one costs one run per fragment. Pages not in the map count zero.
//!
//! While a store is still counting what its committed maps reference (see `load.rs`), counts
//! are deltas against an unknown base: they may go negative, and a run that reaches zero is
//! kept (it was touched) instead of reported dead.
//!
//! A segment fragmented into more than [`DENSE_AT`] runs switches to one count per page
//! (4 bytes a page, less than its runs cost by then): random overwrites and the copy of a
//! fragmented chunk after a checkpoint then change a count in a few nanoseconds instead of a
//! tree operation.

use std::collections::BTreeMap;

/// Maximal runs of pages with equal non-zero counts: `(start, len, count)`, in page order.
pub(crate) type CountRuns = Vec<(u32, u32, i32)>;

/// Runs beyond which a (live) segment's counts become one per page.
const DENSE_AT: usize = 2048;

/// Reference counts of one segment: runs, or one per page once fragmented.
#[derive(Debug)]
pub(crate) enum RefMap {
    Runs(Runs),
    Dense(Dense),
}

impl RefMap {
    /// Counts for a segment of `capacity` pages, all zero.
    pub fn new(capacity: u32) -> Self {
        RefMap::Runs(Runs {
            capacity,
            ..Runs::default()
        })
    }

    pub fn live_pages(&self) -> u64 {
        match self {
            RefMap::Runs(r) => r.live,
            RefMap::Dense(d) => d.live,
        }
    }

    /// See [`Runs::add`].
    pub fn add(
        &mut self,
        start: u32,
        len: u32,
        delta: i32,
        report: bool,
        dead: &mut Vec<(u32, u32)>,
    ) {
        match self {
            RefMap::Runs(r) => {
                r.add(start, len, delta, report, dead);
                if report && r.runs.len() > DENSE_AT && r.capacity > 0 {
                    *self = RefMap::Dense(Dense::from_runs(r));
                }
            }
            RefMap::Dense(d) => d.add(start, len, delta, report, dead),
        }
    }

    #[cfg(test)]
    pub fn count_at(&self, page: u32) -> i32 {
        match self {
            RefMap::Runs(r) => r.count_at(page),
            RefMap::Dense(d) => d.counts.get(page as usize).copied().unwrap_or(0),
        }
    }

    pub fn pages_with_count(&self, start: u32, len: u32, want: i32) -> u32 {
        match self {
            RefMap::Runs(r) => r.pages_with_count(start, len, want),
            RefMap::Dense(d) => {
                let (a, b) = d.clip(start, len);
                let outside = if want == 0 { len - (b - a) as u32 } else { 0 };
                d.counts[a..b].iter().filter(|c| **c == want).count() as u32 + outside
            }
        }
    }

    /// Whether every page of `[start, start + len)` is counted at least once.
    pub fn all_referenced(&self, start: u32, len: u32) -> bool {
        self.all_counted(start, len, 1)
    }

    /// Pages of `[start, start + len)` counted at least once.
    pub fn pages_referenced(&self, start: u32, len: u32) -> u32 {
        match self {
            RefMap::Runs(r) => r.pages_counted(start, len, 1),
            RefMap::Dense(d) => {
                let (a, b) = d.clip(start, len);
                d.counts[a..b].iter().filter(|c| **c >= 1).count() as u32
            }
        }
    }

    /// Whether every page of `[start, start + len)` is counted at least `min` times.
    pub fn all_counted(&self, start: u32, len: u32, min: i32) -> bool {
        match self {
            RefMap::Runs(r) => r.pages_counted(start, len, min) == len,
            RefMap::Dense(d) => {
                let (a, b) = d.clip(start, len);
                b - a == len as usize && d.counts[a..b].iter().all(|c| *c >= min)
            }
        }
    }

    pub fn live_runs(&self) -> Vec<(u32, u32)> {
        match self {
            RefMap::Runs(r) => r.live_runs(),
            RefMap::Dense(d) => d.live_runs(),
        }
    }

    /// Maximal runs of pages with equal non-zero counts, as `(start, len, count)`, in page
    /// order: one representation whichever form the map is in.
    pub fn count_runs(&self) -> CountRuns {
        let pages: Box<dyn Iterator<Item = (u32, u32, i32)> + '_> = match self {
            RefMap::Runs(r) => Box::new(
                r.runs
                    .iter()
                    .filter(|(_, run)| run.count != 0)
                    .map(|(s, run)| (*s, run.len, run.count)),
            ),
            RefMap::Dense(d) => Box::new(
                d.counts
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| **c != 0)
                    .map(|(p, c)| (p as u32, 1, *c)),
            ),
        };
        let mut out: CountRuns = Vec::new();
        for (s, l, c) in pages {
            match out.last_mut() {
                Some((ps, pl, pc)) if *ps + *pl == s && *pc == c => *pl += l,
                _ => out.push((s, l, c)),
            }
        }
        out
    }

    /// See [`Runs::take_unreferenced`]; a per-page map is never counting, so has none.
    pub fn take_unreferenced(&mut self) -> (Vec<(u32, u32)>, u64) {
        match self {
            RefMap::Runs(r) => r.take_unreferenced(),
            RefMap::Dense(_) => (Vec::new(), 0),
        }
    }

    /// Heap bytes these counts take.
    pub fn heap_bytes(&self) -> usize {
        match self {
            RefMap::Runs(r) => r.runs.len() * 32,
            RefMap::Dense(d) => d.counts.len() * 4,
        }
    }
}

/// One count per page.
#[derive(Debug)]
pub(crate) struct Dense {
    counts: Vec<i32>,
    live: u64,
}

impl Dense {
    fn from_runs(r: &Runs) -> Self {
        let mut counts = vec![0i32; r.capacity as usize];
        for (&s, run) in &r.runs {
            let (a, b) = (
                s as usize,
                (s as usize + run.len as usize).min(counts.len()),
            );
            if a < b {
                counts[a..b].fill(run.count);
            }
        }
        Dense {
            counts,
            live: r.live,
        }
    }

    /// The part of a page range inside the segment (a damaged map may point past it; such
    /// pages are not counted).
    fn clip(&self, start: u32, len: u32) -> (usize, usize) {
        let a = (start as usize).min(self.counts.len());
        let b = (start as usize + len as usize).min(self.counts.len());
        (a, b)
    }

    fn add(&mut self, start: u32, len: u32, delta: i32, report: bool, dead: &mut Vec<(u32, u32)>) {
        let (a, b) = self.clip(start, len);
        for p in a..b {
            let before = self.counts[p];
            let after = before + delta;
            self.counts[p] = after;
            if before <= 0 && after > 0 {
                self.live += 1;
            } else if before > 0 && after <= 0 {
                self.live -= 1;
            }
            if report && after == 0 && before != 0 {
                match dead.last_mut() {
                    Some((s, l)) if *s as usize + *l as usize == p => *l += 1,
                    _ => dead.push((p as u32, 1)),
                }
            }
        }
    }

    fn live_runs(&self) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        for (p, c) in self.counts.iter().enumerate() {
            if *c > 0 {
                match out.last_mut() {
                    Some((s, l)) if *s as usize + *l as usize == p => *l += 1,
                    _ => out.push((p as u32, 1)),
                }
            }
        }
        out
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    len: u32,
    count: i32,
}

/// Counts as maximal runs of equal counts.
#[derive(Debug, Default)]
pub(crate) struct Runs {
    runs: BTreeMap<u32, Run>,
    /// Pages with a count above zero.
    live: u64,
    /// Pages in the segment (for switching to [`Dense`]).
    capacity: u32,
}

impl Runs {
    /// Splits the run containing `at` (if it starts before `at`) so that a run starts there.
    fn split_at(&mut self, at: u32) {
        let Some((&s, &r)) = self.runs.range(..at).next_back() else {
            return;
        };
        if s + r.len > at {
            self.runs.insert(
                s,
                Run {
                    len: at - s,
                    count: r.count,
                },
            );
            self.runs.insert(
                at,
                Run {
                    len: s + r.len - at,
                    count: r.count,
                },
            );
        }
    }

    /// Adds `delta` to every page of `[start, start + len)`. With `report`, runs that reach
    /// zero are removed and appended to `dead`; without it (counting deltas) they are kept.
    pub fn add(
        &mut self,
        start: u32,
        len: u32,
        delta: i32,
        report: bool,
        dead: &mut Vec<(u32, u32)>,
    ) {
        if len == 0 || delta == 0 {
            return;
        }
        let end = start.saturating_add(len);
        self.split_at(start);
        self.split_at(end);
        let existing: Vec<(u32, Run)> =
            self.runs.range(start..end).map(|(k, r)| (*k, *r)).collect();
        let mut cursor = start;
        let mut touched: Vec<(u32, Run)> = Vec::with_capacity(existing.len() * 2 + 1);
        for (s, r) in existing {
            if s > cursor {
                touched.push((
                    cursor,
                    Run {
                        len: s - cursor,
                        count: 0,
                    },
                ));
            }
            touched.push((s, r));
            cursor = s + r.len;
        }
        if cursor < end {
            touched.push((
                cursor,
                Run {
                    len: end - cursor,
                    count: 0,
                },
            ));
        }
        for (s, r) in touched {
            let after = r.count + delta;
            if r.count <= 0 && after > 0 {
                self.live += u64::from(r.len);
            } else if r.count > 0 && after <= 0 {
                self.live -= u64::from(r.len);
            }
            if after == 0 && report {
                self.runs.remove(&s);
                dead.push((s, r.len));
            } else {
                self.runs.insert(
                    s,
                    Run {
                        len: r.len,
                        count: after,
                    },
                );
            }
        }
        self.coalesce(start, end);
        if report {
            coalesce_ranges(dead);
        }
    }

    /// Merges touching runs of equal count from the run before `start` to the one at `end`.
    fn coalesce(&mut self, start: u32, end: u32) {
        let from = self
            .runs
            .range(..start)
            .next_back()
            .map_or(start, |(k, _)| *k);
        let keys: Vec<(u32, Run)> = self.runs.range(from..=end).map(|(k, r)| (*k, *r)).collect();
        let mut prev: Option<(u32, Run)> = None;
        for (k, r) in keys {
            match prev {
                Some((pk, pr)) if pk + pr.len == k && pr.count == r.count => {
                    let merged = Run {
                        len: pr.len + r.len,
                        count: r.count,
                    };
                    self.runs.remove(&k);
                    self.runs.insert(pk, merged);
                    prev = Some((pk, merged));
                }
                _ => prev = Some((k, r)),
            }
        }
    }

    /// Count of one page.
    #[cfg(test)]
    pub fn count_at(&self, page: u32) -> i32 {
        match self.runs.range(..=page).next_back() {
            Some((s, r)) if s + r.len > page => r.count,
            _ => 0,
        }
    }

    /// Pages of `[start, start + len)` counted at least `min` (> 0) times.
    fn pages_counted(&self, start: u32, len: u32, min: i32) -> u32 {
        self.pages_where(start, len, |c| c >= min)
    }

    /// Pages of `[start, start + len)` whose count is exactly `want`.
    pub fn pages_with_count(&self, start: u32, len: u32, want: i32) -> u32 {
        self.pages_where(start, len, |c| c == want)
    }

    /// Pages of `[start, start + len)` in runs whose count satisfies `f` (pages in no run
    /// are not counted).
    fn pages_where(&self, start: u32, len: u32, f: impl Fn(i32) -> bool) -> u32 {
        let end = start.saturating_add(len);
        let from = self
            .runs
            .range(..start)
            .next_back()
            .map_or(start, |(k, _)| *k);
        self.runs
            .range(from..end)
            .filter(|(_, r)| f(r.count))
            .map(|(s, r)| (s + r.len).min(end).saturating_sub((*s).max(start)))
            .sum()
    }

    /// Runs with a count above zero, in order.
    pub fn live_runs(&self) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = self
            .runs
            .iter()
            .filter(|(_, r)| r.count > 0)
            .map(|(s, r)| (*s, r.len))
            .collect();
        coalesce_ranges(&mut out);
        out
    }

    /// Removes the runs whose count is zero or below and returns them: what counting left
    /// behind once the base counts are in (below zero would be an accounting bug, logged by
    /// the caller).
    pub fn take_unreferenced(&mut self) -> (Vec<(u32, u32)>, u64) {
        let gone: Vec<(u32, Run)> = self
            .runs
            .iter()
            .filter(|(_, r)| r.count <= 0)
            .map(|(s, r)| (*s, *r))
            .collect();
        let negative = gone
            .iter()
            .filter(|(_, r)| r.count < 0)
            .map(|(_, r)| u64::from(r.len))
            .sum();
        let mut out = Vec::with_capacity(gone.len());
        for (s, r) in gone {
            self.runs.remove(&s);
            out.push((s, r.len));
        }
        coalesce_ranges(&mut out);
        (out, negative)
    }
}

/// Sorts `(start, len)` ranges and merges those that touch or overlap.
pub(crate) fn coalesce_ranges(v: &mut Vec<(u32, u32)>) {
    if v.len() < 2 {
        return;
    }
    v.sort_unstable();
    let mut out: Vec<(u32, u32)> = Vec::with_capacity(v.len());
    for &(s, l) in v.iter() {
        match out.last_mut() {
            Some((ps, pl)) if *ps + *pl >= s => *pl = (*pl).max(s + l - *ps),
            _ => out.push((s, l)),
        }
    }
    *v = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_a_per_page_model(ops in proptest::collection::vec((0u32..300, 1u32..80, prop_oneof![Just(1i32), Just(-1), Just(2)]), 1..200)) {
            let mut m = RefMap::new(400);
            let mut model = vec![0i32; 400];
            for (start, len, delta) in ops {
                // Live counting never drops a page below zero.
                let delta = if (start..start + len).any(|p| model[p as usize] + delta < 0) { 1 } else { delta };
                let mut dead = Vec::new();
                m.add(start, len, delta, true, &mut dead);
                let mut want_dead = Vec::new();
                for p in start..start + len {
                    let before = model[p as usize];
                    model[p as usize] += delta;
                    if before != 0 && model[p as usize] == 0 {
                        want_dead.push((p, 1));
                    }
                }
                coalesce_ranges(&mut want_dead);
                prop_assert_eq!(dead, want_dead);
                for p in 0..400u32 {
                    prop_assert_eq!(m.count_at(p), model[p as usize], "page {}", p);
                }
                prop_assert_eq!(m.live_pages(), model.iter().filter(|c| **c > 0).count() as u64);
                // Runs are maximal: no two touching runs share a count.
                if let RefMap::Runs(r) = &m {
                    let runs: Vec<(u32, Run)> = r.runs.iter().map(|(k, r)| (*k, *r)).collect();
                    for w in runs.windows(2) {
                        prop_assert!(!(w[0].0 + w[0].1.len == w[1].0 && w[0].1.count == w[1].1.count));
                    }
                }
                prop_assert_eq!(m.pages_with_count(50, 100, 1), (50..150).filter(|p| model[*p as usize] == 1).count() as u32);
                for (a, n) in [(start, len), (0, 400), (start.saturating_sub(3), 7)] {
                    let n = n.min(400 - a);
                    prop_assert_eq!(m.all_referenced(a, n), (a..a + n).all(|p| model[p as usize] > 0), "{}+{}", a, n);
                    prop_assert_eq!(m.all_counted(a, n, 2), (a..a + n).all(|p| model[p as usize] >= 2), "{}+{}", a, n);
                }
            }
        }
    }

    #[test]
    fn deltas_balance_out_against_a_base_added_later() {
        let mut m = RefMap::new(1024);
        let mut dead = Vec::new();
        // Counting mode: a decref arrives before the base count.
        m.add(10, 5, -1, false, &mut dead);
        m.add(100, 4, 1, false, &mut dead);
        m.add(100, 4, -1, false, &mut dead);
        assert!(dead.is_empty());
        // Base counts from the committed maps.
        m.add(0, 20, 1, false, &mut dead);
        assert_eq!(m.count_at(12), 0);
        assert_eq!(m.count_at(5), 1);
        let (zero, negative) = m.take_unreferenced();
        assert_eq!(zero, vec![(10, 5), (100, 4)]);
        assert_eq!(negative, 0);
        assert_eq!(m.live_runs(), vec![(0, 10), (15, 5)]);
        assert_eq!(m.live_pages(), 15);
    }

    #[test]
    fn a_sequential_segment_is_one_run() {
        let mut m = RefMap::new(65536);
        let mut dead = Vec::new();
        for i in 0..100 {
            m.add(i * 256, 256, 1, true, &mut dead);
        }
        assert_eq!(m.heap_bytes(), 32);
        m.add(1000, 1, 1, true, &mut dead);
        assert_eq!(m.heap_bytes(), 3 * 32);
        m.add(1000, 1, -1, true, &mut dead);
        assert_eq!(m.heap_bytes(), 32);
        assert!(dead.is_empty());
    }

    #[test]
    fn a_fragmented_segment_turns_dense_and_keeps_its_counts() {
        let cap = 20_000u32;
        let mut m = RefMap::new(cap);
        let mut model = vec![0i32; cap as usize];
        let mut dead = Vec::new();
        // Every other page: one run each, past the switch.
        for p in (0..cap).step_by(2) {
            m.add(p, 1, 1, true, &mut dead);
            model[p as usize] += 1;
        }
        assert!(matches!(m, RefMap::Dense(_)));
        m.add(100, 50, 1, true, &mut dead);
        for c in &mut model[100..150] {
            *c += 1;
        }
        m.add(0, 10, -1, true, &mut dead);
        let mut want = Vec::new();
        for (p, c) in model[..10].iter_mut().enumerate() {
            if *c == 1 {
                want.push((p as u32, 1));
            }
            if *c > 0 {
                *c -= 1;
            }
        }
        assert_eq!(dead, want);
        for p in (0..cap).step_by(97) {
            assert_eq!(m.count_at(p), model[p as usize]);
        }
        assert_eq!(
            m.live_pages(),
            model.iter().filter(|c| **c > 0).count() as u64
        );
        assert_eq!(
            m.pages_with_count(90, 70, 1),
            (90..160).filter(|p| model[*p] == 1).count() as u32
        );
        // Pages past the segment are not counted (a damaged map), never a panic.
        m.add(cap + 5, 10, 1, true, &mut dead);
    }
}
