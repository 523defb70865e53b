//! ZFile: the compression the reference tools wrap an LSMT file in.
//!
//! Layout: header (512 B) | [dictionary] | blocks | index | trailer (512 B).
//! Each block is `block_size` plain bytes (the last one short) compressed
//! on its own (raw LZ4, or a zstd frame), followed by a CRC32C of the
//! compressed bytes when `verify` is set. The index holds one `u32` per
//! block, its stored length (CRC included); a block's offset is the sum of
//! the lengths before it. The header carries the index's place when its
//! header-overwrite flag is set (current tools rewrite it at the end);
//! otherwise (older base layers) only the trailer does.

use std::ops::Range;

use super::ObdError;
use super::crc32c::{BLOCK_SEED, crc32c};
use super::le::{le_u32, le_u64};
use crate::num::usize_from;

/// Size of the header and of the trailer.
pub const HT_SIZE: u64 = 512;
const MAGIC0: &[u8; 8] = b"ZFile\0\x01\0";
const MAGIC1: &[u8; 16] = b"tuji.yyf@Alibaba";

const FLAG_HEADER: u32 = 1 << 0;
const FLAG_DATA_FILE: u32 = 1 << 1;
const FLAG_SEALED: u32 = 1 << 2;
const FLAG_HEADER_OVERWRITE: u32 = 1 << 3;
const FLAG_DIGEST: u32 = 1 << 4;
const FLAG_INDEX_COMPRESSED: u32 = 1 << 5;

/// Block sizes the reference tools accept (powers of two).
pub const MIN_BLOCK_SIZE: u32 = 4 << 10;
pub const MAX_BLOCK_SIZE: u32 = 64 << 10;
/// The most a compressed block may exceed its plain size: the writer
/// compresses into a buffer of `block_size + 512` bytes (LZ4's and zstd's
/// worst case for incompressible data stay well inside it).
pub const MAX_BLOCK_EXPANSION: u64 = 512;
/// The trailing CRC32C of a block, when `verify` is set.
pub const BLOCK_CRC_LEN: u64 = 4;
/// The most blocks one layer may have: 16 Mi (64 GiB of LSMT file at 4 KiB
/// blocks, 1 TiB at 64 KiB). Each costs about 4.5 bytes of index memory.
pub const MAX_BLOCKS: u64 = 16 << 20;
/// Blocks whose offset is kept; the ones between are summed from lengths.
const GROUP: usize = 16;

/// The compression of the blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    Lz4,
    Zstd,
}

/// What the header or trailer says about the blocks and their index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// Offset of the block-length index from the ZFile's start.
    pub index_offset: u64,
    /// Number of blocks (and of index entries).
    pub blocks: u64,
    /// Size of the plain (LSMT) file.
    pub raw_size: u64,
    pub block_size: u32,
    pub algo: Algo,
    /// Whether each block ends with a CRC32C.
    pub verify: bool,
    /// Offset of the first block (after the header and any dictionary).
    pub data_start: u64,
    /// The index's CRC32C (seed 0), when the digest flag says it is set.
    pub index_crc: Option<u32>,
}

/// What the header says: the index's place, or that only the trailer has it.
#[derive(Debug)]
pub enum HeaderSays {
    Info(Info),
    ReadTrailer,
}

impl Info {
    /// The index's range, from the ZFile's start.
    pub fn index_range(&self) -> Range<u64> {
        self.index_offset..self.index_offset + self.blocks * 4
    }
}

/// Whether `bytes` begin with ZFile's magic.
pub fn is_zfile(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC0) && bytes.get(8..24) == Some(&MAGIC1[..])
}

/// Parses the header (the ZFile's first 512 bytes) of a ZFile of `size`
/// bytes.
pub fn parse_header(h: &[u8; 512], size: u64) -> Result<HeaderSays, ObdError> {
    let flags = check_ht(h, "header")?;
    if flags & FLAG_HEADER == 0 {
        return Err(zfile("the header is marked as a trailer"));
    }
    if flags & FLAG_HEADER_OVERWRITE == 0 {
        return Ok(HeaderSays::ReadTrailer);
    }
    info(h, flags, size).map(HeaderSays::Info)
}

/// Parses the trailer (the ZFile's last 512 bytes) of a ZFile of `size`
/// bytes.
pub fn parse_trailer(t: &[u8; 512], size: u64) -> Result<Info, ObdError> {
    let flags = check_ht(t, "trailer")?;
    if flags & FLAG_HEADER != 0 {
        return Err(zfile("the trailer is marked as a header"));
    }
    if flags & FLAG_SEALED == 0 {
        return Err(zfile("the trailer is not sealed"));
    }
    info(t, flags, size)
}

