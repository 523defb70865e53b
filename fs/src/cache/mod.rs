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
//! object to the kernel. Once assembled, the object holds its chunks: they
//! become slices of it (`slice.rs`), so a file's bytes are stored once.
//!
//! Nothing is ever fsynced. Instead, trust is per process: bytes this process
//! wrote are served as they are (the page cache holds exactly what we wrote),
//! while an entry found on disk at [`Cache::open`] is re-hashed the first time
//! it is read and dropped if it does not match its digest. A crash (SIGKILL,
//! power loss) can therefore leave torn, zeroed or missing data behind, but
//! never make wrong bytes readable. Packs turn many small chunks into appends
//! to a few files instead of a file (and an inode) each.
//!
//! A size bound (`evict.rs`): real disk use (object files' blocks, pack
//! files' length) is kept under [`Cache::set_max_bytes`] by evicting entries
//! in least-recently-used order. Each entry carries a coarse access stamp
//! (seconds; written at most once a second per entry, so a hit costs an
//! index write only when the second changed); the stamps are saved to
//! `stamps` (`stamps.rs`) after every eviction pass and when the cache is
//! dropped, so the order survives restarts. An entry released by the
//! snapshotter (its last layer went) has stamp 0: it goes first and is not
//! counted as in use.

mod assemble;
mod evict;
mod listing;
mod locations;
mod object;
mod pack;
mod slice;
mod stamps;

pub use assemble::{Assembled, Preparation, WholeFile};
pub use evict::{COMPACT_LIVE_SHARE, Hold, Pruned, filesystem_bytes};
pub use listing::{Listing, list};
pub use locations::{is_location, location_key};

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use dashmap::DashMap;

