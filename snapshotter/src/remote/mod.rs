//! The remote-layer decision around the plain [`Snapshotter`]: Prepare of an
//! image layer tarn can serve lazily mounts the layer, commits it under its
//! chain ID and answers ALREADY_EXISTS (DESIGN.md §2); anything else is an
//! ordinary Prepare, and an image layer that cannot be lazy is counted as a
//! [`Fallback`] by cause. Remove and Cleanup unmount layers nobody uses;
//! start mounts every remote snapshot's layer again.
//!
//! Resolution and mounting go through the seams of [`crate::seams`], so all
//! of this is unit-tested with fakes (`tests.rs`).
//!
//! Lock order: the chain ID's lock, then the layer digest's lock.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tarn_fs::Digest;
use tarn_fs::cache::{Cache, CacheError, CacheStats, Pruned};
use tarn_fs::fetch::FetchScheduler;
use tarn_fs::fuse::{FuseOps, MountOptions};
use tarn_fs::registry::auth::Keychains;
use tarn_fs::registry::manifest::{self, MAX_MANIFEST_BYTES, Parsed};
use tarn_fs::registry::{Reference, RegistryClient, RegistryError, ResolvedImage};

use crate::config::Config;
use crate::disks::Disks;
use crate::errors::chain;
use crate::fallback::{Cause, Fallback, Fallbacks};
use crate::labels::{self, Decision, RemoteLayer};
use crate::layers::{self, LayerStatus, Layers, Warm};
use crate::locks::KeyedMutex;
use crate::metastore;
use crate::metrics::{self, Metrics, SnapshotterFigures};
use crate::mounter::FuseMounter;
use crate::mounts::Mount;
use crate::obd::{self, LoopIo};
use crate::profiles::ProfileStore;
use crate::resolve::Resolver;
use crate::seams::{
    LayerHandle, MountError, Mounter, Resolve, ResolveError, Resolved, TocMismatch,
};
use crate::snapshotter::{self, Result, Snapshotter};

mod disk;
mod profile;
pub mod record;
#[cfg(test)]
mod tests;

/// How long a restart may spend bringing one layer back before the daemon
/// serves without it.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

/// Daemon-wide figures for the admin API.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Every fallback since start.
    pub fallbacks: u64,
    /// The same, by cause (only causes that happened).
    pub fallbacks_by_cause: BTreeMap<&'static str, u64>,
    pub lazy_layers: u64,
    pub snapshots: u64,
    pub cache_bytes: u64,
    pub cache_entries: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// The cache's own figures (disk use, bound, evictions, served bytes).
    pub cache: CacheStats,
    /// Bytes dedup saves across the mounted layers (see
    /// [`layers::dedup_saved_bytes`]).
    pub dedup_saved_bytes: u64,
    /// Body bytes received from registries and mirrors, and of those from
    /// mirrors (`hosts.toml`).
    pub registry_bytes: u64,
    pub mirror_bytes: u64,
    /// Block bytes received from peers, and sent to them (`[peers]`).
    pub peer_received_bytes: u64,
    pub peer_served_bytes: u64,
}

/// How the remote path decides, from the daemon's config.
#[derive(Debug, Clone, Copy)]
pub struct RemoteOptions {
    /// A Prepare waits this long for its layer's resolution, then falls back.
    pub resolve_timeout: Duration,
    /// A restart waits this long for one layer to come back.
    pub restore_timeout: Duration,
    /// Serve layers without a TOC digest (unverified).
    pub allow_unverified: bool,
    pub warm: Warm,
    /// How overlaybd disks' loop devices read their FUSE files.
    pub loop_io: LoopIo,
}

