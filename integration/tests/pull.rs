//! `tarn pull` against a real registry and containerd 1.6: ordinary images
//! pull and run, errors are one line with a non-zero exit, and concurrent
//! pulls of one reference cost about one pull at the registry.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use tarn_integration::bins;
use tarn_integration::registry::free_port;
use tarn_integration::testbed::{Component, Testbed};

/// Snapshotter the pulls unpack into.
const SNAPSHOTTER: &str = "overlayfs";

/// A registry and a containerd of the test bed, stopped and deleted on drop.
struct Bed {
    bed: Testbed,
    sock: PathBuf,
}

impl Bed {
    fn up() -> Bed {
        let bed = Testbed::up(&[Component::Registry, Component::Containerd]).expect("test bed up");
        let sock = PathBuf::from(bed.containerd_sock().expect("containerd socket"));
        Bed { bed, sock }
    }

    fn host(&self) -> String {
        self.bed.registry().expect("registry address").to_owned()
    }

    /// Builds a two-layer busybox image with umoci and pushes it as `repo:1`.
    /// Returns the bytes of its blobs and manifest (what one pull fetches).
    fn push_busybox(&self, repo: &str) -> u64 {
        let d = self.bed.dir().join(format!("img-{repo}"));
        let l1 = d.join("l1/bin");
        let l2 = d.join("l2/etc");
        std::fs::create_dir_all(&l1).expect("mkdir layer 1");
        std::fs::create_dir_all(&l2).expect("mkdir layer 2");
        std::fs::copy("/bin/busybox", l1.join("busybox")).expect("copy busybox-static");
        for a in ["sh", "cat", "echo"] {
            std::os::unix::fs::symlink("busybox", l1.join(a)).expect("applet link");
        }
        std::fs::write(l2.join("greeting"), format!("hello from {repo}\n"))
            .expect("write greeting");
        let layout = format!("{}:img", d.join("oci").display());
        run_ok(
            Command::new("umoci")
                .args(["init", "--layout"])
                .arg(d.join("oci")),
        );
        run_ok(Command::new("umoci").args(["new", "--image", &layout]));
        for l in ["l1", "l2"] {
            run_ok(
                Command::new("umoci")
                    .args(["insert", "--image", &layout])
                    .arg(d.join(l))
                    .arg("/"),
            );
        }
        run_ok(Command::new("umoci").args([
            "config",
            "--image",
            &layout,
            "--config.cmd",
            "/bin/sh",
        ]));
        run_ok(Command::new("skopeo").args([
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{layout}"),
            &format!("docker://{}/{repo}:1", self.host()),
        ]));
        // Sum blob sizes from the layout: manifest + config + layers.
        let blobs = d.join("oci/blobs/sha256");
        let manifest_digest = {
            let idx: serde_json::Value = serde_json::from_slice(
                &std::fs::read(d.join("oci/index.json")).expect("read index"),
            )
            .expect("index json");
            idx["manifests"][0]["digest"]
                .as_str()
                .expect("manifest digest")
                .trim_start_matches("sha256:")
                .to_string()
        };
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(blobs.join(&manifest_digest)).expect("read manifest"),
        )
        .expect("manifest json");
        let mut total = std::fs::metadata(blobs.join(&manifest_digest))
            .expect("manifest size")
            .len();
        total += manifest["config"]["size"].as_u64().expect("config size");
        for l in manifest["layers"].as_array().expect("layers") {
            total += l["size"].as_u64().expect("layer size");
        }
        total
    }

    fn pull_cmd(&self, reference: &str) -> Command {
        let mut c = Command::new(bins::tarn().expect("tarn built"));
        c.arg("pull").arg("--address").arg(&self.sock).args([
            "--snapshotter",
            SNAPSHOTTER,
            reference,
        ]);
        c
    }

    /// Bytes the registry has served for GETs since it started.
    fn registry_bytes_served(&self) -> u64 {
        let log = self.bed.registry_log().expect("read registry log");
        log.iter()
            .filter(|r| r.method == "GET")
            .map(|r| r.bytes)
            .sum()
    }

    /// What `/etc/greeting` says in a container `id` of `reference`.
    fn greeting(&self, reference: &str, id: &str) -> String {
        let run = run_ok(self.ctr().args([
            "run",
            "--rm",
            "--snapshotter",
            SNAPSHOTTER,
            reference,
            id,
            "cat",
            "/etc/greeting",
        ]));
        String::from_utf8_lossy(&run.stdout).into_owned()
    }

    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.sock);
        c
    }
}

