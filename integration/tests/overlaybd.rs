//! overlaybd images read through tarn's own reader (issue 15, first
//! acceptance item without laziness): the three-layer image made by
//! overlaybd's reference tools (`../shared/fixtures/overlaybd/oci`) is
//! opened layer by layer, stacked into one virtual disk, and the disk's
//! bytes, read through `tarn_fs::format::overlaybd::StackedDisk`, are
//! written into a sparse file; the kernel's ext4 then mounts it read-only
//! (`losetup -r`, `ro,noload`) and the tree must be the one the fixture
//! says overlaybd shows: types, modes, owners, sizes, mtimes, symlink
//! targets, contents, hard links, no xattrs, and `/app/run.sh`'s output.
//! Needs root and loop devices. Lazily serving the disk through FUSE is
//! the next step and is not tested here.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tarn_integration::testbed::overlaybd_fixtures as fixtures;

use sha2::{Digest as _, Sha256};
use tarn_fs::format::overlaybd::StackedDisk;
use tarn_fs::format::overlaybd::read::MAX_READ;
use tarn_fs::registry::BlobSource;
use tarn_fs::testing::FakeBlob;

/// The fixture folder, in the project's shared folder beside the
/// repository (or beside one of its parents, for a worktree).
/// The image's layer blobs (tag `v1`), bottom first, from the OCI layout.
fn layer_blobs(oci: &Path) -> Vec<Arc<dyn BlobSource>> {
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
    };
    let blob = |digest: &serde_json::Value| {
        let hex = digest.as_str().unwrap().strip_prefix("sha256:").unwrap();
        oci.join("blobs/sha256").join(hex)
    };
    let index = json(oci.join("index.json"));
    let manifest = json(blob(&index["manifests"][0]["digest"]));
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert!(
                l["annotations"]["containerd.io/snapshot/overlaybd/version"].is_string(),
                "an overlaybd layer: {l}"
            );
            let bytes = std::fs::read(blob(&l["digest"])).unwrap();
            FakeBlob::instant(bytes) as Arc<dyn BlobSource>
        })
        .collect()
}

/// A read-only loop device over a file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-r", "-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let ok = Command::new("losetup").args(["-d", &self.0]).status();
        if !matches!(ok, Ok(s) if s.success()) {
            eprintln!("could not detach {}: {ok:?}", self.0);
        }
    }
}

/// A mount, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn ext4_ro_noload(dev: &str, target: &Path) -> Mount {
        nix::mount::mount(
            Some(dev),
            target,
            Some("ext4"),
            nix::mount::MsFlags::MS_RDONLY,
            Some("noload"),
        )
        .expect("mount the stacked disk read-only");
        Mount(target.to_owned())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount(&self.0) {
            eprintln!("could not unmount {}: {e}", self.0.display());
        }
    }
}

/// The path field of a listing line (`type mode uid:gid size mtime path -> target`).
fn path_of(line: &str) -> &str {
    let rest = line.splitn(6, ' ').nth(5).unwrap_or("");
    rest.split(" -> ").next().unwrap_or("")
}

fn sorted_by_path(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort_by(|a, b| path_of(a).cmp(path_of(b)));
    lines
}

/// Names of the extended attributes of `path` (not following symlinks).
fn xattrs(path: &Path) -> Vec<String> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: `c` is a NUL-terminated path and `buf` is writable for its
    // whole length, which is the size passed.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0, "llistxattr {}", path.display());
    buf.truncate(usize::try_from(n).unwrap());
    buf.split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

#[test]
fn the_reference_tools_image_mounts_with_the_tree_overlaybd_shows() {
    let fx = fixtures();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let disk = rt
        .block_on(StackedDisk::open(layer_blobs(&fx.join("oci"))))
        .expect("open and stack the fixture's layers");
    assert_eq!(disk.size(), 64 << 30, "the tools' default virtual size");

    // The stacked disk as a sparse file: only the ranges a layer holds.
    let dir = tempfile::Builder::new()
        .prefix("tarn-obd-")
        .tempdir_in("/tmp")
        .unwrap();
    let image = dir.path().join("disk.img");
    let file = File::create(&image).unwrap();
    file.set_len(disk.size()).unwrap();
    let mut copied = 0u64;
    for range in disk.map().data_ranges() {
        let mut at = range.start;
        while at < range.end {
            let end = range.end.min(at + MAX_READ);
            let bytes = rt.block_on(disk.read(at..end)).unwrap();
            file.write_all_at(&bytes, at).unwrap();
            copied += end - at;
            at = end;
        }
    }
    file.sync_all().unwrap();
    drop(file);
    eprintln!("copied {copied} bytes of the stacked disk's data");

    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let dev = Loop::attach(&image);
    let mounted = Mount::ext4_ro_noload(&dev.0, &mnt);

    // Types, modes, owners, sizes, mtimes, symlink targets: the listing.
    let out = Command::new("find")
        .arg(".")
        .arg("-printf")
        .arg("%y %#m %U:%G %s %T@ %p -> %l\\n")
        .current_dir(&mounted.0)
        .output()
        .unwrap();
    assert!(out.status.success());
    let expected = std::fs::read_to_string(fx.join("expected-listing.txt")).unwrap();
    assert_eq!(
        sorted_by_path(&String::from_utf8(out.stdout).unwrap()),
        sorted_by_path(&expected),
        "the mounted tree's listing"
    );

    // Contents: every regular file's sha256, and no regular file unlisted.
    let want: BTreeMap<String, String> = std::fs::read_to_string(fx.join("expected-sha256.txt"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(h, p)| (p.to_owned(), h.to_owned()))
        .collect();
    let regular: Vec<&str> = expected
        .lines()
        .filter(|l| l.starts_with("f "))
        .map(path_of)
        .collect();
    assert_eq!(regular.len(), want.len(), "one sha256 per regular file");
    for (path, hash) in &want {
        let bytes = std::fs::read(mnt.join(path)).unwrap();
        let got = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        assert_eq!(&got, hash, "sha256 of {path}");
    }

    // Hard links: one inode, two names.
    let a = std::fs::symlink_metadata(mnt.join("etc/hosts")).unwrap();
    let b = std::fs::symlink_metadata(mnt.join("etc/hosts.hardlink")).unwrap();
    assert_eq!(
        (a.ino(), a.nlink()),
        (b.ino(), 2),
        "etc/hosts is hard-linked"
    );

    // Xattrs: the tools dropped the one the source had; none is expected.
    for line in expected.lines() {
        let path = mnt.join(path_of(line));
        assert_eq!(
            xattrs(&path),
            Vec::<String>::new(),
            "xattrs of {}",
            path.display()
        );
    }

    // What a container of this image would print.
    let out = Command::new("chroot")
        .arg(&mnt)
        .args(["/bin/sh", "/app/run.sh"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "run.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let random5m = &want["./data/random5m"][..16];
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("hello from overlaybd\nv2\n{random5m}\nnew.txt\n")
    );
    drop(mounted);
    drop(dev);
}
