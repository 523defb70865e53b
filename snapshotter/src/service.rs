//! The gRPC edge: containerd's Snapshots service and tarn's admin service.
//! Converts proto <-> domain types and errors -> status codes (the only
//! place that does); no snapshot logic lives here.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tarn_fs::Digest;
use tarn_fs::disk::BlobCheck;
use tarn_proto::admin::{self, admin_server::Admin};
use tarn_proto::snapshots::{self as pb, snapshots_server::Snapshots};
use tonic::{Request, Response, Status};

use crate::errors::chain;
use crate::metastore::{self, Info, Kind};
use crate::mounts::Mount;
use crate::remote::{ExpectError, RemoteSnapshotter};
use crate::snapshotter::{self, Snapshotter};

/// Infos per List message: containerd's own service sends batches of 100
/// so a large list never becomes one oversized message.
const LIST_BATCH: usize = 100;

/// What a call can fail with, for [`to_status`].
enum Failure {
    Snapshot(snapshotter::Error),
    Expect(ExpectError),
}

impl From<snapshotter::Error> for Failure {
    fn from(e: snapshotter::Error) -> Self {
        Failure::Snapshot(e)
    }
}

impl From<ExpectError> for Failure {
    fn from(e: ExpectError) -> Self {
        Failure::Expect(e)
    }
}

/// The one mapping from errors to gRPC status codes. containerd turns the
/// codes back into its errdefs (NotFound, AlreadyExists, ...), which its
/// clients rely on. The message is the error's whole chain, what a client
/// (ctr) shows.
fn to_status(e: impl Into<Failure>) -> Status {
    use metastore::Error as M;
    use snapshotter::Error as S;
    let e = match e.into() {
        Failure::Expect(e) => return Status::invalid_argument(chain(&e)),
        Failure::Snapshot(e) => e,
    };
    let msg = chain(&e);
    match &e {
        S::Meta(M::NotFound(_)) => Status::not_found(msg),
        S::Meta(M::AlreadyExists(_)) => Status::already_exists(msg),
        S::Meta(M::FailedPrecondition(_)) => Status::failed_precondition(msg),
        S::Meta(M::InvalidArgument(_)) | S::Filter(_) => Status::invalid_argument(msg),
        S::Meta(M::Store(_) | M::Corrupt { .. }) | S::Io { .. } | S::Task(_) => {
            tracing::error!(error = %msg, "snapshot operation failed");
            Status::internal(msg)
        }
    }
}

/// Runs blocking snapshotter work (redb, filesystem) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> snapshotter::Result<T> + Send + 'static,
) -> Result<T, Status> {
    crate::remote::blocking(f).await.map_err(to_status)
}

fn parent(p: String) -> Option<String> {
    (!p.is_empty()).then_some(p)
}

fn labels(l: HashMap<String, String>) -> BTreeMap<String, String> {
    l.into_iter().collect()
}