fn run_ok(c: &mut Command) -> Output {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A failed pull: non-zero exit, and stderr is exactly one `tarn: ...` line.
fn assert_one_line_error(out: &Output, expect: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pull should fail; stderr: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "error is not one line: {err}"
    );
    assert!(err.starts_with("tarn: "), "{err}");
    assert!(
        err.contains(expect),
        "error {err:?} does not mention {expect:?}"
    );
}

#[test]
fn ordinary_image_pulls_and_runs() {
    let bed = Bed::up();
    bed.push_busybox("plain");
    let reference = format!("{}/plain:1", bed.host());
    let out = run_ok(&mut bed.pull_cmd(&reference));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Not a terminal: one plain line per layer state, then the summary.
    assert!(stdout.contains("layer 1/2"), "{stdout}");
    assert!(stdout.contains("2 unpacked"), "{stdout}");

    let images = run_ok(bed.ctr().args(["images", "ls", "-q"]));
    assert!(
        String::from_utf8_lossy(&images.stdout)
            .lines()
            .any(|l| l == reference)
    );
    assert_eq!(bed.greeting(&reference, "pull-run-2"), "hello from plain\n");

    // A second pull finds everything in place and downloads nothing.
    let before = bed.registry_bytes_served();
    let again = run_ok(&mut bed.pull_cmd(&reference));
    assert!(String::from_utf8_lossy(&again.stdout).contains("is up to date"));
    let manifest_only = bed.registry_bytes_served() - before;
    assert!(
        manifest_only < 4096,
        "repeat pull fetched {manifest_only} bytes"
    );
    // The pull's lease is gone: nothing pins content beyond the image.
    let leases = run_ok(bed.ctr().args(["leases", "ls", "-q"]));
    assert_eq!(String::from_utf8_lossy(&leases.stdout).trim(), "");
}

#[test]
fn bad_input_gives_one_line_errors() {
    let bed = Bed::up();
    bed.push_busybox("exists");
    let missing = bed
        .pull_cmd(&format!("{}/nosuch:1", bed.host()))
        .output()
        .expect("run tarn");
    assert_one_line_error(&missing, "nosuch");
    let bad = bed.pull_cmd("Not A Reference").output().expect("run tarn");
    assert_one_line_error(&bad, "invalid image reference");
    let unreachable = bed
        .pull_cmd(&format!(
            "127.0.0.1:{}/exists:1",
            free_port().expect("free port")
        ))
        .output()
        .expect("run tarn");
    assert_one_line_error(&unreachable, "cannot resolve");
    let no_ctd = Command::new(bins::tarn().expect("tarn built"))
        .args([
            "pull",
            "--address",
            "/nonexistent/containerd.sock",
            &format!("{}/exists:1", bed.host()),
        ])
        .output()
        .expect("run tarn");
    assert_one_line_error(&no_ctd, "containerd socket");
    let no_snap = Command::new(bins::tarn().expect("tarn built"))
        .arg("pull")
        .arg("--address")
        .arg(&bed.sock)
        .args([
            "--snapshotter",
            "nosuch",
            &format!("{}/exists:1", bed.host()),
        ])
        .output()
        .expect("run tarn");
    assert_one_line_error(&no_snap, "snapshotter \"nosuch\"");
    // Nothing was created by the failed pulls.
    let images = run_ok(bed.ctr().args(["images", "ls", "-q"]));
    assert_eq!(String::from_utf8_lossy(&images.stdout).trim(), "");
}

