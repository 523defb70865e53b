//! `tarn convert --format overlaybd` against the test bed's registry
//! (issue 15's "Convert"): an ordinary image is converted and pushed; the
//! result is fetched back, every layer opened with tarn's own overlaybd
//! reader and stacked, the stacked disk loop-mounted read-only, and its
//! tree compared with the source image unpacked by plain `tar` (whiteouts
//! applied): types, modes, owners, sizes, mtimes, symlink targets, user
//! xattrs and every regular file's sha256. The manifest carries the
//! annotations the reference snapshotter reads and the config's diff IDs
//! are the blobs' digests. Each conversion must leave no mount, loop
//! device or scratch file behind, a failed one included. Needs root, loop
//! devices, mkfs.ext4 and GNU tar.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use tarn_integration::testbed::overlaybd_fixtures as fixtures;

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tarn_fs::format::overlaybd::StackedDisk;
use tarn_fs::format::overlaybd::read::MAX_READ;
use tarn_fs::registry::BlobSource;
use tarn_fs::testing::FakeBlob;
use tarn_integration::bins;
use tarn_integration::daemon::Daemon;
use tarn_integration::registry::{OCI_MANIFEST, TestRegistry};
use tarn_integration::testbed::Component;
use tarn_integration::wait::wait_until;

const ANNOTATION: &str = "containerd.io/snapshot/overlaybd";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `tarn convert` with a scratch directory of its own under `work`.
fn convert(src: &str, dst: &str, work: &Path) -> Output {
    Command::new(bins::tarn().unwrap())
        .args(["convert", "--format", "overlaybd", src, dst, "--work-dir"])
        .arg(work)
        .output()
        .unwrap()
}

