//! Read-ahead that knows about files: a program's libraries, the image's
//! entrypoint across layers. Layers are
//! built from paths over a fake blob that records its reads.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::cache::Cache;
use crate::fetch::{FetchScheduler, SchedulerConfig};
use crate::format::{FileKind, InodeSpec};
use crate::testing::{FakeBlob, Plain, chunks_of, pattern, wait_until};

const CHUNK: usize = 1000;

/// What a test layer holds, in blob order.
enum Entry<'a> {
    File(&'a str, Vec<u8>),
    Link(&'a str, &'a str),
}

struct TestLayer {
    _dir: tempfile::TempDir,
    blob: Arc<FakeBlob>,
    layer: Arc<Layer>,
    /// Each file's blob range and inode, by path.
    files: Vec<(String, Range<u64>, u64)>,
}

impl TestLayer {
    fn file(&self, path: &str) -> (Range<u64>, u64) {
        let (_, r, ino) = self.files.iter().find(|(p, ..)| p == path).unwrap();
        (r.clone(), *ino)
    }

    /// Whether every chunk of `path` was read with `Intent::Prefetch`.
    fn prefetched(&self, path: &str) -> bool {
        let (range, _) = self.file(path);
        let reads = self.blob.reads();
        range.step_by(CHUNK).all(|o| {
            reads
                .iter()
                .any(|(g, i)| *i == Intent::Prefetch && g.contains(&o))
        })
    }

    /// Whether any chunk of `path` was fetched into the cache (bytes in
    /// the gap of a merged GET do not count).
    fn cached(&self, path: &str) -> bool {
        let (_, ino) = self.file(path);
        let inode = self.layer.inode(ino).unwrap();
        let index = self.layer.index();
        index
            .file_chunks(&inode)
            .iter()
            .any(|c| self.layer.cache().contains(&c.digest))
    }

    /// Waits until every chunk of `paths` was read as a prefetch and some
    /// is cached: their GETs have landed, so what was not fetched with them
    /// will not be.
    async fn wait_prefetched(&self, paths: &[&str]) {
        wait_until(&format!("{paths:?} prefetched"), || {
            paths.iter().all(|p| self.prefetched(p) && self.cached(p))
        })
        .await;
    }
}

/// File contents unlike any other's: identical chunks are fetched once.
fn content(len: usize, seed: u8) -> Vec<u8> {
    pattern(len).iter().map(|b| b ^ seed).collect()
}

