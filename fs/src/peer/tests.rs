//! [`PeerBlob`] against fake owners: tiny HTTP/1.1 servers on 127.0.0.1
//! that answer block requests as told.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::Digest;
use crate::Intent;
use crate::num::usize_from;
use crate::registry::{BlobSource, RegistryError, Repository, Sources};
use crate::testing::{FakeBlob, pattern};

/// How a fake owner answers.
#[derive(Clone, Copy)]
enum Answer {
    /// 200 and the block's bytes.
    Serve,
    /// This status, no body.
    Status(u16),
    /// Nothing: the request waits until the owner is dropped.
    Hang,
    /// 200 and the block without its last byte.
    Short,
}

/// A request as a fake owner saw it: its target and `Authorization`.
type Seen = (String, Option<String>);

/// A fake owner of the blob `data`: records each request's path and
/// `Authorization` header.
struct FakeOwner {
    addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeOwner {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeOwner {
    async fn start(data: Arc<Vec<u8>>, answer: Answer) -> FakeOwner {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (data, log) = (data.clone(), log.clone());
                tokio::spawn(async move {
                    // One request a connection, then close.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let target = head.split(' ').nth(1).unwrap_or("").to_string();
                    let auth = head
                        .lines()
                        .find_map(|l| l.strip_prefix("authorization: "))
                        .map(str::to_string);
                    log.lock().unwrap().push((target.clone(), auth));
                    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                    let block = BlockRequest::parse(path, Some(query)).map(|r| r.range());
                    let (status, body): (u16, Vec<u8>) = match (answer, block) {
                        (Answer::Hang, _) => {
                            std::future::pending::<()>().await;
                            return;
                        }
                        (_, Err(_)) => (400, Vec::new()),
                        (Answer::Status(s), _) => (s, Vec::new()),
                        (Answer::Serve, Ok(r)) => {
                            (200, data[usize_from(r.start)..usize_from(r.end)].to_vec())
                        }
                        (Answer::Short, Ok(r)) => (
                            200,
                            data[usize_from(r.start)..usize_from(r.end) - 1].to_vec(),
                        ),
                    };
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                    let _ = conn.write_all(&body).await;
                });
            }
        });
        FakeOwner { addr, seen, task }
    }

    fn paths(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }
}

const TOKEN: &str = "cluster-secret";

fn settings(members: &[&str], own: Option<&str>) -> PeerSettings {
    PeerSettings {
        own: own.map(str::to_string),
        members: members.iter().map(|m| m.to_string()).collect(),
        token: TOKEN.to_string(),
        first_byte: Duration::from_millis(300),
        total: Duration::from_secs(5),
    }
}

fn repo() -> Repository {
    Repository {
        registry: "127.0.0.1:5000".into(),
        name: "app".into(),
    }
}

/// A blob of two and a half blocks.
fn blob() -> Arc<Vec<u8>> {
    Arc::new(pattern(usize::try_from(BLOCK * 5 / 2).unwrap()))
}

fn source(peers: &Peers, data: &[u8]) -> PeerBlob {
    PeerBlob::new(peers.clone(), repo(), Digest::of(data), data.len() as u64)
}

#[tokio::test]
async fn a_range_across_blocks_is_assembled_from_its_blocks_with_the_token_sent() {
    let data = blob();
    let owner = FakeOwner::start(data.clone(), Answer::Serve).await;
    let peers = Peers::new(settings(&[&owner.addr], None)).unwrap();
    let blob = source(&peers, &data);
    let range = BLOCK - 10..2 * BLOCK + 10;
    let got = blob
        .read_range(range.clone(), Intent::OnDemand)
        .await
        .unwrap();
    assert_eq!(
        &got[..],
        &data[usize_from(range.start)..usize_from(range.end)]
    );
    let inside = 10..20;
    let got = blob
        .read_range(inside.clone(), Intent::OnDemand)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[10..20]);
    let seen = owner.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "blocks 0, 1, 2, then 0 again: {seen:?}");
    for (path, auth) in &seen {
        assert_eq!(auth.as_deref(), Some("Bearer cluster-secret"), "{path}");
    }
    let mut paths = owner.paths();
    paths.sort();
    let d = Digest::of(&data);
    assert!(paths[0].starts_with(&format!("/v1/blocks/{d}/0?repo=127.0.0.1:5000/app&size=")));
    // Each block's part of the read, no more: 10 + BLOCK + 10, then 10.
    assert!(
        paths.contains(&format!(
            "/v1/blocks/{d}/0?repo=127.0.0.1:5000/app&size={}&from={}&to={BLOCK}",
            data.len(),
            BLOCK - 10
        )),
        "{paths:?}"
    );
    let stats = peers.stats();
    assert_eq!(stats.received_bytes, BLOCK + 20 + 10);
    assert_eq!((stats.requests, stats.failures), (4, 0));
}

