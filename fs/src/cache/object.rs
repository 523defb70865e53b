//! Object files: one file per item of `SMALL_MAX` bytes or more (and per
//! whole-file object), under `objects/sha256/ab/<hex>`: where they go,
//! how they are written (temp name, then rename), read and verified.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use dashmap::mapref::entry::Entry as MapEntry;

use super::{Cache, CacheError, Entry, Location, disk_bytes, io_err, object_dir};
use crate::Digest;
use crate::digest::Hasher;

impl Cache {
    pub(super) fn read_object(
        &self,
        digest: &Digest,
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        let path = self.object_path(digest);
        let mut buf = vec![0u8; len];
        let read = File::open(&path).and_then(|f| f.read_exact_at(&mut buf, offset));
        match read {
            Ok(()) => Ok(Some(buf)),
            // Evicted, or removed or truncated behind our back: a miss, not
            // an error.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof
                ) =>
            {
                tracing::debug!(%digest, error = %e, "cache object vanished; dropping it");
                self.remove_entry(digest, |e| e.loc == Location::Object);
                Ok(None)
            }
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    pub(super) fn object_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.objects.join(&hex[0..2]).join(hex)
    }

    /// Writes an object file under a temp name and places it (see
    /// [`Cache::place_object`]), so a reader never sees a half-written file
    /// under the final name in this process (after a crash, verification
    /// catches what rename ordering without fsync may leave).
    pub(super) fn write_object(&self, digest: &Digest, data: &[u8]) -> Result<(), CacheError> {
        let path = self.object_path(digest);
        let dir = object_dir(&path);
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = self.tmp_path(digest);
        let written = fs::write(&tmp, data).and_then(|()| fs::metadata(&tmp));
        match written {
            Ok(meta) => self
                .place_object(digest, &tmp, data.len() as u64, disk_bytes(&meta))
                .map(|_| ()),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(io_err(&path)(e))
            }
        }
    }

    /// Renames the written object file `tmp` into place and indexes it, both
    /// under the entry's lock, which eviction also holds while it unlinks an
    /// object and drops its entry: a file under an object's name and its
    /// entry come and go together. (Renamed outside the lock, a racing
    /// insert of the same content could put its file back between an
    /// eviction's unlink and its removal of the entry: a file nothing
    /// counts, leaked until the next start.) A racing insert that landed
    /// first wins; this one's file is removed and its bytes count as
    /// deduplicated. Returns whether this one landed.
    pub(super) fn place_object(
        &self,
        digest: &Digest,
        tmp: &Path,
        len: u64,
        disk: u64,
    ) -> Result<bool, CacheError> {
        let path = self.object_path(digest);
        match self.index.entry(*digest) {
            MapEntry::Occupied(_) => {
                let _ = fs::remove_file(tmp);
                self.dedup_bytes.fetch_add(len, Ordering::Relaxed);
                Ok(false)
            }
            MapEntry::Vacant(v) => {
                if let Err(e) = fs::rename(tmp, &path) {
                    let _ = fs::remove_file(tmp);
                    return Err(io_err(&path)(e));
                }
                v.insert(Entry {
                    loc: Location::Object,
                    len,
                    verified: true,
                    disk,
                    stamp: self.now(),
                });
                self.bytes.fetch_add(len, Ordering::Relaxed);
                self.disk.fetch_add(disk, Ordering::Relaxed);
                Ok(true)
            }
        }
    }

    /// A fresh temp name beside the object's final path; `open` removes
    /// leftovers of a process that died mid-write.
    pub(super) fn tmp_path(&self, digest: &Digest) -> PathBuf {
        let path = self.object_path(digest);
        let dir = path.parent().expect("object path has a parent");
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        dir.join(format!(
            ".tmp-{}-{}-{seq}",
            digest.hex(),
            std::process::id()
        ))
    }

    /// Hashes an object file found on disk; drops it if it does not match.
    pub(super) fn verify_object(&self, digest: &Digest) -> Result<bool, CacheError> {
        let path = self.object_path(digest);
        let hashed = (|| -> io::Result<Digest> {
            let mut f = File::open(&path)?;
            let mut hasher = Hasher::default();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    return Ok(hasher.finish());
                }
                hasher.update(&buf[..n]);
            }
        })();
        let ok = match hashed {
            Ok(actual) => Some(actual) == self.content_digest(digest),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(&path)(e)),
        };
        if ok {
            self.mark_verified(digest);
        } else {
            self.reject(digest, "object file");
            let _ = fs::remove_file(&path);
        }
        Ok(ok)
    }
}
