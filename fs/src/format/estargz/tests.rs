//! Writer -> reader round trips and hostile TOCs.

use std::io::Read;

use flate2::read::MultiGzDecoder;

use super::*;
use crate::Digest;
use crate::format::{FileKind, Format, FormatError, Inode, LayerIndex};
use crate::num::usize_from;

const CHUNK: u64 = 4096;
const MTIME: u64 = 1_700_000_000;

/// What the generated tar holds for one path, to compare the index with.
struct Expect {
    path: String,
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    data: Vec<u8>,
    link: &'static str,
    rdev: (u32, u32),
    xattrs: Vec<(&'static str, Vec<u8>)>,
}

fn pseudo_random(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Half compressible, half noise, so members have real sizes.
            if i % 2 == 0 {
                (x & 0xff) as u8
            } else {
                b'a' + u8::try_from(i % 7).expect("i % 7 < 7")
            }
        })
        .collect()
}

fn long_path() -> String {
    format!(
        "deep/{}/{}/{}.txt",
        "d".repeat(100),
        "e".repeat(100),
        "f".repeat(100)
    )
}

/// A tar with every entry type and the awkward cases, and what it holds.
fn sample_tar() -> (Vec<u8>, Vec<Expect>) {
    let mut b = tar::Builder::new(Vec::new());
    let mut ex = Vec::new();
    let mut add = |b: &mut tar::Builder<Vec<u8>>,
                   path: &str,
                   ty: tar::EntryType,
                   mode: u32,
                   data: Vec<u8>,
                   link: &'static str,
                   rdev: (u32, u32),
                   xattrs: Vec<(&'static str, Vec<u8>)>| {
        if !xattrs.is_empty() {
            let recs: Vec<(String, &[u8])> = xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice()))
                .collect();
            b.append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(ty);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(100);
        h.set_username("alice").unwrap();
        h.set_groupname("users").unwrap();
        h.set_mtime(MTIME);
        h.set_size(data.len() as u64);
        if matches!(ty, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(rdev.0).unwrap();
            h.set_device_minor(rdev.1).unwrap();
        }
        match ty {
            tar::EntryType::Link | tar::EntryType::Symlink => {
                b.append_link(&mut h, path, link).unwrap()
            }
            _ => b.append_data(&mut h, path, &data[..]).unwrap(),
        }
        let kind = match ty {
            tar::EntryType::Directory => FileKind::Dir,
            tar::EntryType::Symlink => FileKind::Symlink,
            tar::EntryType::Char => FileKind::CharDev,
            tar::EntryType::Block => FileKind::BlockDev,
            tar::EntryType::Fifo => FileKind::Fifo,
            _ => FileKind::Reg,
        };
        ex.push(Expect {
            path: path.trim_end_matches('/').to_string(),
            kind,
            mode,
            uid: 1000,
            gid: 100,
            data,
            link,
            rdev,
            xattrs,
        });
    };
    use tar::EntryType as T;
    let none = Vec::new;
    add(
        &mut b,
        "etc/",
        T::Directory,
        0o755,
        vec![],
        "",
        (0, 0),
        none(),
    );
    add(
        &mut b,
        "etc/passwd",
        T::Regular,
        0o644,
        b"root:x:0:0\n".to_vec(),
        "",
        (0, 0),
        none(),
    );
    add(
        &mut b,
        "big/",
        T::Directory,
        0o700,
        vec![],
        "",
        (0, 0),
        none(),
    );
    let big = pseudo_random(10 * usize_from(CHUNK) + 123, 7);
    add(
        &mut b,
        "big/file",
        T::Regular,
        0o600,
        big,
        "",
        (0, 0),
        none(),
    );
    let exact = pseudo_random(2 * usize_from(CHUNK), 9);
    add(
        &mut b,
        "big/exact",
        T::Regular,
        0o644,
        exact,
        "",
        (0, 0),
        none(),
    );
    add(
        &mut b,
        "empty",
        T::Regular,
        0o644,
        vec![],
        "",
        (0, 0),
        none(),
    );
    add(
        &mut b,
        "other/",
        T::Directory,
        0o755,
        vec![],
        "",
        (0, 0),
        none(),
    );
    add(
        &mut b,
        "sym",
        T::Symlink,
        0o777,
        vec![],
        "../etc/passwd",
        (0, 0),
        none(),
    );
    add(
        &mut b,
        "dev/",
        T::Directory,
        0o755,
        vec![],
        "",
        (0, 0),
        none(),
    );
    add(
        &mut b,
        "dev/null",
        T::Char,
        0o666,
        vec![],
        "",
        (1, 3),
        none(),
    );
    add(
        &mut b,
        "dev/sda",
        T::Block,
        0o660,
        vec![],
        "",
        (8, 0),
        none(),
    );
    add(&mut b, "fifo", T::Fifo, 0o644, vec![], "", (0, 0), none());
    add(
        &mut b,
        "bin/su",
        T::Regular,
        0o4755,
        b"#!su".to_vec(),
        "",
        (0, 0),
        none(),
    );
    add(
        &mut b,
        "bin/sg",
        T::Regular,
        0o2755,
        b"#!sg".to_vec(),
        "",
        (0, 0),
        none(),
    );
    add(
        &mut b,
        "tmp/",
        T::Directory,
        0o1777,
        vec![],
        "",
        (0, 0),
        none(),
    );
    let caps = vec![1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0xff];
    let xattrs = vec![
        ("user.comment", b"hello".to_vec()),
        ("security.capability", caps),
    ];
    add(
        &mut b,
        "bin/ping",
        T::Regular,
        0o755,
        b"ping".to_vec(),
        "",
        (0, 0),
        xattrs,
    );
    add(
        &mut b,
        &long_path(),
        T::Regular,
        0o644,
        b"long".to_vec(),
        "",
        (0, 0),
        none(),
    );
    add(
        &mut b,
        "ünïcødé/日本語.txt",
        T::Regular,
        0o644,
        "こんにちは".into(),
        "",
        (0, 0),
        none(),
    );
    add(
        &mut b,
        "implicit/a/b.txt",
        T::Regular,
        0o644,
        b"b".to_vec(),
        "",
        (0, 0),
        none(),
    );
    add(
        &mut b,
        "opq/",
        T::Directory,
        0o755,
        vec![],
        "",
        (0, 0),
        none(),
    );
    add(
        &mut b,
        "opq/keep",
        T::Regular,
        0o644,
        b"k".to_vec(),
        "",
        (0, 0),
        none(),
    );
    // Whiteouts are kept as they are in the tar; the index shows their
    // overlay form, checked separately (so not in `ex`).
    let wh = |b: &mut tar::Builder<Vec<u8>>, p: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o644);
        b.append_data(&mut h, p, &[][..]).unwrap();
    };
    wh(&mut b, "opq/.wh..wh..opq");
    wh(&mut b, "gone/.wh.removed");
    // A hardlink across directories, written after its target.
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(T::Link);
    h.set_size(0);
    b.append_link(&mut h, "other/link", "etc/passwd").unwrap();
    (b.into_inner().unwrap(), ex)
}

