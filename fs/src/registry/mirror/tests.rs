//! Blob reads through a `hosts.toml` against registries on loopback that
//! answer ranged GETs with their own letter and log what they were asked.

use std::sync::Mutex;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;
use crate::Intent;
use crate::registry::http::RegistryConfig;

/// A registry that answers every ranged GET with `letter` repeated and
/// keeps each request's head.
async fn registry(letter: u8) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let log = heads.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.ends_with(b"\r\n\r\n") {
                    let n = conn.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let range = head.lines().find_map(|l| {
                    let v = l.to_ascii_lowercase();
                    let (a, b) = v.strip_prefix("range: bytes=")?.split_once('-')?;
                    Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
                });
                log.lock().unwrap().push(head);
                let (a, b) = range.unwrap_or((0, 0));
                let body = vec![letter; usize::try_from(b - a + 1).unwrap()];
                let answer = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/100\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
                let _ = conn.write_all(&body).await;
            });
        }
    });
    (host, heads)
}

fn client(dir: &Path) -> RegistryClient {
    RegistryClient::new(RegistryConfig {
        hosts_dir: Some(dir.to_path_buf()),
        docker_config: Some(dir.join("no-docker-config.json")),
        retries: 0,
        ..RegistryConfig::default()
    })
    .unwrap()
}

fn hosts_toml(dir: &Path, namespace: &str, text: &str) {
    let ns = dir.join(namespace);
    std::fs::create_dir_all(&ns).unwrap();
    std::fs::write(ns.join("hosts.toml"), text).unwrap();
}

fn repo(registry: &str) -> Repository {
    Repository {
        registry: registry.to_string(),
        name: "team/app".to_string(),
    }
}

#[tokio::test]
async fn blobs_come_from_the_mirror_with_the_namespace_and_its_headers() {
    let dir = tempfile::tempdir().unwrap();
    let (origin, origin_log) = registry(b'o').await;
    let (mirror, mirror_log) = registry(b'm').await;
    hosts_toml(
        dir.path(),
        "reg.lan:5000",
        &format!(
            "server = \"http://{origin}\"\n[host.\"http://{mirror}/cache\"]\n  capabilities = [\"pull\"]\n  [host.\"http://{mirror}/cache\".header]\n    x-mirror = \"yes\"\n"
        ),
    );
    let client = client(dir.path());
    let digest = Digest::of(b"blob");
    let blob = client.blob_source(&repo("reg.lan:5000"), digest, 100).await;
    let got = blob.read_range(10..14, Intent::OnDemand).await.unwrap();
    assert_eq!(&got[..], b"mmmm");
    let heads = mirror_log.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    assert!(
        heads[0].starts_with(&format!(
            "GET /cache/v2/team/app/blobs/{digest}?ns=reg.lan%3A5000 "
        )),
        "{}",
        heads[0]
    );
    assert!(
        heads[0].to_ascii_lowercase().contains("x-mirror: yes"),
        "{}",
        heads[0]
    );
    assert!(origin_log.lock().unwrap().is_empty());
    let stats = client.stats();
    assert_eq!((stats.bytes, stats.mirror_bytes), (4, 4));
}

#[tokio::test]
async fn a_mirror_that_is_down_falls_back_to_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (origin, origin_log) = registry(b'o').await;
    // Bound and dropped: nothing listens there.
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    hosts_toml(
        dir.path(),
        "_default",
        &format!("server = \"http://{origin}\"\n[host.\"http://{down}\"]\n"),
    );
    let client = client(dir.path());
    let blob = client
        .blob_source(&repo("reg.lan"), Digest::of(b"blob"), 100)
        .await;
    let got = blob.read_range(0..3, Intent::OnDemand).await.unwrap();
    assert_eq!(&got[..], b"ooo");
    let heads = origin_log.lock().unwrap().clone();
    // The server is not the namespace either: it is told which one.
    assert!(heads[0].contains("?ns=reg.lan "), "{}", heads[0]);
    assert_eq!(client.stats().mirror_bytes, 0);
}

#[tokio::test]
async fn a_broken_hosts_file_leaves_the_registry_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (origin, origin_log) = registry(b'o').await;
    let (mirror, mirror_log) = registry(b'm').await;
    hosts_toml(
        dir.path(),
        &origin,
        &format!("[host.\"http://{mirror}\"]\ncapabilities = [\"teleport\"]\n"),
    );
    let client = client(dir.path());
    let blob = client
        .blob_source(&repo(&origin), Digest::of(b"blob"), 100)
        .await;
    let got = blob.read_range(0..2, Intent::OnDemand).await.unwrap();
    assert_eq!(&got[..], b"oo");
    assert!(mirror_log.lock().unwrap().is_empty());
    assert!(origin_log.lock().unwrap()[0].starts_with("GET /v2/team/app/blobs/"));
}
