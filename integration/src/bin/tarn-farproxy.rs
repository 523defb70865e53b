//! A far-registry emulator: a TCP proxy on loopback that adds a one-way delay
//! to each direction and limits bandwidth with one token bucket per direction
//! shared by all connections. The kernel of the test machines has no netem,
//! so latency has to come from user space.
//!
//! Each byte read from one side is released to the other side `delay` later
//! and only when the direction's token bucket allows; a new connection also
//! pays one round trip before its first byte, as a TCP handshake would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;

/// Emulates a far registry: delays and rate-limits TCP traffic to UPSTREAM.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The registry behind the proxy.
    #[arg(long)]
    upstream: SocketAddr,
    /// Round-trip time to add, in milliseconds (half in each direction).
    #[arg(long, default_value_t = 0)]
    rtt_ms: u64,
    /// Link rate in Mbit/s per direction, shared by all connections (0: unlimited).
    #[arg(long, default_value_t = 0.0)]
    rate_mbit: f64,
    /// Write the bound address to this file once listening.
    #[arg(long)]
    addr_file: Option<std::path::PathBuf>,
}

/// A rate limiter of bytes: the link is busy until `free_at`; each chunk
/// pushes that instant by its transmission time. Scheduling against absolute
/// instants (GCRA) means a late timer wake-up does not lower the rate.
struct Bucket {
    rate: f64,
    burst: Duration,
    free_at: Mutex<Instant>,
}

impl Bucket {
    fn new(rate_bytes: f64) -> Bucket {
        Bucket {
            rate: rate_bytes,
            burst: Duration::from_millis(5),
            free_at: Mutex::new(Instant::now()),
        }
    }

    /// Waits until `n` bytes may pass. Holding the lock while sleeping makes
    /// waiters queue in order, so one connection cannot starve the others.
    async fn take(&self, n: usize) {
        let mut free_at = self.free_at.lock().await;
        let now = Instant::now();
        *free_at = (*free_at).max(now) + Duration::from_secs_f64(n as f64 / self.rate);
        if *free_at > now + self.burst {
            tokio::time::sleep_until(*free_at - self.burst).await;
        }
    }
}

struct Link {
    one_way: Duration,
    up: Option<Bucket>,
    down: Option<Bucket>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.listen.ip().is_loopback(),
        "--listen must be a loopback address"
    );
    anyhow::ensure!(
        args.upstream.ip().is_loopback(),
        "--upstream must be a loopback address"
    );
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let local = listener.local_addr()?;
    if let Some(f) = &args.addr_file {
        std::fs::write(f, local.to_string()).with_context(|| format!("write {}", f.display()))?;
    }
    eprintln!(
        "tarn-farproxy: {local} -> {} rtt {} ms rate {} Mbit/s",
        args.upstream, args.rtt_ms, args.rate_mbit
    );
    let bucket = |mbit: f64| (mbit > 0.0).then(|| Bucket::new(mbit * 1e6 / 8.0));
    let link = Arc::new(Link {
        one_way: Duration::from_millis(args.rtt_ms) / 2,
        up: bucket(args.rate_mbit),
        down: bucket(args.rate_mbit),
    });
    loop {
        let (client, _) = listener.accept().await?;
        let link = link.clone();
        let upstream = args.upstream;
        tokio::spawn(async move {
            if let Err(e) = serve(client, upstream, link).await {
                eprintln!("tarn-farproxy: connection: {e:#}");
            }
        });
    }
}

async fn serve(client: TcpStream, upstream: SocketAddr, link: Arc<Link>) -> Result<()> {
    let accepted = Instant::now();
    let server = TcpStream::connect(upstream)
        .await
        .context("connect upstream")?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    // The handshake a real far client pays: its connect returns after one
    // round trip, so its first byte arrives one and a half round trips after
    // the SYN; here connect returned at once, so hold that byte back.
    let handshake_done = accepted + link.one_way * 3;
    let l2 = link.clone();
    let up = tokio::spawn(async move { pipe(cr, sw, &l2, true, handshake_done).await });
    let down = pipe(sr, cw, &link, false, accepted).await;
    let up = up.await.context("join")?;
    up.and(down)
}

/// Moves bytes from `r` to `w`, each chunk released `one_way` after it was
/// read and only when the direction's bucket allows.
async fn pipe<R, W>(
    mut r: R,
    mut w: W,
    link: &Link,
    upward: bool,
    not_before: Instant,
) -> Result<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin,
{
    // Bounded in chunks, so the "wire" holds at most ~16 MiB per direction.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                break;
            }
        }
    });
    let bucket = if upward { &link.up } else { &link.down };
    while let Some((read_at, data)) = rx.recv().await {
        tokio::time::sleep_until((read_at + link.one_way).max(not_before)).await;
        if let Some(b) = bucket {
            for part in data.chunks(16 * 1024) {
                b.take(part.len()).await;
                w.write_all(part).await?;
            }
        } else {
            w.write_all(&data).await?;
        }
    }
    reader.abort();
    // Pass the half-close on, as TCP would.
    let _ = w.shutdown().await;
    Ok(())
}
