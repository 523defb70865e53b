//! [`WriteError`]: why an overlaybd layer could not be written.

/// Why an overlaybd layer could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing the overlaybd layer: {0}")]
    Io(#[from] std::io::Error),
    /// Extents must come in disk order and inside the virtual disk, as the
    /// index is sorted and the reader refuses overlaps.
    #[error(
        "extent at sector {offset} (+{sectors}) is before sector {after} or past the disk's {disk}"
    )]
    Order {
        offset: u64,
        sectors: u64,
        after: u64,
        disk: u64,
    },
    #[error("{0}")]
    Invalid(String),
}
