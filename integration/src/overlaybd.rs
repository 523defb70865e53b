//! The reference tools' overlaybd fixture ([`overlaybd_fixtures`]) on
//! the test bed, as the overlaybd tests use it: its layer blobs, pushed
//! unchanged to the registry, pulled lazily with `ctr-remote image
//! rpull` through a tarn that fetches on demand only.
//!
//! Panics instead of returning errors: these are a test's own steps.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::time::Duration;

use crate::daemon::Daemon;
use crate::testbed::{Component, Testbed, overlaybd_fixtures};
use crate::wait::wait_until;

/// What the fixture's `/app/run.sh` prints: layer 2's `changed.txt`, the
/// start of `random5m`'s sha256, the opaque directory holding only layer
/// 3's file.
pub const RUN_OUT: [&str; 4] = ["hello from overlaybd", "v2", "a7a9167b30ecaae0", "new.txt"];

/// The fixture's layer blobs: (digest, size), bottom first.
pub fn fixture_blobs() -> Vec<(String, u64)> {
    let oci = overlaybd_fixtures().join("oci");
    let json = |path: std::path::PathBuf| -> serde_json::Value {
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    };
    let blob = |digest: &str| {
        json(
            oci.join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
    };
    let index = json(oci.join("index.json"));
    let manifest = blob(index["manifests"][0]["digest"].as_str().expect("manifest"));
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().expect("digest").to_owned(),
                l["size"].as_u64().expect("size"),
            )
        })
        .collect()
}

/// Pushes the fixture unchanged (digests and overlaybd annotations kept)
/// to `registry` as `fixtures/obd:v1`; its reference there.
pub fn push_fixture(registry: &str) -> String {
    let reference = format!("{registry}/fixtures/obd:v1");
    push_layout(&overlaybd_fixtures().join("oci"), &reference);
    reference
}

/// Copies the image tagged `v1` in the OCI layout `oci` to `reference`,
/// digests kept.
fn push_layout(oci: &std::path::Path, reference: &str) {
    let mut c = Command::new("skopeo");
    c.args([
        "copy",
        "-q",
        "--preserve-digests",
        "--dest-tls-verify=false",
    ])
    .arg(format!("oci:{}:v1", oci.display()))
    .arg(format!("docker://{reference}"));
    run_ok(c);
}

/// Pushes the fixture with an acceleration layer on top, as overlaybd's
/// `record-trace` leaves an image: a plain tar holding the file `trace`
/// (`trace`'s bytes), annotated `acceleration-layer: yes` with its own
/// blob digest and size, its diff ID appended to the config. Pushed to
/// `registry` as `fixtures/obd-accel:v1`; its reference there.
pub fn push_fixture_with_trace(registry: &str, trace: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let oci = dir.path().join("oci");
    run_ok({
        let mut c = Command::new("cp");
        c.arg("-a").arg(overlaybd_fixtures().join("oci")).arg(&oci);
        c
    });
    let blobs = oci.join("blobs/sha256");
    let put = |bytes: &[u8]| -> (String, u64) {
        let digest = tarn_fs::Digest::of(bytes).to_string();
        std::fs::write(blobs.join(digest.trim_start_matches("sha256:")), bytes)
            .expect("write blob");
        (digest, bytes.len() as u64)
    };
    let get = |digest: &str| -> serde_json::Value {
        let path = blobs.join(digest.trim_start_matches("sha256:"));
        serde_json::from_slice(&std::fs::read(path).expect("read blob")).expect("json blob")
    };
    let layer = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(trace.len() as u64);
        h.set_mode(0o444);
        h.set_cksum();
        b.append_data(&mut h, "trace", trace).expect("tar");
        b.into_inner().expect("tar")
    };
    let (layer_digest, layer_size) = put(&layer);
    let index_path = oci.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).expect("index")).expect("index json");
    let mut manifest = get(index["manifests"][0]["digest"].as_str().expect("manifest"));
    let mut config = get(manifest["config"]["digest"].as_str().expect("config"));
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .expect("diff_ids")
        .push(layer_digest.clone().into());
    let (config_digest, config_size) = put(&serde_json::to_vec(&config).expect("config"));
    manifest["config"]["digest"] = config_digest.into();
    manifest["config"]["size"] = config_size.into();
    manifest["layers"]
        .as_array_mut()
        .expect("layers")
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer_size,
            "annotations": {
                "containerd.io/snapshot/overlaybd/acceleration-layer": "yes",
                "containerd.io/snapshot/overlaybd/blob-digest": layer_digest,
                "containerd.io/snapshot/overlaybd/blob-size": layer_size.to_string(),
                "containerd.io/snapshot/overlaybd/version": "0.1.0",
            }
        }));
    let (manifest_digest, manifest_size) = put(&serde_json::to_vec(&manifest).expect("manifest"));
    index["manifests"][0]["digest"] = manifest_digest.into();
    index["manifests"][0]["size"] = manifest_size.into();
    std::fs::write(&index_path, serde_json::to_vec(&index).expect("index")).expect("write index");
    let reference = format!("{registry}/fixtures/obd-accel:v1");
    push_layout(&oci, &reference);
    reference
}

