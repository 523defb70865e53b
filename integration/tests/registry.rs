//! tarn-fs's registry client against a real Debian docker-registry.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tarn_fs::Digest;
use tarn_fs::Intent;
use tarn_fs::num::usize_from;
use tarn_fs::registry::{
    BlobSource, Reference, RegistryClient, RegistryConfig, RegistryError, RemoteBlob,
};
use tarn_integration::registry::{OCI_INDEX, TestRegistry};

/// Deterministic bytes that are not periodic over small ranges.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // The low byte: the truncation is the point.
            x.to_le_bytes()[0]
        })
        .collect()
}

/// A client that reads no docker config of the machine it runs on.
fn client(dir: &std::path::Path) -> RegistryClient {
    RegistryClient::new(RegistryConfig {
        docker_config: Some(dir.join("no-docker-config.json")),
        ..RegistryConfig::default()
    })
    .unwrap()
}

const TOC: &str = "containerd.io/snapshot/stargz/toc.digest";

#[tokio::test]
async fn resolves_a_pushed_image_and_reads_ranges_as_206() {
    let reg = TestRegistry::start().unwrap();
    let layer = pattern(3 << 20);
    let small = pattern(1000);
    let toc = Digest::of(b"toc").to_string();
    let (manifest_digest, manifest) = reg
        .push_image(
            "app/one",
            Some("v1"),
            "amd64",
            &[
                (layer.clone(), vec![(TOC.into(), toc.clone())]),
                (small, vec![]),
            ],
        )
        .await
        .unwrap();
    let c = client(reg.dir());

    let r: Reference = format!("{}/app/one:v1", reg.host()).parse().unwrap();
    let img = c.resolve(&r).await.unwrap();
    assert_eq!(img.manifest_digest, manifest_digest);
    assert_eq!(img.manifest_bytes, manifest);
    assert_eq!(img.layers.len(), 2);
    assert_eq!(img.layers[0].digest, Digest::of(&layer));
    assert_eq!(img.layers[0].size, layer.len() as u64);
    assert_eq!(img.layers[0].annotations[TOC], toc);

    // The same image by digest, verified.
    let by_digest: Reference = format!("{}/app/one@{manifest_digest}", reg.host())
        .parse()
        .unwrap();
    assert_eq!(
        c.resolve(&by_digest).await.unwrap().manifest_digest,
        manifest_digest
    );

    let config = c
        .fetch_blob(&r.repository, &img.config.digest)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&config).contains("amd64"));

    let blob = RemoteBlob::new(
        c.clone(),
        r.repository.clone(),
        img.layers[0].digest,
        img.layers[0].size,
    );
    let n = layer.len() as u64;
    let ranges = [0..1, 100..70_000, n - 51..n, 1_000_000..2_500_000, 0..n];
    for range in &ranges {
        let got = blob
            .read_range(range.clone(), Intent::OnDemand)
            .await
            .unwrap();
        let want = &layer[usize_from(range.start)..usize_from(range.end)];
        assert!(got == want, "range {range:?}: wrong bytes");
    }
    // A range past the end is refused before any request.
    assert!(
        blob.read_range(n - 1..n + 1, Intent::OnDemand)
            .await
            .is_err()
    );

    let blob_path = format!("/v2/app/one/blobs/{}", img.layers[0].digest);
    let gets: Vec<_> = reg
        .log()
        .unwrap()
        .into_iter()
        .filter(|l| l.method == "GET" && l.path == blob_path)
        .collect();
    assert_eq!(gets.len(), ranges.len(), "one request per read: {gets:?}");
    for (g, range) in gets.iter().zip(&ranges) {
        assert_eq!(g.status, 206, "{g:?}");
        assert_eq!(g.bytes, range.end - range.start, "{g:?}");
    }
}

