//! [`RegistryClient`]: the handle every registry request goes through, and
//! the one GET they all make: with auth, redirects and a body read to a
//! limit. What is asked for lives beside it: blobs in `blob.rs`, manifests
//! in `resolve.rs`; the token flow in `auth/token.rs`, the pools and
//! retries in `http.rs`.
//!
//! Redirects are followed by hand rather than by reqwest, for two reasons:
//! the target a blob redirects to (its storage URL) is remembered and read
//! directly next time, saving a round trip per ranged read; and the
//! registry's `Authorization` header must not be sent to another host.

use std::ops::Range;
use std::sync::Arc;

use bytes::BytesMut;
use dashmap::DashMap;
use reqwest::header::{ACCEPT, AUTHORIZATION, LOCATION, RANGE};
use reqwest::{StatusCode, Url};

use super::auth::challenge::Challenge;
use super::auth::docker::DockerConfig;
use super::auth::docker_file::DockerFile;
use super::auth::token::Auth;
use super::endpoint::Endpoint;
use super::error::RegistryError;
use super::hosts::HostConfig;
use super::http::{ClientStats, Failure, Http, RegistryConfig, classify, status_failure};
use super::reference::Repository;
use crate::Digest;
use crate::num::usize_from;

const MAX_REDIRECTS: usize = 5;

/// A handle to the registry client; cheap to clone, share freely.
#[derive(Clone)]
pub struct RegistryClient {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) http: Http,
    pub(super) auth: Auth,
    /// Storage URL a blob's GET redirected to, per (host, blob).
    redirects: DashMap<(String, Digest), Url>,
    /// Clients for hosts of a `hosts.toml` with TLS settings of their own.
    pub(super) host_clients: DashMap<HostConfig, reqwest::Client>,
}

/// One GET, as the retry loop repeats it.
pub(super) struct Get<'a> {
    pub(super) repo: &'a Repository,
    pub(super) path: String,
    pub(super) what: String,
    pub(super) accept: Option<&'static str>,
    pub(super) range: Option<Range<u64>>,
    /// Remember (and reuse) where this blob redirects to.
    pub(super) blob: Option<Digest>,
    /// A host of a `hosts.toml` to send it to instead of `repo`'s registry.
    pub(super) endpoint: Option<&'a Endpoint>,
}

impl Get<'_> {
    /// The repository as the host asked names it: for auth, redirects and
    /// messages.
    pub(super) fn target(&self) -> &Repository {
        self.endpoint.map_or(self.repo, |e| &e.repo)
    }

    /// Whether the bytes come from a mirror.
    pub(super) fn is_mirror(&self) -> bool {
        self.endpoint.is_some_and(|e| e.mirror)
    }
}

