//! Background fetch against a far registry: a ~100 MB eStargz layer of
//! random data in the real `docker-registry`, behind `tarn-farproxy` at RTT
//! 200 ms and 100 Mbit/s, fetched whole by `Layer::start_background`.
//!
//! Asserts functional results only (complete, every byte fetched once);
//! prints the time against blob size / link rate with `--nocapture`.
//! `TARN_BG_SWEEP=1,4,8,16` runs one fetch per background concurrency.
//! `TARN_BG_MB` sets the layer size in MB (default 100).
//!
//! Also: the cost of read-ahead for a small read, and its gain for reads
//! of files in blob order, over the same far link.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::proc::blob_gets;
use support::tree::pseudo_random;
use tarn_fs::cache::Cache;
use tarn_fs::fetch::{FetchScheduler, SchedulerConfig};
use tarn_fs::format::estargz::{WriteOptions, write_estargz};
use tarn_fs::layer::{BackgroundOutcome, Layer};
use tarn_fs::registry::{BlobSource, RegistryClient, RegistryConfig, RemoteBlob, Repository};
use tarn_integration::registry::TestRegistry;
use tarn_integration::wait::wait_until;

const RTT_MS: u64 = 200;
const RATE_MBIT: f64 = 100.0;

/// The far-registry emulator, killed (by PID) when dropped.
struct FarProxy {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl FarProxy {
    fn start(upstream: &str) -> FarProxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr_file: PathBuf = dir.path().join("addr");
        let child = Command::new(env!("CARGO_BIN_EXE_tarn-farproxy"))
            .args(["--upstream", upstream, "--listen", "127.0.0.1:0"])
            .args(["--rtt-ms", &RTT_MS.to_string()])
            .args(["--rate-mbit", &RATE_MBIT.to_string()])
            .arg("--addr-file")
            .arg(&addr_file)
            .spawn()
            .expect("starting tarn-farproxy");
        let mut proxy = FarProxy {
            child,
            addr: String::new(),
            _dir: dir,
        };
        proxy.addr = wait_until("tarn-farproxy to listen", Duration::from_secs(10), || {
            let addr = std::fs::read_to_string(&addr_file).unwrap_or_default();
            let addr = addr.trim();
            (!addr.is_empty()).then(|| addr.to_owned())
        })
        .expect("tarn-farproxy started");
        proxy
    }
}

impl Drop for FarProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An eStargz blob of `mb` MB of incompressible files (4 MiB each).
fn random_layer(mb: usize) -> Vec<u8> {
    files_layer(4 << 20, (mb << 20).div_ceil(4 << 20))
}

/// An eStargz blob of `count` incompressible files `data/fNNN` of `file`
/// bytes each.
fn files_layer(file: usize, count: usize) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for i in 0..count {
        let data = pseudo_random(file, i as u64 + 1);
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, format!("data/f{i:03}"), &data[..])
            .expect("tar entry");
    }
    let tar = tar.into_inner().expect("tar");
    let mut blob = Vec::new();
    let opts = WriteOptions {
        chunk_size: 1 << 20,
        level: 1,
        ..WriteOptions::default()
    };
    write_estargz(&tar[..], &mut blob, &opts).expect("writer");
    blob
}

fn remote(addr: &str, digest: tarn_fs::Digest, size: usize) -> Arc<dyn BlobSource> {
    Arc::new(RemoteBlob::new(
        RegistryClient::new(RegistryConfig::default()).expect("client"),
        Repository {
            registry: addr.to_string(),
            name: "bg/layer".into(),
        },
        digest,
        size as u64,
    ))
}

/// The layer's GET count once it stops changing. Read-behind GETs start
/// after the read that caused them returns, and a GET counts once its
/// response begins (a round trip later): wait longer than that.
async fn settled_requests(layer: &Layer) -> u64 {
    let mut last = layer.stats().requests;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(3 * RTT_MS)).await;
        let now = layer.stats().requests;
        if now == last {
            break;
        }
        last = now;
    }
    last
}

