//! The fetch engine seen from a layer: read-ahead, prefetch, background
//! fetch, and their priorities, against a fake blob that records its reads.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::cache::Cache;
use crate::fetch::{FetchScheduler, SchedulerConfig};
use crate::format::FileKind;
use crate::testing::{FakeBlob, Plain, chunks_of, pattern};

const CHUNK: usize = 1000;

struct Fixture {
    _dir: tempfile::TempDir,
    data: Vec<u8>,
    blob: Arc<FakeBlob>,
    layer: Arc<Layer>,
}

/// A layer of one file `/f` (inode 2) of `len` bytes in 1000-byte chunks
/// laid out back to back, each blob GET taking `delay`.
fn fixture(
    len: usize,
    delay: Duration,
    config: SchedulerConfig,
    prefetch: Option<Range<u64>>,
) -> Fixture {
    let data = pattern(len);
    let chunks = chunks_of(&data, CHUNK);
    let mut root = tests::inode(FileKind::Dir, 0, 0..0);
    root.children = vec![(Box::from(&b"f"[..]), 2)];
    let file = tests::inode(FileKind::Reg, len as u64, 0..chunks.len() as u32);
    let index = LayerIndex::new(vec![root, file], chunks, len as u64, prefetch).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    let blob = FakeBlob::with_delay(data.clone(), delay);
    let fetcher = Fetcher::with_scheduler(
        blob.clone(),
        Arc::new(Plain),
        cache,
        FetchScheduler::new(config),
    );
    Fixture {
        _dir: dir,
        data,
        blob,
        layer: Arc::new(Layer::new(index, fetcher)),
    }
}

fn config(read_ahead: u64, background_get: u64, background_concurrency: usize) -> SchedulerConfig {
    SchedulerConfig {
        read_ahead,
        // A fixed window: these tests count the GETs of one miss.
        read_ahead_max: read_ahead,
        background_get,
        background_concurrency,
        background_rate: None,
    }
}

