//! Issue 2's acceptance: eStargz layers in a real `docker-registry`, mounted
//! by the real `tarn mount-layer` with FUSE. Needs root, /dev/fuse, the
//! Debian packages of the test bed, and `tarn` built into `$TARN_BIN_DIR` beforehand.
//! Figures (bytes, requests) are printed with `--nocapture`.

mod support;

use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Barrier};

use support::proc::{MountLayer, blob_gets, is_mounted};
use support::tree::{assert_tree_matches_tar, pseudo_random, sample_tar};
use tarn_fs::Digest;
use tarn_fs::fetch::MAX_GAP;
use tarn_fs::format::estargz::{WriteOptions, decode_toc, parse_footer, write_estargz};
use tarn_fs::num::usize_from;
use tarn_integration::registry::TestRegistry;

const TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

struct Pushed {
    image: String,
    layer: String,
    blob: Vec<u8>,
}

/// Converts `tar` with tarn's writer and pushes it as a one-layer image
/// whose annotation names `annotated_toc` (the real TOC digest if `None`;
/// no annotation at all if `Some("")`).
fn push_layer(
    reg: &TestRegistry,
    repo: &str,
    tar: &[u8],
    opts: &WriteOptions,
    annotated_toc: Option<&str>,
) -> Pushed {
    let mut blob = Vec::new();
    let res = write_estargz(tar, &mut blob, opts).expect("writer");
    push_blob_as_layer(reg, repo, blob, res.toc_digest, annotated_toc)
}

fn push_blob_as_layer(
    reg: &TestRegistry,
    repo: &str,
    blob: Vec<u8>,
    toc: Digest,
    annotated: Option<&str>,
) -> Pushed {
    let ann = match annotated {
        None => vec![(TOC_ANNOTATION.to_string(), toc.to_string())],
        Some("") => vec![],
        Some(d) => vec![(TOC_ANNOTATION.to_string(), d.to_string())],
    };
    block_on(reg.push_image(repo, Some("latest"), "amd64", &[(blob.clone(), ann)])).expect("push");
    Pushed {
        image: format!("{}/{repo}:latest", reg.host()),
        layer: Digest::of(&blob).to_string(),
        blob,
    }
}

fn dirs() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let d = tempfile::Builder::new()
        .prefix("tarn-mount-")
        .tempdir()
        .expect("tempdir");
    let (mnt, root) = (d.path().join("mnt"), d.path().join("root"));
    std::fs::create_dir(&mnt).expect("mnt");
    (d, mnt, root)
}

/// Blob GETs the registry served so far: (requests, bytes).
fn served(reg: &TestRegistry) -> (u64, u64) {
    blob_gets(&reg.log().expect("registry log"))
}

#[test]
fn round_trip_of_every_entry_type() {
    let reg = TestRegistry::start().expect("registry");
    let tar = sample_tar(64 << 10);
    let opts = WriteOptions {
        chunk_size: 64 << 10,
        ..WriteOptions::default()
    };
    let p = push_layer(&reg, "roundtrip", &tar, &opts, None);
    let (_d, mnt, root) = dirs();

    let before = served(&reg);
    let m = MountLayer::start(&p.image, &p.layer, &mnt, &root, &[]);
    let n = assert_tree_matches_tar(&mnt, &tar);
    let exit = m.stop();
    assert!(!is_mounted(&mnt), "SIGTERM unmounts");
    let (reqs, bytes) = served(&reg);
    let (tb, tr) = exit.fetched();
    eprintln!(
        "round trip: {n} paths equal; blob {} B; registry served {} blob GETs, {} B; tarn reports {tb} B in {tr} requests",
        p.blob.len(),
        reqs - before.0,
        bytes - before.1
    );
    assert_eq!(tb, bytes - before.1, "tarn's count matches the registry's");
}

