//! [`BlobSource`]: where the fetcher reads a blob's bytes from.
//!
//! Today the only source is the registry ([`RemoteBlob`]). Mirrors and peers
//! (DESIGN §7) will be more implementations, and "a blob from an ordered list
//! of sources" one that tries its inner sources in turn; the fetcher does not
//! change.

use std::ops::Range;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};

use super::{RegistryClient, RegistryError, Repository};
use crate::Digest;
use crate::Intent;

/// A blob of known size that can be read by byte range. Object-safe.
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
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<Bytes, RegistryError>>, RegistryError>>
    {
        Box::pin(async move {
            let whole = self.read_range(range, intent).await?;
            Ok(futures::stream::once(futures::future::ready(Ok(whole))).boxed())
        })
    }
}

/// A blob in a registry repository.
#[derive(Clone)]
pub struct RemoteBlob {
    pub client: RegistryClient,
    pub repo: Repository,
    pub digest: Digest,
    pub size: u64,
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
            self.client
                .read_range(&self.repo, &self.digest, range, intent)
                .await
        })
    }

    fn read_range_stream(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<Bytes, RegistryError>>, RegistryError>>
    {
        Box::pin(async move {
            if range.end > self.size || range.start > range.end {
                // The checks (and their error) of the plain read.
                let whole = self.read_range(range, intent).await?;
                return Ok(futures::stream::once(futures::future::ready(Ok(whole))).boxed());
            }
            self.client
                .read_range_stream(&self.repo, &self.digest, range, intent)
                .await
        })
    }
}