/// Nothing of a conversion left: no scratch files, no mount or loop
/// device on anything under `work`.
fn assert_nothing_left(work: &Path) {
    let left: Vec<_> = std::fs::read_dir(work).unwrap().collect();
    assert!(left.is_empty(), "scratch files left: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let w = work.to_string_lossy();
    assert!(!mounts.contains(&*w), "a mount left under {w}:\n{mounts}");
    let loops = Command::new("losetup").arg("-a").output().unwrap();
    let loops = String::from_utf8_lossy(&loops.stdout);
    assert!(!loops.contains(&*w), "a loop device left on {w}:\n{loops}");
}

/// GETs a path of the registry.
fn get(reg: &TestRegistry, path: &str) -> Vec<u8> {
    let url = format!("http://{}{path}", reg.host());
    rt().block_on(async {
        let resp = reqwest::Client::new()
            .get(&url)
            .header(reqwest::header::ACCEPT, OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "GET {url}: {}", resp.status());
        resp.bytes().await.unwrap().to_vec()
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The converted image `repo:tag`: checks its manifest and config, and
/// returns its layer blobs, bottom first.
fn fetch_converted(reg: &TestRegistry, repo: &str, tag: &str) -> Vec<Vec<u8>> {
    let manifest: Value =
        serde_json::from_slice(&get(reg, &format!("/v2/{repo}/manifests/{tag}"))).unwrap();
    let config: Value = serde_json::from_slice(&get(
        reg,
        &format!(
            "/v2/{repo}/blobs/{}",
            manifest["config"]["digest"].as_str().unwrap()
        ),
    ))
    .unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(diff_ids.len(), layers.len());
    let mut blobs = Vec::new();
    for (l, diff_id) in layers.iter().zip(diff_ids) {
        let digest = l["digest"].as_str().unwrap();
        assert_eq!(
            l["mediaType"].as_str(),
            Some("application/vnd.oci.image.layer.v1.tar")
        );
        let a = &l["annotations"];
        assert_eq!(a[format!("{ANNOTATION}/version")].as_str(), Some("0.1.0"));
        assert_eq!(
            a[format!("{ANNOTATION}/blob-digest")].as_str(),
            Some(digest)
        );
        assert_eq!(
            a[format!("{ANNOTATION}/blob-size")].as_str(),
            Some(l["size"].to_string().as_str())
        );
        assert_eq!(
            a[format!("{ANNOTATION}/blob-fs-type")].as_str(),
            Some("ext4")
        );
        assert_eq!(diff_id.as_str(), Some(digest), "diff ID = blob digest");
        let blob = get(reg, &format!("/v2/{repo}/blobs/{digest}"));
        assert_eq!(format!("sha256:{}", sha256_hex(&blob)), digest);
        blobs.push(blob);
    }
    blobs
}

/// A read-only loop device over a file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-r", "-f", "--show"])
            .arg(file)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {out:?}");
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A mount, unmounted on drop.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::mount::umount(&self.0);
    }
}

/// The blobs stacked by tarn's reader into a sparse disk file at `image`.
fn stack_to_file(blobs: Vec<Vec<u8>>, image: &Path) {
    let rt = rt();
    let sources: Vec<Arc<dyn BlobSource>> = blobs
        .into_iter()
        .map(|b| -> Arc<dyn BlobSource> { FakeBlob::instant(b) })
        .collect();
    let disk = rt
        .block_on(StackedDisk::open(sources))
        .expect("tarn's reader opens and stacks every converted layer");
    assert_eq!(disk.size(), 64 << 30);
    let file = File::create(image).unwrap();
    file.set_len(disk.size()).unwrap();
    for range in disk.map().data_ranges() {
        let mut at = range.start;
        while at < range.end {
            let end = range.end.min(at + MAX_READ);
            let bytes = rt.block_on(disk.read(at..end)).unwrap();
            file.write_all_at(&bytes, at).unwrap();
            at = end;
        }
    }
    file.sync_all().unwrap();
}

/// The source layers unpacked in order by GNU tar, as a container would
/// see them: before each layer, what its whiteouts name goes (an opaque
/// marker empties its directory), and the markers themselves are not
/// kept.
fn unpack_source(layers: &[PathBuf], dir: &Path) {
    for (i, blob) in layers.iter().enumerate() {
        let layer = &dir.with_extension(format!("layer{i}.tar"));
        plain_tar(blob, layer);
        let list = Command::new("tar").arg("-tf").arg(layer).output().unwrap();
        assert!(list.status.success());
        for name in String::from_utf8(list.stdout).unwrap().lines() {
            let path = Path::new(name.trim_start_matches('/'));
            let Some(base) = path.file_name().and_then(|b| b.to_str()) else {
                continue;
            };
            let parent = dir.join(path.parent().unwrap_or(Path::new("")));
            if base == ".wh..wh..opq" {
                if let Ok(children) = std::fs::read_dir(&parent) {
                    for c in children {
                        let p = c.unwrap().path();
                        if p.is_dir() && !p.is_symlink() {
                            std::fs::remove_dir_all(&p).unwrap();
                        } else {
                            std::fs::remove_file(&p).unwrap();
                        }
                    }
                }
            } else if let Some(hidden) = base.strip_prefix(".wh.") {
                let p = parent.join(hidden);
                if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p).unwrap();
                } else {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        let ok = Command::new("tar")
            .args([
                "-x",
                "-p",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
            ])
            .arg("-f")
            .arg(layer)
            .arg("-C")
            .arg(dir)
            .status()
            .unwrap();
        assert!(ok.success(), "tar -x {}", layer.display());
        let wh = Command::new("find")
            .arg(dir)
            .args(["-name", ".wh.*", "-delete"])
            .status()
            .unwrap();
        assert!(wh.success());
        std::fs::remove_file(layer).unwrap();
    }
}

/// The tar in `blob` (gzip or plain) at `out`, padded to whole blocks and
/// ended with two zero blocks: umoci writes layers without either, which
/// GNU tar takes for a truncated archive.
fn plain_tar(blob: &Path, out: &Path) {
    use std::io::Read;
    let mut bytes = Vec::new();
    let raw = std::fs::read(blob).unwrap();
    if raw.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut bytes)
            .unwrap();
    } else {
        bytes = raw;
    }
    bytes.resize(bytes.len().div_ceil(512) * 512 + 1024, 0);
    std::fs::write(out, bytes).unwrap();
}

/// User xattrs of `path`, names and values.
fn user_xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: `c` is NUL-terminated; `names` is writable for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}", path.display());
    names.truncate(usize::try_from(n).unwrap());
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| n.starts_with(b"user.")) {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 64 << 10];
        // SAFETY: both strings are NUL-terminated; `v` is writable for its
        // length.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(m >= 0);
        v.truncate(usize::try_from(m).unwrap());
        out.push((String::from_utf8_lossy(name).into_owned(), v));
    }
    out
}

