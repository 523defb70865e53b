//! Issue 17's mirror acceptance: registry mirrors from containerd's
//! `hosts.toml`, with a real containerd, runc and two docker-registry
//! instances holding the same image (the test bed's, the origin, and a
//! second bed's, the mirror).
//!
//! - With a mirror in `hosts.toml`, every layer byte tarn reads comes from
//!   the mirror (with containerd's `ns=` parameter) and the origin serves
//!   no layer blob bytes; the run prints the right output.
//! - With the mirror down, the origin serves them and the run succeeds.
//! - A mirror serving wrong bytes (`tarn-faultproxy` flipping a byte in
//!   every blob response) is detected by verification (the TOC's digest,
//!   chunk digests) and skipped; the output is still right.
//!
//! containerd itself pulls the manifest and config from the origin (the
//! run is `ctr-remote image rpull --plain-http`, without a hosts
//! directory); the assertions are about layer blobs, which only tarn reads.
//! Needs root, /dev/fuse, the test bed and `$TARN_BIN_DIR`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tarn_integration::daemon::Daemon;
use tarn_integration::registry::{TestRegistry, free_port};
use tarn_integration::testbed::Component;
use tarn_integration::wait::wait_until;

const IMAGE: &str = "busybox-esgz";
/// A bound on one `ctr` command, for a failure message only.
const RUN_BOUND: Duration = Duration::from_secs(180);

/// The cached test image's OCI layout.
fn layout() -> PathBuf {
    let out = Command::new(tarn_integration::testbed::repo_root().join("scripts/images.sh"))
        .args(["path", IMAGE])
        .output()
        .expect("images.sh");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn json_blob(layout: &Path, digest: &str) -> serde_json::Value {
    let path = layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"));
    serde_json::from_slice(&std::fs::read(path).expect("blob")).expect("json")
}

/// The image's layer digests and the md5sum of its `/bin/busybox`.
fn image_facts() -> (HashSet<String>, String) {
    let layout = layout();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("index json");
    let manifest = json_blob(
        &layout,
        index["manifests"][0]["digest"].as_str().expect("digest"),
    );
    let layers: HashSet<String> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_owned())
        .collect();
    let mut md5 = None;
    for d in &layers {
        let data = std::fs::read(
            layout
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
        .expect("layer");
        let mut ar = tar::Archive::new(flate2::read::MultiGzDecoder::new(&data[..]));
        for e in ar.entries().expect("tar") {
            let mut e = e.expect("entry");
            let path = e.path().expect("path").to_string_lossy().into_owned();
            if path.trim_start_matches("./") == "bin/busybox"
                && e.header().entry_type() == tar::EntryType::Regular
            {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut bytes).expect("read");
                md5 = Some(md5sum(&bytes));
            }
        }
    }
    (layers, md5.expect("bin/busybox in the image"))
}

fn md5sum(bytes: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), bytes).expect("stdin");
    let out = child.wait_with_output().expect("md5sum");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    out.split_whitespace().next().expect("sum").to_owned()
}

/// A hosts directory with `hosts.toml` for `origin`: `mirror` first (pull
/// only), then the origin as the server.
fn hosts_dir(origin: &str, mirror: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let ns = dir.path().join(origin.replace(':', "_") + "_");
    std::fs::create_dir_all(&ns).expect("hosts dir");
    std::fs::write(
        ns.join("hosts.toml"),
        format!(
            "server = \"http://{origin}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\"]\n"
        ),
    )
    .expect("hosts.toml");
    dir
}

/// The origin's bed (registry and containerd) with the image pushed, and
/// tarn-snapshotter reading `hosts` for mirrors.
struct Node {
    origin: TestRegistry,
    reference: String,
    tarn: Daemon,
    _hosts: tempfile::TempDir,
}

impl Node {
    fn start(mirror: impl FnOnce(&str) -> String) -> Node {
        let origin =
            TestRegistry::start_in_bed(&[Component::Registry, Component::Containerd]).expect("bed");
        let reference = origin.bed().push_image(IMAGE).expect("push to the origin");
        let hosts = hosts_dir(&origin.host(), &mirror(&origin.host()));
        let config = format!(
            "[registry]\nplain_http = [\"{}\"]\nconfig_path = \"{}\"\n",
            origin.host(),
            hosts.path().display()
        );
        let tarn = Daemon::start_with(Some(origin.bed().dir().join("tarn.sock")), &config)
            .expect("start tarn-snapshotter");
        Node {
            origin,
            reference,
            tarn,
            _hosts: hosts,
        }
    }

