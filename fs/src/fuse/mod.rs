//! The FUSE adapter: the only code that speaks errno.
//!
//! A layer is served read-only by several worker threads. Cache hits are
//! answered on the worker thread; misses are handed to a tokio runtime and
//! answered when their bytes arrive, so a slow fetch never holds a worker.
//! The layer is immutable, so attributes, entries and page cache live long.
//! Fully cached files are handed to the kernel (see [`passthrough`]).
//! An overlaybd image's stacked disk is served as one file by `disk.rs`
//! ([`mount_disk`]), handed over and adopted ([`adopt_disk`]) as a layer is.
//!
//! A connection can outlive the process serving it: [`MountHandle::connection`]
//! gives its /dev/fuse fd to whoever keeps it (the snapshotter's holder), and
//! a successor process [`adopt`]s it: no new mount, no second INIT, and the
//! requests the predecessor had read but not answered are sent again
//! (`FUSE_NOTIFY_RESEND`). That works because nothing a reply told the
//! kernel depends on the process: node ids and generations are the index's
//! (a pure function of the layer's TOC), file handles are always 0, and the
//! passthrough choices are journaled (`journal.rs`). Every worker of such a
//! connection reads the one fd the holder keeps (no `clone_fd`): a request
//! read on a cloned fd would be failed by the kernel when that fd closes
//! with its process.

mod attr;
mod disk;
mod fs;
mod journal;
mod ops;
mod passthrough;

pub use disk::{DISK_NAME, adopt_disk, mount_disk};
pub use ops::{FuseOps, Op};
pub use passthrough::PassthroughStats;

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::layer::Layer;

/// How a layer is mounted.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// FUSE worker threads (each with its own cloned /dev/fuse fd).
    pub threads: usize,
    /// `allow_other`: let every user (and overlayfs) read the mount.
    pub allow_other: bool,
    /// Shown as the mount's source in /proc/mounts.
    pub fsname: String,
    /// Hand fully cached regular files to the kernel (FUSE passthrough,
    /// Linux >= 6.9) so their reads skip this process. Ignored where the
    /// kernel does not offer it.
    pub passthrough: bool,
    /// Where this connection's passthrough choices are journaled, so that a
    /// process adopting the connection knows them (see [`adopt`]).
    pub journal: Option<PathBuf>,
    /// The connection will be handed over (kept by a holder, adopted by a
    /// successor): every worker then reads the one fd the holder keeps
    /// instead of a clone of its own (see the module docs).
    pub handed_over: bool,
    /// Where the mount's operations are counted and timed; share one
    /// across mounts for daemon-wide figures.
    pub ops: Arc<FuseOps>,
}

/// What the kernel and the first process agreed at FUSE_INIT, which an
/// adopting process must know since it sees no INIT. (Protocol version and
/// max write need no keeping: fuser encodes replies the same for every
/// version, and a read-only layer never gets a write.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// The kernel agreed to FUSE passthrough.
    pub passthrough: bool,
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions {
            threads: 4,
            allow_other: true,
            fsname: "tarn".to_string(),
            passthrough: true,
            journal: None,
            handed_over: false,
            ops: Arc::default(),
        }
    }
}

/// Why a layer could not be mounted or unmounted.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    // The io::Error is in the message, not a `source`, so that a chain
    // printed as one line does not say it twice.
    #[error("mounting at {path}: {error}")]
    Mount { path: PathBuf, error: io::Error },
    #[error("unmounting {path}: {error}")]
    Unmount { path: PathBuf, error: io::Error },
    #[error("adopting the connection of {path}: {error}")]
    Adopt { path: PathBuf, error: io::Error },
}

/// How long [`MountHandle::unmount`] waits for the session to end.
pub const UNMOUNT_WAIT: Duration = Duration::from_secs(2);

