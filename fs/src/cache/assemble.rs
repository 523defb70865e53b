//! Whole-file objects: one standalone, verified file holding exactly a
//! regular file's content, which the kernel can read directly (FUSE
//! passthrough; the kernel-facing part is `fuse/passthrough.rs`).
//!
//! Which files get one is decided here ([`WholeFile::of`]): those of at
//! least [`SMALL_MAX`] bytes (smaller ones live in packs, with no file of
//! their own, and are cheap to serve through the daemon anyway). A file of
//! one chunk has its chunk's object; a multi-chunk file gets one assembled
//! from its cached chunks under its whole-file digest, verified while
//! written ([`Cache::assemble`]).
//!
//! The object would duplicate its chunks' bytes on disk. Once it is made,
//! the chunks it was built from become slices of it (`slice.rs`): their
//! own copies go, and reads of them (from any layer) read the object.

use std::fs::{self, File};
use std::io::Write;
use std::path::PathBuf;

use super::{Cache, CacheError, Location, SMALL_MAX, disk_bytes, io_err, object_dir};
use crate::Digest;
use crate::digest::Hasher;
use crate::format::Chunk;

/// How much of a part is read and written at a time.
const STEP: usize = 1 << 20;

/// What [`Cache::assemble`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Assembled {
    /// The whole-file object exists now (made here or already present).
    Done,
    /// Another thread is assembling the same digest.
    InProgress,
    /// A part is not (or no longer) cached; nothing was written.
    PartMissing,
    /// The parts do not hash to the file digest; nothing was kept.
    Mismatch,
}

/// A regular file worth a standalone object, and that object's key.
#[derive(Clone, Copy, Debug)]
pub struct WholeFile<'a> {
    key: Digest,
    size: u64,
    /// The file's chunks, in file order.
    chunks: &'a [Chunk],
}

impl<'a> WholeFile<'a> {
    /// The whole-file object of a regular file of `size` bytes made of
    /// `chunks` (in file order): keyed by its only chunk, or else by its
    /// whole-file digest (`file_digest`, asked only then). `None` for a file
    /// not worth one (smaller than [`SMALL_MAX`]) or without a usable key.
    pub fn of(
        size: u64,
        chunks: &'a [Chunk],
        file_digest: impl FnOnce() -> Option<Digest>,
    ) -> Option<WholeFile<'a>> {
        if size < SMALL_MAX as u64 {
            return None;
        }
        let key = match chunks {
            [only] if only.file_offset == 0 && only.size == size => only.digest,
            _ => file_digest()?,
        };
        Some(WholeFile { key, size, chunks })
    }

    pub fn key(&self) -> Digest {
        self.key
    }
}

/// Blocking work that gives a file a verified standalone object; run it
/// off any thread that must not wait (a FUSE worker, an async worker).
#[derive(Debug)]
pub enum Preparation {
    /// The object was found on disk at startup: hash it once.
    Verify(Digest),
    /// Every chunk is cached: write them out as one verified object.
    Assemble {
        key: Digest,
        parts: Vec<(Digest, u64)>,
    },
}

impl Preparation {
    /// Does the work; `true` if a whole-file object was assembled (or found
    /// assembled). Failures are logged: a file without its object is served
    /// through the daemon, as before.
    pub fn run(self, cache: &Cache) -> bool {
        match self {
            Preparation::Verify(key) => {
                cache.file_path(&key);
                false
            }
            Preparation::Assemble { key, parts } => match cache.assemble(&key, &parts) {
                Ok(Assembled::Done) => true,
                Ok(other) => {
                    tracing::debug!(digest = %key, outcome = ?other, "whole file not assembled");
                    false
                }
                Err(e) => {
                    tracing::warn!(digest = %key, error = %e, "assembling a whole file failed");
                    false
                }
            },
        }
    }
}

impl Cache {
    /// The verified standalone object holding exactly `file`'s content, if
    /// there is one now. Never hashes anything: cheap enough for an `open`
    /// on a FUSE thread.
    pub fn whole_file(&self, file: &WholeFile<'_>) -> Option<PathBuf> {
        let (path, len) = self.verified_file(&file.key)?;
        // A whole-file digest shared with other content of another size
        // would be a lying TOC; never hand such a file out.
        (len == file.size).then_some(path)
    }

