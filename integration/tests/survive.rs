//! Issue 14's acceptance: a running container never notices tarn
//! restarting (SIGTERM), crashing (SIGKILL) or being upgraded
//! (`--takeover` by another copy of the binary), because every lazy mount's
//! FUSE connection is kept by the holder and adopted by the next daemon.
//!
//! A container on the lazily pulled `python-esgz` reads a different,
//! not-yet-read file every 0.2 s (and re-reads one it read before), hashes
//! it and logs the hash and how long the read took (measured inside the
//! container, from /proc/uptime). Meanwhile the test restarts the daemon 5
//! times with SIGTERM, kills it 5 times with SIGKILL and upgrades it once,
//! at varied moments; the registry sits behind `tarn-farproxy` so that
//! reads have bytes on the wire when the daemon dies. Every hash must match
//! the host's copy of the file (the image's python layer is copied from
//! the host's /usr/lib/python3.11), no read may fail, and afterwards no
//! mount, layer directory or held connection may be orphaned.
//!
//! The same for an overlaybd image (the reference tools' fixture): its
//! disks (FUSE file, loop device, ext4 tree) stay in place across every
//! restart, crash and upgrade, and nothing of them stays once the image
//! and the reader are gone.
//!
//! The real registry and containerd of `scripts/testbed.sh`, tarn as
//! containerd's proxy plugin `tarn`. Needs the binaries in `$TARN_BIN_DIR`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use sha2::{Digest as _, Sha256};
use tarn_integration::daemon::Daemon;
use tarn_integration::testbed::{Component, Testbed};
use tarn_integration::wait::wait_until;
use tarn_snapshotter::holder::{Holder, PID_FILE, SOCKET_NAME};

/// Failure bound for waits on containerd, the daemon and the workload.
const PATIENCE: Duration = Duration::from_secs(60);
/// The reader container's id.
/// Where the files the reader reads come from, on the host and in the image.
const SOURCE: &str = "/usr/lib/python3.11";
/// Far enough that a miss keeps bytes on the wire for a while.
const RTT_MS: u64 = 40;
const RATE_MBIT: f64 = 40.0;

#[derive(Clone, Copy, Debug)]
enum Action {
    Term,
    Kill,
    Upgrade,
}

/// The order of the run: interleaved, so each kind meets the others' aftermath.
const PLAN: [Action; 11] = [
    Action::Term,
    Action::Kill,
    Action::Term,
    Action::Kill,
    Action::Kill,
    Action::Term,
    Action::Upgrade,
    Action::Kill,
    Action::Term,
    Action::Kill,
    Action::Term,
];

/// The far-registry emulator, killed (by PID) when dropped.
struct FarProxy {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl FarProxy {
    fn start(upstream: &str) -> FarProxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr_file: PathBuf = dir.path().join("addr");
        let child = Command::new(env!("CARGO_BIN_EXE_tarn-farproxy"))
            .args(["--upstream", upstream, "--listen", "127.0.0.1:0"])
            .args(["--rtt-ms", &RTT_MS.to_string()])
            .args(["--rate-mbit", &RATE_MBIT.to_string()])
            .arg("--addr-file")
            .arg(&addr_file)
            .spawn()
            .expect("starting tarn-farproxy");
        let mut proxy = FarProxy {
            child,
            addr: String::new(),
            _dir: dir,
        };
        proxy.addr = wait_until("tarn-farproxy to listen", Duration::from_secs(10), || {
            let addr = std::fs::read_to_string(&addr_file).unwrap_or_default();
            let addr = addr.trim();
            (!addr.is_empty()).then(|| addr.to_owned())
        })
        .expect("tarn-farproxy started");
        proxy
    }
}

impl Drop for FarProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Fields drop in order: the reader, tarn (then its holder), the proxy, the bed.
struct Bed {
    /// The reading container's id: one per test, as runc's state is the
    /// host's and the tests of this file run side by side.
    reader: String,
    tarn: Daemon,
    proxy: FarProxy,
    bed: Testbed,
    work: tempfile::TempDir,
    /// The daemon's `metrics_address`.
    metrics: std::net::SocketAddr,
}

