//! eStargz: footer, TOC, index building, chunk decoding; and, in
//! [`write`] (tests and the `writer` feature only), the writer.
//!
//! Reading a layer, given ranged access to its blob:
//!
//! 1. fetch the blob's tail (generously: the TOC usually fits) and call
//!    [`parse_footer`]; it says where the TOC is and whether the tail already
//!    holds it ([`TocLocation::toc_in_tail`]);
//! 2. [`decode_toc`] on the TOC range gives the JSON and its digest (compare
//!    it to the layer's `containerd.io/snapshot/stargz/toc.digest`
//!    annotation); [`TocJson::parse`] then gives the [`Toc`];
//! 3. [`build_index_from_json`] turns the TOC into a compact [`LayerIndex`]
//!    as its entries are decoded, within the layer's [`IndexBudget`],
//!    refusing hostile input (names that are not names, see `names.rs`;
//!    conflicting duplicates, offsets past the TOC, chunk gaps,
//!    unverifiable files, absurd sizes);
//! 4. for each chunk read, fetch `chunk.blob_range()` and call
//!    [`Estargz`]'s [`Format::decode_chunk`]: it returns the bytes only if
//!    their sha256 matches.
//!
//! [`Estargz`] does 1-3 as a [`Format`]: its `index_step` asks for the
//! tail ([`TAIL_FETCH`] bytes), then for the TOC's part before the tail if
//! it needs one, and checks the TOC's digest before it parses it.
//!
//! Writing: `write::write_estargz` converts a tar stream into an eStargz blob that
//! other eStargz readers accept and that `tar xzf` extracts as the input.
//!
//! [`LayerIndex`]: crate::format::LayerIndex
//! [`Format`]: crate::format::Format
//! [`Format::decode_chunk`]: crate::format::Format::decode_chunk

mod build;
mod decode;
mod footer;
mod format;
mod names;
mod rfc3339;
mod toc;
#[cfg(any(test, feature = "writer"))]
pub mod write;

#[cfg(test)]
mod tests;

pub use build::{
    IndexBudget, MAX_FILE_SIZE, NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, build_index,
    build_index_from_json,
};
pub use footer::{FOOTER_SIZE, LEGACY_FOOTER_SIZE, TocLocation, footer_bytes, parse_footer};
pub use format::{Estargz, TAIL_FETCH};
pub use names::{NAME_MAX, PATH_MAX, XATTR_NAME_MAX, XATTR_SIZE_MAX};
pub use toc::{
    MAX_TOC_ENTRIES, MAX_TOC_JSON, TOC_TAR_NAME, Toc, TocEntry, TocJson, decode_toc, parse_toc_json,
};
#[cfg(any(test, feature = "writer"))]
pub use write::{WriteError, WriteOptions, WriteResult, write_estargz, write_estargz_reopen};
