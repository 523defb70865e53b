//! The lazy disk against the reference path (`StackedDisk`, no cache), on
//! the layers overlaybd's own tools made: same bytes, fetched by block
//! ranges only where read, once, checked by CRC and cached under location
//! keys.

use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use crate::Intent;
use crate::fetch::SchedulerConfig;
use crate::format::overlaybd::{StackedDisk, block_key};
use crate::testing::FakeBlob;

fn fixture_layers() -> Vec<Vec<u8>> {
    let oci = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|a| a.join("shared/fixtures/overlaybd/oci"))
        .find(|p| p.is_dir())
        .expect("shared/fixtures/overlaybd beside the repository");
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let path = |d: &serde_json::Value| {
        let hex = d.as_str().unwrap().strip_prefix("sha256:").unwrap();
        oci.join("blobs/sha256").join(hex)
    };
    let index = json(oci.join("index.json"));
    let manifest = json(path(&index["manifests"][0]["digest"]));
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| std::fs::read(path(&l["digest"])).unwrap())
        .collect()
}

struct Fixture {
    blobs: Vec<Arc<FakeBlob>>,
    disk: Arc<LazyDisk>,
    reference: StackedDisk,
    _dir: tempfile::TempDir,
}

/// The fixture image as a lazy disk without read-ahead (so a read fetches
/// exactly the blocks it needs), and as the reference reader's disk.
async fn fixture() -> Fixture {
    fixture_with(0).await
}

async fn fixture_with(read_ahead: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    let scheduler = FetchScheduler::new(SchedulerConfig {
        read_ahead,
        ..SchedulerConfig::default()
    });
    let layers = fixture_layers();
    let blobs: Vec<Arc<FakeBlob>> = layers
        .iter()
        .map(|l| FakeBlob::instant(l.clone()))
        .collect();
    let mut opened = Vec::new();
    for (l, b) in layers.iter().zip(&blobs) {
        let layer = DiskLayer::open(Digest::of(l), b.clone(), cache.clone(), scheduler.clone())
            .await
            .unwrap();
        opened.push(Arc::new(layer));
    }
    let disk = Arc::new(LazyDisk::new(opened).unwrap());
    let reference = StackedDisk::open(
        layers
            .into_iter()
            .map(|l| FakeBlob::instant(l) as Arc<dyn BlobSource>)
            .collect(),
    )
    .await
    .unwrap();
    Fixture {
        blobs,
        disk,
        reference,
        _dir: dir,
    }
}

fn on_demand_bytes(blobs: &[Arc<FakeBlob>]) -> u64 {
    blobs
        .iter()
        .flat_map(|b| b.reads())
        .filter(|(_, i)| *i == Intent::OnDemand)
        .map(|(r, _)| r.end - r.start)
        .sum()
}

#[tokio::test]
async fn the_lazy_disk_reads_what_the_reference_reader_reads() {
    let f = fixture().await;
    assert_eq!(f.disk.size(), 64 << 30);
    // Every data range of the stack (capped per read), plus a stretch
    // across a hole and the last bytes of the disk.
    let mut ranges: Vec<std::ops::Range<u64>> = f
        .disk
        .map()
        .data_ranges()
        .into_iter()
        .map(|r| r.start..r.end.min(r.start + (1 << 20)))
        .collect();
    ranges.push((1 << 30) - 4096..(1 << 30) + 4096);
    ranges.push((64 << 30) - 512..64 << 30);
    for r in ranges {
        let lazy = f.disk.read(r.start, r.end - r.start).await.unwrap();
        let want = f.reference.read(r.clone()).await.unwrap();
        assert!(lazy == want, "bytes {r:?} differ");
    }
    // The ext4 superblock's magic.
    let sb = f.disk.read(1024, 1024).await.unwrap();
    assert_eq!(&sb[0x38..0x3a], &[0x53, 0xef]);
}

#[tokio::test]
async fn a_read_fetches_its_blocks_once_and_holes_nothing() {
    let f = fixture().await;
    let total: u64 = f.blobs.iter().map(|b| b.size()).sum();
    // Zeros, between two data ranges of the map: no GET.
    let data = f.disk.map().data_ranges();
    let gap = data
        .windows(2)
        .map(|w| w[0].end..w[1].start)
        .find(|g| g.end - g.start >= 128 << 10)
        .unwrap();
    let hole = f.disk.read(gap.start, 128 << 10).await.unwrap();
    assert!(hole.iter().all(|&b| b == 0));
    assert_eq!(on_demand_bytes(&f.blobs), 0);
    // The superblock: a few blocks, a small part of the image.
    f.disk.read(0, 4096).await.unwrap();
    let first = on_demand_bytes(&f.blobs);
    assert!(first > 0 && first < total / 20, "{first} of {total}");
    // Again, and concurrently: served from the cache, no GET.
    let (a, b) = tokio::join!(f.disk.read(0, 4096), f.disk.read(512, 2048));
    assert_eq!(&a.unwrap()[512..2560], &b.unwrap()[..]);
    assert_eq!(on_demand_bytes(&f.blobs), first);
    // The planned read finds every byte in the cache now.
    assert!(f.disk.read_cached(0, 4096).unwrap().is_complete());
}