/// What a tree shows a container: per path (`lost+found` and the root
/// left out) type, mode, owner, size and mtime (seconds; directories
/// neither, their sizes and times are the filesystem's), symlink target,
/// user xattrs, and the sha256 of regular files.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let out = Command::new("find")
        .arg(".")
        .arg("-printf")
        .arg("%y %#m %U:%G %s %T@ %p\\0%l\\0")
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = text.split('\0').collect();
    let mut map = BTreeMap::new();
    for pair in fields.chunks(2) {
        let [line, target] = pair else { continue };
        let mut f = line.splitn(6, ' ');
        let (kind, mode, owner, size, mtime, path) = (
            f.next().unwrap(),
            f.next().unwrap(),
            f.next().unwrap(),
            f.next().unwrap(),
            f.next().unwrap(),
            f.next().unwrap(),
        );
        if path == "." || path == "./lost+found" || path.starts_with("./lost+found/") {
            continue;
        }
        let secs = mtime.split('.').next().unwrap();
        let full = root.join(path);
        let mut desc = if kind == "d" {
            format!("{kind} {mode} {owner}")
        } else {
            format!("{kind} {mode} {owner} {size} {secs} -> {target}")
        };
        if kind == "f" {
            desc.push_str(&format!(
                " sha256={}",
                sha256_hex(&std::fs::read(&full).unwrap())
            ));
        }
        for (name, value) in user_xattrs(&full) {
            desc.push_str(&format!(" {name}={}", String::from_utf8_lossy(&value)));
        }
        map.insert(path.to_owned(), desc);
    }
    map
}

/// Converts `src` to `repo:obd` and checks the result's tree against the
/// source layers (tar files, bottom first) unpacked by tar.
fn convert_and_compare(reg: &TestRegistry, src: &str, repo: &str, source_layers: &[PathBuf]) {
    let scratch = tempfile::Builder::new()
        .prefix("tarn-convert-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let work = scratch.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let dst = format!("{}/{repo}:obd", reg.host());
    let out = convert(src, &dst, &work);
    assert!(
        out.status.success(),
        "tarn convert: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("layer ")).count(),
        source_layers.len(),
        "one progress line per layer"
    );
    assert_nothing_left(&work);

    let blobs = fetch_converted(reg, repo, "obd");
    assert_eq!(blobs.len(), source_layers.len());
    let image = scratch.path().join("disk.img");
    stack_to_file(blobs, &image);
    let mnt = scratch.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let dev = Loop::attach(&image);
    nix::mount::mount(
        Some(dev.0.as_str()),
        &mnt,
        Some("ext4"),
        nix::mount::MsFlags::MS_RDONLY,
        Some("noload"),
    )
    .expect("mount the stacked disk read-only");
    let mounted = Mount(mnt.clone());

    let want_dir = scratch.path().join("want");
    std::fs::create_dir(&want_dir).unwrap();
    unpack_source(source_layers, &want_dir);
    let got = tree(&mnt);
    let want = tree(&want_dir);
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (path, w) in &want {
        assert_eq!(&got[path], w, "{path}");
    }
    eprintln!("{} paths identical", want.len());
    drop(mounted);
    drop(dev);
}

#[test]
fn whiteouts_opaque_dirs_links_and_xattrs_convert_as_tar_unpacks_them() {
    let reg = TestRegistry::start().unwrap();
    let fx = fixtures();
    let layers: Vec<PathBuf> = (1..=3)
        .map(|i| fx.join(format!("layer{i}-source.tar")))
        .collect();
    let blobs: Vec<_> = layers
        .iter()
        .map(|p| (std::fs::read(p).unwrap(), Vec::new()))
        .collect();
    rt().block_on(reg.push_image("fx", Some("latest"), "amd64", &blobs))
        .unwrap();
    let src = format!("{}/fx:latest", reg.host());
    convert_and_compare(&reg, &src, "fx-obd", &layers);
}

#[test]
fn the_reference_image_converts_to_the_same_tree() {
    let reg = TestRegistry::start().unwrap();
    let name = std::env::var("TARN_CONVERT_IMAGE").unwrap_or_else(|_| "multi".to_string());
    let src = reg.bed().push_image(&name).unwrap();
    // The source layers, as tar files, from the cached OCI layout.
    let layout = tarn_integration::testbed::repo_root().join("scripts/images.sh");
    let out = Command::new(layout).args(["path", &name]).output().unwrap();
    assert!(out.status.success());
    let oci = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let json =
        |p: PathBuf| -> Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let blob = |d: &Value| {
        oci.join("blobs/sha256")
            .join(d.as_str().unwrap().trim_start_matches("sha256:"))
    };
    let index = json(oci.join("index.json"));
    let mut m = json(blob(&index["manifests"][0]["digest"]));
    if m["manifests"].is_array() {
        m = json(blob(&m["manifests"][0]["digest"]));
    }
    let layers: Vec<PathBuf> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| blob(&l["digest"]))
        .collect();
    convert_and_compare(&reg, &src, &format!("{name}-obd"), &layers);
}

