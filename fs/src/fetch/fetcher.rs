//! [`Fetcher`]: cache lookups, singleflight, merged GETs, verification.
//!
//! One fetcher serves one layer: it holds that layer's blob source, format
//! and counters. Chunks are deduplicated across layers by the shared cache
//! (keyed by chunk digest); only two layers missing the *same* chunk at the
//! *same* moment fetch it twice, which is rare and harmless.

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use futures::StreamExt;
use tokio::sync::watch;

use super::FetchStats;
use super::hints::{Hint, HintStats};
use super::plan::{Group, merge_adjacent};
use super::scheduler::{FetchScheduler, Permit};
use crate::Digest;
use crate::Intent;
use crate::cache::Cache;
use crate::format::{Chunk, Format, FormatError, MAX_CHUNK_SIZE};
use crate::num::usize_from;
use crate::registry::{BlobSource, RegistryError};

/// Largest ranged GET built by merging adjacent misses.
pub const MAX_MERGED_GET: u64 = 8 << 20;

/// Longest compressed blob range of one chunk the fetcher GETs and holds.
/// A chunk's plain bytes are at most [`MAX_CHUNK_SIZE`] and compressing
/// incompressible data adds well under 1 %; the rest leaves room for a
/// writer that groups small files into one compression member (eStargz's
/// `innerOffset`).
pub const MAX_CHUNK_RANGE: u64 = MAX_CHUNK_SIZE + MAX_CHUNK_SIZE / 4;

/// Why the bytes of a chunk could not be produced. Cloneable because every
/// reader waiting on a shared fetch receives the same error. The cause is
/// part of the message (and not a `source`) so a one-line report says it once.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("reading blob range {start}..{end}: {error}")]
    Source {
        start: u64,
        end: u64,
        error: Arc<RegistryError>,
    },
    #[error("reading blob range {start}..{end}: got {got} bytes")]
    ShortRead { start: u64, end: u64, got: u64 },
    #[error("chunk at blob offset {offset}: {error}")]
    Verify {
        offset: u64,
        error: Arc<FormatError>,
    },
    #[error(
        "chunk at blob offset {start}: blob range {start}..{end} is empty, longer than \
         {MAX_CHUNK_RANGE} bytes or outside the bytes fetched for it"
    )]
    BadRange { start: u64, end: u64 },
    #[error("fetch of chunk {0} was abandoned")]
    Abandoned(Digest),
}

type FlightResult = Option<Result<Bytes, FetchError>>;
type Flight = Arc<watch::Sender<FlightResult>>;

/// Fetches chunks of one layer's blob; see the module docs. Cloning is
/// cheap and shares everything (flights, counters, scheduler).
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

struct Inner {
    source: Arc<dyn BlobSource>,
    format: Arc<dyn Format>,
    cache: Arc<Cache>,
    /// Chunks being fetched now; readers that miss one subscribe to it.
    inflight: DashMap<Digest, Flight>,
    stats: FetchStats,
    scheduler: FetchScheduler,
    max_merged_get: u64,
    /// Blob bytes fetched when the layer was opened that end a chunk
    /// starting before them; that chunk is completed with them. Dropped
    /// when a chunk completed with them fails verification.
    tail: Mutex<Option<Tail>>,
}

/// Blob bytes `[offset, offset + len)`, kept in the cache under their own
/// sha256 (`key`) rather than in memory for the layer's lifetime.
#[derive(Clone, Copy, Debug)]
struct Tail {
    offset: u64,
    len: u64,
    key: Digest,
}

