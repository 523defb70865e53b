//! Pure planning of ranged GETs: which missing chunks travel together.
//!
//! Only chunks the cache lacks are planned: every caller filters cached
//! ones out first (the read plan, read-ahead, prefetch and background
//! fetch), and a flight re-checks the cache before it fetches. A cached
//! chunk (the same content from another layer or image) between two
//! missing ones is therefore a gap: carried inside one GET up to
//! [`MAX_GAP`], skipped with a second GET beyond it.
//!
//! The break-even, measured (`make bench`'s G1: two 64 KiB ranges with a
//! gap between them, one GET against two sent at once, tarn's own client;
//! release build on a loaded 2-core machine): on loopback carrying is
//! cheaper at every gap up to 2 MiB (the registry's cost per request
//! dominates); at RTT 100 ms and 100 Mbit/s splitting pays from about
//! 115 KiB; at RTT 40 ms and 20 Mbit/s from the smallest gap measured
//! (4 KiB: even; 32 KiB: 106 against 114 ms). Splitting costs no round
//! trip (both GETs leave at once), only the per-request cost, so the
//! break-even is that cost times the bandwidth. 32 KiB sits between the
//! two far links: on the thin one a carried gap costs ~8 ms, on the fast
//! one a split gap would cost about as much.

use std::ops::Range;

use crate::format::Chunk;

/// One ranged GET and the chunks it carries, in blob order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    pub range: Range<u64>,
    pub chunks: Vec<Chunk>,
}

/// Bytes between two wanted chunks that one GET carries (and drops) rather
/// than splitting in two (the module doc gives the measured break-even).
/// Chunk ranges of an eStargz blob are not quite contiguous: the tar
/// headers of directories, symlinks and empty files sit between them in
/// gzip members of their own, a few hundred bytes each, so a GET must not
/// stop at one.
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
