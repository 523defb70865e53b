//! Read-ahead along blob order: what an on-demand miss also fetches.
//!
//! Files are laid out in the blob in the order they were written, which is
//! the order a workload often reads them (and, in an optimized image, the
//! order it did read them). When reads walk along the blob, the chunks that
//! follow a miss are the likeliest next misses, and fetching them in the
//! same GET costs transfer time but no extra round trip. When they do not,
//! those bytes are paid for and never used, and on a thin link they delay
//! the reads that follow (issue 20 measured a read-ahead that opened a
//! window on every miss at a 4% hit rate).
//!
//! So a window opens only on a walk, as the kernel's page-cache readahead
//! does along a file: every read (hit or miss) is noted by the blob span of
//! the chunks it covers, and a miss *continues a walk* when the previous
//! read of the walk ended where it starts, or at most [`STREAM_GAP`] before
//! (tar headers, a file nobody read). A miss that continues none fetches
//! only its own chunks and starts a walk. The first miss that continues one
//! opens a window of `read_ahead` after it (and the rest of its file); the
//! reads that hit the window carry the walk along, and the next miss past
//! it doubles the window, up to the scheduler's `read_ahead_max`. A miss
//! elsewhere leaves the walk to be forgotten (the oldest of [`STREAMS`]).
//! Python importing a package is such a walk: its `__pycache__` files are
//! adjacent in the blob and read one after another.

use std::sync::Mutex;

use crate::fetch::{Fetcher, MAX_GAP};
use crate::format::{Chunk, LayerIndex};
use crate::layer::order::BlobOrder;

/// Walks remembered per layer: a read that continues none starts one, so
/// a few scattered reads must not push out a walk still going.
const STREAMS: usize = 8;

/// How far past the previous read's end the next one may start and still
/// continue the walk: a few tar headers and small entries nobody read
/// (well below [`MAX_GAP`], what one GET carries across: a walk that skips
/// whole files is no walk).
const STREAM_GAP: u64 = 8 << 10;

/// One walk along the blob: the span of its latest read, and the window its
/// latest miss opened (0 before any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stream {
    start: u64,
    end: u64,
    window: u64,
}

/// The recent walks of a layer, most recent first.
#[derive(Debug, Default)]
pub(crate) struct Streams(Mutex<Vec<Stream>>);

impl Stream {
    /// Whether a read of blob bytes from `start` continues this walk: it
    /// starts no earlier than the latest read did (a read within the same
    /// chunk is the same walk) and at most [`STREAM_GAP`] after its end.
    fn continued_by(&self, start: u64) -> bool {
        start >= self.start && start <= self.end.saturating_add(STREAM_GAP)
    }
}

impl Streams {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Stream>> {
        // Nothing panics while holding it; the spans are whole.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Moves the walk a read of `start..end` continues (or a new one) to
    /// the front with `window`; returns the window it had, `None` for a
    /// new walk.
    fn advance(&self, start: u64, end: u64, window: impl FnOnce(Option<u64>) -> u64) -> u64 {
        let mut streams = self.lock();
        let found = streams.iter().position(|s| s.continued_by(start));
        let had = found.map(|i| streams.remove(i));
        let w = window(had.map(|s| s.window));
        let end = had.map_or(end, |s| s.end.max(end));
        streams.insert(
            0,
            Stream {
                start,
                end,
                window: w,
            },
        );
        streams.truncate(STREAMS);
        w
    }

    /// A read answered from the cache (or from chunks already on the wire)
    /// covered blob bytes `start..end`: it carries its walk along, window
    /// unchanged, or starts one.
    pub(crate) fn hit(&self, start: u64, end: u64) {
        self.advance(start, end, |had| had.unwrap_or(0));
    }

    /// A miss on blob bytes `start..end`: the window it opens, given the
    /// base and largest windows. None (0) unless it continues a walk; then
    /// `base` the first time and twice the walk's last window after.
    fn miss(&self, start: u64, end: u64, base: u64, max: u64) -> u64 {
        self.advance(start, end, |had| match had {
            None => 0,
            Some(0) => base,
            Some(w) => w.saturating_mul(2).clamp(base, max.max(base)),
        })
    }
}

/// What read-ahead looks at of a layer: borrowed from it for one miss.
/// (`pub(crate)` here reaches no further than `layer`: `hints` is private
/// to it.)
pub(crate) struct Planner<'a> {
    pub index: &'a LayerIndex,
    pub order: &'a BlobOrder,
    pub fetcher: &'a Fetcher,
    pub streams: &'a Streams,
}

