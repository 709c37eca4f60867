//! Which kind of request a virtio-blk request type counts as, for the volume's IO statistics
//! and limits (`strata_engine::qos`, shared with the FUSE frontend).

use crate::request::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
#[cfg(feature = "engine")]
pub use strata_engine::qos::{IoStats, Op, VolumeIo, LATENCY_BUCKETS_US, OPS};

/// Without the engine (the fuzz targets build only the request handling), the same module
/// compiled from the engine's source: one implementation, whichever way the crate is built.
#[cfg(not(feature = "engine"))]
#[path = "../../engine/src/qos.rs"]
mod qos;
#[cfg(not(feature = "engine"))]
pub use qos::{IoStats, Op, VolumeIo, LATENCY_BUCKETS_US, OPS};

/// The [`Op`] of virtio-blk request type `kind`.
pub fn op_of(kind: u32) -> Op {
    match kind {
        VIRTIO_BLK_T_IN => Op::Read,
        VIRTIO_BLK_T_OUT => Op::Write,
        VIRTIO_BLK_T_FLUSH => Op::Flush,
        VIRTIO_BLK_T_DISCARD => Op::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => Op::WriteZeroes,
        _ => Op::Other,
    }
}