#[test]
fn a_failed_conversion_leaves_no_mount_loop_device_or_scratch_file() {
    let reg = TestRegistry::start().unwrap();
    let fx = fixtures();
    // A good first layer, then one that is not a tar: the failure comes
    // with the disk mounted.
    let good = std::fs::read(fx.join("layer1-source.tar")).unwrap();
    let mut bad = std::fs::read(fx.join("layer3-source.tar")).unwrap();
    bad.truncate(700);
    bad[600..].fill(0xAB);
    rt().block_on(reg.push_image(
        "broken",
        Some("latest"),
        "amd64",
        &[(good, Vec::new()), (bad, Vec::new())],
    ))
    .unwrap();
    let scratch = tempfile::Builder::new()
        .prefix("tarn-convert-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let src = format!("{}/broken:latest", reg.host());
    let dst = format!("{}/broken-obd:latest", reg.host());
    let out = convert(&src, &dst, scratch.path());
    assert!(!out.status.success(), "a broken layer fails the conversion");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("layer 2"),
        "the error names the layer: {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert_nothing_left(scratch.path());
}

// ---------------------------------------------------------------- eStargz
//
// Issue 18's first acceptance item: `tarn convert` (eStargz, the default
// format) of the reference image; every layer passes the reference reader's
// verification (integration/go/estargz-verify, the Go estargz package of
// stargz-snapshotter, built by `make go-tools`); a full pull of the result
// through containerd's own overlayfs snapshotter gives the source's tree;
// the result runs lazily through tarn.

const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
const UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// What the reference image's `/app/run.sh` prints (as in remote_lazy.rs).
const WORKLOAD_OUT: [&str; 2] = ["tarn test workload", "Copyright 2009 The Go Authors"];
/// What an eStargz layer adds to the tree a plain unpack makes: its TOC
/// and its landmark file, at the root.
const ESTARGZ_EXTRAS: [&str; 2] = ["./.no.prefetch.landmark", "./stargz.index.json"];
/// containerd's proxy client and garbage collector: a failure bound.
const CONTAINERD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `tarn convert SRC DST` with the default format.
fn convert_estargz(src: &str, dst: &str, work: &Path) -> Output {
    Command::new(bins::tarn().unwrap())
        .args(["convert", src, dst, "--work-dir"])
        .arg(work)
        .output()
        .unwrap()
}

fn assert_success(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One layer of a converted eStargz image.
struct EstargzLayer {
    digest: String,
    size: u64,
    annotations: Value,
    diff_id: String,
}

/// The layers of `repo:tag` with their config's diff IDs.
fn estargz_layers(reg: &TestRegistry, repo: &str, tag: &str) -> Vec<EstargzLayer> {
    let manifest: Value =
        serde_json::from_slice(&get(reg, &format!("/v2/{repo}/manifests/{tag}"))).unwrap();
    let config: Value = serde_json::from_slice(&get(
        reg,
        &format!(
            "/v2/{repo}/blobs/{}",
            manifest["config"]["digest"].as_str().unwrap()
        ),
    ))
    .unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(diff_ids.len(), layers.len(), "a diff ID per layer");
    layers
        .iter()
        .zip(diff_ids)
        .map(|(l, d)| EstargzLayer {
            digest: l["digest"].as_str().unwrap().to_owned(),
            size: l["size"].as_u64().unwrap(),
            annotations: l["annotations"].clone(),
            diff_id: d.as_str().unwrap().to_owned(),
        })
        .collect()
}

/// Checks every layer of the eStargz image `repo:tag` with the reference
/// reader (`estargz-verify`): TOC digest, every chunk and file digest, the
/// blob as one tar stream equal to the TOC, diff ID and uncompressed size.
/// Also the media types and annotations containerd 1.6 and the stargz
/// snapshotter read. Returns the layers.
fn verify_estargz(reg: &TestRegistry, repo: &str, tag: &str, dir: &Path) -> Vec<EstargzLayer> {
    let manifest: Value =
        serde_json::from_slice(&get(reg, &format!("/v2/{repo}/manifests/{tag}"))).unwrap();
    assert_eq!(manifest["mediaType"].as_str(), Some(OCI_MANIFEST));
    let verify = bins::bin("estargz-verify")
        .expect("the Go checker: `make go-tools` (scripts/go-tools.sh $TARN_BIN_DIR)");
    let layers = estargz_layers(reg, repo, tag);
    for (l, m) in layers.iter().zip(manifest["layers"].as_array().unwrap()) {
        assert_eq!(m["mediaType"].as_str(), Some(OCI_LAYER_GZIP));
        let toc = l.annotations[TOC_DIGEST]
            .as_str()
            .expect("TOC digest annotation");
        let size = l.annotations[UNCOMPRESSED_SIZE]
            .as_str()
            .expect("uncompressed size annotation");
        let blob = get(reg, &format!("/v2/{repo}/blobs/{}", l.digest));
        assert_eq!(blob.len() as u64, l.size);
        assert_eq!(format!("sha256:{}", sha256_hex(&blob)), l.digest);
        let path = dir.join(l.digest.trim_start_matches("sha256:"));
        std::fs::write(&path, &blob).unwrap();
        let out = Command::new(&verify)
            .args(["-toc-digest", toc, "-diff-id", &l.diff_id])
            .args(["-uncompressed-size", size])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "the reference reader refuses layer {}:\n{text}{}",
            l.digest,
            String::from_utf8_lossy(&out.stderr)
        );
        eprint!("{text}");
        std::fs::remove_file(&path).unwrap();
    }
    layers
}

/// tarn as containerd's `tarn` proxy plugin, in the registry's test bed.
fn tarn_daemon(reg: &TestRegistry) -> Daemon {
    let config = format!("[registry]\nplain_http = [\"{}\"]\n", reg.host());
    Daemon::start_with(Some(reg.bed().dir().join("tarn.sock")), &config)
        .expect("start tarn-snapshotter")
}

/// `ctr` in the test bed, retried while containerd's proxy client
/// reconnects; the output of the success.
fn ctr_ok(reg: &TestRegistry, tarn: &Daemon, args: &[&str]) -> String {
    let mut last = None;
    let ok = wait_until(&format!("ctr {args:?}"), CONTAINERD_TIMEOUT, || {
        let out = reg.bed().ctr(args).expect("run ctr");
        let ok = out.status.success();
        last = Some(out);
        ok.then_some(())
    });
    let out = last.expect("ran once");
    if let Err(e) = ok {
        let log = tarn.log();
        let lines: Vec<&str> = log.lines().collect();
        panic!(
            "{e}: {}\ntarn log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            lines[lines.len().saturating_sub(30)..].join("\n")
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An image mounted read-only by `ctr images mount` (containerd's own
/// snapshotter), unmounted and its snapshot removed on drop.
struct ImageMount<'a> {
    reg: &'a TestRegistry,
    target: PathBuf,
}

impl<'a> ImageMount<'a> {
    fn new(reg: &'a TestRegistry, tarn: &Daemon, reference: &str, target: PathBuf) -> Self {
        std::fs::create_dir_all(&target).unwrap();
        let t = target.to_str().unwrap();
        ctr_ok(
            reg,
            tarn,
            &[
                "images",
                "mount",
                "--snapshotter",
                "overlayfs",
                reference,
                t,
            ],
        );
        ImageMount { reg, target }
    }
}

impl Drop for ImageMount<'_> {
    fn drop(&mut self) {
        let t = self.target.to_string_lossy().into_owned();
        let _ = self.reg.bed().ctr(&[
            "images",
            "unmount",
            "--snapshotter",
            "overlayfs",
            "--rm",
            &t,
        ]);
    }
}

/// Bytes of `blobs` (digests) the registry served since log line `since`.
fn blob_bytes_served(reg: &TestRegistry, since: usize, blobs: &[String]) -> u64 {
    reg.log().unwrap()[since..]
        .iter()
        .filter(|r| blobs.iter().any(|d| r.path.ends_with(d.as_str())))
        .map(|r| r.bytes)
        .sum()
}

#[test]
fn the_reference_image_converted_to_estargz_verifies_unpacks_the_same_and_runs_lazily() {
    let reg = TestRegistry::start_in_bed(&[Component::Registry, Component::Containerd])
        .expect("test bed up");
    let tarn = tarn_daemon(&reg);
    let name = std::env::var("TARN_CONVERT_IMAGE").unwrap_or_else(|_| "multi".to_string());
    let src = reg.bed().push_image(&name).unwrap();
    let repo = format!("{name}-conv");
    let dst = format!("{}/{repo}:latest", reg.host());
    let scratch = tempfile::Builder::new()
        .prefix("tarn-convert-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let work = scratch.path().join("work");
    std::fs::create_dir(&work).unwrap();

    let stdout = assert_success("tarn convert", &convert_estargz(&src, &dst, &work));
    eprintln!("{stdout}");
    assert_nothing_left(&work);
    let layers = verify_estargz(&reg, &repo, "latest", scratch.path());
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("layer ")).count(),
        layers.len(),
        "one line per layer"
    );

    // Lazily through tarn: every layer mounted remote, the workload runs,
    // the registry serves a part of the blobs.
    let before = reg.log().unwrap().len();
    let sock = reg.bed().containerd_sock().unwrap().to_owned();
    let rpull = Command::new("ctr-remote")
        .args(["--address", &sock])
        .args([
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "tarn",
            &dst,
        ])
        .output()
        .unwrap();
    assert_success("ctr-remote rpull", &rpull);
    assert_eq!(
        tarn.log()
            .matches("remote layer: answering already exists")
            .count(),
        layers.len(),
        "every converted layer mounted lazily:\n{}",
        tarn.log()
    );
    let out = ctr_ok(
        &reg,
        &tarn,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "tarn",
            &dst,
            "esgz-conv",
            "/app/run.sh",
        ],
    );
    for want in WORKLOAD_OUT {
        assert!(out.contains(want), "{want:?} missing from {out:?}");
    }
    let digests: Vec<String> = layers.iter().map(|l| l.digest.clone()).collect();
    let total: u64 = layers.iter().map(|l| l.size).sum();
    let served = blob_bytes_served(&reg, before, &digests);
    eprintln!(
        "tarn convert of {name}: {} eStargz layers, {total} bytes; rpull + run through tarn fetched {served} ({:.1}%)",
        layers.len(),
        served as f64 * 100.0 / total as f64
    );
    assert!(
        served * 4 < total,
        "a lazy pull and run fetches a small part of the image: {served} of {total}"
    );

    // Fully, through containerd's own overlayfs snapshotter (no tarn): the
    // same tree as the source pulled the same way, but for the TOC and the
    // landmark eStargz layers carry at their root.
    let want = overlayfs_trees(&reg, &tarn, &src, &dst, scratch.path(), &ESTARGZ_EXTRAS);
    eprintln!(
        "{} paths identical through overlayfs (types, modes, owners, sizes, mtimes, link targets, user xattrs, sha256)",
        want.len()
    );
}

/// `src` and `dst` pulled fully through containerd's own overlayfs
/// snapshotter and mounted: `dst`'s tree is `src`'s and `extras`.
/// Returns `src`'s tree.
fn overlayfs_trees(
    reg: &TestRegistry,
    tarn: &Daemon,
    src: &str,
    dst: &str,
    scratch: &Path,
    extras: &[&str],
) -> BTreeMap<String, String> {
    for r in [src, dst] {
        ctr_ok(
            reg,
            tarn,
            &[
                "images",
                "pull",
                "--plain-http",
                "--snapshotter",
                "overlayfs",
                r,
            ],
        );
    }
    let want_mnt = ImageMount::new(reg, tarn, src, scratch.join("src"));
    let got_mnt = ImageMount::new(reg, tarn, dst, scratch.join("dst"));
    let want = tree(&want_mnt.target);
    let mut got = tree(&got_mnt.target);
    for extra in extras {
        assert!(
            got.remove(*extra).is_some(),
            "{extra} in the converted tree"
        );
    }
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (path, w) in &want {
        assert_eq!(&got[path], w, "{path}");
    }
    want
}

/// A tar of `entries` (name, content), a user xattr on the first.
fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (i, (name, data)) in entries.iter().enumerate() {
        if i == 0 {
            b.append_pax_extensions([("SCHILY.xattr.user.tarn", &b"yes"[..])])
                .unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o640);
        h.set_uid(1000 + i as u64);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// The entries of a tar (gzip or plain): name, mode, uid, size, sha256 of
/// the content; eStargz's own entries left out.
fn tar_entries(blob: &[u8]) -> Vec<(String, u32, u64, u64, String)> {
    use std::io::Read;
    let mut plain = Vec::new();
    if blob.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(blob)
            .read_to_end(&mut plain)
            .unwrap();
    } else {
        plain = blob.to_vec();
    }
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(&plain[..]);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        if [".no.prefetch.landmark", "stargz.index.json"].contains(&name.as_str()) {
            continue;
        }
        let h = e.header().clone();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push((
            name,
            h.mode().unwrap(),
            h.uid().unwrap(),
            data.len() as u64,
            sha256_hex(&data),
        ));
    }
    out
}