/// A mounted layer. Dropping it, or calling [`MountHandle::unmount`],
/// detaches the filesystem; its workers stop once nobody uses it.
pub struct MountHandle {
    mountpoint: PathBuf,
    ended: Arc<SessionEnd>,
    detached: bool,
    passthrough: Arc<passthrough::Counters>,
    conn: Arc<OnceLock<OwnedFd>>,
}

/// What became of a mount's FUSE session after it was detached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// The kernel ended the connection; the workers are gone.
    Ended,
    /// Someone still holds the filesystem (a running container's overlay
    /// keeps its own reference to a lower layer, a process its cwd): the
    /// mount point is gone and the connection lives until they let go, or
    /// until this process exits (then their reads fail with ENOTCONN).
    StillInUse,
}

/// Set when the FUSE session's loop returns: the kernel destroyed the
/// connection (the last user of a detached mount let go, or someone
/// unmounted it from outside).
#[derive(Default)]
struct SessionEnd {
    ended: Mutex<bool>,
    changed: Condvar,
}

/// See [`MountHandle::session_end`].
#[derive(Clone)]
pub struct SessionEnded(Arc<SessionEnd>);

impl SessionEnded {
    /// Blocks until the session ends.
    pub fn wait(&self) {
        self.0.wait(None);
    }
}

impl SessionEnd {
    fn set(&self) {
        *self.ended.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }

