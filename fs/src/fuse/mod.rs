//! The FUSE adapter: the only code that speaks errno.
//!
//! A layer is served read-only by several worker threads. Cache hits are
//! answered on the worker thread; misses are handed to a tokio runtime and
//! answered when their bytes arrive, so a slow fetch never holds a worker.
//! The layer is immutable, so attributes, entries and page cache live long.
//! Fully cached files are handed to the kernel (see [`passthrough`]).

mod attr;
mod fs;
mod ops;
mod passthrough;

pub use ops::{FuseOps, Op};
pub use passthrough::PassthroughStats;

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
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
    /// Where the mount's operations are counted and timed; share one
    /// across mounts for daemon-wide figures.
    pub ops: Arc<FuseOps>,
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions {
            threads: 4,
            allow_other: true,
            fsname: "tarn".to_string(),
            passthrough: true,
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
    if options.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;
    let counters = Arc::new(passthrough::Counters::default());
    let fs = fs::LayerFs::new(
        layer,
        runtime,
        options.passthrough,
        counters.clone(),
        options.ops.clone(),
    );
    let session =
        fuser::spawn_mount(fs, mountpoint, &config).map_err(|error| FuseError::Mount {
            path: mountpoint.to_path_buf(),
            error,
        })?;
    // The session is joined on a thread of its own, so that an unmount
    // waits for it with a bound and a caller can wait for its end: a
    // session ends only when the kernel destroys the connection, which a
    // running container's overlay can put off indefinitely. (The session's
    // own unmount is never used: its plain umount(2) fails on a busy mount,
    // and after an unmount from outside it is a no-op.)
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
        })
        .map_err(|error| FuseError::Mount {
            path: mountpoint.to_path_buf(),
            error,
        })?;
    Ok(MountHandle {
        mountpoint: mountpoint.to_path_buf(),
        ended,
        detached: false,
        passthrough: counters,
    })
}

impl MountHandle {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
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
