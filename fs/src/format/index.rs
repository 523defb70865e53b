//! The in-memory index of one layer: what a format's TOC decodes into and what
//! the layer and FUSE code serve from. Format-independent.
//!
//! Inode numbers are dense: inode `n` is the `n`-th stored inode; the root
//! directory is inode 1 ([`ROOT_INO`]). Hardlinks share one inode.
//!
//! A daemon keeps the index of every mounted layer for as long as it is
//! mounted, so the stored form is compact (issue 5's budget is 300 bytes of
//! daemon memory per TOC entry, everything included): inodes are 24-byte
//! records in one vector, their kind, mode, owner and mtime in a table of the
//! layer's distinct combinations (a few hundred even in a layer of 50,000
//! files); all directory entries of the layer are (name start, inode) pairs
//! in one vector, each directory's run sorted by name; names and symlink
//! targets live in one byte arena; the rare parts (extended attributes,
//! whole-file digests that a file's only chunk does not already give) are
//! side tables keyed by inode number. A handful of allocations per layer,
//! whatever its size, also leaves the allocator nothing to fragment.
//! [`LayerIndex::inode`] hands out an [`Inode`] assembled by value;
//! [`InodeSpec`] is the owned description an index is built from
//! ([`LayerIndex::new`]).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ops::Range;

use super::FormatError;
use crate::Digest;

/// Inode number of the layer's root directory.
pub const ROOT_INO: u64 = 1;

/// What kind of file an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    Dir,
    Reg,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
}

/// One extended attribute: raw name bytes, raw value bytes.
pub type Xattr = (Box<[u8]>, Box<[u8]>);

/// One file of the layer as a format (or a test) describes it: the input of
/// [`LayerIndex::new`], which stores it compactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeSpec {
    pub kind: FileKind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Size in bytes (regular files: content; symlinks: target length).
    pub size: u64,
    /// Number of names this inode has (directories: 2 + subdirectories).
    pub nlink: u32,
    /// Device numbers for character and block devices (major, minor).
    pub rdev: (u32, u32),
    /// The parent directory's inode (the root is its own parent).
    pub parent: u64,
    /// Symlink target, raw bytes.
    pub link_target: Box<[u8]>,
    /// Extended attributes: raw name bytes -> raw value bytes.
    pub xattrs: Vec<Xattr>,
    /// Directory entries: name bytes and inode number, in any order.
    pub children: Vec<(Box<[u8]>, u64)>,
    /// Regular files: the range of [`LayerIndex::chunks`] holding the content,
    /// in file order. Empty for empty files and non-regular files.
    pub chunks: Range<u32>,
    /// Whole-file sha256 from the TOC, where the format gives one.
    pub digest: Option<Digest>,
}

impl InodeSpec {
    /// A file of `kind` with every other attribute zero or empty, in the
    /// root directory.
    pub fn new(kind: FileKind) -> InodeSpec {
        InodeSpec {
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            nlink: 1,
            rdev: (0, 0),
            parent: ROOT_INO,
            link_target: Box::default(),
            xattrs: Vec::new(),
            children: Vec::new(),
            chunks: 0..0,
            digest: None,
        }
    }
}

/// One file of the layer, as the kernel will see it: the fixed-size
/// attributes, handed out by value. What varies in length (entries, target,
/// chunks, xattrs) is reached through the [`LayerIndex`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inode {
    /// Directories: the parent's inode number (a directory's size is 0);
    /// others: the size. Files have no single parent (hardlinks).
    size_or_parent: u64,
    mtime: i64,
    uid: u32,
    gid: u32,
    nlink: u32,
    /// By kind: regular file, its range of `chunks`; directory, its range
    /// of `dirents`; symlink, its target's range of `names`; device, (major,
    /// minor).
    span: (u32, u32),
    mode: u16,
    kind: FileKind,
    /// Where the whole-file digest is (`DIGEST_*`).
    digest: u8,
}

