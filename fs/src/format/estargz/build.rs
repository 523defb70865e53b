//! TOC -> [`LayerIndex`]: names checked (`names.rs`), implicit directories
//! added, hardlinks joined, whiteouts turned into their overlayfs form, large
//! files' chunks validated and tied to the blob ranges that hold them.
//!
//! Entries are built one at a time as the TOC's JSON is decoded
//! ([`build_index_from_json`]): the TOC never exists as a list, and what the
//! index would take is checked against the layer's [`IndexBudget`] after
//! every entry, so a TOC too large for it is refused as soon as it is seen
//! to be, in bounded memory.

use std::collections::{HashMap, HashSet};
use std::mem::size_of;

use base64::Engine as _;

use super::names::{
    Base, OPAQUE_XATTR, Shown, check_symlink_target, check_xattr, classify, clean_path,
    is_overlay_private,
};
use super::rfc3339;
use super::toc::{MAX_TOC_ENTRIES, TOC_TAR_NAME, Toc, TocEntry, TocJson, for_each_entry};
use crate::Digest;
use crate::format::{Chunk, FileKind, FormatError, InodeSpec, LayerIndex, ROOT_INO};
use crate::num::usize_from;

/// Largest regular file we accept.
pub const MAX_FILE_SIZE: u64 = 1 << 40;

pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";

/// What a heap allocation costs beyond its bytes (malloc's header and
/// rounding), counted for each name, path and xattr the builder keeps.
const ALLOC_OVERHEAD: u64 = 16;

fn err(msg: impl Into<String>) -> FormatError {
    FormatError::Toc(msg.into())
}

fn slot(ino: u64) -> usize {
    usize_from(ino - 1)
}

fn len64(n: usize) -> u64 {
    // usize is at most 64 bits on every target tarn builds for.
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The memory one layer's index may take while it is built: the TOC as
/// fetched and decompressed, and the builder's and the finished index's
/// structures. Past it the layer is refused
/// ([`FormatError::IndexBudget`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexBudget {
    /// The bound, bytes.
    pub limit: u64,
    /// What is already spent before the first entry (the TOC's bytes).
    pub spent: u64,
}

impl IndexBudget {
    /// Default per-layer bound: a node can afford it for a few layers
    /// opening at once; it holds a TOC of a few hundred thousand entries
    /// (250,000 of 130 bytes of JSON each, measured). 32 MiB under the
    /// 256 MiB a process opening one hostile layer may peak at: the
    /// process itself (runtime, buffers, mapped code) takes 15-20 MiB
    /// beside the index, and at 256 MiB a layer refused at the bound
    /// peaked at 255-256 MiB.
    pub const DEFAULT_LIMIT: u64 = 224 << 20;

    pub fn new(limit: u64) -> IndexBudget {
        IndexBudget { limit, spent: 0 }
    }

    /// No bound (tools and tests that build a TOC already in hand).
    pub fn unlimited() -> IndexBudget {
        IndexBudget::new(u64::MAX)
    }

    fn refuse(&self, entries: u64) -> FormatError {
        FormatError::IndexBudget {
            limit: self.limit,
            entries,
        }
    }
}

impl Default for IndexBudget {
    fn default() -> IndexBudget {
        IndexBudget::new(IndexBudget::DEFAULT_LIMIT)
    }
}

/// Builds the index of a layer from a TOC already decoded into a list
/// (tools and tests; a layer's opening streams, see
/// [`build_index_from_json`]). `toc_offset` bounds every payload offset.
pub fn build_index(
    toc: Toc<'_>,
    blob_size: u64,
    toc_offset: u64,
) -> Result<LayerIndex, FormatError> {
    let mut b = Builder::new(blob_size, toc_offset, IndexBudget::unlimited())?;
    for entry in toc.entries {
        b.entry(entry)?;
    }
    b.finish()
}

/// Builds the index of a layer from its TOC JSON, each entry as it is
/// decoded, within `budget` (the JSON's bytes are charged to it, and
/// given back before the index is assembled).
pub fn build_index_from_json(
    json: TocJson,
    blob_size: u64,
    toc_offset: u64,
    mut budget: IndexBudget,
) -> Result<LayerIndex, FormatError> {
    let json_bytes = len64(json.json.capacity());
    budget.spent = budget.spent.saturating_add(json_bytes);
    if budget.spent > budget.limit {
        return Err(budget.refuse(0));
    }
    let mut b = Builder::new(blob_size, toc_offset, budget)?;
    for_each_entry(&json.json, |e| b.entry(e))?;
    drop(json);
    b.budget.spent -= json_bytes;
    b.finish()
}

