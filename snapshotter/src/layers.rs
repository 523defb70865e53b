//! The table of remote layers: one mount per layer digest at
//! `ROOT/layers/<digest hex>/fs`, shared by every snapshot made of that
//! layer, made through a [`Mounter`].
//!
//! Who uses a layer is not counted here but read from the metastore (the
//! snapshots labelled with its digest), so the count survives restarts and
//! cannot drift. Callers hold [`Layers::lock`] for a layer digest while they
//! mount it and record its snapshot, or check its users and unmount it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tarn_fs::Digest;
use tarn_fs::fetch::FetchStatsSnapshot;
use tracing::Instrument;

use crate::labels::{self, RemoteLayer, Restore};
use crate::locks::{KeyedGuard, KeyedMutex};
use crate::mounts::Layout;
use crate::seams::{LayerHandle, MountError, Mounter, Resolved, Service};

struct Mounted<L> {
    info: RemoteLayer,
    blob_size: u64,
    layer: L,
}

/// A layer that could not be restored at start.
struct Failed {
    info: RemoteLayer,
    blob_size: u64,
    why: String,
}

/// A mounted or failed layer, for the admin API.
#[derive(Debug, Clone)]
pub struct LayerStatus {
    pub image_ref: String,
    pub digest: Digest,
    pub mountpoint: PathBuf,
    pub blob_size: u64,
    pub stats: FetchStatsSnapshot,
    /// Every chunk is cached: reads no longer touch the network.
    pub complete: bool,
    /// Why it could not be restored, if it could not.
    pub failed: Option<String>,
    /// Since when this process serves it, and its takeovers.
    pub service: Option<Service>,
}

/// What happens to a layer right after it is mounted.
#[derive(Debug, Clone, Copy, Default)]
pub struct Warm {
    /// Wait this long for a layer's prioritized files before Prepare answers.
    pub prefetch: Option<Duration>,
    /// Fetch whole layers in the background.
    pub background: bool,
}

pub struct Layers<L, M> {
    layout: Layout,
    mounter: Arc<M>,
    warm: Warm,
    mounted: Mutex<HashMap<Digest, Mounted<L>>>,
    failed: Mutex<HashMap<Digest, Failed>>,
    locks: KeyedMutex<Digest>,
}

impl<L: LayerHandle, M: Mounter<L>> Layers<L, M> {
    pub fn new(layout: Layout, mounter: M, warm: Warm) -> Self {
        Layers {
            layout,
            mounter: Arc::new(mounter),
            warm,
            mounted: Mutex::default(),
            failed: Mutex::default(),
            locks: KeyedMutex::default(),
        }
    }

    /// The lock of one layer digest: held while mounting it and recording
    /// its snapshot, or while deciding it is unused and unmounting it.
    pub async fn lock(&self, digest: Digest) -> KeyedGuard<Digest> {
        self.locks.lock(digest).await
    }

    pub fn is_mounted(&self, digest: &Digest) -> bool {
        self.mounted
            .lock()
            .expect("mounted map poisoned")
            .contains_key(digest)
    }

    pub fn blob_size(&self, digest: &Digest) -> Option<u64> {
        let mounted = self.mounted.lock().expect("mounted map poisoned");
        mounted.get(digest).map(|m| m.blob_size)
    }

    /// The handle of a mounted layer.
    pub fn handle(&self, digest: &Digest) -> Option<L> {
        self.mounted
            .lock()
            .expect("mounted map poisoned")
            .get(digest)
            .map(|m| m.layer.clone())
    }

    pub fn mountpoint(&self, digest: &Digest) -> PathBuf {
        self.layout.layer_fs(digest)
    }

    /// The layers mounted now.
    pub fn mounted_digests(&self) -> HashSet<Digest> {
        let mounted = self.mounted.lock().expect("mounted map poisoned");
        mounted.keys().copied().collect()
    }