#[test]
fn one_small_file_of_a_large_layer_fetches_under_one_percent() {
    let reg = TestRegistry::start().expect("registry");
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, data).expect("tar");
    };
    add("big/random.bin", &pseudo_random(110 << 20, 7));
    add("etc/small.conf", b"key = value\n");
    add("big/random2.bin", &pseudo_random(4 << 20, 8));
    let tar = b.into_inner().expect("tar");
    let opts = WriteOptions {
        level: 1,
        ..WriteOptions::default()
    };
    let p = push_layer(&reg, "large", &tar, &opts, None);
    assert!(p.blob.len() >= 100 << 20);
    let (_d, mnt, root) = dirs();

    let before = served(&reg);
    let m = MountLayer::start(&p.image, &p.layer, &mnt, &root, &[]);
    assert_eq!(
        std::fs::read(mnt.join("etc/small.conf")).expect("read"),
        b"key = value\n"
    );
    let exit = m.stop();
    let (reqs, bytes) = (served(&reg).0 - before.0, served(&reg).1 - before.1);
    let pct = bytes as f64 * 100.0 / p.blob.len() as f64;
    eprintln!(
        "large layer: blob {} B; reading one small file fetched {bytes} B in {reqs} GETs ({pct:.3}% of the blob); tarn: {:?}",
        p.blob.len(),
        exit.fetched()
    );
    assert!(pct < 1.0, "fetched {pct}% of the blob");
}

/// The blob range of `path`'s first chunk, from the blob's own TOC.
fn entry_offset(blob: &[u8], path: &str) -> u64 {
    let loc = parse_footer(&blob[blob.len() - 51..], blob.len() as u64).expect("footer");
    let toc = decode_toc(&blob[usize_from(loc.toc_range.start)..usize_from(loc.toc_range.end)])
        .expect("toc");
    let json: serde_json::Value = serde_json::from_slice(&toc.json).expect("json");
    json["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["name"] == path)
        .and_then(|e| e["offset"].as_u64())
        .expect("entry with an offset")
}

#[test]
fn tampered_bytes_are_eio_and_never_cached_and_a_wrong_toc_is_refused() {
    let reg = TestRegistry::start().expect("registry");
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in [
        ("victim", pseudo_random(300_000, 1)),
        ("bystander", pseudo_random(300_000, 2)),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, &data[..]).expect("tar");
    }
    let tar = b.into_inner().expect("tar");
    let mut blob = Vec::new();
    let res = write_estargz(&tar[..], &mut blob, &WriteOptions::default()).expect("writer");
    // Flip bytes inside the victim's compressed payload; the TOC is intact.
    let off = usize_from(entry_offset(&blob, "victim"));
    for i in [100, 5_000, 50_000] {
        blob[off + i] ^= 0x55;
    }
    let p = push_blob_as_layer(&reg, "tampered", blob, res.toc_digest, None);
    let (_d, mnt, root) = dirs();

    let m = MountLayer::start(&p.image, &p.layer, &mnt, &root, &[]);
    for attempt in 0..2 {
        let err = std::fs::read(mnt.join("victim")).expect_err("tampered content must not read");
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EIO),
            "attempt {attempt}: {err}"
        );
    }
    assert_eq!(
        std::fs::read(mnt.join("bystander")).expect("bystander"),
        pseudo_random(300_000, 2)
    );
    let exit = m.stop();
    assert!(exit.verify_failures() >= 1, "{}", exit.stdout);
    eprintln!(
        "tampered layer: {}",
        exit.stdout.lines().last().unwrap_or_default()
    );

    // A fresh mount over the same cache still refuses: nothing bad was kept.
    let m = MountLayer::start(&p.image, &p.layer, &mnt, &root, &[]);
    let err = std::fs::read(mnt.join("victim")).expect_err("still refused");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    drop(m);

    // The TOC does not match the annotation: no mount at all.
    let wrong = Digest::of(b"some other toc").to_string();
    let p = push_layer(
        &reg,
        "wrongtoc",
        &tar,
        &WriteOptions::default(),
        Some(&wrong),
    );
    let exit = MountLayer::spawn(&p.image, &p.layer, &mnt, &root, &[]).wait();
    assert!(!exit.success && !is_mounted(&mnt));
    eprintln!("wrong TOC annotation: {}", exit.stderr.trim());
    assert!(
        exit.stderr
            .contains("does not match the layer's annotation"),
        "{}",
        exit.stderr
    );
    assert_eq!(exit.stderr.trim().lines().count(), 1, "one line on stderr");

    // No annotation: refused unless allowed.
    let p = push_layer(
        &reg,
        "unannotated",
        &tar,
        &WriteOptions::default(),
        Some(""),
    );
    let exit = MountLayer::spawn(&p.image, &p.layer, &mnt, &root, &[]).wait();
    assert!(
        !exit.success && exit.stderr.contains("--allow-unverified-toc"),
        "{}",
        exit.stderr
    );
    let m = MountLayer::start(&p.image, &p.layer, &mnt, &root, &["--allow-unverified-toc"]);
    assert_eq!(
        std::fs::read(mnt.join("bystander")).expect("bystander"),
        pseudo_random(300_000, 2)
    );
    drop(m);
}

