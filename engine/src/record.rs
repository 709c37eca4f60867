//! Stored records and their checksums: the page checksums a write puts in its segment's
//! table, and the verified reads of pages (against the table), of format-1 records (against
//! the crc in their location) and of whole records for replay and scrub.

use crate::codec;
use crate::io::{Buf, Data, IoEngine, Op};
use crate::map::{Loc, PAGE_SIZE};
use crate::segment::{Segment, Segments};
use std::sync::Arc;

/// Appends the crc32 of each 4 KiB page of `data` to `out` (a short last page is checked as
/// if zero-padded, as it is stored).
pub fn page_crcs(data: &[u8], out: &mut Vec<u32>) {
    for page in data.chunks(PAGE_SIZE) {
        if page.len() == PAGE_SIZE {
            out.push(crc32fast::hash(page));
        } else {
            let mut h = crc32fast::Hasher::new();
            h.update(page);
            h.update(&[0u8; PAGE_SIZE][..PAGE_SIZE - page.len()]);
            out.push(h.finalize());
        }
    }
}

/// The write that puts `crcs` in `seg`'s table for the pages from `page`.
pub fn table_write(seg: &Segment, page: u32, crcs: &[u32]) -> Op<'static> {
    let mut bytes = Vec::with_capacity(crcs.len() * 4);
    for c in crcs {
        bytes.extend_from_slice(&c.to_be_bytes());
    }
    Op::Write {
        file: seg.file.clone(),
        offset: Segment::table_offset(page),
        buf: Data::Owned(bytes),
    }
}

/// The read of `pages` table entries from `page`.
pub fn table_read(seg: &Segment, page: u32, pages: u32) -> Op<'static> {
    Op::read(&seg.file, Segment::table_offset(page), pages as usize * 4)
}

/// The crcs in `table` bytes (big-endian u32s, as [`table_read`] returns them).
pub fn table_crcs(table: &[u8]) -> impl Iterator<Item = u32> + '_ {
    table
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
}

/// Index of the first page of `data` whose crc differs from its `table` entry (big-endian
/// u32s), if any.
pub fn first_bad_page(data: &[u8], table: &[u8]) -> Option<usize> {
    data.chunks(PAGE_SIZE)
        .zip(table_crcs(table))
        .position(|(page, want)| crc32fast::hash(page) != want)
        .or_else(|| (table.len() / 4 < data.len().div_ceil(PAGE_SIZE)).then_some(table.len() / 4))
}

/// Why a record did not read back.
#[derive(Debug)]
pub enum Bad {
    /// The segment is gone (or never existed).
    NoSegment,
    /// The pages lie outside the segment's data area.
    OutOfSegment,
    /// Reading failed.
    Io(std::io::Error),
    /// A page (or a format-1 record) does not match its checksum.
    Checksum,
}

/// Reads `pages` pages from `page` of `seg` and checks each against the table; on a
/// mismatch the pages are dropped from the page cache (so no later read trusts them).
pub fn read_verified(
    engine: &Arc<dyn IoEngine>,
    seg: &Segment,
    page: u32,
    pages: u32,
) -> Result<Vec<u8>, Bad> {
    if !seg.has_table() {
        return Err(Bad::Checksum);
    }
    if !seg.holds(page, pages) {
        return Err(Bad::OutOfSegment);
    }
    let _unverified = seg.verifying();
    let ops = vec![
        Op::read(
            &seg.file,
            u64::from(page) * PAGE_SIZE as u64,
            pages as usize * PAGE_SIZE,
        ),
        table_read(seg, page, pages),
    ];
    let mut done = engine.submit(ops).into_iter();
    let (Some(data), Some(table)) = (done.next(), done.next()) else {
        return Err(Bad::Io(std::io::Error::other("engine lost a completion")));
    };
    data.result.map_err(Bad::Io)?;
    table.result.map_err(Bad::Io)?;
    let (data, table) = (data.op.into_buf(), table.op.into_buf());
    if first_bad_page(&data, &table).is_some() {
        seg.file.evict(
            u64::from(page) * PAGE_SIZE as u64,
            u64::from(pages) * PAGE_SIZE as u64,
        );
        crate::io::give_buf(table);
        return Err(Bad::Checksum);
    }
    crate::io::give_buf(table);
    Ok(data)
}

/// The stored bytes of a one-block local record (lz4 or format 1), verified: against the
/// table for format 2, against the crc in the location for format 1.
pub fn read_single(segments: &Segments, loc: &Loc) -> Result<Vec<u8>, Bad> {
    let seg = segments.get(loc.segment).ok_or(Bad::NoSegment)?;
    let len = loc.stored_len() as usize;
    if loc.is_inline() {
        let pages = len.div_ceil(PAGE_SIZE) as u32;
        if len == 0 || !seg.holds(loc.page, pages) {
            return Err(Bad::OutOfSegment);
        }
        let done = segments.engine().run(Op::read(
            &seg.file,
            u64::from(loc.page) * PAGE_SIZE as u64,
            len,
        ));
        done.result.map_err(Bad::Io)?;
        let data = done.op.into_buf();
        if crc32fast::hash(&data) != loc.crc {
            return Err(Bad::Checksum);
        }
        return Ok(data);
    }
    let pages = loc.pages(1, 1);
    let mut data = read_verified(segments.engine(), &seg, loc.page, pages)?;
    data.truncate(len);
    Ok(data)
}

/// Checks, for replay, that the record a journal entry names is intact: every page against
/// the table, and the table against the crc the entry carries (format-1 entries: the whole
/// record against its crc).
pub fn verifies(segments: &Segments, loc: &Loc, blocks: u64, ppb: u32, check: u32) -> bool {
    let Some(seg) = segments.get(loc.segment) else {
        return false;
    };
    if loc.is_inline() {
        return read_single(segments, loc).is_ok();
    }
    let pages = loc.pages(blocks, ppb);
    if pages == 0 || !seg.has_table() || !seg.holds(loc.page, pages) {
        return false;
    }
    let done = segments.engine().run(table_read(&seg, loc.page, pages));
    if done.result.is_err() {
        return false;
    }
    let table = done.op.into_buf();
    let crcs: Vec<u32> = table_crcs(&table).collect();
    if codec::table_crc(&crcs) != check {
        return false;
    }
    read_verified(segments.engine(), &seg, loc.page, pages).is_ok()
}

/// Reads into `buf` what the page cache holds of `seg` at `offset` (see `Op::ReadCached`).
pub fn cached_read<'a>(seg: &Segment, offset: u64, buf: &'a mut [u8]) -> Op<'a> {
    Op::ReadCached {
        file: seg.file.clone(),
        offset,
        buf: Buf::Slice(buf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bad_page_finds_the_mismatch() {
        let data = vec![7u8; 3 * PAGE_SIZE];
        let mut crcs = Vec::new();
        page_crcs(&data, &mut crcs);
        let mut table: Vec<u8> = crcs.iter().flat_map(|c| c.to_be_bytes()).collect();
        assert_eq!(first_bad_page(&data, &table), None);
        table[5] ^= 1;
        assert_eq!(first_bad_page(&data, &table), Some(1));
        assert_eq!(
            first_bad_page(&data, &table[..4]),
            Some(1),
            "a short table fails"
        );
        // A short last page is checked zero-padded.
        let mut one = Vec::new();
        page_crcs(&[1, 2, 3], &mut one);
        let mut padded = vec![0u8; PAGE_SIZE];
        padded[..3].copy_from_slice(&[1, 2, 3]);
        assert_eq!(one, vec![crc32fast::hash(&padded)]);
    }
}