impl RegistryClient {
    /// Builds the client and reads the docker config file (a small
    /// blocking read: call it at startup, not on a busy async worker). The
    /// credential sources are `config.keychains`, then the docker config
    /// file, re-read whenever it changes.
    pub fn new(config: RegistryConfig) -> Result<RegistryClient, RegistryError> {
        let keychains = match config
            .docker_config
            .clone()
            .or_else(DockerConfig::default_path)
        {
            Some(path) => config.keychains.clone().then(DockerFile::open(path)?),
            None => config.keychains.clone(),
        };
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                http: Http::new(config)?,
                auth: Auth::new(keychains),
                redirects: DashMap::new(),
                host_clients: DashMap::new(),
            }),
        })
    }

    pub fn stats(&self) -> ClientStats {
        self.inner.http.stats()
    }

    /// Opens up to `n` keep-alive connections to `repo`'s registry ahead of
    /// the GETs that will need them (one `GET /v2/` each, at once), so those
    /// do not pay a connection's round trips. The answers do not matter
    /// (401 is usual); failures are left for the real requests to report.
    pub async fn preconnect(&self, repo: &Repository, n: usize) {
        let Ok(url) = self.inner.http.url(repo.host(), "/v2/") else {
            return;
        };
        let Ok(http) = self.inner.http.client(&url).await else {
            return;
        };
        let pings = (0..n).map(|_| {
            let req = http.get(url.clone());
            async move {
                if let Ok(resp) = req.send().await {
                    // Reading the (tiny) body returns the connection to the pool.
                    let _ = resp.bytes().await;
                }
            }
        });
        futures::future::join_all(pings).await;
    }

    /// One GET with auth and redirects; returns a 200 or 206 response.
    pub(super) async fn send(&self, get: &Get<'_>) -> Result<reqwest::Response, Failure> {
        let repo = get.target();
        let host = repo.host();
        let registry_url = match get.endpoint {
            Some(e) => e.url(&get.path),
            None => self.inner.http.url(host, &get.path).map_err(|e| {
                Failure::fatal(RegistryError::BadResponse {
                    host: host.to_string(),
                    what: get.what.clone(),
                    reason: format!("cannot build url: {e}"),
                })
            })?,
        };
        let redirect_key = get.blob.map(|d| (host.to_string(), d));
        let cached = redirect_key
            .as_ref()
            .and_then(|k| self.inner.redirects.get(k).map(|u| u.clone()));
        let mut from_cache = cached.is_some();
        let mut url = cached.unwrap_or_else(|| registry_url.clone());
        let mut hops = 0;
        let mut reauthed = false;
        loop {
            let on_registry =
                url.host_str() == registry_url.host_str() && url.port() == registry_url.port();
            let own = get.endpoint.and_then(|e| e.client.as_ref());
            let http = match own {
                Some(c) if on_registry => c,
                _ => self.inner.http.client(&url).await.map_err(Failure::fatal)?,
            };
            let mut rb = http.get(url.clone());
            if on_registry && let Some(e) = get.endpoint {
                rb = rb.headers(e.headers.clone());
            }
            if let Some(a) = get.accept {
                rb = rb.header(ACCEPT, a);
            }
            if let Some(r) = &get.range {
                rb = rb.header(RANGE, format!("bytes={}-{}", r.start, r.end - 1));
            }
            let sent = if on_registry {
                self.inner.auth.header(&self.inner.http, repo).await?
            } else {
                None
            };
            if let Some(h) = &sent {
                rb = rb.header(AUTHORIZATION, h);
            }
            let resp = match rb.send().await {
                Ok(r) => r,
                Err(e) if from_cache => {
                    self.forget_redirect(&redirect_key, &e.to_string());
                    return Err(Failure::transient(classify(&e, host, &get.what)));
                }
                Err(e) => return Err(Failure::transient(classify(&e, host, &get.what))),
            };
            self.inner.http.sent();
            let status = resp.status();
            if status.is_success() {
                if hops > 0
                    && let Some(k) = &redirect_key
                {
                    self.inner.redirects.insert(k.clone(), url);
                }
                return Ok(resp);
            }
            if from_cache {
                // Storage URLs expire (presigned); start over at the registry.
                self.forget_redirect(&redirect_key, status.as_str());
                from_cache = false;
                url = registry_url.clone();
                continue;
            }
            if status.is_redirection() {
                hops += 1;
                let next = resp
                    .headers()
                    .get(LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .and_then(|l| url.join(l).ok());
                match next {
                    Some(next) if hops <= MAX_REDIRECTS => {
                        url = next;
                        continue;
                    }
                    _ => {
                        return Err(Failure::fatal(RegistryError::BadResponse {
                            host: host.to_string(),
                            what: get.what.clone(),
                            reason: format!(
                                "redirect {status} without a usable Location, or too many"
                            ),
                        }));
                    }
                }
            }
            if status == StatusCode::UNAUTHORIZED && on_registry && !reauthed {
                let challenge = Challenge::of(resp.headers());
                let Some(challenge) = challenge else {
                    return Err(Failure::fatal(RegistryError::Auth {
                        host: host.to_string(),
                        reason: format!(
                            "401 for {} without a usable WWW-Authenticate challenge",
                            get.what
                        ),
                    }));
                };
                self.inner
                    .auth
                    .authenticate(&self.inner.http, repo, challenge, sent.as_deref())
                    .await?;
                reauthed = true;
                continue;
            }
            return Err(status_failure(status, host, &get.what));
        }
    }

    fn forget_redirect(&self, key: &Option<(String, Digest)>, why: &str) {
        if let Some(k) = key {
            tracing::debug!(blob = %k.1, why, "dropping cached blob redirect");
            self.inner.redirects.remove(k);
        }
    }

    /// Reads up to `limit` bytes of the body; `true` if more was left.
    pub(super) async fn read_body(
        &self,
        mut resp: reqwest::Response,
        limit: usize,
        get: &Get<'_>,
    ) -> Result<(BytesMut, bool), Failure> {
        let mut body = BytesMut::with_capacity(
            limit
                .min(usize_from(resp.content_length().unwrap_or(0)))
                .min(64 << 20),
        );
        loop {
            let chunk = resp
                .chunk()
                .await
                .map_err(|e| Failure::transient(classify(&e, get.target().host(), &get.what)))?;
            let Some(chunk) = chunk else {
                return Ok((body, false));
            };
            self.inner.http.received(chunk.len(), get.is_mirror());
            let room = limit - body.len();
            if chunk.len() > room {
                body.extend_from_slice(&chunk[..room]);
                return Ok((body, true));
            }
            body.extend_from_slice(&chunk);
            if body.len() == limit && limit != usize::MAX {
                // Anything left is not wanted; peek whether there was more.
                let more = resp
                    .chunk()
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|c| !c.is_empty());
                return Ok((body, more));
            }
        }
    }
}
