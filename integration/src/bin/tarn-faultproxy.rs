//! A fault-injecting HTTP proxy for a registry on loopback: it forwards each
//! request to UPSTREAM and, for blob requests (`/blobs/` in the path) after
//! the first `--clean` ones, injects a fault with probability `--rate`,
//! drawn from a generator seeded by `--seed` (so a failing run can be
//! replayed). Faults:
//!
//! - `5xx`: a 503 with no body;
//! - `reset`: the connection is reset (RST) before any response byte;
//! - `truncate`: the headers promise the whole body, half of it is sent,
//!   then the connection closes;
//! - `stall`: the headers and a part of the body, then nothing for
//!   `--stall-secs` (longer than the client's timeout), then a close;
//! - `flip`: the whole body with one byte flipped.
//!
//! Besides, `--flip-once-at OFFSET` flips the blob byte at OFFSET in the
//! first blob response that holds it (by its Content-Range), once: a
//! registry that served one bad byte and then recovered.
//!
//! Every response is sent with `Connection: close`; one line per fault
//! goes to stderr, and `--log` appends it to a file too.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The registry behind the proxy (loopback only).
    #[arg(long)]
    upstream: SocketAddr,
    /// Probability of a fault on each blob request after the clean ones.
    #[arg(long, default_value_t = 0.3)]
    rate: f64,
    /// Seed of the fault generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Fault modes to draw from, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "5xx,reset,truncate,stall,flip"
    )]
    modes: Vec<Fault>,
    /// Blob requests served without faults first (the layer's opening).
    #[arg(long, default_value_t = 2)]
    clean: u64,
    /// How long a stall lasts, in seconds.
    #[arg(long, default_value_t = 75)]
    stall_secs: u64,
    /// Most stalls in one run (each one costs a client its timeout).
    #[arg(long, default_value_t = 1)]
    max_stalls: u64,
    /// Flip the blob byte at this offset in the first response holding it.
    #[arg(long)]
    flip_once_at: Option<u64>,
    /// Write the bound address to this file once listening.
    #[arg(long)]
    addr_file: Option<std::path::PathBuf>,
    /// Append one line per injected fault to this file.
    #[arg(long)]
    log: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Fault {
    #[value(name = "5xx")]
    ServerError,
    Reset,
    Truncate,
    Stall,
    Flip,
}

/// The shared fault schedule: a xorshift generator and counters.
struct Dice {
    state: u64,
    blob_requests: u64,
    stalls: u64,
    flipped_once: bool,
}

impl Dice {
    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x
    }

    fn unit(&mut self) -> f64 {
        // The top 53 bits as a fraction in [0, 1).
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Proxy {
    args: Args,
    dice: Mutex<Dice>,
    http: reqwest::Client,
}

impl Proxy {
    /// The fault for a request to `path`, if any.
    fn draw(&self, path: &str) -> Option<(Fault, u64)> {
        if !path.contains("/blobs/") || self.args.modes.is_empty() {
            return None;
        }
        let mut d = self.dice.lock().unwrap_or_else(|p| p.into_inner());
        d.blob_requests += 1;
        if d.blob_requests <= self.args.clean || d.unit() >= self.args.rate {
            return None;
        }
        let n = self.args.modes.len() as u64;
        let mut fault = self.args.modes[usize::try_from(d.next() % n).unwrap_or(0)];
        if fault == Fault::Stall {
            if d.stalls >= self.args.max_stalls {
                fault = Fault::ServerError;
            } else {
                d.stalls += 1;
            }
        }
        let r = d.next();
        Some((fault, r))
    }

    fn note(&self, line: &str) {
        eprintln!("tarn-faultproxy: {line}");
        if let Some(p) = &self.args.log
            && let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.listen.ip().is_loopback(), "--listen must be loopback");
    anyhow::ensure!(
        args.upstream.ip().is_loopback(),
        "--upstream must be loopback"
    );
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let local = listener.local_addr()?;
    if let Some(f) = &args.addr_file {
        std::fs::write(f, local.to_string()).with_context(|| format!("write {}", f.display()))?;
    }
    eprintln!(
        "tarn-faultproxy: {local} -> {} rate {} seed {} modes {:?}",
        args.upstream, args.rate, args.seed, args.modes
    );
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let proxy = Arc::new(Proxy {
        dice: Mutex::new(Dice {
            // xorshift needs a non-zero state.
            state: args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            blob_requests: 0,
            stalls: 0,
            flipped_once: false,
        }),
        args,
        http,
    });
    loop {
        let (client, _) = listener.accept().await?;
        let proxy = proxy.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(client, &proxy).await {
                eprintln!("tarn-faultproxy: connection: {e:#}");
            }
        });
    }
}

