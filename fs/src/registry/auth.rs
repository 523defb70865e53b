//! Registry auth: `WWW-Authenticate` challenges, docker config credentials,
//! bearer token responses. Pure parsing; the client does the requests.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use super::RegistryError;
use super::reference::DOCKER_HUB;

/// A username and password (or identity token) for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    // Never print the secret into logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

/// The scheme a registry asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    /// Get a token from `realm` for `service` and the request's scope.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses a `WWW-Authenticate` value. `None` for schemes tarn does not
    /// speak or a bearer challenge without a realm.
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let mut params = parse_params(rest);
        Some(Challenge::Bearer {
            realm: params.remove("realm")?,
            service: params.remove("service"),
            scope: params.remove("scope"),
        })
    }
}

/// `key=value` or `key="quoted, \"escaped\""` pairs separated by commas.
fn parse_params(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_ascii_lowercase();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| *c != ',') {
                value.push(c);
            }
            value = value.trim().to_string();
        }
        out.insert(key, value);
    }
}

/// The answer of a token endpoint.
#[derive(Debug, Deserialize)]
pub struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token and how long it may be used. The distribution spec says a
    /// missing lifetime means 60 seconds.
    pub fn into_token(self) -> Option<(String, Duration)> {
        let token = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        Some((
            token,
            Duration::from_secs(self.expires_in.unwrap_or(60).max(1)),
        ))
    }
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Credentials from a docker config file (`auths` only; credential helpers
/// are not run).
#[derive(Debug, Default, Clone)]
pub struct DockerConfig {
    /// Registry host (as in references) -> credentials.
    creds: BTreeMap<String, Credentials>,
}

impl DockerConfig {
    /// The default location: `$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
            return Some(PathBuf::from(dir).join("config.json"));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker").join("config.json"))
    }

    /// Loads `path`; a missing file means no credentials.
    pub fn load(path: &Path) -> Result<DockerConfig, RegistryError> {
        match std::fs::read(path) {
            Ok(bytes) => DockerConfig::parse(&bytes).map_err(|reason| RegistryError::Config {
                path: path.to_path_buf(),
                reason,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DockerConfig::default()),
            Err(e) => Err(RegistryError::Config {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        }
    }

    pub fn parse(json: &[u8]) -> Result<DockerConfig, String> {
        let file: ConfigFile = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        let mut creds = BTreeMap::new();
        for (key, entry) in file.auths {
            let c = if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let raw = STANDARD
                    .decode(auth.trim())
                    .map_err(|e| format!("auths.{key}.auth is not base64: {e}"))?;
                let raw =
                    String::from_utf8(raw).map_err(|_| format!("auths.{key}.auth is not utf-8"))?;
                let (u, p) = raw
                    .split_once(':')
                    .ok_or_else(|| format!("auths.{key}.auth is not user:password"))?;
                Credentials {
                    username: u.to_string(),
                    password: p.to_string(),
                }
            } else if let (Some(u), Some(p)) = (entry.username, entry.password) {
                Credentials {
                    username: u,
                    password: p,
                }
            } else {
                continue;
            };
            creds.insert(normalize_key(&key), c);
        }
        Ok(DockerConfig { creds })
    }

    /// Credentials for a registry as written in references
    /// (`docker.io`, `host:port`).
    pub fn credentials_for(&self, registry: &str) -> Option<&Credentials> {
        self.creds.get(registry)
    }
}

/// Config keys come as `host`, `https://host`, or `https://host/v1/`;
/// Docker Hub's is `https://index.docker.io/v1/`.
fn normalize_key(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        h => h.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_and_basic_challenges() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull".into()),
            })
        );
        // Unquoted values, odd spacing, escapes, commas inside quotes.
        let c = Challenge::parse(
            r#"bearer  realm=http://127.0.0.1:9/t , scope="a:b:pull,push", error="x\"y""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "http://127.0.0.1:9/t".into(),
                service: None,
                scope: Some("a:b:pull,push".into()),
            })
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="basic-realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Bearer service=x"), None, "no realm");
        assert_eq!(Challenge::parse("Negotiate abc"), None);
    }

    #[test]
    fn docker_config_auth_forms_and_keys() {
        let json = br#"{
            "auths": {
                "https://index.docker.io/v1/": {"auth": "dXNlcjpwYTpzcw=="},
                "127.0.0.1:5000": {"username": "u2", "password": "p2"},
                "http://reg.lan/v2/": {"auth": "YTpi"},
                "empty.io": {}
            },
            "credsStore": "desktop"
        }"#;
        let c = DockerConfig::parse(json).unwrap();
        let hub = c.credentials_for("docker.io").unwrap();
        assert_eq!(
            (hub.username.as_str(), hub.password.as_str()),
            ("user", "pa:ss")
        );
        assert_eq!(c.credentials_for("127.0.0.1:5000").unwrap().password, "p2");
        assert_eq!(c.credentials_for("reg.lan").unwrap().username, "a");
        assert!(c.credentials_for("empty.io").is_none());
        assert!(c.credentials_for("127.0.0.1:5001").is_none());
        assert!(!format!("{hub:?}").contains("pa:ss"));

        let err = DockerConfig::parse(br#"{"auths":{"x":{"auth":"!!"}}}"#).unwrap_err();
        assert!(err.contains("auths.x.auth"), "{err}");
        assert!(DockerConfig::parse(b"not json").is_err());
    }

    #[test]
    fn missing_config_file_means_no_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let c = DockerConfig::load(&dir.path().join("nope.json")).unwrap();
        assert!(c.credentials_for("docker.io").is_none());
        std::fs::write(dir.path().join("bad.json"), "{").unwrap();
        let err = DockerConfig::load(&dir.path().join("bad.json")).unwrap_err();
        assert!(err.to_string().contains("bad.json"), "{err}");
    }

    #[test]
    fn token_responses() {
        let t: TokenResponse = serde_json::from_str(r#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!(
            t.into_token(),
            Some(("abc".into(), Duration::from_secs(300)))
        );
        let t: TokenResponse = serde_json::from_str(r#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!(
            t.into_token(),
            Some(("xyz".into(), Duration::from_secs(60)))
        );
        let t: TokenResponse = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(t.into_token(), None);
    }
}
