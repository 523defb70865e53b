//! The token flow against a one-shot token endpoint on loopback.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;
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
    let auth = Auth::new(docker);
    let http = Http::new(RegistryConfig::default()).unwrap();
    auth.authenticate(&http, &repo(), bearer(&realm))
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
    let auth = Auth::new(docker);
    let http = Http::new(RegistryConfig::default()).unwrap();
    auth.authenticate(&http, &repo(), bearer(&realm))
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
