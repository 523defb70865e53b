//! [`FetchScheduler`]: the process-wide admission of ranged GETs by intent.
//!
//! One scheduler is shared by the fetchers of every layer so that the
//! priorities hold across layers: an on-demand read of one layer pauses the
//! background fetch of all of them.
//!
//! - `OnDemand` and `Prefetch` GETs are admitted at once and counted as
//!   *foreground* while they are on the wire.
//! - `Background` GETs wait until no foreground GET is in flight, then for
//!   one of [`SchedulerConfig::background_concurrency`] slots, then for
//!   their bytes from the optional rate limit. A background GET already on
//!   the wire is not cancelled (its bytes are half-paid already); new ones
//!   just are not started: background is paused, never cancelled.
//!
//! Every GET passes here, so the scheduler also keeps the one daemon-wide
//! record of how long GETs took, by intent ([`FetchScheduler::get_latency`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::Intent;
use crate::latency::{Latency, LatencySnapshot};

/// Tunables of a [`FetchScheduler`]. Every field has a default.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Background GETs on the wire at once, all layers together. Sized to
    /// fill the bandwidth-delay product: at RTT 200 ms and 100 Mbit/s one
    /// stream of 4 MiB GETs idles the link ~40% of the time (one RTT per
    /// GET); several overlapping GETs hide the round trips.
    pub background_concurrency: usize,
    /// Largest background GET, in compressed bytes.
    pub background_get: u64,
    /// Optional limit on background bytes per second (token bucket with a
    /// burst of one second or one GET, whichever is larger). `None`: none.
    pub background_rate: Option<u64>,
    /// Compressed bytes an on-demand miss also fetches, in the same GET, of
    /// the chunks that follow it in blob order (0 disables read-ahead).
    pub read_ahead: u64,
    /// The largest read-ahead window: a workload that keeps missing where
    /// the last window ended doubles it up to this, and up to what the link
    /// carries in one round trip ([`FetchScheduler::read_ahead_max`]).
    pub read_ahead_max: u64,
}

impl Default for SchedulerConfig {
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            background_concurrency: 8,
            background_get: 4 << 20,
            background_rate: None,
            read_ahead: 1 << 20,
            read_ahead_max: 8 << 20,
        }
    }
}

/// A cheap, cloneable handle to one scheduler; see the module docs.
#[derive(Clone)]
pub struct FetchScheduler {
    shared: Arc<Shared>,
}

struct Shared {
    config: SchedulerConfig,
    /// OnDemand and Prefetch GETs on the wire now.
    foreground: AtomicUsize,
    /// Woken when `foreground` drops to zero.
    idle: Notify,
    /// Background admissions waiting for `foreground` to drop to zero.
    paused: AtomicUsize,
    background_slots: Arc<Semaphore>,
    bucket: Option<Mutex<TokenBucket>>,
    /// Bytes the link carries in one round trip, as measured by recent
    /// GETs (a moving average); `None` until a GET large enough to tell.
    link_bdp: Mutex<Option<f64>>,
    /// How long GETs took, send to last byte, by `Intent as usize`.
    get_latency: [Latency; Intent::ALL.len()],
}

/// The smallest GET body, after its first piece, that gives a rate.
const RATE_SAMPLE_MIN: u64 = 128 << 10;

impl std::fmt::Debug for FetchScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchScheduler")
            .field("config", &self.shared.config)
            .field("foreground", &self.foreground())
            .finish()
    }
}

impl Default for FetchScheduler {
    fn default() -> FetchScheduler {
        FetchScheduler::new(SchedulerConfig::default())
    }
}

impl FetchScheduler {
    pub fn new(config: SchedulerConfig) -> FetchScheduler {
        let slots = config.background_concurrency.max(1);
        let bucket = config.background_rate.map(|rate| {
            let rate = rate.max(1);
            Mutex::new(TokenBucket::new(rate, rate.max(config.background_get)))
        });
        FetchScheduler {
            shared: Arc::new(Shared {
                config,
                foreground: AtomicUsize::new(0),
                idle: Notify::new(),
                paused: AtomicUsize::new(0),
                background_slots: Arc::new(Semaphore::new(slots)),
                bucket,
                link_bdp: Mutex::new(None),
                get_latency: Default::default(),
            }),
        }
    }

    /// The scheduler of callers that do not pass their own (one per
    /// process, default configuration).
    pub fn global() -> FetchScheduler {
        static GLOBAL: OnceLock<FetchScheduler> = OnceLock::new();
        GLOBAL.get_or_init(FetchScheduler::default).clone()
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.shared.config
    }

    /// Records one GET: its first bytes came `first` after it was sent, and
    /// `bytes` more came in the `rest` after that. Their product estimates
    /// the bandwidth-delay product (low while other GETs share the link,
    /// which errs on the side of smaller read-ahead).
    pub fn observe_get(&self, first: Duration, bytes: u64, rest: Duration) {
        if bytes < RATE_SAMPLE_MIN || rest.is_zero() {
            return;
        }
        let sample = first.as_secs_f64() * bytes as f64 / rest.as_secs_f64();
        let mut bdp = self.shared.link_bdp.lock().expect("link estimate poisoned");
        *bdp = Some(bdp.map_or(sample, |b| 0.75 * b + 0.25 * sample));
    }

