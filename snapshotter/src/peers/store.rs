//! [`BlockStore`]: the blocks this node owns, fetched once and kept in
//! memory for the next askers.
//!
//! Policy: the part of a block asked for is looked up in the LRU (any
//! part kept that covers it); a miss joins the fetch of that same part
//! already running, or starts one (a task of its own, so it completes for
//! the askers still waiting even if the first one gave up): FaaSNet's and
//! groupcache's one fetch per block however many nodes ask at once. Only
//! the part asked is fetched: nodes running one workload ask the same
//! parts, and whole blocks would cost the registry the blocks' rounding
//! of every read (1.4x a lazy node's bytes at 128 KiB once Python's
//! imports came as many small reads). The fetch reads the block from this node's own
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
/// A part of a block: the block's key, and the part's start and end.
type PartKey = (Digest, u64, u64, u64, u64);

/// The blocks this node owns; cheap to clone.
#[derive(Clone)]
pub struct BlockStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: RegistryClient,
    flights: Singleflight<PartKey, Result<Bytes, RegistryError>>,
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

    /// The part of a block `req` asks: kept, in flight, or fetched now.
    pub async fn get(&self, req: BlockRequest) -> Result<Bytes, RegistryError> {
        let key = (req.digest, req.size, req.index);
        if let Some(b) = self.inner.lru().get(&key, &req.span) {
            return Ok(b);
        }
        let part = (
            req.digest,
            req.size,
            req.index,
            req.span.start,
            req.span.end,
        );
        let me = self.clone();
        self.inner
            .flights
            .run(part, move || async move {
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
        if let Some(b) = self.inner.lru().get(&key, &req.span) {
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
        self.inner.lru().insert(key, range.start, bytes.clone());
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

/// The parts of blocks kept (each its start in the blob and its bytes), by
/// block, least recently used block first out, within a byte bound.
struct Lru {
    max: u64,
    bytes: u64,
    tick: u64,
    entries: HashMap<Key, (u64, Vec<(u64, Bytes)>)>,
    /// Last use -> key, oldest first.
    order: BTreeMap<u64, Key>,
}

/// Bytes `span` of a part that starts at `start`, if it covers them.
fn covering(start: u64, bytes: &Bytes, span: &std::ops::Range<u64>) -> Option<Bytes> {
    let end = start + bytes.len() as u64;
    (start <= span.start && span.end <= end).then(|| {
        bytes.slice(
            usize::try_from(span.start - start).unwrap_or(0)
                ..usize::try_from(span.end - start).unwrap_or(0),
        )
    })
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

    /// Bytes `span` of block `key`, if a part kept covers them.
    fn get(&mut self, key: &Key, span: &std::ops::Range<u64>) -> Option<Bytes> {
        let (used, parts) = self.entries.get_mut(key)?;
        let got = parts
            .iter()
            .find_map(|(start, b)| covering(*start, b, span))?;
        self.order.remove(used);
        self.tick += 1;
        *used = self.tick;
        self.order.insert(self.tick, *key);
        Some(got)
    }

    /// Keeps a part of block `key` that starts at `start`; parts it covers
    /// go.
    fn insert(&mut self, key: Key, start: u64, bytes: Bytes) {
        let len = bytes.len() as u64;
        let span = start..start + len;
        if len > self.max
            || self.entries.get(&key).is_some_and(|(_, parts)| {
                parts.iter().any(|(s, b)| covering(*s, b, &span).is_some())
            })
        {
            return;
        }
        if let Some((used, _)) = self.entries.get(&key) {
            self.order.remove(used);
        }
        let (_, parts) = self.entries.entry(key).or_insert((0, Vec::new()));
        let before: u64 = parts.iter().map(|(_, b)| b.len() as u64).sum();
        parts.retain(|(s, b)| covering(start, &bytes, &(*s..*s + b.len() as u64)).is_none());
        parts.push((start, bytes));
        let after: u64 = parts.iter().map(|(_, b)| b.len() as u64).sum();
        self.bytes = self.bytes + after - before;
        self.tick += 1;
        self.order.insert(self.tick, key);
        if let Some((used, _)) = self.entries.get_mut(&key) {
            *used = self.tick;
        }
        while self.bytes > self.max {
            let Some((_, old)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, parts)) = self.entries.remove(&old) {
                self.bytes -= parts.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
            }
        }
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
        store.get(req.clone()).await.unwrap();
        assert_eq!(gets.load(Ordering::SeqCst), 1, "the next asker from memory");
        // A part of the block: from memory too; a part of another block:
        // fetched alone, exactly.
        let block = tarn_fs::peer::BLOCK;
        let part = req.clone().narrowed(block + 10, block + 20).unwrap();
        assert_eq!(
            &store.get(part).await.unwrap()[..],
            &data[usize::try_from(block).unwrap() + 10..usize::try_from(block).unwrap() + 20]
        );
        assert_eq!(gets.load(Ordering::SeqCst), 1);
        let other = BlockRequest::new(req.repo.clone(), req.digest, 2, req.size)
            .unwrap()
            .narrowed(2 * block + 5, 2 * block + 9)
            .unwrap();
        let got = store.get(other).await.unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(gets.load(Ordering::SeqCst), 2);
        assert_eq!(store.kept_bytes(), tarn_fs::peer::BLOCK + 4);
    }

    /// A part of a block is fetched alone (the registry sends only its
    /// bytes); a part inside one kept comes from memory; a wider part is
    /// fetched and replaces the narrower one.
    #[test]
    fn parts_are_fetched_as_asked_and_served_from_any_part_that_covers_them() {
        let mut lru = Lru::new(1000);
        lru.insert(key(0), 100, Bytes::from((0..50u8).collect::<Vec<u8>>()));
        assert_eq!(
            &lru.get(&key(0), &(110..120)).unwrap()[..],
            &(10..20u8).collect::<Vec<u8>>()[..]
        );
        assert!(lru.get(&key(0), &(140..151)).is_none(), "past the part");
        assert!(lru.get(&key(0), &(99..110)).is_none(), "before the part");
        lru.insert(key(0), 120, Bytes::from(vec![7u8; 10]));
        assert_eq!(lru.bytes, 50, "inside a kept part: not kept again");
        lru.insert(key(0), 50, Bytes::from(vec![1u8; 200]));
        assert_eq!(lru.bytes, 200, "the wider part replaces the one it covers");
        assert!(lru.get(&key(0), &(60..240)).is_some());
    }

    fn key(i: u64) -> Key {
        (Digest::of(b"blob"), 10, i)
    }

    #[test]
    fn the_least_recently_used_block_goes_first_and_the_bound_holds() {
        let mut lru = Lru::new(30);
        for i in 0..3 {
            lru.insert(key(i), 0, Bytes::from(vec![0u8; 10]));
        }
        assert!(
            lru.get(&key(0), &(0..10)).is_some(),
            "0 used: 1 is now the oldest"
        );
        lru.insert(key(3), 0, Bytes::from(vec![0u8; 10]));
        assert!(lru.get(&key(1), &(0..10)).is_none());
        for i in [0, 2, 3] {
            assert!(lru.get(&key(i), &(0..10)).is_some(), "{i}");
        }
        assert_eq!(lru.bytes, 30);
        lru.insert(key(4), 0, Bytes::from(vec![0u8; 31]));
        assert!(
            lru.get(&key(4), &(0..10)).is_none(),
            "larger than the bound: not kept"
        );
        lru.insert(key(5), 0, Bytes::from(vec![0u8; 25]));
        assert_eq!(lru.bytes, 25);
        assert_eq!(lru.entries.len(), 1);
    }
}
