//! What each kind of speculative fetch is worth: the compressed bytes it
//! fetched, and how many of them a read later used.
//!
//! A hint notes the chunks it fetches ([`Fetcher::speculating`]); a read
//! that lands on a noted chunk, cached or still on the wire, marks it used
//! ([`Fetcher::used`]) and it is forgotten. The notes are bounded: past
//! [`MAX_NOTED`] chunks a hint's bytes are counted as fetched and never as
//! used, which errs on the side of a lower hit rate.
//!
//! [`Fetcher::speculating`]: super::Fetcher::speculating
//! [`Fetcher::used`]: super::Fetcher::used

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::Digest;
use crate::format::Chunk;

/// Why a chunk was fetched before a read asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hint {
    /// The chunks after an on-demand miss in blob order, in its GET.
    ReadAhead,
    /// A program's shared libraries (`hints/elf.rs`).
    Library,
    /// The image's entrypoint and its interpreter (`hints/program.rs`).
    Entrypoint,
    /// An optimized image's prioritized files (before its landmark).
    Landmark,
    /// An overlaybd image's recorded trace (its acceleration layer).
    Trace,
    /// A start profile: what the image's workload read in its first
    /// seconds on an earlier start (`layer/profile.rs`).
    Profile,
    /// The modules a Python module imports (`hints/python.rs`).
    Import,
}

impl Hint {
    pub const ALL: [Hint; 7] = [
        Hint::ReadAhead,
        Hint::Library,
        Hint::Entrypoint,
        Hint::Landmark,
        Hint::Trace,
        Hint::Profile,
        Hint::Import,
    ];

    /// The name `tarn status` and the bench print.
    pub fn name(self) -> &'static str {
        match self {
            Hint::ReadAhead => "read-ahead",
            Hint::Library => "library",
            Hint::Entrypoint => "entrypoint",
            Hint::Landmark => "landmark",
            Hint::Trace => "trace",
            Hint::Profile => "profile",
            Hint::Import => "import",
        }
    }

    fn index(self) -> usize {
        match self {
            Hint::ReadAhead => 0,
            Hint::Library => 1,
            Hint::Entrypoint => 2,
            Hint::Landmark => 3,
            Hint::Trace => 4,
            Hint::Profile => 5,
            Hint::Import => 6,
        }
    }
}

/// Chunks noted at once per layer (~100 bytes each).
pub const MAX_NOTED: usize = 1 << 16;

/// One hint kind's figures.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HintCount {
    /// Compressed bytes fetched for this hint.
    pub fetched: u64,
    /// Of those, the bytes of chunks a read used later.
    pub used: u64,
}

impl HintCount {
    /// `used / fetched`, if anything was fetched.
    pub fn hit_rate(&self) -> Option<f64> {
        (self.fetched > 0).then(|| self.used as f64 / self.fetched as f64)
    }
}

/// The figures of every hint kind, in [`Hint::ALL`]'s order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HintCounts(pub [HintCount; Hint::ALL.len()]);

impl HintCounts {
    pub fn get(&self, hint: Hint) -> HintCount {
        self.0[hint.index()]
    }

    /// Adds `other`'s figures to these (several layers' sum).
    pub fn add(&mut self, other: &HintCounts) {
        for (mine, theirs) in self.0.iter_mut().zip(&other.0) {
            mine.fetched += theirs.fetched;
            mine.used += theirs.used;
        }
    }

    /// `(hint, figures)` of the kinds that fetched anything.
    pub fn iter(&self) -> impl Iterator<Item = (Hint, HintCount)> + '_ {
        Hint::ALL
            .into_iter()
            .map(|h| (h, self.get(h)))
            .filter(|(_, c)| c.fetched > 0)
    }
}

/// The counters and notes of one fetcher (one layer).
#[derive(Debug, Default)]
pub struct HintStats {
    fetched: [AtomicU64; Hint::ALL.len()],
    used: [AtomicU64; Hint::ALL.len()],
    /// Noted chunks not used yet: their hint and compressed bytes.
    noted: Mutex<HashMap<Digest, (Hint, u64)>>,
    /// `noted.len()`, read without the lock on every read.
    len: AtomicUsize,
}

impl HintStats {
    /// `chunks` are being fetched for `hint`.
    pub(crate) fn note<'a>(&self, hint: Hint, chunks: impl IntoIterator<Item = &'a Chunk>) {
        let mut noted = self.noted.lock().unwrap_or_else(PoisonError::into_inner);
        let mut bytes = 0;
        for c in chunks {
            let len = c.blob_range.1.saturating_sub(c.blob_range.0);
            bytes += len;
            if noted.len() < MAX_NOTED {
                noted.entry(c.digest).or_insert((hint, len));
            }
        }
        self.len.store(noted.len(), Ordering::Release);
        self.fetched[hint.index()].fetch_add(bytes, Ordering::Relaxed);
    }

    /// A read covered `chunks`: those noted count as used, once.
    pub(crate) fn used<'a>(&self, chunks: impl IntoIterator<Item = &'a Chunk>) {
        if self.len.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut noted = self.noted.lock().unwrap_or_else(PoisonError::into_inner);
        for c in chunks {
            if let Some((hint, len)) = noted.remove(&c.digest) {
                self.used[hint.index()].fetch_add(len, Ordering::Relaxed);
            }
        }
        self.len.store(noted.len(), Ordering::Release);
    }

    pub fn snapshot(&self) -> HintCounts {
        let mut out = HintCounts::default();
        for (i, c) in out.0.iter_mut().enumerate() {
            c.fetched = self.fetched[i].load(Ordering::Relaxed);
            c.used = self.used[i].load(Ordering::Relaxed);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::chunk_at;

    #[test]
    fn a_chunk_counts_as_used_once_and_only_for_its_hint() {
        let s = HintStats::default();
        let (a, b) = (chunk_at(0, 100), chunk_at(100, 400));
        s.note(Hint::Library, [&a, &b]);
        s.used([&a]);
        s.used([&a]);
        let lib = s.snapshot().get(Hint::Library);
        assert_eq!((lib.fetched, lib.used), (400, 100));
        assert_eq!(lib.hit_rate(), Some(0.25));
        assert_eq!(s.snapshot().get(Hint::ReadAhead).hit_rate(), None);
    }
}
