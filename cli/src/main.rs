//! `tarn`: the command line. Each subcommand lives in its own file; this one
//! only parses flags, sets up logging and reports errors.

mod cache;
mod containerd;
mod convert;
mod mount_layer;
mod optimize;
mod profile;
mod pull;
mod status;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// tarn: lazily pulled, verified eStargz image layers for containerd.
#[derive(Parser)]
#[command(name = "tarn", version)]
struct Cli {
    /// Log filter (e.g. `info`, `tarn_fs=debug`); `RUST_LOG` works too.
    #[arg(long, global = true, env = "TARN_LOG", default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Pull(pull::PullArgs),
    Status(status::StatusArgs),
    Cache(cache::CacheArgs),
    MountLayer(mount_layer::Args),
    Convert(convert::ConvertArgs),
    Optimize(optimize::OptimizeArgs),
    Profile(profile::ProfileArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let result = match cli.command {
        // Owns its runtime: FUSE replies need a handle to it after mounting.
        Command::MountLayer(args) => mount_layer::run(args),
        Command::Pull(args) => pull::run(args),
        Command::Status(args) => block_on(status::run(args)),
        Command::Cache(args) => block_on(cache::run(args)),
        Command::Convert(args) => convert::run(args),
        // Sync: it runs the pull (which has its own runtime) and `ctr`.
        Command::Optimize(args) => optimize::run(args),
        Command::Profile(args) => block_on(profile::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            eprintln!("tarn: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One thread: these commands wait on containerd and the registry, not the
/// CPU, and twenty `tarn pull`s started at once should not each start a
/// worker per core.
pub(crate) fn block_on<T>(f: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}
