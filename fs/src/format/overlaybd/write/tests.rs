//! Round trips: what the writer writes, the reader opens (every check of
//! its passes) and stacks to the same bytes; and the field values the
//! reference tools write.

use std::io::{Cursor, Seek, SeekFrom, Write};
use std::sync::Arc;

use super::*;
use crate::format::overlaybd::lsmt::SECTOR;
use crate::format::overlaybd::{StackedDisk, open_blob};
use crate::registry::BlobSource;
use crate::testing::FakeBlob;

const VSIZE: u64 = 64 << 20;

enum Op {
    Put(u64, Vec<u8>),
    Zero(u64, u64),
}

/// A whole blob (wrapper, ZFile, LSMT) with these extents.
fn blob(ops: &[Op], uuid: &str, parent: Option<&str>) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    out.seek(SeekFrom::Start(1536)).unwrap();
    let z = ZFileWriter::new(out, 4096).unwrap();
    let mut l = LsmtWriter::new(z, VSIZE, uuid, parent).unwrap();
    for op in ops {
        match op {
            Op::Put(at, data) => l.put(*at, data).unwrap(),
            Op::Zero(at, n) => l.zero(*at, *n).unwrap(),
        }
    }
    let (z, _) = l.finish().unwrap();
    let (mut out, size) = z.finish().unwrap();
    out.write_all(&wrapper_tail(size)).unwrap();
    let mut v = out.into_inner();
    v[..1536].copy_from_slice(&wrapper_head(size));
    v
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) % 256).to_le_bytes()[0] ^ seed)
        .collect()
}

fn read(blobs: Vec<Vec<u8>>, range: std::ops::Range<u64>) -> Vec<u8> {
    let blobs: Vec<Arc<dyn BlobSource>> = blobs
        .into_iter()
        .map(|b| -> Arc<dyn BlobSource> { FakeBlob::instant(b) })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let d = rt.block_on(StackedDisk::open(blobs)).unwrap();
    rt.block_on(d.read(range)).unwrap()
}

#[test]
fn a_written_layer_opens_and_reads_back() {
    let a = pattern(4096 * 3 + 512, 1);
    let b = pattern(512 * 16383, 2);
    let f = blob(&[Op::Put(8, a.clone()), Op::Put(100, b.clone())], "A", None);
    let layer = open_blob(&f).unwrap();
    assert_eq!(layer.virtual_size, VSIZE);
    assert_eq!(layer.extents.len(), 2);
    assert_eq!(layer.payload.start, 1536);
    let got = read(vec![f.clone()], 0..(100 + 16383) * SECTOR);
    assert!(got[..8 * 512].iter().all(|&x| x == 0));
    assert_eq!(&got[8 * 512..8 * 512 + a.len()], &a[..]);
    assert_eq!(&got[100 * 512..], &b[..]);
}

#[test]
fn an_upper_layer_wins_and_zeroed_extents_punch_holes() {
    let base = blob(&[Op::Put(0, pattern(8192, 1))], "A", None);
    let upper = blob(
        &[Op::Zero(0, 4), Op::Put(8, pattern(2048, 9))],
        "B",
        Some("A"),
    );
    let got = read(vec![base, upper], 0..8192);
    assert!(got[..2048].iter().all(|&x| x == 0));
    assert_eq!(&got[2048..4096], &pattern(8192, 1)[2048..4096]);
    assert_eq!(&got[4096..6144], &pattern(2048, 9)[..]);
    assert_eq!(&got[6144..], &pattern(8192, 1)[6144..]);
}

#[test]
fn an_empty_layer_is_valid() {
    let f = blob(&[], "A", None);
    let layer = open_blob(&f).unwrap();
    assert!(layer.extents.is_empty());
}

#[test]
fn fields_are_the_reference_tools_values() {
    let f = blob(&[Op::Put(0, pattern(4096, 1))], "UUID-A", Some("UUID-P"));
    // Tar wrapper: pax size record, payload at 1536, padded, two zero
    // blocks at the end.
    assert_eq!(&f[..13], b"overlaybd.pax");
    let record = String::from_utf8_lossy(&f[512..1024]);
    let size = record
        .trim_end_matches('\0')
        .split_once(" size=")
        .unwrap()
        .1;
    let size: usize = size.trim_end().parse().unwrap();
    assert_eq!(1536 + size + (512 - size % 512) % 512 + 1024, f.len());
    assert_eq!(&f[1024..1040], b"overlaybd.commit");
    assert_eq!(f.len() % 512, 0);
    assert!(f[f.len() - 1024..].iter().all(|&x| x == 0));
    let z = &f[1536..];
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    assert_eq!(&z[..8], b"ZFile\0\x01\0");
    assert_eq!(u32_at(z, 24), 96);
    assert_eq!(u32_at(z, 32), 0x1b, "header flags");
    assert_eq!(u32_at(z, 72), 4096);
    assert_eq!((z[76], z[77], z[78], z[88]), (1, 0, 0, 1));
    let layer = open_blob(&f).unwrap();
    let crate::format::overlaybd::Store::ZFile(zf) = &layer.store else {
        panic!("not a ZFile");
    };
    let t_at = usize::try_from(zf.info().index_offset + zf.info().blocks * 4).unwrap();
    assert_eq!(u32_at(z, t_at + 32), 0x16, "trailer flags");
    // The LSMT header: the first block's plain bytes.
    let first = zf
        .decode(
            0..1,
            &z[512..512 + usize::try_from(zf.stored_range(0..1).end - 512).unwrap()],
        )
        .unwrap();
    assert_eq!(&first[..8], b"LSMT\0\x01\x02\0");
    assert_eq!(u32_at(&first, 24), 390);
    assert_eq!(u32_at(&first, 28), 0b111);
    assert_eq!(&first[56..62], b"UUID-A");
    assert_eq!(&first[93..99], b"UUID-P");
    assert_eq!((first[132], first[133]), (1, 1));
}

#[test]
fn out_of_order_or_oversized_extents_are_refused() {
    let out = Cursor::new(Vec::new());
    let mut l = LsmtWriter::new(out, VSIZE, "A", None).unwrap();
    l.put(10, &[0u8; 512]).unwrap();
    assert!(l.put(5, &[0u8; 512]).is_err());
    assert!(l.zero(11, MAX_EXTENT_SECTORS + 1).is_err());
    assert!(l.zero(VSIZE / SECTOR, 1).is_err());
    assert!(l.put(20, &[0u8; 100]).is_err());
}

#[test]
fn uuids_print_as_the_tools_print_them() {
    let u = uuid_from(&[0xa7; 16]);
    assert_eq!(u, "A7A7A7A7-A7A7-A7A7-A7A7-A7A7A7A7A7A7");
}
