//! Opening a layer: footer and TOC in (usually) one ranged GET, the TOC
//! checked against the digest the manifest promised, then the index built.
//! Chunks that came along in that GET are verified and cached.

use std::sync::Arc;

use crate::Digest;
use crate::Intent;
use crate::cache::Cache;
use crate::fetch::{FetchScheduler, Fetcher};
use crate::format::estargz::{Estargz, build_index, decode_toc, parse_footer};
use crate::format::{ChunkDecoder, FormatError, LayerIndex};
use crate::registry::BlobSource;

use super::{Layer, LayerError};

/// How much of the blob's end the first GET asks for: the footer and, for
/// most layers, the whole TOC, so that opening costs one round trip. A TOC
/// larger than this costs a second GET, of the part the first did not bring.
pub const TAIL_FETCH: u64 = 256 << 10;

impl Layer {
    /// Opens the eStargz layer in `source`. With `expected_toc_digest`, a TOC
    /// whose sha256 differs is refused; `None` means the caller chose to
    /// trust an unverified TOC (chunks are still verified against it).
    ///
    /// Its GETs are admitted by the process-wide [`FetchScheduler::global`];
    /// [`Layer::open_with`] takes a scheduler of the caller's.
    pub async fn open(
        source: Arc<dyn BlobSource>,
        expected_toc_digest: Option<Digest>,
        cache: Arc<Cache>,
    ) -> Result<Layer, LayerError> {
        Layer::open_with(source, expected_toc_digest, cache, FetchScheduler::global()).await
    }

    /// [`Layer::open`] with the scheduler that orders this layer's GETs
    /// against those of the other layers sharing it.
    pub async fn open_with(
        source: Arc<dyn BlobSource>,
        expected_toc_digest: Option<Digest>,
        cache: Arc<Cache>,
        scheduler: FetchScheduler,
    ) -> Result<Layer, LayerError> {
        let size = source.size();
        let started = std::time::Instant::now();
        let fetcher = Fetcher::with_scheduler(source.clone(), Arc::new(Estargz), cache, scheduler);

        let tail_len = size.min(TAIL_FETCH);
        // Opening is on the path of a Prepare: foreground, like a read.
        let permit = fetcher.scheduler().admit(Intent::OnDemand, tail_len).await;
        let tail = source
            .read_range(size - tail_len..size, Intent::OnDemand)
            .await?;
        fetcher.stats().request(tail.len() as u64);
        let tail_start = size - tail.len() as u64;
        let loc = parse_footer(&tail, size)?;
        let toc = match loc.toc_in_tail.clone() {
            Some(r) => tail.slice(r),
            None => {
                // Only the part before the tail: the rest is in hand.
                let tail_start = size - tail.len() as u64;
                let head = source
                    .read_range(loc.toc_range.start..tail_start, Intent::OnDemand)
                    .await?;
                fetcher.stats().request(head.len() as u64);
                let in_tail = (loc.toc_range.end - tail_start) as usize;
                let mut toc = Vec::with_capacity(head.len() + in_tail);
                toc.extend_from_slice(&head);
                toc.extend_from_slice(&tail[..in_tail]);
                bytes::Bytes::from(toc)
            }
        };
        drop(permit);
        let (fetched, toc_bytes) = (started.elapsed(), toc.len());

        // Gunzip, hashing and JSON parsing of a TOC of many MB is CPU work;
        // so is verifying the chunks in the tail, and caching is file I/O.
        let cache = fetcher.cache().clone();
        let (index, straddling) = tokio::task::spawn_blocking(move || {
            let index = decode_and_build(&toc, expected_toc_digest, size, loc.toc_offset);
            drop(toc);
            let straddling = match &index {
                Ok(index) => settle_tail(index, &tail, tail_start, loc.toc_offset, &cache),
                Err(_) => None,
            };
            drop(tail);
            // Decoding allocated several times the index's size in small
            // pieces, now all freed; give those pages back rather than let
            // the allocator keep them for the daemon's lifetime.
            crate::memory::release_free_memory();
            index.map(|index| (index, straddling))
        })
        .await
        .expect("TOC decoding does not panic")?;
        if let Some((len, key)) = straddling {
            fetcher.keep_tail(tail_start, len, key);
        }
        tracing::debug!(
            blob_size = size,
            toc_bytes,
            inodes = index.inode_count(),
            fetch_ms = fetched.as_millis() as u64,
            decode_ms = (started.elapsed() - fetched).as_millis() as u64,
            "layer opened"
        );
        Ok(Layer::new(index, fetcher))
    }
}

/// The verified TOC member `toc` as an index.
fn decode_and_build(
    toc: &[u8],
    expected_digest: Option<Digest>,
    blob_size: u64,
    toc_offset: u64,
) -> Result<LayerIndex, FormatError> {
    let json = decode_toc(toc)?;
    if let Some(expected) = expected_digest
        && json.digest != expected
    {
        return Err(FormatError::TocDigestMismatch {
            expected,
            actual: json.digest,
        });
    }
    build_index(json.parse()?, blob_size, toc_offset)
}

/// Stores in the cache the chunks that lie wholly in `tail` (the blob's
/// bytes from `tail_start` to its end, fetched to open the layer), so that
/// reading them costs no GET while the layer holds no copy of them in memory
/// for as long as it is mounted. The tail's bytes before the first such
/// chunk end a chunk that begins before the tail: they are cached too, under
/// their own sha256, so that reading that chunk fetches only its beginning;
/// returns their length and key.
fn settle_tail(
    index: &LayerIndex,
    tail: &[u8],
    tail_start: u64,
    toc_offset: u64,
    cache: &Cache,
) -> Option<(u64, Digest)> {
    let mut first_whole = toc_offset;
    for c in index.chunks.iter().filter(|c| c.blob_range.0 >= tail_start) {
        first_whole = first_whole.min(c.blob_range.0);
        if cache.contains(&c.digest) {
            continue;
        }
        // build_index bounds every chunk by the TOC offset, inside the tail.
        let r = (c.blob_range.0 - tail_start) as usize..(c.blob_range.1 - tail_start) as usize;
        match Estargz.decode_chunk(c, &tail[r]) {
            Ok(plain) => {
                if let Err(e) = cache.insert(&c.digest, &plain) {
                    tracing::warn!(chunk = %c.digest, error = %e, "cache insert failed");
                }
            }
            // A read of it will fetch it again and fail the same way.
            Err(e) => tracing::warn!(chunk = %c.digest, error = %e, "chunk in the tail rejected"),
        }
    }
    let straddling = &tail[..(first_whole.saturating_sub(tail_start) as usize).min(tail.len())];
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
    Some((straddling.len() as u64, key))
}