    /// What would give `file` a verified standalone object now, if anything
    /// can: verifying one found on disk, or assembling one once every chunk
    /// is cached. In-memory lookups only.
    pub fn prepare_whole_file(&self, file: &WholeFile<'_>) -> Option<Preparation> {
        if self.contains(&file.key) {
            return self
                .verified_file(&file.key)
                .is_none()
                .then_some(Preparation::Verify(file.key));
        }
        if file.chunks.len() < 2 || !file.chunks.iter().all(|c| self.contains(&c.digest)) {
            return None;
        }
        Some(Preparation::Assemble {
            key: file.key,
            parts: file.chunks.iter().map(|c| (c.digest, c.size)).collect(),
        })
    }

    /// Makes the chunks of `file` that the cache lacks slices of its
    /// whole-file object, when that object is here: one another image's
    /// file assembled, or this layer's before a restart (slices live in
    /// memory only). Each such slice is checked against its own digest on
    /// its first read, so a TOC that lies about a chunk cannot make the
    /// object answer for it. In-memory lookups only.
    pub fn reslice(&self, file: &WholeFile<'_>) {
        if file.chunks.len() < 2 {
            return;
        }
        let parts = file.chunks.iter().map(|c| (c.digest, c.size));
        self.add_slices(&file.key, file.size, parts);
    }

    /// Writes the concatenation of the cached `parts` (digest and length,
    /// in file order) as the object `digest`, hashing while writing. The
    /// object is indexed only if the bytes hash to `digest`, so an
    /// unverified whole file is never exposed. Blocking: reads and writes
    /// the whole file.
    pub fn assemble(
        &self,
        digest: &Digest,
        parts: &[(Digest, u64)],
    ) -> Result<Assembled, CacheError> {
        if self.index.contains_key(digest) {
            return Ok(Assembled::Done);
        }
        if self.assembling.insert(*digest, ()).is_some() {
            return Ok(Assembled::InProgress);
        }
        // Removes the in-flight mark however this returns.
        struct Flight<'a>(&'a Cache, Digest);
        impl Drop for Flight<'_> {
            fn drop(&mut self) {
                self.0.assembling.remove(&self.1);
            }
        }
        let _flight = Flight(self, *digest);

        let path = self.object_path(digest);
        let dir = object_dir(&path);
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = self.tmp_path(digest);
        let outcome = self.write_parts(&tmp, parts);
        let outcome = match outcome {
            Ok(Some((actual, _))) if actual != *digest => {
                tracing::warn!(%digest, %actual, "file chunks do not hash to the file digest");
                Ok(Assembled::Mismatch)
            }
            Ok(Some((_, len))) => {
                let placed = match fs::metadata(&tmp) {
                    Ok(meta) => self.place_object(digest, &tmp, len, disk_bytes(&meta)),
                    Err(e) => Err(io_err(&path)(e)),
                };
                match placed {
                    Ok(landed) => {
                        if landed {
                            self.slice_parts(digest, parts);
                        }
                        self.enforce_bound();
                        return Ok(Assembled::Done);
                    }
                    Err(e) => Err(e),
                }
            }
            Ok(None) => Ok(Assembled::PartMissing),
            Err(e) => Err(e),
        };
        let _ = fs::remove_file(&tmp);
        outcome
    }

    /// Copies the parts into `tmp`; `None` if one is missing. Returns the
    /// digest and length of what was written.
    fn write_parts(
        &self,
        tmp: &std::path::Path,
        parts: &[(Digest, u64)],
    ) -> Result<Option<(Digest, u64)>, CacheError> {
        let mut out = File::create(tmp).map_err(io_err(tmp))?;
        let mut hasher = Hasher::default();
        let mut total = 0u64;
        for (part, len) in parts {
            let mut at = 0u64;
            while at < *len {
                let n = usize::try_from((*len - at).min(STEP as u64)).expect("step fits usize");
                // `read` verifies a part found on disk before serving it.
                let Some(buf) = self.read(part, at, n)? else {
                    return Ok(None);
                };
                hasher.update(&buf);
                out.write_all(&buf).map_err(io_err(tmp))?;
                at += n as u64;
            }
            total += len;
        }
        out.flush().map_err(io_err(tmp))?;
        Ok(Some((hasher.finish(), total)))
    }

    /// The path of the object `digest` and its length if it is a standalone
    /// file already trusted by this process; never hashes anything, so it is
    /// cheap enough for an `open` on a FUSE thread. An object found on disk
    /// is trusted only after [`Cache::file_path`] (or a read) verified it.
    pub fn verified_file(&self, digest: &Digest) -> Option<(PathBuf, u64)> {
        let entry = self.index.get(digest).map(|e| *e)?;
        match entry.loc {
            Location::Object if entry.verified => Some((self.object_path(digest), entry.len)),
            _ => None,
        }
    }
}
