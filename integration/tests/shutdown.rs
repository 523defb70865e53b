//! Issue 13's shutdown acceptance: SIGTERM ends tarn-snapshotter within
//! `shutdown_grace_secs` + 1 s while a running container reads a lazy
//! layer (a busy FUSE mount), leaves no FUSE mount of its own behind, and
//! a restarted daemon serves new containers. Also what the running
//! container sees once the daemon is gone (README: "When tarn stops").
//!
//! The real registry and containerd of `scripts/testbed.sh`, tarn as
//! containerd's proxy plugin `tarn`; `busybox-esgz` from
//! `scripts/images.sh`. Needs the binaries built into `$TARN_BIN_DIR`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tarn_integration::daemon::Daemon;
use tarn_integration::testbed::{Component, Testbed};
use tarn_integration::wait::wait_until;

/// The grace period the daemon is given; the bound checked is this + 1 s.
const GRACE_SECS: u64 = 2;

/// Failure bound for waits on containerd and the daemon (containerd's
/// proxy client backs off after a snapshotter restart).
const PATIENCE: Duration = Duration::from_secs(30);

/// The reader container's id.
const READER: &str = "shutdown-reader";

/// Fields drop in order: the container, tarn, then the bed.
struct Bed {
    tarn: Daemon,
    bed: Testbed,
}

impl Bed {
    fn up() -> Bed {
        let bed = Testbed::up(&[Component::Registry, Component::Containerd]).expect("test bed up");
        let config = format!(
            "[registry]\nplain_http = [\"{}\"]\n[snapshotter]\nshutdown_grace_secs = {GRACE_SECS}\nholder = false\n",
            bed.registry().expect("registry")
        );
        let tarn = Daemon::start_with(Some(bed.dir().join("tarn.sock")), &config)
            .expect("start tarn-snapshotter");
        Bed { tarn, bed }
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.bed.ctr(args).expect("run ctr")
    }

    fn rpull(&self, reference: &str) {
        let out = Command::new("ctr-remote")
            .arg("--address")
            .arg(self.bed.containerd_sock().expect("containerd"))
            .args(["image", "rpull", "--plain-http", "--snapshotter", "tarn"])
            .arg(reference)
            .output()
            .expect("ctr-remote");
        assert!(out.status.success(), "rpull: {}", text(&out.stderr));
    }

    /// `ctr run` retried until containerd's proxy client reconnects.
    fn run(&self, reference: &str, id: &str, cmd: &[&str]) -> String {
        let mut args = vec!["run", "--rm", "--snapshotter", "tarn", reference, id];
        args.extend_from_slice(cmd);
        let mut last = None;
        let ran = wait_until("ctr run to succeed", PATIENCE, || {
            let out = self.ctr(&args);
            let ok = out.status.success();
            last = Some(out);
            ok.then_some(())
        });
        let out = last.expect("ran at least once");
        if let Err(e) = ran {
            panic!("{e}: {}\ntarn log:\n{}", text(&out.stderr), self.tarn.log());
        }
        text(&out.stdout)
    }

    fn fuse_mounts(&self) -> Vec<PathBuf> {
        fuse_mounts_under(&self.tarn.root())
    }

    /// Kills and removes the reader container (its snapshot goes through a
    /// running tarn).
    fn remove_reader(&self) {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", READER]);
        let _ = wait_until("the reader to stop", PATIENCE, || {
            let out = self.ctr(&["task", "ls"]);
            (!text(&out.stdout).contains(READER)
                || text(&out.stdout)
                    .lines()
                    .any(|l| l.contains(READER) && l.contains("STOPPED")))
            .then_some(())
        });
        let _ = self.ctr(&["task", "rm", "-f", READER]);
        let _ = wait_until("the reader container to go", PATIENCE, || {
            self.ctr(&["container", "rm", READER]);
            let out = self.ctr(&["container", "ls", "-q"]);
            (!text(&out.stdout).contains(READER)).then_some(())
        });
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if self.tarn.pid().is_some() {
            self.remove_reader();
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn fuse_mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let fstype = f.get(sep + 1)?;
            let path = PathBuf::from(f.get(4)?);
            fstype.starts_with("fuse").then_some(path)
        })
        .filter(|p| p.starts_with(dir))
        .collect()
}

#[test]
fn sigterm_with_a_busy_lazy_mount_exits_within_the_grace_and_restarts() {
    let mut b = Bed::up();
    let image = b.bed.push_image("busybox-esgz").expect("push image");
    b.rpull(&image);
    assert!(!b.fuse_mounts().is_empty(), "a lazy pull mounts its layers");

    // A container that keeps reading its lazy layer: a busy mount.
    let out = b.ctr(&[
        "run",
        "-d",
        "--snapshotter",
        "tarn",
        &image,
        READER,
        "sh",
        "-c",
        "while :; do cat /bin/busybox >/dev/null; done",
    ]);
    assert!(out.status.success(), "ctr run -d: {}", text(&out.stderr));
    wait_until("the reader to run", PATIENCE, || {
        let out = b.ctr(&["task", "ls"]);
        text(&out.stdout)
            .lines()
            .any(|l| l.contains(READER) && l.contains("RUNNING"))
            .then_some(())
    })
    .expect("reader running");
    let out = b.ctr(&["task", "exec", "--exec-id", "before", READER, "ls", "/bin"]);
    assert!(
        out.status.success(),
        "the container reads its layer: {}",
        text(&out.stderr)
    );

    // SIGTERM: the process must be gone within the grace period + 1 s.
    let pid = b.tarn.pid().expect("running");
    let signalled = Instant::now();
    kill(
        Pid::from_raw(i32::try_from(pid).expect("pid fits")),
        Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let stopped = b.tarn.wait_exit(PATIENCE).expect("tarn exits on SIGTERM");
    let took = signalled.elapsed();
    let bound = Duration::from_secs(GRACE_SECS + 1);
    println!(
        "SIGTERM with a busy lazy mount: exited after {:.2}s (grace {GRACE_SECS}s, bound {:.0}s), {stopped}",
        took.as_secs_f64(),
        bound.as_secs_f64()
    );
    assert!(
        took <= bound,
        "tarn took {took:?} to exit after SIGTERM, over the grace period + 1 s ({bound:?}):\n{}",
        b.tarn.log()
    );
    assert!(
        stopped.success(),
        "exit status {stopped}:\n{}",
        b.tarn.log()
    );
    assert_eq!(
        b.fuse_mounts(),
        Vec::<PathBuf>::new(),
        "no FUSE mount of tarn left on the host"
    );

    // What the running container sees now (the README says it): reads of
    // its lazy layer fail, as the connection died with the daemon.
    let out = b.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "after",
        READER,
        "cat",
        "/bin/busybox",
    ]);
    println!(
        "after the daemon exited, exec in the running container: {} {}",
        out.status,
        text(&out.stderr).trim()
    );
    assert!(
        !out.status.success(),
        "a running container cannot use its lazy layers once tarn is gone"
    );

    // A restarted daemon serves new containers (and cleans up the old one).
    b.tarn.start_again().expect("restart tarn");
    let out = b.run(&image, "shutdown-after", &["echo", "served again"]);
    assert!(out.contains("served again"), "new container ran: {out:?}");
    b.remove_reader();
}
