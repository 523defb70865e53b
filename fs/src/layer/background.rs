//! Whole-layer fetches: the landmark prefetch before a layer is announced,
//! and the background fetch that makes a layer complete.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::Intent;
use crate::fetch::{FetchError, Fetcher, Hint, MAX_GAP};
use crate::format::{Chunk, LayerIndex};
use crate::layer::order::BlobOrder;

/// How a `Layer::prefetch` ended.
#[derive(Debug, Clone)]
pub enum PrefetchOutcome {
    /// The layer has no prefetch landmark: nothing to do.
    NoLandmark,
    /// Every chunk of the landmark range is cached. `fetched` chunks
    /// (`bytes` compressed) were fetched by this call; the rest was cached
    /// already or fetched by someone else meanwhile.
    Done { fetched: usize, bytes: u64 },
    /// The timeout passed first; the fetch goes on in the background.
    TimedOut,
    /// Some chunks could not be fetched (they will be on first read).
    Failed(FetchError),
}

/// How a background fetch ended.
#[derive(Debug, Clone)]
pub enum BackgroundOutcome {
    /// Every chunk of the layer is cached.
    Complete,
    /// Stopped by dropping its handle or the layer before completing.
    Stopped,
    /// Ran through the layer, but `failed` GETs failed (first error given);
    /// their chunks are fetched on demand.
    Failed { failed: usize, first: FetchError },
    /// Ran through the layer twice without error, yet `missing` chunks are
    /// not cached (evicted meanwhile, or their cache writes failed).
    Incomplete { missing: usize },
    /// Stood down: the cache's bound is below the working set
    /// (`Cache::under_pressure`), so fetching the whole layer would only
    /// evict what reads want. Reads fetch their chunks on demand.
    CacheFull,
}

/// Progress of a layer towards being complete (every chunk cached).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Compressed bytes of the blob's chunks that are cached.
    pub cached_bytes: u64,
    /// Compressed bytes of all the blob's chunks.
    pub total_bytes: u64,
    /// Whether a background fetch is running now.
    pub background_running: bool,
    /// Every chunk is cached (`cached_bytes == total_bytes`).
    pub complete: bool,
}

/// Shared between a layer and its background task.
#[derive(Debug, Default)]
pub(super) struct State {
    running: AtomicBool,
    /// Set once a scan found every chunk cached; saves later scans.
    complete: AtomicBool,
    /// Compressed bytes fetched by background GETs (for logs).
    background_bytes: AtomicU64,
}

/// A running background fetch. Dropping it stops the fetch: GETs already
/// on the wire finish and are cached, no new one starts.
#[derive(Debug)]
pub struct BackgroundHandle {
    _stop: watch::Sender<()>,
    task: Option<tokio::task::JoinHandle<BackgroundOutcome>>,
}

impl BackgroundHandle {
    /// Whether the fetch has ended (complete, failed or stopped).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Lets the fetch run on without a handle, until it ends or the layer
    /// is dropped (unmounted). Must run inside a tokio runtime.
    pub fn detach(mut self) {
        if let Some(task) = self.task.take() {
            let stop = std::mem::replace(&mut self._stop, watch::Sender::new(()));
            tokio::spawn(async move {
                let _stop = stop; // held until the fetch ends
                let _ = task.await;
            });
        }
    }

    /// Waits for the fetch to end.
    pub async fn wait(mut self) -> BackgroundOutcome {
        match self.task.take() {
            Some(t) => t.await.unwrap_or(BackgroundOutcome::Stopped),
            None => BackgroundOutcome::Stopped,
        }
    }
}

/// What whole-layer fetches use of a layer, borrowed from it per call
/// (the background task takes clones of its own).
pub(super) struct Whole<'a> {
    pub index: &'a Arc<LayerIndex>,
    pub order: &'a BlobOrder,
    pub fetcher: &'a Fetcher,
    pub state: &'a Arc<State>,
}

