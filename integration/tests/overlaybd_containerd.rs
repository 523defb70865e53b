//! An overlaybd image (the reference tools' fixture, `shared/fixtures/
//! overlaybd/oci`) through the registry, containerd and tarn: pushed
//! unchanged, pulled lazily with stargz-style labels (`ctr-remote image
//! rpull`), run with `ctr run`; each snapshot of the chain is a disk
//! (FUSE file, read-only loop device, ext4), the container's overlay has
//! the top one as its lower dir. The registry must serve less than the
//! blobs; a restart of the daemon brings the disks back, and so does a
//! start after SIGKILL (clearing what the killed one left); removing the
//! image leaves no loop device and no mount.
//!
//! Needs root, the test bed (registry, containerd), FUSE, loop devices,
//! skopeo and ctr-remote, and the daemon built into `$TARN_BIN_DIR`.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tarn_integration::overlaybd::{
    ObdBed, RUN_OUT, fixture_blobs as blobs, push_fixture_with_trace, run_ok, tail,
};
use tarn_integration::wait::wait_until;

/// containerd's proxy client backs off after a snapshotter restart, and
/// its garbage collector runs in the background: a failure bound.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The shared overlaybd bed, with this file's steps.
struct Bed(ObdBed);

impl Deref for Bed {
    type Target = ObdBed;
    fn deref(&self) -> &ObdBed {
        &self.0
    }
}

impl DerefMut for Bed {
    fn deref_mut(&mut self) -> &mut ObdBed {
        &mut self.0
    }
}

impl Bed {
    fn up() -> Bed {
        // No holder: this test shows the teardown and remount path
        // (survive.rs shows disks surviving with one).
        Bed(ObdBed::up("[snapshotter]\nholder = false\n"))
    }

    fn rpull(&self, reference: &str) {
        self.0.rpull(reference, RECONNECT_TIMEOUT);
    }

    /// `ctr run --rm` of `/app/run.sh`, retried while containerd's proxy
    /// client reconnects.
    fn run(&self, reference: &str, id: &str) -> String {
        let mut last = None;
        let ran = wait_until("ctr run", RECONNECT_TIMEOUT, || {
            let out = self
                .bed
                .ctr(&[
                    "run",
                    "--rm",
                    "--snapshotter",
                    "tarn",
                    reference,
                    id,
                    "/app/run.sh",
                ])
                .expect("run ctr");
            // containerd 1.6 now and then loses a fast container's output.
            let ok = out.status.success() && !out.stdout.is_empty();
            last = Some(out);
            ok.then_some(())
        });
        let out = last.expect("ran once");
        if let Err(e) = ran {
            panic!(
                "{e}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail(&self.tarn.log(), 30)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Loop devices whose backing file is under the daemon's root.
    fn loops(&self) -> Vec<String> {
        let out = run_ok({
            let mut c = Command::new("losetup");
            c.arg("-a");
            c
        });
        let root = self.tarn.root();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(root.to_str().unwrap()))
            .map(str::to_owned)
            .collect()
    }

    /// (mountpoint, fstype) of every mount under the daemon's root.
    fn mounts(&self) -> Vec<(PathBuf, String)> {
        mounts_under(&self.tarn.root())
    }

    fn answers(&self) -> usize {
        self.tarn
            .log()
            .matches("overlaybd layer: answering already exists")
            .count()
    }
}

fn assert_ran(out: &str) {
    for want in RUN_OUT {
        assert!(out.contains(want), "{want:?} missing from {out:?}");
    }
}

fn mounts_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((PathBuf::from(f.get(4)?), f.get(sep + 1)?.to_string()))
        })
        .filter(|(p, _)| p.starts_with(dir))
        .collect()
}

fn blob_bytes(b: &Bed, since: usize, blobs: &[(String, u64)]) -> u64 {
    b.bed.registry_log().expect("registry log")[since..]
        .iter()
        .filter(|r| blobs.iter().any(|(d, _)| r.path.ends_with(d.as_str())))
        .map(|r| r.bytes)
        .sum()
}