/// No whole-file digest.
const DIGEST_NONE: u8 = 0;
/// The whole-file digest is the digest of the file's only chunk.
const DIGEST_OF_CHUNK: u8 = 1;
/// The whole-file digest is in `LayerIndex::digests`.
const DIGEST_SIDE: u8 = 2;

impl Inode {
    pub fn kind(&self) -> FileKind {
        self.kind
    }

    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub fn mode(&self) -> u32 {
        u32::from(self.mode)
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn gid(&self) -> u32 {
        self.gid
    }

    /// Modification time, seconds since the epoch.
    pub fn mtime(&self) -> i64 {
        self.mtime
    }

    /// Size in bytes (regular files: content; symlinks: target length;
    /// others: 0).
    pub fn size(&self) -> u64 {
        match self.kind {
            FileKind::Dir => 0,
            _ => self.size_or_parent,
        }
    }

    /// Number of names this inode has (directories: 2 + subdirectories).
    pub fn nlink(&self) -> u32 {
        self.nlink
    }

    /// A directory's parent directory (the root is its own parent); `None`
    /// for anything else, which may have several names.
    pub fn parent(&self) -> Option<u64> {
        match self.kind {
            FileKind::Dir => Some(self.size_or_parent),
            _ => None,
        }
    }

    /// Regular files: the range of [`LayerIndex::chunks`] holding the
    /// content, in file order. Empty for empty and non-regular files.
    pub fn chunks(&self) -> Range<u32> {
        match self.kind {
            FileKind::Reg => self.span.0..self.span.1,
            _ => 0..0,
        }
    }

    /// Device numbers (major, minor); (0, 0) unless a device.
    pub fn rdev(&self) -> (u32, u32) {
        match self.kind {
            FileKind::CharDev | FileKind::BlockDev => self.span,
            _ => (0, 0),
        }
    }

    fn span(&self) -> Range<usize> {
        self.span.0 as usize..self.span.1 as usize
    }
}

/// An inode as stored: 24 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Node {
    size_or_parent: u64,
    span: (u32, u32),
    nlink: u32,
    /// Index into `LayerIndex::attrs`.
    attrs: u32,
}

/// The attributes many inodes of a layer share: kind, mode, owner, mtime,
/// and where a regular file's whole digest is (`DIGEST_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Attrs {
    mtime: i64,
    uid: u32,
    gid: u32,
    mode: u16,
    kind: FileKind,
    digest: u8,
}

/// One directory entry: where its name starts in `names` (it ends where
/// the next entry's starts) and its inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Dirent {
    name: u32,
    ino: u32,
}

/// One verifiable piece of a regular file's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Where this chunk starts within its file.
    pub file_offset: u64,
    /// Uncompressed length of the chunk.
    pub size: u64,
    /// sha256 of the uncompressed chunk; the cache key and the check.
    pub digest: Digest,
    /// Compressed range of the blob that holds the chunk: from the start of
    /// its compression member to the start of the next one (or the TOC).
    pub blob_range: (u64, u64),
    /// Offset of the chunk within the decompressed member.
    pub inner_offset: u64,
}

impl Chunk {
    pub fn blob_range(&self) -> Range<u64> {
        self.blob_range.0..self.blob_range.1
    }
}

/// A decoded layer.
#[derive(Clone, Debug, Default)]
pub struct LayerIndex {
    /// Inode `n` is `inodes[n - 1]`.
    inodes: Vec<Node>,
    /// The distinct (mode, owner, mtime) of the layer's inodes.
    attrs: Vec<Attrs>,
    /// Every directory's entries, one sorted run per directory.
    dirents: Vec<Dirent>,
    /// The entries' names, in entry order, then symlink targets.
    names: Vec<u8>,
    /// Where the entries' names end in `names`.
    entry_names_end: u32,
    /// Inodes with extended attributes, sorted by inode number; each
    /// inode's attributes sorted by name.
    xattrs: Vec<(u32, Box<[Xattr]>)>,
    /// Whole-file digests not given by the file's only chunk, sorted by
    /// inode number.
    digests: Vec<(u32, Digest)>,
    /// All chunks of all regular files; files refer to ranges of it.
    pub chunks: Vec<Chunk>,
    /// Compressed size of the whole blob.
    pub blob_size: u64,
    /// Blob range to fetch before the layer is announced (from a prefetch
    /// landmark), if the layer has one.
    pub prefetch: Option<Range<u64>>,
}

