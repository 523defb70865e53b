//! The stacked disk of an overlaybd image, served lazily: each layer blob
//! is a [`Layer`] of the fetch engine (format [`Overlaybd`]: one file, the
//! layer's plain LSMT file, whose chunks are its ZFile blocks), and a
//! [`LazyDisk`] maps any byte range of the virtual disk through the
//! stack's [`DiskMap`] to ranges of those files. Zeroed and unmapped
//! sectors are zeros and never fetched.
//!
//! A read is planned first ([`LazyDisk::read_cached`]): every piece the
//! cache holds is copied at once, on the calling (FUSE) thread; only when
//! something is missing does [`DiskRead::complete`] go to the fetch engine
//! (on-demand, with the layer's read-ahead), every layer's part at once.
//!
//! Each committed snapshot of an overlaybd chain is a stack of its layers
//! up to it: [`DiskLayer`]s are shared between the stacks that use them.
//!
//! Each layer's blob is read whole once its disk is mounted
//! ([`DiskLayer::start_background`], `verify.rs`): its background fetch,
//! and the check of its sha256 against the descriptor's digest. A layer
//! that fails it fails every read of a disk that stacks it.
//!
//! When a container is prepared on a disk, its ext4 metadata is fetched
//! ahead of the kernel's lookups (`warm.rs`, through `ext4.rs`), then the
//! image's entrypoint and its libraries (`hints.rs`).

pub mod ext4;
mod hints;
mod verify;
mod warm;

use std::ops::Range;
use std::sync::Arc;

use crate::Digest;
use crate::cache::Cache;
use crate::fetch::FetchScheduler;
use crate::format::overlaybd::stack::{layer_index, sectors_of};
use crate::format::overlaybd::{DiskMap, Extent, LSMT_INO, ObdError, Overlaybd, SECTOR, Source};
use crate::layer::{CachedRead, Layer, LayerError, PendingRead};
use crate::num::usize_from;
use crate::registry::BlobSource;

pub use verify::{BlobCheck, BlobState, VerifyError};
pub use warm::{MAX_WARM_BYTES, WarmError, Warmed};

/// The most bytes one disk read returns (the kernel asks for 128 KiB to
/// 1 MiB).
pub const MAX_DISK_READ: u64 = 16 << 20;

/// Why a disk could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Obd(#[from] ObdError),
    #[error("read {start}..{end} is outside the disk of {size} bytes", start = range.start, end = range.end)]
    OutOfDisk { range: Range<u64>, size: u64 },
    #[error("layer {0} of the stack is missing")]
    NoLayer(u32),
    #[error("layer {layer} returned {got} bytes of LSMT file where {want} were asked for")]
    Short { layer: u32, want: usize, got: usize },
    #[error("overlaybd layer {0} failed its whole-blob check: its reads fail")]
    Failed(Digest),
}

/// One overlaybd layer, opened through the fetch engine.
pub struct DiskLayer {
    pub digest: Digest,
    pub layer: Arc<Layer>,
    pub extents: Arc<[Extent]>,
    pub virtual_size: u64,
    /// The whole-blob check (`verify.rs`); public like the other fields
    /// (a layer may be rebuilt with other extents), changed only by the
    /// pass.
    pub blob_check: Arc<BlobState>,
}

impl DiskLayer {
    /// Opens the overlaybd layer blob `digest` in `source`: its index is
    /// fetched with `Intent::Open`, its blocks later as they are read.
    pub async fn open(
        digest: Digest,
        source: Arc<dyn BlobSource>,
        cache: Arc<Cache>,
        scheduler: FetchScheduler,
    ) -> Result<DiskLayer, DiskError> {
        let format = Arc::new(Overlaybd::new(digest));
        let layer = Layer::open_format(source, format.clone(), None, cache, scheduler).await?;
        let opened = format
            .opened()
            .ok_or_else(|| ObdError::Stack("the layer opened without its extents".into()))?;
        Ok(DiskLayer {
            digest,
            layer: Arc::new(layer),
            extents: opened.extents.clone().into(),
            virtual_size: opened.virtual_size,
            blob_check: Arc::default(),
        })
    }

    /// Starts reading the blob whole at background priority (caching the
    /// blocks the cache lacks) and checking its sha256, unless that runs
    /// already or is done. The pass stops when the layer is dropped (no
    /// disk stacks it). Must run inside a tokio runtime.
    pub fn start_background(&self) {
        if self.blob_check.begin() {
            tokio::spawn(verify::run(
                Arc::downgrade(&self.layer),
                self.digest,
                self.blob_check.clone(),
            ));
        }
    }

    /// Runs the whole-blob pass now and waits for it (tests, tools);
    /// what it ended with, or where the check stands if it runs already.
    pub async fn verify(&self) -> BlobCheck {
        if !self.blob_check.begin() {
            return self.blob_check.check();
        }
        verify::run(
            Arc::downgrade(&self.layer),
            self.digest,
            self.blob_check.clone(),
        )
        .await
    }

    /// Where the whole-blob check stands.
    pub fn check(&self) -> BlobCheck {
        self.blob_check.check()
    }