#[test]
fn an_overlaybd_image_runs_lazily_through_containerd_and_leaves_nothing_attached() {
    let mut b = Bed::up();
    let image = b.push();
    let blobs = blobs();
    let total: u64 = blobs.iter().map(|(_, s)| s).sum();
    let before = b.bed.registry_log().expect("registry log").len();

    b.rpull(&image);
    assert_eq!(
        b.answers(),
        blobs.len(),
        "every layer served as a disk:\n{}",
        tail(&b.tarn.log(), 30)
    );
    assert_eq!(b.loops().len(), blobs.len(), "one loop device per stack");
    let ext4 = b.mounts().iter().filter(|(_, t)| t == "ext4").count();
    assert_eq!(
        ext4,
        blobs.len(),
        "one ext4 tree per stack: {:?}",
        b.mounts()
    );

    let pulled = blob_bytes(&b, before, &blobs);
    let id = format!("obd-run-{}", std::process::id());
    assert_ran(&b.run(&image, &id));
    let served = blob_bytes(&b, before, &blobs);
    println!(
        "overlaybd: rpull fetched {pulled} bytes of blobs of {total} ({:.1}%), rpull + run {served} ({:.0}%)",
        pulled as f64 * 100.0 / total as f64,
        served as f64 * 100.0 / total as f64
    );
    assert!(
        pulled * 10 < total,
        "a lazy pull fetches a small part of the blobs: {pulled} of {total}"
    );
    // The run reads busybox and all of random5m: most of this small image.
    assert!(
        served < total,
        "a lazy pull and run fetches less than the blobs: {served} of {total}"
    );

    // Stopped, the daemon leaves no disk attached; started again, it
    // mounts the recorded stacks before serving, and the image runs.
    let status = b.tarn.stop().expect("stop tarn");
    assert!(status.success(), "SIGTERM exit: {status}");
    assert!(
        b.loops().is_empty(),
        "loop devices after stop: {:?}",
        b.loops()
    );
    assert!(
        b.mounts().iter().all(|(_, t)| t != "ext4"),
        "ext4 trees after stop: {:?}",
        b.mounts()
    );
    let before_restart = b.bed.registry_log().expect("registry log").len();
    b.tarn.start_again().expect("restart tarn");
    assert_eq!(
        b.loops().len(),
        blobs.len(),
        "stacks restored before serving"
    );
    let restored = b.bed.registry_log().expect("registry log").len();
    let id = format!("obd-run2-{}", std::process::id());
    assert_ran(&b.run(&image, &id));
    let restore = blob_bytes(&b, before_restart, &blobs) - blob_bytes(&b, restored, &blobs);
    let again = blob_bytes(&b, restored, &blobs);
    let first_run = served - pulled;
    println!(
        "overlaybd restart: restoring fetched {restore} bytes of blobs, the same run after it {again} (the first run {first_run})"
    );
    // Blocks are cached under location keys, checked against the digest
    // journaled with them: none is dropped at its first read after the
    // restart, and the run fetches little again (the kernel's read-ahead
    // on the disk file may reach blocks the first run did not read).
    let log = b.tarn.log();
    if again > 0 {
        for l in log
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("cache"))
        {
            println!("tarn log (blocks fetched again): {l}");
        }
    }
    let dropped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("failed verification"))
        .collect();
    assert!(
        dropped.is_empty(),
        "cached blocks dropped after the restart: {} {:?}",
        dropped.len(),
        dropped.first()
    );
    assert!(
        again * 4 < first_run,
        "cached blocks fetched again after the restart: {again} of {first_run}"
    );

    // SIGKILL: the disks' FUSE connections die with the daemon, their loop
    // devices and ext4 trees stay; the next start clears them and mounts
    // the stacks afresh (one loop device each, not two).
    b.tarn.kill().expect("SIGKILL tarn");
    b.tarn.start_again().expect("start after SIGKILL");
    assert_eq!(
        b.loops().len(),
        blobs.len(),
        "stale loop devices cleared, stacks mounted again: {:?}",
        b.loops()
    );
    let id = format!("obd-run3-{}", std::process::id());
    assert_ran(&b.run(&image, &id));

    // containerd's cleanup: nothing of the disks stays.
    run_ok({
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(b.bed.containerd_sock().unwrap())
            .args(["image", "rm", "--sync", &image]);
        c
    });
    let layers_dir = b.tarn.root().join("layers");
    let leftovers = || {
        let dirs: Vec<String> = std::fs::read_dir(&layers_dir)
            .map(|r| {
                r.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        (dirs, b.loops(), b.mounts())
    };
    if let Err(e) = wait_until("containerd's cleanup", RECONNECT_TIMEOUT, || {
        let (d, l, m) = leftovers();
        (d.is_empty() && l.is_empty() && m.is_empty()).then_some(())
    }) {
        let (d, l, m) = leftovers();
        panic!(
            "{e}: after image rm: layer dirs {d:?}, loop devices {l:?}, mounts {m:?}\n{}",
            tail(&b.tarn.log(), 30)
        );
    }
}

/// What the reference image's `/app/run.sh` prints (as in remote_lazy.rs).
const WORKLOAD_OUT: [&str; 2] = ["tarn test workload", "Copyright 2009 The Go Authors"];

/// The layers (digest, size) of `reference`'s manifest, as the registry
/// serves it.
fn manifest_layers(reference: &str) -> Vec<(String, u64)> {
    let out = run_ok({
        let mut c = Command::new("skopeo");
        c.args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{reference}"));
        c
    });
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).expect("manifest json");
    m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap().to_owned(),
                l["size"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Issue 15's acceptance: the test bed's reference image converted by
/// `tarn convert --format overlaybd`, then pulled lazily and run through
/// containerd: the workload's output, and the registry serves a part of
/// the converted blobs.
#[test]
fn the_reference_image_converted_by_tarn_runs_lazily_through_containerd() {
    let b = Bed::up();
    let dst = convert(&b, "multi");
    let blobs = manifest_layers(&dst);
    let total: u64 = blobs.iter().map(|(_, s)| s).sum();
    let before = b.bed.registry_log().expect("registry log").len();

    b.rpull(&dst);
    assert_eq!(
        b.answers(),
        blobs.len(),
        "every converted layer served as a disk:\n{}",
        tail(&b.tarn.log(), 30)
    );
    let pulled = blob_bytes(&b, before, &blobs);
    let id = format!("obd-conv-{}", std::process::id());
    let out = b.run(&dst, &id);
    for want in WORKLOAD_OUT {
        assert!(out.contains(want), "{want:?} missing from {out:?}");
    }
    let served = blob_bytes(&b, before, &blobs);
    println!(
        "tarn convert --format overlaybd of multi: {} layers, {total} bytes of blobs; rpull fetched {pulled} ({:.1}%), rpull + run {served} ({:.1}%)",
        blobs.len(),
        pulled as f64 * 100.0 / total as f64,
        served as f64 * 100.0 / total as f64
    );
    assert!(
        served * 4 < total,
        "a lazy pull and run of the converted image fetches a small part of it: {served} of {total}"
    );
}

/// Pushes the test bed's image `name` and converts it with `tarn convert
/// --format overlaybd` to `<name>-obd:latest`; that reference.
fn convert(b: &Bed, name: &str) -> String {
    let src = b.bed.push_image(name).expect("push the image");
    let dst = format!("{}/{name}-obd:latest", b.bed.registry().unwrap());
    let work = tempfile::tempdir().expect("work dir");
    run_ok({
        let mut c = Command::new(tarn_integration::bins::tarn().expect("tarn binary"));
        c.args(["convert", "--format", "overlaybd", &src, &dst, "--work-dir"])
            .arg(work.path());
        c
    });
    dst
}

/// With speculation on (the default), preparing a container's snapshot on
/// an overlaybd disk finds the image's entrypoint (`python3`, through
/// `PATH` and the link `python3 -> python3.11`) and the libraries it
/// needs in the disk's ext4 tree and fetches them before the container
/// runs; the loader then reads those libraries from the cache.
#[test]
fn an_overlaybd_images_entrypoint_and_its_libraries_are_fetched_before_it_runs() {
    let b = Bed(ObdBed::up_with(true, "[snapshotter]\nholder = false\n"));
    let image = convert(&b, "python");
    b.rpull(&image);
    let id = format!("obd-entry-{}", std::process::id());
    let ctr = |args: &[&str]| ctr_ok(&b, args);
    let program = "print('entrypoint ok')";
    ctr(&[
        "container",
        "create",
        "--snapshotter",
        "tarn",
        &image,
        &id,
        "--",
        "python3",
        "-c",
        program,
    ]);
    let hint = |figure: &str, kind: &str| disk_hint(&b, figure, kind);
    wait_until(
        "the entrypoint and its libraries fetched",
        RECONNECT_TIMEOUT,
        || (hint("fetched", "entrypoint") > 0 && hint("fetched", "library") > 0).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&b.tarn.log(), 30)));
    let out = ctr(&["task", "start", &id]);
    assert!(out.contains("entrypoint ok"), "{out:?}");
    let used = hint("used", "library");
    println!(
        "entrypoint {} bytes fetched ahead; libraries {} fetched, {used} of them read by the loader",
        hint("fetched", "entrypoint"),
        hint("fetched", "library")
    );
    assert!(used > 0, "the loader read the libraries the hint fetched");
    ctr(&["container", "rm", &id]);
}