fn layer_of(entries: Vec<Entry>, config: SchedulerConfig) -> TestLayer {
    let mut nodes = vec![InodeSpec::new(FileKind::Dir)];
    let (mut blob, mut chunks, mut files) = (Vec::new(), Vec::new(), Vec::new());
    for e in entries {
        let (path, mut node) = match e {
            Entry::File(path, data) => {
                let first = u32::try_from(chunks.len()).unwrap();
                for mut c in chunks_of(&data, CHUNK) {
                    let at = blob.len() as u64;
                    c.blob_range = (c.blob_range.0 + at, c.blob_range.1 + at);
                    chunks.push(c);
                }
                let range = blob.len() as u64..(blob.len() + data.len()) as u64;
                files.push((path.to_owned(), range, 0));
                blob.extend_from_slice(&data);
                let end = u32::try_from(chunks.len()).unwrap();
                let n = tests::inode(FileKind::Reg, data.len() as u64, first..end);
                (path, n)
            }
            Entry::Link(path, target) => (
                path,
                InodeSpec {
                    link_target: Box::from(target.as_bytes()),
                    ..InodeSpec::new(FileKind::Symlink)
                },
            ),
        };
        // Its directories, made as needed.
        let (dirs, name) = path
            .trim_start_matches('/')
            .rsplit_once('/')
            .unwrap_or(("", path));
        let mut parent = 1u64;
        for d in dirs.split('/').filter(|d| !d.is_empty()) {
            let found = nodes[crate::num::usize_from(parent) - 1]
                .children
                .iter()
                .find(|(n, _)| &n[..] == d.as_bytes())
                .map(|(_, i)| *i);
            parent = found.unwrap_or_else(|| {
                let ino = nodes.len() as u64 + 1;
                nodes.push(InodeSpec {
                    parent,
                    ..InodeSpec::new(FileKind::Dir)
                });
                nodes[crate::num::usize_from(parent) - 1]
                    .children
                    .push((Box::from(d.as_bytes()), ino));
                ino
            });
        }
        node.parent = parent;
        let ino = nodes.len() as u64 + 1;
        if node.kind == FileKind::Reg
            && let Some(f) = files.last_mut()
        {
            f.2 = ino;
        }
        nodes.push(node);
        nodes[crate::num::usize_from(parent) - 1]
            .children
            .push((Box::from(name.as_bytes()), ino));
    }
    let index = LayerIndex::new(nodes, chunks, blob.len() as u64, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(Cache::open(dir.path()).unwrap());
    let fake = FakeBlob::with_delay(blob, Duration::from_millis(5));
    let fetcher = Fetcher::with_scheduler(
        fake.clone(),
        Arc::new(Plain),
        cache,
        FetchScheduler::new(config),
    );
    TestLayer {
        _dir: dir,
        blob: fake,
        layer: Arc::new(Layer::new(index, fetcher)),
        files,
    }
}

/// A layer of `files` (path, contents), in that order, with
/// [`tiny_window`].
fn layer_of_files(files: &[(String, Vec<u8>)]) -> TestLayer {
    layer_of(
        files
            .iter()
            .map(|(p, d)| Entry::File(p, d.clone()))
            .collect(),
        tiny_window(),
    )
}

/// A one-byte base window (nothing comes along with a miss but its own
/// file) and a whole-file limit of 1 MiB.
fn tiny_window() -> SchedulerConfig {
    SchedulerConfig {
        read_ahead: 1,
        read_ahead_max: 1 << 20,
        ..SchedulerConfig::default()
    }
}

/// A program's libraries in the same layer come with the miss that shows
/// its dynamic section, as prefetches, through links; others stay put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_programs_libraries_are_prefetched_once_it_is_read() {
    let prog = hints::elf::tiny_program(&["libm.so.6", "libc.so.6"], 3000);
    let t = layer_of(
        vec![
            Entry::File("/lib/x86_64-linux-gnu/libc-2.36.so", content(2500, 1)),
            Entry::Link("/lib/x86_64-linux-gnu/libc.so.6", "libc-2.36.so"),
            Entry::File("/lib/x86_64-linux-gnu/libm.so.6", content(1500, 2)),
            Entry::File("/lib/x86_64-linux-gnu/unused.so", content(1200, 3)),
            Entry::File("/lib64/ld-linux-x86-64.so.2", content(900, 4)),
            Entry::File("/bin/prog", prog.clone()),
        ],
        tiny_window(),
    );
    let (_, ino) = t.file("/bin/prog");
    assert_eq!(t.layer.read(ino, 0, 64).await.unwrap(), &prog[..64]);
    t.wait_prefetched(&[
        "/lib/x86_64-linux-gnu/libc-2.36.so",
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/lib64/ld-linux-x86-64.so.2",
    ])
    .await;
    assert!(
        !t.cached("/lib/x86_64-linux-gnu/unused.so"),
        "{:?}",
        t.blob.reads()
    );
    // Read now, the libraries are cache hits: no more GETs.
    let before = t.blob.reads().len();
    let (_, libm) = t.file("/lib/x86_64-linux-gnu/libm.so.6");
    assert_eq!(t.layer.read(libm, 0, 1500).await.unwrap(), content(1500, 2));
    assert_eq!(t.blob.reads().len(), before);
}

