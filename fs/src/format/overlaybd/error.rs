//! [`ObdError`]: why an overlaybd blob, block or stack was refused.

use std::ops::Range;

use crate::registry::RegistryError;

/// Why an overlaybd layer could not be opened, read or stacked. Every
/// message is one line naming what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum ObdError {
    /// The blob's first bytes are neither ZFile, LSMT nor a tar wrapper
    /// around one of them.
    #[error("not an overlaybd layer: {0}")]
    BadMagic(String),
    #[error("overlaybd tar wrapper: {0}")]
    Wrapper(String),
    #[error("ZFile: {0}")]
    ZFile(String),
    #[error("LSMT: {0}")]
    Lsmt(String),
    /// One compressed block failed its CRC or did not decompress to its
    /// size; only reads of that block fail.
    #[error("ZFile block {block}: {reason}")]
    Block { block: u64, reason: String },
    #[error("{what}: CRC32C is {actual:#010x}, the blob says {expected:#010x}")]
    Crc {
        what: &'static str,
        expected: u32,
        actual: u32,
    },
    /// A feature of the format that the reference tools do not write today
    /// and tarn does not read.
    #[error("unsupported overlaybd layer: {0}")]
    Unsupported(String),
    #[error("overlaybd layer stack: {0}")]
    Stack(String),
    /// A caller asked for bytes outside the stacked disk.
    #[error("read {start}..{end} is outside the virtual disk of {size} bytes", start = range.start, end = range.end)]
    OutOfDisk { range: Range<u64>, size: u64 },
    /// The bytes handed to an opening step are not the ones it asked for.
    #[error("fetched {}..{}, not the {}..{} asked for", got.start, got.end, want.start, want.end)]
    Fetched { want: Range<u64>, got: Range<u64> },
    #[error("opening the layer took more than {0} fetches")]
    TooManySteps(usize),
    #[error("reading the blob: {0}")]
    Source(#[from] RegistryError),
}
