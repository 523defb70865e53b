//! tarn-bench: the numbers of `make bench`. `scripts/bench.sh` only
//! orchestrates (test beds, proxies, pulls, containers) and writes down raw
//! facts, one note per run (`note`): start and end times, registry log
//! marks, and the `NAME=VALUE` words the measuring subcommands print
//! (sequential reads, tree walks, daemon RSS, TOC entries, background fetch
//! completion, whether a pull was lazy, the cache's disk against the
//! distinct bytes it holds). Everything computed from them is
//! computed here: `records` turns the notes into records (seconds, registry
//! traffic, medians of repeated runs), `report` the records into the table
//! with ratios and targets and results.json.

mod measure;
mod report;
mod runs;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use crate::runs::{Facts, Note};

/// Measurements, records and the report of tarn's benchmark (see
/// scripts/bench.sh).
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Append one run's raw facts (NAME=VALUE: start, end, reg_from, reg_to
    /// and what a measuring subcommand printed) to the NOTES file.
    Note {
        notes: PathBuf,
        #[arg(long)]
        profile: String,
        #[arg(long)]
        scenario: String,
        #[arg(long)]
        variant: String,
        /// One of several repetitions: the record is their median.
        #[arg(long)]
        rep: bool,
        /// The run failed, for this reason.
        #[arg(long)]
        fail: Option<String>,
        #[arg(value_parser = runs::parse_fact)]
        facts: Vec<(String, f64)>,
    },
    /// Wait until the registry's log has not grown for QUIET_MS (at most
    /// TIMEOUT seconds): a daemon may go on fetching after a pull.
    Settle {
        log: PathBuf,
        #[arg(long, default_value_t = 1000)]
        quiet_ms: u64,
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
    /// Registry traffic in the registry's log between two marks (sizes the
    /// log had; TO defaults to its end): bytes, requests.
    Traffic {
        log: PathBuf,
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long)]
        to: Option<u64>,
    },
    /// Read a file sequentially with 1 MiB reads: bytes, secs, mb_per_s of
    /// the median of PASSES passes.
    Read {
        file: PathBuf,
        #[arg(long, default_value_t = 1)]
        passes: usize,
        /// Empty the kernel's page, dentry and inode caches before each
        /// pass (root): what a read costs when only the snapshotter's own
        /// store (tarn's chunk cache, overlayfs's unpacked files) holds it;
        /// page_cache_mb: what the pass put in the page cache.
        #[arg(long)]
        drop_caches: bool,
    },
    /// Walk a tree, lstat every entry (what `find -exec stat` does, without
    /// a process per file): entries, secs, entries_per_s of the median pass.
    Walk {
        dir: PathBuf,
        #[arg(long, default_value_t = 1)]
        passes: usize,
        /// As for `read`.
        #[arg(long)]
        drop_caches: bool,
    },
    /// Resident set size of a process (VmRSS): rss_bytes.
    Rss { pid: u32 },
    /// TOC entries of the layers tarn serves lazily, their blobs found in
    /// the OCI layouts given: toc_entries, layers.
    TocEntries {
        #[arg(long)]
        admin: PathBuf,
        layouts: Vec<PathBuf>,
    },
    /// Bytes of an OCI layout's layer blobs: what a full fetch moves.
    LayoutBytes { layout: PathBuf },
    /// Wait until every layer tarn has mounted is fully fetched: end, when
    /// that happened (Unix seconds).
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
    /// A daemon's cache directory (in use) against the images of the OCI
    /// layouts given: cache_disk_bytes, unique_bytes (distinct chunks of
    /// those images it holds), whole_file_bytes, other_bytes.
    CacheFigures {
        #[arg(long)]
        cache: PathBuf,
        layouts: Vec<PathBuf>,
    },
    /// The cache's evictions and bound as the daemon counts them:
    /// cache_evictions, cache_evicted_bytes, cache_daemon_disk_bytes,
    /// cache_max_bytes.
    CacheStats {
        #[arg(long)]
        admin: PathBuf,
    },
    /// The break-even of carrying a cached chunk inside one ranged GET:
    /// two 64 KiB ranges with gaps of 4 KiB to 2 MiB between them, fetched
    /// as one GET or two at once from IMAGE's largest layer (tarn's own
    /// registry client): merged_ms_<gap>, split_ms_<gap> (medians),
    /// break_even_bytes.
    Gaps {
        image: String,
        #[arg(long)]
        plain_http: bool,
        #[arg(long, default_value_t = 9)]
        reps: usize,
    },
    /// Fail unless the pull was lazy (layers mounted lazily, no fallback):
    /// layers.
    LazyCheck {
        #[arg(long)]
        admin: PathBuf,
    },
    /// Turn the notes into records (JSON lines): seconds, registry traffic
    /// from the registry's log, medians of repetitions.
    Records {
        notes: PathBuf,
        #[arg(long)]
        registry_log: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Turn the records into the table on stdout and results.json.
    Report {
        records: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Fail unless every figure with a target passes.
        #[arg(long)]
        strict: bool,
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
    let facts = match cli.command {
        Command::Note {
            notes,
            profile,
            scenario,
            variant,
            rep,
            fail,
            facts,
        } => {
            let note = Note {
                profile,
                scenario,
                variant,
                rep,
                ok: fail.is_none(),
                reason: fail,
                facts: Facts(facts.into_iter().collect()),
            };
            let said = match &note.reason {
                Some(reason) => format!("FAILED: {reason}"),
                None => runs::shown(&note.facts),
            };
            eprintln!(
                "bench: {} {} {}: {said}",
                note.profile, note.scenario, note.variant
            );
            return runs::append(&notes, &note);
        }
        Command::Settle {
            log,
            quiet_ms,
            timeout,
        } => {
            tarn_integration::reglog::wait_quiet(
                &log,
                Duration::from_millis(quiet_ms),
                Duration::from_secs(timeout),
            )?;
            return Ok(());
        }
        Command::Traffic { log, from, to } => measure::traffic(&log, from, to.unwrap_or(u64::MAX))?,
        Command::Read {
            file,
            passes,
            drop_caches,
        } => measure::median_pass(passes, || {
            measure::pass_cold(drop_caches, || measure::read(&file))
        })?,
        Command::Walk {
            dir,
            passes,
            drop_caches,
        } => measure::median_pass(passes, || {
            measure::pass_cold(drop_caches, || measure::walk(&dir))
        })?,
        Command::Rss { pid } => measure::rss(pid)?,
        Command::TocEntries { admin, layouts } => {
            measure::toc_entries(&measure::admin::digests(&admin)?, &layouts)?
        }
        Command::LayoutBytes { layout } => measure::layout_bytes(&layout)?,
        Command::WaitFetched {
            admin,
            timeout,
            min_layers,
        } => measure::admin::wait_fetched(&admin, Duration::from_secs(timeout), min_layers)?,
        Command::CacheFigures { cache, layouts } => measure::cache_figures(&cache, &layouts)?,
        Command::CacheStats { admin } => measure::admin::cache_stats(&admin)?,
        Command::Gaps {
            image,
            plain_http,
            reps,
        } => measure::gaps::gaps(&image, plain_http, reps)?,
        Command::LazyCheck { admin } => measure::admin::lazy_check(&admin)?,
        Command::Records {
            notes,
            registry_log,
            out,
        } => return runs::run(&notes, &registry_log, &out),
        Command::Report {
            records,
            out,
            strict,
        } => {
            let (text, all_pass) = report::run(&records, &out)?;
            print!("{text}");
            if strict && !all_pass {
                bail!("a figure with a target did not pass (strict)");
            }
            return Ok(());
        }
    };
    println!("{facts}");
    Ok(())
}