#[tokio::test]
async fn resolves_linux_amd64_from_a_multi_platform_index() {
    let reg = TestRegistry::start().unwrap();
    let mut entries = Vec::new();
    let mut amd64 = None;
    for (arch, variant) in [("arm64", Some("v8")), ("amd64", None), ("s390x", None)] {
        let layer = pattern(100 + arch.len());
        let (d, m) = reg
            .push_image("multi", None, arch, &[(layer, vec![])])
            .await
            .unwrap();
        if arch == "amd64" {
            amd64 = Some(d);
        }
        let mut platform = serde_json::json!({"architecture": arch, "os": "linux"});
        if let Some(v) = variant {
            platform["variant"] = v.into();
        }
        entries.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": d.to_string(),
            "size": m.len(),
            "platform": platform,
        }));
    }
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries,
    }))
    .unwrap();
    let index_digest = reg
        .push_manifest("multi", "latest", OCI_INDEX, &index)
        .await
        .unwrap();
    let c = client(reg.dir());
    for r in [
        format!("{}/multi", reg.host()),
        format!("{}/multi@{index_digest}", reg.host()),
    ] {
        let img = c.resolve(&r.parse().unwrap()).await.unwrap();
        assert_eq!(Some(img.manifest_digest), amd64, "{r}");
        assert_eq!(Digest::of(&img.manifest_bytes), img.manifest_digest);
    }
}

#[tokio::test]
async fn unknown_digest_or_tag_fails_naming_the_registry() {
    let reg = TestRegistry::start().unwrap();
    reg.push_image("app", Some("v1"), "amd64", &[(pattern(10), vec![])])
        .await
        .unwrap();
    let c = client(reg.dir());
    let wrong = Digest::of(b"no such manifest");
    for r in [
        format!("{}/app@{wrong}", reg.host()),
        format!("{}/app:v2", reg.host()),
        format!("{}/nope:v1", reg.host()),
    ] {
        let err = c.resolve(&r.parse().unwrap()).await.unwrap_err();
        assert!(matches!(err, RegistryError::NotFound { .. }), "{r}: {err}");
        assert!(err.to_string().contains(&reg.host()), "{err}");
    }
    let repo = format!("{}/app", reg.host())
        .parse::<Reference>()
        .unwrap()
        .repository;
    let err = c
        .read_range(&repo, &wrong, 0..10, Intent::OnDemand)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn unreachable_or_silent_registry_fails_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let config = RegistryConfig {
        docker_config: Some(dir.path().join("none.json")),
        retries: 2,
        request_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        ..RegistryConfig::default()
    };
    let c = RegistryClient::new(config).unwrap();

    // Nothing listens: refused at once, retried twice with backoff.
    let port = tarn_integration::registry::free_port().unwrap();
    let t = Instant::now();
    let err = c
        .resolve(&format!("127.0.0.1:{port}/app:v1").parse().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    // Accepts connections, never answers: each attempt times out.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let t = Instant::now();
    let err = c
        .resolve(&format!("127.0.0.1:{port}/app:v1").parse().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Timeout { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    let elapsed = t.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(4),
        "three attempts of 500 ms: {elapsed:?}"
    );
}

#[tokio::test]
async fn basic_auth_with_credentials_from_a_docker_config_file() {
    let reg = TestRegistry::start_with_basic_auth("tarn", "s3cret pass").unwrap();
    let layer = pattern(200_000);
    reg.push_image(
        "private/app",
        Some("v1"),
        "amd64",
        &[(layer.clone(), vec![])],
    )
    .await
    .unwrap();
    let r: Reference = format!("{}/private/app:v1", reg.host()).parse().unwrap();
    // Only the clients' requests count (not the test bed's readiness probe).
    let before = reg.log().unwrap().len();

    // Without credentials: a clear auth error naming the registry.
    let err = client(reg.dir()).resolve(&r).await.unwrap_err();
    assert!(matches!(err, RegistryError::Auth { .. }), "{err}");
    assert!(err.to_string().contains(&reg.host()), "{err}");

    let cfg = reg.dir().join("docker-config.json");
    std::fs::write(
        &cfg,
        serde_json::json!({"auths": {reg.host(): {"auth": "dGFybjpzM2NyZXQgcGFzcw=="}}})
            .to_string(),
    )
    .unwrap();
    let c = RegistryClient::new(RegistryConfig {
        docker_config: Some(cfg),
        ..RegistryConfig::default()
    })
    .unwrap();
    let img = c.resolve(&r).await.unwrap();
    let got = c
        .read_range(
            &r.repository,
            &img.layers[0].digest,
            1000..150_000,
            Intent::OnDemand,
        )
        .await
        .unwrap();
    assert!(got[..] == layer[1000..150_000]);

    // The challenge is remembered: after the first 401, requests carry
    // credentials up front.
    let log = reg.log().unwrap();
    let ours: Vec<_> = log[before..]
        .iter()
        .filter(|l| !l.path.contains("/uploads/") && l.method == "GET")
        .collect();
    let unauthorized = ours.iter().filter(|l| l.status == 401).count();
    assert_eq!(unauthorized, 2, "one 401 per client: {ours:?}");
    assert!(ours.iter().any(|l| l.status == 206));
}

/// A one-route HTTP server on loopback that answers every request with a
/// 307 to `target`, counting requests.
fn redirector(target: String) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = write!(
                s,
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}{path}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    (port, hits)
}

#[tokio::test]
async fn blob_redirect_target_is_remembered() {
    let reg = TestRegistry::start().unwrap();
    let layer = pattern(100_000);
    reg.push_image("app", Some("v1"), "amd64", &[(layer.clone(), vec![])])
        .await
        .unwrap();
    // The "registry" the client talks to redirects every request to the real
    // one, as registries redirect blob GETs to their storage.
    let (port, hits) = redirector(format!("http://{}", reg.host()));
    let c = client(reg.dir());
    let r: Reference = format!("127.0.0.1:{port}/app:v1").parse().unwrap();
    let digest = Digest::of(&layer);
    for range in [0..10u64, 500..9000, 99_000..100_000] {
        let got = c
            .read_range(&r.repository, &digest, range.clone(), Intent::OnDemand)
            .await
            .unwrap();
        assert!(got[..] == layer[usize_from(range.start)..usize_from(range.end)]);
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "later reads go to the storage URL directly"
    );
    let ranged = reg
        .log()
        .unwrap()
        .into_iter()
        .filter(|l| l.status == 206)
        .count();
    assert_eq!(ranged, 3);
}

/// What the fake registry saw: (path with query, Authorization header).
type Seen = Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// A fake registry on loopback with bearer-token auth whose blob endpoint
/// ignores Range and always answers 200 with the whole blob, the two things
/// Debian's registry cannot show.
fn fake_token_registry(blob: Vec<u8>) -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).to_string();
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            let auth = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("authorization")
                        .then(|| v.trim().to_string())
                })
                .unwrap_or_default();
            log.lock().unwrap().push((path.clone(), auth.clone()));
            let (status, extra, body): (&str, String, Vec<u8>) = if path.starts_with("/token?") {
                (
                    "200 OK",
                    String::new(),
                    br#"{"token":"tok123","expires_in":300}"#.to_vec(),
                )
            } else if auth != "Bearer tok123" {
                (
                    "401 Unauthorized",
                    format!(
                        "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\",scope=\"repository:app:pull\"\r\n"
                    ),
                    Vec::new(),
                )
            } else {
                ("200 OK", String::new(), blob.clone())
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(&body);
        }
    });
    (port, seen)
}

