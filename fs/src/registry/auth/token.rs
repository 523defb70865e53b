//! The auth flow: what a host asked for in its last 401, the bearer tokens
//! got for it (per host and scope, with their expiry), and the credentials
//! they are got with (from the [`Keychains`], kept per repository).
//!
//! A token that expires in the middle of a run (the registry answers 401
//! to a token tarn still thought good) is fetched again and the request
//! retried (`client.rs`), so a reader never sees an expired token as EIO.
//! Concurrent requests share one fetch: a slot per (host, scope) is locked
//! while its token is fetched, and a request refused token T asks for a new
//! one only if the slot still holds T (singleflight). Credentials work the
//! same way per repository; a refusal drops them and asks the sources
//! again, once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use dashmap::DashMap;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{StatusCode, Url};
use tokio::sync::Mutex;

use super::challenge::{Challenge, TokenResponse};
use super::keychain::{ANSWER_TTL, Credentials, Found, Keychains};
use crate::registry::error::RegistryError;
use crate::registry::http::{Failure, Http, classify};
use crate::registry::reference::Repository;

/// The OAuth client id sent with identity tokens, as docker sends its own.
const CLIENT_ID: &str = "tarn";
/// A token answer larger than this is refused (real ones are a few KiB).
const MAX_TOKEN_BODY: usize = 1 << 20;
/// Token slots and credential answers kept at most; past it they are
/// dropped and fetched again (a node pulls a handful of repositories).
const MAX_SLOTS: usize = 4096;

#[derive(Clone)]
struct Token {
    value: String,
    /// When tarn stops using it, a little before the registry would.
    renew_at: Instant,
}

#[derive(Clone)]
struct Answer {
    found: Option<Found>,
    at: Instant,
}

/// A value fetched at most once at a time: the lock is held across the
/// fetch on purpose (that is the singleflight), never across anything else.
type Slot<T> = Arc<Mutex<Option<T>>>;

/// Auth state shared by every request of a client.
pub(in crate::registry) struct Auth {
    keychains: Keychains,
    /// What each host asked for in its last 401, so later requests (other
    /// repositories, other blobs) authenticate up front.
    challenges: DashMap<String, Challenge>,
    /// Bearer tokens per (host, scope).
    tokens: DashMap<(String, String), Slot<Token>>,
    /// The sources' answer per (registry, repository).
    answers: DashMap<(String, String), Slot<Answer>>,
}

impl Auth {
    pub(in crate::registry) fn new(keychains: Keychains) -> Auth {
        Auth {
            keychains,
            challenges: DashMap::new(),
            tokens: DashMap::new(),
            answers: DashMap::new(),
        }
    }

    /// The Authorization header for requests to `repo`'s host, from what the
    /// host asked for before. `None`: go anonymous.
    pub(in crate::registry) async fn header(
        &self,
        http: &Http,
        repo: &Repository,
    ) -> Result<Option<String>, Failure> {
        let Some(challenge) = self.challenges.get(repo.host()).map(|c| c.clone()) else {
            return Ok(None);
        };
        match challenge {
            Challenge::Basic => Ok(self
                .credentials(repo)
                .await
                .and_then(|f| basic(&f.credentials))),
            Challenge::Bearer { realm, service, .. } => {
                let token = self
                    .token(http, repo, &realm, service.as_deref(), None)
                    .await?;
                Ok(Some(format!("Bearer {token}")))
            }
        }
    }

