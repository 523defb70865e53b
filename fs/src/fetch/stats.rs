//! Per-layer fetch counters.

use std::sync::atomic::{AtomicU64, Ordering};

use super::hints::{HintCounts, HintStats};
use crate::Intent;

/// Counters of one fetcher; cheap to bump from any thread.
#[derive(Debug, Default)]
pub struct FetchStats {
    bytes_fetched: [AtomicU64; Intent::ALL.len()],
    requests: [AtomicU64; Intent::ALL.len()],
    chunks_fetched: AtomicU64,
    cache_hits: AtomicU64,
    verify_failures: AtomicU64,
    /// What each hint fetched, and what of it reads used.
    pub(crate) hints: HintStats,
    bytes_served: AtomicU64,
}

/// A point-in-time copy of [`FetchStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FetchStatsSnapshot {
    /// Compressed bytes received from the blob source.
    pub bytes_fetched: u64,
    /// Ranged reads sent to the blob source.
    pub requests: u64,
    /// `bytes_fetched` by the intent of the read that fetched them, indexed
    /// by `Intent as usize` (see [`Intent::ALL`]).
    pub bytes_by_intent: [u64; Intent::ALL.len()],
    /// `requests` by intent, indexed like `bytes_by_intent`.
    pub requests_by_intent: [u64; Intent::ALL.len()],
    /// Chunks fetched, verified and cached.
    pub chunks_fetched: u64,
    /// Chunks (or chunk pieces) answered from the cache.
    pub cache_hits: u64,
    /// Chunks whose bytes did not decode or match their digest.
    pub verify_failures: u64,
    /// Compressed bytes each hint fetched, and what reads used of them.
    pub hints: HintCounts,
    /// Plain bytes handed to readers of the layer's files (through the
    /// daemon: reads the kernel passes through to a cached file are not
    /// seen).
    pub bytes_served: u64,
}

impl FetchStats {
    /// One whole request of `bytes`.
    pub(crate) fn request(&self, intent: Intent, bytes: u64) {
        self.request_started(intent);
        self.bytes_received(intent, bytes);
    }

    /// A streamed request was answered; its bytes are counted as they come.
    pub(crate) fn request_started(&self, intent: Intent) {
        self.requests[intent as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn bytes_received(&self, intent: Intent, bytes: u64) {
        self.bytes_fetched[intent as usize].fetch_add(bytes, Ordering::Relaxed);
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

    /// Counts bytes a read of the layer answered with.
    pub fn bytes_served(&self, n: u64) {
        self.bytes_served.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> FetchStatsSnapshot {
        let load = |a: &[AtomicU64; Intent::ALL.len()]| {
            std::array::from_fn(|i| a[i].load(Ordering::Relaxed))
        };
        let bytes_by_intent: [u64; Intent::ALL.len()] = load(&self.bytes_fetched);
        let requests_by_intent: [u64; Intent::ALL.len()] = load(&self.requests);
        FetchStatsSnapshot {
            bytes_fetched: bytes_by_intent.iter().sum(),
            requests: requests_by_intent.iter().sum(),
            bytes_by_intent,
            requests_by_intent,
            chunks_fetched: self.chunks_fetched.load(Ordering::Relaxed),
            cache_hits: self.cache_hits.load(Ordering::Relaxed),
            verify_failures: self.verify_failures.load(Ordering::Relaxed),
            hints: self.hints.snapshot(),
            bytes_served: self.bytes_served.load(Ordering::Relaxed),
        }
    }
}
