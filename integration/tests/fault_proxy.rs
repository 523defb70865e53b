//! Issue 13's fault-injection acceptance: a lazily mounted layer read
//! through `tarn-faultproxy` (5xx, resets, truncated bodies, stalls longer
//! than tarn's request timeout, flipped bytes, at a seeded rate) gives, for
//! every read, the right bytes or EIO within a bound, never wrong bytes and
//! never a hang; and `ctr run` of a workload on a lazy image pulled through
//! the faulty proxy prints the right output or fails cleanly.
//!
//! The seed is `TARN_FAULT_SEED` (default 13) so a failing run can be
//! replayed. Needs root, /dev/fuse, the test bed and `$TARN_BIN_DIR`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tarn_fs::Digest;
use tarn_fs::format::estargz::{WriteOptions, write_estargz};
use tarn_integration::daemon::Daemon;
use tarn_integration::registry::TestRegistry;
use tarn_integration::testbed::Component;
use tarn_integration::wait::wait_until;

const TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// How long a stalled response hangs: longer than tarn's 60 s request
/// timeout, so only the client's own timeout can end it.
const STALL_SECS: u64 = 75;
/// The bound on one read: a stall (up to the 60 s request timeout) plus
/// retries with backoff fit well inside it. A read still going past it is
/// a hang.
const READ_BOUND: Duration = Duration::from_secs(180);

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn seed() -> u64 {
    std::env::var("TARN_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(13)
}

/// `tarn-faultproxy` in front of `upstream`, killed by PID on drop.
struct FaultProxy {
    child: Child,
    addr: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl FaultProxy {
    fn start(upstream: &str, rate: f64, clean: u64) -> FaultProxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let (addr_file, log) = (dir.path().join("addr"), dir.path().join("faults"));
        let child = Command::new(env!("CARGO_BIN_EXE_tarn-faultproxy"))
            .args(["--upstream", upstream])
            .args(["--rate", &rate.to_string()])
            .args(["--seed", &seed().to_string()])
            .args(["--clean", &clean.to_string()])
            .args(["--stall-secs", &STALL_SECS.to_string()])
            .arg("--addr-file")
            .arg(&addr_file)
            .arg("--log")
            .arg(&log)
            .stderr(Stdio::null())
            .spawn()
            .expect("starting tarn-faultproxy");
        let mut p = FaultProxy {
            child,
            addr: String::new(),
            log,
            _dir: dir,
        };
        p.addr = wait_until("tarn-faultproxy to listen", Duration::from_secs(10), || {
            let a = std::fs::read_to_string(&addr_file).unwrap_or_default();
            (!a.trim().is_empty()).then(|| a.trim().to_owned())
        })
        .expect("tarn-faultproxy started");
        p
    }

    fn faults(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Files of many sizes: small ones (some in the blob's tail), and larger
/// ones of many 64 KiB chunks: about 30 MB, so reads take several
/// merged GETs (tarn merges up to 8 MiB in one).
fn files() -> Vec<(String, Vec<u8>)> {
    (0..48)
        .map(|i| {
            let len = match i % 4 {
                0 => 300 + i * 7,
                1 => 300_000 + i * 1000,
                2 => 2_000_000 + i * 3000,
                _ => 20_000,
            };
            (format!("data/f{i:02}"), pseudo_random(len, i as u64 + 1))
        })
        .collect()
}

fn layer(files: &[(String, Vec<u8>)]) -> (Vec<u8>, Digest) {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o755);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, &data[..]).expect("tar");
    }
    let tar = tar.into_inner().expect("tar");
    let mut blob = Vec::new();
    let opts = WriteOptions {
        chunk_size: 64 << 10,
        level: 1,
        ..WriteOptions::default()
    };
    let res = write_estargz(&tar[..], &mut blob, &opts).expect("writer");
    (blob, res.toc_digest)
}

fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// What one read gave.
enum Read {
    Right,
    Eio,
}

#[test]
fn every_read_through_a_faulty_registry_is_right_or_eio_and_ends() {
    let reg = TestRegistry::start().expect("registry");
    let files = files();
    let (blob, toc) = layer(&files);
    let layer_digest = Digest::of(&blob).to_string();
    let ann = vec![(TOC_ANNOTATION.to_string(), toc.to_string())];
    block_on(reg.push_image("faulty", Some("latest"), "amd64", &[(blob, ann)])).expect("push");
    // The opening (tail and TOC) is served clean: the test is about reads.
    let proxy = FaultProxy::start(&reg.host(), 0.5, 1);
    let image = format!("{}/faulty:latest", proxy.addr);

    let dir = tempfile::tempdir().expect("tempdir");
    let (mnt, root) = (dir.path().join("mnt"), dir.path().join("root"));
    std::fs::create_dir(&mnt).expect("mnt");
    let mut child = Command::new(tarn_integration::bins::tarn().expect("tarn built"))
        .args(["mount-layer", &image, &layer_digest])
        .arg(&mnt)
        .arg("--root")
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr")).expect("stderr"))
        .spawn()
        .expect("tarn mount-layer");
    let mounted = wait_until("the layer to mount", Duration::from_secs(60), || {
        if child.try_wait().expect("wait").is_some() {
            return Some(false);
        }
        is_mounted(&mnt).then_some(true)
    });
    assert!(
        matches!(mounted, Ok(true)),
        "tarn mount-layer did not mount: {}",
        std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default()
    );

    // Every file read by its own thread, at once, each bounded.
    let start = Instant::now();
    let readers: Vec<_> = files
        .iter()
        .map(|(name, want)| {
            let (path, want, name) = (mnt.join(name), want.clone(), name.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let r = match std::fs::read(&path) {
                    Ok(got) if got == want => Ok(Read::Right),
                    Ok(got) => Err(format!("{name}: WRONG BYTES ({} bytes read)", got.len())),
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(Read::Eio),
                    Err(e) => Err(format!("{name}: {e}, neither the bytes nor EIO")),
                };
                let _ = tx.send(r);
            });
            (rx, files.len())
        })
        .collect();
    let (mut right, mut eio, mut bad) = (0, 0, Vec::new());
    for (i, (rx, _)) in readers.into_iter().enumerate() {
        let left = READ_BOUND.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(Ok(Read::Right)) => right += 1,
            Ok(Ok(Read::Eio)) => eio += 1,
            Ok(Err(e)) => bad.push(e),
            Err(_) => bad.push(format!("data/f{i:02}: still reading after {READ_BOUND:?}")),
        }
    }
    let faults = proxy.faults();
    eprintln!(
        "seed {}: {right} right, {eio} EIO of {} files in {:.1} s; {} faults injected",
        seed(),
        files.len(),
        start.elapsed().as_secs_f64(),
        faults.len()
    );
    for f in &faults {
        eprintln!("  {f}");
    }
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(i32::try_from(child.id()).expect("pid"), libc::SIGTERM) };
    let _ = wait_until("tarn to exit", Duration::from_secs(30), || {
        child.try_wait().ok().flatten()
    });
    let _ = child.kill();
    let _ = child.wait();
    if is_mounted(&mnt) {
        let _ = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&mnt)
            .status();
    }
    let stderr = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
    assert!(!stderr.contains("panicked"), "tarn panicked: {stderr}");
    assert!(!faults.is_empty(), "the proxy injected no fault");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

