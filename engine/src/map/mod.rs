//! The extent map: which stored bytes back each block of a volume.
//!
//! * [`extent`]: a [`Loc`] says where a run of blocks is stored (a local data segment, or a
//!   remote pack); an [`Extent`] is a run of blocks with its location.
//! * [`chunk`]: a [`Chunk`] holds the extents of [`CHUNK_BLOCKS`] consecutive blocks, sorted,
//!   and knows which layer owns it. It is the unit of copy-on-write and of persistence.
//! * [`tree`]: a [`Tree`] is a persistent radix tree of chunks: cloning it is O(1), and a
//!   change copies only the path to the chunk it touches.
//!
//! Nothing here knows about segments, RocksDB or the store: callers apply the reference
//! changes the edits report (see [`chunk::Replaced`]) to their own space accounting.

pub mod chunk;
pub mod extent;
pub mod tree;

pub use chunk::{Chunk, Replaced};
pub use extent::{Extent, Loc, Piece, CHUNK_BITS, CHUNK_BLOCKS, PAGE_SIZE, REMOTE_BASE};
pub use tree::{SharedChunk, Tree, ANY_OWNER};