    /// Blob bytes the whole-blob pass has read so far.
    pub fn hashed_bytes(&self) -> u64 {
        self.blob_check.hashed_bytes()
    }

    /// The blob's size in bytes.
    pub fn blob_size(&self) -> u64 {
        self.layer.fetcher().source().size()
    }

    /// Refuses a read of a failed layer.
    fn usable(&self) -> Result<(), DiskError> {
        if self.blob_check.is_failed() {
            return Err(DiskError::Failed(self.digest));
        }
        Ok(())
    }
}

/// Layers stacked into one disk (bottom first), read lazily.
pub struct LazyDisk {
    layers: Vec<Arc<DiskLayer>>,
    map: DiskMap,
    /// Where the ext4 tree's regular files lie (their extents, sorted),
    /// once the warm pass has read it (`warm.rs`): a miss then fetches a
    /// read-ahead window of its file with it ([`LazyDisk::read_cached`]).
    files: std::sync::OnceLock<Vec<warm::FileExtent>>,
    /// Where its inodes are, once the warm pass has read it: what the
    /// entrypoint's lookup needs (`hints.rs`).
    ext4: std::sync::OnceLock<warm::Ext4Map>,
    /// Files already looked at for the libraries they need (`hints.rs`).
    examined: std::sync::Mutex<std::collections::HashSet<u64>>,
}

/// A disk read planned against the cache: the bytes the cache had, and
/// the layer reads still to complete.
pub struct DiskRead {
    out: Vec<u8>,
    pending: Vec<Missing>,
    /// The rest of the files' windows around the missing parts, by layer:
    /// fetched with them, not returned.
    around: Vec<(u32, PendingRead)>,
    /// The files whose first bytes it misses ([`DiskRead::heads`]).
    heads: Vec<u64>,
}

/// One layer's part of a read that the cache lacks.
struct Missing {
    /// Where its bytes go in the read, and how many.
    at: usize,
    want: usize,
    layer: u32,
    read: PendingRead,
    from: Arc<DiskLayer>,
}

impl LazyDisk {
    /// Stacks `layers`, bottom first; the disk has the top layer's size.
    pub fn new(layers: Vec<Arc<DiskLayer>>) -> Result<LazyDisk, DiskError> {
        let size = layers
            .last()
            .map(|l| l.virtual_size)
            .ok_or_else(|| ObdError::Stack("no layers".into()))?;
        let map = DiskMap::stack(layers.iter().map(|l| &l.extents[..]), size)?;
        Ok(LazyDisk {
            layers,
            map,
            files: std::sync::OnceLock::new(),
            ext4: std::sync::OnceLock::new(),
            examined: std::sync::Mutex::default(),
        })
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.map.virtual_size()
    }

    pub fn layers(&self) -> &[Arc<DiskLayer>] {
        &self.layers
    }

    pub fn map(&self) -> &DiskMap {
        &self.map
    }

