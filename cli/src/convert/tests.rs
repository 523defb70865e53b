//! Unit tests of the conversion's pure and local parts: path resolution,
//! disk regions, and a tar applied onto a directory (whiteouts, opaque
//! directories, links, a symlink that points out); source layers read
//! whole (zstd frames) and an eStargz layer written.

use std::fs::File;
use std::path::Path;

use super::apply::apply;
use super::disk::{copy_sparse, data_regions, union};
use super::rootpath::{clean, resolve};

// rootpath.rs
#[test]
fn names_are_cleaned_and_dotdot_refused() {
    assert_eq!(clean(Path::new("./a/b")).unwrap(), vec!["a", "b"]);
    assert_eq!(clean(Path::new("/a")).unwrap(), vec!["a"]);
    assert!(clean(Path::new("a/../../etc")).is_err());
}

#[test]
fn symlinks_in_parents_stay_inside_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("real")).unwrap();
    std::os::unix::fs::symlink("/real", root.join("abs")).unwrap();
    std::os::unix::fs::symlink("../../../real", root.join("up")).unwrap();
    std::os::unix::fs::symlink("/real/sub", root.join("etc")).unwrap();
    let p = |s: &str| resolve(root, &clean(Path::new(s)).unwrap()).unwrap();
    assert_eq!(p("abs/x"), root.join("real/x"));
    assert_eq!(p("up/x"), root.join("real/x"));
    // The last component is not followed.
    assert_eq!(p("abs"), root.join("abs"));
    assert_eq!(p("etc/passwd"), root.join("real/sub/passwd"));
    std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
    assert!(resolve(root, &clean(Path::new("loop/x")).unwrap()).is_err());
}

// disk.rs
#[test]
fn union_merges_and_widens_to_blocks() {
    let u = union(&[0..10, 100..200], &[5..20, 4096..4097], 4096);
    // Touching ranges merge too.
    assert_eq!(u, vec![0..8192]);
    let (a, b) = (vec![0..1, 1..2], vec![8192..8193, 8193..8194]);
    let u = union(&a, &b, 4096);
    assert_eq!(u, vec![0..4096, 8192..12288]);
}

#[test]
fn data_regions_skip_holes_and_a_sparse_copy_keeps_them() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a");
    let f = File::create(&p).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(b"hello", 32 << 20).unwrap();
    f.sync_all().unwrap();
    let r = data_regions(&f, 64 << 20).unwrap();
    assert_eq!(r.len(), 1);
    assert!(r[0].contains(&(32 << 20)));
    let q = dir.path().join("b");
    copy_sparse(&p, &q, 64 << 20).unwrap();
    let g = File::open(&q).unwrap();
    let mut b = [0u8; 5];
    g.read_exact_at(&mut b, 32 << 20).unwrap();
    assert_eq!(&b, b"hello");
    assert_eq!(data_regions(&g, 64 << 20).unwrap().len(), 1);
}

