//! overlaybd served lazily (issue 15): the reference tools' three-layer
//! image (`../shared/fixtures/overlaybd/oci`) opened through the fetch
//! engine (`tarn_fs::disk`: each layer a `Layer` of format `Overlaybd`,
//! blocks cached under location keys), its stacked disk served as one
//! read-only FUSE file, attached to a read-only loop device and mounted
//! `ext4 ro,noload` by the kernel (`tarn_snapshotter::obd::DiskMount`).
//! The tree must be the fixture's; listing it must fetch a small part of
//! the blobs; everything is torn down after, and after a failed attach
//! (no loop device, no mount left).
//! The blobs come from in-memory sources that count what they serve (the
//! snapshotter and containerd are not in this test). Needs root, FUSE and
//! loop devices.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use tarn_integration::testbed::overlaybd_fixtures as fixtures;

use sha2::{Digest as _, Sha256};
use tarn_fs::cache::Cache;
use tarn_fs::disk::{DiskLayer, LazyDisk};
use tarn_fs::fetch::{FetchScheduler, SchedulerConfig};
use tarn_fs::fuse::{DISK_NAME, MountOptions};
use tarn_fs::testing::FakeBlob;
use tarn_snapshotter::obd::{DiskMount, LoopIo};

/// The image's layer blobs (tag `v1`), bottom first.
fn layer_blobs(oci: &Path) -> Vec<Vec<u8>> {
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
        .map(|l| std::fs::read(blob(&l["digest"])).unwrap())
        .collect()
}

fn path_of(line: &str) -> &str {
    let rest = line.splitn(6, ' ').nth(5).unwrap_or("");
    rest.split(" -> ").next().unwrap_or("")
}

fn sorted_by_path(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.sort_by(|a, b| path_of(a).cmp(path_of(b)));
    lines
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Loop devices backed by a file under `dir`, as `losetup -a` lists them.
fn loops_under(dir: &Path) -> Vec<String> {
    run(Command::new("losetup").arg("-a"))
        .lines()
        .filter(|l| l.contains(dir.to_str().unwrap()))
        .map(str::to_owned)
        .collect()
}

fn mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
}

#[test]
fn the_reference_tools_image_is_served_lazily_through_fuse_loop_and_ext4() {
    serves_the_reference_tools_image(LoopIo::Buffered, false);
}

/// With the disk's ext4 metadata warmed first (what the daemon does when
/// a container is prepared on a disk), mounting and listing the whole tree
/// (every lookup and stat) waits for at most half the GETs it does on a
/// cold disk: what is left is the kernel's read-ahead around metadata
/// blocks into file data (measured: 16 GETs cold, 6 warm). The tree and
/// contents are checked the same either way.
#[test]
fn after_the_metadata_warm_pass_a_listing_of_the_tree_sends_half_the_gets() {
    let cold = serves_the_reference_tools_image(LoopIo::Buffered, false);
    let warm = serves_the_reference_tools_image(LoopIo::Buffered, true);
    eprintln!("mount and listing: {cold} GETs cold, {warm} after the warm pass");
    assert!(
        warm * 2 <= cold,
        "{warm} GETs after the warm pass, {cold} cold"
    );
}

/// The same with the loop device reading the FUSE file by direct I/O
/// (`[snapshotter] loop_direct_io`): the kernel takes it for a FUSE file,
/// and the tree reads the same.
#[test]
fn the_reference_tools_image_is_served_the_same_with_direct_io_on_the_loop_device() {
    serves_the_reference_tools_image(LoopIo::Direct, false);
}

/// Whether the kernel's loop device `dev` (`/dev/loopN`) reads its file
/// with direct I/O.
fn loop_dio(dev: &str) -> bool {
    let name = dev.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
        .unwrap()
        .trim()
        == "1"
}

