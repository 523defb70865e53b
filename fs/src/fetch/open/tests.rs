//! Opening through the fetcher, with a scripted format: what it asks for is
//! fetched with `Intent::Open`, the tail's chunks are cached, the bytes that
//! end a chunk begun before the tail are kept, a format that keeps asking is
//! refused.

use std::ops::Range;
use std::sync::Arc;

use super::*;
use crate::cache::Cache;
use crate::format::{Chunk, FileKind, InodeSpec, ROOT_INO};
use crate::testing::{FakeBlob, Plain, chunks_of, pattern};

/// Asks for `asks` one by one, then answers `index`, with chunk data ending
/// at `data_end`; chunks are plain.
struct Scripted {
    asks: Vec<Range<u64>>,
    index: LayerIndex,
    data_end: u64,
}

impl Format for Scripted {
    fn index_step(
        &self,
        fetched: &[Piece],
        _blob_size: u64,
        _expected: Option<Digest>,
    ) -> Result<IndexStep, FormatError> {
        for (piece, asked) in fetched.iter().zip(&self.asks) {
            assert_eq!(piece.offset..piece.end(), *asked, "fetched what was asked");
        }
        Ok(match self.asks.get(fetched.len()) {
            Some(r) => IndexStep::Fetch(r.clone()),
            None => IndexStep::Ready {
                index: self.index.clone(),
                data_end: self.data_end,
            },
        })
    }

    fn decode_chunk(&self, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
        Plain.decode_chunk(chunk, compressed)
    }
}

/// One file made of `chunks`.
fn index_of(chunks: Vec<Chunk>, blob_size: u64) -> LayerIndex {
    let size = chunks.iter().map(|c| c.size).sum();
    let mut root = InodeSpec::new(FileKind::Dir);
    root.parent = ROOT_INO;
    root.children = vec![(Box::from(&b"f"[..]), 2)];
    let mut file = InodeSpec::new(FileKind::Reg);
    file.parent = ROOT_INO;
    file.size = size;
    file.chunks = 0..u32::try_from(chunks.len()).expect("a test has few chunks");
    LayerIndex::new(vec![root, file], chunks, blob_size, None).unwrap()
}

fn fetcher_of(blob: Arc<FakeBlob>, format: Scripted) -> (tempfile::TempDir, Fetcher) {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    (dir, Fetcher::new(blob, Arc::new(format), cache))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_fetches_what_the_format_asks_for_and_caches_the_tails_chunks() {
    // Chunks at 0..9000 (1000 bytes each), the format's metadata after
    // them; the tail (7500..) holds chunk 8 whole and the end of chunk 7.
    let data = pattern(10_000);
    let chunks: Vec<Chunk> = chunks_of(&data, 1000).into_iter().take(9).collect();
    let format = Scripted {
        asks: vec![7500..10_000, 9000..9100],
        index: index_of(chunks.clone(), 10_000),
        data_end: 9000,
    };
    let blob = FakeBlob::instant(data.clone());
    let (_dir, f) = fetcher_of(blob.clone(), format);

    let index = f.open_index(None).await.unwrap();
    assert_eq!(index.chunks.len(), 9);
    assert_eq!(
        blob.reads(),
        vec![(7500..10_000, Intent::Open), (9000..9100, Intent::Open)],
        "one GET per range asked for, with the open intent"
    );
    assert_eq!(f.stats().snapshot().requests, 2);
    assert!(
        f.cache().contains(&chunks[8].digest),
        "a chunk in the tail is cached"
    );
    assert!(!f.cache().contains(&chunks[7].digest));
    assert!(
        f.cache().contains(&Digest::of(&data[7500..8000])),
        "the end of the chunk across the tail's start is kept"
    );

    // Chunk 8 costs no GET; chunk 7 only its part before the tail.
    let got = f.fetch(&chunks[7..9], Intent::OnDemand).await.unwrap();
    assert_eq!(got.concat(), &data[7000..9000]);
    assert_eq!(blob.reads()[2..], [(7000..7500, Intent::OnDemand)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_chunk_in_the_tail_is_not_cached() {
    let data = pattern(10_000);
    let chunks: Vec<Chunk> = chunks_of(&data, 1000).into_iter().take(9).collect();
    let mut stored = data.clone();
    stored[8500] ^= 1;
    let format = Scripted {
        asks: std::iter::once(7500..10_000).collect(),
        index: index_of(chunks.clone(), 10_000),
        data_end: 9000,
    };
    let (_dir, f) = fetcher_of(FakeBlob::instant(stored), format);
    f.open_index(None).await.unwrap();
    assert!(!f.cache().contains(&chunks[8].digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_that_keeps_asking_is_refused() {
    let data = pattern(1000);
    let format = Scripted {
        asks: vec![0..10; MAX_INDEX_STEPS + 1],
        index: LayerIndex::default(),
        data_end: 0,
    };
    let (_dir, f) = fetcher_of(FakeBlob::instant(data), format);
    let err = f.open_index(None).await.unwrap_err();
    assert!(
        matches!(err, OpenError::Format(FormatError::Index(_))),
        "{err}"
    );
}
