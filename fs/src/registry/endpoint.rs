//! [`Endpoint`]: one host of a `hosts.toml` as a GET sees it (where to
//! send it, what to add to it, which client), apart from `mirror.rs` so
//! the GET (`client.rs`, `blob.rs`) and the list of hosts need not import
//! each other.

use reqwest::Url;
use reqwest::header::HeaderMap;

use super::reference::Repository;

/// Where a GET goes instead of the registry of its repository: one host
/// of a `hosts.toml`.
pub struct Endpoint {
    /// The API root (`.../v2` unless overridden).
    pub(super) root: Url,
    /// `ns=` to add: the namespace, when this host is not it.
    pub(super) ns: Option<String>,
    pub(super) headers: HeaderMap,
    /// A client of its own for its TLS settings (`skip_verify`, `ca`,
    /// `client`); `None`: the shared pools.
    pub(super) client: Option<reqwest::Client>,
    /// Counted as mirror bytes (not the server).
    pub(super) mirror: bool,
    /// Retries of a failed attempt; 0 for a mirror (the next host is the
    /// retry).
    pub(super) retries: Option<u32>,
    /// The repository as this host names it, for auth and messages.
    pub(super) repo: Repository,
}

impl Endpoint {
    /// The URL of `path`, an API path as the registry's (`/v2/...`).
    pub(super) fn url(&self, path: &str) -> Url {
        let tail = path.strip_prefix("/v2").unwrap_or(path);
        let mut u = self.root.clone();
        u.set_path(&format!("{}{tail}", self.root.path().trim_end_matches('/')));
        if let Some(ns) = &self.ns {
            u.query_pairs_mut().append_pair("ns", ns);
        }
        u
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_carry_the_root_path_and_the_namespace() {
        let e = Endpoint {
            root: Url::parse("http://127.0.0.2:5000/mirror/v2").unwrap(),
            ns: Some("docker.io".into()),
            headers: HeaderMap::new(),
            client: None,
            mirror: true,
            retries: Some(0),
            repo: Repository {
                registry: "127.0.0.2:5000".into(),
                name: "library/busybox".into(),
            },
        };
        assert_eq!(
            e.url("/v2/library/busybox/blobs/sha256:ab").as_str(),
            "http://127.0.0.2:5000/mirror/v2/library/busybox/blobs/sha256:ab?ns=docker.io"
        );
    }
}
