//! The FUSE adapter: the only code that speaks errno.
//!
//! A layer is served read-only by several worker threads. Cache hits are
//! answered on the worker thread; misses are handed to a tokio runtime and
//! answered when their bytes arrive, so a slow fetch never holds a worker.
//! The layer is immutable, so attributes, entries and page cache live long.
//! Fully cached files are handed to the kernel (see [`passthrough`]).

mod attr;
mod fs;
mod passthrough;

pub use passthrough::PassthroughStats;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
}

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions {
            threads: 4,
            allow_other: true,
            fsname: "tarn".to_string(),
            passthrough: true,
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

/// A mounted layer. Dropping it, or calling [`MountHandle::unmount`],
/// unmounts the filesystem and stops its workers.
pub struct MountHandle {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
    passthrough: Arc<passthrough::Counters>,
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
        // A container image carries setuid binaries and device nodes.
        fuser::MountOption::Suid,
        fuser::MountOption::Dev,
        fuser::MountOption::Exec,
    ];
    if options.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;
    let counters = Arc::new(passthrough::Counters::default());
    let fs = fs::LayerFs::new(layer, runtime, options.passthrough, counters.clone());
    let session =
        fuser::spawn_mount(fs, mountpoint, &config).map_err(|error| FuseError::Mount {
            path: mountpoint.to_path_buf(),
            error,
        })?;
    Ok(MountHandle {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
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

    /// Unmounts (lazily if busy, so it cannot hang) and waits for the workers.
    pub fn unmount(mut self) -> Result<(), FuseError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<(), FuseError> {
        match self.session.take() {
            Some(s) => s.umount_and_join().map_err(|error| FuseError::Unmount {
                path: self.mountpoint.clone(),
                error,
            }),
            None => Ok(()),
        }
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            tracing::warn!(error = %e, "unmount on drop failed");
        }
    }
}
