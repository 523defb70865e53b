use std::sync::Arc;

use super::*;
use crate::cache::Cache;
use crate::fetch::{FetchScheduler, SchedulerConfig};
use crate::format::{Chunk, FileKind, FormatError, InodeSpec, ROOT_INO};
use crate::testing::{FakeBlob, Plain, chunks_of};

pub(crate) fn inode(kind: FileKind, size: u64, chunks: std::ops::Range<u32>) -> InodeSpec {
    InodeSpec {
        mode: 0o644,
        size,
        chunks,
        ..InodeSpec::new(kind)
    }
}

/// A layer with one file, `/f`, whose content is `data` in 1000-byte chunks.
fn layer_with_file(data: &[u8]) -> (tempfile::TempDir, Arc<FakeBlob>, Arc<Layer>) {
    let chunks = chunks_of(data, 1000);
    let mut root = inode(FileKind::Dir, 0, 0..0);
    root.children = vec![(Box::from(&b"f"[..]), 2)];
    let count = u32::try_from(chunks.len()).unwrap();
    let file = inode(FileKind::Reg, data.len() as u64, 0..count);
    let index = LayerIndex::new(vec![root, file], chunks, data.len() as u64, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    let blob = FakeBlob::new(data.to_vec());
    let scheduler = no_read_ahead();
    let layer = Arc::new(Layer::new(
        index,
        Fetcher::with_scheduler(blob.clone(), Arc::new(Plain), cache, scheduler),
    ));
    (dir, blob, layer)
}

/// A scheduler without read-ahead: the GETs these tests count are those of
/// the reads themselves.
fn no_read_ahead() -> FetchScheduler {
    FetchScheduler::new(SchedulerConfig {
        read_ahead: 0,
        ..SchedulerConfig::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_fetches_its_chunks_once_then_is_answered_inline() {
    let data: Vec<u8> = (0..5500u32).map(|i| (i % 253) as u8).collect();
    let (_dir, blob, layer) = layer_with_file(&data);

    // 1500..3200 spans chunks 1, 2 and 3.
    assert_eq!(layer.read(2, 1500, 1700).await.unwrap(), &data[1500..3200]);
    assert_eq!(
        blob.reads().len(),
        1,
        "adjacent chunks of one read: one GET"
    );
    assert_eq!(blob.reads()[0].0, 1000..4000);

    let l = layer.clone();
    let again = tokio::task::spawn_blocking(move || l.read_cached(2, 1200, 2000).unwrap())
        .await
        .unwrap();
    match again {
        CachedRead::Hit(d) => assert_eq!(d, &data[1200..3200]),
        CachedRead::Miss(_) => panic!("cached chunks must be answered inline"),
    }
    assert_eq!(blob.reads().len(), 1);

    // The tail is short and reads past the end stop at the end.
    assert_eq!(layer.read(2, 5000, 4096).await.unwrap(), &data[5000..]);
    assert!(layer.read(2, 6000, 10).await.unwrap().is_empty());
}

/// The read plan's lookup is the only one a miss makes: the fetcher goes
/// straight to its flights (its re-check is an index lookup, not a read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_looks_the_cache_up_once_on_its_way_down() {
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let (_dir, blob, layer) = layer_with_file(&data);
    assert_eq!(layer.read(2, 1500, 10).await.unwrap(), &data[1500..1510]);
    let s = layer.cache().stats();
    assert_eq!((s.hits, s.misses), (0, 1), "one lookup, one miss");
    assert_eq!(blob.reads().len(), 1);

    // A chunk cached behind the plan's back (a flight that finished after
    // the lookup) is answered from the cache by the fetcher's re-check.
    let chunk = layer.index().chunks[0];
    layer.cache().insert(&chunk.digest, &data[..1000]).unwrap();
    let got = layer
        .fetcher
        .fetch(&[chunk], Intent::OnDemand)
        .await
        .unwrap();
    assert_eq!(got[0], &data[..1000]);
    assert_eq!(blob.reads().len(), 1, "not fetched again");
    assert_eq!(layer.stats().cache_hits, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_directory_or_a_missing_inode_is_an_error() {
    let (_dir, _blob, layer) = layer_with_file(b"hello");
    assert!(matches!(
        layer.read(ROOT_INO, 0, 10).await,
        Err(LayerError::NotFile(1))
    ));
    assert!(matches!(
        layer.read(9, 0, 10).await,
        Err(LayerError::NoInode(9))
    ));
}

/// An eStargz blob from tarn's writer holding `/dir/file` with `content`.
fn estargz_with(content: &[u8]) -> (Vec<u8>, crate::Digest) {
    use crate::format::estargz::{WriteOptions, write_estargz};
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, "dir/file", content).unwrap();
    let tar = tar.into_inner().unwrap();
    let mut blob = Vec::new();
    let opts = WriteOptions {
        chunk_size: 64 << 10,
        ..WriteOptions::default()
    };
    let res = write_estargz(&tar[..], &mut blob, &opts).unwrap();
    (blob, res.toc_digest)
}

/// `len` incompressible bytes.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Bits 24..32 of the state.
            x.to_le_bytes()[3]
        })
        .collect()
}

/// A layer of one 1 MB file of noise (so the chunks read lie before the
/// blob's tail), opened without read-ahead.
struct NoiseLayer {
    content: Vec<u8>,
    blob: Vec<u8>,
    cache: Arc<Cache>,
    src: Arc<FakeBlob>,
    layer: Arc<Layer>,
    _dir: tempfile::TempDir,
}

impl NoiseLayer {
    async fn open() -> NoiseLayer {
        let content = noise(1_000_000);
        let (blob, toc_digest) = estargz_with(&content);
        let _dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(_dir.path()).unwrap());
        let src = FakeBlob::new(blob.clone());
        let layer = Layer::open_with(
            src.clone(),
            Some(toc_digest),
            cache.clone(),
            no_read_ahead(),
        )
        .await
        .unwrap();
        NoiseLayer {
            content,
            blob,
            cache,
            src,
            layer: Arc::new(layer),
            _dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_reads_footer_and_toc_in_one_get_and_checks_the_toc_digest() {
    // Incompressible, so the chunks read lie before the blob's tail.
    let NoiseLayer {
        content,
        blob,
        cache,
        src,
        layer,
        _dir,
    } = NoiseLayer::open().await;
    assert_eq!(
        src.reads().len(),
        1,
        "footer and a small TOC come in one GET"
    );
    let ino = layer.index().resolve("dir/file").unwrap();
    assert_eq!(
        layer.read(ino, 70_000, 100_000).await.unwrap(),
        &content[70_000..170_000]
    );
    assert_eq!(
        layer.stats().requests,
        2,
        "then one merged GET for the chunks read"
    );
    let last = content.len() as u64 - 10_000;
    assert_eq!(
        layer.read(ino, last, 10_000).await.unwrap(),
        &content[crate::num::usize_from(last)..]
    );
    assert_eq!(
        layer.stats().requests,
        2,
        "the file's end lies in the tail fetched at open: no GET"
    );

    let wrong = crate::Digest::of(b"not the toc");
    let err = Layer::open(FakeBlob::new(blob), Some(wrong), cache)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            LayerError::Open(OpenError::Format(FormatError::TocDigestMismatch { .. }))
        ),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_that_came_with_the_tail_are_cached_and_the_one_across_its_start_completed() {
    // 64 KiB chunks of noise: the 256 KiB tail holds a few whole chunks
    // and the end of one that starts before it.
    let NoiseLayer {
        content,
        blob,
        cache,
        src,
        layer,
        _dir,
    } = NoiseLayer::open().await;
    let tail_start = blob.len() as u64 - crate::format::estargz::TAIL_FETCH;
    let ino = layer.index().resolve("dir/file").unwrap();
    let chunks = layer
        .index()
        .file_chunks(&layer.inode(ino).unwrap())
        .to_vec();
    let (whole, before): (Vec<&Chunk>, Vec<&Chunk>) =
        chunks.iter().partition(|c| c.blob_range.0 >= tail_start);
    assert!(whole.len() >= 2, "the test needs whole chunks in the tail");
    assert!(
        whole.iter().all(|c| cache.contains(&c.digest)),
        "chunks in the tail are cached at open"
    );
    assert!(before.iter().all(|c| !cache.contains(&c.digest)));
    let across = before.last().unwrap();
    assert!(
        across.blob_range.1 > tail_start,
        "a chunk straddles the tail"
    );
    let kept =
        &blob[crate::num::usize_from(tail_start)..crate::num::usize_from(across.blob_range.1)];
    assert!(
        cache.contains(&crate::Digest::of(kept)),
        "its end is kept on disk, not in memory"
    );

    // Reading the whole chunks costs no GET.
    let from = whole[0].file_offset;
    assert_eq!(
        layer.read(ino, from, 1 << 20).await.unwrap(),
        &content[crate::num::usize_from(from)..]
    );
    assert_eq!(src.reads().len(), 1, "only the GET that opened the layer");

    // The chunk across the tail's start: only its part before the tail is
    // fetched; the rest comes from the cache.
    let at = across.file_offset;
    assert_eq!(
        layer.read(ino, at, across.size).await.unwrap(),
        &content[crate::num::usize_from(at)..crate::num::usize_from(at + across.size)]
    );
    let reads = src.reads();
    assert_eq!(reads.len(), 2);
    assert_eq!(reads[1].0, across.blob_range.0..tail_start);
}

/// A start profile fetches the chunks covering the ranges it names, in
/// one pass, counted as its hint; a path the layer lacks (or that tries to
/// leave it), a directory and a range past the file's end fetch nothing
/// more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_replay_fetches_its_ranges_and_nothing_the_layer_lacks() {
    use crate::layer::profile::{FileProfile, LayerProfile};
    let data: Vec<u8> = (0..5500u32).map(|i| (i % 249) as u8).collect();
    let (_dir, blob, layer) = layer_with_file(&data);
    let file = |path: &str, ranges: Vec<[u64; 2]>| FileProfile {
        path: path.into(),
        first_access_micros: 0,
        ranges,
    };
    let section = LayerProfile {
        digest: crate::Digest::of(b"layer"),
        files: vec![
            file("f", vec![[1500, 100], [5200, 1 << 30]]),
            file("missing", vec![[0, 10]]),
            file("../f", vec![[0, 10]]),
            file("/", Vec::new()),
            file("f", vec![[1 << 40, 10]]),
        ],
    };
    // While one runs (its GET held on the wire), a second does nothing.
    blob.hold(&[Intent::Prefetch], 0);
    let first = {
        let (layer, section) = (layer.clone(), section.clone());
        tokio::spawn(async move { layer.replay_profile(&section).await })
    };
    crate::testing::wait_until("the replay's GET", || {
        blob.on_the_wire(Intent::Prefetch) > 0
    })
    .await;
    let second = layer.replay_profile(&section).await.unwrap();
    assert!(second.busy && second.chunks == 0, "{second:?}");
    blob.release();
    let r = first.await.unwrap().unwrap();
    assert!(!r.busy);
    assert_eq!((r.chunks, r.fetched), (2, 2), "{r:?}");
    assert_eq!((r.missing, r.out_of_bounds), (3, 2), "{r:?}");
    // One GET: the gap between the two chunks is under the fetcher's
    // merge threshold, so it is carried rather than paid a round trip.
    let got: Vec<_> = blob.reads().iter().map(|(r, _)| r.clone()).collect();
    assert_eq!(got, vec![1000..5500]);
    let hint = layer.hint_stats().get(Hint::Profile);
    assert_eq!(hint.fetched, 1500);
    // What it fetched is answered inline now, and counts as used.
    let l = layer.clone();
    let hit = tokio::task::spawn_blocking(move || l.read_cached(2, 1500, 100).unwrap())
        .await
        .unwrap();
    assert!(matches!(hit, CachedRead::Hit(d) if d == data[1500..1600]));
    assert_eq!(layer.hint_stats().get(Hint::Profile).used, 1000);
    // Replayed again: everything is cached, nothing is fetched.
    let again = layer.replay_profile(&section).await.unwrap();
    assert_eq!(again.fetched, 0);
    assert_eq!(blob.reads().len(), 1);
}
