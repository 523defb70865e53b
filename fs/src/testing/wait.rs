//! Waiting on a condition in a test, with a bound for a hung test.

use std::time::{Duration, Instant};

/// How long a test waits for something before it fails: a bound for a
/// hung test, never a measure (a loaded machine may take its time).
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Waits until `done` holds, checking it every millisecond; fails the
/// test, naming `what`, if it still does not after [`PATIENCE`].
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let give_up = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < give_up, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
