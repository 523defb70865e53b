//! [`Peers`]: the cluster as this node sees it, shared by every
//! [`PeerBlob`](super::PeerBlob) and the daemon's block server.
//!
//! Membership is a list of nodes (`host:port` of their peer listeners),
//! replaceable while running ([`Peers::set_members`]; a static list today).
//! A node that fails to answer (refused, timed out) is left out of the
//! owners for [`DOWN_SKIP`]: its blocks go to the node ranked next, which
//! every node finds the same way once it sees the failure too.
//!
//! This node's own blocks: when the daemon serves blocks
//! ([`Peers::serve_locally`]), this node is one of the owners, and a read
//! of a block it owns goes to its own block store (the one its server
//! answers peers from) rather than over the network, so the cluster
//! fetches each block from the registry once. Without a store, the owners
//! are the other nodes only.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use sha2::{Digest as _, Sha256};

use super::protocol::{BlockRequest, block_key};
use super::rendezvous;
use crate::registry::RegistryError;

/// How long a node that did not answer is left out of the owners.
pub const DOWN_SKIP: Duration = Duration::from_secs(10);

/// The most nodes a list may name.
pub const MAX_MEMBERS: usize = 1024;

/// Blocks this node serves: its own store, read through by its server and
/// by its own reads of the blocks it owns.
pub trait OwnBlocks: Send + Sync {
    /// Exactly the bytes of `req`'s block, or why not.
    fn block(&self, req: BlockRequest) -> BoxFuture<'_, Result<Bytes, RegistryError>>;
}

/// How this node reaches its peers.
#[derive(Clone, Debug)]
pub struct PeerSettings {
    /// This node's own id: its peer listener's address as the others list
    /// it (recognised in the list and left out of it).
    pub own: Option<String>,
    /// The nodes, `host:port` each; this node's own address may be among
    /// them.
    pub members: Vec<String>,
    /// The cluster's shared token.
    pub token: String,
    /// The longest a block request waits for its answer to begin.
    pub first_byte: Duration,
    /// The longest a block request takes in all.
    pub total: Duration,
}

/// What peers sent this node and what it sent them, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Block bytes received from other nodes.
    pub received_bytes: u64,
    /// Block requests sent to other nodes, and those that failed.
    pub requests: u64,
    pub failures: u64,
    /// Block bytes this node's server sent to other nodes.
    pub served_bytes: u64,
    /// Block requests this node's server answered with bytes.
    pub served_blocks: u64,
}

/// The cluster as this node sees it; cheap to clone, share freely.
#[derive(Clone)]
pub struct Peers {
    shared: Arc<Shared>,
}

struct Shared {
    own: Option<String>,
    /// The other nodes (never this one).
    members: Mutex<Arc<[String]>>,
    token: String,
    token_sha: [u8; 32],
    pub(super) client: reqwest::Client,
    first_byte: Duration,
    local: OnceLock<Arc<dyn OwnBlocks>>,
    /// Nodes that failed, left out until then.
    down: Mutex<HashMap<String, Instant>>,
    received: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    served: AtomicU64,
    served_blocks: AtomicU64,
}

/// Who to ask for a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Owner {
    /// This node's own store.
    Local,
    /// Another node, by id (`host:port`).
    Node(String),
}

/// A node's id as every node writes it: a socket address in its canonical
/// form, else as written.
pub fn canonical(addr: &str) -> String {
    addr.trim()
        .parse::<SocketAddr>()
        .map_or_else(|_| addr.trim().to_string(), |a| a.to_string())
}

