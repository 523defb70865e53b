//! `tarn pull`: an image into containerd 1.6 with tarn (or any snapshotter)
//! unpacking it, built from containerd's content, snapshots, diff, images and
//! leases services. Every layer is offered to the snapshotter with the labels
//! a lazy snapshotter needs; only layers it cannot serve lazily are
//! downloaded and applied.

mod labels;
mod lock;
mod progress;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use containerd_client::types::Descriptor as CtdDescriptor;
use tarn_fs::Digest;

use crate::containerd::{Containerd, Prepared};
use futures::{StreamExt, TryStreamExt};
use labels::ImageFacts;
pub use progress::human;
use progress::{LayerState, Progress};
use tarn_fs::Intent;
use tarn_fs::registry::{Descriptor, Reference, RegistryClient, RegistryConfig, ResolvedImage};

/// How long containerd keeps a crashed pull's content before collecting it.
const LEASE_EXPIRY: Duration = Duration::from_secs(3600);

/// A layer downloads as ranged GETs of this size, a few at a time: progress
/// per range, and the round trips overlap on a far registry.
const DOWNLOAD_RANGE: u64 = 8 << 20;
const DOWNLOAD_PARALLEL: usize = 4;

/// Pull an image into containerd, lazily where the snapshotter can.
#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// Image reference, e.g. 127.0.0.1:5000/app:latest
    pub reference: String,
    /// Reach the registry over plain HTTP (localhost is always plain HTTP)
    #[arg(long)]
    pub plain_http: bool,
    /// containerd's gRPC socket
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub address: PathBuf,
    /// containerd namespace to pull into
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Snapshotter that unpacks the image
    #[arg(long, default_value = "tarn")]
    pub snapshotter: String,
    /// Bytes of each lazy layer the snapshotter should prefetch before the
    /// layer is used (passed as the stargz prefetch label)
    #[arg(long)]
    pub prefetch_size: Option<u64>,
    /// The tarn daemon's admin socket: told about the pull as soon as the
    /// manifest is in, so it resolves the lazy layers while the pull goes
    /// on (default with --snapshotter tarn: /run/tarn/admin.sock)
    #[arg(long)]
    pub admin_address: Option<PathBuf>,
}

/// Where the tarn daemon listens when `--admin-address` is not given.
const DEFAULT_ADMIN_ADDRESS: &str = "/run/tarn/admin.sock";

impl PullArgs {
    /// The admin socket to tell about this pull: the one given, else the
    /// default when the snapshotter is tarn (no other daemon listens there).
    fn expect_address(&self) -> Option<PathBuf> {
        self.admin_address
            .clone()
            .or_else(|| (self.snapshotter == "tarn").then(|| PathBuf::from(DEFAULT_ADMIN_ADDRESS)))
    }
}

/// A registry client reaching `plain_http` hosts over plain HTTP (and
/// localhost, always).
pub(crate) async fn registry_client(plain_http: Vec<String>) -> Result<RegistryClient> {
    let config = RegistryConfig {
        plain_http,
        ..RegistryConfig::default()
    };
    // `new` reads the docker config file: keep that off the async workers.
    tokio::task::spawn_blocking(move || RegistryClient::new(config))
        .await
        .context("registry client setup task failed")?
        .context("cannot set up the registry client")
}

/// Tells the tarn daemon at `address` that `reference`, whose manifest is
/// `manifest`, is being pulled. A hint: a daemon that is not there or
/// refuses only costs the head start, so failures are logged, not raised.
async fn expect(address: PathBuf, reference: String, manifest: Vec<u8>) {
    use tarn_proto::admin::{ExpectRequest, admin_client::AdminClient};
    if !address.exists() {
        tracing::debug!(address = %address.display(), "no tarn admin socket; no head start");
        return;
    }
    let sent = async {
        let channel = containerd_client::connect(&address).await?;
        let reply = AdminClient::new(channel)
            .expect(ExpectRequest {
                image_ref: reference,
                manifest,
            })
            .await?;
        anyhow::Ok(reply.into_inner().layers)
    };
    match sent.await {
        Ok(layers) => tracing::debug!(layers, "tarn resolves the lazy layers ahead"),
        Err(e) => tracing::debug!(error = %e, "tarn did not take the pull hint"),
    }
}

/// What a finished pull did, for the summary line and tests.
#[derive(Default)]
struct Outcome {
    /// A concurrent pull had already done everything.
    up_to_date: bool,
    lazy: usize,
    unpacked: usize,
    present: usize,
    downloaded: u64,
}