struct Converted {
    blob: Vec<u8>,
    result: WriteResult,
    index: LayerIndex,
}

fn convert(tar: &[u8], opts: &WriteOptions) -> Converted {
    let mut blob = Vec::new();
    let result = write_estargz(tar, &mut blob, opts).unwrap();
    // Read it back the way the daemon will: a tail, then the TOC.
    let tail_start = blob.len().saturating_sub(64 << 10);
    let loc = parse_footer(&blob[tail_start..], blob.len() as u64).unwrap();
    let toc_bytes = &blob[tail_start..][loc.toc_in_tail.clone().expect("small TOC is in the tail")];
    let decoded = decode_toc(toc_bytes).unwrap();
    assert_eq!(decoded.digest, result.toc_digest);
    let index = build_index(decoded.parse().unwrap(), blob.len() as u64, loc.toc_offset).unwrap();
    Converted {
        blob,
        result,
        index,
    }
}

fn file_content(c: &Converted, ino: &Inode) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in c.index.file_chunks(ino) {
        assert_eq!(chunk.file_offset, out.len() as u64);
        let r = chunk.blob_range();
        let bytes = Estargz::default()
            .decode_chunk(chunk, &c.blob[usize_from(r.start)..usize_from(r.end)])
            .unwrap();
        out.extend_from_slice(&bytes);
    }
    out
}

