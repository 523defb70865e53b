//! A blob from the hosts containerd's `hosts.toml` names for its registry
//! ([`RegistryClient::blob_source`]): the mirrors with `pull`, in order,
//! then the server (by default the registry itself), as a [`Sources`].
//!
//! A request to a host other than the namespace carries containerd's
//! `ns=<namespace>` query parameter, so one mirror can serve many
//! registries (Spegel, Dragonfly, a pull-through cache). A mirror gets one
//! attempt per read (no retries of its own): the next host is the retry.
//! Its bytes are verified like the registry's, by the fetcher; a mirror
//! whose bytes fail is skipped (`Sources`). Only blob reads go to mirrors:
//! containerd resolves tags itself before tarn sees a layer, and tarn's
//! own `tarn pull` resolves at the registry.

use std::path::Path;
use std::sync::Arc;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::client::RegistryClient;
use super::endpoint::Endpoint;
use super::hosts::{HostConfig, HostsError, HostsFile};
use super::reference::Repository;
use super::source::{BlobSource, RemoteBlob, Sources};
use crate::Digest;

/// The mirrors of a `hosts.toml` in order, and its server if it names one.
type HostEndpoints = (Vec<Arc<Endpoint>>, Option<Arc<Endpoint>>);

impl RegistryClient {
    /// The blob `digest` of `repo` (`size` bytes) as the fetcher reads it:
    /// the registry alone, or, when the hosts directory has a `hosts.toml`
    /// for the registry, its mirrors first and its server last. A file that
    /// cannot be used is logged and the registry alone is read, as if it
    /// were absent.
    pub async fn blob_source(
        &self,
        repo: &Repository,
        digest: Digest,
        size: u64,
    ) -> Arc<dyn BlobSource> {
        let registry = RemoteBlob::new(self.clone(), repo.clone(), digest, size);
        let origin: Arc<dyn BlobSource> = Arc::new(registry.clone());
        let Some(dir) = self.inner.http.config.hosts_dir.clone() else {
            return origin;
        };
        let client = self.clone();
        let namespace = repo.registry.clone();
        let name = repo.name.clone();
        let found =
            tokio::task::spawn_blocking(move || client.endpoints(&dir, &namespace, &name)).await;
        let (mirrors, server) = match found {
            Ok(Ok(Some(found))) => found,
            Ok(Ok(None)) => return origin,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "ignoring the hosts config; reading from the registry");
                return origin;
            }
            Err(e) => {
                tracing::warn!(error = %e, "hosts config not read; reading from the registry");
                return origin;
            }
        };
        let blob =
            |endpoint: Arc<Endpoint>| -> Arc<dyn BlobSource> { Arc::new(registry.on(endpoint)) };
        let last = server.map_or(origin, blob);
        let Some((first, rest)) = mirrors.split_first() else {
            return last;
        };
        let list = rest
            .iter()
            .fold(Sources::new(blob(first.clone())), |l, m| {
                l.then(blob(m.clone()))
            })
            .then(last);
        tracing::debug!(repo = %repo, blob = %digest, sources = list.len(), "blob sources from hosts config");
        Arc::new(list)
    }

    /// The pull hosts of `namespace`'s `hosts.toml` under `dir` as
    /// endpoints: mirrors in order, and the server if the file names one.
    /// Blocking (files, TLS material): off the async workers.
    fn endpoints(
        &self,
        dir: &Path,
        namespace: &str,
        name: &str,
    ) -> Result<Option<HostEndpoints>, HostsError> {
        let Some(file) = HostsFile::load(dir, namespace)? else {
            return Ok(None);
        };
        let build = |h: &HostConfig, mirror: bool| -> Result<Arc<Endpoint>, HostsError> {
            let invalid = |reason: String| HostsError::Invalid {
                path: file.path.clone(),
                reason,
            };
            let authority = h.authority();
            let mut headers = HeaderMap::new();
            for (k, v) in &h.headers {
                // Checked when parsed; checked again rather than unwrapped.
                let (Ok(k), Ok(v)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(v),
                ) else {
                    return Err(invalid(format!("header {k:?}")));
                };
                headers.append(k, v);
            }
            let client = if h.own_tls() {
                Some(self.host_client(h).map_err(invalid)?)
            } else {
                None
            };
            Ok(Arc::new(Endpoint {
                root: h.root.clone(),
                ns: (authority != namespace).then(|| namespace.to_string()),
                headers,
                client,
                mirror,
                retries: mirror.then_some(0),
                repo: Repository {
                    registry: authority,
                    name: name.to_string(),
                },
            }))
        };
        let mirrors = file
            .hosts
            .iter()
            .filter(|h| h.capabilities.pull)
            .map(|h| build(h, true))
            .collect::<Result<Vec<_>, _>>()?;
        let server = file.server.as_ref().map(|h| build(h, false)).transpose()?;
        Ok(Some((mirrors, server)))
    }

    /// A client with `host`'s TLS settings, made once per distinct host
    /// config and kept.
    fn host_client(&self, host: &HostConfig) -> Result<reqwest::Client, String> {
        if let Some(c) = self.inner.host_clients.get(host) {
            return Ok(c.clone());
        }
        let config = &self.inner.http.config;
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .tcp_nodelay(true)
            .user_agent(concat!("tarn/", env!("CARGO_PKG_VERSION")))
            .danger_accept_invalid_certs(host.skip_verify);
        for ca in &host.ca {
            let pem = read_bounded(ca)?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| format!("ca {}: {e}", ca.display()))?;
            b = b.add_root_certificate(cert);
        }
        if let Some((cert, key)) = host.client.first() {
            let mut pem = read_bounded(cert)?;
            if let Some(key) = key {
                pem.push(b'\n');
                pem.extend(read_bounded(key)?);
            }
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|e| format!("client certificate {}: {e}", cert.display()))?;
            b = b.identity(id);
        }
        let client = b
            .build()
            .map_err(|e| format!("cannot build http client: {e}"))?;
        self.inner.host_clients.insert(host.clone(), client.clone());
        Ok(client)
    }
}

/// A PEM file, at most 1 MiB.
fn read_bounded(path: &Path) -> Result<Vec<u8>, String> {
    const MAX_PEM: u64 = 1 << 20;
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if len > MAX_PEM {
        return Err(format!(
            "{}: {len} bytes, more than {MAX_PEM}",
            path.display()
        ));
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests;
