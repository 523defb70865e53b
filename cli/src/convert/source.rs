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

/// The tar in the blob at `path`, decompressed as its first bytes say.
pub fn tar_reader(path: &Path) -> Result<Box<dyn Read>> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let head = r.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(ruzstd::decoding::StreamingDecoder::new(r).context("bad zstd layer")?)
    } else {
        Box::new(r)
    })
}