    /// Plans a read of `len` bytes at `offset` (cut at the disk's end):
    /// zeros where no layer has data, the cache's bytes where it has them.
    /// Blocking (cache file reads); never fetches.
    pub fn read_cached(&self, offset: u64, len: u64) -> Result<DiskRead, DiskError> {
        let size = self.size();
        let end = size.min(offset.saturating_add(len));
        let range = offset.min(end)..end;
        if range.end - range.start > MAX_DISK_READ {
            return Err(DiskError::OutOfDisk { range, size });
        }
        // A layer found wrong fails the whole disk: its bytes (zeros
        // included: its extents may be a forger's) are not to be trusted.
        for l in &self.layers {
            l.usable()?;
        }
        let mut out = vec![0u8; usize_from(range.end - range.start)];
        let mut pending = Vec::new();
        for seg in self.map.segments_in(sectors_of(&range)) {
            let Source::Layer { layer, moffset } = seg.source else {
                continue;
            };
            let from = range.start.max(seg.start * SECTOR);
            let to = range.end.min(seg.end() * SECTOR);
            let raw = moffset * SECTOR + (from - seg.start * SECTOR);
            let want = usize_from(to - from);
            let at = usize_from(from - range.start);
            let l = self
                .layers
                .get(layer_index(layer))
                .ok_or(DiskError::NoLayer(layer))?;
            match l.layer.read_cached(LSMT_INO, raw, to - from)? {
                CachedRead::Hit(data) => {
                    if data.len() != want {
                        return Err(DiskError::Short {
                            layer,
                            want,
                            got: data.len(),
                        });
                    }
                    out[at..at + want].copy_from_slice(&data);
                }
                CachedRead::Miss(read) => pending.push(Missing {
                    at,
                    want,
                    layer,
                    read,
                    from: l.clone(),
                }),
            }
        }
        let (around, heads) = if pending.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            (self.around(&range, &pending)?, self.heads(&range, &pending))
        };
        Ok(DiskRead {
            out,
            pending,
            around,
            heads,
        })
    }

    /// The files whose first bytes the `pending` parts of a read of
    /// `range` miss (where a program is first read: `hints.rs`), by inode
    /// number; none before the warm pass has mapped the files.
    fn heads(&self, range: &Range<u64>, pending: &[Missing]) -> Vec<u64> {
        let Some(files) = self.files.get() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for m in pending {
            let lo = range.start + m.at as u64;
            let hi = lo + m.want as u64;
            let first = files.partition_point(|f| f.disk.start < lo);
            for f in files[first..].iter().take_while(|f| f.disk.start < hi) {
                if f.head != 0 && !out.contains(&u64::from(f.head)) {
                    out.push(f.head.into());
                }
            }
        }
        out
    }

    /// What to fetch with a read of `range` whose `pending` parts miss: for
    /// each, the window of the base read-ahead size (aligned) around it,
    /// cut to the extent of the file it lies in, minus the read itself.
    /// An ext4 file read at a few places (a library the loader maps, a
    /// program's pages as they fault) then costs a round trip per window,
    /// not per kernel request (128 KiB), and nothing beyond its file is
    /// fetched. Nothing before the warm pass has mapped the files.
    fn around(
        &self,
        range: &Range<u64>,
        pending: &[Missing],
    ) -> Result<Vec<(u32, PendingRead)>, DiskError> {
        let Some(files) = self.files.get() else {
            return Ok(Vec::new());
        };
        let mut wanted: Vec<Range<u64>> = Vec::new();
        for m in pending {
            let window = m.from.layer.read_around();
            let at = range.start + m.at as u64;
            let i = files.partition_point(|f| f.disk.start <= at);
            let Some(file) = i
                .checked_sub(1)
                .and_then(|i| files.get(i))
                .map(|f| &f.disk)
                .filter(|f| f.end > at)
            else {
                continue;
            };
            if window == 0 {
                continue;
            }
            let start = file.start.max(at / window * window);
            let end = file.end.min(start.saturating_add(window));
            for r in [start..range.start.min(end), range.end.max(start)..end] {
                if r.start < r.end && !wanted.iter().any(|w| w.start <= r.start && r.end <= w.end) {
                    wanted.push(r);
                }
            }
        }
        let mut out = Vec::new();
        for r in wanted {
            for seg in self.map.segments_in(sectors_of(&r)) {
                let Source::Layer { layer, moffset } = seg.source else {
                    continue;
                };
                let from = r.start.max(seg.start * SECTOR);
                let to = r.end.min(seg.end() * SECTOR);
                let raw = moffset * SECTOR + (from - seg.start * SECTOR);
                let l = self
                    .layers
                    .get(layer_index(layer))
                    .ok_or(DiskError::NoLayer(layer))?;
                if let CachedRead::Miss(read) = l.layer.read_cached(LSMT_INO, raw, to - from)? {
                    out.push((layer, read));
                }
            }
        }
        Ok(out)
    }

    /// Reads through cache and fetch engine (the cache lookup on the
    /// blocking pool).
    pub async fn read(self: &Arc<Self>, offset: u64, len: u64) -> Result<Vec<u8>, DiskError> {
        let me = self.clone();
        let planned = tokio::task::spawn_blocking(move || me.read_cached(offset, len))
            .await
            .map_err(|e| ObdError::Stack(format!("read planning: {e}")))??;
        let heads = planned.heads().to_vec();
        let data = planned.complete().await?;
        self.prefetch_libraries(&heads);
        Ok(data)
    }
}

impl DiskRead {
    /// Whether every byte is here already (no fetch needed).
    pub fn is_complete(&self) -> bool {
        self.pending.is_empty()
    }

    /// The files (inode numbers) whose first bytes this read misses: once
    /// it is complete, [`LazyDisk::prefetch_libraries`] of them.
    pub fn heads(&self) -> &[u64] {
        &self.heads
    }

    /// The bytes, once the layers' missing blocks are fetched (all layers'
    /// parts at once).
    pub async fn complete(self) -> Result<Vec<u8>, DiskError> {
        let DiskRead {
            mut out,
            pending,
            mut around,
            heads: _,
        } = self;
        // Each layer's window goes with the first of its missing parts.
        let parts: Vec<(Missing, Vec<PendingRead>)> = pending
            .into_iter()
            .map(|m| {
                let (mine, rest): (Vec<_>, Vec<_>) =
                    around.drain(..).partition(|(layer, _)| *layer == m.layer);
                around = rest;
                (m, mine.into_iter().map(|(_, r)| r).collect())
            })
            .collect();
        let reads = parts.into_iter().map(|(m, with)| async move {
            let data = match m.from.layer.complete_around(m.read, &with).await {
                Ok(data) => data,
                Err(e) => return Err(DiskError::from(e)),
            };
            // The layer may have failed while its blocks were fetched.
            m.from.usable()?;
            if data.len() != m.want {
                return Err(DiskError::Short {
                    layer: m.layer,
                    want: m.want,
                    got: data.len(),
                });
            }
            Ok((m.at, data))
        });
        for done in futures::future::join_all(reads).await {
            let (at, data) = done?;
            out[at..at + data.len()].copy_from_slice(&data);
        }
        Ok(out)
    }

    /// The bytes, when [`DiskRead::is_complete`].
    pub fn into_bytes(self) -> Vec<u8> {
        self.out
    }
}

#[cfg(test)]
mod tests;
