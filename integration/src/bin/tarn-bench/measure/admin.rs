//! Questions to tarn's admin API (a gRPC service on a unix socket): which
//! layers are mounted and how much of each has been fetched.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tarn_proto::admin::admin_client::AdminClient;
use tarn_proto::admin::{Layer, LayerState, ListLayersRequest, StatsRequest};
use tonic::transport::{Channel, Endpoint, Uri};

/// How often completion is checked: well under the resolution the
/// benchmark reports (tenths of a second over tens of seconds).
const POLL: Duration = Duration::from_millis(100);

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")
}

/// A tonic channel over a unix socket (the URI is a placeholder tonic
/// requires; the connector ignores it).
async fn connect(path: &Path) -> Result<AdminClient<Channel>> {
    if !path.exists() {
        bail!(
            "tarn's admin socket {} does not exist (daemon without the admin API?)",
            path.display()
        );
    }
    let owned = path.to_owned();
    let channel = Endpoint::try_from("http://[::1]:50051")?
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = owned.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .with_context(|| format!("cannot connect to tarn's admin socket {}", path.display()))?;
    Ok(AdminClient::new(channel))
}

async fn list(client: &mut AdminClient<Channel>) -> Result<Vec<Layer>> {
    Ok(client
        .list_layers(ListLayersRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .context("cannot list tarn's layers")?
        .into_inner()
        .layers)
}

fn complete(l: &Layer) -> bool {
    l.state == LayerState::Complete as i32 || (l.blob_size > 0 && l.bytes_fetched >= l.blob_size)
}

/// Waits until at least `min_layers` layers are mounted and all of them are
/// fully fetched.
pub fn wait_fetched(admin: &Path, timeout: Duration, min_layers: usize) -> Result<Value> {
    runtime()?.block_on(async {
        let deadline = Instant::now() + timeout;
        let mut client = connect(admin).await?;
        loop {
            let layers = list(&mut client).await?;
            if let Some(failed) = layers.iter().find(|l| l.state == LayerState::Failed as i32) {
                bail!("layer {} failed in the daemon", failed.layer_digest);
            }
            let fetched: u64 = layers.iter().map(|l| l.bytes_fetched).sum();
            let total: u64 = layers.iter().map(|l| l.blob_size).sum();
            if layers.len() >= min_layers && layers.iter().all(complete) {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .context("clock before 1970")?;
                return Ok(json!({
                    "done_at": now.as_secs_f64(),
                    "bytes": fetched,
                    "blob_bytes": total,
                    "layers": layers.len(),
                }));
            }
            if Instant::now() >= deadline {
                bail!(
                    "background fetch incomplete after {}s: {} of {} bytes in {} layers",
                    timeout.as_secs(),
                    fetched,
                    total,
                    layers.len()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    })
}

/// The mounted layers and the daemon's fallback count.
pub fn layers(admin: &Path) -> Result<Value> {
    runtime()?.block_on(async {
        let mut client = connect(admin).await?;
        let layers = list(&mut client).await?;
        let stats = client
            .stats(StatsRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))
            .context("cannot read tarn's statistics")?
            .into_inner();
        let digests: Vec<&str> = layers.iter().map(|l| l.layer_digest.as_str()).collect();
        Ok(json!({
            "layers": layers.len(),
            "digests": digests,
            "bytes_fetched": layers.iter().map(|l| l.bytes_fetched).sum::<u64>(),
            "requests": layers.iter().map(|l| l.requests).sum::<u64>(),
            "fallbacks": stats.fallbacks,
        }))
    })
}