impl Bed {
    fn up(extra: &str, label: &str) -> Bed {
        let bed = Testbed::up(&[Component::Registry, Component::Containerd]).expect("test bed up");
        let proxy = FarProxy::start(bed.registry().expect("registry"));
        let metrics = tarn_integration::scrape::free_addr().expect("a free port");
        let config = format!(
            "metrics_address = \"{metrics}\"\n[registry]\nplain_http = [\"{}\"]\n[snapshotter]\nshutdown_grace_secs = 2\nholder = true\n{extra}",
            proxy.addr
        );
        let tarn = Daemon::start_with(Some(bed.dir().join("tarn.sock")), &config)
            .expect("start tarn-snapshotter");
        let work = tempfile::Builder::new()
            .prefix("tarn-survive-")
            .tempdir_in("/tmp")
            .expect("work dir");
        Bed {
            reader: format!("survive-reader-{label}"),
            tarn,
            proxy,
            bed,
            work,
            metrics,
        }
    }

    /// `tarn_takeovers_total` of the daemon serving now: the layers and
    /// disks it took over from the one before it.
    fn takeovers(&self) -> u64 {
        wait_until("the metrics endpoint", PATIENCE, || {
            tarn_integration::scrape::series(self.metrics, "tarn_takeovers_total")
        })
        .unwrap_or_else(|e| panic!("{e}; tarn log:\n{}", self.tarn.log()))
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.bed.ctr(args).expect("run ctr")
    }

    /// Pushes `name` and pulls it lazily through the far proxy.
    fn rpull(&self, name: &str) -> String {
        self.bed.push_image(name).expect("push image");
        let reference = format!("{}/{name}:latest", self.proxy.addr);
        self.rpull_ref(&reference);
        reference
    }

    /// Pulls `reference` (an image the registry has) lazily.
    fn rpull_ref(&self, reference: &str) {
        // containerd's proxy client may have dialled tarn.sock before the
        // daemon listened (or while it restarted) and backs off for a few
        // seconds: only that error is retried.
        let mut last = String::new();
        let pulled = wait_until("rpull to succeed", PATIENCE, || {
            let out = Command::new("ctr-remote")
                .arg("--address")
                .arg(self.bed.containerd_sock().expect("containerd"))
                .args(["image", "rpull", "--plain-http", "--snapshotter", "tarn"])
                .arg(reference)
                .output()
                .expect("ctr-remote");
            last = text(&out.stderr);
            (out.status.success() || !last.contains("tarn.sock")).then_some(out.status.success())
        });
        assert_eq!(pulled.ok(), Some(true), "rpull: {last}");
    }

    /// `ctr run --rm`, retried while containerd's proxy client reconnects.
    fn run(&self, reference: &str, id: &str, cmd: &[&str]) -> String {
        let mut args = vec!["run", "--rm", "--snapshotter", "tarn", reference, id];
        args.extend_from_slice(cmd);
        let mut last = None;
        let ran = wait_until("ctr run to succeed", PATIENCE, || {
            let out = self.ctr(&args);
            let ok = out.status.success();
            if !ok {
                let _ = self.ctr(&["container", "rm", id]);
            }
            last = Some(out);
            ok.then_some(())
        });
        let out = last.expect("ran at least once");
        if let Err(e) = ran {
            panic!("{e}: {}\ntarn log:\n{}", text(&out.stderr), self.tarn.log());
        }
        text(&out.stdout)
    }

    /// `run`, until the output holds `want`: containerd 1.6's `ctr run`
    /// now and then loses the output of a container that exits at once
    /// (exit 0, nothing printed), which says nothing of tarn. A few
    /// attempts, each its own container; every output is shown if none
    /// holds `want`.
    fn run_expecting(&self, reference: &str, id: &str, cmd: &[&str], want: &str) {
        let mut outs = Vec::new();
        for attempt in 0..3 {
            let out = self.run(reference, &format!("{id}-{attempt}"), cmd);
            if out.contains(want) {
                return;
            }
            outs.push(out);
        }
        panic!("{id}: no run printed {want:?}: {outs:?}");
    }

    fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(self.work.path().join("log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until the workload logged `more` reads past `from`.
    fn wait_reads(&self, from: usize, more: usize) -> usize {
        wait_until("the reader to read on", PATIENCE, || {
            let n = self.log_lines().len();
            (n >= from + more).then_some(n)
        })
        .unwrap_or_else(|e| panic!("{e}; tarn log:\n{}", self.tarn.log()))
    }

    fn holder(&self) -> Holder {
        Holder::new(
            self.tarn.root().join(SOCKET_NAME),
            PathBuf::from("/nonexistent"),
        )
    }

    fn remove_reader(&self) {
        let reader = self.reader.as_str();
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", reader]);
        let _ = wait_until("the reader to stop", PATIENCE, || {
            let out = self.ctr(&["task", "ls"]);
            (!text(&out.stdout)
                .lines()
                .any(|l| l.contains(reader) && !l.contains("STOPPED")))
            .then_some(())
        });
        let _ = self.ctr(&["task", "rm", "-f", reader]);
        let _ = wait_until("the reader container to go", PATIENCE, || {
            self.ctr(&["container", "rm", reader]);
            let out = self.ctr(&["container", "ls", "-q"]);
            (!text(&out.stdout).contains(reader)).then_some(())
        });
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if self.tarn.pid().is_some() {
            self.remove_reader();
        }
        // Only the holder this test's daemon started, by its pid.
        if let Some(pid) = self.tarn.holder_pid() {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Regular files under [`SOURCE`] with their sha256, in a fixed shuffled
/// order (so consecutive reads are not neighbours in the blob).
fn source_files(max: usize) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut dirs = vec![PathBuf::from(SOURCE)];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("read source dir").flatten() {
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                dirs.push(e.path());
            } else if ft.is_file() {
                files.push(e.path());
            }
        }
    }
    files.sort();
    // A fixed stride through the sorted list: spread over the blob.
    let n = files.len();
    let stride = 97;
    let picked: Vec<PathBuf> = (0..n.min(max))
        .map(|i| files[(i * stride) % n].clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    picked
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains(char::is_whitespace))
        .map(|p| {
            let mut f = std::fs::File::open(&p).expect("open source file");
            let mut h = Sha256::new();
            let mut buf = vec![0; 1 << 16];
            loop {
                let k = f.read(&mut buf).expect("read source file");
                if k == 0 {
                    break;
                }
                h.update(&buf[..k]);
            }
            let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            (p.to_string_lossy().into_owned(), hex)
        })
        .collect()
}

const WORKLOAD: &str = r#"#!/bin/sh
# One new file, then one read before, every 0.2 s; each logged as
# "N new|old START END HASH PATH" with /proc/uptime stamps (10 ms).
n=0
while read -r f; do
  [ -e /w/stop ] && break
  read a _ < /proc/uptime
  h=$(sha256sum "$f" 2>>/w/err) || h=FAIL
  read b _ < /proc/uptime
  echo "$n new $a $b ${h%% *} $f" >> /w/log
  g=$(sed -n "$(( n / 2 + 1 ))p" /w/files)
  read a _ < /proc/uptime
  h=$(sha256sum "$g" 2>>/w/err) || h=FAIL
  read b _ < /proc/uptime
  echo "$n old $a $b ${h%% *} $g" >> /w/log
  n=$((n + 1))
  sleep 0.2
done < /w/files
echo done >> /w/done
sleep 3600
"#;

/// One logged read.
struct Read1 {
    start: f64,
    end: f64,
    hash: String,
    path: String,
}

fn parse(lines: &[String]) -> Vec<Read1> {
    lines
        .iter()
        .filter_map(|l| {
            let f: Vec<&str> = l.splitn(6, ' ').collect();
            Some(Read1 {
                start: f.get(2)?.parse().ok()?,
                end: f.get(3)?.parse().ok()?,
                hash: (*f.get(4)?).to_owned(),
                path: (*f.get(5)?).to_owned(),
            })
        })
        .collect()
}

/// Mountpoints of tarn's FUSE mounts under `dir`.
fn tarn_mounts_under(dir: &Path) -> BTreeSet<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let path = PathBuf::from(left.split(' ').nth(4)?);
            let mut right = right.split(' ');
            let (fstype, source) = (right.next()?, right.next()?);
            (fstype.starts_with("fuse") && source.starts_with("tarn:") && path.starts_with(dir))
                .then_some(path)
        })
        .collect()
}