#[tokio::test]
async fn concurrent_reads_of_one_block_share_one_get() {
    let f = fixture().await;
    let r = f.disk.map().data_ranges()[1].clone();
    let reads: Vec<_> = (0..8)
        .map(|_| {
            let d = f.disk.clone();
            tokio::spawn(async move { d.read(r.start, 512).await.unwrap() })
        })
        .collect();
    let mut got = Vec::new();
    for t in reads {
        got.push(t.await.unwrap());
    }
    assert!(got.windows(2).all(|w| w[0] == w[1]));
    let gets: usize = f
        .blobs
        .iter()
        .flat_map(|b| b.reads())
        .filter(|(_, i)| *i == Intent::OnDemand)
        .count();
    assert_eq!(gets, 1);
}

#[tokio::test]
async fn a_block_that_fails_its_crc_fails_the_read_and_is_not_cached() {
    let f = fixture().await;
    // The block that holds the superblock (disk sector 2).
    let seg = f.disk.map().segments_in(2..3)[0];
    let Source::Layer { layer, moffset } = seg.source else {
        panic!("the superblock is in a layer: {seg:?}");
    };
    let raw = moffset * SECTOR + (2 - seg.start) * SECTOR;
    let l = layer_index(layer);
    let chunk = *f.disk.layers()[l]
        .layer
        .index()
        .chunks
        .iter()
        .find(|c| c.file_offset <= raw && raw < c.file_offset + c.size)
        .unwrap();
    // Named by where it is: the blob's digest and the block's number.
    let blob = f.disk.layers()[l].digest;
    assert_eq!(chunk.digest, block_key(&blob, chunk.file_offset / 4096));
    f.blobs[l].tamper(chunk.blob_range.0 + 8);
    assert!(f.disk.read(1024, 1024).await.is_err());
    assert!(!f.disk.read_cached(1024, 1024).unwrap().is_complete());
    f.blobs[l].heal();
    let sb = f.disk.read(1024, 1024).await.unwrap();
    assert_eq!(&sb[0x38..0x3a], &[0x53, 0xef]);
}

#[test]
fn block_keys_name_a_place_not_content() {
    let a = Digest::of(b"blob a");
    let b = Digest::of(b"blob b");
    assert_ne!(block_key(&a, 0), block_key(&a, 1));
    assert_ne!(block_key(&a, 0), block_key(&b, 0));
    assert_eq!(block_key(&a, 7), block_key(&a, 7));
}

fn bytes_of(blob: &FakeBlob, intent: Intent) -> u64 {
    blob.reads()
        .into_iter()
        .filter(|(_, i)| *i == intent)
        .map(|(r, _)| r.end - r.start)
        .sum()
}

#[tokio::test]
async fn the_whole_blob_pass_verifies_each_blob_and_caches_every_block_once() {
    let f = fixture().await;
    // A read first: its blocks are cached before the pass.
    f.disk.read(0, 4096).await.unwrap();
    for (l, blob) in f.disk.layers().iter().zip(&f.blobs) {
        assert!(matches!(l.check(), BlobCheck::Unverified { .. }));
        assert_eq!(l.verify().await, BlobCheck::Verified);
        assert_eq!(l.hashed_bytes(), blob.size());
        // The blob went through once, at background priority.
        assert_eq!(bytes_of(blob, Intent::Background), blob.size());
        // Verified stays verified: no second pass.
        assert_eq!(l.verify().await, BlobCheck::Verified);
        assert_eq!(bytes_of(blob, Intent::Background), blob.size());
    }
    // Every block is cached: reading all the disk's data fetches nothing.
    let before = on_demand_bytes(&f.blobs);
    for r in f.disk.map().data_ranges() {
        let mut at = r.start;
        while at < r.end {
            let len = (r.end - at).min(1 << 20);
            let lazy = f.disk.read(at, len).await.unwrap();
            let want = f.reference.read(at..at + len).await.unwrap();
            assert!(lazy == want, "bytes at {at} differ");
            at += len;
        }
    }
    assert_eq!(on_demand_bytes(&f.blobs), before);
}

