//! The virtio-blk configuration space and feature bits this device offers.

use crate::request::{MAX_DISCARD_SEGMENTS, SECTOR};

pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
pub const VIRTIO_BLK_F_TOPOLOGY: u32 = 10;
pub const VIRTIO_BLK_F_CONFIG_WCE: u32 = 11;
pub const VIRTIO_BLK_F_MQ: u32 = 12;
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Largest single segment, and most segments per request: together they keep a request
/// under `MAX_REQUEST_BYTES`.
pub const SIZE_MAX: u32 = 128 << 10;
pub const SEG_MAX: u32 = 126;
/// Sectors one discard or write-zeroes segment may cover (2 GiB).
pub const MAX_UNMAP_SECTORS: u32 = 1 << 22;
/// Offset of the `writeback` byte in the config space.
pub const WRITEBACK_OFFSET: usize = 32;
pub const CONFIG_LEN: usize = 60;

/// Feature bits offered (VhostUserVirtioFeatures::PROTOCOL_FEATURES is added by the backend).
pub fn features(read_only: bool, queues: u16) -> u64 {
    let mut bits = [
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_F_VERSION_1,
    ]
    .iter()
    .fold(0u64, |acc, b| acc | 1 << b);
    if read_only {
        bits |= 1 << VIRTIO_BLK_F_RO;
    }
    if queues > 1 {
        bits |= 1 << VIRTIO_BLK_F_MQ;
    }
    bits
}

/// `struct virtio_blk_config` (little-endian), as the guest reads it.
pub fn config_space(size: u64, block_size: u32, queues: u16, writeback: bool) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let put = |c: &mut [u8; CONFIG_LEN], at: usize, bytes: &[u8]| {
        c[at..at + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut c, 0, &(size / SECTOR).to_le_bytes());
    put(&mut c, 8, &SIZE_MAX.to_le_bytes());
    put(&mut c, 12, &SEG_MAX.to_le_bytes());
    // 16..20: geometry, unused.
    put(&mut c, 20, &(SECTOR as u32).to_le_bytes());
    // Topology: physical block = the volume's block size, I/O sizes in sectors.
    let per_block = (u64::from(block_size) / SECTOR).max(1);
    c[24] = per_block.trailing_zeros() as u8;
    c[25] = 0;
    put(&mut c, 26, &(per_block as u16).to_le_bytes());
    put(&mut c, 28, &(per_block as u32).to_le_bytes());
    c[WRITEBACK_OFFSET] = u8::from(writeback);
    put(&mut c, 34, &queues.to_le_bytes());
    put(&mut c, 36, &MAX_UNMAP_SECTORS.to_le_bytes());
    put(&mut c, 40, &(MAX_DISCARD_SEGMENTS as u32).to_le_bytes());
    put(&mut c, 44, &(per_block as u32).to_le_bytes());
    put(&mut c, 48, &MAX_UNMAP_SECTORS.to_le_bytes());
    put(&mut c, 52, &(MAX_DISCARD_SEGMENTS as u32).to_le_bytes());
    c[56] = 1; // write_zeroes_may_unmap
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout() {
        let c = config_space(1 << 30, 4096, 2, true);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[24], 3, "4 KiB physical blocks");
        assert_eq!(c[WRITEBACK_OFFSET], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert!(
            u64::from(SIZE_MAX) * u64::from(SEG_MAX) <= crate::request::MAX_REQUEST_BYTES as u64
        );
        assert_eq!(
            features(true, 1) & (1 << VIRTIO_BLK_F_RO),
            1 << VIRTIO_BLK_F_RO
        );
        assert_eq!(features(false, 1) & (1 << VIRTIO_BLK_F_MQ), 0);
    }
}
