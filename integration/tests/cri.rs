//! containerd's CRI plugin with `snapshotter = "tarn"`, driven by the
//! project's own CRI client: an image is pulled, a host-network pod runs a
//! container that reads files of several layers, and its output is read back
//! from the CRI log. An eStargz image is served lazily by tarn; an ordinary
//! one is pulled in full through tarn.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tarn_integration::cri::Cri;
use tarn_integration::reglog::Request;
use tarn_integration::testbed::{Testbed, repo_root};

/// Layer annotation carrying the TOC digest of an eStargz layer.
const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";

/// The workload: python3 from the image's python layer, then a shell and
/// `head` (busybox) reading `/etc/passwd` of the busybox layer.
const WORKLOAD: &str =
    "python3 -c 'import json; print(json.dumps([1, 2]))' && head -c 64 /etc/passwd && echo";

/// What the workload prints on a correct run.
const EXPECTED: &[&str] = &["[1, 2]", "root:x:0:0:root:/root:/bin/sh"];

const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A layer of a test image, from its OCI layout in the image cache.
struct Layer {
    size: u64,
    toc_digest: Option<String>,
}

fn json(path: &Path) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    let (algo, hex) = digest.split_once(':').expect("digest is ALGO:HEX");
    layout.join("blobs").join(algo).join(hex)
}

/// The layers of the cached test image `name` (`scripts/images.sh`).
fn layers(name: &str) -> Vec<Layer> {
    let out = Command::new(repo_root().join("scripts/images.sh"))
        .args(["path", name])
        .output()
        .expect("running images.sh path");
    assert!(out.status.success(), "images.sh path {name} failed");
    let layout = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let index = json(&layout.join("index.json"));
    let manifest = index["manifests"][0]["digest"]
        .as_str()
        .expect("index names a manifest");
    let manifest = json(&blob(&layout, manifest));
    manifest["layers"]
        .as_array()
        .expect("manifest has layers")
        .iter()
        .map(|l| Layer {
            size: l["size"].as_u64().expect("layer has a size"),
            toc_digest: l["annotations"][TOC_DIGEST].as_str().map(str::to_owned),
        })
        .collect()
}

/// Body bytes the registry served for blobs of repository `repo`.
fn blob_bytes(requests: &[Request], repo: &str) -> u64 {
    let prefix = format!("/v2/{repo}/blobs/");
    requests
        .iter()
        .filter(|r| r.is_blob_get() && r.path.starts_with(&prefix))
        .map(|r| r.bytes)
        .sum()
}

/// FUSE mount points under `root`, from this process's mountinfo.
fn fuse_mounts_under(root: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = unescape_mountinfo(left.split(' ').nth(4)?);
            let fstype = right.split(' ').next()?;
            (fstype.starts_with("fuse") && point.starts_with(root)).then_some(point)
        })
        .collect()
}

/// Mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match octal {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
}

/// The last `n` lines of tarn's log, for failure messages.
fn log_tail(path: Option<&str>, n: usize) -> String {
    let Some(path) = path else {
        return "(no log)".to_owned();
    };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            // tarn's own lines only: at debug level gRPC's are most of it.
            let lines: Vec<&str> = text.lines().filter(|l| l.contains("tarn")).collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(reading {path}: {e})"),
    }
}

/// Pulls `image` through CRI, runs the workload in a new pod and returns the
/// container's standard output.
async fn pull_and_run(cri: &Cri, image: &str) -> String {
    let version = cri.version().await.expect("cri version");
    assert_eq!(version.runtime_name, "containerd");
    let start = Instant::now();
    let image_id = cri.pull_image(image).await.expect("cri pull");
    let pulled = start.elapsed();
    assert!(image_id.starts_with("sha256:"), "image id {image_id}");
    let pod = cri.run_pod("tarn-cri-test").await.expect("run pod");
    let container = cri
        .create_container(&pod, image, &["/bin/sh"], &["-c", WORKLOAD])
        .await
        .expect("create container");
    cri.start(&container).await.expect("start container");
    let code = cri
        .wait_exit(&container, EXIT_TIMEOUT)
        .await
        .expect("container exits");
    let logs = cri.logs(&container).await.expect("container logs");
    assert_eq!(code, 0, "workload failed; its log: {logs:?}");
    eprintln!(
        "{image}: CRI pull {pulled:.2?}, pull + pod + run {:.2?}",
        start.elapsed()
    );
    cri.stdout(&container).await.expect("container stdout")
}