impl Tail {
    /// Whether the kept bytes end `range`: they overlap it and reach its end.
    fn ends(&self, range: &Range<u64>) -> bool {
        self.offset < range.end
            && self
                .offset
                .checked_add(self.len)
                .is_some_and(|end| range.end <= end)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; if something did, the data
    // (a tail's location, the flights) is still whole.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The chunk of `data` (blob bytes from `data_start`) at blob `range`, if
/// `range` is a range and `data` holds it.
fn slice_at(data: &Bytes, data_start: u64, range: &Range<u64>) -> Option<Bytes> {
    let from = usize_from(range.start.checked_sub(data_start)?);
    let to = usize_from(range.end.checked_sub(data_start)?);
    (from <= to && to <= data.len()).then(|| data.slice(from..to))
}

/// Why the fetcher refuses to GET and hold a chunk at all: its range is
/// not one a sane layer has, or it declares more than any format decodes.
fn refusal(c: &Chunk) -> Option<FetchError> {
    let (start, end) = c.blob_range;
    if end <= start || end - start > MAX_CHUNK_RANGE {
        return Some(FetchError::BadRange { start, end });
    }
    (c.size > MAX_CHUNK_SIZE || c.inner_offset > MAX_CHUNK_SIZE).then(|| FetchError::Verify {
        offset: start,
        error: Arc::new(FormatError::ChunkTooLarge {
            offset: start,
            size: c.size,
            inner_offset: c.inner_offset,
        }),
    })
}

impl Fetcher {
    /// A fetcher admitted by the process-wide [`FetchScheduler::global`].
    pub fn new(source: Arc<dyn BlobSource>, format: Arc<dyn Format>, cache: Arc<Cache>) -> Fetcher {
        Fetcher::with_scheduler(source, format, cache, FetchScheduler::global())
    }

    /// A fetcher whose GETs are admitted by `scheduler` (share one across
    /// all layers so intents order them across layers).
    pub fn with_scheduler(
        source: Arc<dyn BlobSource>,
        format: Arc<dyn Format>,
        cache: Arc<Cache>,
        scheduler: FetchScheduler,
    ) -> Fetcher {
        Fetcher {
            inner: Arc::new(Inner {
                source,
                format,
                cache,
                inflight: DashMap::new(),
                stats: FetchStats::default(),
                scheduler,
                max_merged_get: MAX_MERGED_GET,
                tail: Mutex::new(None),
            }),
        }
    }

    /// Notes that blob bytes from `offset`, `len` of them (already fetched,
    /// with the footer and TOC), are in the cache under their own sha256
    /// `key`, so that the chunk they end is completed with them instead of
    /// fetched twice. Set once. If the cache has lost them by the time the
    /// chunk is read, or the chunk fails verification with them, the chunk
    /// is fetched whole.
    pub(super) fn keep_tail(&self, offset: u64, len: u64, key: Digest) {
        lock(&self.inner.tail).get_or_insert(Tail { offset, len, key });
    }

    pub fn stats(&self) -> &FetchStats {
        &self.inner.stats
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.inner.cache
    }

    pub fn source(&self) -> &Arc<dyn BlobSource> {
        &self.inner.source
    }

    pub fn format(&self) -> &Arc<dyn Format> {
        &self.inner.format
    }

    pub fn scheduler(&self) -> &FetchScheduler {
        &self.inner.scheduler
    }

    /// What each hint fetched for this layer, and what reads used of it.
    pub fn hints(&self) -> &HintStats {
        &self.inner.stats.hints
    }

    /// Notes that `chunks` are fetched ahead of any read, for `hint`: the
    /// caller leaves out those cached or in flight.
    pub fn speculating(&self, hint: Hint, chunks: &[Chunk]) {
        self.inner.stats.hints.note(hint, chunks);
    }

    /// A read covered `chunks` (hits or misses): those a hint fetched count
    /// as used.
    pub fn used(&self, chunks: &[Chunk]) {
        self.inner.stats.hints.used(chunks);
    }

    /// Whether a fetch of chunk `digest` is under way.
    pub fn in_flight(&self, digest: &Digest) -> bool {
        self.inner.inflight.contains_key(digest)
    }

    /// The verified plain bytes of each chunk, in the order given. Must run
    /// inside a tokio runtime: the fetch itself runs as a spawned task so a
    /// reader that gives up does not cancel it for the others.
    ///
    /// The cache is not looked up on the way in: a reader comes here after
    /// its own lookup missed (the layer's read plan, on the FUSE thread).
    /// A chunk that is cached all the same is answered from the cache by
    /// the flight's re-check (see `run_flights`), not fetched.
    pub async fn fetch(&self, chunks: &[Chunk], intent: Intent) -> Result<Vec<Bytes>, FetchError> {
        self.fetch_with_read_ahead(chunks, &[], intent).await
    }

    /// Like [`Fetcher::fetch`], and also fetches `ahead` (chunks the caller
    /// expects to be read next) in the same GETs where they are adjacent,
    /// into the cache, without waiting for them. Chunks of `ahead` that are
    /// in flight already are left to their fetch.
    pub async fn fetch_with_read_ahead(
        &self,
        chunks: &[Chunk],
        ahead: &[Chunk],
        intent: Intent,
    ) -> Result<Vec<Bytes>, FetchError> {
        let mut waits: HashMap<Digest, watch::Receiver<FlightResult>> = HashMap::new();
        let mut lead = Vec::new();
        for c in chunks {
            let MapEntry::Vacant(slot) = waits.entry(c.digest) else {
                continue;
            };
            match self.inner.inflight.entry(c.digest) {
                Entry::Occupied(e) => {
                    slot.insert(e.get().subscribe());
                }
                Entry::Vacant(e) => {
                    let (tx, rx) = watch::channel(None);
                    e.insert(Arc::new(tx));
                    slot.insert(rx);
                    lead.push(*c);
                }
            }
        }
        if !lead.is_empty() {
            let mut ahead_bytes = 0;
            for c in ahead {
                if waits.contains_key(&c.digest) {
                    continue;
                }
                if let Entry::Vacant(e) = self.inner.inflight.entry(c.digest) {
                    let (tx, _) = watch::channel(None);
                    e.insert(Arc::new(tx));
                    lead.push(*c);
                    ahead_bytes += c.blob_range.1.saturating_sub(c.blob_range.0);
                }
            }
            let admission = Admission::Read { ahead: ahead_bytes };
            tokio::spawn(self.inner.clone().run_flights(lead, intent, admission));
        }

        let mut out = Vec::with_capacity(chunks.len());
        for c in chunks {
            let rx = waits.get_mut(&c.digest).expect("every chunk has a flight");
            let res = match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone().expect("waited for Some"),
                Err(_) => Err(FetchError::Abandoned(c.digest)),
            };
            out.push(res?);
        }
        Ok(out)
    }
}

/// How a flight's GETs are admitted by the scheduler.
enum Admission {
    /// Already admitted by the caller (speculative warms do so before
    /// registering their flights).
    Taken(Permit),
    /// To ask for, by the flight's intent.
    Ask,
    /// A read's GET, admitted at once: its chunks, then `ahead` bytes of
    /// read-ahead.
    Read { ahead: u64 },
}

impl Inner {
    /// A chunk's bytes from the cache, if there and whole. Blocking.
    fn cached(&self, c: &Chunk) -> Option<Bytes> {
        match self.cache.read(&c.digest, 0, usize_from(c.size)) {
            Ok(Some(b)) if b.len() as u64 == c.size => Some(Bytes::from(b)),
            Ok(_) => None,
            Err(e) => {
                // The cache is only a cache: a broken entry is fetched again.
                tracing::warn!(chunk = %c.digest, error = %e, "cache read failed");
                None
            }
        }
    }

