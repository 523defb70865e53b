//! The remote-layer decision around the plain [`Snapshotter`]: Prepare of an
//! image layer tarn can serve lazily mounts the layer, commits it under its
//! chain ID and answers ALREADY_EXISTS (DESIGN.md §2); anything else is an
//! ordinary Prepare. Remove and Cleanup unmount layers nobody uses; start
//! mounts every remote snapshot's layer again.
//!
//! Lock order: the chain ID's lock, then the layer digest's lock.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tarn_fs::Digest;
use tarn_fs::cache::Cache;
use tarn_fs::fetch::FetchScheduler;
use tarn_fs::registry::manifest::{self, MAX_MANIFEST_BYTES, Parsed};
use tarn_fs::registry::{Reference, RegistryClient, ResolvedImage};

use crate::config::Config;
use crate::labels::{self, Decision, RemoteLayer};
use crate::layers::{LayerOptions, LayerStatus, Layers, Resolved};
use crate::locks::KeyedMutex;
use crate::metastore;
use crate::mounts::Mount;
use crate::snapshotter::{self, Error, Result, Snapshotter};

/// How long a restart may spend bringing one layer back before the daemon
/// serves without it.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

/// Daemon-wide figures for the admin API.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub fallbacks: u64,
    pub lazy_layers: u64,
    pub snapshots: u64,
    pub cache_bytes: u64,
    pub cache_entries: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
}

pub struct RemoteSnapshotter {
    sn: Arc<Snapshotter>,
    layers: Layers,
    chains: KeyedMutex<String>,
    resolve_timeout: Duration,
    allow_unverified: bool,
    fallbacks: AtomicU64,
}

/// Runs blocking snapshotter work (redb, filesystem) off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Io {
            context: "snapshot task failed".into(),
            source: std::io::Error::other(e.to_string()),
        })?
}

impl RemoteSnapshotter {
    /// Opens the snapshotter, cache and registry client under `root`, and
    /// mounts every remote snapshot's layer again before returning (so the
    /// caller serves only once they are back). Must run on the runtime
    /// that will serve the FUSE mounts' cache misses.
    pub async fn open(root: &Path, config: &Config) -> Result<Self> {
        let r = root.to_owned();
        let sn = Arc::new(blocking(move || Snapshotter::open(&r)).await?);
        let cache_dir = config.cache_dir(root);
        let cache = blocking(move || {
            Cache::open(&cache_dir).map_err(|e| Error::Io {
                context: format!("open cache {}", cache_dir.display()),
                source: std::io::Error::other(e.to_string()),
            })
        })
        .await?;
        let registry = config.registry_config();
        // Reads the docker config file: a small blocking read.
        let client = blocking(move || {
            RegistryClient::new(registry).map_err(|e| Error::Io {
                context: "registry client".into(),
                source: std::io::Error::other(e.to_string()),
            })
        })
        .await?;
        let layers = Layers::new(
            sn.layout().clone(),
            Arc::new(cache),
            client,
            tokio::runtime::Handle::current(),
            LayerOptions {
                fuse_threads: config.snapshotter.fuse_threads,
                passthrough: config.snapshotter.fuse_passthrough,
                scheduler: FetchScheduler::new(config.scheduler_config()),
                prefetch_timeout: config.prefetch_timeout(),
                background: config.fetch.background,
                max_index_bytes: config.max_index_bytes(),
            },
        );
        let rs = RemoteSnapshotter {
            sn,
            layers,
            chains: KeyedMutex::default(),
            resolve_timeout: config.resolve_timeout(),
            allow_unverified: config.snapshotter.allow_unverified_layers,
            fallbacks: AtomicU64::new(0),
        };
        rs.restore().await?;
        Ok(rs)
    }

    pub fn snapshotter(&self) -> &Arc<Snapshotter> {
        &self.sn
    }

