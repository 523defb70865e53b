//! [`LsmtWriter`]: an LSMT file written front to back. The header goes out
//! first with its index fields 0 (as the reference tools leave them), then
//! the data of each extent as it comes, then the index (16-byte records
//! padded with dummy records to a 4 KiB multiple) and the trailer that
//! says where the index is. Only the index (16 bytes an extent) is kept in
//! memory.

use std::io::Write;

use super::WriteError;
use crate::format::overlaybd::lsmt::{HT_SIZE, MAX_VIRTUAL_SIZE, RECORD_SIZE, SECTOR};

/// The longest extent a record holds: its length field has 14 bits.
pub const MAX_EXTENT_SECTORS: u64 = (1 << 14) - 1;
const INVALID_OFFSET: u64 = (1 << 50) - 1;
const MAGIC0: &[u8; 8] = b"LSMT\0\x01\x02\0";
const MAGIC1: [u8; 16] = [
    0x65, 0x7E, 0x63, 0xD2, 0x94, 0x44, 0x08, 0x4C, 0xA2, 0xD2, 0xC8, 0xEC, 0x4F, 0xCF, 0xAE, 0x8A,
];
/// The header's `size` field: the bytes of header that carry fields.
const HT_FIELDS: u32 = 390;
/// Header: header | data file | sealed; trailer: data file | sealed (the
/// values in the reference tools' blobs).
const HEADER_FLAGS: u32 = 0b111;
const TRAILER_FLAGS: u32 = 0b110;
/// Length of a uuid field: 36 characters and a NUL.
const UUID_LEN: usize = 37;

/// A uuid as the reference tools print it (upper-case hex, 8-4-4-4-12)
/// from 16 bytes (tarn takes them from a digest, so a conversion is
/// reproducible).
pub fn uuid_from(bytes: &[u8; 16]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02X}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// An LSMT file being written to `out`.
pub struct LsmtWriter<W: Write> {
    out: W,
    virtual_size: u64,
    uuid: String,
    parent_uuid: String,
    /// Bytes written so far (the next data's byte offset in the file).
    written: u64,
    /// The first sector the next extent may start at.
    next_sector: u64,
    records: Vec<[u8; 16]>,
}

impl<W: Write> LsmtWriter<W> {
    /// Starts the file: writes its header. `parent_uuid` is the layer
    /// below's uuid, or `None` for a base layer (all zeros, as the tools
    /// write it).
    pub fn new(
        out: W,
        virtual_size: u64,
        uuid: &str,
        parent_uuid: Option<&str>,
    ) -> Result<LsmtWriter<W>, WriteError> {
        if virtual_size == 0
            || !virtual_size.is_multiple_of(SECTOR)
            || virtual_size > MAX_VIRTUAL_SIZE
        {
            return Err(WriteError::Invalid(format!(
                "virtual size {virtual_size} is not a whole number of sectors in 1..={MAX_VIRTUAL_SIZE}"
            )));
        }
        let parent = parent_uuid.unwrap_or("00000000-0000-0000-0000-000000000000");
        for u in [uuid, parent] {
            if u.len() >= UUID_LEN {
                return Err(WriteError::Invalid(format!("uuid {u:?} is too long")));
            }
        }
        let mut w = LsmtWriter {
            out,
            virtual_size,
            uuid: uuid.to_string(),
            parent_uuid: parent.to_string(),
            written: 0,
            next_sector: 0,
            records: Vec::new(),
        };
        let header = w.ht(HEADER_FLAGS, 0, 0);
        w.out.write_all(&header)?;
        w.written = HT_SIZE;
        Ok(w)
    }

    /// Maps sectors from `offset` to `data` (a whole number of sectors, at
    /// most [`MAX_EXTENT_SECTORS`] of them), after every extent before.
    pub fn put(&mut self, offset: u64, data: &[u8]) -> Result<(), WriteError> {
        let len = data.len() as u64;
        if !len.is_multiple_of(SECTOR) {
            return Err(WriteError::Invalid(format!(
                "{len} bytes of data is not a whole number of sectors"
            )));
        }
        let sectors = len / SECTOR;
        self.record(offset, sectors, self.written / SECTOR, false)?;
        self.out.write_all(data)?;
        self.written += len;
        Ok(())
    }

    /// Marks `sectors` from `offset` zeroed: a hole through the layers
    /// below.
    pub fn zero(&mut self, offset: u64, sectors: u64) -> Result<(), WriteError> {
        self.record(offset, sectors, 0, true)
    }

    fn record(
        &mut self,
        offset: u64,
        sectors: u64,
        moffset: u64,
        zeroed: bool,
    ) -> Result<(), WriteError> {
        let disk = self.virtual_size / SECTOR;
        if sectors == 0
            || sectors > MAX_EXTENT_SECTORS
            || offset < self.next_sector
            || offset + sectors > disk
        {
            return Err(WriteError::Order {
                offset,
                sectors,
                after: self.next_sector,
                disk,
            });
        }
        self.records.push(record(offset, sectors, moffset, zeroed));
        self.next_sector = offset + sectors;
        Ok(())
    }

    /// Writes the index and the trailer; returns the output and the file's
    /// size.
    pub fn finish(mut self) -> Result<(W, u64), WriteError> {
        let index_offset = self.written;
        let per_page = usize::try_from(HT_SIZE / RECORD_SIZE).unwrap_or(256);
        while self.records.is_empty() || !self.records.len().is_multiple_of(per_page) {
            self.records.push(record(INVALID_OFFSET, 0, 0, false));
        }
        for r in &self.records {
            self.out.write_all(r)?;
        }
        let n = self.records.len() as u64;
        self.written += n * RECORD_SIZE;
        let trailer = self.ht(TRAILER_FLAGS, index_offset, n);
        self.out.write_all(&trailer)?;
        self.written += HT_SIZE;
        self.out.flush()?;
        Ok((self.out, self.written))
    }

    /// A header or trailer.
    fn ht(&self, flags: u32, index_offset: u64, records: u64) -> Vec<u8> {
        let mut h = vec![0u8; 4096];
        h[..8].copy_from_slice(MAGIC0);
        h[8..24].copy_from_slice(&MAGIC1);
        h[24..28].copy_from_slice(&HT_FIELDS.to_le_bytes());
        h[28..32].copy_from_slice(&flags.to_le_bytes());
        h[32..40].copy_from_slice(&index_offset.to_le_bytes());
        h[40..48].copy_from_slice(&records.to_le_bytes());
        h[48..56].copy_from_slice(&self.virtual_size.to_le_bytes());
        h[56..56 + self.uuid.len()].copy_from_slice(self.uuid.as_bytes());
        h[93..93 + self.parent_uuid.len()].copy_from_slice(self.parent_uuid.as_bytes());
        // version 1.1
        h[132] = 1;
        h[133] = 1;
        h
    }
}

/// One 16-byte index record.
fn record(offset: u64, length: u64, moffset: u64, zeroed: bool) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&(offset | (length << 50)).to_le_bytes());
    r[8..].copy_from_slice(&(moffset | (u64::from(zeroed) << 55)).to_le_bytes());
    r
}
