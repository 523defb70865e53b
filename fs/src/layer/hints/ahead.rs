//! Read-ahead along blob order: what an on-demand miss also fetches.
//!
//! Files are laid out in the blob in the order they were written, which is
//! the order a workload tends to read them (and, in an optimized image, the
//! order it did read them). So the chunks that follow a miss in the blob are
//! the likeliest next misses; fetching them in the same GET costs transfer
//! time but no extra round trip.
//!
//! The window grows while a workload walks along the blob, as the kernel's
//! page-cache readahead does along a file: a miss that lands at or shortly
//! after the end of an earlier window doubles that stream's window, up to
//! the scheduler's `read_ahead_max`; a miss anywhere else starts a stream
//! at `read_ahead`. Half a base window before the miss comes too, in a GET
//! of its own (read-behind). Python importing its standard library is such a walk:
//! one `__pycache__` directory is megabytes of small files, read in
//! roughly blob order, each one a round trip if fetched alone.

use std::sync::Mutex;

use crate::fetch::{Fetcher, MAX_GAP};
use crate::format::{Chunk, FileKind, LayerIndex};
use crate::layer::order::BlobOrder;

/// Streams remembered per layer: enough for a few interleaved walks.
const STREAMS: usize = 4;

/// One walk along the blob: where its last window ended and how large it
/// was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stream {
    start: u64,
    end: u64,
    window: u64,
}

/// The recent streams of a layer, most recent first.
#[derive(Debug, Default)]
pub(crate) struct Streams(Mutex<Vec<Stream>>);

impl Stream {
    /// Whether a miss from `start` continues this walk: it lands inside
    /// the last window (a chunk that was in flight or skipped) or within
    /// one window after it.
    fn continued_by(&self, start: u64) -> bool {
        start >= self.start && start <= self.end.saturating_add(self.window)
    }
}

impl Streams {
    /// The window for a miss covering blob bytes from `start`, given the
    /// base and largest windows; the stream it continues moves to the front.
    fn window_for(&self, start: u64, base: u64, max: u64) -> u64 {
        let streams = self.0.lock().expect("read-ahead streams poisoned");
        streams
            .iter()
            .find(|s| s.continued_by(start))
            .map_or(base, |s| {
                s.window.saturating_mul(2).clamp(base, max.max(base))
            })
    }

    fn record(&self, s: Stream) {
        let mut streams = self.0.lock().expect("read-ahead streams poisoned");
        streams.retain(|o| !o.continued_by(s.start));
        streams.insert(0, s);
        streams.truncate(STREAMS);
    }
}

