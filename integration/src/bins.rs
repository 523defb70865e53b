//! Where the built binaries are: the one directory `$TARN_BIN_DIR` (the
//! Makefile exports it: `target/release`, what `make build` makes), else
//! `target/release` of this repository. Tests, the test bed
//! (`scripts/testbed.sh`) and the benchmark scripts all find tarn's
//! binaries there and nowhere else, so what runs is what was built for the
//! run. A test's own helper binaries of this crate (`tarn-farproxy`) are
//! found by cargo's `env!("CARGO_BIN_EXE_...")`, which cargo builds with the
//! test.

use std::path::PathBuf;

/// The variable naming the directory of the built binaries.
pub const BIN_DIR_VAR: &str = "TARN_BIN_DIR";

/// A built binary is missing.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} is missing: build it (`cargo build --release --workspace`) or point {BIN_DIR_VAR} at the directory holding it",
    path.display()
)]
pub struct Missing {
    pub path: PathBuf,
}

/// The directory of the built binaries.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os(BIN_DIR_VAR) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => crate::testbed::repo_root().join("target").join("release"),
    }
}

/// The built binary `name` (`tarn`, `tarn-snapshotter`).
pub fn bin(name: &str) -> Result<PathBuf, Missing> {
    let path = bin_dir().join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Missing { path })
    }
}

/// The daemon, `tarn-snapshotter`.
pub fn snapshotter() -> Result<PathBuf, Missing> {
    bin("tarn-snapshotter")
}

/// A second build of the daemon, with another version (`make upgrade-bin`
/// builds it into `$TARN_BIN_DIR/upgrade`): what an upgrade takes over to.
pub fn upgrade_snapshotter() -> Result<PathBuf, Missing> {
    bin("upgrade/tarn-snapshotter")
}

/// The CLI, `tarn`.
pub fn tarn() -> Result<PathBuf, Missing> {
    bin("tarn")
}