#[tokio::test]
async fn a_blob_whose_sha256_is_not_its_digest_fails_its_disk_and_leaves_the_cache() {
    let f = fixture().await;
    let sb = f.disk.read(1024, 1024).await.unwrap();
    assert_eq!(&sb[0x38..0x3a], &[0x53, 0xef]);
    // A registry (or a proxy) serves one byte differently from the bytes
    // the reads were served from: the sha256 of the whole no longer is
    // the digest. The block it is in fails its CRC too; the other blocks,
    // cached from the first bytes, are dropped all the same.
    let top = f.disk.layers().len() - 1;
    let size = f.blobs[top].size();
    f.blobs[top].tamper(size / 2);
    let layer = &f.disk.layers()[top];
    let BlobCheck::Failed(why) = layer.verify().await else {
        panic!("a tampered blob verified: {:?}", layer.check());
    };
    assert!(why.contains("sha256"), "{why}");
    assert!(
        layer
            .layer
            .index()
            .chunks
            .iter()
            .all(|c| !layer.layer.cache().contains(&c.digest)),
        "a failed layer's blocks stay cached"
    );
    // Every read of the disk fails now, cached or not, data or hole.
    assert!(matches!(
        f.disk.read(1024, 1024).await,
        Err(DiskError::Failed(d)) if d == layer.digest
    ));
    assert!(f.disk.read_cached(0, 512).is_err());
    // Healing the source does not bring a failed layer back.
    f.blobs[top].heal();
    assert!(matches!(layer.verify().await, BlobCheck::Failed(_)));
    assert!(f.disk.read(1024, 1024).await.is_err());
}

/// Once the warm pass has mapped the ext4 tree's files, a miss inside a
/// file fetches the window around it (the base read-ahead, aligned, cut to
/// the file's extent) with it: the rest of that window is then read from
/// the cache, the next window of the file is not fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_warm_pass_a_miss_fetches_its_files_window_and_no_further() {
    const WINDOW: u64 = 256 << 10;
    let f = fixture_with(WINDOW).await;
    let w = f.disk.warm_metadata().await.unwrap();
    assert!(w.file_extents > 0, "{w:?}");
    let files = f.disk.files.get().expect("the files are mapped");
    let big = files
        .iter()
        .map(|f| f.disk.clone())
        .find(|r| r.end - r.start >= 4 * WINDOW)
        .expect("a file of a few windows (random5m)");
    let window = (big.start / WINDOW + 1) * WINDOW..(big.start / WINDOW + 2) * WINDOW;
    let at = window.start + 8192;
    let gets = || f.blobs.iter().map(|b| b.reads().len()).sum::<usize>();
    let before = gets();
    let got = f.disk.read(at, 4096).await.unwrap();
    assert_eq!(got, f.reference.read(at..at + 4096).await.unwrap());
    assert!(gets() > before, "the read missed");
    let sent = gets();
    crate::testing::wait_until("the window to be cached", || {
        f.disk
            .read_cached(window.start, WINDOW)
            .is_ok_and(|r| r.is_complete())
    })
    .await;
    let whole = f.disk.read(window.start, WINDOW).await.unwrap();
    assert_eq!(whole, f.reference.read(window.clone()).await.unwrap());
    assert_eq!(gets(), sent, "the window came with the miss");
    assert!(
        !f.disk.read_cached(window.end, 4096).unwrap().is_complete(),
        "the file's next window is not fetched"
    );
}

/// After the warm pass, the image's entrypoint is found through the ext4
/// tree (through `PATH`; a script, then its interpreter through the link
/// `/bin/sh -> busybox`) and fetched ahead with `Intent::Prefetch`: the
/// kernel's reads of them then send no GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entrypoint_and_its_interpreter_are_found_in_the_ext4_tree_and_fetched_ahead() {
    let f = fixture().await;
    let entry = crate::layer::Entrypoint::from_config(
        br#"{"config":{"Cmd":["run.sh"],"Env":["PATH=/usr/bin:/app"]}}"#,
    )
    .unwrap();
    assert!(
        f.disk.prefetch_entrypoint(&entry).await.is_empty(),
        "nothing before the warm pass has mapped the disk"
    );
    f.disk.warm_metadata().await.unwrap();
    let fetched = f.disk.prefetch_entrypoint(&entry).await;
    assert_eq!(fetched, ["/app/run.sh", "/bin/sh"]);
    let gets = || f.blobs.iter().map(|b| b.reads().len()).sum::<usize>();
    let before = gets();
    let on_demand = on_demand_bytes(&f.blobs);
    let busybox = f.disk.file_extents("/bin/sh").await.expect("busybox");
    let size: u64 = busybox.iter().map(|e| e.disk.end - e.disk.start).sum();
    assert!(size >= 1_982_256, "{busybox:?}");
    for e in &busybox {
        let mut at = e.disk.start;
        while at < e.disk.end {
            let len = (e.disk.end - at).min(1 << 20);
            let got = f.disk.read(at, len).await.unwrap();
            assert_eq!(got, f.reference.read(at..at + len).await.unwrap());
            at += len;
        }
    }
    assert_eq!(gets(), before, "busybox was fetched ahead, whole");
    assert_eq!(on_demand_bytes(&f.blobs), on_demand);
    let hinted: u64 = f
        .disk
        .layers
        .iter()
        .map(|l| {
            l.layer
                .stats()
                .hints
                .get(crate::fetch::Hint::Entrypoint)
                .fetched
        })
        .sum();
    // Compressed bytes: busybox's ZFile blocks.
    assert!(
        hinted >= 1 << 20,
        "counted as the entrypoint hint's: {hinted}"
    );
}

