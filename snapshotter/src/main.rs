//! `tarn-snapshotter`: parses flags and config, then serves.

use std::path::PathBuf;
use std::time::Duration;

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

/// After the grace period, how long the stop may still take before the
/// process exits regardless (the bound is the grace plus 1 s).
const EXIT_SLACK: Duration = Duration::from_millis(500);

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
    let config = match &args.config {
        Some(path) => Config::load(path, true)?,
        None => Config::load(config::DEFAULT_CONFIG.as_ref(), false)?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(serve(args, config));
    // Never wait for blocking work here (a FUSE session a container holds,
    // a read stuck on the network): stopping has had its grace period, and
    // what is left ends with the process.
    runtime.shutdown_background();
    result
}

async fn serve(args: Args, config: Config) -> anyhow::Result<()> {
    let admin_address = args
        .admin_address
        .clone()
        .unwrap_or_else(|| config.admin_address(&args.address));
    let grace = config.shutdown_grace();
    tarn_snapshotter::server::run(
        &args.root,
        &args.address,
        &admin_address,
        &config,
        shutdown_signal(grace)?,
    )
    .await
    .context("tarn-snapshotter failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT, and from then on bounds the
/// stop: if the process still runs `grace` + [`EXIT_SLACK`] later, it exits
/// (status 0: it is stopping as asked; the running containers' lazy
/// layers then fail with ENOTCONN, as they would after a clean stop).
fn shutdown_signal(
    grace: Duration,
) -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        // A thread of its own: nothing on the runtime can hold it up.
        let watchdog = std::thread::Builder::new()
            .name("shutdown-deadline".to_string())
            .spawn(move || {
                std::thread::sleep(grace + EXIT_SLACK);
                tracing::warn!("still stopping after the grace period: exiting");
                std::process::exit(0);
            });
        if let Err(e) = watchdog {
            tracing::warn!(error = %e, "cannot bound the stop: no deadline thread");
        }
    })
}
