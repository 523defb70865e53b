//! A latency histogram of atomic counters: what a FUSE operation or a GET
//! took, recorded from any thread with two atomic adds, read by whoever
//! reports it (the daemon's metrics endpoint).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds: a FUSE operation answered
/// from memory (tens of µs) up to a GET of a far registry (seconds). One set
/// for every histogram, so they aggregate and compare.
pub const BOUNDS_MICROS: [u64; 17] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Counts of durations per bucket (not cumulative; the last bucket is
/// everything above the last bound) and their sum.
#[derive(Debug, Default)]
pub struct Latency {
    buckets: [AtomicU64; BOUNDS_MICROS.len() + 1],
    sum_nanos: AtomicU64,
}

/// A point-in-time copy of a [`Latency`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Per bucket of [`BOUNDS_MICROS`], then the overflow bucket.
    pub buckets: [u64; BOUNDS_MICROS.len() + 1],
    pub sum_nanos: u64,
}

impl Latency {
    pub fn record(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_MICROS.partition_point(|&b| b < micros);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_nanos: self.sum_nanos.load(Ordering::Relaxed),
        }
    }
}

impl LatencySnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &LatencySnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum_nanos += other.sum_nanos;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_lands_in_the_first_bucket_that_holds_it() {
        let l = Latency::default();
        l.record(Duration::from_micros(10));
        l.record(Duration::from_micros(50));
        l.record(Duration::from_micros(51));
        l.record(Duration::from_secs(60));
        let s = l.snapshot();
        assert_eq!(s.buckets[0], 2, "bounds are inclusive, as Prometheus' le");
        assert_eq!(s.buckets[1], 1);
        assert_eq!(s.buckets[BOUNDS_MICROS.len()], 1, "over the last bound");
        assert_eq!(s.count(), 4);
        assert_eq!(s.sum_nanos, 60_000_111_000);
        let mut total = s;
        total.add(&s);
        assert_eq!(total.count(), 8);
    }
}