/// The md5sum line of `/bin/busybox` in the test image, from its OCI
/// layout (what a run that reads right must print).
fn busybox_md5() -> String {
    let out = Command::new(tarn_integration::testbed::repo_root().join("scripts/images.sh"))
        .args(["path", "busybox-esgz"])
        .output()
        .expect("images.sh");
    let layout = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("json");
    let blob = |d: &str| {
        std::fs::read(
            layout
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
        .expect("blob")
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().expect("d")))
            .expect("manifest");
    for l in manifest["layers"].as_array().expect("layers") {
        let data = blob(l["digest"].as_str().expect("digest"));
        let mut ar = tar::Archive::new(flate2::read::MultiGzDecoder::new(&data[..]));
        for e in ar.entries().expect("tar") {
            let mut e = e.expect("entry");
            let path = e.path().expect("path").to_string_lossy().into_owned();
            if path.trim_start_matches("./") == "bin/busybox"
                && e.header().entry_type() == tar::EntryType::Regular
            {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut bytes).expect("read");
                let mut md5 = Command::new("md5sum")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("md5sum");
                std::io::Write::write_all(&mut md5.stdin.take().expect("stdin"), &bytes)
                    .expect("md5sum stdin");
                let out = md5.wait_with_output().expect("md5sum");
                return String::from_utf8_lossy(&out.stdout).trim().to_string();
            }
        }
    }
    panic!("no bin/busybox in busybox-esgz");
}

