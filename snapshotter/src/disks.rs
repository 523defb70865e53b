//! The overlaybd stacks this daemon serves: one [`DiskMount`] per stack
//! key (`ROOT/layers/<key hex>/{disk,fs}`), whose tree is the lower dir
//! of every overlay over that snapshot of the chain. Stacks share their
//! layers (`Arc<DiskLayer>`), never their mounts.
//!
//! Disks are not handed to a successor (the holder keeps layer mounts
//! only): on shutdown every disk is torn down, and the next start mounts
//! the recorded stacks again (`remote::disk`).
//!
//! Every method but [`Disks::is_mounted`] and [`Disks::known`] blocks
//! (mounts, `losetup`): call them from the blocking pool.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tarn_fs::Digest;
use tarn_fs::disk::{DiskLayer, LazyDisk};
use tarn_fs::fuse::MountOptions;

use crate::mounts::Layout;
use crate::obd::{self, DiskMount, DiskMountError};

pub struct Disks {
    layout: Layout,
    runtime: tokio::runtime::Handle,
    options: MountOptions,
    mounted: Mutex<HashMap<Digest, DiskMount>>,
    /// What each mounted stack serves, for status (beside `mounted`, so
    /// the mount's own record stays as it was).
    stacks: Mutex<HashMap<Digest, Arc<LazyDisk>>>,
}

/// A mounted stack as `tarn status` shows it.
pub struct DiskStatus {
    pub key: Digest,
    /// Bottom first.
    pub layers: Vec<Arc<DiskLayer>>,
    pub virtual_size: u64,
    pub device: Option<String>,
    pub fs: PathBuf,
}

impl Disks {
    /// Disks under `layout`'s layers dir, their misses served on
    /// `runtime`, each FUSE file mounted with `options` (its fsname set
    /// per disk).
    pub fn new(layout: Layout, runtime: tokio::runtime::Handle, options: MountOptions) -> Disks {
        Disks {
            layout,
            runtime,
            options,
            mounted: Mutex::new(HashMap::new()),
            stacks: Mutex::new(HashMap::new()),
        }
    }

    pub fn is_mounted(&self, key: &Digest) -> bool {
        self.lock().contains_key(key)
    }

    /// Stack keys mounted now.
    pub fn known(&self) -> Vec<Digest> {
        self.lock().keys().copied().collect()
    }

    /// Mounts the stack of `layers` (bottom first) as `key`, unless it is
    /// already. Whatever a killed daemon left at its place goes first.
    pub fn attach(&self, key: Digest, layers: Vec<Arc<DiskLayer>>) -> Result<(), DiskMountError> {
        if self.is_mounted(&key) {
            return Ok(());
        }
        let disk = Arc::new(LazyDisk::new(layers)?);
        let dir = self.layout.layer_dir(&key);
        obd::clear_stale(&dir);
        let options = MountOptions {
            fsname: format!("tarn-obd-{}", &key.hex()[..12]),
            ..self.options.clone()
        };
        let mount = DiskMount::attach(disk.clone(), &dir, self.runtime.clone(), &options)?;
        tracing::info!(stack = %key, dev = mount.device().unwrap_or("?"), fs = %mount.fs().display(), "overlaybd disk mounted");
        // A concurrent attach of the same key cannot happen: callers hold
        // the key's lock. Were it to, the older mount is torn down here.
        self.lock().insert(key, mount);
        self.stacks_lock().insert(key, disk);
        Ok(())
    }

    /// Tears the stack `key` down and removes its directory; `false` if
    /// it was not mounted.
    pub fn detach(&self, key: &Digest) -> bool {
        let Some(mount) = self.lock().remove(key) else {
            return false;
        };
        self.stacks_lock().remove(key);
        if let Err(e) = mount.detach() {
            tracing::warn!(stack = %key, error = %crate::errors::chain(&e), "overlaybd disk not fully torn down");
        }
        let dir = self.layout.layer_dir(key);
        // Only empty directories: never walk into a mount left busy.
        for d in [dir.join("fs"), dir.join("disk"), dir.clone()] {
            let _ = std::fs::remove_dir(d);
        }
        tracing::info!(stack = %key, "overlaybd disk unmounted");
        true
    }

    /// Tears every disk down (shutdown); directories stay for the next
    /// start.
    pub fn detach_all(&self) {
        let all: Vec<(Digest, DiskMount)> = self.lock().drain().collect();
        self.stacks_lock().clear();
        for (key, mount) in all {
            if let Err(e) = mount.detach() {
                tracing::warn!(stack = %key, error = %crate::errors::chain(&e), "overlaybd disk not fully torn down");
            }
        }
    }

    /// Every mounted stack, for status.
    pub fn status(&self) -> Vec<DiskStatus> {
        let stacks: Vec<(Digest, Arc<LazyDisk>)> = self
            .stacks_lock()
            .iter()
            .map(|(k, d)| (*k, d.clone()))
            .collect();
        let mounted = self.lock();
        let mut out: Vec<DiskStatus> = stacks
            .into_iter()
            .filter_map(|(key, disk)| {
                let m = mounted.get(&key)?;
                Some(DiskStatus {
                    key,
                    layers: disk.layers().to_vec(),
                    virtual_size: disk.size(),
                    device: m.device().map(str::to_owned),
                    fs: m.fs().to_path_buf(),
                })
            })
            .collect();
        out.sort_by_key(|d| d.layers.len());
        out
    }

    fn stacks_lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<LazyDisk>>> {
        self.stacks.lock().expect("disk stacks map poisoned")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, DiskMount>> {
        self.mounted.lock().expect("disks map poisoned")
    }
}
