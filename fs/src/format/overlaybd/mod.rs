//! overlaybd: an image whose layers are block diffs of one virtual disk
//! holding an ext4 filesystem (containerd/overlaybd, DADI).
//!
//! A layer blob, as the reference tools push it, is an LSMT file
//! ([`lsmt`]: header, data, an index of extents in 512-byte sectors,
//! trailer), usually compressed in blocks as a ZFile ([`zfile`]), usually
//! inside a tar wrapper ([`wrapper`]). Reading one:
//!
//! 1. [`open_step`] asks for byte ranges of the blob until it has the
//!    layer's [`Layer`] (wrapper stripped, ZFile block index, LSMT
//!    extents), every field bounded; [`open_blob`] drives it over a blob in
//!    memory, [`open_layer`] over a [`BlobSource`];
//! 2. [`DiskMap::stack`] merges an image's layers (bottom first) into one
//!    map of the disk: upper layers win, zeroed extents punch holes;
//! 3. [`StackedDisk`] reads any byte range of that disk from the blobs:
//!    the blocks that hold it are fetched, CRC-checked and decompressed
//!    (no cache: the reference path for tests); [`Overlaybd`] is the same
//!    layer as a fetch-engine [`Format`](crate::format::Format), which
//!    `crate::disk` serves lazily.
//!
//! [`write`] (feature `writer`) writes layers as the reference tools do,
//! for `tarn convert`.
//!
//! Pure except [`read`]: the parsing and the map never do I/O. Every field
//! that comes from the blob is bounded before it is used (the limits are
//! named constants of [`lsmt`], [`zfile`] and [`stack`]); a malformed blob
//! is refused with a one-line [`ObdError`], never a panic.
//!
//! [`BlobSource`]: crate::registry::BlobSource

mod crc32c;
mod error;
mod format;
mod le;
pub mod lsmt;
mod open;
pub mod read;
pub mod stack;
pub mod trace;
pub mod wrapper;
#[cfg(feature = "writer")]
pub mod write;
pub mod zfile;

#[cfg(test)]
mod tests;

pub use crc32c::{BLOCK_SEED, crc32c};
pub use error::ObdError;
pub use format::{LSMT_INO, LSMT_NAME, Overlaybd, RAW_CHUNK, block_key};
pub use lsmt::{Extent, MAX_RECORDS, MAX_VIRTUAL_SIZE, SECTOR};
pub use open::{
    HEAD_FETCH, LSMT_TAIL_FETCH, Layer, MAX_OPEN_STEPS, OpenStep, Store, open_blob, open_step,
};
pub use read::{StackedDisk, open_layer};
pub use stack::{DiskMap, Segment, Source};
