//! Remote (lazy) layers end to end: the real registry and containerd of
//! `scripts/testbed.sh`, and tarn-snapshotter as containerd's proxy plugin
//! `tarn`, started by these tests so they can stop, kill and restart it.
//!
//! Images come from `scripts/images.sh` (multi-esgz: 5 eStargz layers,
//! 155 MB; its `/app/run.sh` starts python3 and reads a Go source file).
//! Needs the daemon and the CLI built into `$TARN_BIN_DIR` first.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tarn_integration::daemon::Daemon;
use tarn_integration::reglog::Request;
use tarn_integration::testbed::{Component, Testbed, repo_root};
use tarn_integration::wait::wait_until;
use tarn_proto::admin::{Layer, ListLayersRequest, StatsRequest, StatsResponse};

/// How long containerd's proxy client may take to come back after the
/// snapshotter restarted (it backs off for a few seconds), or its garbage
/// collector to clean up: a bound for a failure message.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);

const WORKLOAD_OUT: [&str; 2] = ["tarn test workload", "Copyright 2009 The Go Authors"];

/// The test bed (registry, containerd) with a tarn daemon of the test's own
/// behind containerd's `tarn` proxy plugin. Fields drop in order: tarn
/// first (unmounting its layers), then the bed.
struct Bed {
    tarn: Daemon,
    bed: Testbed,
}

impl Bed {
    fn up(extra_config: &str) -> Bed {
        let bed = Testbed::up(&[Component::Registry, Component::Containerd]).expect("test bed up");
        let config = format!(
            "[registry]\nplain_http = [\"{}\"]\n{extra_config}",
            bed.registry().expect("registry")
        );
        let tarn = Daemon::start_with(Some(bed.dir().join("tarn.sock")), &config)
            .expect("start tarn-snapshotter");
        Bed { tarn, bed }
    }

    fn push(&self, image: &str) -> String {
        self.bed.push_image(image).expect("push image")
    }

    fn ctr_remote(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr-remote");
        c.arg("--address")
            .arg(self.bed.containerd_sock().expect("containerd"))
            .args(args);
        c
    }

    fn rpull(&self, reference: &str) -> Output {
        run_ok(self.ctr_remote(&[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "tarn",
            reference,
        ]))
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.bed.ctr(args).expect("run ctr")
    }

    /// `ctr run` of `reference` with `cmd`; retried for a few seconds since
    /// containerd's proxy client backs off after a snapshotter restart.
    fn run(&self, reference: &str, id: &str, cmd: &[&str]) -> String {
        let mut args = vec!["run", "--rm", "--snapshotter", "tarn", reference, id];
        args.extend_from_slice(cmd);
        let mut last = None;
        let ran = wait_until("ctr run to succeed", RECONNECT_TIMEOUT, || {
            let out = self.ctr(&args);
            let ok = out.status.success();
            last = Some(out);
            ok.then_some(())
        });
        let out = last.expect("ran at least once");
        if let Err(e) = ran {
            panic!(
                "{e}: ctr run {reference}: {}\ntarn log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail(&self.tarn.log(), 30)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn run_workload(&self, reference: &str, id: &str) {
        let out = self.run(reference, id, &["/app/run.sh"]);
        for want in WORKLOAD_OUT {
            assert!(
                out.contains(want),
                "{want:?} missing from workload output {out:?}"
            );
        }
    }

    fn registry_log(&self) -> Vec<Request> {
        self.bed.registry_log().expect("registry log")
    }

    fn admin(&self) -> (Vec<Layer>, StatsResponse) {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let mut a = self.tarn.admin().await.expect("admin client");
            let layers = a
                .list_layers(ListLayersRequest {})
                .await
                .expect("list layers")
                .into_inner()
                .layers;
            let stats = a.stats(StatsRequest {}).await.expect("stats").into_inner();
            (layers, stats)
        })
    }

    /// FUSE mounts under the daemon's root.
    fn fuse_mounts(&self) -> Vec<PathBuf> {
        mounts_under(&self.tarn.root())
            .into_iter()
            .filter(|(_, fs)| fs.starts_with("fuse"))
            .map(|(p, _)| p)
            .collect()
    }

