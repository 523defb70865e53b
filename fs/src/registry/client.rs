//! [`RegistryClient`]: every request tarn makes to a registry.
//!
//! One reqwest client (keep-alive pool) for all plain-HTTP URLs and one for
//! all HTTPS URLs, the second made at its first use: loading the system's
//! TLS roots is most of a short `tarn pull`'s CPU. Redirects are
//! followed by hand rather than by reqwest, for two reasons: the target a
//! blob redirects to (its storage URL) is remembered and read directly next
//! time, saving a round trip per ranged read; and the registry's
//! `Authorization` header must not be sent to another host.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use futures::StreamExt;
use futures::stream::BoxStream;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE, WWW_AUTHENTICATE,
};
use reqwest::{StatusCode, Url};

use super::auth::{Challenge, Credentials, DockerConfig, TokenResponse};
use super::manifest::{self, MAX_MANIFEST_BYTES, Parsed, ResolvedImage};
use super::{Reference, RegistryConfig, RegistryError, Repository};
use crate::Digest;
use crate::Intent;

const MAX_REDIRECTS: usize = 5;

/// Requests and body bytes since the client was made (token requests
/// included in `requests`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    pub requests: u64,
    pub bytes: u64,
}

/// A handle to the registry client; cheap to clone, share freely.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    /// For `http://` URLs: it never loads the system's TLS roots, which
    /// costs a short-lived `tarn pull` more CPU than the rest of its work.
    plain: reqwest::Client,
    /// For `https://` URLs, made at the first one.
    tls: tokio::sync::OnceCell<reqwest::Client>,
    config: RegistryConfig,
    docker: DockerConfig,
    /// What each host asked for in its last 401, so later requests (other
    /// repositories, other blobs) authenticate up front.
    challenges: DashMap<String, Challenge>,
    /// Bearer tokens per (host, scope) with their expiry.
    tokens: DashMap<(String, String), (String, Instant)>,
    /// Storage URL a blob's GET redirected to, per (host, blob).
    redirects: DashMap<(String, Digest), Url>,
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// A failed attempt, and whether another attempt may succeed.
struct Failure {
    err: RegistryError,
    retry: bool,
}

impl Failure {
    fn fatal(err: RegistryError) -> Failure {
        Failure { err, retry: false }
    }
    fn transient(err: RegistryError) -> Failure {
        Failure { err, retry: true }
    }
}

impl From<RegistryError> for Failure {
    fn from(err: RegistryError) -> Failure {
        let retry = err.is_transient();
        Failure { err, retry }
    }
}

/// One GET, as the retry loop repeats it.
struct Get<'a> {
    repo: &'a Repository,
    path: String,
    what: String,
    accept: Option<&'static str>,
    range: Option<Range<u64>>,
    /// Remember (and reuse) where this blob redirects to.
    blob: Option<Digest>,
}

