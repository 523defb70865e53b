//! Remote layers as FUSE mounts: one mount per layer digest at
//! `ROOT/layers/<digest hex>/fs`, shared by every snapshot made of that
//! layer, over one chunk cache and one registry client for the daemon.
//!
//! Who uses a layer is not counted here but read from the metastore (the
//! snapshots labelled with its digest), so the count survives restarts and
//! cannot drift. Callers hold [`Layers::lock`] for a layer digest while they
//! mount it and record its snapshot, or check its users and unmount it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tarn_fs::Digest;
use tarn_fs::cache::{Cache, CacheStats};
use tarn_fs::fetch::{FetchScheduler, FetchStatsSnapshot};
use tarn_fs::fuse::{MountHandle, MountOptions};
use tarn_fs::layer::{Layer, PrefetchOutcome};
use tarn_fs::registry::{Reference, RegistryClient, ResolvedImage};

use crate::labels::RemoteLayer;
use crate::locks::{KeyedGuard, KeyedMutex};
use crate::mounts::Layout;
use crate::resolve::Resolver;

/// Why a layer could not be resolved or mounted. Each one only makes its
/// Prepare fall back to an ordinary pull, so the message is what matters.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct LayerError(Arc<str>);

impl LayerError {
    pub fn new(msg: impl std::fmt::Display) -> Self {
        LayerError(msg.to_string().into())
    }
}

/// A layer opened (footer and TOC fetched and verified), not yet mounted.
#[derive(Clone)]
pub struct Resolved {
    layer: Arc<Layer>,
    blob_size: u64,
    toc_digest: Option<Digest>,
}

impl Resolved {
    pub fn new(layer: Arc<Layer>, blob_size: u64, toc_digest: Option<Digest>) -> Self {
        Resolved {
            layer,
            blob_size,
            toc_digest,
        }
    }

    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }

    pub fn layer(&self) -> &Arc<Layer> {
        &self.layer
    }

    /// The TOC digest the layer was verified against.
    pub fn toc_digest(&self) -> Option<Digest> {
        self.toc_digest
    }
}

struct Mounted {
    info: RemoteLayer,
    blob_size: u64,
    layer: Arc<Layer>,
    handle: MountHandle,
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
}

/// How layers are mounted and fetched, from the daemon's config.
#[derive(Clone)]
pub struct LayerOptions {
    pub fuse_threads: usize,
    pub passthrough: bool,
    /// One scheduler for every layer, so intents order all GETs together.
    pub scheduler: FetchScheduler,
    /// Wait this long for a layer's prioritized files before Prepare answers.
    pub prefetch_timeout: Option<std::time::Duration>,
    /// Fetch whole layers in the background.
    pub background: bool,
    /// Memory one layer's index may take, bytes.
    pub max_index_bytes: u64,
}

pub struct Layers {
    layout: Layout,
    cache: Arc<Cache>,
    resolver: Arc<Resolver>,
    runtime: tokio::runtime::Handle,
    options: LayerOptions,
    mounted: Mutex<HashMap<Digest, Mounted>>,
    /// Layers that could not be restored at start: (layer, blob size, why).
    failed: Mutex<HashMap<Digest, (RemoteLayer, u64, String)>>,
    locks: KeyedMutex<Digest>,
}

