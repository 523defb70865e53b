//! LSMT: one layer's sparse diff of the virtual disk.
//!
//! Layout: header (4 KiB) | data | index | trailer (4 KiB). The index is a
//! sorted array of 16-byte records, each mapping a range of the virtual
//! disk (in 512-byte sectors) to sectors of this file's data, or marking it
//! zeroed (a hole punched through the layers below). Real blobs leave the
//! header's index fields 0: the trailer is the one to read.

use std::ops::Range;

use super::ObdError;
use super::le::{le_u32, le_u64};
use crate::num::usize_from;

/// Size of the header and of the trailer.
pub const HT_SIZE: u64 = 4096;
/// The unit of the index's offsets and lengths.
pub const SECTOR: u64 = 512;
/// Size of one index record.
pub const RECORD_SIZE: u64 = 16;
/// The most records one layer's index may hold: the reference reader's
/// own limit for a read-only layer.
pub const MAX_RECORDS: u64 = 1_000_000;
/// The largest virtual disk accepted: 1 TiB. The reference tools make
/// 64 GiB disks by default; anything near this bound is a mistake or an
/// attack, and the disk becomes a file and a loop device here.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 40;
/// The offset of padding ("dummy") records: 2^50 - 1, length 0.
const INVALID_OFFSET: u64 = (1 << 50) - 1;

const MAGIC0: &[u8; 8] = b"LSMT\0\x01\x02\0";
const MAGIC1: [u8; 16] = [
    0x65, 0x7E, 0x63, 0xD2, 0x94, 0x44, 0x08, 0x4C, 0xA2, 0xD2, 0xC8, 0xEC, 0x4F, 0xCF, 0xAE, 0x8A,
];
const FLAG_HEADER: u32 = 1 << 0;
const FLAG_DATA_FILE: u32 = 1 << 1;
const FLAG_SEALED: u32 = 1 << 2;

/// Whether `bytes` begin with LSMT's magic.
pub fn is_lsmt(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC0) && bytes.get(8..24) == Some(&MAGIC1[..])
}

/// What the trailer says, bounded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// Byte offset of the index in the LSMT file.
    pub index_offset: u64,
    /// Number of records, padding included.
    pub records: u64,
    /// Size of the virtual disk in bytes.
    pub virtual_size: u64,
}

impl Trailer {
    /// The index's byte range in the LSMT file.
    pub fn index_range(&self) -> Range<u64> {
        self.index_offset..self.index_offset + self.records * RECORD_SIZE
    }
}

/// Parses the trailer (the last 4 KiB) of an LSMT file of `file_size`
/// bytes.
pub fn parse_trailer(t: &[u8; 4096], file_size: u64) -> Result<Trailer, ObdError> {
    if !is_lsmt(t) {
        return Err(ObdError::BadMagic("no LSMT magic in the trailer".into()));
    }
    let flags = le_u32(t, 28);
    if flags & FLAG_HEADER != 0 {
        return Err(lsmt("the trailer is marked as a header"));
    }
    if flags & FLAG_DATA_FILE == 0 || flags & FLAG_SEALED == 0 {
        return Err(lsmt("the trailer is not a sealed data file's"));
    }
    let virtual_size = le_u64(t, 48);
    if virtual_size == 0 || !virtual_size.is_multiple_of(SECTOR) || virtual_size > MAX_VIRTUAL_SIZE
    {
        return Err(lsmt(format!(
            "virtual size {virtual_size} is not a whole number of sectors in 1..={MAX_VIRTUAL_SIZE}"
        )));
    }
    let records = le_u64(t, 40);
    if records > MAX_RECORDS {
        return Err(lsmt(format!(
            "index of {records} records, more than the limit of {MAX_RECORDS}"
        )));
    }
    let trailer = Trailer {
        index_offset: le_u64(t, 32),
        records,
        virtual_size,
    };
    let index = trailer.index_range();
    let trailer_start = file_size.saturating_sub(HT_SIZE);
    if index.start < HT_SIZE || index.end > trailer_start {
        return Err(lsmt(format!(
            "index {}..{} is not between the header and the trailer (at {trailer_start})",
            index.start, index.end
        )));
    }
    Ok(trailer)
}

/// One mapping of the index: `length` sectors of the virtual disk from
/// `offset`, either zeroed or read from this file's sector `moffset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First sector of the virtual disk.
    pub offset: u64,
    /// Sector in the LSMT file (meaningless when `zeroed`).
    pub moffset: u64,
    /// Length in sectors (1..=16383).
    pub length: u32,
    pub zeroed: bool,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.length)
    }
}

/// The extents of an index (`trailer.index_range()` of the file): padding
/// records dropped, tags ignored, every other record inside the virtual
/// disk and the file's data, sorted and not overlapping.
pub fn parse_index(index: &[u8], trailer: &Trailer) -> Result<Vec<Extent>, ObdError> {
    let range = trailer.index_range();
    if index.len() as u64 != range.end - range.start {
        return Err(lsmt(format!(
            "index of {} bytes for {} records",
            index.len(),
            trailer.records
        )));
    }
    let disk_sectors = trailer.virtual_size / SECTOR;
    // Data lies between the header and the index.
    let data = HT_SIZE / SECTOR..trailer.index_offset / SECTOR;
    let mut extents = Vec::with_capacity(usize_from(trailer.records));
    let mut prev_end = 0u64;
    for (i, record) in index.chunks_exact(usize_from(RECORD_SIZE)).enumerate() {
        let a = le_u64(record, 0);
        let b = le_u64(record, 8);
        let offset = a & ((1 << 50) - 1);
        let length = u32::try_from(a >> 50).unwrap_or(u32::MAX);
        if offset == INVALID_OFFSET {
            continue;
        }
        let extent = Extent {
            offset,
            moffset: b & ((1 << 55) - 1),
            length,
            zeroed: (b >> 55) & 1 == 1,
        };
        if length == 0 {
            return Err(lsmt(format!("record {i} maps no sectors")));
        }
        if extent.end() > disk_sectors {
            return Err(lsmt(format!(
                "record {i} maps sectors {}..{}, past the virtual disk's {disk_sectors}",
                extent.offset,
                extent.end()
            )));
        }
        if extent.offset < prev_end {
            return Err(lsmt(format!(
                "record {i} at sector {} overlaps or precedes the one before (ending at {prev_end})",
                extent.offset
            )));
        }
        if !extent.zeroed {
            let m_end = extent.moffset + u64::from(length);
            if extent.moffset < data.start || m_end > data.end {
                return Err(lsmt(format!(
                    "record {i} reads sectors {}..{m_end} of the file, outside its data {}..{}",
                    extent.moffset, data.start, data.end
                )));
            }
        }
        prev_end = extent.end();
        extents.push(extent);
    }
    Ok(extents)
}

fn lsmt(why: impl Into<String>) -> ObdError {
    ObdError::Lsmt(why.into())
}
