//! Pure decoding of lazy layer formats: bytes in, structures out, no I/O.
//!
//! A [`Format`] says which blob bytes it needs to build a layer's
//! [`LayerIndex`] (the fetcher fetches them), builds it from them, and turns
//! a fetched compressed range into verified plain chunks. eStargz is the
//! first format; zstd:chunked and overlaybd fit beside it behind the same
//! trait (see [`Format`]). The one encoder, eStargz's writer, is for tests
//! and benchmarks only (`estargz::write`, the `writer` feature).

pub mod estargz;
pub mod index;
pub mod overlaybd;

use std::ops::Range;

use bytes::Bytes;

pub use estargz::Estargz;
pub use index::{Chunk, FileKind, Inode, InodeSpec, LayerIndex, ROOT_INO, Xattr};

/// The most plain bytes one chunk may declare (its `size`, and separately
/// the `inner_offset` skipped before it): a decoder holds a chunk whole in
/// memory, so this bounds what one hostile chunk can make it allocate or
/// inflate. eStargz writers cut files into 4 MiB chunks by default and a
/// file smaller than that is one chunk; only a large file written without
/// chunk entries declares more, and reading it fails with
/// [`FormatError::ChunkTooLarge`] (the rest of its layer still reads).
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

/// Why a layer or a chunk could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("no eStargz footer: {0}")]
    Footer(String),
    #[error("invalid TOC: {0}")]
    Toc(String),
    #[error("inconsistent layer index: {0}")]
    Index(String),
    /// The layer's index would need more memory than its budget.
    #[error(
        "the layer's index needs more than its budget of {} MiB (refused after {entries} TOC entries; \
         the bound is [snapshotter] max_index_mb, or tarn mount-layer --max-index-mb)",
        limit >> 20
    )]
    IndexBudget { limit: u64, entries: u64 },
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
    #[error(
        "chunk at blob offset {offset} declares {size} bytes after an inner offset of \
         {inner_offset}, more than the limit of {MAX_CHUNK_SIZE} each"
    )]
    ChunkTooLarge {
        offset: u64,
        size: u64,
        inner_offset: u64,
    },
    #[error("corrupt compressed data: {0}")]
    Corrupt(String),
}

/// Blob bytes `[offset, offset + bytes.len())`, fetched for a format.
#[derive(Clone, Debug)]
pub struct Piece {
    pub offset: u64,
    pub bytes: Bytes,
}

impl Piece {
    pub fn end(&self) -> u64 {
        self.offset + self.bytes.len() as u64
    }
}

/// What a format needs next to build a layer's index.
#[derive(Debug)]
pub enum IndexStep {
    /// Fetch these blob bytes, then ask again with them added.
    Fetch(Range<u64>),
    /// The index is built. `data_end`: where the blob's chunk data ends and
    /// the format's own metadata (index, footer) begins.
    Ready { index: LayerIndex, data_end: u64 },
}

/// A lazy layer format: how a layer's index comes out of its blob, and how a
/// chunk's compressed bytes become verified plain bytes. Pure: it never
/// fetches; the fetcher fetches what it asks for and calls it on the
/// blocking pool.
///
/// - A file format (eStargz, zstd:chunked) asks for the blob's tail, finds
///   its footer there, asks for whatever part of its TOC the tail lacks, and
///   returns one inode per entry, each file's chunks being compression
///   members named by the sha256 of their plain bytes.
/// - A block format (overlaybd) asks for its trailers, then its block-length
///   index, then the blocks that hold its extent index, and returns an index
///   of one regular file (the virtual disk) whose chunks are its compressed
///   blocks; `decode_chunk` decompresses one and checks its CRC.
pub trait Format: Send + Sync {
    /// Given the blob bytes fetched so far (`fetched`, in the order they
    /// were asked for; empty at first), either the next range to fetch or
    /// the index. A format that asks for the blob's end first gets the
    /// chunks wholly inside that tail cached without a GET of their own.
    /// `expected`: the digest the image promised for the format's metadata
    /// (eStargz: the TOC's); metadata that differs is refused before it is
    /// parsed. `None` trusts it (chunks are still verified).
    fn index_step(
        &self,
        fetched: &[Piece],
        blob_size: u64,
        expected: Option<crate::Digest>,
    ) -> Result<IndexStep, FormatError>;

    /// `compressed` is exactly `chunk.blob_range()` of the blob. Returns the
    /// chunk's `size` plain bytes, only if they pass the format's check
    /// (eStargz: their sha256 equals `chunk.digest`).
    fn decode_chunk(&self, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>, FormatError>;
}
