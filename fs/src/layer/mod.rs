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
//!
//! The parts (`background.rs`, `hints/ahead.rs`) do not name [`Layer`]:
//! the layer lends them the pieces they work on (its index, its chunks'
//! blob order from `order.rs`, its fetcher), so the arrows between files
//! point one way, from here to them.

mod background;
pub(crate) mod hints;
mod open;
mod order;
mod plan;
pub mod profile;
mod record;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::Intent;
use crate::fetch::{FetchError, FetchStatsSnapshot, Fetcher, Hint, HintCounts, OpenError};
use crate::format::{FileKind, Inode, LayerIndex};

pub use background::{BackgroundHandle, BackgroundOutcome, PrefetchOutcome, Progress};
pub use hints::program::{Entrypoint, prefetch_entrypoint};
pub use plan::{CachedRead, PendingRead};
pub use record::{Access, RecordError, Recorder};

use background::Whole;
use hints::ahead::{Planner, Streams};
use order::BlobOrder;

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
    streams: Streams,
    /// Files already looked at for the libraries they need (`hints/elf.rs`).
    examined: Mutex<HashSet<u64>>,
    /// Files already looked at for the modules they import
    /// (`hints/python.rs`).
    imports_examined: Mutex<HashSet<u64>>,
    /// Python interpreters' command lines seen (`hints/python.rs`).
    python: hints::python::Interpreters,
    /// Which files workloads open and read, while a recording runs.
    recorder: Recorder,
    /// A start profile's replay runs (`profile.rs`): one at a time.
    replaying: std::sync::atomic::AtomicBool,
}

