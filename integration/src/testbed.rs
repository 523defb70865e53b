//! The test bed from Rust: a registry, containerd and tarn-snapshotter started
//! by `scripts/testbed.sh` in a fresh temporary directory, and stopped (every
//! process, shim and mount of it) when the [`Testbed`] is dropped, also when a
//! test fails.
//!
//! `scripts/testbed.sh` is the one way a test bed is started: by `make
//! testbed-up`, the demo, the benchmark, `images.sh` and, through this
//! module, the tests (`TestRegistry` is a registry-only test bed). The shell
//! one is kept, not a Rust one, because it is the complete one (free-port
//! retries, stopping tasks through containerd, leftover shims and runc
//! state, unmounting deepest first) and the scripts need it without a
//! Rust front end; the tests need only to drive it and read `DIR/env`.
//! A test that must own the daemon's process (its exit status, a SIGKILL, a
//! restart on the same root) starts it with [`crate::daemon::Daemon`] at the
//! bed's `tarn.sock` instead of `--tarn`.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

use crate::reglog::Request;
use crate::reglog::read_settled;

/// What can go wrong while starting or using a test bed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("running {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: io::Error,
    },
    #[error("{cmd} failed ({status}): {stderr}")]
    Failed {
        cmd: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("creating a temporary directory: {0}")]
    TempDir(#[source] io::Error),
    #[error("test bed env has no {0} (component not started?)")]
    Missing(&'static str),
    #[error("unparsable line in {path}: {line}")]
    Parse { path: PathBuf, line: String },
}

/// A component `testbed.sh up` can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Registry,
    Containerd,
    Tarn,
}

impl Component {
    fn flag(self) -> &'static str {
        match self {
            Component::Registry => "--registry",
            Component::Containerd => "--containerd",
            Component::Tarn => "--tarn",
        }
    }
}

/// A running test bed. Dropping it runs `testbed.sh down`.
pub struct Testbed {
    dir: Option<TempDir>,
    path: PathBuf,
    env: HashMap<String, String>,
}

/// The repository root, where `scripts/` lives.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the integration crate sits inside the repository")
        .to_path_buf()
}

fn script(name: &str) -> PathBuf {
    repo_root().join("scripts").join(name)
}

