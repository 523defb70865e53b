//! [`FetchScheduler`]: the process-wide admission of ranged GETs by intent.
//!
//! One scheduler is shared by the fetchers of every layer so that the
//! priorities hold across layers: an on-demand read of one layer pauses the
//! background fetch of all of them.
//!
//! Reads first. Per registry host (a [`FetchScheduler::for_host`] handle)
//! the scheduler measures the link (`link.rs`: round trip and bandwidth,
//! continuously, from the GETs on it) and keeps the bytes on the wire that
//! nobody waits for within one round trip's worth of that link, the
//! *speculation budget*: a GET sent now queues behind at most that.
//!
//! - `Open` and `OnDemand` GETs are admitted at once, and their bytes count
//!   against the budget until they arrive: on a link the reads alone fill,
//!   speculation stops.
//! - Speculative bytes are those of `Prefetch` and `Background` GETs, and
//!   the read-ahead an on-demand GET carries after its own chunks. A
//!   `Prefetch` GET waits until its bytes fit in the budget (or nothing is
//!   on the wire, or it is a [`SMALL_GET`] within the small allowance);
//!   read-ahead is sized by the planner to the room left
//!   ([`FetchScheduler::speculation_room`]).
//! - `Open`, `OnDemand` and `Prefetch` GETs are *foreground* while on the
//!   wire. `Background` GETs wait until no foreground GET is in flight, then
//!   for one of [`SchedulerConfig::background_concurrency`] slots, for their
//!   bytes from the optional rate limit, and for room in the budget. A
//!   background GET already on the wire is not cancelled (its bytes are
//!   half-paid already); new ones just are not started: background is
//!   paused, never cancelled.
//!
//! Every GET passes here, so the scheduler also keeps the one daemon-wide
//! record of how long GETs took, by intent ([`FetchScheduler::get_latency`]).

mod link;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::Intent;
use crate::latency::{Latency, LatencySnapshot};
use link::Estimate;

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
    /// Whether to fetch anything before a read asks for it: read-ahead, a
    /// program's libraries, the image's entrypoint, the
    /// prioritized files. `false` fetches on demand only (a baseline).
    pub speculate: bool,
}

impl Default for SchedulerConfig {
    fn default() -> SchedulerConfig {
        SchedulerConfig {
            background_concurrency: 8,
            background_get: 4 << 20,
            background_rate: None,
            read_ahead: 1 << 20,
            read_ahead_max: 8 << 20,
            speculate: true,
        }
    }
}

/// A cheap, cloneable handle to one scheduler, for GETs to one registry
/// host; see the module docs.
#[derive(Clone)]
pub struct FetchScheduler {
    shared: Arc<Shared>,
    link: Arc<Link>,
}

struct Shared {
    config: SchedulerConfig,
    /// Open, OnDemand and Prefetch GETs on the wire now, all hosts.
    foreground: AtomicUsize,
    /// Woken when `foreground` drops to zero.
    idle: Notify,
    /// Background admissions waiting for `foreground` to drop to zero.
    paused: AtomicUsize,
    background_slots: Arc<Semaphore>,
    bucket: Option<Mutex<TokenBucket>>,
    /// The links of the hosts seen, by host name.
    links: Mutex<HashMap<String, Arc<Link>>>,
    /// How long GETs took, send to last byte, by `Intent as usize`.
    get_latency: [Latency; Intent::ALL.len()],
}

/// Hosts whose links are told apart; past this many (names come from
/// image references) the rest share one.
const MAX_LINKS: usize = 256;

/// One registry host: its measured figures and the bytes asked of it that
/// have not arrived yet.
#[derive(Default)]
struct Link {
    estimate: Mutex<Estimate>,
    /// Bytes of Open and OnDemand GETs asked for and not arrived.
    demand: AtomicU64,
    /// Bytes of speculative GETs (and read-ahead) asked for and not arrived.
    speculative: AtomicU64,
    /// Bytes of prefetch GETs admitted past the budget ([`SMALL_GET`])
    /// on the wire.
    small: AtomicU64,
    /// Woken whenever bytes arrive or a GET ends: room may have freed.
    room: Notify,
}

/// A prefetch GET this small goes even when the link is full (of reads or
/// of speculation), within a small allowance per host (half the budget, at
/// least one such GET): it delays the reads behind it by its transfer time
/// only (2.6 ms at 100 Mbit/s, 13 ms at 20 Mbit/s), while waiting for room
/// would delay *it* by the transfer of everything on the wire. The small
/// files an optimized layer puts first (what runc reads before the
/// workload starts: `/etc/passwd`, `/etc/group`) are such GETs, and the
/// container's start waits on them; so are the modules of an import chain
/// that runs while the loader fetches the interpreter's libraries, each
/// level a round trip. A flood of them waits like any other speculation.
pub const SMALL_GET: u64 = 32 << 10;