pub fn run(args: PullArgs) -> Result<()> {
    let start = Instant::now();
    // The parse error already names the reference and what is wrong with it.
    let reference: Reference = args.reference.parse()?;
    // Concurrent pulls of one reference take turns. One that finds another
    // in flight joins it, as `docker pull` does: it waits, reads what that
    // pull finished, and is done without a request of its own to containerd
    // or the registry. Waiting comes first, before even the async runtime:
    // twenty pulls started at once should leave the CPU to the one that
    // works.
    let turn = lock::acquire(&args.address, &args.namespace, &args.reference, || {
        println!("waiting for another tarn pull of {}", args.reference);
    })?;
    let lock = match turn {
        lock::Turn::First(lock) => lock,
        lock::Turn::After(waited) => {
            if let Some(done) = &waited.done
                && done.snapshotter == args.snapshotter
            {
                println!(
                    "{} is up to date ({}, pulled by a concurrent tarn pull)",
                    args.reference, done.manifest
                );
                return Ok(());
            }
            // That pull failed, or unpacked into another snapshotter.
            waited.take()?
        }
    };
    crate::block_on(pull_holding(args, reference, lock, start))
}

/// The pull itself, once this process holds the lock for it.
async fn pull_holding(
    args: PullArgs,
    reference: Reference,
    lock: lock::PullLock,
    start: Instant,
) -> Result<()> {
    let mut ctd = Containerd::connect(&args.address, &args.namespace).await?;
    ctd.check_snapshotter(&args.snapshotter).await?;

    let plain = args
        .plain_http
        .then(|| reference.repository.registry.clone());
    let registry = registry_client(plain.into_iter().collect()).await?;
    // While the manifest is fetched, the daemon connects to the registry.
    let warmup = args
        .expect_address()
        .map(|a| tokio::spawn(expect(a, args.reference.clone(), Vec::new())));
    let image = registry
        .resolve(&reference)
        .await
        .with_context(|| format!("cannot resolve {}", args.reference))?;

    // The daemon starts on the layers while the config is fetched and the
    // unpack begins; the hint must not delay the pull itself.
    let hint = args.expect_address().map(|a| {
        tokio::spawn(expect(
            a,
            args.reference.clone(),
            image.manifest_bytes.clone(),
        ))
    });

    let nonce = format!("{}-{}", std::process::id(), now_nanos());
    ctd.create_lease(&format!("tarn-pull-{nonce}"), LEASE_EXPIRY)
        .await?;
    let pulled = pull(&ctd, &registry, &reference, &args, &image, &nonce).await;
    // The image record (written last) now holds everything; without it the
    // lease's end lets containerd collect a failed pull's leftovers.
    let released = ctd.delete_lease().await;
    for h in [warmup, hint].into_iter().flatten() {
        // Long done by now; never worth failing the pull over.
        let _ = h.await;
    }
    let outcome = pulled?;
    released?;
    lock.record_done(&image.manifest_digest, &args.snapshotter)?;
    // The pulls waiting for this one are done now, not after this process
    // has printed and shut its runtime down.
    drop(lock);

    if outcome.up_to_date {
        println!(
            "{} is up to date ({})",
            args.reference, image.manifest_digest
        );
        return Ok(());
    }
    println!(
        "pulled {} ({}): {} layers: {} lazy, {} unpacked ({} downloaded), {} already present, in {:.2}s",
        args.reference,
        image.manifest_digest,
        image.layers.len(),
        outcome.lazy,
        outcome.unpacked,
        human(outcome.downloaded),
        outcome.present,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn pull(
    ctd: &Containerd,
    registry: &RegistryClient,
    reference: &Reference,
    args: &PullArgs,
    image: &ResolvedImage,
    nonce: &str,
) -> Result<Outcome> {
    let source = distribution_source(reference);
    let config_bytes = fetch_config(ctd, registry, reference, &image.config, &source).await?;
    let diff_ids = labels::diff_ids(&config_bytes)?;
    if diff_ids.len() != image.layers.len() {
        bail!(
            "image config lists {} layers but the manifest has {}",
            diff_ids.len(),
            image.layers.len()
        );
    }
    let chains = labels::chain_ids(&diff_ids);
    let layer_digests: Vec<Digest> = image.layers.iter().map(|l| l.digest).collect();

    // A concurrent pull of this reference may have finished while we waited
    // for the lock: then there is nothing left to do.
    if let Some(top) = chains.last()
        && is_complete(ctd, &args.reference, args, &image.manifest_digest, top).await?
    {
        return Ok(Outcome {
            up_to_date: true,
            present: image.layers.len(),
            ..Outcome::default()
        });
    }

    let mut progress = Progress::new(image.layers.iter().map(|l| short(&l.digest)).collect());
    let facts = ImageFacts {
        reference: &args.reference,
        manifest_digest: &image.manifest_digest,
        layers: &layer_digests,
        prefetch_size: args.prefetch_size,
    };
    let mut outcome = Outcome::default();
    for (i, layer) in image.layers.iter().enumerate() {
        let chain = chains[i].to_string();
        if ctd
            .snapshot_stat(&args.snapshotter, &chain)
            .await?
            .is_some()
        {
            progress.set(i, LayerState::Present);
            outcome.present += 1;
            continue;
        }
        let parent = if i == 0 {
            String::new()
        } else {
            chains[i - 1].to_string()
        };
        let key = format!("extract-{nonce}-{i} {chain}");
        let labels = labels::snapshot_labels(&facts, i, &chains[i], &layer.annotations);
        match ctd
            .prepare(&args.snapshotter, &key, &parent, labels.clone())
            .await?
        {
            Prepared::AlreadyExists => {
                // The snapshotter claims the layer; make sure the committed
                // snapshot really is there before building on it.
                if ctd
                    .snapshot_stat(&args.snapshotter, &chain)
                    .await?
                    .is_none()
                {
                    bail!(
                        "snapshotter answered ALREADY_EXISTS for layer {} but has no snapshot {chain}",
                        layer.digest
                    );
                }
                progress.set(i, LayerState::Lazy);
                outcome.lazy += 1;
            }
            Prepared::Mounts(mounts) => {
                let unpack = Unpack {
                    ctd,
                    registry,
                    reference,
                    layer,
                    diff_id: &diff_ids[i],
                    source: &source,
                };
                match unpack.run(mounts, &mut progress, i).await {
                    Ok(bytes) => {
                        if !ctd.commit(&args.snapshotter, &chain, &key, labels).await? {
                            // Someone else committed this chain first: ours is surplus.
                            ctd.remove(&args.snapshotter, &key).await?;
                        }
                        progress.set(i, LayerState::Unpacked { bytes });
                        outcome.unpacked += 1;
                        outcome.downloaded += bytes;
                    }
                    Err(e) => {
                        // Leave no half-made snapshot behind; the original error
                        // is what the user needs to see.
                        if let Err(re) = ctd.remove(&args.snapshotter, &key).await {
                            tracing::warn!(
                                "cannot remove snapshot {key:?} after a failed unpack: {re:#}"
                            );
                        }
                        return Err(e.context(format!("cannot unpack layer {}", layer.digest)));
                    }
                }
            }
        }
    }

    // Keep the snapshot chain alive through the config, then publish the image.
    let top = chains.last().map(ToString::to_string);
    if let Some(top) = &chains.last() {
        ctd.content_set_labels(
            &image.config.digest.to_string(),
            &labels::config_gc_labels(&args.snapshotter, top),
        )
        .await?;
    }
    let mut manifest_labels = labels::manifest_gc_labels(&image.config.digest, &layer_digests);
    manifest_labels.extend(source.clone());
    let manifest = image.manifest_digest.to_string();
    ensure_content(
        ctd,
        &format!("manifest-{manifest}"),
        &manifest,
        Bytes::from(image.manifest_bytes.clone()),
        manifest_labels,
    )
    .await?;
    let target = CtdDescriptor {
        media_type: image.manifest_media_type.clone(),
        digest: manifest,
        size: i64::try_from(image.manifest_bytes.len()).context("manifest size overflows i64")?,
        ..Default::default()
    };
    ctd.put_image(&args.reference, target).await?;
    tracing::debug!(top = ?top, "image record written");
    Ok(outcome)
}

/// Whether `name` already points at `manifest` and its top snapshot exists.
async fn is_complete(
    ctd: &Containerd,
    name: &str,
    args: &PullArgs,
    manifest: &Digest,
    top: &Digest,
) -> Result<bool> {
    let Some(img) = ctd.get_image(name).await? else {
        return Ok(false);
    };
    if img.target.map(|t| t.digest) != Some(manifest.to_string()) {
        return Ok(false);
    }
    Ok(ctd
        .snapshot_stat(&args.snapshotter, &top.to_string())
        .await?
        .is_some())
}

/// The config blob, from containerd's content store if there, else from the
/// registry (and then stored).
async fn fetch_config(
    ctd: &Containerd,
    registry: &RegistryClient,
    reference: &Reference,
    config: &Descriptor,
    source: &HashMap<String, String>,
) -> Result<Bytes> {
    let digest = config.digest.to_string();
    if ctd.content_info(&digest).await?.is_some()
        && let Ok(bytes) = read_content(ctd, &digest, config.size).await
    {
        return Ok(bytes);
    }
    let bytes = registry
        .fetch_blob(&reference.repository, &config.digest)
        .await
        .with_context(|| format!("cannot fetch image config {digest}"))?;
    ensure_content(
        ctd,
        &format!("config-{digest}"),
        &digest,
        bytes.clone(),
        source.clone(),
    )
    .await?;
    Ok(bytes)
}

async fn read_content(ctd: &Containerd, digest: &str, size: u64) -> Result<Bytes> {
    let bytes = ctd.read_content(digest).await?;
    if bytes.len() as u64 != size || Digest::of(&bytes).to_string() != digest {
        bail!("content {digest} in containerd does not match its digest");
    }
    Ok(bytes)
}

/// Stores a small blob held in memory, or labels it if it is already there.
async fn ensure_content(
    ctd: &Containerd,
    ref_key: &str,
    digest: &str,
    bytes: Bytes,
    labels: HashMap<String, String>,
) -> Result<()> {
    if ctd.content_info(digest).await?.is_some() {
        return ctd.content_set_labels(digest, &labels).await;
    }
    ctd.write_content(ref_key, digest, labels, bytes, |_| {})
        .await
}

/// Downloading and applying one layer the snapshotter will not serve lazily.
struct Unpack<'a> {
    ctd: &'a Containerd,
    registry: &'a RegistryClient,
    reference: &'a Reference,
    layer: &'a Descriptor,
    diff_id: &'a Digest,
    source: &'a HashMap<String, String>,
}

impl Unpack<'_> {
    /// Returns the bytes downloaded (0 if the blob was already in containerd).
    async fn run(
        &self,
        mounts: Vec<containerd_client::types::Mount>,
        progress: &mut Progress,
        i: usize,
    ) -> Result<u64> {
        let digest = self.layer.digest.to_string();
        let total = self.layer.size;
        let mut downloaded = 0;
        if self.ctd.content_info(&digest).await?.is_none() {
            progress.set(i, LayerState::Downloading { done: 0, total });
            let bytes = self.download(progress, i).await?;
            let mut labels = self.source.clone();
            labels.insert(
                "containerd.io/uncompressed".into(),
                self.diff_id.to_string(),
            );
            self.ctd
                .write_content(&format!("layer-{digest}"), &digest, labels, bytes, |_| {})
                .await?;
            downloaded = total;
        }
        progress.set(i, LayerState::Applying);
        let desc = CtdDescriptor {
            media_type: self.layer.media_type.clone(),
            digest: digest.clone(),
            size: i64::try_from(total).context("layer size overflows i64")?,
            ..Default::default()
        };
        let applied = self.ctd.apply(desc, mounts).await?;
        if applied.digest != self.diff_id.to_string() {
            bail!(
                "layer {digest} unpacked to {} but the image config expects diff id {}",
                applied.digest,
                self.diff_id
            );
        }
        Ok(downloaded)
    }
}

