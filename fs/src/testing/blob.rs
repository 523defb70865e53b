//! [`FakeBlob`]: a blob source in memory that records every read.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::Intent;
use crate::num::usize_from;
use crate::registry::{BlobSource, RegistryError};

/// One read seen by a [`FakeBlob`]: when it started and ended.
#[derive(Clone, Debug)]
pub struct Seen {
    pub range: Range<u64>,
    pub intent: Intent,
    pub started: Instant,
    pub ended: Option<Instant>,
}

/// Where a fake blob's bytes come from.
enum Content {
    Stored(Vec<u8>),
    /// Made on demand, so that a blob of a GiB costs no memory.
    Generated {
        size: u64,
        bytes: fn(Range<u64>) -> Vec<u8>,
    },
}

/// A blob in memory that records every read (range, intent, when) and
/// answers after a delay, so concurrent readers overlap; streamed reads
/// come in pieces, and one can be made to break midway. Reads of some
/// intents can be held at a gate ([`FakeBlob::hold`]) until
/// [`FakeBlob::release`]d: a test then sees what happens, or does not, while
/// they are on the wire.
pub struct FakeBlob {
    content: Content,
    seen: Arc<Mutex<Vec<Seen>>>,
    delay: Duration,
    /// Streamed reads yield pieces of this many bytes, one per
    /// `piece_delay`, after `delay`.
    piece: usize,
    piece_delay: Duration,
    /// The next streamed read breaks after this many pieces (once).
    break_after: Mutex<Option<usize>>,
    /// Intents whose reads wait at the gate now.
    held: tokio::sync::watch::Sender<Vec<Intent>>,
    /// Pieces a held streamed read yields before it waits.
    hold_after: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding it has failed already.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl FakeBlob {
    /// `data`, each read answered after 20 ms.
    pub fn new(data: Vec<u8>) -> Arc<FakeBlob> {
        FakeBlob::with_delay(data, Duration::from_millis(20))
    }

    /// `data`, each read answered at once.
    pub fn instant(data: Vec<u8>) -> Arc<FakeBlob> {
        FakeBlob::with_delay(data, Duration::ZERO)
    }

    /// `data`, each read answered after `delay`.
    pub fn with_delay(data: Vec<u8>, delay: Duration) -> Arc<FakeBlob> {
        FakeBlob::streaming(data, delay, usize::MAX, Duration::ZERO)
    }

    /// `data`, streamed reads in pieces of `piece` bytes: the first after
    /// `delay`, each next after `piece_delay`.
    pub fn streaming(
        data: Vec<u8>,
        delay: Duration,
        piece: usize,
        piece_delay: Duration,
    ) -> Arc<FakeBlob> {
        FakeBlob::of(Content::Stored(data), delay, piece, piece_delay)
    }

    /// A blob of `size` bytes whose range `r` is `bytes(r)`, answered at
    /// once; `bytes` must be consistent across overlapping ranges.
    pub fn generated(size: u64, bytes: fn(Range<u64>) -> Vec<u8>) -> Arc<FakeBlob> {
        FakeBlob::of(
            Content::Generated { size, bytes },
            Duration::ZERO,
            usize::MAX,
            Duration::ZERO,
        )
    }

    fn of(content: Content, delay: Duration, piece: usize, piece_delay: Duration) -> Arc<FakeBlob> {
        Arc::new(FakeBlob {
            content,
            seen: Arc::default(),
            delay,
            piece,
            piece_delay,
            break_after: Mutex::new(None),
            held: tokio::sync::watch::Sender::new(Vec::new()),
            hold_after: AtomicUsize::new(0),
        })
    }

    /// Reads of `intents` wait at the gate: a streamed one after yielding
    /// `after` pieces, a plain one before answering.
    pub fn hold(&self, intents: &[Intent], after: usize) {
        self.hold_after.store(after, Ordering::SeqCst);
        self.held.send_replace(intents.to_vec());
    }

    /// Lets every held read go on.
    pub fn release(&self) {
        self.held.send_replace(Vec::new());
    }

    /// Reads of `intent` started and not ended (held ones among them).
    pub fn on_the_wire(&self, intent: Intent) -> usize {
        lock(&self.seen)
            .iter()
            .filter(|s| s.intent == intent && s.ended.is_none())
            .count()
    }

    /// The next streamed read fails after `pieces` pieces (once).
    pub fn break_next_stream_after(&self, pieces: usize) {
        *lock(&self.break_after) = Some(pieces);
    }

    /// Every read so far: range and intent, in the order they started.
    pub fn reads(&self) -> Vec<(Range<u64>, Intent)> {
        self.seen()
            .into_iter()
            .map(|s| (s.range, s.intent))
            .collect()
    }

    /// How many reads (GETs) the blob has answered or is answering.
    pub fn read_count(&self) -> u64 {
        lock(&self.seen).len() as u64
    }

    /// Every read so far, with when it started and ended.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }

    /// The most reads of `intent` that were on the wire at once.
    pub fn max_concurrent(&self, intent: Intent) -> usize {
        let seen: Vec<Seen> = self
            .seen()
            .into_iter()
            .filter(|s| s.intent == intent)
            .collect();
        seen.iter()
            .map(|a| {
                seen.iter()
                    .filter(|b| b.started <= a.started && b.ended.is_none_or(|e| e > a.started))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    /// The stored bytes (`None` for a generated blob).
    pub fn data(&self) -> Option<&[u8]> {
        match &self.content {
            Content::Stored(data) => Some(data),
            Content::Generated { .. } => None,
        }
    }

    fn bytes(&self, range: Range<u64>) -> Bytes {
        match &self.content {
            Content::Stored(data) => {
                Bytes::copy_from_slice(&data[usize_from(range.start)..usize_from(range.end)])
            }
            Content::Generated { bytes, .. } => Bytes::from(bytes(range)),
        }
    }

    fn record(&self, range: &Range<u64>, intent: Intent) -> usize {
        let mut seen = lock(&self.seen);
        seen.push(Seen {
            range: range.clone(),
            intent,
            started: Instant::now(),
            ended: None,
        });
        seen.len() - 1
    }

    fn stream_of(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> BoxStream<'static, Result<Bytes, RegistryError>> {
        let slot = self.record(&range, intent);
        let bytes = self.bytes(range);
        let (delay, piece, piece_delay) = (self.delay, self.piece, self.piece_delay);
        let seen = self.seen.clone();
        let mut break_after = lock(&self.break_after).take();
        let gate = self.held.subscribe();
        let hold_after = self.hold_after.load(Ordering::SeqCst);
        let mut pieces = 0;
        futures::stream::unfold((bytes, true), move |(rest, first)| {
            let seen = seen.clone();
            let broken = break_after == Some(0);
            break_after = break_after.map(|n| n.saturating_sub(1));
            let mut gate = (pieces >= hold_after).then(|| gate.clone());
            pieces += 1;
            async move {
                if rest.is_empty() {
                    return None;
                }
                if broken {
                    let e = RegistryError::BadResponse {
                        host: "fake".into(),
                        what: "a streamed read".into(),
                        reason: "connection reset".into(),
                    };
                    return Some((Err(e), (Bytes::new(), false)));
                }
                if let Some(gate) = &mut gate {
                    let _ = gate.wait_for(|held| !held.contains(&intent)).await;
                }
                pause(if first { delay } else { piece_delay }).await;
                let mut rest = rest;
                let head = rest.split_to(piece.min(rest.len()));
                if rest.is_empty() {
                    // Ended when the last byte is handed over.
                    lock(&seen)[slot].ended = Some(Instant::now());
                }
                Some((Ok(head), (rest, false)))
            }
        })
        .boxed()
    }
}

/// Sleeps `d`; no timer at all for zero, which would cost a timer tick.
async fn pause(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

impl BlobSource for FakeBlob {
    fn size(&self) -> u64 {
        match &self.content {
            Content::Stored(data) => data.len() as u64,
            Content::Generated { size, .. } => *size,
        }
    }

    fn read_range(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> BoxFuture<'_, Result<Bytes, RegistryError>> {
        let slot = self.record(&range, intent);
        let mut gate = self.held.subscribe();
        Box::pin(async move {
            pause(self.delay).await;
            let _ = gate.wait_for(|held| !held.contains(&intent)).await;
            lock(&self.seen)[slot].ended = Some(Instant::now());
            Ok(self.bytes(range))
        })
    }

    fn read_range_stream(
        &self,
        range: Range<u64>,
        intent: Intent,
    ) -> BoxFuture<'_, Result<BoxStream<'static, Result<Bytes, RegistryError>>, RegistryError>>
    {
        let stream = self.stream_of(range, intent);
        Box::pin(async move { Ok(stream) })
    }
}