impl Peers {
    pub fn new(settings: PeerSettings) -> Result<Peers, RegistryError> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.first_byte)
            .timeout(settings.total)
            // Idle connections go soon: an owner bounds its connections.
            .pool_idle_timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(8)
            .tcp_nodelay(true)
            .tls_certs_only([])
            .user_agent(concat!("tarn/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RegistryError::Unreachable {
                host: "peers".into(),
                reason: format!("cannot build the peers' http client: {e}"),
            })?;
        let own = settings.own.as_deref().map(canonical);
        let peers = Peers {
            shared: Arc::new(Shared {
                own,
                members: Mutex::new(Arc::from(Vec::new())),
                token_sha: Sha256::digest(settings.token.as_bytes()).into(),
                token: settings.token,
                client,
                first_byte: settings.first_byte,
                local: OnceLock::new(),
                down: Mutex::new(HashMap::new()),
                received: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                served: AtomicU64::new(0),
                served_blocks: AtomicU64::new(0),
            }),
        };
        peers.set_members(&settings.members);
        Ok(peers)
    }

    /// Replaces the list of nodes (this node's own address in it is left
    /// out; at most [`MAX_MEMBERS`] are kept, duplicates once).
    pub fn set_members(&self, members: &[String]) {
        let own = self.shared.own.as_deref();
        let mut list: Vec<String> = members
            .iter()
            .map(|m| canonical(m))
            .filter(|m| !m.is_empty() && Some(m.as_str()) != own)
            .collect();
        list.sort();
        list.dedup();
        list.truncate(MAX_MEMBERS);
        *self
            .shared
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::from(list);
    }

    /// The other nodes.
    pub fn members(&self) -> Arc<[String]> {
        self.shared
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes `store` this node's blocks: this node then owns its share of
    /// blocks, read from `store` by its own reads and by its server. Once.
    pub fn serve_locally(&self, store: Arc<dyn OwnBlocks>) {
        if self.shared.local.set(store).is_err() {
            tracing::warn!("peers: a block store was already set; the second ignored");
        }
    }

    /// This node's block store, if it serves blocks.
    pub fn local(&self) -> Option<&Arc<dyn OwnBlocks>> {
        self.shared.local.get()
    }

    /// Whether `authorization` (the header's value) is `Bearer <token>`:
    /// compared as sha256s, so the time taken says nothing of the token.
    pub fn authorized(&self, authorization: Option<&[u8]>) -> bool {
        let Some(given) = authorization.and_then(|a| a.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(given).into();
        given
            .iter()
            .zip(&self.shared.token_sha)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// Counts block bytes this node's server sent to a peer.
    pub fn served(&self, n: usize) {
        self.shared.served.fetch_add(n as u64, Ordering::Relaxed);
        self.shared.served_blocks.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> PeerStats {
        let s = &self.shared;
        PeerStats {
            received_bytes: s.received.load(Ordering::Relaxed),
            requests: s.requests.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            served_bytes: s.served.load(Ordering::Relaxed),
            served_blocks: s.served_blocks.load(Ordering::Relaxed),
        }
    }

    /// The owners of block `index` of `digest`, best first, at most `n`:
    /// the nodes not down (and this one, when it serves blocks), ranked by
    /// rendezvous.
    pub(super) fn owners(&self, req: &BlockRequest, n: usize) -> Vec<Owner> {
        let members = self.members();
        let now = Instant::now();
        let mut nodes: Vec<&str> = {
            let mut down = self
                .shared
                .down
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            down.retain(|_, until| *until > now);
            members
                .iter()
                .map(String::as_str)
                .filter(|m| !down.contains_key(*m))
                .collect()
        };
        let own = match (&self.shared.own, self.local()) {
            (Some(own), Some(_)) => Some(own.as_str()),
            _ => None,
        };
        nodes.extend(own);
        let key = block_key(&req.digest, req.index);
        rendezvous::ranked(&nodes, &key)
            .into_iter()
            .take(n)
            .map(|i| {
                if Some(nodes[i]) == own {
                    Owner::Local
                } else {
                    Owner::Node(nodes[i].to_string())
                }
            })
            .collect()
    }

    /// Leaves `node` out of the owners for [`DOWN_SKIP`].
    pub(super) fn down(&self, node: &str) {
        tracing::info!(
            peer = node,
            skip_secs = DOWN_SKIP.as_secs(),
            "peer did not answer; its blocks go to the next owner"
        );
        self.shared
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node.to_string(), Instant::now() + DOWN_SKIP);
    }

    pub(super) fn token(&self) -> &str {
        &self.shared.token
    }

    pub(super) fn client(&self) -> &reqwest::Client {
        &self.shared.client
    }

    pub(super) fn first_byte(&self) -> Duration {
        self.shared.first_byte
    }

    pub(super) fn count_request(&self, received: Option<usize>) {
        let s = &self.shared;
        s.requests.fetch_add(1, Ordering::Relaxed);
        match received {
            Some(n) => s.received.fetch_add(n as u64, Ordering::Relaxed),
            None => s.failures.fetch_add(1, Ordering::Relaxed),
        };
    }
}