/// Why the daemon could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Snapshot(#[from] snapshotter::Error),
    #[error("open cache {path}")]
    Cache { path: PathBuf, source: CacheError },
    #[error("registry client")]
    Registry(#[from] RegistryError),
    #[error("open task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("start profiles' directory {path}")]
    Profiles {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a pull's hint ([`RemoteSnapshotter::expect`]) was refused.
#[derive(Debug, thiserror::Error)]
pub enum ExpectError {
    /// The reference does not parse (the error names it).
    #[error(transparent)]
    Reference(Box<RegistryError>),
    #[error("manifest of {0} bytes is over the {MAX_MANIFEST_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("an image index, not an image manifest")]
    Index,
    #[error("manifest: {0}")]
    Manifest(String),
}

/// Why a layer could not be mounted again at start.
#[derive(Debug, thiserror::Error)]
enum RestoreError {
    #[error("not restored within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Toc(#[from] TocMismatch),
    #[error(transparent)]
    Mount(#[from] MountError),
}

/// Why a remote Prepare did not answer ALREADY_EXISTS.
enum Why {
    /// The layer cannot be served lazily: fall back.
    Lazy(Fallback),
    /// The snapshot itself failed (bad parent, ...): the client's error.
    Snapshot(snapshotter::Error),
}

impl From<Fallback> for Why {
    fn from(f: Fallback) -> Self {
        Why::Lazy(f)
    }
}

pub struct RemoteSnapshotter<R: Resolve = Arc<Resolver>, M: Mounter<R::Layer> = FuseMounter> {
    sn: Arc<Snapshotter>,
    cache: Arc<Cache>,
    resolver: R,
    layers: Layers<R::Layer, M>,
    /// overlaybd stacks, mounted as disks (not through `M`).
    disks: Arc<Disks>,
    chains: KeyedMutex<String>,
    options: RemoteOptions,
    fallbacks: Fallbacks,
    /// Access recordings running (`tarn optimize`, start profiles).
    recordings: Arc<record::Recordings<R::Layer>>,
    /// Start profiles, when on (`[profile]`), and the first starts being
    /// recorded.
    profiles: Option<Arc<ProfileStore>>,
    learning: Arc<record::Learning>,
}

/// Runs blocking work (redb, filesystem, mounts) off the async workers.
pub async fn blocking<T: Send + 'static, E: From<tokio::task::JoinError> + Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, E> + Send + 'static,
) -> std::result::Result<T, E> {
    tokio::task::spawn_blocking(f).await?
}

impl RemoteSnapshotter {
    /// Opens the snapshotter, cache and registry client under `root`, and
    /// mounts every remote snapshot's layer again before returning (so the
    /// caller serves only once they are back). Must run on the runtime
    /// that will serve the FUSE mounts' cache misses. What the registry
    /// client, the fetch scheduler and the mounts count is registered on
    /// `metrics`. `keychains` are credential sources asked before the
    /// docker config (CRI's captured credentials). With `peers`, this
    /// node serves the blocks it owns from a store fetching with its own
    /// registry client, and reads layers' blocks from their owners first.
    pub async fn open(
        root: &Path,
        config: &Config,
        metrics: &Metrics,
        keychains: Keychains,
        peers: Option<&crate::peers::Setup>,
    ) -> Result<Self, OpenError> {
        let r = root.to_owned();
        let sn = Arc::new(blocking(move || Snapshotter::open(&r)).await?);
        let cache_dir = config.cache_dir(root);
        let cache = blocking(move || {
            Cache::open(&cache_dir).map_err(|source| OpenError::Cache {
                path: cache_dir,
                source,
            })
        })
        .await?;
        let cache = Arc::new(cache);
        let bound = config.cache_bound(&config.cache_dir(root));
        let c = cache.clone();
        blocking(move || {
            c.set_max_bytes(bound);
            Ok::<_, OpenError>(())
        })
        .await?;
        tracing::info!(max_bytes = bound, "cache bound");
        let mut registry = config.registry_config();
        registry.keychains = keychains;
        // Reads the docker config file: a small blocking read.
        let client = blocking(move || Ok::<_, OpenError>(RegistryClient::new(registry)?)).await?;
        let peers = peers.map(|setup| {
            let store = crate::peers::BlockStore::new(client.clone(), setup.cache_bytes);
            setup.peers.serve_locally(Arc::new(store));
            setup.peers.clone()
        });
        let warm = Warm {
            prefetch: config.prefetch_timeout(),
            background: config.fetch.background,
        };
        // One scheduler for every layer, so intents order all GETs together.
        let scheduler = FetchScheduler::new(config.scheduler_config());
        let fuse_ops = Arc::new(FuseOps::default());
        metrics.register_collector(metrics::Io {
            client: client.clone(),
            scheduler: scheduler.clone(),
            fuse: fuse_ops.clone(),
            peers: peers.clone(),
        });
        let profiles = match config.profile_dir(root) {
            Some(dir) => {
                let (record, registry) = (
                    Duration::from_secs(config.profile.record_secs),
                    config.profile.registry,
                );
                let store = blocking(move || {
                    ProfileStore::open(&dir, record, registry).map_err(|source| {
                        OpenError::Profiles {
                            path: dir.clone(),
                            source,
                        }
                    })
                })
                .await?;
                Some(Arc::new(store))
            }
            None => None,
        };
        let resolver = Resolver::new(
            client,
            cache.clone(),
            scheduler,
            warm,
            config.max_index_bytes(),
            profiles.clone(),
            peers,
        );
        let mounter = FuseMounter::new(
            tokio::runtime::Handle::current(),
            config.snapshotter.fuse_threads,
            config.snapshotter.fuse_passthrough,
            fuse_ops,
        )
        .counting_takeovers(metrics.takeovers().clone());
        let mounter = match config.holder(root) {
            Some(holder) => {
                blocking(move || Ok::<_, OpenError>(mounter.with_holder(holder))).await?
            }
            None => mounter,
        };
        let options = RemoteOptions {
            resolve_timeout: config.resolve_timeout(),
            restore_timeout: RESTORE_TIMEOUT,
            allow_unverified: config.snapshotter.allow_unverified_layers,
            warm,
            loop_io: config.loop_io(),
        };
        let rs = Self::with_parts(sn, cache, resolver, mounter, options).await?;
        Ok(rs.with_profiles(profiles))
    }
}

impl<R: Resolve, M: Mounter<R::Layer>> RemoteSnapshotter<R, M> {
    /// The remote path over `sn`, resolving with `resolver` and mounting
    /// with `mounter`; mounts every remote snapshot's layer again first.
    pub async fn with_parts(
        sn: Arc<Snapshotter>,
        cache: Arc<Cache>,
        resolver: R,
        mounter: M,
        options: RemoteOptions,
    ) -> Result<Self> {
        let disk_options = MountOptions {
            // A disk file is never whole in the cache: nothing to pass through.
            passthrough: false,
            ..MountOptions::default()
        };
        let mut disks = Disks::new(
            sn.layout().clone(),
            tokio::runtime::Handle::current(),
            disk_options,
            options.loop_io,
        );
        if let Some(takeovers) = mounter.takeovers() {
            disks = disks.counting_takeovers(takeovers.clone());
        }
        // Disks are handed over to the layers' holder, or to none.
        let disks = match mounter.holder().cloned() {
            Some(holder) => tokio::task::spawn_blocking(move || disks.with_holder(holder)).await?,
            None => disks,
        };
        let rs = RemoteSnapshotter {
            layers: Layers::new(sn.layout().clone(), mounter, options.warm),
            disks: Arc::new(disks),
            sn,
            cache,
            resolver,
            chains: KeyedMutex::default(),
            options,
            fallbacks: Fallbacks::default(),
            recordings: Arc::default(),
            profiles: None,
            learning: Arc::default(),
        };
        rs.restore().await?;
        Ok(rs)
    }

    pub fn snapshotter(&self) -> &Arc<Snapshotter> {
        &self.sn
    }

    /// Turns start profiles on, kept in `store` (`[profile]`).
    pub fn with_profiles(mut self, store: Option<Arc<ProfileStore>>) -> Self {
        self.profiles = store;
        self
    }

    /// A pull of `image_ref` whose manifest is `manifest` has begun: starts
    /// resolving its layers; see [`crate::resolve::Resolver::expect`].
    /// An empty `manifest` means the pull has only just begun: the daemon
    /// opens connections to the registry meanwhile.
    pub fn expect(&self, image_ref: &str, manifest: &[u8]) -> Result<usize, ExpectError> {
        let reference = image_ref
            .parse::<Reference>()
            .map_err(|e| ExpectError::Reference(Box::new(e)))?;
        if manifest.is_empty() {
            self.resolver.preconnect(&reference);
            return Ok(0);
        }
        if manifest.len() > MAX_MANIFEST_BYTES {
            return Err(ExpectError::TooLarge(manifest.len()));
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
            Ok(Parsed::Index { .. }) => return Err(ExpectError::Index),
            Err(e) => return Err(ExpectError::Manifest(e)),
        };
        Ok(self
            .resolver
            .expect(image_ref, image, self.layers.mounted_digests()))
    }

    /// Prepare: lazily for a layer tarn can serve, ordinarily otherwise.
    pub async fn prepare(
        &self,
        key: String,
        parent: Option<String>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if let Some(obd) = obd::overlaybd_layer(&labels) {
            return self.prepare_disk(key, parent, labels, obd).await;
        }
        match labels::decide(&labels, parent.is_some(), self.options.allow_unverified) {
            Decision::Ordinary => {
                if let Some(p) = &parent {
                    self.warm_disk_under(p).await;
                    self.start_profile(&key, p).await;
                }
            }
            Decision::Fallback(unfit) => {
                if let Some(chain_id) = self.on_node(parent.as_deref(), &labels).await? {
                    return Err(metastore::Error::AlreadyExists(format!(
                        "snapshot {chain_id:?} already exists (a layer on the node, by diff ID)"
                    ))
                    .into());
                }
                self.fallback(&key, None, unfit.into())
            }
            Decision::Remote { chain_id, layer } => {
                self.resolver
                    .ahead(&layer.image_ref, self.layers.mounted_digests());
                let served = self
                    .prepare_remote(&chain_id, parent.clone(), labels.clone(), &layer)
                    .await;
                self.settle(&key, &chain_id, "remote layer", &layer.digest, served)?;
            }
        }
        let sn = self.sn.clone();
        blocking(move || sn.prepare(&key, parent.as_deref(), labels)).await
    }

    /// An image layer Prepare tarn cannot serve from its labels (no image
    /// reference: containerd 2.x's transfer service without
    /// `enable_remote_snapshot_annotations`, a plain `ctr pull`) whose
    /// diff ID (`containerd.io/snapshot/diff-id`, containerd >= 2.3) is a
    /// layer already mounted here: commits its chain ID on that mount, so
    /// containerd neither downloads nor unpacks it. Returns the chain ID
    /// if so. Not for a parentless Prepare naming a parent (parallel
    /// unpack): see [`labels::Unfit::NoParent`].
    async fn on_node(
        &self,
        parent: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<Option<String>> {
        let (Some(chain_id), Some(diff_id)) = (
            labels.get(labels::SNAPSHOT_REF).filter(|c| !c.is_empty()),
            labels.get(labels::DIFF_ID).filter(|d| !d.is_empty()),
        ) else {
            return Ok(None);
        };
        if parent.is_none() && labels::awaits_parent(labels) {
            return Ok(None);
        }
        let _chain = self.chains.lock(chain_id.clone()).await;
        let sn = self.sn.clone();
        let id = diff_id.clone();
        let found = blocking(move || {
            Ok::<_, snapshotter::Error>(
                sn.remote_snapshots()?
                    .iter()
                    .find_map(|i| labels::same_layer(&i.labels, &id)),
            )
        })
        .await?;
        let Some(found) = found else {
            return Ok(None);
        };
        // Held while the snapshot is made, so the mount cannot go meanwhile.
        let _layer = self.layers.lock(found.layer.digest).await;
        if !self.layers.is_mounted(&found.layer.digest) {
            return Ok(None);
        }
        let labels = labels::remote_labels(labels.clone(), &found.layer, found.blob_size);
        let (name, sn, parent) = (chain_id.clone(), self.sn.clone(), parent.map(str::to_owned));
        blocking(move || sn.create_remote(&name, parent.as_deref(), labels)).await?;
        tracing::info!(
            chain_id = %chain_id,
            layer = %found.layer.digest,
            diff_id = %diff_id,
            "layer already on the node: answering already exists"
        );
        Ok(Some(chain_id.clone()))
    }

    /// What a lazy Prepare of `chain_id` (a `what` of blob `digest`) that
    /// ended in `served` tells containerd: its snapshot exists now
    /// (committed under the chain ID, which containerd takes as "skip this
    /// layer"), an error, or, once the fallback is recorded, nothing: the
    /// caller then prepares an ordinary snapshot.
    fn settle(
        &self,
        key: &str,
        chain_id: &str,
        what: &str,
        digest: &Digest,
        served: std::result::Result<(), Why>,
    ) -> Result<()> {
        match served {
            Ok(()) => Err(metastore::Error::AlreadyExists(format!(
                "snapshot {chain_id:?} already exists ({what} {digest})"
            ))
            .into()),
            Err(Why::Snapshot(e)) => Err(e),
            Err(Why::Lazy(f)) => {
                self.fallback(key, Some(digest), f);
                Ok(())
            }
        }
    }

    fn fallback(&self, key: &str, layer: Option<&Digest>, why: Fallback) {
        let cause = why.cause();
        self.fallbacks.count(cause);
        let reason = match layer {
            Some(d) => format!("layer {d}: {}", chain(&why)),
            None => chain(&why),
        };
        if cause == Cause::Auth {
            // Worth a warning: every layer of the registry is pulled in full
            // until tarn's credentials are fixed.
            tracing::warn!(
                key,
                cause = cause.as_str(),
                reason,
                "not lazy: tarn has no credentials the registry accepts (see [registry] docker_config); ordinary prepare, containerd pulls the layer in full"
            );
            return;
        }
        tracing::info!(
            key,
            cause = cause.as_str(),
            reason,
            "not lazy: ordinary prepare"
        );
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
                Some(self.resolver.layer(layer, None).await)
            };
            (guard, resolved)
        };
        let timeout = self.options.resolve_timeout;
        let (_layer_guard, resolved) = tokio::time::timeout(timeout, resolving)
            .await
            .map_err(|_| Fallback::ResolveTimeout(timeout))?;
        let fresh = resolved.is_some();
        let blob_size = match resolved {
            Some(r) => {
                let r = r.map_err(Fallback::from)?;
                check_toc(layer, &r).map_err(Fallback::from)?;
                self.mount(layer, r).await.map_err(Fallback::from)?
            }
            None => self.layers.blob_size(&layer.digest).unwrap_or_default(),
        };
        let mut labels = labels::remote_labels(labels, layer, blob_size);
        if self.profiles.is_some() && !labels.contains_key(labels::CRI_MANIFEST_DIGEST) {
            // What a container's start on this chain is profiled under.
            if let Some(d) = self.resolver.manifest_digest(&layer.image_ref).await {
                labels.insert(labels::TARN_MANIFEST_DIGEST.into(), d.to_string());
            }
        }
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
            elapsed_ms = started.elapsed().as_millis(),
            "remote layer: answering already exists"
        );
        Ok(())
    }

    /// Mounts a resolved layer. Returns its blob size.
    async fn mount(&self, layer: &RemoteLayer, r: Resolved<R::Layer>) -> Result<u64, MountError> {
        let size = r.blob_size;
        self.layers.mount(layer, r).await?;
        self.resolver.mounted(&layer.digest);
        Ok(size)
    }

    /// Remove; a remote layer whose last snapshot went is unmounted.
    pub async fn remove(&self, key: String) -> Result<()> {
        self.learning.done(&key);
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
            Ok::<_, snapshotter::Error>(
                sn.remote_snapshots()?
                    .iter()
                    .any(|i| labels::remote_layer(&i.labels) == Some(digest)),
            )
        })
        .await?;
        if !used && self.disks.is_mounted(&digest) {
            self.detach_disk(digest).await;
        }
        if !used {
            tracing::info!(layer = %digest, "layer unused: unmounting");
            if let Some(layer) = self.layers.unmount(&digest).await {
                self.release(&digest, layer).await;
            }
        }
        Ok(())
    }

    /// The last snapshot of `layer` went: its chunks that no other mounted
    /// layer lists are released in the cache (first to go, not in use, and
    /// removed by `tarn cache prune`).
    async fn release(&self, digest: &Digest, layer: R::Layer) {
        let keep = self.layers.mounted_chunks(Some(digest));
        let cache = self.cache.clone();
        let released = tokio::task::spawn_blocking(move || {
            let chunks = layer.chunks();
            cache.release(chunks.iter().map(|(d, _)| d).filter(|d| !keep.contains(d)))
        })
        .await
        .unwrap_or_default();
        tracing::info!(layer = %digest, released_bytes = released, "layer's unshared chunks released");
    }

    /// Frees the cache's released entries, or (`all_unused`) every entry no
    /// mounted layer lists.
    pub async fn prune_cache(&self, all_unused: bool) -> Result<Pruned> {
        let keep = all_unused.then(|| self.layers.mounted_chunks(None));
        let cache = self.cache.clone();
        let pruned =
            blocking(move || Ok::<_, snapshotter::Error>(cache.prune(keep.as_ref()))).await?;
        tracing::info!(?pruned, all_unused, "cache pruned");
        Ok(pruned)
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
        let (disks, snapshots): (Vec<_>, Vec<_>) =
            snapshots.into_iter().partition(|(_, l)| labels::is_disk(l));
        let by_layer = layers::by_layer(&snapshots);
        let restores = by_layer.values().map(|(r, names)| async move {
            let started = Instant::now();
            match self.restore_one(&r.layer, r.blob_size).await {
                Ok(()) => tracing::info!(
                    layer = %r.layer.digest,
                    snapshots = names.len(),
                    elapsed_ms = started.elapsed().as_millis(),
                    "remote layer restored"
                ),
                Err(e) => {
                    let why = chain(&e);
                    tracing::error!(layer = %r.layer.digest, snapshots = ?names, error = %why, "remote layer not restored");
                    self.layers.mark_failed(&r.layer, r.blob_size, why);
                }
            }
        });
        futures::future::join(
            futures::future::join_all(restores),
            self.restore_disks(&disks),
        )
        .await;
        self.layers.settle().await;
        let disks = self.disks.clone();
        let _ = tokio::task::spawn_blocking(move || disks.settle()).await;
        Ok(())
    }

    async fn restore_one(&self, layer: &RemoteLayer, blob_size: u64) -> Result<(), RestoreError> {
        let timeout = self.options.restore_timeout;
        let r = tokio::time::timeout(timeout, self.resolver.layer(layer, Some(blob_size)))
            .await
            .map_err(|_| RestoreError::Timeout(timeout))??;
        check_toc(layer, &r)?;
        self.mount(layer, r).await?;
        Ok(())
    }

    /// Leaves every layer's connection to the next process if the mounter
    /// keeps them in a holder, else unmounts every layer, waiting until
    /// `deadline` at most; state stays on disk for the next start.
    pub async fn shutdown(&self, deadline: tokio::time::Instant) {
        // Disks go with the layers: to the holder, or torn down.
        let disks = self.disks.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if !disks.hand_over() {
                disks.detach_all();
            }
        })
        .await;
        if !self.layers.hand_over().await {
            self.layers.unmount_all(deadline).await;
        }
    }

    /// Starts recording which files of the mounted layers among `digests`
    /// are opened and read.
    pub fn start_recording(
        &self,
        digests: &[Digest],
    ) -> std::result::Result<record::Started, record::StartError> {
        self.recordings.start(digests, |d| self.layers.handle(d))
    }

    /// Ends recording `id`: per layer, the files read, in first-access order.
    pub fn stop_recording(&self, id: u64) -> Option<Vec<(Digest, Vec<tarn_fs::layer::Access>)>> {
        self.recordings.stop(id)
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
        let c = self.cache.stats();
        let registry = self.resolver.registry_stats();
        let peers = self.resolver.peer_stats();
        let lists = self.layers.chunk_lists();
        let dedup_saved_bytes =
            tokio::task::spawn_blocking(move || layers::dedup_saved_bytes(&lists))
                .await
                .unwrap_or_default();
        Ok(Stats {
            fallbacks: self.fallbacks.total(),
            fallbacks_by_cause: self.fallbacks.by_cause(),
            lazy_layers: self.layers.mounted_count() as u64,
            snapshots: snapshots as u64,
            cache_bytes: c.bytes,
            cache_entries: c.entries,
            cache_hits: c.hits,
            cache_misses: c.misses,
            cache: c,
            dedup_saved_bytes,
            registry_bytes: registry.bytes,
            mirror_bytes: registry.mirror_bytes,
            peer_received_bytes: peers.received_bytes,
            peer_served_bytes: peers.served_bytes,
        })
    }

    /// The figures the metrics endpoint reports. Blocking (reads the
    /// metadata store): call it off the async workers.
    pub fn figures(&self) -> Result<SnapshotterFigures> {
        Ok(SnapshotterFigures {
            layers: self.layers.status(),
            fallbacks: self.fallbacks.counts(),
            cache: self.cache.stats(),
            snapshots: self.sn.count()? as u64,
            disk_blobs: self.disk_checks(),
            disk_hints: self.disk_hints(),
        })
    }
}

/// A layer resolved ahead from the registry's manifest must have the TOC
/// `layer` names (a tag moved in between would differ).
fn check_toc<L>(layer: &RemoteLayer, r: &Resolved<L>) -> Result<(), TocMismatch> {
    if layer.toc_digest.is_some() && r.toc_digest != layer.toc_digest {
        return Err(TocMismatch {
            want: layer.toc_digest,
            got: r.toc_digest,
        });
    }
    Ok(())
}
