//! Waiting for something another process does. Tests and harnesses wait on
//! an event (a socket that answers, a log that stops growing, a counter that
//! moves); the timeout is only the bound after which the wait fails, with a
//! message naming what did not happen, so a loaded machine is slow, not red.

use std::future::Future;
use std::time::{Duration, Instant};

/// The first poll comes at once, then the pause doubles from here up to
/// [`MAX_PAUSE`]: quick events are seen quickly, slow ones cost few polls.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
// 100 ms: a waiter that times an event (the benchmark's background fetch)
// is never more than this late.
const MAX_PAUSE: Duration = Duration::from_millis(100);

/// `what` did not happen within `timeout`.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {timeout:?} waiting for {what}")]
pub struct TimedOut {
    pub what: String,
    pub timeout: Duration,
}

/// Pauses between polls: doubling from [`FIRST_PAUSE`] to [`MAX_PAUSE`],
/// never past the deadline.
struct Pacer {
    deadline: Instant,
    pause: Duration,
}

impl Pacer {
    fn new(timeout: Duration) -> Pacer {
        Pacer {
            deadline: Instant::now() + timeout,
            pause: FIRST_PAUSE,
        }
    }

    /// The next pause, or None once the deadline has passed.
    fn next(&mut self) -> Option<Duration> {
        let left = self.deadline.checked_duration_since(Instant::now())?;
        if left.is_zero() {
            return None;
        }
        let pause = self.pause.min(left);
        self.pause = (self.pause * 2).min(MAX_PAUSE);
        Some(pause)
    }
}

/// Polls `f` until it yields `Some`, sleeping between polls (on this thread:
/// not for async code, see [`wait_until_async`]). `f` runs at least once,
/// and once more at the deadline.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, TimedOut> {
    let mut pacer = Pacer::new(timeout);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        match pacer.next() {
            Some(pause) => std::thread::sleep(pause),
            None => {
                return Err(TimedOut {
                    what: what.to_owned(),
                    timeout,
                });
            }
        }
    }
}

/// [`wait_until`] for async code: `f` returns a future, and the pauses are
/// `tokio::time::sleep`, so the runtime's worker is never blocked.
pub async fn wait_until_async<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut f: F,
) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let mut pacer = Pacer::new(timeout);
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        match pacer.next() {
            Some(pause) => tokio::time::sleep(pause).await,
            None => {
                return Err(TimedOut {
                    what: what.to_owned(),
                    timeout,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn returns_the_value_once_the_condition_holds() {
        let mut calls = 0;
        let v = wait_until("three calls", Duration::from_secs(60), || {
            calls += 1;
            (calls == 3).then_some(calls * 10)
        })
        .expect("condition holds on the third call");
        assert_eq!(v, 30);
    }

    #[test]
    fn a_condition_that_never_holds_fails_naming_it() {
        let mut calls = 0;
        let err = wait_until("the impossible", Duration::ZERO, || {
            calls += 1;
            None::<()>
        })
        .expect_err("never holds");
        assert_eq!(calls, 1, "polled once even with no time at all");
        assert!(err.to_string().contains("the impossible"), "{err}");
    }

    #[tokio::test]
    async fn the_async_form_polls_futures() {
        let calls = AtomicUsize::new(0);
        let v = wait_until_async("two calls", Duration::from_secs(60), || async {
            (calls.fetch_add(1, Ordering::SeqCst) == 1).then_some("done")
        })
        .await
        .expect("holds on the second call");
        assert_eq!(v, "done");
        let err = wait_until_async("never", Duration::ZERO, || async { None::<()> })
            .await
            .expect_err("never holds");
        assert!(err.to_string().contains("never"), "{err}");
    }
}
