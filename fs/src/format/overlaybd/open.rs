//! Opening one layer by byte ranges: [`open_step`] says which blob bytes it
//! needs next, given the ones fetched so far, until it returns the layer's
//! [`Layer`] (where its LSMT file lies, its ZFile blocks, its extents).
//! Pure: the caller fetches (the fetch engine later; [`open_blob`] for a
//! blob in memory, `read::open_layer` for a [`BlobSource`]).
//!
//! The steps, each one GET:
//!
//! 1. the blob's head ([`HEAD_FETCH`]): the tar wrapper if any, and the
//!    ZFile header (or the start of a bare LSMT file);
//! 2. for a ZFile whose header lacks the index's place, its trailer;
//! 3. for a ZFile, its block-length index;
//! 4. the end of the LSMT file ([`LSMT_TAIL_FETCH`] plain bytes, as the
//!    blocks that hold them): its trailer and, usually, its whole index;
//! 5. only if the index starts before that tail, the rest of it.
//!
//! [`BlobSource`]: crate::registry::BlobSource

use std::ops::Range;

use super::ObdError;
use super::lsmt::{self, Extent};
use super::wrapper::{WRAPPER_MAX, payload_range};
use super::zfile::{self, HeaderSays, ZFile};
use crate::format::Piece;
use crate::num::usize_from;

/// The blob's first bytes asked for: the wrapper and the file's header.
pub const HEAD_FETCH: u64 = WRAPPER_MAX + zfile::HT_SIZE;
/// Plain bytes of the LSMT file's end asked for with its trailer: the
/// trailer and, for indexes of up to 3,800 records, the whole index.
pub const LSMT_TAIL_FETCH: u64 = 64 << 10;
/// The most fetches opening a layer takes (the steps above).
pub const MAX_OPEN_STEPS: usize = 5;

/// One opened layer: everything needed to read any of its virtual sectors.
#[derive(Clone, Debug)]
pub struct Layer {
    /// Where the LSMT file (bare or as a ZFile) lies in the blob.
    pub payload: Range<u64>,
    /// How the LSMT file is stored.
    pub store: Store,
    /// Size of the virtual disk, in bytes.
    pub virtual_size: u64,
    /// The index's mappings, sorted.
    pub extents: Vec<Extent>,
}

/// How the LSMT file is stored in the payload.
#[derive(Clone, Debug)]
pub enum Store {
    /// As is: LSMT byte `x` is payload byte `x`.
    Raw,
    /// Compressed in blocks.
    ZFile(ZFile),
}

impl Layer {
    /// The blob range that holds LSMT bytes `raw`, and the plain offset
    /// that range starts at (`raw.start` or the start of its first block).
    pub fn blob_range_for(&self, raw: Range<u64>) -> (Range<u64>, u64) {
        match &self.store {
            Store::Raw => (
                self.payload.start + raw.start..self.payload.start + raw.end,
                raw.start,
            ),
            Store::ZFile(z) => {
                let blocks = z.blocks_for(raw);
                let stored = z.stored_range(blocks.clone());
                let at = self.payload.start;
                (
                    at + stored.start..at + stored.end,
                    z.plain_start(blocks.start),
                )
            }
        }
    }

    /// Plain LSMT bytes from the blob bytes `fetched` of
    /// `blob_range_for(raw).0`: decompressed and checked for a ZFile,
    /// as they are otherwise. Starts at `blob_range_for(raw).1`.
    pub fn decode(&self, raw: Range<u64>, fetched: &[u8]) -> Result<Vec<u8>, ObdError> {
        match &self.store {
            Store::Raw => Ok(fetched.to_vec()),
            Store::ZFile(z) => z.decode(z.blocks_for(raw), fetched),
        }
    }
}

/// What opening a layer needs next.
#[derive(Debug)]
pub enum OpenStep {
    /// Fetch these blob bytes, then call again with them appended.
    Fetch(Range<u64>),
    Ready(Layer),
}

/// The pieces fetched so far, taken in the order they were asked for.
struct Fetched<'a> {
    pieces: &'a [Piece],
    next: usize,
}

impl<'a> Fetched<'a> {
    /// The bytes of `want` if they are the next piece; `None` if nothing
    /// more was fetched (so `want` is the next thing to ask for).
    fn take(&mut self, want: Range<u64>) -> Result<Option<&'a [u8]>, ObdError> {
        let Some(piece) = self.pieces.get(self.next) else {
            return Ok(None);
        };
        if piece.offset != want.start || piece.end() != want.end {
            return Err(ObdError::Fetched {
                want,
                got: piece.offset..piece.end(),
            });
        }
        self.next += 1;
        Ok(Some(&piece.bytes[..]))
    }
}

/// Takes `$want` from `$fetched` or returns `Fetch($want)`.
macro_rules! take_or_fetch {
    ($fetched:expr, $want:expr) => {{
        let want = $want;
        match $fetched.take(want.clone())? {
            Some(bytes) => bytes,
            None => return Ok(OpenStep::Fetch(want)),
        }
    }};
}

