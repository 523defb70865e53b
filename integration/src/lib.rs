//! Tests and benchmarks of tarn against a real registry, containerd, runc and
//! FUSE. [`cri`] is a small Kubernetes CRI client for the CRI tests.

pub mod cri;
