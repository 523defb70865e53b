//! Pushes: a blob from a file (HEAD first, to skip one the registry has;
//! then POST for an upload session and either one streamed PUT or, for a
//! large blob, PATCHes of [`CHUNK`] bytes and a closing PUT) and a
//! manifest PUT. The same auth as reads: the Authorization header the host
//! asked for before, and one 401 answered by its challenge. A bearer
//! token is asked with the pull scope (see `auth/token.rs`); a registry
//! that hands out push rights only to a push-scoped token refuses the
//! push with an auth error.
//!
//! A blob goes out as a stream read from its file in [`PIECE`]s: never
//! whole in memory.

use std::ops::Range;
use std::path::Path;

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode, Url};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::auth::challenge::Challenge;
use super::client::RegistryClient;
use super::error::RegistryError;
use super::http::{Failure, classify, status_failure};
use super::reference::Repository;
use crate::Digest;
use crate::Intent;

/// Blobs above this go up in PATCHes of this size (registries and proxies
/// in between often cap one request's body; a failed chunk costs less).
pub const CHUNK: u64 = 64 << 20;
/// What is read from the file and handed to the connection at a time.
const PIECE: usize = 1 << 20;

/// What a request's body is: nothing, bytes, or a range of a file.
#[derive(Clone)]
enum Body<'a> {
    Empty,
    Bytes(Bytes),
    File(&'a Path, Range<u64>),
}

impl Body<'_> {
    fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::File(_, r) => r.end - r.start,
        }
    }

    async fn into_reqwest(self) -> Result<reqwest::Body, RegistryError> {
        Ok(match self {
            Body::Empty => reqwest::Body::from(Vec::new()),
            Body::Bytes(b) => reqwest::Body::from(b),
            Body::File(path, range) => {
                let mut f = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| file_error(path, &e))?;
                f.seek(std::io::SeekFrom::Start(range.start))
                    .await
                    .map_err(|e| file_error(path, &e))?;
                let left = range.end - range.start;
                let stream = futures::stream::try_unfold((f, left), |(mut f, left)| async move {
                    if left == 0 {
                        return Ok(None);
                    }
                    let n = usize::try_from(left).unwrap_or(PIECE).min(PIECE);
                    let mut buf = vec![0u8; n];
                    f.read_exact(&mut buf).await?;
                    Ok::<_, std::io::Error>(Some((Bytes::from(buf), (f, left - n as u64))))
                });
                reqwest::Body::wrap_stream(stream)
            }
        })
    }
}

fn file_error(path: &Path, e: &std::io::Error) -> RegistryError {
    RegistryError::BadResponse {
        host: "local".to_string(),
        what: format!("blob file {}", path.display()),
        reason: e.to_string(),
    }
}

/// The ranges of a blob of `size` bytes sent one request each.
pub fn chunks(size: u64, chunk: u64) -> Vec<Range<u64>> {
    let chunk = chunk.max(1);
    (0..size.div_ceil(chunk))
        .map(|i| i * chunk..((i + 1) * chunk).min(size))
        .collect()
}

/// The `Content-Range` of a PATCH carrying `range` (inclusive end, no
/// unit, as the distribution spec writes it).
pub fn content_range(range: &Range<u64>) -> String {
    format!("{}-{}", range.start, range.end.saturating_sub(1))
}

/// The URL an upload continues at: the `Location` the registry answered
/// (often relative), joined to the request's URL; with `digest` as a query
/// parameter for the closing PUT.
pub fn upload_url(base: &Url, location: &str, digest: Option<&Digest>) -> Option<Url> {
    let mut url = base.join(location).ok()?;
    if let Some(d) = digest {
        url.query_pairs_mut().append_pair("digest", &d.to_string());
    }
    Some(url)
}

impl RegistryClient {
    /// Whether `repo` already holds blob `digest`.
    pub async fn blob_exists(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<bool, RegistryError> {
        let url = self.push_url(repo, &format!("/v2/{}/blobs/{digest}", repo.name))?;
        let what = format!("HEAD of blob {digest} of {repo}");
        self.inner
            .http
            .with_retries(Intent::Background, &what, || async {
                match self
                    .request(repo, Method::HEAD, url.clone(), &what, None, Body::Empty)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(f) if matches!(f.err, RegistryError::NotFound { .. }) => Ok(false),
                    Err(f) => Err(f),
                }
            })
            .await
    }

    /// Pushes the blob in `path` (`size` bytes, digest `digest`) to `repo`
    /// unless it is there already. Returns whether it was sent.
    pub async fn push_blob_file(
        &self,
        repo: &Repository,
        digest: &Digest,
        path: &Path,
        size: u64,
    ) -> Result<bool, RegistryError> {
        if self.blob_exists(repo, digest).await? {
            return Ok(false);
        }
        self.upload(repo, digest, Body::File(path, 0..size)).await?;
        Ok(true)
    }

    /// Pushes a small blob held in memory (a config).
    pub async fn push_blob_bytes(
        &self,
        repo: &Repository,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        if !self.blob_exists(repo, &digest).await? {
            self.upload(repo, &digest, Body::Bytes(bytes)).await?;
        }
        Ok(digest)
    }

