//! Reading a daemon's Prometheus endpoint (`metrics_address`) the way a
//! scraper does: a plain HTTP/1.1 `GET /metrics`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// A loopback address nothing listens on now, for a daemon's
/// `metrics_address`.
pub fn free_addr() -> std::io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// The value of `series` (a name with its labels as exposed, e.g.
/// `tarn_disk_blobs{check="failed"}`) at `addr`'s `/metrics`; `None` if
/// the endpoint does not answer or has no such series.
pub fn series(addr: SocketAddr, series: &str) -> Option<u64> {
    let mut conn = TcpStream::connect(addr).ok()?;
    // A failure bound: a daemon that accepted and hangs is not waited on.
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: tarn\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
}