fn node(idx: &LayerIndex, path: &str) -> Inode {
    let ino = idx
        .resolve(path)
        .unwrap_or_else(|| panic!("{path} missing"));
    idx.inode(ino).unwrap()
}

#[test]
fn round_trip_index_matches_the_tar_and_chunks_decode() {
    let (tar, expect) = sample_tar();
    let opts = WriteOptions {
        chunk_size: CHUNK,
        ..WriteOptions::default()
    };
    let c = convert(&tar, &opts);
    let idx = &c.index;
    for e in &expect {
        let ino = node(idx, &e.path);
        assert_eq!(ino.kind(), e.kind, "{}", e.path);
        assert_eq!(ino.mode(), e.mode, "{}", e.path);
        assert_eq!((ino.uid(), ino.gid()), (e.uid, e.gid), "{}", e.path);
        assert_eq!(
            ino.mtime(),
            i64::try_from(MTIME).expect("MTIME is a 2023 date"),
            "{}",
            e.path
        );
        assert_eq!(ino.rdev(), e.rdev, "{}", e.path);
        assert_eq!(idx.link_target(&ino), e.link.as_bytes(), "{}", e.path);
        let mut want_x: Vec<(&[u8], &[u8])> = e
            .xattrs
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_slice()))
            .collect();
        want_x.sort();
        // The opaque marker comes from the whiteout entry, checked below.
        let got_x: Vec<(&[u8], &[u8])> = idx
            .xattrs(idx.resolve(&e.path).unwrap())
            .iter()
            .map(|(k, v)| (&**k, &**v))
            .filter(|(k, _)| *k != b"trusted.overlay.opaque")
            .collect();
        assert_eq!(got_x, want_x, "{}", e.path);
        if e.kind == FileKind::Reg {
            assert_eq!(ino.size(), e.data.len() as u64, "{}", e.path);
            assert_eq!(file_content(&c, &ino), e.data, "{}", e.path);
            let n = idx.resolve(&e.path).unwrap();
            assert_eq!(idx.file_digest(n), Some(Digest::of(&e.data)), "{}", e.path);
        }
    }
    // Chunking: 10 full chunks and a tail; exactly two for the exact file.
    assert_eq!(idx.file_chunks(&node(idx, "big/file")).len(), 11);
    assert_eq!(idx.file_chunks(&node(idx, "big/exact")).len(), 2);
    assert!(idx.file_chunks(&node(idx, "empty")).is_empty());
    // Hardlink across directories: one inode, two names.
    let (a, b) = (
        idx.resolve("etc/passwd").unwrap(),
        idx.resolve("other/link").unwrap(),
    );
    assert_eq!(a, b);
    assert_eq!(idx.inode(a).unwrap().nlink(), 2);
    // Implicit directories: root-owned, 0755, epoch.
    let imp = node(idx, "implicit/a");
    assert_eq!(
        (imp.kind(), imp.mode(), imp.uid(), imp.mtime()),
        (FileKind::Dir, 0o755, 0, 0)
    );
    // Whiteout and opaque directory in overlay form.
    let wh = node(idx, "gone/removed");
    assert_eq!(
        (wh.kind(), wh.mode(), wh.rdev(), wh.uid()),
        (FileKind::CharDev, 0, (0, 0), 0)
    );
    assert!(idx.resolve("gone/.wh.removed").is_none());
    assert_eq!(
        idx.xattrs(idx.resolve("opq").unwrap()),
        [(
            b"trusted.overlay.opaque".as_slice().into(),
            b"y".as_slice().into()
        )]
    );
    assert!(idx.resolve("opq/.wh..wh..opq").is_none());
    // Format machinery is hidden; no prefetch was asked for.
    assert!(idx.resolve(NO_PREFETCH_LANDMARK).is_none());
    assert!(idx.resolve(TOC_TAR_NAME).is_none());
    assert_eq!(idx.prefetch, None);
    // Directory link counts and sorted children.
    let root = idx.inode(crate::format::ROOT_INO).unwrap();
    let subdirs = idx
        .children(&root)
        .filter(|(_, i)| idx.inode(*i).unwrap().kind() == FileKind::Dir);
    assert_eq!(
        root.nlink(),
        2 + u32::try_from(subdirs.count()).expect("few subdirectories")
    );
    let names: Vec<&[u8]> = idx.children(&root).map(|(n, _)| n).collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(node(idx, "big").nlink(), 2);
    assert_eq!(c.index.blob_size, c.blob.len() as u64);
}

