//! TEMPORARY stand-in for `tarn_fs::registry` (branch `regcache`), with the
//! same shape: `Reference`, `RegistryConfig`, `RegistryClient::resolve`,
//! `fetch_blob`. Anonymous access only. Removed when regcache lands in main.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use tarn_fs::Digest;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid image reference {0:?}")]
    BadReference(String),
    #[error("request to {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url}: registry answered {status}")]
    Status { url: String, status: u16 },
    #[error("bad manifest: {0}")]
    Manifest(String),
    #[error("blob {0} does not match its digest")]
    DigestMismatch(Digest),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repository {
    pub registry: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    pub repository: Repository,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl FromStr for Reference {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, RegistryError> {
        let bad = || RegistryError::BadReference(s.to_string());
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let (registry, path) = rest.split_once('/').ok_or_else(bad)?;
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_string())),
            _ => (path, None),
        };
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c);
        if registry.is_empty() || repository.is_empty() || !repository.chars().all(ok) {
            return Err(bad());
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".into())
        } else {
            tag
        };
        Ok(Reference {
            repository: Repository {
                registry: registry.into(),
                name: repository.into(),
            },
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.repository.registry, self.repository.name)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
}

pub struct ResolvedImage {
    pub manifest_digest: Digest,
    pub manifest_bytes: Vec<u8>,
    pub manifest_media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Clone, Debug, Default)]
pub struct RegistryConfig {
    pub plain_http: Vec<String>,
}

pub struct RegistryClient {
    http: reqwest::Client,
    config: RegistryConfig,
}

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

#[derive(serde::Deserialize)]
struct RawDesc {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<RawPlatform>,
}

#[derive(serde::Deserialize)]
struct RawPlatform {
    architecture: String,
    os: String,
}

#[derive(serde::Deserialize)]
struct RawManifest {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Vec<RawDesc>,
    config: Option<RawDesc>,
    #[serde(default)]
    layers: Vec<RawDesc>,
}

impl RawDesc {
    fn into_desc(self) -> Result<Descriptor, RegistryError> {
        let digest = self
            .digest
            .parse()
            .map_err(|_| RegistryError::Manifest(format!("bad digest {}", self.digest)))?;
        Ok(Descriptor {
            media_type: self.media_type,
            digest,
            size: self.size,
            annotations: self.annotations,
        })
    }
}

impl RegistryClient {
    pub fn new(config: RegistryConfig) -> RegistryClient {
        RegistryClient {
            http: reqwest::Client::new(),
            config,
        }
    }

    fn base(&self, host: &str) -> String {
        let plain = self.config.plain_http.iter().any(|h| h == host)
            || host.starts_with("127.")
            || host.starts_with("localhost");
        format!("{}://{host}/v2", if plain { "http" } else { "https" })
    }

    async fn get(&self, url: &str, accept: Option<&str>) -> Result<(Bytes, String), RegistryError> {
        let mut req = self.http.get(url);
        if let Some(a) = accept {
            req = req.header("Accept", a);
        }
        let http = |source| RegistryError::Http {
            url: url.to_string(),
            source,
        };
        let resp = req.send().await.map_err(http)?;
        if !resp.status().is_success() {
            return Err(RegistryError::Status {
                url: url.into(),
                status: resp.status().as_u16(),
            });
        }
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        Ok((resp.bytes().await.map_err(http)?, ct))
    }

    pub async fn resolve(&self, r: &Reference) -> Result<ResolvedImage, RegistryError> {
        let base = format!(
            "{}/{}",
            self.base(&r.repository.registry),
            r.repository.name
        );
        let mut wanted = match (&r.digest, &r.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        };
        for _ in 0..2 {
            let (bytes, ct) = self
                .get(&format!("{base}/manifests/{wanted}"), Some(ACCEPT))
                .await?;
            let m: RawManifest = serde_json::from_slice(&bytes)
                .map_err(|e| RegistryError::Manifest(e.to_string()))?;
            let media_type = if m.media_type.is_empty() {
                ct
            } else {
                m.media_type.clone()
            };
            if !m.manifests.is_empty() {
                let pick = m
                    .manifests
                    .into_iter()
                    .find(|d| {
                        d.platform
                            .as_ref()
                            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                    })
                    .ok_or_else(|| {
                        RegistryError::Manifest("no linux/amd64 manifest in index".into())
                    })?;
                wanted = pick.digest;
                continue;
            }
            let config = m
                .config
                .ok_or_else(|| RegistryError::Manifest("no config".into()))?
                .into_desc()?;
            let layers = m
                .layers
                .into_iter()
                .map(RawDesc::into_desc)
                .collect::<Result<_, _>>()?;
            return Ok(ResolvedImage {
                manifest_digest: Digest::of(&bytes),
                manifest_bytes: bytes.to_vec(),
                manifest_media_type: media_type,
                config,
                layers,
            });
        }
        Err(RegistryError::Manifest("nested index".into()))
    }

    pub async fn fetch_blob(
        &self,
        r: &Repository,
        digest: &Digest,
    ) -> Result<Bytes, RegistryError> {
        let url = format!("{}/{}/blobs/{digest}", self.base(&r.registry), r.name);
        let (bytes, _) = self.get(&url, None).await?;
        if Digest::of(&bytes) != *digest {
            return Err(RegistryError::DigestMismatch(*digest));
        }
        Ok(bytes)
    }
}
