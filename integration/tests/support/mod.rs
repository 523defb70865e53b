//! Helpers shared by the integration tests of tarn-fs.
#![allow(dead_code)] // each test binary uses a different part

pub mod proc;
pub mod tree;
