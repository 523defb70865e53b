//! `tarn cache prune`: frees cache space through the daemon's admin API.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tarn_proto::admin::PruneCacheRequest;

use crate::pull::human;
use crate::status::connect;

/// Manage the daemon's chunk cache.
#[derive(clap::Args, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(clap::Subcommand, Debug)]
enum CacheCommand {
    Prune(PruneArgs),
}

/// Free the chunks of removed images (those no mounted layer uses any
/// more); with --all-unused, every entry no mounted layer lists.
#[derive(clap::Args, Debug)]
struct PruneArgs {
    /// Also free entries never released, such as chunks of layers
    /// unmounted before a restart and whole-file objects not open.
    #[arg(long)]
    all_unused: bool,
    /// The daemon's admin socket
    #[arg(long, default_value = "/run/tarn/admin.sock")]
    admin_address: PathBuf,
}

pub async fn run(args: CacheArgs) -> Result<()> {
    match args.command {
        CacheCommand::Prune(p) => prune(p).await,
    }
}

async fn prune(args: PruneArgs) -> Result<()> {
    let mut admin = connect(&args.admin_address).await?;
    let p = admin
        .prune_cache(PruneCacheRequest {
            all_unused: args.all_unused,
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .context("cannot prune the daemon's cache")?
        .into_inner();
    println!(
        "pruned {} entries ({}); cache disk {} -> {}",
        p.entries,
        human(p.bytes),
        human(p.disk_bytes_before),
        human(p.disk_bytes_after)
    );
    Ok(())
}
