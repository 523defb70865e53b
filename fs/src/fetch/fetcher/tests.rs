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
