//! A fake blob source and decoder shared by the fetch and layer tests,
//! and the fetcher's own tests.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;

use super::*;

/// One read seen by a [`FakeBlob`]: when it started and ended.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub range: Range<u64>,
    pub intent: Intent,
    pub started: std::time::Instant,
    pub ended: Option<std::time::Instant>,
}

/// How long a test waits for something before it fails: a bound for a
/// hung test, never a measure (a loaded machine may take its time).
pub(crate) const PATIENCE: Duration = Duration::from_secs(30);

/// Waits until `done` holds, checking it every millisecond; fails the
/// test, naming `what`, if it still does not after [`PATIENCE`].
pub(crate) async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let give_up = std::time::Instant::now() + PATIENCE;
    while !done() {
        assert!(
            std::time::Instant::now() < give_up,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A blob in memory that records every read and answers after a delay,
/// so concurrent readers overlap. Reads of some intents can be held at a
/// gate ([`FakeBlob::hold`]) until [`FakeBlob::release`]d: a test then sees
/// what happens, or does not, while they are on the wire.
pub(crate) struct FakeBlob {
    pub data: Vec<u8>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub delay: Duration,
    /// Streamed reads yield pieces of this many bytes, one per
    /// `piece_delay`, after `delay`.
    pub piece: usize,
    pub piece_delay: Duration,
    /// The next streamed read breaks after this many pieces (once).
    pub break_after: Mutex<Option<usize>>,
    /// Intents whose reads wait at the gate now.
    held: tokio::sync::watch::Sender<Vec<Intent>>,
    /// Pieces a held streamed read yields before it waits.
    hold_after: AtomicUsize,
}

impl FakeBlob {
    pub(crate) fn new(data: Vec<u8>) -> Arc<FakeBlob> {
        FakeBlob::with_delay(data, Duration::from_millis(20))
    }
    pub(crate) fn with_delay(data: Vec<u8>, delay: Duration) -> Arc<FakeBlob> {
        FakeBlob::streaming(data, delay, usize::MAX, Duration::ZERO)
    }
    pub(crate) fn streaming(
        data: Vec<u8>,
        delay: Duration,
        piece: usize,
        piece_delay: Duration,
    ) -> Arc<FakeBlob> {
        Arc::new(FakeBlob {
            data,
            seen: Arc::default(),
            delay,
            piece,
            piece_delay,
            break_after: Mutex::new(None),
            held: tokio::sync::watch::Sender::new(Vec::new()),
            hold_after: AtomicUsize::new(0),
        })
    }

    /// Reads of `intents` wait at the gate: a streamed one after yielding
    /// `after` pieces, a plain one before answering.
    pub(crate) fn hold(&self, intents: &[Intent], after: usize) {
        self.hold_after.store(after, Ordering::SeqCst);
        self.held.send_replace(intents.to_vec());
    }

    /// Lets every held read go on.
    pub(crate) fn release(&self) {
        self.held.send_replace(Vec::new());
    }

    /// Reads of `intent` started and not ended (held ones among them).
    pub(crate) fn on_the_wire(&self, intent: Intent) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.intent == intent && s.ended.is_none())
            .count()
    }
    fn record(&self, range: &Range<u64>, intent: Intent) -> usize {
        let mut seen = self.seen.lock().unwrap();
        seen.push(Seen {
            range: range.clone(),
            intent,
            started: std::time::Instant::now(),
            ended: None,
        });
        seen.len() - 1
    }
    pub(crate) fn reads(&self) -> Vec<(Range<u64>, Intent)> {
        self.seen()
            .into_iter()
            .map(|s| (s.range, s.intent))
            .collect()
    }
    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
    /// The most reads of `intent` that were on the wire at once.
    pub(crate) fn max_concurrent(&self, intent: Intent) -> usize {
        let seen: Vec<Seen> = self
            .seen()
            .into_iter()
            .filter(|s| s.intent == intent)
            .collect();
        seen.iter()
            .map(|a| {
                seen.iter()
                    .filter(|b| b.started <= a.started && b.ended.is_none_or(|e| e > a.started))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}

impl BlobSource for FakeBlob {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_range(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> BoxFuture<'_, Result<Bytes, RegistryError>> {
        let slot = self.record(&range, intent);
        let mut gate = self.held.subscribe();
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            let _ = gate.wait_for(|held| !held.contains(&intent)).await;
            self.seen.lock().unwrap()[slot].ended = Some(std::time::Instant::now());
            Ok(Bytes::copy_from_slice(
                &self.data[range.start as usize..range.end as usize],
            ))
        })
    }
    fn read_range_stream(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> BoxFuture<
        '_,
        Result<futures::stream::BoxStream<'static, Result<Bytes, RegistryError>>, RegistryError>,
    > {
        let stream = self.stream_of(range, intent);
        Box::pin(async move { Ok(stream) })
    }
}

impl FakeBlob {
    fn stream_of(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> futures::stream::BoxStream<'static, Result<Bytes, RegistryError>> {
        let slot = self.record(&range, intent);
        let bytes = Bytes::copy_from_slice(&self.data[range.start as usize..range.end as usize]);
        let (delay, piece, piece_delay) = (self.delay, self.piece, self.piece_delay);
        let seen = self.seen.clone();
        let mut break_after = self.break_after.lock().unwrap().take();
        let gate = self.held.subscribe();
        let hold_after = self.hold_after.load(Ordering::SeqCst);
        let mut pieces = 0;
        futures::stream::unfold((bytes, true), move |(rest, first)| {
            let seen = seen.clone();
            let broken = break_after == Some(0);
            break_after = break_after.map(|n| n.saturating_sub(1));
            let mut gate = (pieces >= hold_after).then(|| gate.clone());
            pieces += 1;
            async move {
                if rest.is_empty() {
                    return None;
                }
                if broken {
                    let e = RegistryError::BadResponse {
                        host: "fake".into(),
                        what: "a streamed read".into(),
                        reason: "connection reset".into(),
                    };
                    return Some((Err(e), (Bytes::new(), false)));
                }
                if let Some(gate) = &mut gate {
                    let _ = gate.wait_for(|held| !held.contains(&intent)).await;
                }
                tokio::time::sleep(if first { delay } else { piece_delay }).await;
                let mut rest = rest;
                let head = rest.split_to(piece.min(rest.len()));
                if rest.is_empty() {
                    // Ended when the last byte is handed over.
                    seen.lock().unwrap()[slot].ended = Some(std::time::Instant::now());
                }
                Some((Ok(head), (rest, false)))
            }
        })
        .boxed()
    }
}

/// "Compression" is the identity; verification is real.
pub(crate) struct PlainDecoder;

impl ChunkDecoder for PlainDecoder {
    fn decode_chunk(&self, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
        let actual = Digest::of(compressed);
        if actual != chunk.digest {
            return Err(FormatError::ChunkDigestMismatch {
                expected: chunk.digest,
                actual,
            });
        }
        Ok(compressed.to_vec())
    }
}

/// Splits `data` into chunks of `size` laid out back to back in the blob.
pub(crate) fn chunks_of(data: &[u8], size: usize) -> Vec<Chunk> {
    data.chunks(size)
        .enumerate()
        .map(|(i, piece)| {
            let start = (i * size) as u64;
            Chunk {
                file_offset: start,
                size: piece.len() as u64,
                digest: Digest::of(piece),
                blob_range: (start, start + piece.len() as u64),
                inner_offset: 0,
            }
        })
        .collect()
}

/// A one-byte chunk at blob range `[start, end)`, named by its start: for
/// tests of GET planning, which look only at ranges.
pub(crate) fn chunk_at(start: u64, end: u64) -> Chunk {
    Chunk {
        file_offset: 0,
        size: 1,
        digest: Digest::of(&start.to_le_bytes()),
        blob_range: (start, end),
        inner_offset: 0,
    }
}

pub(crate) fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

fn setup(data: Vec<u8>) -> (tempfile::TempDir, Arc<FakeBlob>, Fetcher) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    let blob = FakeBlob::new(data);
    let fetcher = Fetcher::new(blob.clone(), Arc::new(PlainDecoder), cache);
    (dir, blob, fetcher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adjacent_misses_share_one_get_and_hits_never_touch_the_blob() {
    let data = pattern(10_000);
    let (_dir, blob, f) = setup(data.clone());
    let chunks = chunks_of(&data, 1000);

    let got = f.fetch(&chunks[2..6], Intent::OnDemand).await.unwrap();
    assert_eq!(got.concat(), &data[2000..6000]);
    assert_eq!(blob.reads(), vec![(2000..6000, Intent::OnDemand)]);

    let again = f.fetch(&chunks[2..6], Intent::Prefetch).await.unwrap();
    assert_eq!(again.concat(), &data[2000..6000]);
    assert_eq!(blob.reads().len(), 1, "cached chunks are not fetched again");

    let s = f.stats().snapshot();
    assert_eq!(
        (s.requests, s.bytes_fetched, s.chunks_fetched, s.cache_hits),
        (1, 4000, 4, 4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_breaks_midway_is_resumed_where_it_broke() {
    let data = pattern(4000);
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    let blob = FakeBlob::streaming(data.clone(), Duration::ZERO, 1000, Duration::ZERO);
    *blob.break_after.lock().unwrap() = Some(2);
    let f = Fetcher::with_scheduler(
        blob.clone(),
        Arc::new(PlainDecoder),
        cache,
        FetchScheduler::default(),
    );
    let got = f
        .fetch(&chunks_of(&data, 1000), Intent::OnDemand)
        .await
        .unwrap();
    assert_eq!(got.concat(), data);
    assert_eq!(
        blob.reads(),
        vec![(0..4000, Intent::OnDemand), (2000..4000, Intent::OnDemand)]
    );
    let s = f.stats().snapshot();
    assert_eq!(
        (s.requests, s.bytes_fetched, s.chunks_fetched),
        (2, 4000, 4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_one_chunk_cause_one_fetch() {
    let data = pattern(8_000);
    let (_dir, blob, f) = setup(data.clone());
    let f = Arc::new(f);
    let chunks = Arc::new(chunks_of(&data, 1000));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (f, chunks) = (f.clone(), chunks.clone());
            tokio::spawn(async move { f.fetch(&chunks, Intent::OnDemand).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().concat(), data);
    }
    // Every chunk travelled exactly once, whatever the grouping was.
    let mut fetched: Vec<u64> = blob
        .reads()
        .iter()
        .flat_map(|(r, _)| r.clone().step_by(1000))
        .collect();
    fetched.sort();
    assert_eq!(fetched, (0..8).map(|i| i * 1000).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_chunk_fails_alone_and_is_not_cached() {
    let data = pattern(3_000);
    let chunks = chunks_of(&data, 1000);
    let mut tampered = data.clone();
    tampered[1500] ^= 0xff;
    let (_dir, blob, f) = setup(tampered);

    let err = f.fetch(&chunks, Intent::OnDemand).await.unwrap_err();
    assert!(
        matches!(err, FetchError::Verify { offset: 1000, .. }),
        "{err}"
    );
    assert_eq!(blob.reads().len(), 1);
    assert!(f.cache().contains(&chunks[0].digest) && f.cache().contains(&chunks[2].digest));
    assert!(
        !f.cache().contains(&chunks[1].digest),
        "a chunk failing verification is never cached"
    );
    assert_eq!(f.stats().snapshot().verify_failures, 1);

    // The good neighbours are now served from the cache; the bad one is
    // tried again (errors are not sticky) and fails again.
    let ok = f
        .fetch(&[chunks[0], chunks[2]], Intent::OnDemand)
        .await
        .unwrap();
    assert_eq!(ok.concat(), [&data[..1000], &data[2000..]].concat());
    assert!(f.fetch(&chunks[1..2], Intent::OnDemand).await.is_err());
    assert_eq!(blob.reads().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_tail_completes_its_chunk_and_a_lost_one_means_a_whole_get() {
    let data = pattern(4000);
    let chunks = chunks_of(&data, 1000);
    // Blob bytes 2500.. were fetched with the footer; chunk 2 straddles them.
    let (_dir, blob, f) = setup(data.clone());
    let kept = &data[2500..3000];
    f.cache().insert(&Digest::of(kept), kept).unwrap();
    f.keep_tail(2500, kept.len() as u64, Digest::of(kept));
    let got = f.fetch(&chunks[2..3], Intent::OnDemand).await.unwrap();
    assert_eq!(got.concat(), &data[2000..3000]);
    assert_eq!(blob.reads(), vec![(2000..2500, Intent::OnDemand)]);

    // The cache no longer holds the kept bytes: the chunk comes whole.
    let (_dir, blob, f) = setup(data.clone());
    f.keep_tail(2500, kept.len() as u64, Digest::of(kept));
    let got = f.fetch(&chunks[2..3], Intent::OnDemand).await.unwrap();
    assert_eq!(got.concat(), &data[2000..3000]);
    assert_eq!(blob.reads(), vec![(2000..3000, Intent::OnDemand)]);
}