#[test]
fn plain_and_gzip_layers_convert_and_estargz_layers_are_copied_unchanged() {
    let reg = TestRegistry::start().unwrap();
    // 9 MiB: three chunks of the writer's 4 MiB.
    let big: Vec<u8> = (0..9u32 << 20)
        .map(|i| u8::try_from(i % 253).unwrap())
        .collect();
    let plain = tar_of(&[("usr/bin/big", &big), ("usr/bin/empty", b"")]);
    let gz = gzip(&tar_of(&[("etc/a", b"a"), ("etc/b", b"bb")]));
    // An eStargz layer (tarn's writer), annotated as converters do.
    let mut esgz = Vec::new();
    let written = tarn_fs::format::estargz::write_estargz(
        &tar_of(&[("etc/motd", b"hi\n")])[..],
        &mut esgz,
        &tarn_fs::format::estargz::WriteOptions::default(),
    )
    .unwrap();
    let esgz_ann = vec![
        (TOC_DIGEST.to_string(), written.toc_digest.to_string()),
        (
            UNCOMPRESSED_SIZE.to_string(),
            written.uncompressed_size.to_string(),
        ),
    ];
    let sources = [plain, esgz, gz];
    rt().block_on(reg.push_image(
        "mixed",
        Some("latest"),
        "amd64",
        &[
            (sources[0].clone(), Vec::new()),
            (sources[1].clone(), esgz_ann),
            (sources[2].clone(), Vec::new()),
        ],
    ))
    .unwrap();
    let src = format!("{}/mixed:latest", reg.host());
    let dst = format!("{}/mixed-conv:v1", reg.host());
    let scratch = tempfile::tempdir().unwrap();
    let work = scratch.path().join("work");
    std::fs::create_dir(&work).unwrap();

    let stdout = assert_success("tarn convert", &convert_estargz(&src, &dst, &work));
    eprintln!("{stdout}");
    assert_nothing_left(&work);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("layer ")).collect();
    assert_eq!(lines.len(), 3, "one line per layer");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("layer 2/3") && l.contains("already eStargz")),
        "{stdout}"
    );
    // The source config has no diff IDs (the helper pushes none): the
    // copied layer's comes from its bytes, and the checker checks it.
    let layers = verify_estargz(&reg, "mixed-conv", "v1", scratch.path());
    assert_eq!(
        layers[1].digest,
        written.blob_digest.to_string(),
        "copied as is"
    );
    assert_eq!(layers[1].diff_id, written.diff_id.to_string());
    for (l, source) in layers.iter().zip(&sources) {
        let blob = get(&reg, &format!("/v2/mixed-conv/blobs/{}", l.digest));
        assert_eq!(
            tar_entries(&blob),
            tar_entries(source),
            "layer {}",
            l.digest
        );
    }
}