/// Every blob byte offset (step: one chunk) that was read, sorted.
fn chunk_starts(reads: &[(Range<u64>, Intent)]) -> Vec<u64> {
    let mut v: Vec<u64> = reads
        .iter()
        .flat_map(|(r, _)| r.clone().step_by(CHUNK))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_reads_ahead_in_the_same_get_and_the_next_reads_hit() {
    let f = fixture(
        10_000,
        Duration::from_millis(5),
        config(3000, 4000, 2),
        None,
    );
    assert_eq!(f.layer.read(2, 100, 10).await.unwrap(), &f.data[100..110]);
    assert_eq!(
        f.blob.reads(),
        vec![(0..4000, Intent::OnDemand)],
        "the miss and 3000 bytes after it: one GET"
    );
    // The read-ahead chunks were verified and cached: reads there hit.
    assert_eq!(
        f.layer.read(2, 1000, 3000).await.unwrap(),
        &f.data[1000..4000]
    );
    assert_eq!(f.blob.reads().len(), 1);

    // A miss further on: the window after it (cut by the blob's end), and
    // half a window before it in a GET of its own (read-behind).
    f.layer.read(2, 7000, 1).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.blob.reads().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut later: Vec<_> = f.blob.reads()[1..].iter().map(|r| r.0.clone()).collect();
    later.sort_by_key(|r| r.start);
    assert_eq!(later, vec![6000..7000, 7000..10_000]);

    // Cached chunks after a miss are not fetched again.
    f.layer.read(2, 4500, 1).await.unwrap();
    let reads = f.blob.reads();
    assert_eq!(reads.len(), 4, "{reads:?}");
    assert_eq!(reads[3].0, 4000..6000, "up to the cached chunk at 6000");
    assert_eq!(f.layer.stats().bytes_fetched, 4000 + 1000 + 3000 + 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_does_not_wait_for_its_read_ahead_to_arrive() {
    let data = pattern(8000);
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    // The GET's first byte after 20 ms, then one chunk per 100 ms.
    let blob = FakeBlob::streaming(
        data.clone(),
        Duration::from_millis(20),
        CHUNK,
        Duration::from_millis(100),
    );
    let mut root = tests::inode(FileKind::Dir, 0, 0..0);
    root.children = vec![(Box::from(&b"f"[..]), 2)];
    let index = LayerIndex::new(
        vec![root, tests::inode(FileKind::Reg, 8000, 0..8)],
        chunks_of(&data, CHUNK),
        8000,
        None,
    )
    .unwrap();
    let fetcher = Fetcher::with_scheduler(
        blob.clone(),
        Arc::new(Plain),
        cache,
        FetchScheduler::new(config(7000, 4000, 2)),
    );
    let layer = Arc::new(Layer::new(index, fetcher));

    let t = Instant::now();
    assert_eq!(layer.read(2, 0, 10).await.unwrap(), &data[..10]);
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(100),
        "waited for the read-ahead: {took:?}"
    );
    assert_eq!(blob.reads(), vec![(0..8000, Intent::OnDemand)]);
    // The read-ahead lands in the cache when its bytes are in.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(layer.progress().complete);
    assert_eq!(layer.stats().bytes_fetched, 8000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_fetches_exactly_the_landmark_range_in_one_get() {
    let f = fixture(
        20_000,
        Duration::from_millis(5),
        config(0, 4000, 2),
        Some(0..5000),
    );
    match f.layer.prefetch(Duration::from_secs(5)).await {
        PrefetchOutcome::Done { fetched, bytes } => assert_eq!((fetched, bytes), (5, 5000)),
        other => panic!("prefetch: {other:?}"),
    }
    assert_eq!(f.blob.reads(), vec![(0..5000, Intent::Prefetch)]);
    // Done means cached: reading the range costs nothing.
    assert_eq!(f.layer.read(2, 0, 5000).await.unwrap(), &f.data[..5000]);
    assert!(matches!(
        f.layer.prefetch(Duration::from_secs(5)).await,
        PrefetchOutcome::Done {
            fetched: 0,
            bytes: 0
        }
    ));
    assert_eq!(f.blob.reads().len(), 1);

    let none = fixture(2000, Duration::ZERO, config(0, 4000, 2), None);
    assert!(matches!(
        none.layer.prefetch(Duration::from_secs(1)).await,
        PrefetchOutcome::NoLandmark
    ));
    assert!(none.blob.reads().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_past_its_timeout_goes_on() {
    let f = fixture(
        4000,
        Duration::from_millis(300),
        config(0, 4000, 2),
        Some(0..4000),
    );
    let t = Instant::now();
    assert!(matches!(
        f.layer.prefetch(Duration::from_millis(30)).await,
        PrefetchOutcome::TimedOut
    ));
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "returned at the timeout"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(f.layer.progress().complete, "the prefetch finished anyway");
    assert_eq!(f.blob.reads().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_fetches_every_chunk_once_concurrently_then_the_layer_is_complete() {
    let f = fixture(40_500, Duration::from_millis(20), config(0, 4000, 3), None);
    // Some chunks are cached already: they are not fetched again.
    f.layer.read(2, 10_000, 2000).await.unwrap();
    let before = f.layer.progress();
    assert_eq!((before.cached_bytes, before.total_bytes), (2000, 40_500));
    assert!(!before.complete);

    let outcome = f.layer.start_background().wait().await;
    assert!(
        matches!(outcome, BackgroundOutcome::Complete),
        "{outcome:?}"
    );
    let reads = f.blob.reads();
    assert_eq!(
        chunk_starts(&reads),
        (0..41).map(|i| i * 1000).collect::<Vec<u64>>(),
        "every chunk travelled exactly once"
    );
    let bg: Vec<_> = reads
        .iter()
        .filter(|(_, i)| *i == Intent::Background)
        .collect();
    assert!(
        bg.iter().all(|(r, _)| r.end - r.start <= 4000),
        "GETs within the size cap"
    );
    assert_eq!(bg.len(), 11, "ranges merged up to the cap: {bg:?}");
    assert_eq!(f.blob.max_concurrent(Intent::Background), 3);
    let p = f.layer.progress();
    assert!(p.complete && !p.background_running, "{p:?}");
    assert_eq!(p.cached_bytes, 40_500);
    let s = f.layer.stats();
    assert_eq!(
        (s.requests, s.bytes_fetched),
        (12, 40_500),
        "stats stay exact"
    );

    // A complete layer starts no GET.
    assert!(matches!(
        f.layer.start_background().wait().await,
        BackgroundOutcome::Complete
    ));
    assert_eq!(f.blob.reads().len(), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_reads_are_served_while_background_pauses() {
    let delay = Duration::from_millis(100);
    let f = fixture(30_000, delay, config(0, 1000, 2), None);
    let bg = f.layer.start_background();
    tokio::time::sleep(Duration::from_millis(150)).await;

    // Far from where background is: a chunk it has not reached.
    let t = Instant::now();
    assert_eq!(
        f.layer.read(2, 29_500, 10).await.unwrap(),
        &f.data[29_500..29_510]
    );
    let took = t.elapsed();
    assert!(
        took < delay * 2,
        "the on-demand read waited for no background slot: {took:?}"
    );

    let seen = f.blob.seen();
    let od = seen
        .iter()
        .find(|s| s.intent == Intent::OnDemand)
        .expect("the read fetched");
    let od_end = od.ended.expect("the read's GET ended");
    let started_during = seen
        .iter()
        .filter(|s| s.intent == Intent::Background && s.started > od.started && s.started < od_end)
        .count();
    assert_eq!(
        started_during, 0,
        "no background GET starts while on-demand is on the wire"
    );

    assert!(matches!(bg.wait().await, BackgroundOutcome::Complete));
    assert_eq!(
        chunk_starts(&f.blob.reads()),
        (0..30).map(|i| i * 1000).collect::<Vec<u64>>(),
        "the chunk read on demand was not fetched again by background"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handle_or_the_layer_stops_background() {
    let f = fixture(50_000, Duration::from_millis(40), config(0, 1000, 1), None);
    let bg = f.layer.start_background();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(bg);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let n = f.blob.reads().len();
    assert!(n < 10, "{n} GETs");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        f.blob.reads().len(),
        n,
        "no GET after the handle was dropped"
    );
    assert!(!f.layer.progress().background_running);
    assert!(!f.layer.progress().complete);

    let Fixture {
        blob, layer, _dir, ..
    } = f;
    let bg = layer.start_background();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(layer);
    let outcome = tokio::time::timeout(Duration::from_secs(1), bg.wait())
        .await
        .expect("stops when the layer goes");
    assert!(matches!(outcome, BackgroundOutcome::Stopped), "{outcome:?}");
    let n = blob.reads().len();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(blob.reads().len(), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_rate_limit_paces_the_fetch() {
    let mut cfg = config(0, 4000, 8);
    cfg.background_rate = Some(20_000);
    let f = fixture(60_000, Duration::ZERO, cfg, None);
    let t = Instant::now();
    assert!(matches!(
        f.layer.start_background().wait().await,
        BackgroundOutcome::Complete
    ));
    // A burst of one second (20 kB), then 40 kB at 20 kB/s.
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1700) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_picks_up_chunks_whose_other_fetch_was_under_way() {
    let f = fixture(8000, Duration::from_millis(150), config(0, 1000, 4), None);
    // An on-demand read of chunk 5 is on the wire when background starts.
    let layer = f.layer.clone();
    let read = tokio::spawn(async move { layer.read(2, 5000, 10).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let outcome = f.layer.start_background().wait().await;
    assert!(
        matches!(outcome, BackgroundOutcome::Complete),
        "{outcome:?}"
    );
    assert_eq!(read.await.unwrap().unwrap(), &f.data[5000..5010]);
    assert!(f.layer.progress().complete);
    assert_eq!(
        chunk_starts(&f.blob.reads()),
        (0..8).map(|i| i * 1000).collect::<Vec<u64>>(),
        "the chunk in flight was waited for, not fetched twice"
    );
}
