//! [`Estargz`], the eStargz [`Format`]: the index from the footer and TOC
//! at the blob's end, chunks by gunzip and sha256.

use std::io::Read;

use super::build::{IndexBudget, build_index_from_json};
use super::decode;
use super::footer::parse_footer;
use super::toc::decode_toc_within;
use crate::Digest;
use crate::format::{Chunk, Format, FormatError, IndexStep, Piece};
use crate::num::usize_from;

/// How much of the blob's end the first GET asks for: the footer and, for
/// most layers, the whole TOC, so that opening costs one round trip. A TOC
/// larger than this costs a second GET, of the part the first did not bring.
pub const TAIL_FETCH: u64 = 256 << 10;

/// The eStargz format, with the memory bound of one layer's index.
#[derive(Clone, Copy, Debug, Default)]
pub struct Estargz {
    budget: IndexBudget,
}

impl Estargz {
    /// The format with a per-layer index budget of `bytes`: the TOC as
    /// fetched, its JSON and the index built from it must fit in it, or
    /// the layer is refused ([`FormatError::IndexBudget`]) as soon as that
    /// is known (before the TOC is fetched, if its compressed size alone
    /// is over).
    pub fn with_max_index_bytes(bytes: u64) -> Estargz {
        Estargz {
            budget: IndexBudget::new(bytes),
        }
    }
}

impl Format for Estargz {
    /// The tail first; then, only if its TOC begins before the tail, the
    /// TOC's part before it; then the checked TOC as an index.
    fn index_step(
        &self,
        fetched: &[Piece],
        blob_size: u64,
        expected: Option<Digest>,
    ) -> Result<IndexStep, FormatError> {
        let Some(tail) = fetched.first() else {
            return Ok(IndexStep::Fetch(
                blob_size - blob_size.min(TAIL_FETCH)..blob_size,
            ));
        };
        if tail.end() != blob_size {
            return Err(FormatError::Footer(format!(
                "the tail asked for ends at {}, not at the blob's end {blob_size}",
                tail.end()
            )));
        }
        let loc = parse_footer(&tail.bytes, blob_size)?;
        let mut budget = self.budget;
        let compressed = loc.toc_range.end - loc.toc_range.start;
        if compressed > budget.limit {
            // Refused before it is fetched: the TOC alone is over.
            return Err(FormatError::IndexBudget {
                limit: budget.limit,
                entries: 0,
            });
        }
        // The TOC member's bytes, read where they are: the tail, or the
        // part before it then the tail, never joined into a copy.
        let toc: Box<dyn Read + '_> = match (loc.toc_in_tail.clone(), fetched.get(1)) {
            (Some(r), _) => Box::new(&tail.bytes[r]),
            // Only the part before the tail: the rest is in hand.
            (None, None) => return Ok(IndexStep::Fetch(loc.toc_range.start..tail.offset)),
            (None, Some(head))
                if head.offset == loc.toc_range.start && head.end() == tail.offset =>
            {
                let in_tail = usize_from(loc.toc_range.end - tail.offset);
                Box::new((&head.bytes[..]).chain(&tail.bytes[..in_tail]))
            }
            (None, Some(head)) => {
                return Err(FormatError::Toc(format!(
                    "fetched {}..{}, not the TOC's part before the tail",
                    head.offset,
                    head.end()
                )));
            }
        };
        // The fetched TOC stays in memory while the index is built.
        budget.spent = compressed;
        let json = decode_toc_within(toc, budget.limit - compressed, |_| {
            FormatError::IndexBudget {
                limit: budget.limit,
                entries: 0,
            }
        })?;
        if let Some(expected) = expected
            && json.digest != expected
        {
            return Err(FormatError::TocDigestMismatch {
                expected,
                actual: json.digest,
            });
        }
        let index = build_index_from_json(json, blob_size, loc.toc_offset, budget)?;
        Ok(IndexStep::Ready {
            index,
            data_end: loc.toc_offset,
        })
    }

    fn decode_chunk(&self, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>, FormatError> {
        decode::decode_chunk(chunk, compressed)
    }
}

#[cfg(test)]
mod tests;
