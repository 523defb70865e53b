//! The metadata warm pass of a stacked disk: fetches the ext4 metadata a
//! container's first lookups and stats would read one dependent block at
//! a time (the used inode tables, then every directory's blocks, found
//! through `ext4.rs`), with `Intent::Prefetch`, in merged GETs.
//!
//! It also maps where every regular file's data lies (its extents), so a
//! miss can fetch a window of its own file with it
//! (`LazyDisk::around`). What it fetches is bounded ([`MAX_WARM_BYTES`],
//! [`MAX_NODES`]); it stands down while the cache is under pressure, and
//! a disk whose bytes are not ext4 as this walk knows it is left alone
//! (the kernel's own reads still fetch what they need).

use std::ops::Range;
use std::sync::Arc;

use super::ext4::{Ext4Error, Geometry, InodeTable, SUPERBLOCK};
use super::{DiskError, LazyDisk, MAX_DISK_READ};
use crate::fetch::Hint;
use crate::format::overlaybd::stack::sectors_of;
use crate::format::overlaybd::{SECTOR, Source};
use crate::layer::PendingRead;
use crate::num::usize_from;

/// The most bytes one pass fetches (inode tables and directories).
pub const MAX_WARM_BYTES: u64 = 256 << 20;
/// The most extent tree nodes one pass reads (beyond inodes' own roots).
pub const MAX_NODES: usize = 65_536;
/// The most file extents remembered for read-around (16 bytes each).
pub const MAX_FILE_EXTENTS: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
    #[error("warm planning: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Where a disk's inodes are, once the warm pass has read it: what path
/// lookups need (`hints.rs`).
#[derive(Debug)]
pub struct Ext4Map {
    pub geometry: Geometry,
    pub tables: Vec<InodeTable>,
}

/// Where some of a regular file's data lies on the disk; `head` is its
/// inode number when these are its first bytes (0 otherwise), which is
/// where a program is first read (`hints.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileExtent {
    pub disk: Range<u64>,
    pub head: u32,
}

impl FileExtent {
    fn of(e: super::ext4::Extent, ino: u64) -> FileExtent {
        let head = if e.file == 0 {
            u32::try_from(ino).unwrap_or(0)
        } else {
            0
        };
        FileExtent { disk: e.disk, head }
    }
}