fn mounts_pb(mounts: Vec<Mount>) -> Vec<tarn_proto::Mount> {
    mounts
        .into_iter()
        .map(|m| tarn_proto::Mount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

fn kind_pb(k: Kind) -> pb::Kind {
    match k {
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    }
}

fn info_pb(i: Info) -> pb::Info {
    pb::Info {
        name: i.name,
        parent: i.parent.unwrap_or_default(),
        kind: kind_pb(i.kind).into(),
        created_at: Some(i.created.into()),
        updated_at: Some(i.updated.into()),
        labels: i.labels.into_iter().collect(),
    }
}

/// Only name and labels of an Update's info matter; the rest is ignored as
/// containerd's storage ignores it.
fn info_domain(i: pb::Info) -> Info {
    Info {
        name: i.name,
        parent: parent(i.parent),
        kind: Kind::Active,
        labels: labels(i.labels),
        created: std::time::SystemTime::UNIX_EPOCH,
        updated: std::time::SystemTime::UNIX_EPOCH,
    }
}

#[derive(Clone)]
pub struct SnapshotsService {
    rs: Arc<RemoteSnapshotter>,
    sn: Arc<Snapshotter>,
}

impl SnapshotsService {
    pub fn new(rs: Arc<RemoteSnapshotter>) -> Self {
        let sn = rs.snapshotter().clone();
        SnapshotsService { rs, sn }
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        req: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, "prepare");
        let mounts = self
            .rs
            .prepare(r.key, parent(r.parent), labels(r.labels))
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::PrepareSnapshotResponse {
            mounts: mounts_pb(mounts),
        }))
    }

    async fn view(
        &self,
        req: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let r = req.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, "view");
        let sn = self.sn.clone();
        let mounts =
            blocking(move || sn.view(&r.key, parent(r.parent).as_deref(), labels(r.labels)))
                .await?;
        Ok(Response::new(pb::ViewSnapshotResponse {
            mounts: mounts_pb(mounts),
        }))
    }

    async fn mounts(
        &self,
        req: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let r = req.into_inner();
        let sn = self.sn.clone();
        let mounts = blocking(move || sn.mounts(&r.key)).await?;
        Ok(Response::new(pb::MountsResponse {
            mounts: mounts_pb(mounts),
        }))
    }

    async fn commit(
        &self,
        req: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        tracing::debug!(key = %r.key, name = %r.name, parent = %r.parent, "commit");
        let sn = self.sn.clone();
        blocking(move || {
            sn.commit(
                &r.name,
                &r.key,
                labels(r.labels),
                parent(r.parent).as_deref(),
            )
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = req.into_inner();
        tracing::debug!(key = %r.key, "remove");
        self.rs.remove(r.key).await.map_err(to_status)?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        req: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let r = req.into_inner();
        let sn = self.sn.clone();
        let info = blocking(move || sn.stat(&r.key)).await?;
        Ok(Response::new(pb::StatSnapshotResponse {
            info: Some(info_pb(info)),
        }))
    }

    async fn update(
        &self,
        req: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let r = req.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without snapshot info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let sn = self.sn.clone();
        let info = blocking(move || sn.update(&info_domain(info), &paths)).await?;
        Ok(Response::new(pb::UpdateSnapshotResponse {
            info: Some(info_pb(info)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        req: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = req.into_inner();
        let sn = self.sn.clone();
        let infos = blocking(move || sn.list(&r.filters)).await?;
        let mut batches = Vec::new();
        let mut infos = infos.into_iter().map(info_pb).peekable();
        while infos.peek().is_some() {
            let info: Vec<_> = infos.by_ref().take(LIST_BATCH).collect();
            batches.push(Ok(pb::ListSnapshotsResponse { info }));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(batches))))
    }

    async fn usage(
        &self,
        req: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let r = req.into_inner();
        let sn = self.sn.clone();
        let u = blocking(move || sn.usage(&r.key)).await?;
        Ok(Response::new(pb::UsageResponse {
            size: u.size,
            inodes: u.inodes,
        }))
    }

    async fn cleanup(&self, _req: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        self.rs.cleanup().await.map_err(to_status)?;
        Ok(Response::new(()))
    }
}

/// tarn's admin API: mounted layers with their fetch figures, and the
/// daemon's counters.
#[derive(Clone)]
pub struct AdminService {
    rs: Arc<RemoteSnapshotter>,
}

impl AdminService {
    pub fn new(rs: Arc<RemoteSnapshotter>) -> Self {
        AdminService { rs }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_layers(
        &self,
        _req: Request<admin::ListLayersRequest>,
    ) -> Result<Response<admin::ListLayersResponse>, Status> {
        let names = self.rs.layer_snapshots().await.map_err(to_status)?;
        let layers = self
            .rs
            .layers()
            .into_iter()
            .map(|l| {
                let state = match &l.failed {
                    Some(_) => admin::LayerState::Failed,
                    None if l.complete => admin::LayerState::Complete,
                    None => admin::LayerState::Mounted,
                };
                admin::Layer {
                    image_ref: l.image_ref,
                    layer_digest: l.digest.to_string(),
                    mountpoint: l.mountpoint.to_string_lossy().into_owned(),
                    bytes_fetched: l.stats.bytes_fetched,
                    blob_size: l.blob_size,
                    requests: l.stats.requests,
                    state: state.into(),
                    snapshot: names
                        .get(&l.digest)
                        .map(|n| n.join(","))
                        .unwrap_or_default(),
                    hints: hint_stats(&l.stats.hints),
                    served_since_unix: l.service.map_or(0, |s| {
                        s.since
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs())
                    }),
                    takeovers: l.service.map_or(0, |s| s.takeovers),
                }
            })
            .collect();
        let disks = self
            .rs
            .disks()
            .into_iter()
            .map(|d| admin::Disk {
                key: d.key.to_string(),
                snapshot: names.get(&d.key).map(|n| n.join(",")).unwrap_or_default(),
                blobs: d
                    .layers
                    .iter()
                    .map(|l| {
                        let check = l.check();
                        let error = match &check {
                            BlobCheck::Failed(e) => e.clone(),
                            BlobCheck::Unverified { error } => error.clone().unwrap_or_default(),
                            BlobCheck::Verifying | BlobCheck::Verified => String::new(),
                        };
                        admin::DiskBlob {
                            digest: l.digest.to_string(),
                            blob_size: l.blob_size(),
                            bytes_fetched: l.layer.stats().bytes_fetched,
                            verify_state: check.name().to_owned(),
                            hashed_bytes: l.hashed_bytes(),
                            error,
                            hints: hint_stats(&l.layer.hint_stats()),
                        }
                    })
                    .collect(),
                virtual_size: d.virtual_size,
                loop_device: d.device.unwrap_or_default(),
                mountpoint: d.fs.to_string_lossy().into_owned(),
            })
            .collect();
        Ok(Response::new(admin::ListLayersResponse { layers, disks }))
    }

    async fn expect(
        &self,
        req: Request<admin::ExpectRequest>,
    ) -> Result<Response<admin::ExpectResponse>, Status> {
        let req = req.into_inner();
        let layers = self
            .rs
            .expect(&req.image_ref, &req.manifest)
            .map_err(to_status)?;
        tracing::debug!(image = %req.image_ref, layers, "pull expected");
        Ok(Response::new(admin::ExpectResponse {
            // An image has at most a few hundred layers (manifests are bounded).
            layers: u32::try_from(layers).unwrap_or(u32::MAX),
        }))
    }

    async fn start_recording(
        &self,
        req: Request<admin::StartRecordingRequest>,
    ) -> Result<Response<admin::StartRecordingResponse>, Status> {
        let digests = req
            .into_inner()
            .layer_digests
            .iter()
            .map(|d| {
                d.parse::<Digest>()
                    .map_err(|e| Status::invalid_argument(format!("layer digest {d:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let started = self
            .rs
            .start_recording(&digests)
            .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        tracing::info!(
            id = started.id,
            layers = digests.len() - started.not_recorded.len(),
            "access recording started"
        );
        Ok(Response::new(admin::StartRecordingResponse {
            id: started.id,
            not_recorded: started.not_recorded.iter().map(|d| d.to_string()).collect(),
        }))
    }

    async fn stop_recording(
        &self,
        req: Request<admin::StopRecordingRequest>,
    ) -> Result<Response<admin::StopRecordingResponse>, Status> {
        let id = req.into_inner().id;
        let layers = self
            .rs
            .stop_recording(id)
            .ok_or_else(|| Status::not_found(format!("no recording {id} is running")))?;
        let layers = layers
            .into_iter()
            .map(|(digest, files)| admin::LayerRecording {
                layer_digest: digest.to_string(),
                files: files
                    .into_iter()
                    .map(|f| admin::FileAccess {
                        path: f.path,
                        first_access_micros: u64::try_from(f.first.as_micros()).unwrap_or(u64::MAX),
                        ranges: f
                            .ranges
                            .into_iter()
                            .map(|(start, end)| admin::ByteRange {
                                offset: start,
                                length: end - start,
                            })
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(admin::StopRecordingResponse { layers }))
    }

    async fn get_profile(
        &self,
        req: Request<admin::GetProfileRequest>,
    ) -> Result<Response<admin::GetProfileResponse>, Status> {
        let d = req.into_inner().manifest_digest;
        let manifest = d
            .parse::<Digest>()
            .map_err(|e| Status::invalid_argument(format!("manifest digest {d:?}: {e}")))?;
        if !self.rs.profiles_on() {
            return Err(Status::failed_precondition(
                "start profiles are off on this node ([profile] enabled = false)",
            ));
        }
        let document = self.rs.profile_document(manifest).await.ok_or_else(|| {
            Status::not_found(format!(
                "no start profile for manifest {manifest} on this node"
            ))
        })?;
        Ok(Response::new(admin::GetProfileResponse { document }))
    }

    async fn stats(
        &self,
        _req: Request<admin::StatsRequest>,
    ) -> Result<Response<admin::StatsResponse>, Status> {
        let s = self.rs.stats().await.map_err(to_status)?;
        let lookups = s.cache_hits + s.cache_misses;
        Ok(Response::new(admin::StatsResponse {
            cache_bytes: s.cache_bytes,
            cache_entries: s.cache_entries,
            hit_rate: if lookups == 0 {
                0.0
            } else {
                s.cache_hits as f64 / lookups as f64
            },
            fallbacks: s.fallbacks,
            fallbacks_by_cause: s
                .fallbacks_by_cause
                .into_iter()
                .map(|(cause, n)| (cause.to_owned(), n))
                .collect(),
            snapshots: s.snapshots,
            mounted_layers: s.lazy_layers,
            cache_disk_bytes: s.cache.disk_bytes,
            cache_max_bytes: if s.cache.max_bytes == u64::MAX {
                0
            } else {
                s.cache.max_bytes
            },
            cache_released_bytes: s.cache.released_bytes,
            cache_served_bytes: s.cache.served_bytes,
            cache_dedup_saved_bytes: s.dedup_saved_bytes,
            cache_evictions: s.cache.evictions,
            cache_evicted_bytes: s.cache.evicted_bytes,
            registry_bytes: s.registry_bytes,
            mirror_bytes: s.mirror_bytes,
            peer_received_bytes: s.peer_received_bytes,
            peer_served_bytes: s.peer_served_bytes,
        }))
    }

    async fn prune_cache(
        &self,
        req: Request<admin::PruneCacheRequest>,
    ) -> Result<Response<admin::PruneCacheResponse>, Status> {
        let p = self
            .rs
            .prune_cache(req.into_inner().all_unused)
            .await
            .map_err(to_status)?;
        Ok(Response::new(admin::PruneCacheResponse {
            entries: p.entries,
            bytes: p.bytes,
            disk_bytes_before: p.disk_before,
            disk_bytes_after: p.disk_after,
        }))
    }
}

/// A layer's hint figures for the admin API: the kinds that fetched
/// anything.
fn hint_stats(hints: &tarn_fs::fetch::HintCounts) -> Vec<admin::HintStat> {
    hints
        .iter()
        .map(|(hint, c)| admin::HintStat {
            kind: hint.name().to_owned(),
            fetched_bytes: c.fetched,
            used_bytes: c.used,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinels_map_to_their_codes() {
        let m = |e: metastore::Error| to_status(snapshotter::Error::from(e)).code();
        assert_eq!(
            m(metastore::Error::NotFound("x".into())),
            tonic::Code::NotFound
        );
        assert_eq!(
            m(metastore::Error::AlreadyExists("x".into())),
            tonic::Code::AlreadyExists
        );
        assert_eq!(
            m(metastore::Error::FailedPrecondition("x".into())),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            m(metastore::Error::InvalidArgument("x".into())),
            tonic::Code::InvalidArgument
        );
        let io = snapshotter::Error::Io {
            context: "stat x".into(),
            source: std::io::Error::other("boom"),
        };
        let status = to_status(io);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(
            status.message(),
            "stat x: boom",
            "the cause reaches the client"
        );
    }
}