/// The metric `tarn_disk_hint_<figure>_bytes_total{hint="<kind>"}`.
fn disk_hint(b: &Bed, figure: &str, kind: &str) -> u64 {
    let series = format!("tarn_disk_hint_{figure}_bytes_total{{hint=\"{kind}\"}}");
    tarn_integration::scrape::series(b.metrics, &series).unwrap_or(0)
}

/// `ctr args`, which must succeed; its output.
fn ctr_ok(b: &Bed, args: &[&str]) -> String {
    let out = b.bed.ctr(args).expect("run ctr");
    assert!(
        out.status.success(),
        "ctr {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        tail(&b.tarn.log(), 30)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An image with an acceleration layer (a recorded trace, as overlaybd's
/// `record-trace` leaves one) is served as its disks: the acceleration
/// layer adds no disk and nothing to the container's tree; preparing a
/// container on it replays the trace, whose reads of each layer are
/// fetched before the container runs.
#[test]
fn an_acceleration_layers_trace_is_replayed_before_the_container_runs() {
    use tarn_fs::format::overlaybd::trace::{Trace, TraceRead};
    let b = Bed(ObdBed::up_with(true, "[snapshotter]\nholder = false\n"));
    let reads: Vec<TraceRead> = (0..3)
        .map(|layer| TraceRead {
            layer,
            offset: 0,
            count: 1 << 20,
        })
        .collect();
    let image = push_fixture_with_trace(b.bed.registry().unwrap(), &Trace::encode(&reads));
    b.rpull(&image);
    assert_eq!(
        b.answers(),
        4,
        "every layer served:\n{}",
        tail(&b.tarn.log(), 30)
    );
    assert_eq!(b.loops().len(), 3, "the acceleration layer adds no disk");
    let id = format!("obd-accel-{}", std::process::id());
    ctr_ok(
        &b,
        &[
            "container",
            "create",
            "--snapshotter",
            "tarn",
            &image,
            &id,
            "/app/run.sh",
        ],
    );
    wait_until("the trace replayed", RECONNECT_TIMEOUT, || {
        (disk_hint(&b, "fetched", "trace") > 0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&b.tarn.log(), 30)));
    assert_ran(&ctr_ok(&b, &["task", "start", &id]));
    ctr_ok(&b, &["container", "rm", &id]);
    let root = ctr_ok(
        &b,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "tarn",
            &image,
            &format!("{id}-ls"),
            "/bin/ls",
            "/",
        ],
    );
    assert!(root.contains("app") && !root.contains("trace"), "{root:?}");
    println!(
        "trace: {} bytes fetched ahead, {} of them read by the container",
        disk_hint(&b, "fetched", "trace"),
        disk_hint(&b, "used", "trace")
    );
}
