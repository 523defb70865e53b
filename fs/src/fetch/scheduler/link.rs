//! What one registry host's link carries: its round-trip time and its
//! bandwidth, measured continuously from the GETs on it, and the budget of
//! speculative bytes they give. Pure: callers supply the times.
//!
//! The two figures are filtered as BBR does: the round trip is the least
//! time-to-first-byte of recent GETs (queueing behind other bytes only ever
//! adds to it), the bandwidth the most bytes per second of recent busy
//! periods (a period ends when no GET is streaming; while several stream,
//! their bytes add up, so sharing the link does not make it look thinner).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Samples each filter keeps: old ones age out as the link changes.
const WINDOW: usize = 16;
/// The least bytes a busy period must carry to give a rate.
pub(super) const RATE_SAMPLE_MIN: u64 = 32 << 10;
/// A long busy period is cut into samples of about this long, so the
/// figure follows a link that changes under steady load.
const RATE_PERIOD: Duration = Duration::from_millis(250);
/// The shortest round trip a budget is sized for: below it (a registry on
/// the same host) per-GET costs (scheduling, decoding, FUSE) dominate and
/// a budget of one "round trip" would starve speculation for nothing.
pub(super) const RTT_FLOOR: Duration = Duration::from_millis(10);
/// Budget before both figures are measured: small enough not to crowd a
/// thin link (0.1 s at 20 Mbit/s), large enough for the first read-ahead.
pub(super) const INITIAL_BUDGET: u64 = 256 << 10;
/// Bounds on the budget whatever the figures say.
pub(super) const MIN_BUDGET: u64 = 32 << 10;
pub(super) const MAX_BUDGET: u64 = 32 << 20;

/// The figures of one link, and the busy period being measured.
#[derive(Debug, Default)]
pub(super) struct Estimate {
    rtts: VecDeque<Duration>,
    rates: VecDeque<f64>,
    /// GETs whose body is arriving now.
    streaming: usize,
    /// The busy period being measured: since when, and the bytes since.
    period: Option<(Instant, u64)>,
}

fn push<T>(window: &mut VecDeque<T>, sample: T) {
    if window.len() == WINDOW {
        window.pop_front();
    }
    window.push_back(sample);
}

impl Estimate {
    /// A GET's first piece, `len` bytes, came at `now`, `ttfb` after the
    /// GET was sent.
    pub fn first_piece(&mut self, now: Instant, ttfb: Duration, len: u64) {
        push(&mut self.rtts, ttfb);
        self.streaming += 1;
        match &mut self.period {
            // Bytes of a GET that joins a busy period arrived within it.
            Some((_, bytes)) => *bytes += len,
            // A period starts with its first piece: the time those bytes
            // took is unknown (they came with the round trip).
            None => self.period = Some((now, 0)),
        }
    }

    /// More bytes of a streaming GET came at `now`.
    pub fn piece(&mut self, now: Instant, len: u64) {
        let Some((since, bytes)) = &mut self.period else {
            return;
        };
        *bytes += len;
        if now.duration_since(*since) >= RATE_PERIOD {
            let (since, bytes) = (*since, *bytes);
            self.sample(since, bytes, now);
            self.period = Some((now, 0));
        }
    }

    /// A GET that had its first piece ended (whole, broken or dropped).
    pub fn ended(&mut self, now: Instant) {
        self.streaming = self.streaming.saturating_sub(1);
        if self.streaming == 0
            && let Some((since, bytes)) = self.period.take()
        {
            self.sample(since, bytes, now);
        }
    }

    fn sample(&mut self, since: Instant, bytes: u64, now: Instant) {
        let took = now.duration_since(since);
        if bytes >= RATE_SAMPLE_MIN && !took.is_zero() {
            push(&mut self.rates, bytes as f64 / took.as_secs_f64());
        }
    }

    /// The least recent time-to-first-byte, if any GET was measured.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtts.iter().min().copied()
    }

    /// The most recent bytes per second, if a busy period gave one.
    pub fn rate(&self) -> Option<f64> {
        self.rates.iter().copied().reduce(f64::max)
    }

    /// Speculative bytes the link may carry at once: what it carries in one
    /// round trip (no less than [`RTT_FLOOR`]), within [`MIN_BUDGET`] and
    /// [`MAX_BUDGET`]; [`INITIAL_BUDGET`] until both figures are known.
    pub fn budget(&self) -> u64 {
        let (Some(rtt), Some(rate)) = (self.rtt(), self.rate()) else {
            return INITIAL_BUDGET;
        };
        let bdp = rate * rtt.max(RTT_FLOOR).as_secs_f64();
        // `as` is the conversion wanted: a float-to-int `as` saturates (a
        // huge figure gives u64::MAX, which the clamp caps) and the figure
        // is never negative.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let bdp = bdp as u64;
        bdp.clamp(MIN_BUDGET, MAX_BUDGET)
    }
}
