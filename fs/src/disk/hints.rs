//! The image's entrypoint on an overlaybd disk, fetched while the
//! container is being created, with its interpreter (`#!`) and the shared
//! libraries it needs; and any program the container starts later (a
//! read that misses a file's first bytes: `DiskRead::heads`), its
//! libraries fetched once its headers are in. What `layer/hints` does for
//! eStargz layers, with paths looked up in the disk's own ext4 tree
//! instead of a TOC. Each file is looked at once per disk. An image's
//! recorded trace (its acceleration layer, `format::overlaybd::trace`) is
//! replayed here too ([`LazyDisk::replay`]).
//!
//! It runs after the warm pass (`warm.rs`), which has fetched the inode
//! tables and every directory's blocks and kept where the tables are: a
//! lookup then reads cached blocks only. What is still missing (a long
//! link's block, a program's headers) is fetched with `Intent::Prefetch`,
//! never on demand. By value, as for eStargz: the entrypoint's first
//! `read_ahead_max` bytes (it is run); a library whole if it fits the
//! link's speculation room, else its first read-ahead window (its headers:
//! the loader maps the rest, and the kernel's faults fetch it with
//! read-around).
//!
//! The disk is hostile until verified: every walk is bounded (directory
//! bytes per lookup, extent nodes per file, links per path, libraries per
//! program) and anything malformed ends that lookup, never the daemon. A
//! wrong answer only fetches the wrong blocks early.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;

use super::ext4::{self, Extent, LinkTarget};
use super::warm::{Ext4Map, WarmError};
use super::{DiskError, LazyDisk, MAX_DISK_READ};
use crate::fetch::{FetchScheduler, Hint};
use crate::format::overlaybd::LSMT_INO;
use crate::format::overlaybd::trace::{Trace, TraceRead};
use crate::layer::Entrypoint;
use crate::layer::hints::elf::{self, Examined, Tree};
use crate::layer::hints::program;
use crate::layer::{CachedRead, PendingRead};
use crate::num::usize_from;

/// ext4's root directory.
const ROOT_INO: u64 = 2;
/// Directory bytes scanned for one name.
const MAX_DIR_BYTES: u64 = 16 << 20;
/// Extent tree nodes read for one file.
const MAX_FILE_NODES: usize = 256;
/// Libraries fetched for one entrypoint, theirs included.
const MAX_LIBRARIES: usize = 64;

impl LazyDisk {
    /// Fetches the program `entry` names, then its interpreter or its
    /// libraries (see the module docs), with `Intent::Prefetch`. Returns
    /// the paths fetched: none when speculation is off or the warm pass
    /// has not mapped this disk.
    pub async fn prefetch_entrypoint(self: &Arc<Self>, entry: &Entrypoint) -> Vec<String> {
        let Some(first) = self.layers.first() else {
            return Vec::new();
        };
        let scheduler = first.layer.scheduler().clone();
        if !scheduler.config().speculate || self.ext4.get().is_none() {
            return Vec::new();
        }
        let (me, entry) = (self.clone(), entry.clone());
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let Some(map) = me.ext4.get() else {
                return Vec::new();
            };
            let tree = DiskTree { disk: &me, map, rt };
            tree.entrypoint(&entry, &Budget::of(&scheduler))
        })
        .await
        .unwrap_or_default()
    }
}

impl LazyDisk {
    /// After a read that missed the first bytes of files `heads` (inode
    /// numbers): each one not looked at yet that is a dynamically linked
    /// program has its libraries fetched, and theirs (see the module
    /// docs), in the background. Nothing when speculation or read-ahead is
    /// off, or before the warm pass has mapped the disk.
    pub fn prefetch_libraries(self: &Arc<Self>, heads: &[u64]) {
        let Some(first) = self.layers.first() else {
            return;
        };
        let scheduler = first.layer.scheduler().clone();
        let config = scheduler.config();
        if heads.is_empty() || !config.speculate || config.read_ahead == 0 {
            return;
        }
        let fresh: Vec<u64> = heads.iter().copied().filter(|&h| self.examine(h)).collect();
        if fresh.is_empty() || self.ext4.get().is_none() {
            return;
        }
        let me = self.clone();
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let Some(map) = me.ext4.get() else { return };
            let tree = DiskTree { disk: &me, map, rt };
            let budget = Budget::of(&scheduler);
            for ino in fresh {
                if let Some(program) = tree.file_at(ino, String::new()) {
                    let fetched = tree.libraries(program, &budget);
                    if !fetched.is_empty() {
                        tracing::debug!(ino, ?fetched, "disk: a program's libraries prefetched");
                    }
                }
            }
        });
    }

    /// Whether file `ino` is still to be looked at for its libraries (and
    /// from now on, it is not).
    fn examine(&self, ino: u64) -> bool {
        self.examined
            .lock()
            .expect("examined set poisoned")
            .insert(ino)
    }
}

