//! Content-addressed store of verified bytes, keyed by digest.
//!
//! One [`Cache`] serves every layer the process mounts, so identical content
//! in different layers or images is stored once. On disk, under its root:
//!
//! ```text
//! lock                      flock: one process owns a cache root at a time
//! packs/pack-N.dat          small items (< 64 KiB) appended behind headers
//! objects/sha256/ab/<hex>   larger items and assembled whole files, one file
//!                           each (passthrough-able)
//! ```
//!
//! Which files get a whole-file object, and its assembly from cached
//! chunks, is decided here too (`assemble.rs`); `fuse/` only hands the
//! object to the kernel.
//!
//! Nothing is ever fsynced. Instead, trust is per process: bytes this process
//! wrote are served as they are (the page cache holds exactly what we wrote),
//! while an entry found on disk at [`Cache::open`] is re-hashed the first time
//! it is read and dropped if it does not match its digest. A crash (SIGKILL,
//! power loss) can therefore leave torn, zeroed or missing data behind, but
//! never make wrong bytes readable. Packs turn many small chunks into appends
//! to a few files instead of a file (and an inode) each.
//!
//! Seams for later: a size bound with LRU eviction (entries would carry an
//! access stamp; packs would need compaction) and dedup accounting, of which
//! [`CacheStats::dedup_bytes`] is the start.

mod assemble;
mod pack;

pub use assemble::{Assembled, Preparation, WholeFile};

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use crate::Digest;
use crate::digest::Hasher;

/// Items smaller than this go into pack files; larger ones get a file each,
/// which is also what makes a file worth a whole-file object (`assemble.rs`):
/// the one place this threshold is known.
pub(crate) const SMALL_MAX: usize = 64 * 1024;
/// Number of pack files; inserts pick one by digest, so a few packs spread
/// the append lock without making many files.
const PACKS: usize = 4;

/// Why the cache could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cache root {0} is in use by another process")]
    Locked(PathBuf),
    #[error("read of {len} bytes at {offset} is past the end of {digest} ({size} bytes)")]
    OutOfRange {
        digest: Digest,
        offset: u64,
        len: usize,
        size: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Counters of a cache since it was opened (entries and bytes: current).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: u64,
    pub bytes: u64,
    pub hits: u64,
    pub misses: u64,
    /// Entries found on disk that failed verification and were dropped.
    pub corrupt: u64,
    /// Bytes inserted that were already present (saved by dedup).
    pub dedup_bytes: u64,
}

#[derive(Clone, Copy, Debug)]
enum Location {
    Pack { pack: usize, offset: u64 },
    Object,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    loc: Location,
    len: u64,
    /// Hashed (or written) by this process; only then is it served as is.
    verified: bool,
}

struct Pack {
    path: PathBuf,
    file: File,
    /// Where the next record goes. Held while appending so records of
    /// concurrent inserts never interleave.
    end: Mutex<u64>,
}

/// The content-addressed store. `Send + Sync`; share it with an `Arc`.
/// All methods do blocking file I/O: async callers use `spawn_blocking`.
pub struct Cache {
    objects: PathBuf,
    packs: Vec<Pack>,
    index: DashMap<Digest, Entry>,
    bytes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    corrupt: AtomicU64,
    dedup_bytes: AtomicU64,
    tmp_seq: AtomicU64,
    /// Whole-file objects being assembled (see [`Cache::assemble`]).
    assembling: DashMap<Digest, ()>,
    /// Holds the flock for the cache's lifetime.
    _lock: File,
}

impl Cache {
    /// Opens (creating if needed) the cache under `dir`: scans pack headers,
    /// truncates torn pack tails, lists object files and removes leftover
    /// temp files. Entries found here are verified on their first read.
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        let objects = dir.join("objects").join("sha256");
        let packs_dir = dir.join("packs");
        fs::create_dir_all(&objects).map_err(io_err(&objects))?;
        fs::create_dir_all(&packs_dir).map_err(io_err(&packs_dir))?;
        let lock = lock_root(dir)?;

