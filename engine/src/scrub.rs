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
                    meta.push((*e, problem(String::new())));
                }
                None => report
                    .problems
                    .push(problem("data segment is missing".into())),
            }
        }
        for (done, (e, mut p)) in inner.segments.engine().submit(ops).into_iter().zip(meta) {
            report.records += 1;
            report.bytes += u64::from(e.stored_len());
            match done.result {
                Err(err) => {
                    p.detail = format!("read failed: {err}");
                    report.problems.push(p);
                }
                Ok(()) if crc32fast::hash(&done.op.into_buf()) != e.crc => {
                    p.detail = "checksum mismatch".into();
                    report.problems.push(p);
                }
                Ok(()) => {}
            }
        }
    }
    Ok(report)
}