#[test]
fn ctr_run_through_a_faulty_registry_prints_right_or_fails_cleanly() {
    let reg =
        TestRegistry::start_in_bed(&[Component::Registry, Component::Containerd]).expect("bed");
    let direct = reg.bed().push_image("busybox-esgz").expect("push");
    let want = busybox_md5();
    // containerd and tarn both reach the image through the proxy; the first
    // blob requests (the config, the layers' tails and TOCs) are clean so
    // the pull is lazy, and the reads of the run meet the faults.
    let proxy = FaultProxy::start(&reg.host(), 0.3, 6);
    let reference = direct.replacen(&reg.host(), &proxy.addr, 1);
    let config = format!("[registry]\nplain_http = [\"{}\"]\n", proxy.addr);
    let tarn = Daemon::start_with(Some(reg.bed().dir().join("tarn.sock")), &config)
        .expect("start tarn-snapshotter");
    let out = Command::new("ctr-remote")
        .arg("--address")
        .arg(reg.bed().containerd_sock().expect("containerd"))
        .args([
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "tarn",
            &reference,
        ])
        .output()
        .expect("ctr-remote");
    eprintln!(
        "rpull through faults: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let mut bad = Vec::new();
    let mut right = 0;
    for i in 0..3 {
        let (tx, rx) = std::sync::mpsc::channel();
        let (ctr_sock, reference) = (
            reg.bed().containerd_sock().expect("containerd").to_owned(),
            reference.clone(),
        );
        std::thread::spawn(move || {
            let out = Command::new("ctr")
                .args([
                    "--address",
                    &ctr_sock,
                    "run",
                    "--rm",
                    "--snapshotter",
                    "tarn",
                ])
                .arg(&reference)
                .arg(format!("faulty{i}"))
                .args(["/bin/sh", "-c", "echo start; md5sum /bin/busybox; echo end"])
                .output();
            let _ = tx.send(out);
        });
        let Ok(out) = rx.recv_timeout(READ_BOUND) else {
            bad.push(format!("ctr run {i} still running after {READ_BOUND:?}"));
            continue;
        };
        let out = out.expect("ctr");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("ctr run {i}: {}: {stdout:?}", out.status);
        if out.status.success() {
            let sum = stdout.lines().find(|l| l.contains("/bin/busybox"));
            let sum = sum.and_then(|l| l.split_whitespace().next());
            if stdout.contains("end") && sum == want.split_whitespace().next() {
                right += 1;
            } else {
                bad.push(format!(
                    "ctr run {i} succeeded with WRONG output {stdout:?} (want {want})"
                ));
            }
        } else if let Some(sum) = stdout.lines().find(|l| l.contains("/bin/busybox"))
            && sum.split_whitespace().next() != want.split_whitespace().next()
        {
            bad.push(format!("ctr run {i} printed a wrong sum: {sum}"));
        }
    }
    eprintln!(
        "seed {}: {right} of 3 runs right; {} faults injected",
        seed(),
        proxy.faults().len()
    );
    assert!(
        Path::new(&format!("/proc/{}", tarn.pid().expect("pid"))).exists(),
        "the daemon is still up"
    );
    drop(tarn);
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
