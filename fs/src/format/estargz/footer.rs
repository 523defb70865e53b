//! The eStargz footer: an empty gzip member at the end of the blob whose
//! extra field carries the offset of the TOC's gzip member.

use std::io::Read;
use std::ops::Range;

use flate2::read::GzDecoder;

use crate::format::FormatError;
use crate::num::usize_from;

/// Size of the current footer (extra field `SG` subfield, XLEN = 26).
pub const FOOTER_SIZE: usize = 51;
/// Size of the legacy stargz footer (bare extra field, XLEN = 22).
pub const LEGACY_FOOTER_SIZE: usize = 47;

/// The subfield payload: 16 lowercase hex digits then this magic.
const MAGIC: &[u8] = b"STARGZ";
const PAYLOAD_LEN: usize = 16 + MAGIC.len();
/// `PAYLOAD_LEN` as the subfield header's little-endian `u16` length.
// Never truncates: the payload is 22 bytes, which the assertion below checks.
#[allow(clippy::cast_possible_truncation)]
const PAYLOAD_LEN_LE: [u8; 2] = (PAYLOAD_LEN as u16).to_le_bytes();
const _: () = assert!(PAYLOAD_LEN <= u16::MAX as usize);

/// Where a blob's TOC lives, as told by its footer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TocLocation {
    /// Blob offset of the TOC's gzip member.
    pub toc_offset: u64,
    /// Which footer form the blob ends with (51 or 47 bytes).
    pub footer_size: u64,
    /// Blob range of the TOC member: `[toc_offset, blob_size - footer_size)`.
    pub toc_range: Range<u64>,
    /// The same range as indices into the tail passed in, when the tail
    /// already holds all of it (so no second request is needed).
    pub toc_in_tail: Option<Range<usize>>,
}

/// The 51 footer bytes that point at a TOC member starting at `toc_offset`.
pub fn footer_bytes(toc_offset: u64) -> [u8; FOOTER_SIZE] {
    let mut f = [0u8; FOOTER_SIZE];
    // gzip header: magic, deflate, FLG.FEXTRA, mtime 0, XFL 0, OS unknown.
    f[..10].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff]);
    f[10..12].copy_from_slice(&26u16.to_le_bytes());
    f[12..14].copy_from_slice(b"SG");
    f[14..16].copy_from_slice(&PAYLOAD_LEN_LE);
    f[16..32].copy_from_slice(format!("{toc_offset:016x}").as_bytes());
    f[32..38].copy_from_slice(MAGIC);
    // An empty final stored deflate block; CRC32 and ISIZE of nothing are 0.
    f[38..43].copy_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    f
}

/// Finds the footer at the end of `tail`, the last `tail.len()` bytes of a
/// blob of `blob_size` bytes, and says where the TOC is.
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<TocLocation, FormatError> {
    let tail_len = tail.len() as u64;
    if tail_len > blob_size {
        return Err(FormatError::Footer(format!(
            "tail of {tail_len} bytes is longer than the blob ({blob_size} bytes)"
        )));
    }
    let (toc_offset, footer_size) = match tail_slice(tail, FOOTER_SIZE).map(parse_current) {
        Some(Ok(off)) => (off, FOOTER_SIZE),
        current => match tail_slice(tail, LEGACY_FOOTER_SIZE).map(parse_legacy) {
            Some(Ok(off)) => (off, LEGACY_FOOTER_SIZE),
            legacy => {
                let why = |r: Option<Result<u64, String>>, n: usize| match r {
                    Some(Err(e)) => e,
                    _ => format!("blob tail shorter than {n} bytes"),
                };
                return Err(FormatError::Footer(format!(
                    "{}; legacy footer: {}",
                    why(current, FOOTER_SIZE),
                    why(legacy, LEGACY_FOOTER_SIZE)
                )));
            }
        },
    };
    let toc_end = blob_size - footer_size as u64;
    if toc_offset >= toc_end {
        return Err(FormatError::Footer(format!(
            "TOC offset {toc_offset} is not before the footer at {toc_end}"
        )));
    }
    let tail_start = blob_size - tail_len;
    let toc_in_tail = (toc_offset >= tail_start).then(|| {
        // Both fit in usize: they are within `tail`.
        let start = usize_from(toc_offset - tail_start);
        start..tail.len() - footer_size
    });
    Ok(TocLocation {
        toc_offset,
        footer_size: footer_size as u64,
        toc_range: toc_offset..toc_end,
        toc_in_tail,
    })
}

fn tail_slice(tail: &[u8], n: usize) -> Option<&[u8]> {
    tail.len().checked_sub(n).map(|start| &tail[start..])
}

/// The gzip extra field of `member`, which must be one complete, empty gzip
/// member of exactly the given bytes.
fn empty_member_extra(member: &[u8]) -> Result<Vec<u8>, String> {
    let mut gz = GzDecoder::new(member);
    let mut out = Vec::new();
    gz.read_to_end(&mut out)
        .map_err(|e| format!("not a gzip member: {e}"))?;
    if !out.is_empty() {
        return Err("footer gzip member is not empty".into());
    }
    let extra = gz
        .header()
        .and_then(|h| h.extra())
        .ok_or("footer gzip member has no extra field")?;
    Ok(extra.to_vec())
}

