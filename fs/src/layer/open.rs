//! Opening a layer: footer and TOC in (usually) one ranged GET, the TOC
//! checked against the digest the manifest promised, then the index built.

use std::sync::Arc;

use crate::Digest;
use crate::cache::Cache;
use crate::fetch::{FetchScheduler, Fetcher, Intent};
use crate::format::FormatError;
use crate::format::estargz::{Estargz, build_index, decode_toc, parse_footer};
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
        let fetcher = Fetcher::with_scheduler(source.clone(), Arc::new(Estargz), cache, scheduler);

        let tail_len = size.min(TAIL_FETCH);
        // Opening is on the path of a Prepare: foreground, like a read.
        let permit = fetcher.scheduler().admit(Intent::OnDemand, tail_len).await;
        let tail = source
            .read_range(size - tail_len..size, Intent::OnDemand)
            .await?;
        fetcher.stats().request(tail.len() as u64);
        fetcher.keep_tail(size - tail.len() as u64, tail.clone());
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

        // Gunzip, hashing and JSON parsing of a TOC of many MB is CPU work.
        let index = tokio::task::spawn_blocking(move || {
            let decoded = decode_toc(&toc)?;
            if let Some(expected) = expected_toc_digest
                && decoded.digest != expected
            {
                return Err(FormatError::TocDigestMismatch {
                    expected,
                    actual: decoded.digest,
                });
            }
            build_index(decoded.toc, size, loc.toc_offset)
        })
        .await
        .expect("TOC decoding does not panic")?;
        Ok(Layer::new(index, fetcher))
    }
}
