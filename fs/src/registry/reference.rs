//! Image references: `[registry[:port]/]repo[:tag][@sha256:...]`.

use std::fmt;
use std::str::FromStr;

use super::error::RegistryError;
use crate::Digest;

/// Docker Hub as users write it, and the host its API really lives on.
pub const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A repository on a registry: where blobs and manifests live.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository {
    /// As written (`docker.io`, `127.0.0.1:5000`), not the API host.
    pub registry: String,
    /// Path below the registry, e.g. `library/busybox`.
    pub name: String,
}

impl Repository {
    /// The `host[:port]` to connect to (Docker Hub's API host for docker.io).
    pub fn host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// A parsed image reference. Without tag and digest, the tag is `latest`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    pub repository: Repository,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Reference {
    /// What to ask the manifests endpoint for: the digest if there is one
    /// (it pins the content), else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Reference, RegistryError> {
        let bad = |reason: &str| RegistryError::InvalidReference {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() || s.len() > 4096 {
            return Err(bad("empty or too long"));
        }
        let (rest, digest) = match s.rsplit_once('@') {
            Some((rest, d)) => (
                rest,
                Some(
                    d.parse::<Digest>()
                        .map_err(|_| bad("digest is not sha256:<64 lowercase hex digits>"))?,
                ),
            ),
            None => (s, None),
        };
        // A ':' after the last '/' starts the tag; one before it is a port.
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(t) = tag {
            let valid = !t.is_empty()
                && t.len() <= 128
                && !t.starts_with(['.', '-'])
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if !valid {
                return Err(bad("invalid tag"));
            }
        }
        // The first component is a registry if it looks like a host.
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), path.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        if !valid_host(&registry) {
            return Err(bad("invalid registry host"));
        }
        if path.is_empty() || !path.split('/').all(valid_path_component) {
            return Err(bad(
                "invalid repository name: want lowercase components of [a-z0-9] joined by '.', '_', '__' or '-'",
            ));
        }
        let name = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".to_string()),
        };
        Ok(Reference {
            repository: Repository { registry, name },
            tag,
            digest,
        })
    }
}

fn valid_host(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        // Bracketed IPv6 literals keep their colons inside the brackets.
        Some((n, p)) if !p.contains(']') => (n, Some(p)),
        _ => (host, None),
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    let name_ok = if let Some(inner) = name.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !name.is_empty()
            && name
                .split('.')
                .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    };
    port_ok && name_ok
}

/// `[a-z0-9]+` groups joined by one of `.`, `_`, `__`, `-`+ (the OCI
/// distribution grammar).
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Reference {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        let r = parse("busybox");
        assert_eq!(r.repository.registry, "docker.io");
        assert_eq!(r.repository.name, "library/busybox");
        assert_eq!(r.repository.host(), "registry-1.docker.io");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        assert_eq!(parse("user/app:1.0").repository.name, "user/app");
        assert_eq!(
            parse("index.docker.io/library/alpine:3").to_string(),
            "docker.io/library/alpine:3"
        );
    }

    #[test]
    fn registry_port_tag_and_digest() {
        let d = Digest::of(b"x");
        let r = parse(&format!("127.0.0.1:5000/a/b-c/d_e:v1.2-rc@{d}"));
        assert_eq!(r.repository.registry, "127.0.0.1:5000");
        assert_eq!(r.repository.host(), "127.0.0.1:5000");
        assert_eq!(r.repository.name, "a/b-c/d_e");
        assert_eq!(r.tag.as_deref(), Some("v1.2-rc"));
        assert_eq!(r.digest, Some(d));
        assert_eq!(r.manifest_ref(), d.to_string());
        assert_eq!(
            r.to_string(),
            format!("127.0.0.1:5000/a/b-c/d_e:v1.2-rc@{d}")
        );

        // A port without a tag is not mistaken for a tag.
        let r = parse("localhost:5000/app");
        assert_eq!(
            (r.repository.registry.as_str(), r.tag.as_deref()),
            ("localhost:5000", Some("latest"))
        );
        let r = parse("localhost/app");
        assert_eq!(r.repository.registry, "localhost");
        // Digest only: no implicit tag.
        let r = parse(&format!("ghcr.io/o/app@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.to_string(), format!("ghcr.io/o/app@{d}"));
        assert_eq!(parse("[::1]:5000/app:t").repository.registry, "[::1]:5000");
    }

    #[test]
    fn malformed_references_are_refused_with_the_reference_named() {
        for bad in [
            "",
            "Upper/case",
            "app:",
            "app:-tag",
            "app@sha256:abc",
            "app@md5:0123",
            "host:99999/app",
            "reg.io/",
            "reg.io//app",
            "a/-b",
            "a/b.",
            "a/b..c",
            "a/b___c",
            "a b",
            "app:tag:more",
        ] {
            let err = bad.parse::<Reference>().expect_err(bad);
            let msg = err.to_string();
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
        }
    }
}
