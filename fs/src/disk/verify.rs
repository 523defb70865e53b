//! The whole-blob check of an overlaybd layer, run as its background
//! fetch.
//!
//! overlaybd has no per-block cryptographic digest: a block is checked by
//! its CRC32C, which catches corruption, not a forger. The one digest is
//! the layer descriptor's, the sha256 of the whole blob. So once a disk is
//! mounted, each of its blobs is read whole, in order, at
//! [`Intent::Background`] through the layer's own scheduler (its budget,
//! its pause while foreground GETs run, its rate limit): the bytes go
//! through one sha256, and each block in them is decoded (CRC32C, then
//! decompressed) and cached if the cache lacks it, so the pass is also the
//! layer's background fetch and no block is fetched twice by it.
//!
//! The cache keeps decompressed blocks only, so the raw bytes of blocks
//! read before the pass are gone: the pass reads them again (what reads,
//! read-ahead and prefetch fetched before it, a few percent of a blob for
//! a container's start). Keeping raw bytes as they are fetched would have
//! stored the blob a second time for the same guarantee. A block the cache
//! had is compared with its decode from the pass's bytes: every block
//! tarn holds for a verified blob is then the decode of those bytes.
//!
//! A mismatch (the blob's sha256, or a cached block that differs) fails
//! the layer for good: its blocks leave the cache, and every later read
//! of a disk that stacks it fails (EIO at the FUSE edge). A GET that
//! fails leaves the layer unverified; the pass runs again when the layer
//! is mounted again (a restart).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

use futures::StreamExt;

use crate::Digest;
use crate::Intent;
use crate::cache::Cache;
use crate::digest::Hasher;
use crate::format::{Chunk, Format};
use crate::layer::Layer;
use crate::registry::RegistryError;

/// The smallest and largest GET of the pass. Its size is the scheduler's
/// speculative GET (a quarter of the link's budget), within these.
const MIN_GET: u64 = 256 << 10;
const MAX_GET: u64 = 8 << 20;

/// Where a blob's whole-blob check stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobCheck {
    /// Not read whole yet (`error`: why the last pass stopped, if one did).
    Unverified { error: Option<String> },
    /// The pass is running.
    Verifying,
    /// Every byte read, and the sha256 is the descriptor's digest.
    Verified,
    /// The blob is not what its digest names: the layer is failed.
    Failed(String),
}

impl BlobCheck {
    /// One word for status lines and the admin API.
    pub fn name(&self) -> &'static str {
        match self {
            BlobCheck::Unverified { .. } => "unverified",
            BlobCheck::Verifying => "verifying",
            BlobCheck::Verified => "verified",
            BlobCheck::Failed(_) => "failed",
        }
    }
}

/// Why a pass did not verify its blob.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("blob {want} read whole has sha256 {got}: its bytes are not the layer's")]
    Mismatch { want: Digest, got: Digest },
    #[error(
        "block at {offset} of blob {blob} was cached with other bytes than the blob holds there"
    )]
    CachedDiffers { blob: Digest, offset: u64 },
    #[error("reading blob {blob} whole: {source}")]
    Registry {
        blob: Digest,
        // Boxed: the error is carried through every `Result` of the pass.
        #[source]
        source: Box<RegistryError>,
    },
    #[error("blob {blob}: {got} bytes came for range {start}..{end}")]
    Short {
        blob: Digest,
        start: u64,
        end: u64,
        got: u64,
    },
    #[error("block check task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl VerifyError {
    /// Whether the blob is proven wrong (else the pass only stopped).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            VerifyError::Mismatch { .. } | VerifyError::CachedDiffers { .. }
        )
    }
}

/// A blob's check, shared by its layer and its pass.
#[derive(Debug)]
pub struct BlobState {
    check: Mutex<BlobCheck>,
    /// Set with `Failed`: read on every disk read, without the lock.
    failed: AtomicBool,
    /// Blob bytes the running (or last) pass has hashed.
    hashed: AtomicU64,
}

impl Default for BlobState {
    fn default() -> Self {
        BlobState {
            check: Mutex::new(BlobCheck::Unverified { error: None }),
            failed: AtomicBool::new(false),
            hashed: AtomicU64::new(0),
        }
    }
}

