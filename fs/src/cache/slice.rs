//! Chunks kept only inside a whole-file object.
//!
//! A whole-file object (`assemble.rs`) holds its chunks' bytes back to
//! back. Keeping the chunks' own copies too doubled the disk a
//! passthrough-served file took (measured in `make bench`'s P7 and S4; see
//! docs/architecture.md). Once the object is written and verified, each
//! chunk becomes a slice of it: its entry points into the object, its own
//! object file is unlinked (a pack record of it is dead until its pack is
//! compacted). A read of the chunk (through the daemon, from any layer
//! that lists it) reads the object at the slice's offset.
//!
//! A slice holds no disk of its own, so the size bound never evicts one,
//! and a read of it counts as a use of its object; `prune` keeps an object
//! that holds a kept chunk. When the object is evicted, the next read of a
//! slice finds the file gone and drops the slice (a miss, fetched and
//! verified again). Slices live in memory only: after a restart, opening a
//! layer makes the chunks of its files whose objects are still here slices
//! again ([`Cache::reslice`]), unverified: the first read of one hashes the
//! chunk's bytes in the object against the chunk's digest (as a pack record
//! found at startup is checked), and a slice that fails is dropped.

use std::fs;
use std::io;
use std::sync::atomic::Ordering;

use dashmap::mapref::entry::Entry as MapEntry;

use super::{Cache, CacheError, Entry, Location};
use crate::Digest;
use crate::num::usize_from;

impl Cache {
    /// Turns the `parts` (digest and length, in file order) of the
    /// whole-file object `file`, just written and verified, into slices of
    /// it. A part whose entry is not exactly as long as the file says is
    /// left alone: its bytes in the object are not the entry's.
    pub(super) fn slice_parts(&self, file: &Digest, parts: &[(Digest, u64)]) {
        let mut at = 0u64;
        for (part, len) in parts {
            let offset = at;
            at += len;
            if part == file {
                continue;
            }
            let Some(mut e) = self.index.get_mut(part) else {
                continue;
            };
            // A chunk in two files is a slice of the first only.
            if e.len != *len || matches!(e.loc, Location::Slice { .. }) {
                continue;
            }
            let old = e.loc;
            let disk = e.disk;
            e.loc = Location::Slice {
                file: *file,
                offset,
            };
            e.disk = 0;
            e.verified = true;
            drop(e);
            match old {
                Location::Object => {
                    let path = self.object_path(part);
                    match fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "cannot remove a chunk its whole file holds");
                        }
                    }
                    self.disk.fetch_sub(disk, Ordering::Relaxed);
                }
                Location::Pack { pack, .. } => {
                    self.packs[pack].live.fetch_sub(disk, Ordering::Relaxed);
                }
                Location::Slice { .. } => {}
            }
        }
    }

    /// Adds an unverified slice of the object `file` (`file_len` bytes) for
    /// each of `parts` (digest and length, in file order) the index lacks;
    /// nothing if `file` is not an object of that length.
    pub(super) fn add_slices(
        &self,
        file: &Digest,
        file_len: u64,
        parts: impl Iterator<Item = (Digest, u64)>,
    ) {
        let is_object = self
            .index
            .get(file)
            .is_some_and(|e| e.loc == Location::Object && e.len == file_len);
        if !is_object {
            return;
        }
        let mut at = 0u64;
        for (part, len) in parts {
            let offset = at;
            at = at.saturating_add(len);
            if part == *file || at > file_len {
                continue;
            }
            if let MapEntry::Vacant(v) = self.index.entry(part) {
                v.insert(Entry {
                    loc: Location::Slice {
                        file: *file,
                        offset,
                    },
                    len,
                    verified: false,
                    disk: 0,
                    stamp: self.now(),
                });
                self.bytes.fetch_add(len, Ordering::Relaxed);
            }
        }
    }

    /// The whole of the unverified slice `digest` (`len` bytes at `at` of
    /// the object `file`), checked against its digest: marked verified if
    /// it matches, dropped (a miss) if not.
    pub(super) fn read_unverified_slice(
        &self,
        digest: &Digest,
        file: &Digest,
        at: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        let Some(whole) = self.read_slice(digest, file, at, usize_from(len))? else {
            return Ok(None);
        };
        if Digest::of(&whole) != *digest {
            self.reject(digest, "slice");
            return Ok(None);
        }
        self.mark_verified(digest);
        Ok(Some(whole))
    }

    /// `len` bytes at `offset` of the object `file`, for the slice
    /// `digest`; `None` (and the slice dropped) if the object is gone.
    pub(super) fn read_slice(
        &self,
        digest: &Digest,
        file: &Digest,
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        let data = self.read_object(file, offset, len)?;
        match data {
            // The object is in use as much as its slice (least recently
            // used goes first).
            Some(_) => self.touch(file, 0),
            None => {
                self.remove_entry(digest, |e| matches!(e.loc, Location::Slice { .. }));
            }
        }
        Ok(data)
    }
}
