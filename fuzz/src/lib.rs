//! What the fuzz targets share: how a fuzz input becomes a chunk to decode,
//! the `index_step` loop a fetcher runs, and the invariants a built
//! [`LayerIndex`] must hold whatever the TOC said. A broken invariant panics,
//! and libFuzzer keeps the input as a crash.

use tarn_fs::Digest;
use tarn_fs::format::{
    Chunk, Estargz, FileKind, Format, FormatError, IndexStep, LayerIndex, Piece,
};

mod seeds;

pub use seeds::{SEEDS_ENV, write_seeds, write_seeds_if_asked};

/// Where the `toc` target pretends the TOC starts, and the blob's size: far
/// enough that the writer's offsets (seeds) are all before it.
pub const TOC_OFFSET: u64 = 1 << 32;
pub const BLOB_SIZE: u64 = TOC_OFFSET + (1 << 20);

/// The `chunk` target's input: the declared chunk's plain size and offset
/// in its member (u64 little-endian each) and sha256, then its compressed
/// range.
pub const CHUNK_HEADER: usize = 8 + 8 + 32;

/// More `Fetch` steps than any format needs: past it, `index_step` loops.
const MAX_STEPS: usize = 8;

/// A `chunk` target input for `compressed` declared as `chunk`.
pub fn chunk_input(chunk: &Chunk, compressed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK_HEADER + compressed.len());
    out.extend_from_slice(&chunk.size.to_le_bytes());
    out.extend_from_slice(&chunk.inner_offset.to_le_bytes());
    out.extend_from_slice(&chunk.digest.0);
    out.extend_from_slice(compressed);
    out
}

/// The chunk and compressed bytes of a `chunk` target input, if it is long
/// enough to declare one.
pub fn split_chunk_input(data: &[u8]) -> Option<(Chunk, &[u8])> {
    let (header, compressed) = data.split_at_checked(CHUNK_HEADER)?;
    let u64_at = |i: usize| {
        header
            .get(i..i + 8)?
            .try_into()
            .ok()
            .map(u64::from_le_bytes)
    };
    let chunk = Chunk {
        file_offset: 0,
        size: u64_at(0)?,
        inner_offset: u64_at(8)?,
        digest: Digest(header.get(16..48)?.try_into().ok()?),
        blob_range: (0, u64::try_from(compressed.len()).ok()?),
    };
    Some((chunk, compressed))
}

/// Runs eStargz's `index_step` on `blob` as the fetcher does, handing it
/// the ranges it asks for. Returns the index and where chunk data ends.
/// Panics if it asks for a range outside the blob or never finishes.
pub fn open_layer(blob: &[u8]) -> Result<(LayerIndex, u64), FormatError> {
    let blob_size = u64::try_from(blob.len()).expect("a fuzz input fits in u64");
    let mut fetched: Vec<Piece> = Vec::new();
    for _ in 0..MAX_STEPS {
        match Estargz::default().index_step(&fetched, blob_size, None)? {
            IndexStep::Fetch(r) => {
                assert!(
                    r.start <= r.end && r.end <= blob_size,
                    "asked for {r:?} of a {blob_size}-byte blob"
                );
                let range = usize::try_from(r.start).expect("in the blob")
                    ..usize::try_from(r.end).expect("in the blob");
                fetched.push(Piece {
                    offset: r.start,
                    bytes: blob[range].to_vec().into(),
                });
            }
            IndexStep::Ready { index, data_end } => {
                assert!(
                    data_end <= blob_size,
                    "data ends at {data_end}, past the blob"
                );
                return Ok((index, data_end));
            }
        }
    }
    panic!("index_step asked for more than {MAX_STEPS} ranges");
}

/// Walks every inode of `index` through the accessors the FUSE layer uses
/// and checks what the builder promises: each child is found by name under
/// its parent, names are real names, a file's chunks tile it from 0 to its
/// size, and each chunk's compressed range lies before `data_end`.
pub fn check_index(index: &LayerIndex, data_end: u64) {
    for (i, inode) in index.inodes().enumerate() {
        let ino = u64::try_from(i).expect("inode count fits in u64") + 1;
        let _ = (
            index.xattrs(ino),
            index.file_digest(ino),
            index.link_target(&inode),
        );
        let _ = (
            inode.mode(),
            inode.uid(),
            inode.gid(),
            inode.mtime(),
            inode.nlink(),
        );
        let _ = (inode.parent(), inode.rdev(), inode.size());
        for (name, child) in index.children(&inode) {
            assert!(
                !name.is_empty() && name != b"." && name != b".." && !name.contains(&b'/'),
                "inode {ino} lists the name {name:?}"
            );
            assert_eq!(
                index.lookup(ino, name),
                Some(child),
                "inode {ino} lists {name:?} as {child}, lookup does not find it"
            );
            assert!(
                index.inode(child).is_some(),
                "inode {ino} lists a missing inode {child}"
            );
        }
        if inode.kind() != FileKind::Reg {
            continue;
        }
        let mut end = 0;
        for c in index.file_chunks(&inode) {
            assert_eq!(
                c.file_offset, end,
                "inode {ino}: a gap or overlap between chunks"
            );
            end = c
                .file_offset
                .checked_add(c.size)
                .expect("chunk end overflows");
            assert!(
                c.blob_range.0 <= c.blob_range.1 && c.blob_range.1 <= data_end,
                "inode {ino}: chunk range {:?} is not before the TOC at {data_end}",
                c.blob_range
            );
        }
        assert_eq!(
            end,
            inode.size(),
            "inode {ino}: chunks do not cover the file"
        );
    }
}
