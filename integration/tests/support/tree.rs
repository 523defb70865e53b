//! What a mounted layer must look like, judged against the tar it came from.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Names at the layer root that are eStargz machinery, not content.
const HIDDEN: [&str; 3] = [
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];

/// A tar exercising every entry type eStargz carries: directories with
/// sticky/setgid bits, setuid files, a file larger than `chunk` bytes,
/// empty files, hardlinks across directories, symlinks, devices, a fifo,
/// user.* and trusted.* xattrs, a path longer than 255 bytes, non-ASCII
/// names, implicit parent directories, a whiteout and an opaque directory.
pub fn sample_tar(chunk: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32| {
        let mut h = header(tar::EntryType::Directory, mode, 0, 0);
        b.append_data(&mut h, path, &[][..]).unwrap();
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, uid: u64, data: &[u8]| {
        let mut h = header(tar::EntryType::Regular, mode, uid, uid);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    let special =
        |b: &mut tar::Builder<Vec<u8>>, path: &str, t: tar::EntryType, dev: (u32, u32)| {
            let mut h = header(t, 0o640, 0, 6);
            h.set_device_major(dev.0).unwrap();
            h.set_device_minor(dev.1).unwrap();
            b.append_data(&mut h, path, &[][..]).unwrap();
        };
    let link = |b: &mut tar::Builder<Vec<u8>>, t: tar::EntryType, path: &str, target: &str| {
        let mut h = header(t, 0o777, 0, 0);
        b.append_link(&mut h, path, target).unwrap();
    };

    dir(&mut b, "etc", 0o755);
    b.append_pax_extensions([("SCHILY.xattr.user.dir", &b"yes"[..])])
        .unwrap();
    dir(&mut b, "etc/conf.d", 0o2775);
    file(
        &mut b,
        "etc/passwd",
        0o644,
        0,
        b"root:x:0:0:root:/root:/bin/sh\n",
    );
    dir(&mut b, "tmp", 0o1777);
    dir(&mut b, "bin", 0o755);
    file(&mut b, "bin/busybox", 0o4755, 0, &pseudo_random(5000, 1));
    file(&mut b, "bin/sg", 0o2711, 0, b"#!/bin/sh\n");
    link(&mut b, tar::EntryType::Symlink, "bin/sh", "busybox");
    link(
        &mut b,
        tar::EntryType::Symlink,
        "etc/localtime",
        "/usr/share/zoneinfo/UTC",
    );
    dir(&mut b, "data", 0o750);
    b.append_pax_extensions([
        ("SCHILY.xattr.user.mime", &b"application/octet-stream"[..]),
        ("SCHILY.xattr.trusted.tarn", &b"\x00\x01binary"[..]),
    ])
    .unwrap();
    file(
        &mut b,
        "data/big.bin",
        0o600,
        1000,
        &pseudo_random(chunk * 4 + 1234, 2),
    );
    file(&mut b, "data/empty", 0o644, 1000, b"");
    file(
        &mut b,
        "data/exactly-one-chunk",
        0o644,
        1000,
        &pseudo_random(chunk, 3),
    );
    dir(&mut b, "other", 0o755);
    link(
        &mut b,
        tar::EntryType::Link,
        "other/big-hardlink",
        "data/big.bin",
    );
    link(
        &mut b,
        tar::EntryType::Link,
        "other/empty-hardlink",
        "data/empty",
    );
    dir(&mut b, "dev", 0o755);
    special(&mut b, "dev/null", tar::EntryType::Char, (1, 3));
    special(&mut b, "dev/sda", tar::EntryType::Block, (8, 0));
    special(&mut b, "dev/big-minor", tar::EntryType::Char, (259, 70000));
    special(&mut b, "dev/fifo", tar::EntryType::Fifo, (0, 0));
    let long = format!(
        "long/{}/{}/{}.txt",
        "a".repeat(100),
        "b".repeat(100),
        "c".repeat(80)
    );
    assert!(long.len() > 255);
    file(&mut b, &long, 0o644, 0, b"a long way down\n");
    file(
        &mut b,
        "unicode/héllo wörld 日本語.txt",
        0o644,
        0,
        "grüße\n".as_bytes(),
    );
    file(
        &mut b,
        "implicit/deep/file.txt",
        0o644,
        0,
        b"parents not in the tar\n",
    );
    dir(&mut b, "gone", 0o755);
    file(&mut b, "gone/.wh.removed", 0o644, 0, b"");
    dir(&mut b, "opaque", 0o755);
    file(&mut b, "opaque/.wh..wh..opq", 0o644, 0, b"");
    file(&mut b, "opaque/new.txt", 0o644, 0, b"only this survives\n");
    b.into_inner().unwrap()
}

fn header(t: tar::EntryType, mode: u32, uid: u64, gid: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(t);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(1_650_000_000 + mode as u64);
    h.set_size(0);
    h
}

/// Incompressible, reproducible bytes.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Bits 24..32: the truncation is the point.
            (x >> 24).to_le_bytes()[0]
        })
        .collect()
}

