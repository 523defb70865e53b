//! Conversions between the integer widths the byte and offset paths mix.
//!
//! A layer's offsets and lengths are `u64` (a blob or a file may pass
//! 4 GiB); buffers and slices are indexed by `usize`. tarn builds only for
//! 64-bit targets, where every `u64` fits a `usize`, so those conversions
//! go through [`usize_from`] instead of a scattered `as usize`. The other
//! direction, `usize` to `u64`, widens on every target Rust supports.

// The one premise `usize_from` rests on, checked at build time: a build for
// a 32-bit target fails here instead of truncating offsets at run time.
const _: () = assert!(usize::BITS >= 64, "tarn builds only for 64-bit targets");

/// `n` as a `usize`: lossless, since `usize` is at least 64 bits wide (the
/// assertion above), and free: it compiles to nothing.
#[inline]
#[must_use]
// Never truncates: usize::BITS >= 64 is asserted at build time above.
#[allow(clippy::cast_possible_truncation)]
pub const fn usize_from(n: u64) -> usize {
    n as usize
}

#[cfg(test)]
mod tests {
    use super::usize_from;

    #[test]
    fn usize_from_keeps_every_u64() {
        for n in [0, 1, u64::from(u32::MAX) + 1, u64::MAX] {
            assert_eq!(usize_from(n) as u64, n);
        }
    }
}