/// Runs the plan against a reader container and checks every read; returns
/// the bed for the checks after the run.
fn survive(extra_config: &str, label: &str) -> Bed {
    let b = Bed::up(extra_config, label);
    let image = b.rpull("python-esgz");
    let files = source_files(400);
    let expected: BTreeMap<&str, &str> = files
        .iter()
        .map(|(p, h)| (p.as_str(), h.as_str()))
        .collect();
    let seen = b.start_reader(&image, &files, WORKLOAD);
    let mut b = b;
    run_plan(&mut b, label, &image, seen, |_| {}, &["echo", "new"], "new");
    // A new lazy pull after all that.
    let other = b.rpull("busybox-esgz");
    b.run_expecting(
        &other,
        &format!("survive-{label}-pull"),
        &["echo", "pulled"],
        "pulled",
    );
    b.wait_reads(b.log_lines().len(), 4);
    check_reads(&b, label, &expected);
    b
}

impl Bed {
    /// Starts the reader container on `image` running `workload` over
    /// `files`, and waits for its first reads; returns how many it logged.
    fn start_reader(&self, image: &str, files: &[(String, String)], workload: &str) -> usize {
        let list: String = files.iter().map(|(p, _)| format!("{p}\n")).collect();
        std::fs::write(self.work.path().join("files"), list).expect("write file list");
        std::fs::write(self.work.path().join("run.sh"), workload).expect("write workload");
        let mount = format!(
            "type=bind,src={},dst=/w,options=rbind:rw",
            self.work.path().display()
        );
        let out = self.ctr(&[
            "run",
            "-d",
            "--snapshotter",
            "tarn",
            "--mount",
            &mount,
            image,
            &self.reader,
            "sh",
            "/w/run.sh",
        ]);
        assert!(out.status.success(), "ctr run -d: {}", text(&out.stderr));
        self.wait_reads(0, 6)
    }
}

/// Goes through [`PLAN`] (SIGTERM, SIGKILL, an upgrade to another build)
/// while the reader reads, `seen` reads logged so far. `before` runs
/// before each action; after each, a new container of `image` runs `cmd`
/// and must print `want`.
fn run_plan(
    b: &mut Bed,
    label: &str,
    image: &str,
    mut seen: usize,
    before: impl Fn(&Bed),
    cmd: &[&str],
    want: &str,
) {
    // A second build (another version: `make upgrade-bin`), started as a
    // new program with `--takeover`.
    let built = tarn_integration::bins::snapshotter().expect("binary");
    let upgrade = tarn_integration::bins::upgrade_snapshotter().expect("the upgrade build");
    let version = |bin: &Path| {
        let out = Command::new(bin)
            .arg("--version")
            .output()
            .expect("--version");
        text(&out.stdout).trim().to_owned()
    };
    let (old_version, new_version) = (version(&built), version(&upgrade));
    assert_eq!(
        tarn_integration::daemon::HOLDER_PID_FILE,
        PID_FILE,
        "the harness stops the holder by its pid file"
    );
    assert_ne!(old_version, new_version, "the upgrade is another build");

    for (i, action) in PLAN.iter().enumerate() {
        // Varied moments: after 1 to 3 more reads, then 0 to 180 ms more.
        seen = b.wait_reads(seen, 1 + i % 3);
        before(b);
        std::thread::sleep(Duration::from_millis((i as u64 * 67) % 190));
        match action {
            Action::Term => {
                let st = b.tarn.stop().expect("SIGTERM");
                assert!(st.success(), "exit status {st}:\n{}", b.tarn.log());
                b.tarn.start_again().expect("start again");
            }
            Action::Kill => {
                b.tarn.kill().expect("SIGKILL");
                b.tarn.start_again().expect("start again");
            }
            Action::Upgrade => {
                let st = b.tarn.take_over(&upgrade).expect("upgrade");
                assert!(st.success(), "old daemon's exit {st}:\n{}", b.tarn.log());
                // `--version` prints "tarn-snapshotter VERSION".
                let tag = new_version.rsplit(' ').next().unwrap_or_default();
                assert!(
                    b.tarn
                        .log()
                        .lines()
                        .any(|l| l.contains("tarn-snapshotter starting") && l.contains(tag)),
                    "{new_version} serves after the upgrade:\n{}",
                    b.tarn.log()
                );
            }
        }
        println!("{label}: {action:?} {} done", i + 1);
        // New containers work right after every restart.
        b.run_expecting(image, &format!("survive-{label}-new-{i}"), cmd, want);
    }
}

