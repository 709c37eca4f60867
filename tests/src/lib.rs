//! Helpers shared by the cross-process tests in `tests/`, and the `crash-writer` child
//! process they kill.

/// Deterministic block content for (block, seed).
pub fn block_content(block: u64, seed: u64, len: usize) -> Vec<u8> {
    let mut x = (block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub const WRITER_BLOCK: usize = 4096;
pub const WRITER_BLOCKS: u64 = 1024;
pub mod containerd;
pub mod garage;
pub mod image;
