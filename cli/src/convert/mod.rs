//! `tarn convert [--format estargz|overlaybd] SRC DST`: an ordinary image
//! (gzip, zstd or plain tar layers; a single manifest or an index, of which
//! the node's platform) converted layer by layer and pushed to DST.
//!
//! eStargz, the default ([`estargz`]): each layer's tar streamed through
//! tarn's eStargz writer, several layers at once.
//!
//! overlaybd (the rest of this file): layer by layer, as the reference
//! converter does: a sparse disk file
//! with a fresh ext4 ([`disk`]), the layer's tar applied onto it through a
//! loop mount ([`apply`]), then only the blocks that changed against the
//! disk before it written as the layer's LSMT file ([`diff`]), compressed
//! as a ZFile inside the tar wrapper (`tarn_fs::format::overlaybd::write`)
//! and pushed with the annotations the reference snapshotter reads. The
//! config keeps the source's, with `rootfs.diff_ids` the new blobs'
//! digests (the blobs are plain tars to containerd). Everything lives in a
//! temporary directory, removed with its mounts and loop devices on every
//! path out.

mod apply;
mod diff;
mod disk;
mod estargz;
mod rootpath;
mod source;

pub use estargz::{TOC_DIGEST, convert_prioritized};

#[cfg(test)]
mod tests;

use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde_json::{Value, json};
use tarn_fs::Digest;
use tarn_fs::format::overlaybd::write::{
    LsmtWriter, ZFileWriter, uuid_from, wrapper_head, wrapper_tail,
};
use tarn_fs::registry::{Reference, RegistryClient, ResolvedImage};

use crate::pull::human;

/// The virtual disk's size, as the reference tools make it (sparse: only
/// what ext4 writes takes room).
pub const DEFAULT_VSIZE_GIB: u64 = 64;
/// ZFile block size: the reference tools' default.
const ZFILE_BLOCK: u32 = 4096;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const ANNOTATION: &str = "containerd.io/snapshot/overlaybd";

/// The format images are converted to.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// eStargz: each layer a gzip tar that tarn (and stargz) read lazily.
    Estargz,
    /// overlaybd (DADI): each layer a block diff of one ext4 disk.
    Overlaybd,
}

/// Convert an image in a registry to eStargz (or overlaybd) and push it.
///
/// eStargz (the default): gzip, zstd or plain tar layers are rewritten as
/// eStargz, a few at once, each pushed with its TOC digest and
/// uncompressed size annotations; layers already eStargz are copied as
/// they are. Needs no privileges. Scratch space under --work-dir: each
/// layer in conversion twice (the source blob and the eStargz blob).
///
/// overlaybd: needs root, mkfs.ext4 and a free loop device: each layer is
/// applied to an ext4 disk image through a loop mount (as overlaybd's own
/// converter does). Scratch space: the disk image (sparse, about the
/// unpacked size twice) and one layer at a time, under --work-dir.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// The image to convert, e.g. 127.0.0.1:5000/app:latest
    pub src: String,
    /// Where to push the result, e.g. 127.0.0.1:5000/app:esgz
    pub dst: String,
    /// The format to convert to
    #[arg(long, value_enum, default_value = "estargz")]
    pub format: Format,
    /// Reach the registries over plain HTTP (localhost is always plain HTTP)
    #[arg(long)]
    pub plain_http: bool,
    /// Directory for scratch files (a temporary directory is made in it
    /// and removed after)
    #[arg(long, default_value = "/var/tmp")]
    pub work_dir: PathBuf,
    /// overlaybd: size of the virtual disk in GiB (sparse)
    #[arg(long, default_value_t = DEFAULT_VSIZE_GIB)]
    pub vsize_gib: u64,
}

pub fn run(args: ConvertArgs) -> Result<()> {
    match args.format {
        Format::Estargz => crate::block_on(estargz::convert(args)),
        Format::Overlaybd => crate::block_on(convert(args)),
    }
}

/// What both formats start from: the two references, a registry client
/// for them, SRC resolved to one image manifest and its config.
struct Source {
    src: Reference,
    dst: Reference,
    registry: RegistryClient,
    image: ResolvedImage,
    config: Value,
}

