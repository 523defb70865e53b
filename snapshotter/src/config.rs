//! The daemon's configuration file (TOML). Every field has a default, so no
//! file is needed; the remote-layer half adds its options here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const DEFAULT_ROOT: &str = "/var/lib/tarn";
pub const DEFAULT_ADDRESS: &str = "/run/tarn/tarn.sock";
pub const DEFAULT_CONFIG: &str = "/etc/tarn/config.toml";
pub const DEFAULT_ADMIN_ADDRESS: &str = "/run/tarn/admin.sock";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read config {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parse config {path}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Socket of tarn's admin API (used by `tarn status`).
    pub admin_address: PathBuf,
    /// How long Prepare may spend resolving a remote layer (manifest,
    /// footer, TOC) before it falls back to an ordinary pull.
    pub resolve_timeout_secs: u64,
    /// Mount eStargz layers whose TOC digest annotation is missing
    /// (their TOC cannot be verified).
    pub allow_unverified_layers: bool,
    /// Chunk cache; default `<root>/cache`.
    pub cache_dir: Option<PathBuf>,
    /// Registry hosts (`host:port`) reached over plain HTTP.
    pub plain_http: Vec<String>,
    /// On SIGTERM/SIGINT, how long in-flight calls may take to finish.
    pub shutdown_grace_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            admin_address: PathBuf::from(DEFAULT_ADMIN_ADDRESS),
            resolve_timeout_secs: 5,
            allow_unverified_layers: false,
            cache_dir: None,
            plain_http: Vec::new(),
            shutdown_grace_secs: 5,
        }
    }
}

impl Config {
    /// Loads `path`. A missing file gives the defaults unless the user named
    /// it explicitly (`required`).
    pub fn load(path: &Path, required: bool) -> Result<Self, Error> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default());
            }
            Err(source) => {
                return Err(Error::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        toml::from_str(&text).map_err(|source| Error::Parse {
            path: path.to_owned(),
            source,
        })
    }

    pub fn cache_dir(&self, root: &Path) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| root.join("cache"))
    }

    pub fn resolve_timeout(&self) -> Duration {
        Duration::from_secs(self.resolve_timeout_secs)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_default_file_is_fine_missing_explicit_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.toml");
        assert_eq!(Config::load(&missing, false).unwrap(), Config::default());
        let e = Config::load(&missing, true).unwrap_err();
        assert!(e.to_string().contains("none.toml"), "{e}");
    }

    #[test]
    fn partial_file_keeps_other_defaults_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "plain_http = [\"127.0.0.1:5000\"]\nresolve_timeout_secs = 2\n",
        )
        .unwrap();
        let c = Config::load(&p, true).unwrap();
        assert_eq!(c.plain_http, vec!["127.0.0.1:5000"]);
        assert_eq!(c.resolve_timeout(), Duration::from_secs(2));
        assert_eq!(c.admin_address, PathBuf::from(DEFAULT_ADMIN_ADDRESS));
        assert!(!c.allow_unverified_layers);
        assert_eq!(c.cache_dir(Path::new("/r")), PathBuf::from("/r/cache"));

        std::fs::write(&p, "resolve_timeout = 2\n").unwrap();
        assert!(
            Config::load(&p, true).is_err(),
            "a typo must not be ignored"
        );
    }
}