fn assert_workload_output(stdout: &str) {
    for want in EXPECTED {
        assert!(
            stdout.lines().any(|l| l == *want),
            "missing {want:?} in the container's output:\n{stdout}"
        );
    }
}

#[test]
fn cri_pulls_estargz_lazily_through_tarn_and_runs_a_pod() {
    let bed = Testbed::up(&[]).expect("test bed up");
    // The sandbox ("pause") image of the bed's CRI config.
    bed.push_image("busybox").expect("push busybox");
    // The 5-layer reference image (busybox, Python, Go source and toolchain,
    // an app): the workload reads two of its layers, so a lazy pull fetches a
    // small part of it. (A Python-only image is mostly what Python reads at
    // start, with 1 MiB read-ahead about 40% of it.)
    let image = bed.push_image("multi-esgz").expect("push multi-esgz");
    let layers = layers("multi-esgz");
    let lazy = layers.iter().filter(|l| l.toc_digest.is_some()).count();
    assert!(lazy >= 5, "multi-esgz should have 5 eStargz layers");
    let image_size: u64 = layers.iter().map(|l| l.size).sum();
    let tarn_root = PathBuf::from(bed.var("TARN_ROOT").expect("bed runs tarn"));

    let rt = runtime();
    let sock = bed
        .containerd_sock()
        .expect("bed runs containerd")
        .to_owned();
    // Declared after the bed: dropped (pods, containers, images removed)
    // before the bed goes down.
    let cri = rt.block_on(Cri::connect(&sock)).expect("cri connect");
    let stdout = rt.block_on(pull_and_run(&cri, &image));
    assert_workload_output(&stdout);

    // tarn answered ALREADY_EXISTS for each eStargz layer and serves it from
    // a FUSE mount of its own instead of letting containerd unpack it.
    let mounts = fuse_mounts_under(&tarn_root);
    assert!(
        mounts.len() >= lazy,
        "expected a FUSE mount per eStargz layer ({lazy}) under {}, found {mounts:?}; \
         tarn's log ends with:\n{}",
        tarn_root.display(),
        log_tail(bed.var("TARN_LOG"), 20)
    );
    let served = blob_bytes(&bed.registry_log().expect("registry log"), "multi-esgz");
    eprintln!(
        "lazy CRI pull+run: registry served {served} of {image_size} blob bytes ({:.1}%)",
        served as f64 * 100.0 / image_size as f64
    );
    assert!(
        served * 3 < image_size,
        "a lazy pull+run fetched {served} of {image_size} bytes"
    );

    rt.block_on(cri.cleanup()).expect("cri cleanup");
    drop(cri);
    bed.down().expect("test bed down");
    assert!(
        fuse_mounts_under(&tarn_root).is_empty(),
        "FUSE mounts left after the bed went down"
    );
}

#[test]
fn cri_pulls_an_ordinary_image_in_full_through_tarn_and_runs_a_pod() {
    let bed = Testbed::up(&[]).expect("test bed up");
    bed.push_image("busybox").expect("push busybox");
    let image = bed.push_image("python").expect("push python");
    let image_size: u64 = layers("python").iter().map(|l| l.size).sum();

    let rt = runtime();
    let sock = bed
        .containerd_sock()
        .expect("bed runs containerd")
        .to_owned();
    let cri = rt.block_on(Cri::connect(&sock)).expect("cri connect");
    let stdout = rt.block_on(pull_and_run(&cri, &image));
    assert_workload_output(&stdout);

    // Nothing to serve lazily: every layer came down whole.
    let served = blob_bytes(&bed.registry_log().expect("registry log"), "python");
    assert!(
        served >= image_size,
        "a full pull fetched only {served} of {image_size} bytes"
    );

    // Dropping the client removes its container, pod and image, even
    // without an explicit cleanup (as when a test panics).
    drop(cri);
    let check = rt.block_on(Cri::connect(&sock)).expect("cri connect");
    let pods = rt.block_on(check.list_pods()).expect("list pods");
    let containers = rt
        .block_on(check.list_containers())
        .expect("list containers");
    let images = rt.block_on(check.list_images()).expect("list images");
    assert!(pods.is_empty(), "pods left: {pods:?}");
    assert!(containers.is_empty(), "containers left: {containers:?}");
    assert!(!images.contains(&image), "{image} left in {images:?}");
    drop(check);
    bed.down().expect("test bed down");
}

