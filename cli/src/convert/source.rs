//! A source layer: its blob downloaded to a file (streamed, digest
//! checked) and its tar read back from it, decompressed by what the bytes
//! are (gzip, zstd, or plain).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use tarn_fs::Intent;
use tarn_fs::digest::Hasher;
use tarn_fs::registry::{Descriptor, RegistryClient, Repository};
use tokio::io::AsyncWriteExt;

/// Attempts at a layer's download; each goes on from the bytes in hand.
const ATTEMPTS: usize = 4;

/// Downloads `layer` of `repo` into `path` and checks its digest.
pub async fn download(
    registry: &RegistryClient,
    repo: &Repository,
    layer: &Descriptor,
    path: &Path,
) -> Result<()> {
    let mut file = tokio::fs::File::create(path)
        .await
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut hasher = Hasher::default();
    let mut have = 0u64;
    let mut last_err = None;
    for _ in 0..ATTEMPTS {
        if have == layer.size {
            break;
        }
        let mut stream = match registry
            .read_range_stream(repo, &layer.digest, have..layer.size, Intent::Background)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                last_err = Some(anyhow::Error::from(e));
                continue;
            }
        };
        while let Some(piece) = stream.next().await {
            match piece {
                Ok(bytes) => {
                    let room = layer.size - have;
                    if bytes.len() as u64 > room {
                        bail!(
                            "layer {} is longer than its {} bytes",
                            layer.digest,
                            layer.size
                        );
                    }
                    hasher.update(&bytes);
                    file.write_all(&bytes).await?;
                    have += bytes.len() as u64;
                }
                Err(e) => {
                    last_err = Some(e.into());
                    break;
                }
            }
        }
    }
    if have != layer.size {
        let why = last_err.map(|e| format!("{e:#}")).unwrap_or_default();
        bail!(
            "layer {}: {have} of {} bytes downloaded: {why}",
            layer.digest,
            layer.size
        );
    }
    file.flush().await?;
    let actual = hasher.finish();
    if actual != layer.digest {
        bail!("layer {} downloaded with digest {actual}", layer.digest);
    }
    Ok(())
}

/// The tar in the blob at `path`, decompressed as its first bytes say, and
/// the name of what it was (`gzip`, `zstd`, `tar`).
pub fn tar_reader(path: &Path) -> Result<(Box<dyn Read>, &'static str)> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&GZIP_MAGIC) {
        (Box::new(flate2::read::MultiGzDecoder::new(r)), "gzip")
    } else if head.starts_with(&ZSTD_MAGIC) {
        (Box::new(ZstdFrames::new(r)?), "zstd")
    } else {
        (Box::new(r), "tar")
    })
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

type ZstdDecoder<R> = ruzstd::decoding::StreamingDecoder<R, ruzstd::decoding::FrameDecoder>;

/// Every frame of a zstd stream, one after the other (ruzstd's decoder
/// stops after one; zstd and other writers may start a new frame, as gzip
/// writers a new member). Bytes after a frame that start no frame are an
/// error, not an early end: a tar cut there would pass for a short one.
struct ZstdFrames<R: BufRead> {
    /// Always Some except while switching frames.
    frame: Option<ZstdDecoder<R>>,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(r: R) -> Result<ZstdFrames<R>> {
        let frame = ZstdDecoder::new(r).map_err(|e| anyhow::anyhow!("bad zstd layer: {e}"))?;
        Ok(ZstdFrames { frame: Some(frame) })
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let Some(frame) = self.frame.as_mut() else {
                return Ok(0);
            };
            let n = frame.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            let Some(frame) = self.frame.take() else {
                return Ok(0);
            };
            let mut r = frame.into_inner();
            let head = r.fill_buf()?;
            if head.is_empty() {
                return Ok(0);
            }
            if !head.starts_with(&ZSTD_MAGIC) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "bytes after a zstd frame that start no frame",
                ));
            }
            self.frame = Some(ZstdDecoder::new(r).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad zstd frame: {e}"),
                )
            })?);
        }
    }
}
