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
mod elf;
mod open;
mod plan;
mod program;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::Intent;
use crate::fetch::{FetchError, FetchStatsSnapshot, Fetcher, OpenError};
use crate::format::{Chunk, FileKind, Inode, LayerIndex};

pub use background::{BackgroundHandle, BackgroundOutcome, PrefetchOutcome, Progress};
pub use plan::{CachedRead, PendingRead};
pub use program::{Entrypoint, prefetch_entrypoint};

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
    /// Recent walks along the blob, for read-ahead windows (`ahead.rs`).
    streams: ahead::Streams,
    /// Files already looked at for the libraries they need (`elf.rs`).
    examined: Mutex<HashSet<u64>>,
    /// The directory recently looked-up files were found in, for
    /// read-behind within a directory (`ahead.rs`).
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
            streams: ahead::Streams::default(),
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
        let ahead::Plan { behind, ahead } = self.read_ahead(&missing, file, dir);
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

    /// After a miss on file `ino`: if it is a program whose dynamic section
    /// is in the cache now, fetches the libraries it needs that this layer
    /// holds, each at most `read_ahead_max` compressed, then theirs. Each
    /// file is looked at until that can be decided, then never again.
    fn prefetch_libraries(self: &Arc<Self>, ino: u64) {
        let config = self.fetcher.scheduler().config();
        if config.read_ahead == 0
            || self
                .examined
                .lock()
                .expect("examined set poisoned")
                .contains(&ino)
        {
            return;
        }
        let max = config.read_ahead_max.max(config.read_ahead);
        let me = self.clone();
        tokio::spawn(async move {
            let finder = me.clone();
            let Ok(libraries) = tokio::task::spawn_blocking(move || finder.libraries(ino)).await
            else {
                return;
            };
            for lib in libraries {
                let Ok(inode) = me.inode(lib) else { continue };
                let chunks = me.index.file_chunks(&inode).to_vec();
                let bytes: u64 = chunks.iter().map(|c| c.blob_range.1 - c.blob_range.0).sum();
                if bytes > max {
                    continue;
                }
                let me = me.clone();
                tokio::spawn(async move {
                    if me.fetcher.warm(&chunks, Intent::Prefetch).await.is_ok() {
                        me.prefetch_libraries(lib);
                    }
                });
            }
        });
    }

    /// The libraries of file `ino` found in this layer, if it is a program
    /// (blocking: reads the cache). Empty until its dynamic section is cached.
    fn libraries(&self, ino: u64) -> Vec<u64> {
        let Ok(inode) = self.inode(ino) else {
            return Vec::new();
        };
        let chunks = self.index.file_chunks(&inode);
        let read = |offset: u64, len: usize| match plan::plan_read(
            chunks,
            inode.size(),
            offset,
            len as u64,
            self.fetcher.cache(),
        ) {
            CachedRead::Hit(d) if d.len() == len => Some(d),
            _ => None,
        };
        let resolve = |name: &[u8], needs: &elf::Needs| {
            elf::candidates(name, needs)
                .iter()
                .find_map(|path| elf::resolve_file(&self.index, path))
        };
        let mut found = match elf::examine(inode.size(), &read) {
            // The loader is mapped first: it need not wait for the rest.
            elf::Examined::NotYet { interp } => {
                let needs = elf::Needs::default();
                return interp
                    .and_then(|i| resolve(&i, &needs))
                    .into_iter()
                    .collect();
            }
            elf::Examined::NotElf => Vec::new(),
            elf::Examined::Needs(needs) => {
                let mut found: Vec<u64> = Vec::new();
                let names = needs.needed.iter().chain(&needs.interp);
                for name in names {
                    let lib = resolve(name, &needs);
                    if let Some(lib) = lib.filter(|l| *l != ino && !found.contains(l)) {
                        found.push(lib);
                    }
                }
                found
            }
        };
        let mut examined = self.examined.lock().expect("examined set poisoned");
        examined.insert(ino);
        found.retain(|l| !examined.contains(l));
        tracing::debug!(ino, libraries = found.len(), "looked for libraries");
        found
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
        let mut order: Vec<u32> = (0..chunks.len() as u32).collect();
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
            None => Some(pos as u32),
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
