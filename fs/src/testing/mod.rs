//! Fakes for tests of tarn-fs and of code built on it: a blob source in
//! memory ([`FakeBlob`]) and a format that stores chunks as they are
//! ([`Plain`]), with helpers that lay chunks out in a blob, and
//! [`wait_until`], to wait on an event instead of sleeping.
//!
//! Compiled for this crate's tests and, for other crates' tests, with the
//! `testing` feature (`tarn-integration` enables it in its
//! dev-dependencies); the daemon never has it.

mod blob;
mod plain;
mod wait;

pub use blob::{FakeBlob, Seen};
pub use plain::{Plain, chunk_at, chunks_of, pattern};
pub use wait::{PATIENCE, wait_until};
