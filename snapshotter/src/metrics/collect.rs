//! The figures tarn keeps anyway, read at each scrape and written as
//! Prometheus metrics: [`Io`] (registry client, GET latencies, FUSE
//! operations) and [`Snapshotter`] (layers, fallbacks, cache, mounts).

use std::fmt::{self, Debug};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use tarn_fs::Intent;
use tarn_fs::cache::CacheStats;
use tarn_fs::fetch::{FetchScheduler, Hint, HintCount, HintCounts};
use tarn_fs::fuse::FuseOps;
use tarn_fs::latency::{BOUNDS_MICROS, LatencySnapshot};
use tarn_fs::peer::Peers;
use tarn_fs::registry::{RegistryClient, RegistryError};

use crate::fallback::Cause;
use crate::layers::LayerStatus;

/// What the registry client, the fetch scheduler and the FUSE mounts
/// counted: the parts of the daemon below the snapshotter.
pub struct Io {
    pub client: RegistryClient,
    pub scheduler: FetchScheduler,
    pub fuse: Arc<FuseOps>,
    /// The cluster, when `[peers]` is on.
    pub peers: Option<Peers>,
}

impl Debug for Io {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Io").finish_non_exhaustive()
    }
}

/// The snapshotter's own figures at one moment.
#[derive(Debug, Clone, Default)]
pub struct SnapshotterFigures {
    pub layers: Vec<LayerStatus>,
    /// Every cause, happened or not (so each series exists from the start).
    pub fallbacks: Vec<(Cause, u64)>,
    pub cache: CacheStats,
    pub snapshots: u64,
    /// Blobs of the mounted overlaybd disks by where their whole-blob
    /// check stands (every state, so each series exists from the start).
    pub disk_blobs: Vec<(&'static str, u64)>,
    /// The mounted disks' blobs' hint figures, summed (each blob once).
    pub disk_hints: HintCounts,
}

/// Reads [`SnapshotterFigures`] at each scrape through `read` (a closure,
/// so that this file does not know the snapshotter's type).
pub struct Snapshotter<F>(pub F);

impl<F> Debug for Snapshotter<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshotter").finish_non_exhaustive()
    }
}

/// Writes one metric family: a descriptor, then each labelled value.
struct Emit<'a, 'e> {
    encoder: &'a mut DescriptorEncoder<'e>,
}

/// The value of one series.
enum Value<'a> {
    Counter(u64),
    Gauge(u64),
    Histogram(&'a LatencySnapshot),
}

impl Value<'_> {
    fn metric_type(&self) -> MetricType {
        match self {
            Value::Counter(_) => MetricType::Counter,
            Value::Gauge(_) => MetricType::Gauge,
            Value::Histogram(_) => MetricType::Histogram,
        }
    }
}

impl<'e> Emit<'_, 'e> {
    /// `name` of a counter without its `_total`, which the encoder adds.
    fn family<'v, L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        series: impl IntoIterator<Item = (L, Value<'v>)>,
    ) -> fmt::Result {
        let mut series = series.into_iter().peekable();
        let Some((_, first)) = series.peek() else {
            return Ok(());
        };
        let mut family = self
            .encoder
            .encode_descriptor(name, help, None, first.metric_type())?;
        for (labels, value) in series {
            let mut m = family.encode_family(&labels)?;
            match value {
                Value::Counter(v) => m.encode_counter::<NoLabelSet, u64, u64>(&v, None)?,
                Value::Gauge(v) => m.encode_gauge(&v)?,
                Value::Histogram(h) => {
                    let buckets = histogram_buckets(h);
                    // Nanoseconds to seconds: far below 2^53, exact enough.
                    let sum = h.sum_nanos as f64 / 1e9;
                    m.encode_histogram::<NoLabelSet>(sum, h.count(), &buckets, None)?
                }
            }
        }
        Ok(())
    }

    fn one(&mut self, name: &str, help: &str, value: Value<'_>) -> fmt::Result {
        let no_labels: [(&str, &str); 0] = [];
        self.family(name, help, [(no_labels, value)])
    }
}

/// One unlabelled histogram (for tests of the bucket layout).
#[cfg(test)]
pub(super) fn emit_histogram(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    h: &LatencySnapshot,
) -> fmt::Result {
    Emit { encoder }.one(name, help, Value::Histogram(h))
}

/// (upper bound in seconds, count in that bucket alone), the overflow last.
fn histogram_buckets(h: &LatencySnapshot) -> Vec<(f64, u64)> {
    BOUNDS_MICROS
        .iter()
        .map(|&us| us as f64 / 1e6)
        .chain([f64::INFINITY])
        .zip(h.buckets)
        .collect()
}

