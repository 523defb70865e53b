//! Artifacts that refer to an image manifest (OCI distribution 1.1): a
//! small blob pushed as a manifest whose `subject` is the image, found
//! through the referrers API where the registry has it, and through the
//! tag schema (`<alg>-<hex>`, an index of the referrers) where it does
//! not. tarn's start profiles travel this way.
//!
//! Every manifest and blob read here is checked against its digest; what
//! it says is still only a hint to the caller.

use bytes::Bytes;
use serde_json::{Value, json};

use super::client::RegistryClient;
use super::error::RegistryError;
use super::manifest::Descriptor;
use super::reference::Repository;
use crate::Digest;
use crate::Intent;

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The config of an artifact that has none.
const EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// Referrers kept in a fallback tag's index: the newest, per artifact type.
const MAX_FALLBACK: usize = 64;

/// The tag the referrers of `subject` are listed under where the registry
/// has no referrers API.
pub fn fallback_tag(subject: &Digest) -> String {
    subject.to_string().replace(':', "-")
}

impl RegistryClient {
    /// The newest artifact of `artifact_type` referring to `subject`: the
    /// bytes of its first layer, at most `max` of them, verified. `None`
    /// when there is none.
    pub async fn find_referrer(
        &self,
        repo: &Repository,
        subject: &Digest,
        artifact_type: &str,
        max: u64,
    ) -> Result<Option<Bytes>, RegistryError> {
        let Some(index) = self.referrers(repo, subject).await? else {
            return Ok(None);
        };
        let bad = |reason: String| RegistryError::BadResponse {
            host: repo.host().to_string(),
            what: format!("referrers of {subject}"),
            reason,
        };
        let index: Value = serde_json::from_slice(&index).map_err(|e| bad(e.to_string()))?;
        let Some(found) = index["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["artifactType"] == artifact_type)
            .filter_map(|m| m["digest"].as_str()?.parse::<Digest>().ok())
            .next_back()
        else {
            return Ok(None);
        };
        let (bytes, _) = self
            .get_manifest(repo, &found.to_string(), Some(found), Intent::Prefetch)
            .await?;
        let manifest: Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        let layer = &manifest["layers"][0];
        let digest = layer["digest"]
            .as_str()
            .and_then(|d| d.parse::<Digest>().ok())
            .ok_or_else(|| bad(format!("artifact {found} has no layer")))?;
        let size = layer["size"].as_u64().unwrap_or(u64::MAX);
        if size == 0 || size > max {
            return Err(bad(format!(
                "artifact {found}: {size} bytes, at most {max}"
            )));
        }
        // Exactly the size the manifest gives, then checked: a registry
        // that sends more or other bytes is refused, never buffered.
        let blob = self
            .read_range(repo, &digest, 0..size, Intent::Prefetch)
            .await?;
        let actual = Digest::of(&blob);
        if actual != digest {
            return Err(RegistryError::DigestMismatch {
                host: repo.host().to_string(),
                what: format!("artifact {found}'s blob {digest}"),
                expected: digest,
                actual,
            });
        }
        Ok(Some(blob))
    }

    /// Pushes `blob` as an artifact of `artifact_type` referring to
    /// `subject`, and lists it under the fallback tag unless the registry
    /// answers the referrers API. Returns the artifact manifest's digest.
    pub async fn push_referrer(
        &self,
        repo: &Repository,
        subject: &Descriptor,
        artifact_type: &str,
        blob: Bytes,
    ) -> Result<Digest, RegistryError> {
        let size = blob.len();
        let config = self
            .push_blob_bytes(repo, Bytes::from_static(b"{}"))
            .await?;
        let layer = self.push_blob_bytes(repo, blob).await?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": EMPTY, "digest": config.to_string(), "size": 2},
            "layers": [{"mediaType": artifact_type, "digest": layer.to_string(), "size": size}],
            "subject": {
                "mediaType": subject.media_type,
                "digest": subject.digest.to_string(),
                "size": subject.size,
            },
        });
        let bytes = Bytes::from(serde_json::to_vec(&manifest).expect("json serializes"));
        let digest = Digest::of(&bytes);
        self.push_manifest(repo, &digest.to_string(), MANIFEST, bytes.clone())
            .await?;
        if self.has_referrers_api(repo, &subject.digest).await? {
            return Ok(digest);
        }
        let tag = fallback_tag(&subject.digest);
        let mut listed: Vec<Value> =
            match self.get_manifest(repo, &tag, None, Intent::OnDemand).await {
                Ok((old, _)) => serde_json::from_slice::<Value>(&old)
                    .ok()
                    .and_then(|v| v["manifests"].as_array().cloned())
                    .unwrap_or_default(),
                Err(RegistryError::NotFound { .. }) => Vec::new(),
                Err(e) => return Err(e),
            };
        listed.retain(|m| m["artifactType"] != artifact_type);
        listed.push(json!({
            "mediaType": MANIFEST,
            "digest": digest.to_string(),
            "size": bytes.len(),
            "artifactType": artifact_type,
        }));
        let skip = listed.len().saturating_sub(MAX_FALLBACK);
        let index = json!({
            "schemaVersion": 2,
            "mediaType": INDEX,
            "manifests": listed.split_off(skip),
        });
        let index = Bytes::from(serde_json::to_vec(&index).expect("json serializes"));
        self.push_manifest(repo, &tag, INDEX, index).await?;
        Ok(digest)
    }

    /// The referrers index of `subject`: from the referrers API, else from
    /// the fallback tag; `None` if neither has one. Both are asked at once:
    /// a registry without the API costs one round trip, not two.
    async fn referrers(
        &self,
        repo: &Repository,
        subject: &Digest,
    ) -> Result<Option<Bytes>, RegistryError> {
        let (tag, digest) = (fallback_tag(subject), subject.to_string());
        let (api, fallback) = tokio::join!(
            self.get_referrers(repo, &digest),
            self.get_manifest(repo, &tag, None, Intent::Prefetch)
        );
        if let Some(b) = api? {
            return Ok(Some(b));
        }
        match fallback {
            Ok((b, _)) => Ok(Some(b)),
            Err(RegistryError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether the registry answers the referrers API for `subject`.
    async fn has_referrers_api(
        &self,
        repo: &Repository,
        subject: &Digest,
    ) -> Result<bool, RegistryError> {
        Ok(self
            .get_referrers(repo, &subject.to_string())
            .await?
            .is_some())
    }

    /// `GET /v2/<name>/referrers/<digest>`: the index, or `None` where the
    /// registry has no such API (404) or nothing to list.
    async fn get_referrers(
        &self,
        repo: &Repository,
        subject: &str,
    ) -> Result<Option<Bytes>, RegistryError> {
        match self
            .get_path(
                repo,
                &format!("/v2/{}/referrers/{subject}", repo.name),
                INDEX,
            )
            .await
        {
            Ok(b) => Ok(Some(b)),
            Err(RegistryError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
