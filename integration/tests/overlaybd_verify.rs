//! The whole-blob sha256 of overlaybd layers, through the registry,
//! containerd and tarn with background fetch on: once a disk is mounted
//! each blob is read whole at background priority and its sha256 checked
//! against the descriptor's digest. The reference tools' fixture verifies
//! and runs; the same fixture with one byte of a blob changed in the
//! registry's storage (the registry serves it under the old digest) is
//! reported failed by `tarn status` and `/metrics`, and its disks refuse
//! reads rather than serve its bytes.
//!
//! `tarn pull` (the third label source, beside `rpull`'s and CRI's) mounts
//! the same image as disks, lazily, and it runs.
//!
//! Needs root, the test bed (registry, containerd), FUSE, loop devices,
//! skopeo and ctr-remote, and the daemon built into `$TARN_BIN_DIR`.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use tarn_integration::daemon::Daemon;
use tarn_integration::testbed::overlaybd_fixtures as fixtures;
use tarn_integration::testbed::{Component, Testbed};
use tarn_integration::wait::wait_until;

/// containerd's proxy client backs off after a snapshotter restart: a
/// failure bound, as is the whole-blob pass over a few MB at loopback.
const TIMEOUT: Duration = Duration::from_secs(60);

/// What `/app/run.sh` prints (see overlaybd_containerd.rs).
const RUN_OUT: [&str; 4] = ["hello from overlaybd", "v2", "a7a9167b30ecaae0", "new.txt"];