#[test]
fn concurrent_readers_fetch_each_chunk_once() {
    let reg = TestRegistry::start().expect("registry");
    let data = pseudo_random(12 << 20, 3);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "shared.bin", &data[..]).expect("tar");
    let tar = b.into_inner().expect("tar");
    let opts = WriteOptions {
        chunk_size: 256 << 10,
        level: 1,
        ..WriteOptions::default()
    };
    let p = push_layer(&reg, "concurrent", &tar, &opts, None);
    let (_d, mnt, root) = dirs();

    let m = MountLayer::start(&p.image, &p.layer, &mnt, &root, &[]);
    let after_open = served(&reg);
    let barrier = Arc::new(Barrier::new(32));
    let readers: Vec<_> = (0..32)
        .map(|_| {
            let (barrier, path) = (barrier.clone(), mnt.join("shared.bin"));
            std::thread::spawn(move || {
                barrier.wait();
                std::fs::read(path).expect("read")
            })
        })
        .collect();
    for r in readers {
        assert!(
            r.join().expect("reader") == data,
            "every reader sees the file"
        );
    }
    let exit = m.stop();
    let (reqs, bytes) = (served(&reg).0 - after_open.0, served(&reg).1 - after_open.1);
    // The file's chunks span the blob from its first member to the TOC.
    let loc = parse_footer(&p.blob[p.blob.len() - 51..], p.blob.len() as u64).expect("footer");
    let file_bytes = loc.toc_offset - entry_offset(&p.blob, "shared.bin");
    // Chunks inside the blob's tail come from the GET that opened the layer.
    let tail_start =
        p.blob.len() as u64 - (p.blob.len() as u64).min(tarn_fs::format::estargz::TAIL_FETCH);
    let in_tail = loc
        .toc_offset
        .saturating_sub(tail_start.max(loc.toc_offset - file_bytes));
    eprintln!(
        "32 concurrent readers of a 12 MiB file (48 chunks): {reqs} GETs, {bytes} B for {file_bytes} B of chunks; tarn: {:?}",
        exit.fetched()
    );
    assert_eq!(
        bytes + in_tail,
        file_bytes,
        "every chunk fetched exactly once"
    );
}

#[test]
fn sigkill_mid_read_leaves_no_corrupt_cache_and_nothing_mounted() {
    let reg = TestRegistry::start().expect("registry");
    let data = pseudo_random(48 << 20, 4);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "file.bin", &data[..]).expect("tar");
    let tar = b.into_inner().expect("tar");
    let opts = WriteOptions {
        chunk_size: 512 << 10,
        level: 1,
        ..WriteOptions::default()
    };
    let p = push_layer(&reg, "killed", &tar, &opts, None);
    let (_d, mnt, root) = dirs();

    let m = MountLayer::start(&p.image, &p.layer, &mnt, &root, &[]);
    let path = mnt.join("file.bin");
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::open(path).expect("open");
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    // Kill once the read is under way, but well before it is done.
    let start = std::time::Instant::now();
    while served(&reg).1 < (4 << 20) && start.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    m.signal(libc::SIGKILL);
    let partial = reader.join().expect("reader");
    let exit = m.wait();
    let st = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(&mnt)
        .status()
        .expect("fusermount3");
    assert!(!exit.success, "SIGKILL ends tarn");
    assert!(
        st.success() && !is_mounted(&mnt),
        "fusermount3 -u leaves nothing mounted"
    );
    eprintln!(
        "SIGKILL after the reader got {partial} of {} bytes",
        data.len()
    );

    let before = served(&reg);
    let m = MountLayer::start(&p.image, &p.layer, &mnt, &root, &[]);
    assert!(
        std::fs::read(mnt.join("file.bin")).expect("read") == data,
        "contents equal after the crash"
    );
    let exit = m.stop();
    eprintln!(
        "remount after SIGKILL: {:?} (bytes, requests) fetched; registry served {} B more",
        exit.fetched(),
        served(&reg).1 - before.1
    );
}

