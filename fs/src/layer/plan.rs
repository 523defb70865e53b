//! Read planning: which pieces of which chunks a file read needs, and
//! which of them the cache already holds.

use bytes::Bytes;

use crate::cache::Cache;
use crate::format::Chunk;
use crate::num::usize_from;

/// The outcome of planning a read against the cache.
#[derive(Debug)]
pub enum CachedRead {
    /// Every byte came from the cache.
    Hit(Vec<u8>),
    /// Some chunks must be fetched first.
    Miss(PendingRead),
}

/// A read waiting for chunks: the pieces it needs, some already in hand.
#[derive(Debug)]
pub struct PendingRead {
    pieces: Vec<Piece>,
    /// The inode read, for read-ahead over the rest of its file.
    pub(super) ino: u64,
}

#[derive(Debug)]
struct Piece {
    chunk: Chunk,
    /// The part of the chunk this read wants.
    start: usize,
    len: usize,
    data: Option<Vec<u8>>,
}

/// Plans a read of `[offset, offset + len)` of a file of `size` bytes whose
/// content is `chunks` (in file order), looking each piece up in `cache`.
pub(super) fn plan_read(
    chunks: &[Chunk],
    size: u64,
    offset: u64,
    len: u64,
    cache: &Cache,
) -> CachedRead {
    let end = size.min(offset.saturating_add(len));
    if offset >= end {
        return CachedRead::Hit(Vec::new());
    }
    let first = chunks.partition_point(|c| c.file_offset + c.size <= offset);
    let mut pieces = Vec::new();
    let mut complete = true;
    for c in chunks[first..].iter().take_while(|c| c.file_offset < end) {
        let start = offset.saturating_sub(c.file_offset);
        let stop = (end - c.file_offset).min(c.size);
        let (start, len) = (usize_from(start), usize_from(stop - start));
        let data = match cache.read(&c.digest, start as u64, len) {
            Ok(Some(d)) if d.len() == len => Some(d),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(chunk = %c.digest, error = %e, "cache read failed; fetching");
                None
            }
        };
        complete &= data.is_some();
        pieces.push(Piece {
            chunk: *c,
            start,
            len,
            data,
        });
    }
    if complete {
        if pieces.len() == 1 {
            // The common case: one piece, handed over without a copy.
            let data = pieces.pop().and_then(|p| p.data);
            return CachedRead::Hit(data.expect("complete means every piece is present"));
        }
        let mut out = Vec::with_capacity(usize_from(end - offset));
        for p in pieces {
            out.extend_from_slice(&p.data.expect("complete means every piece is present"));
        }
        return CachedRead::Hit(out);
    }
    CachedRead::Miss(PendingRead { pieces, ino: 0 })
}

impl PendingRead {
    /// The chunks still to fetch, each once.
    pub(super) fn missing_chunks(&self) -> Vec<Chunk> {
        let mut out: Vec<Chunk> = Vec::new();
        for p in self.pieces.iter().filter(|p| p.data.is_none()) {
            if !out.iter().any(|c| c.digest == p.chunk.digest) {
                out.push(p.chunk);
            }
        }
        out
    }

    /// The read's bytes, given the whole chunks fetched for `missing`.
    pub(super) fn assemble(self, missing: &[Chunk], fetched: &[Bytes]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pieces.iter().map(|p| p.len).sum());
        for p in self.pieces {
            match p.data {
                Some(d) => out.extend_from_slice(&d),
                None => {
                    let i = missing
                        .iter()
                        .position(|c| c.digest == p.chunk.digest)
                        .expect("every missing piece's chunk was fetched");
                    out.extend_from_slice(&fetched[i][p.start..p.start + p.len]);
                }
            }
        }
        out
    }
}
