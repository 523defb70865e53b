//! One mounted layer: its index, and read planning over cache and fetch.
//!
//! A read is planned into the chunks that cover it. The cache is asked for
//! each piece synchronously (a blocking file read, fine on a FUSE thread):
//! that is the read's one cache lookup. Only when something is missing does
//! the read go to the [`Fetcher`], on the async runtime, which does not ask
//! the cache again (but for the one re-check that closes the race with a
//! flight finishing meanwhile), together with the chunks that follow it in
//! the blob (read-ahead, `hints/ahead.rs`).
//!
//! What a read is likely to be followed by (the blob's next chunks, a
//! program's libraries, the image's entrypoint) is guessed in `hints/`.
//!
//! Whole-layer fetches live in `background.rs`: [`Layer::prefetch`] (the
//! landmark range, before a layer is announced) and
//! [`Layer::start_background`] (everything, until the layer is complete).

mod background;
mod hints;
mod open;
mod plan;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::Intent;
use crate::fetch::{FetchError, FetchStatsSnapshot, Fetcher, OpenError};
use crate::format::{Chunk, FileKind, Inode, LayerIndex};

pub use background::{BackgroundHandle, BackgroundOutcome, PrefetchOutcome, Progress};
pub use hints::program::{Entrypoint, prefetch_entrypoint};
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
    #[error(transparent)]
    Open(#[from] OpenError),
}

/// One layer: the decoded index plus the fetcher (and through it the cache)
/// that produces its file contents.
pub struct Layer {
    index: Arc<LayerIndex>,
    fetcher: Fetcher,
    /// Indices into `index.chunks`, sorted by blob offset, one per blob
    /// range: the order of read-ahead and background fetch.
    blob_order: BlobOrder,
    /// Dropped with the layer (unmount): its background fetches stop.
    alive: watch::Sender<()>,
    background: Arc<background::State>,
    /// Recent walks along the blob, for read-ahead windows (`hints/ahead.rs`).
    streams: hints::ahead::Streams,
    /// Files already looked at for the libraries they need (`hints/elf.rs`).
    examined: Mutex<HashSet<u64>>,
    /// The directory recently looked-up files were found in, for
    /// read-behind within a directory (`hints/ahead.rs`).
    parents: Mutex<HashMap<u32, u32>>,
}

/// Looked-up files whose directory a layer remembers (~70 KiB); then it
/// starts over.
const PARENTS_KEPT: usize = 4 << 10;

impl Layer {
    /// A layer from an index already built and verified.
    pub fn new(index: LayerIndex, fetcher: Fetcher) -> Layer {
        Layer {
            blob_order: BlobOrder::new(&index.chunks),
            index: Arc::new(index),
            fetcher,
            alive: watch::Sender::new(()),
            background: Arc::default(),
            streams: hints::ahead::Streams::default(),
            examined: Mutex::default(),
            parents: Mutex::default(),
        }
    }

    /// The chunks of the blob in blob order, each range once.
    fn blob_chunks(&self) -> impl Iterator<Item = &Chunk> + '_ {
        self.blob_order
            .iter()
            .map(|i| &self.index.chunks[i as usize])
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

    /// Notes that regular file `ino` was looked up in directory `parent`
    /// (a file may have several names: the latest lookup wins).
    pub fn looked_up(&self, parent: u64, ino: u64) {
        let mut parents = self.parents.lock().expect("parents map poisoned");
        if parents.len() >= PARENTS_KEPT {
            parents.clear();
        }
        // Inode numbers of a layer fit in 32 bits (`LayerIndex::new`).
        if let (Ok(ino), Ok(parent)) = (u32::try_from(ino), u32::try_from(parent)) {
            parents.insert(ino, parent);
        }
    }

    /// Fetches what a planned read is missing and assembles its bytes.
    pub async fn complete(self: &Arc<Self>, pending: PendingRead) -> Result<Vec<u8>, LayerError> {
        let missing = pending.missing_chunks();
        let file = self
            .index
            .inode(pending.ino)
            .map(|i| self.index.file_chunks(&i))
            .unwrap_or_default();
        let dir = u32::try_from(pending.ino).ok().and_then(|ino| {
            let parents = self.parents.lock().expect("parents map poisoned");
            parents.get(&ino).map(|&d| u64::from(d))
        });
        let hints::ahead::Plan { behind, ahead } = self.read_ahead(&missing, file, dir);
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
        self.prefetch_libraries(pending.ino);
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
#[cfg(test)]
mod tree_tests;

/// Indices into a layer's chunks in blob order, one per blob range: the
/// order of read-ahead and background fetch. The chunks of an eStargz TOC
/// are in blob order already, each range once, so for most layers nothing
/// is stored (4 bytes per chunk saved for as long as the layer is mounted).
#[derive(Clone)]
pub(crate) struct BlobOrder {
    /// `None`: the identity over `len` chunks.
    sorted: Option<Arc<[u32]>>,
    len: usize,
}

impl BlobOrder {
    fn new(chunks: &[Chunk]) -> BlobOrder {
        let in_order = chunks
            .windows(2)
            .all(|w| w[0].blob_range.0 < w[1].blob_range.0 && w[0].blob_range <= w[1].blob_range);
        if in_order {
            return BlobOrder {
                sorted: None,
                len: chunks.len(),
            };
        }
        let count = u32::try_from(chunks.len()).expect("the index builder checks chunks fit u32");
        let mut order: Vec<u32> = (0..count).collect();
        order.sort_by_key(|&i| chunks[i as usize].blob_range);
        order.dedup_by_key(|i| chunks[*i as usize].blob_range.0);
        BlobOrder {
            len: order.len(),
            sorted: Some(order.into()),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The chunk index at position `pos` in blob order.
    pub(crate) fn get(&self, pos: usize) -> Option<u32> {
        match &self.sorted {
            _ if pos >= self.len => None,
            Some(order) => Some(order[pos]),
            // `pos < len`, and the index builder checks that fits u32.
            None => u32::try_from(pos).ok(),
        }
    }

    /// Chunk indices from position `from` on, in blob order.
    pub(crate) fn iter_from(&self, from: usize) -> impl DoubleEndedIterator<Item = u32> + '_ {
        (from..self.len).filter_map(|p| self.get(p))
    }

    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = u32> + '_ {
        self.iter_from(0)
    }

    /// The first position whose chunk index fails `pred` (which must hold
    /// for a prefix of the order), by binary search.
    pub(crate) fn partition_point(&self, mut pred: impl FnMut(u32) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(self.get(mid).expect("mid is below len")) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

#[cfg(test)]
mod order_tests {
    use super::*;
    use crate::testing::chunk_at as chunk;

    #[test]
    fn chunks_in_blob_order_store_nothing_and_others_are_sorted_once_per_range() {
        let ordered = BlobOrder::new(&[chunk(0, 10), chunk(10, 20), chunk(25, 30)]);
        assert!(ordered.sorted.is_none());
        assert_eq!(ordered.iter().collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(ordered.partition_point(|i| i < 2), 2);

        // Out of order, and two chunks sharing one range (a hard link's).
        let mixed = BlobOrder::new(&[chunk(20, 30), chunk(0, 10), chunk(20, 30), chunk(10, 20)]);
        assert_eq!(mixed.iter().collect::<Vec<_>>(), vec![1, 3, 0]);
        assert_eq!(mixed.iter_from(1).rev().collect::<Vec<_>>(), vec![0, 3]);
        assert_eq!(mixed.get(3), None);
    }
}