/// Magic, data-file flag and, when flagged, the digest; returns the flags.
/// Only the low 32 bits of the 64-bit flags field count: old base layers
/// carry garbage in the upper ones, and the reference reader tests bits
/// with 32-bit masks.
fn check_ht(ht: &[u8; 512], what: &'static str) -> Result<u32, ObdError> {
    if !is_zfile(ht) {
        return Err(ObdError::BadMagic(format!("no ZFile magic in the {what}")));
    }
    let flags = le_u32(ht, 32);
    if flags & FLAG_DATA_FILE == 0 {
        return Err(zfile(format!("the {what} is not a data file's")));
    }
    if flags & FLAG_DIGEST != 0 {
        let expected = le_u32(ht, 28);
        let mut zeroed = *ht;
        zeroed[28..32].fill(0);
        let actual = crc32c(0, &zeroed);
        if actual != expected {
            return Err(ObdError::Crc {
                what: if what == "header" {
                    "ZFile header"
                } else {
                    "ZFile trailer"
                },
                expected,
                actual,
            });
        }
    }
    Ok(flags)
}

/// The index's place and the compression options, each bounded.
fn info(ht: &[u8; 512], flags: u32, size: u64) -> Result<Info, ObdError> {
    if flags & FLAG_INDEX_COMPRESSED != 0 {
        return Err(ObdError::Unsupported("compressed ZFile index".into()));
    }
    let block_size = le_u32(ht, 72);
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(zfile(format!(
            "block size {block_size} is not a power of two in {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"
        )));
    }
    let algo = match ht[76] {
        1 => Algo::Lz4,
        2 => Algo::Zstd,
        0 => return Err(ObdError::Unsupported("mini-LZO blocks".into())),
        other => return Err(zfile(format!("unknown compression {other}"))),
    };
    if ht[78] != 0 {
        return Err(ObdError::Unsupported("ZFile dictionary".into()));
    }
    let blocks = le_u64(ht, 48);
    if blocks > MAX_BLOCKS {
        return Err(zfile(format!(
            "{blocks} blocks, more than the limit of {MAX_BLOCKS}"
        )));
    }
    let raw_size = le_u64(ht, 56);
    if raw_size.div_ceil(u64::from(block_size)) != blocks {
        return Err(zfile(format!(
            "{blocks} blocks of {block_size} bytes cannot hold a file of {raw_size} bytes"
        )));
    }
    let index_offset = le_u64(ht, 40);
    let info = Info {
        index_offset,
        blocks,
        raw_size,
        block_size,
        algo,
        verify: ht[88] != 0,
        data_start: HT_SIZE,
        index_crc: (flags & FLAG_DIGEST != 0).then(|| le_u32(ht, 64)),
    };
    // The index lies between the blocks and the trailer.
    let trailer_start = size.saturating_sub(HT_SIZE);
    if index_offset < info.data_start || info.index_range().end > trailer_start {
        return Err(zfile(format!(
            "index {}..{} is not between the header and the trailer (at {trailer_start})",
            info.index_range().start,
            info.index_range().end
        )));
    }
    Ok(info)
}

/// A ZFile's blocks: where each lies and how it decodes.
#[derive(Clone, Debug)]
pub struct ZFile {
    info: Info,
    /// Stored length of each block.
    lengths: Vec<u32>,
    /// Offset of blocks 0, GROUP, 2 * GROUP, ...
    group_offsets: Vec<u64>,
}

impl ZFile {
    /// The blocks from the index bytes (`info.index_range()` of the ZFile),
    /// each length bounded and the blocks ending exactly at the index.
    pub fn new(info: Info, index: &[u8]) -> Result<ZFile, ObdError> {
        if index.len() as u64 != info.blocks * 4 {
            return Err(zfile(format!(
                "index of {} bytes for {} blocks",
                index.len(),
                info.blocks
            )));
        }
        if let Some(expected) = info.index_crc {
            let actual = crc32c(0, index);
            if actual != expected {
                return Err(ObdError::Crc {
                    what: "ZFile index",
                    expected,
                    actual,
                });
            }
        }
        let crc_len = if info.verify { BLOCK_CRC_LEN } else { 0 };
        let max_len = u64::from(info.block_size) + MAX_BLOCK_EXPANSION + crc_len;
        let mut lengths = Vec::with_capacity(usize_from(info.blocks));
        let mut group_offsets = Vec::with_capacity(usize_from(info.blocks) / GROUP + 1);
        let mut offset = info.data_start;
        for (i, entry) in index.chunks_exact(4).enumerate() {
            let len = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
            if u64::from(len) <= crc_len || u64::from(len) > max_len {
                return Err(zfile(format!(
                    "block {i} is {len} bytes long, not in {}..={max_len} for blocks of {}",
                    crc_len + 1,
                    info.block_size
                )));
            }
            if i.is_multiple_of(GROUP) {
                group_offsets.push(offset);
            }
            lengths.push(len);
            offset += u64::from(len);
        }
        if offset != info.index_offset {
            return Err(zfile(format!(
                "the blocks end at {offset}, not where the index starts ({})",
                info.index_offset
            )));
        }
        Ok(ZFile {
            info,
            lengths,
            group_offsets,
        })
    }

