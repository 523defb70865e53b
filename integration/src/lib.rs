//! Harnesses for tests of tarn against real components: [`registry`] runs a
//! registry, [`cri`] is a small Kubernetes CRI client for the CRI tests.

pub mod cri;
pub mod registry;