impl Source {
    async fn resolve(args: &ConvertArgs) -> Result<Source> {
        let src: Reference = args.src.parse()?;
        let dst: Reference = args.dst.parse()?;
        if dst.digest.is_some() {
            bail!("the destination {dst} names a digest: give a tag");
        }
        let plain = if args.plain_http {
            vec![
                src.repository.registry.clone(),
                dst.repository.registry.clone(),
            ]
        } else {
            Vec::new()
        };
        let registry = crate::pull::registry_client(plain).await?;
        let image = registry
            .resolve(&src)
            .await
            .with_context(|| format!("cannot resolve {src}"))?;
        let src_config = registry
            .fetch_blob(&src.repository, &image.config.digest)
            .await
            .context("cannot fetch the image config")?;
        let config: Value =
            serde_json::from_slice(&src_config).context("the image config is not JSON")?;
        if !config.is_object() {
            bail!("the image config is not a JSON object");
        }
        Ok(Source {
            src,
            dst,
            registry,
            image,
            config,
        })
    }

    /// Pushes the config (the source's, with `diff_ids`) and an OCI
    /// manifest of `layers` (descriptors) to DST. Returns the manifest's
    /// digest.
    async fn push_image(&self, diff_ids: &[Digest], layers: Vec<Value>) -> Result<Digest> {
        let mut config = self.config.clone();
        if let Some(obj) = config.as_object_mut() {
            obj.insert(
                "rootfs".to_string(),
                json!({
                    "type": "layers",
                    "diff_ids": diff_ids.iter().map(Digest::to_string).collect::<Vec<_>>(),
                }),
            );
        }
        let config_bytes = Bytes::from(serde_json::to_vec(&config)?);
        let config_size = config_bytes.len() as u64;
        let repo = &self.dst.repository;
        let config_digest = self
            .registry
            .push_blob_bytes(repo, config_bytes)
            .await
            .context("cannot push the config")?;
        let manifest = manifest(&config_digest, config_size, layers)?;
        let tag = self.dst.tag.clone().unwrap_or_else(|| "latest".to_string());
        self.registry
            .push_manifest(repo, &tag, OCI_MANIFEST, Bytes::from(manifest))
            .await
            .context("cannot push the manifest")
    }
}

/// The scratch directory in `work_dir`, removed when dropped.
fn scratch(work_dir: &Path) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("tarn-convert-")
        .tempdir_in(work_dir)
        .with_context(|| format!("cannot make a scratch directory in {}", work_dir.display()))
}

/// One converted layer.
struct Converted {
    digest: Digest,
    size: u64,
}

async fn convert(args: ConvertArgs) -> Result<()> {
    let start = Instant::now();
    let vsize = args
        .vsize_gib
        .checked_mul(1 << 30)
        .filter(|&v| v > 0 && v <= tarn_fs::format::overlaybd::MAX_VIRTUAL_SIZE)
        .context("--vsize-gib out of range")?;
    let from = Source::resolve(&args).await?;
    let Source {
        src,
        dst,
        registry,
        image,
        ..
    } = &from;

    let work = scratch(&args.work_dir)?;
    let disk = work.path().join("disk.img");
    let prev = work.path().join("prev.img");
    let mnt = work.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    {
        let disk = disk.clone();
        tokio::task::spawn_blocking(move || disk::mkfs(&disk, vsize))
            .await
            .context("mkfs task failed")??;
    }

    let n = image.layers.len();
    let mut layers = Vec::with_capacity(n);
    let mut parent_uuid: Option<String> = None;
    for (i, layer) in image.layers.iter().enumerate() {
        let blob = work.path().join("layer.blob");
        source::download(registry, &src.repository, layer, &blob)
            .await
            .with_context(|| format!("layer {} ({})", i + 1, layer.digest))?;
        let out = work.path().join("layer.obd");
        let uuid = uuid_from(&layer_uuid(&layer.digest, i));
        let step = LayerStep {
            blob: blob.clone(),
            disk: disk.clone(),
            prev: (i > 0).then(|| prev.clone()),
            mnt: mnt.clone(),
            out: out.clone(),
            vsize,
            uuid: uuid.clone(),
            parent_uuid: parent_uuid.clone(),
        };
        let (converted, diffed, applied) = tokio::task::spawn_blocking(move || step.run())
            .await
            .context("layer task failed")?
            .with_context(|| format!("layer {} ({})", i + 1, layer.digest))?;
        registry
            .push_blob_file(&dst.repository, &converted.digest, &out, converted.size)
            .await
            .with_context(|| format!("cannot push layer {}", i + 1))?;
        println!(
            "layer {}/{n} {} -> {} ({}, {} entries, {} whiteouts, {} blocks written, {} zeroed)",
            i + 1,
            layer.digest,
            converted.digest,
            human(converted.size),
            applied.entries,
            applied.whiteouts,
            diffed.changed,
            diffed.zeroed
        );
        std::fs::remove_file(&blob)?;
        std::fs::remove_file(&out)?;
        parent_uuid = Some(uuid);
        layers.push(converted);
    }

    // The blobs are plain tars to containerd: their diff IDs are their
    // digests.
    let diff_ids: Vec<Digest> = layers.iter().map(|l| l.digest).collect();
    let digest = from
        .push_image(&diff_ids, layers.iter().map(obd_descriptor).collect())
        .await?;
    println!(
        "pushed {dst} ({digest}): {n} overlaybd layers in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    work.close()
        .context("cannot remove the scratch directory")?;
    Ok(())
}

/// The layer's LSMT uuid: from its source digest and place, so the same
/// conversion writes the same bytes.
fn layer_uuid(digest: &Digest, i: usize) -> [u8; 16] {
    let mut seed = digest.0.to_vec();
    seed.extend_from_slice(&(i as u64).to_le_bytes());
    let d = Digest::of(&seed);
    let mut u = [0u8; 16];
    u.copy_from_slice(&d.0[..16]);
    u
}

/// A converted overlaybd layer's descriptor, with the annotations the
/// reference snapshotter reads.
fn obd_descriptor(l: &Converted) -> Value {
    json!({
        "mediaType": OCI_LAYER_TAR,
        "digest": l.digest.to_string(),
        "size": l.size,
        "annotations": {
            format!("{ANNOTATION}/version"): "0.1.0",
            format!("{ANNOTATION}/blob-digest"): l.digest.to_string(),
            format!("{ANNOTATION}/blob-size"): l.size.to_string(),
            format!("{ANNOTATION}/blob-fs-type"): "ext4",
        }
    })
}

/// The OCI manifest of the converted image.
fn manifest(config: &Digest, config_size: u64, layers: Vec<Value>) -> Result<Vec<u8>> {
    let m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": config.to_string(),
            "size": config_size,
        },
        "layers": layers,
    });
    Ok(serde_json::to_vec_pretty(&m)?)
}

