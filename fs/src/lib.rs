//! tarn-fs: a remote image layer as a local, verified, lazily fetched
//! filesystem.
//!
//! A read travels down these modules, and each knows only the ones below it:
//!
//! ```text
//! kernel read(ino, off, len)
//!   -> fuse/        the FUSE adapter: the only code that speaks errno
//!   -> layer/       one mounted layer: its index, read planning, and the
//!                   read's one cache lookup (a hit is answered inline)
//!        hints/     what comes next: read-ahead, libraries, entrypoint
//!   -> fetch/       a miss: singleflight per chunk, intents and admission,
//!                   merged ranged GETs; opening a layer is a fetch too
//!        -> cache/     content-addressed store of verified plain bytes
//!        -> registry/  a blob from an ordered list of sources (BlobSource)
//!        -> format/    pure decoding behind one trait (format::Format):
//!                      a layer's index from the bytes it asks for, one
//!                      chunk decoded and verified
//! ```
//!
//! `fetch/` is the only module that reads from `registry/`, decodes with
//! `format/` and puts fetched bytes into `cache/`; `layer/` only looks the
//! cache up. `docs/architecture.md` walks a read through these folders.
//!
//! `peer` is another source beside the registry's: other tarn nodes, each
//! block of a blob asked of its owner by rendezvous hashing (its bytes
//! verified by `fetch/` like any source's).
//!
//! `disk` serves an overlaybd image's stacked disk: its layers are
//! `layer/`s of the fetch engine, its reads mapped through the stack.
//!
//! `digest`, `intent` and `format::index` hold the vocabulary every layer
//! shares, and
//! `num` the one conversion of `u64` offsets to `usize` the byte paths use;
//! `memory` tunes the allocator for a daemon that keeps many layers;
//! `latency` is the histogram of atomic counters FUSE operations and GETs
//! are timed into (read by the daemon's metrics endpoint).
//! `testing` (this crate's tests and the `testing` feature) holds the fakes
//! tests share: an in-memory blob source and the plain (identity) format.

pub mod cache;
pub mod digest;
pub mod disk;
pub mod fetch;
pub mod format;
pub mod fuse;
pub mod intent;
pub mod latency;
pub mod layer;
pub mod memory;
pub mod num;
pub mod peer;
pub mod registry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use digest::Digest;
pub use intent::Intent;
