//! Resolution of remote layers: an image's manifest, then a layer's footer
//! and TOC, each done once however many Prepares ask at the same time.
//!
//! containerd prepares an image's layers one after another, each Prepare
//! waiting for the last. On a far registry, resolving them one by one costs
//! a few round trips per layer; so the first Prepare of an image starts
//! resolving all of the image's eStargz layers at once ([`Resolver::ahead`]),
//! and the Prepares that follow find their layer resolved or in flight.
//! Each layer resolved ahead also starts prefetching its prioritized files,
//! and its background fetch when that is on. `tarn pull` goes one step
//! earlier: it hands the daemon the manifest it just fetched
//! ([`Resolver::expect`]), so resolution starts while the pull is still
//! fetching the config, and the daemon's own manifest GET is saved.
//! Results are kept for a short while ([`KEEP`]) for those Prepares; a layer
//! that gets mounted is taken out of that memo.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use tarn_fs::Digest;
use tarn_fs::Intent;
use tarn_fs::cache::Cache;
use tarn_fs::disk::DiskLayer;
use tarn_fs::fetch::FetchScheduler;
use tarn_fs::format::Estargz;
use tarn_fs::format::overlaybd::trace::{self, Trace};
use tarn_fs::layer::profile::{self as profile_doc, Profile};
use tarn_fs::layer::{Entrypoint, Layer};
use tarn_fs::peer::{PeerBlob, PeerStats, Peers};
use tarn_fs::registry::{
    BlobSource, ClientStats, Reference, RegistryClient, RegistryError, Repository, ResolvedImage,
    Sources,
};

use crate::labels::{RemoteLayer, TOC_DIGEST};
use crate::layers::Warm;
use crate::locks::Singleflight;
use crate::profiles::{self, ProfileStore};
use crate::seams::{Resolve, ResolveError, Resolved};

/// Connections opened to a registry when a pull is announced: enough for
/// the tails of a typical image's layers, resolved at once.
const PRECONNECT: usize = 8;

/// Connections opened this recently are still in the pool (idle ones live
/// 90 s): a pull announced meanwhile opens none.
const PRECONNECT_FRESH: Duration = Duration::from_secs(30);

/// The longest a GET waits for connections being opened to its registry.
const PRECONNECT_WAIT: Duration = Duration::from_secs(1);

/// How long a resolved image or layer waits for the Prepare that wants it.
const KEEP: Duration = Duration::from_secs(120);

/// Results younger than [`KEEP`], by key.
struct Memo<K, V>(Mutex<HashMap<K, (Instant, V)>>);

impl<K: Eq + Hash, V: Clone> Memo<K, V> {
    fn new() -> Self {
        Memo(Mutex::new(HashMap::new()))
    }

    fn get(&self, key: &K) -> Option<V> {
        let map = self.0.lock().expect("memo poisoned");
        map.get(key)
            .filter(|(at, _)| at.elapsed() < KEEP)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, key: K, value: V) {
        let mut map = self.0.lock().expect("memo poisoned");
        map.retain(|_, (at, _)| at.elapsed() < KEEP);
        map.insert(key, (Instant::now(), value));
    }

    fn take(&self, key: &K) {
        self.0.lock().expect("memo poisoned").remove(key);
    }
}

/// Resolves images and layers; shared by background tasks, hence `Arc`.
pub struct Resolver {
    client: RegistryClient,
    cache: Arc<Cache>,
    scheduler: FetchScheduler,
    /// Prefetch layers resolved ahead, for up to this long.
    prefetch: Option<Duration>,
    /// Start the background fetch of layers resolved ahead.
    background: bool,
    /// Memory one layer's index may take, bytes.
    max_index_bytes: u64,
    /// Images whose layers are being resolved ahead (or were, recently).
    started: Memo<String, ()>,
    /// Registries being connected to ([`Resolver::preconnect`]), by host:
    /// when it started, and `true` once done.
    connecting: Mutex<HashMap<String, (Instant, watch::Receiver<bool>)>>,
    images: Singleflight<String, Result<Arc<ResolvedImage>, ResolveError>>,
    recent_images: Memo<String, Arc<ResolvedImage>>,
    layers: Singleflight<Digest, Result<Resolved<Arc<Layer>>, ResolveError>>,
    recent_layers: Memo<Digest, Resolved<Arc<Layer>>>,
    disk_flights: Singleflight<Digest, Result<Arc<DiskLayer>, ResolveError>>,
    /// Overlaybd layers open in some stack: the next stack that needs one
    /// shares it (its extents, its fetch figures) instead of opening it
    /// again. Weak, so a layer no mounted stack uses is let go.
    disk_layers: Mutex<HashMap<Digest, Weak<DiskLayer>>>,
    /// Start profiles, when on: replayed on the layers resolved ahead.
    profiles: Option<Arc<ProfileStore>>,
    /// Other nodes, when `[peers]` is on: asked first for the blocks of
    /// verified layers.
    peers: Option<Peers>,
}