/// What a miss fetches besides its own chunks.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Chunks of the file before the miss, and those just before it in the
    /// blob: a GET of their own.
    pub behind: Vec<Chunk>,
    /// The rest of the file and what follows in the blob: with the miss.
    pub ahead: Vec<Chunk>,
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
    /// What to fetch along with `missing`, chunks of the file `file`
    /// (its chunks in file order), found in directory `dir` if known.
    /// Nothing when every missing chunk is on the wire already, or when the
    /// link has no room for speculative bytes (reads fill it). A file that
    /// misses is likely read whole (a program or library being mapped
    /// faults its pages in any order): its other chunks come too when the
    /// file fits in the window's largest size and in the room the link has.
    /// Then, unless the file alone is a base window or more, the chunks
    /// after it in blob order, neither cached nor in flight, separated by
    /// at most [`MAX_GAP`], up to the stream's window of compressed bytes;
    /// all of it within the room.
    pub(crate) fn read_ahead(&self, missing: &[Chunk], file: &[Chunk], dir: Option<u64>) -> Plan {
        let scheduler = self.fetcher.scheduler();
        // Windows no larger than what the link carries in a round trip
        // (the budget), and no more than the room left in it now.
        let max = scheduler.read_ahead_max();
        let base = scheduler.config().read_ahead.min(max);
        let room = scheduler.speculation_room();
        let (Some(start), Some(mut end)) = (
            missing.iter().map(|c| c.blob_range.0).min(),
            missing.iter().map(|c| c.blob_range.1).max(),
        ) else {
            return Plan::default();
        };
        // A miss on chunks already on the wire: whoever sent them planned
        // the read-ahead (more now would only crowd the link).
        if base == 0 || room == 0 || missing.iter().all(|c| self.fetcher.in_flight(&c.digest)) {
            return Plan::default();
        }
        let mut plan = Plan::default();
        let wanted = |c: &Chunk| {
            !missing.iter().any(|m| m.digest == c.digest)
                && !self.fetcher.cache().contains(&c.digest)
                && !self.fetcher.in_flight(&c.digest)
        };
        let file_bytes: u64 = file.iter().map(|c| c.blob_range.1 - c.blob_range.0).sum();
        let whole = file_bytes <= max.min(room);
        let mut room = room;
        if whole {
            for c in file.iter().filter(|c| wanted(c)) {
                if c.blob_range.0 < start {
                    plan.behind.push(*c);
                } else {
                    end = end.max(c.blob_range.1);
                    plan.ahead.push(*c);
                }
            }
            room = room.saturating_sub(file_bytes);
        }
        // A file of a window or more is read-ahead enough: what follows it
        // in the blob would only delay the next miss.
        let window = if whole && file_bytes >= base {
            0
        } else {
            self.streams.window_for(start, base, max)
        };
        let base = base.min(room);
        let chunks = &self.index.chunks;
        let first = plan
            .behind
            .iter()
            .map(|c| c.blob_range.0)
            .fold(start, u64::min);
        // Read-behind, in a GET of its own (no round trip on the miss's
        // path): the files of the same directory before the miss, else
        // half a base window of whatever precedes it in the blob.
        let had = plan.behind.len();
        if let Some(dir) = dir {
            self.behind_in_dir(dir, first, base, &wanted, &mut plan.behind);
        }
        if plan.behind.len() == had {
            self.behind_in_blob(first, base / 2, &wanted, &mut plan.behind);
        }
        let from = self
            .order
            .partition_point(|i| chunks[i as usize].blob_range.0 < end);
        let mut budget = window.min(room);
        let out = &mut plan.ahead;
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
            out.push(*c);
        }
        self.streams.record(Stream { start, end, window });
        tracing::debug!(
            start,
            end,
            window,
            max,
            behind = plan.behind.len(),
            ahead = plan.ahead.len(),
            "read-ahead"
        );
        plan
    }

    /// Read-behind in the directory the missed file was found in: its
    /// other files before `first` in the blob, nearest first, up to
    /// `budget` bytes and within two budgets of `first`. Modules of one
    /// package, pages of one site, are read together and rarely in blob
    /// order (Python's standard library: `enum` after `sitecustomize`).
    fn behind_in_dir(
        &self,
        dir: u64,
        first: u64,
        budget: u64,
        wanted: &dyn Fn(&Chunk) -> bool,
        out: &mut Vec<Chunk>,
    ) {
        let Some(dir) = self.index.inode(dir) else {
            return;
        };
        let reach = first.saturating_sub(budget.saturating_mul(2));
        let mut near: Vec<Chunk> = self
            .index
            .children(&dir)
            .filter_map(|(_, ino)| self.index.inode(ino))
            .filter(|i| i.kind() == FileKind::Reg)
            .flat_map(|i| self.index.file_chunks(&i).iter().copied())
            .filter(|c| c.blob_range.1 <= first && c.blob_range.0 >= reach && wanted(c))
            .collect();
        near.sort_unstable_by_key(|c| std::cmp::Reverse(c.blob_range.0));
        let mut left = budget;
        for c in near {
            let len = c.blob_range.1 - c.blob_range.0;
            if len > left {
                break;
            }
            left -= len;
            out.push(c);
        }
    }

    /// Read-behind along the blob: the chunks just before `first`, up to
    /// `budget` bytes with the gaps between them (a program's libraries
    /// precede it in a layer built by copying them in).
    fn behind_in_blob(
        &self,
        mut first: u64,
        mut budget: u64,
        wanted: &dyn Fn(&Chunk) -> bool,
        out: &mut Vec<Chunk>,
    ) {
        let chunks = &self.index.chunks;
        let before = self
            .order
            .partition_point(|i| chunks[i as usize].blob_range.0 < first);
        for i in (0..before).rev().filter_map(|p| self.order.get(p)) {
            let c = &chunks[i as usize];
            let len = first.saturating_sub(c.blob_range.0);
            if c.blob_range.1 + MAX_GAP < first || len > budget || !wanted(c) {
                break;
            }
            budget -= len;
            first = c.blob_range.0;
            out.push(*c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_walk_along_the_blob_doubles_its_window_up_to_the_max() {
        let s = Streams::default();
        let mut at = 0;
        let mut windows = Vec::new();
        for _ in 0..5 {
            let w = s.window_for(at, MIB, 8 * MIB);
            windows.push(w / MIB);
            s.record(Stream {
                start: at,
                end: at + w,
                window: w,
            });
            at += w + 4096; // the next miss lands just past the window
        }
        assert_eq!(windows, vec![1, 2, 4, 8, 8]);
    }

    #[test]
    fn a_miss_elsewhere_starts_at_the_base_window_and_keeps_the_other_stream() {
        let s = Streams::default();
        s.record(Stream {
            start: 0,
            end: 4 * MIB,
            window: 4 * MIB,
        });
        assert_eq!(s.window_for(100 * MIB, MIB, 8 * MIB), MIB, "far away: base");
        s.record(Stream {
            start: 100 * MIB,
            end: 101 * MIB,
            window: MIB,
        });
        assert_eq!(
            s.window_for(5 * MIB, MIB, 8 * MIB),
            8 * MIB,
            "the first walk goes on"
        );
        assert_eq!(
            s.window_for(101 * MIB, MIB, 8 * MIB),
            2 * MIB,
            "so does the second"
        );
    }

    #[test]
    fn streams_are_bounded() {
        let s = Streams::default();
        for i in 0..10 {
            s.record(Stream {
                start: i * 100 * MIB,
                end: i * 100 * MIB + MIB,
                window: MIB,
            });
        }
        assert_eq!(s.0.lock().unwrap().len(), STREAMS);
        assert_eq!(
            s.window_for(0, MIB, 8 * MIB),
            MIB,
            "the oldest stream was forgotten"
        );
    }
}
