//! Locations of stored runs of blocks.

/// Blocks per chunk (see [`crate::map::Chunk`]).
pub const CHUNK_BITS: u32 = 10;
pub const CHUNK_BLOCKS: u64 = 1 << CHUNK_BITS;
/// Allocation unit of data segments, and the grain of their checksums.
pub const PAGE_SIZE: usize = 4096;
/// Segment ids from here up name remote packs, not local segment files.
pub const REMOTE_BASE: u32 = 0xF000_0000;

/// Where the bytes of a run of blocks live.
///
/// Three kinds, told apart by `segment` and `len_flags`:
/// * **raw**: a local segment (`segment < REMOTE_BASE`) and `len_flags == 0`. The run's
///   blocks are stored uncompressed and back to back from page `page`, so any sub-run is a
///   raw location too ([`Loc::advance`]). Every page is checked against its segment's
///   checksum table.
/// * **lz4**: a local segment, `len_flags` = stored length | [`Loc::LZ4`]. One block,
///   compressed, padded to whole pages (checked against the table like raw pages).
/// * **format 1**: a local segment, `len_flags` = stored length | [`Loc::INLINE`] (| lz4),
///   `crc` the crc32 of the stored bytes: one block written by format 1, in a segment
///   without a checksum table (see `upgrade.rs`).
/// * **remote**: `segment >= REMOTE_BASE`; `segment - REMOTE_BASE` is a registered pack,
///   `page` the record's byte offset in it, `len_flags` its stored length (| LZ4) and `crc`
///   the crc32 of its stored bytes. One block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Loc {
    pub segment: u32,
    pub page: u32,
    pub len_flags: u32,
    pub crc: u32,
}

impl Loc {
    pub const LZ4: u32 = 1 << 31;
    /// The crc of the stored bytes is in `crc` (format-1 records), not in a table.
    pub const INLINE: u32 = 1 << 30;
    const LEN_MASK: u32 = (1 << 30) - 1;

    /// Raw blocks stored from `page` of `segment`.
    pub fn raw(segment: u32, page: u32) -> Self {
        Loc {
            segment,
            page,
            len_flags: 0,
            crc: 0,
        }
    }

    /// One lz4-compressed block of `stored_len` bytes from `page` of `segment`.
    pub fn lz4(segment: u32, page: u32, stored_len: u32) -> Self {
        debug_assert!(stored_len > 0 && stored_len <= Self::LEN_MASK);
        Loc {
            segment,
            page,
            len_flags: stored_len | Self::LZ4,
            crc: 0,
        }
    }

    /// A format-1 record of `stored_len` bytes whose crc32 is `crc`.
    pub fn inline(segment: u32, page: u32, stored_len: u32, lz4: bool, crc: u32) -> Self {
        Loc {
            segment,
            page,
            len_flags: stored_len | Self::INLINE | if lz4 { Self::LZ4 } else { 0 },
            crc,
        }
    }

    /// A local record checked against the crc it carries (format 1).
    pub fn is_inline(&self) -> bool {
        !self.is_remote() && self.len_flags & Self::INLINE != 0
    }

    pub fn is_remote(&self) -> bool {
        self.segment >= REMOTE_BASE
    }

    /// A local run of uncompressed blocks (the only kind that covers more than one block).
    pub fn is_raw(&self) -> bool {
        !self.is_remote() && self.len_flags == 0
    }

    pub fn is_lz4(&self) -> bool {
        self.len_flags & Self::LZ4 != 0
    }

    /// Stored bytes of a one-block record (lz4 or remote); 0 for raw runs.
    pub fn stored_len(&self) -> u32 {
        self.len_flags & Self::LEN_MASK
    }

    /// The location of the block `blocks` after this one in a raw run (`ppb` pages per
    /// block). Other kinds hold one block and are returned unchanged.
    pub fn advance(&self, blocks: u64, ppb: u32) -> Loc {
        if !self.is_raw() {
            return *self;
        }
        let page = u64::from(self.page) + blocks * u64::from(ppb);
        Loc {
            page: u32::try_from(page).unwrap_or(u32::MAX),
            ..*self
        }
    }

    /// Local pages a run of `blocks` blocks from here occupies (0 for remote records).
    pub fn pages(&self, blocks: u64, ppb: u32) -> u32 {
        if self.is_remote() {
            0
        } else if self.is_raw() {
            u32::try_from(blocks * u64::from(ppb)).unwrap_or(u32::MAX)
        } else {
            self.stored_len().div_ceil(PAGE_SIZE as u32)
        }
    }

    /// True when `next` (covering the blocks right after a run of `blocks` from here) is
    /// stored right after it, so the two are one run.
    pub fn continues(&self, blocks: u64, next: &Loc, ppb: u32) -> bool {
        self.is_raw()
            && next.is_raw()
            && self.segment == next.segment
            && u64::from(self.page) + blocks * u64::from(ppb) == u64::from(next.page)
    }
}

/// A run of blocks and where they are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    /// First block (in the volume's block address space).
    pub start: u64,
    /// Blocks covered (at least 1).
    pub len: u64,
    pub loc: Loc,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// A stretch of a looked-up range: `blocks` blocks from `block`, stored at `loc` (the
/// location of its first block), or a hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub block: u64,
    pub blocks: u64,
    pub loc: Option<Loc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_runs_advance_and_continue() {
        let a = Loc::raw(3, 100);
        assert_eq!(a.advance(2, 1), Loc::raw(3, 102));
        assert_eq!(a.advance(2, 16), Loc::raw(3, 132));
        assert!(a.continues(4, &Loc::raw(3, 104), 1));
        assert!(!a.continues(4, &Loc::raw(4, 104), 1));
        assert!(!a.continues(4, &Loc::raw(3, 105), 1));
        assert_eq!(a.pages(5, 2), 10);
        let z = Loc::lz4(3, 7, 5000);
        assert!(!z.is_raw() && z.is_lz4());
        assert_eq!(z.advance(3, 1), z);
        assert_eq!(z.pages(1, 16), 2);
        assert!(!a.continues(1, &z, 1));
        let r = Loc {
            segment: REMOTE_BASE + 2,
            page: 0,
            len_flags: 4096,
            crc: 9,
        };
        assert!(r.is_remote() && !r.is_raw());
        assert_eq!(r.pages(1, 1), 0);
    }
}
