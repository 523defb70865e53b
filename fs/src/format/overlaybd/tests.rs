//! Unit tests: blobs built here as the reference tools lay them out, the
//! real fixtures made by those tools, the stack, and hostile blobs.

use std::path::PathBuf;
use std::sync::Arc;

use super::lsmt::{HT_SIZE, SECTOR};
use super::wrapper::wrapper_head;
use super::zfile::Algo;
use super::*;
use crate::registry::BlobSource;
use crate::testing::FakeBlob;

const VSIZE: u64 = 64 << 20;

/// A mapping for [`lsmt_file`]: `sectors` of the disk from `offset`,
/// holding `fill` bytes, or zeroed.
struct Put {
    offset: u64,
    sectors: u64,
    fill: Option<u8>,
}

fn put(offset: u64, sectors: u64, fill: u8) -> Put {
    Put {
        offset,
        sectors,
        fill: Some(fill),
    }
}

fn zero(offset: u64, sectors: u64) -> Put {
    Put {
        offset,
        sectors,
        fill: None,
    }
}

/// Raw 16-byte record.
fn record(offset: u64, length: u64, moffset: u64, zeroed: bool) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&(offset | (length << 50)).to_le_bytes());
    r[8..].copy_from_slice(&(moffset | (u64::from(zeroed) << 55)).to_le_bytes());
    r
}

fn lsmt_ht(flags: u32, index_offset: u64, records: u64, vsize: u64) -> Vec<u8> {
    let mut h = vec![0u8; 4096];
    h[..8].copy_from_slice(b"LSMT\0\x01\x02\0");
    h[8..24].copy_from_slice(&[
        0x65, 0x7E, 0x63, 0xD2, 0x94, 0x44, 0x08, 0x4C, 0xA2, 0xD2, 0xC8, 0xEC, 0x4F, 0xCF, 0xAE,
        0x8A,
    ]);
    h[24..28].copy_from_slice(&390u32.to_le_bytes());
    h[28..32].copy_from_slice(&flags.to_le_bytes());
    h[32..40].copy_from_slice(&index_offset.to_le_bytes());
    h[40..48].copy_from_slice(&records.to_le_bytes());
    h[48..56].copy_from_slice(&vsize.to_le_bytes());
    h[132] = 1;
    h[133] = 1;
    h
}

/// An LSMT file as the tools write it: header with index fields 0, data,
/// index padded to 4 KiB with dummy records, trailer.
fn lsmt_records(vsize: u64, records: &[[u8; 16]], data: &[u8]) -> Vec<u8> {
    let mut f = lsmt_ht(0b111, 0, 0, vsize);
    f.extend_from_slice(data);
    let index_offset = f.len() as u64;
    let mut n = 0u64;
    for r in records {
        f.extend_from_slice(r);
        n += 1;
    }
    while !f.len().is_multiple_of(4096) {
        f.extend_from_slice(&record((1 << 50) - 1, 0, 0, false));
        n += 1;
    }
    f.extend(lsmt_ht(0b110, index_offset, n, vsize));
    f
}

fn lsmt_file(vsize: u64, puts: &[Put]) -> Vec<u8> {
    let mut data = Vec::new();
    let mut records = Vec::new();
    for p in puts {
        let moffset = (HT_SIZE + data.len() as u64) / SECTOR;
        if let Some(fill) = p.fill {
            data.resize(data.len() + us(p.sectors * SECTOR), fill);
        }
        records.push(record(p.offset, p.sectors, moffset, p.fill.is_none()));
    }
    lsmt_records(vsize, &records, &data)
}

struct ZOpts {
    block_size: u32,
    algo: Algo,
    verify: bool,
    header_overwrite: bool,
}

const LZ4: ZOpts = ZOpts {
    block_size: 4096,
    algo: Algo::Lz4,
    verify: true,
    header_overwrite: true,
};

fn zfile_ht(flags: u32, o: &ZOpts, index_offset: u64, blocks: u64, raw: u64, icrc: u32) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..8].copy_from_slice(b"ZFile\0\x01\0");
    h[8..24].copy_from_slice(b"tuji.yyf@Alibaba");
    h[24..28].copy_from_slice(&96u32.to_le_bytes());
    h[32..40].copy_from_slice(&u64::from(flags).to_le_bytes());
    h[40..48].copy_from_slice(&index_offset.to_le_bytes());
    h[48..56].copy_from_slice(&blocks.to_le_bytes());
    h[56..64].copy_from_slice(&raw.to_le_bytes());
    h[64..68].copy_from_slice(&icrc.to_le_bytes());
    h[72..76].copy_from_slice(&o.block_size.to_le_bytes());
    h[76] = match o.algo {
        Algo::Lz4 => 1,
        Algo::Zstd => 2,
    };
    h[88] = u8::from(o.verify);
    seal_digest(&mut h);
    h
}

