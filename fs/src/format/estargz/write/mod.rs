//! The eStargz writer: a tar stream in, an eStargz blob out.
//!
//! It is not on the read path (the daemon never writes a layer): tests, the
//! test beds and the benchmark build their fixtures with it, so it is
//! compiled only for tests and with the `writer` feature. It sits under `estargz/` because it shares that format's
//! footer, TOC types and name rules with the reader, and tests check one
//! against the other.
//!
//! `tarin` reads the input tar, `encode` writes the blob; both report a
//! [`WriteError`], which lives apart so that neither imports the other's
//! error.

mod encode;
mod error;
mod tarin;

#[cfg(test)]
mod tests;

pub use encode::{WriteOptions, WriteResult, write_estargz, write_estargz_reopen};
pub use error::WriteError;
