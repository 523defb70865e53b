//! `tarn optimize SRC DST [-- CMD ARGS...]`: runs an image's workload once
//! through containerd and tarn, records which files it opened, and pushes
//! the image as eStargz with those files first in each layer, then the
//! prefetch landmark, then the rest.
//!
//! The recording is the daemon's (admin `StartRecording` and
//! `StopRecording`): every open and read of a lazily served layer passes
//! through its FUSE mounts, whether the bytes are fetched, cached or in the
//! page cache, so no fanotify, no private mount namespace and no privilege
//! beyond running a container is needed. The container is started with
//! containerd's own `ctr run`, on the tarn snapshotter.
//!
//! An image whose layers are not all eStargz is converted to DST first
//! (plain eStargz, so that tarn can serve it lazily), run from there, and
//! DST is then overwritten by the optimized image.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tarn_fs::Digest;
use tarn_fs::layer::profile::{
    FileProfile, LayerProfile, MEDIA_TYPE as PROFILE_MEDIA_TYPE, Profile,
};
use tarn_fs::registry::{Descriptor, Reference, RegistryClient, RegistryConfig};
use tarn_proto::admin::{LayerRecording, StartRecordingRequest, StopRecordingRequest};

use crate::convert::{self, ConvertArgs, TOC_DIGEST};
use crate::pull::{self, PullArgs};

