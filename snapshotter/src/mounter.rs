//! The real [`Mounter`]: remote layers as FUSE mounts (tarn-fs's `fuse`),
//! and the real [`LayerHandle`], tarn-fs's [`Layer`].
//!
//! With a [`Holder`], every mount's FUSE connection is also handed to the
//! holder process, and the negotiated parameters are written beside the
//! mountpoint (`connection.json`, with the passthrough journal). A daemon
//! that starts while the holder keeps a connection adopts it instead of
//! mounting again: running containers see a stall, not an error.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tarn_fs::Digest;
use tarn_fs::fetch::FetchStatsSnapshot;
use tarn_fs::fuse::{FuseOps, MountHandle, MountOptions, Negotiated, Unmounted};
use tarn_fs::layer::{Layer, PrefetchOutcome};

use crate::holder::Holder;
use crate::mountinfo;
use crate::obd;
use crate::seams::{LayerHandle, MountError, Mounter, Service};

/// FUSE mounts by mountpoint; each one lives until unmounted (or this is
/// dropped, or handed over).
pub struct FuseMounter {
    /// Serves the mounts' cache misses; must outlive them.
    runtime: tokio::runtime::Handle,
    threads: usize,
    passthrough: bool,
    /// Every mount's operations, counted together.
    ops: Arc<FuseOps>,
    handles: Mutex<HashMap<PathBuf, Served>>,
    handover: Option<Handover>,
    /// Bumped for each layer adopted from a predecessor.
    takeovers: Counter,
}

struct Served {
    handle: MountHandle,
    service: Service,
}

/// The holder, and the connections a predecessor left in it that no
/// layer has adopted yet.
struct Handover {
    holder: Holder,
    inherited: Mutex<HashMap<PathBuf, OwnedFd>>,
}

/// What a successor needs to adopt a connection, beside its mountpoint.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ConnectionRecord {
    /// The kernel agreed to FUSE passthrough at INIT.
    passthrough: bool,
    /// How many processes adopted this connection so far.
    takeovers: u64,
}

const RECORD: &str = "connection.json";
const JOURNAL: &str = "passthrough.journal";
/// The source of a layer's FUSE mount (`tarn:<digest>`, as `Layers` names it).
const LAYER_FSNAME_PREFIX: &str = "tarn:";

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
            handover: None,
            takeovers: Counter::default(),
        }
    }

    /// Counts adopted layers on `takeovers` (`tarn_takeovers_total`).
    pub fn counting_takeovers(mut self, takeovers: Counter) -> Self {
        self.takeovers = takeovers;
        self
    }

    /// Keeps every connection in `holder` (started if none runs) and takes
    /// the ones it already keeps for lazy mounts still mounted, to adopt.
    /// Blocking (sockets, maybe a process start).
    pub fn with_holder(mut self, holder: Holder) -> Self {
        let inherited = match holder.ensure().and_then(|()| holder.list()) {
            Ok(fds) => {
                let mounted = fuse_mounts();
                fds.into_iter()
                    .filter(|(path, _)| match mounted.get(path) {
                        Some(source) if source.starts_with(LAYER_FSNAME_PREFIX) => true,
                        // An overlaybd disk's: `Disks` takes those.
                        Some(source) if source.starts_with(obd::DISK_FSNAME_PREFIX) => false,
                        _ => {
                            // Unmounted from outside: nothing to adopt.
                            let _ = holder.drop_fd(path);
                            false
                        }
                    })
                    .collect()
            }
            Err(e) => {
                tracing::warn!(error = %crate::errors::chain(&e),
                    "no holder: lazy mounts will not survive a restart of this daemon");
                HashMap::new()
            }
        };
        if !inherited.is_empty() {
            tracing::info!(
                connections = inherited.len(),
                "adopting held FUSE connections"
            );
        }
        self.handover = Some(Handover {
            holder,
            inherited: Mutex::new(inherited),
        });
        self
    }

    fn options(&self, mountpoint: &Path, fsname: &str) -> MountOptions {
        MountOptions {
            threads: self.threads,
            fsname: fsname.to_owned(),
            passthrough: self.passthrough,
            journal: self
                .handover
                .as_ref()
                .and_then(|_| Some(mountpoint.parent()?.join(JOURNAL))),
            handed_over: self.handover.is_some(),
            ops: self.ops.clone(),
            ..MountOptions::default()
        }
    }

    /// Serves `layer` on the connection a predecessor left for
    /// `mountpoint`, if there is one and it can be adopted.
    fn adopt(
        &self,
        layer: &Arc<Layer>,
        mountpoint: &Path,
        options: &MountOptions,
    ) -> Option<Served> {
        let h = self.handover.as_ref()?;
        let fd = h
            .inherited
            .lock()
            .expect("inherited poisoned")
            .remove(mountpoint)?;
        let record_path = mountpoint.parent()?.join(RECORD);
        let adopted = read_record(&record_path).and_then(|mut record| {
            let negotiated = Negotiated {
                passthrough: record.passthrough,
            };
            let handle = tarn_fs::fuse::adopt(
                layer.clone(),
                mountpoint,
                fd,
                negotiated,
                self.runtime.clone(),
                options,
            )
            .map_err(|e| e.to_string())?;
            record.takeovers += 1;
            write_record(&record_path, &record);
            Ok((handle, record.takeovers))
        });
        match adopted {
            Ok((handle, takeovers)) => {
                self.takeovers.inc();
                tracing::info!(mountpoint = %mountpoint.display(), takeovers, "adopted FUSE connection");
                Some(Served {
                    handle,
                    service: Service {
                        since: SystemTime::now(),
                        takeovers,
                    },
                })
            }
            Err(why) => {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %why,
                    "cannot adopt the held connection; mounting again");
                let _ = h.holder.drop_fd(mountpoint);
                None
            }
        }
    }

    fn insert(&self, mountpoint: &Path, served: Served) {
        self.handles
            .lock()
            .expect("mount handles poisoned")
            .insert(mountpoint.to_owned(), served);
    }
}

