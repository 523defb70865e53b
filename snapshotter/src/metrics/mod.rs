//! The Prometheus endpoint (`metrics_address`): `GET /metrics` in the
//! Prometheus text format (0.0.4).
//!
//! Almost nothing here counts for itself: at each scrape the collectors
//! (`collect.rs`) read the counters tarn keeps anyway (per-layer fetch
//! counters, the cache's, the registry client's, the fetch scheduler's GET
//! latencies, FUSE operation latencies, fallbacks by cause), so the hot
//! paths pay only the atomic adds they already made, and a daemon without
//! `metrics_address` pays nothing more.
//!
//! Adding a figure: a counter kept elsewhere is read in `collect.rs` (one
//! `emit` call); a counter of its own is registered once on [`Metrics`]
//! ([`Metrics::register`], a `prometheus_client` `Counter`/`Gauge`/`Family`
//! that its owner keeps a clone of and bumps), as [`Metrics::takeovers`]
//! is. Names follow Prometheus' conventions (`tarn_` prefix, `_total` for
//! counters, base units `_bytes`, `_seconds`); labels are bounded (a layer
//! digest, an intent, a cause, an operation; never a path). README.md lists
//! every name.

mod collect;
mod http;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::{Metric, Registry};

pub use collect::{Io, Snapshotter, SnapshotterFigures};
pub use http::serve;

/// The daemon's metrics: a cheap `Clone` handle around one registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    registry: Mutex<Registry>,
    takeovers: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let metrics = Metrics {
            shared: Arc::new(Shared {
                registry: Mutex::new(Registry::default()),
                takeovers: Counter::default(),
            }),
        };
        metrics.register(
            "tarn_takeovers",
            "Layers and overlaybd disks this daemon took over, still mounted, from the daemon before it",
            metrics.shared.takeovers.clone(),
        );
        metrics
    }

    /// Registers a metric its owner keeps a clone of and updates. `name`
    /// without `_total`: the encoder adds it to counters.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry().register(name, help, metric);
    }

    /// Registers figures read at each scrape.
    pub fn register_collector(&self, collector: impl Collector) {
        self.registry().register_collector(Box::new(collector));
    }

    /// `tarn_takeovers_total`: bumped by whoever takes a live layer or
    /// overlaybd disk over at start (restart survival: the mounter and
    /// `Disks`).
    pub fn takeovers(&self) -> &Counter {
        &self.shared.takeovers
    }

    /// Every figure, in the Prometheus text format. Collectors may read
    /// the metadata store: call it off the async workers.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry())?;
        Ok(out)
    }

    fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        // A panic while registering leaves nothing half-done worth refusing.
        self.shared
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
