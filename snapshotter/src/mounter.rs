//! The real [`Mounter`]: remote layers as FUSE mounts (tarn-fs's `fuse`),
//! and the real [`LayerHandle`], tarn-fs's [`Layer`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tarn_fs::Digest;
use tarn_fs::fetch::FetchStatsSnapshot;
use tarn_fs::fuse::{FuseOps, MountHandle, MountOptions, Unmounted};
use tarn_fs::layer::{Layer, PrefetchOutcome};

use crate::seams::{LayerHandle, MountError, Mounter};

/// FUSE mounts by mountpoint; each one lives until unmounted (or this is
/// dropped).
pub struct FuseMounter {
    /// Serves the mounts' cache misses; must outlive them.
    runtime: tokio::runtime::Handle,
    threads: usize,
    passthrough: bool,
    /// Every mount's operations, counted together.
    ops: Arc<FuseOps>,
    handles: Mutex<HashMap<PathBuf, MountHandle>>,
}

impl FuseMounter {
    pub fn new(
        runtime: tokio::runtime::Handle,
        threads: usize,
        passthrough: bool,
        ops: Arc<FuseOps>,
    ) -> Self {
        FuseMounter {
            runtime,
            threads,
            passthrough,
            ops,
            handles: Mutex::default(),
        }
    }
}

impl Mounter<Arc<Layer>> for FuseMounter {
    fn mount(&self, layer: &Arc<Layer>, mountpoint: &Path, fsname: &str) -> Result<(), MountError> {
        detach(mountpoint);
        std::fs::create_dir_all(mountpoint).map_err(|source| MountError::Mountpoint {
            path: mountpoint.to_owned(),
            source,
        })?;
        let options = MountOptions {
            threads: self.threads,
            fsname: fsname.to_owned(),
            passthrough: self.passthrough,
            ops: self.ops.clone(),
            ..MountOptions::default()
        };
        let handle =
            tarn_fs::fuse::mount(layer.clone(), mountpoint, self.runtime.clone(), &options)?;
        self.handles
            .lock()
            .expect("mount handles poisoned")
            .insert(mountpoint.to_owned(), handle);
        Ok(())
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), MountError> {
        let handle = self
            .handles
            .lock()
            .expect("mount handles poisoned")
            .remove(mountpoint);
        match handle {
            Some(h) => {
                if h.unmount()? == Unmounted::StillInUse {
                    // A running container's overlay holds it: its reads
                    // are served until it lets go or this process exits.
                    tracing::info!(mountpoint = %mountpoint.display(), "unmounted; still in use");
                }
            }
            // A dead mount of a killed daemon may still sit there.
            None => detach(mountpoint),
        }
        Ok(())
    }

    fn is_mounted(&self, mountpoint: &Path) -> bool {
        self.handles
            .lock()
            .expect("mount handles poisoned")
            .contains_key(mountpoint)
    }
}

/// Lazily detaches whatever is mounted at `path` (a killed daemon's FUSE
/// mount answers ENOTCONN to everything, even to mkdir under its parent).
/// Not mounted is fine.
fn detach(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
}

impl LayerHandle for Arc<Layer> {
    fn stats(&self) -> FetchStatsSnapshot {
        Layer::stats(self)
    }

    fn complete(&self) -> bool {
        self.progress().complete
    }

    fn chunks(&self) -> Vec<(Digest, u64)> {
        self.index()
            .chunks
            .iter()
            .map(|c| (c.digest, c.size))
            .collect()
    }

    async fn warm(&self, prefetch: Option<Duration>, background: bool) {
        if let Some(timeout) = prefetch {
            let started = std::time::Instant::now();
            match self.prefetch(timeout).await {
                PrefetchOutcome::NoLandmark => {}
                outcome => tracing::info!(
                    ?outcome,
                    elapsed_ms = started.elapsed().as_millis(),
                    "prefetch"
                ),
            }
        }
        if background {
            self.start_background().detach();
        }
    }
}