#[test]
fn concurrent_pulls_of_one_reference_cost_one_pull() {
    let bed = Bed::up();
    let one_pull = bed.push_busybox("shared");
    let reference = format!("{}/shared:1", bed.host());
    let before = bed.registry_bytes_served();
    let children: Vec<Child> = (0..5)
        .map(|_| {
            bed.pull_cmd(&reference)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start tarn pull")
        })
        .collect();
    let mut joined = 0;
    for c in children {
        let out = c.wait_with_output().expect("wait for tarn pull");
        assert!(
            out.status.success(),
            "a concurrent pull failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        if stdout.contains("pulled by a concurrent tarn pull") {
            joined += 1;
        } else {
            assert!(
                stdout.contains("pulled ") || stdout.contains("is up to date"),
                "{stdout}"
            );
        }
    }
    // The pull takes far longer than starting five: some find it in flight.
    assert!(joined >= 1, "no pull joined the one in flight");
    let served = bed.registry_bytes_served() - before;
    // One pull's blobs, plus the manifest of each pull that came after the
    // first ended; one that joined fetches nothing.
    assert!(
        served as f64 <= one_pull as f64 * 1.05,
        "5 pulls fetched {served} bytes; one pull is {one_pull}"
    );
    assert!(
        served >= one_pull,
        "registry log undercounts: {served} < {one_pull}"
    );
    assert_eq!(bed.greeting(&reference, "pull-conc"), "hello from shared\n");
}

/// The lock file `tarn pull` takes for `reference` on `bed`'s containerd
/// (cli/src/pull/lock.rs names it so).
fn pull_lock_path(bed: &Bed, reference: &str) -> PathBuf {
    use sha2::Digest as _;
    let run = Path::new("/run/tarn/pull-locks");
    let dir = if std::fs::create_dir_all(run).is_ok() {
        run.to_path_buf()
    } else {
        std::env::temp_dir().join("tarn-pull-locks")
    };
    let key = format!("{}\ndefault\n{reference}", bed.sock.display());
    let hex: String = sha2::Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    dir.join(format!("{hex}.lock"))
}

#[test]
fn a_pull_that_waited_for_a_failed_pull_pulls_itself() {
    use std::io::BufRead as _;
    let bed = Bed::up();
    bed.push_busybox("orphan");
    let reference = format!("{}/orphan:1", bed.host());
    // A pull in flight: it holds the lock and, like every holder, has
    // cleared the record of the one before.
    let path = pull_lock_path(&bed, &reference);
    std::fs::create_dir_all(path.parent().expect("lock dir")).expect("mkdir lock dir");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .expect("open pull lock");
    let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("lock {}: {e}", path.display()));

    let mut child = bed
        .pull_cmd(&reference)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tarn pull");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("read tarn pull output");
    assert!(
        first.starts_with("waiting for another tarn pull"),
        "{first}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        matches!(child.try_wait(), Ok(None)),
        "the pull ended while another held the lock"
    );
    // That pull fails: it ends without a record.
    drop(held);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("read tarn pull output");
    let status = child.wait().expect("wait for tarn pull");
    assert!(
        status.success(),
        "the pull after a failed one failed: {rest}"
    );
    assert!(
        rest.contains("pulled ") && rest.contains("2 unpacked"),
        "{rest}"
    );
    assert_eq!(
        bed.greeting(&reference, "pull-orphan"),
        "hello from orphan\n"
    );
}

#[test]
fn concurrent_pulls_of_two_tags_sharing_blobs_all_succeed() {
    // Different references take different pull locks, so their writes of the
    // same blobs meet in containerd's content store: the losers must wait for
    // the winner's write instead of failing on the locked ref.
    let bed = Bed::up();
    bed.push_busybox("twins");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        &format!("docker://{}/twins:1", bed.host()),
        &format!("docker://{}/twins:2", bed.host()),
    ]));
    let children: Vec<Child> = (0..6)
        .map(|i| {
            let reference = format!("{}/twins:{}", bed.host(), 1 + i % 2);
            bed.pull_cmd(&reference)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start tarn pull")
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().expect("wait for tarn pull");
        assert!(
            out.status.success(),
            "a concurrent pull failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for tag in ["1", "2"] {
        let reference = format!("{}/twins:{tag}", bed.host());
        let id = format!("pull-twins-{tag}");
        assert_eq!(bed.greeting(&reference, &id), "hello from twins\n");
    }
}