/// ext4 mount points under `root` (overlaybd disks' trees).
fn ext4_mounts_under(root: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("reading mountinfo");
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = unescape_mountinfo(left.split(' ').nth(4)?);
            (right.split(' ').next()? == "ext4" && point.starts_with(root)).then_some(point)
        })
        .collect()
}

#[test]
fn cri_pulls_an_overlaybd_image_as_disks_lazily_and_runs_a_pod() {
    // On demand only: read-ahead along an LSMT file follows write order,
    // not what ext4 reads next (README, overlaybd).
    let bed = Testbed::up_with_tarn_config(&[], "[fetch]\nspeculate = false").expect("test bed up");
    bed.push_image("busybox").expect("push busybox");
    // The reference tools' three-layer image, pushed unchanged: CRI passes
    // its layers' `containerd.io/snapshot/overlaybd/*` annotations as
    // labels, beside its own `cri.*` ones.
    let fixture = tarn_integration::testbed::overlaybd_fixtures().join("oci");
    let image = format!("{}/fixtures/obd:v1", bed.registry().expect("registry"));
    let out = Command::new("skopeo")
        .args([
            "copy",
            "-q",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:v1", fixture.display()))
        .arg(format!("docker://{image}"))
        .output()
        .expect("run skopeo");
    assert!(
        out.status.success(),
        "skopeo copy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let index = json(&fixture.join("index.json"));
    let manifest = json(&blob(
        &fixture,
        index["manifests"][0]["digest"]
            .as_str()
            .expect("a manifest"),
    ));
    let blobs = manifest["layers"].as_array().expect("layers").len();
    let total: u64 = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["size"].as_u64().expect("size"))
        .sum();
    let tarn_root = PathBuf::from(bed.var("TARN_ROOT").expect("bed runs tarn"));

    let rt = runtime();
    let sock = bed
        .containerd_sock()
        .expect("bed runs containerd")
        .to_owned();
    let cri = rt.block_on(Cri::connect(&sock)).expect("cri connect");
    rt.block_on(cri.pull_image(&image)).expect("cri pull");
    // Each snapshot of the chain is a disk: an ext4 tree per layer.
    let trees = ext4_mounts_under(&tarn_root);
    assert_eq!(
        trees.len(),
        blobs,
        "an ext4 tree per layer under {}: {trees:?}; tarn's log ends with:\n{}",
        tarn_root.display(),
        log_tail(bed.var("TARN_LOG"), 20)
    );
    let pulled = blob_bytes(&bed.registry_log().expect("registry log"), "fixtures/obd");
    eprintln!(
        "overlaybd CRI pull: registry served {pulled} of {total} blob bytes ({:.1}%)",
        pulled as f64 * 100.0 / total as f64
    );
    assert!(
        pulled * 10 < total,
        "a lazy pull fetched {pulled} of {total} bytes"
    );

    let pod = rt.block_on(cri.run_pod("tarn-cri-obd")).expect("run pod");
    let container = rt
        .block_on(cri.create_container(&pod, &image, &["/app/run.sh"], &[]))
        .expect("create container");
    rt.block_on(cri.start(&container)).expect("start container");
    let code = rt
        .block_on(cri.wait_exit(&container, EXIT_TIMEOUT))
        .expect("container exits");
    let stdout = rt.block_on(cri.stdout(&container)).expect("stdout");
    assert_eq!(code, 0, "run.sh failed: {stdout:?}");
    for want in ["hello from overlaybd", "v2", "a7a9167b30ecaae0", "new.txt"] {
        assert!(stdout.contains(want), "{want:?} missing from {stdout:?}");
    }
    rt.block_on(cri.cleanup()).expect("cri cleanup");
    drop(cri);
    bed.down().expect("test bed down");
}

#[test]
fn mountinfo_escapes_are_undone() {
    assert_eq!(
        unescape_mountinfo(r"/tmp/a\040b\134c"),
        PathBuf::from("/tmp/a b\\c")
    );
    assert_eq!(unescape_mountinfo(r"/x\9"), PathBuf::from(r"/x\9"));
}
