//! Opening a layer: its fetcher builds the index through the layer's format
//! (fetching what the format asks for, checking the digest the manifest
//! promised, caching the chunks that came along), then the layer is made.

use std::sync::Arc;

use crate::Digest;
use crate::cache::{Cache, WholeFile};
use crate::fetch::{FetchScheduler, Fetcher};
use crate::format::{Estargz, Format, LayerIndex};
use crate::registry::BlobSource;

use super::{Layer, LayerError};

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
        // eStargz is the only remote format today; `open_format` takes any.
        let format = Arc::new(Estargz::default());
        Layer::open_format(source, format, expected_toc_digest, cache, scheduler).await
    }

    /// Opens the layer in `source`, of `format`. `expected_index_digest`:
    /// the digest the image promised for the format's metadata (eStargz:
    /// the TOC's), refused if it differs; `None` trusts it.
    pub async fn open_format(
        source: Arc<dyn BlobSource>,
        format: Arc<dyn Format>,
        expected_index_digest: Option<Digest>,
        cache: Arc<Cache>,
        scheduler: FetchScheduler,
    ) -> Result<Layer, LayerError> {
        let fetcher = Fetcher::with_scheduler(source, format, cache.clone(), scheduler);
        let index = fetcher.open_index(expected_index_digest).await?;
        reslice(&index, &cache);
        Ok(Layer::new(index, fetcher))
    }
}

/// Chunks of the layer's files whose whole-file objects the cache holds
/// (made before a restart, or by another image with the same file) are read
/// from those objects rather than fetched again (see `cache/slice.rs`).
fn reslice(index: &LayerIndex, cache: &Cache) {
    for (ino, inode) in (1u64..).zip(index.inodes()) {
        let chunks = index.file_chunks(&inode);
        if chunks.len() < 2 {
            continue;
        }
        if let Some(file) = WholeFile::of(inode.size(), chunks, || index.file_digest(ino)) {
            cache.reslice(&file);
        }
    }
}