impl Mounter<Arc<Layer>> for FuseMounter {
    fn mount(&self, layer: &Arc<Layer>, mountpoint: &Path, fsname: &str) -> Result<(), MountError> {
        let options = self.options(mountpoint, fsname);
        if let Some(served) = self.adopt(layer, mountpoint, &options) {
            self.insert(mountpoint, served);
            return Ok(());
        }
        detach(mountpoint);
        std::fs::create_dir_all(mountpoint).map_err(|source| MountError::Mountpoint {
            path: mountpoint.to_owned(),
            source,
        })?;
        let handle =
            tarn_fs::fuse::mount(layer.clone(), mountpoint, self.runtime.clone(), &options)?;
        if let Some(h) = &self.handover {
            // The record first: a connection in the holder without one
            // cannot be adopted.
            if let Some(dir) = mountpoint.parent() {
                let record = ConnectionRecord {
                    passthrough: handle.negotiated().passthrough,
                    takeovers: 0,
                };
                write_record(&dir.join(RECORD), &record);
            }
            let held = handle
                .connection()
                .map_err(crate::holder::HolderError::from)
                .and_then(|fd| h.holder.put(mountpoint, fd.as_fd()));
            if let Err(e) = held {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %crate::errors::chain(&e),
                    "holder refused the connection: this mount will not survive a restart");
            }
        }
        let service = Service {
            since: SystemTime::now(),
            takeovers: 0,
        };
        self.insert(mountpoint, Served { handle, service });
        Ok(())
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), MountError> {
        if let Some(h) = &self.handover {
            // Let go first, or the holder would keep the connection alive
            // after the last user of the detached mount is gone.
            h.inherited
                .lock()
                .expect("inherited poisoned")
                .remove(mountpoint);
            if let Err(e) = h.holder.drop_fd(mountpoint) {
                tracing::warn!(mountpoint = %mountpoint.display(), error = %crate::errors::chain(&e),
                    "holder did not let go of the connection");
            }
        }
        let served = self
            .handles
            .lock()
            .expect("mount handles poisoned")
            .remove(mountpoint);
        match served {
            Some(s) => {
                if s.handle.unmount()? == Unmounted::StillInUse {
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

    fn settle(&self) {
        let Some(h) = &self.handover else { return };
        let left: Vec<PathBuf> = h
            .inherited
            .lock()
            .expect("inherited poisoned")
            .drain()
            .map(|(path, _)| path)
            .collect();
        for path in left {
            // No layer took it (it failed to come back): its readers get
            // ENOTCONN rather than wait forever on a connection nobody
            // serves.
            tracing::warn!(mountpoint = %path.display(), "held connection not adopted; letting go");
            let _ = h.holder.drop_fd(&path);
            detach(&path);
        }
    }

    fn hand_over(&self) -> bool {
        if self.handover.is_none() {
            return false;
        }
        let handles: Vec<Served> = self
            .handles
            .lock()
            .expect("mount handles poisoned")
            .drain()
            .map(|(_, s)| s)
            .collect();
        tracing::info!(mounts = handles.len(), "leaving lazy mounts to the holder");
        for s in handles {
            s.handle.forget();
        }
        true
    }

    fn served(&self, mountpoint: &Path) -> Option<Service> {
        let handles = self.handles.lock().expect("mount handles poisoned");
        handles.get(mountpoint).map(|s| s.service)
    }

    fn holder(&self) -> Option<&Holder> {
        self.handover.as_ref().map(|h| &h.holder)
    }

    fn takeovers(&self) -> Option<&Counter> {
        Some(&self.takeovers)
    }
}

fn read_record(path: &Path) -> Result<ConnectionRecord, String> {
    let text = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    serde_json::from_slice(&text).map_err(|e| format!("parse {}: {e}", path.display()))
}

/// Written whole (temp file, rename), so a crash leaves the old or the new.
fn write_record(path: &Path, record: &ConnectionRecord) {
    let tmp = path.with_extension("json.new");
    let written = serde_json::to_vec(record)
        .map_err(std::io::Error::from)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the connection record");
    }
}

/// The daemon's FUSE mounts in this mount namespace, mountpoint to
/// source, read from /proc/self/mountinfo (never by touching the mounts:
/// one nobody serves would hang the caller). fuser's own mount passes no
/// subtype: the type is `fuse`, the source the fsname given.
fn fuse_mounts() -> HashMap<PathBuf, String> {
    mountinfo::read()
        .into_iter()
        .filter(|m| m.fstype.starts_with("fuse") && m.source.starts_with("tarn"))
        .map(|m| (m.mountpoint, m.source))
        .collect()
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

    fn start_recording(&self, id: u64) -> Result<(), tarn_fs::layer::RecordError> {
        Layer::start_recording(self, id)
    }

    fn stop_recording(&self, id: u64) -> Option<Vec<tarn_fs::layer::Access>> {
        Layer::stop_recording(self, id)
    }

    async fn replay_profile(&self, section: &tarn_fs::layer::profile::LayerProfile) {
        crate::profiles::replay(self, section).await;
    }
}
