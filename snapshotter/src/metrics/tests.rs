use std::path::PathBuf;
use std::time::Duration;

use tarn_fs::Digest;
use tarn_fs::fetch::FetchStatsSnapshot;
use tarn_fs::latency::Latency;

use super::*;
use crate::fallback::Cause;
use crate::layers::LayerStatus;

fn layer(digest: Digest, failed: bool) -> LayerStatus {
    LayerStatus {
        image_ref: "r/i:t".into(),
        digest,
        mountpoint: PathBuf::from("/x"),
        blob_size: 1000,
        stats: FetchStatsSnapshot {
            bytes_fetched: 300,
            requests: 3,
            bytes_by_intent: [0, 0, 100, 200],
            requests_by_intent: [0, 0, 2, 1],
            bytes_served: 42,
            ..Default::default()
        },
        complete: false,
        failed: failed.then(|| "gone".to_owned()),
        service: None,
    }
}

#[test]
fn figures_read_at_scrape_time_come_out_as_prometheus_text() {
    let metrics = Metrics::new();
    let (good, bad) = (Digest::of(b"good"), Digest::of(b"bad"));
    metrics.register_collector(Snapshotter(move || SnapshotterFigures {
        layers: vec![layer(good, false), layer(bad, true)],
        fallbacks: Cause::ALL.iter().map(|&c| (c, 0)).collect(),
        snapshots: 7,
        disk_blobs: vec![("verified", 2), ("failed", 1)],
        disk_hints: tarn_fs::fetch::HintCounts::default(),
        cache: tarn_fs::cache::CacheStats {
            evictions: 3,
            evicted_bytes: 4096,
            ..Default::default()
        },
    }));
    metrics.takeovers().inc();
    let text = metrics.encode().expect("encodes");
    for line in [
        "# TYPE tarn_takeovers_total counter",
        "tarn_takeovers_total 1",
        "# TYPE tarn_disk_blobs gauge",
        "tarn_disk_blobs{check=\"failed\"} 1",
        "tarn_mounted_layers 1",
        "tarn_failed_layers 1",
        "tarn_snapshots 7",
        "tarn_cache_evictions_total 3",
        "tarn_cache_evicted_bytes_total 4096",
        "tarn_fallbacks_total{cause=\"no-toc-digest\"} 0",
        "# TYPE tarn_layer_fetched_bytes_total counter",
        &format!("tarn_layer_fetched_bytes_total{{layer=\"{good}\",intent=\"open\"}} 200"),
        &format!("tarn_layer_requests_total{{layer=\"{good}\",intent=\"on-demand\"}} 2"),
        &format!("tarn_layer_served_bytes_total{{layer=\"{good}\"}} 42"),
        &format!("tarn_layer_blob_size_bytes{{layer=\"{good}\"}} 1000"),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "{line:?} missing from\n{text}"
        );
    }
    assert!(
        !text.contains(&bad.to_string()),
        "a failed layer has no counters"
    );
}

#[test]
fn histogram_buckets_are_cumulative_seconds() {
    let h = Latency::default();
    h.record(Duration::from_micros(40));
    h.record(Duration::from_millis(3));
    h.record(Duration::from_secs(30));
    let mut out = String::new();
    {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(OneHistogram(h.snapshot())));
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
    }
    for line in [
        "t_seconds_bucket{le=\"5e-05\"} 1",
        "t_seconds_bucket{le=\"0.0025\"} 1",
        "t_seconds_bucket{le=\"0.005\"} 2",
        "t_seconds_bucket{le=\"10\"} 2",
        "t_seconds_bucket{le=\"+Inf\"} 3",
        "t_seconds_count 3",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "{line:?} missing from\n{out}"
        );
    }
}

#[derive(Debug)]
struct OneHistogram(tarn_fs::latency::LatencySnapshot);

impl prometheus_client::collector::Collector for OneHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> std::fmt::Result {
        collect::emit_histogram(&mut encoder, "t_seconds", "t", &self.0)
    }
}