/// Stops the reader's loop and checks every read it logged: none failed,
/// none gave other bytes than `expected`'s, and it read on throughout.
fn check_reads(b: &Bed, label: &str, expected: &BTreeMap<&str, &str>) {
    std::fs::write(b.work.path().join("stop"), "").expect("stop the reader");
    wait_until("the reader to finish", PATIENCE, || {
        b.work.path().join("done").exists().then_some(())
    })
    .expect("reader done");

    let reads = parse(&b.log_lines());
    let errors = std::fs::read_to_string(b.work.path().join("err")).unwrap_or_default();
    let failed: Vec<&Read1> = reads.iter().filter(|r| r.hash == "FAIL").collect();
    let wrong: Vec<&Read1> = reads
        .iter()
        .filter(|r| r.hash != "FAIL" && expected.get(r.path.as_str()) != Some(&r.hash.as_str()))
        .collect();
    let longest = reads.iter().map(|r| r.end - r.start).fold(0.0, f64::max);
    println!(
        "{label}: {} reads, {} failed, {} wrong, longest read {:.2} s",
        reads.len(),
        failed.len(),
        wrong.len(),
        longest
    );
    assert!(
        failed.is_empty(),
        "{} reads failed (first {:?}): {errors}\ntarn log:\n{}",
        failed.len(),
        failed.first().map(|r| &r.path),
        b.tarn.log()
    );
    assert!(
        wrong.is_empty(),
        "{} reads gave wrong bytes, first {:?}",
        wrong.len(),
        wrong.first().map(|r| &r.path)
    );
    assert!(reads.len() >= 2 * (6 + PLAN.len()), "the reader read on");
}

/// Nothing orphaned: every layer directory has its live mount, every mount
/// is a layer the daemon lists, and the holder keeps exactly those.
fn assert_consistent(b: &Bed) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let layers = rt.block_on(async {
        let mut admin = b.tarn.admin().await.expect("admin client");
        admin
            .list_layers(tarn_proto::admin::ListLayersRequest {})
            .await
            .expect("list layers")
            .into_inner()
            .layers
    });
    let listed: BTreeSet<PathBuf> = layers
        .iter()
        .map(|l| PathBuf::from(&l.mountpoint))
        .collect();
    for l in &layers {
        assert_ne!(
            l.state,
            i32::from(tarn_proto::admin::LayerState::Failed),
            "layer {} failed",
            l.layer_digest
        );
        assert!(l.served_since_unix > 0, "served since is set");
    }
    let mounts = tarn_mounts_under(&b.tarn.root());
    assert_eq!(listed, mounts, "the daemon's layers are exactly the mounts");
    let dirs: BTreeSet<PathBuf> = std::fs::read_dir(b.tarn.root().join("layers"))
        .expect("layers dir")
        .flatten()
        .map(|e| e.path().join("fs"))
        .collect();
    assert_eq!(dirs, mounts, "every layer directory has its mount");
    let held: BTreeSet<PathBuf> = b
        .holder()
        .list()
        .expect("holder list")
        .into_keys()
        .collect();
    assert_eq!(
        held, mounts,
        "the holder keeps exactly the mounts' connections"
    );
    // containerd's view: every remote snapshot's layer is mounted.
    let out = b.ctr(&["snapshots", "--snapshotter", "tarn", "ls"]);
    assert!(out.status.success(), "ctr snapshots ls");
    println!(
        "after the run: {} layers, {} mounts, {} held connections, {} containerd snapshots; takeovers {:?}",
        listed.len(),
        mounts.len(),
        held.len(),
        text(&out.stdout).lines().count().saturating_sub(1),
        layers.iter().map(|l| l.takeovers).collect::<Vec<_>>()
    );
}

