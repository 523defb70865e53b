//! Harnesses for tests of tarn against real components.

pub mod registry;