/// A tar of (name, kind, content or link target).
fn tar_of(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(if *kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_mtime(1_000_000_000);
        match kind {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                h.set_size(0);
                b.append_link(&mut h, name, data).unwrap();
            }
            _ => {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, data.as_bytes()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

#[test]
fn a_layer_applies_with_whiteouts_opaque_dirs_and_links() {
    use std::os::unix::fs::MetadataExt;
    use tar::EntryType::{Directory as D, Link as L, Regular as F, Symlink as S};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let lower = tar_of(&[
        ("a/", D, ""),
        ("a/keep", F, "k"),
        ("a/gone", F, "g"),
        ("o/", D, ""),
        ("o/old", F, "old"),
        ("out", S, "/a"),
    ]);
    apply(root, &lower[..]).unwrap();
    let a = std::fs::metadata(root.join("a")).unwrap();
    assert_eq!(a.mtime(), 1_000_000_000, "directory mtimes set last");
    let upper = tar_of(&[
        ("a/.wh.gone", F, ""),
        ("o/new", F, "new"),
        ("o/.wh..wh..opq", F, ""),
        ("a/keep2", L, "a/keep"),
        // Through the symlink `out` -> `/a`: lands in root/a, not /a.
        ("out/via", F, "v"),
    ]);
    let done = apply(root, &upper[..]).unwrap();
    assert_eq!(done.whiteouts, 2);
    assert!(!root.join("a/gone").exists());
    assert!(
        !root.join("o/old").exists(),
        "opaque dir emptied of the lower layer"
    );
    assert_eq!(std::fs::read_to_string(root.join("o/new")).unwrap(), "new");
    assert_eq!(std::fs::read_to_string(root.join("a/via")).unwrap(), "v");
    let k = std::fs::metadata(root.join("a/keep")).unwrap();
    let k2 = std::fs::metadata(root.join("a/keep2")).unwrap();
    assert_eq!(k.ino(), k2.ino(), "hard link");
    assert_eq!((k.uid(), k.gid(), k.mode() & 0o7777), (1000, 1000, 0o644));
    assert_eq!(k.mtime(), 1_000_000_000);
}

#[test]
fn a_name_climbing_out_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // tar::Builder refuses `..` itself: the header is written by hand.
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..4].copy_from_slice(b"../x");
    h.set_size(1);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend_from_slice(&[b'x'; 512]);
    bytes.extend_from_slice(&[0u8; 1024]);
    assert!(apply(dir.path(), &bytes[..]).is_err());
}

#[test]
fn a_tar_ending_right_after_its_last_data_applies_and_a_cut_one_fails() {
    use tar::EntryType::Regular as F;
    let data = "x".repeat(100);
    let t = tar_of(&[("a", F, "1"), ("b", F, data.as_str())]);
    // Entry a: header + 1 block; entry b: header + 100 bytes, no padding,
    // no end blocks (as umoci writes layers).
    let unpadded = &t[..512 * 3 + 100];
    let dir = tempfile::tempdir().unwrap();
    apply(dir.path(), unpadded).unwrap();
    assert_eq!(std::fs::read_to_string(dir.path().join("b")).unwrap(), data);
    let cut = &t[..512 * 3 + 50];
    let dir = tempfile::tempdir().unwrap();
    assert!(apply(dir.path(), cut).is_err(), "data missing is an error");
}

/// `bytes` in a scratch file.
fn blob_file(dir: &tempfile::TempDir, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.path().join("blob");
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn zstd_layers_of_several_frames_are_read_whole_and_trailing_garbage_fails() {
    use ruzstd::encoding::{CompressionLevel, compress_to_vec};
    use std::io::Read;
    let tar = tar_of(&[
        ("a", tar::EntryType::Regular, "first"),
        ("b", tar::EntryType::Regular, "second"),
    ]);
    let (front, back) = tar.split_at(512 + 7);
    let mut two = compress_to_vec(front, CompressionLevel::Fastest);
    two.extend(compress_to_vec(back, CompressionLevel::Fastest));
    let dir = tempfile::tempdir().unwrap();
    let (mut r, kind) = super::source::tar_reader(&blob_file(&dir, &two)).unwrap();
    assert_eq!(kind, "zstd");
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    assert_eq!(got, tar, "both frames");

    two.extend_from_slice(b"not a frame");
    let (mut r, _) = super::source::tar_reader(&blob_file(&dir, &two)).unwrap();
    let e = r.read_to_end(&mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("start no frame"), "{e}");
}

#[test]
fn an_estargz_layer_is_written_from_a_gzip_blob_and_a_given_up_run_stops() {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    let tar = tar_of(&[("etc/a", tar::EntryType::Regular, "content")]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = blob_file(&dir, &gz.finish().unwrap());
    let output = dir.path().join("out");
    let (written, kind) = super::estargz::write_layer(
        &input,
        &output,
        &Default::default(),
        Arc::new(AtomicBool::new(false)),
    )
    .unwrap();
    assert_eq!(kind, "gzip");
    let blob = std::fs::read(&output).unwrap();
    assert_eq!(blob.len() as u64, written.blob_size);
    assert_eq!(tarn_fs::Digest::of(&blob), written.blob_digest);

    let e = super::estargz::write_layer(
        &input,
        &output,
        &Default::default(),
        Arc::new(AtomicBool::new(true)),
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("given up"), "{e:#}");
}