impl Collector for Io {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let mut e = Emit {
            encoder: &mut encoder,
        };
        let c = self.client.stats();
        e.one(
            "tarn_registry_requests",
            "Requests sent to registries (token requests included)",
            Value::Counter(c.requests),
        )?;
        e.one(
            "tarn_registry_received_bytes",
            "Response body bytes received from registries",
            Value::Counter(c.bytes),
        )?;
        e.one(
            "tarn_registry_mirror_received_bytes",
            "Of tarn_registry_received_bytes, the bytes from mirrors (hosts.toml)",
            Value::Counter(c.mirror_bytes),
        )?;
        let p = self.peers.as_ref().map(Peers::stats).unwrap_or_default();
        e.one(
            "tarn_peer_received_bytes",
            "Block bytes received from peers ([peers]); not in tarn_registry_received_bytes",
            Value::Counter(p.received_bytes),
        )?;
        e.one(
            "tarn_peer_requests",
            "Block requests sent to peers",
            Value::Counter(p.requests),
        )?;
        e.one(
            "tarn_peer_failures",
            "Block requests to peers that failed (the next source was read)",
            Value::Counter(p.failures),
        )?;
        e.one(
            "tarn_peer_served_bytes",
            "Block bytes this node sent to peers",
            Value::Counter(p.served_bytes),
        )?;
        let by_cause = |counts: [u64; RegistryError::CAUSES.len()]| {
            RegistryError::CAUSES
                .into_iter()
                .zip(counts)
                .map(|(cause, n)| ([("cause", cause)], Value::Counter(n)))
        };
        e.family(
            "tarn_registry_errors",
            "Registry requests that failed for good (after their retries), by cause",
            by_cause(c.errors),
        )?;
        e.family(
            "tarn_registry_retries",
            "Failed registry requests that were tried again, by cause",
            by_cause(c.retries),
        )?;
        let gets = self.scheduler.get_latency();
        e.family(
            "tarn_fetch_duration_seconds",
            "Ranged GETs of layer blobs, from sending to the last byte, by intent",
            Intent::ALL
                .into_iter()
                .zip(&gets)
                .map(|(i, h)| ([("intent", i.as_str())], Value::Histogram(h))),
        )?;
        let ops = self.fuse.snapshot();
        e.family(
            "tarn_fuse_operation_duration_seconds",
            "FUSE operations the lazy layers answered, from request to reply, by operation",
            ops.iter()
                .map(|(op, h)| ([("op", op.as_str())], Value::Histogram(h))),
        )
    }
}

impl<F> Collector for Snapshotter<F>
where
    F: Fn() -> SnapshotterFigures + Send + Sync + 'static,
{
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let f = (self.0)();
        let mut e = Emit {
            encoder: &mut encoder,
        };
        snapshotter_figures(&mut e, &f)?;
        layer_figures(&mut e, &f.layers)
    }
}

fn snapshotter_figures(e: &mut Emit<'_, '_>, f: &SnapshotterFigures) -> fmt::Result {
    let failed = f.layers.iter().filter(|l| l.failed.is_some()).count() as u64;
    let mounted = f.layers.len() as u64 - failed;
    e.one(
        "tarn_mounted_layers",
        "Lazy layers mounted now",
        Value::Gauge(mounted),
    )?;
    e.one(
        "tarn_failed_layers",
        "Layers that could not be mounted again at start (their reads fail)",
        Value::Gauge(failed),
    )?;
    e.one(
        "tarn_snapshots",
        "Snapshots in the metadata store",
        Value::Gauge(f.snapshots),
    )?;
    e.family(
        "tarn_fallbacks",
        "Image layers pulled in full instead of lazily, by cause",
        f.fallbacks
            .iter()
            .map(|(c, n)| ([("cause", c.as_str())], Value::Counter(*n))),
    )?;
    e.family(
        "tarn_disk_blobs",
        "Blobs of the mounted overlaybd disks, by their whole-blob sha256 check",
        f.disk_blobs
            .iter()
            .map(|(check, n)| ([("check", *check)], Value::Gauge(*n))),
    )?;
    e.family(
        "tarn_disk_hint_fetched_bytes",
        "Compressed bytes of the mounted overlaybd disks' blobs fetched before a read asked for them, by the kind of guess that fetched them",
        Hint::ALL
            .into_iter()
            .map(|h| ([("hint", h.name())], Value::Counter(f.disk_hints.get(h).fetched))),
    )?;
    e.family(
        "tarn_disk_hint_used_bytes",
        "Of the disks' hint bytes, those of blocks a read used later",
        Hint::ALL.into_iter().map(|h| {
            (
                [("hint", h.name())],
                Value::Counter(f.disk_hints.get(h).used),
            )
        }),
    )?;
    let c = &f.cache;
    e.one(
        "tarn_cache_bytes",
        "Bytes of verified chunks in the cache",
        Value::Gauge(c.bytes),
    )?;
    e.one(
        "tarn_cache_entries",
        "Chunks in the cache",
        Value::Gauge(c.entries),
    )?;
    e.one(
        "tarn_cache_hits",
        "Cache lookups that found their chunk",
        Value::Counter(c.hits),
    )?;
    e.one(
        "tarn_cache_misses",
        "Cache lookups that did not find their chunk",
        Value::Counter(c.misses),
    )?;
    e.one(
        "tarn_cache_corrupt_entries",
        "Cache entries that failed verification when read and were dropped",
        Value::Counter(c.corrupt),
    )?;
    e.one(
        "tarn_cache_dedup_saved_bytes",
        "Bytes inserted into the cache that it already held (stored once)",
        Value::Counter(c.dedup_bytes),
    )?;
    e.one(
        "tarn_cache_evictions",
        "Cache entries evicted, by the bound or a prune",
        Value::Counter(c.evictions),
    )?;
    e.one(
        "tarn_cache_evicted_bytes",
        "Logical bytes of the cache entries evicted, by the bound or a prune",
        Value::Counter(c.evicted_bytes),
    )
}