    /// Pulls lazily and runs `md5sum /bin/busybox`; the sum it printed.
    fn run_md5(&self) -> String {
        let sock = self
            .origin
            .bed()
            .containerd_sock()
            .expect("containerd")
            .to_owned();
        let out = Command::new("ctr-remote")
            .args(["--address", &sock, "image", "rpull", "--plain-http"])
            .args(["--snapshotter", "tarn", &self.reference])
            .output()
            .expect("ctr-remote");
        assert!(
            out.status.success(),
            "rpull: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.tarn.log()
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let reference = self.reference.clone();
        // runc's state is the host's and this file's tests run side by
        // side: one container id per run.
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let id = format!(
            "mirrored-{}",
            RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        std::thread::spawn(move || {
            let out = Command::new("ctr")
                .args(["--address", &sock, "run", "--rm", "--snapshotter", "tarn"])
                .arg(&reference)
                .arg(&id)
                .args(["md5sum", "/bin/busybox"])
                .output();
            let _ = tx.send(out);
        });
        let out = rx
            .recv_timeout(RUN_BOUND)
            .unwrap_or_else(|_| panic!("ctr run still running after {RUN_BOUND:?}"))
            .expect("ctr");
        assert!(
            out.status.success(),
            "ctr run: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.tarn.log()
        );
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        stdout
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    /// Body bytes of the origin's layer blob GETs.
    fn origin_layer_bytes(&self, layers: &HashSet<String>) -> u64 {
        layer_gets(&self.origin.log().expect("origin log"), layers)
            .map(|r| r.bytes)
            .sum()
    }
}

fn layer_gets<'a>(
    log: &'a [tarn_integration::reglog::Request],
    layers: &'a HashSet<String>,
) -> impl Iterator<Item = &'a tarn_integration::reglog::Request> {
    log.iter()
        .filter(|r| r.is_blob_get() && layers.iter().any(|l| r.path.contains(l.as_str())))
}

#[test]
fn with_a_mirror_the_origin_serves_no_layer_bytes() {
    let (layers, want) = image_facts();
    let mirror = TestRegistry::start().expect("mirror registry");
    mirror.bed().push_image(IMAGE).expect("push to the mirror");
    let node = Node::start(|_| mirror.host());
    assert_eq!(node.run_md5(), want, "the run read the right bytes");

    assert_eq!(
        node.origin_layer_bytes(&layers),
        0,
        "the origin served layer bytes"
    );
    let log = mirror.log().expect("mirror log");
    let served: Vec<_> = layer_gets(&log, &layers).collect();
    let bytes: u64 = served.iter().map(|r| r.bytes).sum();
    assert!(bytes > 0, "the mirror served no layer bytes: {log:?}");
    let ns = format!("ns={}", node.origin.host().replace(':', "%3A"));
    assert!(
        served.iter().all(|r| r.path.contains(&ns)),
        "every mirror GET names the origin ({ns}): {served:?}"
    );
    eprintln!(
        "mirror served {bytes} layer bytes in {} GETs; origin 0",
        served.len()
    );
}

#[test]
fn with_the_mirror_down_the_origin_serves_and_the_run_succeeds() {
    let (layers, want) = image_facts();
    // Nothing listens there: connections are refused.
    let port = free_port().expect("port");
    let node = Node::start(|_| format!("127.0.0.1:{port}"));
    assert_eq!(node.run_md5(), want, "the run read the right bytes");
    assert!(
        node.origin_layer_bytes(&layers) > 0,
        "the origin served no layer bytes"
    );
}

/// `tarn-faultproxy` flipping one byte of every blob response after the
/// first `clean`, killed by PID on drop.
struct FlippingProxy {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl FlippingProxy {
    fn start(upstream: &str, clean: u64) -> FlippingProxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr_file = dir.path().join("addr");
        let child = Command::new(env!("CARGO_BIN_EXE_tarn-faultproxy"))
            .args(["--upstream", upstream, "--rate", "1", "--modes", "flip"])
            .args(["--clean", &clean.to_string()])
            .arg("--addr-file")
            .arg(&addr_file)
            .stderr(Stdio::null())
            .spawn()
            .expect("starting tarn-faultproxy");
        let addr = wait_until("tarn-faultproxy to listen", Duration::from_secs(10), || {
            let a = std::fs::read_to_string(&addr_file).unwrap_or_default();
            (!a.trim().is_empty()).then(|| a.trim().to_owned())
        })
        .expect("tarn-faultproxy started");
        FlippingProxy {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for FlippingProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_mirror_serving_wrong_bytes_is_skipped_and_the_output_is_right() {
    let (layers, want) = image_facts();
    let mirror = TestRegistry::start().expect("mirror registry");
    mirror.bed().push_image(IMAGE).expect("push to the mirror");
    // Every blob response of the mirror has a flipped byte, the layer's
    // opening (tail and TOC, whose digest the image pins) included.
    let proxy = FlippingProxy::start(&mirror.host(), 0);
    let node = Node::start(|_| proxy.addr.clone());
    assert_eq!(node.run_md5(), want, "the run read the right bytes");
    let log = node.tarn.log();
    assert!(
        log.contains("served bytes that failed verification; skipping it"),
        "the bad mirror was not detected: {log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        node.origin_layer_bytes(&layers) > 0,
        "the origin served no layer bytes after the mirror was skipped"
    );
}
