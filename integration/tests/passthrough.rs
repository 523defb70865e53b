//! FUSE passthrough of fully cached files (issue 5): what a reader sees
//! through tarn, and through an overlay on top of it, once a file's content
//! is one verified file in the cache; and the cached-read throughput that
//! passthrough buys (S4). Needs root, /dev/fuse and overlayfs.

use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tarn_fs::Digest;
use tarn_fs::cache::Cache;
use tarn_fs::fetch::Fetcher;
use tarn_fs::format::{Chunk, FileKind, InodeSpec, LayerIndex, ROOT_INO};
use tarn_fs::fuse::{MountHandle, MountOptions, mount};
use tarn_fs::layer::Layer;
use tarn_fs::num::usize_from;
use tarn_fs::testing::{FakeBlob, Plain};

/// Blob byte `i` of a blob that is generated, not stored, so a 1 GiB layer
/// costs no memory.
fn blob_bytes(range: Range<u64>) -> Vec<u8> {
    let first = range.start / 8;
    let last = range.end.div_ceil(8);
    let mut out = Vec::with_capacity(usize_from((last - first) * 8));
    for w in first..last {
        let v = (w ^ 0x5bd1_e995).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        out.extend_from_slice(&v.to_le_bytes());
    }
    let skip = usize_from(range.start - first * 8);
    out.drain(..skip);
    out.truncate(usize_from(range.end - range.start));
    out
}

fn node(kind: FileKind, parent: u64) -> InodeSpec {
    InodeSpec {
        mode: if kind == FileKind::Dir { 0o755 } else { 0o644 },
        mtime: 1_600_000_000,
        nlink: if kind == FileKind::Dir { 2 } else { 1 },
        parent,
        ..InodeSpec::new(kind)
    }
}

/// A file of the layer: its name, size and chunk size.
struct Spec {
    name: &'static str,
    size: u64,
    chunk: u64,
}

/// A flat layer of `files` laid out one after another in the blob; each
/// file's content is its blob range. Also writes each file to `copy_to`
/// (the local-disk baseline) when given.
fn flat_layer(files: &[Spec], copy_to: Option<&Path>) -> (LayerIndex, Vec<Range<u64>>) {
    let mut root = node(FileKind::Dir, ROOT_INO);
    let mut inodes = Vec::new();
    let mut chunks = Vec::new();
    let mut ranges = Vec::new();
    let mut base = 0u64;
    for (k, f) in files.iter().enumerate() {
        let ino = k as u64 + 2;
        root.children.push((Box::from(f.name.as_bytes()), ino));
        let mut file = node(FileKind::Reg, ROOT_INO);
        file.size = f.size;
        let first = u32::try_from(chunks.len()).expect("a test has few chunks");
        let mut whole = tarn_fs::digest::Hasher::default();
        let mut out = copy_to.map(|d| std::fs::File::create(d.join(f.name)).unwrap());
        let mut off = 0;
        while off < f.size {
            let len = f.chunk.min(f.size - off);
            let r = base + off..base + off + len;
            let bytes = blob_bytes(r.clone());
            whole.update(&bytes);
            if let Some(o) = out.as_mut() {
                std::io::Write::write_all(o, &bytes).unwrap();
            }
            chunks.push(Chunk {
                file_offset: off,
                size: len,
                digest: Digest::of(&bytes),
                blob_range: (r.start, r.end),
                inner_offset: 0,
            });
            off += len;
        }
        file.chunks = first..u32::try_from(chunks.len()).expect("a test has few chunks");
        file.digest = Some(whole.finish());
        inodes.push(file);
        ranges.push(base..base + f.size);
        base += f.size;
    }
    root.children.sort();
    inodes.insert(0, root);
    let index = LayerIndex::new(inodes, chunks, base, None).expect("a consistent index");
    (index, ranges)
}

/// Everything a test mounts, torn down in reverse order even on failure.
struct Bed {
    dir: tempfile::TempDir,
    blob: Arc<FakeBlob>,
    index: LayerIndex,
    rt: tokio::runtime::Runtime,
}

impl Bed {
    fn new(files: &[Spec], with_local_copy: bool) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("local");
        std::fs::create_dir(&local).unwrap();
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        let (index, _) = flat_layer(files, with_local_copy.then_some(local.as_path()));
        let blob = FakeBlob::generated(index.blob_size, blob_bytes);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        Bed {
            dir,
            blob,
            index,
            rt,
        }
    }

    fn cache(&self) -> Arc<Cache> {
        Arc::new(Cache::open(&self.dir.path().join("cache")).unwrap())
    }

    /// Mounts the layer over `cache` at a fresh directory `name`.
    fn mount(&self, name: &str, cache: Arc<Cache>, passthrough: bool) -> Mounted {
        let mnt = self.dir.path().join(name);
        std::fs::create_dir(&mnt).unwrap();
        let layer = Arc::new(Layer::new(
            self.index.clone(),
            Fetcher::new(self.blob.clone(), Arc::new(Plain), cache),
        ));
        let options = MountOptions {
            passthrough,
            ..MountOptions::default()
        };
        let handle = mount(layer.clone(), &mnt, self.rt.handle().clone(), &options).unwrap();
        Mounted { handle, layer, mnt }
    }

    /// A read-only overlay whose top lower layer is `lower`.
    fn overlay(&self, name: &str, lower: &Path) -> Overlay {
        let merged = self.dir.path().join(name);
        std::fs::create_dir(&merged).unwrap();
        let opts = format!(
            "lowerdir={}:{}",
            lower.display(),
            self.dir.path().join("empty").display()
        );
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&merged)
            .status()
            .unwrap();
        assert!(st.success(), "overlay mount failed");
        Overlay(merged)
    }
}