impl RegistryClient {
    /// Builds the client and reads the docker config file once (a small
    /// blocking read: call it at startup, not on a busy async worker).
    pub fn new(config: RegistryConfig) -> Result<RegistryClient, RegistryError> {
        let docker = match config
            .docker_config
            .clone()
            .or_else(DockerConfig::default_path)
        {
            Some(path) => DockerConfig::load(&path)?,
            None => DockerConfig::default(),
        };
        let plain = http_client(&config, false)?;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                plain,
                tls: tokio::sync::OnceCell::new(),
                config,
                docker,
                challenges: DashMap::new(),
                tokens: DashMap::new(),
                redirects: DashMap::new(),
                requests: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
            }),
        })
    }

    pub fn stats(&self) -> ClientStats {
        ClientStats {
            requests: self.inner.requests.load(Ordering::Relaxed),
            bytes: self.inner.bytes.load(Ordering::Relaxed),
        }
    }

    /// Resolves a reference to its linux/amd64 image manifest, through an
    /// index if there is one. Every manifest fetched by digest is verified.
    pub async fn resolve(&self, reference: &Reference) -> Result<ResolvedImage, RegistryError> {
        let repo = &reference.repository;
        let (bytes, ctype) = self
            .get_manifest(
                repo,
                &reference.manifest_ref(),
                reference.digest,
                Intent::OnDemand,
            )
            .await?;
        let bad = |reason: String| RegistryError::BadResponse {
            host: repo.host().to_string(),
            what: format!("manifest of {reference}"),
            reason,
        };
        match manifest::parse(&bytes, ctype.as_deref()).map_err(bad)? {
            Parsed::Image {
                media_type,
                config,
                layers,
            } => Ok(ResolvedImage {
                manifest_digest: Digest::of(&bytes),
                manifest_bytes: bytes.to_vec(),
                manifest_media_type: media_type,
                config,
                layers,
            }),
            Parsed::Index { chosen } => {
                let (bytes, ctype) = self
                    .get_manifest(
                        repo,
                        &chosen.digest.to_string(),
                        Some(chosen.digest),
                        Intent::OnDemand,
                    )
                    .await?;
                match manifest::parse(&bytes, ctype.as_deref()).map_err(bad)? {
                    Parsed::Image {
                        media_type,
                        config,
                        layers,
                    } => Ok(ResolvedImage {
                        manifest_digest: chosen.digest,
                        manifest_bytes: bytes.to_vec(),
                        manifest_media_type: media_type,
                        config,
                        layers,
                    }),
                    Parsed::Index { .. } => Err(bad("index points to another index".to_string())),
                }
            }
        }
    }

    /// A whole blob (a config, say), verified against its digest.
    pub async fn fetch_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Bytes, RegistryError> {
        let get = Get {
            repo,
            path: format!("/v2/{}/blobs/{digest}", repo.name),
            what: format!("blob {digest} of {repo}"),
            accept: None,
            range: None,
            blob: Some(*digest),
        };
        let body = self
            .with_retries(Intent::OnDemand, &get, || async {
                let resp = self.send(&get).await?;
                let (body, _) = self.read_body(resp, usize::MAX, &get).await?;
                let actual = Digest::of(&body);
                if actual != *digest {
                    return Err(Failure::fatal(RegistryError::DigestMismatch {
                        host: repo.host().to_string(),
                        what: get.what.clone(),
                        expected: *digest,
                        actual,
                    }));
                }
                Ok(body)
            })
            .await?;
        Ok(body.freeze())
    }

    /// Bytes `range` of a blob: one ranged GET (retried per `intent`).
    /// Exactly `range.end - range.start` bytes or an error; the caller
    /// verifies content (chunk digests) itself.
    pub async fn read_range(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Range<u64>,
        intent: Intent,
    ) -> Result<Bytes, RegistryError> {
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        let get = Get {
            repo,
            path: format!("/v2/{}/blobs/{digest}", repo.name),
            what: format!(
                "bytes {}-{} of blob {digest} of {repo}",
                range.start,
                range.end - 1
            ),
            accept: None,
            range: Some(range.clone()),
            blob: Some(*digest),
        };
        let want =
            usize::try_from(range.end - range.start).map_err(|_| RegistryError::BadResponse {
                host: repo.host().to_string(),
                what: get.what.clone(),
                reason: "range too large for memory".to_string(),
            })?;
        self.with_retries(intent, &get, || async {
            let resp = self.send(&get).await?;
            let status = resp.status();
            let bad = |reason: String| {
                Failure::transient(RegistryError::BadResponse {
                    host: repo.host().to_string(),
                    what: get.what.clone(),
                    reason,
                })
            };
            if status == StatusCode::PARTIAL_CONTENT {
                if let Some(cr) = resp.headers().get(CONTENT_RANGE) {
                    let cr = cr.to_str().unwrap_or_default();
                    if parse_content_range(cr) != Some((range.start, range.end - 1)) {
                        return Err(bad(format!(
                            "asked for a different range, got Content-Range {cr:?}"
                        )));
                    }
                }
                let (body, more) = self.read_body(resp, want, &get).await?;
                if more || body.len() != want {
                    return Err(bad(format!(
                        "body has {}{} bytes, want {want}",
                        body.len(),
                        if more { "+" } else { "" }
                    )));
                }
                return Ok(body.freeze());
            }
            // 200: the registry ignored Range. Read only as far as needed.
            let end = usize::try_from(range.end)
                .map_err(|_| bad("range past addressable memory".into()))?;
            let start = end - want;
            let (body, _) = self.read_body(resp, end, &get).await?;
            if body.len() < end {
                return Err(bad(format!(
                    "short body: {} bytes, want at least {end}",
                    body.len()
                )));
            }
            tracing::debug!(what = %get.what, "registry ignored Range; sliced a full response");
            Ok(body.freeze().slice(start..end))
        })
        .await
    }

    /// Like [`RegistryClient::read_range`], but hands the body over as it
    /// arrives, so a caller can use the front of a large range before its
    /// end is in. Retries cover the request up to the response headers; a
    /// body that breaks mid-way is an error item of the stream (the caller
    /// asks again for what is missing). A registry that ignores `Range` is
    /// answered with one item from the non-streaming path.
    pub async fn read_range_stream(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: Range<u64>,
        intent: Intent,
    ) -> Result<BoxStream<'static, Result<Bytes, RegistryError>>, RegistryError> {
        if range.start >= range.end {
            return Ok(futures::stream::empty().boxed());
        }
        let get = Get {
            repo,
            path: format!("/v2/{}/blobs/{digest}", repo.name),
            what: format!(
                "bytes {}-{} of blob {digest} of {repo}",
                range.start,
                range.end - 1
            ),
            accept: None,
            range: Some(range.clone()),
            blob: Some(*digest),
        };
        let resp = self
            .with_retries(intent, &get, || async {
                let resp = self.send(&get).await?;
                if resp.status() != StatusCode::PARTIAL_CONTENT {
                    return Ok(None);
                }
                if let Some(cr) = resp.headers().get(CONTENT_RANGE) {
                    let cr = cr.to_str().unwrap_or_default();
                    if parse_content_range(cr) != Some((range.start, range.end - 1)) {
                        return Err(Failure::transient(RegistryError::BadResponse {
                            host: repo.host().to_string(),
                            what: get.what.clone(),
                            reason: format!(
                                "asked for a different range, got Content-Range {cr:?}"
                            ),
                        }));
                    }
                }
                Ok(Some(resp))
            })
            .await?;
        let Some(resp) = resp else {
            let whole = self.read_range(repo, digest, range, intent).await?;
            return Ok(futures::stream::once(futures::future::ready(Ok(whole))).boxed());
        };
        let inner = self.inner.clone();
        let host = repo.host().to_string();
        let what = get.what.clone();
        Ok(resp
            .bytes_stream()
            .map(move |piece| match piece {
                Ok(b) => {
                    inner.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
                    Ok(b)
                }
                Err(e) => Err(classify(&e, &host, &what)),
            })
            .boxed())
    }

    async fn get_manifest(
        &self,
        repo: &Repository,
        reference: &str,
        expected: Option<Digest>,
        intent: Intent,
    ) -> Result<(Bytes, Option<String>), RegistryError> {
        let get = Get {
            repo,
            path: format!("/v2/{}/manifests/{reference}", repo.name),
            what: format!("manifest {repo}:{reference}"),
            accept: Some(manifest::ACCEPT),
            range: None,
            blob: None,
        };
        self.with_retries(intent, &get, || async {
            let resp = self.send(&get).await?;
            let ctype = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let (body, more) = self.read_body(resp, MAX_MANIFEST_BYTES, &get).await?;
            if more {
                return Err(Failure::fatal(RegistryError::BadResponse {
                    host: repo.host().to_string(),
                    what: get.what.clone(),
                    reason: format!("manifest larger than {MAX_MANIFEST_BYTES} bytes"),
                }));
            }
            if let Some(expected) = expected {
                let actual = Digest::of(&body);
                if actual != expected {
                    return Err(Failure::fatal(RegistryError::DigestMismatch {
                        host: repo.host().to_string(),
                        what: get.what.clone(),
                        expected,
                        actual,
                    }));
                }
            }
            Ok((body.freeze(), ctype))
        })
        .await
    }

    /// Runs `attempt` until it succeeds, fails for good, or the intent's
    /// attempts are used up, sleeping with exponential backoff between.
    async fn with_retries<T, F, Fut>(
        &self,
        intent: Intent,
        get: &Get<'_>,
        attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let retries = self.inner.config.retries;
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
                    let delay = backoff(n, cap);
                    tracing::debug!(what = %get.what, attempt = n + 1, ?delay, error = %f.err, "retrying");
                    tokio::time::sleep(delay).await;
                    n += 1;
                }
                Err(f) => return Err(f.err),
            }
        }
    }

    /// Opens up to `n` keep-alive connections to `repo`'s registry ahead of
    /// the GETs that will need them (one `GET /v2/` each, at once), so those
    /// do not pay a connection's round trips. The answers do not matter
    /// (401 is usual); failures are left for the real requests to report.
    pub async fn preconnect(&self, repo: &Repository, n: usize) {
        let Ok(url) = self.url(repo.host(), "/v2/") else {
            return;
        };
        let Ok(http) = self.http(&url).await else {
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

    /// The client for `url`: the plain one for `http://`, else the one that
    /// verifies TLS against the system's roots (loaded off the async workers
    /// the first time).
    async fn http(&self, url: &Url) -> Result<&reqwest::Client, RegistryError> {
        if url.scheme() == "http" {
            return Ok(&self.inner.plain);
        }
        self.inner
            .tls
            .get_or_try_init(|| async {
                let config = self.inner.config.clone();
                tokio::task::spawn_blocking(move || http_client(&config, true))
                    .await
                    .map_err(|e| client_error(&e))?
            })
            .await
    }

    /// `path` on `host`, over plain HTTP where the config says so.
    fn url(&self, host: &str, path: &str) -> Result<Url, String> {
        let scheme = if self.inner.config.is_plain_http(host) {
            "http"
        } else {
            "https"
        };
        Url::parse(&format!("{scheme}://{host}{path}")).map_err(|e| e.to_string())
    }

    /// One GET with auth and redirects; returns a 200 or 206 response.
    async fn send(&self, get: &Get<'_>) -> Result<reqwest::Response, Failure> {
        let host = get.repo.host();
        let registry_url = self.url(host, &get.path).map_err(|e| {
            Failure::fatal(RegistryError::BadResponse {
                host: host.to_string(),
                what: get.what.clone(),
                reason: format!("cannot build url: {e}"),
            })
        })?;
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
            let http = self.http(&url).await.map_err(Failure::fatal)?;
            let mut rb = http.get(url.clone());
            if let Some(a) = get.accept {
                rb = rb.header(ACCEPT, a);
            }
            if let Some(r) = &get.range {
                rb = rb.header(RANGE, format!("bytes={}-{}", r.start, r.end - 1));
            }
            if on_registry && let Some(h) = self.auth_header(get.repo).await? {
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
            self.inner.requests.fetch_add(1, Ordering::Relaxed);
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
                let challenge = resp
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(Challenge::parse);
                let Some(challenge) = challenge else {
                    return Err(Failure::fatal(RegistryError::Auth {
                        host: host.to_string(),
                        reason: format!(
                            "401 for {} without a usable WWW-Authenticate challenge",
                            get.what
                        ),
                    }));
                };
                self.authenticate(get.repo, challenge).await?;
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
    async fn read_body(
        &self,
        mut resp: reqwest::Response,
        limit: usize,
        get: &Get<'_>,
    ) -> Result<(BytesMut, bool), Failure> {
        let mut body = BytesMut::with_capacity(
            limit
                .min(resp.content_length().unwrap_or(0) as usize)
                .min(64 << 20),
        );
        loop {
            let chunk = resp
                .chunk()
                .await
                .map_err(|e| Failure::transient(classify(&e, get.repo.host(), &get.what)))?;
            let Some(chunk) = chunk else {
                return Ok((body, false));
            };
            self.inner
                .bytes
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
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

    /// The Authorization header for requests to `repo`'s host, from what the
    /// host asked for before. `None`: go anonymous.
    async fn auth_header(&self, repo: &Repository) -> Result<Option<String>, Failure> {
        let host = repo.host();
        let Some(challenge) = self.inner.challenges.get(host).map(|c| c.clone()) else {
            return Ok(None);
        };
        match challenge {
            Challenge::Basic => Ok(self.credentials(repo).map(basic)),
            Challenge::Bearer { realm, service, .. } => {
                let scope = pull_scope(repo);
                let key = (host.to_string(), scope.clone());
                if let Some(t) = self.inner.tokens.get(&key)
                    && t.1 > Instant::now()
                {
                    return Ok(Some(format!("Bearer {}", t.0)));
                }
                let token = self
                    .fetch_token(repo, &realm, service.as_deref(), &scope)
                    .await?;
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    /// Learns a host's challenge after a 401 and gets what it asks for.
    async fn authenticate(&self, repo: &Repository, challenge: Challenge) -> Result<(), Failure> {
        let host = repo.host();
        match &challenge {
            Challenge::Basic => {
                if self.credentials(repo).is_none() {
                    return Err(Failure::fatal(RegistryError::Auth {
                        host: host.to_string(),
                        reason: format!(
                            "registry wants basic auth and the docker config has no credentials for {}",
                            repo.registry
                        ),
                    }));
                }
            }
            Challenge::Bearer { realm, service, .. } => {
                // The challenge may carry a narrower scope; tarn only pulls,
                // and one scope per repository keeps the token cache simple.
                self.fetch_token(repo, realm, service.as_deref(), &pull_scope(repo))
                    .await?;
            }
        }
        self.inner.challenges.insert(host.to_string(), challenge);
        Ok(())
    }

    async fn fetch_token(
        &self,
        repo: &Repository,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, Failure> {
        let host = repo.host();
        let auth_err = |reason: String| {
            Failure::fatal(RegistryError::Auth {
                host: host.to_string(),
                reason,
            })
        };
        let mut url =
            Url::parse(realm).map_err(|e| auth_err(format!("bad token realm {realm:?}: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(auth_err(format!("token realm {realm:?} is not http(s)")));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let http = self.http(&url).await.map_err(Failure::fatal)?;
        let mut rb = http.get(url);
        if let Some(c) = self.credentials(repo) {
            rb = rb.header(AUTHORIZATION, basic(c));
        }
        let resp = rb
            .send()
            .await
            .map_err(|e| Failure::transient(classify(&e, host, "token request")))?;
        self.inner.requests.fetch_add(1, Ordering::Relaxed);
        if !resp.status().is_success() {
            return Err(auth_err(format!(
                "token endpoint {realm} answered {}",
                resp.status()
            )));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| Failure::transient(classify(&e, host, "token response")))?;
        let (token, ttl) = serde_json::from_slice::<TokenResponse>(&body)
            .ok()
            .and_then(TokenResponse::into_token)
            .ok_or_else(|| auth_err(format!("token endpoint {realm} sent no token")))?;
        // Renew a little early so a token does not expire in flight.
        let expiry = Instant::now()
            + ttl
                .saturating_sub(Duration::from_secs(5))
                .max(Duration::from_secs(1));
        self.inner.tokens.insert(
            (host.to_string(), scope.to_string()),
            (token.clone(), expiry),
        );
        Ok(token)
    }

    fn credentials(&self, repo: &Repository) -> Option<&Credentials> {
        self.inner.docker.credentials_for(&repo.registry)
    }
}

fn basic(c: &Credentials) -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", c.username, c.password))
    )
}

fn pull_scope(repo: &Repository) -> String {
    format!("repository:{}:pull", repo.name)
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

/// `bytes a-b/total` -> (a, b).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes ")?;
    let (range, _total) = spec.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// Maps an error status to a failure; 408, 429 and 5xx may pass.
fn status_failure(status: StatusCode, host: &str, what: &str) -> Failure {
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

fn classify(e: &reqwest::Error, host: &str, what: &str) -> RegistryError {
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
    fn content_range_parsing() {
        assert_eq!(parse_content_range("bytes 0-99/1000"), Some((0, 99)));
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5, 5)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
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
