//! overlaybd as a fetch-engine [`Format`]: one layer blob becomes a
//! [`LayerIndex`] of one regular file, the layer's plain LSMT file
//! ([`LSMT_INO`]), whose chunks are its ZFile blocks (or, for a bare LSMT
//! file, runs of [`RAW_CHUNK`] bytes). The fetcher then does for blocks
//! what it does for eStargz chunks: singleflight per block, adjacent
//! blocks merged into one GET, admission by intent, the cache.
//!
//! A block has no content digest before it is fetched, so its cache key
//! is a *location* key ([`block_key`]: the blob's digest and the block's
//! number, hashed under a domain of their own so they never meet a content
//! digest). A block is checked by its CRC32C when fetched
//! ([`super::zfile::ZFile::decode`]); its key is marked as a location
//! ([`crate::cache::location_key`]), so the cache journals the sha256 of
//! what it stored and checks a block found after a restart against that.
//! A bare LSMT file has no check at all.
//!
//! The stack above the layers (which virtual sectors come from which
//! layer's LSMT bytes) needs the extents; the format keeps the opened
//! [`Layer`] for that ([`Overlaybd::opened`]).

use std::sync::OnceLock;

use super::ObdError;
use super::open::{Layer, OpenStep, Store, open_step};
use crate::Digest;
use crate::format::{
    Chunk, FileKind, Format, FormatError, IndexStep, InodeSpec, LayerIndex, Piece, ROOT_INO,
};

/// The inode of the layer's plain LSMT file in its index.
pub const LSMT_INO: u64 = 2;
/// The file's name in the index's root.
pub const LSMT_NAME: &[u8] = b"lsmt";
/// Chunk size of a bare (uncompressed) LSMT file.
pub const RAW_CHUNK: u64 = 64 << 10;
/// Domain of location keys: hashed in front of every one.
const BLOCK_KEY_DOMAIN: &[u8] = b"tarn overlaybd block v1\0";

/// The cache key of block `block` of the blob `blob`: where it is, not
/// what it holds.
pub fn block_key(blob: &Digest, block: u64) -> Digest {
    let mut bytes = Vec::with_capacity(BLOCK_KEY_DOMAIN.len() + 32 + 8);
    bytes.extend_from_slice(BLOCK_KEY_DOMAIN);
    bytes.extend_from_slice(&blob.0);
    bytes.extend_from_slice(&block.to_le_bytes());
    // Marked as a location, so the cache journals its content's digest.
    crate::cache::location_key(&bytes)
}

/// The overlaybd format of one layer blob (its digest names its blocks).
pub struct Overlaybd {
    blob: Digest,
    layer: OnceLock<Layer>,
}

impl Overlaybd {
    pub fn new(blob: Digest) -> Overlaybd {
        Overlaybd {
            blob,
            layer: OnceLock::new(),
        }
    }

    /// The layer as opened by [`Format::index_step`]; `None` before.
    pub fn opened(&self) -> Option<&Layer> {
        self.layer.get()
    }

    /// The chunks of `layer`'s plain LSMT file, in file order.
    fn chunks(&self, layer: &Layer) -> Vec<Chunk> {
        let at = layer.payload.start;
        match &layer.store {
            Store::ZFile(z) => {
                let raw_size = z.info().raw_size;
                (0..z.info().blocks)
                    .map(|i| {
                        let stored = z.stored_range(i..i + 1);
                        let start = z.plain_start(i);
                        Chunk {
                            file_offset: start,
                            size: raw_size.min(z.plain_start(i + 1)) - start,
                            digest: block_key(&self.blob, i),
                            blob_range: (at + stored.start, at + stored.end),
                            inner_offset: 0,
                        }
                    })
                    .collect()
            }
            Store::Raw => {
                let raw_size = layer.payload.end - layer.payload.start;
                (0..raw_size.div_ceil(RAW_CHUNK))
                    .map(|i| {
                        let start = i * RAW_CHUNK;
                        let end = raw_size.min(start + RAW_CHUNK);
                        Chunk {
                            file_offset: start,
                            size: end - start,
                            digest: block_key(&self.blob, i),
                            blob_range: (at + start, at + end),
                            inner_offset: 0,
                        }
                    })
                    .collect()
            }
        }
    }
}

fn index_error(e: ObdError) -> FormatError {
    FormatError::Index(e.to_string())
}

impl Format for Overlaybd {
    fn index_step(
        &self,
        fetched: &[Piece],
        blob_size: u64,
        _expected: Option<Digest>,
    ) -> Result<IndexStep, FormatError> {
        let layer = match open_step(fetched, blob_size).map_err(index_error)? {
            OpenStep::Fetch(range) => return Ok(IndexStep::Fetch(range)),
            OpenStep::Ready(layer) => layer,
        };
        let chunks = self.chunks(&layer);
        let count = u32::try_from(chunks.len())
            .map_err(|_| FormatError::Index(format!("{} blocks", chunks.len())))?;
        let size = chunks.last().map_or(0, |c| c.file_offset + c.size);
        let mut root = InodeSpec::new(FileKind::Dir);
        root.mode = 0o555;
        root.nlink = 2;
        root.children = vec![(LSMT_NAME.into(), LSMT_INO)];
        let mut file = InodeSpec::new(FileKind::Reg);
        file.mode = 0o444;
        file.size = size;
        file.parent = ROOT_INO;
        file.chunks = 0..count;
        let index = LayerIndex::new(vec![root, file], chunks, blob_size, None)?;
        // A second open of the same blob builds the same layer: the first
        // one kept stays right.
        let _ = self.layer.set(layer);
        Ok(IndexStep::Ready {
            index,
            data_end: blob_size,
        })
    }

    fn decode_chunk(&self, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
        let layer = self
            .layer
            .get()
            .ok_or_else(|| FormatError::Index("overlaybd block read before its layer".into()))?;
        match &layer.store {
            Store::Raw => Ok(compressed.to_vec()),
            Store::ZFile(z) => {
                let block = chunk.file_offset / u64::from(z.info().block_size);
                z.decode(block..block + 1, compressed)
                    .map_err(|e| FormatError::Corrupt(e.to_string()))
            }
        }
    }
}
