//! Tests and benchmarks of tarn against a real registry, containerd, runc and
//! FUSE. The test bed itself is started by `scripts/testbed.sh`; [`testbed`]
//! drives it from Rust.

pub mod testbed;
