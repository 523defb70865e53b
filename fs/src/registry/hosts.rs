//! containerd's registry host configuration (`hosts.toml`), parsed: which
//! hosts serve a registry's content, in which order, and how to reach them.
//!
//! The format and its semantics are containerd's (`docs/hosts.md`), so a
//! node's mirrors (Dragonfly, Spegel, a pull-through cache) are configured
//! once for containerd and tarn alike:
//!
//! - `CONFIG_DIR/<namespace>/hosts.toml`, where the namespace is the
//!   registry as written in the reference (`docker.io`, `reg:5000`); for a
//!   host with a port `reg_5000_` is looked for first, then `reg:5000`;
//!   then `_default/hosts.toml`. The first file found is the only one read.
//! - `[host."URL"]` tables are the mirrors, tried in the order written;
//!   `server` (default: the namespace itself) is tried last.
//! - A URL's path is the API root: `/v2` is appended unless the path ends
//!   in it or `override_path` is set.
//! - `capabilities` default to `pull` and `resolve` for a host, to all for
//!   the server. Paths (`ca`, `client`) are absolute or relative to the
//!   file's directory.
//!
//! Parsing is pure ([`HostsFile::parse`]); [`HostsFile::load`] is the one
//! small blocking read. Everything is bounded: the file's size, the number
//! of hosts and of headers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reqwest::Url;
use serde::Deserialize;

/// The largest `hosts.toml` read; containerd's are a few hundred bytes.
pub const MAX_FILE_BYTES: u64 = 64 * 1024;
/// At most this many `[host."..."]` entries in one file.
pub const MAX_HOSTS: usize = 16;
/// At most this many header values per host.
pub const MAX_HEADERS: usize = 32;

/// The default configuration directory, containerd's.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/containerd/certs.d";

/// What a host may be asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Capabilities {
    /// Blobs and manifests by digest.
    pub pull: bool,
    /// Tags to digests: trusted to name content.
    pub resolve: bool,
    pub push: bool,
}

/// One host of a namespace: a mirror or the server.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostConfig {
    /// The API root: `scheme://authority/path`, `/v2` appended as containerd
    /// does.
    pub root: Url,
    pub capabilities: Capabilities,
    pub skip_verify: bool,
    /// CA certificates (PEM) trusted besides the system's roots.
    pub ca: Vec<PathBuf>,
    /// Client certificates: a PEM with the key, or a certificate and its key.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Extra request headers, in order (a name may repeat).
    pub headers: Vec<(String, String)>,
    pub override_path: bool,
}

impl HostConfig {
    /// `host[:port]` of the root URL.
    pub fn authority(&self) -> String {
        match self.root.port() {
            Some(p) => format!("{}:{p}", self.root.host_str().unwrap_or_default()),
            None => self.root.host_str().unwrap_or_default().to_string(),
        }
    }

    /// Whether talking to this host needs a TLS client of its own.
    pub fn own_tls(&self) -> bool {
        self.skip_verify || !self.ca.is_empty() || !self.client.is_empty()
    }
}

/// One namespace's `hosts.toml`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostsFile {
    /// The file it came from.
    pub path: PathBuf,
    /// `server`, if the file names one; `None`: the namespace itself.
    pub server: Option<HostConfig>,
    /// The `[host."..."]` entries in the order written.
    pub hosts: Vec<HostConfig>,
}

