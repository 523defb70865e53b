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

use std::ops::Deref;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use tarn_integration::overlaybd::{ObdBed, RUN_OUT, fixture_blobs as blobs, run_ok, tail};
use tarn_integration::wait::wait_until;

/// containerd's proxy client backs off after a snapshotter restart: a
/// failure bound, as is the whole-blob pass over a few MB at loopback.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The shared overlaybd bed, with this file's steps.
struct Bed(ObdBed);

impl Deref for Bed {
    type Target = ObdBed;
    fn deref(&self) -> &ObdBed {
        &self.0
    }
}

impl Bed {
    /// A bed whose daemon fetches in the background (and so checks each
    /// blob's sha256) if `background`.
    fn up(background: bool) -> Bed {
        Bed(ObdBed::up(&format!("background = {background}\n")))
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
        self.0.rpull(reference, TIMEOUT);
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
        let series = format!("tarn_disk_blobs{{check=\"{check}\"}}");
        tarn_integration::scrape::series(self.metrics, &series)
    }
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
