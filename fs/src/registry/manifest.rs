//! OCI and Docker v2 schema 2 manifests and indexes. Pure: JSON in,
//! descriptors out (an index's entry for a platform chosen by
//! [`Platform`]'s rules); `resolve.rs` fetches.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::platform::Platform;
use crate::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The `Accept` header of manifest requests: every type tarn understands.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Manifests larger than this are refused (the distribution spec's own
/// limit is 4 MiB).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// A content descriptor: what a manifest says about a blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
}

/// A reference resolved to one image manifest.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// Digest of `manifest_bytes` (the platform manifest, not the index).
    pub manifest_digest: Digest,
    pub manifest_bytes: Vec<u8>,
    pub manifest_media_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// What a manifest document turned out to be.
#[derive(Debug)]
pub enum Parsed {
    Image {
        media_type: String,
        config: Descriptor,
        layers: Vec<Descriptor>,
    },
    /// An index; `chosen` is its entry for the platform asked for.
    Index { chosen: Descriptor },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<RawPlatform>,
}

#[derive(Deserialize)]
struct RawPlatform {
    architecture: String,
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<RawDescriptor>,
    #[serde(default)]
    layers: Option<Vec<RawDescriptor>>,
    #[serde(default)]
    manifests: Option<Vec<RawDescriptor>>,
}

impl RawDescriptor {
    fn into_descriptor(self) -> Result<Descriptor, String> {
        let digest = self
            .digest
            .parse::<Digest>()
            .map_err(|e| format!("descriptor: {e}"))?;
        Ok(Descriptor {
            media_type: self.media_type,
            digest,
            size: self.size,
            annotations: self.annotations,
        })
    }
}

/// Parses a manifest or index, choosing the node's entry of an index.
/// `content_type` is the response's `Content-Type`, which wins over the
/// document's own `mediaType`.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Parsed, String> {
    parse_for(bytes, content_type, &Platform::node())
}

/// [`parse`], choosing an index's entry for `platform`.
pub fn parse_for(
    bytes: &[u8],
    content_type: Option<&str>,
    platform: &Platform,
) -> Result<Parsed, String> {
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| format!("manifest is not valid JSON: {e}"))?;
    if raw.schema_version.is_some_and(|v| v != 2) {
        return Err(format!(
            "unsupported manifest schemaVersion {}",
            raw.schema_version.unwrap_or_default()
        ));
    }
    // application/json and friends say nothing: fall back to the document.
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim())
        .filter(|c| [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].contains(c));
    let media_type = match (header, raw.media_type.as_deref()) {
        (Some(h), _) => h.to_string(),
        (None, Some(m)) => m.to_string(),
        (None, None) if raw.manifests.is_some() => OCI_INDEX.to_string(),
        (None, None) => OCI_MANIFEST.to_string(),
    };
    match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => {
            let entries = raw.manifests.ok_or("index without manifests")?;
            Ok(Parsed::Index {
                chosen: select(entries, platform)?,
            })
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = raw
                .config
                .ok_or("manifest without config")?
                .into_descriptor()?;
            let layers = raw
                .layers
                .ok_or("manifest without layers")?
                .into_iter()
                .map(RawDescriptor::into_descriptor)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Parsed::Image {
                media_type,
                config,
                layers,
            })
        }
        other => Err(format!("unsupported manifest media type {other:?}")),
    }
}

