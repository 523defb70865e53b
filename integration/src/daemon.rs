//! The real `tarn-snapshotter` as a child a test owns: started with a temp
//! root and sockets, stopped, killed (a crash) and started again on the same
//! root. Tests that only need a running daemon next to containerd and a
//! registry start the whole test bed instead ([`crate::testbed`]); this one
//! is for tests about the daemon's own life (restart, crash, restore), or
//! that put it into a test bed in place of the bed's own (with `address`).
//! Dropping a handle stops its process by PID (SIGTERM, then SIGKILL after
//! a timeout), waits for it, and detaches every mount left under its
//! directory, so a failing test leaves nothing running or mounted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tarn_proto::admin::admin_client::AdminClient;
use tarn_proto::snapshots::snapshots_client::SnapshotsClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::bins;
use crate::wait::wait_until;

/// How long the daemon may take to listen: a bound for a failure message,
/// not an expectation.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `tarn-snapshotter` with its own root and sockets in a temp dir.
pub struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    address: PathBuf,
    /// TOML appended to the daemon's config file (sections of its own).
    config: String,
    /// Environment added to the daemon's (a `PATH` with a credential
    /// helper), on every start.
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts a daemon on a fresh temp dir and waits until its socket answers.
    pub fn start() -> Result<Self> {
        Daemon::start_with(None, "")
    }

    /// Starts a daemon serving on `address` (default: in its temp dir) with
    /// `config` (TOML sections, e.g. `[registry]`) in its config file.
    pub fn start_with(address: Option<PathBuf>, config: &str) -> Result<Self> {
        Daemon::start_with_env(address, config, &[])
    }

    /// [`Daemon::start_with`] with `env` added to the daemon's environment
    /// (kept for restarts).
    pub fn start_with_env(
        address: Option<PathBuf>,
        config: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        // Short paths: overlay mount options are limited to one page.
        let dir = tempfile::Builder::new()
            .prefix("tarn-")
            .tempdir_in("/tmp")
            .context("create daemon temp dir")?;
        let address = address.unwrap_or_else(|| dir.path().join("tarn.sock"));
        let mut d = Daemon {
            dir,
            child: None,
            address,
            config: config.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        d.spawn()?;
        Ok(d)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn address(&self) -> PathBuf {
        self.address.clone()
    }

    pub fn admin_address(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The pid of the holder this daemon started (`ROOT/holder.pid`), if
    /// one runs or ran: it outlives the daemon by design.
    pub fn holder_pid(&self) -> Option<nix::unistd::Pid> {
        let path = self.root().join(HOLDER_PID_FILE);
        let text = std::fs::read_to_string(path).ok()?;
        Some(nix::unistd::Pid::from_raw(text.trim().parse().ok()?))
    }

    fn spawn(&mut self) -> Result<()> {
        let child = self.spawn_program(&bins::snapshotter()?, &[])?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Upgrades the daemon: starts `program` (another build) on the same
    /// root with `--takeover`, which stops the running one; waits for the
    /// old one to exit and the new one to listen. Returns the old one's
    /// exit status.
    pub fn take_over(&mut self, program: &Path) -> Result<ExitStatus> {
        let mut old = self.child.take().context("daemon is not running")?;
        let new = self.spawn_program(program, &["--takeover"])?;
        self.child = Some(new);
        let status = wait_until("the old daemon to exit", START_TIMEOUT, || {
            old.try_wait().transpose()
        });
        let status = match status {
            Ok(s) => s.context("wait for the old daemon")?,
            Err(e) => {
                let _ = old.kill();
                let _ = old.wait();
                bail!("{e}: {}", self.log());
            }
        };
        self.wait_ready()?;
        Ok(status)
    }

    fn spawn_program(&mut self, program: &Path, extra: &[&str]) -> Result<Child> {
        let config = self.dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "admin_address = {:?}\n{}\n",
                self.admin_address(),
                self.config
            ),
        )
        .context("write daemon config")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .context("open daemon log")?;
        Command::new(program)
            .args(extra)
            .arg("--root")
            .arg(self.root())
            .arg("--address")
            .arg(self.address())
            .arg("--config")
            .arg(&config)
            .arg("--log-level")
            .arg("debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("clone log fd")?)
            .stderr(log)
            .spawn()
            .context("spawn tarn-snapshotter")
    }

    fn wait_ready(&mut self) -> Result<()> {
        let address = self.address();
        let child = self.child.as_mut().context("daemon is not running")?;
        let ready = wait_until("tarn-snapshotter to listen", START_TIMEOUT, || {
            if std::os::unix::net::UnixStream::connect(&address).is_ok() {
                return Some(Ok(()));
            }
            match child.try_wait() {
                Ok(None) => None,
                Ok(Some(status)) => Some(Err(anyhow::anyhow!("exited early ({status})"))),
                Err(e) => Some(Err(anyhow::Error::new(e).context("poll daemon"))),
            }
        });
        match ready {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.child = None;
                bail!("tarn-snapshotter: {e:#}: {}", self.log())
            }
            Err(e) => bail!("{e}: {}", self.log()),
        }
    }

    /// The daemon's log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("daemon is not running")?;
        stop_child(&mut child, Duration::from_secs(10))
    }

    /// Waits for the daemon to exit by itself (after a signal the test
    /// sent), failing after `bound`; the process is then the caller's no
    /// more. Returns the exit status.
    pub fn wait_exit(&mut self, bound: Duration) -> Result<ExitStatus> {
        let child = self.child.as_mut().context("daemon is not running")?;
        let status = wait_until("tarn-snapshotter to exit", bound, || {
            child.try_wait().transpose()
        })
        .map_err(anyhow::Error::msg)?
        .context("wait for the daemon")?;
        self.child = None;
        Ok(status)
    }

    /// Stops the daemon gracefully and starts it again on the same root.
    pub fn restart(&mut self) -> Result<ExitStatus> {
        let status = self.stop()?;
        self.spawn()?;
        Ok(status)
    }

    /// SIGKILL and wait: a crash, leaving whatever it had mounted.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let mut child = self.child.take().context("daemon is not running")?;
        child.kill().context("kill daemon")?;
        child.wait().context("wait for killed daemon")
    }

    /// Starts the daemon again (after [`Daemon::kill`] or [`Daemon::stop`]).
    pub fn start_again(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("daemon is running");
        }
        self.spawn()
    }

    /// A client of tarn's admin API.
    pub async fn admin(&self) -> Result<AdminClient<Channel>> {
        Ok(AdminClient::new(unix_channel(&self.admin_address()).await?))
    }

    /// A client of the Snapshots API on the daemon's socket.
    pub async fn client(&self) -> Result<SnapshotsClient<Channel>> {
        Ok(SnapshotsClient::new(unix_channel(&self.address()).await?))
    }
}