fn split_parent(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

fn parse_digest(name: &str, field: &str, s: &str) -> Result<Option<Digest>, FormatError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| err(format!("{}: bad {field}: {e}", Shown(name))))
}

/// A regular file whose chunk entries are still arriving.
struct OpenFile {
    path: String,
    /// None: a duplicate or hidden file whose chunks are skipped.
    ino: Option<u64>,
    size: u64,
    covered: u64,
    whole: Option<Digest>,
    chunks: Vec<(Chunk, Option<Digest>)>,
}

/// Entries of one kind left out of the index: how many, and the first.
#[derive(Default)]
struct Dropped {
    count: u64,
    first: Option<String>,
}

impl Dropped {
    fn note(&mut self, what: impl FnOnce() -> String) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(what());
        }
    }

    /// One line per layer, not per entry: a hostile TOC must not flood
    /// the log either.
    fn log(&self, what: &str) {
        if let Some(first) = &self.first {
            tracing::warn!(count = self.count, first = %first, "{what}");
        }
    }
}

struct Builder {
    inodes: Vec<InodeSpec>,
    chunks: Vec<Chunk>,
    paths: HashMap<String, u64>,
    opaque: HashSet<u64>,
    /// Blob offsets where a payload's gzip member starts; each chunk's
    /// compressed range ends at the next one (or at the TOC).
    starts: Vec<u64>,
    hardlinks: Vec<(String, String)>,
    blob_size: u64,
    toc_offset: u64,
    prefetch: Option<std::ops::Range<u64>>,
    open: Option<OpenFile>,
    budget: IndexBudget,
    entries: u64,
    /// Heap bytes of what the builder keeps besides its big vectors (paths,
    /// names, link targets, xattrs, directory entries).
    kept: u64,
    /// Of `kept`, what the finished index stores again (names, targets,
    /// xattrs) while the builder still holds it.
    index_bytes: u64,
    overlay_xattrs: Dropped,
    aufs_meta: Dropped,
}

impl Builder {
    fn new(blob_size: u64, toc_offset: u64, budget: IndexBudget) -> Result<Builder, FormatError> {
        if toc_offset > blob_size {
            return Err(err(format!(
                "TOC offset {toc_offset} is beyond the blob size {blob_size}"
            )));
        }
        Ok(Builder {
            inodes: vec![implicit_dir(ROOT_INO)],
            chunks: Vec::new(),
            paths: HashMap::from([(String::new(), ROOT_INO)]),
            opaque: HashSet::new(),
            starts: Vec::new(),
            hardlinks: Vec::new(),
            blob_size,
            toc_offset,
            prefetch: None,
            open: None,
            budget,
            entries: 0,
            kept: 0,
            index_bytes: 0,
            overlay_xattrs: Dropped::default(),
            aufs_meta: Dropped::default(),
        })
    }

    /// Heap bytes the builder holds now (its vectors by capacity, a hash
    /// table's slots at twice theirs: it holds both tables while it grows).
    fn held(&self) -> u64 {
        let open = self.open.as_ref().map_or(0, |f| {
            f.chunks.capacity() * size_of::<(Chunk, Option<Digest>)>()
        });
        let vectors = self.inodes.capacity() * size_of::<InodeSpec>()
            + self.chunks.capacity() * size_of::<Chunk>()
            + self.starts.capacity() * size_of::<u64>()
            + self.hardlinks.capacity() * size_of::<(String, String)>()
            + self.paths.capacity() * (size_of::<(String, u64)>() + 1) * 2
            + open;
        len64(vectors).saturating_add(self.kept)
    }

    /// What the finished index will take besides what the builder already
    /// holds: fixed-size records per inode and directory entry.
    fn index_estimate(&self) -> u64 {
        // Node (24) + Dirent (8) + an attribute slot, per inode.
        len64(self.inodes.len()) * 48 + self.index_bytes
    }

    fn check_budget(&self) -> Result<(), FormatError> {
        let used = self
            .budget
            .spent
            .saturating_add(self.held())
            .saturating_add(self.index_estimate());
        if used > self.budget.limit {
            return Err(self.budget.refuse(self.entries));
        }
        Ok(())
    }