impl Resolver {
    pub fn new(
        client: RegistryClient,
        cache: Arc<Cache>,
        scheduler: FetchScheduler,
        warm: Warm,
        max_index_bytes: u64,
        profiles: Option<Arc<ProfileStore>>,
        peers: Option<Peers>,
    ) -> Arc<Self> {
        Arc::new(Resolver {
            profiles,
            peers,
            client,
            cache,
            scheduler,
            prefetch: warm.prefetch,
            background: warm.background,
            max_index_bytes,
            started: Memo::new(),
            connecting: Mutex::new(HashMap::new()),
            images: Singleflight::default(),
            recent_images: Memo::new(),
            layers: Singleflight::default(),
            recent_layers: Memo::new(),
            disk_flights: Singleflight::default(),
            disk_layers: Mutex::new(HashMap::new()),
        })
    }

    /// The manifest of `image_ref` (linux/amd64), fetched once per image.
    async fn image(self: &Arc<Self>, image_ref: &str) -> Result<Arc<ResolvedImage>, ResolveError> {
        if let Some(image) = self.recent_images.get(&image_ref.to_owned()) {
            return Ok(image);
        }
        let (me, r) = (self.clone(), image_ref.to_owned());
        self.images
            .run(image_ref.to_owned(), move || async move {
                // A task of its own, so it completes even if every caller
                // stopped waiting (the next one then finds it in the memo).
                let task = tokio::spawn(async move {
                    let reference: Reference = r.parse()?;
                    let image = me.client.resolve(&reference).await?;
                    let image = Arc::new(image);
                    me.recent_images.put(r, image.clone());
                    Ok(image)
                });
                task.await.unwrap_or_else(|e| Err(e.into()))
            })
            .await
    }

    /// Opens `layer` (blob size from its image's manifest unless given,
    /// then footer and TOC, the TOC checked against its digest). Concurrent
    /// calls for one digest share one resolution; a layer resolved ahead
    /// may have been opened with another TOC digest than `layer` names
    /// (the caller compares them).
    pub async fn layer(
        self: &Arc<Self>,
        layer: &RemoteLayer,
        blob_size: Option<u64>,
    ) -> Result<Resolved<Arc<Layer>>, ResolveError> {
        match self.recent_layers.get(&layer.digest) {
            Some(r) => Ok(r),
            None => {
                let (me, info) = (self.clone(), layer.clone());
                self.layers
                    .run(layer.digest, move || async move {
                        let task = tokio::spawn(async move {
                            let r = me.open(&info, blob_size).await?;
                            me.recent_layers.put(info.digest, r.clone());
                            Ok(r)
                        });
                        task.await.unwrap_or_else(|e| Err(e.into()))
                    })
                    .await
            }
        }
    }

    /// Opens the overlaybd layer `digest` of `image_ref`, or shares the one
    /// a mounted stack has open; see [`Resolve::disk_layer`].
    pub async fn disk_layer(
        self: &Arc<Self>,
        image_ref: &str,
        digest: Digest,
        blob_size: u64,
    ) -> Result<Arc<DiskLayer>, ResolveError> {
        if let Some(open) = self.open_disk_layer(&digest) {
            return Ok(open);
        }
        let (me, image_ref) = (self.clone(), image_ref.to_owned());
        self.disk_flights
            .run(digest, move || async move {
                let task = tokio::spawn(async move {
                    let reference: Reference = image_ref.parse()?;
                    me.connected(reference.repository.host()).await;
                    let source = me
                        .client
                        .blob_source(&reference.repository, digest, blob_size)
                        .await;
                    let layer = DiskLayer::open(
                        digest,
                        source,
                        me.cache.clone(),
                        me.scheduler.for_host(reference.repository.host()),
                    )
                    .await?;
                    let layer = Arc::new(layer);
                    let mut open = me.disk_layers.lock().expect("disk layers poisoned");
                    open.retain(|_, l| l.strong_count() > 0);
                    open.insert(digest, Arc::downgrade(&layer));
                    Ok(layer)
                });
                task.await.unwrap_or_else(|e| Err(e.into()))
            })
            .await
    }

