//! `tarn-snapshotter`: parses flags and config, then serves.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tarn_snapshotter::config::{self, Config};
use tracing_subscriber::EnvFilter;

/// tarn's containerd snapshotter: lazily pulled eStargz layers, overlayfs
/// semantics for everything else.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory holding snapshots and metadata.
    #[arg(long, value_name = "DIR", default_value = config::DEFAULT_ROOT)]
    root: PathBuf,
    /// Unix socket serving containerd's Snapshots API.
    #[arg(long, value_name = "SOCK", default_value = config::DEFAULT_ADDRESS)]
    address: PathBuf,
    /// Unix socket serving tarn's admin API (`tarn status`).
    /// [default: the config's admin_address, else admin.sock beside --address]
    #[arg(long, value_name = "SOCK")]
    admin_address: Option<PathBuf>,
    /// Configuration file (TOML); the default may be missing, an explicit
    /// one may not. [default: /etc/tarn/config.toml]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log filter (error, warn, info, debug, trace or a RUST_LOG-style
    /// directive); RUST_LOG wins when set.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
}

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads exist: see tarn_fs::memory.
    let tuned = tarn_fs::memory::tune_allocator();
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&args.log_level))
        .with_context(|| format!("invalid log level {:?}", args.log_level))?;
    tracing_subscriber::fmt().with_env_filter(filter).init();
    if !tuned {
        tracing::warn!("could not tune malloc; the daemon may hold more memory than it uses");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path, true)?,
        None => Config::load(config::DEFAULT_CONFIG.as_ref(), false)?,
    };
    let admin_address = args
        .admin_address
        .clone()
        .unwrap_or_else(|| config.admin_address(&args.address));
    tarn_snapshotter::server::run(
        &args.root,
        &args.address,
        &admin_address,
        &config,
        shutdown_signal()?,
    )
    .await
    .context("tarn-snapshotter failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
