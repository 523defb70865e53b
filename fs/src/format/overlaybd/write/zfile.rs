//! [`ZFileWriter`]: a file compressed in blocks as a ZFile, written as it
//! comes (a [`Write`]): a placeholder header, each `block_size` plain
//! bytes as one raw LZ4 block followed by its CRC32C (seed
//! [`BLOCK_SEED`]), then the u32 length index and the trailer; last the
//! header is rewritten with the index's place (the header-overwrite flag),
//! as the reference tools do. Only the index (4 bytes a block) and one
//! block are kept in memory.

use std::io::{Seek, SeekFrom, Write};

use super::WriteError;
use crate::format::overlaybd::crc32c::{BLOCK_SEED, crc32c};
use crate::format::overlaybd::zfile::{HT_SIZE, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use crate::num::usize_from;

const MAGIC0: &[u8; 8] = b"ZFile\0\x01\0";
const MAGIC1: &[u8; 16] = b"tuji.yyf@Alibaba";
/// The `size` field: the bytes of header that carry fields.
const HT_FIELDS: u32 = 96;
const FLAG_HEADER: u32 = 1 << 0;
const FLAG_DATA_FILE: u32 = 1 << 1;
const FLAG_SEALED: u32 = 1 << 2;
const FLAG_HEADER_OVERWRITE: u32 = 1 << 3;
const FLAG_DIGEST: u32 = 1 << 4;
/// The algo field's value for LZ4.
const ALGO_LZ4: u8 = 1;

/// A ZFile being written to `out`, from its current position.
pub struct ZFileWriter<W: Write + Seek> {
    out: W,
    /// Where the ZFile starts in `out`.
    start: u64,
    block_size: usize,
    block_size_field: u32,
    /// Plain bytes of the block being filled.
    block: Vec<u8>,
    /// Compression buffer, reused.
    packed: Vec<u8>,
    lengths: Vec<u32>,
    raw_size: u64,
    /// Bytes of ZFile written so far.
    written: u64,
}

impl<W: Write + Seek> ZFileWriter<W> {
    /// Starts a ZFile of LZ4 blocks of `block_size` plain bytes (a power of
    /// two in 4..=64 KiB; the tools' default is 4 KiB).
    pub fn new(mut out: W, block_size: u32) -> Result<ZFileWriter<W>, WriteError> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(WriteError::Invalid(format!(
                "block size {block_size} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"
            )));
        }
        let block_size_field = block_size;
        let block_size = usize_from(u64::from(block_size));
        let start = out.stream_position()?;
        out.write_all(&[0u8; 512])?;
        Ok(ZFileWriter {
            out,
            start,
            block_size,
            block_size_field,
            block: Vec::with_capacity(block_size),
            packed: vec![0u8; lz4_flex::block::get_maximum_output_size(block_size)],
            lengths: Vec::new(),
            raw_size: 0,
            written: HT_SIZE,
        })
    }

    fn flush_block(&mut self) -> Result<(), WriteError> {
        if self.block.is_empty() {
            return Ok(());
        }
        let n = lz4_flex::block::compress_into(&self.block, &mut self.packed)
            .map_err(|e| WriteError::Invalid(format!("LZ4: {e}")))?;
        let packed = &self.packed[..n];
        let crc = crc32c(BLOCK_SEED, packed);
        self.out.write_all(packed)?;
        self.out.write_all(&crc.to_le_bytes())?;
        let stored = u32::try_from(n + 4)
            .map_err(|_| WriteError::Invalid(format!("a block compressed to {n} bytes")))?;
        self.lengths.push(stored);
        self.written += u64::from(stored);
        self.raw_size += self.block.len() as u64;
        self.block.clear();
        Ok(())
    }

    /// Writes the last block, the index and the trailer, and rewrites the
    /// header; returns the output (positioned after the trailer) and the
    /// ZFile's size.
    pub fn finish(mut self) -> Result<(W, u64), WriteError> {
        self.flush_block()?;
        let index: Vec<u8> = self.lengths.iter().flat_map(|l| l.to_le_bytes()).collect();
        let index_offset = self.written;
        self.out.write_all(&index)?;
        self.written += index.len() as u64;
        let index_crc = crc32c(0, &index);
        let trailer = self.ht(
            FLAG_DATA_FILE | FLAG_SEALED | FLAG_DIGEST,
            index_offset,
            index_crc,
        );
        self.out.write_all(&trailer)?;
        self.written += HT_SIZE;
        let header = self.ht(
            FLAG_HEADER | FLAG_DATA_FILE | FLAG_HEADER_OVERWRITE | FLAG_DIGEST,
            index_offset,
            index_crc,
        );
        let end = self.out.stream_position()?;
        self.out.seek(SeekFrom::Start(self.start))?;
        self.out.write_all(&header)?;
        self.out.seek(SeekFrom::Start(end))?;
        self.out.flush()?;
        Ok((self.out, self.written))
    }

    /// A header or trailer, its digest set.
    fn ht(&self, flags: u32, index_offset: u64, index_crc: u32) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..8].copy_from_slice(MAGIC0);
        h[8..24].copy_from_slice(MAGIC1);
        h[24..28].copy_from_slice(&HT_FIELDS.to_le_bytes());
        h[32..40].copy_from_slice(&u64::from(flags).to_le_bytes());
        h[40..48].copy_from_slice(&index_offset.to_le_bytes());
        h[48..56].copy_from_slice(&(self.lengths.len() as u64).to_le_bytes());
        h[56..64].copy_from_slice(&self.raw_size.to_le_bytes());
        h[64..68].copy_from_slice(&index_crc.to_le_bytes());
        h[72..76].copy_from_slice(&self.block_size_field.to_le_bytes());
        h[76] = ALGO_LZ4;
        // Per-block CRC32C on.
        h[88] = 1;
        let digest = crc32c(0, &h);
        h[28..32].copy_from_slice(&digest.to_le_bytes());
        h
    }
}

impl<W: Write + Seek> Write for ZFileWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = self.block_size - self.block.len();
        let n = room.min(buf.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == self.block_size {
            self.flush_block().map_err(std::io::Error::other)?;
        }
        Ok(n)
    }

    /// Blocks are written whole; a partial one waits for more or for
    /// [`ZFileWriter::finish`].
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}
