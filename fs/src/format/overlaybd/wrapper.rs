//! The tar wrapper the reference tools put around a layer when they push
//! it: a pax header `overlaybd.pax` (record `size=N`) and a ustar entry
//! `overlaybd.commit` whose own size field is 0; the payload (the ZFile or
//! LSMT file) starts at byte 1536, or at 512 without the pax header, and is
//! followed by tar's padding and end blocks. A blob without the wrapper is
//! its payload whole.

use std::ops::Range;

use super::ObdError;
use crate::num::usize_from;

/// A tar block.
pub const TAR_BLOCK: u64 = 512;
/// The most blob bytes the wrapper takes: pax header, pax records, entry.
pub const WRAPPER_MAX: u64 = 3 * TAR_BLOCK;

/// ustar header fields (offset, length).
const SIZE: (usize, usize) = (124, 12);
const CHKSUM: (usize, usize) = (148, 8);
const TYPEFLAG: usize = 156;
const MAGIC: (usize, usize) = (257, 5);
const VERSION: (usize, usize) = (263, 2);
/// A pax extended header (POSIX `x`).
const PAX_TYPE: u8 = b'x';

/// Where the overlaybd file lies in a blob of `blob_size` bytes whose first
/// bytes are `head` (at least [`WRAPPER_MAX`] of them, or the whole blob).
pub fn payload_range(head: &[u8], blob_size: u64) -> Result<Range<u64>, ObdError> {
    let Some(first) = tar_header(head, 0) else {
        return Ok(0..blob_size);
    };
    let (start, size) = if first[TYPEFLAG] == PAX_TYPE {
        let records_len = octal(field(first, SIZE))
            .ok_or_else(|| wrapper("the pax header's size field is not octal"))?;
        if records_len > TAR_BLOCK {
            return Err(wrapper(format!(
                "pax records of {records_len} bytes, more than the one block the tools write"
            )));
        }
        let records = head
            .get(512..512 + usize_from(records_len))
            .ok_or_else(|| wrapper("blob ends inside the pax records"))?;
        let size = pax_size(records)?;
        if tar_header(head, 2 * 512).is_none() {
            return Err(wrapper("no ustar entry after the pax header"));
        }
        (WRAPPER_MAX, size)
    } else {
        let size = octal(field(first, SIZE))
            .ok_or_else(|| wrapper("the entry's size field is not octal"))?;
        (TAR_BLOCK, size)
    };
    if size == 0 {
        return Err(wrapper("the wrapper declares an empty payload"));
    }
    match start.checked_add(size) {
        Some(end) if end <= blob_size => Ok(start..end),
        _ => Err(wrapper(format!(
            "payload of {size} bytes at {start} runs past the blob's end ({blob_size})"
        ))),
    }
}

/// The ustar header at `at`, if `head` holds one there with a valid
/// checksum (as the reference reader tells a wrapper from a bare file).
fn tar_header(head: &[u8], at: usize) -> Option<&[u8; 512]> {
    let h: &[u8; 512] = head.get(at..at + 512)?.try_into().ok()?;
    let magic_ok = field(h, MAGIC) == b"ustar";
    let version_ok = field(h, VERSION) == b"00";
    (magic_ok && version_ok && checksum_ok(h)).then_some(h)
}

fn field(h: &[u8; 512], (at, len): (usize, usize)) -> &[u8] {
    &h[at..at + len]
}

/// The header's checksum: the sum of its bytes with the checksum field
/// read as spaces.
fn checksum_ok(h: &[u8; 512]) -> bool {
    let (at, len) = CHKSUM;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (at..at + len).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    octal(field(h, CHKSUM)) == Some(sum)
}

/// An octal tar number, padded with spaces or NULs.
fn octal(bytes: &[u8]) -> Option<u64> {
    let digits = bytes
        .iter()
        .skip_while(|&&b| b == b' ')
        .take_while(|&&b| b != 0 && b != b' ');
    let mut n: u64 = 0;
    let mut any = false;
    for &d in digits {
        if !(b'0'..=b'7').contains(&d) {
            return None;
        }
        n = n.checked_mul(8)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

/// The `size` record of pax records (`"<len> <key>=<value>\n"` each).
fn pax_size(mut records: &[u8]) -> Result<u64, ObdError> {
    while let Some(space) = records.iter().position(|&b| b == b' ') {
        let len = std::str::from_utf8(&records[..space])
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&len| len > space && len <= records.len())
            .ok_or_else(|| wrapper("a pax record's length is not a number inside the records"))?;
        let record = &records[space + 1..len];
        if let Some(value) = record.strip_prefix(b"size=") {
            let value = value.strip_suffix(b"\n").unwrap_or(value);
            return std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| wrapper("the pax size record is not a number"));
        }
        records = &records[len..];
    }
    Err(wrapper("the pax header has no size record"))
}

fn wrapper(why: impl Into<String>) -> ObdError {
    ObdError::Wrapper(why.into())
}

/// A wrapper around a payload of `size` bytes as the reference tools write
/// it (the payload itself is not included): for tests.
#[cfg(test)]
pub fn wrapper_head(size: u64) -> Vec<u8> {
    let mut out = vec![0u8; usize_from(WRAPPER_MAX)];
    let record = {
        let body = format!(" size={size}\n");
        let mut len = body.len() + 1;
        if format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}")
    };
    let header = |name: &str, typeflag: u8, size: u64| {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        h[TYPEFLAG] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        h
    };
    let record_len = u64::try_from(record.len()).unwrap_or(0);
    out[..512].copy_from_slice(&header("overlaybd.pax", PAX_TYPE, record_len));
    out[512..512 + record.len()].copy_from_slice(record.as_bytes());
    out[1024..1536].copy_from_slice(&header("overlaybd.commit", b'0', 0));
    out
}