/// Run an image's workload once and push it as eStargz with the files it
/// read first (prioritized, before `.prefetch.landmark`).
///
/// The workload runs as a container through containerd (`ctr run`) on the
/// tarn snapshotter, until it exits or --period ends; the tarn daemon
/// records which files of each layer it opened, in the order first
/// opened. Each layer of DST then holds those files first: lazy
/// snapshotters (tarn, stargz) fetch them before the container starts.
/// An image not yet eStargz is converted and pushed to DST first, run from
/// there, and DST is then replaced. Needs what `ctr run` needs (root) and
/// a running tarn-snapshotter.
#[derive(clap::Args, Debug)]
pub struct OptimizeArgs {
    /// The image to optimize, e.g. 127.0.0.1:5000/app:latest
    pub src: String,
    /// Where to push the result, e.g. 127.0.0.1:5000/app:opt
    pub dst: String,
    /// Reach the registries over plain HTTP (localhost is always plain HTTP)
    #[arg(long)]
    pub plain_http: bool,
    /// Seconds the workload may run before it is stopped (its reads until
    /// then are what gets prioritized)
    #[arg(long, default_value_t = 10)]
    pub period: u64,
    /// Environment for the workload (KEY=VALUE), repeatable
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Run the workload in the host's network namespace
    #[arg(long)]
    pub net_host: bool,
    /// containerd's gRPC socket
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub address: PathBuf,
    /// containerd namespace to pull into and run in
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// The tarn daemon's admin socket
    #[arg(long, default_value = "/run/tarn/admin.sock")]
    pub admin_address: PathBuf,
    /// Also write the recording to FILE: a JSON document
    /// (`application/vnd.tarn.profile.v1+json`): per layer digest, the
    /// files in first-open order with the byte ranges read through FUSE
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// containerd's command line client, which runs the workload
    #[arg(long, default_value = "ctr")]
    pub ctr: PathBuf,
    /// Directory for scratch files of the conversion
    #[arg(long, default_value = "/var/tmp")]
    pub work_dir: PathBuf,
    /// The workload: replaces the image's entrypoint and command (default:
    /// the image's own)
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub fn run(args: OptimizeArgs) -> Result<()> {
    let start = Instant::now();
    let src: Reference = args.src.parse()?;
    let dst: Reference = args.dst.parse()?;
    if dst.digest.is_some() {
        bail!("the destination {dst} names a digest: give a tag");
    }
    let layers = crate::block_on(layers_of(&src, args.plain_http))?;
    // tarn serves eStargz layers lazily; anything else is converted first,
    // so that its reads go through the daemon too.
    let run_ref = if layers
        .iter()
        .all(|l| l.annotations.contains_key(TOC_DIGEST))
    {
        args.src.clone()
    } else {
        println!("{src} is not all eStargz: converting it to {dst} first, to run it lazily");
        crate::block_on(convert::convert_prioritized(
            convert_args(&args, &args.src),
            &HashMap::new(),
        ))?;
        args.dst.clone()
    };
    pull::run(PullArgs {
        reference: run_ref.clone(),
        plain_http: args.plain_http,
        address: args.address.clone(),
        namespace: args.namespace.clone(),
        snapshotter: "tarn".to_owned(),
        prefetch_size: None,
        admin_address: Some(args.admin_address.clone()),
    })
    .with_context(|| format!("cannot pull {run_ref} through tarn"))?;
    let run_layers = crate::block_on(layers_of(&run_ref.parse()?, args.plain_http))?;
    let digests: Vec<Digest> = run_layers.iter().map(|l| l.digest).collect();
    let profile = crate::block_on(record(&args, &run_ref, &digests))?;
    if let Some(path) = &args.profile {
        let text = serde_json::to_vec_pretty(&profile.profile(&run_ref))?;
        std::fs::write(path, text)
            .with_context(|| format!("cannot write the profile to {}", path.display()))?;
        println!("wrote the recording to {}", path.display());
    }
    let recorded = profile.files();
    if run_ref == args.dst {
        // The local record of the plain conversion would outlive its tag,
        // which the optimized image is about to take.
        forget_image(&args, &run_ref);
    }
    let files: usize = recorded.values().map(Vec::len).sum();
    if files == 0 {
        bail!("the workload opened no file of {run_ref}'s layers: nothing to prioritize");
    }
    println!(
        "recorded {files} files in {} of {} layers",
        recorded.values().filter(|f| !f.is_empty()).count(),
        digests.len()
    );
    let digest = crate::block_on(convert::convert_prioritized(
        convert_args(&args, &run_ref),
        &recorded,
    ))?;
    println!(
        "optimized {src} -> {dst} ({digest}) in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn convert_args(args: &OptimizeArgs, src: &str) -> ConvertArgs {
    ConvertArgs {
        src: src.to_owned(),
        dst: args.dst.clone(),
        format: convert::Format::Estargz,
        plain_http: args.plain_http,
        work_dir: args.work_dir.clone(),
        vsize_gib: convert::DEFAULT_VSIZE_GIB,
    }
}

/// Removes containerd's record of `image` (its snapshots go with
/// containerd's garbage collection); a failure only costs disk.
fn forget_image(args: &OptimizeArgs, image: &str) {
    let out = Command::new(&args.ctr)
        .args(["--address", &args.address.to_string_lossy()])
        .args(["--namespace", &args.namespace, "images", "rm", image])
        .stdout(Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => tracing::warn!(
            image,
            error = %String::from_utf8_lossy(&o.stderr).trim(),
            "cannot remove containerd's record of the plain conversion"
        ),
        Err(e) => tracing::warn!(image, error = %e, "cannot run ctr images rm"),
    }
}

/// The layers of `reference` (the node's platform, for an index).
async fn layers_of(reference: &Reference, plain_http: bool) -> Result<Vec<Descriptor>> {
    let mut config = RegistryConfig::default();
    if plain_http {
        config
            .plain_http
            .push(reference.repository.registry.clone());
    }
    let registry = tokio::task::spawn_blocking(move || RegistryClient::new(config))
        .await
        .context("registry client setup task failed")?
        .context("cannot set up the registry client")?;
    let image = registry
        .resolve(reference)
        .await
        .with_context(|| format!("cannot resolve {reference}"))?;
    Ok(image.layers)
}

/// Records the files the workload opens, per layer digest, in first-open
/// order. The recording is stopped on every path out of the run.
async fn record(args: &OptimizeArgs, run_ref: &str, digests: &[Digest]) -> Result<Recording> {
    let mut admin = crate::status::connect(&args.admin_address).await?;
    let started = admin
        .start_recording(StartRecordingRequest {
            layer_digests: digests.iter().map(Digest::to_string).collect(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .context("the tarn daemon did not start recording")?
        .into_inner();
    let id = started.id;
    for d in &started.not_recorded {
        println!("layer {d} is not served lazily by tarn here: its reads are not recorded");
    }
    let ran = if started.not_recorded.len() == digests.len() {
        Err(anyhow::anyhow!(
            "no layer of {run_ref} is served lazily by the tarn daemon at {} \
             (was it pulled with another snapshotter?)",
            args.admin_address.display()
        ))
    } else {
        let (args_run, run_ref) = (Workload::of(args, run_ref), run_ref.to_owned());
        tokio::task::spawn_blocking(move || args_run.run())
            .await
            .context("workload task failed")
            .and_then(|r| r)
            .with_context(|| format!("cannot run {run_ref}"))
    };
    let stopped = admin
        .stop_recording(StopRecordingRequest { id })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .context("the tarn daemon did not stop recording")?
        .into_inner();
    let status = ran?;
    if !status.success() {
        println!("the workload ended with {status}; using what it read until then");
    }
    for l in &stopped.layers {
        l.layer_digest
            .parse::<Digest>()
            .with_context(|| format!("the daemon named layer {:?}", l.layer_digest))?;
    }
    Ok(Recording(stopped.layers))
}

/// What the daemon recorded, per layer.
struct Recording(Vec<LayerRecording>);

impl Recording {
    /// The files of each layer (by digest), in first-open order.
    fn files(&self) -> HashMap<Digest, Vec<String>> {
        self.0
            .iter()
            .filter_map(|l| {
                let digest = l.layer_digest.parse().ok()?;
                Some((digest, l.files.iter().map(|f| f.path.clone()).collect()))
            })
            .collect()
    }

    /// The recording as a start profile: layers in the image's order,
    /// each file with when it was first opened and the ranges read.
    fn profile(&self, image: &str) -> Profile {
        let layers = self
            .0
            .iter()
            .filter_map(|l| {
                Some(LayerProfile {
                    digest: l.layer_digest.parse().ok()?,
                    files: l
                        .files
                        .iter()
                        .map(|f| FileProfile {
                            path: f.path.clone(),
                            first_access_micros: f.first_access_micros,
                            ranges: f.ranges.iter().map(|r| [r.offset, r.length]).collect(),
                        })
                        .collect(),
                })
            })
            .collect();
        Profile {
            media_type: PROFILE_MEDIA_TYPE.to_owned(),
            image: image.to_owned(),
            layers,
        }
    }
}

/// The container the recording watches: `ctr run --rm` on the tarn
/// snapshotter, stopped at the end of the period.
struct Workload {
    ctr: PathBuf,
    global: Vec<String>,
    run: Vec<String>,
    id: String,
    period: Duration,
}

impl Workload {
    fn of(args: &OptimizeArgs, image: &str) -> Workload {
        let id = format!("tarn-optimize-{}", std::process::id());
        let global = vec![
            "--address".to_owned(),
            args.address.to_string_lossy().into_owned(),
            "--namespace".to_owned(),
            args.namespace.clone(),
        ];
        let mut run = vec![
            "run".to_owned(),
            "--rm".to_owned(),
            "--snapshotter".to_owned(),
            "tarn".to_owned(),
        ];
        for e in &args.env {
            run.extend(["--env".to_owned(), e.clone()]);
        }
        if args.net_host {
            run.push("--net-host".to_owned());
        }
        run.extend([image.to_owned(), id.clone()]);
        run.extend(args.command.iter().cloned());
        Workload {
            ctr: args.ctr.clone(),
            global,
            run,
            id,
            period: Duration::from_secs(args.period),
        }
    }

    /// Runs the container until it exits or the period ends (then kills
    /// it); returns `ctr run`'s exit status.
    fn run(&self) -> Result<ExitStatus> {
        let mut child = Command::new(&self.ctr)
            .args(&self.global)
            .args(&self.run)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", self.ctr.display()))?;
        let deadline = Instant::now() + self.period;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!(
            "the workload still runs after {} s: stopping it",
            self.period.as_secs()
        );
        let killed = Command::new(&self.ctr)
            .args(&self.global)
            .args(["task", "kill", "--signal", "SIGKILL", &self.id])
            .status();
        if !matches!(killed, Ok(s) if s.success()) {
            // Its task may not exist (yet, or any more): ctr run itself goes.
            let _ = child.kill();
        }
        Ok(child.wait()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tarn_proto::admin::{ByteRange, FileAccess};

    #[test]
    fn a_recording_keeps_its_order_as_files_and_as_a_document() {
        let digest = Digest::of(b"layer");
        let rec = Recording(vec![LayerRecording {
            layer_digest: digest.to_string(),
            files: vec![
                FileAccess {
                    path: "app/run.sh".into(),
                    first_access_micros: 10,
                    ranges: vec![ByteRange {
                        offset: 0,
                        length: 120,
                    }],
                },
                FileAccess {
                    path: "usr/bin/python3".into(),
                    first_access_micros: 900,
                    ranges: Vec::new(),
                },
            ],
        }]);
        assert_eq!(
            rec.files()[&digest],
            vec!["app/run.sh".to_string(), "usr/bin/python3".to_string()]
        );
        let doc = rec.profile("reg/app:1");
        let doc: serde_json::Value = serde_json::from_slice(&doc.to_bytes()).unwrap();
        assert_eq!(doc["mediaType"], PROFILE_MEDIA_TYPE);
        let files = &doc["layers"][0]["files"];
        assert_eq!(files[0]["path"], "app/run.sh");
        assert_eq!(files[0]["ranges"][0][1], 120);
        assert_eq!(files[1]["firstAccessMicros"], 900);
    }
}
