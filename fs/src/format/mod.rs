//! Pure decoding of lazy layer formats: bytes in, structures out, no I/O.
//!
//! A format turns a layer's table of contents into a [`LayerIndex`] and turns
//! a fetched compressed range into verified plain chunks. eStargz is the first
//! format; zstd:chunked and overlaybd fit beside it behind [`ChunkDecoder`].

pub mod estargz;
pub mod index;

pub use index::{Chunk, FileKind, Inode, InodeSpec, LayerIndex, ROOT_INO, Xattr};

/// Why a layer or a chunk could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("no eStargz footer: {0}")]
    Footer(String),
    #[error("invalid TOC: {0}")]
    Toc(String),
    #[error("inconsistent layer index: {0}")]
    Index(String),
    #[error("TOC digest {actual} does not match the layer's annotation {expected}")]
    TocDigestMismatch {
        expected: crate::Digest,
        actual: crate::Digest,
    },
    #[error("chunk {expected} failed verification (got {actual})")]
    ChunkDigestMismatch {
        expected: crate::Digest,
        actual: crate::Digest,
    },
    #[error("corrupt compressed data: {0}")]
    Corrupt(String),
}

/// Turns the compressed bytes of one chunk's blob range into its verified
/// plain bytes.
pub trait ChunkDecoder: Send + Sync {
    /// `compressed` is exactly `chunk.blob_range()` of the blob. Returns the
    /// chunk's `size` bytes, only if their sha256 equals `chunk.digest`.
    fn decode_chunk(&self, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>, FormatError>;
}
