//! Blob reads: a whole blob verified against its digest, and ranged reads,
//! whole or streamed, that the caller verifies.

use std::ops::Range;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use reqwest::StatusCode;
use reqwest::header::CONTENT_RANGE;

use super::client::{Get, RegistryClient};
use super::endpoint::Endpoint;
use super::error::RegistryError;
use super::http::{Failure, classify};
use super::reference::Repository;
use crate::Digest;
use crate::Intent;

impl RegistryClient {
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
            endpoint: None,
        };
        let body = self
            .inner
            .http
            .with_retries(Intent::OnDemand, &get.what, || async {
                let resp = self.send(&get).await?;
                let (body, _) = self.read_body(resp, usize::MAX, &get).await?;
                let actual = Digest::of(&body);
                if actual != *digest {
                    return Err(Failure::fatal(RegistryError::DigestMismatch {
                        host: get.target().host().to_string(),
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
        self.read_range_on(None, repo, digest, range, intent).await
    }

    /// [`RegistryClient::read_range`] from `endpoint` (a host of a
    /// `hosts.toml`) when given, else from `repo`'s registry.
    pub(super) async fn read_range_on(
        &self,
        endpoint: Option<&Endpoint>,
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
            endpoint,
        };
        let want =
            usize::try_from(range.end - range.start).map_err(|_| RegistryError::BadResponse {
                host: get.target().host().to_string(),
                what: get.what.clone(),
                reason: "range too large for memory".to_string(),
            })?;
        let retries = endpoint.and_then(|e| e.retries);
        self.inner
            .http
            .with_retries_up_to(intent, retries, &get.what, || async {
                let resp = self.send(&get).await?;
                let status = resp.status();
                let bad = |reason: String| {
                    Failure::transient(RegistryError::BadResponse {
                        host: get.target().host().to_string(),
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
        self.read_range_stream_on(None, repo, digest, range, intent)
            .await
    }

    /// [`RegistryClient::read_range_stream`] from `endpoint` when given.
    pub(super) async fn read_range_stream_on(
        &self,
        endpoint: Option<&Endpoint>,
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
            endpoint,
        };
        let retries = endpoint.and_then(|e| e.retries);
        let resp = self
            .inner
            .http
            .with_retries_up_to(intent, retries, &get.what, || async {
                let resp = self.send(&get).await?;
                if resp.status() != StatusCode::PARTIAL_CONTENT {
                    return Ok(None);
                }
                if let Some(cr) = resp.headers().get(CONTENT_RANGE) {
                    let cr = cr.to_str().unwrap_or_default();
                    if parse_content_range(cr) != Some((range.start, range.end - 1)) {
                        return Err(Failure::transient(RegistryError::BadResponse {
                            host: get.target().host().to_string(),
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
            let whole = self
                .read_range_on(endpoint, repo, digest, range, intent)
                .await?;
            return Ok(futures::stream::once(futures::future::ready(Ok(whole))).boxed());
        };
        let inner = self.inner.clone();
        let host = get.target().host().to_string();
        let mirror = get.is_mirror();
        let what = get.what.clone();
        Ok(resp
            .bytes_stream()
            .map(move |piece| match piece {
                Ok(b) => {
                    inner.http.received(b.len(), mirror);
                    Ok(b)
                }
                Err(e) => Err(classify(&e, &host, &what)),
            })
            .boxed())
    }
}

/// `bytes a-b/total` -> (a, b).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes ")?;
    let (range, _total) = spec.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
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
}
