//! HTTP: the connection pools, the settings that reach registries, retries
//! with backoff, and how a failed response or transport error is classed.
//!
//! One reqwest client (keep-alive pool) for all plain-HTTP URLs and one for
//! all HTTPS URLs, the second made at its first use: loading the system's
//! TLS roots is most of a short `tarn pull`'s CPU.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::{StatusCode, Url};

use super::auth::keychain::Keychains;
use super::error::RegistryError;
use crate::Intent;

/// How the client reaches registries.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Hosts (`name`) or `name:port` reached over plain HTTP. localhost and
    /// 127.0.0.0/8 always are; everything else uses HTTPS unless listed.
    pub plain_http: Vec<String>,
    /// The docker config file with credentials; `None` means
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Credential sources asked before the docker config, in order (CRI's
    /// captured credentials, pull secrets). Empty by default.
    pub keychains: Keychains,
    /// Retries after a failed attempt of an on-demand read; background
    /// reads get three times as many.
    pub retries: u32,
    /// Limit for one whole request, body included.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// containerd's registry hosts directory (`<dir>/<registry>/hosts.toml`,
    /// `hosts.rs`): blob reads go to the mirrors it names first. `None`:
    /// the registry only.
    pub hosts_dir: Option<PathBuf>,
}

impl Default for RegistryConfig {
    fn default() -> RegistryConfig {
        RegistryConfig {
            plain_http: Vec::new(),
            docker_config: None,
            keychains: Keychains::default(),
            retries: 3,
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            hosts_dir: None,
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

/// Requests and body bytes since the client was made (token requests
/// included in `requests`), and failed attempts by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    pub requests: u64,
    /// Body bytes from every host, mirrors included.
    pub bytes: u64,
    /// Of `bytes`, those from mirrors (`hosts.toml` hosts other than the
    /// server).
    pub mirror_bytes: u64,
    /// Requests that failed for good (after their retries), indexed like
    /// [`RegistryError::CAUSES`].
    pub errors: [u64; RegistryError::CAUSES.len()],
    /// Failed attempts that were tried again, indexed the same way.
    pub retries: [u64; RegistryError::CAUSES.len()],
}

/// The connection pools, the settings, and the counters every request adds
/// to.
pub(super) struct Http {
    /// For `http://` URLs: it never loads the system's TLS roots, which
    /// costs a short-lived `tarn pull` more CPU than the rest of its work.
    plain: reqwest::Client,
    /// For `https://` URLs, made at the first one.
    tls: tokio::sync::OnceCell<reqwest::Client>,
    pub(super) config: RegistryConfig,
    requests: AtomicU64,
    bytes: AtomicU64,
    mirror_bytes: AtomicU64,
    errors: [AtomicU64; RegistryError::CAUSES.len()],
    retries: [AtomicU64; RegistryError::CAUSES.len()],
}

impl Http {
    pub(super) fn new(config: RegistryConfig) -> Result<Http, RegistryError> {
        Ok(Http {
            plain: http_client(&config, false)?,
            tls: tokio::sync::OnceCell::new(),
            config,
            requests: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            mirror_bytes: AtomicU64::new(0),
            errors: Default::default(),
            retries: Default::default(),
        })
    }

    pub(super) fn stats(&self) -> ClientStats {
        ClientStats {
            requests: self.requests.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            mirror_bytes: self.mirror_bytes.load(Ordering::Relaxed),
            errors: std::array::from_fn(|i| self.errors[i].load(Ordering::Relaxed)),
            retries: std::array::from_fn(|i| self.retries[i].load(Ordering::Relaxed)),
        }
    }

    /// Counts one request sent (its answer arrived).
    pub(super) fn sent(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts body bytes received, from a mirror or not.
    pub(super) fn received(&self, n: usize, mirror: bool) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        if mirror {
            self.mirror_bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// The client for `url`: the plain one for `http://`, else the one that
    /// verifies TLS against the system's roots (loaded off the async workers
    /// the first time).
    pub(super) async fn client(&self, url: &Url) -> Result<&reqwest::Client, RegistryError> {
        if url.scheme() == "http" {
            return Ok(&self.plain);
        }
        self.tls
            .get_or_try_init(|| async {
                let config = self.config.clone();
                tokio::task::spawn_blocking(move || http_client(&config, true))
                    .await
                    .map_err(|e| client_error(&e))?
            })
            .await
    }

    /// `path` on `host`, over plain HTTP where the config says so.
    pub(super) fn url(&self, host: &str, path: &str) -> Result<Url, String> {
        let scheme = if self.config.is_plain_http(host) {
            "http"
        } else {
            "https"
        };
        Url::parse(&format!("{scheme}://{host}{path}")).map_err(|e| e.to_string())
    }

    /// Runs `attempt` until it succeeds, fails for good, or the intent's
    /// attempts are used up, sleeping with exponential backoff between.
    pub(super) async fn with_retries<T, F, Fut>(
        &self,
        intent: Intent,
        what: &str,
        attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        self.with_retries_up_to(intent, None, what, attempt).await
    }

    /// [`Http::with_retries`] with the configured retries replaced by
    /// `retries` when given (a mirror's 0: the next host is its retry).
    pub(super) async fn with_retries_up_to<T, F, Fut>(
        &self,
        intent: Intent,
        retries: Option<u32>,
        what: &str,
        attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let retries = retries.unwrap_or(self.config.retries);
        let (max, cap) = match intent {
            Intent::Open | Intent::OnDemand => (retries, Duration::from_secs(2)),
            Intent::Prefetch => (retries.saturating_mul(2), Duration::from_secs(5)),
            Intent::Background => (retries.saturating_mul(3), Duration::from_secs(10)),
        };
        let mut n = 0u32;
        loop {
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(f) if f.retry && n < max => {
                    self.retries[f.err.cause_index()].fetch_add(1, Ordering::Relaxed);
                    let delay = backoff(n, cap);
                    tracing::debug!(what, attempt = n + 1, ?delay, error = %f.err, "retrying");
                    tokio::time::sleep(delay).await;
                    n += 1;
                }
                Err(f) => {
                    self.errors[f.err.cause_index()].fetch_add(1, Ordering::Relaxed);
                    return Err(f.err);
                }
            }
        }
    }
}

/// A failed attempt, and whether another attempt may succeed.
pub(super) struct Failure {
    pub(super) err: RegistryError,
    pub(super) retry: bool,
}

impl Failure {
    pub(super) fn fatal(err: RegistryError) -> Failure {
        Failure { err, retry: false }
    }
    pub(super) fn transient(err: RegistryError) -> Failure {
        Failure { err, retry: true }
    }
}

impl From<RegistryError> for Failure {
    fn from(err: RegistryError) -> Failure {
        let retry = err.is_transient();
        Failure { err, retry }
    }
}

/// Exponential backoff from 100 ms, capped, with up to 25% jitter so many
/// readers failing together do not retry in lockstep.
fn backoff(attempt: u32, cap: Duration) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1u32 << attempt.min(16))
        .min(cap);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base + base.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

/// Maps an error status to a failure; 408, 429 and 5xx may pass.
pub(super) fn status_failure(status: StatusCode, host: &str, what: &str) -> Failure {
    let host = host.to_string();
    let what = what.to_string();
    match status {
        StatusCode::NOT_FOUND => Failure::fatal(RegistryError::NotFound { host, what }),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Failure::fatal(RegistryError::Auth {
            host,
            reason: format!("{status} for {what}"),
        }),
        s if s == StatusCode::REQUEST_TIMEOUT
            || s == StatusCode::TOO_MANY_REQUESTS
            || s.is_server_error() =>
        {
            Failure::transient(RegistryError::BadResponse {
                host,
                what,
                reason: format!("status {status}"),
            })
        }
        s => Failure::fatal(RegistryError::BadResponse {
            host,
            what,
            reason: format!("status {s}"),
        }),
    }
}

/// The reqwest client both kinds share the settings of; `tls_roots` false
/// makes one that never loads (or needs) trusted roots: for `http://` only.
/// Redirects are left to the caller (see `client.rs` for why).
fn http_client(config: &RegistryConfig, tls_roots: bool) -> Result<reqwest::Client, RegistryError> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(config.connect_timeout)
        .timeout(config.request_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .user_agent(concat!("tarn/", env!("CARGO_PKG_VERSION")));
    if !tls_roots {
        builder = builder.tls_certs_only([]);
    }
    builder.build().map_err(|e| client_error(&e))
}

fn client_error(e: &dyn std::error::Error) -> RegistryError {
    RegistryError::Unreachable {
        host: "any".to_string(),
        reason: format!("cannot build http client: {}", chain(e)),
    }
}

/// A transport error as a registry error: a timeout, or unreachable.
pub(super) fn classify(e: &reqwest::Error, host: &str, what: &str) -> RegistryError {
    if e.is_timeout() {
        RegistryError::Timeout {
            host: host.to_string(),
            what: what.to_string(),
        }
    } else {
        RegistryError::Unreachable {
            host: host.to_string(),
            reason: format!("{what}: {}", chain(e)),
        }
    }
}

/// An error and its sources, joined: reqwest's own message is often just
/// "error sending request".
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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

    #[test]
    fn backoff_grows_and_is_capped() {
        let cap = Duration::from_secs(2);
        assert!(backoff(0, cap) >= Duration::from_millis(100));
        assert!(backoff(0, cap) < Duration::from_millis(130));
        assert!(backoff(3, cap) >= Duration::from_millis(800));
        assert!(backoff(30, cap) <= cap.mul_f64(1.25));
    }

    #[test]
    fn statuses_that_may_pass_are_retried_others_not() {
        for (s, retry) in [
            (404, false),
            (400, false),
            (403, false),
            (408, true),
            (429, true),
            (500, true),
            (503, true),
        ] {
            let f = status_failure(StatusCode::from_u16(s).unwrap(), "h:1", "blob x");
            assert_eq!(f.retry, retry, "{s}");
            assert!(f.err.to_string().contains("h:1"), "{}", f.err);
        }
    }
}