impl Planner<'_> {
    /// What to fetch in the GET of `missing`, chunks of the file `file` (its
    /// chunks in file order), after them in the blob. Nothing unless the
    /// miss continues a walk along the blob (see the module), nor when
    /// every missing chunk is on the wire already (whoever sent them
    /// planned the read-ahead), nor when the link has no room for
    /// speculative bytes (reads fill it) or the cache is under pressure. On a walk: the rest of the file
    /// when it fits in the window's largest size and in the room the link
    /// has (a file read along is read to its end); then, unless the file
    /// alone is a base window or more, the chunks after it in blob order,
    /// neither cached nor in flight, separated by at most [`MAX_GAP`], up
    /// to the walk's window of compressed bytes; all of it within the room.
    /// What to fetch with `missing` when the miss falls among an optimized
    /// layer's prioritized files (its prefetch landmark's range): the rest
    /// of that range after the miss, neither cached nor in flight, up to
    /// what the link carries in a round trip. Empty for a miss elsewhere,
    /// without a landmark, or with speculation off.
    ///
    /// Those files are what the image's workload read at its start, so a
    /// read among them means the start is now: the landmark prefetch may
    /// still wait for room behind another layer's, and a read that fetched
    /// only its own chunks (runc's `/etc/passwd`, say) would leave the next
    /// one (the shell it runs, right after it) a round trip of its own. The
    /// read's GET carries them instead, ahead of the queued prefetch, which
    /// then finds them on the wire. Not limited by the room left: these
    /// bytes are as good as read, and they follow the read's own in its GET.
    pub(crate) fn start_rest(&self, missing: &[Chunk]) -> Vec<Chunk> {
        let scheduler = self.fetcher.scheduler();
        let (Some(span), Some(start), Some(end)) = (
            self.index.prefetch.as_ref(),
            missing.iter().map(|c| c.blob_range.0).min(),
            missing.iter().map(|c| c.blob_range.1).max(),
        ) else {
            return Vec::new();
        };
        if !scheduler.config().speculate
            || !span.contains(&start)
            || self.fetcher.cache().under_pressure()
        {
            return Vec::new();
        }
        let chunks = &self.index.chunks;
        let from = self
            .order
            .partition_point(|i| chunks[i as usize].blob_range.0 < end);
        let mut budget = scheduler.read_ahead_max();
        let mut at = end;
        let mut ahead = Vec::new();
        for i in self.order.iter_from(from) {
            let c = &chunks[i as usize];
            let len = c.blob_range.1.saturating_sub(at);
            if c.blob_range.0 >= span.end || len > budget {
                break;
            }
            if missing.iter().any(|m| m.digest == c.digest)
                || self.fetcher.cache().contains(&c.digest)
                || self.fetcher.in_flight(&c.digest)
            {
                // Cached or on its way: a gap. A GET carries a small one;
                // past MAX_GAP the rest of the range is left to the prefetch.
                if c.blob_range.1 > at + MAX_GAP {
                    break;
                }
                continue;
            }
            if c.blob_range.0 > at + MAX_GAP {
                break;
            }
            budget -= len;
            at = c.blob_range.1;
            ahead.push(*c);
        }
        tracing::debug!(start, end = at, ahead = ahead.len(), "start files carried");
        ahead
    }

    pub(crate) fn read_ahead(&self, missing: &[Chunk], file: &[Chunk]) -> Vec<Chunk> {
        let scheduler = self.fetcher.scheduler();
        // Windows no larger than what the link carries in a round trip
        // (the budget), and no more than the room left in it now.
        let max = scheduler.read_ahead_max();
        let base = scheduler.config().read_ahead.min(max);
        let (Some(start), Some(mut end)) = (
            missing.iter().map(|c| c.blob_range.0).min(),
            missing.iter().map(|c| c.blob_range.1).max(),
        ) else {
            return Vec::new();
        };
        if missing.iter().all(|c| self.fetcher.in_flight(&c.digest)) {
            // A read of the walk all the same: it carries it along.
            self.streams.hit(start, end);
            return Vec::new();
        }
        let window = self.streams.miss(start, end, base, max);
        let room = scheduler.speculation_room();
        // A cache that thrashes would evict for these bytes what the next
        // reads want.
        if base == 0 || window == 0 || room == 0 || self.fetcher.cache().under_pressure() {
            tracing::debug!(start, end, window, room, "no read-ahead");
            return Vec::new();
        }
        let mut ahead = Vec::new();
        let wanted = |c: &Chunk| {
            !missing.iter().any(|m| m.digest == c.digest)
                && !self.fetcher.cache().contains(&c.digest)
                && !self.fetcher.in_flight(&c.digest)
        };
        let file_rest: u64 = file
            .iter()
            .filter(|c| c.blob_range.0 >= start)
            .map(|c| c.blob_range.1 - c.blob_range.0)
            .sum();
        let whole = file_rest <= max.min(room);
        let mut room = room;
        if whole {
            for c in file.iter().filter(|c| c.blob_range.0 > start && wanted(c)) {
                end = end.max(c.blob_range.1);
                ahead.push(*c);
            }
            room = room.saturating_sub(file_rest);
        }
        // The rest of a file of a window or more is read-ahead enough:
        // what follows it in the blob would only delay the next miss.
        let window = if whole && file_rest >= base {
            0
        } else {
            window
        };
        let chunks = &self.index.chunks;
        let from = self
            .order
            .partition_point(|i| chunks[i as usize].blob_range.0 < end);
        let mut budget = window.min(room);
        for i in self.order.iter_from(from) {
            let c = &chunks[i as usize];
            // The gap's bytes travel too: they count against the window.
            let len = c.blob_range.1 - end;
            if c.blob_range.0 > end + MAX_GAP || len > budget || self.fetcher.in_flight(&c.digest) {
                break;
            }
            if !wanted(c) {
                // Cached (an identical file came before): a gap to carry.
                continue;
            }
            budget -= len;
            end = c.blob_range.1;
            ahead.push(*c);
        }
        tracing::debug!(start, end, window, max, ahead = ahead.len(), "read-ahead");
        ahead
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_miss_on_no_walk_opens_no_window() {
        let s = Streams::default();
        assert_eq!(s.miss(0, 100, MIB, 8 * MIB), 0, "the first read");
        assert_eq!(
            s.miss(10 * MIB, 10 * MIB + 100, MIB, 8 * MIB),
            0,
            "far from it"
        );
    }

    #[test]
    fn a_walk_opens_a_window_and_doubles_it_while_reads_follow_it() {
        let s = Streams::default();
        let mut at = 0;
        // The first miss starts the walk; each next one lands just past
        // the previous read (a small gap: a tar header).
        assert_eq!(s.miss(at, at + 1000, MIB, 8 * MIB), 0);
        at += 1000 + 512;
        let mut windows = Vec::new();
        for _ in 0..5 {
            let w = s.miss(at, at + 1000, MIB, 8 * MIB);
            windows.push(w / MIB);
            // Reads hit the window the miss fetched, along it.
            let mut hit = at + 1000;
            while hit < at + 1000 + w {
                s.hit(hit, hit + 64 * 1024);
                hit += 64 * 1024;
            }
            at = hit;
        }
        assert_eq!(windows, vec![1, 2, 4, 8, 8]);
    }

    #[test]
    fn a_walk_whose_window_is_not_read_along_does_not_grow() {
        let s = Streams::default();
        s.miss(0, 1000, MIB, 8 * MIB);
        assert_eq!(s.miss(1000, 2000, MIB, 8 * MIB), MIB);
        // The next miss lies past the window, but no read went there: a
        // walk of its own, no window.
        assert_eq!(s.miss(2000 + MIB, 2000 + MIB + 10, MIB, 8 * MIB), 0);
        // The first walk goes on where it was left.
        assert_eq!(s.miss(2000, 3000, MIB, 8 * MIB), 2 * MIB);
    }

    #[test]
    fn reads_within_one_chunk_and_hits_carry_the_walk() {
        let s = Streams::default();
        s.hit(0, 4 * MIB);
        s.hit(0, 4 * MIB);
        assert_eq!(s.miss(4 * MIB, 8 * MIB, MIB, 8 * MIB), MIB);
    }

    #[test]
    fn walks_are_bounded() {
        let s = Streams::default();
        for i in 0..20 {
            s.hit(i * 100 * MIB, i * 100 * MIB + MIB);
        }
        assert_eq!(s.lock().len(), STREAMS);
        assert_eq!(
            s.miss(MIB, MIB + 10, MIB, 8 * MIB),
            0,
            "the oldest walk was forgotten"
        );
        assert_eq!(
            s.miss(1900 * MIB + MIB, 1900 * MIB + 2 * MIB, MIB, 8 * MIB),
            MIB
        );
    }
}