struct Mounted {
    handle: MountHandle,
    layer: Arc<Layer>,
    mnt: PathBuf,
}

/// Unmounts an overlay even when the test fails.
struct Overlay(PathBuf);

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Reads `path` whole and checks it against the blob range it came from.
fn assert_content(path: &Path, want: Range<u64>) {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = want.start;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        assert!(at + n as u64 <= want.end, "{} is too long", path.display());
        assert!(
            buf[..n] == blob_bytes(at..at + n as u64)[..],
            "{} differs near offset {}",
            path.display(),
            at - want.start
        );
        at += n as u64;
    }
    assert_eq!(at, want.end, "{} is short", path.display());
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    tarn_integration::wait::wait_until(what, Duration::from_secs(60), || done().then_some(()))
        .unwrap_or_else(|e| panic!("{e}"));
}

fn files() -> [Spec; 3] {
    [
        // One chunk, in its own cache object.
        Spec {
            name: "small",
            size: 200 << 10,
            chunk: 4 << 20,
        },
        // Six chunks: passes through only once assembled.
        Spec {
            name: "big",
            size: (22 << 20) + 12345,
            chunk: 4 << 20,
        },
        // Lives in a cache pack: never passed through.
        Spec {
            name: "tiny",
            size: 1000,
            chunk: 4 << 20,
        },
    ]
}

#[test]
fn fully_cached_files_pass_through_with_their_content_also_under_overlayfs() {
    let bed = Bed::new(&files(), false);
    let (_, ranges) = flat_layer(&files(), None);
    let cache = bed.cache();
    let big_digest = bed.index.file_digest(3).unwrap();

    // Cold: every read fetches; closing `big` with all chunks cached starts
    // its assembly.
    let m = bed.mount("cold", cache.clone(), true);
    for (f, r) in files().iter().zip(&ranges) {
        assert_content(&m.mnt.join(f.name), r.clone());
    }
    assert_eq!(m.handle.passthrough_stats().opens, 0, "nothing was cached");
    // `small` is one verified chunk object now: its next open passes through.
    assert_content(&m.mnt.join("small"), ranges[0].clone());
    assert_eq!(m.handle.passthrough_stats().opens, 1);
    wait_for("the assembly of big", || {
        m.handle.passthrough_stats().assembled == 1
    });
    assert!(cache.contains(&big_digest));
    drop(m);
    let fetched = bed.blob.read_count();

    // A fresh mount (empty page cache): `small` and `big` pass through and
    // never reach the daemon's read path; `tiny` is served from its pack.
    let m = bed.mount("warm", cache.clone(), true);
    assert_content(&m.mnt.join("small"), ranges[0].clone());
    assert_content(&m.mnt.join("big"), ranges[1].clone());
    assert_eq!(m.handle.passthrough_stats().opens, 2);
    assert_eq!(
        m.layer.stats().cache_hits,
        0,
        "passed-through reads bypass the daemon"
    );
    assert_content(&m.mnt.join("tiny"), ranges[2].clone());
    assert!(m.layer.stats().cache_hits > 0);

    // The container case: an overlay whose lower layer is the tarn mount.
    let o = bed.overlay("merged", &m.mnt);
    assert_content(&o.0.join("big"), ranges[1].clone());
    assert_content(&o.0.join("small"), ranges[0].clone());
    assert_eq!(m.handle.passthrough_stats().opens, 4);
    // While open through passthrough, a second open shares the backing file.
    let held = std::fs::File::open(o.0.join("big")).unwrap();
    assert_content(&m.mnt.join("big"), ranges[1].clone());
    assert_eq!(m.handle.passthrough_stats().refused, 0);
    drop(held);
    drop(o);
    drop(m);

    // Switched off: same content, every read through the daemon.
    let m = bed.mount("off", cache, false);
    for (f, r) in files().iter().zip(&ranges) {
        assert_content(&m.mnt.join(f.name), r.clone());
    }
    assert_eq!(m.handle.passthrough_stats().opens, 0);
    assert!(m.layer.stats().cache_hits > 0);
    assert_eq!(bed.blob.read_count(), fetched, "all cached");
}