/// Where the holder writes its pid under the daemon's root
/// (`tarn_snapshotter::holder::PID_FILE`; survive.rs checks they agree).
pub const HOLDER_PID_FILE: &str = "holder.pid";

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = stop_child(&mut child, Duration::from_secs(10));
        }
        // The holder keeps the lazy mounts' connections past the daemon
        // (`[snapshotter] holder`, on by default): stop the one this
        // daemon started, by its pid, so nothing of the test outlives it.
        if let Some(pid) = self.holder_pid() {
            let _ = kill(pid, Signal::SIGKILL);
        }
        // An overlaybd disk handed to the holder keeps its loop device
        // past the daemon. Detach it while its backing file's path is
        // still under the test's dir (a lazily unmounted FUSE file shows
        // as "/disk" afterwards): a device still mounted gets autoclear
        // and goes with the unmount below.
        detach_loops_under(self.dir.path());
        unmount_under(self.dir.path());
    }
}

/// A tonic channel over a unix socket (the URI is a placeholder tonic
/// requires; the connector ignores it).
pub async fn unix_channel(path: &Path) -> Result<Channel> {
    let path = path.to_owned();
    Endpoint::try_from("http://[::1]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .context("connect to unix socket")
}

/// SIGTERM, wait up to `grace`, then SIGKILL: never leaves a process behind.
pub fn stop_child(child: &mut Child, grace: Duration) -> Result<ExitStatus> {
    let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
    let _ = kill(pid, Signal::SIGTERM);
    match wait_until("the process to exit", grace, || {
        child.try_wait().transpose()
    }) {
        Ok(status) => Ok(status.context("wait for child")?),
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().context("wait for killed child")?;
            bail!("process {pid} ignored SIGTERM for {grace:?} and was killed ({status})");
        }
    }
}

/// Detaches every loop device whose backing file is under `dir` (a
/// device still open is cleared by the kernel when let go).
pub fn detach_loops_under(dir: &Path) {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(back) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        if Path::new(back.trim_end()).starts_with(dir) {
            let dev = Path::new("/dev").join(e.file_name());
            let _ = Command::new("losetup").arg("--detach").arg(dev).output();
        }
    }
}

/// Lazily detaches every mount at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}