/// The entry of an index a node of `platform` runs best; among equals,
/// the first (containerd's order). Entries without a platform are skipped.
fn select(entries: Vec<RawDescriptor>, platform: &Platform) -> Result<Descriptor, String> {
    let compatible = platform.compatible();
    let best = entries
        .into_iter()
        .filter_map(|e| {
            let p = e.platform.as_ref()?;
            let p = Platform::new(&p.os, &p.architecture, p.variant.as_deref().unwrap_or(""));
            let rank = compatible.iter().position(|c| *c == p)?;
            Some((rank, e))
        })
        .min_by_key(|(rank, _)| *rank);
    match best {
        Some((_, e)) => e.into_descriptor(),
        None => Err(format!("index has no manifest for {platform}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        Digest::of(&[n]).to_string()
    }

    #[test]
    fn oci_manifest_with_annotations() {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
            "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":7}},
            "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":100,
              "annotations":{{"containerd.io/snapshot/stargz/toc.digest":"{}"}}}}]}}"#,
            d(1),
            d(2),
            d(3)
        );
        let Parsed::Image {
            media_type,
            config,
            layers,
        } = parse(json.as_bytes(), None).unwrap()
        else {
            panic!("not an image");
        };
        assert_eq!(media_type, OCI_MANIFEST);
        assert_eq!(config.size, 7);
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].digest, Digest::of(&[2]));
        assert_eq!(
            layers[0].annotations["containerd.io/snapshot/stargz/toc.digest"],
            d(3)
        );
    }

    #[test]
    fn docker_manifest_typed_by_header_only() {
        let json = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{}","size":1}},"layers":[]}}"#,
            d(1)
        );
        match parse(
            json.as_bytes(),
            Some(&format!("{DOCKER_MANIFEST}; charset=utf-8")),
        )
        .unwrap()
        {
            Parsed::Image { media_type, .. } => assert_eq!(media_type, DOCKER_MANIFEST),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn index_selects_the_platform_asked_for() {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":1,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":2,"platform":{{"architecture":"amd64","os":"windows"}}}},
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":3,"platform":{{"architecture":"amd64","os":"linux","variant":"v3"}}}},
              {{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":4,"platform":{{"architecture":"amd64","os":"linux"}}}},
              {{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":5,"platform":{{"architecture":"unknown","os":"unknown"}}}}
            ]}}"#,
            d(1),
            d(2),
            d(3),
            d(4),
            d(5)
        );
        let chosen = |platform: &Platform| match parse_for(json.as_bytes(), None, platform) {
            Ok(Parsed::Index { chosen }) => chosen.digest,
            p => panic!("{p:?}"),
        };
        assert_eq!(
            chosen(&Platform::new("linux", "amd64", "")),
            Digest::of(&[4])
        );
        assert_eq!(
            chosen(&Platform::new("linux", "amd64", "v2")),
            Digest::of(&[4])
        );
        assert_eq!(
            chosen(&Platform::new("linux", "amd64", "v3")),
            Digest::of(&[3])
        );
        assert_eq!(
            chosen(&Platform::new("linux", "arm64", "v8")),
            Digest::of(&[1])
        );
        let arm_only = format!(
            r#"{{"manifests":[{{"digest":"{}","size":1,"platform":{{"architecture":"arm64","os":"linux"}}}}]}}"#,
            d(1)
        );
        let amd64 = Platform::new("linux", "amd64", "");
        let err = parse_for(arm_only.as_bytes(), Some(OCI_INDEX), &amd64).unwrap_err();
        assert!(err.contains("linux/amd64"), "{err}");
    }

    #[test]
    fn an_arm64_node_resolves_arm64_whatever_its_variant_spelling() {
        let arm64 = Platform::new("linux", "arm64", "v8");
        for variant in [r#","variant":"v8""#, "", r#","variant":"8""#] {
            let json = format!(
                r#"{{"manifests":[
                  {{"digest":"{}","size":1,"platform":{{"architecture":"arm","os":"linux","variant":"v7"}}}},
                  {{"digest":"{}","size":2,"platform":{{"architecture":"amd64","os":"linux"}}}},
                  {{"digest":"{}","size":3,"platform":{{"architecture":"arm64","os":"linux"{variant}}}}}
                ]}}"#,
                d(1),
                d(2),
                d(3)
            );
            match parse_for(json.as_bytes(), None, &arm64).unwrap() {
                Parsed::Index { chosen } => {
                    assert_eq!(chosen.digest, Digest::of(&[3]), "{variant}")
                }
                p => panic!("{p:?}"),
            }
        }
        // No arm64 entry: 32-bit arm runs too, as containerd would choose.
        let json = format!(
            r#"{{"manifests":[{{"digest":"{}","size":1,"platform":{{"architecture":"arm","os":"linux","variant":"v7"}}}}]}}"#,
            d(1)
        );
        match parse_for(json.as_bytes(), None, &arm64).unwrap() {
            Parsed::Index { chosen } => assert_eq!(chosen.digest, Digest::of(&[1])),
            p => panic!("{p:?}"),
        }
    }

    #[test]
    fn malformed_manifests_are_refused() {
        assert!(parse(b"{", None).is_err());
        assert!(parse(br#"{"schemaVersion":1}"#, None).is_err());
        let bad_digest = r#"{"config":{"digest":"sha256:zz","size":1},"layers":[]}"#;
        assert!(parse(bad_digest.as_bytes(), Some(OCI_MANIFEST)).is_err());
        let no_layers = format!(r#"{{"config":{{"digest":"{}","size":1}}}}"#, d(1));
        assert!(parse(no_layers.as_bytes(), Some(OCI_MANIFEST)).is_err());
        let odd = format!(
            r#"{{"mediaType":"text/plain","config":{{"digest":"{}","size":1}},"layers":[]}}"#,
            d(1)
        );
        assert!(
            parse(odd.as_bytes(), None)
                .unwrap_err()
                .contains("text/plain")
        );
    }
}