fn invalid(msg: impl Into<String>) -> FormatError {
    FormatError::Index(msg.into())
}

fn to_u32(n: usize, what: &str) -> Result<u32, FormatError> {
    u32::try_from(n).map_err(|_| invalid(format!("{what}: {n} is more than a layer can hold")))
}

impl LayerIndex {
    /// Stores `inodes` (inode `n` is `inodes[n - 1]`) compactly. Refuses
    /// references to inodes or chunks that do not exist, entries in a
    /// non-directory, chunks of a non-regular file and layers too large for
    /// 32-bit inode numbers and offsets. Fields that do not apply to an
    /// inode's kind (a directory's `rdev`, say) are dropped.
    pub fn new(
        inodes: Vec<InodeSpec>,
        chunks: Vec<Chunk>,
        blob_size: u64,
        prefetch: Option<Range<u64>>,
    ) -> Result<LayerIndex, FormatError> {
        let count = inodes.len();
        let max_ino = to_u32(count, "inodes")?;
        to_u32(chunks.len(), "chunks")?;
        let entries: usize = inodes.iter().map(|i| i.children.len()).sum();
        let mut index = LayerIndex {
            inodes: Vec::with_capacity(count),
            attrs: Vec::new(),
            dirents: Vec::with_capacity(entries),
            names: Vec::new(),
            entry_names_end: 0,
            xattrs: Vec::new(),
            digests: Vec::new(),
            chunks,
            blob_size,
            prefetch,
        };
        // An inode number that exists, in the width the index stores.
        let valid_ino = |ino: u64| {
            u32::try_from(ino)
                .ok()
                .filter(|n| (1..=max_ino).contains(n))
        };
        let mut attr_slots: HashMap<Attrs, u32> = HashMap::new();
        // Symlink targets go after every entry name, so that an entry's name
        // ends where the next entry's begins.
        let mut targets = Vec::new();
        // Inode `ino` is `inodes[i]`, `ino = i + 1`; there are `max_ino`.
        for ((i, spec), ino) in inodes.into_iter().enumerate().zip(1..=max_ino) {
            if valid_ino(spec.parent).is_none() {
                return Err(invalid(format!(
                    "inode {ino}: parent {} does not exist",
                    spec.parent
                )));
            }
            let mut digest = DIGEST_NONE;
            let mut size_or_parent = spec.size;
            let span = match spec.kind {
                FileKind::Dir => {
                    size_or_parent = spec.parent;
                    let start = index.dirents.len();
                    let mut children = spec.children;
                    children.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                    if let Some(w) = children.windows(2).find(|w| w[0].0 == w[1].0) {
                        return Err(invalid(format!(
                            "inode {ino}: two entries named {:?}",
                            String::from_utf8_lossy(&w[0].0)
                        )));
                    }
                    for (name, child) in children {
                        let Some(child) = valid_ino(child) else {
                            return Err(invalid(format!(
                                "inode {ino}: entry {:?} names inode {child}, which does not exist",
                                String::from_utf8_lossy(&name)
                            )));
                        };
                        let (name, _) = index.push_name(&name)?;
                        index.dirents.push(Dirent { name, ino: child });
                    }
                    (
                        to_u32(start, "entries")?,
                        to_u32(index.dirents.len(), "entries")?,
                    )
                }
                kind if !spec.children.is_empty() => {
                    return Err(invalid(format!(
                        "inode {ino}: a {kind:?} cannot have entries"
                    )));
                }
                FileKind::Reg => {
                    let r = spec.chunks.clone();
                    if r.start > r.end || r.end as usize > index.chunks.len() {
                        return Err(invalid(format!(
                            "inode {ino}: chunks {r:?} are not within the {} chunks",
                            index.chunks.len()
                        )));
                    }
                    if let Some(d) = spec.digest {
                        if r.len() == 1 && index.chunks[r.start as usize].digest == d {
                            digest = DIGEST_OF_CHUNK;
                        } else {
                            digest = DIGEST_SIDE;
                            index.digests.push((ino, d));
                        }
                    }
                    (r.start, r.end)
                }
                kind if !spec.chunks.is_empty() => {
                    return Err(invalid(format!(
                        "inode {ino}: a {kind:?} cannot have chunks"
                    )));
                }
                FileKind::Symlink => {
                    targets.push((i, spec.link_target));
                    (0, 0)
                }
                FileKind::CharDev | FileKind::BlockDev => spec.rdev,
                FileKind::Fifo => (0, 0),
            };
            if !spec.xattrs.is_empty() {
                let mut xattrs = spec.xattrs;
                xattrs.sort_by(|a, b| a.0.cmp(&b.0));
                index.xattrs.push((ino, xattrs.into_boxed_slice()));
            }
            let attrs = Attrs {
                mtime: spec.mtime,
                uid: spec.uid,
                gid: spec.gid,
                mode: (spec.mode & 0o7777) as u16,
                kind: spec.kind,
                digest,
            };
            let slot = match attr_slots.entry(attrs) {
                Entry::Occupied(e) => *e.get(),
                Entry::Vacant(e) => {
                    index.attrs.push(attrs);
                    *e.insert(to_u32(index.attrs.len() - 1, "attributes")?)
                }
            };
            index.inodes.push(Node {
                size_or_parent,
                span,
                nlink: spec.nlink,
                attrs: slot,
            });
        }
        drop(attr_slots);
        index.entry_names_end = to_u32(index.names.len(), "name bytes")?;
        for (i, target) in targets {
            let (start, len) = index.push_name(&target)?;
            index.inodes[i].span = (start, start + len);
        }
        index.attrs.shrink_to_fit();
        index.names.shrink_to_fit();
        index.xattrs.shrink_to_fit();
        index.digests.shrink_to_fit();
        index.chunks.shrink_to_fit();
        Ok(index)
    }