    fn open_disk_layer(&self, digest: &Digest) -> Option<Arc<DiskLayer>> {
        let open = self.disk_layers.lock().expect("disk layers poisoned");
        open.get(digest).and_then(Weak::upgrade)
    }

    /// Forgets the memo of a layer that is now mounted.
    pub fn mounted(&self, digest: &Digest) {
        self.recent_layers.take(digest);
    }

    /// Opens keep-alive connections to `reference`'s registry in the
    /// background: one per GET that resolving an image's layers at once
    /// starts (a tail per layer), so none waits for a TCP handshake.
    pub fn preconnect(self: &Arc<Self>, reference: &Reference) {
        let (me, repo) = (self.clone(), reference.repository.clone());
        let (done, rx) = watch::channel(false);
        {
            let mut connecting = self.connecting.lock().expect("connecting map poisoned");
            // Twenty pulls at once need the connections once.
            if connecting
                .get(repo.host())
                .is_some_and(|(at, _)| at.elapsed() < PRECONNECT_FRESH)
            {
                return;
            }
            connecting.insert(repo.host().to_string(), (Instant::now(), rx));
        }
        tokio::spawn(async move {
            me.client.preconnect(&repo, PRECONNECT).await;
            let _ = done.send(true);
        });
    }

    /// Waits (a bounded while) for connections being opened to `host`:
    /// they were started before this GET, so they are ready before a new
    /// one would be; without the wait the GET opens one of its own.
    async fn connected(&self, host: &str) {
        let rx = self
            .connecting
            .lock()
            .expect("connecting map poisoned")
            .get(host)
            .map(|(_, rx)| rx.clone());
        if let Some(mut rx) = rx {
            let _ = tokio::time::timeout(PRECONNECT_WAIT, rx.wait_for(|d| *d)).await;
        }
    }

    /// Takes `image` as the manifest of `image_ref` (from a client that
    /// fetched it, `tarn pull`) and starts resolving its layers ahead.
    /// Returns how many layers carry a TOC digest.
    pub fn expect(
        self: &Arc<Self>,
        image_ref: &str,
        image: ResolvedImage,
        skip: HashSet<Digest>,
    ) -> usize {
        let lazy = image
            .layers
            .iter()
            .filter(|d| d.annotations.contains_key(TOC_DIGEST))
            .count();
        // A newer manifest for the tag: resolve its layers too.
        let known = self.recent_images.get(&image_ref.to_owned());
        if known.is_some_and(|k| k.manifest_digest != image.manifest_digest) {
            self.started.take(&image_ref.to_owned());
        }
        self.recent_images
            .put(image_ref.to_owned(), Arc::new(image));
        self.ahead(image_ref, skip);
        lazy
    }

