//! Consistency check of the store's metadata: every loaded map against its committed
//! records, and every page's reference count against the count the committed maps imply.
//!
//! The counts are what decides when a page is free. A count above what the maps hold leaks
//! space; one below lets a page that a map still points at be reused or punched (data loss).
//! Both stay invisible to a scrub until the page is rewritten, so this check compares them
//! directly: it commits, then holds writers off (the gate) while it recounts every layer's
//! committed extent records and compares page by page. Chunks written since that commit
//! (a head's dirty chunks) are counted from the map instead of their records, and their
//! records are compared with the map as of the commit, so the check runs under live IO
//! (pausing it for the comparison).

use crate::catalog::Catalog;
use crate::codec::{self, ExtentKey};
use crate::inner::{cf, Inner};
use crate::map::{Extent, CHUNK_BLOCKS};
use crate::refmap::RefMap;
use crate::{Error, Result};
use rocksdb::IteratorMode;
use std::collections::{BTreeMap, HashMap};

/// Disagreements reported at most, of each kind.
const MAX_REPORTED: usize = 1000;

/// What [`crate::Store::check`] found. Empty: the store is consistent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Layers checked (volume heads and checkpoints).
    pub layers: u64,
    /// Extent records counted.
    pub extents: u64,
    /// Chunks written since the commit the check began with (counted from the map).
    pub dirty_chunks: u64,
    /// Chunks whose map in memory differs from their committed records, as `LABEL chunk N:
    /// …` (`LABEL` is `VOL` or `VOL@CKPT`). After a restart the records are what a layer
    /// holds, so such a chunk loses writes or points at pages it no longer owns.
    pub map_mismatches: Vec<String>,
    /// Page runs whose reference count differs from what the committed maps hold.
    pub count_mismatches: Vec<CountMismatch>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.map_mismatches.is_empty() && self.count_mismatches.is_empty()
    }
}

/// A run of pages whose reference count in memory (`counted`) is not the number of committed
/// extent records covering them (`committed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CountMismatch {
    pub segment: u32,
    pub page: u32,
    pub pages: u32,
    pub counted: i32,
    pub committed: i32,
}

pub(crate) fn check(inner: &Inner) -> Result<CheckReport> {
    inner.wait_space_counted();
    let guard = inner.commit.lock();
    // Records as fresh as they get: what was written before the check began is committed.
    inner.commit_locked(&guard, Vec::new())?;
    let cat = inner.catalog.lock();
    let _gate = inner.gate.write();
    compare(inner, &cat)
}

/// One head's chunks changed since the last commit: index → (its extents as committed, as
/// mapped now), each `None` when the head does not own the chunk then.
type Dirty = BTreeMap<u64, (Option<Vec<Extent>>, Option<Vec<Extent>>)>;

