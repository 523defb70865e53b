//! The size bound: eviction in least-recently-used order, pack compaction,
//! release of what no mounted layer uses, and prune.
//!
//! **What counts.** Real disk use: object files' allocated blocks and pack
//! files' length, dead records included until their pack is rewritten.
//!
//! **When.** An insert that takes disk use past the bound runs one pass on
//! its own (blocking) thread; inserts racing it skip theirs, and the pass
//! looks again when it ends (up to [`MAX_PASSES`]). A pass evicts
//! down to [`LOW_WATER_PERCENT`] of the bound, so a full cache does not
//! pay for a pass on every insert.
//!
//! **Order.** Released entries (stamp 0: their last layer's snapshots were
//! removed) first, then by access stamp, oldest first. Never evicted: an
//! object something holds open ([`Hold`]: a passthrough file; unlinking it
//! would free nothing). Nothing else needs protecting: a read that waits
//! for a chunk gets its bytes from the flight that fetched it, not from the
//! cache; a mounted layer's index lives in memory; the tail bytes kept for
//! a chunk that straddles a layer's tail are a cache entry like any other,
//! and without them the chunk is fetched whole.
//!
//! **Safety.** An evicted object is unlinked under its entry's lock, just
//! before the entry leaves the index, and an inserted one is renamed into
//! place under the same lock: a reader that found the entry either has the
//! file open (and reads its bytes) or finds it gone (a miss, fetched and
//! verified again), and no racing insert can leave a file nothing counts. A pack
//! record's bytes stay where they are until its pack is compacted, and
//! compaction moves records only under the pack's write lock, under which
//! readers look their offsets up.
//!
//! **Compaction.** A pack is rewritten with only its live records when
//! their share drops below [`COMPACT_LIVE_SHARE`] percent, or when the
//! cache is still over its bound after evicting (most dead bytes first).
//! Rewriting a pack of live share `L` writes `L` bytes to free `1 - L`: at
//! 50% that is one byte written per byte freed, the point past which
//! compacting costs more writes than it frees.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{Cache, CacheError, Entry, Location, RELEASED, io_err, open_pack, pack, stamps};
use crate::Digest;
use crate::num::usize_from;

/// A pack is compacted when its live records are less than this share
/// (percent) of its length. See the module doc.
pub const COMPACT_LIVE_SHARE: u64 = 50;
/// An eviction pass stops at this share (percent) of the bound.
pub const LOW_WATER_PERCENT: u64 = 90;
/// Passes one call to the bound runs at most (see [`Cache::enforce_bound`]).
pub const MAX_PASSES: usize = 4;
/// An entry used this recently (seconds) is part of the working set: a
/// pass that must evict one says the cache is under pressure for as long.
pub const PRESSURE_SECS: u32 = 10;

/// What a prune freed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub entries: u64,
    /// Logical bytes of the entries removed.
    pub bytes: u64,
    pub disk_before: u64,
    pub disk_after: u64,
}

/// Keeps an object from eviction while it lives (a passthrough file open in
/// the kernel).
pub struct Hold {
    cache: Arc<Cache>,
    digest: Digest,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(mut n) = self.cache.held.get_mut(&self.digest) {
            *n = n.saturating_sub(1);
        }
        self.cache.held.remove_if(&self.digest, |_, n| *n == 0);
    }
}

/// The size of the filesystem holding `dir`, in bytes (for a bound given as
/// a share of it).
pub fn filesystem_bytes(dir: &Path) -> io::Result<u64> {
    let path = CString::new(dir.as_os_str().as_bytes())?;
    let mut st = MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is NUL-terminated and outlives the call; `st` is a
    // valid, writable statvfs the kernel fills.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    Ok(st.f_blocks.saturating_mul(st.f_frsize))
}

impl Cache {
    /// Bounds the disk use of the cache (`u64::MAX`: no bound) and evicts
    /// down to it now if it is over.
    pub fn set_max_bytes(&self, max: u64) {
        self.max_bytes.store(max, Ordering::Relaxed);
        self.enforce_bound();
    }