#[test]
fn blob_is_a_tar_gz_holding_the_input_tar() {
    let (tar, _) = sample_tar();
    let opts = WriteOptions {
        chunk_size: CHUNK,
        ..WriteOptions::default()
    };
    let c = convert(&tar, &opts);
    let mut plain = Vec::new();
    MultiGzDecoder::new(&c.blob[..])
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(c.result.diff_id, Digest::of(&plain));
    assert_eq!(c.result.uncompressed_size, plain.len() as u64);
    assert_eq!(c.result.blob_digest, Digest::of(&c.blob));
    assert_eq!(c.result.blob_size, c.blob.len() as u64);
    // Byte for byte: the landmark entry (header + one block), the input's
    // entries unchanged, then the TOC entry.
    let body = tar.len() - 1024; // the input's end-of-archive blocks
    assert_eq!(&plain[1024..1024 + body], &tar[..body]);
    // And as a tar reader sees it.
    let entries = |data: &[u8]| -> Vec<(Vec<u8>, Vec<u8>, Vec<u8>)> {
        let mut a = tar::Archive::new(data);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut d = Vec::new();
                e.read_to_end(&mut d).unwrap();
                (
                    e.path_bytes().into_owned(),
                    e.header().as_bytes().to_vec(),
                    d,
                )
            })
            .collect()
    };
    let got = entries(&plain);
    let want = entries(&tar);
    assert_eq!(got.first().unwrap().0, NO_PREFETCH_LANDMARK.as_bytes());
    assert_eq!(got.first().unwrap().2, vec![0x0f]);
    assert_eq!(got.last().unwrap().0, TOC_TAR_NAME.as_bytes());
    assert!(got[1..got.len() - 1] == want[..], "tar entries differ");
}

