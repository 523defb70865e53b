//! The Prometheus endpoint (`metrics_address`) end to end: the real
//! registry and containerd of `scripts/testbed.sh`, a lazy pull and run of
//! `multi-esgz` (5 eStargz layers) through tarn, then a plain HTTP GET of
//! `/metrics` whose figures are checked against the registry's access log
//! and whose names against README.md.
//!
//! Needs the daemon built into `$TARN_BIN_DIR` and the test images of
//! `scripts/images.sh`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use tarn_integration::daemon::Daemon;
use tarn_integration::reglog::Request;
use tarn_integration::testbed::{Component, Testbed, repo_root};
use tarn_integration::wait::wait_until;

/// A bound for failure messages: the figures settle once the registry log
/// is quiet, well within this.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

const WORKLOAD_OUT: &str = "Copyright 2009 The Go Authors";

/// Fields drop in order: tarn first (unmounting its layers), then the bed.
struct Bed {
    tarn: Daemon,
    bed: Testbed,
    metrics: SocketAddr,
}

impl Bed {
    fn up() -> Bed {
        let bed = Testbed::up(&[Component::Registry, Component::Containerd]).expect("test bed up");
        let metrics = free_port();
        let config = format!(
            "metrics_address = \"{metrics}\"\n[registry]\nplain_http = [\"{}\"]\n",
            bed.registry().expect("registry")
        );
        let tarn = Daemon::start_with(Some(bed.dir().join("tarn.sock")), &config)
            .expect("start tarn-snapshotter");
        Bed { tarn, bed, metrics }
    }

    fn containerd(&self, program: &str, args: &[&str]) -> Output {
        let mut c = Command::new(program);
        c.arg("--address")
            .arg(self.bed.containerd_sock().expect("containerd"))
            .args(args);
        let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
        assert!(
            out.status.success(),
            "{c:?} failed: {}\ntarn log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.tarn.log()
        );
        out
    }

    fn registry_log(&self) -> Vec<Request> {
        self.bed.registry_log().expect("registry log")
    }

    fn scrape(&self) -> Scrape {
        let (status, body) = http_get(self.metrics, "/metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        Scrape::parse(&body)
    }
}

/// A loopback address nothing listens on now.
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local address")
}

/// A plain HTTP/1.1 GET, as any scraper sends it: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    assert!(
        status != 200 || head.contains("text/plain; version=0.0.4"),
        "Prometheus text format: {head}"
    );
    (status, body.to_owned())
}

/// One sample's labels and value.
type Sample = (BTreeMap<String, String>, f64);

/// A scrape: every sample by name and labels, and every declared family.
#[derive(Debug, Default)]
struct Scrape {
    samples: BTreeMap<String, Vec<Sample>>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut s = Scrape::default();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, kind) = t.split_once(' ').expect("TYPE name kind");
                s.types.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            // Our label values hold no quotes or commas (digests, names).
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').expect("label k=v");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            s.samples
                .entry(name.to_owned())
                .or_default()
                .push((labels, value));
        }
        s
    }

    /// The sum of `name`'s samples whose labels include every `(k, v)`.
    fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.samples
            .get(name)
            .into_iter()
            .flatten()
            .filter(|(labels, _)| {
                want.iter()
                    .all(|(k, v)| labels.get(*k).is_some_and(|l| l == v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// `name`'s sums by the value of label `by`.
    fn by(&self, name: &str, by: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (labels, v) in self.samples.get(name).into_iter().flatten() {
            if let Some(k) = labels.get(by) {
                *out.entry(k.clone()).or_insert(0.0) += v;
            }
        }
        out
    }
}

/// Layer digests of a cached test image.
fn image_layers(name: &str) -> Vec<String> {
    let out = Command::new(repo_root().join("scripts/images.sh"))
        .args(["path", name])
        .output()
        .expect("scripts/images.sh path");
    assert!(out.status.success(), "images.sh path {name}");
    let layout = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let json = |path: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(&path).expect("read layout")).expect("json")
    };
    let index = json(layout.join("index.json"));
    let digest = index["manifests"][0]["digest"].as_str().expect("digest");
    let manifest = json(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    );
    manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_owned())
        .collect()
}

/// Per layer digest: (bytes, GETs) the registry answered since `from`.
fn served_per_layer(log: &[Request], layers: &[String]) -> BTreeMap<String, (f64, f64)> {
    let mut out: BTreeMap<String, (f64, f64)> =
        layers.iter().map(|d| (d.clone(), (0.0, 0.0))).collect();
    for r in log.iter().filter(|r| r.is_blob_get()) {
        if let Some(d) = layers.iter().find(|d| r.path.ends_with(d.as_str())) {
            let e = out.get_mut(d).expect("every layer has an entry");
            e.0 += r.bytes as f64;
            e.1 += 1.0;
        }
    }
    out
}

/// The metric names README.md documents (`| \`tarn_...\` |` table rows),
/// and which of them it marks as not served yet.
fn documented_names() -> (BTreeSet<String>, BTreeSet<String>) {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let (mut served, mut reserved) = (BTreeSet::new(), BTreeSet::new());
    for line in readme.lines() {
        let Some(rest) = line.strip_prefix("| `tarn_") else {
            continue;
        };
        let name = format!("tarn_{}", rest.split('`').next().expect("a name"));
        if line.contains("not served yet") {
            reserved.insert(name);
        } else {
            served.insert(name);
        }
    }
    (served, reserved)
}