/// Runs a command to completion; a non-zero exit is an error carrying stderr.
fn run(cmd: &mut Command) -> Result<Output, TestbedError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| TestbedError::Spawn {
        cmd: shown.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(TestbedError::Failed {
            cmd: shown,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

impl Testbed {
    /// Starts `components` in a fresh temporary directory and waits until
    /// each answers. An empty slice starts everything.
    pub fn up(components: &[Component]) -> Result<Testbed, TestbedError> {
        Testbed::up_with(components, None)
    }

    /// [`Testbed::up`] with a registry that demands HTTP basic auth: the
    /// users of `htpasswd` (lines `USER:BCRYPT-HASH`).
    pub fn up_with(
        components: &[Component],
        htpasswd: Option<&str>,
    ) -> Result<Testbed, TestbedError> {
        let dir = tempfile::Builder::new()
            .prefix("tarn-testbed-")
            .tempdir()
            .map_err(TestbedError::TempDir)?;
        let path = dir.path().join("bed");
        let mut cmd = Command::new(script("testbed.sh"));
        cmd.arg("up").arg(&path);
        if let Some(users) = htpasswd {
            let file = dir.path().join("htpasswd");
            fs::write(&file, users).map_err(|source| TestbedError::Write {
                path: file.clone(),
                source,
            })?;
            cmd.env("TESTBED_REGISTRY_HTPASSWD", file);
        }
        if components.is_empty() {
            cmd.arg("--all");
        }
        cmd.args(components.iter().map(|c| c.flag()));
        // On failure testbed.sh has already stopped what it started.
        run(&mut cmd)?;
        let env = parse_env(&path.join("env"))?;
        Ok(Testbed {
            dir: Some(dir),
            path,
            env,
        })
    }

    /// The directory holding the test bed's configs, data, logs and sockets.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// A variable of `DIR/env` (`REGISTRY`, `CONTAINERD_SOCK`, `TARN_SOCK`...).
    pub fn var(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    fn require(&self, key: &'static str) -> Result<&str, TestbedError> {
        self.var(key).ok_or(TestbedError::Missing(key))
    }

    /// `127.0.0.1:PORT` of the registry.
    pub fn registry(&self) -> Result<&str, TestbedError> {
        self.require("REGISTRY")
    }

    pub fn containerd_sock(&self) -> Result<&str, TestbedError> {
        self.require("CONTAINERD_SOCK")
    }

    pub fn tarn_sock(&self) -> Result<&str, TestbedError> {
        self.require("TARN_SOCK")
    }

    /// Pids of the daemons the test bed started.
    pub fn pids(&self) -> Vec<u32> {
        ["REGISTRY_PID", "CONTAINERD_PID", "TARN_PID"]
            .iter()
            .filter_map(|k| self.var(k)?.parse().ok())
            .collect()
    }

    /// Every request the registry has answered so far, in order.
    pub fn registry_log(&self) -> Result<Vec<Request>, TestbedError> {
        let path = PathBuf::from(self.require("REGISTRY_LOG")?);
        read_settled(&path).map_err(|source| TestbedError::Read { path, source })
    }

    /// Body bytes the registry has sent for all requests so far.
    pub fn bytes_served(&self) -> Result<u64, TestbedError> {
        Ok(self.registry_log()?.iter().map(|r| r.bytes).sum())
    }

    /// Runs `ctr --address CONTAINERD_SOCK ARGS...` (output whatever the exit).
    pub fn ctr(&self, args: &[&str]) -> Result<Output, TestbedError> {
        let sock = self.containerd_sock()?;
        let mut cmd = Command::new("ctr");
        cmd.arg("--address").arg(sock).args(args);
        cmd.output().map_err(|source| TestbedError::Spawn {
            cmd: format!("{cmd:?}"),
            source,
        })
    }

    /// Pushes the cached test image `name` (see `scripts/images.sh`, built if
    /// missing) to the registry; returns its reference.
    pub fn push_image(&self, name: &str) -> Result<String, TestbedError> {
        let registry = self.registry()?;
        run(Command::new(script("images.sh"))
            .arg("push")
            .arg(name)
            .arg(registry))?;
        Ok(format!("{registry}/{name}:latest"))
    }

    /// Stops the test bed now, reporting a failure to clean up.
    pub fn down(mut self) -> Result<(), TestbedError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), TestbedError> {
        let Some(dir) = self.dir.take() else {
            return Ok(());
        };
        let result = run(Command::new(script("testbed.sh"))
            .arg("down")
            .arg(&self.path));
        if result.is_err() {
            // Something may still be mounted inside: removing the directory
            // could reach through a mount, so leave it for a human.
            let kept = dir.keep();
            eprintln!("testbed: down failed, keeping {}", kept.display());
        }
        result.map(|_| ())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("testbed: {e}");
        }
    }
}

/// Reads `DIR/env`: `KEY=VALUE` lines as bash's `printf %q` writes them.
fn parse_env(path: &Path) -> Result<HashMap<String, String>, TestbedError> {
    let text = fs::read_to_string(path).map_err(|source| TestbedError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut env = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let parse_err = || TestbedError::Parse {
            path: path.to_owned(),
            line: line.to_owned(),
        };
        let (key, value) = line.split_once('=').ok_or_else(parse_err)?;
        env.insert(key.to_owned(), unquote(value).ok_or_else(parse_err)?);
    }
    Ok(env)
}

/// Undoes `printf %q` for the values the test bed writes (paths, addresses,
/// numbers): backslash escapes only; `$'...'` quoting is not expected.
fn unquote(value: &str) -> Option<String> {
    if value.starts_with("$'") {
        return None;
    }
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.push(chars.next()?);
        } else {
            out.push(c);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_are_unquoted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("env");
        fs::write(
            &path,
            "REGISTRY=127.0.0.1:5000\nTARN_ROOT=/tmp/a\\ b/tarn\nTARN_PID=42\n",
        )
        .expect("write env");
        let env = parse_env(&path).expect("parse env");
        assert_eq!(env["REGISTRY"], "127.0.0.1:5000");
        assert_eq!(env["TARN_ROOT"], "/tmp/a b/tarn");
        assert_eq!(env["TARN_PID"], "42");
        fs::write(&path, "no equals sign\n").expect("write env");
        assert!(parse_env(&path).is_err());
    }
}