    /// One TOC entry, then the budget checked.
    fn entry(&mut self, e: TocEntry<'_>) -> Result<(), FormatError> {
        self.entries += 1;
        if self.entries > len64(MAX_TOC_ENTRIES) {
            return Err(err(format!(
                "more entries than the limit of {MAX_TOC_ENTRIES}"
            )));
        }
        self.payload_start(&e)?;
        self.add_entry(e)?;
        self.check_budget()
    }

    /// Notes where the entry's payload member starts, if it has one.
    fn payload_start(&mut self, e: &TocEntry<'_>) -> Result<(), FormatError> {
        let has_payload = e.kind == "chunk" || (e.kind == "reg" && e.size > 0);
        if has_payload {
            if e.offset >= self.toc_offset {
                return Err(err(format!(
                    "{}: offset {} is not before the TOC at {}",
                    Shown(&e.name),
                    e.offset,
                    self.toc_offset
                )));
            }
            self.starts.push(e.offset);
        }
        Ok(())
    }

    fn add_entry(&mut self, e: TocEntry<'_>) -> Result<(), FormatError> {
        if e.kind == "chunk" {
            return self.chunk(&e);
        }
        self.finish_file()?;
        let path = clean_path(&e.name)?;
        let (parent, base) = split_parent(&path);
        if parent.is_empty()
            && [TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK].contains(&base)
        {
            if base == PREFETCH_LANDMARK {
                self.prefetch = Some(0..e.offset);
            }
            return self.skip_file(path, &e);
        }
        match classify(&e.name, base)? {
            Base::Plain => {}
            Base::Opaque => {
                let dir = self.dir(parent)?;
                self.opaque.insert(dir);
                return self.skip_file(path, &e);
            }
            Base::AufsMeta => {
                self.aufs_meta.note(|| path.clone());
                return self.skip_file(path, &e);
            }
            Base::Whiteout(hidden) => {
                let target = if parent.is_empty() {
                    hidden.to_string()
                } else {
                    format!("{parent}/{hidden}")
                };
                let mut ino = self.inode_of(&e, FileKind::CharDev)?;
                (ino.mode, ino.uid, ino.gid, ino.rdev, ino.size) = (0, 0, 0, (0, 0), 0);
                ino.xattrs.clear();
                self.insert(&target, ino)?;
                return self.skip_file(path, &e);
            }
        }
        let kind = match &*e.kind {
            "dir" => FileKind::Dir,
            "reg" => FileKind::Reg,
            "symlink" => FileKind::Symlink,
            "char" => FileKind::CharDev,
            "block" => FileKind::BlockDev,
            "fifo" => FileKind::Fifo,
            "hardlink" => {
                // The refusal names the entry, not only its target.
                let target = clean_path(&e.link_name)
                    .map_err(|why| err(format!("hardlink {}: target {why}", Shown(&e.name))))?;
                if path.is_empty() || target.is_empty() {
                    return Err(err(format!(
                        "hardlink {} -> {}: not a file",
                        Shown(&e.name),
                        Shown(&e.link_name)
                    )));
                }
                self.kept += len64(path.len() + target.len()) + 2 * ALLOC_OVERHEAD;
                self.hardlinks.push((path, target));
                return Ok(());
            }
            other => {
                return Err(err(format!(
                    "{}: unknown entry type {}",
                    Shown(&e.name),
                    Shown(other)
                )));
            }
        };
        let mut ino = self.inode_of(&e, kind)?;
        let whole = parse_digest(&e.name, "digest", &e.digest)?;
        if kind == FileKind::Reg {
            ino.digest = whole;
        }
        let inserted = self.insert(&path, ino)?;
        if kind == FileKind::Reg {
            if e.size > MAX_FILE_SIZE {
                return Err(err(format!(
                    "{}: size {} is larger than the limit of {MAX_FILE_SIZE}",
                    Shown(&e.name),
                    e.size
                )));
            }
            self.open = Some(OpenFile {
                path,
                ino: inserted,
                size: e.size,
                covered: 0,
                whole,
                chunks: Vec::new(),
            });
            if e.size > 0 {
                self.chunk(&e)?;
            }
        }
        Ok(())
    }

    /// Starts a file whose content is not shown; its chunks are checked for
    /// order only.
    fn skip_file(&mut self, path: String, e: &TocEntry<'_>) -> Result<(), FormatError> {
        if e.kind == "reg" {
            self.open = Some(OpenFile {
                path,
                ino: None,
                size: e.size,
                covered: 0,
                whole: None,
                chunks: Vec::new(),
            });
            if e.size > 0 {
                self.chunk(e)?;
            }
        }
        Ok(())
    }