    /// Records that a GET of `intent` took `took`, from sending it to its
    /// last byte (or its failure).
    pub fn record_get(&self, intent: Intent, took: Duration) {
        self.shared.get_latency[intent as usize].record(took);
    }

    /// How long GETs took since start, indexed by `Intent as usize`.
    pub fn get_latency(&self) -> [LatencySnapshot; Intent::ALL.len()] {
        std::array::from_fn(|i| self.shared.get_latency[i].snapshot())
    }

    /// The largest read-ahead window now: `read_ahead_max`, but no more
    /// than the link carries in one round trip (nor less than
    /// `read_ahead`). Past that, a window's tail arrives later than a miss
    /// of its own would, and delays the next miss behind it.
    pub fn read_ahead_max(&self) -> u64 {
        let c = &self.shared.config;
        let bdp = *self.shared.link_bdp.lock().expect("link estimate poisoned");
        // `as` is the conversion wanted here: the estimate is a byte count,
        // and a float-to-int `as` saturates (a huge estimate gives u64::MAX,
        // which the `min` below caps) instead of wrapping.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let cap = bdp.map_or(c.read_ahead_max, |b| b as u64);
        c.read_ahead_max.min(cap).max(c.read_ahead)
    }

    /// Foreground (Open, OnDemand, Prefetch) GETs on the wire now.
    pub fn foreground(&self) -> usize {
        self.shared.foreground.load(Ordering::Acquire)
    }

    /// Background GETs that have a slot and their bytes but wait for the
    /// foreground GETs on the wire to end: how paused background is now.
    pub fn paused(&self) -> usize {
        self.shared.paused.load(Ordering::Acquire)
    }

    /// Waits until a GET of `bytes` with `intent` may start; the GET runs
    /// while the returned permit lives.
    pub async fn admit(&self, intent: Intent, bytes: u64) -> Permit {
        match intent {
            Intent::Open | Intent::OnDemand | Intent::Prefetch => {
                self.shared.foreground.fetch_add(1, Ordering::AcqRel);
                Permit {
                    kind: PermitKind::Foreground(self.shared.clone()),
                }
            }
            Intent::Background => self.admit_background(bytes).await,
        }
    }

    async fn admit_background(&self, bytes: u64) -> Permit {
        let slot = self
            .shared
            .background_slots
            .clone()
            .acquire_owned()
            .await
            .expect("the scheduler never closes its semaphore");
        if let Some(bucket) = &self.shared.bucket {
            loop {
                // The lock is dropped before sleeping.
                // Tokio's clock, so that a test with paused time paces in it.
                let now = tokio::time::Instant::now().into_std();
                let wait = bucket
                    .lock()
                    .expect("token bucket lock poisoned")
                    .take(bytes, now);
                match wait {
                    None => break,
                    Some(d) => tokio::time::sleep(d).await,
                }
            }
        }
        self.wait_for_idle().await;
        Permit {
            kind: PermitKind::Background(slot),
        }
    }

    /// Returns once no foreground GET is in flight.
    async fn wait_for_idle(&self) {
        let mut _paused = None;
        loop {
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            // Registered before the check so a wake-up between the check
            // and the await is not lost.
            notified.as_mut().enable();
            if self.foreground() == 0 {
                return;
            }
            // Counted in `paused` until this returns or is cancelled.
            _paused.get_or_insert_with(|| Paused::count(&self.shared));
            notified.await;
        }
    }
}

/// One background admission counted in [`Shared::paused`] while it lives.
struct Paused<'a>(&'a Shared);

impl Paused<'_> {
    fn count(shared: &Shared) -> Paused<'_> {
        shared.paused.fetch_add(1, Ordering::AcqRel);
        Paused(shared)
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.paused.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held while one admitted GET runs.
pub struct Permit {
    kind: PermitKind,
}

enum PermitKind {
    Foreground(Arc<Shared>),
    // Only held: dropping it frees the slot.
    Background(#[allow(dead_code)] OwnedSemaphorePermit),
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let PermitKind::Foreground(shared) = &self.kind
            && shared.foreground.fetch_sub(1, Ordering::AcqRel) == 1
        {
            shared.idle.notify_waiters();
        }
    }
}