    /// Whether the bound is below the working set: within the last
    /// [`PRESSURE_SECS`] an eviction pass took an entry used no longer than
    /// that before. Speculative fetches (read-ahead, hints, background)
    /// stand down meanwhile: every byte they bring in evicts one a read is
    /// about to want, and the reads then fetch both again (`make bench`,
    /// `BENCH_CACHE_MAX_BYTES=8388608`: S1, whose reads need 6.9 MB,
    /// fetched 36 MB with no speculation and 63 MB with it).
    pub fn under_pressure(&self) -> bool {
        self.now() < self.pressure_until.load(Ordering::Relaxed)
    }

    /// Keeps `digest`'s object from eviction until the guard is dropped.
    pub fn hold(self: &Arc<Self>, digest: &Digest) -> Hold {
        *self.held.entry(*digest).or_insert(0) += 1;
        Hold {
            cache: self.clone(),
            digest: *digest,
        }
    }

    /// Marks `digests` as used by no mounted layer: they go first when
    /// space is needed (or at the next prune) and are not counted as in
    /// use; a read takes them back into use. Returns the bytes released.
    pub fn release<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) -> u64 {
        let mut released = 0;
        let mut files = HashSet::new();
        for d in digests {
            if let Some(mut e) = self.index.get_mut(d)
                && e.stamp != RELEASED
            {
                e.stamp = RELEASED;
                released += e.len;
                if let Location::Slice { file, .. } = e.loc {
                    files.insert(file);
                }
            }
        }
        // A whole-file object (`slice.rs`) goes with its chunks: released
        // once no chunk it holds is in use.
        if !files.is_empty() {
            let in_use = self.holding(|_, e| e.stamp != RELEASED);
            for file in files.difference(&in_use) {
                if let Some(mut e) = self.index.get_mut(file)
                    && e.stamp != RELEASED
                {
                    e.stamp = RELEASED;
                    released += e.len;
                }
            }
        }
        self.released.fetch_add(released, Ordering::Relaxed);
        released
    }

    /// Removes `digests`' entries now, held or not, and compacts the packs
    /// they leave dead records in: content found wrong after it was cached
    /// (an overlaybd layer whose blob failed its sha256) must not be
    /// served again, nor found again after a restart. Not counted as
    /// evictions. Returns the entries removed.
    pub fn discard<'a>(&self, digests: impl IntoIterator<Item = &'a Digest>) -> u64 {
        let _pass = self.evicting.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        for digest in digests {
            let Some(loc) = self.index.get(digest).map(|e| e.loc) else {
                continue;
            };
            let gone = self.remove_entry(digest, |e| {
                e.loc == loc && (loc != Location::Object || self.unlink_object(digest))
            });
            removed += u64::from(gone.is_some());
        }
        for i in 0..self.packs.len() {
            if self.pack_dead(i) > 0 {
                self.compact_logged(i);
            }
        }
        removed
    }

    /// The whole-file objects holding a slice `pick` chooses (given the
    /// slice's digest and entry).
    fn holding(&self, pick: impl Fn(&Digest, &Entry) -> bool) -> HashSet<Digest> {
        self.index
            .iter()
            .filter_map(|r| match r.value().loc {
                Location::Slice { file, .. } if pick(r.key(), r.value()) => Some(file),
                _ => None,
            })
            .collect()
    }

    /// Removes released entries (`keep: None`), or every entry not in
    /// `keep` (the chunks of the layers mounted now), and compacts every
    /// pack with dead records. Held objects stay.
    pub fn prune(&self, keep: Option<&HashSet<Digest>>) -> Pruned {
        let pruned = self.prune_pass(keep);
        // Inserts that raced the prune skipped their passes.
        self.enforce_bound();
        pruned
    }

    fn prune_pass(&self, keep: Option<&HashSet<Digest>>) -> Pruned {
        let _pass = self.evicting.lock().unwrap_or_else(|e| e.into_inner());
        let disk_before = self.disk.load(Ordering::Relaxed);
        // A whole-file object holding a chunk that stays (`slice.rs`)
        // stays.
        let holding = match keep {
            None => self.holding(|_, e| e.stamp != RELEASED),
            Some(keep) => self.holding(|d, _| keep.contains(d)),
        };
        let doomed = |d: &Digest, e: &Entry| match keep {
            None => e.stamp == RELEASED && !holding.contains(d),
            Some(keep) => !keep.contains(d) && !holding.contains(d),
        };
        let (entries, bytes) = self.evict_until(u64::MAX, doomed);
        for i in 0..self.packs.len() {
            if self.pack_dead(i) > 0 {
                self.compact_logged(i);
            }
        }
        self.save_stamps();
        Pruned {
            entries,
            bytes,
            disk_before,
            disk_after: self.disk.load(Ordering::Relaxed),
        }
    }

    /// Runs eviction passes while disk use is over the bound and no other
    /// pass is running. Inserts that race a pass skip theirs, so a pass
    /// looks again when it ends: what they added does not wait for the
    /// next insert to be evicted. It stops when a pass frees nothing (held
    /// objects alone over the bound).
    pub(super) fn enforce_bound(&self) {
        for _ in 0..MAX_PASSES {
            let max = self.max_bytes.load(Ordering::Relaxed);
            if self.disk.load(Ordering::Relaxed) <= max {
                return;
            }
            let Ok(_pass) = self.evicting.try_lock() else {
                return;
            };
            if !self.evict_pass(max) {
                return;
            }
        }
    }

    /// One pass for the bound `max`: evicts down to the low-water mark and
    /// compacts the packs that need it. The caller holds `evicting`.
    /// Returns whether it freed anything (evicted or compacted).
    fn evict_pass(&self, max: u64) -> bool {
        let low = max / 100 * LOW_WATER_PERCENT;
        let (entries, bytes) = self.evict_until(low, |_, _| true);
        let mut packs: Vec<(u64, usize)> = (0..self.packs.len())
            .map(|i| (self.pack_dead(i), i))
            .filter(|(dead, _)| *dead > 0)
            .collect();
        packs.sort_unstable_by(|a, b| b.cmp(a));
        let mut compacted = 0;
        for (_, i) in packs {
            let end = self.pack_end(i);
            let live = self.packs[i].live.load(Ordering::Relaxed);
            let sparse = live.saturating_mul(100) < end.saturating_mul(COMPACT_LIVE_SHARE);
            if sparse || self.disk.load(Ordering::Relaxed) > max {
                self.compact_logged(i);
                compacted += 1;
            }
        }
        tracing::debug!(
            entries,
            bytes,
            disk = self.disk.load(Ordering::Relaxed),
            max,
            "cache eviction pass"
        );
        self.save_stamps();
        entries > 0 || compacted > 0
    }

    /// Evicts entries `doomed` picks, released first and then oldest first,
    /// until disk use is at most `target` (`u64::MAX`: every one picked)
    /// once dead pack records are compacted away. Returns the entries and
    /// logical bytes evicted.
    fn evict_until(&self, target: u64, doomed: impl Fn(&Digest, &Entry) -> bool) -> (u64, u64) {
        // A slice (`slice.rs`) frees nothing: a bounded pass leaves it to
        // its object.
        let frees = |e: &Entry| target == u64::MAX || e.disk > 0;
        let mut candidates: Vec<(u32, Digest)> = self
            .index
            .iter()
            .filter(|r| {
                doomed(r.key(), r.value()) && frees(r.value()) && !self.held.contains_key(r.key())
            })
            .map(|r| (r.value().stamp, *r.key()))
            .collect();
        candidates.sort_unstable();
        let dead: u64 = (0..self.packs.len()).map(|i| self.pack_dead(i)).sum();
        let mut projected = self.disk.load(Ordering::Relaxed).saturating_sub(dead);
        let (mut entries, mut bytes) = (0, 0);
        let now = self.now();
        let recent = now.saturating_sub(PRESSURE_SECS);
        for (stamp, digest) in candidates {
            if target != u64::MAX && projected <= target {
                break;
            }
            if let Some(e) = self.evict_one(&digest) {
                projected = projected.saturating_sub(e.disk);
                entries += 1;
                bytes += e.len;
                // Only a pass for the bound says anything about the working
                // set (a prune takes what it is told to).
                if target != u64::MAX && stamp >= recent {
                    let was = self
                        .pressure_until
                        .fetch_max(now.saturating_add(PRESSURE_SECS), Ordering::Relaxed);
                    if was <= now {
                        tracing::warn!(
                            max_bytes = self.max_bytes.load(Ordering::Relaxed),
                            "cache under pressure: evicting chunks used in the last {PRESSURE_SECS} s \
                             (the bound is below the working set); no fetching ahead meanwhile"
                        );
                    }
                }
            }
        }
        (entries, bytes)
    }

    /// Evicts one entry unless it is held. An object is unlinked under its
    /// entry's lock, just before the entry leaves the index (see the module
    /// doc and [`Cache::place_object`]).
    fn evict_one(&self, digest: &Digest) -> Option<Entry> {
        if self.held.contains_key(digest) {
            return None;
        }
        let loc = self.index.get(digest)?.loc;
        let e = self.remove_entry(digest, |e| {
            e.loc == loc && (loc != Location::Object || self.unlink_object(digest))
        })?;
        self.evictions.fetch_add(1, Ordering::Relaxed);
        self.evicted_bytes.fetch_add(e.len, Ordering::Relaxed);
        Some(e)
    }

    /// Removes an object's file; whether it is gone.
    fn unlink_object(&self, digest: &Digest) -> bool {
        let path = self.object_path(digest);
        match fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot evict cache object");
                false
            }
        }
    }

    fn pack_end(&self, i: usize) -> u64 {
        *self.packs[i].end.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of pack `i` no entry uses.
    fn pack_dead(&self, i: usize) -> u64 {
        self.pack_end(i)
            .saturating_sub(self.packs[i].live.load(Ordering::Relaxed))
    }

    fn compact_logged(&self, i: usize) {
        if let Err(e) = self.compact(i) {
            tracing::warn!(pack = i, error = %e, "cache pack compaction failed");
        }
    }

    /// Rewrites pack `i` with only its live records (appends wait; reads go
    /// on against the old file until the swap).
    fn compact(&self, i: usize) -> Result<(), CacheError> {
        let p = &self.packs[i];
        let mut end = p.end.lock().unwrap_or_else(|e| e.into_inner());
        let mut live: Vec<(u64, Digest, u64)> = self
            .index
            .iter()
            .filter_map(|r| match r.value().loc {
                Location::Pack { pack, offset } if pack == i => {
                    Some((offset, *r.key(), r.value().len))
                }
                _ => None,
            })
            .collect();
        live.sort_unstable();
        let tmp = p.path.with_extension(pack::COMPACTING_EXT);
        let mut moved = Vec::with_capacity(live.len());
        let mut rewrite = || -> io::Result<(u64, File)> {
            let mut out = BufWriter::new(File::create(&tmp)?);
            let file = p.file.read().unwrap_or_else(|e| e.into_inner());
            let mut at = 0u64;
            let mut buf = Vec::new();
            for (old, digest, len) in &live {
                buf.resize(usize_from(*len), 0);
                file.read_exact_at(&mut buf, *old)?;
                let len32 = u32::try_from(*len).map_err(io::Error::other)?;
                out.write_all(&pack::header(digest, len32))?;
                out.write_all(&buf)?;
                moved.push((*digest, *old, at + pack::HEADER_LEN as u64));
                at += pack::HEADER_LEN as u64 + len;
            }
            out.into_inner().map_err(io::IntoInnerError::into_error)?;
            Ok((at, open_pack(&tmp).map_err(io::Error::other)?))
        };
        let (new_len, new_file) = rewrite().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(&tmp)(e)
        })?;
        {
            let mut file = p.file.write().unwrap_or_else(|e| e.into_inner());
            fs::rename(&tmp, &p.path).map_err(io_err(&p.path))?;
            *file = new_file;
            for (digest, old, new) in moved {
                if let Some(mut e) = self.index.get_mut(&digest)
                    && e.loc
                        == (Location::Pack {
                            pack: i,
                            offset: old,
                        })
                {
                    e.loc = Location::Pack {
                        pack: i,
                        offset: new,
                    };
                }
            }
        }
        self.disk
            .fetch_sub(end.saturating_sub(new_len), Ordering::Relaxed);
        *end = new_len;
        self.compactions.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes every entry's access stamp to `ROOT/stamps` (failures are
    /// logged: they cost eviction order after a restart, nothing else).
    pub(super) fn save_stamps(&self) {
        let all: Vec<(Digest, u32)> = self
            .index
            .iter()
            .map(|r| (*r.key(), r.value().stamp))
            .collect();
        let path = self.root.join(stamps::FILE);
        if let Err(e) = stamps::save(&path, &all) {
            tracing::warn!(path = %path.display(), error = %e, "cannot save cache access stamps");
        }
    }
}
