//! tarn-bench: the measuring half of `make bench`. `scripts/bench.sh`
//! orchestrates (test beds, proxies, pulls, containers) and calls these
//! subcommands for what needs exact numbers: registry bytes between marks,
//! sequential reads, tree walks, daemon RSS, TOC entry counts, background
//! fetch completion, and the final report with ratios and targets.
//!
//! Every measuring subcommand prints one JSON object on stdout so the script
//! can store it as-is.

mod measure;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Measurements and the report of tarn's benchmark (see scripts/bench.sh).
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Registry traffic since a mark: body bytes and requests, from the
    /// registry's JSON access log read from byte offset FROM.
    Reglog {
        log: PathBuf,
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Read a file sequentially once with 1 MiB reads: bytes, seconds, MB/s.
    Read { file: PathBuf },
    /// Walk a tree, lstat every entry (what `find -exec stat` does, without
    /// a process per file): entries and seconds.
    Walk { dir: PathBuf },
    /// Resident set size of a process (VmRSS), in bytes.
    Rss { pid: u32 },
    /// Total TOC entries of the eStargz layer blobs given.
    TocEntries { blobs: Vec<PathBuf> },
    /// Poll tarn's admin API until every mounted layer is fully fetched;
    /// print when that happened (Unix seconds) and the bytes fetched.
    WaitFetched {
        #[arg(long)]
        admin: PathBuf,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Layers that must be mounted before completion counts.
        #[arg(long, default_value_t = 1)]
        min_layers: usize,
    },
    /// Layers the daemon serves lazily and its fallback count.
    Layers {
        #[arg(long)]
        admin: PathBuf,
    },
    /// Turn the records (JSON lines) into the table on stdout and
    /// results.json.
    Report {
        records: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tarn-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let value = match cli.command {
        Command::Reglog { log, from } => measure::reglog(&log, from)?,
        Command::Read { file } => measure::read(&file)?,
        Command::Walk { dir } => measure::walk(&dir)?,
        Command::Rss { pid } => measure::rss(pid)?,
        Command::TocEntries { blobs } => measure::toc_entries(&blobs)?,
        Command::WaitFetched {
            admin,
            timeout,
            min_layers,
        } => measure::admin::wait_fetched(
            &admin,
            std::time::Duration::from_secs(timeout),
            min_layers,
        )?,
        Command::Layers { admin } => measure::admin::layers(&admin)?,
        Command::Report { records, out } => {
            let text = report::run(&records, &out)?;
            print!("{text}");
            return Ok(());
        }
    };
    println!("{value}");
    Ok(())
}