    /// Starts resolving, in the background and all at once, every layer of
    /// `image_ref` that carries a TOC digest annotation, except `skip`.
    pub fn ahead(self: &Arc<Self>, image_ref: &str, skip: HashSet<Digest>) {
        if self.started.get(&image_ref.to_owned()).is_some() {
            return;
        }
        self.started.put(image_ref.to_owned(), ());
        let (me, r) = (self.clone(), image_ref.to_owned());
        tokio::spawn(async move {
            let image = match me.image(&r).await {
                Ok(i) => i,
                Err(e) => {
                    tracing::debug!(image = %r, error = %e, "resolve ahead: no manifest");
                    // The Prepares will say why; a later one may try again.
                    me.started.take(&r);
                    return;
                }
            };
            // The config names the entrypoint: fetched while layers open.
            let entry = (me.prefetch.is_some()).then(|| {
                let (me, r, image) = (me.clone(), r.clone(), image.clone());
                tokio::spawn(async move { me.config_entrypoint(&r, &image).await })
            });
            // The image's start profile, looked for once, replayed on each
            // layer as it opens.
            let profile = Arc::new(tokio::sync::OnceCell::new());
            let mut opened = Vec::new();
            for desc in image.layers.iter().filter(|d| !skip.contains(&d.digest)) {
                let Some(toc) = desc
                    .annotations
                    .get(TOC_DIGEST)
                    .and_then(|t| t.parse().ok())
                else {
                    continue;
                };
                let info = RemoteLayer {
                    image_ref: r.clone(),
                    digest: desc.digest,
                    toc_digest: Some(toc),
                };
                let (me, size) = (me.clone(), desc.size);
                let (tx, rx) = tokio::sync::oneshot::channel();
                opened.push(rx);
                let (profile, image) = (profile.clone(), image.clone());
                tokio::spawn(async move {
                    match me.layer(&info, Some(size)).await {
                        // Its prioritized files too, all layers at once: the
                        // Prepare of this layer then waits only for what is
                        // still on the wire (chunk fetches are shared).
                        Ok(r) => {
                            let _ = tx.send(r.layer.clone());
                            if me.profiles.is_some() {
                                let (me, layer) = (me.clone(), r.layer.clone());
                                tokio::spawn(async move {
                                    let found = profile
                                        .get_or_init(|| me.profile(&info.image_ref, &image))
                                        .await;
                                    if let Some(section) =
                                        found.as_ref().and_then(|p| p.layer(&info.digest))
                                    {
                                        profiles::replay(&layer, section).await;
                                    }
                                });
                            }
                            if let Some(timeout) = me.prefetch {
                                let _ = r.layer.prefetch(timeout).await;
                            }
                            // Fills the link from now, not from the mount;
                            // it stops if the layer is never mounted and
                            // leaves the memo.
                            if me.background {
                                r.layer.start_background().detach();
                            }
                        }
                        Err(e) => {
                            tracing::debug!(layer = %info.digest, error = %e, "resolve ahead failed");
                        }
                    }
                });
            }
            // Once every layer is open (their TOCs no longer share the
            // link), the program the container will run first.
            let Some(task) = entry else { return };
            let Ok(Some(entry)) = task.await else { return };
            let mut layers = Vec::new();
            for rx in opened {
                layers.extend(rx.await.ok());
            }
            let fetched = tarn_fs::layer::prefetch_entrypoint(&layers, &entry).await;
            tracing::debug!(image = %r, program = %entry.argv0, ?fetched, "entrypoint prefetched");
            // Decoding it freed megabytes of buffers malloc would keep.
            let _ = tokio::task::spawn_blocking(tarn_fs::memory::release_free_memory).await;
        });
    }

    /// The program `image`'s config runs, if it names one (`None` also when
    /// the config cannot be fetched: this only decides a prefetch).
    /// The trace in the acceleration layer `digest` of `image_ref`: the
    /// blob read whole in one ranged GET (at most
    /// [`trace::MAX_TRACE_BLOB`] bytes), its sha256 checked, then parsed.
    async fn fetch_trace(
        &self,
        image_ref: &str,
        digest: Digest,
        blob_size: u64,
    ) -> Result<Trace, TraceError> {
        if blob_size == 0 || blob_size > trace::MAX_TRACE_BLOB {
            return Err(TraceError::Size(blob_size));
        }
        let reference: Reference = image_ref.parse()?;
        self.connected(reference.repository.host()).await;
        let blob = self
            .client
            .read_range(
                &reference.repository,
                &digest,
                0..blob_size,
                Intent::Prefetch,
            )
            .await?;
        let actual = Digest::of(&blob);
        if actual != digest {
            return Err(TraceError::Digest(actual));
        }
        Ok(Trace::from_layer(&blob)?)
    }