/// A `hosts.toml` that cannot be used: one line naming the file and why.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("hosts config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hosts config {path}: {size} bytes, more than the {max} allowed", max = MAX_FILE_BYTES)]
    TooLarge { path: PathBuf, size: u64 },
    #[error("hosts config {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl HostsFile {
    /// The hosts to read blobs from, in order: mirrors with `pull`, then
    /// the server if the file names one (`None` at the end: the namespace
    /// itself, as the caller reaches it anyway).
    pub fn pull_hosts(&self) -> impl Iterator<Item = &HostConfig> {
        self.hosts
            .iter()
            .filter(|h| h.capabilities.pull)
            .chain(self.server.iter())
    }

    /// The file for `namespace` under `dir`, if there is one: the
    /// namespace's own (`reg_5000_`, then `reg:5000`), else `_default`.
    pub fn find(dir: &Path, namespace: &str) -> Option<PathBuf> {
        let mut names = Vec::with_capacity(3);
        if let Some((host, port)) = namespace.rsplit_once(':')
            && !port.is_empty()
            && port.bytes().all(|b| b.is_ascii_digit())
        {
            names.push(format!("{host}_{port}_"));
        }
        names.push(namespace.to_string());
        names.push("_default".to_string());
        names
            .into_iter()
            .filter(|n| !n.contains('/') && n != "." && n != "..")
            .map(|n| dir.join(n).join("hosts.toml"))
            .find(|p| p.is_file())
    }

    /// Reads and parses the file for `namespace` under `dir`; `Ok(None)` if
    /// there is none. Blocking: call it off the async workers.
    pub fn load(dir: &Path, namespace: &str) -> Result<Option<HostsFile>, HostsError> {
        let Some(path) = HostsFile::find(dir, namespace) else {
            return Ok(None);
        };
        let read = |source| HostsError::Read {
            path: path.clone(),
            source,
        };
        let size = std::fs::metadata(&path).map_err(read)?.len();
        if size > MAX_FILE_BYTES {
            return Err(HostsError::TooLarge { path, size });
        }
        let text = std::fs::read_to_string(&path).map_err(read)?;
        HostsFile::parse(&text, &path).map(Some)
    }

    /// Parses `text`, the contents of the file at `path` (relative `ca` and
    /// `client` paths are taken from its directory).
    pub fn parse(text: &str, path: &Path) -> Result<HostsFile, HostsError> {
        let invalid = |reason: String| HostsError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(HostsError::TooLarge {
                path: path.to_path_buf(),
                size: text.len() as u64,
            });
        }
        let mut raw: RawFile =
            toml::from_str(text).map_err(|e| invalid(one_line(&e.to_string())))?;
        if raw.host.len() > MAX_HOSTS {
            return Err(invalid(format!(
                "{} hosts, more than the {MAX_HOSTS} allowed",
                raw.host.len()
            )));
        }
        let dir = path.parent().unwrap_or(Path::new("/"));
        let server = match raw.server.take() {
            Some(url) => {
                let all = Capabilities {
                    pull: true,
                    resolve: true,
                    push: true,
                };
                Some(raw.base().build(&url, all, dir).map_err(invalid)?)
            }
            None => None,
        };
        // TOML tables are maps; the order written is the order of their
        // keys in the text, which the spans keep.
        let mut entries: Vec<_> = raw.host.into_iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        let hosts = entries
            .into_iter()
            .map(|(url, h)| {
                let default = Capabilities {
                    pull: true,
                    resolve: true,
                    push: false,
                };
                h.build(url.get_ref(), default, dir)
                    .map_err(|e| invalid(format!("host {:?}: {e}", url.get_ref())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HostsFile {
            path: path.to_path_buf(),
            server,
            hosts,
        })
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The file as written. The server's own settings sit at the top level
/// beside `server` (not `#[serde(flatten)]`: that would buffer the hosts
/// and lose the spans that give their order).
#[derive(Deserialize)]
struct RawFile {
    server: Option<String>,
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    skip_verify: bool,
    ca: Option<OneOrMany>,
    client: Option<Clients>,
    #[serde(default)]
    header: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    override_path: bool,
    #[serde(default)]
    host: BTreeMap<toml::Spanned<String>, RawHost>,
}

impl RawFile {
    fn base(&mut self) -> RawHost {
        RawHost {
            capabilities: self.capabilities.take(),
            skip_verify: self.skip_verify,
            ca: self.ca.take(),
            client: self.client.take(),
            header: std::mem::take(&mut self.header),
            override_path: self.override_path,
        }
    }
}

#[derive(Deserialize)]
struct RawHost {
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    skip_verify: bool,
    ca: Option<OneOrMany>,
    client: Option<Clients>,
    #[serde(default)]
    header: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    override_path: bool,
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Clients {
    One(String),
    Many(Vec<ClientItem>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ClientItem {
    Pem(String),
    Pair(Vec<String>),
}

impl RawHost {
    fn build(&self, url: &str, default: Capabilities, dir: &Path) -> Result<HostConfig, String> {
        let capabilities = match &self.capabilities {
            None => default,
            Some(list) => {
                let mut c = Capabilities::default();
                for name in list {
                    match name.as_str() {
                        "pull" => c.pull = true,
                        "resolve" => c.resolve = true,
                        "push" => c.push = true,
                        other => return Err(format!("unknown capability {other:?}")),
                    }
                }
                c
            }
        };
        let root = api_root(url, self.override_path)?;
        let file = |p: &str| {
            if p.is_empty() {
                return Err("empty path".to_string());
            }
            Ok(dir.join(p))
        };
        let ca = match &self.ca {
            None => Vec::new(),
            Some(c) => match c {
                OneOrMany::One(p) => vec![file(p)?],
                OneOrMany::Many(v) => v.iter().map(|p| file(p)).collect::<Result<_, _>>()?,
            },
        };
        let client = match &self.client {
            None => Vec::new(),
            Some(Clients::One(p)) => vec![(file(p)?, None)],
            Some(Clients::Many(items)) => items
                .iter()
                .map(|i| match i {
                    ClientItem::Pem(p) => Ok((file(p)?, None)),
                    ClientItem::Pair(pair) => match pair.as_slice() {
                        [cert] => Ok((file(cert)?, None)),
                        [cert, key] if key.is_empty() => Ok((file(cert)?, None)),
                        [cert, key] => Ok((file(cert)?, Some(file(key)?))),
                        _ => Err("a client pair is [cert, key]".to_string()),
                    },
                })
                .collect::<Result<_, _>>()?,
        };
        let mut headers = Vec::new();
        for (name, values) in &self.header {
            reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("invalid header name {name:?}"))?;
            for v in values.clone().into_vec() {
                reqwest::header::HeaderValue::from_str(&v)
                    .map_err(|_| format!("invalid value of header {name:?}"))?;
                headers.push((name.clone(), v));
            }
        }
        if headers.len() > MAX_HEADERS {
            return Err(format!(
                "{} header values, more than the {MAX_HEADERS} allowed",
                headers.len()
            ));
        }
        Ok(HostConfig {
            root,
            capabilities,
            skip_verify: self.skip_verify,
            ca,
            client,
            headers,
            override_path: self.override_path,
        })
    }
}

/// containerd's API root for a host URL: `https://` if no scheme is given,
/// the path cleaned, `/v2` appended unless it ends in it or the path is
/// overridden.
fn api_root(url: &str, override_path: bool) -> Result<Url, String> {
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        format!("https://{url}")
    };
    let mut u = Url::parse(&with_scheme).map_err(|e| format!("invalid url {url:?}: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none_or(str::is_empty) {
        return Err(format!("url {url:?} is not http(s)://host[:port][/path]"));
    }
    if u.query().is_some() || u.fragment().is_some() || !u.username().is_empty() {
        return Err(format!("url {url:?} has a query, fragment or user"));
    }
    let clean: Vec<&str> = u
        .path()
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if clean.contains(&"..") {
        return Err(format!("url {url:?} has '..' in its path"));
    }
    let mut path = String::new();
    for c in &clean {
        path.push('/');
        path.push_str(c);
    }
    if !override_path && clean.last() != Some(&"v2") {
        path.push_str("/v2");
    }
    u.set_path(&path);
    Ok(u)
}

#[cfg(test)]
mod tests;
