//! The real `tarn mount-layer` binary as a child process, and registry log
//! arithmetic.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tarn_integration::reglog::Request;
use tarn_integration::wait::wait_until;

/// A bound for a failure message: a mount takes a fraction of it.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// The `tarn` binary of this build (see `tarn_integration::bins`).
pub fn tarn_bin() -> PathBuf {
    tarn_integration::bins::tarn().expect("tarn built")
}

/// Whether `path` is a mount point now (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// A running `tarn mount-layer`. Dropping it kills the process (by PID) and
/// unmounts whatever it left mounted.
pub struct MountLayer {
    child: Option<Child>,
    pub mountpoint: PathBuf,
    out: PathBuf,
    err: PathBuf,
}

/// What a finished `tarn mount-layer` printed.
#[derive(Debug)]
pub struct Exit {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Exit {
    /// (bytes, requests) from the "fetched N bytes in M requests" line.
    pub fn fetched(&self) -> (u64, u64) {
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with("fetched "))
            .expect("a fetched line on exit");
        let w: Vec<&str> = line.split_whitespace().collect();
        (
            w[1].parse().expect("bytes"),
            w[4].parse().expect("requests"),
        )
    }

    /// The verification failures tarn counted.
    pub fn verify_failures(&self) -> u64 {
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with("fetched "))
            .expect("a fetched line on exit");
        let w: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        let i = w
            .iter()
            .position(|w| *w == "verification")
            .expect("verification count");
        w[i - 1].parse().expect("number")
    }
}

impl MountLayer {
    /// Starts `tarn mount-layer ARGS... REF DIGEST MNT --root ROOT`; does not wait.
    pub fn spawn(
        image: &str,
        layer: &str,
        mountpoint: &Path,
        root: &Path,
        extra: &[&str],
    ) -> MountLayer {
        let logs = root.with_extension(format!("log{}", std::process::id()));
        std::fs::create_dir_all(&logs).expect("log dir");
        let n = std::fs::read_dir(&logs).map(|d| d.count()).unwrap_or(0);
        let (out, err) = (logs.join(format!("{n}.out")), logs.join(format!("{n}.err")));
        let child = Command::new(tarn_bin())
            .arg("mount-layer")
            .args(extra)
            .args([image, layer])
            .arg(mountpoint)
            .arg("--root")
            .arg(root)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&err).expect("stderr file"))
            .spawn()
            .expect("starting tarn");
        MountLayer {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            out,
            err,
        }
    }

    /// Starts it and waits until the layer is mounted; panics with tarn's
    /// stderr if it exits first.
    pub fn start(
        image: &str,
        layer: &str,
        mountpoint: &Path,
        root: &Path,
        extra: &[&str],
    ) -> MountLayer {
        let mut m = MountLayer::spawn(image, layer, mountpoint, root, extra);
        wait_until("tarn mount-layer to mount the layer", MOUNT_TIMEOUT, || {
            if let Some(st) = m.child.as_mut().and_then(|c| c.try_wait().expect("wait")) {
                panic!(
                    "tarn mount-layer exited ({st}) before mounting: {}",
                    m.read(&m.err)
                );
            }
            is_mounted(mountpoint).then_some(())
        })
        .expect("mounted");
        m
    }

    fn read(&self, p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| {
            i32::try_from(c.id()).expect("a pid is below pid_max <= 2^22")
        })
    }

    /// Waits for the process to end (as it does on its own after an error).
    /// Whatever it left mounted is then the caller's to unmount.
    pub fn wait(mut self) -> Exit {
        let st = self.child.take().expect("running").wait().expect("wait");
        Exit {
            success: st.success(),
            stdout: self.read(&self.out),
            stderr: self.read(&self.err),
        }
    }

    /// [`MountLayer::wait`] with a failure bound: panics (and the drop
    /// kills the process) if it is still running after `bound`.
    pub fn wait_within(mut self, what: &str, bound: Duration) -> Exit {
        let child = self.child.as_mut().expect("running");
        let st = wait_until(what, bound, || child.try_wait().expect("wait")).unwrap_or_else(|e| {
            panic!(
                "{e}: {}",
                std::fs::read_to_string(&self.err).unwrap_or_default()
            )
        });
        self.child = None;
        Exit {
            success: st.success(),
            stdout: self.read(&self.out),
            stderr: self.read(&self.err),
        }
    }

    /// SIGTERM, then wait: tarn unmounts and prints what it fetched.
    pub fn stop(self) -> Exit {
        self.signal(libc::SIGTERM);
        let exit = self.wait();
        assert!(
            exit.success,
            "tarn exited badly on SIGTERM: {}",
            exit.stderr
        );
        exit
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(self.pid(), sig) };
    }
}

impl Drop for MountLayer {
    fn drop(&mut self) {
        // After `wait`, the caller owns the aftermath (a test may want to
        // unmount a dead mount itself).
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = c.kill();
        let _ = c.wait();
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

/// Blob GETs in a registry log: (requests, bytes written).
pub fn blob_gets(log: &[Request]) -> (u64, u64) {
    log.iter()
        .filter(|r| {
            r.method == "GET" && r.path.contains("/blobs/") && (r.status == 200 || r.status == 206)
        })
        .fold((0, 0), |(n, b), r| (n + 1, b + r.bytes))
}