impl BlobState {
    pub fn check(&self) -> BlobCheck {
        self.lock().clone()
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub fn hashed_bytes(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    /// Marks a pass as started; `false` if one runs, or the blob is
    /// verified or failed already.
    pub(super) fn begin(&self) -> bool {
        let mut c = self.lock();
        if !matches!(*c, BlobCheck::Unverified { .. }) {
            return false;
        }
        *c = BlobCheck::Verifying;
        self.hashed.store(0, Ordering::Relaxed);
        true
    }

    fn end(&self, to: BlobCheck) {
        if matches!(to, BlobCheck::Failed(_)) {
            self.failed.store(true, Ordering::Release);
        }
        *self.lock() = to;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BlobCheck> {
        // Nothing panics holding it; the state is whole either way.
        self.check.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs one pass over blob `blob` of `layer` (begun with
/// [`BlobState::begin`]) and records how it ended. Holds the layer only
/// for each piece: once the disks using it are gone, the pass stops.
pub(super) async fn run(layer: Weak<Layer>, blob: Digest, state: Arc<BlobState>) -> BlobCheck {
    let started = Instant::now();
    let end = match pass(&layer, blob, &state).await {
        Ok(true) => {
            tracing::info!(
                %blob,
                bytes = state.hashed_bytes(),
                elapsed_ms = started.elapsed().as_millis(),
                "overlaybd blob verified: its sha256 is the descriptor's digest"
            );
            BlobCheck::Verified
        }
        Ok(false) => BlobCheck::Unverified {
            error: Some("stopped: the layer was unmounted".into()),
        },
        Err(e) if e.is_fatal() => {
            tracing::error!(%blob, error = %e, "overlaybd layer failed: its reads fail from now on and its cached blocks are dropped");
            state.end(BlobCheck::Failed(e.to_string()));
            if let Some(l) = layer.upgrade() {
                let cache = l.cache().clone();
                let keys: Vec<Digest> = l.index().chunks.iter().map(|c| c.digest).collect();
                let dropped = tokio::task::spawn_blocking(move || cache.discard(keys.iter())).await;
                tracing::info!(%blob, dropped = dropped.unwrap_or(0), "failed layer's blocks dropped from the cache");
            }
            return state.check();
        }
        Err(e) => {
            tracing::warn!(%blob, error = %e, "overlaybd blob not verified: the next mount tries again");
            BlobCheck::Unverified {
                error: Some(e.to_string()),
            }
        }
    };
    state.end(end.clone());
    end
}

/// Reads the blob whole; `Ok(false)` if the layer went away first.
async fn pass(layer: &Weak<Layer>, blob: Digest, state: &BlobState) -> Result<bool, VerifyError> {
    let Some(l) = layer.upgrade() else {
        return Ok(false);
    };
    let fetcher = l.fetcher().clone();
    // Blocks are laid out in order (ZFile blocks, raw runs); were they
    // not, the pass would still hash the blob but cache nothing.
    let ordered = l
        .index()
        .chunks
        .windows(2)
        .all(|w| w[0].blob_range.1 <= w[1].blob_range.0);
    drop(l);
    let source = fetcher.source().clone();
    let scheduler = fetcher.scheduler().clone();
    let size = source.size();
    let mut hasher = Hasher::default();
    let mut pos = 0;
    while pos < size {
        let get = scheduler.speculative_get().clamp(MIN_GET, MAX_GET);
        let mut end = size.min(pos.saturating_add(get));
        let blocks = {
            let Some(l) = layer.upgrade() else {
                return Ok(false);
            };
            let chunks = &l.index().chunks;
            if ordered {
                // A block across the piece's end goes into this piece.
                let last = chunks.partition_point(|c| c.blob_range.0 < end);
                if let Some(c) = last.checked_sub(1).and_then(|i| chunks.get(i)) {
                    end = end.max(c.blob_range.1.min(size));
                }
                let first = chunks.partition_point(|c| c.blob_range.0 < pos);
                chunks.get(first..last).unwrap_or_default().to_vec()
            } else {
                Vec::new()
            }
        };
        let bytes = get_range(&fetcher, blob, pos, end).await?;
        hasher.update(&bytes);
        state.hashed.fetch_add(end - pos, Ordering::Relaxed);
        let Some(l) = layer.upgrade() else {
            return Ok(false);
        };
        let (format, cache) = (fetcher.format().clone(), l.cache().clone());
        drop(l);
        let (inserted, bad) = tokio::task::spawn_blocking(move || {
            check_blocks(&*format, &cache, blob, &blocks, pos, &bytes)
        })
        .await??;
        fetcher.stats().chunks_fetched(inserted);
        fetcher.stats().verify_failures(bad);
        pos = end;
    }
    let got = hasher.finish();
    if got != blob {
        return Err(VerifyError::Mismatch { want: blob, got });
    }
    Ok(true)
}

/// The blob's bytes `start..end`, one background GET, admitted and
/// counted as the fetcher's own are.
async fn get_range(
    fetcher: &crate::fetch::Fetcher,
    blob: Digest,
    start: u64,
    end: u64,
) -> Result<Vec<u8>, VerifyError> {
    let len = end - start;
    let scheduler = fetcher.scheduler();
    let permit = scheduler.admit(Intent::Background, len).await;
    let registry = |source: RegistryError| VerifyError::Registry {
        blob,
        source: Box::new(source),
    };
    let sent = Instant::now();
    let mut stream = fetcher
        .source()
        .read_range_stream(start..end, Intent::Background)
        .await
        .map_err(registry)?;
    fetcher.stats().request_started(Intent::Background);
    let mut out = Vec::with_capacity(crate::num::usize_from(len));
    let mut first = true;
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(registry)?;
        let n = piece.len() as u64;
        if out.len() as u64 + n > len {
            return Err(VerifyError::Short {
                blob,
                start,
                end,
                got: out.len() as u64 + n,
            });
        }
        if first {
            permit.first_piece(sent.elapsed(), n);
            first = false;
        } else {
            permit.piece(n);
        }
        fetcher.stats().bytes_received(Intent::Background, n);
        out.extend_from_slice(&piece);
    }
    permit.get_ended();
    scheduler.record_get(Intent::Background, sent.elapsed());
    if out.len() as u64 != len {
        return Err(VerifyError::Short {
            blob,
            start,
            end,
            got: out.len() as u64,
        });
    }
    Ok(out)
}

/// Decodes each of `blocks` out of `bytes` (blob bytes from `at`): a block
/// the cache lacks is cached, one it has must be the same. Returns the
/// blocks cached and those that did not decode (their CRC failed: the
/// blob's sha256 will not match either). Blocking.
fn check_blocks(
    format: &dyn Format,
    cache: &Cache,
    blob: Digest,
    blocks: &[Chunk],
    at: u64,
    bytes: &[u8],
) -> Result<(u64, u64), VerifyError> {
    let (mut inserted, mut bad) = (0, 0);
    for c in blocks {
        let (Some(from), Some(to)) = (
            c.blob_range.0.checked_sub(at),
            c.blob_range.1.checked_sub(at),
        ) else {
            continue;
        };
        let Some(raw) = bytes.get(crate::num::usize_from(from)..crate::num::usize_from(to)) else {
            continue;
        };
        let plain = match format.decode_chunk(c, raw) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(%blob, offset = c.blob_range.0, error = %e, "overlaybd block failed its check in the whole-blob pass");
                bad += 1;
                continue;
            }
        };
        if cache.contains(&c.digest) {
            match cache.read(&c.digest, 0, plain.len()) {
                Ok(Some(old)) if old != plain => {
                    return Err(VerifyError::CachedDiffers {
                        blob,
                        offset: c.blob_range.0,
                    });
                }
                // Same bytes; or evicted, unreadable, of another length
                // (dropped by the read): a read fetches it again.
                _ => {}
            }
        } else if let Err(e) = cache.insert(&c.digest, &plain) {
            tracing::warn!(%blob, error = %e, "caching an overlaybd block failed");
        } else {
            inserted += 1;
        }
    }
    Ok((inserted, bad))
}