    /// Appends `name` to the arena: its start and length.
    fn push_name(&mut self, name: &[u8]) -> Result<(u32, u32), FormatError> {
        let start = to_u32(self.names.len(), "name bytes")?;
        let end = to_u32(self.names.len() + name.len(), "name bytes")?;
        self.names.extend_from_slice(name);
        Ok((start, end - start))
    }

    pub fn inode(&self, ino: u64) -> Option<Inode> {
        let i = usize::try_from(ino.checked_sub(1)?).ok()?;
        Some(self.assemble(self.inodes.get(i)?))
    }

    /// Number of inodes (the highest inode number).
    pub fn inode_count(&self) -> u64 {
        self.inodes.len() as u64
    }

    /// Every inode, inode `n` first `n - 1`.
    pub fn inodes(&self) -> impl ExactSizeIterator<Item = Inode> + '_ {
        self.inodes.iter().map(|n| self.assemble(n))
    }

    fn assemble(&self, n: &Node) -> Inode {
        let a = self.attrs[n.attrs as usize];
        Inode {
            size_or_parent: n.size_or_parent,
            mtime: a.mtime,
            uid: a.uid,
            gid: a.gid,
            nlink: n.nlink,
            span: n.span,
            mode: a.mode,
            kind: a.kind,
            digest: a.digest,
        }
    }

    /// The name of entry `i` of `dirents`.
    fn name(&self, i: usize) -> &[u8] {
        let end = self
            .dirents
            .get(i + 1)
            .map_or(self.entry_names_end, |next| next.name);
        &self.names[self.dirents[i].name as usize..end as usize]
    }

    /// The range of `dirents` holding directory `dir`'s entries.
    fn entries(&self, dir: &Inode) -> Range<usize> {
        match dir.kind {
            FileKind::Dir => dir.span(),
            _ => 0..0,
        }
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let entries = self.entries(&self.inode(parent)?);
        // Binary search by name within the directory's sorted run.
        let (mut lo, mut hi) = (entries.start, entries.end);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.name(mid).cmp(name) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(u64::from(self.dirents[mid].ino)),
            }
        }
        None
    }

    /// The entries of directory `dir` (name bytes, inode), sorted by name.
    /// Nothing for a non-directory.
    pub fn children<'a>(
        &'a self,
        dir: &Inode,
    ) -> impl ExactSizeIterator<Item = (&'a [u8], u64)> + 'a {
        self.entries(dir)
            .map(|i| (self.name(i), u64::from(self.dirents[i].ino)))
    }

    /// A symlink's target, raw bytes; empty for anything else.
    pub fn link_target(&self, inode: &Inode) -> &[u8] {
        match inode.kind {
            FileKind::Symlink => &self.names[inode.span()],
            _ => &[],
        }
    }

    /// The extended attributes of inode `ino`, sorted by name.
    pub fn xattrs(&self, ino: u64) -> &[Xattr] {
        let Ok(ino) = u32::try_from(ino) else {
            return &[];
        };
        match self.xattrs.binary_search_by_key(&ino, |(i, _)| *i) {
            Ok(k) => &self.xattrs[k].1,
            Err(_) => &[],
        }
    }

    /// The whole-file sha256 of regular file `ino` from the TOC, where the
    /// format gives one.
    pub fn file_digest(&self, ino: u64) -> Option<Digest> {
        let inode = self.inode(ino)?;
        match inode.digest {
            DIGEST_OF_CHUNK => Some(self.chunks[inode.span.0 as usize].digest),
            DIGEST_SIDE => {
                let k = self
                    .digests
                    .binary_search_by_key(&u32::try_from(ino).ok()?, |(i, _)| *i)
                    .ok()?;
                Some(self.digests[k].1)
            }
            _ => None,
        }
    }

    /// The chunks of a regular file, in file order.
    pub fn file_chunks(&self, ino: &Inode) -> &[Chunk] {
        let r = ino.chunks();
        &self.chunks[r.start as usize..r.end as usize]
    }

    /// Resolves a slash-separated path from the root (for tests and tools).
    pub fn resolve(&self, path: &str) -> Option<u64> {
        path.split('/')
            .filter(|c| !c.is_empty())
            .try_fold(ROOT_INO, |ino, name| self.lookup(ino, name.as_bytes()))
    }

    /// Heap bytes this index holds (for memory accounting and tests).
    pub fn heap_bytes(&self) -> usize {
        use std::mem::size_of;
        self.inodes.capacity() * size_of::<Node>()
            + self.attrs.capacity() * size_of::<Attrs>()
            + self.dirents.capacity() * size_of::<Dirent>()
            + self.names.capacity()
            + self.chunks.capacity() * size_of::<Chunk>()
            + self.digests.capacity() * size_of::<(u32, Digest)>()
            + self
                .xattrs
                .iter()
                .map(|(_, x)| {
                    size_of::<(u32, Box<[Xattr]>)>()
                        + x.iter()
                            .map(|(k, v)| size_of::<Xattr>() + k.len() + v.len())
                            .sum::<usize>()
                })
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(size: u64, byte: u8) -> Chunk {
        Chunk {
            file_offset: 0,
            size,
            digest: Digest([byte; 32]),
            blob_range: (0, size),
            inner_offset: 0,
        }
    }

    fn dir(children: &[(&str, u64)]) -> InodeSpec {
        InodeSpec {
            mode: 0o755,
            nlink: 2,
            children: children
                .iter()
                .map(|(n, i)| (n.as_bytes().into(), *i))
                .collect(),
            ..InodeSpec::new(FileKind::Dir)
        }
    }

    /// `/b` (reg, one chunk, digest = chunk), `/a` -> `b` (symlink), `/d/`
    /// with `/d/c` (reg, two chunks, digest aside) and `/d/n` (char 1:3).
    fn sample() -> LayerIndex {
        let mut b = InodeSpec::new(FileKind::Reg);
        (b.size, b.chunks, b.digest) = (5, 0..1, Some(Digest([1; 32])));
        b.xattrs = vec![
            (b"user.z".as_slice().into(), b"2".as_slice().into()),
            (b"user.a".as_slice().into(), b"1".as_slice().into()),
        ];
        let mut a = InodeSpec::new(FileKind::Symlink);
        (a.link_target, a.size) = (b"b".as_slice().into(), 1);
        let mut c = InodeSpec::new(FileKind::Reg);
        (c.size, c.chunks, c.digest, c.parent) = (7, 1..3, Some(Digest([9; 32])), 4);
        let mut n = InodeSpec::new(FileKind::CharDev);
        (n.rdev, n.parent) = ((1, 3), 4);
        let mut d = dir(&[("n", 6), ("c", 5)]);
        d.mtime = -7;
        let inodes = vec![dir(&[("d", 4), ("b", 2), ("a", 3)]), b, a, d, c, n];
        let chunks = vec![chunk(5, 1), chunk(3, 2), chunk(4, 3)];
        LayerIndex::new(inodes, chunks, 100, Some(0..10)).unwrap()
    }

    #[test]
    fn names_paths_and_entries_resolve() {
        let idx = sample();
        assert_eq!(idx.resolve("/b"), Some(2));
        assert_eq!(idx.resolve("a"), Some(3));
        assert_eq!(idx.resolve("d/c"), Some(5));
        assert_eq!(idx.resolve("/d/n"), Some(6));
        assert_eq!(idx.resolve(""), Some(ROOT_INO));
        assert_eq!(idx.resolve("d/x"), None);
        assert_eq!(idx.resolve("b/c"), None, "a file has no entries");
        assert_eq!(idx.lookup(99, b"b"), None);
        let root = idx.inode(ROOT_INO).unwrap();
        let names: Vec<(&[u8], u64)> = idx.children(&root).collect();
        assert_eq!(
            names,
            [(&b"a"[..], 3), (&b"b"[..], 2), (&b"d"[..], 4)],
            "sorted by name"
        );
        assert_eq!(idx.children(&idx.inode(2).unwrap()).len(), 0);
        assert_eq!(idx.inode(4).unwrap().parent(), Some(ROOT_INO));
        assert_eq!(idx.inode(ROOT_INO).unwrap().parent(), Some(ROOT_INO));
        assert_eq!(idx.inode(5).unwrap().parent(), None, "only directories");
        assert_eq!(idx.inode(4).unwrap().mtime(), -7);
        assert_eq!(idx.inode(4).unwrap().size(), 0);
        assert_eq!(idx.inode(5).unwrap().size(), 7);
        assert_eq!((idx.inodes().len(), idx.inode_count()), (6, 6));
        assert!(idx.inode(0).is_none() && idx.inode(7).is_none());
    }

    #[test]
    fn variable_parts_come_back_as_given() {
        let idx = sample();
        let a = idx.inode(3).unwrap();
        assert_eq!(idx.link_target(&a), b"b");
        assert_eq!(idx.link_target(&idx.inode(2).unwrap()), b"");
        assert_eq!(idx.inode(6).unwrap().rdev(), (1, 3));
        assert_eq!(idx.inode(2).unwrap().rdev(), (0, 0));
        let x = idx.xattrs(2);
        assert_eq!(x.len(), 2);
        assert_eq!((&*x[0].0, &*x[0].1), (&b"user.a"[..], &b"1"[..]), "sorted");
        assert!(idx.xattrs(3).is_empty() && idx.xattrs(u64::MAX).is_empty());
        let c = idx.inode(5).unwrap();
        assert_eq!(c.chunks(), 1..3);
        assert_eq!(idx.file_chunks(&c).len(), 2);
        assert_eq!(idx.file_digest(5), Some(Digest([9; 32])));
        assert_eq!(
            idx.file_digest(2),
            Some(Digest([1; 32])),
            "its only chunk's"
        );
        assert_eq!(idx.file_digest(3), None);
        assert_eq!((idx.blob_size, idx.prefetch.clone()), (100, Some(0..10)));
    }

    #[test]
    fn a_whole_file_digest_unlike_its_only_chunk_is_kept() {
        let mut f = InodeSpec::new(FileKind::Reg);
        (f.size, f.chunks, f.digest) = (5, 0..1, Some(Digest([7; 32])));
        let idx = LayerIndex::new(vec![dir(&[("f", 2)]), f], vec![chunk(5, 1)], 5, None).unwrap();
        assert_eq!(idx.file_digest(2), Some(Digest([7; 32])));
    }

    #[test]
    fn inconsistent_specs_are_refused() {
        let refused = |inodes: Vec<InodeSpec>, chunks: Vec<Chunk>| {
            LayerIndex::new(inodes, chunks, 0, None)
                .unwrap_err()
                .to_string()
        };
        let e = refused(vec![dir(&[("x", 2)])], vec![]);
        assert!(e.contains("inode 2, which does not exist"), "{e}");
        let e = refused(vec![dir(&[("x", 1), ("x", 1)])], vec![]);
        assert!(e.contains("two entries named \"x\""), "{e}");
        let mut f = InodeSpec::new(FileKind::Reg);
        f.chunks = 0..2;
        let e = refused(vec![dir(&[("f", 2)]), f], vec![chunk(1, 1)]);
        assert!(e.contains("not within the 1 chunks"), "{e}");
        let mut l = InodeSpec::new(FileKind::Symlink);
        l.children = vec![(b"x".as_slice().into(), 1)];
        let e = refused(vec![dir(&[("l", 2)]), l], vec![]);
        assert!(e.contains("cannot have entries"), "{e}");
        let mut p = InodeSpec::new(FileKind::Fifo);
        p.chunks = 0..1;
        let e = refused(vec![dir(&[("p", 2)]), p], vec![chunk(1, 1)]);
        assert!(e.contains("cannot have chunks"), "{e}");
        let mut orphan = InodeSpec::new(FileKind::Fifo);
        orphan.parent = 9;
        let e = refused(vec![dir(&[]), orphan], vec![]);
        assert!(e.contains("parent 9 does not exist"), "{e}");
    }

    #[test]
    fn stored_inodes_stay_small() {
        // The per-entry budget rests on these sizes.
        assert_eq!(std::mem::size_of::<Node>(), 24);
        assert_eq!(std::mem::size_of::<Dirent>(), 8);
        let idx = sample();
        // Root and /d (dirs, one mtime each), /b (reg, digest is its chunk's),
        // /a (symlink), /d/c (reg, digest aside), /d/n (char device).
        assert_eq!(idx.attrs.len(), 6);
        let mut files = vec![dir(&[])];
        for k in 0..100u8 {
            let mut f = InodeSpec::new(FileKind::Reg);
            (f.chunks, f.digest) = (u32::from(k)..u32::from(k) + 1, Some(Digest([k; 32])));
            files[0].children.push((vec![k].into(), u64::from(k) + 2));
            files.push(f);
        }
        let chunks = (0..100u8).map(|k| chunk(1, k)).collect();
        let many = LayerIndex::new(files, chunks, 100, None).unwrap();
        assert_eq!(many.attrs.len(), 2, "a hundred alike files share one");
        assert!(idx.heap_bytes() < 6 * 24 + 6 * 24 + 5 * 8 + 3 * 72 + 200);
    }
}
