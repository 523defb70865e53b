//! The FUSE adapter over a hand-built layer index and an in-memory blob:
//! what the kernel, and overlayfs on top, see. Needs root and /dev/fuse.

mod support;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tarn_fs::Digest;
use tarn_fs::cache::Cache;
use tarn_fs::fetch::Fetcher;
use tarn_fs::format::{Chunk, FileKind, InodeSpec, LayerIndex, ROOT_INO};
use tarn_fs::fuse::{MountOptions, mount};
use tarn_fs::layer::Layer;
use tarn_fs::testing::{FakeBlob, Plain};

fn node(kind: FileKind, mode: u32, parent: u64) -> InodeSpec {
    InodeSpec {
        mode,
        uid: 1000,
        gid: 2000,
        mtime: 1_600_000_000,
        parent,
        ..InodeSpec::new(kind)
    }
}

fn name(s: &str) -> Box<[u8]> {
    Box::from(s.as_bytes())
}

/// `/a` (2 chunks; the second stored tampered when `tamper`), `/b` (1
/// chunk), `/l -> a`, `/wh` (0/0 char device: a whiteout), `/d` (opaque
/// directory with a user xattr).
fn index_and_blob(tamper: bool) -> (LayerIndex, Vec<u8>, Vec<u8>, Vec<u8>) {
    let a: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
    let b = b"hello from b\n".to_vec();
    let mut blob = Vec::new();
    let mut chunks = Vec::new();
    for (off, piece) in [(0u64, &a[..200_000]), (200_000, &a[200_000..]), (0, &b[..])] {
        let start = blob.len() as u64;
        blob.extend_from_slice(piece);
        chunks.push(Chunk {
            file_offset: off,
            size: piece.len() as u64,
            digest: Digest::of(piece),
            blob_range: (start, blob.len() as u64),
            inner_offset: 0,
        });
    }
    if tamper {
        blob[250_000] ^= 1;
    }
    let mut root = node(FileKind::Dir, 0o755, ROOT_INO);
    root.nlink = 3;
    root.children = vec![
        (name("a"), 2),
        (name("b"), 3),
        (name("d"), 6),
        (name("l"), 4),
        (name("wh"), 5),
    ];
    let mut fa = node(FileKind::Reg, 0o4755, ROOT_INO);
    fa.size = a.len() as u64;
    fa.chunks = 0..2;
    let mut fb = node(FileKind::Reg, 0o644, ROOT_INO);
    fb.size = b.len() as u64;
    fb.chunks = 2..3;
    let mut l = node(FileKind::Symlink, 0o777, ROOT_INO);
    l.link_target = name("a");
    l.size = 1;
    let wh = node(FileKind::CharDev, 0o000, ROOT_INO);
    let mut d = node(FileKind::Dir, 0o755, ROOT_INO);
    d.nlink = 2;
    d.xattrs = vec![
        (name("trusted.overlay.opaque"), name("y")),
        (name("user.note"), name("tarn")),
    ];
    let index = LayerIndex::new(
        vec![root, fa, fb, l, wh, d],
        chunks,
        blob.len() as u64,
        None,
    )
    .expect("a consistent index");
    (index, blob, a, b)
}

struct Mounted {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
    blob: Arc<FakeBlob>,
    _handle: tarn_fs::fuse::MountHandle,
    _rt: tokio::runtime::Runtime,
}

fn mount_layer(tamper: bool) -> (Mounted, Vec<u8>, Vec<u8>) {
    let (index, data, a, b) = index_and_blob(tamper);
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let cache = Arc::new(Cache::open(&dir.path().join("cache")).unwrap());
    let blob = FakeBlob::instant(data);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let layer = Arc::new(Layer::new(
        index,
        Fetcher::new(blob.clone(), Arc::new(Plain), cache),
    ));
    let handle = mount(layer, &mnt, rt.handle().clone(), &MountOptions::default()).unwrap();
    (
        Mounted {
            _dir: dir,
            mnt,
            blob,
            _handle: handle,
            _rt: rt,
        },
        a,
        b,
    )
}

