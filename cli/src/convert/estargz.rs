//! `tarn convert SRC DST` (`--format estargz`, the default): every layer
//! rewritten as eStargz and pushed, a few layers at once.
//!
//! A layer goes through three steps, each streamed, none holding the layer
//! in memory: its blob downloaded to a scratch file, digest checked
//! ([`source::download`]); its tar (gzip, zstd or plain, as the bytes say)
//! read through tarn's eStargz writer into a second scratch file (the push
//! needs the blob's digest before its bytes, so the output is spooled);
//! that file pushed. The manifest gives each layer the annotations lazy
//! readers look for (the TOC digest, the uncompressed size); the config's
//! `diff_ids` are the sha256 of each new blob decompressed, which is the
//! source's tar with the landmark entry first and the TOC entry last, as
//! containerd unpacks it. A layer already eStargz (its descriptor has the
//! TOC digest annotation) is copied as it is. Scratch files live in one
//! temporary directory, removed on every path out; on a failure the
//! conversions still running stop at their next read.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use serde_json::{Value, json};
use tarn_fs::Digest;
use tarn_fs::format::estargz::{WriteOptions, WriteResult, write_estargz_reopen};
use tarn_fs::registry::Descriptor;

use super::{ConvertArgs, Source, scratch, source};
use crate::pull::human;

/// Layers converted at once: each takes one core to compress, and its two
/// scratch files of disk.
const PARALLEL: usize = 3;
/// The TOC digest annotation, the one lazy readers need.
pub const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// The uncompressed size annotation (stargz-snapshotter reads it to size
/// its cache).
pub const UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";
/// An eStargz blob is an ordinary gzip tar layer to everyone else.
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// One layer of the new image.
struct Layer {
    descriptor: Value,
    diff_id: Digest,
}

/// What every layer's conversion shares.
struct Job<'a> {
    source: &'a Source,
    work: &'a Path,
    /// The source config's diff IDs, checked for the layers copied as they
    /// are.
    diff_ids: Vec<Option<Digest>>,
    cancel: Arc<AtomicBool>,
    n: usize,
    /// Files to put first, per source layer digest.
    prioritized: &'a HashMap<Digest, Vec<String>>,
}

/// Sets the flag when dropped: the blocking conversions of a failed run
/// (or one whose other layer failed) stop at their next read.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

pub async fn convert(args: ConvertArgs) -> Result<()> {
    convert_prioritized(args, &HashMap::new()).await.map(|_| ())
}

/// Converts as [`convert`] does, putting in each layer named in
/// `prioritized` (by source digest) those files first, then the
/// prefetch landmark (`tarn optimize`); such a layer is rewritten even if
/// it is eStargz already. Returns the pushed manifest's digest.
pub async fn convert_prioritized(
    args: ConvertArgs,
    prioritized: &HashMap<Digest, Vec<String>>,
) -> Result<Digest> {
    let start = Instant::now();
    let source = Source::resolve(&args).await?;
    // Declared before the guard so that it is removed after the guard has
    // told running conversions to stop.
    let work = scratch(&args.work_dir)?;
    let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
    let job = Job {
        source: &source,
        work: work.path(),
        diff_ids: diff_ids(&source.config),
        cancel: cancel.0.clone(),
        n: source.image.layers.len(),
        prioritized,
    };
    // Unordered: a large layer does not hold back the start of the ones
    // after it; each result carries its place.
    let job = &job;
    let mut layers: Vec<(usize, Layer)> =
        futures::stream::iter(source.image.layers.iter().enumerate())
            .map(|(i, layer)| async move { job.layer(i, layer).await.map(|l| (i, l)) })
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
    layers.sort_by_key(|(i, _)| *i);
    let layers: Vec<Layer> = layers.into_iter().map(|(_, l)| l).collect();
    let diff_ids: Vec<Digest> = layers.iter().map(|l| l.diff_id).collect();
    let digest = source
        .push_image(
            &diff_ids,
            layers.into_iter().map(|l| l.descriptor).collect(),
        )
        .await?;
    println!(
        "pushed {} ({digest}): {} eStargz layers in {:.1} s",
        source.dst,
        job.n,
        start.elapsed().as_secs_f64()
    );
    drop(cancel);
    work.close()
        .context("cannot remove the scratch directory")?;
    Ok(digest)
}