    /// Waits until the session ended or `deadline` passed (`None`: no
    /// deadline); true if it ended.
    fn wait(&self, deadline: Option<Instant>) -> bool {
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        while !*ended {
            ended = match deadline {
                None => self.changed.wait(ended).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return false;
                    }
                    self.changed
                        .wait_timeout(ended, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
        true
    }
}

/// Mounts `layer` at `mountpoint`. Reads that miss the cache run on `runtime`,
/// which must outlive the mount and have its I/O and time drivers enabled.
pub fn mount(
    layer: Arc<Layer>,
    mountpoint: &Path,
    runtime: tokio::runtime::Handle,
    options: &MountOptions,
) -> Result<MountHandle, FuseError> {
    let mount_error = |error| FuseError::Mount {
        path: mountpoint.to_path_buf(),
        error,
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName(options.fsname.clone()),
        fuser::MountOption::Subtype("tarn".to_string()),
        // The kernel checks mode bits itself; `access` is then never asked.
        fuser::MountOption::DefaultPermissions,
        // Nothing in a layer is trusted on the host: its setuid bits and
        // device nodes act only through a container's overlay. That holds
        // because overlayfs checks `nodev`/`nosuid` on the overlay's own
        // mount, the path a container opens or executes, not on its lower
        // layers (may_open and the exec path look at the opened path's mount),
        // so an image's device nodes and setuid binaries behave in a container
        // as with containerd's overlayfs snapshotter (checked by
        // integration/tests/mount_options.rs), while opening them
        // through the layer's own mount point on the host is refused.
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::Exec,
    ];
    let config = session_config(config, options);
    let journal = options.journal.as_deref().and_then(|p| {
        journal::Journal::create(p)
            .inspect_err(|e| journal_warning(p, e))
            .ok()
    });
    let parts = Parts::new(&layer, &runtime, journal);
    let fs = fs::LayerFs::new(
        layer,
        runtime,
        options.passthrough,
        parts.passthrough,
        options.ops.clone(),
    );
    let session = fuser::Session::new(fs, mountpoint, &config).map_err(mount_error)?;
    let fd = session.as_fd().try_clone_to_owned().map_err(mount_error)?;
    let _ = parts.conn.set(fd);
    let background = session.spawn().map_err(mount_error)?;
    watch(background, mountpoint, parts.counters, parts.conn).map_err(mount_error)
}

/// Serves `layer` on `fd`, a connection for `mountpoint` that another
/// process initialised (and maybe died serving): no mount, no INIT. The
/// kernel is then asked to send again every request that process read but
/// did not answer (Linux >= 6.9; on older kernels those stay unanswered).
pub fn adopt(
    layer: Arc<Layer>,
    mountpoint: &Path,
    fd: OwnedFd,
    negotiated: Negotiated,
    runtime: tokio::runtime::Handle,
    options: &MountOptions,
) -> Result<MountHandle, FuseError> {
    let adopt_error = |error| FuseError::Adopt {
        path: mountpoint.to_path_buf(),
        error,
    };
    let mut config = session_config(fuser::Config::default(), options);
    // Adopted, it will be handed over again.
    config.clone_fd = false;
    let (journal, inherited) = match options.journal.as_deref().map(journal::Journal::resume) {
        Some(Ok((j, open))) => (Some(j), open),
        Some(Err(e)) => {
            journal_warning(options.journal.as_deref().unwrap_or(mountpoint), &e);
            (None, Default::default())
        }
        None => (None, Default::default()),
    };
    let mut parts = Parts::new(&layer, &runtime, journal);
    if negotiated.passthrough {
        parts.counters.negotiated.store(true, Ordering::Relaxed);
        if options.passthrough {
            parts.passthrough.enable();
        }
    }
    parts.passthrough.inherit(inherited);
    let _ = parts.conn.set(fd.try_clone().map_err(adopt_error)?);
    let fs = fs::LayerFs::new(
        layer,
        runtime,
        options.passthrough,
        parts.passthrough,
        options.ops.clone(),
    );
    let session = fuser::Session::from_initialized_fd(fs, fd, config.acl, config);
    if let Some(conn) = parts.conn.get() {
        resend_or_warn(conn.as_fd(), mountpoint);
    }
    let background = session.spawn().map_err(adopt_error)?;
    watch(background, mountpoint, parts.counters, parts.conn).map_err(adopt_error)
}

/// What a mount and an adoption build alike.
struct Parts {
    counters: Arc<passthrough::Counters>,
    conn: Arc<OnceLock<OwnedFd>>,
    passthrough: passthrough::Passthrough,
}

impl Parts {
    fn new(
        layer: &Arc<Layer>,
        runtime: &tokio::runtime::Handle,
        journal: Option<journal::Journal>,
    ) -> Parts {
        let counters = Arc::new(passthrough::Counters::default());
        let conn = Arc::new(OnceLock::new());
        let passthrough = passthrough::Passthrough::new(
            layer.clone(),
            runtime.clone(),
            counters.clone(),
            conn.clone(),
            journal,
        );
        Parts {
            counters,
            conn,
            passthrough,
        }
    }
}

fn session_config(mut config: fuser::Config, options: &MountOptions) -> fuser::Config {
    if options.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(options.threads.max(1));
    // A clone per worker spreads requests over the kernel's queues; a
    // connection to hand over needs one fd for every worker (module docs).
    config.clone_fd = !options.handed_over;
    config
}

fn journal_warning(path: &Path, e: &io::Error) {
    tracing::warn!(path = %path.display(), error = %e,
        "no passthrough journal; a successor may refuse some opens");
}

/// [`resend`], or a warning that requests in flight stay unanswered.
fn resend_or_warn(fd: BorrowedFd<'_>, mountpoint: &Path) {
    if let Err(e) = resend(fd) {
        tracing::warn!(mountpoint = %mountpoint.display(), error = %e,
            "kernel cannot resend requests in flight (Linux < 6.9?)");
    }
}

/// `FUSE_NOTIFY_RESEND`: the kernel queues again every request it sent
/// and is still waiting on, on any fd of this connection.
fn resend(fd: BorrowedFd<'_>) -> io::Result<()> {
    /// `enum fuse_notify_code` in linux/fuse.h (7.40).
    const FUSE_NOTIFY_RESEND: i32 = 7;
    // struct fuse_out_header { u32 len; i32 error; u64 unique; }: a
    // notification is a header with unique 0 and the code as `error`.
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: `header` is 16 initialised bytes that outlive the call, and
    // `fd` is an open /dev/fuse fd borrowed for its duration.
    let n = unsafe { libc::write(fd.as_raw_fd(), header.as_ptr().cast(), header.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Joins the session on a thread of its own, so that an unmount waits for
/// it with a bound and a caller can wait for its end: a session ends only
/// when the kernel destroys the connection, which a running container's
/// overlay can put off indefinitely. (The session's own unmount is never
/// used: its plain umount(2) fails on a busy mount, and after an unmount
/// from outside it is a no-op.)
fn watch(
    session: fuser::BackgroundSession,
    mountpoint: &Path,
    passthrough: Arc<passthrough::Counters>,
    conn: Arc<OnceLock<OwnedFd>>,
) -> io::Result<MountHandle> {
    let ended = Arc::new(SessionEnd::default());
    let end = ended.clone();
    let path = mountpoint.to_path_buf();
    std::thread::Builder::new()
        .name("fuse-session".to_string())
        .spawn(move || {
            if let Err(e) = session.join() {
                tracing::warn!(mountpoint = %path.display(), error = %e, "FUSE session failed");
            }
            end.set();
        })?;
    Ok(MountHandle {
        mountpoint: mountpoint.to_path_buf(),
        ended,
        detached: false,
        passthrough,
        conn,
    })
}

impl MountHandle {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// A new fd of this mount's FUSE connection (the same open file, so
    /// whoever keeps it keeps the connection and its unanswered requests
    /// alive after this process is gone).
    pub fn connection(&self) -> io::Result<OwnedFd> {
        self.conn
            .get()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no connection yet"))?
            .try_clone()
    }

    /// What was agreed at INIT, for a process that adopts the connection.
    pub fn negotiated(&self) -> Negotiated {
        Negotiated {
            passthrough: self.passthrough.negotiated.load(Ordering::Relaxed),
        }
    }

    /// Stops serving without touching the mount: the process is about to
    /// exit and hand the connection over. Nothing is detached on drop.
    pub fn forget(mut self) {
        self.detached = true;
    }

    /// What passthrough did on this mount so far.
    pub fn passthrough_stats(&self) -> PassthroughStats {
        self.passthrough.snapshot()
    }

    /// Something to wait on, from any thread, until the session ends: the
    /// mount was unmounted, here or from outside (`umount`), and nobody
    /// uses it any more.
    pub fn session_end(&self) -> SessionEnded {
        SessionEnded(self.ended.clone())
    }

    /// Detaches the mount (lazily, so a busy mount cannot make it fail or
    /// hang) and waits up to [`UNMOUNT_WAIT`] for the session to end.
    pub fn unmount(self) -> Result<Unmounted, FuseError> {
        self.unmount_by(Instant::now() + UNMOUNT_WAIT)
    }

    /// [`MountHandle::unmount`], waiting for the session until `deadline`.
    pub fn unmount_by(mut self, deadline: Instant) -> Result<Unmounted, FuseError> {
        self.detach()?;
        Ok(if self.ended.wait(Some(deadline)) {
            Unmounted::Ended
        } else {
            Unmounted::StillInUse
        })
    }

    fn detach(&mut self) -> Result<(), FuseError> {
        if self.detached {
            return Ok(());
        }
        self.detached = true;
        let unmount_error = |error| FuseError::Unmount {
            path: self.mountpoint.clone(),
            error,
        };
        let path = std::ffi::CString::new(self.mountpoint.as_os_str().as_bytes())
            .map_err(|e| unmount_error(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        // SAFETY: `path` is a valid NUL-terminated string that outlives the
        // call; umount2 reads it and touches no other memory of ours.
        let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        // Unmounted from outside already (EINVAL: not a mount point;
        // ENOENT: the directory went too): the session ends by itself.
        match error.raw_os_error() {
            Some(libc::EINVAL | libc::ENOENT) => Ok(()),
            _ => Err(unmount_error(error)),
        }
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::warn!(error = %e, "unmount on drop failed");
        }
    }
}