/// Sets the header's digest field (flag 4 is always set here).
fn seal_digest(h: &mut [u8]) {
    h[28..32].fill(0);
    let d = crc32c(0, h);
    h[28..32].copy_from_slice(&d.to_le_bytes());
}

fn zfile_of(raw: &[u8], o: &ZOpts) -> Vec<u8> {
    let mut blocks = Vec::new();
    let mut lens = Vec::new();
    for plain in raw.chunks(us(u64::from(o.block_size))) {
        let mut c = match o.algo {
            Algo::Lz4 => lz4_flex::block::compress(plain),
            Algo::Zstd => ruzstd::encoding::compress_to_vec(
                plain,
                ruzstd::encoding::CompressionLevel::Fastest,
            ),
        };
        if o.verify {
            let crc = crc32c(BLOCK_SEED, &c);
            c.extend_from_slice(&crc.to_le_bytes());
        }
        lens.push(u32::try_from(c.len()).unwrap());
        blocks.extend(c);
    }
    let index: Vec<u8> = lens.iter().flat_map(|l| l.to_le_bytes()).collect();
    let icrc = crc32c(0, &index);
    let n = lens.len() as u64;
    let index_offset = 512 + blocks.len() as u64;
    let raw_size = raw.len() as u64;
    let head_flags = if o.header_overwrite { 0b11011 } else { 0b10011 };
    let mut f = if o.header_overwrite {
        zfile_ht(head_flags, o, index_offset, n, raw_size, icrc)
    } else {
        zfile_ht(head_flags, o, 0, 0, 0, 0)
    };
    f.extend(blocks);
    f.extend(index);
    f.extend(zfile_ht(0b10110, o, index_offset, n, raw_size, icrc));
    f
}

fn wrap(payload: &[u8]) -> Vec<u8> {
    let mut b = wrapper_head(payload.len() as u64);
    b.extend_from_slice(payload);
    b.resize(b.len().div_ceil(512) * 512 + 1024, 0);
    b
}

fn blob(bytes: Vec<u8>) -> Arc<dyn BlobSource> {
    FakeBlob::instant(bytes)
}

fn disk(layers: Vec<Vec<u8>>) -> StackedDisk {
    let blobs = layers.into_iter().map(blob).collect();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(StackedDisk::open(blobs))
        .unwrap()
}

fn read(d: &StackedDisk, range: std::ops::Range<u64>) -> Vec<u8> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(d.read(range))
        .unwrap()
}

fn us(n: u64) -> usize {
    crate::num::usize_from(n)
}

fn sector(s: u64) -> u64 {
    s * SECTOR
}

#[test]
fn a_bare_lsmt_file_opens_and_reads() {
    let f = lsmt_file(VSIZE, &[put(8, 2, 0xaa), put(100, 1, 0xbb)]);
    let layer = open_blob(&f).unwrap();
    assert_eq!(layer.virtual_size, VSIZE);
    assert_eq!(layer.extents.len(), 2);
    assert!(matches!(layer.store, Store::Raw));
    let d = disk(vec![f]);
    assert_eq!(read(&d, sector(7)..sector(11)), {
        let mut v = vec![0u8; 512];
        v.extend(vec![0xaa; 1024]);
        v.extend(vec![0u8; 512]);
        v
    });
    assert_eq!(read(&d, sector(100) + 3..sector(100) + 5), vec![0xbb; 2]);
}