/// The most bytes one trace replay fetches.
const MAX_REPLAY_BYTES: u64 = 512 << 20;

impl LazyDisk {
    /// Replays an acceleration layer's trace (`format::overlaybd::trace`)
    /// with `Intent::Prefetch`, counted as [`Hint::Trace`]: recorded reads
    /// in their order, a batch at a time (each layer's part of a batch in
    /// merged GETs), or the files of a list whole. Reads of a layer this
    /// disk does not have, or past its file, fetch nothing. Returns the
    /// bytes asked for; nothing when speculation is off, and for a list
    /// nothing before the warm pass has mapped the disk.
    pub async fn replay(self: &Arc<Self>, trace: &Trace) -> u64 {
        let Some(first) = self.layers.first() else {
            return 0;
        };
        let scheduler = first.layer.scheduler().clone();
        if !scheduler.config().speculate {
            return 0;
        }
        let batch = scheduler.config().read_ahead_max.max(1 << 20);
        let mut asked = 0u64;
        match trace {
            Trace::Reads(reads) => {
                for part in batches(reads, batch) {
                    if asked >= MAX_REPLAY_BYTES {
                        break;
                    }
                    asked += part.iter().map(|r| r.count).sum::<u64>();
                    if self.replay_reads(part).await.is_err() {
                        break;
                    }
                }
            }
            Trace::Files(paths) => {
                let (me, paths) = (self.clone(), paths.clone());
                let rt = tokio::runtime::Handle::current();
                asked = tokio::task::spawn_blocking(move || {
                    let Some(map) = me.ext4.get() else { return 0 };
                    let tree = DiskTree { disk: &me, map, rt };
                    let mut asked = 0;
                    for path in paths {
                        let Some(file) = tree.file(path.as_bytes()) else {
                            continue;
                        };
                        let len = file.size.min(MAX_REPLAY_BYTES - asked);
                        if len == 0 || !tree.fetch(head(&file.extents, len), Hint::Trace) {
                            break;
                        }
                        asked += len;
                    }
                    asked
                })
                .await
                .unwrap_or_default();
            }
        }
        asked
    }

    /// Fetches what the cache lacks of `reads` (of the layers' LSMT
    /// files), each layer's part in one call.
    async fn replay_reads(self: &Arc<Self>, reads: &[TraceRead]) -> Result<(), WarmError> {
        let (me, reads) = (self.clone(), reads.to_vec());
        let by_layer = tokio::task::spawn_blocking(move || {
            let mut by_layer: Vec<Vec<PendingRead>> =
                (0..me.layers.len()).map(|_| Vec::new()).collect();
            for r in reads {
                let Some(l) = me.layers.get(usize_from(r.layer.into())) else {
                    continue;
                };
                if let Ok(CachedRead::Miss(p)) = l.layer.read_cached(LSMT_INO, r.offset, r.count) {
                    by_layer[usize_from(r.layer.into())].push(p);
                }
            }
            by_layer
        })
        .await?;
        let fetches = self
            .layers
            .iter()
            .zip(&by_layer)
            .map(|(l, reads)| l.layer.prefetch_reads(reads, Some(Hint::Trace)));
        for done in futures::future::join_all(fetches).await {
            done.map_err(DiskError::from)?;
        }
        Ok(())
    }
}

/// `reads` cut into runs of about `bytes` each, in order.
fn batches(reads: &[TraceRead], bytes: u64) -> impl Iterator<Item = &[TraceRead]> {
    let mut rest = reads;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut sum = 0;
        let n = rest
            .iter()
            .take_while(|r| {
                let take = sum < bytes;
                sum += r.count;
                take
            })
            .count()
            .max(1);
        let (part, tail) = rest.split_at(n);
        rest = tail;
        Some(part)
    })
}

