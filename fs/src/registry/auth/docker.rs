//! Credentials from the docker config file: its `auths`, and docker's
//! credential helpers (`credHelpers` per registry, `credsStore` for the
//! rest) run through docker's protocol: `docker-credential-NAME get`, the
//! server URL on stdin, `{"ServerURL","Username","Secret"}` on stdout.
//!
//! A helper that is missing, fails, or knows nothing of a registry is not
//! an error: the registry is tried anonymously (with a log line), as a pull
//! of a public image must work whatever the keychain holds. Where a helper
//! has nothing but `auths` has an entry, the entry is used, so a config
//! docker can pull with, tarn can too.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use super::keychain::{Credentials, IDENTITY_TOKEN_USER, Keychain};
use crate::registry::error::RegistryError;
use crate::registry::reference::{DOCKER_HUB, Repository};

/// The server URL docker's tools key Docker Hub's credentials by.
const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// A credential helper's answer to `get`.
#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Why a credential helper gave no credentials.
#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("docker-credential-{0} is not on the search path")]
    Missing(String),
    #[error("cannot run docker-credential-{name}: {source}")]
    Run {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("docker-credential-{name} get failed: {message}")]
    Failed { name: String, message: String },
    #[error("docker-credential-{name} answered with bad JSON: {source}")]
    BadAnswer {
        name: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The docker config file's credentials and helpers.
#[derive(Debug, Default, Clone)]
pub struct DockerConfig {
    /// Registry host (as in references) -> credentials from `auths`.
    creds: BTreeMap<String, Credentials>,
    /// Registry host -> helper name, from `credHelpers`.
    helpers: BTreeMap<String, String>,
    /// The helper for every registry `helpers` does not name.
    store: Option<String>,
    /// Where `docker-credential-*` programs are looked for; `None` means
    /// the process's `PATH`.
    search_path: Option<OsString>,
}

impl DockerConfig {
    /// The default location: `$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
            return Some(PathBuf::from(dir).join("config.json"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker").join("config.json"))
    }

    /// Loads `path`; a missing file means no credentials.
    pub fn load(path: &Path) -> Result<DockerConfig, RegistryError> {
        match std::fs::read(path) {
            Ok(bytes) => DockerConfig::parse(&bytes).map_err(|reason| RegistryError::Config {
                path: path.to_path_buf(),
                reason,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DockerConfig::default()),
            Err(e) => Err(RegistryError::Config {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        }
    }

    pub fn parse(json: &[u8]) -> Result<DockerConfig, String> {
        let file: ConfigFile = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        let mut creds = BTreeMap::new();
        for (key, entry) in file.auths {
            let c = if let Some(token) = entry.identitytoken.filter(|t| !t.is_empty()) {
                Credentials {
                    username: IDENTITY_TOKEN_USER.to_string(),
                    password: token,
                }
            } else if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let raw = STANDARD
                    .decode(auth.trim())
                    .map_err(|e| format!("auths.{key}.auth is not base64: {e}"))?;
                let raw =
                    String::from_utf8(raw).map_err(|_| format!("auths.{key}.auth is not utf-8"))?;
                let (u, p) = raw
                    .split_once(':')
                    .ok_or_else(|| format!("auths.{key}.auth is not user:password"))?;
                Credentials {
                    username: u.to_string(),
                    password: p.to_string(),
                }
            } else if let (Some(u), Some(p)) = (entry.username, entry.password) {
                Credentials {
                    username: u,
                    password: p,
                }
            } else {
                continue;
            };
            creds.insert(normalize_key(&key), c);
        }
        let helpers = file
            .cred_helpers
            .into_iter()
            .filter(|(_, name)| !name.is_empty())
            .map(|(key, name)| (normalize_key(&key), name))
            .collect();
        Ok(DockerConfig {
            creds,
            helpers,
            store: file.creds_store.filter(|s| !s.is_empty()),
            search_path: None,
        })
    }

    /// Looks for credential helpers in `path` (`PATH`'s syntax) instead of
    /// the process's `PATH`.
    pub fn with_search_path(mut self, path: impl Into<OsString>) -> DockerConfig {
        self.search_path = Some(path.into());
        self
    }

    /// Whether finding `registry`'s credentials runs a helper (a process:
    /// call [`DockerConfig::credentials_for`] off the async workers then).
    pub fn uses_helper(&self, registry: &str) -> bool {
        self.helper_for(registry).is_some()
    }

    /// Credentials for a registry as written in references (`docker.io`,
    /// `host:port`): its helper's, else its `auths` entry, else none. May
    /// run a helper and wait for it.
    pub fn credentials_for(&self, registry: &str) -> Option<Credentials> {
        if let Some(name) = self.helper_for(registry) {
            match self.run_helper(name, registry) {
                Ok(c) => return Some(c),
                Err(e) => tracing::info!(registry, error = %e, "no credentials from helper"),
            }
        }
        self.creds.get(registry).cloned()
    }

    fn helper_for(&self, registry: &str) -> Option<&str> {
        self.helpers
            .get(registry)
            .or(self.store.as_ref())
            .map(String::as_str)
    }

    /// `docker-credential-NAME get` for `registry`.
    fn run_helper(&self, name: &str, registry: &str) -> Result<Credentials, HelperError> {
        let program = format!("docker-credential-{name}");
        let search = self
            .search_path
            .clone()
            .or_else(|| std::env::var_os("PATH"))
            .unwrap_or_default();
        let path = std::env::split_paths(&search)
            .map(|dir| dir.join(&program))
            .find(|p| p.is_file())
            .ok_or_else(|| HelperError::Missing(name.to_string()))?;
        let run = |source| HelperError::Run {
            name: name.to_string(),
            source,
        };
        let mut child = Command::new(path)
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(run)?;
        let server = if registry == DOCKER_HUB {
            DOCKER_HUB_SERVER
        } else {
            registry
        };
        if let Some(mut stdin) = child.stdin.take() {
            // Dropping stdin closes it: the helper reads to its end.
            stdin.write_all(server.as_bytes()).map_err(run)?;
        }
        let out = child.wait_with_output().map_err(run)?;
        if !out.status.success() {
            // Helpers print why on stdout ("credentials not found in native
            // keychain"), some on stderr.
            let text = if out.stdout.is_empty() {
                &out.stderr
            } else {
                &out.stdout
            };
            return Err(HelperError::Failed {
                name: name.to_string(),
                message: String::from_utf8_lossy(text).trim().to_string(),
            });
        }
        let answer: HelperAnswer =
            serde_json::from_slice(&out.stdout).map_err(|source| HelperError::BadAnswer {
                name: name.to_string(),
                source,
            })?;
        Ok(Credentials {
            username: answer.username,
            password: answer.secret,
        })
    }
}

/// The config as read once (tests, `tarn mount-layer`); the daemon uses
/// [`DockerFile`](super::docker_file::DockerFile), which re-reads it.
impl Keychain for DockerConfig {
    fn name(&self) -> &str {
        "docker-config"
    }
    fn credentials(&self, repo: &Repository) -> Option<Credentials> {
        self.credentials_for(&repo.registry)
    }
}

/// Config keys come as `host`, `https://host`, or `https://host/v1/`;
/// Docker Hub's is `https://index.docker.io/v1/`.
fn normalize_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        h => h.to_string(),
    }
}

#[cfg(test)]
mod tests;
