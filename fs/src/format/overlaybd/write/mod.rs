//! Writing overlaybd layers as the reference tools do (`overlaybd-commit
//! -z --algorithm lz4 --bs 4 -t`): an LSMT file ([`lsmt`]) compressed in
//! blocks as a ZFile ([`zfile`]) inside the tar wrapper ([`wrapper`]).
//! `tarn convert` streams a layer's changed blocks through
//! [`LsmtWriter`] into a [`ZFileWriter`] over a file; the field values are
//! the ones the reference tools write (checked against the fixtures).
//!
//! Nothing here is read back by the daemon: the reader in the parent
//! module is the one that checks what these write (see `tests.rs`).

mod error;
pub mod lsmt;
pub mod wrapper;
pub mod zfile;

#[cfg(test)]
mod tests;

pub use error::WriteError;
pub use lsmt::{LsmtWriter, MAX_EXTENT_SECTORS, uuid_from};
pub use wrapper::{wrapper_head, wrapper_tail};
pub use zfile::ZFileWriter;
