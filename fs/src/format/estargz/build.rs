//! TOC -> [`LayerIndex`]: names normalised and checked, implicit directories
//! added, hardlinks joined, whiteouts turned into their overlayfs form, large
//! files' chunks validated and tied to the blob ranges that hold them.

use std::collections::{HashMap, HashSet};

use base64::Engine as _;

use super::rfc3339;
use super::toc::{MAX_TOC_ENTRIES, TOC_TAR_NAME, Toc, TocEntry};
use crate::Digest;
use crate::format::{Chunk, FileKind, FormatError, InodeSpec, LayerIndex, ROOT_INO};
use crate::num::usize_from;

/// Largest regular file we accept.
pub const MAX_FILE_SIZE: u64 = 1 << 40;

pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";

fn err(msg: impl Into<String>) -> FormatError {
    FormatError::Toc(msg.into())
}

/// Builds the index of a layer from its TOC. `toc_offset` bounds every
/// payload offset; the TOC is consumed so its memory is freed as soon as the
/// (more compact) index exists.
pub fn build_index(
    toc: Toc<'_>,
    blob_size: u64,
    toc_offset: u64,
) -> Result<LayerIndex, FormatError> {
    if toc_offset > blob_size {
        return Err(err(format!(
            "TOC offset {toc_offset} is beyond the blob size {blob_size}"
        )));
    }
    if toc.entries.len() > MAX_TOC_ENTRIES {
        return Err(err(format!(
            "{} entries is more than the limit of {MAX_TOC_ENTRIES}",
            toc.entries.len()
        )));
    }
    let starts = member_starts(&toc.entries, toc_offset)?;
    let mut b = Builder::new(starts, toc_offset);
    let mut hardlinks = Vec::new();
    for entry in toc.entries {
        b.entry(entry, &mut hardlinks)?;
    }
    b.finish_file()?;
    for (path, target) in hardlinks {
        b.hardlink(path, &target)?;
    }
    b.finish(blob_size)
}