#[test]
fn every_way_the_tools_store_a_layer_reads_the_same() {
    let puts = [
        put(0, 9, 1),
        put(20, 300, 2),
        zero(400, 8),
        put(70_000, 16_383, 3),
    ];
    let raw = lsmt_file(VSIZE, &puts);
    let zstd_64k = ZOpts {
        block_size: 64 << 10,
        algo: Algo::Zstd,
        verify: true,
        header_overwrite: true,
    };
    let lz4_trailer_only = ZOpts {
        header_overwrite: false,
        verify: false,
        ..LZ4
    };
    let forms = [
        raw.clone(),
        wrap(&raw),
        zfile_of(&raw, &LZ4),
        wrap(&zfile_of(&raw, &LZ4)),
        wrap(&zfile_of(&raw, &zstd_64k)),
        zfile_of(&raw, &lz4_trailer_only),
    ];
    let ranges = [0..sector(500), sector(69_990)..sector(86_400)];
    let raw_disk = disk(vec![raw.clone()]);
    let expect: Vec<Vec<u8>> = ranges.iter().map(|r| read(&raw_disk, r.clone())).collect();
    assert_eq!(&expect[0][..us(sector(9))], &vec![1u8; us(sector(9))][..]);
    assert_eq!(expect[1][us(sector(10))], 3);
    for (i, f) in forms.into_iter().enumerate() {
        let layer = open_blob(&f).unwrap_or_else(|e| panic!("form {i}: {e}"));
        assert_eq!(layer.extents.len(), 4, "form {i}");
        let d = disk(vec![f]);
        for (r, want) in ranges.iter().zip(&expect) {
            assert!(read(&d, r.clone()) == *want, "form {i}, bytes {r:?}");
        }
    }
}

#[test]
fn an_index_larger_than_the_tail_is_fetched_in_one_more_step() {
    // 6,000 records: the index (96 KiB) starts before the 64 KiB tail.
    let puts: Vec<Put> = (0..6000)
        .map(|i| put(i * 2, 1, u8::try_from(i % 251).unwrap()))
        .collect();
    let f = wrap(&zfile_of(&lsmt_file(VSIZE, &puts), &LZ4));
    let mut fetched = Vec::new();
    let layer = loop {
        match open_step(&fetched, f.len() as u64).unwrap() {
            OpenStep::Ready(l) => break l,
            OpenStep::Fetch(r) => fetched.push(crate::format::Piece {
                offset: r.start,
                bytes: bytes::Bytes::copy_from_slice(&f[us(r.start)..us(r.end)]),
            }),
        }
    };
    // head, ZFile index, LSMT tail, the index's front.
    assert_eq!(fetched.len(), 4);
    assert_eq!(layer.extents.len(), 6000);
    assert_eq!(
        read(&disk(vec![f]), sector(5998)..sector(5999)),
        vec![u8::try_from(2999 % 251).unwrap(); 512]
    );
}

#[test]
fn upper_layers_win_and_zeroed_extents_punch_holes() {
    let bottom = lsmt_file(VSIZE, &[put(0, 100, 1)]);
    let middle = lsmt_file(VSIZE, &[put(10, 10, 2), zero(50, 10), put(95, 10, 2)]);
    let top = lsmt_file(VSIZE, &[put(12, 2, 3), put(55, 1, 3)]);
    let d = disk(vec![
        wrap(&zfile_of(&bottom, &LZ4)),
        wrap(&zfile_of(&middle, &LZ4)),
        top,
    ]);
    let bytes = read(&d, 0..sector(110));
    let at = |s: u64| bytes[us(sector(s))];
    let expect = [
        (0, 1),
        (9, 1),
        (10, 2),
        (11, 2),
        (12, 3),
        (13, 3),
        (14, 2),
        (19, 2),
        (20, 1),
        (49, 1),
        (50, 0),
        (54, 0),
        (55, 3),
        (56, 0),
        (59, 0),
        (60, 1),
        (94, 1),
        (95, 2),
        (104, 2),
        (105, 0),
    ];
    for (s, v) in expect {
        assert_eq!(at(s), v, "sector {s}");
    }
    // Each sector reads whole from one source.
    for s in 0..110 {
        let one = &bytes[us(sector(s))..us(sector(s + 1))];
        assert!(one.iter().all(|&b| b == one[0]), "sector {s}");
    }
    assert_eq!(
        d.map().data_ranges(),
        vec![
            0..sector(50),
            sector(55)..sector(56),
            sector(60)..sector(105)
        ]
    );
}

fn fixtures() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .map(|a| a.join("shared/fixtures/overlaybd"))
        .find(|p| p.is_dir())
        .expect("shared/fixtures/overlaybd beside the repository (the project's shared folder)")
}