    /// A pull of `image_ref` whose manifest is `manifest` has begun: starts
    /// resolving its layers; see [`crate::resolve::Resolver::expect`].
    /// An empty `manifest` means the pull has only just begun: the daemon
    /// opens connections to the registry meanwhile. An error is the reason
    /// the hint is refused, for the caller.
    pub fn expect(&self, image_ref: &str, manifest: &[u8]) -> Result<usize, String> {
        let reference = image_ref
            .parse::<Reference>()
            .map_err(|e| format!("image reference {image_ref:?}: {e}"))?;
        if manifest.is_empty() {
            self.layers.preconnect(&reference);
            return Ok(0);
        }
        if manifest.len() > MAX_MANIFEST_BYTES {
            return Err(format!(
                "manifest of {} bytes is over the {MAX_MANIFEST_BYTES}-byte limit",
                manifest.len()
            ));
        }
        let image = match manifest::parse(manifest, None) {
            Ok(Parsed::Image {
                media_type,
                config,
                layers,
            }) => ResolvedImage {
                manifest_digest: Digest::of(manifest),
                manifest_bytes: manifest.to_vec(),
                manifest_media_type: media_type,
                config,
                layers,
            },
            Ok(Parsed::Index { .. }) => {
                return Err("an image index, not an image manifest".to_string());
            }
            Err(e) => return Err(format!("manifest: {e}")),
        };
        Ok(self.layers.expect(image_ref, image))
    }

    /// Prepare: lazily for a layer tarn can serve, ordinarily otherwise.
    pub async fn prepare(
        &self,
        key: String,
        parent: Option<String>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        match labels::decide(&labels, self.allow_unverified) {
            Decision::Ordinary => {}
            Decision::Fallback(reason) => self.fallback(&key, &reason),
            Decision::Remote { chain_id, layer } => {
                self.layers.resolve_ahead(&layer.image_ref);
                match self
                    .prepare_remote(&chain_id, parent.clone(), labels.clone(), &layer)
                    .await
                {
                    Ok(()) => {
                        return Err(metastore::Error::AlreadyExists(format!(
                            "snapshot {chain_id:?} already exists (remote layer {})",
                            layer.digest
                        ))
                        .into());
                    }
                    Err(Why::Snapshot(e)) => return Err(e),
                    Err(Why::Lazy(reason)) => {
                        self.fallback(&key, &format!("layer {}: {reason}", layer.digest));
                    }
                }
            }
        }
        let sn = self.sn.clone();
        blocking(move || sn.prepare(&key, parent.as_deref(), labels)).await
    }

    fn fallback(&self, key: &str, reason: &str) {
        self.fallbacks.fetch_add(1, Ordering::Relaxed);
        tracing::info!(key, reason, "not lazy: ordinary prepare");
    }

    /// Makes the committed snapshot `chain_id` of a remote layer, mounting
    /// the layer unless it is already. On any error nothing is left: no
    /// mount nobody uses, no record, no directory.
    async fn prepare_remote(
        &self,
        chain_id: &str,
        parent: Option<String>,
        labels: BTreeMap<String, String>,
        layer: &RemoteLayer,
    ) -> Result<(), Why> {
        let started = Instant::now();
        let _chain = self.chains.lock(chain_id.to_owned()).await;
        let name = chain_id.to_owned();
        let sn = self.sn.clone();
        if blocking(move || sn.stat(&name)).await.is_ok() {
            // Someone made it while we waited (a concurrent pull).
            return Ok(());
        }
        // Waiting for the layer's lock counts against the resolve timeout
        // too: whoever holds it is resolving the same layer.
        let resolving = async {
            let guard = self.layers.lock(layer.digest).await;
            let resolved = if self.layers.is_mounted(&layer.digest) {
                None
            } else {
                Some(self.layers.resolve(layer, None).await)
            };
            (guard, resolved)
        };
        let (_layer_guard, resolved) = tokio::time::timeout(self.resolve_timeout, resolving)
            .await
            .map_err(|_| {
                Why::Lazy(format!(
                    "not resolved within the resolve timeout ({:?})",
                    self.resolve_timeout
                ))
            })?;
        let fresh = resolved.is_some();
        let blob_size = match resolved {
            Some(r) => {
                let r: Resolved = r.map_err(|e| Why::Lazy(e.to_string()))?;
                let size = r.blob_size();
                self.layers
                    .mount(layer, r)
                    .await
                    .map_err(|e| Why::Lazy(e.to_string()))?;
                size
            }
            None => self.layers.blob_size(&layer.digest).unwrap_or_default(),
        };
        let labels = labels::remote_labels(labels, layer, blob_size);
        let (name, sn) = (chain_id.to_owned(), self.sn.clone());
        let created = blocking(move || sn.create_remote(&name, parent.as_deref(), labels)).await;
        if let Err(e) = created {
            if fresh {
                // We mounted it for this snapshot only.
                self.layers.unmount(&layer.digest).await;
            }
            return Err(Why::Snapshot(e));
        }
        tracing::info!(
            chain_id,
            layer = %layer.digest,
            image = %layer.image_ref,
            mounted = fresh,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "remote layer: answering already exists"
        );
        Ok(())
    }