    /// Learns a host's challenge after a 401 and gets what it asks for.
    /// `sent` is the Authorization header the refused request carried: what
    /// it names (a token, credentials) is not used again.
    pub(in crate::registry) async fn authenticate(
        &self,
        http: &Http,
        repo: &Repository,
        challenge: Challenge,
        sent: Option<&str>,
    ) -> Result<(), Failure> {
        let host = repo.host();
        match &challenge {
            Challenge::Basic => {
                let mut found = self.credentials(repo).await;
                let header = |f: &Option<Found>| f.as_ref().and_then(|f| basic(&f.credentials));
                if sent.is_some() && header(&found).as_deref() == sent {
                    found = self.credentials_again(repo, &found).await;
                }
                match (header(&found), &found) {
                    (Some(h), _) if Some(h.as_str()) != sent => {}
                    (_, Some(f)) => {
                        return Err(Failure::fatal(RegistryError::Auth {
                            host: host.to_string(),
                            reason: format!(
                                "the registry refused the credentials ({}) for {}",
                                f.source, repo.registry
                            ),
                        }));
                    }
                    (_, None) => {
                        return Err(Failure::fatal(RegistryError::Auth {
                            host: host.to_string(),
                            reason: format!(
                                "registry wants basic auth and no credential source ({:?}) has credentials for {}",
                                self.keychains, repo.registry
                            ),
                        }));
                    }
                }
            }
            Challenge::Bearer { realm, service, .. } => {
                // The challenge may carry a narrower scope; tarn only pulls,
                // and one scope per repository keeps the token cache simple.
                let refused = sent.and_then(|h| h.strip_prefix("Bearer "));
                self.token(http, repo, realm, service.as_deref(), refused)
                    .await?;
            }
        }
        self.challenges.insert(host.to_string(), challenge);
        Ok(())
    }

