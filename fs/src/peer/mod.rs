//! Peers: other tarn nodes as a source of blob bytes, asked before the
//! mirrors and the registry (issue 17).
//!
//! When many nodes start one image at once, each would ask the registry
//! for the same bytes. Instead every block of a blob has one *owner* among
//! the nodes, chosen by rendezvous (highest-random-weight) hashing
//! ([`rendezvous`]), so every node agrees on it without a coordinator; a
//! node asks the owner, and the owner fetches the block from its own
//! mirrors or registry once (its singleflight) and keeps it in memory for
//! the next asker. N nodes then cost the registry about one node's bytes,
//! spread over all of them.
//!
//! # The protocol
//!
//! A blob is cut in aligned blocks of [`BLOCK`] (128 KiB; the last one
//! shorter). A node asks a block's owner, over plain HTTP/1.1:
//!
//! ```text
//! GET /v1/blocks/<digest>/<index>?repo=<registry host>/<name>&size=<blob size>[&from=F&to=T]
//! Authorization: Bearer <cluster token>
//! ```
//!
//! - `200` with exactly the block's bytes: `index*BLOCK ..
//!   min((index+1)*BLOCK, size)` of the blob, or with `&from=F&to=T`
//!   (within the block) bytes `F..T` (what a node asks: its read's part
//!   of the block);
//! - `401` without the cluster's token (and no bytes);
//! - `400` on a malformed request: digest not `sha256:<64 hex>`, size
//!   0 or over [`MAX_BLOB_SIZE`], `index*BLOCK >= size`, a repository that
//!   is not `host/name` as a reference names it;
//! - `502`/`503` when the owner could not get the block.
//!
//! The token is a shared secret sent in clear: peers talk on the cluster's
//! private network (mutual TLS is not done yet).
//!
//! # Trust
//!
//! A peer is not trusted with content: the fetcher verifies every chunk
//! against the digests it knows whatever source the bytes came from, and a
//! source only returns bytes or an error. Peers are therefore only put in
//! front of blobs whose chunks are checked by a cryptographic digest the
//! node got elsewhere (eStargz layers with a TOC digest); the daemon
//! decides that (`snapshotter/src/resolve.rs`).
//!
//! # The parts
//!
//! - [`rendezvous`]: who owns a key, pure.
//! - [`protocol`]: the block request, its path and its parsing, pure; the
//!   server (the daemon's) and the client share it.
//! - [`Peers`] (`membership.rs`): the cluster as this node sees it: the
//!   other nodes, this node's own id and block store, the token, the
//!   counters; a cheap `Clone` handle.
//! - [`PeerBlob`] (`blob.rs`): one blob read from the owners of its
//!   blocks, a [`BlobSource`](crate::registry::BlobSource).

mod blob;
mod membership;
pub mod protocol;
pub mod rendezvous;

pub use blob::PeerBlob;
pub use membership::{MAX_MEMBERS, OwnBlocks, PeerSettings, PeerStats, Peers};
pub use protocol::{BLOCK, BlockRequest, MAX_BLOB_SIZE, ProtocolError};

#[cfg(test)]
mod tests;
