//! Whole-file objects assembled from cached chunks, so that a multi-chunk
//! file gets one standalone, verified file the kernel can read directly
//! (FUSE passthrough).
//!
//! This duplicates the file's bytes on disk (chunk objects plus the whole
//! file) until a size bound with eviction exists to reclaim either copy.

use std::fs::{self, File};
use std::io::Write;
use std::sync::atomic::Ordering;

use super::{Cache, CacheError, Entry, Location, io_err};
use crate::Digest;
use crate::digest::Hasher;

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

impl Cache {
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
        let dir = path.parent().expect("object path has a parent");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = self.tmp_path(digest);
        let outcome = self.write_parts(&tmp, parts);
        let outcome = match outcome {
            Ok(Some((actual, _))) if actual != *digest => {
                tracing::warn!(%digest, %actual, "file chunks do not hash to the file digest");
                Ok(Assembled::Mismatch)
            }
            Ok(Some((_, len))) => match fs::rename(&tmp, &path) {
                Ok(()) => {
                    let entry = Entry {
                        loc: Location::Object,
                        len,
                        verified: true,
                    };
                    let mut landed = false;
                    self.index.entry(*digest).or_insert_with(|| {
                        landed = true;
                        entry
                    });
                    if landed {
                        self.bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    return Ok(Assembled::Done);
                }
                Err(e) => Err(io_err(&path)(e)),
            },
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
    pub fn verified_file(&self, digest: &Digest) -> Option<(std::path::PathBuf, u64)> {
        let entry = self.index.get(digest).map(|e| *e)?;
        match entry.loc {
            Location::Object if entry.verified => Some((self.object_path(digest), entry.len)),
            _ => None,
        }
    }
}
