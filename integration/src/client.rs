//! Typed one-line calls of the Snapshots API for tests, named after the
//! snapshotter operations.

use std::collections::HashMap;

use tarn_proto::Mount;
use tarn_proto::snapshots as pb;
use tarn_proto::snapshots::snapshots_client::SnapshotsClient;
use tonic::transport::Channel;

pub type Client = SnapshotsClient<Channel>;

pub async fn prepare(c: &mut Client, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
    c.prepare(pb::PrepareSnapshotRequest {
        snapshotter: "tarn".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

pub async fn view(c: &mut Client, key: &str, parent: &str) -> Result<Vec<Mount>, tonic::Status> {
    c.view(pb::ViewSnapshotRequest {
        snapshotter: "tarn".into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::new(),
    })
    .await
    .map(|r| r.into_inner().mounts)
}

pub async fn commit(c: &mut Client, name: &str, key: &str) -> Result<(), tonic::Status> {
    commit_labels(c, name, key, HashMap::new()).await
}

pub async fn commit_labels(
    c: &mut Client,
    name: &str,
    key: &str,
    labels: HashMap<String, String>,
) -> Result<(), tonic::Status> {
    commit_on(c, name, key, labels, "").await
}

/// Commit with containerd 2.x's `parent` (field 5): the parent a snapshot
/// prepared without one is committed on (parallel unpack).
pub async fn commit_on(
    c: &mut Client,
    name: &str,
    key: &str,
    labels: HashMap<String, String>,
    parent: &str,
) -> Result<(), tonic::Status> {
    c.commit(pb::CommitSnapshotRequest {
        snapshotter: "tarn".into(),
        name: name.into(),
        key: key.into(),
        labels,
        parent: parent.into(),
    })
    .await
    .map(|_| ())
}

pub async fn remove(c: &mut Client, key: &str) -> Result<(), tonic::Status> {
    c.remove(pb::RemoveSnapshotRequest {
        snapshotter: "tarn".into(),
        key: key.into(),
    })
    .await
    .map(|_| ())
}

pub async fn stat(c: &mut Client, key: &str) -> Result<pb::Info, tonic::Status> {
    c.stat(pb::StatSnapshotRequest {
        snapshotter: "tarn".into(),
        key: key.into(),
    })
    .await
    .map(|r| r.into_inner().info.expect("stat answers an info"))
}

pub async fn list(c: &mut Client, filters: &[&str]) -> Result<Vec<pb::Info>, tonic::Status> {
    let mut stream = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: "tarn".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await? {
        out.extend(batch.info);
    }
    Ok(out)
}

pub async fn usage(c: &mut Client, key: &str) -> pb::UsageResponse {
    c.usage(pb::UsageRequest {
        snapshotter: "tarn".into(),
        key: key.into(),
    })
    .await
    .expect("usage")
    .into_inner()
}