#[derive(Debug, Default)]
struct Expect {
    kind: Option<u32>, // S_IF* bits; None for implicit directories
    mode: Option<u32>,
    uid: u64,
    gid: u64,
    mtime: i64,
    content: Option<Vec<u8>>,
    link: Option<PathBuf>,
    hardlink_of: Option<String>,
    rdev: Option<(u32, u32)>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Asserts the tree at `mnt` shows exactly the (uncompressed) `tar`'s
/// content as a layer: every entry with its type, mode, owner, mtime,
/// content, link target, device numbers and xattrs; hardlinks sharing an
/// inode; whiteouts as 0/0 character devices and opaque directories with
/// `trusted.overlay.opaque=y`. Returns the number of paths checked.
pub fn assert_tree_matches_tar(mnt: &Path, tar: &[u8]) -> usize {
    let mut want: BTreeMap<String, Expect> = BTreeMap::new();
    let mut archive = tar::Archive::new(tar);
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        let path = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .trim_start_matches("./")
            .to_string();
        if path.is_empty() || HIDDEN.contains(&path.as_str()) {
            continue;
        }
        let mut xattrs = BTreeMap::new();
        if let Some(pax) = e.pax_extensions().unwrap() {
            for p in pax {
                let p = p.unwrap();
                if let Some(name) = p.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    xattrs.insert(name.to_vec(), p.value_bytes().to_vec());
                }
            }
        }
        let h = e.header().clone();
        let (dir, base) = match path.rsplit_once('/') {
            Some((d, b)) => (d.to_string(), b.to_string()),
            None => (String::new(), path.clone()),
        };
        if base == ".wh..wh..opq" {
            want.entry(dir)
                .or_default()
                .xattrs
                .insert(b"trusted.overlay.opaque".to_vec(), b"y".to_vec());
            continue;
        }
        if let Some(hidden) = base.strip_prefix(".wh.") {
            let p = if dir.is_empty() {
                hidden.to_string()
            } else {
                format!("{dir}/{hidden}")
            };
            want.insert(
                p,
                Expect {
                    kind: Some(libc::S_IFCHR),
                    rdev: Some((0, 0)),
                    ..Expect::default()
                },
            );
            continue;
        }
        let mut x = Expect {
            mode: Some(h.mode().unwrap() & 0o7777),
            uid: h.uid().unwrap(),
            gid: h.gid().unwrap(),
            mtime: i64::try_from(h.mtime().unwrap()).expect("a test tar's mtime fits i64"),
            xattrs,
            ..Expect::default()
        };
        // A directory's earlier implicit entry may already carry the opaque mark.
        if let Some(prev) = want.remove(&path) {
            x.xattrs.extend(prev.xattrs);
        }
        let t = h.entry_type();
        x.kind = Some(match t {
            tar::EntryType::Directory => libc::S_IFDIR,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut c = Vec::new();
                e.read_to_end(&mut c).unwrap();
                x.content = Some(c);
                libc::S_IFREG
            }
            tar::EntryType::Link => {
                let target = e
                    .link_name()
                    .unwrap()
                    .unwrap()
                    .to_string_lossy()
                    .trim_start_matches("./")
                    .to_string();
                x.hardlink_of = Some(target);
                libc::S_IFREG
            }
            tar::EntryType::Symlink => {
                x.link = Some(e.link_name().unwrap().unwrap().into_owned());
                x.mode = None; // symlink permission bits mean nothing on Linux
                libc::S_IFLNK
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                x.rdev = Some((
                    h.device_major().unwrap().unwrap(),
                    h.device_minor().unwrap().unwrap(),
                ));
                if t == tar::EntryType::Char {
                    libc::S_IFCHR
                } else {
                    libc::S_IFBLK
                }
            }
            tar::EntryType::Fifo => libc::S_IFIFO,
            other => panic!("unexpected tar entry type {other:?} at {path}"),
        });
        want.insert(path, x);
    }
    // Parents the tar never named exist as directories.
    let named: Vec<String> = want.keys().cloned().collect();
    for p in named {
        let mut cur = p.as_str();
        while let Some((parent, _)) = cur.rsplit_once('/') {
            want.entry(parent.to_string()).or_default();
            cur = parent;
        }
    }

    let mut have = BTreeSet::new();
    walk(mnt, mnt, &mut have);
    let want_paths: BTreeSet<String> = want.keys().cloned().collect();
    assert_eq!(
        have, want_paths,
        "the mounted tree has exactly the layer's paths"
    );

    for (path, x) in &want {
        let full = mnt.join(path);
        let md = std::fs::symlink_metadata(&full).unwrap_or_else(|e| panic!("{path}: {e}"));
        let Some(kind) = x.kind else {
            assert!(md.is_dir(), "{path}: implicit parent is a directory");
            continue;
        };
        let (kind, x) = match &x.hardlink_of {
            Some(target) => {
                let tmd = std::fs::symlink_metadata(mnt.join(target)).unwrap();
                assert_eq!(
                    md.ino(),
                    tmd.ino(),
                    "{path}: hardlink shares the inode of {target}"
                );
                assert!(md.nlink() >= 2, "{path}: nlink {}", md.nlink());
                (kind, &want[target])
            }
            None => (kind, x),
        };
        assert_eq!(md.mode() & libc::S_IFMT, kind, "{path}: file type");
        if let Some(rdev) = x.rdev {
            let (maj, min) = (libc::major(md.rdev()), libc::minor(md.rdev()));
            assert_eq!((maj, min), rdev, "{path}: device numbers");
        }
        if kind == libc::S_IFCHR && x.mode.is_none() {
            continue; // a whiteout: only type and 0/0 matter to overlayfs
        }
        if let Some(mode) = x.mode {
            assert_eq!(md.mode() & 0o7777, mode, "{path}: mode");
        }
        assert_eq!(
            (md.uid() as u64, md.gid() as u64),
            (x.uid, x.gid),
            "{path}: owner"
        );
        assert_eq!(md.mtime(), x.mtime, "{path}: mtime");
        if let Some(c) = &x.content {
            let got = std::fs::read(&full).unwrap();
            assert!(
                got == *c,
                "{path}: content differs ({} vs {} bytes)",
                got.len(),
                c.len()
            );
        }
        if let Some(l) = &x.link {
            assert_eq!(
                &std::fs::read_link(&full).unwrap(),
                l,
                "{path}: link target"
            );
        }
        assert_eq!(xattrs(&full), x.xattrs, "{path}: xattrs");
        if md.file_type().is_fifo() {
            assert_eq!(md.size(), 0);
        }
    }
    want.len()
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        out.insert(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        if e.file_type().unwrap().is_dir() {
            walk(root, &p, out);
        }
    }
}

