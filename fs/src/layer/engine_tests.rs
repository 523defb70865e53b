//! The fetch engine seen from a layer: read-ahead, prefetch, background
//! fetch, and their priorities, against a fake blob that records its reads.
//!
//! No test here measures time. Each waits for events (reads on the wire,
//! chunks cached, the scheduler pausing), bounded only by
//! [`PATIENCE`](crate::testing::PATIENCE) as a failure bound;
//! to show that something does not happen, a test holds the fake blob's
//! reads at a gate and looks at a state in which it would have happened.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::cache::Cache;
use crate::fetch::{FetchScheduler, SchedulerConfig};
use crate::format::FileKind;
use crate::testing::{FakeBlob, PATIENCE, Plain, chunks_of, pattern, wait_until};

const CHUNK: usize = 1000;

struct Fixture {
    _dir: tempfile::TempDir,
    data: Vec<u8>,
    blob: Arc<FakeBlob>,
    layer: Arc<Layer>,
}

/// A layer of one file `/f` (inode 2) of `len` bytes in 1000-byte chunks
/// laid out back to back, over a blob that answers at once unless held.
fn fixture(len: usize, config: SchedulerConfig, prefetch: Option<Range<u64>>) -> Fixture {
    let data = pattern(len);
    let chunks = chunks_of(&data, CHUNK);
    let mut root = tests::inode(FileKind::Dir, 0, 0..0);
    root.children = vec![(Box::from(&b"f"[..]), 2)];
    let count = u32::try_from(chunks.len()).unwrap();
    let file = tests::inode(FileKind::Reg, len as u64, 0..count);
    let index = LayerIndex::new(vec![root, file], chunks, len as u64, prefetch).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    let blob = FakeBlob::with_delay(data.clone(), Duration::ZERO);
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
        speculate: true,
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

/// Background GETs read so far.
fn background_gets(blob: &FakeBlob) -> usize {
    blob.reads()
        .iter()
        .filter(|(_, i)| *i == Intent::Background)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_that_continues_a_walk_reads_ahead_in_its_get_and_the_next_reads_hit() {
    let f = fixture(40_000, config(3000, 4000, 2), None);
    assert_eq!(f.layer.read(2, 100, 10).await.unwrap(), &f.data[100..110]);
    assert_eq!(
        f.blob.reads(),
        vec![(0..1000, Intent::OnDemand)],
        "a first miss walks nowhere yet: its own chunk only"
    );
    // The next chunk's miss continues the walk: it and 3000 bytes after
    // it, in one GET.
    f.layer.read(2, 1000, 10).await.unwrap();
    assert_eq!(f.blob.reads()[1], (1000..5000, Intent::OnDemand));
    // The read-ahead chunks are verified and cached: reads there hit, and
    // carry the walk along.
    wait_until("the read-ahead cached", || {
        f.layer.progress().cached_bytes == 5000
    })
    .await;
    assert_eq!(
        f.layer.read(2, 2000, 3000).await.unwrap(),
        &f.data[2000..5000]
    );
    assert_eq!(f.blob.reads().len(), 2);
    // So the miss just past the window opens the next one.
    f.layer.read(2, 5000, 1).await.unwrap();
    assert_eq!(f.blob.reads()[2], (5000..9000, Intent::OnDemand));

    // A miss far from every walk (more than the gap a walk may skip):
    // its own chunk only.
    f.layer.read(2, 30_000, 1).await.unwrap();
    assert_eq!(f.blob.reads()[3], (30_000..31_000, Intent::OnDemand));
    assert_eq!(f.layer.stats().bytes_fetched, 1000 + 4000 + 4000 + 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_does_not_wait_for_its_read_ahead_to_arrive() {
    let data = pattern(8000);
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    // The GET streams one chunk, then the rest waits at the gate: a read
    // that waited for its read-ahead would never return.
    let blob = FakeBlob::streaming(data.clone(), Duration::ZERO, CHUNK, Duration::ZERO);
    blob.hold(&[Intent::OnDemand], 1);
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
    // The first chunk's miss starts a walk; the second's continues it.
    blob.release();
    assert_eq!(layer.read(2, 0, 10).await.unwrap(), &data[..10]);
    blob.hold(&[Intent::OnDemand], 1);

    let read = tokio::time::timeout(PATIENCE, layer.read(2, 1000, 10))
        .await
        .expect("the read waited for its read-ahead");
    assert_eq!(read.unwrap(), &data[1000..1010]);
    assert_eq!(
        blob.reads(),
        vec![(0..1000, Intent::OnDemand), (1000..8000, Intent::OnDemand)]
    );
    assert_eq!(blob.on_the_wire(Intent::OnDemand), 1, "the rest is held");
    // The read-ahead lands in the cache when its bytes are in.
    blob.release();
    wait_until("the read-ahead cached", || layer.progress().complete).await;
    assert_eq!(layer.stats().bytes_fetched, 8000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_fetches_exactly_the_landmark_range_in_speculative_gets() {
    let f = fixture(20_000, config(0, 4000, 2), Some(0..5000));
    match f.layer.prefetch(PATIENCE).await {
        PrefetchOutcome::Done { fetched, bytes } => assert_eq!((fetched, bytes), (5, 5000)),
        other => panic!("prefetch: {other:?}"),
    }
    // Speculative GETs are no larger than the scheduler's speculative
    // size (here the background GET's 4000 bytes), so the link's budget
    // holds them.
    let mut reads = f.blob.reads();
    reads.sort_by_key(|(r, _)| r.start);
    assert_eq!(
        reads,
        vec![(0..4000, Intent::Prefetch), (4000..5000, Intent::Prefetch)]
    );
    let landmark = f.layer.stats().hints.get(crate::fetch::Hint::Landmark);
    assert_eq!(landmark.fetched, 5000);
    // Done means cached: reading the range costs nothing.
    assert_eq!(f.layer.read(2, 0, 5000).await.unwrap(), &f.data[..5000]);
    assert!(matches!(
        f.layer.prefetch(PATIENCE).await,
        PrefetchOutcome::Done {
            fetched: 0,
            bytes: 0
        }
    ));
    assert_eq!(f.blob.reads().len(), 2);
    assert_eq!(
        f.layer.stats().hints.get(crate::fetch::Hint::Landmark).used,
        5000,
        "the read used every prefetched byte"
    );

    let none = fixture(2000, config(0, 4000, 2), None);
    assert!(matches!(
        none.layer.prefetch(PATIENCE).await,
        PrefetchOutcome::NoLandmark
    ));
    assert!(none.blob.reads().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_among_the_prioritized_files_carries_the_rest_of_them_up_to_the_window() {
    // Prioritized files at 0..8000; the read-ahead window is 3000 bytes.
    let f = fixture(20_000, config(3000, 4000, 2), Some(0..8000));
    // A first miss walks nowhere, yet inside the landmark's range it
    // carries the next 3000 bytes of it in its GET.
    assert_eq!(
        f.layer.read(2, 1500, 10).await.unwrap(),
        &f.data[1500..1510]
    );
    assert_eq!(f.blob.reads()[0], (1000..5000, Intent::OnDemand));
    wait_until("the carried chunks cached", || {
        f.layer.progress().cached_bytes >= 4000
    })
    .await;
    assert_eq!(
        f.layer.read(2, 2000, 3000).await.unwrap(),
        &f.data[2000..5000]
    );
    let landmark = f.layer.stats().hints.get(crate::fetch::Hint::Landmark);
    assert_eq!((landmark.fetched, landmark.used), (3000, 3000));
    assert_eq!(
        f.layer
            .stats()
            .hints
            .get(crate::fetch::Hint::ReadAhead)
            .fetched,
        0
    );
    // The landmark prefetch fetches only what is left of the range (the
    // first chunk may have come already: the library hint looks at the
    // head of a file a read missed in).
    match f.layer.prefetch(PATIENCE).await {
        PrefetchOutcome::Done { .. } => {}
        other => panic!("prefetch: {other:?}"),
    }
    let mut reads = f.blob.reads();
    reads.sort_by_key(|(r, _)| r.start);
    assert_eq!(
        reads,
        vec![
            (0..1000, Intent::Prefetch),
            (1000..5000, Intent::OnDemand),
            (5000..8000, Intent::Prefetch)
        ]
    );
    // Past the range, a miss on no walk fetches its own chunk only.
    f.layer.read(2, 15_500, 1).await.unwrap();
    assert_eq!(
        f.blob.reads().last().unwrap(),
        &(15_000..16_000, Intent::OnDemand)
    );

    // With speculation off, a miss among them fetches its own chunk.
    let mut off = config(3000, 4000, 2);
    off.speculate = false;
    let g = fixture(20_000, off, Some(0..8000));
    g.layer.read(2, 1500, 10).await.unwrap();
    assert_eq!(g.blob.reads(), vec![(1000..2000, Intent::OnDemand)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefetch_past_its_timeout_goes_on() {
    let f = fixture(4000, config(0, 4000, 2), Some(0..4000));
    // Held at the gate, the prefetch cannot be done before its timeout.
    f.blob.hold(&[Intent::Prefetch], 0);
    assert!(matches!(
        f.layer.prefetch(Duration::from_millis(30)).await,
        PrefetchOutcome::TimedOut
    ));
    wait_until("the prefetch GET on the wire", || {
        f.blob.on_the_wire(Intent::Prefetch) == 1
    })
    .await;
    f.blob.release();
    wait_until("the prefetch finished anyway", || {
        f.layer.progress().complete
    })
    .await;
    assert_eq!(f.blob.reads().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_fetches_every_chunk_once_concurrently_then_the_layer_is_complete() {
    let f = fixture(40_500, config(0, 4000, 3), None);
    // Some chunks are cached already: they are not fetched again.
    f.layer.read(2, 10_000, 2000).await.unwrap();
    let before = f.layer.progress();
    assert_eq!((before.cached_bytes, before.total_bytes), (2000, 40_500));
    assert!(!before.complete);

    // Held at the gate, background GETs pile up to the bound.
    f.blob.hold(&[Intent::Background], 0);
    let bg = f.layer.start_background();
    wait_until("three background GETs on the wire", || {
        f.blob.on_the_wire(Intent::Background) == 3
    })
    .await;
    f.blob.release();
    let outcome = tokio::time::timeout(PATIENCE, bg.wait()).await.unwrap();
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
    let f = fixture(30_000, config(0, 1000, 2), None);
    f.blob.hold(&[Intent::Background, Intent::OnDemand], 0);
    let bg = f.layer.start_background();
    wait_until("both background slots taken", || {
        f.blob.on_the_wire(Intent::Background) == 2
    })
    .await;

    // Far from where background is: a chunk it has not reached. Its GET
    // goes out although every background slot is taken.
    let layer = f.layer.clone();
    let read = tokio::spawn(async move { layer.read(2, 29_500, 10).await });
    wait_until("the on-demand GET on the wire", || {
        f.blob.on_the_wire(Intent::OnDemand) == 1
    })
    .await;

    // Background GETs end and free their slots; the next one is admitted
    // as far as waiting for the on-demand GET, where it would start now if
    // background did not pause.
    f.blob.hold(&[Intent::OnDemand], 0);
    let scheduler = f.layer.fetcher.scheduler().clone();
    wait_until("background paused", || scheduler.paused() == 1).await;
    assert_eq!(
        background_gets(&f.blob),
        2,
        "no background GET starts while on-demand is on the wire"
    );

    f.blob.release();
    let read = tokio::time::timeout(PATIENCE, read).await.unwrap();
    assert_eq!(read.unwrap().unwrap(), &f.data[29_500..29_510]);
    let outcome = tokio::time::timeout(PATIENCE, bg.wait()).await.unwrap();
    assert!(
        matches!(outcome, BackgroundOutcome::Complete),
        "{outcome:?}"
    );
    assert_eq!(
        chunk_starts(&f.blob.reads()),
        (0..30).map(|i| i * 1000).collect::<Vec<u64>>(),
        "the chunk read on demand was not fetched again by background"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handle_or_the_layer_stops_background() {
    let f = fixture(50_000, config(0, 1000, 1), None);
    // One slot, its GET held: the fetch is waiting for that slot when the
    // handle goes, and would start the next GET the moment it frees.
    f.blob.hold(&[Intent::Background], 0);
    let bg = f.layer.start_background();
    wait_until("a background GET on the wire", || {
        f.blob.on_the_wire(Intent::Background) == 1
    })
    .await;
    drop(bg);
    wait_until("background stopped", || {
        !f.layer.progress().background_running
    })
    .await;
    f.blob.release();
    wait_until("the GET on the wire ended", || {
        f.blob.on_the_wire(Intent::Background) == 0
    })
    .await;
    assert_eq!(
        f.blob.reads().len(),
        1,
        "no GET after the handle was dropped"
    );
    assert!(!f.layer.progress().complete);

    let Fixture {
        blob, layer, _dir, ..
    } = f;
    blob.hold(&[Intent::Background], 0);
    let bg = layer.start_background();
    wait_until("a background GET on the wire", || {
        blob.on_the_wire(Intent::Background) == 1
    })
    .await;
    drop(layer);
    let outcome = tokio::time::timeout(PATIENCE, bg.wait())
        .await
        .expect("stops when the layer goes");
    assert!(matches!(outcome, BackgroundOutcome::Stopped), "{outcome:?}");
    blob.release();
    wait_until("the GET on the wire ended", || {
        blob.on_the_wire(Intent::Background) == 0
    })
    .await;
    assert_eq!(blob.reads().len(), 2, "no GET after the layer was dropped");
}

/// In tokio's paused clock, which moves only when every task waits on a
/// timer (never while a blocking cache write runs): the pacing is exact,
/// whatever the machine's load.
#[tokio::test(start_paused = true)]
async fn the_background_rate_limit_paces_the_fetch() {
    let mut cfg = config(0, 4000, 8);
    cfg.background_rate = Some(20_000);
    let f = fixture(60_000, cfg, None);
    let t = tokio::time::Instant::now();
    assert!(matches!(
        f.layer.start_background().wait().await,
        BackgroundOutcome::Complete
    ));
    // A burst of one second (20 kB), then 40 kB at 20 kB/s.
    let took = t.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_millis(2100),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_picks_up_chunks_whose_other_fetch_was_under_way() {
    let f = fixture(8000, config(0, 1000, 4), None);
    // An on-demand read of chunk 5 is on the wire when background starts.
    f.blob.hold(&[Intent::OnDemand], 0);
    let layer = f.layer.clone();
    let read = tokio::spawn(async move { layer.read(2, 5000, 10).await });
    wait_until("the on-demand GET on the wire", || {
        f.blob.on_the_wire(Intent::OnDemand) == 1
    })
    .await;
    let bg = f.layer.start_background();
    let scheduler = f.layer.fetcher.scheduler().clone();
    wait_until("background paused", || scheduler.paused() == 1).await;
    f.blob.release();
    let outcome = tokio::time::timeout(PATIENCE, bg.wait()).await.unwrap();
    assert!(
        matches!(outcome, BackgroundOutcome::Complete),
        "{outcome:?}"
    );
    let read = tokio::time::timeout(PATIENCE, read).await.unwrap();
    assert_eq!(read.unwrap().unwrap(), &f.data[5000..5010]);
    assert!(f.layer.progress().complete);
    assert_eq!(
        chunk_starts(&f.blob.reads()),
        (0..8).map(|i| i * 1000).collect::<Vec<u64>>(),
        "the chunk in flight was waited for, not fetched twice"
    );
}