fn layer_figures(e: &mut Emit<'_, '_>, layers: &[LayerStatus]) -> fmt::Result {
    // A failed layer has no counters: only its existence, above.
    let mounted: Vec<&LayerStatus> = layers.iter().filter(|l| l.failed.is_none()).collect();
    let digests: Vec<String> = mounted.iter().map(|l| l.digest.to_string()).collect();
    let per_layer = |get: fn(&LayerStatus) -> Value<'static>| {
        mounted
            .iter()
            .zip(&digests)
            .map(move |(l, d)| ([("layer", d.as_str())], get(l)))
    };
    let per_intent = |get: fn(&LayerStatus) -> [u64; Intent::ALL.len()]| {
        mounted.iter().zip(&digests).flat_map(move |(l, d)| {
            Intent::ALL.into_iter().zip(get(l)).map(move |(i, n)| {
                (
                    [("layer", d.as_str()), ("intent", i.as_str())],
                    Value::Counter(n),
                )
            })
        })
    };
    let per_hint = |get: fn(HintCount) -> u64| {
        mounted.iter().zip(&digests).flat_map(move |(l, d)| {
            Hint::ALL.into_iter().map(move |h| {
                (
                    [("layer", d.as_str()), ("hint", h.name())],
                    Value::Counter(get(l.stats.hints.get(h))),
                )
            })
        })
    };
    e.family(
        "tarn_layer_hint_fetched_bytes",
        "Compressed bytes of the layer fetched before a read asked for them, by the kind of guess that fetched them",
        per_hint(|c| c.fetched),
    )?;
    e.family(
        "tarn_layer_hint_used_bytes",
        "Of the hint's bytes, those of chunks a read used later (hit rate: used / fetched)",
        per_hint(|c| c.used),
    )?;
    e.family(
        "tarn_layer_fetched_bytes",
        "Compressed bytes of the layer's blob received from the registry, by the intent of the read that fetched them",
        per_intent(|l| l.stats.bytes_by_intent),
    )?;
    e.family(
        "tarn_layer_requests",
        "Ranged GETs of the layer's blob, by intent",
        per_intent(|l| l.stats.requests_by_intent),
    )?;
    e.family(
        "tarn_layer_served_bytes",
        "Bytes of the layer's files the daemon answered reads with (reads the kernel passes through to a cached file are not seen)",
        per_layer(|l| Value::Counter(l.stats.bytes_served)),
    )?;
    e.family(
        "tarn_layer_cache_hits",
        "Reads of the layer answered from the cache alone",
        per_layer(|l| Value::Counter(l.stats.cache_hits)),
    )?;
    e.family(
        "tarn_layer_chunks_fetched",
        "Chunks of the layer fetched, verified and cached",
        per_layer(|l| Value::Counter(l.stats.chunks_fetched)),
    )?;
    e.family(
        "tarn_layer_verify_failures",
        "Chunks of the layer whose fetched bytes failed verification",
        per_layer(|l| Value::Counter(l.stats.verify_failures)),
    )?;
    e.family(
        "tarn_layer_blob_size_bytes",
        "Size of the layer's compressed blob",
        per_layer(|l| Value::Gauge(l.blob_size)),
    )?;
    e.family(
        "tarn_layer_complete",
        "1 once every chunk of the layer is cached (its reads no longer reach the registry)",
        per_layer(|l| Value::Gauge(u64::from(l.complete))),
    )
}