#[test]
fn read_ahead_costs_a_small_read_little_and_saves_round_trips() {
    const FILE: usize = 16 << 10;
    let reg = TestRegistry::start().expect("registry");
    let blob = files_layer(FILE, 400);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let digest = rt.block_on(reg.push_blob("bg/layer", &blob)).expect("push");
    let proxy = FarProxy::start(&reg.host());
    let originals: Vec<Vec<u8>> = (0..400).map(|i| pseudo_random(FILE, i + 1)).collect();

    for read_ahead in [0, SchedulerConfig::default().read_ahead] {
        let cache_dir = tempfile::tempdir().expect("cache dir");
        let cache = Arc::new(Cache::open(cache_dir.path()).expect("cache"));
        let scheduler = FetchScheduler::new(SchedulerConfig {
            read_ahead,
            ..SchedulerConfig::default()
        });
        let (small, seq, requests) = rt.block_on(async {
            let layer = Arc::new(
                Layer::open_with(
                    remote(&proxy.addr, digest, blob.len()),
                    None,
                    cache,
                    scheduler,
                )
                .await
                .expect("open"),
            );
            let ino = |i: usize| {
                layer
                    .index()
                    .resolve(&format!("data/f{i:03}"))
                    .expect("file in layer")
            };
            // Small reads of files far apart: each is a miss.
            let mut small = Vec::new();
            for i in [10, 150, 300] {
                let t = Instant::now();
                let got = layer.read(ino(i), 0, 4096).await.expect("read");
                small.push(t.elapsed().as_secs_f64() * 1000.0);
                assert_eq!(got, &originals[i][..4096]);
            }
            let before = settled_requests(&layer).await;
            // Then 10 whole files in blob order, as a workload reading a
            // directory would.
            let t = Instant::now();
            for (i, want) in originals.iter().enumerate().take(110).skip(100) {
                let got = layer.read(ino(i), 0, FILE as u64).await.expect("read");
                assert_eq!(&got, want);
            }
            let seq = t.elapsed().as_secs_f64() * 1000.0;
            (small, seq, settled_requests(&layer).await - before)
        });
        if read_ahead > 0 {
            assert_eq!(
                requests, 2,
                "the first file's GET is its own (a walk starts); the second's continues it and brings the next eight"
            );
        } else {
            assert_eq!(requests, 10);
        }
        println!(
            "read-ahead {} KiB at RTT {RTT_MS} ms, {RATE_MBIT} Mbit/s: small 4 KiB misses \
             {:.0} / {:.0} / {:.0} ms; 10 files of 16 KiB in blob order {seq:.0} ms in {requests} GETs",
            read_ahead >> 10,
            small[0],
            small[1],
            small[2]
        );
    }
}

#[test]
fn background_fetch_fills_a_far_link() {
    let mb: usize = std::env::var("TARN_BG_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let sweep: Vec<usize> = std::env::var("TARN_BG_SWEEP")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![SchedulerConfig::default().background_concurrency]);

    let reg = TestRegistry::start().expect("registry");
    let blob = random_layer(mb);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let digest = rt.block_on(reg.push_blob("bg/layer", &blob)).expect("push");
    let proxy = FarProxy::start(&reg.host());
    let link_secs = blob.len() as f64 * 8.0 / (RATE_MBIT * 1e6);

    for concurrency in sweep {
        let cache_dir = tempfile::tempdir().expect("cache dir");
        let cache = Arc::new(Cache::open(cache_dir.path()).expect("cache"));
        let source = remote(&proxy.addr, digest, blob.len());
        let scheduler = FetchScheduler::new(SchedulerConfig {
            background_concurrency: concurrency,
            ..SchedulerConfig::default()
        });
        let log_before = blob_gets(&reg.log().expect("registry log"));
        let (layer, secs) = rt.block_on(async {
            let layer = Layer::open_with(source, None, cache, scheduler)
                .await
                .expect("open");
            let t = Instant::now();
            let outcome = layer.start_background().wait().await;
            assert!(
                matches!(outcome, BackgroundOutcome::Complete),
                "{outcome:?}"
            );
            (layer, t.elapsed().as_secs_f64())
        });
        let p = layer.progress();
        assert!(p.complete && p.cached_bytes == p.total_bytes, "{p:?}");
        let s = layer.stats();
        assert!(
            s.bytes_fetched <= blob.len() as u64,
            "no byte fetched twice: {} of {}",
            s.bytes_fetched,
            blob.len()
        );
        let log_after = blob_gets(&reg.log().expect("registry log"));
        assert_eq!(
            log_after.1 - log_before.1,
            s.bytes_fetched,
            "the registry served what the stats count"
        );
        println!(
            "background fetch of {:.1} MB at RTT {RTT_MS} ms, {RATE_MBIT} Mbit/s, {concurrency} GETs \
             of <= 4 MiB: {secs:.2} s vs {link_secs:.2} s link time = {:.0}% of the link; \
             {} requests",
            blob.len() as f64 / 1e6,
            100.0 * link_secs / secs,
            s.requests
        );
    }
}