    /// Stores a manifest under `reference` (a tag or its digest); returns
    /// its digest.
    pub async fn push_manifest(
        &self,
        repo: &Repository,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError> {
        let digest = Digest::of(&bytes);
        let url = self.push_url(repo, &format!("/v2/{}/manifests/{reference}", repo.name))?;
        let what = format!("manifest {repo}:{reference}");
        self.inner
            .http
            .with_retries(Intent::Background, &what, || async {
                self.request(
                    repo,
                    Method::PUT,
                    url.clone(),
                    &what,
                    Some(media_type),
                    Body::Bytes(bytes.clone()),
                )
                .await
                .map(drop)
            })
            .await?;
        Ok(digest)
    }

    /// One upload session, started over on a transient failure.
    async fn upload(
        &self,
        repo: &Repository,
        digest: &Digest,
        body: Body<'_>,
    ) -> Result<(), RegistryError> {
        let what = format!("upload of blob {digest} to {repo}");
        let start = self.push_url(repo, &format!("/v2/{}/blobs/uploads/", repo.name))?;
        self.inner
            .http
            .with_retries(Intent::Background, &what, || async {
                let resp = self
                    .request(repo, Method::POST, start.clone(), &what, None, Body::Empty)
                    .await?;
                let mut at = self.location(&start, &resp, &what, None)?;
                let size = body.len();
                let last = match &body {
                    Body::File(path, range) if size > CHUNK => {
                        for part in chunks(size, CHUNK) {
                            let file_range = range.start + part.start..range.start + part.end;
                            let resp = self
                                .patch(repo, at.clone(), &what, Body::File(path, file_range), &part)
                                .await?;
                            at = self.location(&at, &resp, &what, None)?;
                        }
                        Body::Empty
                    }
                    other => other.clone(),
                };
                let mut put = at.clone();
                put.query_pairs_mut()
                    .append_pair("digest", &digest.to_string());
                self.request(repo, Method::PUT, put, &what, None, last)
                    .await
                    .map(drop)
            })
            .await
    }

    async fn patch(
        &self,
        repo: &Repository,
        url: Url,
        what: &str,
        body: Body<'_>,
        part: &Range<u64>,
    ) -> Result<reqwest::Response, Failure> {
        self.send_with_auth(repo, what, || {
            let body = body.clone();
            let url = url.clone();
            async move {
                let http = self.inner.http.client(&url).await?;
                Ok(http
                    .patch(url)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header("Content-Range", content_range(part))
                    .header(CONTENT_LENGTH, body.len())
                    .body(body.into_reqwest().await?))
            }
        })
        .await
    }

    /// The next URL of an upload from a response's `Location`.
    fn location(
        &self,
        base: &Url,
        resp: &reqwest::Response,
        what: &str,
        digest: Option<&Digest>,
    ) -> Result<Url, Failure> {
        resp.headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| upload_url(base, l, digest))
            .ok_or_else(|| {
                Failure::fatal(RegistryError::BadResponse {
                    host: base.host_str().unwrap_or("?").to_string(),
                    what: what.to_string(),
                    reason: format!("{} without a usable Location", resp.status()),
                })
            })
    }

    fn push_url(&self, repo: &Repository, path: &str) -> Result<Url, RegistryError> {
        self.inner
            .http
            .url(repo.host(), path)
            .map_err(|reason| RegistryError::BadResponse {
                host: repo.host().to_string(),
                what: path.to_string(),
                reason: format!("cannot build url: {reason}"),
            })
    }

    /// One request with a body, with auth; a success status or a failure.
    async fn request(
        &self,
        repo: &Repository,
        method: Method,
        url: Url,
        what: &str,
        content_type: Option<&str>,
        body: Body<'_>,
    ) -> Result<reqwest::Response, Failure> {
        self.send_with_auth(repo, what, || {
            let body = body.clone();
            let url = url.clone();
            let method = method.clone();
            async move {
                let http = self.inner.http.client(&url).await?;
                let mut rb = http.request(method.clone(), url);
                if let Some(t) = content_type {
                    rb = rb.header(CONTENT_TYPE, t);
                }
                if method != Method::HEAD && method != Method::GET {
                    rb = rb
                        .header(CONTENT_LENGTH, body.len())
                        .body(body.into_reqwest().await?);
                }
                Ok(rb)
            }
        })
        .await
    }

    /// Sends what `build` makes with the host's Authorization header; on a
    /// 401, answers the challenge once and sends it again.
    async fn send_with_auth<F, Fut>(
        &self,
        repo: &Repository,
        what: &str,
        build: F,
    ) -> Result<reqwest::Response, Failure>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<reqwest::RequestBuilder, RegistryError>>,
    {
        let host = repo.host();
        let mut reauthed = false;
        loop {
            let mut rb = build().await.map_err(Failure::fatal)?;
            let sent = self.inner.auth.header(&self.inner.http, repo).await?;
            if let Some(h) = &sent {
                rb = rb.header(AUTHORIZATION, h);
            }
            let resp = rb
                .send()
                .await
                .map_err(|e| Failure::transient(classify(&e, host, what)))?;
            self.inner.http.sent();
            let status = resp.status();
            if status.is_success() {
                return Ok(resp);
            }
            if status == StatusCode::UNAUTHORIZED && !reauthed {
                let challenge = Challenge::of(resp.headers());
                if let Some(challenge) = challenge {
                    self.inner
                        .auth
                        .authenticate(&self.inner.http, repo, challenge, sent.as_deref())
                        .await?;
                    reauthed = true;
                    continue;
                }
            }
            let detail = resp.text().await.unwrap_or_default();
            let mut failure = status_failure(status, host, what);
            if let RegistryError::BadResponse { reason, .. } = &mut failure.err {
                let detail: String = detail.chars().take(200).collect();
                reason.push_str(&format!(": {}", detail.trim()));
            }
            return Err(failure);
        }
    }
}

#[cfg(test)]
mod tests;