#[test]
fn prioritized_files_come_first_and_set_the_prefetch_range() {
    let (tar, _) = sample_tar();
    let opts = WriteOptions {
        chunk_size: CHUNK,
        prioritized: vec!["big/file".into(), "/other/link".into(), "no/such".into()],
        ..WriteOptions::default()
    };
    let c = convert(&tar, &opts);
    assert_eq!(c.result.missing_prioritized, vec!["no/such".to_string()]);
    let idx = &c.index;
    let prefetch = idx.prefetch.clone().expect("a prefetch landmark");
    // The prioritized files (and the hardlink's target) lie in the range.
    for p in ["big/file", "etc/passwd"] {
        for ch in idx.file_chunks(&node(idx, p)) {
            assert!(ch.blob_range.1 <= prefetch.end, "{p} outside prefetch");
        }
    }
    for ch in idx.file_chunks(&node(idx, "bin/ping")) {
        assert!(ch.blob_range.0 >= prefetch.end);
    }
    assert_eq!(
        file_content(&c, &node(idx, "big/file")),
        pseudo_random(10 * usize_from(CHUNK) + 123, 7)
    );
    assert!(idx.resolve(PREFETCH_LANDMARK).is_none());
    // Entry order in the stream: parents first, then the file, then links.
    let mut plain = Vec::new();
    MultiGzDecoder::new(&c.blob[..])
        .read_to_end(&mut plain)
        .unwrap();
    let names: Vec<String> = tar::Archive::new(&plain[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        &names[..6],
        [
            "big/",
            "big/file",
            "other/",
            "etc/",
            "etc/passwd",
            "other/link"
        ]
        .map(String::from)
    );
    assert_eq!(names[6], PREFETCH_LANDMARK);
    let (mut sorted, mut orig) = (names.clone(), names);
    sorted.sort();
    orig.sort();
    assert_eq!(sorted, orig);
}

/// An eStargz blob rewritten with priorities (`tarn optimize` of an
/// eStargz image): its old TOC and landmark are dropped, the new blob has
/// one landmark and one TOC, and the same files.
#[test]
fn an_estargz_blob_rewritten_keeps_one_landmark_and_one_toc() {
    let (tar, _) = sample_tar();
    let opts = WriteOptions {
        chunk_size: CHUNK,
        ..WriteOptions::default()
    };
    let first = convert(&tar, &opts);
    let mut plain = Vec::new();
    MultiGzDecoder::new(&first.blob[..])
        .read_to_end(&mut plain)
        .unwrap();
    let again = convert(
        &plain,
        &WriteOptions {
            prioritized: vec!["big/file".into()],
            ..opts
        },
    );
    let mut out = Vec::new();
    MultiGzDecoder::new(&again.blob[..])
        .read_to_end(&mut out)
        .unwrap();
    let names: Vec<String> = tar::Archive::new(&out[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    let count = |n: &str| names.iter().filter(|x| *x == n).count();
    assert_eq!(count(PREFETCH_LANDMARK), 1, "{names:?}");
    assert_eq!(count(NO_PREFETCH_LANDMARK), 0, "{names:?}");
    assert_eq!(count("stargz.index.json"), 1, "{names:?}");
    assert!(again.index.prefetch.is_some());
    assert_eq!(
        file_content(&again, &node(&again.index, "big/file")),
        file_content(&first, &node(&first.index, "big/file"))
    );
}

/// A layer rewritten with priorities from a file read three times (`tarn
/// optimize`: only the prioritized entries' data in memory) gives the
/// same blob as from memory; an input that changes between reads is an
/// error, not a wrong blob.
#[test]
fn prioritized_from_a_reopened_input_is_the_same_blob() {
    let (tar, _) = sample_tar();
    let opts = WriteOptions {
        chunk_size: CHUNK,
        prioritized: vec!["big/file".into(), "/other/link".into()],
        ..WriteOptions::default()
    };
    let from_memory = convert(&tar, &opts);
    let mut opened = 0;
    let mut blob = Vec::new();
    let result = crate::format::estargz::write_estargz_reopen(
        || {
            opened += 1;
            Ok(&tar[..])
        },
        &mut blob,
        &opts,
    )
    .unwrap();
    assert_eq!(opened, 3);
    assert_eq!(blob, from_memory.blob);
    assert_eq!(result, from_memory.result);

    let mut calls = 0;
    let other = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(7);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "big/file", &b"changed"[..]).unwrap();
        b.into_inner().unwrap()
    };
    let err = crate::format::estargz::write_estargz_reopen(
        || {
            calls += 1;
            Ok(if calls == 2 { &other[..] } else { &tar[..] })
        },
        &mut Vec::new(),
        &opts,
    );
    assert!(err.is_err(), "an input that changed is refused");
}

#[test]
fn tampered_and_truncated_chunks_are_refused() {
    let (tar, expect) = sample_tar();
    let opts = WriteOptions {
        chunk_size: CHUNK,
        ..WriteOptions::default()
    };
    let c = convert(&tar, &opts);
    let ino = node(&c.index, "big/file");
    let chunk = c.index.file_chunks(&ino)[3];
    let r = chunk.blob_range();
    let member = &c.blob[usize_from(r.start)..usize_from(r.end)];
    // Same length, one byte changed, validly compressed: only the digest
    // can tell.
    let mut plain = Vec::new();
    MultiGzDecoder::new(member).read_to_end(&mut plain).unwrap();
    plain[100] ^= 1;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &plain).unwrap();
    let forged = gz.finish().unwrap();
    match Estargz::default().decode_chunk(&chunk, &forged) {
        Err(FormatError::ChunkDigestMismatch { expected, actual }) => {
            assert_eq!(expected, chunk.digest);
            assert_ne!(actual, expected);
        }
        other => panic!("want a digest mismatch, got {other:?}"),
    }
    // A short range, garbage, and a bit flip in the deflate stream.
    let e = Estargz::default()
        .decode_chunk(&chunk, &member[..member.len() / 2])
        .unwrap_err();
    assert!(matches!(e, FormatError::Corrupt(_)), "{e}");
    let e = Estargz::default()
        .decode_chunk(&chunk, b"not gzip at all")
        .unwrap_err();
    assert!(matches!(e, FormatError::Corrupt(_)), "{e}");
    let mut flipped = member.to_vec();
    flipped[40] ^= 0x55;
    assert!(Estargz::default().decode_chunk(&chunk, &flipped).is_err());
    // The untouched range still decodes to the file's bytes.
    let big = &expect.iter().find(|e| e.path == "big/file").unwrap().data;
    let ok = Estargz::default().decode_chunk(&chunk, member).unwrap();
    assert_eq!(ok, big[3 * usize_from(CHUNK)..4 * usize_from(CHUNK)]);
}

