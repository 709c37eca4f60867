//! Scrub: read every stored page (and format-1 record) that any layer references once, and
//! verify it against its checksum.

use crate::inner::Inner;
use crate::map::{Extent, Loc, CHUNK_BLOCKS, PAGE_SIZE};
use crate::record::{self, Bad};
use crate::Result;
use std::collections::HashSet;

/// Pages verified per read.
const SPAN_PAGES: u32 = 1024;

/// One record that failed verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScrubProblem {
    /// `VOL` or `VOL@CKPT` that references the record.
    pub location: String,
    /// Byte offset of the block in that volume.
    pub offset: u64,
    pub segment: u32,
    pub detail: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScrubReport {
    /// Extents verified (each stored run once, however many layers share it).
    pub records: u64,
    pub bytes: u64,
    /// Blocks still held only in a remote pack (lazily restored volumes): not read.
    pub remote_records: u64,
    pub problems: Vec<ScrubProblem>,
}

/// One layer's own extents, labelled (`VOL` or `VOL@CKPT`).
struct Owned {
    label: String,
    block_size: u32,
    ppb: u32,
    extents: Vec<Extent>,
}

/// Every layer's own extents.
fn all_extents(inner: &Inner) -> Result<Vec<Owned>> {
    struct Want {
        label: String,
        layer: u64,
        bs: u32,
        ppb: u32,
        tree: Option<crate::map::Tree>,
    }
    let wants: Vec<Want> = {
        let cat = inner.catalog.lock();
        let mut w = Vec::new();
        for v in cat.volumes.values() {
            let m = v.map.read();
            w.push(Want {
                label: v.name.clone(),
                layer: m.layer,
                bs: v.block_size,
                ppb: v.ppb(),
                tree: m.loaded.then(|| m.tree.clone()),
            });
        }
        for ((vid, name), ck) in &cat.checkpoints {
            let Some(v) = cat.volume_by_id(*vid) else {
                continue;
            };
            w.push(Want {
                label: format!("{}@{name}", v.name),
                layer: ck.layer,
                bs: v.block_size,
                ppb: v.ppb(),
                tree: None,
            });
        }
        w
    };
    let mut out = Vec::new();
    for w in wants {
        let exts: Vec<Extent> = match &w.tree {
            // A loaded head's records lag its map until the next commit: read the map.
            Some(t) => t
                .owned(w.layer)
                .into_iter()
                .flat_map(|(idx, c)| c.extents(idx * CHUNK_BLOCKS).collect::<Vec<_>>())
                .collect(),
            None => crate::ops::own_chunks_db(inner, w.layer)?
                .into_values()
                .flatten()
                .collect(),
        };
        out.push(Owned {
            label: w.label,
            block_size: w.bs,
            ppb: w.ppb,
            extents: exts,
        });
    }
    Ok(out)
}

pub(crate) fn scrub(inner: &Inner) -> Result<ScrubReport> {
    // The re-check of a failure asks whether the pages are still referenced.
    inner.wait_space_counted();
    let mut report = ScrubReport::default();
    let mut seen: HashSet<(Loc, u64)> = HashSet::new();
    for o in all_extents(inner)? {
        let (label, bs, ppb) = (o.label, o.block_size, o.ppb);
        for e in o.extents {
            if e.loc.is_remote() {
                report.remote_records += 1;
                continue;
            }
            if !seen.insert((e.loc, e.len)) {
                continue;
            }
            report.records += 1;
            if let Some(p) = check_extent(inner, &label, bs, ppb, &e, &mut report.bytes) {
                report.problems.push(p);
            }
        }
    }
    Ok(report)
}

/// Verifies one extent; a failure is reported only if its pages are still referenced when
/// checked again with page reuse held off (the extent may have died meanwhile).
fn check_extent(
    inner: &Inner,
    label: &str,
    bs: u32,
    ppb: u32,
    e: &Extent,
    bytes: &mut u64,
) -> Option<ScrubProblem> {
    let problem = |blk: u64, detail: String| ScrubProblem {
        location: label.to_string(),
        offset: blk * u64::from(bs),
        segment: e.loc.segment,
        detail,
    };
    let Some(seg) = inner.segments.get(e.loc.segment) else {
        return Some(problem(e.start, "data segment is missing".into()));
    };
    let pages = e.loc.pages(e.len, ppb);
    let verify = |page: u32, n: u32| -> std::result::Result<(), Bad> {
        if e.loc.is_raw() {
            record::read_verified(inner.segments.engine(), &seg, page, n).map(|_| ())
        } else {
            record::read_single(&inner.segments, &e.loc).map(|_| ())
        }
    };
    let mut at = 0u32;
    while at < pages {
        let n = if e.loc.is_raw() {
            (pages - at).min(SPAN_PAGES)
        } else {
            pages
        };
        let page = e.loc.page + at;
        *bytes += u64::from(n) * PAGE_SIZE as u64;
        if let Err(first) = verify(page, n) {
            let _reuse = inner.segments.read_guard();
            let still = seg.pages_with_count(page, n, 0) == 0;
            let again = verify(page, n);
            if still {
                if let Err(b) = again {
                    let detail = match b {
                        Bad::Io(err) => format!("read failed: {err}"),
                        Bad::Checksum => "checksum mismatch".into(),
                        Bad::NoSegment => "data segment is missing".into(),
                        Bad::OutOfSegment => "record lies outside its segment".into(),
                    };
                    let _ = first;
                    return Some(problem(e.start + u64::from(at / ppb.max(1)), detail));
                }
            }
        }
        at += n;
    }
    None
}