/// Compares with the commit lock, the catalog and the gate held: no map changes, no commit
/// runs, and RocksDB holds every layer's map but for the heads' dirty chunks.
fn compare(inner: &Inner, cat: &Catalog) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let ppb = crate::load::layer_ppb_of(cat);
    let mut labels: HashMap<u64, String> = HashMap::new();
    for v in cat.volumes.values() {
        labels.insert(v.map.read().layer, v.name.clone());
    }
    for ((vid, name), ck) in &cat.checkpoints {
        if let Some(v) = cat.volume_by_id(*vid) {
            labels.insert(ck.layer, format!("{}@{name}", v.name));
        }
    }
    for (id, f) in &cat.frozen {
        if let Some(v) = cat.volume_by_id(f.volume) {
            labels
                .entry(*id)
                .or_insert_with(|| format!("{} layer {id}", v.name));
        }
    }
    report.layers = ppb.len() as u64;
    let owned = |t: &crate::map::Tree, layer: u64, idx: u64| {
        t.chunk(idx)
            .filter(|c| c.owner() == layer)
            .map(|c| c.extents(idx * CHUNK_BLOCKS).collect::<Vec<_>>())
    };
    let mut dirty: HashMap<u64, Dirty> = HashMap::new();
    for v in cat.volumes.values() {
        let m = v.map.read();
        if m.loaded && !m.dirty.is_empty() {
            let d = m
                .dirty
                .iter()
                .map(|&idx| {
                    let was = owned(&m.committed, m.layer, idx);
                    (idx, (was, owned(&m.tree, m.layer, idx)))
                })
                .collect();
            dirty.insert(m.layer, d);
        }
    }
    report.dirty_chunks = dirty.values().map(|d| d.len() as u64).sum();

    // Maps in memory against their records.
    for (&layer, label) in &labels {
        let Some(tree) = cat.loaded_tree(layer) else {
            continue;
        };
        let mut mem: BTreeMap<u64, Vec<Extent>> = tree
            .owned(layer)
            .into_iter()
            .map(|(idx, c)| (idx, c.extents(idx * CHUNK_BLOCKS).collect()))
            .collect();
        // A dirty chunk's records are the map as of the last commit.
        for (idx, (was, _)) in dirty.get(&layer).into_iter().flatten() {
            match was {
                Some(e) => mem.insert(*idx, e.clone()),
                None => mem.remove(idx),
            };
        }
        let db = crate::ops::own_chunks_db(inner, layer)?;
        let idxs: std::collections::BTreeSet<u64> = mem.keys().chain(db.keys()).copied().collect();
        for idx in idxs {
            let (m, d) = (mem.get(&idx), db.get(&idx));
            if m != d && report.map_mismatches.len() < MAX_REPORTED {
                report.map_mismatches.push(format!(
                    "{label} chunk {idx}: map {} extents, records {} extents{}",
                    m.map_or(0, Vec::len),
                    d.map_or(0, Vec::len),
                    first_difference(m, d)
                ));
            }
        }
    }

    // Counts from the records.
    let Some(live) = inner.segments.count_runs() else {
        return Err(Error::Corrupt(
            "check: references are still being counted".into(),
        ));
    };
    let mut committed: BTreeMap<u32, RefMap> = BTreeMap::new();
    let mut count = |loc: &crate::map::Loc, blocks: u64, ppb: u32, delta: i32| {
        if loc.is_remote() {
            return;
        }
        let capacity = live.get(&loc.segment).map_or(0, |(c, _)| *c);
        committed
            .entry(loc.segment)
            .or_insert_with(|| RefMap::new(capacity))
            .add(
                loc.page,
                loc.pages(blocks, ppb),
                delta,
                false,
                &mut Vec::new(),
            );
    };
    for item in inner
        .db
        .iterator_cf(cf(&inner.db, codec::CF_EXTENTS)?, IteratorMode::Start)
    {
        let (k, v) = item?;
        let (layer, _, key) = codec::decode_extent_key(&k)?;
        let ExtentKey::Extent { start } = key else {
            continue;
        };
        let (len, loc) = codec::decode_extent(start, &v)?;
        report.extents += 1;
        if loc.is_remote() {
            continue;
        }
        let Some(&p) = ppb.get(&layer) else {
            report.map_mismatches.push(format!(
                "records of layer {layer}, which no volume or checkpoint holds"
            ));
            continue;
        };
        count(&loc, len, p, 1);
    }
    // Dirty chunks count as mapped now, not as committed.
    for (layer, chunks) in &dirty {
        let Some(&p) = ppb.get(layer) else { continue };
        for (was, now) in chunks.values() {
            let changes = was
                .iter()
                .flatten()
                .map(|e| (e, -1))
                .chain(now.iter().flatten().map(|e| (e, 1)));
            for (e, delta) in changes {
                count(&e.loc, e.len, p, delta);
            }
        }
    }
    let segments: std::collections::BTreeSet<u32> =
        live.keys().chain(committed.keys()).copied().collect();
    for seg in segments {
        let counted = live.get(&seg).map(|(_, r)| r.as_slice()).unwrap_or(&[]);
        let want = committed
            .get(&seg)
            .map(RefMap::count_runs)
            .unwrap_or_default();
        for (page, pages, c, w) in diff_runs(counted, &want) {
            if report.count_mismatches.len() < MAX_REPORTED {
                report.count_mismatches.push(CountMismatch {
                    segment: seg,
                    page,
                    pages,
                    counted: c,
                    committed: w,
                });
            }
        }
    }
    Ok(report)
}

fn first_difference(m: Option<&Vec<Extent>>, d: Option<&Vec<Extent>>) -> String {
    let (m, d) = (m.map_or(&[][..], |v| v), d.map_or(&[][..], |v| v));
    match m.iter().zip(d).find(|(a, b)| a != b) {
        Some((a, b)) => format!("; first difference: map {a:?}, records {b:?}"),
        None => String::new(),
    }
}

/// Where two run lists (`(start, len, count)`, sorted, non-overlapping) disagree, as
/// `(start, len, count in a, count in b)`, adjacent equal disagreements merged.
fn diff_runs(a: &[(u32, u32, i32)], b: &[(u32, u32, i32)]) -> Vec<(u32, u32, i32, i32)> {
    let mut points: Vec<u32> = a
        .iter()
        .chain(b)
        .flat_map(|&(s, l, _)| [s, s + l])
        .collect();
    points.sort_unstable();
    points.dedup();
    fn count_at(runs: &[(u32, u32, i32)], i: &mut usize, p: u32) -> i32 {
        while *i < runs.len() && runs[*i].0 + runs[*i].1 <= p {
            *i += 1;
        }
        match runs.get(*i) {
            Some(&(s, _, c)) if s <= p => c,
            _ => 0,
        }
    }
    let (mut ia, mut ib) = (0, 0);
    let mut out: Vec<(u32, u32, i32, i32)> = Vec::new();
    for w in points.windows(2) {
        let (s, e) = (w[0], w[1]);
        let (ca, cb) = (count_at(a, &mut ia, s), count_at(b, &mut ib, s));
        if ca == cb {
            continue;
        }
        match out.last_mut() {
            Some((ps, pl, pa, pb)) if *ps + *pl == s && *pa == ca && *pb == cb => *pl += e - s,
            _ => out.push((s, e - s, ca, cb)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::diff_runs;

    #[test]
    fn run_lists_differ_where_their_counts_do() {
        assert!(diff_runs(&[(0, 4, 1), (10, 2, 2)], &[(0, 4, 1), (10, 2, 2)]).is_empty());
        assert_eq!(
            diff_runs(&[(0, 4, 1)], &[(0, 2, 1), (2, 2, 2)]),
            vec![(2, 2, 1, 2)]
        );
        assert_eq!(diff_runs(&[(5, 3, 1)], &[]), vec![(5, 3, 1, 0)]);
        assert_eq!(
            diff_runs(&[(0, 2, 1), (2, 2, 1)], &[(1, 4, 1)]),
            vec![(0, 1, 1, 0), (4, 1, 0, 1)]
        );
    }
}