/// How much of each file to fetch.
struct Budget<'a> {
    /// Of the entrypoint and its interpreter.
    entrypoint: u64,
    /// Of a library too large for the room.
    base: u64,
    scheduler: &'a FetchScheduler,
}

impl Budget<'_> {
    fn of(scheduler: &FetchScheduler) -> Budget<'_> {
        Budget {
            entrypoint: scheduler.config().read_ahead_max,
            base: scheduler.config().read_ahead,
            scheduler,
        }
    }

    /// The most of a library fetched whole, now: what the link carries in
    /// a round trip, less what is on the wire.
    fn room(&self) -> u64 {
        let s = self.scheduler;
        s.read_ahead_max().min(s.speculation_room())
    }
}

/// A regular file found: its path, inode number, size and extents.
struct File {
    path: String,
    ino: u64,
    size: u64,
    extents: Vec<Extent>,
}

/// A disk's ext4 tree, read on a blocking thread: what the cache lacks is
/// fetched (with `Intent::Prefetch`) and waited for.
struct DiskTree<'a> {
    disk: &'a Arc<LazyDisk>,
    map: &'a Ext4Map,
    rt: tokio::runtime::Handle,
}

impl DiskTree<'_> {
    fn entrypoint(&self, entry: &Entrypoint, budget: &Budget) -> Vec<String> {
        let mut fetched = Vec::new();
        let mut candidates = entry.candidates();
        for _ in 0..program::MAX_HOPS {
            let Some(file) = candidates.iter().find_map(|c| self.file(c.as_bytes())) else {
                break;
            };
            let len = budget.entrypoint.min(file.size);
            if !self.fetch(head(&file.extents, len), Hint::Entrypoint) {
                break;
            }
            fetched.push(file.path.clone());
            let Some(head) = self.read_file(&file, 0, usize_from(file.size.min(256))) else {
                break;
            };
            match program::interpreter(&head) {
                Some(interp) => candidates = vec![interp],
                None => {
                    if self.disk.examine(file.ino) {
                        fetched.extend(self.libraries(file, budget));
                    }
                    break;
                }
            }
        }
        fetched
    }

    /// The libraries `program` needs, and theirs, breadth first: each
    /// program's found ones fetched together, by value, each file once for
    /// the disk. Returns their paths.
    fn libraries(&self, program: File, budget: &Budget) -> Vec<String> {
        let mut fetched = Vec::new();
        let mut todo = VecDeque::from([program]);
        let mut count = 0;
        while let Some(file) = todo.pop_front() {
            let read = |offset: u64, len: usize| self.read_file(&file, offset, len);
            let Examined::Needs(needs) = elf::examine(file.size, &read) else {
                continue;
            };
            let mut ranges = Vec::new();
            let mut found = Vec::new();
            for name in needs.needed.iter().chain(&needs.interp) {
                let lib = elf::candidates(name, &needs)
                    .iter()
                    .find_map(|p| self.file(p));
                let Some(lib) = lib else { continue };
                if count >= MAX_LIBRARIES || !self.disk.examine(lib.ino) {
                    continue;
                }
                count += 1;
                let whole = lib.size <= budget.room();
                let len = if whole {
                    lib.size
                } else {
                    budget.base.min(lib.size)
                };
                ranges.extend(head(&lib.extents, len));
                found.push(lib);
            }
            if found.is_empty() || !self.fetch(ranges, Hint::Library) {
                continue;
            }
            fetched.extend(found.iter().map(|l| l.path.clone()));
            todo.extend(found);
        }
        fetched
    }

    /// The regular file at absolute `path`, if the tree has one.
    fn file(&self, path: &[u8]) -> Option<File> {
        let ino = elf::resolve(self, path)?;
        self.file_at(ino, String::from_utf8_lossy(path).into_owned())
    }

    /// Inode `ino`, if it is a regular file (`path` is what to call it).
    fn file_at(&self, ino: u64, path: String) -> Option<File> {
        let inode = self.inode(ino)?;
        if !ext4::kind_is(&inode, false) {
            return None;
        }
        Some(File {
            path,
            ino,
            size: ext4::file_size(&inode),
            extents: self.extents(&inode, false)?,
        })
    }

    /// Fetches what the cache lacks of `ranges`; whether that went well.
    fn fetch(&self, ranges: Vec<Range<u64>>, hint: Hint) -> bool {
        self.rt
            .block_on(self.disk.prefetch(ranges, Some(hint)))
            .is_ok()
    }

    /// The disk's bytes `r` (at most [`MAX_DISK_READ`]): from the cache on
    /// this (blocking) thread, else fetched first.
    fn bytes(&self, r: Range<u64>) -> Option<Vec<u8>> {
        let len = r.end.checked_sub(r.start)?;
        if len > MAX_DISK_READ {
            return None;
        }
        let planned = self.disk.read_cached(r.start, len).ok()?;
        if planned.is_complete() {
            return Some(planned.into_bytes());
        }
        self.rt.block_on(async {
            self.disk.prefetch(vec![r.clone()], None).await.ok()?;
            self.disk.read(r.start, len).await.ok()
        })
    }

    fn inode(&self, ino: u64) -> Option<Vec<u8>> {
        let r = self.map.geometry.inode_at(&self.map.tables, ino)?;
        self.bytes(r)
    }

    /// A directory's or regular file's extents in file order, its tree's
    /// deeper nodes read as needed (a queue; depths must fall).
    fn extents(&self, inode: &[u8], dir: bool) -> Option<Vec<Extent>> {
        let g = &self.map.geometry;
        let root = if dir {
            g.directory(inode)
        } else {
            g.regular_file(inode)
        }
        .ok()?;
        let mut out = root.leaves;
        let mut todo = root.children;
        let mut nodes = 0;
        while let Some((r, depth)) = todo.pop() {
            nodes += 1;
            if nodes > MAX_FILE_NODES {
                return None;
            }
            let node = g.node(&self.bytes(r)?, Some(depth)).ok()?;
            out.extend(node.leaves);
            todo.extend(node.children);
        }
        out.sort_by_key(|e| e.file);
        Some(out)
    }

    /// `len` bytes of `file` at `offset` (holes read as zeros).
    fn read_file(&self, file: &File, offset: u64, len: usize) -> Option<Vec<u8>> {
        let end = offset.checked_add(len as u64)?;
        if len as u64 > MAX_DISK_READ {
            return None;
        }
        let mut out = vec![0u8; len];
        for e in &file.extents {
            let lo = offset.max(e.file);
            let hi = end.min(e.file + (e.disk.end - e.disk.start));
            if lo >= hi {
                continue;
            }
            let at = e.disk.start + (lo - e.file);
            let bytes = self.bytes(at..at + (hi - lo))?;
            out[usize_from(lo - offset)..usize_from(hi - offset)].copy_from_slice(&bytes);
        }
        Some(out)
    }
}

