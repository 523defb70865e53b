//! Pack files: many small items appended to one file, each behind a header.
//!
//! A record is a 48-byte header followed by the item's bytes:
//!
//! ```text
//! 0..4    magic "TRNP"
//! 4..8    length of the data, u32 little endian
//! 8..40   sha256 digest of the data (the key)
//! 40..48  first 8 bytes of sha256(bytes 0..40): the header's own checksum
//! ```
//!
//! The header checksum lets a scan tell a real header from garbage (a zeroed
//! or half-written block after a crash), so the scan stops there instead of
//! trusting a wrong length. The data itself is not trusted by the scan: the
//! cache re-verifies it against the digest on first read.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};

use sha2::{Digest as _, Sha256};

use crate::Digest;

pub(super) const MAGIC: &[u8; 4] = b"TRNP";
pub(super) const HEADER_LEN: usize = 48;
/// The extension of a pack being rewritten without its dead records (see
/// `evict.rs`); a leftover one is a compaction a crash cut short.
pub(super) const COMPACTING_EXT: &str = "compacting";

/// The header bytes of a record holding `len` bytes with digest `digest`.
pub(super) fn header(digest: &Digest, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..40].copy_from_slice(&digest.0);
    let sum = Sha256::digest(&h[0..40]);
    h[40..48].copy_from_slice(&sum[0..8]);
    h
}

/// Decodes a header; `None` if it is not a valid one.
fn parse_header(h: &[u8; HEADER_LEN]) -> Option<(Digest, u32)> {
    if &h[0..4] != MAGIC {
        return None;
    }
    let sum = Sha256::digest(&h[0..40]);
    if h[40..48] != sum[0..8] {
        return None;
    }
    let len = u32::from_le_bytes(h[4..8].try_into().expect("4-byte slice"));
    let digest = Digest(h[8..40].try_into().expect("32-byte slice"));
    Some((digest, len))
}

/// One record found by [`scan`]: `data_offset` is where its bytes start.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Record {
    pub digest: Digest,
    pub data_offset: u64,
    pub len: u32,
}

/// Reads every record header of a pack. Returns the records and the length
/// of the valid prefix: anything after it (a torn or zeroed tail) is not a
/// sequence of whole records and the caller truncates it.
pub(super) fn scan(file: &File) -> io::Result<(Vec<Record>, u64)> {
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    reader.seek(SeekFrom::Start(0))?;
    let mut records = Vec::new();
    let mut pos = 0u64;
    let mut h = [0u8; HEADER_LEN];
    while pos + HEADER_LEN as u64 <= file_len {
        reader.read_exact(&mut h)?;
        let Some((digest, len)) = parse_header(&h) else {
            break;
        };
        let data_offset = pos + HEADER_LEN as u64;
        let end = data_offset + u64::from(len);
        if end > file_len {
            break;
        }
        records.push(Record {
            digest,
            data_offset,
            len,
        });
        // seek_relative keeps the buffer when the skip lands inside it.
        reader.seek_relative(i64::from(len))?;
        pos = end;
    }
    Ok((records, pos))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn write_record(f: &mut File, data: &[u8]) {
        let len = u32::try_from(data.len()).unwrap();
        f.write_all(&header(&Digest::of(data), len)).unwrap();
        f.write_all(data).unwrap();
    }

    #[test]
    fn scan_finds_records_and_stops_at_torn_or_zeroed_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let mut f = File::create(&path).unwrap();
        write_record(&mut f, b"hello");
        write_record(&mut f, b"");
        write_record(&mut f, &[7u8; 1000]);
        let good = f.metadata().unwrap().len();
        // A header whose data never made it to disk, then zeros.
        f.write_all(&header(&Digest::of(b"x"), 4000)).unwrap();
        f.write_all(&[0u8; 100]).unwrap();
        drop(f);

        let f = File::open(&path).unwrap();
        let (records, valid) = scan(&f).unwrap();
        assert_eq!(valid, good);
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].digest, Digest::of(b"hello"));
        assert_eq!(records[0].data_offset, HEADER_LEN as u64);
        assert_eq!(records[2].len, 1000);

        // A zeroed region where a header should be ends the scan too.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.set_len(good).unwrap();
        f.write_all(&[0u8; 200]).unwrap();
        write_record(&mut f, b"after the hole");
        let (records, valid) = scan(&File::open(&path).unwrap()).unwrap();
        assert_eq!((records.len(), valid), (3, good));
    }

    #[test]
    fn a_flipped_length_bit_invalidates_the_header() {
        let mut h = header(&Digest::of(b"abc"), 3);
        assert!(parse_header(&h).is_some());
        h[5] ^= 1;
        assert!(parse_header(&h).is_none());
    }
}