    /// Remove; a remote layer whose last snapshot went is unmounted.
    pub async fn remove(&self, key: String) -> Result<()> {
        let sn = self.sn.clone();
        if let Some(digest) = blocking(move || sn.remove(&key)).await? {
            self.unmount_if_unused(digest).await?;
        }
        Ok(())
    }

    /// Cleanup: directories no snapshot references, and layer mounts and
    /// directories no remote snapshot uses.
    pub async fn cleanup(&self) -> Result<()> {
        let sn = self.sn.clone();
        blocking(move || sn.cleanup()).await?;
        for digest in self.layers.known().await {
            self.unmount_if_unused(digest).await?;
        }
        Ok(())
    }

    async fn unmount_if_unused(&self, digest: Digest) -> Result<()> {
        let _guard = self.layers.lock(digest).await;
        let sn = self.sn.clone();
        let used = blocking(move || {
            Ok(sn
                .remote_snapshots()?
                .iter()
                .any(|i| labels::remote_layer(&i.labels) == Some(digest)))
        })
        .await?;
        if !used {
            tracing::info!(layer = %digest, "layer unused: unmounting");
            self.layers.unmount(&digest).await;
        }
        Ok(())
    }

    /// Mounts every remote snapshot's layer again, in parallel, reusing the
    /// cache. A layer that cannot come back is logged and reported, and
    /// the daemon starts anyway (reads of its snapshots fail until an
    /// operator removes them).
    async fn restore(&self) -> Result<()> {
        let sn = self.sn.clone();
        let snapshots: Vec<(String, BTreeMap<String, String>)> =
            blocking(move || sn.remote_snapshots())
                .await?
                .into_iter()
                .map(|i| (i.name, i.labels))
                .collect();
        let by_layer = crate::layers::by_layer(&snapshots);
        let restores = by_layer.values().map(|(r, names)| async move {
            let started = Instant::now();
            let resolved = tokio::time::timeout(
                RESTORE_TIMEOUT,
                self.layers.resolve(&r.layer, Some(r.blob_size)),
            )
            .await
            .unwrap_or_else(|_| {
                Err(crate::layers::LayerError::new(format!(
                    "not restored within {RESTORE_TIMEOUT:?}"
                )))
            });
            let mounted = match resolved {
                Ok(resolved) => self.layers.mount(&r.layer, resolved).await,
                Err(e) => Err(e),
            };
            match mounted {
                Ok(()) => tracing::info!(
                    layer = %r.layer.digest,
                    snapshots = names.len(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "remote layer restored"
                ),
                Err(e) => {
                    tracing::error!(layer = %r.layer.digest, snapshots = ?names, error = %e, "remote layer not restored");
                    self.layers.mark_failed(&r.layer, r.blob_size, e.to_string());
                }
            }
        });
        futures::future::join_all(restores).await;
        Ok(())
    }

    /// Unmounts every layer; state stays on disk for the next start.
    pub async fn shutdown(&self) {
        self.layers.unmount_all().await;
    }

    pub fn layers(&self) -> Vec<LayerStatus> {
        self.layers.status()
    }

    /// Snapshot names per layer digest, for the admin API.
    pub async fn layer_snapshots(&self) -> Result<BTreeMap<Digest, Vec<String>>> {
        let sn = self.sn.clone();
        let infos = blocking(move || sn.remote_snapshots()).await?;
        let mut out: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
        for i in infos {
            if let Some(d) = labels::remote_layer(&i.labels) {
                out.entry(d).or_default().push(i.name);
            }
        }
        Ok(out)
    }

    pub async fn stats(&self) -> Result<Stats> {
        let sn = self.sn.clone();
        let snapshots = blocking(move || sn.count()).await?;
        let c = self.layers.cache_stats();
        Ok(Stats {
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            lazy_layers: self.layers.mounted_count() as u64,
            snapshots: snapshots as u64,
            cache_bytes: c.bytes,
            cache_entries: c.entries,
            cache_hits: c.hits,
            cache_misses: c.misses,
        })
    }
}

/// Why a remote Prepare did not answer ALREADY_EXISTS.
enum Why {
    /// The layer cannot be served lazily: fall back.
    Lazy(String),
    /// The snapshot itself failed (bad parent, ...): the client's error.
    Snapshot(snapshotter::Error),
}