/// Tokio's clock, so that a test with paused time measures in it.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks; the figures are whole.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Link {
    fn budget(&self) -> u64 {
        lock(&self.estimate).budget()
    }

    fn on_wire(&self) -> u64 {
        self.demand.load(Ordering::Acquire) + self.speculative.load(Ordering::Acquire)
    }

    /// Takes `bytes` of the budget if they fit, or if nothing is on the
    /// wire (a GET larger than the budget goes alone).
    fn try_take(&self, bytes: u64, budget: u64) -> bool {
        let demand = self.demand.load(Ordering::Acquire);
        self.speculative
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |spec| {
                let fits = demand + spec == 0 || demand + spec + bytes <= budget;
                fits.then_some(spec + bytes)
            })
            .is_ok()
    }

    /// Takes `bytes` of the host's small allowance ([`SMALL_GET`]: half
    /// of `budget`, or one GET when nothing else holds it) if the GET is
    /// that small and they fit; its bytes count as speculative like any
    /// others.
    fn try_small(&self, bytes: u64, budget: u64) -> bool {
        let fits = |held: u64| held == 0 || held + bytes <= budget / 2;
        if bytes > SMALL_GET
            || self
                .small
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                    fits(held).then_some(held + bytes)
                })
                .is_err()
        {
            return false;
        }
        self.speculative.fetch_add(bytes, Ordering::AcqRel);
        true
    }

    /// `bytes` arrived or will not: off the counter of their kind.
    fn release(&self, counter: &AtomicU64, bytes: u64) {
        if bytes > 0 {
            let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(bytes))
            });
            self.room.notify_waiters();
        }
    }
}