#[test]
fn reads_survive_restarts_crashes_and_an_upgrade() {
    let mut b = survive("fuse_passthrough = false\n", "plain");
    assert_consistent(&b);

    // The holder dies too: the next start restores every layer from
    // metadata (new connections), and new containers work; the reader's
    // lazy files are gone (README: "When the holder dies").
    let pid = b.tarn.holder_pid().expect("holder pid");
    kill(pid, Signal::SIGKILL).expect("kill the holder");
    b.tarn.kill().expect("SIGKILL the daemon");
    b.tarn.start_again().expect("start after losing the holder");
    let image = format!("{}/python-esgz:latest", b.proxy.addr);
    b.run_expecting(
        &image,
        "survive-after-holder",
        &["echo", "restored"],
        "restored",
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let layers = rt.block_on(async {
        let mut admin = b.tarn.admin().await.expect("admin client");
        admin
            .list_layers(tarn_proto::admin::ListLayersRequest {})
            .await
            .expect("list layers")
            .into_inner()
            .layers
    });
    assert!(
        layers.iter().all(|l| l.takeovers == 0),
        "restored, not adopted: {:?}",
        layers.iter().map(|l| l.takeovers).collect::<Vec<_>>()
    );
    b.remove_reader();
    assert_consistent(&b);
}

#[test]
fn reads_survive_with_passthrough() {
    let b = survive("fuse_passthrough = true\n", "passthrough");
    assert_consistent(&b);
}

#[test]
fn reads_survive_with_background_fetch() {
    let b = survive(
        "fuse_passthrough = true\n[fetch]\nbackground = true\n",
        "background",
    );
    assert_consistent(&b);
}

/// The overlaybd reader: every file of the list in turn, one every 0.2 s,
/// round after round until /w/stop; each logged as "N obd START END HASH
/// PATH". Only what the fixture's busybox has (`[` is the shell's).
const OBD_WORKLOAD: &str = r#"#!/bin/sh
n=0
while [ ! -e /w/stop ]; do
  while read -r f; do
    read a _ < /proc/uptime
    h=$(sha256sum "$f" 2>>/w/err) || h=FAIL
    read b _ < /proc/uptime
    echo "$n obd $a $b ${h%% *} $f" >> /w/log
    n=$((n + 1))
    sleep 0.2
  done < /w/files
done
echo done >> /w/done
sleep 3600
"#;

/// The fixture's regular files (path in the image, sha256), as its
/// `expected-sha256.txt` lists them; not those under /etc, which a
/// runtime may mount over.
fn fixture_files() -> Vec<(String, String)> {
    let listed = std::fs::read_to_string(
        tarn_integration::testbed::overlaybd_fixtures().join("expected-sha256.txt"),
    )
    .expect("expected-sha256.txt");
    listed
        .lines()
        .filter_map(|l| {
            let (hash, path) = l.split_once("  ")?;
            Some((path.trim_start_matches('.').to_owned(), hash.to_owned()))
        })
        .filter(|(path, _)| !path.starts_with("/etc/"))
        .collect()
}

/// The overlaybd disks under the daemon's root: each `ROOT/layers/<key>`
/// with a `disk` directory.
fn disk_dirs(root: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(root.join("layers"))
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| p.join("disk").is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// Drops the page cache of every disk's file and of the `files` in its
/// tree, so that the reader's next reads go down to tarn (ext4, loop
/// device, FUSE file) instead of being answered from memory across the
/// restart. `dd iflag=nocache count=0` is posix_fadvise(DONTNEED) on the
/// whole file.
fn drop_disk_caches(root: &Path, files: &[(String, String)]) {
    for dir in disk_dirs(root) {
        let mut targets = vec![dir.join("disk/disk")];
        targets.extend(
            files
                .iter()
                .map(|(p, _)| dir.join("fs").join(p.trim_start_matches('/'))),
        );
        for t in targets.iter().filter(|t| t.is_file()) {
            let out = Command::new("dd")
                .arg(format!("if={}", t.display()))
                .args(["iflag=nocache", "count=0", "status=none"])
                .output()
                .expect("run dd");
            assert!(
                out.status.success(),
                "dd {}: {}",
                t.display(),
                text(&out.stderr)
            );
        }
    }
}

/// Sources of loop devices attached to a file under `root` (from sysfs).
fn loops_under(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .map(|b| PathBuf::from(b.trim_end()))
        .filter(|b| b.starts_with(root))
        .collect()
}

/// (mountpoint, type, source) of every mount under `root`.
fn mounts_under(root: &Path) -> Vec<(PathBuf, String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let path = PathBuf::from(left.split(' ').nth(4)?);
            let mut right = right.split(' ');
            let (fstype, source) = (right.next()?, right.next()?);
            path.starts_with(root)
                .then(|| (path, fstype.to_owned(), source.to_owned()))
        })
        .collect()
}