/// The test bed's registry and containerd, and tarn as containerd's
/// proxy plugin `tarn`. Fields drop in order: tarn first (tearing its
/// disks down), then the bed.
pub struct ObdBed {
    pub tarn: Daemon,
    pub bed: Testbed,
    /// The daemon's `metrics_address`.
    pub metrics: SocketAddr,
}

impl ObdBed {
    /// A bed whose daemon fetches on demand only (read-ahead along an LSMT
    /// file follows write order, not what ext4 reads next), from the
    /// registry over plain HTTP, serving metrics on a free port. `more`
    /// goes on in the `[fetch]` table (its other keys, then any tables).
    pub fn up(more: &str) -> ObdBed {
        ObdBed::up_with(false, more)
    }

    /// The same with speculation (`[fetch] speculate`) as asked: on, the
    /// daemon's defaults (read-around, the entrypoint and library hints).
    pub fn up_with(speculate: bool, more: &str) -> ObdBed {
        let bed = Testbed::up(&[Component::Registry, Component::Containerd]).expect("test bed up");
        let metrics = crate::scrape::free_addr().expect("a free port");
        let config = format!(
            "metrics_address = \"{metrics}\"\n[registry]\nplain_http = [\"{}\"]\n[fetch]\nspeculate = {speculate}\n{more}",
            bed.registry().expect("registry")
        );
        let tarn = Daemon::start_with(Some(bed.dir().join("tarn.sock")), &config)
            .expect("start tarn-snapshotter");
        ObdBed { tarn, bed, metrics }
    }

    /// Pushes the fixture to the bed's registry ([`push_fixture`]).
    pub fn push(&self) -> String {
        push_fixture(self.bed.registry().expect("registry"))
    }

    /// `ctr-remote image rpull` of `reference`, retried until it succeeds
    /// (containerd's proxy client backs off after a daemon restart) or
    /// `timeout` passes.
    pub fn rpull(&self, reference: &str, timeout: Duration) {
        let mut stderr = String::new();
        wait_until("rpull", timeout, || {
            let out = Command::new("ctr-remote")
                .arg("--address")
                .arg(self.bed.containerd_sock().expect("containerd"))
                .args(["image", "rpull", "--plain-http", "--snapshotter", "tarn"])
                .arg(reference)
                .output()
                .expect("run ctr-remote");
            stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            out.status.success().then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {stderr}\n{}", tail(&self.tarn.log(), 30)));
    }
}

/// Runs `c`, which must succeed; its output.
pub fn run_ok(mut c: Command) -> Output {
    let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The last `n` lines of `text` (a daemon's log, for a failure message).
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