use crate::Digest;
use crate::num::usize_from;

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
    /// Logical bytes of the entries (what they hold).
    pub bytes: u64,
    /// Disk bytes: object files' blocks plus pack files' length (dead
    /// records of evicted items included until their pack is compacted).
    pub disk_bytes: u64,
    /// Logical bytes of entries released (no mounted layer uses them):
    /// first to go, not in use.
    pub released_bytes: u64,
    /// The bound on `disk_bytes`; `u64::MAX`: none.
    pub max_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    /// Bytes served from the cache by hits.
    pub served_bytes: u64,
    /// Entries found on disk that failed verification and were dropped.
    pub corrupt: u64,
    /// Bytes inserted that were already present (saved by dedup).
    pub dedup_bytes: u64,
    /// Entries evicted (by the bound or a prune) and their logical bytes.
    pub evictions: u64,
    pub evicted_bytes: u64,
    /// Packs rewritten without their dead records.
    pub compactions: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Location {
    Pack {
        pack: usize,
        offset: u64,
    },
    Object,
    /// Inside the whole-file object `file` from `offset` (`slice.rs`).
    Slice {
        file: Digest,
        offset: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    loc: Location,
    len: u64,
    /// Hashed (or written) by this process; only then is it served as is.
    verified: bool,
    /// Disk bytes the entry holds: an object file's blocks, a pack record
    /// (header and data).
    disk: u64,
    /// Last access, seconds since the Unix epoch; [`RELEASED`]: no mounted
    /// layer uses it.
    stamp: u32,
}

/// The stamp of a released entry: older than any access.
const RELEASED: u32 = 0;
/// The stamp of an entry found on disk without a saved stamp (a crash
/// lost it): older than any access, newer than released.
const UNKNOWN: u32 = 1;

struct Pack {
    path: PathBuf,
    /// Read under the read lock; compaction swaps in the rewritten file and
    /// moves the records' offsets under the write lock, so a reader that
    /// looks its offset up under the read lock reads the file it names.
    file: RwLock<File>,
    /// Where the next record goes. Held while appending so records of
    /// concurrent inserts never interleave, and while compacting.
    end: Mutex<u64>,
    /// Bytes of the records still indexed (header and data).
    live: AtomicU64,
}

/// The content-addressed store. `Send + Sync`; share it with an `Arc`.
/// All methods do blocking file I/O: async callers use `spawn_blocking`.
pub struct Cache {
    root: PathBuf,
    objects: PathBuf,
    packs: Vec<Pack>,
    index: DashMap<Digest, Entry>,
    bytes: AtomicU64,
    disk: AtomicU64,
    released: AtomicU64,
    max_bytes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    served: AtomicU64,
    corrupt: AtomicU64,
    dedup_bytes: AtomicU64,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    compactions: AtomicU64,
    tmp_seq: AtomicU64,
    /// Added to the wall clock's seconds (tests age entries with it).
    clock_skew: AtomicU32,
    /// Until when (a stamp, seconds) the cache is *thrashing*: an eviction
    /// pass had to take entries used within [`evict::PRESSURE_SECS`], so
    /// the bound is below the working set (see [`Cache::under_pressure`]).
    pressure_until: AtomicU32,
    /// One eviction pass or prune at a time.
    evicting: Mutex<()>,
    /// Objects something outside holds open (a passthrough file): never
    /// evicted, since unlinking them would free nothing.
    held: DashMap<Digest, usize>,
    /// Whole-file objects being assembled (see [`Cache::assemble`]).
    assembling: DashMap<Digest, ()>,
    /// Content digests of location-keyed entries (`locations.rs`).
    locations: locations::Locations,
    /// Holds the flock for the cache's lifetime.
    _lock: File,
}

impl Cache {
    /// Opens (creating if needed) the cache under `dir`: scans pack headers,
    /// truncates torn pack tails, lists object files, removes leftover
    /// temp files and loads the saved access stamps. Entries found here are
    /// verified on their first read. No size bound until
    /// [`Cache::set_max_bytes`].
    pub fn open(dir: &Path) -> Result<Cache, CacheError> {
        let objects = dir.join("objects").join("sha256");
        let packs_dir = dir.join("packs");
        fs::create_dir_all(&objects).map_err(io_err(&objects))?;
        fs::create_dir_all(&packs_dir).map_err(io_err(&packs_dir))?;
        let lock = lock_root(dir)?;

        let index = DashMap::new();
        let mut bytes = 0u64;
        let mut disk = 0u64;
        let mut packs = Vec::with_capacity(PACKS);
        for i in 0..PACKS {
            let path = pack_path(&packs_dir, i);
            // A compaction cut short by a crash leaves its rewrite behind.
            let _ = fs::remove_file(path.with_extension(pack::COMPACTING_EXT));
            let file = open_pack(&path)?;
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
            let mut live = 0u64;
            for r in records {
                index.entry(r.digest).or_insert_with(|| {
                    let record = pack::HEADER_LEN as u64 + u64::from(r.len);
                    bytes += u64::from(r.len);
                    live += record;
                    Entry {
                        loc: Location::Pack {
                            pack: i,
                            offset: r.data_offset,
                        },
                        len: u64::from(r.len),
                        verified: false,
                        disk: record,
                        stamp: UNKNOWN,
                    }
                });
            }
            disk += valid;
            packs.push(Pack {
                path,
                file: RwLock::new(file),
                end: Mutex::new(valid),
                live: AtomicU64::new(live),
            });
        }
        let (object_bytes, object_disk) = scan_objects(&objects, &index)?;
        bytes += object_bytes;
        disk += object_disk;

        let locations =
            locations::Locations::open(&dir.join(locations::FILE), |k| index.contains_key(k));
        let saved = stamps::load(&dir.join(stamps::FILE));
        let mut released = 0u64;
        for (digest, stamp) in saved {
            if let Some(mut e) = index.get_mut(&digest) {
                e.stamp = stamp;
                if stamp == RELEASED {
                    released += e.len;
                }
            }
        }

        Ok(Cache {
            root: dir.to_path_buf(),
            objects,
            packs,
            index,
            bytes: AtomicU64::new(bytes),
            disk: AtomicU64::new(disk),
            released: AtomicU64::new(released),
            max_bytes: AtomicU64::new(u64::MAX),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            served: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            dedup_bytes: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            pressure_until: AtomicU32::new(0),
            compactions: AtomicU64::new(0),
            tmp_seq: AtomicU64::new(0),
            clock_skew: AtomicU32::new(0),
            evicting: Mutex::new(()),
            held: DashMap::new(),
            assembling: DashMap::new(),
            locations,
            _lock: lock,
        })
    }

    /// `len` bytes at `offset` of the content `digest`; `Ok(None)` when it is
    /// not cached (or was found corrupt, and has now been dropped, or was
    /// evicted while this read looked).
    pub fn read(
        &self,
        digest: &Digest,
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        let Some(entry) = self.index.get(digest).map(|e| *e) else {
            return Ok(self.miss());
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
        let data = match entry.loc {
            Location::Pack { pack, .. } if !entry.verified => {
                // Small entries are read whole to verify them anyway: serve
                // the slice from that read instead of reading twice.
                let whole = self.read_whole_pack_entry(digest, pack)?;
                whole.map(|w| {
                    let start = usize_from(offset);
                    w[start..start + len].to_vec()
                })
            }
            Location::Pack { pack, .. } => self.read_pack(digest, pack, offset, len)?,
            Location::Object => {
                if !entry.verified && !self.verify_object(digest)? {
                    return Ok(self.miss());
                }
                self.read_object(digest, offset, len)?
            }
            Location::Slice { file, offset: at } if !entry.verified => self
                .read_unverified_slice(digest, &file, at, entry.len)?
                .map(|w| {
                    let start = usize_from(offset);
                    w[start..start + len].to_vec()
                }),
            Location::Slice { file, offset: at } => {
                self.read_slice(digest, &file, at + offset, len)?
            }
        };
        let Some(data) = data else {
            return Ok(self.miss());
        };
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.served.fetch_add(len as u64, Ordering::Relaxed);
        self.touch(digest, entry.stamp);
        Ok(Some(data))
    }

    fn miss(&self) -> Option<Vec<u8>> {
        self.misses.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Reads from a pack under its read lock, at the offset the index names
    /// under that lock (compaction moves records under the write lock);
    /// `None` if the entry went meanwhile.
    fn read_pack(
        &self,
        digest: &Digest,
        pack: usize,
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        let p = &self.packs[pack];
        let file = p.file.read().unwrap_or_else(|e| e.into_inner());
        let Some(at) = self.pack_offset(digest) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, at + offset)
            .map_err(io_err(&p.path))?;
        Ok(Some(buf))
    }

    /// Where `digest`'s record data starts in its pack, if it is in one.
    fn pack_offset(&self, digest: &Digest) -> Option<u64> {
        match self.index.get(digest)?.loc {
            Location::Pack { offset, .. } => Some(offset),
            Location::Object | Location::Slice { .. } => None,
        }
    }

    /// Records an access: the entry's stamp moves to now, at most once a
    /// second (the index write is skipped when the stamp is current), and a
    /// released entry is in use again.
    fn touch(&self, digest: &Digest, seen: u32) {
        let now = self.now();
        if seen >= now {
            return;
        }
        if let Some(mut e) = self.index.get_mut(digest) {
            if e.stamp == RELEASED {
                self.released.fetch_sub(e.len, Ordering::Relaxed);
            }
            e.stamp = e.stamp.max(now);
        }
    }

    /// Seconds since the Unix epoch (plus the test skew); never [`RELEASED`]
    /// or [`UNKNOWN`].
    fn now(&self) -> u32 {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let secs = u32::try_from(secs).unwrap_or(u32::MAX);
        secs.saturating_add(self.clock_skew.load(Ordering::Relaxed))
            .max(UNKNOWN + 1)
    }

    /// Moves this cache's clock forward (tests age entries with it instead
    /// of sleeping).
    #[doc(hidden)]
    pub fn advance_clock(&self, secs: u32) {
        self.clock_skew.fetch_add(secs, Ordering::Relaxed);
    }

    /// Whether `digest` has an entry. An entry found on disk at open may
    /// still fail verification on its first read, which then reports a miss.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.index.contains_key(digest)
    }

    /// Stores data the caller has verified: `sha256(data) == digest`, or, for
    /// a location key ([`location_key`]: an overlaybd block), the block's
    /// CRC; the sha256 of a location-keyed entry's bytes is journaled, so
    /// the entry is checked against it when found again after a restart.
    /// Inserting content that is already present costs nothing but a lookup;
    /// concurrent inserts of one digest are harmless. Past the size bound,
    /// the inserting thread runs an eviction pass (unless one is running).
    pub fn insert(&self, digest: &Digest, data: &[u8]) -> Result<(), CacheError> {
        if self.index.contains_key(digest) {
            self.dedup_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            return Ok(());
        }
        if is_location(digest) {
            self.locations.record(digest, Digest::of(data));
        }
        if data.len() < SMALL_MAX {
            if !self.append_to_pack(digest, data)? {
                self.dedup_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        } else {
            self.write_object(digest, data)?;
        }
        self.enforce_bound();
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
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            entries: self.index.len() as u64,
            bytes: load(&self.bytes),
            disk_bytes: load(&self.disk),
            released_bytes: load(&self.released),
            max_bytes: load(&self.max_bytes),
            hits: load(&self.hits),
            misses: load(&self.misses),
            served_bytes: load(&self.served),
            corrupt: load(&self.corrupt),
            dedup_bytes: load(&self.dedup_bytes),
            evictions: load(&self.evictions),
            evicted_bytes: load(&self.evicted_bytes),
            compactions: load(&self.compactions),
        }
    }

    /// Appends a record and indexes it; `false` if another thread stored the
    /// digest first.
    fn append_to_pack(&self, digest: &Digest, data: &[u8]) -> Result<bool, CacheError> {
        let pack = usize::from(digest.0[0]) % PACKS;
        let p = &self.packs[pack];
        let len = u32::try_from(data.len()).expect("pack items are < 64 KiB");
        let mut record = Vec::with_capacity(pack::HEADER_LEN + data.len());
        record.extend_from_slice(&pack::header(digest, len));
        record.extend_from_slice(data);

        let mut end = p.end.lock().unwrap_or_else(|e| e.into_inner());
        // Same digest, same pack: checking under the lock keeps duplicates out.
        if self.index.contains_key(digest) {
            return Ok(false);
        }
        // One write per record. If it fails halfway, `end` stays put and the
        // next record overwrites the partial one. Compaction holds `end`, so
        // the file cannot be swapped under this write.
        p.file
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .write_all_at(&record, *end)
            .map_err(io_err(&p.path))?;
        let offset = *end + pack::HEADER_LEN as u64;
        let disk = record.len() as u64;
        *end += disk;
        // Insert while holding the lock so the contains check above sees it.
        let entry = Entry {
            loc: Location::Pack { pack, offset },
            len: u64::from(len),
            verified: true,
            disk,
            stamp: self.now(),
        };
        self.index.insert(*digest, entry);
        self.bytes.fetch_add(entry.len, Ordering::Relaxed);
        self.disk.fetch_add(disk, Ordering::Relaxed);
        p.live.fetch_add(disk, Ordering::Relaxed);
        Ok(true)
    }

    /// Reads an unverified pack entry whole and checks it; drops it if it
    /// does not match. `None` also if it went meanwhile.
    fn read_whole_pack_entry(
        &self,
        digest: &Digest,
        pack: usize,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        let Some(len) = self.index.get(digest).map(|e| e.len) else {
            return Ok(None);
        };
        let Some(buf) = self.read_pack(digest, pack, 0, usize_from(len))? else {
            return Ok(None);
        };
        if Some(Digest::of(&buf)) != self.content_digest(digest) {
            self.reject(digest, "pack record");
            return Ok(None);
        }
        self.mark_verified(digest);
        Ok(Some(buf))
    }

    /// What the bytes under `key` must hash to: the key itself, or for a
    /// location key its journaled digest (none: cannot be checked).
    fn content_digest(&self, key: &Digest) -> Option<Digest> {
        if is_location(key) {
            self.locations.content(key)
        } else {
            Some(*key)
        }
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
        self.remove_entry(digest, |e| !e.verified);
    }

    /// Removes `digest`'s entry if `pred` holds for it and settles the
    /// counters; the caller deals with the bytes on disk. The one place an
    /// entry leaves the index, so the counters cannot drift.
    fn remove_entry(&self, digest: &Digest, pred: impl FnOnce(&Entry) -> bool) -> Option<Entry> {
        let (_, e) = self.index.remove_if(digest, |_, e| pred(e))?;
        self.locations.forget(digest);
        self.bytes.fetch_sub(e.len, Ordering::Relaxed);
        if e.stamp == RELEASED {
            self.released.fetch_sub(e.len, Ordering::Relaxed);
        }
        match e.loc {
            // A pack record's bytes stay on disk until its pack is compacted.
            Location::Pack { pack, .. } => {
                self.packs[pack].live.fetch_sub(e.disk, Ordering::Relaxed);
            }
            // A slice holds none (`disk` is 0).
            Location::Object | Location::Slice { .. } => {
                self.disk.fetch_sub(e.disk, Ordering::Relaxed);
            }
        }
        Some(e)
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        self.save_stamps();
    }
}

fn pack_path(packs_dir: &Path, i: usize) -> PathBuf {
    packs_dir.join(format!("pack-{i}.dat"))
}

fn open_pack(path: &Path) -> Result<File, CacheError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err(path))
}

/// The directory of an object path (`objects/sha256/ab`).
fn object_dir(path: &Path) -> &Path {
    path.parent().unwrap_or(path)
}

/// What a file takes on disk: its allocated blocks, not its length.
fn disk_bytes(meta: &fs::Metadata) -> u64 {
    meta.blocks().saturating_mul(512)
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
/// process left behind. Returns the logical and disk bytes found.
fn scan_objects(objects: &Path, index: &DashMap<Digest, Entry>) -> Result<(u64, u64), CacheError> {
    let (mut bytes, mut disk) = (0, 0);
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
            let meta = item.metadata().map_err(io_err(&item.path()))?;
            index.entry(digest).or_insert_with(|| {
                bytes += meta.len();
                disk += disk_bytes(&meta);
                Entry {
                    loc: Location::Object,
                    len: meta.len(),
                    verified: false,
                    disk: disk_bytes(&meta),
                    stamp: UNKNOWN,
                }
            });
        }
    }
    Ok((bytes, disk))
}

#[cfg(test)]
mod evict_tests;
#[cfg(test)]
mod tests;