impl Unpack<'_> {
    /// The whole layer blob, verified against its digest, fetched as ranged
    /// GETs so the user sees bytes arrive.
    async fn download(&self, progress: &mut Progress, i: usize) -> Result<Bytes> {
        let total = self.layer.size;
        let digest = &self.layer.digest;
        let repo = &self.reference.repository;
        let ranges = (0..total.div_ceil(DOWNLOAD_RANGE))
            .map(|n| n * DOWNLOAD_RANGE..((n + 1) * DOWNLOAD_RANGE).min(total));
        let mut parts = futures::stream::iter(ranges)
            .map(|r| self.registry.read_range(repo, digest, r, Intent::OnDemand))
            .buffered(DOWNLOAD_PARALLEL)
            .map_err(|e| anyhow::Error::from(e).context(format!("cannot download layer {digest}")));
        let mut blob = bytes::BytesMut::with_capacity(usize::try_from(total).unwrap_or(0));
        let mut hasher = tarn_fs::digest::Hasher::default();
        while let Some(part) = parts.try_next().await? {
            hasher.update(&part);
            blob.extend_from_slice(&part);
            progress.set(
                i,
                LayerState::Downloading {
                    done: blob.len() as u64,
                    total,
                },
            );
        }
        let actual = hasher.finish();
        if actual != *digest {
            bail!("layer {digest} downloaded with digest {actual}: the registry sent wrong bytes");
        }
        Ok(blob.freeze())
    }
}

/// containerd's `containerd.io/distribution.source.<host>` label, which lets
/// it find where content came from (cross-repository mounts on push).
fn distribution_source(r: &Reference) -> HashMap<String, String> {
    HashMap::from([(
        format!(
            "containerd.io/distribution.source.{}",
            r.repository.registry
        ),
        r.repository.name.clone(),
    )])
}

/// The first 12 hex digits, as container tools show digests.
fn short(d: &Digest) -> String {
    d.hex()[..12].to_string()
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