    /// A token for `repo`'s pull scope: the kept one unless it is due for
    /// renewal or is `refused`, else one fetched (once, for every request
    /// that waits on the slot meanwhile).
    async fn token(
        &self,
        http: &Http,
        repo: &Repository,
        realm: &str,
        service: Option<&str>,
        refused: Option<&str>,
    ) -> Result<String, Failure> {
        let scope = pull_scope(repo);
        let slot = slot(&self.tokens, (repo.host().to_string(), scope.clone()));
        let mut kept = slot.lock().await;
        if let Some(t) = kept.as_ref()
            && t.renew_at > Instant::now()
            && Some(t.value.as_str()) != refused
        {
            return Ok(t.value.clone());
        }
        if refused.is_some() {
            tracing::info!(repo = %repo, "registry refused the bearer token (expired?); getting a new one");
        }
        let found = self.credentials(repo).await;
        let token = match self
            .fetch_token(http, repo, realm, service, &scope, found.as_ref())
            .await
        {
            Err(TokenError::Refused(f)) if found.is_some() => {
                // The credentials may have been rotated: ask the sources
                // again, once.
                let fresh = self.credentials_again(repo, &found).await;
                if fresh == found {
                    return Err(f);
                }
                self.fetch_token(http, repo, realm, service, &scope, fresh.as_ref())
                    .await
                    .map_err(TokenError::into_failure)?
            }
            other => other.map_err(TokenError::into_failure)?,
        };
        *kept = Some(token.clone());
        Ok(token.value)
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
        found: Option<&Found>,
    ) -> Result<Token, TokenError> {
        let host = repo.host();
        let auth_err = |reason: String| {
            TokenError::Other(Failure::fatal(RegistryError::Auth {
                host: host.to_string(),
                reason,
            }))
        };
        let realm_url =
            Url::parse(realm).map_err(|e| auth_err(format!("bad token realm {realm:?}: {e}")))?;
        if !matches!(realm_url.scheme(), "http" | "https") {
            return Err(auth_err(format!("token realm {realm:?} is not http(s)")));
        }
        let client = http
            .client(&realm_url)
            .await
            .map_err(|e| TokenError::Other(Failure::fatal(e)))?;
        let creds = found.map(|f| &f.credentials);
        let mut url = realm_url.clone();
        let rb = match creds.and_then(Credentials::identity_token) {
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
                if let Some(h) = creds.and_then(basic) {
                    rb = rb.header(AUTHORIZATION, h);
                }
                rb
            }
        };
        let resp = rb.send().await.map_err(|e| {
            TokenError::Other(Failure::transient(classify(&e, host, "token request")))
        })?;
        http.sent();
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(TokenError::Refused(Failure::fatal(RegistryError::Auth {
                host: host.to_string(),
                reason: format!(
                    "token endpoint {realm} refused the credentials{} ({status})",
                    found
                        .map(|f| format!(" from {}", f.source))
                        .unwrap_or_default()
                ),
            })));
        }
        if !status.is_success() {
            if status.is_server_error() {
                return Err(TokenError::Other(Failure::transient(
                    RegistryError::BadResponse {
                        host: host.to_string(),
                        what: "token".to_string(),
                        reason: format!("token endpoint {realm} answered {status}"),
                    },
                )));
            }
            return Err(auth_err(format!(
                "token endpoint {realm} answered {}",
                resp.status()
            )));
        }
        let body = read_limited(resp, MAX_TOKEN_BODY)
            .await
            .map_err(|e| {
                TokenError::Other(Failure::transient(classify(&e, host, "token response")))
            })?
            .ok_or_else(|| {
                auth_err(format!(
                    "token endpoint {realm} sent more than {MAX_TOKEN_BODY} bytes"
                ))
            })?;
        let (token, ttl) = serde_json::from_slice::<TokenResponse>(&body)
            .ok()
            .and_then(TokenResponse::into_token)
            .ok_or_else(|| auth_err(format!("token endpoint {realm} sent no token")))?;
        Ok(Token {
            value: token,
            renew_at: Instant::now() + renew_after(ttl),
        })
    }

    /// `repo`'s credentials from the sources, kept [`ANSWER_TTL`]. The
    /// sources may block (a file, a helper process): they run on the
    /// blocking pool.
    async fn credentials(&self, repo: &Repository) -> Option<Found> {
        let slot = slot(&self.answers, (repo.registry.clone(), repo.name.clone()));
        let mut kept = slot.lock().await;
        if let Some(a) = kept.as_ref()
            && a.at.elapsed() < ANSWER_TTL
        {
            return a.found.clone();
        }
        let found = self.ask(repo, false).await;
        *kept = Some(Answer {
            found: found.clone(),
            at: Instant::now(),
        });
        found
    }

    /// The registry refused `stale`: unless another request already got
    /// different ones, tell the sources and ask them again.
    async fn credentials_again(&self, repo: &Repository, stale: &Option<Found>) -> Option<Found> {
        let slot = slot(&self.answers, (repo.registry.clone(), repo.name.clone()));
        let mut kept = slot.lock().await;
        if let Some(a) = kept.as_ref()
            && a.found != *stale
            && a.at.elapsed() < ANSWER_TTL
        {
            return a.found.clone();
        }
        tracing::info!(repo = %repo, "registry refused the credentials; asking the sources again");
        let found = self.ask(repo, true).await;
        *kept = Some(Answer {
            found: found.clone(),
            at: Instant::now(),
        });
        found
    }

    async fn ask(&self, repo: &Repository, refused: bool) -> Option<Found> {
        let keychains = self.keychains.clone();
        let r = repo.clone();
        tokio::task::spawn_blocking(move || {
            if refused {
                keychains.refused(&r);
            }
            keychains.credentials(&r)
        })
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(repo = %repo, error = %e, "credential source task failed");
            None
        })
    }
}

/// Why a token request failed: the endpoint refused the credentials (they
/// may have been rotated), or anything else.
enum TokenError {
    Refused(Failure),
    Other(Failure),
}

impl TokenError {
    fn into_failure(self) -> Failure {
        match self {
            TokenError::Refused(f) | TokenError::Other(f) => f,
        }
    }
}

/// The body, or `None` if it is longer than `limit`.
async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// How long a token of lifetime `ttl` is used: renewed a little early so it
/// does not expire in flight (a quarter of its life, at most 5 s early).
fn renew_after(ttl: Duration) -> Duration {
    ttl.saturating_sub((ttl / 4).min(Duration::from_secs(5)))
        .max(Duration::from_millis(500))
}

/// The slot for `key`, made if new; the map is bounded by dropping every
/// slot (a holder keeps its own `Arc`).
fn slot<T>(map: &DashMap<(String, String), Slot<T>>, key: (String, String)) -> Slot<T> {
    if map.len() >= MAX_SLOTS && !map.contains_key(&key) {
        map.clear();
    }
    map.entry(key).or_default().clone()
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

#[cfg(test)]
mod tests;
