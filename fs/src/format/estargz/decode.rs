//! Turning one chunk's compressed blob range into its verified plain bytes.

use std::io::{self, Read};

use flate2::read::MultiGzDecoder;

use crate::Digest;
use crate::format::{Chunk, FormatError};

const INITIAL_CAPACITY: u64 = 16 << 20;

/// One eStargz chunk: gunzip, skip `inner_offset`, take `size` bytes, check
/// their sha256.
pub(super) fn decode_chunk(chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
    let corrupt = |e: io::Error| {
        FormatError::Corrupt(format!(
            "chunk at blob offset {} (file offset {}): {e}",
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
    // The buffer grows with what really decompresses, so a hostile size
    // cannot make us allocate more than the data can expand to.
    let mut out = Vec::with_capacity(chunk.size.min(INITIAL_CAPACITY) as usize);
    gz.take(chunk.size).read_to_end(&mut out).map_err(corrupt)?;
    if out.len() as u64 != chunk.size {
        return Err(FormatError::Corrupt(format!(
            "chunk at blob offset {} is short: {} of {} bytes",
            chunk.blob_range.0,
            out.len(),
            chunk.size
        )));
    }
    let actual = Digest::of(&out);
    if actual != chunk.digest {
        return Err(FormatError::ChunkDigestMismatch {
            expected: chunk.digest,
            actual,
        });
    }
    Ok(out)
}