    /// Mounts a resolved layer at its mountpoint, then warms it. Nothing
    /// is left behind on error: no mount, no directory.
    pub async fn mount(&self, info: &RemoteLayer, resolved: Resolved<L>) -> Result<(), MountError> {
        let mountpoint = self.mountpoint(&info.digest);
        let dir = self.layout.layer_dir(&info.digest);
        let (layer, mounter) = (resolved.layer.clone(), self.mounter.clone());
        let fsname = format!("tarn:{}", info.digest);
        tokio::task::spawn_blocking(move || {
            mounter
                .mount(&layer, &mountpoint, &fsname)
                .inspect_err(|_| remove_dir(&dir))
        })
        .await??;
        self.failed
            .lock()
            .expect("failed map poisoned")
            .remove(&info.digest);
        let layer = resolved.layer.clone();
        self.mounted.lock().expect("mounted map poisoned").insert(
            info.digest,
            Mounted {
                info: info.clone(),
                blob_size: resolved.blob_size,
                layer: resolved.layer,
            },
        );
        layer
            .warm(self.warm.prefetch, self.warm.background)
            .instrument(tracing::info_span!("warm", layer = %info.digest))
            .await;
        Ok(())
    }

    /// Records a layer that could not be restored, for the admin API.
    pub fn mark_failed(&self, info: &RemoteLayer, blob_size: u64, why: String) {
        self.failed.lock().expect("failed map poisoned").insert(
            info.digest,
            Failed {
                info: info.clone(),
                blob_size,
                why,
            },
        );
    }

    /// The chunks of every mounted layer but `except`: what the cache must
    /// keep for them.
    pub fn mounted_chunks(&self, except: Option<&Digest>) -> HashSet<Digest> {
        let layers: Vec<L> = {
            let mounted = self.mounted.lock().expect("mounted map poisoned");
            mounted
                .iter()
                .filter(|(d, _)| Some(*d) != except)
                .map(|(_, m)| m.layer.clone())
                .collect()
        };
        layers
            .iter()
            .flat_map(|l| l.chunks())
            .map(|(d, _)| d)
            .collect()
    }

    /// Each mounted layer's chunks, for dedup accounting.
    pub fn chunk_lists(&self) -> Vec<Vec<(Digest, u64)>> {
        let layers: Vec<L> = {
            let mounted = self.mounted.lock().expect("mounted map poisoned");
            mounted.values().map(|m| m.layer.clone()).collect()
        };
        layers.iter().map(LayerHandle::chunks).collect()
    }

