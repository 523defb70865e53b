//! The registry's access log: the one parser of what docker-registry
//! (distribution 2.8) wrote about the requests it served, for tests, the
//! test bed, the demo and the benchmark.
//!
//! The test bed configures the registry with `formatter: json` and the
//! combined-format access log off, so every request is one JSON line:
//! "response completed" (or "... with error" for 4xx/5xx) with method, URI,
//! status (206 for a ranged GET) and `http.response.written` (body bytes
//! sent). A request refused by auth shows only as "error authorizing
//! context: ..." without a status: that one is a 401. Registry 2.8 does not
//! log request headers, so the Range of a ranged GET is not known.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::wait::wait_until;

/// One request as the registry logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request URI: path and query.
    pub path: String,
    pub status: u16,
    /// Body bytes the registry wrote in its response.
    pub bytes: u64,
}

impl Request {
    /// A GET of a blob (`/v2/NAME/blobs/DIGEST`), whole or ranged.
    pub fn is_blob_get(&self) -> bool {
        self.method == "GET" && self.path.contains("/blobs/sha256:")
    }
}

/// Body bytes and requests of a stretch of the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub bytes: u64,
    pub requests: u64,
}

impl Traffic {
    pub fn of<'a>(requests: impl IntoIterator<Item = &'a Request>) -> Traffic {
        requests
            .into_iter()
            .fold(Traffic::default(), |t, r| Traffic {
                bytes: t.bytes + r.bytes,
                requests: t.requests + 1,
            })
    }
}

/// One log line as a request; None for the lines that are not one (the
/// start-up banner, other messages, text that is not JSON).
pub fn parse_line(line: &str) -> Option<Request> {
    let v: Value = serde_json::from_str(line).ok()?;
    let msg = v["msg"].as_str()?;
    let status = if msg.starts_with("response completed") {
        v["http.response.status"]
            .as_u64()
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or(0)
    } else if msg.starts_with("error authorizing context") {
        401
    } else {
        return None;
    };
    let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    Some(Request {
        method: field("http.request.method"),
        path: field("http.request.uri"),
        status,
        bytes: v["http.response.written"].as_u64().unwrap_or(0),
    })
}

/// Every request in `text`, in order.
pub fn parse(text: &str) -> Vec<Request> {
    text.lines().filter_map(parse_line).collect()
}

/// Every request of the log at `path` between byte offsets `from` and `to`
/// (sizes the log had at two moments: marks).
pub fn read_between(path: &Path, from: u64, to: u64) -> io::Result<Vec<Request>> {
    let mut file = File::open(path)?;
    let end = file.metadata()?.len().min(to);
    file.seek(SeekFrom::Start(from.min(end)))?;
    let mut requests = Vec::new();
    for line in BufReader::new(file.take(end.saturating_sub(from))).lines() {
        requests.extend(parse_line(&line?));
    }
    Ok(requests)
}

/// The log's size now: a mark for [`read_between`].
pub fn mark(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.len())
}

/// Waits until the log at `path` has not grown for `quiet`; false if it was
/// still growing after `timeout`.
pub fn wait_quiet(path: &Path, quiet: Duration, timeout: Duration) -> io::Result<bool> {
    let mut size = mark(path)?;
    let mut since = Instant::now();
    let mut error = None;
    let outcome = wait_until("the registry log to settle", timeout, || match mark(path) {
        Ok(now) if now != size => {
            size = now;
            since = Instant::now();
            None
        }
        Ok(_) => (since.elapsed() >= quiet).then_some(()),
        Err(e) => {
            error = Some(e);
            Some(())
        }
    });
    match error {
        Some(e) => Err(e),
        None => Ok(outcome.is_ok()),
    }
}

/// How long the log must stay the same to count as settled, and the most a
/// reader waits for that.
const SETTLE_QUIET: Duration = Duration::from_millis(100);
const SETTLE_TIMEOUT: Duration = Duration::from_secs(3);

/// Every request in the log at `path` once it has stopped growing. The
/// registry logs a request only after its last byte was written, so a
/// client can hold the whole response before the request shows in the log:
/// a test that compares what a client fetched with the log must let it
/// catch up first. A log that keeps growing (a background fetch) is read as
/// it is after [`SETTLE_TIMEOUT`].
pub fn read_settled(path: &Path) -> io::Result<Vec<Request>> {
    wait_quiet(path, SETTLE_QUIET, SETTLE_TIMEOUT)?;
    Ok(parse(&std::fs::read_to_string(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LOG: &str = r#"{"level":"info","msg":"listening on 127.0.0.1:5000"}
{"http.request.method":"GET","http.request.uri":"/v2/a/blobs/sha256:00","http.response.status":206,"http.response.written":100,"level":"info","msg":"response completed"}
not json
127.0.0.1 - - [22/Nov/2026:06:28:00 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
{"http.request.method":"HEAD","http.request.uri":"/v2/","http.response.status":200,"level":"info","msg":"response completed"}
{"http.request.method":"GET","http.request.uri":"/v2/x/manifests/a","http.response.status":404,"http.response.written":96,"msg":"response completed with error"}
{"http.request.method":"GET","http.request.uri":"/v2/x/manifests/b","level":"warning","msg":"error authorizing context: basic authentication challenge"}
{"msg":"authorized request","http.response.written":9999}
"#;

    #[test]
    fn distribution_json_lines_become_requests() {
        let log = parse(LOG);
        assert_eq!(log.len(), 4);
        assert_eq!(
            log[0],
            Request {
                method: "GET".into(),
                path: "/v2/a/blobs/sha256:00".into(),
                status: 206,
                bytes: 100,
            }
        );
        assert!(log[0].is_blob_get());
        assert!(!log[1].is_blob_get());
        assert_eq!(log[1].bytes, 0, "no written field: no body");
        assert_eq!((log[2].status, log[2].bytes), (404, 96));
        assert_eq!(
            (log[3].status, log[3].path.as_str()),
            (401, "/v2/x/manifests/b")
        );
        assert_eq!(
            Traffic::of(&log),
            Traffic {
                bytes: 196,
                requests: 4
            }
        );
    }

    #[test]
    fn reading_between_marks_sees_only_what_came_between() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        let first = LOG.lines().nth(1).expect("line");
        writeln!(file, "{first}").expect("write");
        let mark1 = mark(file.path()).expect("mark");
        assert_eq!(read_between(file.path(), 0, mark1).expect("read").len(), 1);
        write!(file, "{LOG}").expect("write");
        let mark2 = mark(file.path()).expect("mark");
        writeln!(file, "{first}").expect("write");
        let between = read_between(file.path(), mark1, mark2).expect("read");
        assert_eq!(between.len(), 4);
        let after = read_between(file.path(), mark2, u64::MAX).expect("read");
        assert_eq!(after.len(), 1);
        assert!(
            read_between(file.path(), mark2 + 1000, u64::MAX)
                .expect("a mark past the end")
                .is_empty()
        );
        assert_eq!(read_settled(file.path()).expect("settled").len(), 6);
        assert!(
            wait_quiet(file.path(), Duration::ZERO, Duration::from_secs(60)).expect("quiet"),
            "an unchanging log is quiet"
        );
    }
}
