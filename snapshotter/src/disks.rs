//! The overlaybd stacks this daemon serves: one [`DiskMount`] per stack
//! key (`ROOT/layers/<key hex>/{disk,fs}`), whose tree is the lower dir
//! of every overlay over that snapshot of the chain. Stacks share their
//! layers (`Arc<DiskLayer>`), never their mounts.
//!
//! With a holder (`[snapshotter] holder`, the layers' own), disks survive
//! a restart, an upgrade or a crash of the daemon as layer mounts do:
//! each disk's FUSE connection is handed to the holder under its FUSE
//! mountpoint (`<dir>/disk`); on shutdown the FUSE file, its loop device
//! and the ext4 tree stay in place ([`Disks::hand_over`]), and the loop
//! device's reads wait in the kernel (neither FUSE nor loop time a
//! request out here: `fs.fuse.*_request_timeout` are 0, and loop has no
//! timeout handler). The next daemon opens each recorded stack again
//! (`remote::disk`), takes the held connection back, checks the loop
//! device and tree are the ones it expects, and serves the same mount
//! ([`Disks::attach`] adopting); the waiting reads are sent again. What
//! does not check out is torn down and mounted afresh, logged with why;
//! what no recorded stack takes is let go ([`Disks::settle`]). Without a
//! holder every disk is torn down on shutdown and mounted again at start,
//! so a container running on one loses its lower dir.
//!
//! Every method but [`Disks::is_mounted`] and [`Disks::known`] blocks
//! (mounts, `losetup`, the holder's socket): call them from the blocking
//! pool.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use tarn_fs::Digest;
use tarn_fs::disk::{DiskLayer, LazyDisk};
use tarn_fs::format::overlaybd::trace::Trace;
use tarn_fs::fuse::MountOptions;
use tarn_fs::layer::Entrypoint;

use crate::errors::chain;
use crate::holder::Holder;
use crate::mountinfo;
use crate::mounts::Layout;
use crate::obd::{self, DiskMount, DiskMountError, LoopIo};

pub struct Disks {
    layout: Layout,
    runtime: tokio::runtime::Handle,
    options: MountOptions,
    loop_io: LoopIo,
    mounted: Mutex<HashMap<Digest, DiskMount>>,
    /// What each mounted stack serves, for status (beside `mounted`, so
    /// the mount's own record stays as it was).
    stacks: Mutex<HashMap<Digest, Arc<LazyDisk>>>,
    /// Stacks whose ext4 metadata was warmed (or is being), so a second
    /// container on the same image does not send the pass again.
    warmed: Mutex<HashSet<Digest>>,
    handover: Option<Handover>,
    /// Bumped for each disk taken over from a predecessor.
    takeovers: Counter,
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

/// The holder, and the disk connections a predecessor left in it that no
/// stack has taken back yet, by FUSE mountpoint.
struct Handover {
    holder: Holder,
    inherited: Mutex<HashMap<PathBuf, OwnedFd>>,
}

impl Disks {
    /// Disks under `layout`'s layers dir, their misses served on
    /// `runtime`, each FUSE file mounted with `options` (its fsname set
    /// per disk) and read by its loop device with `loop_io`. Torn down on
    /// shutdown until [`Disks::with_holder`].
    pub fn new(
        layout: Layout,
        runtime: tokio::runtime::Handle,
        options: MountOptions,
        loop_io: LoopIo,
    ) -> Disks {
        Disks {
            layout,
            runtime,
            options,
            loop_io,
            mounted: Mutex::new(HashMap::new()),
            stacks: Mutex::new(HashMap::new()),
            warmed: Mutex::new(HashSet::new()),
            handover: None,
            takeovers: Counter::default(),
        }
    }

    /// Counts the disks taken over on `takeovers` (`tarn_takeovers_total`,
    /// with the layers the mounter adopts).
    pub fn counting_takeovers(mut self, takeovers: Counter) -> Disks {
        self.takeovers = takeovers;
        self
    }

    /// Hands every disk's connection to `holder`, and takes the ones it
    /// keeps for disk mounts still mounted, for [`Disks::attach`] to adopt.
    /// Call it before any attach. Blocking (the holder's socket).
    pub fn with_holder(mut self, holder: Holder) -> Disks {
        let inherited: HashMap<PathBuf, OwnedFd> = match holder.list() {
            Ok(fds) => {
                let disks = disk_mounts();
                // The layers' connections are the mounter's.
                fds.into_iter()
                    .filter(|(path, _)| disks.iter().any(|d| d == path))
                    .collect()
            }
            Err(e) => {
                tracing::warn!(error = %chain(&e), "cannot list held connections: no disk is taken over");
                HashMap::new()
            }
        };
        if !inherited.is_empty() {
            tracing::info!(
                connections = inherited.len(),
                "taking over held overlaybd disks"
            );
        }
        self.options.handed_over = true;
        self.handover = Some(Handover {
            holder,
            inherited: Mutex::new(inherited),
        });
        self
    }