/// The number of the inode whose record is at byte `at` of the disk, in
/// one of `tables` (sorted by place).
fn inode_number(tables: &[&InodeTable], at: u64, inode_size: u64) -> Option<u64> {
    let i = tables
        .partition_point(|t| t.bytes.start <= at)
        .checked_sub(1)?;
    let t = tables[i];
    t.bytes
        .contains(&at)
        .then(|| t.first_inode + (at - t.bytes.start) / inode_size)
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Warmed {
    /// Bytes of inode tables and directory blocks it asked for.
    pub metadata_bytes: u64,
    /// Bytes of blocks it fetched (the rest was cached).
    pub fetched_bytes: u64,
    pub directories: u64,
    /// Extents of regular files mapped for read-around.
    pub file_extents: u64,
    /// Directories whose extent tree was not followed (malformed).
    pub skipped: u64,
    /// Whether a bound cut the pass short, or the cache was under pressure.
    pub cut: bool,
}

impl LazyDisk {
    /// Fetches this disk's ext4 metadata ahead of the kernel's reads.
    pub async fn warm_metadata(self: &Arc<Self>) -> Result<Warmed, WarmError> {
        let mut w = Warmed::default();
        if self.layers.iter().any(|l| l.layer.cache().under_pressure()) {
            w.cut = true;
            return Ok(w);
        }
        let head = self.read(0, SUPERBLOCK.end).await?;
        let sb = &head[usize_from(SUPERBLOCK.start)..];
        let g = Geometry::parse(sb, self.size())?;
        let mut budget = MAX_WARM_BYTES;
        let gdt = self.read_long(g.descriptors(), &mut budget).await?;
        let tables = g.inode_tables(&gdt)?;
        // Only what some layer holds: the rest of a table reads as zeros
        // (no inode), and a filesystem without `gdt_csum` names every table
        // whole (on a 64 GiB disk, 1 GiB of them).
        let mut wanted = Vec::new();
        'tables: for t in &tables {
            for part in self.mapped(&t.bytes, g.inode_size) {
                if !take(&mut budget, &part) {
                    w.cut = true;
                    break 'tables;
                }
                wanted.push(part);
            }
        }
        w.metadata_bytes += wanted.iter().map(|r| r.end - r.start).sum::<u64>();
        w.fetched_bytes += self.prefetch(wanted.clone(), None).await?;
        if !Geometry::extents(sb) {
            return Ok(w);
        }
        let _ = self.ext4.set(Ext4Map {
            geometry: g.clone(),
            tables: tables.clone(),
        });
        // Directories: their leaves to fetch, their deeper nodes to read.
        // Regular files: where their data lies, for read-around.
        let mut dirs: Vec<Range<u64>> = Vec::new();
        let mut files: Vec<FileExtent> = Vec::new();
        // Tree nodes to read: a directory's (`None`) or a file's.
        let mut nodes: Vec<(Range<u64>, u16, Option<u64>)> = Vec::new();
        let stride = usize_from(g.inode_size);
        let mut by_place: Vec<&InodeTable> = tables.iter().collect();
        by_place.sort_by_key(|t| t.bytes.start);
        for table in &wanted {
            let first = inode_number(&by_place, table.start, g.inode_size);
            let mut at = table.start;
            while at < table.end {
                let len = (table.end - at).min(MAX_DISK_READ);
                let bytes = self.read(at, len).await?;
                for (i, inode) in (0u64..).zip(bytes.chunks_exact(stride)) {
                    match g.directory(inode) {
                        Ok(n) if n.leaves.is_empty() && n.children.is_empty() => {}
                        Ok(n) => {
                            w.directories += 1;
                            dirs.extend(n.leaves.into_iter().map(|e| e.disk));
                            nodes.extend(n.children.into_iter().map(|(r, d)| (r, d, None)));
                        }
                        Err(_) => w.skipped += 1,
                    }
                    if files.len() < MAX_FILE_EXTENTS
                        && let Ok(n) = g.regular_file(inode)
                    {
                        let ino = first.map_or(0, |f| f + (at - table.start) / g.inode_size + i);
                        files.extend(n.leaves.into_iter().map(|e| FileExtent::of(e, ino)));
                        nodes.extend(n.children.into_iter().map(|(r, d)| (r, d, Some(ino))));
                    }
                }
                at += len;
            }
        }
        let mut read_nodes = 0usize;
        while let Some((r, depth, file)) = nodes.pop() {
            read_nodes += 1;
            if read_nodes > MAX_NODES || !take(&mut budget, &r) {
                w.cut = true;
                break;
            }
            let block = self.read(r.start, r.end - r.start).await?;
            match (g.node(&block, Some(depth)), file) {
                (Ok(n), None) => {
                    dirs.extend(n.leaves.into_iter().map(|e| e.disk));
                    nodes.extend(n.children.into_iter().map(|(r, d)| (r, d, None)));
                }
                (Ok(n), Some(ino)) => {
                    files.extend(n.leaves.into_iter().map(|e| FileExtent::of(e, ino)));
                    nodes.extend(n.children.into_iter().map(|(r, d)| (r, d, Some(ino))));
                }
                (Err(_), _) => w.skipped += 1,
            }
        }
        files.truncate(MAX_FILE_EXTENTS);
        files.sort_by_key(|f| f.disk.start);
        w.file_extents = files.len() as u64;
        // A second pass (another container on the same stack) finds it set.
        let _ = self.files.set(files);
        dirs.sort_by_key(|r| r.start);
        let mut fetch = Vec::new();
        'dirs: for r in dirs {
            for part in self.mapped(&r, SECTOR) {
                if !take(&mut budget, &part) {
                    w.cut = true;
                    break 'dirs;
                }
                fetch.push(part);
            }
        }
        w.metadata_bytes += fetch.iter().map(|r| r.end - r.start).sum::<u64>();
        w.fetched_bytes += self.prefetch(fetch, None).await?;
        Ok(w)
    }

    /// The parts of `r` some layer holds data for, widened to multiples of
    /// `align` from `r.start` (within `r`), adjacent ones joined.
    fn mapped(&self, r: &Range<u64>, align: u64) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for s in self.map.segments_in(sectors_of(r)) {
            if !matches!(s.source, Source::Layer { .. }) {
                continue;
            }
            let lo = r.start.max(s.start * SECTOR);
            let hi = r.end.min(s.end() * SECTOR);
            if lo >= hi {
                continue;
            }
            let lo = r.start + (lo - r.start) / align * align;
            let hi = r.end.min(r.start + (hi - r.start).div_ceil(align) * align);
            match out.last_mut() {
                Some(last) if last.end >= lo => last.end = last.end.max(hi),
                _ => out.push(lo..hi),
            }
        }
        out
    }

    /// Reads `range` in pieces of at most [`MAX_DISK_READ`], within `budget`.
    async fn read_long(
        self: &Arc<Self>,
        range: Range<u64>,
        budget: &mut u64,
    ) -> Result<Vec<u8>, WarmError> {
        if !take(budget, &range) {
            return Err(Ext4Error::Field {
                field: "group descriptor table size",
                value: range.end - range.start,
            }
            .into());
        }
        let mut out = Vec::new();
        let mut at = range.start;
        while at < range.end {
            let len = (range.end - at).min(MAX_DISK_READ);
            out.extend(self.read(at, len).await?);
            at += len;
        }
        Ok(out)
    }

    /// Fetches what the cache lacks of `ranges` with `Intent::Prefetch`,
    /// each layer's part in one call (adjacent blocks in one GET), counted
    /// as `hint`'s if one is named; returns the bytes fetched.
    pub(super) async fn prefetch(
        self: &Arc<Self>,
        ranges: Vec<Range<u64>>,
        hint: Option<Hint>,
    ) -> Result<u64, WarmError> {
        let me = self.clone();
        let by_layer = tokio::task::spawn_blocking(move || {
            let mut by_layer: Vec<Vec<PendingRead>> =
                (0..me.layers.len()).map(|_| Vec::new()).collect();
            for r in ranges {
                let mut at = r.start;
                while at < r.end {
                    let len = (r.end - at).min(MAX_DISK_READ);
                    for m in me.read_cached(at, len)?.pending {
                        if let Some(reads) = by_layer.get_mut(super::layer_index(m.layer)) {
                            reads.push(m.read);
                        }
                    }
                    at += len;
                }
            }
            Ok::<_, DiskError>(by_layer)
        })
        .await??;
        let fetches = self
            .layers
            .iter()
            .zip(&by_layer)
            .map(|(l, reads)| l.layer.prefetch_reads(reads, hint));
        let mut fetched = 0;
        for done in futures::future::join_all(fetches).await {
            fetched += done.map_err(DiskError::from)?;
        }
        Ok(fetched)
    }
}

/// Takes `r`'s length out of `budget`, if it fits.
fn take(budget: &mut u64, r: &Range<u64>) -> bool {
    let len = r.end.saturating_sub(r.start);
    match budget.checked_sub(len) {
        Some(left) => {
            *budget = left;
            true
        }
        None => false,
    }
}