#[test]
fn a_corrupt_or_unsupported_layer_fails_in_one_line_and_leaves_nothing() {
    let reg = TestRegistry::start().unwrap();
    let good = gzip(&tar_of(&[("etc/a", b"a")]));
    // gzip whose deflate data is garbage (what it decodes to, if anything,
    // is no tar: the cause named depends on where decoding gives up).
    let mut corrupt = gzip(&tar_of(&[("etc/b", &[7u8; 100_000][..])]));
    let n = corrupt.len();
    corrupt[20..n - 8].fill(0xAB);
    // A GNU sparse file: a tar entry type eStargz cannot hold.
    let sparse = {
        let mut h = tar::Header::new_gnu();
        h.set_path("var/sparse").unwrap();
        h.set_size(0);
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_cksum();
        let mut t = h.as_bytes().to_vec();
        t.resize(t.len() + 1024, 0);
        t
    };
    for (name, bad, want) in [
        ("corrupt", corrupt, ""),
        (
            "sparse",
            sparse,
            "unsupported input: tar entry \"var/sparse\"",
        ),
    ] {
        rt().block_on(reg.push_image(
            name,
            Some("latest"),
            "amd64",
            &[(good.clone(), Vec::new()), (bad, Vec::new())],
        ))
        .unwrap();
        let work = tempfile::tempdir().unwrap();
        let out = convert_estargz(
            &format!("{}/{name}:latest", reg.host()),
            &format!("{}/{name}-conv:latest", reg.host()),
            work.path(),
        );
        assert!(!out.status.success(), "{name}: the conversion fails");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("layer 2/2") && stderr.contains(want),
            "{name}: the error names the layer and the cause: {stderr}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{name}: one line: {stderr}"
        );
        assert_nothing_left(work.path());
        let url = format!("http://{}/v2/{name}-conv/manifests/latest", reg.host());
        let status = rt().block_on(async { reqwest::get(&url).await.unwrap().status() });
        assert_eq!(status, 404, "{name}: no image pushed");
    }
}

