//! Harnesses for tarn's integration tests: real registry, containerd, daemons
//! and mounts, started per test and stopped by PID.

pub mod client;
pub mod daemon;
pub mod mounts;
pub mod registry;
