//! Issue 13's acceptance for the daemon: every layer of the hostile corpus,
//! pushed as an image to the test bed's registry and pulled lazily through
//! containerd (`ctr-remote image rpull --snapshotter tarn`, so tarn-snapshotter
//! opens it through the real Prepare path), leaves the daemon up (same PID,
//! `tarn status` answering) and still serving a good lazy layer: after each
//! hostile pull a file of the good layer not read before reads right.
//! Layers tarn mounts are also read through the daemon's own mount: their
//! bad entries must be EIO and the rest intact.
//!
//! Needs root, /dev/fuse, the test bed (registry, containerd) and the
//! binaries in `$TARN_BIN_DIR`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tarn_fs::Digest;
use tarn_fs::format::estargz::{WriteOptions, write_estargz};
use tarn_integration::daemon::Daemon;
use tarn_integration::hostile::{self, Case, Outcome};
use tarn_integration::registry::{OCI_MANIFEST, TestRegistry};
use tarn_integration::testbed::Component;

const TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// A bound for a failure message: a read through the daemon, even of a
/// hostile chunk, takes a fraction of it.
const READ_BOUND: Duration = Duration::from_secs(60);

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// The uncompressed digest of a layer (its diff_id), streamed; for a blob
/// that does not gunzip, the digest of the blob (containerd only checks it
/// if it unpacks the layer itself, and then the layer fails anyway).
fn diff_id(blob: &[u8]) -> Digest {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let mut r = flate2::read::MultiGzDecoder::new(blob);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Digest(h.finalize().into()),
            Ok(n) => h.update(&buf[..n]),
            Err(_) => return Digest::of(blob),
        }
    }
}

/// Pushes a one-layer image with a config whose diff_id matches; returns
/// its reference.
fn push(reg: &TestRegistry, repo: &str, blob: &[u8], toc: Digest) -> String {
    block_on(async {
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id(blob).to_string()]},
        }))
        .expect("json");
        let config_digest = reg.push_blob(repo, &config).await.expect("config");
        let layer = reg.push_blob(repo, blob).await.expect("layer");
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest.to_string(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer.to_string(), "size": blob.len(),
                "annotations": {TOC_ANNOTATION: toc.to_string()}}],
        }))
        .expect("json");
        reg.push_manifest(repo, "latest", OCI_MANIFEST, &manifest)
            .await
            .expect("manifest");
    });
    format!("{}/{repo}:latest", reg.host())
}

/// The good layer: one file per hostile case, each read once, after it.
fn good_layer(files: usize) -> (Vec<u8>, Digest, Vec<Vec<u8>>) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut contents = Vec::new();
    for i in 0..files {
        let data = format!("good file {i}\n").repeat(2000 + i).into_bytes();
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, format!("good/f{i:03}"), &data[..])
            .expect("tar");
        contents.push(data);
    }
    let tar = tar.into_inner().expect("tar");
    let mut blob = Vec::new();
    let res = write_estargz(&tar[..], &mut blob, &WriteOptions::default()).expect("writer");
    (blob, res.toc_digest, contents)
}

fn fuse_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            (f.get(4)?.starts_with(&prefix) && f.get(sep + 1)?.starts_with("fuse"))
                .then(|| PathBuf::from(f[4]))
        })
        .collect()
}

/// Reads `path` in a thread, so a hung read fails the test instead of
/// hanging it.
fn bounded_read(path: PathBuf) -> Result<Vec<u8>, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = path.clone();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read(&p));
    });
    match rx.recv_timeout(READ_BOUND) {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => Err("EIO".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("{} hung for {READ_BOUND:?}", path.display())),
    }
}

fn ctr_remote(reg: &TestRegistry, args: &[&str]) -> Output {
    Command::new("ctr-remote")
        .arg("--address")
        .arg(reg.bed().containerd_sock().expect("containerd"))
        .args(args)
        .output()
        .expect("ctr-remote")
}

fn rpull(reg: &TestRegistry, reference: &str) -> Output {
    ctr_remote(
        reg,
        &[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "tarn",
            reference,
        ],
    )
}