    /// The start profile of `image` (pulled as `image_ref`): this node's,
    /// else one pushed to the registry (kept here once found). Any
    /// failure is a log line and no profile.
    async fn profile(&self, image_ref: &str, image: &ResolvedImage) -> Option<Arc<Profile>> {
        let store = self.profiles.clone()?;
        let manifest = image.manifest_digest;
        let s = store.clone();
        let local = tokio::task::spawn_blocking(move || s.load(&manifest))
            .await
            .ok()
            .flatten();
        if local.is_some() || !store.registry {
            return local;
        }
        let reference: Reference = image_ref.parse().ok()?;
        self.connected(reference.repository.host()).await;
        let found = self
            .client
            .find_referrer(
                &reference.repository,
                &manifest,
                profile_doc::MEDIA_TYPE,
                profile_doc::MAX_BYTES as u64,
            )
            .await;
        let bytes = match found {
            Ok(Some(b)) => b,
            Ok(None) => {
                tracing::debug!(image = %image_ref, %manifest, "no start profile in the registry");
                return None;
            }
            Err(e) => {
                tracing::info!(image = %image_ref, %manifest, error = %e, "start profile: not fetched from the registry");
                return None;
            }
        };
        let profile = match Profile::parse(&bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(image = %image_ref, %manifest, error = %e, "start profile from the registry ignored");
                return None;
            }
        };
        let foreign: Vec<String> = profile
            .layers
            .iter()
            .filter(|l| !image.layers.iter().any(|d| d.digest == l.digest))
            .map(|l| l.digest.to_string())
            .collect();
        if !foreign.is_empty() {
            tracing::warn!(image = %image_ref, %manifest, layers = ?foreign, "start profile names layers the image does not have (ignored)");
        }
        tracing::info!(image = %image_ref, %manifest, files = profile.files(), "start profile found in the registry");
        let profile = Arc::new(profile);
        let p = profile.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = store.save(&manifest, &p) {
                tracing::warn!(%manifest, error = %e, "cannot keep the start profile");
            }
        })
        .await;
        Some(profile)
    }

    async fn config_entrypoint(
        &self,
        image_ref: &str,
        image: &ResolvedImage,
    ) -> Option<Entrypoint> {
        const MAX_CONFIG: u64 = 1 << 20;
        if image.config.size > MAX_CONFIG {
            return None;
        }
        let reference: Reference = image_ref.parse().ok()?;
        self.connected(reference.repository.host()).await;
        match self
            .client
            .fetch_blob(&reference.repository, &image.config.digest)
            .await
        {
            Ok(config) => Entrypoint::from_config(&config),
            Err(e) => {
                tracing::debug!(image = %image_ref, error = %e, "no config for the entrypoint");
                None
            }
        }
    }

    /// `source` with peers in front, when `[peers]` is on and the layer's
    /// chunks are checked against a TOC whose digest the image names: a
    /// peer's bytes are then verified as the registry's are. Not for a
    /// layer without a TOC digest (a peer could forge its TOC and chunks
    /// together), nor for overlaybd blocks (a CRC32C is no check against
    /// a forger; issue 17: only where a digest table exists).
    fn peers_first(
        &self,
        repo: &Repository,
        info: &RemoteLayer,
        size: u64,
        source: Arc<dyn BlobSource>,
    ) -> Arc<dyn BlobSource> {
        peers_first(self.peers.as_ref(), repo, info, size, source)
    }

    async fn open(
        self: &Arc<Self>,
        info: &RemoteLayer,
        blob_size: Option<u64>,
    ) -> Result<Resolved<Arc<Layer>>, ResolveError> {
        let reference: Reference = info.image_ref.parse()?;
        let size = match blob_size {
            Some(s) => s,
            None => {
                let image = self.image(&info.image_ref).await?;
                let desc = image
                    .layers
                    .iter()
                    .find(|l| l.digest == info.digest)
                    .ok_or_else(|| ResolveError::NotInImage {
                        image_ref: info.image_ref.clone(),
                        digest: info.digest,
                    })?;
                desc.size
            }
        };
        self.connected(reference.repository.host()).await;
        let source = self
            .client
            .blob_source(&reference.repository, info.digest, size)
            .await;
        let source = self.peers_first(&reference.repository, info, size, source);
        let format = Arc::new(Estargz::with_max_index_bytes(self.max_index_bytes));
        let layer = Layer::open_format(
            source,
            format,
            info.toc_digest,
            self.cache.clone(),
            // The host's link: its speculation budget is its own.
            self.scheduler.for_host(reference.repository.host()),
        )
        .await?;
        Ok(Resolved {
            layer: Arc::new(layer),
            blob_size: size,
            toc_digest: info.toc_digest,
        })
    }
}

/// Why an acceleration layer's trace is not replayed.
#[derive(Debug, thiserror::Error)]
enum TraceError {
    #[error("blob of {0} bytes (at most {max})", max = trace::MAX_TRACE_BLOB)]
    Size(u64),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("blob's sha256 is {0}, not its digest")]
    Digest(Digest),
    #[error(transparent)]
    Format(#[from] tarn_fs::format::overlaybd::ObdError),
}

impl Resolve for Arc<Resolver> {
    type Layer = Arc<Layer>;

    async fn layer(
        &self,
        layer: &RemoteLayer,
        blob_size: Option<u64>,
    ) -> Result<Resolved<Arc<Layer>>, ResolveError> {
        Resolver::layer(self, layer, blob_size).await
    }