impl Tree for DiskTree<'_> {
    fn root(&self) -> u64 {
        ROOT_INO
    }

    fn lookup(&self, dir: u64, name: &[u8]) -> Option<u64> {
        let inode = self.inode(dir)?;
        let block = usize_from(self.map.geometry.block_size);
        let mut budget = MAX_DIR_BYTES;
        for e in self.extents(&inode, true)? {
            let mut at = e.disk.start;
            while at < e.disk.end {
                let len = (e.disk.end - at).min(MAX_DISK_READ);
                budget = budget.checked_sub(len)?;
                let bytes = self.bytes(at..at + len)?;
                if let Some(ino) = bytes.chunks(block).find_map(|b| ext4::dir_entry(b, name)) {
                    return Some(ino);
                }
                at += len;
            }
        }
        None
    }

    fn link(&self, ino: u64) -> Option<Vec<u8>> {
        let inode = self.inode(ino)?;
        match self.map.geometry.link(&inode)? {
            LinkTarget::Here(target) => Some(target),
            LinkTarget::At(r) => self.bytes(r),
        }
    }
}

/// The disk ranges of a file's first `len` bytes.
fn head(extents: &[Extent], len: u64) -> Vec<Range<u64>> {
    extents
        .iter()
        .filter(|e| e.file < len)
        .map(|e| e.disk.start..e.disk.end.min(e.disk.start + (len - e.file)))
        .collect()
}

#[cfg(test)]
impl LazyDisk {
    /// Where the regular file at absolute `path` lies, in file order, as
    /// the entrypoint's lookup finds it.
    pub(super) async fn file_extents(self: &Arc<Self>, path: &str) -> Option<Vec<Extent>> {
        let (me, path) = (self.clone(), path.to_owned());
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let map = me.ext4.get()?;
            let tree = DiskTree { disk: &me, map, rt };
            tree.file(path.as_bytes()).map(|f| f.extents)
        })
        .await
        .ok()?
    }
}