        let index = DashMap::new();
        let mut bytes = 0u64;
        let mut packs = Vec::with_capacity(PACKS);
        for i in 0..PACKS {
            let path = packs_dir.join(format!("pack-{i}.dat"));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err(&path))?;
            let (records, valid) = pack::scan(&file).map_err(io_err(&path))?;
            let file_len = file.metadata().map_err(io_err(&path))?.len();
            if file_len > valid {
                tracing::warn!(
                    pack = %path.display(),
                    dropped = file_len - valid,
                    "truncating torn tail of cache pack"
                );
                file.set_len(valid).map_err(io_err(&path))?;
            }
            for r in records {
                index.entry(r.digest).or_insert_with(|| {
                    bytes += u64::from(r.len);
                    Entry {
                        loc: Location::Pack {
                            pack: i,
                            offset: r.data_offset,
                        },
                        len: u64::from(r.len),
                        verified: false,
                    }
                });
            }
            packs.push(Pack {
                path,
                file,
                end: Mutex::new(valid),
            });
        }
        bytes += scan_objects(&objects, &index)?;

        Ok(Cache {
            objects,
            packs,
            index,
            bytes: AtomicU64::new(bytes),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            dedup_bytes: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
            assembling: DashMap::new(),
            _lock: lock,
        })
    }

    /// `len` bytes at `offset` of the content `digest`; `Ok(None)` when it is
    /// not cached (or was found corrupt, and has now been dropped).
    pub fn read(
        &self,
        digest: &Digest,
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        let Some(entry) = self.index.get(digest).map(|e| *e) else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > entry.len) {
            return Err(CacheError::OutOfRange {
                digest: *digest,
                offset,
                len,
                size: entry.len,
            });
        }
        if !entry.verified {
            // Small entries are read whole to verify them anyway: serve the
            // slice from that read instead of reading twice.
            if let Location::Pack { pack, offset: at } = entry.loc {
                let whole = self.read_whole_pack_entry(digest, pack, at, entry.len)?;
                return Ok(whole.map(|w| {
                    let start = usize::try_from(offset).expect("offset < entry len <= 64 KiB");
                    w[start..start + len].to_vec()
                }));
            }
            if !self.verify_object(digest)? {
                self.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
        }
        let mut buf = vec![0u8; len];
        match entry.loc {
            Location::Pack { pack, offset: at } => {
                let p = &self.packs[pack];
                p.file
                    .read_exact_at(&mut buf, at + offset)
                    .map_err(io_err(&p.path))?;
            }
            Location::Object => {
                let path = self.object_path(digest);
                let read = File::open(&path).and_then(|f| f.read_exact_at(&mut buf, offset));
                match read {
                    Ok(()) => {}
                    // Removed or truncated behind our back: a miss, not an error.
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::UnexpectedEof
                        ) =>
                    {
                        tracing::warn!(%digest, error = %e, "cache object vanished; dropping it");
                        self.drop_entry(digest);
                        self.misses.fetch_add(1, Ordering::Relaxed);
                        return Ok(None);
                    }
                    Err(e) => return Err(io_err(&path)(e)),
                }
            }
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(buf))
    }

    /// Whether `digest` has an entry. An entry found on disk at open may
    /// still fail verification on its first read, which then reports a miss.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.index.contains_key(digest)
    }

    /// Stores content the caller has verified (`sha256(data) == digest`).
    /// Inserting content that is already present costs nothing but a lookup;
    /// concurrent inserts of one digest are harmless.
    pub fn insert(&self, digest: &Digest, data: &[u8]) -> Result<(), CacheError> {
        debug_assert_eq!(Digest::of(data), *digest, "cache insert of unverified data");
        if self.index.contains_key(digest) {
            self.dedup_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        if data.len() < SMALL_MAX {
            if !self.append_to_pack(digest, data)? {
                self.dedup_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            return Ok(());
        }
        self.write_object(digest, data)?;
        let entry = Entry {
            loc: Location::Object,
            len: data.len() as u64,
            verified: true,
        };
        // A racing insert of the same object may have won; either entry holds
        // the same bytes, so count the bytes only for the one that lands.
        let mut landed = false;
        self.index.entry(*digest).or_insert_with(|| {
            landed = true;
            entry
        });
        if landed {
            self.bytes.fetch_add(entry.len, Ordering::Relaxed);
        } else {
            self.dedup_bytes.fetch_add(entry.len, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A standalone file holding exactly this content, if there is one (only
    /// items of 64 KiB or more get their own file). An entry found on disk is
    /// verified first, so this may hash the whole file once.
    pub fn file_path(&self, digest: &Digest) -> Option<PathBuf> {
        let entry = self.index.get(digest).map(|e| *e)?;
        if !matches!(entry.loc, Location::Object) {
            return None;
        }
        if !entry.verified {
            match self.verify_object(digest) {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "cannot verify cache object");
                    return None;
                }
            }
        }
        Some(self.object_path(digest))
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.index.len() as u64,
            bytes: self.bytes.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            corrupt: self.corrupt.load(Ordering::Relaxed),
            dedup_bytes: self.dedup_bytes.load(Ordering::Relaxed),
        }
    }

    fn object_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.objects.join(&hex[0..2]).join(hex)
    }

    /// Appends a record and indexes it; `false` if another thread stored the
    /// digest first.
    fn append_to_pack(&self, digest: &Digest, data: &[u8]) -> Result<bool, CacheError> {
        let pack = usize::from(digest.0[0]) % PACKS;
        let p = &self.packs[pack];
        let len = u32::try_from(data.len()).expect("pack items are < 64 KiB");
        let mut record = Vec::with_capacity(pack::HEADER_LEN as usize + data.len());
        record.extend_from_slice(&pack::header(digest, len));
        record.extend_from_slice(data);

        let mut end = p.end.lock().expect("pack lock poisoned");
        // Same digest, same pack: checking under the lock keeps duplicates out.
        if self.index.contains_key(digest) {
            return Ok(false);
        }
        // One write per record. If it fails halfway, `end` stays put and the
        // next record overwrites the partial one.
        p.file
            .write_all_at(&record, *end)
            .map_err(io_err(&p.path))?;
        let offset = *end + pack::HEADER_LEN;
        *end += record.len() as u64;
        // Insert while holding the lock so the contains check above sees it.
        let entry = Entry {
            loc: Location::Pack { pack, offset },
            len: u64::from(len),
            verified: true,
        };
        self.index.insert(*digest, entry);
        self.bytes.fetch_add(entry.len, Ordering::Relaxed);
        Ok(true)
    }

    /// Writes an object file under a temp name and renames it into place, so
    /// a reader never sees a half-written file under the final name in this
    /// process (after a crash, verification catches what rename ordering
    /// without fsync may leave).
    fn write_object(&self, digest: &Digest, data: &[u8]) -> Result<(), CacheError> {
        let path = self.object_path(digest);
        let dir = path.parent().expect("object path has a parent");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = self.tmp_path(digest);
        let write = || -> io::Result<()> {
            fs::write(&tmp, data)?;
            fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(&path)(e)
        })
    }

    /// A fresh temp name beside the object's final path; `open` removes
    /// leftovers of a process that died mid-write.
    fn tmp_path(&self, digest: &Digest) -> PathBuf {
        let path = self.object_path(digest);
        let dir = path.parent().expect("object path has a parent");
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        dir.join(format!(
            ".tmp-{}-{}-{seq}",
            digest.hex(),
            std::process::id()
        ))
    }

    fn read_whole_pack_entry(
        &self,
        digest: &Digest,
        pack: usize,
        at: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        let p = &self.packs[pack];
        let mut buf = vec![0u8; usize::try_from(len).expect("pack items are < 64 KiB")];
        p.file
            .read_exact_at(&mut buf, at)
            .map_err(io_err(&p.path))?;
        if Digest::of(&buf) != *digest {
            self.reject(digest, "pack record");
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        self.mark_verified(digest);
        self.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(buf))
    }

    /// Hashes an object file found on disk; drops it if it does not match.
    fn verify_object(&self, digest: &Digest) -> Result<bool, CacheError> {
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
            Ok(actual) => actual == *digest,
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

    fn mark_verified(&self, digest: &Digest) {
        if let Some(mut e) = self.index.get_mut(digest) {
            e.verified = true;
        }
    }

    fn reject(&self, digest: &Digest, what: &str) {
        tracing::warn!(%digest, "cache {what} failed verification; dropping it");
        self.corrupt.fetch_add(1, Ordering::Relaxed);
        self.drop_entry(digest);
    }

    fn drop_entry(&self, digest: &Digest) {
        // Only an unverified entry can be wrong; a verified one that raced in
        // (a fresh insert) stays.
        if let Some((_, e)) = self.index.remove_if(digest, |_, e| !e.verified) {
            self.bytes.fetch_sub(e.len, Ordering::Relaxed);
        }
    }
}

/// Takes an exclusive, non-blocking flock on `dir/lock`: two processes
/// appending to the same packs would corrupt each other's records.
fn lock_root(dir: &Path) -> Result<File, CacheError> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    // SAFETY: flock on a file descriptor we own and keep open; no memory is
    // passed to the kernel.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            return Err(CacheError::Locked(dir.to_path_buf()));
        }
        return Err(io_err(&path)(err));
    }
    Ok(file)
}

/// Indexes the object files (unverified) and removes temp files a previous
/// process left behind. Returns the bytes found.
fn scan_objects(objects: &Path, index: &DashMap<Digest, Entry>) -> Result<u64, CacheError> {
    let mut bytes = 0;
    for sub in fs::read_dir(objects).map_err(io_err(objects))? {
        let sub = sub.map_err(io_err(objects))?.path();
        if !sub.is_dir() {
            continue;
        }
        for item in fs::read_dir(&sub).map_err(io_err(&sub))? {
            let item = item.map_err(io_err(&sub))?;
            let name = item.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".tmp-") {
                let _ = fs::remove_file(item.path());
                continue;
            }
            let Ok(digest) = format!("sha256:{name}").parse::<Digest>() else {
                continue;
            };
            let len = item.metadata().map_err(io_err(&item.path()))?.len();
            index.entry(digest).or_insert_with(|| {
                bytes += len;
                Entry {
                    loc: Location::Object,
                    len,
                    verified: false,
                }
            });
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