/// Every disk is whole and the holder keeps exactly the disks' and the
/// layers' connections: one read-only loop device over each disk file,
/// ext4 from it at the disk's tree, its FUSE file mounted.
fn assert_disks_consistent(b: &Bed, disks: usize) {
    let root = b.tarn.root();
    let dirs = disk_dirs(&root);
    assert_eq!(dirs.len(), disks, "one directory per stack: {dirs:?}");
    let mounts = mounts_under(&root);
    let loops = loops_under(&root);
    for dir in &dirs {
        let file = dir.join("disk/disk");
        assert_eq!(
            loops.iter().filter(|l| **l == file).count(),
            1,
            "one loop device over {}: {loops:?}",
            file.display()
        );
        let at = |p: PathBuf| mounts.iter().filter(|m| m.0 == p).collect::<Vec<_>>();
        let fuse = at(dir.join("disk"));
        assert!(
            fuse.len() == 1 && fuse[0].2.starts_with("tarn-obd-"),
            "the disk file mounted once: {fuse:?}"
        );
        let tree = at(dir.join("fs"));
        assert!(
            tree.len() == 1 && tree[0].1 == "ext4" && tree[0].2.starts_with("/dev/loop"),
            "the tree mounted once: {tree:?}"
        );
    }
    assert_eq!(loops.len(), disks, "no other loop device: {loops:?}");
    let held: BTreeSet<PathBuf> = b
        .holder()
        .list()
        .expect("holder list")
        .into_keys()
        .collect();
    let fuse_mounts: BTreeSet<PathBuf> = mounts
        .iter()
        .filter(|m| m.1.starts_with("fuse"))
        .map(|m| m.0.clone())
        .collect();
    assert_eq!(
        held, fuse_mounts,
        "the holder keeps exactly the FUSE mounts' connections"
    );
}

