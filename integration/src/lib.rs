//! Harnesses for tarn's integration tests: real daemons, real mounts.

pub mod client;
pub mod daemon;
pub mod mounts;