/// The next step of opening the layer in a blob of `blob_size` bytes, given
/// the pieces fetched so far (in the order asked for; none at first).
pub fn open_step(fetched: &[Piece], blob_size: u64) -> Result<OpenStep, ObdError> {
    let mut fetched = Fetched {
        pieces: fetched,
        next: 0,
    };
    let head = take_or_fetch!(fetched, 0..blob_size.min(HEAD_FETCH));
    let payload = payload_range(head, blob_size)?;
    let size = payload.end - payload.start;
    let first = head.get(usize_from(payload.start)..).unwrap_or_default();
    let at = |r: Range<u64>| payload.start + r.start..payload.start + r.end;
    if lsmt::is_lsmt(first) {
        let layer = Layer {
            payload: payload.clone(),
            store: Store::Raw,
            virtual_size: 0,
            extents: Vec::new(),
        };
        return lsmt_steps(&mut fetched, layer, size);
    }
    if !zfile::is_zfile(first) {
        return Err(ObdError::BadMagic(format!(
            "no ZFile or LSMT magic at blob offset {}",
            payload.start
        )));
    }
    let header: &[u8; 512] = first
        .get(..512)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| ObdError::ZFile(format!("a ZFile of {size} bytes has no whole header")))?;
    let info = match zfile::parse_header(header, size)? {
        HeaderSays::Info(info) => info,
        HeaderSays::ReadTrailer => {
            if size < 2 * zfile::HT_SIZE {
                return Err(ObdError::ZFile(format!(
                    "a ZFile of {size} bytes has no trailer"
                )));
            }
            let t = take_or_fetch!(fetched, at(size - zfile::HT_SIZE..size));
            let t: &[u8; 512] = t
                .try_into()
                .map_err(|_| ObdError::ZFile("short trailer".into()))?;
            zfile::parse_trailer(t, size)?
        }
    };
    let index = take_or_fetch!(fetched, at(info.index_range()));
    let z = ZFile::new(info, index)?;
    let raw_size = z.info().raw_size;
    let layer = Layer {
        payload,
        store: Store::ZFile(z),
        virtual_size: 0,
        extents: Vec::new(),
    };
    lsmt_steps(&mut fetched, layer, raw_size)
}

/// Steps 4 and 5: the LSMT file's trailer and index, read through the
/// layer's store; `raw_size` is the LSMT file's size.
fn lsmt_steps(
    fetched: &mut Fetched<'_>,
    mut layer: Layer,
    raw_size: u64,
) -> Result<OpenStep, ObdError> {
    if raw_size < 2 * lsmt::HT_SIZE {
        return Err(ObdError::Lsmt(format!(
            "a file of {raw_size} bytes has no header and trailer"
        )));
    }
    let tail_raw = raw_size - raw_size.min(LSMT_TAIL_FETCH)..raw_size;
    let (tail_blob, tail_start) = layer.blob_range_for(tail_raw.clone());
    let tail = layer.decode(tail_raw, take_or_fetch!(fetched, tail_blob))?;
    let trailer_at = usize_from(raw_size - lsmt::HT_SIZE - tail_start);
    let t: &[u8; 4096] = tail
        .get(trailer_at..trailer_at + 4096)
        .and_then(|t| t.try_into().ok())
        .ok_or_else(|| ObdError::Lsmt("the tail does not hold the trailer".into()))?;
    let trailer = lsmt::parse_trailer(t, raw_size)?;
    let index_range = trailer.index_range();
    let extents = if index_range.start >= tail_start {
        let from = usize_from(index_range.start - tail_start);
        let to = usize_from(index_range.end - tail_start);
        lsmt::parse_index(&tail[from..to], &trailer)?
    } else {
        // The index's part before the tail, as whole blocks ending where
        // the tail's first block begins.
        let before = index_range.start..tail_start;
        let (blob, start) = layer.blob_range_for(before.clone());
        let mut bytes = layer.decode(before, take_or_fetch!(fetched, blob))?;
        bytes.extend_from_slice(&tail);
        let from = usize_from(index_range.start - start);
        let to = usize_from(index_range.end - start);
        let index = bytes
            .get(from..to)
            .ok_or_else(|| ObdError::Lsmt("the fetched blocks do not hold the index".into()))?;
        lsmt::parse_index(index, &trailer)?
    };
    layer.virtual_size = trailer.virtual_size;
    layer.extents = extents;
    Ok(OpenStep::Ready(layer))
}

/// Opens the layer in `blob`, held whole in memory (tests, tools).
pub fn open_blob(blob: &[u8]) -> Result<Layer, ObdError> {
    let size = blob.len() as u64;
    let mut fetched = Vec::new();
    for _ in 0..=MAX_OPEN_STEPS {
        match open_step(&fetched, size)? {
            OpenStep::Ready(layer) => return Ok(layer),
            OpenStep::Fetch(r) => {
                let bytes = blob
                    .get(usize_from(r.start)..usize_from(r.end))
                    .ok_or_else(|| ObdError::Fetched {
                        want: r.clone(),
                        got: 0..size,
                    })?;
                fetched.push(Piece {
                    offset: r.start,
                    bytes: bytes::Bytes::copy_from_slice(bytes),
                });
            }
        }
    }
    Err(ObdError::TooManySteps(MAX_OPEN_STEPS))
}
