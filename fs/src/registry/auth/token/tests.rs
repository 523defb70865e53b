//! The token flow against a one-shot token endpoint on loopback.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;
use crate::registry::auth::docker::DockerConfig;
use crate::registry::http::RegistryConfig;

/// Answers one request with `body` and hands back the request's text.
async fn token_endpoint(body: &'static str) -> (String, tokio::task::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let realm = format!("http://{}/token", listener.local_addr().unwrap());
    let served = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        // Headers, then as many body bytes as Content-Length says.
        loop {
            let n = conn.read(&mut buf).await.unwrap();
            request.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&request).to_string();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let want = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if rest.len() >= want || n == 0 {
                    break;
                }
            }
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(answer.as_bytes()).await.unwrap();
        String::from_utf8(request).unwrap()
    });
    (realm, served)
}

fn repo() -> Repository {
    Repository {
        registry: "reg.lan".into(),
        name: "team/app".into(),
    }
}

fn bearer(realm: &str) -> Challenge {
    Challenge::Bearer {
        realm: realm.to_string(),
        service: Some("reg".into()),
        scope: None,
    }
}

#[tokio::test]
async fn an_identity_token_is_traded_by_an_oauth_post() {
    let (realm, served) = token_endpoint(r#"{"access_token":"at","expires_in":300}"#).await;
    let docker = DockerConfig::parse(br#"{"auths":{"reg.lan":{"identitytoken":"rt"}}}"#).unwrap();
    let auth = Auth::new(Keychains::default().then(docker));
    let http = Http::new(RegistryConfig::default()).unwrap();
    auth.authenticate(&http, &repo(), bearer(&realm), None)
        .await
        .map_err(|f| f.err)
        .unwrap();
    let request = served.await.unwrap();
    assert!(request.starts_with("POST /token "), "{request}");
    let form = request.split_once("\r\n\r\n").unwrap().1;
    for pair in [
        "grant_type=refresh_token",
        "refresh_token=rt",
        "client_id=tarn",
        "service=reg",
        "scope=repository%3Ateam%2Fapp%3Apull",
    ] {
        assert!(form.split('&').any(|p| p == pair), "{pair} in {form}");
    }
    // The token is kept: the next request's header needs no round trip.
    let header = auth
        .header(&http, &repo())
        .await
        .map_err(|f| f.err)
        .unwrap();
    assert_eq!(header.as_deref(), Some("Bearer at"));
    assert_eq!(http.stats().requests, 1);
}

#[tokio::test]
async fn a_password_is_sent_as_basic_auth_to_the_token_get() {
    let (realm, served) = token_endpoint(r#"{"token":"t"}"#).await;
    let docker =
        DockerConfig::parse(br#"{"auths":{"reg.lan":{"username":"u","password":"p"}}}"#).unwrap();
    let auth = Auth::new(Keychains::default().then(docker));
    let http = Http::new(RegistryConfig::default()).unwrap();
    auth.authenticate(&http, &repo(), bearer(&realm), None)
        .await
        .map_err(|f| f.err)
        .unwrap();
    let request = served.await.unwrap();
    assert!(
        request.starts_with("GET /token?service=reg&scope=repository%3Ateam%2Fapp%3Apull "),
        "{request}"
    );
    // "u:p" in base64.
    assert!(
        request
            .to_ascii_lowercase()
            .contains("authorization: basic dtpw"),
        "{request}"
    );
}

/// A token endpoint that answers every request with a new token (`t1`,
/// `t2`, ...) after `delay`, or 401 to a request whose basic credentials
/// are not `good`; returns the realm and the number of requests so far.
async fn counting_endpoint(
    good: &'static str,
    delay: Duration,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let realm = format!("http://{}/token", listener.local_addr().unwrap());
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = conn.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                }
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(delay).await;
                let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                let want =
                    format!("authorization: basic {}", STANDARD.encode(good)).to_ascii_lowercase();
                let answer = if text.contains(&want) {
                    let body = format!(r#"{{"token":"t{n}"}}"#);
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string()
                };
                conn.write_all(answer.as_bytes()).await.unwrap();
            });
        }
    });
    (realm, count)
}

/// A source whose answer the test changes, counting refusals.
#[derive(Clone, Default)]
struct Switchable {
    answer: Arc<std::sync::Mutex<Option<Credentials>>>,
    refused: Arc<std::sync::atomic::AtomicUsize>,
}

