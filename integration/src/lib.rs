//! Harnesses for tarn's integration tests and benchmarks: a real registry,
//! containerd, runc, daemons and mounts, started per test and stopped by PID.
//!
//! - [`testbed`]: the test bed (registry, containerd, tarn-snapshotter), which
//!   `scripts/testbed.sh` starts and stops; the only way tests, the demo and
//!   the benchmark start one.
//! - [`bins`]: where the built binaries are (`$TARN_BIN_DIR`).
//! - [`reglog`]: the registry's access log as requests.
//! - [`overlaybd`]: the overlaybd fixture pushed, pulled lazily, and the
//!   bed the overlaybd tests share.
//! - [`scrape`]: a daemon's `/metrics`, as a scraper reads it.
//! - [`wait`]: `wait_until`, the one way to wait for another process.

pub mod bins;
pub mod client;
pub mod cri;
pub mod daemon;
pub mod hostile;
pub mod mounts;
pub mod overlaybd;
pub mod registry;
pub mod reglog;
pub mod scrape;
pub mod testbed;
pub mod wait;