// ---------------------------------------------------------------- optimize
//
// Issue 18's `tarn optimize`: the reference image (plain layers) run once
// through containerd and tarn with its workload; the result has, in each
// layer, the files the workload opened first, then `.prefetch.landmark`;
// it passes the reference reader, unpacks to the source's tree and runs.

/// Names of a blob's tar entries, in stream order (eStargz's own
/// included).
fn entry_names(blob: &[u8]) -> Vec<String> {
    use std::io::Read;
    let mut plain = Vec::new();
    flate2::read::MultiGzDecoder::new(blob)
        .read_to_end(&mut plain)
        .unwrap();
    tar::Archive::new(&plain[..])
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn tarn_optimize_puts_what_the_workload_opened_before_the_landmark() {
    let reg = TestRegistry::start_in_bed(&[Component::Registry, Component::Containerd])
        .expect("test bed up");
    let tarn = tarn_daemon(&reg);
    let src = reg.bed().push_image("multi").unwrap();
    let dst = format!("{}/multi-topt:latest", reg.host());
    let scratch = tempfile::Builder::new()
        .prefix("tarn-optimize-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let work = scratch.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let sock = reg.bed().containerd_sock().unwrap().to_owned();
    // The workload ends by itself: the period only bounds a hung one.
    let out = Command::new(bins::tarn().unwrap())
        .args(["optimize", "--period", "600", "--address", &sock])
        .arg("--admin-address")
        .arg(tarn.admin_address())
        .arg("--work-dir")
        .arg(&work)
        .arg("--profile")
        .arg(scratch.path().join("profile.json"))
        .args([&src, &dst, "--", "/app/run.sh"])
        .output()
        .unwrap();
    let stdout = assert_success("tarn optimize", &out);
    eprintln!("{stdout}");
    for want in WORKLOAD_OUT {
        assert!(stdout.contains(want), "the workload's {want:?} in {stdout}");
    }
    assert!(stdout.contains("recorded "), "{stdout}");
    // The recording as a document: the script, read through FUSE, with
    // the range the shell read.
    let profile: Value =
        serde_json::from_slice(&std::fs::read(scratch.path().join("profile.json")).unwrap())
            .unwrap();
    assert_eq!(profile["mediaType"], "application/vnd.tarn.profile.v1+json");
    let script = profile["layers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["files"].as_array().unwrap())
        .find(|f| f["path"] == "app/run.sh")
        .unwrap_or_else(|| panic!("app/run.sh in {profile}"));
    assert_eq!(script["ranges"][0][0], 0, "{script}");
    assert_nothing_left(&work);
    let containers = ctr_ok(&reg, &tarn, &["containers", "ls", "-q"]);
    assert!(
        !containers.contains("tarn-optimize"),
        "the workload's container is gone: {containers}"
    );

    let layers = verify_estargz(&reg, "multi-topt", "latest", scratch.path());
    let names: Vec<Vec<String>> = layers
        .iter()
        .map(|l| entry_names(&get(&reg, &format!("/v2/multi-topt/blobs/{}", l.digest))))
        .collect();
    // Where each file lies relative to its layer's landmark.
    let before_landmark = |path: &str| -> Option<bool> {
        names.iter().rev().find_map(|n| {
            let at = n.iter().position(|x| x == path)?;
            let mark = n.iter().position(|x| x == ".prefetch.landmark");
            Some(mark.is_some_and(|m| at < m))
        })
    };
    for read in ["app/run.sh", "usr/share/go-1.19/src/fmt/print.go"] {
        assert_eq!(before_landmark(read), Some(true), "{read} prioritized");
    }
    assert_eq!(
        before_landmark("usr/share/go-1.19/src/fmt/scan.go"),
        Some(false),
        "an unread file of the same directory is not prioritized"
    );
    for n in &names {
        // The layers of many files (the workload's own layer is two).
        if let Some(m) = n.iter().position(|x| x == ".prefetch.landmark")
            && n.len() > 100
        {
            assert!(
                m * 10 < n.len(),
                "{m} of {} entries first: only what was read",
                n.len()
            );
        }
    }
    assert!(
        names
            .iter()
            .all(|n| n.iter().filter(|x| x.ends_with("landmark")).count() == 1),
        "one landmark per layer"
    );

    // Runs lazily through tarn, and unpacks through overlayfs to the
    // source's tree (but for eStargz's own entries at the root).
    let rpull = Command::new("ctr-remote")
        .args(["--address", &sock])
        .args([
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "tarn",
            &dst,
        ])
        .output()
        .unwrap();
    assert_success("ctr-remote rpull", &rpull);
    let run = ctr_ok(
        &reg,
        &tarn,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "tarn",
            &dst,
            "topt-run",
            "/app/run.sh",
        ],
    );
    for want in WORKLOAD_OUT {
        assert!(run.contains(want), "{want:?} missing from {run:?}");
    }
    overlayfs_trees(
        &reg,
        &tarn,
        &src,
        &dst,
        scratch.path(),
        &[
            "./stargz.index.json",
            "./.prefetch.landmark",
            "./.no.prefetch.landmark",
        ],
    );
}