#[test]
fn overlaybd_reads_survive_restarts_crashes_and_an_upgrade() {
    // On demand only, as overlaybd_containerd.rs: read-ahead along an
    // LSMT file follows write order, not what ext4 reads next.
    let mut b = Bed::up("[fetch]\nspeculate = false\n", "obd");
    let image = b.push_obd();
    let files = fixture_files();
    let expected: BTreeMap<&str, &str> = files
        .iter()
        .map(|(p, h)| (p.as_str(), h.as_str()))
        .collect();
    let seen = b.start_reader(&image, &files, OBD_WORKLOAD);
    // The fixture's three layers: three stacks, each a disk.
    assert_disks_consistent(&b, 3);
    let root = b.tarn.root();
    run_plan(
        &mut b,
        "obd",
        &image,
        seen,
        |_| drop_disk_caches(&root, &files),
        &["/app/run.sh"],
        "hello from overlaybd",
    );
    b.wait_reads(b.log_lines().len(), 4);
    check_reads(&b, "obd", &expected);
    assert!(
        b.tarn.log().contains("overlaybd disk taken over"),
        "the disks were taken over, not mounted again"
    );
    // The plan ends with a restart: the daemon serving now took the
    // three disks over, and counts them.
    assert_eq!(b.takeovers(), 3, "tarn_takeovers_total");
    assert_disks_consistent(&b, 3);

    // The reader and the image gone, nothing of the disks stays: no
    // directory, loop device, mount or held connection.
    b.remove_reader();
    let out = b.ctr(&["image", "rm", "--sync", &image]);
    assert!(out.status.success(), "ctr image rm: {}", text(&out.stderr));
    let leftovers = || {
        let held: Vec<PathBuf> = b
            .holder()
            .list()
            .map(|h| h.into_keys().collect())
            .unwrap_or_default();
        (
            disk_dirs(&root),
            loops_under(&root),
            mounts_under(&root),
            held,
        )
    };
    if let Err(e) = wait_until("containerd's cleanup of the disks", PATIENCE, || {
        let (d, l, m, h) = leftovers();
        (d.is_empty() && l.is_empty() && m.is_empty() && h.is_empty()).then_some(())
    }) {
        panic!("{e}: left {:?}\ntarn log:\n{}", leftovers(), b.tarn.log());
    }
}

impl Bed {
    /// Pushes the overlaybd fixture and pulls it lazily through the far
    /// proxy; its reference there.
    fn push_obd(&self) -> String {
        let pushed =
            tarn_integration::overlaybd::push_fixture(self.bed.registry().expect("registry"));
        let (_, name) = pushed.split_once('/').expect("registry/name");
        let image = format!("{}/{name}", self.proxy.addr);
        self.rpull_ref(&image);
        image
    }
}

/// Runs `cmd`, which must succeed.
fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect("run");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        text(&out.stderr)
    );
}

/// Held disks that are not as the daemon left them when the next one
/// starts (one's tree unmounted by hand, another's covered by a tmpfs)
/// are torn down and mounted afresh: the image runs right, the one left
/// as it was is taken over, and nothing of the old two stays attached.
#[test]
fn overlaybd_disks_not_as_handed_over_are_mounted_afresh() {
    let mut b = Bed::up("[fetch]\nspeculate = false\n", "obdleft");
    let image = b.push_obd();
    let (cmd, want) = (["/app/run.sh"], "hello from overlaybd");
    b.run_expecting(&image, "survive-obdleft-before", &cmd, want);
    assert_disks_consistent(&b, 3);

    // Stopped with the holder: every disk stays, its reads would wait.
    let st = b.tarn.stop().expect("SIGTERM");
    assert!(st.success(), "exit status {st}:\n{}", b.tarn.log());
    let root = b.tarn.root();
    let dirs: Vec<PathBuf> = disk_dirs(&root).into_iter().collect();
    assert_eq!(
        dirs.len(),
        3,
        "the disks stay for the next daemon: {dirs:?}"
    );
    let tree = |d: &PathBuf| d.join("fs").to_str().expect("utf-8 path").to_owned();
    let (bare, covered) = (tree(&dirs[0]), tree(&dirs[1]));
    sh("umount", &["-l", &bare]);
    sh("mount", &["-t", "tmpfs", "tarn-test-cover", &covered]);

    b.tarn.start_again().expect("start again");
    b.run_expecting(&image, "survive-obdleft-after", &cmd, want);
    let log = b.tarn.log();
    assert_eq!(
        log.matches("cannot take over the held overlaybd disk")
            .count(),
        2,
        "the two disks not as left are mounted afresh:\n{log}"
    );
    assert_eq!(b.takeovers(), 1, "the disk left as it was is taken over");
    // One read-only loop device per disk file, one ext4 tree per disk,
    // no tmpfs, the holder keeping exactly the FUSE mounts.
    assert_disks_consistent(&b, 3);
    assert!(
        mounts_under(&root).iter().all(|m| m.1 != "tmpfs"),
        "the cover is gone: {:?}",
        mounts_under(&root)
    );
}
