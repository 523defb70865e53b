//! Questions to tarn's admin API (a gRPC service on a unix socket): which
//! layers are mounted, whether a pull was lazy, and when every layer has
//! been fetched (polled at most 100 ms apart by `wait_until_async`: well
//! under the resolution the benchmark reports).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tarn_integration::daemon::unix_channel;
use tarn_integration::wait::wait_until_async;
use tarn_proto::admin::admin_client::AdminClient;
use tarn_proto::admin::{Layer, LayerState, ListLayersRequest, ListLayersResponse, StatsRequest};
use tonic::transport::Channel;

use crate::runs::Facts;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")
}

async fn connect(path: &Path) -> Result<AdminClient<Channel>> {
    if !path.exists() {
        bail!(
            "tarn's admin socket {} does not exist (daemon without the admin API?)",
            path.display()
        );
    }
    let channel = unix_channel(path)
        .await
        .with_context(|| format!("cannot connect to tarn's admin socket {}", path.display()))?;
    Ok(AdminClient::new(channel))
}

async fn list(client: &mut AdminClient<Channel>) -> Result<Vec<Layer>> {
    Ok(list_all(client).await?.layers)
}

/// The eStargz layers and the overlaybd disks.
async fn list_all(client: &mut AdminClient<Channel>) -> Result<ListLayersResponse> {
    Ok(client
        .list_layers(ListLayersRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .context("cannot list tarn's layers")?
        .into_inner())
}

fn complete(l: &Layer) -> bool {
    l.state == LayerState::Complete as i32 || (l.blob_size > 0 && l.bytes_fetched >= l.blob_size)
}

/// Waits until at least `min_layers` layers are mounted and all of them are
/// fully fetched; the fact `end` is when (Unix seconds), for the script to
/// note beside the `start` it took.
pub fn wait_fetched(admin: &Path, timeout: Duration, min_layers: usize) -> Result<Facts> {
    runtime()?.block_on(async {
        let client = connect(admin).await?;
        let done = wait_until_async("the background fetch", timeout, || {
            let mut client = client.clone();
            async move {
                let layers = match list(&mut client).await {
                    Ok(layers) => layers,
                    Err(e) => return Some(Err(e)),
                };
                if let Some(failed) = layers.iter().find(|l| l.state == LayerState::Failed as i32) {
                    return Some(Err(anyhow::anyhow!(
                        "layer {} failed in the daemon",
                        failed.layer_digest
                    )));
                }
                (layers.len() >= min_layers && layers.iter().all(complete)).then_some(Ok(()))
            }
        })
        .await;
        match done {
            Ok(result) => result?,
            Err(timed_out) => {
                let layers = list(&mut client.clone()).await?;
                let fetched: u64 = layers.iter().map(|l| l.bytes_fetched).sum();
                let total: u64 = layers.iter().map(|l| l.blob_size).sum();
                bail!(
                    "{timed_out}: {fetched} of {total} bytes in {} layers",
                    layers.len()
                );
            }
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("clock before 1970")?;
        Ok(Facts::new([("end", now.as_secs_f64())]))
    })
}

/// The digests of the layers the daemon serves lazily.
pub fn digests(admin: &Path) -> Result<Vec<String>> {
    runtime()?.block_on(async {
        let mut client = connect(admin).await?;
        Ok(list(&mut client)
            .await?
            .into_iter()
            .map(|l| l.layer_digest)
            .collect())
    })
}

/// Whether the pull was lazy: at least one layer mounted lazily and none
/// fell back to a full pull. The fact `layers` counts the lazy ones;
/// `ahead_bytes` is what all hints fetched ahead of reads, and
/// `hit_KIND` each hint kind's hit rate (bytes a read used / bytes it
/// fetched) and `ahead_KIND_bytes` what it fetched, for the kinds that
/// fetched anything.
#[allow(clippy::cast_precision_loss)]
pub fn lazy_check(admin: &Path) -> Result<Facts> {
    runtime()?.block_on(async {
        let mut client = connect(admin).await?;
        let all = list_all(&mut client).await?;
        let listed = all.layers;
        let layers = listed.len();
        // An overlaybd image mounts disks (a stack per snapshot), no layers.
        let disk_blobs: std::collections::BTreeSet<&str> = all
            .disks
            .iter()
            .flat_map(|d| &d.blobs)
            .map(|b| b.digest.as_str())
            .collect();
        let mut kinds: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        // Each disk blob once, however many stacks share it.
        let mut seen = std::collections::BTreeSet::new();
        let blob_hints = all
            .disks
            .iter()
            .flat_map(|d| &d.blobs)
            .filter(|b| seen.insert(b.digest.as_str()))
            .flat_map(|b| &b.hints);
        for h in listed.iter().flat_map(|l| &l.hints).chain(blob_hints) {
            let k = kinds.entry(h.kind.replace('-', "_")).or_default();
            k.0 += h.fetched_bytes;
            k.1 += h.used_bytes;
        }
        let fallbacks = client
            .stats(StatsRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))
            .context("cannot read tarn's statistics")?
            .into_inner()
            .fallbacks;
        if layers + disk_blobs.len() == 0 || fallbacks > 0 {
            bail!(
                "not lazy: {layers} layers and {} overlaybd blobs mounted lazily, {fallbacks} fell back to a full pull",
                disk_blobs.len()
            );
        }
        let mut facts = Facts::new([
            ("layers", layers as f64),
            ("disk_layers", disk_blobs.len() as f64),
            (
                "ahead_bytes",
                kinds.values().map(|k| k.0).sum::<u64>() as f64,
            ),
        ]);
        for (kind, (fetched, used)) in kinds.iter().filter(|(_, k)| k.0 > 0) {
            facts.push(&format!("hit_{kind}"), *used as f64 / *fetched as f64);
            facts.push(&format!("ahead_{kind}_bytes"), *fetched as f64);
        }
        Ok(facts)
    })
}

/// The cache's figures as the daemon counts them: `cache_evictions`,
/// `cache_evicted_bytes`, `cache_daemon_disk_bytes` (its own count of its
/// disk use) and `cache_max_bytes` (its bound; 0: none).
#[allow(clippy::cast_precision_loss)]
pub fn cache_stats(admin: &Path) -> Result<Facts> {
    runtime()?.block_on(async {
        let mut client = connect(admin).await?;
        let s = client
            .stats(StatsRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))
            .context("cannot read tarn's statistics")?
            .into_inner();
        Ok(Facts::new([
            ("cache_evictions", s.cache_evictions as f64),
            ("cache_evicted_bytes", s.cache_evicted_bytes as f64),
            ("cache_daemon_disk_bytes", s.cache_disk_bytes as f64),
            ("cache_max_bytes", s.cache_max_bytes as f64),
        ]))
    })
}
