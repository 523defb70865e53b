//! [`Plain`]: the identity format, and chunk layouts for it.

use crate::Digest;
use crate::format::{Chunk, Format, FormatError, IndexStep, Piece};

/// Chunks stored uncompressed; verification is real (sha256 of the bytes
/// against `chunk.digest`). It has no index of its own: tests build the
/// [`LayerIndex`](crate::format::LayerIndex) by hand and give it to
/// `Layer::new`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Plain;

impl Format for Plain {
    fn index_step(
        &self,
        _fetched: &[Piece],
        _blob_size: u64,
        _expected: Option<Digest>,
    ) -> Result<IndexStep, FormatError> {
        Err(FormatError::Index(
            "the plain test format has no index in its blob; build one by hand".into(),
        ))
    }

    fn decode_chunk(&self, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
        let actual = Digest::of(compressed);
        if actual != chunk.digest {
            return Err(FormatError::ChunkDigestMismatch {
                expected: chunk.digest,
                actual,
            });
        }
        Ok(compressed.to_vec())
    }
}

/// Splits `data` into chunks of `size` laid out back to back in the blob.
pub fn chunks_of(data: &[u8], size: usize) -> Vec<Chunk> {
    data.chunks(size)
        .enumerate()
        .map(|(i, piece)| {
            let start = (i * size) as u64;
            Chunk {
                file_offset: start,
                size: piece.len() as u64,
                digest: Digest::of(piece),
                blob_range: (start, start + piece.len() as u64),
                inner_offset: 0,
            }
        })
        .collect()
}

/// A one-byte chunk at blob range `[start, end)`, named by its start: for
/// tests of GET planning, which look only at ranges.
pub fn chunk_at(start: u64, end: u64) -> Chunk {
    Chunk {
        file_offset: 0,
        size: 1,
        digest: Digest::of(&start.to_le_bytes()),
        blob_range: (start, end),
        inner_offset: 0,
    }
}

/// `len` bytes that repeat only every 251, so misplaced chunks show.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i * 7 % 251).expect("below 251"))
        .collect()
}