/// Sorted, distinct blob offsets where a payload's gzip member starts; each
/// chunk's compressed range ends at the next one (or at the TOC).
fn member_starts(entries: &[TocEntry<'_>], toc_offset: u64) -> Result<Vec<u64>, FormatError> {
    let mut starts = Vec::new();
    for e in entries {
        let has_payload = e.kind == "chunk" || (e.kind == "reg" && e.size > 0);
        if has_payload {
            if e.offset >= toc_offset {
                return Err(err(format!(
                    "{:?}: offset {} is not before the TOC at {toc_offset}",
                    e.name, e.offset
                )));
            }
            starts.push(e.offset);
        }
    }
    starts.sort_unstable();
    starts.dedup();
    Ok(starts)
}

/// Splits a TOC name into clean components: leading `./` and `/`, repeated
/// and trailing slashes and `.` components go; `..` is refused. The root is
/// the empty path.
pub(crate) fn normalize(name: &str) -> Result<String, FormatError> {
    let mut out = String::with_capacity(name.len());
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(err(format!("{name:?}: a name with '..' escapes the layer"))),
            c => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    Ok(out)
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
        .map_err(|e| err(format!("{name:?}: bad {field}: {e}")))
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

struct Builder {
    inodes: Vec<InodeSpec>,
    chunks: Vec<Chunk>,
    paths: HashMap<String, u64>,
    opaque: HashSet<u64>,
    starts: Vec<u64>,
    toc_offset: u64,
    prefetch: Option<std::ops::Range<u64>>,
    open: Option<OpenFile>,
}

impl Builder {
    fn new(starts: Vec<u64>, toc_offset: u64) -> Builder {
        Builder {
            inodes: vec![implicit_dir(ROOT_INO)],
            chunks: Vec::new(),
            paths: HashMap::from([(String::new(), ROOT_INO)]),
            opaque: HashSet::new(),
            starts,
            toc_offset,
            prefetch: None,
            open: None,
        }
    }

    fn entry(
        &mut self,
        e: TocEntry<'_>,
        hardlinks: &mut Vec<(String, String)>,
    ) -> Result<(), FormatError> {
        if e.kind == "chunk" {
            return self.chunk(&e);
        }
        self.finish_file()?;
        let path = normalize(&e.name)?;
        let (parent, base) = split_parent(&path);
        if parent.is_empty()
            && [TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK].contains(&base)
        {
            if base == PREFETCH_LANDMARK {
                self.prefetch = Some(0..e.offset);
            }
            return self.skip_file(path, &e);
        }
        if base == OPAQUE_WHITEOUT {
            let dir = self.dir(parent)?;
            self.opaque.insert(dir);
            return self.skip_file(path, &e);
        }
        if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() {
                return Err(err(format!("{:?}: whiteout of an empty name", e.name)));
            }
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
        let kind = match &*e.kind {
            "dir" => FileKind::Dir,
            "reg" => FileKind::Reg,
            "symlink" => FileKind::Symlink,
            "char" => FileKind::CharDev,
            "block" => FileKind::BlockDev,
            "fifo" => FileKind::Fifo,
            "hardlink" => {
                let target = normalize(&e.link_name)?;
                if path.is_empty() || target.is_empty() {
                    return Err(err(format!(
                        "hardlink {:?} -> {:?}: not a file",
                        e.name, e.link_name
                    )));
                }
                hardlinks.push((path, target));
                return Ok(());
            }
            other => return Err(err(format!("{:?}: unknown entry type {other:?}", e.name))),
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
                    "{:?}: size {} is larger than the limit of {MAX_FILE_SIZE}",
                    e.name, e.size
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
    fn inode_of(&self, e: &TocEntry<'_>, kind: FileKind) -> Result<InodeSpec, FormatError> {
        let id = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| err(format!("{:?}: {what} {v} is out of range", e.name)))
        };
        let mtime = if e.mod_time.is_empty() {
            0
        } else {
            rfc3339::parse(&e.mod_time).map_err(|m| err(format!("{:?}: {m}", e.name)))?
        };
        let mut xattrs = Vec::with_capacity(e.xattrs.len());
        for (k, v) in &e.xattrs {
            let value = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|x| err(format!("{:?}: bad base64 in xattr {k:?}: {x}", e.name)))?;
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
            FileKind::Symlink => ((0, 0), e.link_name.as_bytes().into()),
            _ => ((0, 0), Box::default()),
        };
        let size = match kind {
            FileKind::Reg => e.size,
            FileKind::Symlink => link_target.len() as u64,
            _ => 0,
        };
        Ok(InodeSpec {
            kind,
            mode: (e.mode & 0o7777) as u32,
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
                "chunk entry {:?} does not follow a regular file",
                e.name
            )));
        };
        if e.kind == "chunk" && !e.name.is_empty() && normalize(&e.name)? != f.path {
            return Err(err(format!(
                "chunk entry {:?} follows a different file {:?}",
                e.name, f.path
            )));
        }
        let name = &f.path;
        if e.chunk_offset != f.covered {
            let what = if e.chunk_offset > f.covered {
                "a gap"
            } else {
                "an overlap"
            };
            return Err(err(format!(
                "{name:?}: chunk at {} leaves {what} after {} bytes",
                e.chunk_offset, f.covered
            )));
        }
        if e.chunk_offset >= f.size {
            return Err(err(format!(
                "{name:?}: chunk at {} is beyond the file's size {}",
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
                "{name:?}: chunk [{}, +{size}) runs past the file's size {}",
                e.chunk_offset, f.size
            )));
        }
        // member_starts checked offset < toc_offset for every payload entry.
        let i = self.starts.partition_point(|&s| s <= e.offset);
        let end = self.starts.get(i).copied().unwrap_or(self.toc_offset);
        let chunk = Chunk {
            file_offset: e.chunk_offset,
            size,
            digest: Digest([0; 32]),
            blob_range: (e.offset, end),
            inner_offset: e.inner_offset,
        };
        let digest = parse_digest(name, "chunkDigest", &e.chunk_digest)?;
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
                "{:?}: chunks cover {} of its {} bytes",
                f.path, f.covered, f.size
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
                        "{:?}: no chunkDigest nor digest: cannot verify",
                        f.path
                    ))
                })?,
                (None, false) => {
                    return Err(err(format!(
                        "{:?}: chunk at {} has no chunkDigest: cannot verify",
                        f.path, chunk.file_offset
                    )));
                }
            };
            self.chunks.push(chunk);
        }
        let range = u32::try_from(start)
            .ok()
            .zip(u32::try_from(self.chunks.len()).ok())
            .ok_or_else(|| err("too many chunks"))?;
        let inode = &mut self.inodes[usize_from(ino - 1)];
        inode.chunks = range.0..range.1;
        inode.digest = f.whole;
        Ok(())
    }

    /// The directory at `path`, created (with its parents) if implicit.
    fn dir(&mut self, path: &str) -> Result<u64, FormatError> {
        if let Some(&ino) = self.paths.get(path) {
            if self.inodes[usize_from(ino - 1)].kind != FileKind::Dir {
                return Err(err(format!(
                    "{path:?} is used as a directory but is not one"
                )));
            }
            return Ok(ino);
        }
        let (parent, base) = split_parent(path);
        let parent_ino = self.dir(parent)?;
        Ok(self.add(path, base, parent_ino, implicit_dir(parent_ino)))
    }

    fn add(&mut self, path: &str, base: &str, parent: u64, mut inode: InodeSpec) -> u64 {
        inode.parent = parent;
        self.inodes.push(inode);
        let ino = self.inodes.len() as u64;
        self.inodes[usize_from(parent - 1)]
            .children
            .push((base.as_bytes().into(), ino));
        self.paths.insert(path.to_string(), ino);
        ino
    }

    /// Adds `inode` at `path`. Returns its number, or None when an
    /// identical file already sits there (a harmless duplicate).
    fn insert(&mut self, path: &str, inode: InodeSpec) -> Result<Option<u64>, FormatError> {
        if path.is_empty() && inode.kind != FileKind::Dir {
            return Err(err("an entry with an empty name is not the root directory"));
        }
        if let Some(&ino) = self.paths.get(path) {
            let old = &mut self.inodes[usize_from(ino - 1)];
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
                "{path:?} appears twice with different content or type"
            )));
        }
        let (parent, base) = split_parent(path);
        let parent_ino = self.dir(parent)?;
        Ok(Some(self.add(path, base, parent_ino, inode)))
    }

    fn hardlink(&mut self, path: String, target: &str) -> Result<(), FormatError> {
        let Some(&ino) = self.paths.get(target) else {
            return Err(err(format!(
                "hardlink {path:?}: target {target:?} does not exist"
            )));
        };
        if self.inodes[usize_from(ino - 1)].kind == FileKind::Dir {
            return Err(err(format!(
                "hardlink {path:?}: target {target:?} is a directory"
            )));
        }
        if let Some(&existing) = self.paths.get(&path) {
            if existing == ino {
                return Ok(());
            }
            return Err(err(format!(
                "{path:?} appears twice with different content or type"
            )));
        }
        let (parent, base) = split_parent(&path);
        let parent_ino = self.dir(parent)?;
        self.inodes[usize_from(parent_ino - 1)]
            .children
            .push((base.as_bytes().into(), ino));
        self.inodes[usize_from(ino - 1)].nlink += 1;
        self.paths.insert(path, ino);
        Ok(())
    }

    fn finish(mut self, blob_size: u64) -> Result<LayerIndex, FormatError> {
        for &ino in &self.opaque {
            let d = &mut self.inodes[usize_from(ino - 1)];
            d.xattrs.retain(|(k, _)| &**k != OPAQUE_XATTR);
            d.xattrs.push((OPAQUE_XATTR.into(), b"y".as_slice().into()));
        }
        let kinds: Vec<FileKind> = self.inodes.iter().map(|i| i.kind).collect();
        for inode in &mut self.inodes {
            if inode.kind == FileKind::Dir {
                let subdirs = inode
                    .children
                    .iter()
                    .filter(|(_, c)| kinds[usize_from(*c - 1)] == FileKind::Dir)
                    .count();
                // A TOC's entries are capped far below u32::MAX, so this
                // only refuses a layer the index would refuse anyway.
                inode.nlink = u32::try_from(subdirs)
                    .ok()
                    .and_then(|n| n.checked_add(2))
                    .ok_or_else(|| {
                        FormatError::Toc(format!("a directory has {subdirs} subdirectories"))
                    })?;
            }
        }
        // Everything built so far is transient; the index is the compact copy.
        drop(self.paths);
        LayerIndex::new(self.inodes, self.chunks, blob_size, self.prefetch)
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