impl std::fmt::Debug for FetchScheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchScheduler")
            .field("config", &self.shared.config)
            .field("foreground", &self.foreground())
            .field("budget", &self.budget())
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
        let link = Arc::new(Link::default());
        FetchScheduler {
            shared: Arc::new(Shared {
                config,
                foreground: AtomicUsize::new(0),
                idle: Notify::new(),
                paused: AtomicUsize::new(0),
                background_slots: Arc::new(Semaphore::new(slots)),
                bucket,
                links: Mutex::new(HashMap::from([(String::new(), link.clone())])),
                get_latency: Default::default(),
            }),
            link,
        }
    }

    /// The scheduler of callers that do not pass their own (one per
    /// process, default configuration).
    pub fn global() -> FetchScheduler {
        static GLOBAL: OnceLock<FetchScheduler> = OnceLock::new();
        GLOBAL.get_or_init(FetchScheduler::default).clone()
    }

    /// A handle to this scheduler for GETs to registry `host`: the same
    /// priorities across hosts, the link figures and budget of that host.
    pub fn for_host(&self, host: &str) -> FetchScheduler {
        let mut links = lock(&self.shared.links);
        let link = match links.get(host) {
            Some(l) => l.clone(),
            None if links.len() >= MAX_LINKS => self.link.clone(),
            None => {
                let l = Arc::new(Link::default());
                links.insert(host.to_owned(), l.clone());
                l
            }
        };
        FetchScheduler {
            shared: self.shared.clone(),
            link,
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.shared.config
    }

    /// The link's round trip and bandwidth (bytes per second) as measured
    /// so far.
    pub fn link_figures(&self) -> (Option<Duration>, Option<f64>) {
        let e = lock(&self.link.estimate);
        (e.rtt(), e.rate())
    }

    /// Speculative bytes this host's link may have on the wire at once:
    /// what it carries in one round trip.
    pub fn budget(&self) -> u64 {
        self.link.budget()
    }

    /// Room left in the budget now: what read-ahead may add to a GET
    /// without making the next read wait longer than a round trip.
    pub fn speculation_room(&self) -> u64 {
        if !self.shared.config.speculate {
            return 0;
        }
        self.budget().saturating_sub(self.link.on_wire())
    }

    /// The size of one speculative GET: a quarter of the budget, so that
    /// several overlap and keep the link busy while the total stays within
    /// it, and no larger than a background GET.
    pub fn speculative_get(&self) -> u64 {
        (self.budget() / 4)
            .max(link::MIN_BUDGET)
            .min(self.shared.config.background_get.max(1))
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
    /// than the link carries in one round trip. Past that, a window's tail
    /// arrives later than a miss of its own would, and delays the next
    /// miss behind it.
    pub fn read_ahead_max(&self) -> u64 {
        self.shared.config.read_ahead_max.min(self.budget())
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
            Intent::Open | Intent::OnDemand => self.admit_read(bytes, 0),
            Intent::Prefetch => {
                let small = self.wait_for_room(bytes).await;
                self.shared.foreground.fetch_add(1, Ordering::AcqRel);
                let mut permit = self.permit(0, bytes, true, None);
                permit.small = small;
                permit
            }
            Intent::Background => self.admit_background(bytes).await,
        }
    }

    /// Admits at once an on-demand GET of `demand` bytes a read waits for,
    /// followed in the same GET by `ahead` bytes of read-ahead (sized by
    /// the caller to [`FetchScheduler::speculation_room`]).
    pub fn admit_read(&self, demand: u64, ahead: u64) -> Permit {
        self.shared.foreground.fetch_add(1, Ordering::AcqRel);
        self.link.demand.fetch_add(demand, Ordering::AcqRel);
        self.link.speculative.fetch_add(ahead, Ordering::AcqRel);
        self.permit(demand, ahead, true, None)
    }

    fn permit(
        &self,
        demand: u64,
        speculative: u64,
        foreground: bool,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Permit {
        Permit {
            link: self.link.clone(),
            foreground: foreground.then(|| self.shared.clone()),
            demand: AtomicU64::new(demand),
            speculative: AtomicU64::new(speculative),
            small: 0,
            _slot: slot,
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
                let wait = lock(bucket).take(bytes, now);
                match wait {
                    None => break,
                    Some(d) => tokio::time::sleep(d).await,
                }
            }
        }
        loop {
            self.wait_for_idle().await;
            // Room is taken only once idle; a read that starts meanwhile
            // is not held up by it beyond the budget.
            let notified = self.link.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.link.try_take(bytes, self.budget()) {
                break;
            }
            notified.await;
        }
        self.permit(0, bytes, false, Some(slot))
    }

    /// Returns once `bytes` more speculative bytes fit in the budget, or
    /// in the host's small allowance for a GET that small, and has taken
    /// them: 0, or the bytes taken of the allowance.
    async fn wait_for_room(&self, bytes: u64) -> u64 {
        loop {
            let notified = self.link.room.notified();
            tokio::pin!(notified);
            // Registered before the check so a wake-up between the check
            // and the await is not lost.
            notified.as_mut().enable();
            let budget = self.budget();
            if self.link.try_take(bytes, budget) {
                return 0;
            }
            if self.link.try_small(bytes, budget) {
                return bytes;
            }
            notified.await;
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

/// Held while one admitted GET runs. The GET reports its bytes as they
/// come ([`Permit::first_piece`], [`Permit::piece`]): they measure the
/// link, and free budget room.
pub struct Permit {
    link: Arc<Link>,
    /// Set for foreground GETs, counted in [`Shared::foreground`].
    foreground: Option<Arc<Shared>>,
    /// Bytes of this GET not arrived yet, a read's first.
    demand: AtomicU64,
    speculative: AtomicU64,
    /// Bytes of the host's small allowance ([`SMALL_GET`]) held until
    /// dropped.
    small: u64,
    // Only held: dropping it frees the background slot.
    _slot: Option<OwnedSemaphorePermit>,
}

impl Permit {
    /// The first piece of a GET of this permit, `len` bytes, came `ttfb`
    /// after the GET was sent.
    pub fn first_piece(&self, ttfb: Duration, len: u64) {
        let now = now();
        lock(&self.link.estimate).first_piece(now, ttfb, len);
        self.arrived(len);
    }

    /// More bytes of a GET of this permit came.
    pub fn piece(&self, len: u64) {
        lock(&self.link.estimate).piece(now(), len);
        self.arrived(len);
    }

    /// A GET of this permit whose first piece came has ended.
    pub fn get_ended(&self) {
        lock(&self.link.estimate).ended(now());
    }

    /// `len` bytes arrived: the read's own first, then read-ahead.
    fn arrived(&self, len: u64) {
        let take = |counter: &AtomicU64, len: u64| {
            let mut took = 0;
            let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                took = v.min(len);
                Some(v - took)
            });
            took
        };
        let d = take(&self.demand, len);
        self.link.release(&self.link.demand, d);
        let s = take(&self.speculative, len - d);
        self.link.release(&self.link.speculative, s);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.link.release(&self.link.demand, *self.demand.get_mut());
        self.link
            .release(&self.link.speculative, *self.speculative.get_mut());
        if self.small > 0 {
            self.link.small.fetch_sub(self.small, Ordering::AcqRel);
            self.link.room.notify_waiters();
        }
        if let Some(shared) = &self.foreground
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
mod tests;