/// Returns the GETs the mount and the listing sent.
fn serves_the_reference_tools_image(loop_io: LoopIo, warm: bool) -> usize {
    let fx = fixtures();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("tarn-obd-lazy-")
        .tempdir_in("/tmp")
        .unwrap();
    let cache = Arc::new(Cache::open(&dir.path().join("cache")).unwrap());
    let layers = layer_blobs(&fx.join("oci"));
    let total: u64 = layers.iter().map(|l| l.len() as u64).sum();
    let blobs: Vec<Arc<FakeBlob>> = layers
        .iter()
        .map(|l| FakeBlob::instant(l.clone()))
        .collect();
    // No read-ahead: this test shows what reads alone fetch. (With the
    // default 1 MiB window, growing to 8 MiB on sequential misses, the
    // listing of this 9 MB image fetched all of it.)
    let scheduler = FetchScheduler::new(SchedulerConfig {
        read_ahead: 0,
        ..SchedulerConfig::default()
    });
    let disk = rt.block_on(async {
        let mut opened = Vec::new();
        for (l, b) in layers.iter().zip(&blobs) {
            let layer = DiskLayer::open(
                tarn_fs::Digest::of(l),
                b.clone(),
                cache.clone(),
                scheduler.clone(),
            )
            .await
            .expect("open an overlaybd layer through the fetch engine");
            opened.push(Arc::new(layer));
        }
        Arc::new(LazyDisk::new(opened).unwrap())
    });
    assert_eq!(disk.size(), 64 << 30);
    let served = || {
        blobs
            .iter()
            .flat_map(|b| b.reads())
            .map(|(r, _)| r.end - r.start)
            .sum::<u64>()
    };
    let gets = || blobs.iter().map(|b| b.reads().len()).sum::<usize>();
    let opened = served();
    if warm {
        let w = rt
            .block_on(disk.warm_metadata())
            .expect("warm the metadata");
        eprintln!("warm pass: {w:?}; {} bytes fetched", served() - opened);
        assert!(w.directories > 1 && !w.cut && w.skipped == 0, "{w:?}");
        assert!(w.fetched_bytes > 0, "{w:?}");
    }
    let warmed_gets = gets();

    let options = MountOptions {
        fsname: "tarn-obd-test".into(),
        threads: 2,
        ..MountOptions::default()
    };
    let mount = DiskMount::attach(
        disk,
        &dir.path().join("obd"),
        rt.handle().clone(),
        &options,
        loop_io,
    )
    .expect("attach the lazy disk");
    assert_eq!(
        loop_dio(mount.device().expect("a loop device")),
        loop_io == LoopIo::Direct,
        "the loop device reads with {loop_io:?}"
    );
    let file = dir.path().join("obd/disk").join(DISK_NAME);
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 64 << 30);
    let mnt = mount.fs().to_owned();
    assert!(mounted(&mnt));
    assert_eq!(loops_under(dir.path()).len(), 1, "one loop device");

    // The tree: types, modes, owners, sizes, mtimes, symlink targets.
    let listing = run(Command::new("find")
        .arg(".")
        .arg("-printf")
        .arg("%y %#m %U:%G %s %T@ %p -> %l\\n")
        .current_dir(&mnt));
    let expected = std::fs::read_to_string(fx.join("expected-listing.txt")).unwrap();
    assert_eq!(sorted_by_path(&listing), sorted_by_path(&expected));
    let listed = served();
    eprintln!(
        "blobs {total} bytes; opening fetched {opened}, mount and listing {}",
        listed - opened
    );
    assert!(
        listed < total / 2,
        "listing fetched {listed} of {total} bytes"
    );
    let listing_gets = gets() - warmed_gets;

    // Contents: every regular file's sha256.
    let want: BTreeMap<String, String> = std::fs::read_to_string(fx.join("expected-sha256.txt"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(h, p)| (p.to_owned(), h.to_owned()))
        .collect();
    for (path, hash) in &want {
        let got = Sha256::digest(std::fs::read(mnt.join(path)).unwrap())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        assert_eq!(&got, hash, "sha256 of {path}");
    }
    let out = run(Command::new("chroot")
        .arg(&mnt)
        .args(["/bin/sh", "/app/run.sh"]));
    let random5m = &want["./data/random5m"][..16];
    assert_eq!(
        out,
        format!("hello from overlaybd\nv2\n{random5m}\nnew.txt\n")
    );
    eprintln!("after reading every file: {} bytes fetched", served());

    mount.detach().expect("tear the disk down");
    assert!(!mounted(&mnt), "the ext4 mount is gone");
    assert!(
        !mounted(&dir.path().join("obd/disk")),
        "the FUSE mount is gone"
    );
    assert_eq!(
        loops_under(dir.path()),
        Vec::<String>::new(),
        "no loop device is left"
    );
    listing_gets
}

/// A disk that holds no filesystem (the fixture's bottom layer with its
/// extents left out: all zeros) fails to mount, and the attach leaves
/// nothing behind.
#[test]
fn a_disk_that_does_not_mount_leaves_nothing_attached() {
    let fx = fixtures();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::Builder::new()
        .prefix("tarn-obd-fail-")
        .tempdir_in("/tmp")
        .unwrap();
    let cache = Arc::new(Cache::open(&dir.path().join("cache")).unwrap());
    let bottom = layer_blobs(&fx.join("oci")).remove(0);
    let disk = rt.block_on(async {
        let layer = DiskLayer::open(
            tarn_fs::Digest::of(&bottom),
            FakeBlob::instant(bottom.clone()),
            cache,
            FetchScheduler::new(Default::default()),
        )
        .await
        .unwrap();
        let zeros = DiskLayer {
            extents: Vec::new().into(),
            ..layer
        };
        Arc::new(LazyDisk::new(vec![Arc::new(zeros)]).unwrap())
    });
    let err = DiskMount::attach(
        disk,
        &dir.path().join("obd"),
        rt.handle().clone(),
        &MountOptions::default(),
        LoopIo::default(),
    )
    .err()
    .expect("zeros are no ext4");
    eprintln!("attach failed as it should: {err}");
    assert!(!mounted(&dir.path().join("obd/fs")));
    assert!(!mounted(&dir.path().join("obd/disk")));
    assert_eq!(
        loops_under(dir.path()),
        Vec::<String>::new(),
        "no loop device is left"
    );
}