fn parse_current(member: &[u8]) -> Result<u64, String> {
    let extra = empty_member_extra(member)?;
    if extra.len() != 4 + PAYLOAD_LEN {
        return Err(format!("extra field is {} bytes, want 26", extra.len()));
    }
    if &extra[..2] != b"SG" {
        return Err("extra subfield id is not SG".into());
    }
    if usize::from(u16::from_le_bytes([extra[2], extra[3]])) != PAYLOAD_LEN {
        return Err("SG subfield length is not 22".into());
    }
    parse_payload(&extra[4..])
}

fn parse_legacy(member: &[u8]) -> Result<u64, String> {
    let extra = empty_member_extra(member)?;
    if extra.len() != PAYLOAD_LEN {
        return Err(format!("extra field is {} bytes, want 22", extra.len()));
    }
    parse_payload(&extra)
}

fn parse_payload(p: &[u8]) -> Result<u64, String> {
    if &p[16..] != MAGIC {
        return Err("no STARGZ magic in the extra field".into());
    }
    let hex = std::str::from_utf8(&p[..16]).map_err(|_| "TOC offset is not hex".to_string())?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("TOC offset {hex:?} is not hex"));
    }
    u64::from_str_radix(hex, 16).map_err(|e| format!("TOC offset {hex:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compression, GzBuilder};
    use std::io::Write;

    fn legacy_footer(off: u64) -> Vec<u8> {
        let extra = format!("{off:016x}STARGZ").into_bytes();
        let mut gz = GzBuilder::new()
            .extra(extra)
            .write(Vec::new(), Compression::none());
        gz.write_all(b"").unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn current_footer_round_trips_and_matches_reference_bytes() {
        let f = footer_bytes(0x1234);
        // The byte layout of the specification (DESIGN.md section 3).
        assert_eq!(&f[..16], b"\x1f\x8b\x08\x04\0\0\0\0\0\xff\x1a\0SG\x16\0");
        assert_eq!(&f[16..38], b"0000000000001234STARGZ");
        assert_eq!(&f[38..], &[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut blob = vec![7u8; 0x2000];
        blob.extend_from_slice(&f);
        let loc = parse_footer(&blob, blob.len() as u64).unwrap();
        assert_eq!(loc.toc_offset, 0x1234);
        assert_eq!(loc.footer_size, 51);
        assert_eq!(loc.toc_range, 0x1234..0x2000);
        assert_eq!(loc.toc_in_tail, Some(0x1234..0x2000));
    }

    #[test]
    fn legacy_footer_parses() {
        let f = legacy_footer(100);
        assert_eq!(f.len(), LEGACY_FOOTER_SIZE);
        let mut blob = vec![0u8; 300];
        blob.extend_from_slice(&f);
        let loc = parse_footer(&blob, blob.len() as u64).unwrap();
        assert_eq!((loc.toc_offset, loc.footer_size), (100, 47));
        assert_eq!(loc.toc_range, 100..300);
    }

    #[test]
    fn tells_whether_the_toc_is_in_the_tail() {
        let f = footer_bytes(1000);
        let blob_size = 5000 + 51;
        // Tail starts at 2000: TOC at 1000 is not in it.
        let mut tail = vec![0u8; 3000];
        tail.extend_from_slice(&f);
        let loc = parse_footer(&tail, blob_size).unwrap();
        assert_eq!(loc.toc_in_tail, None);
        assert_eq!(loc.toc_range, 1000..5000);
        // Tail starts at 500: the TOC is tail[500..4500].
        let mut tail = vec![0u8; 4500];
        tail.extend_from_slice(&f);
        let loc = parse_footer(&tail, blob_size).unwrap();
        assert_eq!(loc.toc_in_tail, Some(500..4500));
    }

    #[test]
    fn garbage_short_and_out_of_range_footers_are_rejected() {
        let err = |tail: &[u8], size: u64| parse_footer(tail, size).unwrap_err().to_string();
        assert!(
            err(&[0u8; 10], 10).contains("shorter than 51"),
            "{}",
            err(&[0; 10], 10)
        );
        assert!(err(&[0u8; 100], 100).contains("not a gzip member"));
        let mut bad = footer_bytes(5);
        bad[32] = b'X';
        assert!(err(&bad, 100).contains("STARGZ"));
        let mut bad = footer_bytes(5);
        bad[20] = b'g';
        assert!(err(&bad, 100).contains("not hex"));
        // TOC offset pointing at or past the footer itself.
        let f = footer_bytes(60);
        assert!(err(&f, 100).contains("not before the footer"));
        // Tail longer than the blob.
        assert!(err(&f, 10).contains("longer than the blob"));
    }
}
