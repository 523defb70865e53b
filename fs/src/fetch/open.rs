//! Opening a layer through its fetcher: the blob bytes its [`Format`] asks
//! for to build the index (eStargz: the tail with the footer and, usually,
//! the whole TOC; a second GET only for the part of a large TOC the tail
//! lacked), fetched with [`Intent::Open`], then the chunks that came along
//! in the tail verified and cached.
//!
//! [`Format`]: crate::format::Format

use std::time::Instant;

use super::fetcher::Fetcher;
use crate::Digest;
use crate::Intent;
use crate::cache::Cache;
use crate::format::{Format, FormatError, IndexStep, LayerIndex, Piece};
use crate::num::usize_from;
use crate::registry::RegistryError;

/// How many GETs a format may ask for to build one index; a format that
/// keeps asking is broken or hostile.
const MAX_INDEX_STEPS: usize = 8;

/// Why a layer's index could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    // The cause in the message, not as a `source`: one-line reports say it once.
    #[error("reading the layer's footer and TOC: {0}")]
    Source(RegistryError),
    #[error(transparent)]
    Format(#[from] FormatError),
}

impl From<RegistryError> for OpenError {
    fn from(e: RegistryError) -> OpenError {
        OpenError::Source(e)
    }
}

impl Fetcher {
    /// The layer's index, built by its format from the blob bytes it asks
    /// for. `expected`: the digest the image promised for the format's
    /// metadata (eStargz: the TOC's), checked before it is parsed; `None`
    /// trusts it (chunks are still verified).
    ///
    /// Opening is on the path of a Prepare: its GETs are admitted at once,
    /// like a read. Chunks wholly inside the first piece the format asked
    /// for (the blob's tail) are cached, so that reading them costs no GET.
    pub async fn open_index(&self, expected: Option<Digest>) -> Result<LayerIndex, OpenError> {
        let size = self.source().size();
        let started = Instant::now();
        let format = self.format().clone();
        let mut fetched: Vec<Piece> = Vec::new();
        let mut fetch_time = std::time::Duration::ZERO;
        for _ in 0..MAX_INDEX_STEPS {
            let step = {
                let (format, pieces) = (format.clone(), fetched.clone());
                // Gunzip, hashing and JSON parsing of a TOC of many MB is CPU
                // work: not on an async worker.
                tokio::task::spawn_blocking(move || {
                    let step = format.index_step(&pieces, size, expected);
                    if step.is_err() {
                        // What decoding allocated is freed; see `settle`.
                        crate::memory::release_free_memory();
                    }
                    step
                })
                .await
                // A panic in a format's parser is a bug, but one layer's bug:
                // the layer is refused, the process serves the others.
                .map_err(|e| FormatError::Index(format!("building the index failed: {e}")))?
            };
            // Bytes that fail the format's checks (the TOC's digest) may be
            // one source's fault: when the source can read them elsewhere
            // (a mirror is skipped), the index is built again from scratch.
            let step = match step {
                Err(e) if self.distrust_fetched(&fetched) => {
                    tracing::warn!(error = %e, "layer metadata failed its check; reading it again from the next source");
                    fetched.clear();
                    continue;
                }
                step => step?,
            };
            match step {
                IndexStep::Fetch(range) => {
                    let at = Instant::now();
                    let permit = self
                        .scheduler()
                        .admit(Intent::Open, range.end - range.start)
                        .await;
                    let bytes = self
                        .source()
                        .read_range(range.clone(), Intent::Open)
                        .await?;
                    drop(permit);
                    self.stats().request(Intent::Open, bytes.len() as u64);
                    let took = at.elapsed();
                    self.scheduler().record_get(Intent::Open, took);
                    fetch_time += took;
                    fetched.push(Piece {
                        offset: range.start,
                        bytes,
                    });
                }
                IndexStep::Ready { index, data_end } => {
                    let toc_bytes: usize = fetched.iter().map(|p| p.bytes.len()).sum();
                    self.settle(&index, fetched, size, data_end).await;
                    tracing::debug!(
                        blob_size = size,
                        fetched_bytes = toc_bytes,
                        inodes = index.inode_count(),
                        fetch_ms = fetch_time.as_millis(),
                        decode_ms = (started.elapsed() - fetch_time).as_millis(),
                        "layer opened"
                    );
                    return Ok(index);
                }
            }
        }
        Err(FormatError::Index(format!(
            "the format asked for more than {MAX_INDEX_STEPS} ranges to build its index"
        ))
        .into())
    }