    fn ahead(&self, image_ref: &str, skip: HashSet<Digest>) {
        Resolver::ahead(self, image_ref, skip)
    }

    fn expect(&self, image_ref: &str, image: ResolvedImage, skip: HashSet<Digest>) -> usize {
        Resolver::expect(self, image_ref, image, skip)
    }

    fn preconnect(&self, reference: &Reference) {
        Resolver::preconnect(self, reference)
    }

    fn mounted(&self, digest: &Digest) {
        Resolver::mounted(self, digest)
    }

    async fn trace(&self, image_ref: &str, digest: Digest, blob_size: u64) -> Option<Trace> {
        let got = self.fetch_trace(image_ref, digest, blob_size).await;
        got.map_err(|e| tracing::warn!(image = %image_ref, layer = %digest, error = %e, "acceleration layer's trace not replayed"))
            .ok()
    }

    async fn manifest_digest(&self, image_ref: &str) -> Option<Digest> {
        let image = self.image(image_ref).await.ok()?;
        Some(image.manifest_digest)
    }

    async fn entrypoint(&self, image_ref: &str) -> Option<Entrypoint> {
        self.prefetch?;
        let image = self.image(image_ref).await.ok()?;
        self.config_entrypoint(image_ref, &image).await
    }

    async fn disk_layer(
        &self,
        image_ref: &str,
        digest: Digest,
        blob_size: u64,
    ) -> Result<Arc<DiskLayer>, ResolveError> {
        Resolver::disk_layer(self, image_ref, digest, blob_size).await
    }

    fn registry_stats(&self) -> ClientStats {
        self.client.stats()
    }

    fn peer_stats(&self) -> PeerStats {
        self.peers.as_ref().map(Peers::stats).unwrap_or_default()
    }
}

/// [`Resolver::peers_first`], pure.
fn peers_first(
    peers: Option<&Peers>,
    repo: &Repository,
    info: &RemoteLayer,
    size: u64,
    source: Arc<dyn BlobSource>,
) -> Arc<dyn BlobSource> {
    let Some(peers) = peers else {
        return source;
    };
    if info.toc_digest.is_none() {
        return source;
    }
    let peer = PeerBlob::new(peers.clone(), repo.clone(), info.digest, size);
    Arc::new(Sources::new(Arc::new(peer)).then(source))
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use futures::future::BoxFuture;
    use tarn_fs::peer::PeerSettings;

    use super::*;

    /// A blob of zeros that counts its reads.
    struct Zeros(AtomicUsize);

    impl BlobSource for Zeros {
        fn size(&self) -> u64 {
            1 << 20
        }

        fn read_range(
            &self,
            range: Range<u64>,
            _intent: Intent,
        ) -> BoxFuture<'_, Result<Bytes, RegistryError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let len = usize::try_from(range.end - range.start).unwrap_or(0);
            Box::pin(async move { Ok(Bytes::from(vec![0u8; len])) })
        }
    }

    #[tokio::test]
    async fn peers_go_first_only_for_layers_whose_toc_the_image_pins() {
        let peers = Peers::new(PeerSettings {
            own: None,
            members: Vec::new(),
            token: "t".into(),
            first_byte: Duration::from_secs(1),
            total: Duration::from_secs(5),
        })
        .unwrap();
        let repo = Repository {
            registry: "127.0.0.1:5000".into(),
            name: "app".into(),
        };
        let layer = |toc: Option<Digest>| RemoteLayer {
            image_ref: "127.0.0.1:5000/app:1".into(),
            digest: Digest::of(b"layer"),
            toc_digest: toc,
        };
        let registry = Arc::new(Zeros(AtomicUsize::new(0)));
        let source: Arc<dyn BlobSource> = registry.clone();
        let verified = layer(Some(Digest::of(b"toc")));
        let unverified = layer(None);
        for (peers, info, ahead) in [
            (None, &verified, false),
            (Some(&peers), &unverified, false),
            (Some(&peers), &verified, true),
        ] {
            let got = peers_first(peers, &repo, info, 1 << 20, source.clone());
            assert_eq!(!Arc::ptr_eq(&got, &source), ahead, "{:?}", info.toc_digest);
            // With no live peer, a read still ends at the registry.
            let before = registry.0.load(Ordering::SeqCst);
            got.read_range(0..10, Intent::OnDemand).await.unwrap();
            assert_eq!(registry.0.load(Ordering::SeqCst), before + 1);
        }
    }
}