    pub fn info(&self) -> &Info {
        &self.info
    }

    /// The blocks that hold plain bytes `raw` (clamped to the file).
    pub fn blocks_for(&self, raw: Range<u64>) -> Range<u64> {
        let bs = u64::from(self.info.block_size);
        let end = raw.end.min(self.info.raw_size);
        if raw.start >= end {
            return 0..0;
        }
        raw.start / bs..end.div_ceil(bs)
    }

    /// Offset of block `i` (`i <= blocks`) from the ZFile's start.
    fn offset(&self, i: u64) -> u64 {
        if i >= self.info.blocks {
            return self.info.index_offset;
        }
        let i = usize_from(i);
        let group = i / GROUP;
        let base = self.group_offsets[group];
        base + self.lengths[group * GROUP..i]
            .iter()
            .map(|&l| u64::from(l))
            .sum::<u64>()
    }

    /// Where blocks `blocks` lie, from the ZFile's start.
    pub fn stored_range(&self, blocks: Range<u64>) -> Range<u64> {
        self.offset(blocks.start)..self.offset(blocks.end)
    }

    /// Plain offset of block `i`'s first byte.
    pub fn plain_start(&self, i: u64) -> u64 {
        i * u64::from(self.info.block_size)
    }

    /// Decodes blocks `blocks` from their stored bytes (exactly
    /// `stored_range(blocks)`): each block's CRC is checked and it must
    /// decompress to exactly its plain size.
    pub fn decode(&self, blocks: Range<u64>, stored: &[u8]) -> Result<Vec<u8>, ObdError> {
        let range = self.stored_range(blocks.clone());
        if stored.len() as u64 != range.end - range.start {
            return Err(zfile(format!(
                "{} bytes handed in for blocks {}..{}, which take {}",
                stored.len(),
                blocks.start,
                blocks.end,
                range.end - range.start
            )));
        }
        let plain_end = self.info.raw_size.min(self.plain_start(blocks.end));
        let mut out = vec![0u8; usize_from(plain_end - self.plain_start(blocks.start))];
        let mut at = 0usize;
        let mut written = 0usize;
        for i in blocks {
            let len = usize_from(u64::from(self.lengths[usize_from(i)]));
            let plain_len =
                usize_from(self.info.raw_size.min(self.plain_start(i + 1)) - self.plain_start(i));
            self.decode_one(
                i,
                &stored[at..at + len],
                &mut out[written..written + plain_len],
            )?;
            at += len;
            written += plain_len;
        }
        Ok(out)
    }

    fn decode_one(&self, i: u64, stored: &[u8], out: &mut [u8]) -> Result<(), ObdError> {
        let block = |reason: String| ObdError::Block { block: i, reason };
        let compressed = if self.info.verify {
            let (data, crc) = stored.split_at(stored.len() - 4);
            let expected = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
            let actual = crc32c(BLOCK_SEED, data);
            if actual != expected {
                return Err(block(format!(
                    "CRC32C is {actual:#010x}, the blob says {expected:#010x}"
                )));
            }
            data
        } else {
            stored
        };
        let n = match self.info.algo {
            Algo::Lz4 => lz4_flex::block::decompress_into(compressed, out)
                .map_err(|e| block(format!("LZ4: {e}")))?,
            Algo::Zstd => ruzstd::decoding::FrameDecoder::new()
                .decode_all(compressed, out)
                .map_err(|e| block(format!("zstd: {e}")))?,
        };
        if n != out.len() {
            return Err(block(format!(
                "decompressed to {n} bytes, not {}",
                out.len()
            )));
        }
        Ok(())
    }
}

fn zfile(why: impl Into<String>) -> ObdError {
    ObdError::ZFile(why.into())
}