// ---- hostile TOCs ----

fn d(s: &str) -> String {
    Digest::of(s.as_bytes()).to_string()
}

fn build(entries: &str) -> Result<LayerIndex, FormatError> {
    let json = format!(r#"{{"version":1,"entries":[{entries}]}}"#);
    let toc = parse_toc_json(json.as_bytes())?;
    build_index(toc, 2000, 1000)
}

fn refused(entries: &str, want: &str) {
    match build(entries) {
        Ok(_) => panic!("accepted: {entries}"),
        Err(e) => assert!(e.to_string().contains(want), "{entries}: {e}"),
    }
}

#[test]
fn hostile_tocs_are_refused_with_clear_errors() {
    let dg = d("x");
    refused(r#"{"name":"../x","type":"dir"}"#, "escapes the layer");
    refused(r#"{"name":"a/../../x","type":"fifo"}"#, "escapes the layer");
    refused(r#"{"name":"/../etc/x","type":"fifo"}"#, "escapes the layer");
    refused(r#"{"name":"//","type":"fifo"}"#, "empty name");
    refused(
        r#"{"name":"l","type":"hardlink","linkName":"nope"}"#,
        "does not exist",
    );
    refused(
        r#"{"name":"l","type":"hardlink","linkName":"../../etc/passwd"}"#,
        "escapes the layer",
    );
    refused(
        r#"{"name":"d","type":"dir"},{"name":"l","type":"hardlink","linkName":"d"}"#,
        "is a directory",
    );
    refused(
        r#"{"name":"a","type":"symlink","linkName":"x"},{"name":"a","type":"dir"}"#,
        "appears twice",
    );
    let two = format!(
        r#"{{"name":"a","type":"reg","size":1,"offset":10,"digest":"{}"}},{{"name":"a","type":"reg","size":1,"offset":20,"digest":"{}"}}"#,
        d("1"),
        d("2")
    );
    refused(&two, "appears twice");
    refused(
        r#"{"name":"a","type":"fifo"},{"name":"a/b","type":"fifo"}"#,
        "not one",
    );
    refused(
        &format!(r#"{{"name":"a","type":"reg","size":5,"offset":1000,"digest":"{dg}"}}"#),
        "not before the TOC",
    );
    refused(
        &format!(
            r#"{{"name":"a","type":"reg","size":10,"offset":10,"chunkSize":4,"chunkDigest":"{dg}"}},{{"type":"chunk","offset":20,"chunkOffset":6,"chunkDigest":"{dg}"}}"#
        ),
        "a gap",
    );
    refused(
        &format!(
            r#"{{"name":"a","type":"reg","size":10,"offset":10,"chunkSize":4,"chunkDigest":"{dg}"}},{{"type":"chunk","offset":20,"chunkOffset":2,"chunkDigest":"{dg}"}}"#
        ),
        "an overlap",
    );
    refused(
        &format!(
            r#"{{"name":"a","type":"reg","size":10,"offset":10,"chunkSize":4,"chunkDigest":"{dg}"}}"#
        ),
        "cover 4 of its 10",
    );
    refused(
        &format!(
            r#"{{"name":"a","type":"reg","size":10,"offset":10,"chunkSize":40,"chunkDigest":"{dg}"}}"#
        ),
        "runs past",
    );
    refused(
        &format!(
            r#"{{"name":"a","type":"reg","size":4,"offset":10,"chunkDigest":"{dg}"}},{{"name":"b","type":"chunk","offset":20,"chunkOffset":4}}"#
        ),
        "different file",
    );
    refused(
        r#"{"name":"a","type":"fifo"},{"type":"chunk","offset":20}"#,
        "does not follow",
    );
    refused(
        r#"{"name":"a","type":"reg","size":2199023255552,"offset":10}"#,
        "larger than the limit",
    );
    refused(
        r#"{"name":"a","type":"reg","size":5,"offset":10}"#,
        "cannot verify",
    );
    refused(
        &format!(
            r#"{{"name":"a","type":"reg","size":10,"offset":10,"chunkSize":4,"digest":"{dg}"}},{{"type":"chunk","offset":20,"chunkOffset":4}}"#
        ),
        "cannot verify",
    );
    refused(
        r#"{"name":"a","type":"reg","size":5,"offset":10,"digest":"sha256:zz"}"#,
        "bad digest",
    );
    refused(
        r#"{"name":"a","type":"fifo","xattrs":{"user.a":"!!!"}}"#,
        "bad base64",
    );
    refused(
        r#"{"name":"a","type":"fifo","modtime":"yesterday"}"#,
        "bad modtime",
    );
    refused(
        r#"{"name":"a","type":"fifo","uid":4294967296}"#,
        "uid 4294967296 is out of range",
    );
    refused(r#"{"name":"a","type":"socket"}"#, "unknown entry type");
    refused(
        r#"{"name":"a","type":"fifo","size":-1}"#,
        "decoding TOC JSON",
    );
    refused(
        r#"{"name":".wh.","type":"reg"}"#,
        "whiteout of an empty name",
    );
}

#[test]
fn legal_oddities_are_accepted() {
    let dg = d("x");
    // Implicit dir, then its explicit entry; names with ./ // and trailing /.
    let idx = build(&format!(
        r#"{{"name":"./a//b/c","type":"reg","size":1,"offset":10,"digest":"{dg}"}},
           {{"name":"/a/","type":"dir","mode":448,"uid":5,"modtime":"2001-09-09T01:46:40Z"}},
           {{"name":"./","type":"dir","mode":493,"uid":7}},
           {{"name":"a/b/c","type":"reg","size":1,"offset":10,"digest":"{dg}"}},
           {{"name":"s","type":"symlink","linkName":"/abs/target"}},
           {{"name":"h","type":"hardlink","linkName":"/a/b/c"}},
           {{"name":".prefetch.landmark","type":"reg","size":1,"offset":500,"digest":"{dg}"}},
           {{"name":"z","type":"reg","size":9,"offset":600,"chunkSize":4,"chunkDigest":"{dg}"}},
           {{"name":"z","type":"chunk","offset":700,"chunkOffset":4,"chunkDigest":"{dg}"}}"#
    ))
    .unwrap();
    let a = node(&idx, "a");
    assert_eq!((a.mode(), a.uid(), a.mtime()), (0o700, 5, 1_000_000_000));
    assert_eq!(idx.inode(1).unwrap().uid(), 7);
    assert_eq!(idx.resolve("h"), idx.resolve("a/b/c"));
    assert_eq!(idx.prefetch, Some(0..500));
    // Blob ranges end at the next payload member or the TOC.
    let c = idx.file_chunks(&node(&idx, "a/b/c"));
    assert_eq!(c[0].blob_range, (10, 500));
    let z = idx.file_chunks(&node(&idx, "z"));
    assert_eq!(
        z.iter().map(|c| c.blob_range).collect::<Vec<_>>(),
        [(600, 700), (700, 1000)]
    );
    assert_eq!(z[1].size, 5);
    assert_eq!(idx.link_target(&node(&idx, "s")), b"/abs/target");
}
