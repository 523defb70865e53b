//! Fakes for tests of tarn-fs and of code built on it: a blob source in
//! memory ([`FakeBlob`]) and a format that stores chunks as they are
//! ([`Plain`]), with helpers that lay chunks out in a blob.
//!
//! Compiled for this crate's tests and, for other crates' tests, with the
//! `testing` feature (`tarn-integration` enables it in its
//! dev-dependencies); the daemon never has it.

mod blob;
mod plain;

pub use blob::{FakeBlob, Seen};
pub use plain::{Plain, chunk_at, chunks_of, pattern};
