//! tarn-fs: a remote image layer as a local, verified, lazily fetched
//! filesystem.
//!
//! A read travels down these modules, and each knows only the ones below it:
//!
//! ```text
//! kernel read(ino, off, len)
//!   -> fuse/      the FUSE adapter: the only code that speaks errno
//!   -> layer/     one mounted layer: index + read planning over cache and fetch
//!   -> cache/     content-addressed store of verified bytes (hit: reply now)
//!   -> fetch/     singleflight per chunk, intents, merging of adjacent misses
//!   -> registry/  references, manifests, auth, ranged GETs with retries
//!   -> format/    pure decoding: footer, TOC, index, one chunk, its digest
//! ```
//!
//! `digest` and `format::index` hold the vocabulary every layer shares, and
//! `num` the one conversion of `u64` offsets to `usize` the byte paths use;
//! `memory` tunes the allocator for a daemon that keeps many layers.
//! `testing` (this crate's tests and the `testing` feature) holds the fakes
//! tests share: an in-memory blob source and the plain (identity) format.

pub mod cache;
pub mod digest;
pub mod fetch;
pub mod format;
pub mod fuse;
pub mod intent;
pub mod layer;
pub mod memory;
pub mod num;
pub mod registry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use digest::Digest;
pub use intent::Intent;
