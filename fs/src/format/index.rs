//! The in-memory index of one layer: what a format's TOC decodes into and what
//! the layer and FUSE code serve from. Format-independent.
//!
//! Inode numbers are dense: inode `n` lives at `inodes[n - 1]`; the root
//! directory is inode 1 ([`ROOT_INO`]). Hardlinks share one inode.

use std::ops::Range;

use crate::Digest;

/// Inode number of the layer's root directory.
pub const ROOT_INO: u64 = 1;

/// What kind of file an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// One file of the layer, as the kernel will see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
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
    /// Extended attributes: raw name bytes -> raw value bytes, sorted by name.
    pub xattrs: Vec<Xattr>,
    /// Directory entries, sorted by name bytes for binary search.
    pub children: Vec<(Box<[u8]>, u64)>,
    /// Regular files: the range of [`LayerIndex::chunks`] holding the content,
    /// in file order. Empty for empty files and non-regular files.
    pub chunks: Range<u32>,
    /// Whole-file sha256 from the TOC, where the format gives one.
    pub digest: Option<Digest>,
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
    pub inodes: Vec<Inode>,
    /// All chunks of all regular files; files refer to ranges of it.
    pub chunks: Vec<Chunk>,
    /// Compressed size of the whole blob.
    pub blob_size: u64,
    /// Blob range to fetch before the layer is announced (from a prefetch
    /// landmark), if the layer has one.
    pub prefetch: Option<Range<u64>>,
}

impl LayerIndex {
    pub fn inode(&self, ino: u64) -> Option<&Inode> {
        let i = usize::try_from(ino.checked_sub(1)?).ok()?;
        self.inodes.get(i)
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Option<u64> {
        let dir = self.inode(parent)?;
        let i = dir
            .children
            .binary_search_by(|(n, _)| (**n).cmp(name))
            .ok()?;
        Some(dir.children[i].1)
    }

    /// The chunks of a regular file, in file order.
    pub fn file_chunks(&self, ino: &Inode) -> &[Chunk] {
        let r = ino.chunks.start as usize..ino.chunks.end as usize;
        &self.chunks[r]
    }

    /// Resolves a slash-separated path from the root (for tests and tools).
    pub fn resolve(&self, path: &str) -> Option<u64> {
        path.split('/')
            .filter(|c| !c.is_empty())
            .try_fold(ROOT_INO, |ino, name| self.lookup(ino, name.as_bytes()))
    }
}
