//! `tarn status`: what the daemon serves, from its admin API — each lazily
//! mounted layer with how much of it has been fetched, each overlaybd disk
//! with its blobs' fetch and whole-blob check (or one line saying there
//! is neither), then the cache.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tarn_proto::admin::{
    Disk, HintStat, Layer, LayerState, ListLayersRequest, ListLayersResponse, StatsRequest,
    StatsResponse, admin_client::AdminClient,
};

use tonic::transport::Channel;

use crate::pull::human;

/// Show mounted layers, bytes fetched and cache statistics.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The daemon's admin socket
    #[arg(long, default_value = "/run/tarn/admin.sock")]
    pub admin_address: PathBuf,
}

pub async fn run(args: StatusArgs) -> Result<()> {
    let (listed, stats) = fetch(&args.admin_address).await?;
    print!("{}", render(&listed.layers, &listed.disks, &stats));
    Ok(())
}

/// A client of the daemon's admin API at `address`.
pub(crate) async fn connect(address: &Path) -> Result<AdminClient<Channel>> {
    if !address.exists() {
        bail!(
            "tarn daemon admin socket {} does not exist (is tarn-snapshotter running? see --admin-address)",
            address.display()
        );
    }
    // The admin API is plain gRPC over a unix socket, like containerd's.
    let channel = containerd_client::connect(address)
        .await
        .with_context(|| format!("cannot connect to the tarn daemon at {}", address.display()))?;
    Ok(AdminClient::new(channel))
}