/// Serves one request on `client`, then closes it.
async fn serve(client: TcpStream, proxy: &Proxy) -> Result<()> {
    let mut r = BufReader::new(client);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        head.push(line.trim_end().to_string());
        if head.len() > 200 {
            bail!("request head too long");
        }
    }
    let Some(first) = head.first() else {
        return Ok(());
    };
    let mut parts = first.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("GET").to_string(),
        parts.next().unwrap_or("/").to_string(),
    );
    let mut req = proxy.http.request(
        reqwest::Method::from_bytes(method.as_bytes())?,
        format!("http://{}{path}", proxy.args.upstream),
    );
    let mut body_len = 0usize;
    for h in &head[1..] {
        let Some((k, v)) = h.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        match k.to_ascii_lowercase().as_str() {
            "host" | "connection" | "keep-alive" | "transfer-encoding" => {}
            "content-length" => body_len = v.parse().context("content-length")?,
            _ => req = req.header(k, v),
        }
    }
    let mut body = vec![0u8; body_len];
    r.read_exact(&mut body).await?;
    let mut client = r.into_inner();
    let fault = proxy.draw(&path);
    if let Some((Fault::Reset, _)) = fault {
        proxy.note(&format!("reset {method} {path}"));
        // Dropped with a zero linger, the socket sends RST, not FIN.
        client.set_zero_linger()?;
        return Ok(());
    }
    if let Some((Fault::ServerError, _)) = fault {
        proxy.note(&format!("503 {method} {path}"));
        client
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        return Ok(());
    }
    let resp = req.body(body).send().await.context("upstream")?;
    let status = resp.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (k, v) in resp.headers() {
        if matches!(
            k.as_str(),
            "connection" | "keep-alive" | "transfer-encoding" | "content-length"
        ) {
            continue;
        }
        out.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap_or("")));
    }
    let range_start = resp
        .headers()
        .get("content-range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let mut data = resp.bytes().await.context("upstream body")?.to_vec();
    if let Some(at) = proxy.args.flip_once_at
        && path.contains("/blobs/")
        && (range_start..range_start + data.len() as u64).contains(&at)
    {
        let mut d = proxy.dice.lock().unwrap_or_else(|p| p.into_inner());
        if !d.flipped_once {
            d.flipped_once = true;
            let i = usize::try_from(at - range_start).unwrap_or(0);
            data[i] ^= 0x01;
            drop(d);
            proxy.note(&format!("flip once {path} blob byte {at}"));
        }
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        data.len()
    ));
    client.write_all(out.as_bytes()).await?;
    if method == "HEAD" {
        return Ok(());
    }
    let half = data.len() / 2;
    match fault {
        Some((Fault::Truncate, _)) if !data.is_empty() => {
            proxy.note(&format!("truncate {path} at {half} of {}", data.len()));
            client.write_all(&data[..half]).await?;
        }
        Some((Fault::Stall, _)) => {
            proxy.note(&format!(
                "stall {path} for {} s after {half} of {} bytes",
                proxy.args.stall_secs,
                data.len()
            ));
            client.write_all(&data[..half]).await?;
            client.flush().await?;
            tokio::time::sleep(Duration::from_secs(proxy.args.stall_secs)).await;
        }
        Some((Fault::Flip, r)) if !data.is_empty() => {
            let i = usize::try_from(r % data.len() as u64).unwrap_or(0);
            data[i] ^= 0x01;
            proxy.note(&format!("flip {path} byte {i} of {}", data.len()));
            client.write_all(&data).await?;
        }
        _ => client.write_all(&data).await?,
    }
    client.flush().await?;
    Ok(())
}
