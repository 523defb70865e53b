//! Reading a log another process is still writing.

use std::path::Path;
use std::time::{Duration, Instant};

/// The content of `path` once it has stopped growing: read it until two
/// reads 100 ms apart agree (at most 3 s). The registry logs a request only
/// after its last byte was written, so a client can hold the whole response
/// before the request shows in the log; a test that compares what a client
/// fetched with the log must let it catch up first.
pub fn read_settled(path: &Path) -> std::io::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut text = std::fs::read_to_string(path)?;
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let again = std::fs::read_to_string(path)?;
        if again == text || Instant::now() > deadline {
            return Ok(again);
        }
        text = again;
    }
}
