//! The token flow: what a host asked for in its last 401, the bearer tokens
//! got for it (per host and scope, with their expiry), and the credentials
//! they are got with.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use dashmap::DashMap;
use reqwest::Url;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};

use super::challenge::{Challenge, TokenResponse};
use super::docker::{Credentials, DockerConfig};
use crate::registry::error::RegistryError;
use crate::registry::http::{Failure, Http, classify};
use crate::registry::reference::Repository;

/// How long a credential helper's answer is used before it is asked again:
/// helpers hand out short-lived secrets (a cloud registry's last hours).
const HELPER_ANSWER_TTL: Duration = Duration::from_secs(600);
/// The OAuth client id sent with identity tokens, as docker sends its own.
const CLIENT_ID: &str = "tarn";

/// Auth state shared by every request of a client.
pub(in crate::registry) struct Auth {
    docker: Arc<DockerConfig>,
    /// What each host asked for in its last 401, so later requests (other
    /// repositories, other blobs) authenticate up front.
    challenges: DashMap<String, Challenge>,
    /// Bearer tokens per (host, scope) with their expiry.
    tokens: DashMap<(String, String), (String, Instant)>,
    /// Credential helpers' answers per registry, with when they were got.
    helped: DashMap<String, (Option<Credentials>, Instant)>,
}

impl Auth {
    pub(in crate::registry) fn new(docker: DockerConfig) -> Auth {
        Auth {
            docker: Arc::new(docker),
            challenges: DashMap::new(),
            tokens: DashMap::new(),
            helped: DashMap::new(),
        }
    }

    /// The Authorization header for requests to `repo`'s host, from what the
    /// host asked for before. `None`: go anonymous.
    pub(in crate::registry) async fn header(
        &self,
        http: &Http,
        repo: &Repository,
    ) -> Result<Option<String>, Failure> {
        let host = repo.host();
        let Some(challenge) = self.challenges.get(host).map(|c| c.clone()) else {
            return Ok(None);
        };
        match challenge {
            Challenge::Basic => Ok(self.credentials(repo).await.as_ref().and_then(basic)),
            Challenge::Bearer { realm, service, .. } => {
                let scope = pull_scope(repo);
                let key = (host.to_string(), scope.clone());
                if let Some(t) = self.tokens.get(&key)
                    && t.1 > Instant::now()
                {
                    return Ok(Some(format!("Bearer {}", t.0)));
                }
                let token = self
                    .fetch_token(http, repo, &realm, service.as_deref(), &scope)
                    .await?;
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    /// Learns a host's challenge after a 401 and gets what it asks for.
    pub(in crate::registry) async fn authenticate(
        &self,
        http: &Http,
        repo: &Repository,
        challenge: Challenge,
    ) -> Result<(), Failure> {
        let host = repo.host();
        match &challenge {
            Challenge::Basic => {
                if self
                    .credentials(repo)
                    .await
                    .as_ref()
                    .and_then(basic)
                    .is_none()
                {
                    return Err(Failure::fatal(RegistryError::Auth {
                        host: host.to_string(),
                        reason: format!(
                            "registry wants basic auth and the docker config has no credentials for {}",
                            repo.registry
                        ),
                    }));
                }
            }
            Challenge::Bearer { realm, service, .. } => {
                // The challenge may carry a narrower scope; tarn only pulls,
                // and one scope per repository keeps the token cache simple.
                self.fetch_token(http, repo, realm, service.as_deref(), &pull_scope(repo))
                    .await?;
            }
        }
        self.challenges.insert(host.to_string(), challenge);
        Ok(())
    }

    /// A token for `scope` from `realm`: a GET with the basic credentials
    /// (or none), or, with an identity token, the OAuth POST that trades it
    /// for an access token.
    async fn fetch_token(
        &self,
        http: &Http,
        repo: &Repository,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<String, Failure> {
        let host = repo.host();
        let auth_err = |reason: String| {
            Failure::fatal(RegistryError::Auth {
                host: host.to_string(),
                reason,
            })
        };
        let realm_url =
            Url::parse(realm).map_err(|e| auth_err(format!("bad token realm {realm:?}: {e}")))?;
        if !matches!(realm_url.scheme(), "http" | "https") {
            return Err(auth_err(format!("token realm {realm:?} is not http(s)")));
        }
        let client = http.client(&realm_url).await.map_err(Failure::fatal)?;
        let creds = self.credentials(repo).await;
        let mut url = realm_url.clone();
        let rb = match creds.as_ref().and_then(Credentials::identity_token) {
            Some(refresh) => {
                // The form, encoded by the URL's query encoder.
                url.set_query(None);
                {
                    let mut q = url.query_pairs_mut();
                    q.append_pair("grant_type", "refresh_token");
                    q.append_pair("refresh_token", refresh);
                    q.append_pair("client_id", CLIENT_ID);
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    q.append_pair("scope", scope);
                }
                let form = url.query().unwrap_or_default().to_string();
                client
                    .post(realm_url)
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(form)
            }
            None => {
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    q.append_pair("scope", scope);
                }
                let mut rb = client.get(url);
                if let Some(h) = creds.as_ref().and_then(basic) {
                    rb = rb.header(AUTHORIZATION, h);
                }
                rb
            }
        };
        let resp = rb
            .send()
            .await
            .map_err(|e| Failure::transient(classify(&e, host, "token request")))?;
        http.sent();
        if !resp.status().is_success() {
            return Err(auth_err(format!(
                "token endpoint {realm} answered {}",
                resp.status()
            )));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| Failure::transient(classify(&e, host, "token response")))?;
        let (token, ttl) = serde_json::from_slice::<TokenResponse>(&body)
            .ok()
            .and_then(TokenResponse::into_token)
            .ok_or_else(|| auth_err(format!("token endpoint {realm} sent no token")))?;
        // Renew a little early so a token does not expire in flight.
        let expiry = Instant::now()
            + ttl
                .saturating_sub(Duration::from_secs(5))
                .max(Duration::from_secs(1));
        self.tokens.insert(
            (host.to_string(), scope.to_string()),
            (token.clone(), expiry),
        );
        Ok(token)
    }

    /// `repo`'s registry's credentials. A helper is a process: it runs on
    /// the blocking pool, and its answer is kept a while.
    async fn credentials(&self, repo: &Repository) -> Option<Credentials> {
        let registry = &repo.registry;
        if !self.docker.uses_helper(registry) {
            return self.docker.credentials_for(registry);
        }
        if let Some(h) = self.helped.get(registry)
            && h.1.elapsed() < HELPER_ANSWER_TTL
        {
            return h.0.clone();
        }
        let docker = self.docker.clone();
        let name = registry.clone();
        let creds = tokio::task::spawn_blocking(move || docker.credentials_for(&name))
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(registry, error = %e, "credential helper task failed");
                None
            });
        self.helped
            .insert(registry.clone(), (creds.clone(), Instant::now()));
        creds
    }
}

/// The basic Authorization header for a username and password; `None` for
/// an identity token, which only a token endpoint takes.
fn basic(c: &Credentials) -> Option<String> {
    if c.identity_token().is_some() {
        return None;
    }
    Some(format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", c.username, c.password))
    ))
}

fn pull_scope(repo: &Repository) -> String {
    format!("repository:{}:pull", repo.name)
}