    /// Whether the source sends the next read of the pieces elsewhere
    /// (see `BlobSource::distrust`); false if nothing was fetched.
    fn distrust_fetched(&self, fetched: &[Piece]) -> bool {
        let mut any = false;
        for p in fetched {
            any |= self.source().distrust(p.offset..p.end());
        }
        any
    }

    /// Caches the chunks inside the tail (`fetched[0]`, if it ends at the
    /// blob's end) and keeps its bytes that end a chunk begun before it;
    /// see [`settle_tail`]. Then gives back the memory decoding freed.
    async fn settle(&self, index: &LayerIndex, fetched: Vec<Piece>, size: u64, data_end: u64) {
        let tail = fetched.into_iter().next().filter(|t| t.end() == size);
        let (format, cache) = (self.format().clone(), self.cache().clone());
        // Only the chunks that lie in the tail are needed on the blocking pool.
        let in_tail: Vec<_> = match &tail {
            Some(t) => index
                .chunks
                .iter()
                .filter(|c| c.blob_range.0 >= t.offset && c.blob_range.1 <= size)
                .copied()
                .collect(),
            None => Vec::new(),
        };
        let straddling = tokio::task::spawn_blocking(move || {
            let straddling =
                tail.and_then(|t| settle_tail(&*format, &in_tail, &t, data_end, &cache));
            // Decoding allocated several times the index's size in small
            // pieces, now all freed; give those pages back rather than let
            // the allocator keep them for the daemon's lifetime.
            crate::memory::release_free_memory();
            straddling
        })
        .await
        .unwrap_or_else(|e| {
            // Only a cache: the tail's chunks are fetched when read.
            tracing::warn!(error = %e, "caching the blob tail failed");
            None
        });
        if let Some((offset, len, key)) = straddling {
            self.keep_tail(offset, len, key);
        }
    }
}

/// Stores in the cache the chunks `in_tail`, which lie wholly in `tail`
/// (the blob's bytes from `tail.offset` to its end, fetched to open the
/// layer), so that reading them costs no GET while the layer holds no copy
/// of them in memory for as long as it is mounted. The tail's bytes before
/// the first such chunk (or before `data_end`, where the format's metadata
/// begins) end a chunk that begins before the tail: they are cached too,
/// under their own sha256, so that reading that chunk fetches only its
/// beginning; returns their offset, length and key.
fn settle_tail(
    format: &dyn Format,
    in_tail: &[crate::format::Chunk],
    tail: &Piece,
    data_end: u64,
    cache: &Cache,
) -> Option<(u64, u64, Digest)> {
    let mut first_whole = data_end;
    for c in in_tail {
        first_whole = first_whole.min(c.blob_range.0);
        if cache.contains(&c.digest) {
            continue;
        }
        // Checked, not sliced blind: a chunk whose range is not a range of
        // the tail is left to a read, which refuses it.
        let compressed = c
            .blob_range
            .0
            .checked_sub(tail.offset)
            .zip(c.blob_range.1.checked_sub(tail.offset))
            .and_then(|(from, to)| tail.bytes.get(usize_from(from)..usize_from(to)));
        let Some(compressed) = compressed else {
            continue;
        };
        match format.decode_chunk(c, compressed) {
            Ok(plain) => {
                if let Err(e) = cache.insert(&c.digest, &plain) {
                    tracing::warn!(chunk = %c.digest, error = %e, "cache insert failed");
                }
            }
            // Not cached: a read fetches it again, from the registry, which
            // may serve it right (these bytes came in one GET of the tail).
            Err(e) => tracing::warn!(chunk = %c.digest, error = %e, "chunk in the tail rejected"),
        }
    }
    let straddling_len = usize_from(first_whole.saturating_sub(tail.offset)).min(tail.bytes.len());
    let straddling = &tail.bytes[..straddling_len];
    if straddling.is_empty() {
        return None;
    }
    let key = Digest::of(straddling);
    if !cache.contains(&key)
        && let Err(e) = cache.insert(&key, straddling)
    {
        tracing::warn!(error = %e, "cache insert of the blob tail failed");
        return None;
    }
    Some((tail.offset, straddling.len() as u64, key))
}

#[cfg(test)]
mod tests;