/// The source config's `rootfs.diff_ids`, each parsed if it can be.
fn diff_ids(config: &Value) -> Vec<Option<Digest>> {
    config["rootfs"]["diff_ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .map(|d| d.as_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

impl Job<'_> {
    async fn layer(&self, i: usize, layer: &Descriptor) -> Result<Layer> {
        let what = || format!("layer {}/{} ({})", i + 1, self.n, layer.digest);
        let first = self
            .prioritized
            .get(&layer.digest)
            .filter(|p| !p.is_empty());
        if first.is_none() && layer.annotations.contains_key(TOC_DIGEST) {
            return self.copy(i, layer).await.with_context(what);
        }
        self.rewrite(i, layer).await.with_context(what)
    }

    /// Converts one layer and pushes it.
    async fn rewrite(&self, i: usize, layer: &Descriptor) -> Result<Layer> {
        let start = Instant::now();
        let Source {
            src, dst, registry, ..
        } = self.source;
        let input = self.work.join(format!("{i}.src"));
        let output = self.work.join(format!("{i}.esgz"));
        source::download(registry, &src.repository, layer, &input).await?;
        let opts = WriteOptions {
            prioritized: self
                .prioritized
                .get(&layer.digest)
                .cloned()
                .unwrap_or_default(),
            ..WriteOptions::default()
        };
        let (written, compression) = {
            let (input, output) = (input.clone(), output.clone());
            let cancel = self.cancel.clone();
            tokio::task::spawn_blocking(move || write_layer(&input, &output, &opts, cancel))
                .await
                .context("conversion task failed")??
        };
        let first = opts_first(self.prioritized.get(&layer.digest), &written);
        std::fs::remove_file(&input)?;
        registry
            .push_blob_file(
                &dst.repository,
                &written.blob_digest,
                &output,
                written.blob_size,
            )
            .await
            .context("cannot push it")?;
        std::fs::remove_file(&output)?;
        println!(
            "layer {}/{} {} ({compression}, {}) -> {} (eStargz, {}; {} unpacked{first}) in {:.1} s",
            i + 1,
            self.n,
            layer.digest,
            human(layer.size),
            written.blob_digest,
            human(written.blob_size),
            human(written.uncompressed_size),
            start.elapsed().as_secs_f64()
        );
        Ok(Layer {
            descriptor: json!({
                "mediaType": OCI_LAYER_GZIP,
                "digest": written.blob_digest.to_string(),
                "size": written.blob_size,
                "annotations": {
                    TOC_DIGEST: written.toc_digest.to_string(),
                    UNCOMPRESSED_SIZE: written.uncompressed_size.to_string(),
                },
            }),
            diff_id: written.diff_id,
        })
    }

    /// A layer already eStargz: the same blob and annotations at DST. Its
    /// diff ID is taken from its bytes (and must be the source config's,
    /// if that has one): a copied layer is checked like a converted one.
    async fn copy(&self, i: usize, layer: &Descriptor) -> Result<Layer> {
        let start = Instant::now();
        let Source {
            src, dst, registry, ..
        } = self.source;
        let blob = self.work.join(format!("{i}.src"));
        source::download(registry, &src.repository, layer, &blob).await?;
        let diff_id = {
            let (blob, cancel) = (blob.clone(), self.cancel.clone());
            tokio::task::spawn_blocking(move || unpacked_digest(&blob, cancel))
                .await
                .context("digest task failed")??
        };
        if let Some(Some(want)) = self.diff_ids.get(i)
            && *want != diff_id
        {
            bail!("the source config's diff ID {want} is not its content's {diff_id}");
        }
        registry
            .push_blob_file(&dst.repository, &layer.digest, &blob, layer.size)
            .await
            .context("cannot push it")?;
        std::fs::remove_file(&blob)?;
        println!(
            "layer {}/{} {} ({}): already eStargz, copied in {:.1} s",
            i + 1,
            self.n,
            layer.digest,
            human(layer.size),
            start.elapsed().as_secs_f64()
        );
        // Docker's media type for the same gzip tar: the manifest is OCI.
        let media_type = if layer.media_type.starts_with("application/vnd.oci.") {
            layer.media_type.as_str()
        } else {
            OCI_LAYER_GZIP
        };
        Ok(Layer {
            descriptor: json!({
                "mediaType": media_type,
                "digest": layer.digest.to_string(),
                "size": layer.size,
                "annotations": layer.annotations,
            }),
            diff_id,
        })
    }
}

/// sha256 of the blob at `path` decompressed: its diff ID.
fn unpacked_digest(path: &Path, cancel: Arc<AtomicBool>) -> Result<Digest> {
    let (r, _) = source::tar_reader(path)?;
    let mut r = Cancellable { r, cancel };
    let mut h = tarn_fs::digest::Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.update(&buf[..n]);
    }
}

/// Writes the eStargz form of the blob at `input` to `output`. Returns what
/// was written and the input's compression.
pub(super) fn write_layer(
    input: &Path,
    output: &Path,
    opts: &WriteOptions,
    cancel: Arc<AtomicBool>,
) -> Result<(WriteResult, &'static str)> {
    let (_, compression) = source::tar_reader(input)?;
    let f = File::create(output).with_context(|| format!("cannot create {}", output.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    // Prioritized files make the writer read the layer again (its names,
    // then the prioritized entries, then the rest): from the file, so the
    // layer is never held in memory.
    let open = || {
        let (r, _) = source::tar_reader(input).map_err(io::Error::other)?;
        Ok(Cancellable {
            r,
            cancel: cancel.clone(),
        })
    };
    let written = write_estargz_reopen(open, &mut w, opts)?;
    w.flush()?;
    Ok((written, compression))
}

/// How many files went first, for a layer's line: "" when none asked.
fn opts_first(asked: Option<&Vec<String>>, written: &WriteResult) -> String {
    match asked {
        Some(p) if !p.is_empty() => {
            let missing = &written.missing_prioritized;
            if !missing.is_empty() {
                tracing::warn!(?missing, "prioritized paths the layer does not hold");
            }
            format!(", {} files first", p.len() - missing.len())
        }
        _ => String::new(),
    }
}

/// A reader that fails once the run is given up.
struct Cancellable<R> {
    r: R,
    cancel: Arc<AtomicBool>,
}

impl<R: Read> Read for Cancellable<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::other("conversion given up"));
        }
        self.r.read(buf)
    }
}