    /// Unmounts a layer (if mounted, or left mounted by a killed daemon)
    /// and removes its directory. Returns the layer if it was mounted.
    pub async fn unmount(&self, digest: &Digest) -> Option<L> {
        let layer = self
            .mounted
            .lock()
            .expect("mounted map poisoned")
            .remove(digest)
            .map(|m| m.layer);
        self.failed
            .lock()
            .expect("failed map poisoned")
            .remove(digest);
        let (mountpoint, dir) = (self.mountpoint(digest), self.layout.layer_dir(digest));
        let (mounter, digest) = (self.mounter.clone(), *digest);
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = mounter.unmount(&mountpoint) {
                tracing::warn!(layer = %digest, error = %crate::errors::chain(&e), "unmount failed");
            }
            remove_dir(&dir);
        })
        .await;
        layer
    }

    /// Digests with a mount or a directory under `ROOT/layers`.
    pub async fn known(&self) -> Vec<Digest> {
        let mut out: Vec<Digest> = self.mounted_digests().into_iter().collect();
        let dir = self.layout.layers_dir().to_owned();
        let on_disk = tokio::task::spawn_blocking(move || dir_digests(&dir))
            .await
            .unwrap_or_default();
        for d in on_disk {
            if !out.contains(&d) {
                out.push(d);
            }
        }
        out
    }

    /// Unmounts every layer (on shutdown), all at once, waiting for them
    /// until `deadline` at most; their directories stay for the next start.
    /// A layer a running container uses is detached at once and its
    /// connection lives until the process exits.
    pub async fn unmount_all(&self, deadline: tokio::time::Instant) {
        let all: Vec<(Digest, PathBuf)> = self
            .mounted
            .lock()
            .expect("mounted map poisoned")
            .drain()
            .map(|(d, _)| (d, self.layout.layer_fs(&d)))
            .collect();
        let unmounts = all.into_iter().map(|(digest, mountpoint)| {
            let mounter = self.mounter.clone();
            tokio::task::spawn_blocking(move || {
                if let Err(e) = mounter.unmount(&mountpoint) {
                    tracing::warn!(layer = %digest, error = %crate::errors::chain(&e), "unmount failed");
                }
            })
        });
        if tokio::time::timeout_at(deadline, futures::future::join_all(unmounts))
            .await
            .is_err()
        {
            tracing::warn!("unmounting did not finish within the grace period");
        }
    }

    /// After restoring at start: see [`Mounter::settle`].
    pub async fn settle(&self) {
        let mounter = self.mounter.clone();
        let _ = tokio::task::spawn_blocking(move || mounter.settle()).await;
    }

    /// On shutdown: leaves every mount to a successor if the mounter can
    /// ([`Mounter::hand_over`]); true if it did.
    pub async fn hand_over(&self) -> bool {
        let mounter = self.mounter.clone();
        let handed = tokio::task::spawn_blocking(move || mounter.hand_over())
            .await
            .unwrap_or(false);
        if handed {
            self.mounted.lock().expect("mounted map poisoned").clear();
        }
        handed
    }

    /// Every mounted layer, and every one that failed to come back.
    pub fn status(&self) -> Vec<LayerStatus> {
        let mut out: Vec<LayerStatus> = self
            .mounted
            .lock()
            .expect("mounted map poisoned")
            .values()
            .map(|m| LayerStatus {
                image_ref: m.info.image_ref.clone(),
                digest: m.info.digest,
                mountpoint: self.mountpoint(&m.info.digest),
                blob_size: m.blob_size,
                stats: m.layer.stats(),
                complete: m.layer.complete(),
                failed: None,
                service: self.mounter.served(&self.mountpoint(&m.info.digest)),
            })
            .collect();
        out.extend(
            self.failed
                .lock()
                .expect("failed map poisoned")
                .values()
                .map(|f| LayerStatus {
                    image_ref: f.info.image_ref.clone(),
                    digest: f.info.digest,
                    mountpoint: self.mountpoint(&f.info.digest),
                    blob_size: f.blob_size,
                    stats: FetchStatsSnapshot::default(),
                    complete: false,
                    failed: Some(f.why.clone()),
                    service: None,
                }),
        );
        out.sort_by_key(|l| l.digest);
        out
    }

    pub fn mounted_count(&self) -> usize {
        self.mounted.lock().expect("mounted map poisoned").len()
    }
}

/// Removes a layer's directory; already gone is fine.
fn remove_dir(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove layer directory");
    }
}

/// The layer digests named by directories in `dir`.
fn dir_digests(dir: &Path) -> Vec<Digest> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| format!("sha256:{name}").parse().ok())
        .collect()
}

/// Bytes dedup saves across `layers` (each a layer's chunks): what the
/// layers hold each on their own, minus what the cache holds once. Within
/// a layer, a chunk listed twice (two files with the same content) counts
/// once, as the cache stores it once.
pub fn dedup_saved_bytes(layers: &[Vec<(Digest, u64)>]) -> u64 {
    let mut all: HashMap<Digest, u64> = HashMap::new();
    let mut each = 0u64;
    for chunks in layers {
        let mine: HashMap<Digest, u64> = chunks.iter().copied().collect();
        each += mine.values().sum::<u64>();
        all.extend(mine);
    }
    each.saturating_sub(all.values().sum())
}

/// Groups remote snapshots by layer: digest -> (layer, blob size, names).
pub fn by_layer(
    snapshots: &[(String, BTreeMap<String, String>)],
) -> BTreeMap<Digest, (Restore, Vec<String>)> {
    let mut out: BTreeMap<Digest, (Restore, Vec<String>)> = BTreeMap::new();
    for (name, labels) in snapshots {
        if let Some(r) = labels::restore_info(labels) {
            out.entry(r.layer.digest)
                .or_insert_with(|| (r, Vec::new()))
                .1
                .push(name.clone());
        }
    }
    out
}