/// One layer's blocking work: apply, diff, write the blob.
struct LayerStep {
    blob: PathBuf,
    disk: PathBuf,
    /// The disk before this layer (none for the first).
    prev: Option<PathBuf>,
    mnt: PathBuf,
    out: PathBuf,
    vsize: u64,
    uuid: String,
    parent_uuid: Option<String>,
}

impl LayerStep {
    fn run(self) -> Result<(Converted, diff::Diffed, apply::Applied)> {
        if let Some(prev) = &self.prev {
            disk::copy_sparse(&self.disk, prev, self.vsize)?;
        }
        let mounted = disk::Mounted::new(&self.disk, &self.mnt)?;
        let applied = apply::apply(&self.mnt, source::tar_reader(&self.blob)?.0)?;
        mounted.close()?;
        let (diffed, converted) = write_blob(
            self.prev.as_deref(),
            &self.disk,
            self.vsize,
            &self.out,
            &self.uuid,
            self.parent_uuid.as_deref(),
        )?;
        Ok((converted, diffed, applied))
    }
}

/// Writes the layer blob at `out`: the tar wrapper around a ZFile around
/// the LSMT diff of `cur` against `prev`.
fn write_blob(
    prev: Option<&Path>,
    cur: &Path,
    vsize: u64,
    out: &Path,
    uuid: &str,
    parent_uuid: Option<&str>,
) -> Result<(diff::Diffed, Converted)> {
    let f =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    w.seek(SeekFrom::Start(wrapper_head(0).len() as u64))?;
    let z = ZFileWriter::new(w, ZFILE_BLOCK)?;
    let mut lsmt = LsmtWriter::new(z, vsize, uuid, parent_uuid)?;
    let diffed = diff::diff(prev, cur, vsize, &mut lsmt)?;
    let (z, _) = lsmt.finish()?;
    let (mut w, zsize) = z.finish()?;
    w.write_all(&wrapper_tail(zsize))?;
    w.seek(SeekFrom::Start(0))?;
    w.write_all(&wrapper_head(zsize))?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    drop(f);
    // One more read to learn the digest: cheaper than hashing around the
    // seek back to the header.
    let (digest, size) = hash_file(out)?;
    Ok((diffed, Converted { digest, size }))
}

fn hash_file(path: &Path) -> Result<(Digest, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = tarn_fs::digest::Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((h.finish(), size))
}