    fn already_exists_answers(&self) -> usize {
        self.tarn
            .log()
            .matches("remote layer: answering already exists")
            .count()
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

/// (mountpoint, fstype) of every mount at or below `dir`.
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

/// Layer digests and compressed sizes of a cached test image.
fn image_layers(name: &str) -> Vec<(String, u64)> {
    let out = run_ok({
        let mut c = Command::new(repo_root().join("scripts/images.sh"));
        c.args(["path", name]);
        c
    });
    let layout = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let blob = |digest: &str| {
        let hex = digest.trim_start_matches("sha256:");
        let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).expect("read blob");
        serde_json::from_slice::<serde_json::Value>(&bytes).expect("json blob")
    };
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("index json");
    let manifest = blob(index["manifests"][0]["digest"].as_str().expect("digest"));
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

/// Blob GETs per layer digest, and their bytes, in `log`.
fn blob_gets(log: &[Request], layers: &[(String, u64)]) -> (BTreeMap<String, usize>, u64) {
    let mut count = BTreeMap::new();
    let mut bytes = 0;
    for r in log.iter().filter(|r| r.is_blob_get()) {
        if let Some((d, _)) = layers.iter().find(|(d, _)| r.path.ends_with(d.as_str())) {
            *count.entry(d.clone()).or_insert(0) += 1;
            bytes += r.bytes;
        }
    }
    (count, bytes)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

#[test]
fn lazy_rpull_runs_fetches_little_and_survives_a_restart() {
    let b = Bed::up("");
    let image = b.push("multi-esgz");
    let layers = image_layers("multi-esgz");
    let image_bytes: u64 = layers.iter().map(|(_, s)| s).sum();
    let before = b.registry_log().len();

    let t = Instant::now();
    b.rpull(&image);
    let pull_time = t.elapsed();
    assert_eq!(
        b.already_exists_answers(),
        layers.len(),
        "every layer answered ALREADY_EXISTS:\n{}",
        tail(&b.tarn.log(), 20)
    );
    assert_eq!(
        b.fuse_mounts().len(),
        layers.len(),
        "one FUSE mount per layer"
    );
    b.run_workload(&image, "lazy1");
    let lazy_time = t.elapsed();

    let log = b.registry_log();
    let (_, lazy_bytes) = blob_gets(&log[before..], &layers);
    let served: u64 = log[before..].iter().map(|r| r.bytes).sum();
    println!(
        "lazy rpull {:.2}s, rpull+run {:.2}s; registry served {:.1} MiB ({:.1} MiB of layer blobs) of a {:.1} MiB image",
        pull_time.as_secs_f64(),
        lazy_time.as_secs_f64(),
        mib(served),
        mib(lazy_bytes),
        mib(image_bytes)
    );
    assert!(
        served * 5 < image_bytes,
        "a lazy pull and run must fetch far less than the image: {served} of {image_bytes}"
    );

    let (admin_layers, stats) = b.admin();
    assert_eq!(admin_layers.len(), layers.len());
    let fetched: u64 = admin_layers.iter().map(|l| l.bytes_fetched).sum();
    assert!(
        fetched > 0 && fetched <= lazy_bytes,
        "admin figures match the registry: {fetched} vs {lazy_bytes}"
    );
    for l in &admin_layers {
        assert!(
            layers
                .iter()
                .any(|(d, s)| *d == l.layer_digest && *s == l.blob_size)
        );
        assert_eq!(l.image_ref, image);
        assert!(!l.snapshot.is_empty(), "chain ID of {}", l.layer_digest);
    }
    assert_eq!(stats.fallbacks, 0);
    assert_eq!(stats.mounted_layers, layers.len() as u64);

    // The full pull of the same image (plain gzip layers) with containerd's
    // overlayfs snapshotter, for comparison.
    let plain = b.push("multi");
    let t = Instant::now();
    let out = b.ctr(&["image", "pull", "--plain-http", &plain]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = b.ctr(&["run", "--rm", &plain, "full1", "/app/run.sh"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "full pull+run (overlayfs) {:.2}s vs lazy {:.2}s",
        t.elapsed().as_secs_f64(),
        lazy_time.as_secs_f64()
    );

    // SIGTERM and start again: the holder (on by default) keeps the layers
    // mounted while no daemon runs, the next daemon adopts them, the image
    // runs without a pull, and no chunk is fetched again.
    let mut b = b;
    let status = b.tarn.stop().expect("stop tarn");
    assert!(status.success(), "SIGTERM exit: {status}");
    assert_eq!(
        b.fuse_mounts().len(),
        layers.len(),
        "the holder keeps the layers mounted while no daemon runs"
    );
    let before_restart = b.registry_log().len();
    b.tarn.start_again().expect("restart tarn");
    assert_eq!(
        b.fuse_mounts().len(),
        layers.len(),
        "layers restored before serving"
    );
    let restored = b.registry_log();
    let (restore_gets, restore_bytes) = blob_gets(&restored[before_restart..], &layers);
    b.run_workload(&image, "lazy2");
    let after = b.registry_log();
    println!(
        "restart: restoring {} layers read {} footer/TOC ranges ({:.1} KiB); the run after it fetched {} requests",
        layers.len(),
        restore_gets.values().sum::<usize>(),
        restore_bytes as f64 / 1024.0,
        after.len() - restored.len()
    );
    assert_eq!(
        after.len(),
        restored.len(),
        "cached chunks were fetched again after the restart: {:?}",
        &after[restored.len()..]
    );
    assert!(
        restore_gets.values().all(|&n| n <= 2),
        "restore reads footer and TOC only: {restore_gets:?}"
    );
}

#[test]
fn concurrent_pulls_resolve_each_layer_once() {
    let b = Bed::up("");
    let image = b.push("multi-esgz");
    let layers = image_layers("multi-esgz");
    let before = b.registry_log().len();

    let t = Instant::now();
    let pulls: Vec<_> = (0..20)
        .map(|_| {
            b.ctr_remote(&[
                "image",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "tarn",
                &image,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn ctr-remote")
        })
        .collect();
    for p in pulls {
        let out = p.wait_with_output().expect("wait ctr-remote");
        assert!(
            out.status.success(),
            "a concurrent rpull failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let elapsed = t.elapsed();
    let log = b.registry_log();
    let (gets, lazy_bytes) = blob_gets(&log[before..], &layers);
    let served: u64 = log[before..].iter().map(|r| r.bytes).sum();
    // One pull costs the footer/TOC ranges of each layer (one GET, two for
    // a TOC beyond the first tail read) plus manifest and config.
    println!(
        "20 concurrent rpulls: {:.2}s; registry served {:.1} KiB, layer blob GETs {gets:?} ({:.1} KiB)",
        elapsed.as_secs_f64(),
        served as f64 / 1024.0,
        lazy_bytes as f64 / 1024.0
    );
    assert_eq!(gets.len(), layers.len());
    assert!(
        gets.values().all(|&n| n <= 2),
        "each layer's footer and TOC fetched once: {gets:?}"
    );
    // One pull's bytes: every distinct response once (the 20 clients each
    // fetch manifest and config themselves; the layers are resolved once).
    let mut seen = std::collections::HashSet::new();
    let one: u64 = log[before..]
        .iter()
        .filter(|r| seen.insert((r.path.clone(), r.bytes)))
        .map(|r| r.bytes)
        .sum();
    println!(
        "registry bytes: 20 pulls {served}, one pull {one} ({:.3}x)",
        served as f64 / one as f64
    );
    assert!(
        served as f64 <= 1.05 * one as f64,
        "20 pulls cost more than 1.05x one: {served} vs {one} bytes"
    );
    b.run_workload(&image, "conc1");

    // Ordinary (non-eStargz) images through tarn, 20 at once.
    let plain = b.push("busybox");
    let pulls: Vec<_> = (0..20)
        .map(|_| {
            let mut c = Command::new("ctr");
            c.arg("--address")
                .arg(b.bed.containerd_sock().expect("containerd"))
                .args([
                    "image",
                    "pull",
                    "--plain-http",
                    "--snapshotter",
                    "tarn",
                    &plain,
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            c.spawn().expect("spawn ctr")
        })
        .collect();
    for p in pulls {
        let out = p.wait_with_output().expect("wait ctr");
        assert!(
            out.status.success(),
            "a concurrent ordinary pull failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = b.run(&plain, "conc2", &["/bin/sh", "-c", "echo ordinary-ok"]);
    assert!(out.contains("ordinary-ok"), "{out}");

    // `tarn pull` of another eStargz image, 20 at once, each telling the
    // daemon about the pull (the head start): still one resolution each.
    let python = b.push("python-esgz");
    let python_layers = image_layers("python-esgz");
    let before = b.registry_log().len();
    let tarn = tarn_bin();
    let pulls: Vec<_> = (0..20)
        .map(|_| {
            Command::new(&tarn)
                .args(["pull", "--snapshotter", "tarn", "--address"])
                .arg(b.bed.containerd_sock().expect("containerd"))
                .arg("--admin-address")
                .arg(b.tarn.admin_address())
                .arg(&python)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn tarn pull")
        })
        .collect();
    for p in pulls {
        let out = p.wait_with_output().expect("wait tarn pull");
        assert!(
            out.status.success(),
            "a concurrent tarn pull failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Layers multi-esgz shares are mounted already: the hints must not
    // resolve them again; any other layer is resolved once.
    let (gets, _) = blob_gets(&b.registry_log()[before..], &python_layers);
    for (digest, _) in &python_layers {
        let n = gets.get(digest).copied().unwrap_or(0);
        let shared = layers.iter().any(|(d, _)| d == digest);
        assert!(
            if shared { n == 0 } else { (1..=2).contains(&n) },
            "20 pulls with hints: layer {digest} (mounted already: {shared}) took {n} GETs"
        );
    }
    assert!(
        b.tarn.log().contains("pull expected"),
        "the daemon took the pull hints"
    );
    let out = b.run(
        &python,
        "conc3",
        &["/usr/bin/python3", "-c", "import json; print('py-ok')"],
    );
    assert!(out.contains("py-ok"), "{out}");
    let (_, stats) = b.admin();
    assert_eq!(stats.fallbacks, 0, "eStargz layers never fall back");
}

fn tarn_bin() -> PathBuf {
    tarn_integration::bins::tarn().expect("tarn built")
}

#[test]
fn sigkill_during_a_pull_then_restart_pull_and_cleanup_leave_nothing() {
    let mut b = Bed::up("");
    let image = b.push("multi-esgz");
    let mut pull = b
        .ctr_remote(&[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "tarn",
            &image,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn rpull");
    // Kill once the first layer is in: mid-pull.
    // (If it never comes, the kill lands after the pull: the test goes on.)
    let _ = wait_until("the first layer", Duration::from_secs(20), || {
        (b.already_exists_answers() > 0).then_some(())
    });
    b.tarn.kill().expect("SIGKILL tarn");
    let _ = pull.wait();
    assert!(
        !b.fuse_mounts().is_empty(),
        "a killed daemon's FUSE mounts stay (kept by the holder)"
    );

    b.tarn.start_again().expect("restart after SIGKILL");
    // containerd's proxy client backs off for a few seconds after the
    // snapshotter went away.
    let mut stderr = String::new();
    wait_until("rpull after restart", RECONNECT_TIMEOUT, || {
        let out = b
            .ctr_remote(&[
                "image",
                "rpull",
                "--plain-http",
                "--snapshotter",
                "tarn",
                &image,
            ])
            .output()
            .expect("run rpull");
        stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        out.status.success().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {stderr}"));
    b.run_workload(&image, "after-kill");
    let (layers, _) = b.admin();
    assert_eq!(layers.len(), 5, "{layers:?}");

    // containerd's cleanup: remove the image and collect its snapshots.
    let out = b.ctr(&["image", "rm", "--sync", &image]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = b.tarn.root();
    let leftovers = || {
        let dirs = |d: &str| -> Vec<String> {
            std::fs::read_dir(root.join(d))
                .map(|r| {
                    r.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                        .collect()
                })
                .unwrap_or_default()
        };
        (dirs("snapshots"), dirs("layers"), b.fuse_mounts())
    };
    if let Err(e) = wait_until("containerd's cleanup", RECONNECT_TIMEOUT, || {
        let (s, l, m) = leftovers();
        (s.is_empty() && l.is_empty() && m.is_empty()).then_some(())
    }) {
        let (s, l, m) = leftovers();
        panic!(
            "{e}: after image rm: snapshot dirs {s:?}, layer dirs {l:?}, mounts {m:?}\n{}",
            tail(&b.tarn.log(), 30)
        );
    }
    let (layers, stats) = b.admin();
    assert!(layers.is_empty(), "{layers:?}");
    assert_eq!(stats.snapshots, 0);
}

/// A TCP server that accepts connections and never answers: a registry
/// that hangs.
fn hanging_server() -> (TcpListener, std::thread::JoinHandle<()>, u16) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let l2 = l.try_clone().expect("clone listener");
    let h = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l2.incoming() {
            match s {
                Ok(s) => held.push(s),
                Err(_) => return,
            }
            if held.len() > 64 {
                return;
            }
        }
    });
    (l, h, port)
}

/// The eStargz image `name` with the TOC digest annotations removed from
/// its manifest, copied to `registry` as `notoc:latest`.
fn push_without_toc_digest(name: &str, registry: &str, work: &Path) -> String {
    let out = run_ok({
        let mut c = Command::new(repo_root().join("scripts/images.sh"));
        c.args(["path", name]);
        c
    });
    let src = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let dst = work.join("notoc");
    run_ok({
        let mut c = Command::new("cp");
        c.arg("-a").arg(&src).arg(&dst);
        c
    });
    let index_path = dst.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).expect("index")).expect("json");
    let old = index["manifests"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_owned();
    let blobs = dst.join("blobs/sha256");
    let mut manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blobs.join(old.trim_start_matches("sha256:"))).expect("manifest"),
    )
    .expect("json");
    let mut removed = 0;
    for l in manifest["layers"].as_array_mut().expect("layers") {
        if let Some(a) = l["annotations"].as_object_mut() {
            removed += a
                .remove("containerd.io/snapshot/stargz/toc.digest")
                .is_some() as usize;
        }
    }
    assert!(removed > 0, "{name} has TOC digest annotations");
    let bytes = serde_json::to_vec(&manifest).expect("json");
    let digest = tarn_fs::Digest::of(&bytes);
    std::fs::write(blobs.join(digest.hex()), &bytes).expect("write manifest");
    index["manifests"][0]["digest"] = digest.to_string().into();
    index["manifests"][0]["size"] = bytes.len().into();
    std::fs::write(&index_path, serde_json::to_vec(&index).expect("json")).expect("index");
    let reference = format!("{registry}/notoc:latest");
    run_ok({
        let mut c = Command::new("skopeo");
        c.args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", dst.display()))
            .arg(format!("docker://{reference}"));
        c
    });
    reference
}

#[test]
fn unservable_layers_fall_back_within_the_resolve_timeout_and_run() {
    let b = Bed::up("[snapshotter]\nresolve_timeout_secs = 2\n");
    let registry = b.bed.registry().expect("registry").to_owned();
    let cmd = [
        "/bin/sh",
        "-c",
        "cat /etc/passwd >/dev/null && echo fallback-ok",
    ];
    let mut fallbacks = 0;
    let mut check = |what: &str, reference: &str, id: &str, elapsed: Duration| {
        let (_, stats) = b.admin();
        assert!(stats.fallbacks > fallbacks, "{what}: counted as a fallback");
        fallbacks = stats.fallbacks;
        assert_eq!(b.already_exists_answers(), 0, "{what}: nothing lazy");
        assert!(b.fuse_mounts().is_empty(), "{what}: nothing mounted");
        let out = b.run(reference, id, &cmd);
        assert!(out.contains("fallback-ok"), "{what}: {out}");
        println!("{what}: fell back, pull took {:.2}s", elapsed.as_secs_f64());
    };

    // 1. Not eStargz.
    let plain = b.push("busybox");
    let t = Instant::now();
    b.rpull(&plain);
    check("non-eStargz layer", &plain, "fb1", t.elapsed());

    let work = tempfile::tempdir().expect("temp dir");
    // 2. A registry that hangs during Prepare: containerd reaches the
    // image through a mirror (hosts.toml), tarn through the reference,
    // which names a server that accepts and never answers.
    let esgz = b.push("busybox-esgz");
    let (_listener, _thread, port) = hanging_server();
    let hosts = work.path().join("hosts");
    let host_dir = hosts.join(format!("127.0.0.1:{port}"));
    std::fs::create_dir_all(&host_dir).expect("hosts dir");
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://{registry}\"\n[host.\"http://{registry}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ),
    )
    .expect("hosts.toml");
    let hung = esgz.replacen(&registry, &format!("127.0.0.1:{port}"), 1);
    let t = Instant::now();
    run_ok(b.ctr_remote(&[
        "image",
        "rpull",
        "--plain-http",
        "--hosts-dir",
        hosts.to_str().expect("utf-8 path"),
        "--snapshotter",
        "tarn",
        &hung,
    ]));
    let elapsed = t.elapsed();
    assert!(
        elapsed < Duration::from_secs(10),
        "fallback within the 2 s resolve timeout (plus the ordinary pull): {elapsed:?}"
    );
    let reasons: Vec<String> = b
        .tarn
        .log()
        .lines()
        .filter(|l| l.contains("not lazy"))
        .map(str::to_owned)
        .collect();
    assert!(
        reasons
            .last()
            .is_some_and(|l| l.contains("resolve timeout")),
        "the hung registry's fallback reason: {reasons:#?}"
    );
    check("registry hanging during Prepare", &hung, "fb3", elapsed);

    // 3. eStargz without the TOC digest annotation (unverifiable).
    // (python-esgz: its python layer is in no image pulled before.)
    let notoc = push_without_toc_digest("python-esgz", &registry, work.path());
    let t = Instant::now();
    b.rpull(&notoc);
    check("layer without TOC digest", &notoc, "fb2", t.elapsed());
    assert!(b.tarn.log().contains("toc.digest"), "the reason is logged");

    let layer_dirs: Vec<String> = std::fs::read_dir(b.tarn.root().join("layers"))
        .expect("layers dir")
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    assert!(
        layer_dirs.is_empty(),
        "no layer dir left by fallbacks: {layer_dirs:?}"
    );
}
