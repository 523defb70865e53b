//! Pure planning of ranged GETs: which missing chunks travel together.
//!
//! Only chunks the cache lacks are planned: every caller filters cached
//! ones out first (the read plan, read-ahead, prefetch and background
//! fetch), and a flight re-checks the cache before it fetches. A cached
//! chunk (the same content from another layer or image) between two
//! missing ones is therefore a gap: carried inside one GET up to
//! [`MAX_GAP`], skipped with a second GET beyond it. The break-even is one
//! round trip's worth of bytes (RTT x bandwidth): 12.5 KB at 1 ms and
//! 100 Mbit/s, 125 KB at 10 ms, 1.25 MB at 100 ms (plus the registry's
//! per-request cost, which only raises it). 32 KiB is at or below it for
//! every link but a LAN-local registry at sub-millisecond RTT, so a GET
//! carries a cached chunk only when that costs less than skipping it.

use std::ops::Range;

use crate::format::Chunk;

/// One ranged GET and the chunks it carries, in blob order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    pub range: Range<u64>,
    pub chunks: Vec<Chunk>,
}

/// Bytes between two wanted chunks that one GET carries (and drops) rather
/// than splitting in two. Chunk ranges of an eStargz blob are not quite
/// contiguous: the tar headers of directories, symlinks and empty files sit
/// between them in gzip members of their own, a few hundred bytes each. A
/// round trip costs far more than such a gap (100 ms at 100 Mbit/s moves
/// 1.25 MB), so a GET does not stop at one.
pub const MAX_GAP: u64 = 32 << 10;

/// Groups chunks whose blob ranges touch, overlap or lie at most [`MAX_GAP`]
/// apart into GETs of at most `max_len` bytes. A chunk larger than
/// `max_len` gets a GET of its own.
pub(crate) fn merge_adjacent(mut chunks: Vec<Chunk>, max_len: u64) -> Vec<Group> {
    chunks.sort_by_key(|c| c.blob_range);
    let mut groups: Vec<Group> = Vec::new();
    for c in chunks {
        let r = c.blob_range();
        if let Some(g) = groups.last_mut() {
            let end = g.range.end.max(r.end);
            if r.start <= g.range.end + MAX_GAP && end - g.range.start <= max_len {
                g.range.end = end;
                g.chunks.push(c);
                continue;
            }
        }
        groups.push(Group {
            range: r,
            chunks: vec![c],
        });
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::chunk_at as chunk;

    fn ranges(groups: &[Group]) -> Vec<Range<u64>> {
        groups.iter().map(|g| g.range.clone()).collect()
    }

    #[test]
    fn contiguous_chunks_share_one_get_and_gaps_split() {
        let groups = merge_adjacent(
            vec![
                chunk(20, 30),
                chunk(0, 10),
                chunk(10, 20),
                chunk(31 + MAX_GAP, 40 + MAX_GAP),
            ],
            100,
        );
        assert_eq!(ranges(&groups), vec![0..30, 31 + MAX_GAP..40 + MAX_GAP]);
        assert_eq!(groups[0].chunks.len(), 3);
        assert_eq!(
            groups[0].chunks[0].blob_range,
            (0, 10),
            "chunks are in blob order"
        );
    }

    #[test]
    fn small_gaps_are_carried_and_large_ones_split() {
        let groups = merge_adjacent(
            vec![
                chunk(0, 10),
                chunk(10 + MAX_GAP, 20 + MAX_GAP),
                chunk(21 + 2 * MAX_GAP, 30 + 2 * MAX_GAP),
            ],
            10 * MAX_GAP,
        );
        assert_eq!(
            ranges(&groups),
            vec![0..20 + MAX_GAP, 21 + 2 * MAX_GAP..30 + 2 * MAX_GAP]
        );
    }

    #[test]
    fn a_cached_chunk_between_misses_is_skipped_past_the_break_even() {
        // The middle chunk is cached (not planned): small, it is carried;
        // larger than MAX_GAP, the GET splits around it.
        let small = merge_adjacent(vec![chunk(0, 100), chunk(100 + 4096, 200 + 4096)], 1 << 30);
        assert_eq!(ranges(&small), vec![0..200 + 4096]);
        let large = merge_adjacent(
            vec![chunk(0, 100), chunk(100 + 4 * MAX_GAP, 200 + 4 * MAX_GAP)],
            1 << 30,
        );
        assert_eq!(ranges(&large).len(), 2);
        let carried: u64 = ranges(&large).iter().map(|r| r.end - r.start).sum();
        assert_eq!(carried, 200, "only the missing chunks' bytes travel");
    }

    #[test]
    fn merged_gets_respect_the_cap() {
        let groups = merge_adjacent(
            vec![chunk(0, 10), chunk(10, 20), chunk(20, 30), chunk(30, 200)],
            20,
        );
        assert_eq!(ranges(&groups), vec![0..20, 20..30, 30..200]);
    }
}