impl Whole<'_> {
    /// `Layer::prefetch`: the landmark range's chunks, waited for up to
    /// `timeout`.
    pub async fn prefetch(&self, timeout: Duration) -> PrefetchOutcome {
        let Some(range) = self.index.prefetch.clone() else {
            return PrefetchOutcome::NoLandmark;
        };
        let chunks: Vec<Chunk> = self
            .order
            .chunks(&self.index.chunks)
            .filter(|c| c.blob_range.0 >= range.start && c.blob_range.1 <= range.end)
            .filter(|c| !self.fetcher.cache().contains(&c.digest))
            .copied()
            .collect();
        let bytes: u64 = chunks.iter().map(|c| c.blob_range.1 - c.blob_range.0).sum();
        let fetcher = self.fetcher.clone();
        let mut task = tokio::spawn(async move { fetcher.warm_for(Hint::Landmark, &chunks).await });
        match tokio::time::timeout(timeout, &mut task).await {
            Err(_) => PrefetchOutcome::TimedOut,
            Ok(Ok(Ok(fetched))) => PrefetchOutcome::Done { fetched, bytes },
            Ok(Ok(Err(e))) => PrefetchOutcome::Failed(e),
            Ok(Err(join)) => {
                // Only a panic or a runtime shutting down gets here.
                tracing::warn!(error = %join, "prefetch task ended abnormally");
                PrefetchOutcome::TimedOut
            }
        }
    }

    /// `Layer::start_background`: one background fetch per layer, which
    /// stops when the handle or `alive`'s sender (the layer) is dropped.
    pub fn start(&self, alive: watch::Receiver<()>) -> BackgroundHandle {
        let (stop, stop_rx) = watch::channel(());
        if self.state.running.swap(true, Ordering::AcqRel) {
            return BackgroundHandle {
                _stop: stop,
                task: None,
            };
        }
        let job = Job {
            fetcher: self.fetcher.clone(),
            index: self.index.clone(),
            order: self.order.clone(),
            state: self.state.clone(),
            stop: stop_rx,
            alive,
            yielded: false,
        };
        let task = tokio::spawn(job.run());
        BackgroundHandle {
            _stop: stop,
            task: Some(task),
        }
    }

    /// `Layer::progress`: scans the chunk list (in-memory lookups) until
    /// the layer was once found complete.
    pub fn progress(&self) -> Progress {
        let mut p = Progress {
            background_running: self.state.running.load(Ordering::Acquire),
            ..Progress::default()
        };
        let complete = self.state.complete.load(Ordering::Acquire);
        for c in self.order.chunks(&self.index.chunks) {
            let len = c.blob_range.1 - c.blob_range.0;
            p.total_bytes += len;
            if complete || self.fetcher.cache().contains(&c.digest) {
                p.cached_bytes += len;
            }
        }
        p.complete = p.cached_bytes == p.total_bytes;
        if p.complete {
            self.state.complete.store(true, Ordering::Release);
        }
        p
    }
}

struct Job {
    fetcher: Fetcher,
    index: Arc<LayerIndex>,
    order: BlobOrder,
    state: Arc<State>,
    stop: watch::Receiver<()>,
    alive: watch::Receiver<()>,
    /// A pass stood down because the cache is under pressure.
    yielded: bool,
}

impl Job {
    async fn run(mut self) -> BackgroundOutcome {
        let outcome = self.fetch_all().await;
        self.state.running.store(false, Ordering::Release);
        tracing::debug!(
            ?outcome,
            background_bytes = self.state.background_bytes.load(Ordering::Relaxed),
            "background fetch ended"
        );
        outcome
    }

    /// Two passes over the blob: the first skips chunks another fetch is
    /// producing, the second picks up whatever is still missing (such a
    /// fetch may have failed) and waits for fetches still under way.
    async fn fetch_all(&mut self) -> BackgroundOutcome {
        let (mut failed, mut first) = (0, None);
        for pass in 0..2 {
            if self.yielded {
                break;
            }
            match self.pass(pass == 0).await {
                None => return BackgroundOutcome::Stopped,
                Some((n, e)) => {
                    failed += n;
                    if let Some(e) = e {
                        first.get_or_insert(e);
                    }
                }
            }
        }
        if let Some(first) = first {
            return BackgroundOutcome::Failed { failed, first };
        }
        if self.yielded {
            return BackgroundOutcome::CacheFull;
        }
        let missing = self
            .order
            .iter()
            .filter(|&i| {
                !self
                    .fetcher
                    .cache()
                    .contains(&self.index.chunks[i as usize].digest)
            })
            .count();
        if missing > 0 {
            return BackgroundOutcome::Incomplete { missing };
        }
        self.state.complete.store(true, Ordering::Release);
        BackgroundOutcome::Complete
    }