fn daemon_alive(tarn: &Daemon, pid: u32) -> Result<(), String> {
    if tarn.pid() != Some(pid) || !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(format!("the daemon (pid {pid}) is gone"));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    if status.contains("State:\tZ") {
        return Err(format!("the daemon (pid {pid}) died"));
    }
    let out = Command::new(tarn_integration::bins::tarn().expect("tarn built"))
        .arg("status")
        .arg("--admin-address")
        .arg(tarn.admin_address())
        .output()
        .expect("tarn status");
    if !out.status.success() {
        return Err(format!(
            "tarn status fails: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn contained_checks(mnt: &Path, outcome: &Outcome) -> Vec<String> {
    let Outcome::Contained {
        unreadable, intact, ..
    } = outcome
    else {
        return vec![format!(
            "tarn mounted a layer it must refuse at {}",
            mnt.display()
        )];
    };
    let mut bad = Vec::new();
    for p in unreadable.iter().filter(|p| p.len() < 1000) {
        match bounded_read(mnt.join(p)) {
            Err(e) if e == "EIO" => {}
            Ok(_) => bad.push(format!("{p} read through the daemon, must be EIO")),
            Err(e) => bad.push(format!("{p}: {e}, must be EIO")),
        }
    }
    for (p, want) in intact.iter().filter(|(p, _)| p.len() < 1000) {
        match bounded_read(mnt.join(p)) {
            Ok(got) if &got == want => {}
            Ok(_) => bad.push(format!("{p}: wrong bytes through the daemon")),
            Err(e) => bad.push(format!("{p}: {e}")),
        }
    }
    bad
}

#[test]
fn the_daemon_survives_every_hostile_layer_and_keeps_serving_a_good_one() {
    let reg =
        TestRegistry::start_in_bed(&[Component::Registry, Component::Containerd]).expect("bed");
    let config = format!("[registry]\nplain_http = [\"{}\"]\n", reg.host());
    let tarn = Daemon::start_with(Some(reg.bed().dir().join("tarn.sock")), &config)
        .expect("start tarn-snapshotter");
    let pid = tarn.pid().expect("running");

    let mut cases: Vec<Case> = hostile::small_cases();
    cases.push(hostile::deep_name(hostile::DEEP_COMPONENTS));
    cases.push(hostile::gzip_bomb());
    cases.push(hostile::gzip_bomb_declared());

    let (blob, toc, contents) = good_layer(cases.len());
    let good_ref = push(&reg, "good-lazy", &blob, toc);
    let out = rpull(&reg, &good_ref);
    assert!(
        out.status.success(),
        "rpull of the good image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let good_mnt = fuse_mounts_under(&tarn.root())
        .into_iter()
        .find(|m| m.join("good/f000").exists())
        .expect("the good layer is mounted lazily by the daemon");

    let mut failures = Vec::new();
    for (i, c) in cases.into_iter().enumerate() {
        let before = fuse_mounts_under(&tarn.root());
        let reference = push(&reg, &format!("hostile-{}", c.name), &c.blob, c.toc_digest);
        drop(c.blob);
        let out = rpull(&reg, &reference);
        let mut bad = Vec::new();
        for m in fuse_mounts_under(&tarn.root()) {
            if !before.contains(&m) && m.join(hostile::GOOD_NAME).exists() {
                bad.extend(contained_checks(&m, &c.outcome));
            }
        }
        if let Err(e) = daemon_alive(&tarn, pid) {
            bad.push(e);
        }
        match bounded_read(good_mnt.join(format!("good/f{i:03}"))) {
            Ok(b) if b == contents[i] => {}
            Ok(_) => bad.push(format!("good/f{i:03}: wrong bytes")),
            Err(e) => bad.push(format!("good/f{i:03} no longer reads: {e}")),
        }
        eprintln!(
            "{:24} rpull {}  {}",
            c.name,
            if out.status.success() {
                "ok    "
            } else {
                "failed"
            },
            if bad.is_empty() { "ok" } else { "FAILED" }
        );
        let dead = bad
            .iter()
            .any(|b| b.contains("is gone") || b.contains("died"));
        failures.extend(
            bad.into_iter()
                .map(|b| format!("[class {}] {}: {b}", c.class, c.name)),
        );
        if dead {
            let log = tarn.log();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            failures.push(format!(
                "daemon log tail:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
            break;
        }
    }
    let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .unwrap_or("VmHWM: gone")
        .to_string();
    eprintln!("daemon after the corpus: {hwm}");
    drop(tarn);
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
