//! `tarn mount-layer`: mount one eStargz layer of an image, in the
//! foreground, until SIGINT or SIGTERM or until it is unmounted from outside.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use tarn_fs::Digest;
use tarn_fs::cache::Cache;
use tarn_fs::fetch::FetchScheduler;
use tarn_fs::format::Estargz;
use tarn_fs::format::estargz::IndexBudget;
use tarn_fs::fuse::{MountOptions, mount};
use tarn_fs::layer::Layer;
use tarn_fs::registry::{BlobSource, Reference, RegistryClient, RegistryConfig, RemoteBlob};

/// The manifest annotation naming the sha256 of a layer's TOC JSON.
const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";

/// Mount one eStargz layer of an image as a lazily fetched, verified,
/// read-only filesystem (a debugging aid).
///
/// Only the chunks that are read are fetched; each is checked against its
/// digest in the layer's TOC, and the TOC against the manifest's
/// `containerd.io/snapshot/stargz/toc.digest` annotation. Verified chunks are
/// cached under ROOT/cache and reused by later mounts. Stays in the
/// foreground; SIGINT or SIGTERM unmounts and prints what was fetched, and so
/// does an unmount of the mount point from outside (exit status 0).
#[derive(clap::Args)]
#[command(long_about)]
pub struct Args {
    /// Image reference, e.g. `127.0.0.1:5000/app:latest`.
    image_ref: String,
    /// Digest of the layer to mount (`sha256:...`), as in the manifest.
    layer_digest: Digest,
    /// Empty directory to mount the layer on.
    mountpoint: PathBuf,
    /// tarn's state directory; the chunk cache lives in ROOT/cache.
    #[arg(long, default_value = "/var/lib/tarn")]
    root: PathBuf,
    /// Speak plain HTTP to the image's registry (always done for loopback).
    #[arg(long)]
    plain_http: bool,
    /// Mount even if the manifest gives no TOC digest for the layer. Chunks
    /// are still verified, but against a TOC nobody vouched for.
    #[arg(long)]
    allow_unverified_toc: bool,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Serve every read through tarn, even of fully cached files the
    /// kernel could read directly (FUSE passthrough).
    #[arg(long)]
    no_passthrough: bool,
    /// Memory the layer's index may take, MiB (its TOC as fetched and
    /// decompressed, and the index built from it); a layer that needs more
    /// is refused.
    #[arg(long, default_value_t = IndexBudget::DEFAULT_LIMIT >> 20)]
    max_index_mb: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tarn-worker")
        .build()
        .context("starting the async runtime")?;

    let layer = runtime.block_on(open_layer(&args))?;
    let layer = Arc::new(layer);
    let options = MountOptions {
        threads: args.threads,
        passthrough: !args.no_passthrough,
        ..MountOptions::default()
    };
    let handle = mount(
        layer.clone(),
        &args.mountpoint,
        runtime.handle().clone(),
        &options,
    )?;
    println!(
        "mounted {} at {}",
        args.layer_digest,
        args.mountpoint.display()
    );

    let session = handle.session_end();
    let outside = runtime.block_on(async move {
        let ended = tokio::task::spawn_blocking(move || session.wait());
        tokio::select! {
            signal = wait_for_signal() => signal.map(|()| false),
            _ = ended => Ok(true),
        }
    })?;
    if outside {
        println!(
            "{} was unmounted from outside; exiting",
            args.mountpoint.display()
        );
    }
    handle.unmount()?;
    let s = layer.stats();
    println!(
        "fetched {} bytes in {} requests ({} chunks fetched, {} cache hits, {} verification failures)",
        s.bytes_fetched, s.requests, s.chunks_fetched, s.cache_hits, s.verify_failures
    );
    // A session someone still holds would keep a blocking task: not waited for.
    runtime.shutdown_background();
    Ok(())
}

async fn open_layer(args: &Args) -> anyhow::Result<Layer> {
    let reference: Reference = args.image_ref.parse()?;
    let mut config = RegistryConfig::default();
    if args.plain_http {
        config
            .plain_http
            .push(reference.repository.registry.clone());
    }
    let client = RegistryClient::new(config)?;
    let image = client.resolve(&reference).await?;
    let Some(desc) = image.layers.iter().find(|l| l.digest == args.layer_digest) else {
        bail!(
            "image {} has no layer {}",
            args.image_ref,
            args.layer_digest
        );
    };
    let toc_digest = match desc.annotations.get(TOC_DIGEST_ANNOTATION) {
        Some(d) => Some(d.parse::<Digest>().with_context(|| {
            format!("layer {}: annotation {TOC_DIGEST_ANNOTATION}", desc.digest)
        })?),
        None if args.allow_unverified_toc => None,
        None => bail!(
            "layer {} has no {TOC_DIGEST_ANNOTATION} annotation: not a verifiable eStargz layer \
             (--allow-unverified-toc mounts it anyway)",
            desc.digest
        ),
    };
    let cache_dir = args.root.join("cache");
    let cache = tokio::task::spawn_blocking(move || Cache::open(&cache_dir))
        .await
        .context("opening the cache")??;
    let source: Arc<dyn BlobSource> = Arc::new(RemoteBlob::new(
        client,
        reference.repository.clone(),
        desc.digest,
        desc.size,
    ));
    let format = Arc::new(Estargz::with_max_index_bytes(
        args.max_index_mb.saturating_mul(1 << 20),
    ));
    Layer::open_format(
        source,
        format,
        toc_digest,
        Arc::new(cache),
        FetchScheduler::global(),
    )
    .await
    .with_context(|| format!("opening layer {}", desc.digest))
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
