//! Per-layer fetch counters.

use std::sync::atomic::{AtomicU64, Ordering};

use super::hints::{HintCounts, HintStats};

/// Counters of one fetcher; cheap to bump from any thread.
#[derive(Debug, Default)]
pub struct FetchStats {
    bytes_fetched: AtomicU64,
    requests: AtomicU64,
    chunks_fetched: AtomicU64,
    cache_hits: AtomicU64,
    verify_failures: AtomicU64,
    /// What each hint fetched, and what of it reads used.
    pub(crate) hints: HintStats,
}

/// A point-in-time copy of [`FetchStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FetchStatsSnapshot {
    /// Compressed bytes received from the blob source.
    pub bytes_fetched: u64,
    /// Ranged reads sent to the blob source.
    pub requests: u64,
    /// Chunks fetched, verified and cached.
    pub chunks_fetched: u64,
    /// Chunks (or chunk pieces) answered from the cache.
    pub cache_hits: u64,
    /// Chunks whose bytes did not decode or match their digest.
    pub verify_failures: u64,
    /// Compressed bytes each hint fetched, and what reads used of them.
    pub hints: HintCounts,
}

impl FetchStats {
    /// One whole request of `bytes`.
    pub(crate) fn request(&self, bytes: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes_fetched.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A streamed request was answered; its bytes are counted as they come.
    pub(crate) fn request_started(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn bytes_received(&self, bytes: u64) {
        self.bytes_fetched.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn chunks_fetched(&self, n: u64) {
        self.chunks_fetched.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn verify_failures(&self, n: u64) {
        self.verify_failures.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts reads answered from the cache (also by the layer's inline path).
    pub fn cache_hits(&self, n: u64) {
        self.cache_hits.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> FetchStatsSnapshot {
        FetchStatsSnapshot {
            bytes_fetched: self.bytes_fetched.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            chunks_fetched: self.chunks_fetched.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            verify_failures: self.verify_failures.load(Ordering::Relaxed),
            hints: self.hints.snapshot(),
        }
    }
}