/// The OCI layout of a test image built by the test bed's scripts.
fn image_layout(name: &str) -> std::path::PathBuf {
    let cache =
        std::env::var("TARN_IMAGE_CACHE").unwrap_or_else(|_| "/var/cache/tarn-images".into());
    let dir = Path::new(&cache).join(name);
    if !dir.join("index.json").exists() {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/images.sh");
        let st = std::process::Command::new(&script)
            .args(["build", name])
            .status()
            .expect("images.sh");
        assert!(st.success(), "{} build {name} failed", script.display());
    }
    dir
}

fn layout_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    std::fs::read(layout.join("blobs/sha256").join(hex)).expect("blob in layout")
}

#[test]
fn layers_converted_by_ctr_remote_mount_equal_to_their_tar() {
    let reg = TestRegistry::start().expect("registry");
    let layout = image_layout("python-esgz");
    let dest = format!("docker://{}/python-esgz:latest", reg.host());
    let st = std::process::Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:latest", layout.display()))
        .arg(&dest)
        .status()
        .expect("skopeo");
    assert!(st.success(), "skopeo copy");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("json");
    let manifest: serde_json::Value = serde_json::from_slice(&layout_blob(
        &layout,
        index["manifests"][0]["digest"].as_str().expect("digest"),
    ))
    .expect("manifest");
    let image = format!("{}/python-esgz:latest", reg.host());

    for layer in manifest["layers"].as_array().expect("layers") {
        let digest = layer["digest"].as_str().expect("digest");
        assert!(
            layer["annotations"][TOC_ANNOTATION].is_string(),
            "ctr-remote annotates the TOC digest"
        );
        let blob = layout_blob(&layout, digest);
        let mut tar = Vec::new();
        flate2::read::MultiGzDecoder::new(&blob[..])
            .read_to_end(&mut tar)
            .expect("gunzip");

        let (_d, mnt, root) = dirs();
        let before = served(&reg);
        let m = MountLayer::start(&image, digest, &mnt, &root, &[]);
        let on_mount = served(&reg);
        let n = assert_tree_matches_tar(&mnt, &tar);
        let exit = m.stop();
        let after = served(&reg);
        eprintln!(
            "ctr-remote layer {digest}: {n} paths equal; blob {} B; mount: {} GETs {} B (footer+TOC); \
             reading everything: {} GETs {} B; tarn: {:?}",
            blob.len(),
            on_mount.0 - before.0,
            on_mount.1 - before.1,
            after.0 - on_mount.0,
            after.1 - on_mount.1,
            exit.fetched()
        );
        assert!(
            on_mount.0 - before.0 <= 2,
            "opening takes the footer and TOC only"
        );
        // A GET may carry a chunk already cached (read on demand, or by a
        // hint, while the GET was planned) when at most `MAX_GAP` separates
        // two missing ones: one round trip saved for a few KiB (see
        // `fetch::plan`). Beyond that, no byte comes twice.
        let gets = after.0 - before.0;
        assert!(
            after.1 - before.1 <= blob.len() as u64 + gets * MAX_GAP,
            "the blob is fetched about once: {} B in {gets} GETs for a blob of {} B",
            after.1 - before.1,
            blob.len()
        );
    }
}

/// Issue 13, item 8: an unmount from outside ends `tarn mount-layer`, with
/// status 0 and a line saying why.
#[test]
fn an_unmount_from_outside_ends_mount_layer() {
    let reg = TestRegistry::start().expect("registry");
    let tar = sample_tar(64 << 10);
    let p = push_layer(&reg, "outside", &tar, &WriteOptions::default(), None);
    let (_d, mnt, root) = dirs();
    let m = MountLayer::start(&p.image, &p.layer, &mnt, &root, &[]);
    let st = std::process::Command::new("umount")
        .arg(&mnt)
        .status()
        .expect("umount");
    assert!(st.success(), "umount {}", mnt.display());
    let exit = m.wait_within(
        "tarn mount-layer to exit after its unmount",
        std::time::Duration::from_secs(30),
    );
    assert!(exit.success, "exit status: {}", exit.stderr);
    assert!(
        exit.stdout.contains("unmounted from outside"),
        "says why it exited: {}",
        exit.stdout
    );
    assert!(!is_mounted(&mnt));
}