fn getxattr(path: &Path, attr: &str) -> std::io::Result<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = CString::new(attr).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: both strings are NUL-terminated; buf is valid for its length.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    // A negative length is the error return.
    let Ok(len) = usize::try_from(r) else {
        return Err(std::io::Error::last_os_error());
    };
    buf.truncate(len);
    Ok(buf)
}

#[test]
fn the_kernel_sees_the_index() {
    let (m, a, b) = mount_layer(false);
    let mnt = &m.mnt;

    let mut names: Vec<_> = std::fs::read_dir(mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b", "d", "l", "wh"]);

    assert_eq!(std::fs::read(mnt.join("a")).unwrap(), a);
    assert_eq!(std::fs::read(mnt.join("b")).unwrap(), b);
    let reads = m.blob.read_count();
    assert_eq!(std::fs::read(mnt.join("l")).unwrap(), a, "symlink followed");
    assert_eq!(std::fs::read_link(mnt.join("l")).unwrap(), Path::new("a"));
    assert_eq!(
        m.blob.read_count(),
        reads,
        "second read of a: page cache or chunk cache"
    );

    let md = std::fs::metadata(mnt.join("a")).unwrap();
    assert_eq!(
        (md.mode() & 0o7777, md.uid(), md.gid(), md.mtime()),
        (0o4755, 1000, 2000, 1_600_000_000)
    );
    let wh = std::fs::symlink_metadata(mnt.join("wh")).unwrap();
    assert_eq!((wh.mode() & libc::S_IFMT, wh.rdev()), (libc::S_IFCHR, 0));

    assert_eq!(getxattr(&mnt.join("d"), "user.note").unwrap(), b"tarn");
    assert_eq!(
        getxattr(&mnt.join("d"), "trusted.overlay.opaque").unwrap(),
        b"y"
    );
    assert_eq!(
        getxattr(&mnt.join("a"), "user.none")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENODATA)
    );

    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("b"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert!(
        std::fs::metadata(mnt.join("d"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
            == 0o755
    );
}

#[test]
fn a_tampered_chunk_is_eio_and_other_files_still_read() {
    let (m, a, b) = mount_layer(true);
    let mut f = std::fs::File::open(m.mnt.join("a")).unwrap();
    let mut head = vec![0u8; 4096];
    std::io::Read::read_exact(&mut f, &mut head).unwrap();
    assert_eq!(head, a[..4096], "the untampered first chunk reads fine");
    let err = std::fs::read(m.mnt.join("a")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_eq!(std::fs::read(m.mnt.join("b")).unwrap(), b);
}

/// Unmounts an overlay even when the test fails.
struct Overlay(PathBuf);

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn overlayfs_honours_whiteouts_and_opaque_dirs_from_the_mount() {
    let (m, _a, b) = mount_layer(false);
    let below = m._dir.path().join("below");
    std::fs::create_dir_all(below.join("d")).unwrap();
    std::fs::write(below.join("wh"), b"deleted above").unwrap();
    std::fs::write(below.join("d/old"), b"hidden by opaque").unwrap();
    std::fs::write(below.join("kept"), b"kept").unwrap();
    let merged = m._dir.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let opts = format!("lowerdir={}:{}", m.mnt.display(), below.display());
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged)
        .status()
        .unwrap();
    assert!(st.success(), "overlay mount failed");
    let _guard = Overlay(merged.clone());

    assert!(!merged.join("wh").exists(), "whiteout hides the lower file");
    assert!(
        !merged.join("d/old").exists(),
        "opaque dir hides the lower dir's content"
    );
    assert_eq!(std::fs::read(merged.join("kept")).unwrap(), b"kept");
    assert_eq!(std::fs::read(merged.join("b")).unwrap(), b);
}

/// Cached sequential read of a large file through tarn against the same
/// bytes from a local file, both warm in memory: the FUSE path's cost.
/// Prints the figures; not a timed assertion.
#[test]
fn cached_sequential_read_throughput_against_local_disk() {
    const SIZE: usize = 256 << 20;
    const CHUNK: usize = 4 << 20;
    let data: Vec<u8> = (0u32..)
        .take(SIZE)
        .map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()[3])
        .collect();
    let chunks: Vec<Chunk> = data
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| Chunk {
            file_offset: (i * CHUNK) as u64,
            size: c.len() as u64,
            digest: Digest::of(c),
            blob_range: ((i * CHUNK) as u64, (i * CHUNK + c.len()) as u64),
            inner_offset: 0,
        })
        .collect();
    let mut root = node(FileKind::Dir, 0o755, ROOT_INO);
    root.children = vec![(name("big"), 2)];
    let mut big = node(FileKind::Reg, 0o644, ROOT_INO);
    big.size = SIZE as u64;
    big.chunks = 0..u32::try_from(chunks.len()).expect("64 chunks");
    let index =
        LayerIndex::new(vec![root, big], chunks, SIZE as u64, None).expect("a consistent index");

    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local");
    std::fs::write(&local, &data).unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let blob = FakeBlob::instant(data);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cache = Arc::new(Cache::open(&dir.path().join("cache")).unwrap());

    // Compares as it reads (memcmp costs far less than the read itself).
    let read_all = |p: &Path, want: &[u8]| {
        let t = std::time::Instant::now();
        let mut f = std::fs::File::open(p).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            let n = std::io::Read::read(&mut f, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            assert!(
                buf[..n] == want[total..total + n],
                "content differs at {total}"
            );
            total += n;
        }
        assert_eq!(total, SIZE);
        t.elapsed()
    };

    // First mount: fetch everything into the chunk cache.
    let layer = Arc::new(Layer::new(
        index.clone(),
        Fetcher::new(blob.clone(), Arc::new(Plain), cache.clone()),
    ));
    let h = mount(layer, &mnt, rt.handle().clone(), &MountOptions::default()).unwrap();
    let cold = read_all(&mnt.join("big"), blob.data().unwrap());
    h.unmount().unwrap();
    let fetched = blob.read_count();

    // Fresh mounts over the same cache: nothing in the kernel's page cache
    // for a new mount, every read goes through FUSE to the chunk cache. The
    // machine is shared, so the best of three runs of each is compared.
    let mut warm = std::time::Duration::MAX;
    let mut disk = std::time::Duration::MAX;
    for _ in 0..3 {
        let layer = Arc::new(Layer::new(
            index.clone(),
            Fetcher::new(blob.clone(), Arc::new(Plain), cache.clone()),
        ));
        let h = mount(layer, &mnt, rt.handle().clone(), &MountOptions::default()).unwrap();
        warm = warm.min(read_all(&mnt.join("big"), blob.data().unwrap()));
        h.unmount().unwrap();
        disk = disk.min(read_all(&local, blob.data().unwrap()));
    }
    assert_eq!(blob.read_count(), fetched, "a cached layer fetches nothing");

    let mbps = |d: std::time::Duration| SIZE as f64 / d.as_secs_f64() / 1e6;
    eprintln!(
        "throughput: 256 MiB sequential (1 MiB reads, best of 3): tarn first read {:.0} MB/s, \
         tarn cached {:.0} MB/s, local file {:.0} MB/s, cached/local ratio {:.2}",
        mbps(cold),
        mbps(warm),
        mbps(disk),
        disk.as_secs_f64() / warm.as_secs_f64()
    );
}

/// tarn's writer -> Layer::open -> FUSE: the mount equals the input tar.
#[test]
fn an_estargz_from_the_writer_mounts_equal_to_its_tar() {
    use tarn_fs::format::estargz::{WriteOptions, write_estargz};
    let tar = support::tree::sample_tar(64 << 10);
    let mut blob = Vec::new();
    let opts = WriteOptions {
        chunk_size: 64 << 10,
        ..WriteOptions::default()
    };
    let res = write_estargz(&tar[..], &mut blob, &opts).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let cache = Arc::new(Cache::open(&dir.path().join("cache")).unwrap());
    let src = FakeBlob::instant(blob);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let layer = rt
        .block_on(Layer::open(src, Some(res.toc_digest), cache))
        .unwrap();
    let _h = mount(
        Arc::new(layer),
        &mnt,
        rt.handle().clone(),
        &MountOptions::default(),
    )
    .unwrap();
    let n = support::tree::assert_tree_matches_tar(&mnt, &tar);
    assert!(n > 25, "checked {n} paths");
}
