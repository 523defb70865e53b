//! tarn's command line. (Temporary main of branch `pull`; the real one with
//! `mount-layer` lives on branch `fuse`.)

mod containerd;
mod pull;
mod status;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tarn",
    version,
    about = "Lazy-pulling containerd snapshotter: command line"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Pull(pull::PullArgs),
    Status(status::StatusArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    let result = match rt {
        Ok(rt) => rt.block_on(async {
            match cli.command {
                Command::Pull(args) => pull::run(args).await,
                Command::Status(args) => status::run(args).await,
            }
        }),
        Err(e) => Err(anyhow::Error::from(e).context("cannot start the async runtime")),
    };
    if let Err(e) = result {
        eprintln!("tarn: {e:#}");
        std::process::exit(1);
    }
}