#[tokio::test]
async fn a_refused_token_a_hung_owner_and_a_short_block_are_errors() {
    let data = blob();
    for (answer, what) in [
        (Answer::Status(401), "401"),
        (Answer::Status(503), "503"),
        (Answer::Hang, "no answer"),
        (Answer::Short, "short body"),
    ] {
        let owner = FakeOwner::start(data.clone(), answer).await;
        let peers = Peers::new(settings(&[&owner.addr], None)).unwrap();
        let got = source(&peers, &data)
            .read_range(0..100, Intent::OnDemand)
            .await;
        let e = got.expect_err(what);
        match answer {
            Answer::Status(401) => assert!(matches!(e, RegistryError::Auth { .. }), "{e}"),
            Answer::Hang => assert!(matches!(e, RegistryError::Timeout { .. }), "{e}"),
            _ => assert!(
                matches!(e, RegistryError::BadResponse { .. }),
                "{what}: {e}"
            ),
        }
        assert_eq!(peers.stats().failures, 1, "{what}");
        assert_eq!(peers.stats().received_bytes, 0, "{what}");
    }
}

#[tokio::test]
async fn no_peer_or_a_dead_one_is_an_error_the_list_reads_past() {
    let data = blob();
    // An address nobody listens on: bound, then let go.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().to_string()
    };
    for members in [vec![], vec![dead.as_str()]] {
        let peers = Peers::new(settings(&members, None)).unwrap();
        let peer: Arc<dyn BlobSource> = Arc::new(source(&peers, &data));
        assert!(peer.read_range(0..10, Intent::OnDemand).await.is_err());
        let registry = FakeBlob::instant(data.to_vec());
        let list = Sources::new(peer).then(registry.clone());
        let got = list
            .read_range(5..BLOCK + 5, Intent::OnDemand)
            .await
            .unwrap();
        assert_eq!(&got[..], &data[5..usize_from(BLOCK) + 5]);
        assert_eq!(registry.read_count(), 1, "the registry answered instead");
    }
}

#[tokio::test]
async fn each_block_goes_to_its_owner_and_a_dead_owners_to_the_next() {
    let data = blob();
    let a = FakeOwner::start(data.clone(), Answer::Serve).await;
    let b = FakeOwner::start(data.clone(), Answer::Serve).await;
    let peers = Peers::new(settings(&[&a.addr, &b.addr], None)).unwrap();
    let blob = source(&peers, &data);
    let got = blob
        .read_range(0..data.len() as u64, Intent::OnDemand)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[..]);
    let key = |i: u64| protocol::block_key(&Digest::of(&data), i);
    let names = [a.addr.as_str(), b.addr.as_str()];
    for i in 0..3u64 {
        let owner = names[rendezvous::owner(&names, &key(i)).unwrap()];
        let asked = if owner == a.addr { &a } else { &b };
        assert!(
            asked.paths().iter().any(|p| p.contains(&format!("/{i}?"))),
            "block {i} asked of its owner {owner}"
        );
    }
    assert_eq!(a.paths().len() + b.paths().len(), 3, "each block once");

    // The owner of block 0 goes away: block 0 comes from the other.
    let owner0 = names[rendezvous::owner(&names, &key(0)).unwrap()].to_string();
    let (gone, other) = if owner0 == a.addr { (a, b) } else { (b, a) };
    drop(gone);
    let before = other.paths().len();
    let got = blob.read_range(0..10, Intent::OnDemand).await.unwrap();
    assert_eq!(&got[..], &data[..10]);
    assert_eq!(other.paths().len(), before + 1, "the next owner was asked");
}

/// A block store that counts its reads.
struct Store {
    data: Arc<Vec<u8>>,
    asked: Mutex<Vec<u64>>,
}

impl OwnBlocks for Store {
    fn block(&self, req: BlockRequest) -> BoxFuture<'_, Result<Bytes, RegistryError>> {
        Box::pin(async move {
            self.asked.lock().unwrap().push(req.index);
            let r = req.range();
            Ok(Bytes::copy_from_slice(
                &self.data[usize_from(r.start)..usize_from(r.end)],
            ))
        })
    }
}

#[tokio::test]
async fn blocks_this_node_owns_come_from_its_own_store() {
    let data = blob();
    let other = FakeOwner::start(data.clone(), Answer::Serve).await;
    let own = "127.0.0.9:7600";
    // The node's own address in the list is recognised as itself.
    let peers = Peers::new(settings(&[own, &other.addr], Some(own))).unwrap();
    assert_eq!(&*peers.members(), std::slice::from_ref(&other.addr));
    let store = Arc::new(Store {
        data: data.clone(),
        asked: Mutex::new(Vec::new()),
    });
    peers.serve_locally(store.clone());
    let got = source(&peers, &data)
        .read_range(0..data.len() as u64, Intent::OnDemand)
        .await
        .unwrap();
    assert_eq!(&got[..], &data[..]);
    let names = [own, other.addr.as_str()];
    let mut local = store.asked.lock().unwrap().clone();
    local.sort();
    let owned: Vec<u64> = (0..3)
        .filter(|&i| {
            rendezvous::owner(&names, &protocol::block_key(&Digest::of(&data), i)) == Some(0)
        })
        .collect();
    assert_eq!(local, owned, "this node's blocks from its store");
    assert_eq!(
        other.paths().len(),
        3 - owned.len(),
        "the rest over the network"
    );
}

#[test]
fn the_token_is_checked_whole() {
    let peers = Peers::new(settings(&[], None)).unwrap();
    assert!(peers.authorized(Some(b"Bearer cluster-secret")));
    for wrong in [
        &b"Bearer cluster-secreT"[..],
        b"Bearer cluster-secret ",
        b"Bearer ",
        b"cluster-secret",
        b"Basic cluster-secret",
    ] {
        assert!(!peers.authorized(Some(wrong)), "{wrong:?}");
    }
    assert!(!peers.authorized(None));
}