    /// One pass in blob order; `None` if stopped, else the failed GETs and
    /// the first error.
    async fn pass(&mut self, skip_in_flight: bool) -> Option<(usize, Option<FetchError>)> {
        let mut tasks: JoinSet<Result<usize, FetchError>> = JoinSet::new();
        let (mut failed, mut first) = (0, None);
        let mut note = |res: Result<Result<usize, FetchError>, tokio::task::JoinError>| {
            if let Ok(Err(e)) = res {
                failed += 1;
                first.get_or_insert(e);
            }
        };
        let mut pos = 0;
        loop {
            // GETs of the link's speculative size, a few of which fill its
            // budget, as measured now: a pass that starts with the layer's
            // opening, before the link is measured, would otherwise cut a
            // whole layer into GETs of a quarter of the initial budget, a
            // round trip each (S2 at RTT 200 ms: 1,027 GETs of ~50 KB,
            // 0.39x the link).
            let max_get = self.fetcher.scheduler().speculative_get();
            let Some(group) = self.next_group(&mut pos, max_get, skip_in_flight) else {
                break;
            };
            if self.fetcher.cache().under_pressure() {
                self.yielded = true;
                break;
            }
            let bytes = group.iter().map(|c| c.blob_range.1 - c.blob_range.0).sum();
            let scheduler = self.fetcher.scheduler().clone();
            let permit = tokio::select! {
                p = scheduler.admit(Intent::Background, bytes) => p,
                _ = self.stop.changed() => return None,
                _ = self.alive.changed() => return None,
            };
            // Reap finished GETs as we go so errors are seen and the set
            // stays as small as the scheduler's concurrency.
            while let Some(res) = tasks.try_join_next() {
                note(res);
            }
            let fetcher = self.fetcher.clone();
            let state = self.state.clone();
            tasks.spawn(async move {
                let n = fetcher
                    .warm_admitted(&group, Intent::Background, Some(permit))
                    .await?;
                state.background_bytes.fetch_add(bytes, Ordering::Relaxed);
                Ok(n)
            });
        }
        loop {
            tokio::select! {
                res = tasks.join_next() => match res {
                    Some(res) => note(res),
                    None => break,
                },
                _ = self.stop.changed() => return None,
                _ = self.alive.changed() => return None,
            }
        }
        Some((failed, first))
    }

    /// The next run of chunks, from `pos` in blob order, that are not
    /// cached (nor in flight, with `skip_in_flight`) and at most
    /// [`MAX_GAP`] apart (skipped chunks count as gap), spanning at most `max_get` compressed bytes (a
    /// larger chunk goes alone). Stopping at every gap (the headers of
    /// directories and symlinks) made a layer of many small files cost
    /// hundreds of GETs.
    fn next_group(
        &self,
        pos: &mut usize,
        max_get: u64,
        skip_in_flight: bool,
    ) -> Option<Vec<Chunk>> {
        let chunks = &self.index.chunks;
        let skip = |c: &Chunk| {
            self.fetcher.cache().contains(&c.digest)
                || (skip_in_flight && self.fetcher.in_flight(&c.digest))
        };
        while *pos < self.order.len()
            && self
                .order
                .get(*pos)
                .is_some_and(|i| skip(&chunks[i as usize]))
        {
            *pos += 1;
        }
        let first = chunks.get(self.order.get(*pos)? as usize)?;
        let mut group = vec![*first];
        let (start, mut end) = first.blob_range;
        *pos += 1;
        while let Some(i) = self.order.get(*pos) {
            let c = &chunks[i as usize];
            if c.blob_range.1 - start > max_get {
                break;
            }
            if skip(c) {
                // A chunk cached already (a file identical to one before
                // it: Go's source tree has hundreds) is a gap like any other:
                // carried if small, so the GET goes on past it.
                if c.blob_range.1 > end + MAX_GAP {
                    break;
                }
                *pos += 1;
                continue;
            }
            if c.blob_range.0 > end + MAX_GAP {
                break;
            }
            end = c.blob_range.1;
            group.push(*c);
            *pos += 1;
        }
        Some(group)
    }
}
