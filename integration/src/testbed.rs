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

/// How the bed's registry authenticates clients.
#[derive(Debug, Clone, Copy, Default)]
pub enum RegistryAuth<'a> {
    #[default]
    Anonymous,
    /// HTTP basic auth of the users of an htpasswd file (its lines,
    /// `USER:BCRYPT-HASH`; see [`crate::registry::htpasswd_line`]).
    Htpasswd(&'a str),
    /// Token auth: the bed's own token server (`scripts/tokenserver.py`)
    /// gives `users` (user, password) tokens the registry honours for
    /// `ttl_secs` seconds.
    Token {
        users: &'a [(&'a str, &'a str)],
        ttl_secs: u32,
    },
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

/// The overlaybd fixtures (`shared/fixtures/overlaybd`: blobs made by the
/// reference tools, with the trees they were made from), beside the
/// repository.
pub fn overlaybd_fixtures() -> PathBuf {
    repo_root()
        .ancestors()
        .map(|a| a.join("shared/fixtures/overlaybd"))
        .find(|p| p.is_dir())
        .expect("shared/fixtures/overlaybd beside the repository")
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
        Testbed::up_auth(
            components,
            htpasswd.map_or(RegistryAuth::Anonymous, RegistryAuth::Htpasswd),
        )
    }

    /// [`Testbed::up`] with a registry that authenticates as `auth` says.
    pub fn up_auth(
        components: &[Component],
        auth: RegistryAuth<'_>,
    ) -> Result<Testbed, TestbedError> {
        Testbed::start(components, auth, None)
    }

    /// [`Testbed::up`] with `extra` appended to tarn's configuration (TOML
    /// sections other than `[registry]`: `$TARN_CONFIG_EXTRA`).
    pub fn up_with_tarn_config(
        components: &[Component],
        extra: &str,
    ) -> Result<Testbed, TestbedError> {
        Testbed::start(components, RegistryAuth::Anonymous, Some(extra))
    }

    fn start(
        components: &[Component],
        auth: RegistryAuth<'_>,
        tarn_extra: Option<&str>,
    ) -> Result<Testbed, TestbedError> {
        let dir = tempfile::Builder::new()
            .prefix("tarn-testbed-")
            .tempdir()
            .map_err(TestbedError::TempDir)?;
        let path = dir.path().join("bed");
        let mut cmd = Command::new(script("testbed.sh"));
        cmd.arg("up").arg(&path);
        let write = |name: &str, text: &str| {
            let file = dir.path().join(name);
            fs::write(&file, text).map_err(|source| TestbedError::Write {
                path: file.clone(),
                source,
            })?;
            Ok::<_, TestbedError>(file)
        };
        match auth {
            RegistryAuth::Anonymous => {}
            RegistryAuth::Htpasswd(users) => {
                cmd.env("TESTBED_REGISTRY_HTPASSWD", write("htpasswd", users)?);
            }
            RegistryAuth::Token { users, ttl_secs } => {
                let lines: String = users.iter().map(|(u, p)| format!("{u}:{p}\n")).collect();
                cmd.env(
                    "TESTBED_REGISTRY_TOKEN_USERS",
                    write("token-users", &lines)?,
                );
                cmd.env("TESTBED_TOKEN_TTL", ttl_secs.to_string());
            }
        }
        if let Some(extra) = tarn_extra {
            cmd.env("TARN_CONFIG_EXTRA", extra);
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

    /// [`Testbed::push_image`] to a registry that demands credentials.
    pub fn push_image_as(
        &self,
        name: &str,
        user: &str,
        password: &str,
    ) -> Result<String, TestbedError> {
        let registry = self.registry()?;
        let out = run(Command::new(script("images.sh")).arg("path").arg(name))?;
        let layout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let reference = format!("{registry}/{name}:latest");
        run(Command::new("skopeo").args([
            "copy",
            "-q",
            "--dest-tls-verify=false",
            "--dest-creds",
            &format!("{user}:{password}"),
            &format!("oci:{layout}:latest"),
            &format!("docker://{reference}"),
        ]))?;
        Ok(reference)
    }

    /// Tokens the bed's token server has issued so far (refusals not
    /// counted); 0 without a token server.
    pub fn tokens_issued(&self) -> Result<usize, TestbedError> {
        let Some(path) = self.var("TOKEN_SERVER_LOG") else {
            return Ok(0);
        };
        let text = fs::read_to_string(path).map_err(|source| TestbedError::Read {
            path: path.into(),
            source,
        })?;
        Ok(text
            .lines()
            .filter(|l| l.contains(r#""issued": true"#))
            .count())
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
