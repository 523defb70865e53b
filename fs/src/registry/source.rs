//! Where the fetcher reads a blob's bytes from: a [`BlobSource`], and
//! "a blob from an ordered list of sources" ([`Sources`]).
//!
//! Today the registry ([`RemoteBlob`]) is the only kind of source. Mirrors
//! and peers (DESIGN §7) will be more implementations of the same small
//! trait, listed in a [`Sources`] before or after the registry; the fetcher
//! does not change.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};

use super::client::RegistryClient;
use super::error::RegistryError;
use super::reference::Repository;
use crate::Digest;
use crate::Intent;

/// The bytes of a range as they arrive, in order.
pub type ByteStream = BoxStream<'static, Result<Bytes, RegistryError>>;

/// A blob of known size that can be read by byte range. Object-safe.
///
/// One required read, [`BlobSource::read_range`]: every source can answer
/// a bounded range with its bytes, and a fake for a test is one method.
/// Streaming is what a source that can hand over the front of a range
/// early (an HTTP body) adds by overriding
/// [`BlobSource::read_range_stream`]; the fetcher uses the stream for large
/// ranges and the whole read for the rest, so both stay on the hot path
/// with no adapter in between.
pub trait BlobSource: Send + Sync {
    /// The blob's size in bytes.
    fn size(&self) -> u64;

    /// Exactly the bytes `range` (`range.end <= size()`), not verified: the
    /// caller checks them against the digests it knows.
    fn read_range(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> BoxFuture<'_, Result<Bytes, RegistryError>>;

    /// The bytes of `range` as they arrive, in order, for callers that can
    /// use the front of a range before its end is in. The default reads
    /// the whole range and yields it as one piece.
    fn read_range_stream(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> BoxFuture<'_, Result<ByteStream, RegistryError>> {
        Box::pin(async move {
            let whole = self.read_range(range, intent).await?;
            Ok(one_piece(whole))
        })
    }
}

fn one_piece(whole: Bytes) -> ByteStream {
    futures::stream::once(futures::future::ready(Ok(whole))).boxed()
}

/// A blob from an ordered list of sources that all hold it: each read goes
/// to the first, and to the next when one fails (after that source's own
/// retries); when all fail, the last one's error is returned. A stream
/// falls back only while it is being opened: once bytes flow, a break is an
/// error item, and the fetcher asks again for what is missing (through the
/// list from its start).
///
/// Bytes that arrive but fail verification are not a read error: the
/// fetcher detects them (chunk digests) and retries. With more than one
/// member, the place for "this source gave bad bytes, skip it" is here: the
/// fetcher reports the range, and the list stops asking the member that
/// served it, which needs a read to say which member answered. With the
/// registry the only member there is nothing to skip to, so it is not built
/// yet.
pub struct Sources {
    members: Vec<Arc<dyn BlobSource>>,
}

impl Sources {
    /// A list whose first (preferred) member is `first`.
    pub fn new(first: Arc<dyn BlobSource>) -> Sources {
        Sources {
            members: vec![first],
        }
    }

    /// Adds `next`, tried after every member before it; it holds the same
    /// blob, so has the same size.
    pub fn then(mut self, next: Arc<dyn BlobSource>) -> Sources {
        debug_assert_eq!(next.size(), self.size(), "members hold one blob");
        self.members.push(next);
        self
    }
}

impl BlobSource for Sources {
    fn size(&self) -> u64 {
        self.members[0].size()
    }

    fn read_range(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> BoxFuture<'_, Result<Bytes, RegistryError>> {
        Box::pin(async move {
            let (last, before) = self
                .members
                .split_last()
                .expect("a list has a first member");
            for (i, member) in before.iter().enumerate() {
                match member.read_range(range.clone(), intent).await {
                    Ok(bytes) => return Ok(bytes),
                    Err(e) => fell_back(i, &range, &e),
                }
            }
            last.read_range(range, intent).await
        })
    }

    fn read_range_stream(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> BoxFuture<'_, Result<ByteStream, RegistryError>> {
        Box::pin(async move {
            let (last, before) = self
                .members
                .split_last()
                .expect("a list has a first member");
            for (i, member) in before.iter().enumerate() {
                match member.read_range_stream(range.clone(), intent).await {
                    Ok(stream) => return Ok(stream),
                    Err(e) => fell_back(i, &range, &e),
                }
            }
            last.read_range_stream(range, intent).await
        })
    }
}

fn fell_back(member: usize, range: &Range<u64>, e: &RegistryError) {
    tracing::debug!(
        member,
        start = range.start,
        end = range.end,
        error = %e,
        "source failed; trying the next"
    );
}

/// A blob in a registry repository.
#[derive(Clone)]
pub struct RemoteBlob {
    pub client: RegistryClient,
    pub repo: Repository,
    pub digest: Digest,
    pub size: u64,
}

impl RemoteBlob {
    fn check(&self, range: &Range<u64>) -> Result<(), RegistryError> {
        if range.end > self.size || range.start > range.end {
            return Err(RegistryError::BadResponse {
                host: self.repo.host().to_string(),
                what: format!("blob {} of {}", self.digest, self.repo),
                reason: format!(
                    "range {}..{} is outside the blob's {} bytes",
                    range.start, range.end, self.size
                ),
            });
        }
        Ok(())
    }
}

impl BlobSource for RemoteBlob {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_range(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> BoxFuture<'_, Result<Bytes, RegistryError>> {
        Box::pin(async move {
            self.check(&range)?;
            self.client
                .read_range(&self.repo, &self.digest, range, intent)
                .await
        })
    }

    fn read_range_stream(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> BoxFuture<'_, Result<ByteStream, RegistryError>> {
        Box::pin(async move {
            self.check(&range)?;
            self.client
                .read_range_stream(&self.repo, &self.digest, range, intent)
                .await
        })
    }
}

#[cfg(test)]
mod tests;