/// All xattrs of `path` (not following symlinks).
pub fn xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; a null buffer of size 0 asks for the size.
    let n = unsafe { libc::llistxattr(p.as_ptr(), std::ptr::null_mut(), 0) };
    let mut names = vec![0u8; xattr_len(n, "listxattr", path)];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::llistxattr(p.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    names.truncate(xattr_len(n, "listxattr", path));
    let mut out = BTreeMap::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let c = CString::new(name).unwrap();
        // SAFETY: as above; size probe first, then the value.
        let len = unsafe { libc::lgetxattr(p.as_ptr(), c.as_ptr(), std::ptr::null_mut(), 0) };
        let mut v = vec![0u8; xattr_len(len, "getxattr", path)];
        // SAFETY: the buffer is valid for its length.
        let len =
            unsafe { libc::lgetxattr(p.as_ptr(), c.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        v.truncate(xattr_len(len, "getxattr", path));
        out.insert(name.to_vec(), v);
    }
    out
}

/// The length an xattr call returned, or a panic naming its error: a
/// negative return is -1 with errno set, so call this right after the call,
/// before anything else can overwrite errno.
fn xattr_len(ret: isize, call: &str, path: &Path) -> usize {
    usize::try_from(ret).unwrap_or_else(|_| {
        panic!(
            "{call} {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )
    })
}