    /// Fetches the chunks this task leads and completes their flights.
    /// `admission`: the scheduler's, if the caller took it before
    /// registering the flights (speculative warms do, so that a reader
    /// never waits on a flight that is itself waiting for admission).
    async fn run_flights(self: Arc<Self>, lead: Vec<Chunk>, intent: Intent, admission: Admission) {
        let mut guard = FlightGuard {
            inner: self.clone(),
            pending: lead.iter().map(|c| c.digest).collect(),
        };

        // The one re-check of a miss on its way down. The reader looked the
        // cache up before it came (the layer's read plan, `warm`'s filter)
        // and found no flight to join, so it took one; but a flight of the
        // chunk may have finished in between: it caches the chunk *before*
        // it leaves `inflight`, so then the cache has it. Closing that race
        // needs only an in-memory index lookup; a chunk found there is read
        // on the blocking pool and answered from the cache, not fetched.
        let (landed, mut misses): (Vec<Chunk>, Vec<Chunk>) = lead
            .into_iter()
            .partition(|c| self.cache.contains(&c.digest));
        if !landed.is_empty() {
            let me = self.clone();
            let read = tokio::task::spawn_blocking(move || {
                landed
                    .into_iter()
                    .map(|c| (c, me.cached(&c)))
                    .collect::<Vec<_>>()
            })
            .await;
            let Ok(read) = read else { return };
            // Counted before the readers are answered, who may look.
            let hits = read.iter().filter(|(_, hit)| hit.is_some()).count();
            self.stats.cache_hits(hits as u64);
            for (c, hit) in read {
                match hit {
                    Some(b) => guard.complete(c.digest, Ok(b)),
                    // Dropped as corrupt, or evicted: fetched after all.
                    None => misses.push(c),
                }
            }
        }

        // A chunk no sane layer has is refused, not fetched: the fetcher
        // would hold all of its range in memory before its format refused it.
        misses.retain(|c| match refusal(c) {
            None => true,
            Some(e) => {
                tracing::warn!(chunk = %c.digest, error = %e, "chunk refused");
                guard.complete(c.digest, Err(e));
                false
            }
        });
        if misses.is_empty() {
            return;
        }
        let groups = merge_adjacent(misses, self.max_merged_get);
        let bytes: u64 = groups.iter().map(|g| g.range.end - g.range.start).sum();
        let permit = match admission {
            Admission::Taken(p) => p,
            Admission::Ask => self.scheduler.admit(intent, bytes).await,
            Admission::Read { ahead } => {
                let ahead = ahead.min(bytes);
                self.scheduler.admit_read(bytes - ahead, ahead)
            }
        };
        let guard = Mutex::new(guard);
        futures::future::join_all(
            groups
                .into_iter()
                .map(|g| self.fetch_group(g, intent, &guard, &permit)),
        )
        .await;
    }