/// Lookups follow the tree's links, relative and absolute, and stop at
/// what the tree does not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_in_the_ext4_tree_follow_links_and_find_only_what_is_there() {
    let f = fixture().await;
    f.disk.warm_metadata().await.unwrap();
    let hostname = f.disk.file_extents("/etc/hostname").await.unwrap();
    assert_eq!(
        f.disk.file_extents("/data/rel-link").await,
        Some(hostname.clone())
    );
    assert_eq!(
        f.disk.file_extents("/etc/abs-link").await,
        Some(hostname.clone())
    );
    assert_eq!(
        f.disk
            .file_extents("/deep/a/b/../b/c/d/e/../../../../../../etc/hostname")
            .await,
        Some(hostname)
    );
    let leaf = f
        .disk
        .file_extents("/deep/a/b/c/d/e/leaf.txt")
        .await
        .unwrap();
    let at = leaf[0].disk.start;
    assert_eq!(
        f.disk.read(at, 7).await.unwrap(),
        f.reference.read(at..at + 7).await.unwrap()
    );
    assert_eq!(f.disk.file_extents("/etc/nothing").await, None);
    assert_eq!(
        f.disk.file_extents("/etc").await,
        None,
        "a directory is not a file"
    );
    assert_eq!(f.disk.file_extents("/data/empty").await, Some(Vec::new()));
}

/// A recorded trace replays ahead: the reads it names of each layer's
/// LSMT file are fetched with `Intent::Prefetch` and counted as the trace
/// hint's; a read of a layer the disk does not have fetches nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_trace_fetches_its_reads_of_each_layer_ahead() {
    use crate::format::overlaybd::trace::{Trace, TraceRead};
    let f = fixture().await;
    let read = |layer, offset, count| TraceRead {
        layer,
        offset,
        count,
    };
    let trace = Trace::Reads(vec![
        read(0, 0, 256 << 10),
        read(2, 4096, 8192),
        read(9, 0, 4096),
    ]);
    f.disk.replay(&trace).await;
    for (layer, offset, count) in [(0usize, 0, 256 << 10), (2, 4096, 8192)] {
        let l = &f.disk.layers[layer].layer;
        assert!(
            matches!(
                l.read_cached(LSMT_INO, offset, count),
                Ok(CachedRead::Hit(_))
            ),
            "layer {layer}'s traced bytes are cached"
        );
        assert!(l.stats().hints.get(crate::fetch::Hint::Trace).fetched > 0);
    }
    assert_eq!(on_demand_bytes(&f.blobs), 0, "all of it ahead of any read");
    assert_eq!(
        f.disk.layers[1]
            .layer
            .stats()
            .hints
            .get(crate::fetch::Hint::Trace)
            .fetched,
        0,
        "a layer the trace does not name"
    );
}

/// A trace that is a list of paths fetches those files whole, once the
/// warm pass has mapped the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_listing_files_fetches_them_whole() {
    use crate::format::overlaybd::trace::Trace;
    let f = fixture().await;
    f.disk.warm_metadata().await.unwrap();
    let trace = Trace::parse(b"/bin/busybox\n/no/such/file\n").unwrap();
    assert_eq!(f.disk.replay(&trace).await, 1_982_256);
    let gets = || f.blobs.iter().map(|b| b.reads().len()).sum::<usize>();
    let before = gets();
    for e in f.disk.file_extents("/bin/busybox").await.unwrap() {
        let mut at = e.disk.start;
        while at < e.disk.end {
            let len = (e.disk.end - at).min(1 << 20);
            f.disk.read(at, len).await.unwrap();
            at += len;
        }
    }
    assert_eq!(gets(), before, "busybox came with the trace");
}
