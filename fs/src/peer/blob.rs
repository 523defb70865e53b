//! [`PeerBlob`]: one blob read from the owners of its blocks.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::{self, StreamExt, TryStreamExt};
use reqwest::StatusCode;
use reqwest::header::CONTENT_LENGTH;

use super::membership::{Owner, Peers};
use super::protocol::{BlockRequest, block_range, blocks_of};
use crate::Digest;
use crate::Intent;
use crate::num::usize_from;
use crate::registry::{BlobSource, RegistryError, Repository};

/// Blocks of one read asked at once: the largest read-ahead (8 MiB) in
/// one round.
const CONCURRENT_BLOCKS: usize = 64;
const _: () = assert!(CONCURRENT_BLOCKS as u64 * super::BLOCK == 8 << 20);

/// The most blocks one read may touch (64 MiB); a larger read is left to
/// the next source.
const MAX_BLOCKS: u64 = (64 << 20) / super::BLOCK;

/// Owners asked for one block: its owner, then the next one if the owner
/// fails.
const OWNERS_ASKED: usize = 2;

/// The blob `digest` (`size` bytes) of `repo`, read from peers: each block
/// a read touches from its owner ([`Peers`]), the blocks of one read at
/// once, each checked to be exactly the block's length. Any failure is a
/// [`RegistryError`], so the list this source heads
/// ([`Sources`](crate::registry::Sources)) reads from its next member: a
/// read never fails because of a peer. Bytes are not verified here: the
/// fetcher checks them like any source's.
pub struct PeerBlob {
    peers: Peers,
    repo: Repository,
    digest: Digest,
    size: u64,
}

impl PeerBlob {
    pub fn new(peers: Peers, repo: Repository, digest: Digest, size: u64) -> PeerBlob {
        PeerBlob {
            peers,
            repo,
            digest,
            size,
        }
    }

    fn error(&self, reason: String) -> RegistryError {
        RegistryError::Unreachable {
            host: "peers".into(),
            reason: format!("blob {}: {reason}", self.digest),
        }
    }

    /// The part `span` of block `index`, from the block's owner or the
    /// next one.
    async fn block(&self, index: u64, span: Range<u64>) -> Result<Bytes, RegistryError> {
        let req = BlockRequest::new(self.repo.clone(), self.digest, index, self.size)
            .and_then(|r| r.narrowed(span.start, span.end))
            .map_err(|e| self.error(e.to_string()))?;
        let owners = self.peers.owners(&req, OWNERS_ASKED);
        let mut last = None;
        for owner in owners {
            let got = match &owner {
                Owner::Local => match self.peers.local() {
                    Some(store) => store.block(req.clone()).await,
                    None => continue,
                },
                Owner::Node(node) => self.ask(node, &req).await,
            };
            let want = req.range();
            match got {
                Ok(bytes) if bytes.len() as u64 == want.end - want.start => return Ok(bytes),
                Ok(bytes) => {
                    last = Some(self.error(format!(
                        "{} bytes for block {}, which has {}",
                        bytes.len(),
                        index,
                        want.end - want.start
                    )));
                }
                Err(e) => {
                    match &owner {
                        Owner::Node(node) if e.is_transient() => self.peers.down(node),
                        _ => {}
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| self.error("no peer to ask".into())))
    }

    /// Block `req` from `node`: its answer must begin within the first-byte
    /// timeout, be 200 and hold exactly the block's length.
    async fn ask(&self, node: &str, req: &BlockRequest) -> Result<Bytes, RegistryError> {
        let got = self.get(node, req).await;
        self.peers
            .count_request(got.as_ref().ok().map(|b: &Bytes| b.len()));
        got
    }

    async fn get(&self, node: &str, req: &BlockRequest) -> Result<Bytes, RegistryError> {
        let want = req.range();
        let want = usize_from(want.end - want.start);
        let what = format!("block {} of {}", req.index, req.digest);
        let url = format!("http://{node}{}", req.path_and_query());
        let send = self
            .peers
            .client()
            .get(&url)
            .bearer_auth(self.peers.token())
            .send();
        let timed_out = || RegistryError::Timeout {
            host: node.to_string(),
            what: what.clone(),
        };
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                timed_out()
            } else {
                RegistryError::Unreachable {
                    host: node.to_string(),
                    reason: format!("{what}: {e}"),
                }
            }
        };
        let mut resp = tokio::time::timeout(self.peers.first_byte(), send)
            .await
            .map_err(|_| timed_out())?
            .map_err(transport)?;
        let bad = |reason: String| RegistryError::BadResponse {
            host: node.to_string(),
            what: what.clone(),
            reason,
        };
        match resp.status() {
            StatusCode::OK => {}
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                return Err(RegistryError::Auth {
                    host: node.to_string(),
                    reason: format!("{s} for {what}: is the cluster token the same?"),
                });
            }
            s => return Err(bad(format!("status {s}"))),
        }
        let declared = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n != want as u64) {
            return Err(bad(format!(
                "{} bytes declared, the block has {want}",
                declared.unwrap_or_default()
            )));
        }
        let mut body = BytesMut::with_capacity(want);
        // The total timeout of the client bounds this loop.
        while let Some(piece) = resp.chunk().await.map_err(transport)? {
            if body.len() + piece.len() > want {
                return Err(bad(format!("more than the block's {want} bytes")));
            }
            body.extend_from_slice(&piece);
        }
        if body.len() != want {
            return Err(bad(format!("{} bytes, the block has {want}", body.len())));
        }
        Ok(body.freeze())
    }
}

impl BlobSource for PeerBlob {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_range(
        &self,
        range: Range<u64>,
        _intent: Intent,
    ) -> BoxFuture<'_, Result<Bytes, RegistryError>> {
        Box::pin(async move {
            if range.start > range.end || range.end > self.size {
                return Err(self.error(format!(
                    "range {}..{} is outside the blob's {} bytes",
                    range.start, range.end, self.size
                )));
            }
            if range.is_empty() {
                return Ok(Bytes::new());
            }
            let blocks = blocks_of(&range);
            let count = blocks.end() - blocks.start() + 1;
            if count > MAX_BLOCKS {
                return Err(self.error(format!("{count} blocks in one read")));
            }
            // Each block's part of the range only: an owner fetches what
            // is asked, not the whole block.
            let range = &range;
            let parts: Vec<Bytes> = stream::iter(blocks)
                .map(|i| async move {
                    let block = block_range(i, self.size);
                    let span = range.start.max(block.start)..range.end.min(block.end);
                    self.block(i, span).await
                })
                .buffered(CONCURRENT_BLOCKS)
                .try_collect()
                .await?;
            if let [one] = parts.as_slice() {
                return Ok(one.clone());
            }
            let mut out = BytesMut::with_capacity(usize_from(range.end - range.start));
            for part in &parts {
                out.extend_from_slice(part);
            }
            Ok(out.freeze())
        })
    }

    /// Another source holds the blob (the list this one heads), so bytes
    /// that failed verification are read again from there.
    fn distrust(&self, _range: Range<u64>) -> bool {
        true
    }
}