/// Flips one byte in the middle of a cache object file.
fn corrupt(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_cache_file_corrupted_on_disk_is_never_served() {
    let bed = Bed::new(&files(), false);
    let (_, ranges) = flat_layer(&files(), None);
    let small = bed.index.chunks[bed.index.inode(2).unwrap().chunks().start as usize].digest;
    let big = bed.index.file_digest(3).unwrap();
    {
        let cache = bed.cache();
        let m = bed.mount("first", cache.clone(), true);
        assert_content(&m.mnt.join("small"), ranges[0].clone());
        assert_content(&m.mnt.join("big"), ranges[1].clone());
        wait_for("the whole-file object of big", || cache.contains(&big));
        let small_path = cache.file_path(&small).unwrap();
        let big_path = cache.file_path(&big).unwrap();
        drop(m);
        drop(cache);
        // Behind the next process's back (it has not read anything yet).
        corrupt(&small_path);
        corrupt(&big_path);
    }
    let before = bed.blob.read_count();

    // A new process's cache: the files are known but not yet trusted.
    let cache = bed.cache();
    let m = bed.mount("second", cache.clone(), true);
    let o = bed.overlay("merged", &m.mnt);
    for _ in 0..3 {
        assert_content(&o.0.join("small"), ranges[0].clone());
        assert_content(&o.0.join("big"), ranges[1].clone());
        assert_content(&m.mnt.join("small"), ranges[0].clone());
        assert_content(&m.mnt.join("big"), ranges[1].clone());
    }
    wait_for("both files to fail verification", || {
        cache.stats().corrupt >= 2
    });
    assert!(
        bed.blob.read_count() > before,
        "the corrupted bytes were fetched again"
    );
    drop(o);
    drop(m);
}

fn read_through(path: &Path, buf: &mut [u8]) -> (u64, Duration) {
    let t = Instant::now();
    let mut f = std::fs::File::open(path).unwrap();
    let mut total = 0u64;
    loop {
        let n = f.read(buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    (total, t.elapsed())
}

/// Best of three warm sequential reads (1 MiB reads) of `path`, in MB/s;
/// one untimed read first fills the page cache.
fn warm_mbps(path: &Path, size: u64) -> f64 {
    let mut buf = vec![0u8; 1 << 20];
    let (n, _) = read_through(path, &mut buf);
    assert_eq!(n, size, "{} has the wrong size", path.display());
    let best = (0..3)
        .map(|_| read_through(path, &mut buf).1)
        .min()
        .expect("three runs");
    size as f64 / best.as_secs_f64() / 1e6
}

/// S4: cached sequential read of a 1 GiB file through tarn (passthrough on
/// and off, directly and under overlayfs) against the same file on local
/// disk and on overlayfs. Prints the figures and ratios; not a timed
/// assertion. Uses about 3 GiB of a temp dir, removed at the end.
#[test]
fn cached_read_of_1gib_through_passthrough_against_overlayfs() {
    const SIZE: u64 = 1 << 30;
    let spec = [Spec {
        name: "big",
        size: SIZE,
        chunk: 4 << 20,
    }];
    let bed = Bed::new(&spec, true);
    let digest = bed.index.file_digest(2).unwrap();
    let cache = bed.cache();

    let on = bed.mount("on", cache.clone(), true);
    let t = Instant::now();
    assert_content(&on.mnt.join("big"), 0..SIZE);
    let cold = t.elapsed();
    let t = Instant::now();
    wait_for("the whole-file object", || cache.contains(&digest));
    let assembly = t.elapsed();
    let off = bed.mount("off", cache.clone(), false);

    let local = bed.dir.path().join("local");
    let over_local = bed.overlay("over-local", &local);
    let over_on = bed.overlay("over-on", &on.mnt);
    let over_off = bed.overlay("over-off", &off.mnt);

    let disk = warm_mbps(&local.join("big"), SIZE);
    let overlay = warm_mbps(&over_local.0.join("big"), SIZE);
    let pt = warm_mbps(&on.mnt.join("big"), SIZE);
    let pt_overlay = warm_mbps(&over_on.0.join("big"), SIZE);
    let fuse = warm_mbps(&off.mnt.join("big"), SIZE);
    let fuse_overlay = warm_mbps(&over_off.0.join("big"), SIZE);
    assert!(
        on.handle.passthrough_stats().opens >= 8,
        "reads on the passthrough mount were passed through"
    );
    assert_eq!(off.handle.passthrough_stats().opens, 0);

    eprintln!(
        "S4 cached sequential read, 1 GiB, 1 MiB reads, best of 3 (MB/s):\n  \
         local disk {disk:.0}, overlayfs {overlay:.0}\n  \
         tarn passthrough {pt:.0} ({:.2}x overlayfs), under overlayfs {pt_overlay:.0} ({:.2}x)\n  \
         tarn without passthrough {fuse:.0} ({:.2}x overlayfs), under overlayfs {fuse_overlay:.0} ({:.2}x)\n  \
         (first read through tarn {:.1} s, whole-file assembly after it {:.1} s)",
        pt / overlay,
        pt_overlay / overlay,
        fuse / overlay,
        fuse_overlay / overlay,
        cold.as_secs_f64(),
        assembly.as_secs_f64(),
    );
    drop(over_off);
    drop(over_on);
    drop(over_local);
    drop(off);
    drop(on);
}