    /// The attributes common to every kind, checked.
    fn inode_of(&mut self, e: &TocEntry<'_>, kind: FileKind) -> Result<InodeSpec, FormatError> {
        let id = |v: u64, what: &str| {
            u32::try_from(v)
                .map_err(|_| err(format!("{}: {what} {v} is out of range", Shown(&e.name))))
        };
        let mtime = if e.mod_time.is_empty() {
            0
        } else {
            rfc3339::parse(&e.mod_time).map_err(|m| err(format!("{}: {m}", Shown(&e.name))))?
        };
        let mut xattrs = Vec::with_capacity(e.xattrs.len());
        for (k, v) in &e.xattrs {
            if is_overlay_private(k) {
                self.overlay_xattrs
                    .note(|| format!("{} on {}", Shown(k), Shown(&e.name)));
                continue;
            }
            let value = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|x| {
                    err(format!(
                        "{}: bad base64 in xattr {}: {x}",
                        Shown(&e.name),
                        Shown(k)
                    ))
                })?;
            check_xattr(&e.name, k, &value)?;
            let bytes = len64(k.len() + value.len() + size_of::<super::super::Xattr>());
            self.kept += bytes + 2 * ALLOC_OVERHEAD;
            self.index_bytes += bytes + 2 * ALLOC_OVERHEAD;
            xattrs.push((k.as_bytes().into(), value.into_boxed_slice()));
        }
        let (rdev, link_target): ((u32, u32), Box<[u8]>) = match kind {
            FileKind::CharDev | FileKind::BlockDev => (
                (
                    id(e.dev_major, "device major")?,
                    id(e.dev_minor, "device minor")?,
                ),
                Box::default(),
            ),
            FileKind::Symlink => {
                check_symlink_target(&e.name, &e.link_name)?;
                let target = len64(e.link_name.len());
                self.kept += target + ALLOC_OVERHEAD;
                self.index_bytes += target;
                ((0, 0), e.link_name.as_bytes().into())
            }
            _ => ((0, 0), Box::default()),
        };
        let size = match kind {
            FileKind::Reg => e.size,
            FileKind::Symlink => len64(link_target.len()),
            _ => 0,
        };
        Ok(InodeSpec {
            kind,
            // Masked to 12 bits: fits.
            mode: u32::try_from(e.mode & 0o7777).unwrap_or(0),
            uid: id(e.uid, "uid")?,
            gid: id(e.gid, "gid")?,
            mtime,
            size,
            nlink: 1,
            rdev,
            parent: ROOT_INO,
            link_target,
            xattrs,
            children: Vec::new(),
            chunks: 0..0,
            digest: None,
        })
    }

    /// A payload piece of the open regular file (its `reg` entry or a
    /// following `chunk` entry).
    fn chunk(&mut self, e: &TocEntry<'_>) -> Result<(), FormatError> {
        let Some(f) = self.open.as_mut() else {
            return Err(err(format!(
                "chunk entry {} does not follow a regular file",
                Shown(&e.name)
            )));
        };
        if e.kind == "chunk" && !e.name.is_empty() && clean_path(&e.name)? != f.path {
            return Err(err(format!(
                "chunk entry {} follows a different file {}",
                Shown(&e.name),
                Shown(&f.path)
            )));
        }
        let name = Shown(&f.path);
        if e.chunk_offset != f.covered {
            let what = if e.chunk_offset > f.covered {
                "a gap"
            } else {
                "an overlap"
            };
            return Err(err(format!(
                "{name}: chunk at {} leaves {what} after {} bytes",
                e.chunk_offset, f.covered
            )));
        }
        if e.chunk_offset >= f.size {
            return Err(err(format!(
                "{name}: chunk at {} is beyond the file's size {}",
                e.chunk_offset, f.size
            )));
        }
        let size = if e.chunk_size == 0 {
            f.size - e.chunk_offset
        } else {
            e.chunk_size
        };
        if size > f.size - e.chunk_offset {
            return Err(err(format!(
                "{name}: chunk [{}, +{size}) runs past the file's size {}",
                e.chunk_offset, f.size
            )));
        }
        let chunk = Chunk {
            file_offset: e.chunk_offset,
            size,
            digest: Digest([0; 32]),
            // The end is the next member's start, known once every entry
            // is in (`finish`).
            blob_range: (e.offset, e.offset),
            inner_offset: e.inner_offset,
        };
        let digest = parse_digest(&f.path, "chunkDigest", &e.chunk_digest)?;
        f.covered += size;
        if f.ino.is_some() {
            f.chunks.push((chunk, digest));
        }
        Ok(())
    }

    /// Closes the open regular file: its chunks must cover it exactly and
    /// each must be verifiable.
    fn finish_file(&mut self) -> Result<(), FormatError> {
        let Some(f) = self.open.take() else {
            return Ok(());
        };
        if f.covered != f.size {
            return Err(err(format!(
                "{}: chunks cover {} of its {} bytes",
                Shown(&f.path),
                f.covered,
                f.size
            )));
        }
        let Some(ino) = f.ino else {
            return Ok(());
        };
        let single = f.chunks.len() == 1;
        let start = self.chunks.len();
        for (mut chunk, digest) in f.chunks {
            chunk.digest = match (digest, single) {
                (Some(d), _) => d,
                (None, true) => f.whole.ok_or_else(|| {
                    err(format!(
                        "{}: no chunkDigest nor digest: cannot verify",
                        Shown(&f.path)
                    ))
                })?,
                (None, false) => {
                    return Err(err(format!(
                        "{}: chunk at {} has no chunkDigest: cannot verify",
                        Shown(&f.path),
                        chunk.file_offset
                    )));
                }
            };
            self.chunks.push(chunk);
        }
        let range = u32::try_from(start)
            .ok()
            .zip(u32::try_from(self.chunks.len()).ok())
            .ok_or_else(|| err("too many chunks"))?;
        let inode = &mut self.inodes[slot(ino)];
        inode.chunks = range.0..range.1;
        inode.digest = f.whole;
        Ok(())
    }

    /// The directory at `path`, created (with its parents) if implicit.
    /// Iterative: a path's depth is the input's to choose.
    fn dir(&mut self, path: &str) -> Result<u64, FormatError> {
        // The longest prefix that exists (the root always does), walking up.
        let mut end = path.len();
        let mut ino = loop {
            if let Some(&ino) = self.paths.get(&path[..end]) {
                if self.inodes[slot(ino)].kind != FileKind::Dir {
                    return Err(err(format!(
                        "{} is used as a directory but is not one",
                        Shown(&path[..end])
                    )));
                }
                break ino;
            }
            end = path[..end].rfind('/').unwrap_or(0);
        };
        // Then the missing ones, walking down.
        while end < path.len() {
            let start = if end == 0 { 0 } else { end + 1 };
            let next = path[start..].find('/').map_or(path.len(), |i| start + i);
            ino = self.add(&path[..next], &path[start..next], ino, implicit_dir(ino));
            end = next;
        }
        Ok(ino)
    }

    fn add(&mut self, path: &str, base: &str, parent: u64, mut inode: InodeSpec) -> u64 {
        inode.parent = parent;
        self.inodes.push(inode);
        let ino = len64(self.inodes.len());
        self.inodes[slot(parent)]
            .children
            .push((base.as_bytes().into(), ino));
        self.paths.insert(path.to_string(), ino);
        self.note_name(path, base);
        ino
    }

    /// Accounts for a name added under `path`: the path kept for lookups,
    /// the entry in its directory (whose vector may be twice its length),
    /// and the name stored again in the index.
    fn note_name(&mut self, path: &str, base: &str) {
        let entry = len64(size_of::<(Box<[u8]>, u64)>());
        self.kept += len64(path.len() + base.len()) + 2 * ALLOC_OVERHEAD + 2 * entry;
        self.index_bytes += len64(base.len());
    }

    /// Adds `inode` at `path`. Returns its number, or None when an
    /// identical file already sits there (a harmless duplicate).
    fn insert(&mut self, path: &str, inode: InodeSpec) -> Result<Option<u64>, FormatError> {
        if path.is_empty() && inode.kind != FileKind::Dir {
            return Err(err("an entry with an empty name is not the root directory"));
        }
        if let Some(&ino) = self.paths.get(path) {
            let old = &mut self.inodes[slot(ino)];
            if old.kind == FileKind::Dir && inode.kind == FileKind::Dir {
                // An explicit entry for a directory seen before (implicitly
                // or not) sets its attributes; the last one wins, as in tar.
                (old.mode, old.uid, old.gid, old.mtime) =
                    (inode.mode, inode.uid, inode.gid, inode.mtime);
                old.xattrs = inode.xattrs;
                return Ok(Some(ino));
            }
            if same_file(old, &inode) {
                return Ok(None);
            }
            return Err(err(format!(
                "{} appears twice with different content or type",
                Shown(path)
            )));
        }
        let (parent, base) = split_parent(path);
        let parent_ino = self.dir(parent)?;
        Ok(Some(self.add(path, base, parent_ino, inode)))
    }

    fn hardlink(&mut self, path: String, target: &str) -> Result<(), FormatError> {
        let Some(&ino) = self.paths.get(target) else {
            return Err(err(format!(
                "hardlink {}: target {} does not exist",
                Shown(&path),
                Shown(target)
            )));
        };
        if self.inodes[slot(ino)].kind == FileKind::Dir {
            return Err(err(format!(
                "hardlink {}: target {} is a directory",
                Shown(&path),
                Shown(target)
            )));
        }
        if let Some(&existing) = self.paths.get(&path) {
            if existing == ino {
                return Ok(());
            }
            return Err(err(format!(
                "{} appears twice with different content or type",
                Shown(&path)
            )));
        }
        let (parent, base) = split_parent(&path);
        let parent_ino = self.dir(parent)?;
        self.inodes[slot(parent_ino)]
            .children
            .push((base.as_bytes().into(), ino));
        self.inodes[slot(ino)].nlink += 1;
        self.note_name(&path, base);
        self.paths.insert(path, ino);
        Ok(())
    }

    fn finish(mut self) -> Result<LayerIndex, FormatError> {
        self.finish_file()?;
        for (path, target) in std::mem::take(&mut self.hardlinks) {
            self.hardlink(path, &target)?;
            self.check_budget()?;
        }
        self.overlay_xattrs
            .log("dropped overlay-private xattrs from the layer's TOC");
        self.aufs_meta
            .log("dropped AUFS metadata entries from the layer's TOC");
        // Each chunk's compressed range ends where the next member starts.
        let mut starts = std::mem::take(&mut self.starts);
        starts.sort_unstable();
        starts.dedup();
        for c in &mut self.chunks {
            let i = starts.partition_point(|&s| s <= c.blob_range.0);
            c.blob_range.1 = starts.get(i).copied().unwrap_or(self.toc_offset);
        }
        drop(starts);
        for &ino in &self.opaque {
            let d = &mut self.inodes[slot(ino)];
            d.xattrs.retain(|(k, _)| &**k != OPAQUE_XATTR.as_bytes());
            d.xattrs
                .push((OPAQUE_XATTR.as_bytes().into(), b"y".as_slice().into()));
        }
        let kinds: Vec<FileKind> = self.inodes.iter().map(|i| i.kind).collect();
        for inode in &mut self.inodes {
            if inode.kind == FileKind::Dir {
                let subdirs = inode
                    .children
                    .iter()
                    .filter(|(_, c)| kinds[slot(*c)] == FileKind::Dir)
                    .count();
                inode.nlink = u32::try_from(subdirs).map_or(u32::MAX, |n| n.saturating_add(2));
            }
        }
        drop(kinds);
        // Everything built so far is transient; the index is the compact copy.
        drop(self.paths);
        LayerIndex::new(self.inodes, self.chunks, self.blob_size, self.prefetch)
    }
}

/// A directory no entry describes: root-owned, 0755, epoch mtime.
fn implicit_dir(parent: u64) -> InodeSpec {
    InodeSpec {
        kind: FileKind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
        size: 0,
        nlink: 2,
        rdev: (0, 0),
        parent,
        link_target: Box::default(),
        xattrs: Vec::new(),
        children: Vec::new(),
        chunks: 0..0,
        digest: None,
    }
}

/// Whether a second entry for a path describes the same file.
fn same_file(a: &InodeSpec, b: &InodeSpec) -> bool {
    // Regular files are the same only if their content is provably the same.
    let content =
        a.kind != FileKind::Reg || a.size == 0 || (a.digest.is_some() && a.digest == b.digest);
    content
        && (a.kind, a.mode, a.uid, a.gid, a.size, a.rdev)
            == (b.kind, b.mode, b.uid, b.gid, b.size, b.rdev)
        && a.link_target == b.link_target
        && a.xattrs == b.xattrs
}

#[cfg(test)]
mod tests;