impl Switchable {
    fn set(&self, user: &str, password: &str) {
        *self.answer.lock().unwrap() = Some(Credentials {
            username: user.into(),
            password: password.into(),
        });
    }
}

impl super::super::keychain::Keychain for Switchable {
    fn name(&self) -> &str {
        "switchable"
    }
    fn credentials(&self, _repo: &Repository) -> Option<Credentials> {
        self.answer.lock().unwrap().clone()
    }
    fn refused(&self, _repo: &Repository) {
        self.refused
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn concurrent_requests_share_one_token_and_one_renewal_of_a_refused_token() {
    use std::sync::atomic::Ordering;
    let (realm, count) = counting_endpoint("u:p", Duration::from_millis(200)).await;
    let source = Switchable::default();
    source.set("u", "p");
    let auth = Arc::new(Auth::new(Keychains::default().then(source.clone())));
    let http = Arc::new(Http::new(RegistryConfig::default()).unwrap());
    auth.authenticate(&http, &repo(), bearer(&realm), None)
        .await
        .map_err(|f| f.err)
        .unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 1);

    // Twenty reads refused the same (expired) token at once: one renewal.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (auth, http, realm) = (auth.clone(), http.clone(), realm.clone());
            tokio::spawn(async move {
                auth.authenticate(&http, &repo(), bearer(&realm), Some("Bearer t1"))
                    .await
                    .map_err(|f| f.err)
                    .unwrap();
                auth.header(&http, &repo())
                    .await
                    .map_err(|f| f.err)
                    .unwrap()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().as_deref(), Some("Bearer t2"));
    }
    assert_eq!(count.load(Ordering::SeqCst), 2, "one renewal for all");
    assert_eq!(
        source.refused.load(Ordering::SeqCst),
        0,
        "the credentials were fine"
    );
}

#[tokio::test]
async fn credentials_the_token_endpoint_refuses_are_asked_for_again_once() {
    use std::sync::atomic::Ordering;
    let (realm, count) = counting_endpoint("u:new", Duration::ZERO).await;
    let source = Switchable::default();
    source.set("u", "old");
    let auth = Auth::new(Keychains::default().then(source.clone()));
    let http = Http::new(RegistryConfig::default()).unwrap();
    // Refused, asked again, the same answer: a clear error naming the
    // source, after one token request.
    let err = auth
        .authenticate(&http, &repo(), bearer(&realm), None)
        .await
        .map_err(|f| f.err)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("refused the credentials from switchable"),
        "{err}"
    );
    assert_eq!(source.refused.load(Ordering::SeqCst), 1);
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // Rotated: the kept (old) answer is refused, asked again, and the new
    // secret works without an error reaching the caller.
    source.set("u", "new");
    auth.authenticate(&http, &repo(), bearer(&realm), None)
        .await
        .map_err(|f| f.err)
        .unwrap();
    assert_eq!(
        auth.header(&http, &repo())
            .await
            .map_err(|f| f.err)
            .unwrap()
            .as_deref(),
        Some("Bearer t3")
    );
    assert_eq!(count.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn basic_credentials_the_registry_refused_are_asked_for_again_then_reported() {
    let source = Switchable::default();
    source.set("u", "old");
    let auth = Auth::new(Keychains::default().then(source.clone()));
    let http = Http::new(RegistryConfig::default()).unwrap();
    auth.authenticate(&http, &repo(), Challenge::Basic, None)
        .await
        .map_err(|f| f.err)
        .unwrap();
    let old = auth
        .header(&http, &repo())
        .await
        .map_err(|f| f.err)
        .unwrap();
    // Refused, and the source still has the same: a clear error.
    let err = auth
        .authenticate(&http, &repo(), Challenge::Basic, old.as_deref())
        .await
        .map_err(|f| f.err)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("refused the credentials (switchable)"),
        "{err}"
    );
    // Rotated: the next refusal picks the new ones up at once.
    source.set("u", "new");
    auth.authenticate(&http, &repo(), Challenge::Basic, old.as_deref())
        .await
        .map_err(|f| f.err)
        .unwrap();
    let new = auth
        .header(&http, &repo())
        .await
        .map_err(|f| f.err)
        .unwrap();
    assert_eq!(
        new,
        basic(&Credentials {
            username: "u".into(),
            password: "new".into()
        })
    );
}
