//! Opening a layer: footer and TOC in (usually) one ranged GET, the TOC
//! checked against the digest the manifest promised, then the index built.
//! Chunks that came along in that GET are verified and cached.

use std::sync::Arc;

use crate::Digest;
use crate::cache::Cache;
use crate::fetch::{FetchScheduler, Fetcher, Intent};
use crate::format::estargz::{Estargz, build_index, decode_toc, parse_footer};
use crate::format::{ChunkDecoder, FormatError, LayerIndex};
use crate::registry::BlobSource;

use super::{Layer, LayerError};

/// How much of the blob's end the first GET asks for: the footer and, for
/// most layers, the whole TOC, so that opening costs one round trip. A TOC
/// larger than this costs a second GET.
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
                let toc = source
                    .read_range(loc.toc_range.clone(), Intent::OnDemand)
                    .await?;
                fetcher.stats().request(toc.len() as u64);
                toc
            }
        };
        drop(permit);

        // Gunzip, hashing and JSON parsing of a TOC of many MB is CPU work;
        // so is verifying the chunks in the tail, and caching is file I/O.
        let cache = fetcher.cache().clone();
        let index = tokio::task::spawn_blocking(move || {
            let index = decode_and_build(&toc, expected_toc_digest, size, loc.toc_offset);
            drop(toc);
            if let Ok(index) = &index {
                cache_tail_chunks(index, &tail, tail_start, &cache);
            }
            drop(tail);
            // Decoding allocated several times the index's size in small
            // pieces, now all freed; give those pages back rather than let
            // the allocator keep them for the daemon's lifetime.
            crate::memory::release_free_memory();
            index
        })
        .await
        .expect("TOC decoding does not panic")?;
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
    let decoded = decode_toc(toc)?;
    if let Some(expected) = expected_digest
        && decoded.digest != expected
    {
        return Err(FormatError::TocDigestMismatch {
            expected,
            actual: decoded.digest,
        });
    }
    // The JSON goes before the index is built: the index needs only `toc`.
    drop(decoded.json);
    build_index(decoded.toc, blob_size, toc_offset)
}

/// Stores in the cache the chunks that lie wholly in `tail` (the blob's
/// bytes from `tail_start` to its end, fetched to open the layer), so that
/// reading them costs no GET while the layer holds no copy of them in
/// memory for as long as it is mounted. The end of a chunk that begins
/// before the tail is not kept: reading that chunk fetches it whole, which
/// needs a GET anyway, up to a tail's length more bytes once per layer
/// instead of up to that much memory per mounted layer for its lifetime.
fn cache_tail_chunks(index: &LayerIndex, tail: &[u8], tail_start: u64, cache: &Cache) {
    for c in index.chunks.iter().filter(|c| c.blob_range.0 >= tail_start) {
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
}
