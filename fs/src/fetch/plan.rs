//! Pure planning of ranged GETs: which missing chunks travel together.

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
    fn merged_gets_respect_the_cap() {
        let groups = merge_adjacent(
            vec![chunk(0, 10), chunk(10, 20), chunk(20, 30), chunk(30, 200)],
            20,
        );
        assert_eq!(ranges(&groups), vec![0..20, 20..30, 30..200]);
    }
}