/// Issue 13, item 6: a lazy mount is `nodev,nosuid`, yet an image's setuid
/// binary and device node work through an overlay on it exactly as through
/// an overlay on a plain directory (containerd's overlayfs snapshotter):
/// overlayfs checks the overlay's mount, not its lower layers'.
#[test]
fn setuid_and_devices_work_through_an_overlay_of_a_nodev_nosuid_mount() {
    // A setuid-root copy of `id` and a char device 1:3 (a /dev/null).
    let id = std::fs::read("/usr/bin/id").expect("read /usr/bin/id");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o4755);
    h.set_size(id.len() as u64);
    h.set_uid(0);
    h.set_gid(0);
    b.append_data(&mut h, "suid-id", &id[..])
        .expect("append id");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Char);
    h.set_mode(0o666);
    h.set_size(0);
    h.set_device_major(1).expect("major");
    h.set_device_minor(3).expect("minor");
    b.append_data(&mut h, "null", &[][..]).expect("append null");
    let tar = b.into_inner().expect("tar");
    let reg = TestRegistry::start().expect("registry");
    let p = push_layer(&reg, "options", &tar, &WriteOptions::default(), None);
    let (d, mnt, root) = dirs();
    // The user that runs the setuid binary must reach it.
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod temp dir");
    let m = MountLayer::start(&p.image, &p.layer, &mnt, &root, &[]);

    let options = std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&*mnt.to_string_lossy()))
        .map(|l| l.split(' ').nth(5).unwrap_or("").to_owned())
        .expect("the layer's mount");
    assert!(
        options.contains("nodev") && options.contains("nosuid"),
        "lazy mount options: {options}"
    );

    // The same files in a plain directory: the overlayfs snapshotter's case.
    let plain = d.path().join("plain");
    std::fs::create_dir(&plain).expect("plain");
    std::fs::write(plain.join("suid-id"), &id).expect("write id");
    std::fs::set_permissions(
        plain.join("suid-id"),
        std::os::unix::fs::PermissionsExt::from_mode(0o4755),
    )
    .expect("chmod 4755");
    nix::sys::stat::mknod(
        &plain.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .expect("mknod 1:3");
    let as_nobody = |exe: &Path| -> String {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(exe)
            .arg("-u")
            .output()
            .expect("setpriv");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let opens = |dev: &Path| std::fs::File::open(dev).is_ok();
    let overlay = |lower: &Path, name: &str| -> std::path::PathBuf {
        let base = d.path().join(name);
        let (upper, work, merged) = (base.join("u"), base.join("w"), base.join("m"));
        for p in [&upper, &work, &merged] {
            std::fs::create_dir_all(p).expect("overlay dirs");
        }
        let st = std::process::Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                upper.display(),
                work.display()
            ))
            .arg(&merged)
            .status()
            .expect("mount overlay");
        assert!(st.success(), "mount overlay on {}", lower.display());
        merged
    };
    let over_plain = overlay(&plain, "op");
    let over_lazy = overlay(&mnt, "ol");
    let seen = |dir: &Path| (as_nobody(&dir.join("suid-id")), opens(&dir.join("null")));
    let (plain_seen, lazy_seen, direct_seen) = (seen(&over_plain), seen(&over_lazy), seen(&mnt));
    for m in [&over_lazy, &over_plain] {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
    eprintln!(
        "(euid of the setuid-root id run by uid 65534, device opens): overlay on a plain dir {plain_seen:?}, \
         overlay on the lazy mount {lazy_seen:?}, the lazy mount itself {direct_seen:?}"
    );
    assert_eq!(
        lazy_seen, plain_seen,
        "an overlay on a lazy layer behaves as containerd's overlayfs snapshotter"
    );
    assert_eq!(
        plain_seen,
        ("0".to_owned(), true),
        "setuid and devices work in an overlay"
    );
    assert_eq!(
        direct_seen,
        ("65534".to_owned(), false),
        "the lazy mount itself honours nodev,nosuid"
    );
    m.stop();
}