/// A compiled Python module that misses brings the modules its top-level
/// code imports (relative, absolute, a package's `__init__`, an extension
/// module), and theirs as they arrive, as prefetches, before the
/// interpreter asks; a module imported only inside a function, and the
/// package's other modules, stay put.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_modules_imports_are_prefetched_and_theirs_as_they_arrive() {
    const LIB: &str = "/usr/lib/python3.11";
    let init = include_bytes!("hints/testdata/json_init.cpython-311.pyc").to_vec();
    let decoder = include_bytes!("hints/testdata/json_decoder.cpython-311.pyc").to_vec();
    let path = |p: &str| format!("{LIB}/{p}");
    let files = [
        (
            path("json/__pycache__/__init__.cpython-311.pyc"),
            init.clone(),
        ),
        (path("json/__pycache__/decoder.cpython-311.pyc"), decoder),
        (
            path("json/__pycache__/scanner.cpython-311.pyc"),
            content(700, 1),
        ),
        (
            path("json/__pycache__/tool.cpython-311.pyc"),
            content(700, 2),
        ),
        (
            path("re/__pycache__/__init__.cpython-311.pyc"),
            content(900, 3),
        ),
        (
            path("__pycache__/not_at_start.cpython-311.pyc"),
            content(800, 4),
        ),
        (
            path("lib-dynload/_json.cpython-311-x86_64-linux-gnu.so"),
            content(1500, 5),
        ),
        (
            path("lib-dynload/_jsonx.cpython-311-x86_64-linux-gnu.so"),
            content(600, 6),
        ),
    ];
    let t = layer_of_files(&files);
    let (_, ino) = t.file(&files[0].0);
    assert_eq!(t.layer.read(ino, 0, 64).await.unwrap(), &init[..64]);
    // json's decoder and re come for json; the decoder's scanner and _json
    // for the decoder, once it has arrived.
    t.wait_prefetched(&[&files[1].0, &files[4].0, &files[2].0, &files[6].0])
        .await;
    for unused in [&files[3].0, &files[5].0, &files[7].0] {
        assert!(!t.cached(unused), "{unused}: {:?}", t.blob.reads());
    }
    let import = t.layer.hint_stats().get(Hint::Import);
    assert!(import.fetched > 0, "{import:?}");
    // Read now, the decoder is a cache hit, counted as the hint's use.
    let before = t.blob.reads().len();
    let (_, dec) = t.file(&files[1].0);
    t.layer.read(dec, 0, 100).await.unwrap();
    assert_eq!(t.blob.reads().len(), before);
    assert!(t.layer.hint_stats().get(Hint::Import).used > 0);
}

