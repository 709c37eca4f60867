//! Scrub: read every stored record once and verify its checksum.

use crate::io::Op;
use crate::segment::PAGE_SIZE;
use crate::store::Inner;
use crate::Result;

/// Records verified per IO batch.
const BATCH: usize = 64;

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
    pub records: u64,
    pub bytes: u64,
    /// Records still held only in a remote pack (lazily restored volumes): not read.
    pub remote_records: u64,
    pub problems: Vec<ScrubProblem>,
}

pub(crate) fn scrub(inner: &Inner) -> Result<ScrubReport> {
    let records = crate::ops::all_records(inner);
    let mut report = ScrubReport::default();
    let block_sizes: std::collections::HashMap<String, u64> = {
        let cat = inner.catalog.lock();
        cat.volumes
            .values()
            .map(|v| (v.name.clone(), u64::from(v.block_size)))
            .collect()
    };
    for chunk in records.chunks(BATCH) {
        let mut ops = Vec::new();
        let mut meta = Vec::new();
        for (e, loc, blk) in chunk {
            if e.is_remote() {
                // Held in a remote pack: verified when fetched (hydration, reads).
                report.remote_records += 1;
                continue;
            }
            let vol = loc.split('@').next().unwrap_or(loc);
            let offset = blk * block_sizes.get(vol).copied().unwrap_or(4096);
            let problem = |detail: String| ScrubProblem {
                location: loc.clone(),
                offset,
                segment: e.segment,
                detail,
            };
            match inner.segments.get(e.segment) {
                Some(seg) => {
                    ops.push(Op::Read {
                        file: seg.file.clone(),
                        offset: u64::from(e.page) * PAGE_SIZE as u64,
                        buf: vec![0; e.stored_len() as usize],
                    });
                    meta.push((*e, problem(String::new()), loc.clone(), *blk));
                }
                None => report
                    .problems
                    .push(problem("data segment is missing".into())),
            }
        }
        for (done, (e, mut p, loc, blk)) in
            inner.segments.engine().submit(ops).into_iter().zip(meta)
        {
            report.records += 1;
            report.bytes += u64::from(e.stored_len());
            let detail = match done.result {
                Err(err) => format!("read failed: {err}"),
                Ok(()) if crc32fast::hash(&done.op.into_buf()) != e.crc => {
                    "checksum mismatch".into()
                }
                Ok(()) => continue,
            };
            // The record may have died (and its pages been punched or reused) since the list
            // was taken: look again with reuse held off, and report only what is still mapped
            // and still bad.
            let _reuse = inner.segments.read_guard();
            if !crate::ops::still_mapped(inner, &loc, blk, &e) {
                continue;
            }
            let Some(seg) = inner.segments.get(e.segment) else {
                p.detail = "data segment is missing".into();
                report.problems.push(p);
                continue;
            };
            let again = inner.segments.engine().run(Op::Read {
                file: seg.file.clone(),
                offset: u64::from(e.page) * PAGE_SIZE as u64,
                buf: vec![0; e.stored_len() as usize],
            });
            let bad = match again.result {
                Err(err) => Some(format!("read failed: {err}")),
                Ok(()) if crc32fast::hash(&again.op.into_buf()) != e.crc => Some(detail),
                Ok(()) => None,
            };
            if let Some(d) = bad {
                p.detail = d;
                report.problems.push(p);
            }
        }
    }
    Ok(report)
}
