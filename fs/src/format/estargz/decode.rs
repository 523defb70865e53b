//! Turning one chunk's compressed blob range into its verified plain bytes,
//! in memory bounded by the chunk's declared size.

use std::io::{self, Read};

use flate2::read::MultiGzDecoder;

use crate::Digest;
use crate::format::{Chunk, FormatError, MAX_CHUNK_SIZE};
use crate::num::usize_from;

/// One eStargz chunk: gunzip, skip `inner_offset`, take `size` bytes, check
/// their sha256.
///
/// Memory is bounded by the declared size, whatever the data inflates to:
/// the output is allocated once at exactly `size` (at most
/// [`MAX_CHUNK_SIZE`]) and filled by one `read_exact`, which inflates no
/// more than it needs; the skip streams through a small buffer. A gzip bomb
/// therefore costs at most `inner_offset + size` bytes of inflating.
pub(super) fn decode_chunk(chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
    if chunk.size > MAX_CHUNK_SIZE || chunk.inner_offset > MAX_CHUNK_SIZE {
        return Err(FormatError::ChunkTooLarge {
            offset: chunk.blob_range.0,
            size: chunk.size,
            inner_offset: chunk.inner_offset,
        });
    }
    let corrupt = |e: io::Error| {
        let what = if e.kind() == io::ErrorKind::UnexpectedEof {
            format!("short of its {} bytes", chunk.size)
        } else {
            e.to_string()
        };
        FormatError::Corrupt(format!(
            "chunk at blob offset {} (file offset {}): {what}",
            chunk.blob_range.0, chunk.file_offset
        ))
    };
    // Several members may follow each other in the range (another
    // writer's layout); the chunk's bytes start in the first one. What
    // comes after the chunk (tar padding, the next headers) is never read.
    let mut gz = MultiGzDecoder::new(compressed);
    let skipped =
        io::copy(&mut (&mut gz).take(chunk.inner_offset), &mut io::sink()).map_err(corrupt)?;
    if skipped != chunk.inner_offset {
        return Err(corrupt(io::ErrorKind::UnexpectedEof.into()));
    }
    let mut out = vec![0; usize_from(chunk.size)];
    gz.read_exact(&mut out).map_err(corrupt)?;
    let actual = Digest::of(&out);
    if actual != chunk.digest {
        return Err(FormatError::ChunkDigestMismatch {
            expected: chunk.digest,
            actual,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