/// Bytes-per-second bucket. Pure: the caller supplies the time.
#[derive(Debug)]
struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    fn new(rate: u64, burst: u64) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst as f64,
            last: None,
        }
    }

    /// Takes `bytes` tokens if there are enough (`None`), else says how
    /// long until there will be. A request larger than the burst is let
    /// through once the bucket is full, leaving it in debt, so it is paid
    /// for by the requests after it.
    fn take(&mut self, bytes: u64, now: Instant) -> Option<Duration> {
        if let Some(last) = self.last {
            let refill = now.duration_since(last).as_secs_f64() * self.rate as f64;
            self.tokens = (self.tokens + refill).min(self.burst as f64);
        }
        self.last = Some(now);
        let need = (bytes as f64).min(self.burst as f64);
        if self.tokens >= need {
            self.tokens -= bytes as f64;
            return None;
        }
        Some(Duration::from_secs_f64(
            (need - self.tokens) / self.rate as f64,
        ))
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;
    use futures::poll;

    use super::*;
    use crate::testing::PATIENCE;

    #[test]
    fn read_ahead_grows_no_further_than_the_link_carries_in_a_round_trip() {
        const MIB: u64 = 1 << 20;
        let s = FetchScheduler::new(SchedulerConfig {
            read_ahead: MIB,
            read_ahead_max: 8 * MIB,
            ..SchedulerConfig::default()
        });
        let ms = Duration::from_millis;
        assert_eq!(s.read_ahead_max(), 8 * MIB, "nothing measured yet");
        s.observe_get(ms(100), 64 << 10, ms(5));
        assert_eq!(
            s.read_ahead_max(),
            8 * MIB,
            "too small a GET to tell a rate"
        );
        // RTT 200 ms, 25 MB/s: 5 MB in one round trip.
        s.observe_get(ms(200), 5 * MIB, ms(200));
        assert_eq!(s.read_ahead_max(), 5 * MIB);
        // Then RTT 100 ms at 12.5 MB/s, again and again: towards 1.25 MB.
        for _ in 0..30 {
            s.observe_get(ms(100), 5 * MIB / 4, ms(100));
        }
        assert!(s.read_ahead_max().abs_diff(5 * MIB / 4) < MIB / 64);
        // A fast near link: never below the base window.
        for _ in 0..30 {
            s.observe_get(Duration::from_micros(300), 4 * MIB, ms(4));
        }
        assert_eq!(s.read_ahead_max(), MIB);
    }

    #[test]
    fn the_bucket_paces_bytes_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 1000);
        assert_eq!(b.take(1000, t0), None, "a full bucket pays one burst");
        let wait = b.take(500, t0).expect("empty bucket must wait");
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        assert_eq!(b.take(500, t0 + Duration::from_millis(500)), None);
        // A GET larger than the burst passes once full and leaves debt.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.take(3000, later), None);
        let wait = b.take(1, later).expect("in debt");
        assert!(wait >= Duration::from_secs(2), "{wait:?}");
    }

    // These poll an admission by hand: a pending poll is the state in which
    // an admission that was not held back would already be ready.

    #[tokio::test]
    async fn background_waits_while_foreground_is_on_the_wire() {
        let s = FetchScheduler::default();
        let fg = s.admit(Intent::OnDemand, 10).await;
        let bg = s.admit(Intent::Background, 10);
        tokio::pin!(bg);
        assert!(
            poll!(&mut bg).is_pending(),
            "background pauses for on-demand"
        );
        assert_eq!(s.paused(), 1);
        // Prefetch is foreground too, and is admitted at once.
        let pf = s
            .admit(Intent::Prefetch, 10)
            .now_or_never()
            .expect("prefetch is not paused");
        drop(fg);
        assert!(
            poll!(&mut bg).is_pending(),
            "prefetch still holds background"
        );
        drop(pf);
        tokio::time::timeout(PATIENCE, bg)
            .await
            .expect("background resumes when foreground is idle");
        assert_eq!(s.paused(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_background_admission_is_no_longer_counted_as_paused() {
        let s = FetchScheduler::default();
        let _fg = s.admit(Intent::OnDemand, 10).await;
        let mut bg = Box::pin(s.admit(Intent::Background, 10));
        assert!(poll!(&mut bg).is_pending());
        assert_eq!(s.paused(), 1);
        drop(bg);
        assert_eq!(s.paused(), 0);
    }

    #[tokio::test]
    async fn background_concurrency_is_bounded() {
        let s = FetchScheduler::new(SchedulerConfig {
            background_concurrency: 2,
            ..SchedulerConfig::default()
        });
        let a = s.admit(Intent::Background, 1).await;
        let _b = s.admit(Intent::Background, 1).await;
        let third = s.admit(Intent::Background, 1);
        tokio::pin!(third);
        assert!(
            poll!(&mut third).is_pending(),
            "a third background GET must wait"
        );
        drop(a);
        tokio::time::timeout(PATIENCE, third)
            .await
            .expect("a freed slot admits the next");
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_paces_background_in_tokio_time() {
        let s = FetchScheduler::new(SchedulerConfig {
            background_rate: Some(1000),
            background_get: 1000,
            ..SchedulerConfig::default()
        });
        let t = tokio::time::Instant::now();
        drop(s.admit(Intent::Background, 1000).await);
        assert_eq!(t.elapsed(), Duration::ZERO, "a full bucket pays one burst");
        drop(s.admit(Intent::Background, 500).await);
        // Paused time only moves when every task waits on it: exactly the
        // half second 500 bytes take at 1000 bytes/s.
        assert_eq!(t.elapsed(), Duration::from_millis(500));
    }
}
