//! Read-ahead along blob order: what an on-demand miss also fetches.
//!
//! Files are laid out in the blob in the order they were written, which is
//! the order a workload tends to read them (and, in an optimized image, the
//! order it did read them). So the chunks that follow a miss in the blob are
//! the likeliest next misses; fetching them in the same GET costs transfer
//! time but no extra round trip.

use crate::format::Chunk;

use super::Layer;

impl Layer {
    /// The chunks to fetch along with `missing`: those right after the last
    /// of them in blob order, contiguous, neither cached nor in flight, up
    /// to the scheduler's read-ahead window of compressed bytes.
    pub(super) fn read_ahead(&self, missing: &[Chunk]) -> Vec<Chunk> {
        let window = self.fetcher.scheduler().config().read_ahead;
        let Some(mut end) = missing.iter().map(|c| c.blob_range.1).max() else {
            return Vec::new();
        };
        let chunks = &self.index.chunks;
        let from = self
            .blob_order
            .partition_point(|&i| chunks[i as usize].blob_range.0 < end);
        let mut budget = window;
        let mut out = Vec::new();
        for &i in &self.blob_order[from..] {
            let c = &chunks[i as usize];
            let len = c.blob_range.1 - c.blob_range.0;
            if c.blob_range.0 != end
                || len > budget
                || missing.iter().any(|m| m.digest == c.digest)
                || self.fetcher.cache().contains(&c.digest)
                || self.fetcher.in_flight(&c.digest)
            {
                break;
            }
            budget -= len;
            end = c.blob_range.1;
            out.push(*c);
        }
        out
    }
}
