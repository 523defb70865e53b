//! [`BlockStore`]: the blocks this node owns, fetched once and kept in
//! memory for the next askers.
//!
//! Policy: a block asked for is looked up in the LRU; a miss joins the
//! fetch of that block already running, or starts one (a task of its own,
//! so it completes for the askers still waiting even if the first one
//! gave up): FaaSNet's and groupcache's one fetch per block however many
//! nodes ask at once. The fetch reads the block from this node's own
//! mirrors and registry (`RegistryClient::blob_source`), never from peers,
//! so a request cannot loop around the cluster. Fetched blocks are kept,
//! least recently used first out, within `max_bytes`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures::future::BoxFuture;
use tarn_fs::Digest;
use tarn_fs::Intent;
use tarn_fs::peer::{BlockRequest, OwnBlocks};
use tarn_fs::registry::{RegistryClient, RegistryError};

use crate::locks::Singleflight;

/// A block: its blob's digest and size, and its index.
type Key = (Digest, u64, u64);

/// The blocks this node owns; cheap to clone.
#[derive(Clone)]
pub struct BlockStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: RegistryClient,
    flights: Singleflight<Key, Result<Bytes, RegistryError>>,
    kept: Mutex<Lru>,
}

impl BlockStore {
    /// Fetching with `client`, keeping up to `max_bytes` of blocks.
    pub fn new(client: RegistryClient, max_bytes: u64) -> BlockStore {
        BlockStore {
            inner: Arc::new(Inner {
                client,
                flights: Singleflight::default(),
                kept: Mutex::new(Lru::new(max_bytes)),
            }),
        }
    }

    /// Block `req`: kept, in flight, or fetched now.
    pub async fn get(&self, req: BlockRequest) -> Result<Bytes, RegistryError> {
        let key = (req.digest, req.size, req.index);
        if let Some(b) = self.inner.lru().get(&key) {
            return Ok(b);
        }
        let me = self.clone();
        self.inner
            .flights
            .run(key, move || async move {
                let task = tokio::spawn(async move { me.fetch(key, req).await });
                task.await.unwrap_or_else(|e| {
                    Err(RegistryError::Unreachable {
                        host: "peers".into(),
                        reason: format!("block fetch task failed: {e}"),
                    })
                })
            })
            .await
    }

    async fn fetch(&self, key: Key, req: BlockRequest) -> Result<Bytes, RegistryError> {
        // A flight that ended between the lookup and this one kept it.
        if let Some(b) = self.inner.lru().get(&key) {
            return Ok(b);
        }
        let source = self
            .inner
            .client
            .blob_source(&req.repo, req.digest, req.size)
            .await;
        let range = req.range();
        let bytes = source.read_range(range.clone(), Intent::OnDemand).await?;
        if bytes.len() as u64 != range.end - range.start {
            return Err(RegistryError::BadResponse {
                host: req.repo.host().to_string(),
                what: format!("block {} of {}", req.index, req.digest),
                reason: format!("{} bytes, not {}", bytes.len(), range.end - range.start),
            });
        }
        self.inner.lru().insert(key, bytes.clone());
        Ok(bytes)
    }

    /// Bytes kept now.
    pub fn kept_bytes(&self) -> u64 {
        self.inner.lru().bytes
    }
}

impl Inner {
    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl OwnBlocks for BlockStore {
    fn block(&self, req: BlockRequest) -> BoxFuture<'_, Result<Bytes, RegistryError>> {
        Box::pin(self.get(req))
    }
}

/// Blocks by key, least recently used first out, within a byte bound.
struct Lru {
    max: u64,
    bytes: u64,
    tick: u64,
    entries: HashMap<Key, (u64, Bytes)>,
    /// Last use -> key, oldest first.
    order: BTreeMap<u64, Key>,
}

