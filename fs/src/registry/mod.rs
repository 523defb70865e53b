//! Image references, manifests, auth and ranged GETs: all of tarn's HTTP.
//!
//! - [`reference`]: `[registry[:port]/]repo[:tag][@digest]` with Docker Hub
//!   defaults.
//! - [`manifest`]: OCI and Docker v2 manifests and indexes, pure selection of
//!   linux/amd64.
//! - [`auth`]: `WWW-Authenticate` challenges, the docker config file, tokens.
//! - [`client`]: [`RegistryClient`], one keep-alive HTTP client for every
//!   registry the process talks to, with retries, redirects and auth.
//! - [`source`]: [`BlobSource`], the seam the fetcher reads blobs through, so
//!   mirrors and peers can later sit beside the registry.

pub mod auth;
pub mod client;
pub mod manifest;
pub mod reference;
pub mod source;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use client::RegistryClient;
pub use manifest::{Descriptor, ResolvedImage};
pub use reference::{Reference, Repository};
pub use source::{BlobSource, RemoteBlob};

use crate::Digest;

/// How the client reaches registries.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Hosts (`name`) or `name:port` reached over plain HTTP. localhost and
    /// 127.0.0.0/8 always are; everything else uses HTTPS unless listed.
    pub plain_http: Vec<String>,
    /// The docker config file with credentials; `None` means
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Retries after a failed attempt of an on-demand read; background
    /// reads get three times as many.
    pub retries: u32,
    /// Limit for one whole request, body included.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> RegistryConfig {
        RegistryConfig {
            plain_http: Vec::new(),
            docker_config: None,
            retries: 3,
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl RegistryConfig {
    /// Whether `host` (`name[:port]`, as in a reference) is spoken to over
    /// plain HTTP.
    pub fn is_plain_http(&self, host: &str) -> bool {
        let name = host_name(host);
        let loopback = name == "localhost"
            || name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        loopback || self.plain_http.iter().any(|h| h == host || h == name)
    }
}

/// `host` without its port (IPv6 literals keep their brackets).
fn host_name(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if !port.contains(']') && port.parse::<u16>().is_ok() => name,
        _ => host,
    }
}

/// What went wrong talking to a registry. Each variant is something a caller
/// acts on differently: retry later, fix credentials, give up, distrust.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("cannot reach registry {host}: {reason}")]
    Unreachable { host: String, reason: String },
    #[error("registry {host} timed out on {what}")]
    Timeout { host: String, what: String },
    #[error("authentication to {host} failed: {reason}")]
    Auth { host: String, reason: String },
    #[error("{what} not found on {host}")]
    NotFound { host: String, what: String },
    #[error("bad response from {host} for {what}: {reason}")]
    BadResponse {
        host: String,
        what: String,
        reason: String,
    },
    #[error("digest mismatch for {what} from {host}: want {expected}, got {actual}")]
    DigestMismatch {
        host: String,
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("docker config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
}

impl RegistryError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Unreachable { .. } | RegistryError::Timeout { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_plain_http_others_only_when_listed() {
        let c = RegistryConfig {
            plain_http: vec!["reg.lan".into(), "other.lan:8080".into()],
            ..RegistryConfig::default()
        };
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.9.8.7",
            "[::1]:5000",
        ] {
            assert!(c.is_plain_http(h), "{h}");
        }
        assert!(c.is_plain_http("reg.lan:5000"));
        assert!(c.is_plain_http("other.lan:8080"));
        for h in [
            "other.lan",
            "other.lan:9090",
            "128.0.0.1",
            "docker.io",
            "localhost.evil.com",
        ] {
            assert!(!c.is_plain_http(h), "{h}");
        }
    }
}