#[tokio::test]
async fn bearer_token_is_fetched_once_and_a_range_ignoring_registry_is_sliced() {
    let layer = pattern(50_000);
    let (port, seen) = fake_token_registry(layer.clone());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    // "u:p" for this registry: sent to the token endpoint only.
    std::fs::write(
        &cfg,
        format!(r#"{{"auths":{{"127.0.0.1:{port}":{{"auth":"dTpw"}}}}}}"#),
    )
    .unwrap();
    let c = RegistryClient::new(RegistryConfig {
        docker_config: Some(cfg),
        ..RegistryConfig::default()
    })
    .unwrap();
    let r: Reference = format!("127.0.0.1:{port}/app:v1").parse().unwrap();
    let digest = Digest::of(&layer);
    for range in [10..20u64, 40_000..50_000] {
        let got = c
            .read_range(&r.repository, &digest, range.clone(), Intent::OnDemand)
            .await
            .unwrap();
        assert!(
            got[..] == layer[usize_from(range.start)..usize_from(range.end)],
            "{range:?}"
        );
    }
    let seen = seen.lock().unwrap().clone();
    let tokens: Vec<_> = seen
        .iter()
        .filter(|(p, _)| p.starts_with("/token"))
        .collect();
    assert_eq!(tokens.len(), 1, "token cached: {seen:?}");
    assert!(tokens[0].0.contains("service=fake"), "{seen:?}");
    assert!(
        tokens[0].0.contains("scope=repository%3Aapp%3Apull"),
        "{seen:?}"
    );
    assert_eq!(tokens[0].1, "Basic dTpw");
    // 401, token, blob with token, blob with cached token.
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen[3].1, "Bearer tok123");
}