/// A Python interpreter's command line brings, before it reads any, the
/// modules it will import first (`encodings` and what that brings, what
/// its `-c` code imports), then theirs as they arrive: from the standard
/// library of the version its program's name gives, and nothing else. The
/// command line is a real process's, read from `/proc`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_command_line_brings_its_first_imports_before_they_are_read() {
    use std::os::unix::process::CommandExt;
    let lib = |p: &str| format!("/usr/lib/python3.11/{p}");
    let files = [
        (
            lib("encodings/__pycache__/__init__.cpython-311.pyc"),
            include_bytes!("hints/testdata/encodings_init.cpython-311.pyc").to_vec(),
        ),
        (
            lib("encodings/__pycache__/utf_8.cpython-311.pyc"),
            content(600, 1),
        ),
        (
            lib("json/__pycache__/__init__.cpython-311.pyc"),
            include_bytes!("hints/testdata/json_init.cpython-311.pyc").to_vec(),
        ),
        (
            lib("json/__pycache__/decoder.cpython-311.pyc"),
            include_bytes!("hints/testdata/json_decoder.cpython-311.pyc").to_vec(),
        ),
        (
            lib("__pycache__/unrelated.cpython-311.pyc"),
            content(700, 2),
        ),
        (
            "/usr/lib/python3.12/encodings/__pycache__/__init__.cpython-312.pyc".to_owned(),
            content(800, 3),
        ),
    ];
    let t = layer_of_files(&files);
    // A shell named python3.11 that waits on its input: its command line
    // is what a Python interpreter's would be.
    let mut python = std::process::Command::new("/bin/sh")
        .arg0("python3.11")
        .args(["-c", "read line\nimport json"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Its arguments are in place a moment after the exec returns.
    let cmdline = format!("/proc/{}/cmdline", python.id());
    wait_until("the shell's arguments", || {
        std::fs::read(&cmdline).is_ok_and(|c| c.starts_with(b"python3.11\0"))
    })
    .await;
    t.layer.prefetch_command(python.id());
    t.wait_prefetched(&[&files[0].0, &files[1].0, &files[2].0, &files[3].0])
        .await;
    drop(python.stdin.take());
    python.wait().unwrap();
    for unused in [&files[4].0, &files[5].0] {
        assert!(!t.cached(unused), "{unused}: {:?}", t.blob.reads());
    }
    assert!(t.layer.hint_stats().get(Hint::Import).fetched > 0);
}

/// The entrypoint is found across layers (a script in the upper one, the
/// link to its interpreter there too, the shell in the lower one) and
/// fetched with its interpreter; nothing else is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_entrypoint_and_its_interpreter_are_fetched_across_layers() {
    let lower = layer_of(
        vec![
            Entry::File("/bin/busybox", content(2500, 5)),
            Entry::File("/bin/other", content(1500, 6)),
        ],
        tiny_window(),
    );
    let upper = layer_of(
        vec![
            Entry::Link("/bin/sh", "busybox"),
            Entry::File("/app/run.sh", b"#!/bin/sh\necho hi\n".to_vec()),
        ],
        tiny_window(),
    );
    let layers = [lower.layer.clone(), upper.layer.clone()];
    let entry =
        Entrypoint::from_config(br#"{"config":{"Cmd":["run.sh"],"Env":["PATH=/usr/bin:/app"]}}"#)
            .unwrap();
    let fetched = prefetch_entrypoint(&layers, &entry).await;
    assert_eq!(
        fetched,
        vec!["/app/run.sh".to_owned(), "/bin/sh".to_owned()]
    );
    assert!(upper.prefetched("/app/run.sh"));
    assert!(lower.prefetched("/bin/busybox"), "{:?}", lower.blob.reads());
    assert!(!lower.cached("/bin/other"));

    let none = Entrypoint::from_config(br#"{"config":{"Cmd":["/nowhere"]}}"#).unwrap();
    assert!(prefetch_entrypoint(&layers, &none).await.is_empty());
}

/// A recording lists the files a workload opened or read, by path, in the
/// order it first touched them, with the ranges read through FUSE; a
/// second session started later sees only what came after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_lists_files_in_first_access_order() {
    let t = layer_of(
        vec![
            Entry::File("/usr/bin/python3", content(2500, 1)),
            Entry::File("/usr/lib/os.py", content(1200, 2)),
            Entry::File("/app/run.sh", content(300, 3)),
            Entry::File("/app/unused", content(300, 4)),
        ],
        tiny_window(),
    );
    let rec = t.layer.recorder();
    let (_, run) = t.file("/app/run.sh");
    let (_, py) = t.file("/usr/bin/python3");
    let (_, os) = t.file("/usr/lib/os.py");
    rec.open(run); // before any session: not recorded
    t.layer.start_recording(7).unwrap();
    rec.open(run);
    rec.read(run, 0, 300);
    rec.open(py);
    rec.read(py, 2000, 500);
    rec.read(py, 0, 1000);
    t.layer.start_recording(8).unwrap();
    rec.read(os, 100, 50);
    rec.read(run, 0, 300);
    let got = t.layer.stop_recording(7).unwrap();
    let paths: Vec<&str> = got.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["app/run.sh", "usr/bin/python3", "usr/lib/os.py"]);
    assert_eq!(got[1].ranges, vec![(0, 1000), (2000, 2500)]);
    assert!(got.windows(2).all(|w| w[0].first <= w[1].first));
    assert!(rec.running(), "session 8 still runs");
    let later = t.layer.stop_recording(8).unwrap();
    let paths: Vec<&str> = later.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["usr/lib/os.py", "app/run.sh"]);
    assert!(!rec.running());
    assert!(t.layer.stop_recording(8).is_none());
}
