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
    /// Take over from the tarn-snapshotter serving --root now (an upgrade):
    /// stop it (SIGTERM), wait for it to exit, then adopt its lazy mounts
    /// from the holder and serve. Without a running one, start as usual.
    #[arg(long)]
    takeover: bool,
    /// Run as the holder of FUSE connections at this socket (started by
    /// the daemon itself; see `[snapshotter] holder`).
    #[arg(long, value_name = "SOCK", hide = true)]
    fd_holder: Option<PathBuf>,
}

/// The serving daemon's pid, in its root (for `--takeover`).
const PID_FILE: &str = "daemon.pid";
/// After the old daemon's grace period, how much longer a takeover waits
/// for it before it kills it (its connections are in the holder anyway).
const TAKEOVER_SLACK: Duration = Duration::from_secs(5);

/// After the grace period, how long the stop may still take before the
/// process exits regardless (the bound is the grace plus 1 s).
const EXIT_SLACK: Duration = Duration::from_millis(500);

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads exist: see tarn_fs::memory.
    let tuned = tarn_fs::memory::tune_allocator();
    let args = Args::parse();
    if let Some(socket) = &args.fd_holder {
        return tarn_snapshotter::holder::serve(socket)
            .with_context(|| format!("holder at {}", socket.display()));
    }
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
    if args.takeover {
        take_over(&args.root, config.shutdown_grace())?;
    }
    let holder = config.snapshotter.holder;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(serve(args, config));
    if holder {
        // The lazy mounts were left to the holder: exit now, dropping
        // nothing. Dropping the runtime would drop the reads still being
        // fetched, and a dropped reply answers EIO; unanswered, the kernel
        // sends them again to the next daemon.
        let code = match &result {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("Error: {e:?}");
                1
            }
        };
        std::process::exit(code);
    }
    // Never wait for blocking work here (a FUSE session a container holds,
    // a read stuck on the network): stopping has had its grace period, and
    // what is left ends with the process.
    runtime.shutdown_background();
    result
}

/// Stops the daemon whose pid `root`'s pid file names, if it is a running
/// tarn-snapshotter, and waits until it is gone (killing it after its
/// grace period and [`TAKEOVER_SLACK`]).
fn take_over(root: &std::path::Path, grace: Duration) -> anyhow::Result<()> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let Some(pid) = std::fs::read_to_string(root.join(PID_FILE))
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|p| *p > 0 && u32::try_from(*p).ok() != Some(std::process::id()))
    else {
        tracing::info!("nothing to take over from");
        return Ok(());
    };
    // A stale file may name a pid reused by another program.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !comm.starts_with("tarn-snapshotte") {
        tracing::info!(
            pid,
            "the daemon in the pid file is gone; nothing to take over from"
        );
        return Ok(());
    }
    tracing::info!(pid, "taking over: stopping the running daemon");
    let pid = Pid::from_raw(pid);
    kill(pid, Signal::SIGTERM).with_context(|| format!("signal {pid}"))?;
    let deadline = std::time::Instant::now() + grace + TAKEOVER_SLACK;
    let gone = |pid: Pid| {
        // Gone, or a zombie its parent has not reaped yet.
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))
        })
    };
    while !gone(pid) {
        if std::time::Instant::now() >= deadline {
            tracing::warn!(%pid, "the old daemon did not stop in time: killing it");
            let _ = kill(pid, Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    while !gone(pid) && std::time::Instant::now() < deadline + TAKEOVER_SLACK {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

async fn serve(args: Args, config: Config) -> anyhow::Result<()> {
    let pid_file = args.root.join(PID_FILE);
    let written = std::fs::create_dir_all(&args.root)
        .and_then(|()| std::fs::write(&pid_file, format!("{}\n", std::process::id())));
    if let Err(e) = written {
        tracing::warn!(path = %pid_file.display(), error = %e, "cannot write the pid file; --takeover will not find this daemon");
    }
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
