//! Manifests: a reference resolved to the node's image manifest, through
//! an index if there is one. Every manifest fetched by digest is verified.

use bytes::Bytes;
use reqwest::header::CONTENT_TYPE;

use super::client::{Get, RegistryClient};
use super::error::RegistryError;
use super::http::Failure;
use super::manifest::{self, MAX_MANIFEST_BYTES, Parsed, ResolvedImage};
use super::reference::{Reference, Repository};
use crate::Digest;
use crate::Intent;

impl RegistryClient {
    /// Resolves a reference to the node's image manifest, through an
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

    /// Manifest `reference` of `repo`, checked against `expected` when
    /// given; with its content type.
    pub(super) async fn get_manifest(
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
            endpoint: None,
        };
        self.get_document(&get, expected, intent).await
    }

    /// A small JSON document at `path` (the referrers API's index).
    pub(super) async fn get_path(
        &self,
        repo: &Repository,
        path: &str,
        accept: &'static str,
    ) -> Result<Bytes, RegistryError> {
        let get = Get {
            repo,
            path: path.to_owned(),
            what: format!("{path} of {}", repo.host()),
            accept: Some(accept),
            range: None,
            blob: None,
            endpoint: None,
        };
        Ok(self.get_document(&get, None, Intent::Prefetch).await?.0)
    }

    /// `get`'s body, at most [`MAX_MANIFEST_BYTES`], checked against
    /// `expected` when given; with its content type.
    async fn get_document(
        &self,
        get: &Get<'_>,
        expected: Option<Digest>,
        intent: Intent,
    ) -> Result<(Bytes, Option<String>), RegistryError> {
        let host = get.repo.host();
        self.inner
            .http
            .with_retries(intent, &get.what, || async {
                let resp = self.send(get).await?;
                let ctype = resp
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let (body, more) = self.read_body(resp, MAX_MANIFEST_BYTES, get).await?;
                if more {
                    return Err(Failure::fatal(RegistryError::BadResponse {
                        host: host.to_string(),
                        what: get.what.clone(),
                        reason: format!("larger than {MAX_MANIFEST_BYTES} bytes"),
                    }));
                }
                if let Some(expected) = expected {
                    let actual = Digest::of(&body);
                    if actual != expected {
                        return Err(Failure::fatal(RegistryError::DigestMismatch {
                            host: host.to_string(),
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
}