/// The fixture's layer blobs: (digest, size), bottom first.
fn blobs() -> Vec<(String, u64)> {
    let oci = fixtures().join("oci");
    let json = |digest: &str| -> serde_json::Value {
        let hex = digest.trim_start_matches("sha256:");
        serde_json::from_slice(&std::fs::read(oci.join("blobs/sha256").join(hex)).unwrap()).unwrap()
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(oci.join("index.json")).unwrap()).unwrap();
    let manifest = json(index["manifests"][0]["digest"].as_str().unwrap());
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_owned(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Fields drop in order: tarn first (tearing its disks down), then the bed.
struct Bed {
    tarn: Daemon,
    bed: Testbed,
    metrics: std::net::SocketAddr,
}

impl Bed {
    /// A bed whose daemon fetches in the background (and so checks each
    /// blob's sha256) if `background`.
    fn up(background: bool) -> Bed {
        let bed = Testbed::up(&[Component::Registry, Component::Containerd]).expect("test bed up");
        // A loopback port nothing listens on now.
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let config = format!(
            "metrics_address = \"{metrics}\"\n[registry]\nplain_http = [\"{}\"]\n[fetch]\nspeculate = false\nbackground = {background}\n",
            bed.registry().expect("registry")
        );
        let tarn = Daemon::start_with(Some(bed.dir().join("tarn.sock")), &config)
            .expect("start tarn-snapshotter");
        Bed { tarn, bed, metrics }
    }

    /// Pushes the fixture unchanged (digests and annotations kept).
    fn push(&self) -> String {
        let reference = format!("{}/fixtures/obd:v1", self.bed.registry().unwrap());
        run_ok({
            let mut c = Command::new("skopeo");
            c.args([
                "copy",
                "-q",
                "--preserve-digests",
                "--dest-tls-verify=false",
            ])
            .arg(format!("oci:{}:v1", fixtures().join("oci").display()))
            .arg(format!("docker://{reference}"));
            c
        });
        reference
    }

    /// The file the registry serves blob `digest` from.
    fn stored_blob(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.bed
            .dir()
            .join("registry/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    fn rpull(&self, reference: &str) {
        let mut stderr = String::new();
        wait_until("rpull", TIMEOUT, || {
            let out = Command::new("ctr-remote")
                .arg("--address")
                .arg(self.bed.containerd_sock().unwrap())
                .args(["image", "rpull", "--plain-http", "--snapshotter", "tarn"])
                .arg(reference)
                .output()
                .expect("run ctr-remote");
            stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            out.status.success().then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {stderr}\n{}", tail(&self.tarn.log(), 30)));
    }

    /// `ctr run --rm` of `/app/run.sh`: its output, or its failure.
    fn run(&self, reference: &str, id: &str) -> Output {
        self.bed
            .ctr(&[
                "run",
                "--rm",
                "--snapshotter",
                "tarn",
                reference,
                id,
                "/app/run.sh",
            ])
            .expect("run ctr")
    }

    /// `ctr run` until it prints (containerd 1.6 now and then loses a
    /// fast container's output; its proxy client may be reconnecting).
    fn run_printing(&self, reference: &str, id: &str) -> Output {
        let mut last = None;
        let mut n = 0;
        let _ = wait_until("ctr run printing", TIMEOUT, || {
            n += 1;
            let out = self.run(reference, &format!("{id}-{n}"));
            let ok = out.status.success() && !out.stdout.is_empty();
            last = Some(out);
            ok.then_some(())
        });
        last.expect("ran once")
    }

    fn status(&self) -> String {
        let out = run_ok({
            let mut c = Command::new(tarn_integration::bins::tarn().expect("tarn built"));
            c.arg("status")
                .arg("--admin-address")
                .arg(self.tarn.admin_address());
            c
        });
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The `tarn status` line of blob `digest`, once its check has ended
    /// (neither unverified nor verifying).
    fn checked(&self, digest: &str) -> String {
        let short = &digest.trim_start_matches("sha256:")[..12];
        let mut last = String::new();
        wait_until("the whole-blob check of a blob", TIMEOUT, || {
            last = self.status();
            last.lines()
                .find(|l| l.contains(&format!("blob {short}")))
                .filter(|l| l.contains("sha256 verified") || l.contains("sha256 failed"))
                .map(str::to_owned)
        })
        .unwrap_or_else(|e| panic!("{e}:\n{last}\n{}", tail(&self.tarn.log(), 30)))
    }

    /// `tarn_disk_blobs{check="..."}` from the daemon's metrics endpoint.
    fn disk_blobs(&self, check: &str) -> Option<u64> {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(self.metrics).ok()?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: tarn\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        conn.read_to_string(&mut text).ok()?;
        let series = format!("tarn_disk_blobs{{check=\"{check}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
    }
}

fn run_ok(mut c: Command) -> Output {
    let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[test]
fn a_good_overlaybd_image_is_verified_and_runs() {
    let b = Bed::up(true);
    let image = b.push();
    b.rpull(&image);
    for (digest, _) in blobs() {
        let line = b.checked(&digest);
        assert!(line.contains("sha256 verified"), "{line}");
    }
    let out = b.run_printing(&image, &format!("obd-verified-{}", std::process::id()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for want in RUN_OUT {
        assert!(
            stdout.contains(want),
            "{want:?} missing from {stdout:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let status = b.status();
    assert!(!status.contains("sha256 failed"), "{status}");
}

#[test]
fn a_blob_that_is_not_its_digest_is_reported_failed_and_its_disks_refuse_reads() {
    let b = Bed::up(true);
    let image = b.push();
    let blobs = blobs();
    // The top layer: one byte in its middle (a data block) changed where
    // the registry keeps it; the registry serves it under its digest.
    let (top, size) = blobs.last().cloned().expect("layers");
    let stored = b.stored_blob(&top);
    let mut bytes = std::fs::read(&stored).expect("stored blob");
    assert_eq!(bytes.len() as u64, size);
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(&stored, &bytes).expect("tamper the stored blob");

    b.rpull(&image);
    let line = b.checked(&top);
    assert!(line.contains("sha256 failed"), "{line}");
    for (digest, _) in &blobs[..blobs.len() - 1] {
        let line = b.checked(digest);
        assert!(line.contains("sha256 verified"), "{line}");
    }
    let log = b.tarn.log();
    assert!(
        log.contains("overlaybd layer failed"),
        "the failure is logged:\n{}",
        tail(&log, 30)
    );
    let failed = wait_until("tarn_disk_blobs{check=\"failed\"}", TIMEOUT, || {
        b.disk_blobs("failed").filter(|&n| n >= 1)
    });
    assert!(failed.is_ok(), "{failed:?}");

    // Every read of the top stack's disk fails now: the container does
    // not run, and never prints what the tampered image holds.
    let out = b.run(&image, &format!("obd-failed-{}", std::process::id()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && !RUN_OUT.iter().all(|w| stdout.contains(w)),
        "a container ran on a failed layer: {stdout}"
    );
}

#[test]
fn tarn_pull_mounts_an_overlaybd_image_as_disks_lazily_and_it_runs() {
    let b = Bed::up(false);
    let image = b.push();
    let blobs = blobs();
    let total: u64 = blobs.iter().map(|(_, s)| s).sum();
    let before = b.bed.registry_log().expect("registry log").len();
    run_ok({
        let mut c = Command::new(tarn_integration::bins::tarn().expect("tarn built"));
        c.arg("pull")
            .arg("--address")
            .arg(b.bed.containerd_sock().unwrap())
            .arg("--admin-address")
            .arg(b.tarn.admin_address())
            .args(["--plain-http", "--snapshotter", "tarn", &image]);
        c
    });
    // Every layer answered as a disk: one per snapshot of the chain.
    let status = b.status();
    let disks = status
        .lines()
        .filter(|l| l.starts_with("overlaybd disk "))
        .count();
    assert_eq!(disks, blobs.len(), "{status}\n{}", tail(&b.tarn.log(), 30));
    let fetched = |since: usize| -> u64 {
        b.bed.registry_log().expect("registry log")[since..]
            .iter()
            .filter(|r| blobs.iter().any(|(d, _)| r.path.ends_with(d.as_str())))
            .map(|r| r.bytes)
            .sum()
    };
    let pulled = fetched(before);
    println!(
        "overlaybd through tarn pull: {pulled} bytes of blobs of {total} ({:.1}%)",
        pulled as f64 * 100.0 / total as f64
    );
    assert!(
        pulled * 10 < total,
        "a lazy pull fetches a small part of the blobs: {pulled} of {total}"
    );
    let out = b.run_printing(&image, &format!("obd-pull-{}", std::process::id()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for want in RUN_OUT {
        assert!(
            stdout.contains(want),
            "{want:?} missing from {stdout:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Without background fetch nothing is verified, and status says so.
    assert!(b.status().contains("sha256 unverified"));
}
