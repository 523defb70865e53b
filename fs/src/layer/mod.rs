//! One mounted layer: its index, and read planning over cache and fetch.
//!
//! A read is planned into the chunks that cover it. The cache is asked for
//! each piece synchronously (a blocking file read, fine on a FUSE thread);
//! only when something is missing does the read go to the [`Fetcher`], on
//! the async runtime, together with the chunks that follow it in the blob
//! (read-ahead, `ahead.rs`).
//!
//! Whole-layer fetches live in `background.rs`: [`Layer::prefetch`] (the
//! landmark range, before a layer is announced) and
//! [`Layer::start_background`] (everything, until the layer is complete).

mod ahead;
mod background;
mod open;
mod plan;

use std::sync::Arc;

use tokio::sync::watch;

use crate::fetch::{FetchError, FetchStatsSnapshot, Fetcher, Intent};
use crate::format::{Chunk, FileKind, FormatError, Inode, LayerIndex};
use crate::registry::RegistryError;

pub use background::{BackgroundHandle, BackgroundOutcome, PrefetchOutcome, Progress};
pub use open::TAIL_FETCH;
pub use plan::{CachedRead, PendingRead};

/// Why a layer could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("no inode {0} in this layer")]
    NoInode(u64),
    #[error("inode {0} is not a regular file")]
    NotFile(u64),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    // The cause in the message, not as a `source`: one-line reports say it once.
    #[error("reading the layer's footer and TOC: {0}")]
    Source(RegistryError),
    #[error(transparent)]
    Format(#[from] FormatError),
}

impl From<RegistryError> for LayerError {
    fn from(e: RegistryError) -> LayerError {
        LayerError::Source(e)
    }
}

/// One layer: the decoded index plus the fetcher (and through it the cache)
/// that produces its file contents.
pub struct Layer {
    index: Arc<LayerIndex>,
    fetcher: Fetcher,
    /// Indices into `index.chunks`, sorted by blob offset, one per blob
    /// range: the order of read-ahead and background fetch.
    blob_order: Arc<[u32]>,
    /// Dropped with the layer (unmount): its background fetches stop.
    alive: watch::Sender<()>,
    background: Arc<background::State>,
    /// Recent walks along the blob, for read-ahead windows (`ahead.rs`).
    streams: ahead::Streams,
}

impl Layer {
    /// A layer from an index already built and verified.
    pub fn new(index: LayerIndex, fetcher: Fetcher) -> Layer {
        let mut order: Vec<u32> = (0..index.chunks.len() as u32).collect();
        order.sort_by_key(|&i| index.chunks[i as usize].blob_range);
        order.dedup_by_key(|i| index.chunks[*i as usize].blob_range.0);
        Layer {
            index: Arc::new(index),
            fetcher,
            blob_order: order.into(),
            alive: watch::Sender::new(()),
            background: Arc::default(),
            streams: ahead::Streams::default(),
        }
    }

    /// The chunks of the blob in blob order, each range once.
    fn blob_chunks(&self) -> impl Iterator<Item = &Chunk> + '_ {
        self.blob_order
            .iter()
            .map(|&i| &self.index.chunks[i as usize])
    }

    pub fn index(&self) -> &LayerIndex {
        &self.index
    }

    pub fn inode(&self, ino: u64) -> Result<Inode, LayerError> {
        self.index.inode(ino).ok_or(LayerError::NoInode(ino))
    }

    /// The cache this layer's chunks are stored in.
    pub fn cache(&self) -> &Arc<crate::cache::Cache> {
        self.fetcher.cache()
    }

    /// The fetch counters of this layer.
    pub fn stats(&self) -> FetchStatsSnapshot {
        self.fetcher.stats().snapshot()
    }

    /// Plans a read of `len` bytes at `offset` of regular file `ino` and
    /// answers it from the cache if every byte is there. Blocking (cache file
    /// reads), never touches the network or the async runtime.
    pub fn read_cached(&self, ino: u64, offset: u64, len: u64) -> Result<CachedRead, LayerError> {
        let inode = self.inode(ino)?;
        if inode.kind() != FileKind::Reg {
            return Err(LayerError::NotFile(ino));
        }
        let chunks = self.index.file_chunks(&inode);
        let mut read = plan::plan_read(chunks, inode.size(), offset, len, self.fetcher.cache());
        match &mut read {
            CachedRead::Hit(_) => self.fetcher.stats().cache_hits(1),
            CachedRead::Miss(p) => p.ino = ino,
        }
        Ok(read)
    }

    /// Fetches what a planned read is missing and assembles its bytes.
    pub async fn complete(&self, pending: PendingRead) -> Result<Vec<u8>, LayerError> {
        let missing = pending.missing_chunks();
        let file = self
            .index
            .inode(pending.ino)
            .map(|i| self.index.file_chunks(&i))
            .unwrap_or_default();
        let ahead::Plan { behind, ahead } = self.read_ahead(&missing, file);
        if !behind.is_empty() {
            // Its own GET, so the bytes this read waits for do not queue
            // behind them; below on-demand reads in the scheduler.
            let fetcher = self.fetcher.clone();
            tokio::spawn(async move { fetcher.warm(&behind, Intent::Prefetch).await });
        }
        let fetched = self
            .fetcher
            .fetch_with_read_ahead(&missing, &ahead, Intent::OnDemand)
            .await?;
        Ok(pending.assemble(&missing, &fetched))
    }

    /// Reads through cache and fetcher: the convenience form of
    /// [`Layer::read_cached`] followed by [`Layer::complete`]. Runs the
    /// cache lookup on the blocking pool.
    pub async fn read(
        self: &Arc<Self>,
        ino: u64,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, LayerError> {
        let me = self.clone();
        let planned = tokio::task::spawn_blocking(move || me.read_cached(ino, offset, len))
            .await
            .expect("read planning does not panic")?;
        match planned {
            CachedRead::Hit(data) => Ok(data),
            CachedRead::Miss(p) => self.complete(p).await,
        }
    }
}

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod tests;
