//! Harnesses for tarn's integration tests: real daemons, real mounts.

pub mod daemon;