/// The fixture image's layer blobs, bottom first.
fn fixture_layers() -> Vec<Vec<u8>> {
    let oci = fixtures().join("oci");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(oci.join("index.json")).unwrap()).unwrap();
    let blob = |digest: &str| {
        let hex = digest.strip_prefix("sha256:").unwrap();
        std::fs::read(oci.join("blobs/sha256").join(hex)).unwrap()
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| blob(l["digest"].as_str().unwrap()))
        .collect()
}

#[test]
fn the_reference_tools_fixture_layers_open_and_stack() {
    let layers = fixture_layers();
    assert_eq!(layers.len(), 3);
    for l in &layers {
        // Three GETs open a layer the tools made: the head, the ZFile's
        // block index, and the blocks of the LSMT file's tail.
        let mut fetched = Vec::new();
        while let OpenStep::Fetch(r) = open_step(&fetched, l.len() as u64).unwrap() {
            fetched.push(crate::format::Piece {
                offset: r.start,
                bytes: bytes::Bytes::copy_from_slice(&l[us(r.start)..us(r.end)]),
            });
        }
        assert_eq!(fetched.len(), 3);
        let layer = open_blob(l).unwrap();
        assert_eq!(layer.payload.start, 1536);
        assert_eq!(layer.virtual_size, 64 << 30);
        assert!(
            matches!(&layer.store, Store::ZFile(z) if z.info().algo == Algo::Lz4 && z.info().verify)
        );
        assert!(layer.extents.len() > 500);
    }
    let d = disk(layers);
    assert_eq!(d.size(), 64 << 30);
    // The ext4 superblock (at 1024) of the stacked disk: its magic 0xEF53.
    let sb = read(&d, 1024..2048);
    assert_eq!(&sb[0x38..0x3a], &[0x53, 0xef]);
}

