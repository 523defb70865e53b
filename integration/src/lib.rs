//! Harnesses for tarn's integration tests and benchmarks: a real registry,
//! containerd, runc, daemons and mounts, started per test and stopped by PID.
//! The whole test bed is started by `scripts/testbed.sh`; [`testbed`] drives
//! it from Rust.

pub mod client;
pub mod cri;
pub mod daemon;
pub mod mounts;
pub mod registry;
pub mod settle;
pub mod testbed;
