//! Where the fetcher reads a blob's bytes from: a [`BlobSource`], and
//! "a blob from an ordered list of sources" ([`Sources`]).
//!
//! A registry blob ([`RemoteBlob`]) is one source; the same blob on a
//! mirror (`mirror.rs`, from containerd's `hosts.toml`) is another, listed
//! before the registry in a [`Sources`]; peers (`crate::peer::PeerBlob`)
//! are listed before both.
//! The fetcher sees one `BlobSource` either way.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};

use super::client::RegistryClient;
use super::endpoint::Endpoint;
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

    /// The bytes last read for `range` failed verification. `true` if
    /// reading it again goes to another source (a [`Sources`] then skips
    /// the member that served them); a single source has nowhere else to
    /// go.
    fn distrust(&self, range: Range<u64>) -> bool {
        let _ = range;
        false
    }
}

/// How long a member that failed a read (down, timed out, refused) is
/// skipped: the reads in between go straight to the next member instead of
/// each waiting for the same failure.
pub const FAILED_SKIP: Duration = Duration::from_secs(10);

/// How long a member whose bytes failed verification is skipped.
pub const DISTRUST_SKIP: Duration = Duration::from_secs(60);

/// How many recent reads a list remembers the member of, so a verification
/// failure can be pinned on the member that served the bytes.
const SERVED_KEPT: usize = 256;

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
/// fetcher detects them (chunk digests) and says so
/// ([`BlobSource::distrust`]); the list remembers which member served each
/// recent read, skips that member for [`DISTRUST_SKIP`], and the fetcher
/// reads the bytes again from the next. A member that fails a read is
/// skipped for [`FAILED_SKIP`]. The last member (the registry) is never
/// skipped: it is where every read ends up.
pub struct Sources {
    members: Vec<Arc<dyn BlobSource>>,
    state: Mutex<ListState>,
}

#[derive(Default)]
struct ListState {
    /// Per member: skipped until then.
    skip_until: Vec<Option<Instant>>,
    /// The most recent reads and the member that answered each.
    served: VecDeque<(Range<u64>, usize)>,
}

impl Sources {
    /// A list whose first (preferred) member is `first`.
    pub fn new(first: Arc<dyn BlobSource>) -> Sources {
        Sources {
            members: vec![first],
            state: Mutex::new(ListState {
                skip_until: vec![None],
                served: VecDeque::new(),
            }),
        }
    }

    /// Adds `next`, tried after every member before it; it holds the same
    /// blob, so has the same size.
    pub fn then(mut self, next: Arc<dyn BlobSource>) -> Sources {
        debug_assert_eq!(next.size(), self.size(), "members hold one blob");
        self.members.push(next);
        self.state_mut().skip_until.push(None);
        self
    }

    /// How many members the list has.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Always false: a list has a first member.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn state_mut(&mut self) -> &mut ListState {
        self.state.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ListState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The members to ask, in order: those not skipped, and always the last.
    fn order(&self) -> Vec<usize> {
        let now = Instant::now();
        let state = self.state();
        let last = self.members.len() - 1;
        (0..self.members.len())
            .filter(|&i| i == last || state.skip_until[i].is_none_or(|t| t <= now))
            .collect()
    }

    fn served(&self, range: &Range<u64>, member: usize) {
        let mut state = self.state();
        if state.served.len() == SERVED_KEPT {
            state.served.pop_front();
        }
        state.served.push_back((range.clone(), member));
    }

    fn failed(&self, member: usize, range: &Range<u64>, e: &RegistryError) {
        tracing::warn!(
            member,
            start = range.start,
            end = range.end,
            error = %e,
            skip_secs = FAILED_SKIP.as_secs(),
            "blob source failed; trying the next"
        );
        self.state().skip_until[member] = Some(Instant::now() + FAILED_SKIP);
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
            let order = self.order();
            let (&last, before) = order.split_last().expect("the last member is always asked");
            for &i in before {
                match self.members[i].read_range(range.clone(), intent).await {
                    Ok(bytes) => {
                        self.served(&range, i);
                        return Ok(bytes);
                    }
                    Err(e) => self.failed(i, &range, &e),
                }
            }
            let bytes = self.members[last].read_range(range.clone(), intent).await?;
            self.served(&range, last);
            Ok(bytes)
        })
    }

    fn read_range_stream(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> BoxFuture<'_, Result<ByteStream, RegistryError>> {
        Box::pin(async move {
            let order = self.order();
            let (&last, before) = order.split_last().expect("the last member is always asked");
            for &i in before {
                match self.members[i]
                    .read_range_stream(range.clone(), intent)
                    .await
                {
                    Ok(stream) => {
                        self.served(&range, i);
                        return Ok(stream);
                    }
                    Err(e) => self.failed(i, &range, &e),
                }
            }
            let stream = self.members[last]
                .read_range_stream(range.clone(), intent)
                .await?;
            self.served(&range, last);
            Ok(stream)
        })
    }

    fn distrust(&self, range: Range<u64>) -> bool {
        let last = self.members.len() - 1;
        let mut state = self.state();
        let member = state
            .served
            .iter()
            .rev()
            .find(|(r, _)| r.start < range.end && range.start < r.end)
            .map(|(_, m)| *m);
        let Some(member) = member else {
            return false;
        };
        if member == last {
            // A member of its own may still be wrong; the registry is where
            // the buck stops.
            return self.members[last].distrust(range);
        }
        tracing::warn!(
            member,
            start = range.start,
            end = range.end,
            skip_secs = DISTRUST_SKIP.as_secs(),
            "blob source served bytes that failed verification; skipping it"
        );
        state.skip_until[member] = Some(Instant::now() + DISTRUST_SKIP);
        true
    }
}

/// A blob in a registry repository, read from the registry or from one
/// host of its `hosts.toml` (a mirror, or the server it names).
#[derive(Clone)]
pub struct RemoteBlob {
    client: RegistryClient,
    /// The host's endpoint; `None`: the registry `repo` names.
    endpoint: Option<Arc<Endpoint>>,
    /// The repository as the registry names it (a host's paths are the same).
    repo: Repository,
    digest: Digest,
    size: u64,
}

impl RemoteBlob {
    /// The blob `digest` (`size` bytes) of `repo`, at its registry.
    pub fn new(client: RegistryClient, repo: Repository, digest: Digest, size: u64) -> Self {
        RemoteBlob {
            client,
            endpoint: None,
            repo,
            digest,
            size,
        }
    }

    /// The same blob on another host of the registry's `hosts.toml`.
    pub(super) fn on(&self, endpoint: Arc<Endpoint>) -> Self {
        RemoteBlob {
            endpoint: Some(endpoint),
            ..self.clone()
        }
    }

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
                .read_range_on(
                    self.endpoint.as_deref(),
                    &self.repo,
                    &self.digest,
                    range,
                    intent,
                )
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
                .read_range_stream_on(
                    self.endpoint.as_deref(),
                    &self.repo,
                    &self.digest,
                    range,
                    intent,
                )
                .await
        })
    }
}

#[cfg(test)]
mod tests;