    pub fn is_mounted(&self, key: &Digest) -> bool {
        self.lock().contains_key(key)
    }

    /// Stack keys mounted now.
    pub fn known(&self) -> Vec<Digest> {
        self.lock().keys().copied().collect()
    }

    /// Mounts the stack of `layers` (bottom first) as `key`, unless it is
    /// already: takes over the mount a predecessor handed over if there is
    /// one and it checks out, else clears whatever a killed daemon left at
    /// its place and mounts it afresh.
    pub fn attach(&self, key: Digest, layers: Vec<Arc<DiskLayer>>) -> Result<(), DiskMountError> {
        if self.is_mounted(&key) {
            return Ok(());
        }
        let disk = Arc::new(LazyDisk::new(layers)?);
        let dir = self.layout.layer_dir(&key);
        let options = MountOptions {
            fsname: format!("{}{}", obd::DISK_FSNAME_PREFIX, &key.hex()[..12]),
            ..self.options.clone()
        };
        let mount = match self.take_over(&key, &dir, &disk, &options) {
            Some(mount) => mount,
            None => {
                obd::clear_stale(&dir);
                let mount = DiskMount::attach(
                    disk.clone(),
                    &dir,
                    self.runtime.clone(),
                    &options,
                    self.loop_io,
                )?;
                self.hold(&key, &mount);
                tracing::info!(stack = %key, dev = mount.device().unwrap_or("?"), fs = %mount.fs().display(), "overlaybd disk mounted");
                mount
            }
        };
        // A concurrent attach of the same key cannot happen: callers hold
        // the key's lock. Were it to, the older mount is torn down here.
        self.lock().insert(key, mount);
        self.stacks_lock().insert(key, disk);
        Ok(())
    }

    /// The disk mount a predecessor handed over at `dir`, serving `disk`,
    /// if the holder keeps its connection and the rest checks out. When
    /// it does not, the connection is let go (so that it ends and clearing
    /// the rest waits on nothing) and `None` says: mount afresh.
    fn take_over(
        &self,
        key: &Digest,
        dir: &Path,
        disk: &Arc<LazyDisk>,
        options: &MountOptions,
    ) -> Option<DiskMount> {
        let fuse_dir = dir.join("disk");
        let fd = self.take_inherited(&fuse_dir)?;
        match DiskMount::adopt(disk.clone(), dir, fd, self.runtime.clone(), options) {
            Ok(mount) => {
                self.takeovers.inc();
                tracing::info!(stack = %key, dev = mount.device().unwrap_or("?"), fs = %mount.fs().display(), "overlaybd disk taken over");
                Some(mount)
            }
            Err(e) => {
                tracing::warn!(stack = %key, error = %chain(&e),
                    "cannot take over the held overlaybd disk: tearing it down and mounting it again");
                self.let_go(&fuse_dir);
                None
            }
        }
    }

    /// Tears the stack `key` down and removes its directory; `false` if
    /// it was not mounted. The holder lets go of its connection first, or
    /// it would keep the disk alive after its last user.
    pub fn detach(&self, key: &Digest) -> bool {
        let Some(mount) = self.lock().remove(key) else {
            return false;
        };
        self.stacks_lock().remove(key);
        self.warmed.lock().expect("warmed set poisoned").remove(key);
        let dir = self.layout.layer_dir(key);
        self.let_go(&dir.join("disk"));
        if let Err(e) = mount.detach() {
            tracing::warn!(stack = %key, error = %chain(&e), "overlaybd disk not fully torn down");
        }
        // Only empty directories: never walk into a mount left busy.
        for d in [dir.join("fs"), dir.join("disk"), dir.clone()] {
            let _ = std::fs::remove_dir(d);
        }
        tracing::info!(stack = %key, "overlaybd disk unmounted");
        true
    }

    /// After every recorded stack was restored at start: lets go of the
    /// held disks no stack took back (their stack failed to come back)
    /// and clears them, so their readers get an error rather than wait
    /// forever on a connection nobody serves.
    pub fn settle(&self) {
        let Some(h) = &self.handover else { return };
        let left: Vec<PathBuf> = h
            .inherited
            .lock()
            .expect("inherited poisoned")
            .drain()
            .map(|(path, _)| path)
            .collect();
        for path in left {
            tracing::warn!(mountpoint = %path.display(), "held overlaybd disk not taken over; letting go");
            self.let_go(&path);
            if let Some(dir) = path.parent() {
                obd::clear_stale(dir);
            }
        }
    }

    /// On shutdown with a holder: leaves every disk in place for the next
    /// daemon; `false` (nothing done) without one.
    pub fn hand_over(&self) -> bool {
        if self.handover.is_none() {
            return false;
        }
        let all: Vec<DiskMount> = self.lock().drain().map(|(_, m)| m).collect();
        tracing::info!(disks = all.len(), "leaving overlaybd disks to the holder");
        for mount in all {
            mount.hand_over();
        }
        true
    }