impl Layers {
    /// `runtime` serves the FUSE mounts' cache misses; it must outlive them.
    pub fn new(
        layout: Layout,
        cache: Arc<Cache>,
        client: RegistryClient,
        runtime: tokio::runtime::Handle,
        options: LayerOptions,
    ) -> Self {
        Layers {
            layout,
            resolver: Resolver::new(
                client,
                cache.clone(),
                options.scheduler.clone(),
                options.prefetch_timeout,
                options.background,
                options.max_index_bytes,
            ),
            cache,
            runtime,
            options,
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

    pub fn mountpoint(&self, digest: &Digest) -> PathBuf {
        self.layout.layer_fs(digest)
    }

    /// Opens `layer`; see [`Resolver::layer`].
    pub async fn resolve(
        &self,
        layer: &RemoteLayer,
        blob_size: Option<u64>,
    ) -> Result<Resolved, LayerError> {
        self.resolver.layer(layer, blob_size).await
    }

    /// Starts resolving every eStargz layer of `image_ref` that is not
    /// mounted yet, in the background; see [`Resolver::ahead`].
    pub fn resolve_ahead(&self, image_ref: &str) {
        self.resolver.ahead(image_ref, self.mounted_digests());
    }

    /// The layers mounted now: resolving them ahead would be wasted.
    fn mounted_digests(&self) -> HashSet<Digest> {
        let mounted = self.mounted.lock().expect("mounted map poisoned");
        mounted.keys().copied().collect()
    }

    /// Opens connections to the registry of `reference` in the background,
    /// as many as the layers resolved at once are likely to want.
    pub fn preconnect(&self, reference: &Reference) {
        self.resolver.preconnect(reference);
    }

    /// Starts resolving the layers of `image`, the manifest of `image_ref`
    /// handed over by a pull; see [`Resolver::expect`].
    pub fn expect(&self, image_ref: &str, image: ResolvedImage) -> usize {
        self.resolver
            .expect(image_ref, image, self.mounted_digests())
    }

    /// Mounts a resolved layer at its mountpoint, replacing whatever a
    /// killed daemon left there. Nothing is left behind on error.
    pub async fn mount(&self, info: &RemoteLayer, resolved: Resolved) -> Result<(), LayerError> {
        let mountpoint = self.mountpoint(&info.digest);
        let dir = self.layout.layer_dir(&info.digest);
        let (layer, runtime) = (resolved.layer.clone(), self.runtime.clone());
        let options = MountOptions {
            threads: self.options.fuse_threads,
            fsname: format!("tarn:{}", info.digest),
            passthrough: self.options.passthrough,
            ..MountOptions::default()
        };
        let handle = tokio::task::spawn_blocking(move || {
            detach(&mountpoint);
            std::fs::create_dir_all(&mountpoint)
                .map_err(|e| LayerError::new(format!("create {}: {e}", mountpoint.display())))?;
            tarn_fs::fuse::mount(layer, &mountpoint, runtime, &options).map_err(|e| {
                let _ = std::fs::remove_dir_all(&dir);
                LayerError::new(e)
            })
        })
        .await
        .map_err(|e| LayerError::new(format!("mount task failed: {e}")))??;
        self.failed
            .lock()
            .expect("failed map poisoned")
            .remove(&info.digest);
        self.resolver.mounted(&info.digest);
        let layer = resolved.layer.clone();
        self.mounted.lock().expect("mounted map poisoned").insert(
            info.digest,
            Mounted {
                info: info.clone(),
                blob_size: resolved.blob_size,
                layer: resolved.layer,
                handle,
            },
        );
        self.warm(info, &layer).await;
        Ok(())
    }

    /// Prefetches a freshly mounted layer's prioritized files, waiting for
    /// them up to the prefetch timeout, then starts its background fetch if
    /// configured. The background fetch stops when the layer is unmounted.
    async fn warm(&self, info: &RemoteLayer, layer: &Layer) {
        if let Some(timeout) = self.options.prefetch_timeout {
            let started = std::time::Instant::now();
            match layer.prefetch(timeout).await {
                PrefetchOutcome::NoLandmark => {}
                outcome => tracing::info!(
                    layer = %info.digest,
                    ?outcome,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "prefetch"
                ),
            }
        }
        if self.options.background {
            layer.start_background().detach();
        }
    }

    /// Records a layer that could not be restored, for the admin API.
    pub fn mark_failed(&self, info: &RemoteLayer, blob_size: u64, why: String) {
        self.failed
            .lock()
            .expect("failed map poisoned")
            .insert(info.digest, (info.clone(), blob_size, why));
    }

    /// Unmounts a layer (if mounted) and removes its directory.
    pub async fn unmount(&self, digest: &Digest) {
        let mounted = self
            .mounted
            .lock()
            .expect("mounted map poisoned")
            .remove(digest);
        self.failed
            .lock()
            .expect("failed map poisoned")
            .remove(digest);
        let dir = self.layout.layer_dir(digest);
        let digest = *digest;
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(m) = mounted
                && let Err(e) = m.handle.unmount()
            {
                tracing::warn!(layer = %digest, error = %e, "unmount failed");
            }
            // A dead mount of a killed daemon may still sit there.
            detach(&dir.join("fs"));
            if let Err(e) = std::fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot remove layer directory");
            }
        })
        .await;
    }

    /// Digests with a mount or a directory under `ROOT/layers`.
    pub async fn known(&self) -> Vec<Digest> {
        let mut out: Vec<Digest> = self
            .mounted
            .lock()
            .expect("mounted map poisoned")
            .keys()
            .copied()
            .collect();
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

    /// Unmounts every layer (on shutdown); their directories stay for the
    /// next start.
    pub async fn unmount_all(&self) {
        let all: Vec<Mounted> = self
            .mounted
            .lock()
            .expect("mounted map poisoned")
            .drain()
            .map(|(_, m)| m)
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for m in all {
                if let Err(e) = m.handle.unmount() {
                    tracing::warn!(layer = %m.info.digest, error = %e, "unmount failed");
                }
            }
        })
        .await;
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
                mountpoint: m.handle.mountpoint().to_owned(),
                blob_size: m.blob_size,
                stats: m.layer.stats(),
                complete: m.layer.progress().complete,
                failed: None,
            })
            .collect();
        out.extend(
            self.failed
                .lock()
                .expect("failed map poisoned")
                .values()
                .map(|(info, size, why)| LayerStatus {
                    image_ref: info.image_ref.clone(),
                    digest: info.digest,
                    mountpoint: self.mountpoint(&info.digest),
                    blob_size: *size,
                    stats: FetchStatsSnapshot::default(),
                    complete: false,
                    failed: Some(why.clone()),
                }),
        );
        out.sort_by_key(|l| l.digest);
        out
    }

    pub fn mounted_count(&self) -> usize {
        self.mounted.lock().expect("mounted map poisoned").len()
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }
}

/// Lazily detaches whatever is mounted at `path` (a killed daemon's FUSE
/// mount answers ENOTCONN to everything, even to mkdir under its parent).
/// Not mounted is fine.
fn detach(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
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

/// Groups remote snapshots by layer: digest -> (layer, blob size, names).
pub fn by_layer(
    snapshots: &[(String, BTreeMap<String, String>)],
) -> BTreeMap<Digest, (crate::labels::Restore, Vec<String>)> {
    let mut out: BTreeMap<Digest, (crate::labels::Restore, Vec<String>)> = BTreeMap::new();
    for (name, labels) in snapshots {
        if let Some(r) = crate::labels::restore_info(labels) {
            out.entry(r.layer.digest)
                .or_insert_with(|| (r, Vec::new()))
                .1
                .push(name.clone());
        }
    }
    out
}