    /// One ranged GET, split into verified chunks as its body arrives; good
    /// chunks are cached, and every chunk's flight is completed as soon as
    /// its bytes are in, when a reader waits for it: a reader whose chunks
    /// lead a long GET (read-ahead, background) does not wait for its end.
    async fn fetch_group(
        &self,
        g: Group,
        intent: Intent,
        guard: &Mutex<FlightGuard>,
        permit: &Permit,
    ) {
        let (start, end) = (g.range.start, g.range.end);
        let complete = |results: Vec<(Digest, Result<Bytes, FetchError>)>| {
            let mut guard = lock(guard);
            for (digest, res) in results {
                guard.complete(digest, res);
            }
        };
        let fail_from = |from: usize, e: FetchError| {
            complete(
                g.chunks[from..]
                    .iter()
                    .map(|c| (c.digest, Err(e.clone())))
                    .collect(),
            );
        };
        // The kept tail bytes (from opening the layer) are used only where
        // they end the range: `[get_end, end)` comes from them, the rest from
        // the GET. A range that reaches past them (a chunk after them that
        // failed verification when the layer was opened, or was evicted) is
        // fetched whole.
        let kept = (*lock(&self.tail)).filter(|t| t.ends(&g.range));
        let tail = match kept {
            Some(t) => self.read_tail(t).await,
            None => None,
        };
        let get_end = tail.as_ref().map_or(end, |(ts, _)| (*ts).max(start));

        // `body` holds blob bytes `[body_start, body_start + body.len())`;
        // `next` is the first chunk not completed yet.
        let mut body = BytesMut::new();
        let mut body_start = start;
        let mut next = 0;
        // Tokio's clock, as the scheduler's: a test with paused time
        // measures its fake link in it.
        let sent = tokio::time::Instant::now();
        if get_end > start {
            let mut stream = match self.source.read_range_stream(start..get_end, intent).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(start, end = get_end, error = %e, "blob read failed");
                    return fail_from(
                        0,
                        FetchError::Source {
                            start,
                            end: get_end,
                            error: Arc::new(e),
                        },
                    );
                }
            };
            self.stats.request_started(intent);
            body.reserve((get_end - start).min(MAX_MERGED_GET) as usize);
            let mut resumed = false;
            // Set once the body streams: the link's busy period includes it.
            let mut streaming = None;
            while !resumed {
                let piece = match stream.next().await {
                    None => break,
                    Some(Ok(p)) => {
                        if streaming.is_none() {
                            permit.first_piece(sent.elapsed(), p.len() as u64);
                            streaming = Some(Streaming(permit));
                        } else {
                            permit.piece(p.len() as u64);
                        }
                        p
                    }
                    Some(Err(e)) => {
                        resumed = true;
                        // The body broke: ask again (with retries) for the rest.
                        let at = body_start + body.len() as u64;
                        tracing::debug!(at, end = get_end, error = %e, "blob body broke; resuming");
                        match self.source.read_range(at..get_end, intent).await {
                            Ok(rest) => {
                                self.stats.request_started(intent);
                                permit.piece(rest.len() as u64);
                                rest
                            }
                            Err(e) => {
                                tracing::warn!(start = at, end = get_end, error = %e, "blob read failed");
                                return fail_from(
                                    next,
                                    FetchError::Source {
                                        start: at,
                                        end: get_end,
                                        error: Arc::new(e),
                                    },
                                );
                            }
                        }
                    }
                };
                self.stats.bytes_received(intent, piece.len() as u64);
                if body_start + (body.len() + piece.len()) as u64 > get_end {
                    break; // more than asked for: caught as a short/long read below
                }
                body.extend_from_slice(&piece);
                // Hand over the chunks now complete if a reader waits for one.
                let have = body_start + body.len() as u64;
                let ready = g.chunks[next..]
                    .iter()
                    .take_while(|c| c.blob_range.1 <= have)
                    .count();
                let cut = next + ready;
                // The ready chunks end at `seg_end`; they are cut off the
                // body only if no later chunk begins before it.
                let seg_end = g.chunks[next..cut].iter().map(|c| c.blob_range.1).max();
                let seg = seg_end.and_then(|e| Some((e, usize_from(e.checked_sub(body_start)?))));
                let clean_cut = seg.is_some_and(|(seg_end, _)| {
                    g.chunks.get(cut).is_none_or(|c| c.blob_range.0 >= seg_end)
                });
                if let (true, Some((seg_end, seg_len))) = (clean_cut, seg)
                    && seg_len <= body.len()
                    && self.awaited(&g.chunks[next..cut])
                {
                    let seg = body.split_to(seg_len).freeze();
                    let chunks = g.chunks[next..cut].to_vec();
                    complete(self.decode(chunks, body_start, seg).await);
                    body_start = seg_end;
                    next = cut;
                }
            }
            drop(streaming);
            self.scheduler.record_get(intent, sent.elapsed());
            tracing::debug!(
                blob = self.source.size(),
                start,
                end = get_end,
                ?intent,
                ms = sent.elapsed().as_millis(),
                "GET done"
            );
        }
        let mut data = body.freeze();
        let got = |data: &Bytes| body_start - start + data.len() as u64;
        if let Some((ts, tb)) = &tail {
            // `get_end` is in `[ts, end)` and the kept bytes reach `end`
            // (`Tail::ends`); checked all the same, never sliced blind.
            let Some(kept) = slice_at(tb, *ts, &(get_end..end)) else {
                let got = got(&data);
                return fail_from(next, FetchError::ShortRead { start, end, got });
            };
            data = if data.is_empty() {
                kept
            } else {
                let mut joined = Vec::with_capacity(data.len() + kept.len());
                joined.extend_from_slice(&data);
                joined.extend_from_slice(&kept);
                Bytes::from(joined)
            };
        }
        if body_start + data.len() as u64 != end {
            let got = got(&data);
            return fail_from(next, FetchError::ShortRead { start, end, got });
        }
        let chunks = g.chunks[next..].to_vec();
        // The chunks completed with kept tail bytes: if one fails, those
        // bytes may be what is wrong, so they are dropped, and the next read
        // of the chunk fetches it whole.
        let with_tail: Vec<Digest> = match tail {
            Some(_) => chunks
                .iter()
                .filter(|c| c.blob_range.1 > get_end)
                .map(|c| c.digest)
                .collect(),
            None => Vec::new(),
        };
        let results = self.decode(chunks, body_start, data).await;
        if results
            .iter()
            .any(|(d, r)| r.is_err() && with_tail.contains(d))
        {
            tracing::warn!(
                offset = get_end,
                "kept blob tail failed verification; dropped"
            );
            *lock(&self.tail) = None;
        }
        complete(results);
    }

    /// The kept tail's bytes, `(offset, bytes)`, read from the cache on the
    /// blocking pool; `None` if the cache no longer has them.
    async fn read_tail(&self, t: Tail) -> Option<(u64, Bytes)> {
        let cache = self.cache.clone();
        let len = usize::try_from(t.len).ok()?;
        let read = tokio::task::spawn_blocking(move || cache.read(&t.key, 0, len)).await;
        match read {
            Ok(Ok(Some(bytes))) if bytes.len() == len => Some((t.offset, Bytes::from(bytes))),
            Ok(Ok(_)) | Err(_) => None,
            Ok(Err(e)) => {
                tracing::debug!(offset = t.offset, error = %e, "kept blob tail gone; fetching it");
                None
            }
        }
    }

    /// Whether a reader waits for any of `chunks`.
    fn awaited(&self, chunks: &[Chunk]) -> bool {
        chunks.iter().any(|c| {
            self.inflight
                .get(&c.digest)
                .is_some_and(|f| f.receiver_count() > 0)
        })
    }

    /// Decodes, verifies and caches `chunks`, whose bytes are `data`
    /// (blob bytes from `data_start`). Chunks that fail are read once more
    /// when the source can send the read elsewhere: a list of sources skips
    /// the member that served bad bytes (a mirror), so readers get the
    /// next member's bytes rather than an error.
    async fn decode(
        &self,
        chunks: Vec<Chunk>,
        data_start: u64,
        data: Bytes,
    ) -> Vec<(Digest, Result<Bytes, FetchError>)> {
        let failed_again = chunks.clone();
        let mut decoded = self.decode_once(chunks, data_start, data).await;
        let failed: Vec<Chunk> = failed_again
            .into_iter()
            .zip(&decoded)
            .filter(|(_, (_, r))| matches!(r, Err(FetchError::Verify { .. })))
            .map(|(c, _)| c)
            .collect();
        let start = failed.iter().map(|c| c.blob_range().start).min();
        let end = failed.iter().map(|c| c.blob_range().end).max();
        let (Some(start), Some(end)) = (start, end) else {
            return decoded;
        };
        if !self.source.distrust(start..end) {
            return decoded;
        }
        match self.source.read_range(start..end, Intent::OnDemand).await {
            Ok(bytes) => {
                for (digest, res) in self.decode_once(failed, start, bytes).await {
                    if let Some(slot) = decoded.iter_mut().find(|(d, _)| *d == digest) {
                        slot.1 = res;
                    }
                }
            }
            Err(e) => tracing::warn!(start, end, error = %e, "blob read failed"),
        }
        decoded
    }

    async fn decode_once(
        &self,
        chunks: Vec<Chunk>,
        data_start: u64,
        data: Bytes,
    ) -> Vec<(Digest, Result<Bytes, FetchError>)> {
        if chunks.is_empty() {
            return Vec::new();
        }
        let format = self.format.clone();
        let cache = self.cache.clone();
        // Decompressing and hashing is CPU work and caching is file I/O:
        // neither belongs on an async worker.
        let decoded = tokio::task::spawn_blocking(move || {
            chunks
                .iter()
                .map(|c| {
                    let r = c.blob_range();
                    let Some(compressed) = slice_at(&data, data_start, &r) else {
                        let e = FetchError::BadRange { start: r.start, end: r.end };
                        return (c.digest, Err(e));
                    };
                    let res = match format.decode_chunk(c, &compressed) {
                        Ok(plain) => {
                            if let Err(e) = cache.insert(&c.digest, &plain) {
                                tracing::warn!(chunk = %c.digest, error = %e, "cache insert failed");
                            }
                            Ok(Bytes::from(plain))
                        }
                        Err(e) => {
                            tracing::warn!(chunk = %c.digest, offset = r.start, error = %e, "chunk rejected");
                            Err(FetchError::Verify { offset: r.start, error: Arc::new(e) })
                        }
                    };
                    (c.digest, res)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let Ok(decoded) = decoded else {
            return Vec::new(); // the guard answers Abandoned
        };
        let ok = decoded.iter().filter(|(_, r)| r.is_ok()).count() as u64;
        self.stats.chunks_fetched(ok);
        self.stats.verify_failures(decoded.len() as u64 - ok);
        decoded
    }
}

/// A GET whose body streams: its end ends its part of the link's busy
/// period, however the GET ends.
struct Streaming<'a>(&'a Permit);

impl Drop for Streaming<'_> {
    fn drop(&mut self) {
        self.0.get_ended();
    }
}

/// Completes flights; whatever is still pending when it drops (a panic, a
/// runtime shutting down) is answered `Abandoned` so no reader waits forever.
struct FlightGuard {
    inner: Arc<Inner>,
    pending: Vec<Digest>,
}

impl FlightGuard {
    fn complete(&mut self, digest: Digest, res: Result<Bytes, FetchError>) {
        self.pending.retain(|d| *d != digest);
        // Removed before answering: a later miss starts a fresh fetch (an
        // error is not sticky) or finds the chunk already in the cache.
        if let Some((_, tx)) = self.inner.inflight.remove(&digest) {
            tx.send_replace(Some(res));
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        for d in std::mem::take(&mut self.pending) {
            if let Some((_, tx)) = self.inner.inflight.remove(&d) {
                tx.send_replace(Some(Err(FetchError::Abandoned(d))));
            }
        }
    }
}

mod warm;

#[cfg(test)]
mod tests;