async fn fetch(address: &Path) -> Result<(ListLayersResponse, StatsResponse)> {
    let mut admin = connect(address).await?;
    let layers = admin
        .list_layers(ListLayersRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .context("cannot list the daemon's layers")?
        .into_inner();
    let stats = admin
        .stats(StatsRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .context("cannot read the daemon's statistics")?
        .into_inner();
    Ok((layers, stats))
}

/// The report, as printed: a table of layers, the overlaybd disks (a note
/// instead when there is neither: a daemon serving only disks does not
/// say it mounts nothing), then the cache.
fn render(layers: &[Layer], disk_list: &[Disk], stats: &StatsResponse) -> String {
    let mut out = String::new();
    if layers.is_empty() && disk_list.is_empty() {
        out.push_str("no lazily mounted layers or overlaybd disks\n");
    }
    if !layers.is_empty() {
        let rows: Vec<[String; 7]> = layers
            .iter()
            .map(|l| {
                [
                    l.image_ref.clone(),
                    short(&l.layer_digest),
                    state(l),
                    fetched(l.bytes_fetched, l.blob_size),
                    l.requests.to_string(),
                    served(l),
                    l.mountpoint.clone(),
                ]
            })
            .collect();
        let header = [
            "IMAGE",
            "LAYER",
            "STATE",
            "FETCHED",
            "REQUESTS",
            "SERVED",
            "MOUNTPOINT",
        ]
        .map(String::from);
        let mut widths = header.each_ref().map(String::len);
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        for r in std::iter::once(&header).chain(&rows) {
            let line: Vec<String> = r
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
    }
    out.push_str(&disks(disk_list));
    // Each disk blob once, however many stacks share it.
    let mut seen = std::collections::HashSet::new();
    let blob_hints = disk_list
        .iter()
        .flat_map(|d| &d.blobs)
        .filter(|b| seen.insert(b.digest.as_str()))
        .flat_map(|b| &b.hints);
    out.push_str(&hints(
        layers.iter().flat_map(|l| &l.hints).chain(blob_hints),
    ));
    out.push_str(&format!(
        "cache: {} in {} entries, hit rate {:.1}%; {} mounted layers, {} snapshots, {} fallbacks to full pulls{}\n",
        human(stats.cache_bytes),
        stats.cache_entries,
        stats.hit_rate * 100.0,
        stats.mounted_layers,
        stats.snapshots,
        stats.fallbacks,
        causes(stats)
    ));
    let bound = match stats.cache_max_bytes {
        0 => "no bound".to_string(),
        max => format!("bound {}", human(max)),
    };
    out.push_str(&format!(
        "cache disk: {} ({bound}), {} released; served {}, dedup saved {}; {} evictions ({})\n",
        human(stats.cache_disk_bytes),
        human(stats.cache_released_bytes),
        human(stats.cache_served_bytes),
        human(stats.cache_dedup_saved_bytes),
        stats.cache_evictions,
        human(stats.cache_evicted_bytes),
    ));
    out.push_str(&format!(
        "received: {} from registries, {} from mirrors, {} from peers; served {} to peers\n",
        human(stats.registry_bytes.saturating_sub(stats.mirror_bytes)),
        human(stats.mirror_bytes),
        human(stats.peer_received_bytes),
        human(stats.peer_served_bytes),
    ));
    out
}

/// The overlaybd disks: a line per disk, then one per blob (bottom
/// first) with what was fetched of it and where its whole-blob sha256
/// check stands. Nothing when no disk is mounted.
fn disks(disks: &[Disk]) -> String {
    let mut out = String::new();
    for d in disks {
        let snapshot = match d.snapshot.as_str() {
            "" => String::new(),
            s => format!(", snapshot {s}"),
        };
        out.push_str(&format!(
            "overlaybd disk {}: {} blobs, {} virtual, {} at {}{snapshot}\n",
            short(&d.key),
            d.blobs.len(),
            human(d.virtual_size),
            if d.loop_device.is_empty() {
                "-"
            } else {
                &d.loop_device
            },
            d.mountpoint,
        ));
        for b in &d.blobs {
            let check = match b.verify_state.as_str() {
                "verifying" => format!("verifying ({} read)", human(b.hashed_bytes)),
                s => s.to_string(),
            };
            let error = match b.error.as_str() {
                "" => String::new(),
                e => format!(": {e}"),
            };
            out.push_str(&format!(
                "  blob {}  fetched {}  sha256 {check}{error}\n",
                short(&b.digest),
                fetched(b.bytes_fetched, b.blob_size),
            ));
        }
    }
    out
}

/// One line of what speculative fetches were worth, all layers and disk
/// blobs together: per kind, the bytes fetched ahead of reads and the
/// share a read used. Nothing when nothing was fetched ahead.
fn hints<'a>(stats: impl Iterator<Item = &'a HintStat>) -> String {
    let mut kinds: Vec<(String, u64, u64)> = Vec::new();
    for h in stats {
        match kinds.iter_mut().find(|(k, _, _)| *k == h.kind) {
            Some((_, fetched, used)) => {
                *fetched += h.fetched_bytes;
                *used += h.used_bytes;
            }
            None => kinds.push((h.kind.clone(), h.fetched_bytes, h.used_bytes)),
        }
    }
    let named: Vec<String> = kinds
        .iter()
        .filter(|(_, fetched, _)| *fetched > 0)
        .map(|(kind, fetched, used)| {
            let pct = *used as f64 * 100.0 / *fetched as f64;
            format!("{kind} {} ({pct:.0}% used)", human(*fetched))
        })
        .collect();
    if named.is_empty() {
        return String::new();
    }
    format!("fetched ahead of reads: {}\n", named.join(", "))
}

/// ` (cause n, ...)` by cause name, or nothing when no cause is named (a
/// daemon that does not count them, or no fallback).
fn causes(stats: &StatsResponse) -> String {
    let mut by_cause: Vec<(&String, &u64)> = stats.fallbacks_by_cause.iter().collect();
    if by_cause.is_empty() {
        return String::new();
    }
    by_cause.sort();
    let named: Vec<String> = by_cause.iter().map(|(c, n)| format!("{c} {n}")).collect();
    format!(" ({})", named.join(", "))
}

fn state(l: &Layer) -> String {
    match LayerState::try_from(l.state).unwrap_or(LayerState::Unknown) {
        LayerState::Mounted => "mounted",
        LayerState::Complete => "complete",
        LayerState::Failed => "failed",
        LayerState::Unknown => "unknown",
    }
    .to_string()
}

/// How long this daemon process has served the mount, and how many
/// daemon processes took its connection over (restarts survived).
fn served(l: &Layer) -> String {
    if l.served_since_unix == 0 {
        return "-".to_string();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let age = now.saturating_sub(l.served_since_unix);
    let age = match age {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    };
    match l.takeovers {
        0 => age,
        1 => format!("{age}, 1 takeover"),
        n => format!("{age}, {n} takeovers"),
    }
}

fn fetched(done: u64, total: u64) -> String {
    if total == 0 {
        return human(done);
    }
    let pct = done as f64 * 100.0 / total as f64;
    format!("{} / {} ({pct:.1}%)", human(done), human(total))
}

/// `sha256:` and the first 12 hex digits are enough to tell layers apart.
fn short(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use tarn_proto::admin::admin_server::{Admin, AdminServer};
    use tarn_proto::admin::{DiskBlob, StatsResponse};
    use tonic::{Request, Response, Status};

    use super::*;

    fn layer() -> Layer {
        Layer {
            image_ref: "127.0.0.1:5000/app:1".into(),
            layer_digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                .into(),
            mountpoint: "/var/lib/tarn/layers/1/fs".into(),
            bytes_fetched: 3 * 1024 * 1024,
            blob_size: 12 * 1024 * 1024,
            requests: 7,
            state: LayerState::Mounted.into(),
            snapshot: "sha256:aa".into(),
            ..Layer::default()
        }
    }

    fn stats() -> StatsResponse {
        StatsResponse {
            cache_bytes: 5 * 1024 * 1024,
            cache_entries: 42,
            hit_rate: 0.875,
            fallbacks: 1,
            snapshots: 4,
            mounted_layers: 1,
            cache_disk_bytes: 6 * 1024 * 1024,
            cache_max_bytes: 10 * 1024 * 1024,
            cache_released_bytes: 1024 * 1024,
            cache_served_bytes: 30 * 1024 * 1024,
            cache_dedup_saved_bytes: 2 * 1024 * 1024,
            cache_evictions: 3,
            cache_evicted_bytes: 512 * 1024,
            registry_bytes: 10 * 1024 * 1024,
            mirror_bytes: 8 * 1024 * 1024,
            peer_received_bytes: 3 * 1024 * 1024,
            peer_served_bytes: 4 * 1024 * 1024,
            ..Default::default()
        }
    }

    #[test]
    fn render_shows_each_layer_and_the_cache() {
        let text = render(&[layer()], &[], &stats());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with("IMAGE"));
        let row = lines[1];
        for want in [
            "127.0.0.1:5000/app:1",
            "0123456789ab",
            "mounted",
            "3.0 MiB / 12.0 MiB (25.0%)",
            " 7 ",
            "/var/lib/tarn/layers/1/fs",
        ] {
            assert!(row.contains(want), "{want:?} missing from {row:?}");
        }
        assert!(!row.contains("cdef0123"), "digest not shortened: {row}");
        assert_eq!(
            lines[2],
            "cache: 5.0 MiB in 42 entries, hit rate 87.5%; 1 mounted layers, 4 snapshots, 1 fallbacks to full pulls"
        );
        assert_eq!(
            lines[3],
            "cache disk: 6.0 MiB (bound 10.0 MiB), 1.0 MiB released; served 30.0 MiB, dedup saved 2.0 MiB; 3 evictions (512.0 KiB)"
        );
        assert_eq!(
            lines[4],
            "received: 2.0 MiB from registries, 8.0 MiB from mirrors, 3.0 MiB from peers; served 4.0 MiB to peers"
        );
        // Columns line up: the FETCHED header sits above the fetched figure.
        assert_eq!(lines[0].find("FETCHED"), row.find("3.0 MiB"));
    }

    #[test]
    fn render_shows_what_fetching_ahead_was_worth() {
        let hint = |kind: &str, fetched: u64, used: u64| tarn_proto::admin::HintStat {
            kind: kind.into(),
            fetched_bytes: fetched,
            used_bytes: used,
        };
        let (mut a, mut b) = (layer(), layer());
        a.hints = vec![
            hint("read-ahead", 1 << 20, 1 << 19),
            hint("library", 1 << 20, 0),
        ];
        b.hints = vec![hint("read-ahead", 1 << 20, 1 << 20)];
        let text = render(&[a, b], &[], &stats());
        assert!(
            text.contains(
                "fetched ahead of reads: read-ahead 2.0 MiB (75% used), library 1.0 MiB (0% used)\n"
            ),
            "{text}"
        );
        // A disk's blobs count too, each once however many stacks share it.
        let mut d = disk();
        d.blobs[0].hints = vec![hint("entrypoint", 1 << 20, 1 << 20)];
        let text = render(&[], &[d.clone(), d], &stats());
        assert!(
            text.contains("fetched ahead of reads: entrypoint 1.0 MiB (100% used)\n"),
            "{text}"
        );
    }

    #[test]
    fn render_names_the_causes_of_fallbacks() {
        let mut s = stats();
        s.fallbacks = 3;
        s.fallbacks_by_cause = [
            ("resolve-timeout".to_string(), 1),
            ("no-toc-digest".to_string(), 2),
        ]
        .into_iter()
        .collect();
        let text = render(&[], &[], &s);
        assert!(
            text.contains("3 fallbacks to full pulls (no-toc-digest 2, resolve-timeout 1)\n"),
            "{text}"
        );
    }

    fn disk() -> Disk {
        let blob = |hex: char, state: &str, error: &str| DiskBlob {
            digest: format!("sha256:{}", hex.to_string().repeat(64)),
            blob_size: 20 << 20,
            bytes_fetched: 1 << 20,
            verify_state: state.into(),
            hashed_bytes: 4 << 20,
            error: error.into(),
            hints: Vec::new(),
        };
        Disk {
            key: format!("sha256:{}", "c".repeat(64)),
            blobs: vec![
                blob('a', "verified", ""),
                blob('b', "failed", "blob read whole has sha256 x"),
                blob('d', "verifying", ""),
            ],
            virtual_size: 1 << 30,
            loop_device: "/dev/loop7".into(),
            mountpoint: "/var/lib/tarn/layers/c/fs".into(),
            snapshot: "sha256:ee".into(),
        }
    }

    #[test]
    fn disks_show_each_blob_and_its_check() {
        let text = disks(&[disk()]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "overlaybd disk cccccccccccc: 3 blobs, 1.0 GiB virtual, /dev/loop7 at /var/lib/tarn/layers/c/fs, snapshot sha256:ee",
                "  blob aaaaaaaaaaaa  fetched 1.0 MiB / 20.0 MiB (5.0%)  sha256 verified",
                "  blob bbbbbbbbbbbb  fetched 1.0 MiB / 20.0 MiB (5.0%)  sha256 failed: blob read whole has sha256 x",
                "  blob dddddddddddd  fetched 1.0 MiB / 20.0 MiB (5.0%)  sha256 verifying (4.0 MiB read)",
            ]
        );
        assert_eq!(disks(&[]), "");
    }

    #[test]
    fn render_without_layers_or_disks_says_so() {
        let text = render(&[], &[], &StatsResponse::default());
        assert!(
            text.starts_with("no lazily mounted layers or overlaybd disks\n"),
            "{text}"
        );
        assert!(text.contains("hit rate 0.0%"));
    }

    #[test]
    fn render_with_only_disks_shows_them_and_no_contradiction() {
        let text = render(&[], &[disk()], &stats());
        assert!(!text.contains("no lazily mounted"), "{text}");
        assert!(
            text.starts_with("overlaybd disk cccccccccccc: 3 blobs"),
            "{text}"
        );
        // What is mounted comes first, the cache after it.
        assert!(
            text.find("  blob dddddddddddd") < text.find("cache: "),
            "{text}"
        );
    }

    #[test]
    fn render_shows_layers_then_disks_then_the_cache() {
        let text = render(&[layer()], &[disk()], &stats());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("IMAGE"), "{text}");
        assert!(lines[2].starts_with("overlaybd disk "), "{text}");
        assert!(lines[6].starts_with("cache: "), "{text}");
    }

    struct Fake;

    #[tonic::async_trait]
    impl Admin for Fake {
        async fn list_layers(
            &self,
            _: Request<ListLayersRequest>,
        ) -> Result<Response<ListLayersResponse>, Status> {
            Ok(Response::new(ListLayersResponse {
                layers: vec![layer()],
                disks: vec![disk()],
            }))
        }
        async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
            Ok(Response::new(stats()))
        }
        async fn expect(
            &self,
            _: Request<tarn_proto::admin::ExpectRequest>,
        ) -> Result<Response<tarn_proto::admin::ExpectResponse>, Status> {
            Err(Status::unimplemented("not used by status"))
        }
        async fn prune_cache(
            &self,
            _: Request<tarn_proto::admin::PruneCacheRequest>,
        ) -> Result<Response<tarn_proto::admin::PruneCacheResponse>, Status> {
            Err(Status::unimplemented("not used by status"))
        }
        async fn start_recording(
            &self,
            _: Request<tarn_proto::admin::StartRecordingRequest>,
        ) -> Result<Response<tarn_proto::admin::StartRecordingResponse>, Status> {
            Err(Status::unimplemented("not used by status"))
        }
        async fn stop_recording(
            &self,
            _: Request<tarn_proto::admin::StopRecordingRequest>,
        ) -> Result<Response<tarn_proto::admin::StopRecordingResponse>, Status> {
            Err(Status::unimplemented("not used by status"))
        }
        async fn get_profile(
            &self,
            _: Request<tarn_proto::admin::GetProfileRequest>,
        ) -> Result<Response<tarn_proto::admin::GetProfileResponse>, Status> {
            Err(Status::unimplemented("not used by status"))
        }
    }

    #[tokio::test]
    async fn fetches_from_a_daemon_over_its_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("admin.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AdminServer::new(Fake))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        let (listed, s) = fetch(&sock).await.unwrap();
        server.abort();
        assert_eq!(listed.layers, vec![layer()]);
        assert_eq!(listed.disks, vec![disk()]);
        assert_eq!(s, stats());
    }

    #[tokio::test]
    async fn missing_daemon_is_one_clear_error() {
        let err = fetch(Path::new("/nonexistent/admin.sock"))
            .await
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("is tarn-snapshotter running"), "{msg}");
        assert!(!msg.contains('\n'));
    }
}