impl Layer {
    /// A layer from an index already built and verified.
    pub fn new(index: LayerIndex, fetcher: Fetcher) -> Layer {
        Layer {
            blob_order: BlobOrder::new(&index.chunks),
            index: Arc::new(index),
            fetcher,
            alive: watch::Sender::new(()),
            background: Arc::default(),
            streams: Streams::default(),
            examined: Mutex::default(),
            imports_examined: Mutex::default(),
            python: hints::python::Interpreters::default(),
            recorder: Recorder::default(),
            replaying: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn index(&self) -> &LayerIndex {
        &self.index
    }

    /// The access recorder the FUSE adapter reports opens and reads to.
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// Starts recording session `id`: which files are opened and read.
    pub fn start_recording(&self, id: u64) -> Result<(), RecordError> {
        self.recorder.start(id)
    }

    /// Ends session `id`: the files it saw, in first-access order, by path.
    pub fn stop_recording(&self, id: u64) -> Option<Vec<Access>> {
        self.recorder.stop(id, &self.index)
    }

    pub fn inode(&self, ino: u64) -> Result<Inode, LayerError> {
        self.index.inode(ino).ok_or(LayerError::NoInode(ino))
    }

    /// The fetcher of this layer's blob (an overlaybd disk's whole-blob
    /// pass reads through its source and scheduler, and counts in its
    /// stats).
    pub(crate) fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    /// The cache this layer's chunks are stored in.
    pub fn cache(&self) -> &Arc<crate::cache::Cache> {
        self.fetcher.cache()
    }

    /// The fetch counters of this layer.
    pub fn stats(&self) -> FetchStatsSnapshot {
        self.fetcher.stats().snapshot()
    }

    /// What each hint fetched for this layer, and what reads used of it.
    pub fn hint_stats(&self) -> HintCounts {
        self.fetcher.hints().snapshot()
    }

    /// The fetch scheduler of this layer's registry host.
    pub fn scheduler(&self) -> &crate::fetch::FetchScheduler {
        self.fetcher.scheduler()
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
        let end = inode.size().min(offset.saturating_add(len));
        let first = chunks.partition_point(|c| c.file_offset + c.size <= offset);
        let covering = chunks.get(first..).unwrap_or_default();
        let covering = covering.iter().take_while(|c| c.file_offset < end);
        self.fetcher.hints().used(covering.clone());
        let mut read = plan::plan_read(chunks, inode.size(), offset, len, self.fetcher.cache());
        match &mut read {
            CachedRead::Hit(data) => {
                // A hit carries its walk along the blob (a miss is noted
                // by the read-ahead planner).
                let span = covering.fold(None, |s: Option<(u64, u64)>, c| {
                    let (a, b) = c.blob_range;
                    Some(s.map_or((a, b), |(x, y)| (x.min(a), y.max(b))))
                });
                if let Some((start, end)) = span {
                    self.streams.hit(start, end);
                }
                let stats = self.fetcher.stats();
                stats.cache_hits(1);
                stats.bytes_served(data.len() as u64);
            }
            CachedRead::Miss(p) => p.ino = ino,
        }
        Ok(read)
    }

    /// A file handed whole to the kernel (passthrough): its reads bypass
    /// [`Layer::read_cached`], so the chunks hints fetched of it count as
    /// used now.
    pub fn opened_whole(&self, inode: &Inode) {
        self.fetcher.hints().used(self.index.file_chunks(inode));
    }

    /// Fetches what a planned read is missing and assembles its bytes.
    pub async fn complete(self: &Arc<Self>, pending: PendingRead) -> Result<Vec<u8>, LayerError> {
        self.complete_with(pending, &[], true).await
    }

    /// For a disk's blob (one file, the LSMT file, never a program): like
    /// [`Layer::complete`] without the library hints, also fetching what
    /// `around` (reads the caller expects next: the rest of a disk file's
    /// window) is missing, in the same GETs, as read-ahead.
    pub async fn complete_around(
        self: &Arc<Self>,
        pending: PendingRead,
        around: &[PendingRead],
    ) -> Result<Vec<u8>, LayerError> {
        self.complete_with(pending, around, false).await
    }

    async fn complete_with(
        self: &Arc<Self>,
        pending: PendingRead,
        around: &[PendingRead],
        library_hints: bool,
    ) -> Result<Vec<u8>, LayerError> {
        let missing = pending.missing_chunks();
        tracing::debug!(
            ino = pending.ino,
            blob = self.fetcher.source().size(),
            from = missing.first().map_or(0, |c| c.blob_range.0),
            to = missing.last().map_or(0, |c| c.blob_range.1),
            "read missed"
        );
        let file = self
            .index
            .inode(pending.ino)
            .map(|i| self.index.file_chunks(&i))
            .unwrap_or_default();
        let planner = Planner {
            index: &self.index,
            order: &self.blob_order,
            fetcher: &self.fetcher,
            streams: &self.streams,
        };
        // A miss among the prioritized files carries the rest of them
        // (counted as the landmark's); elsewhere, read-ahead along a walk.
        let mut ahead = planner.start_rest(&missing);
        let ahead_from = ahead.len();
        if ahead.is_empty() {
            ahead = planner.read_ahead(&missing, file);
        } else {
            self.fetcher.speculating(Hint::Landmark, &ahead);
        }
        let mut seen: HashSet<_> = missing.iter().chain(&ahead).map(|c| c.digest).collect();
        for c in around.iter().flat_map(PendingRead::missing_chunks) {
            if seen.insert(c.digest) {
                ahead.push(c);
            }
        }
        if ahead.len() > ahead_from {
            self.fetcher
                .speculating(Hint::ReadAhead, &ahead[ahead_from..]);
        }
        let fetched = self
            .fetcher
            .fetch_with_read_ahead(&missing, &ahead, Intent::OnDemand)
            .await?;
        if library_hints {
            self.prefetch_libraries(pending.ino);
            self.prefetch_imports(pending.ino);
        }
        let data = pending.assemble(&missing, &fetched);
        self.fetcher.stats().bytes_served(data.len() as u64);
        Ok(data)
    }

    /// How much of a disk file around a miss to fetch with it (the
    /// scheduler's base read-ahead window), or 0 when speculation is off
    /// or the cache is under pressure.
    pub fn read_around(&self) -> u64 {
        let config = self.fetcher.scheduler().config();
        if !config.speculate || self.fetcher.cache().under_pressure() {
            return 0;
        }
        config.read_ahead
    }

    /// Fetches what planned reads are missing, with `Intent::Prefetch` and
    /// no read-ahead, adjacent chunks merged into as few GETs as the GET
    /// size cap allows; returns the bytes of the chunks fetched. For a
    /// caller that knows what will be read soon (a disk's ext4 metadata,
    /// its entrypoint): nothing is assembled. Counted as `hint`'s bytes
    /// (for its hit rate) when one is named.
    pub async fn prefetch_reads(
        &self,
        reads: &[PendingRead],
        hint: Option<Hint>,
    ) -> Result<u64, LayerError> {
        let mut chunks = Vec::new();
        let mut seen = HashSet::new();
        for c in reads.iter().flat_map(PendingRead::missing_chunks) {
            if seen.insert(c.digest) {
                chunks.push(c);
            }
        }
        if chunks.is_empty() {
            return Ok(0);
        }
        if let Some(hint) = hint {
            self.fetcher.speculating(hint, &chunks);
        }
        self.fetcher.fetch(&chunks, Intent::Prefetch).await?;
        Ok(chunks.iter().map(|c| c.size).sum())
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

    /// Fetches the chunks of the prefetch landmark's range (the files the
    /// image marked as needed at start) with `Intent::Prefetch`, adjacent
    /// chunks merged into as few GETs as the GET size cap allows. Returns
    /// when they are cached, or after `timeout`, in which case the fetch
    /// continues (it is not cancelled). Must run inside a tokio runtime.
    pub async fn prefetch(&self, timeout: Duration) -> PrefetchOutcome {
        self.whole().prefetch(timeout).await
    }

    /// Starts fetching every chunk of the layer not cached yet, in blob
    /// order, with `Intent::Background`: GETs of up to the scheduler's
    /// `background_get` bytes, as many at once as it admits, paused while
    /// on-demand reads are on the wire. Stops when the handle is dropped or
    /// the layer is dropped (unmounted). Must run inside a tokio runtime.
    ///
    /// One background fetch per layer: while one runs (started when the
    /// layer was resolved ahead, say), this returns a finished handle and
    /// the running fetch goes on.
    pub fn start_background(&self) -> BackgroundHandle {
        self.whole().start(self.alive.subscribe())
    }

    /// How much of the layer is cached. Scans the chunk list (in-memory
    /// lookups) until the layer was once found complete.
    pub fn progress(&self) -> Progress {
        self.whole().progress()
    }

    /// The parts of the layer whole-layer fetches use.
    fn whole(&self) -> Whole<'_> {
        Whole {
            index: &self.index,
            order: &self.blob_order,
            fetcher: &self.fetcher,
            state: &self.background,
        }
    }
}

#[cfg(test)]
mod engine_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tree_tests;