impl Lru {
    fn new(max: u64) -> Lru {
        Lru {
            max,
            bytes: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    fn get(&mut self, key: &Key) -> Option<Bytes> {
        let (used, bytes) = self.entries.get_mut(key)?;
        self.order.remove(used);
        self.tick += 1;
        *used = self.tick;
        self.order.insert(self.tick, *key);
        Some(bytes.clone())
    }

    fn insert(&mut self, key: Key, bytes: Bytes) {
        let len = bytes.len() as u64;
        if len > self.max || self.entries.contains_key(&key) {
            return;
        }
        while self.bytes + len > self.max {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, b)) = self.entries.remove(&old) {
                self.bytes -= b.len() as u64;
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, key);
        self.entries.insert(key, (self.tick, bytes));
        self.bytes += len;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tarn_fs::registry::{RegistryConfig, Repository};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A registry on 127.0.0.1 holding `data` as any blob: answers ranged
    /// GETs (206) after a short pause, so concurrent askers overlap;
    /// counts them.
    async fn fake_registry(data: Arc<Vec<u8>>) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let gets = Arc::new(AtomicUsize::new(0));
        let count = gets.clone();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (data, count) = (data.clone(), count.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                    let head = String::from_utf8_lossy(&head).to_lowercase();
                    let range = head
                        .lines()
                        .find_map(|l| l.strip_prefix("range: bytes="))
                        .and_then(|r| r.split_once('-'))
                        .map(|(a, b)| (a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()))
                        .unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    let body = &data[range.0..=range.1];
                    let reply = format!(
                        "HTTP/1.1 206 Partial Content\r\ncontent-length: {}\r\ncontent-range: bytes {}-{}/{}\r\nconnection: close\r\n\r\n",
                        body.len(),
                        range.0,
                        range.1,
                        data.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                    let _ = conn.write_all(body).await;
                });
            }
        });
        (addr, gets)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn askers_of_one_block_share_one_fetch_and_the_next_gets_it_from_memory() {
        let data: Arc<Vec<u8>> = Arc::new(
            (0..(3u32 << 20))
                .map(|i| u8::try_from(i % 251).unwrap())
                .collect(),
        );
        let (registry, gets) = fake_registry(data.clone()).await;
        let client = RegistryClient::new(RegistryConfig {
            plain_http: vec![registry.clone()],
            docker_config: Some("/nonexistent/config.json".into()),
            ..RegistryConfig::default()
        })
        .unwrap();
        let store = BlockStore::new(client, 4 << 20);
        let req = BlockRequest::new(
            Repository {
                registry,
                name: "app".into(),
            },
            Digest::of(&data),
            1,
            data.len() as u64,
        )
        .unwrap();
        let askers: Vec<_> = (0..8)
            .map(|_| {
                let (store, req) = (store.clone(), req.clone());
                tokio::spawn(async move { store.get(req).await })
            })
            .collect();
        for a in askers {
            let got = a.await.unwrap().unwrap();
            let block = usize::try_from(tarn_fs::peer::BLOCK).unwrap();
            assert_eq!(&got[..], &data[block..2 * block]);
        }
        assert_eq!(gets.load(Ordering::SeqCst), 1, "one fetch for eight askers");
        store.get(req).await.unwrap();
        assert_eq!(gets.load(Ordering::SeqCst), 1, "the next asker from memory");
        assert_eq!(store.kept_bytes(), tarn_fs::peer::BLOCK);
    }

    fn key(i: u64) -> Key {
        (Digest::of(b"blob"), 10, i)
    }

    #[test]
    fn the_least_recently_used_block_goes_first_and_the_bound_holds() {
        let mut lru = Lru::new(30);
        for i in 0..3 {
            lru.insert(key(i), Bytes::from(vec![0u8; 10]));
        }
        assert!(lru.get(&key(0)).is_some(), "0 used: 1 is now the oldest");
        lru.insert(key(3), Bytes::from(vec![0u8; 10]));
        assert!(lru.get(&key(1)).is_none());
        for i in [0, 2, 3] {
            assert!(lru.get(&key(i)).is_some(), "{i}");
        }
        assert_eq!(lru.bytes, 30);
        lru.insert(key(4), Bytes::from(vec![0u8; 31]));
        assert!(
            lru.get(&key(4)).is_none(),
            "larger than the bound: not kept"
        );
        lru.insert(key(5), Bytes::from(vec![0u8; 25]));
        assert_eq!(lru.bytes, 25);
        assert_eq!(lru.entries.len(), 1);
    }
}