    /// Tears every disk down (shutdown without a holder); directories stay
    /// for the next start.
    pub fn detach_all(&self) {
        let all: Vec<(Digest, DiskMount)> = self.lock().drain().collect();
        self.stacks_lock().clear();
        for (key, mount) in all {
            if let Err(e) = mount.detach() {
                tracing::warn!(stack = %key, error = %chain(&e), "overlaybd disk not fully torn down");
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

    /// Fetches the ext4 metadata of the mounted stack `key` in the
    /// background (`LazyDisk::warm_metadata`), once per stack, then the
    /// program `entry` names with its libraries
    /// (`LazyDisk::prefetch_entrypoint`): called when a container's
    /// snapshot is prepared on it, so the image's lower stacks, which no
    /// container reads, are not warmed.
    pub fn warm(&self, key: &Digest, entry: Option<Entrypoint>, trace: Option<Trace>) {
        let Some(disk) = self.stacks_lock().get(key).cloned() else {
            return;
        };
        if !self
            .warmed
            .lock()
            .expect("warmed set poisoned")
            .insert(*key)
        {
            return;
        }
        let key = *key;
        self.runtime.spawn(async move {
            // Recorded reads need no map of the tree: replayed beside the
            // warm pass. A list of files is looked up after it.
            let replay = |t: Option<Trace>| {
                let disk = disk.clone();
                async move {
                    let Some(t) = t else { return };
                    let asked = disk.replay(&t).await;
                    tracing::info!(stack = %key, entries = t.len(), asked, "overlaybd trace replayed");
                }
            };
            let (reads, files) = match trace {
                Some(Trace::Reads(r)) => (Some(Trace::Reads(r)), None),
                other => (None, other),
            };
            let (warmed, ()) = futures::join!(disk.warm_metadata(), replay(reads));
            match warmed {
                Ok(w) => tracing::info!(
                    stack = %key,
                    metadata_bytes = w.metadata_bytes,
                    fetched_bytes = w.fetched_bytes,
                    directories = w.directories,
                    file_extents = w.file_extents,
                    skipped = w.skipped,
                    cut = w.cut,
                    "overlaybd disk metadata warmed"
                ),
                Err(e) => tracing::info!(stack = %key, error = %chain(&e), "overlaybd disk metadata not warmed"),
            }
            replay(files).await;
            if let Some(entry) = entry {
                let fetched = disk.prefetch_entrypoint(&entry).await;
                tracing::info!(stack = %key, program = %entry.argv0, ?fetched, "overlaybd disk entrypoint prefetched");
            }
        });
    }

    /// Whether stack `key` has been warmed already (or is being).
    pub fn warmed(&self, key: &Digest) -> bool {
        self.warmed
            .lock()
            .expect("warmed set poisoned")
            .contains(key)
    }

    fn stacks_lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Arc<LazyDisk>>> {
        self.stacks.lock().expect("disk stacks map poisoned")
    }

    fn take_inherited(&self, mountpoint: &Path) -> Option<OwnedFd> {
        self.handover
            .as_ref()?
            .inherited
            .lock()
            .expect("inherited poisoned")
            .remove(mountpoint)
    }

    /// Hands `mount`'s connection to the holder, if there is one.
    fn hold(&self, key: &Digest, mount: &DiskMount) {
        let Some(h) = &self.handover else { return };
        let mountpoint = self.layout.layer_dir(key).join("disk");
        let held = mount
            .connection()
            .map_err(crate::holder::HolderError::from)
            .and_then(|fd| h.holder.put(&mountpoint, fd.as_fd()));
        if let Err(e) = held {
            tracing::warn!(stack = %key, error = %chain(&e),
                "holder refused the disk's connection: this disk will not survive a restart");
        }
    }

    /// The holder (and this process) close their fds of the connection of
    /// the disk mount at `mountpoint`.
    fn let_go(&self, mountpoint: &Path) {
        let Some(h) = &self.handover else { return };
        h.inherited
            .lock()
            .expect("inherited poisoned")
            .remove(mountpoint);
        if let Err(e) = h.holder.drop_fd(mountpoint) {
            tracing::warn!(mountpoint = %mountpoint.display(), error = %chain(&e),
                "holder did not let go of the disk's connection");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, DiskMount>> {
        self.mounted.lock().expect("disks map poisoned")
    }
}

/// The FUSE mountpoints of overlaybd disks in this mount namespace (by
/// their source, [`obd::DISK_FSNAME_PREFIX`]; never by touching them).
fn disk_mounts() -> Vec<PathBuf> {
    mountinfo::read()
        .into_iter()
        .filter(|m| m.fstype.starts_with("fuse") && m.source.starts_with(obd::DISK_FSNAME_PREFIX))
        .map(|m| m.mountpoint)
        .collect()
}
