//! The scheduler's tests: link figures, the speculation budget, admission.

use futures::FutureExt;
use futures::poll;

use super::link::Estimate;
use super::*;
use crate::testing::PATIENCE;

const MIB: u64 = 1 << 20;

/// Feeds `link` one GET's pieces: `ttfb` to the first, then `bytes`
/// more over `took`, in ten pieces.
fn get(e: &mut Estimate, at: Instant, ttfb: Duration, bytes: u64, took: Duration) -> Instant {
    e.first_piece(at, ttfb, 1);
    for i in 1..=10 {
        e.piece(at + took * i / 10, bytes / 10);
    }
    let end = at + took;
    e.ended(end);
    end
}

#[test]
fn the_budget_is_what_the_link_carries_in_one_round_trip() {
    let ms = Duration::from_millis;
    let mut e = Estimate::default();
    assert_eq!(e.budget(), link::INITIAL_BUDGET, "nothing measured yet");
    let t = Instant::now();
    // RTT 40 ms, 2.5 MB/s (20 Mbit/s): 100 kB in one round trip.
    let t = get(&mut e, t, ms(40), 250_000, ms(100));
    assert!(e.budget().abs_diff(100_000) < 1000, "{}", e.budget());
    // A GET that queued behind others took longer to its first byte: the
    // least round trip stands.
    let t = get(&mut e, t, ms(300), 250_000, ms(100));
    assert!(e.budget().abs_diff(100_000) < 1000, "{}", e.budget());
    // Two GETs streaming at once share the link: their bytes add up to
    // the link's rate, not each one's half of it.
    e.first_piece(t, ms(40), 1);
    e.first_piece(t, ms(40), 1);
    for i in 1..=10 {
        e.piece(t + ms(20) * i, 25_000);
        e.piece(t + ms(20) * i, 25_000);
    }
    e.ended(t + ms(200));
    e.ended(t + ms(200));
    assert!(e.budget().abs_diff(100_000) < 1000, "{}", e.budget());
    // A near registry: no less than ten milliseconds of the link.
    let mut near = Estimate::default();
    get(&mut near, t, Duration::from_micros(300), 40 * MIB, ms(100));
    assert!(near.budget().abs_diff(4 * MIB) < 1000, "{}", near.budget());
}

#[test]
fn too_little_to_tell_a_rate_leaves_the_initial_budget() {
    let mut e = Estimate::default();
    get(
        &mut e,
        Instant::now(),
        Duration::from_millis(40),
        8 << 10,
        Duration::from_millis(5),
    );
    assert_eq!(e.budget(), link::INITIAL_BUDGET);
}

#[test]
fn read_ahead_grows_no_further_than_the_budget() {
    let s = FetchScheduler::new(SchedulerConfig {
        read_ahead: MIB,
        read_ahead_max: 8 * MIB,
        ..SchedulerConfig::default()
    });
    assert_eq!(s.read_ahead_max(), link::INITIAL_BUDGET);
    // RTT 200 ms, 25 MB/s: 5 MB in one round trip.
    get(
        &mut lock(&s.link.estimate),
        Instant::now(),
        Duration::from_millis(200),
        5 * MIB,
        Duration::from_millis(200),
    );
    assert_eq!(s.read_ahead_max(), 5 * MIB);
}

#[tokio::test]
async fn reads_fill_the_budget_and_speculation_waits_for_room() {
    let s = FetchScheduler::default();
    let budget = s.budget();
    // A read that alone fills the link: nothing speculative goes.
    let read = s.admit_read(budget, 0);
    assert_eq!(s.speculation_room(), 0);
    let size = SMALL_GET + 1;
    let pf = s.admit(Intent::Prefetch, size);
    tokio::pin!(pf);
    assert!(
        poll!(&mut pf).is_pending(),
        "no room while reads fill the link"
    );
    // Half of the read's bytes came: the prefetch fits now.
    read.piece(budget / 2);
    let pf = tokio::time::timeout(PATIENCE, pf)
        .await
        .expect("room freed as the read's bytes came");
    assert_eq!(s.speculation_room(), budget / 2 - size);
    drop(read);
    drop(pf);
    assert_eq!(s.speculation_room(), budget);
    // A read is never held back, however much is on the wire.
    let _a = s.admit(Intent::Prefetch, budget).await;
    assert!(
        s.admit(Intent::OnDemand, 10).now_or_never().is_some(),
        "reads go at once"
    );
}

#[tokio::test]
async fn small_prefetches_go_past_a_full_link_within_half_the_budget() {
    let s = FetchScheduler::default();
    let budget = s.budget();
    let allowance = budget / 2;
    assert!(allowance >= 2 * SMALL_GET, "{budget}");
    // Reads of four times the budget are on the wire, yet GETs of a few
    // small files go, as many as half the budget holds.
    let read = s.admit_read(4 * budget, 0);
    let mut small = Vec::new();
    for _ in 0..allowance / SMALL_GET {
        small.push(
            s.admit(Intent::Prefetch, SMALL_GET)
                .now_or_never()
                .expect("a small GET goes within the allowance"),
        );
    }
    // The allowance is taken: the next small one waits for room in it.
    let next = s.admit(Intent::Prefetch, 300);
    tokio::pin!(next);
    assert!(
        poll!(&mut next).is_pending(),
        "no more than the allowance past the budget"
    );
    // Larger ones never take it.
    let large = s.admit(Intent::Prefetch, SMALL_GET + 1);
    tokio::pin!(large);
    small.pop();
    let next = tokio::time::timeout(PATIENCE, next)
        .await
        .expect("room in the allowance again");
    assert!(
        poll!(&mut large).is_pending(),
        "a large GET waits for the budget"
    );
    // Reads still go at once past all of them.
    assert!(s.admit(Intent::OnDemand, 10).now_or_never().is_some());
    drop((read, next, small));
    tokio::time::timeout(PATIENCE, large)
        .await
        .expect("the reads are gone: room in the budget");
    assert_eq!(s.speculation_room(), budget);
}

#[tokio::test]
async fn one_prefetch_larger_than_the_budget_goes_alone() {
    let s = FetchScheduler::default();
    let big = s
        .admit(Intent::Prefetch, 10 * s.budget())
        .now_or_never()
        .expect("nothing on the wire: it goes");
    let next = s.admit(Intent::Prefetch, SMALL_GET + 1);
    tokio::pin!(next);
    assert!(poll!(&mut next).is_pending());
    drop(big);
    tokio::time::timeout(PATIENCE, next)
        .await
        .expect("then the next");
}

#[test]
fn hosts_have_links_of_their_own() {
    let s = FetchScheduler::default();
    let (a, b) = (s.for_host("a.example"), s.for_host("b.example"));
    let _read = a.admit_read(a.budget(), 0);
    assert_eq!(a.speculation_room(), 0);
    assert_eq!(
        b.speculation_room(),
        b.budget(),
        "another host's link is free"
    );
    assert_eq!(
        s.for_host("a.example").speculation_room(),
        0,
        "same host, same link"
    );
}

#[test]
fn no_speculation_leaves_no_room() {
    let s = FetchScheduler::new(SchedulerConfig {
        speculate: false,
        ..SchedulerConfig::default()
    });
    assert_eq!(s.speculation_room(), 0);
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
