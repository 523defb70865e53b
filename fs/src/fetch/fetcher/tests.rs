//! The fetcher's tests, over the fakes of [`crate::testing`].

use std::time::Duration;

use super::*;
use crate::testing::{FakeBlob, Plain, chunks_of, pattern};

fn setup(data: Vec<u8>) -> (tempfile::TempDir, Arc<FakeBlob>, Fetcher) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    let blob = FakeBlob::new(data);
    let fetcher = Fetcher::new(blob.clone(), Arc::new(Plain), cache);
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
    blob.break_next_stream_after(2);
    let f = Fetcher::with_scheduler(
        blob.clone(),
        Arc::new(Plain),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_chunk_answers_every_waiter_and_the_next_read_fetches_again() {
    let data = pattern(4000);
    let (_dir, blob, f) = setup(data.clone());
    let chunks = chunks_of(&data, 1000);
    blob.tamper(1500);
    let (a, b) = tokio::join!(
        f.fetch(&chunks[1..2], Intent::OnDemand),
        f.fetch(&chunks[1..2], Intent::Prefetch)
    );
    for res in [a, b] {
        let err = res.unwrap_err();
        assert!(matches!(err, FetchError::Verify { .. }), "{err}");
    }
    assert_eq!(blob.read_count(), 1, "both readers shared one flight");
    assert!(!f.in_flight(&chunks[1].digest), "the failed flight is gone");
    assert!(!f.cache().contains(&chunks[1].digest));

    blob.heal();
    let got = f.fetch(&chunks[1..2], Intent::OnDemand).await.unwrap();
    assert_eq!(got.concat(), &data[1000..2000]);
    assert_eq!(blob.read_count(), 2, "a new flight, a new GET");
}

/// Plain chunks, but the first decode panics.
struct PanicsOnce(std::sync::atomic::AtomicBool);

impl Format for PanicsOnce {
    fn index_step(
        &self,
        fetched: &[crate::format::Piece],
        blob_size: u64,
        expected: Option<Digest>,
    ) -> Result<crate::format::IndexStep, FormatError> {
        Plain.index_step(fetched, blob_size, expected)
    }

    fn decode_chunk(&self, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
        if !self.0.swap(true, std::sync::atomic::Ordering::SeqCst) {
            panic!("a decoder bug");
        }
        Plain.decode_chunk(chunk, compressed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decoder_that_panics_abandons_only_its_flight() {
    let data = pattern(2000);
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    let format = Arc::new(PanicsOnce(std::sync::atomic::AtomicBool::new(false)));
    let f = Fetcher::new(FakeBlob::new(data.clone()), format, cache);
    let chunks = chunks_of(&data, 1000);
    let err = f.fetch(&chunks[..1], Intent::OnDemand).await.unwrap_err();
    assert!(matches!(err, FetchError::Abandoned(_)), "{err}");
    assert!(!f.in_flight(&chunks[0].digest));
    let got = f.fetch(&chunks[..1], Intent::OnDemand).await.unwrap();
    assert_eq!(got.concat(), &data[..1000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_whose_range_no_sane_layer_has_is_refused_without_a_get() {
    let data = pattern(2000);
    let (_dir, blob, f) = setup(data.clone());
    let mut inverted = chunks_of(&data, 1000)[1];
    inverted.blob_range = (1000, 500);
    let mut huge = chunks_of(&data, 1000)[0];
    huge.blob_range = (0, MAX_CHUNK_RANGE + 1);
    for c in [inverted, huge] {
        let err = f.fetch(&[c], Intent::OnDemand).await.unwrap_err();
        assert!(matches!(err, FetchError::BadRange { .. }), "{err}");
        assert!(!f.in_flight(&c.digest));
    }
    let mut bomb = chunks_of(&data, 1000)[0];
    bomb.size = MAX_CHUNK_SIZE + 1;
    let err = f.fetch(&[bomb], Intent::OnDemand).await.unwrap_err();
    assert!(
        err.to_string().contains("more than the limit"),
        "names the limit: {err}"
    );
    assert_eq!(blob.read_count(), 0);
    let got = f.fetch(&chunks_of(&data, 1000), Intent::OnDemand).await;
    assert_eq!(got.unwrap().concat(), data, "the layer's other chunks read");
}

/// A link of `rate` bytes per second and round trip `rtt` in front of
/// `data`, in tokio's clock: one queue for every GET, as one TCP
/// connection or one token bucket is, so a GET's bytes come after those of
/// every GET sent before it. Records each GET's intent, how many bytes
/// were queued on the link ahead of it when it was sent, and when.
struct SlowLink {
    data: Vec<u8>,
    rtt: Duration,
    rate: f64,
    piece: usize,
    /// When the link has sent every byte asked of it so far.
    free_at: std::sync::Mutex<tokio::time::Instant>,
    sent: std::sync::Mutex<Vec<(Intent, f64, tokio::time::Instant)>>,
}

impl SlowLink {
    fn new(data: Vec<u8>, rtt: Duration, rate: f64) -> Arc<SlowLink> {
        Arc::new(SlowLink {
            data,
            rtt,
            rate,
            piece: 4096,
            free_at: std::sync::Mutex::new(tokio::time::Instant::now()),
            sent: std::sync::Mutex::default(),
        })
    }
}

impl BlobSource for SlowLink {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_range(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> futures::future::BoxFuture<'_, Result<Bytes, RegistryError>> {
        Box::pin(async move {
            let mut s = self.read_range_stream(range, intent).await?;
            let mut out = Vec::new();
            while let Some(p) = s.next().await {
                out.extend_from_slice(&p?);
            }
            Ok(Bytes::from(out))
        })
    }

    fn read_range_stream(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> futures::future::BoxFuture<'_, Result<crate::registry::source::ByteStream, RegistryError>>
    {
        let now = tokio::time::Instant::now();
        let half = self.rtt / 2;
        let transfer = |n: usize| Duration::from_secs_f64(n as f64 / self.rate);
        // The request reaches the far end half a round trip from now; its
        // answer queues behind what the link still has to send.
        let start = {
            let mut free = self.free_at.lock().unwrap();
            let queued = free.saturating_duration_since(now + half);
            let ahead = queued.as_secs_f64() * self.rate;
            self.sent.lock().unwrap().push((intent, ahead, now));
            let start = (*free).max(now + half);
            *free = start + transfer(usize_from(range.end - range.start));
            start
        };
        let body = self.data[usize_from(range.start)..usize_from(range.end)].to_vec();
        let pieces: Vec<(tokio::time::Instant, Bytes)> = body
            .chunks(self.piece)
            .scan(start, |at, p| {
                *at += transfer(p.len());
                Some((*at + half, Bytes::copy_from_slice(p)))
            })
            .collect();
        let stream = futures::stream::iter(pieces).then(|(at, p)| async move {
            tokio::time::sleep_until(at).await;
            Ok(p)
        });
        Box::pin(async move { Ok(stream.boxed()) })
    }
}

/// Issue 20: reads first. A thin link (RTT 40 ms, 1 MB/s), a prefetch
/// backlog of 768 KiB on it, then a read: the read's GET is sent at once,
/// queues behind no more than the link carries in a round trip, and its
/// bytes arrive while most of the backlog is still to come.
#[tokio::test(start_paused = true)]
async fn a_read_overtakes_a_speculative_backlog_on_a_slow_link() {
    const CHUNK: usize = 16 << 10;
    let data = pattern(64 * CHUNK);
    let chunks = chunks_of(&data, CHUNK);
    let link = SlowLink::new(data.clone(), Duration::from_millis(40), 1e6);
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    let scheduler = FetchScheduler::default();
    let f = Fetcher::with_scheduler(link.clone(), Arc::new(Plain), cache.clone(), scheduler);
    // One read measures the link: about 56 kB in one round trip.
    f.fetch(&chunks[56..64], Intent::OnDemand).await.unwrap();
    let budget = f.scheduler().budget();
    assert!((40_000..80_000).contains(&budget), "{budget}");

    let backlog = chunks[..48].to_vec();
    let warm = tokio::spawn({
        let f = f.clone();
        async move { f.warm_for(Hint::Landmark, &backlog).await }
    });
    // Let the backlog start.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!warm.is_finished());
    link.sent.lock().unwrap().clear();

    let asked = tokio::time::Instant::now();
    let read = f.fetch(&chunks[50..51], Intent::OnDemand).await.unwrap();
    assert_eq!(read[0], &data[50 * CHUNK..51 * CHUNK]);
    let sent = link.sent.lock().unwrap().clone();
    let &(_, ahead, at) = sent
        .iter()
        .find(|(intent, _, _)| *intent == Intent::OnDemand)
        .expect("the read's GET was sent");
    // Tokio's paused clock moves only when every task waits on it: the
    // same instant means the read's GET waited for nothing.
    assert_eq!(at, asked, "the read's GET was sent at once");
    assert!(
        ahead <= (budget + CHUNK as u64) as f64,
        "{ahead} bytes queued ahead of the read, budget {budget}"
    );
    let landed = chunks[..48]
        .iter()
        .filter(|c| cache.contains(&c.digest))
        .count();
    assert!(
        landed < 24 && !warm.is_finished(),
        "the read came before most of the backlog ({landed} of 48 chunks in)"
    );
    assert_eq!(
        warm.await.unwrap().unwrap(),
        48,
        "and the backlog came after"
    );
    let landmark = f.hints().snapshot().get(Hint::Landmark);
    assert_eq!(landmark.fetched, 48 * CHUNK as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculation_stands_down_while_the_cache_thrashes() {
    let data = pattern(8_000);
    let (_dir, blob, f) = setup(data.clone());
    let chunks = chunks_of(&data, 1000);
    let cache = f.cache().clone();
    // A bound of two chunks, and reads that need four: every insert evicts
    // one just used.
    cache.set_max_bytes(2200);
    f.fetch(&chunks[..4], Intent::OnDemand).await.unwrap();
    assert!(cache.under_pressure(), "{:?}", cache.stats());
    let gets = blob.reads().len();

    assert_eq!(f.warm_for(Hint::Library, &chunks[4..]).await.unwrap(), 0);
    assert_eq!(blob.reads().len(), gets, "no speculative GET");
    // Reads still fetch what they ask for, right.
    let got = f.fetch(&chunks[6..7], Intent::OnDemand).await.unwrap();
    assert_eq!(got.concat(), &data[6000..7000]);
}