#[test]
fn metrics_match_the_registry_log_after_a_lazy_pull_and_run() {
    let b = Bed::up();
    // Served from the start, before any pull: nothing a scraper must wait for.
    let empty = b.scrape();
    assert_eq!(empty.sum("tarn_mounted_layers", &[]), 0.0);
    assert_eq!(http_get(b.metrics, "/").0, 404, "only /metrics is served");

    let image = b.bed.push_image("multi-esgz").expect("push image");
    let layers = image_layers("multi-esgz");
    let before = b.registry_log().len();
    b.containerd(
        "ctr-remote",
        &[
            "image",
            "rpull",
            "--plain-http",
            "--snapshotter",
            "tarn",
            &image,
        ],
    );
    let out = b.containerd(
        "ctr",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "tarn",
            &image,
            "metrics1",
            "/app/run.sh",
        ],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(WORKLOAD_OUT),
        "the workload ran"
    );

    // The daemon counts bytes as they arrive and the registry logs a GET
    // after its last byte: compare once both have settled (a prefetch may
    // still be finishing).
    let mut last = None;
    let settled = wait_until("metrics to match the registry log", SETTLE_TIMEOUT, || {
        let log = b.registry_log();
        let reg = served_per_layer(&log[before..], &layers);
        let m = b.scrape();
        let tarn: BTreeMap<String, (f64, f64)> = layers
            .iter()
            .map(|d| {
                let l = [("layer", d.as_str())];
                (
                    d.clone(),
                    (
                        m.sum("tarn_layer_fetched_bytes_total", &l),
                        m.sum("tarn_layer_requests_total", &l),
                    ),
                )
            })
            .collect();
        let same = reg == tarn;
        last = Some((reg, tarn, m));
        same.then_some(())
    });
    let (reg, tarn, m) = last.expect("scraped at least once");
    if let Err(e) = settled {
        panic!(
            "{e}\nper layer (bytes, GETs), registry log: {reg:#?}\nmetrics: {tarn:#?}\ntarn log:\n{}",
            b.tarn.log()
        );
    }
    let gets: f64 = reg.values().map(|(_, n)| n).sum();
    let fetched: f64 = reg.values().map(|(b, _)| b).sum();
    println!(
        "registry served {fetched} bytes in {gets} GETs of {} layers; metrics agree per layer",
        layers.len()
    );
    assert!(
        reg.values().all(|(b, n)| *b > 0.0 && *n > 0.0),
        "every layer was opened (its TOC fetched): {reg:?}"
    );

    // Every answered GET is timed once, under its intent.
    let timed: f64 = ["open", "on-demand", "prefetch", "background"]
        .iter()
        .map(|i| m.sum("tarn_fetch_duration_seconds_count", &[("intent", i)]))
        .sum();
    assert_eq!(timed, gets, "one latency sample per GET");
    assert!(
        m.sum("tarn_fetch_duration_seconds_count", &[("intent", "open")]) >= layers.len() as f64,
        "each layer's open is a GET of intent open"
    );
    assert!(m.sum("tarn_fetch_duration_seconds_sum", &[]) > 0.0);
    assert!(
        m.sum("tarn_registry_requests_total", &[]) >= gets,
        "the client counts every request it sent, blob GETs among them"
    );
    assert!(m.sum("tarn_registry_received_bytes_total", &[]) >= fetched);
    assert_eq!(
        m.sum("tarn_registry_errors_total", &[]),
        0.0,
        "{:?}",
        m.by("tarn_registry_errors_total", "cause")
    );
    assert_eq!(m.sum("tarn_registry_retries_total", &[]), 0.0);

    // The workload read files through the lazy layers.
    assert!(m.sum("tarn_layer_served_bytes_total", &[]) > 0.0);
    for op in ["lookup", "getattr", "open", "read"] {
        assert!(
            m.sum("tarn_fuse_operation_duration_seconds_count", &[("op", op)]) > 0.0,
            "FUSE {op} counted: {:?}",
            m.by("tarn_fuse_operation_duration_seconds_count", "op")
        );
    }
    assert_eq!(m.sum("tarn_mounted_layers", &[]), layers.len() as f64);
    assert_eq!(m.sum("tarn_failed_layers", &[]), 0.0);
    assert_eq!(
        m.sum("tarn_fallbacks_total", &[]),
        0.0,
        "every layer was lazy: {:?}",
        m.by("tarn_fallbacks_total", "cause")
    );
    assert_eq!(
        m.by("tarn_fallbacks_total", "cause").len(),
        tarn_snapshotter::fallback::Cause::ALL.len(),
        "every cause has its series from the start"
    );
    assert!(m.sum("tarn_cache_bytes", &[]) > 0.0);
    assert!(m.sum("tarn_cache_entries", &[]) > 0.0);
    assert!(m.sum("tarn_snapshots", &[]) >= layers.len() as f64);

    // README documents every family served, and every one it documents as
    // served is there.
    let (documented, reserved) = documented_names();
    let served: BTreeSet<String> = m.types.keys().cloned().collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in README: {undocumented:?}"
    );
    let missing: Vec<_> = documented.difference(&served).collect();
    assert!(missing.is_empty(), "in README but not served: {missing:?}");
    assert!(
        reserved.is_disjoint(&served),
        "README says {reserved:?} are not served yet"
    );
}
