//! The tar wrapper the reference tools push a layer in: a pax header
//! `overlaybd.pax` whose one record is `size=N`, a ustar entry
//! `overlaybd.commit` whose own size field is 0, the payload from byte
//! 1536, then tar's padding to 512 bytes and two zero blocks (the layout of
//! the fixtures' blobs). The media type stays `...layer.v1.tar`, so
//! registries and containerd take the blob as an ordinary tar.

use crate::format::overlaybd::wrapper::{TAR_BLOCK, WRAPPER_MAX};
use crate::num::usize_from;

/// The 1536 bytes before a payload of `size` bytes.
pub fn wrapper_head(size: u64) -> Vec<u8> {
    let mut out = vec![0u8; usize_from(WRAPPER_MAX)];
    let record = pax_record("size", &size.to_string());
    out[..512].copy_from_slice(&header("overlaybd.pax", b'x', record.len() as u64));
    out[512..512 + record.len()].copy_from_slice(record.as_bytes());
    out[1024..1536].copy_from_slice(&header("overlaybd.commit", b'0', 0));
    out
}

/// The bytes after a payload of `size` bytes: padding to a tar block and
/// the two zero blocks that end an archive.
pub fn wrapper_tail(size: u64) -> Vec<u8> {
    let pad = (TAR_BLOCK - size % TAR_BLOCK) % TAR_BLOCK;
    vec![0u8; usize_from(pad + 2 * TAR_BLOCK)]
}

/// `"<len> <key>=<value>\n"`, where `<len>` counts itself.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}")
}

/// A ustar header as the tools write it: mode 0644, root-owned, mtime 0.
fn header(name: &str, typeflag: u8, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0100644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}
