//! Content-addressed store of verified bytes, keyed by digest.