/// Replaces `len` bytes at `at` of a payload inside a wrapper.
fn hostile(raw: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Result<Layer, ObdError> {
    let mut f = raw.to_vec();
    edit(&mut f);
    open_blob(&f)
}

fn err(r: Result<Layer, ObdError>) -> String {
    match r {
        Ok(_) => panic!("a hostile blob was accepted"),
        Err(e) => e.to_string(),
    }
}

fn set_u64(f: &mut [u8], at: usize, v: u64) {
    f[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Offset of the LSMT trailer in a bare LSMT file.
fn trailer_at(f: &[u8]) -> usize {
    f.len() - 4096
}

#[test]
fn hostile_blobs_are_refused_naming_what_is_wrong() {
    let raw = lsmt_file(VSIZE, &[put(8, 2, 1), put(100, 1, 2)]);
    let e = err(hostile(&raw, |f| f[0] = b'X'));
    assert!(e.contains("not an overlaybd layer"), "{e}");
    let e = err(hostile(&raw, |f| {
        let t = trailer_at(f);
        f[t + 1] = b'X';
    }));
    assert!(e.contains("no LSMT magic in the trailer"), "{e}");

    // A truncated index: the trailer claims more records than fit before it.
    let e = err(hostile(&raw, |f| {
        let t = trailer_at(f);
        set_u64(f, t + 40, 1000);
    }));
    assert!(
        e.contains("is not between the header and the trailer"),
        "{e}"
    );
    // A huge virtual size.
    let e = err(hostile(&raw, |f| {
        let t = trailer_at(f);
        set_u64(f, t + 48, 1 << 59);
    }));
    assert!(
        e.contains("virtual size") && e.contains("1099511627776"),
        "{e}"
    );
    // Too many records.
    let e = err(hostile(&raw, |f| {
        let t = trailer_at(f);
        set_u64(f, t + 40, MAX_RECORDS + 1);
    }));
    assert!(e.contains("more than the limit of 1000000"), "{e}");
}

#[test]
fn hostile_extents_are_refused() {
    let data = vec![7u8; 4096];
    let vs = VSIZE;
    let cases: [(&str, Vec<[u8; 16]>); 5] = [
        (
            "past the virtual disk",
            vec![record(vs / SECTOR - 1, 2, 8, false)],
        ),
        (
            "overlaps or precedes",
            vec![record(10, 4, 8, false), record(12, 4, 8, false)],
        ),
        (
            "overlaps or precedes",
            vec![record(20, 1, 8, false), record(10, 1, 8, false)],
        ),
        ("outside its data", vec![record(0, 4, 14, false)]),
        ("maps no sectors", vec![record(0, 0, 8, false)]),
    ];
    for (want, records) in cases {
        let e = err(open_blob(&lsmt_records(vs, &records, &data)));
        assert!(e.contains(want), "{want}: {e}");
    }
    // The tag is ignored; a zeroed extent needs no data.
    let mut tagged = record(0, 8, 8, false);
    tagged[15] = 0x42;
    let ok = open_blob(&lsmt_records(
        vs,
        &[tagged, record(100, 16_383, 0, true)],
        &data,
    ))
    .unwrap();
    assert_eq!(ok.extents.len(), 2);
}

#[test]
fn hostile_zfiles_are_refused() {
    let raw = lsmt_file(VSIZE, &[put(8, 20, 1)]);
    let z = zfile_of(&raw, &LZ4);
    let blocks = (raw.len() as u64).div_ceil(4096);
    let index_offset = us(u64::from_le_bytes(z[40..48].try_into().unwrap()));
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // A block length over the block size (the index CRC recomputed so
    // the length itself is what is refused).
    let mut long = z.clone();
    long[index_offset..index_offset + 4].copy_from_slice(&(4096u32 + 517).to_le_bytes());
    let icrc = crc32c(0, &long[index_offset..index_offset + 4 * us(blocks)]);
    long[64..68].copy_from_slice(&icrc.to_le_bytes());
    seal_digest(&mut long[..512]);
    cases.push(("block 0 is 4613 bytes long", long));
    // The index changed under its CRC.
    let mut index = z.clone();
    index[index_offset] ^= 1;
    cases.push(("ZFile index: CRC32C", index));
    // A header changed under its digest.
    let mut header = z.clone();
    header[73] ^= 1;
    cases.push(("ZFile header: CRC32C", header));
    // A block size out of range, digest recomputed.
    let mut bs = z.clone();
    bs[72..76].copy_from_slice(&(1u32 << 20).to_le_bytes());
    seal_digest(&mut bs[..512]);
    cases.push(("block size 1048576", bs));
    // An index that claims more blocks than the file has room for.
    let mut count = z.clone();
    set_u64(&mut count, 48, blocks + 1000);
    set_u64(&mut count, 56, (blocks + 1000) * 4096);
    seal_digest(&mut count[..512]);
    cases.push(("is not between the header and the trailer", count));
    // A compressed byte flipped: the block's CRC catches it.
    let mut block = z.clone();
    block[index_offset - 10] ^= 0xff;
    cases.push(("CRC32C is", block));
    for (want, f) in cases {
        let e = open_blob(&wrap(&f))
            .err()
            .unwrap_or_else(|| panic!("accepted: {want}"));
        let e = e.to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
}

#[test]
fn a_corrupt_block_fails_only_the_reads_that_need_it() {
    // Enough data that opening (which reads the last 64 KiB) never
    // decodes block 1.
    let raw = lsmt_file(VSIZE, &[put(0, 8, 1), put(64, 300, 2)]);
    let mut z = zfile_of(&raw, &LZ4);
    let layer = open_blob(&z).unwrap();
    let Store::ZFile(zf) = &layer.store else {
        panic!("a ZFile")
    };
    // Block 1 holds LSMT bytes 4096..8192: the first extent's data.
    let at = us(zf.stored_range(1..2).start);
    z[at] ^= 0xff;
    let d = disk(vec![z]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt.block_on(d.read(0..512)).unwrap_err().to_string();
    assert!(e.contains("ZFile block 1: CRC32C"), "{e}");
    assert_eq!(read(&d, sector(64)..sector(65)), vec![2u8; 512]);
    // Reads outside the disk are refused.
    let e = rt
        .block_on(d.read(VSIZE - 1..VSIZE + 1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the virtual disk"), "{e}");
}

#[test]
fn the_wrapper_is_refused_when_it_lies_about_its_payload() {
    let raw = lsmt_file(VSIZE, &[put(8, 2, 1)]);
    let mut b = wrapper_head(raw.len() as u64 + 1_000_000);
    b.extend_from_slice(&raw);
    let e = err(open_blob(&b));
    assert!(e.contains("runs past the blob's end"), "{e}");
}

#[test]
fn a_stack_is_bounded() {
    let one = [lsmt::Extent {
        offset: 0,
        moffset: 8,
        length: 1,
        zeroed: false,
    }];
    let layers = vec![&one[..]; stack::MAX_LAYERS + 1];
    let e = DiskMap::stack(layers, VSIZE).unwrap_err().to_string();
    assert!(e.contains("more than 256 layers"), "{e}");
}
