//! A thin handle on containerd's gRPC services (content, snapshots, diff,
//! images, leases, introspection) as the pull needs them. Every call carries
//! the namespace and, once one exists, the lease as gRPC metadata, so all
//! content and snapshots a pull makes are protected from containerd's garbage
//! collector until the image record references them.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, Info as SnapshotInfo, PrepareSnapshotRequest, RemoveSnapshotRequest,
    StatSnapshotRequest, snapshots_client::SnapshotsClient,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest,
    DeleteRequest as DeleteLeaseRequest, GetImageRequest, Image, Info as ContentInfo, InfoRequest,
    PluginsRequest, ReadContentRequest, UpdateImageRequest, UpdateRequest as UpdateContentRequest,
    WriteAction, WriteContentRequest, WriteContentResponse, content_client::ContentClient,
    diff_client::DiffClient, images_client::ImagesClient,
    introspection_client::IntrospectionClient, leases_client::LeasesClient,
};
use containerd_client::types::{Descriptor, Mount};
use futures::SinkExt;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// Bytes per content Write message: well under containerd's 16 MiB gRPC
/// message limit, large enough that the ping-pong per message costs nothing.
const WRITE_CHUNK: usize = 1 << 20;

/// How long a write waits for another client that holds the same content
/// ref (writing the same blob) before giving up.
const LOCKED_REF_WAIT: Duration = Duration::from_secs(300);

/// What `Prepare` of an unpack snapshot answered.
pub enum Prepared {
    /// An ordinary active snapshot: apply the layer onto these mounts.
    Mounts(Vec<Mount>),
    /// The snapshotter already holds the committed snapshot (tarn serving the
    /// layer lazily, or someone else unpacked it first).
    AlreadyExists,
}

/// One connection to containerd, scoped to a namespace and optionally a lease.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl Containerd {
    pub async fn connect(address: &Path, namespace: &str) -> Result<Containerd> {
        // A missing socket is the most common mistake; say so before tonic
        // wraps it in a transport error.
        if !address.exists() {
            bail!(
                "containerd socket {} does not exist (is containerd running? see --address)",
                address.display()
            );
        }
        let channel = containerd_client::connect(address)
            .await
            .with_context(|| format!("cannot connect to containerd at {}", address.display()))?;
        MetadataValue::try_from(namespace)
            .map_err(|_| anyhow!("namespace {namespace:?} is not a valid gRPC header value"))?;
        Ok(Containerd {
            channel,
            namespace: namespace.to_string(),
            lease: None,
        })
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        // Both values were checked to be valid ASCII header values when set.
        if let Ok(ns) = MetadataValue::try_from(self.namespace.as_str()) {
            md.insert("containerd-namespace", ns);
        }
        if let Some(lease) = &self.lease
            && let Ok(v) = MetadataValue::try_from(lease.as_str())
        {
            md.insert("containerd-lease", v);
        }
        req
    }

    /// Fails with a clear message unless `name` is a snapshotter containerd
    /// has loaded (a proxy plugin shows up here once configured).
    pub async fn check_snapshotter(&self, name: &str) -> Result<()> {
        let resp = IntrospectionClient::new(self.channel.clone())
            .plugins(self.req(PluginsRequest {
                filters: vec!["type==io.containerd.snapshotter.v1".into()],
            }))
            .await
            .context("cannot list containerd's plugins")?
            .into_inner();
        match resp.plugins.iter().find(|p| p.id == name) {
            None => bail!(
                "snapshotter {name:?} is not configured in containerd (add a [proxy_plugins.{name}] section to its config)"
            ),
            Some(p) if p.init_err.is_some() => {
                let msg = p
                    .init_err
                    .as_ref()
                    .map(|s| s.message.clone())
                    .unwrap_or_default();
                bail!("snapshotter {name:?} failed to load in containerd: {msg}")
            }
            Some(_) => Ok(()),
        }
    }

    /// Creates a lease that expires by itself after `expire` (so a killed pull
    /// leaves nothing pinned forever) and attaches it to every later call.
    pub async fn create_lease(&mut self, id: &str, expire: Duration) -> Result<()> {
        let at = rfc3339(SystemTime::now() + expire);
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), at)]);
        MetadataValue::try_from(id).map_err(|_| anyhow!("lease id {id:?} is not ASCII"))?;
        LeasesClient::new(self.channel.clone())
            .create(self.req(CreateLeaseRequest {
                id: id.to_string(),
                labels,
            }))
            .await
            .context("cannot create a containerd lease")?;
        self.lease = Some(id.to_string());
        Ok(())
    }

    /// Deletes the lease made by `create_lease`, if any.
    pub async fn delete_lease(&mut self) -> Result<()> {
        let Some(id) = self.lease.take() else {
            return Ok(());
        };
        LeasesClient::new(self.channel.clone())
            .delete(self.req(DeleteLeaseRequest {
                id: id.clone(),
                sync: false,
            }))
            .await
            .with_context(|| format!("cannot delete containerd lease {id}"))?;
        Ok(())
    }

    pub async fn content_info(&self, digest: &str) -> Result<Option<ContentInfo>> {
        let r = ContentClient::new(self.channel.clone())
            .info(self.req(InfoRequest {
                digest: digest.to_string(),
            }))
            .await;
        match r {
            Ok(resp) => Ok(resp.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(anyhow!(status_msg(&s))).context(format!("content info of {digest}")),
        }
    }

    /// The whole of a (small) blob from the content store.
    pub async fn read_content(&self, digest: &str) -> Result<Bytes> {
        let mut stream = ContentClient::new(self.channel.clone())
            .read(self.req(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|s| anyhow!(status_msg(&s)))
            .with_context(|| format!("cannot read content {digest}"))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(part) = stream
            .message()
            .await
            .map_err(|s| anyhow!(status_msg(&s)))
            .with_context(|| format!("cannot read content {digest}"))?
        {
            out.extend_from_slice(&part.data);
        }
        Ok(Bytes::from(out))
    }

    /// Sets `labels` on existing content, leaving its other labels alone.
    pub async fn content_set_labels(
        &self,
        digest: &str,
        labels: &HashMap<String, String>,
    ) -> Result<()> {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        let info = ContentInfo {
            digest: digest.to_string(),
            labels: labels.clone(),
            ..Default::default()
        };
        ContentClient::new(self.channel.clone())
            .update(self.req(UpdateContentRequest {
                info: Some(info),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(|s| anyhow!(status_msg(&s)))
            .with_context(|| format!("cannot label content {digest}"))?;
        Ok(())
    }

    /// Writes a blob into the content store under `ref_key`, committing it
    /// with the expected digest and size (containerd verifies both). Content
    /// that already exists is success; if another client holds the ref (it is
    /// writing the same blob), waits for it. `progress` sees bytes written.
    pub async fn write_content(
        &self,
        ref_key: &str,
        digest: &str,
        labels: HashMap<String, String>,
        data: Bytes,
        mut progress: impl FnMut(u64),
    ) -> Result<()> {
        let deadline = Instant::now() + LOCKED_REF_WAIT;
        loop {
            match self
                .write_once(ref_key, digest, &labels, &data, &mut progress)
                .await
            {
                Ok(()) | Err(WriteFailure::Exists) => return Ok(()),
                Err(WriteFailure::Other(e)) => {
                    return Err(e.context(format!("cannot write {digest} to containerd")));
                }
                Err(WriteFailure::Locked(msg)) => {
                    if Instant::now() >= deadline {
                        bail!("cannot write {digest} to containerd: {msg}");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if self.content_info(digest).await?.is_some() {
                        return Ok(());
                    }
                }
            }
        }
    }

    async fn write_once(
        &self,
        ref_key: &str,
        digest: &str,
        labels: &HashMap<String, String>,
        data: &Bytes,
        progress: &mut impl FnMut(u64),
    ) -> Result<(), WriteFailure> {
        let total = i64::try_from(data.len()).map_err(|e| WriteFailure::Other(e.into()))?;
        let (mut tx, rx) = futures::channel::mpsc::channel::<WriteContentRequest>(2);
        let base = WriteContentRequest {
            r#ref: ref_key.to_string(),
            total,
            expected: digest.to_string(),
            ..Default::default()
        };
        // Open the stream with a Stat, as containerd's own client does: it takes
        // the ref's lock and tells how much an earlier, interrupted write left.
        send(
            &mut tx,
            WriteContentRequest {
                action: WriteAction::Stat.into(),
                ..base.clone()
            },
        )
        .await?;
        let mut responses = match ContentClient::new(self.channel.clone())
            .write(self.req(rx))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(WriteFailure::from_status(&s)),
        };
        // Bytes an interrupted earlier write already stored are not sent again.
        let resume = next_offset(&mut responses).await?;
        let mut offset = usize::try_from(resume.max(0)).unwrap_or(0).min(data.len());
        progress(offset as u64);
        while offset < data.len() {
            let end = (offset + WRITE_CHUNK).min(data.len());
            let req = WriteContentRequest {
                action: WriteAction::Write.into(),
                offset: i64::try_from(offset).expect("a slice offset is below isize::MAX"),
                data: data[offset..end].to_vec(),
                ..base.clone()
            };
            send(&mut tx, req).await?;
            next_offset(&mut responses).await?;
            offset = end;
            progress(offset as u64);
        }
        let commit = WriteContentRequest {
            action: WriteAction::Commit.into(),
            offset: total,
            labels: labels.clone(),
            ..base
        };
        send(&mut tx, commit).await?;
        next_offset(&mut responses).await?;
        Ok(())
    }

    pub async fn snapshot_stat(
        &self,
        snapshotter: &str,
        key: &str,
    ) -> Result<Option<SnapshotInfo>> {
        let r = SnapshotsClient::new(self.channel.clone())
            .stat(self.req(StatSnapshotRequest {
                snapshotter: snapshotter.into(),
                key: key.into(),
            }))
            .await;
        match r {
            Ok(resp) => Ok(resp.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => {
                Err(anyhow!(status_msg(&s))).with_context(|| format!("stat of snapshot {key}"))
            }
        }
    }

    pub async fn prepare(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Prepared> {
        let r = SnapshotsClient::new(self.channel.clone())
            .prepare(self.req(PrepareSnapshotRequest {
                snapshotter: snapshotter.into(),
                key: key.into(),
                parent: parent.into(),
                labels,
            }))
            .await;
        match r {
            Ok(resp) => Ok(Prepared::Mounts(resp.into_inner().mounts)),
            Err(s) if s.code() == Code::AlreadyExists => Ok(Prepared::AlreadyExists),
            // containerd answers Unavailable when it cannot dial a proxy plugin.
            Err(s) if s.code() == Code::Unavailable => Err(anyhow!(
                "snapshotter {snapshotter:?} is unavailable (is its daemon running?): {}",
                status_msg(&s)
            )),
            Err(s) => {
                Err(anyhow!(status_msg(&s))).with_context(|| format!("prepare of snapshot {key:?}"))
            }
        }
    }

    /// Commits the active snapshot `key` as `name`. `Ok(false)` means a
    /// snapshot named `name` already existed (a concurrent unpack won).
    pub async fn commit(
        &self,
        snapshotter: &str,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<bool> {
        let r = SnapshotsClient::new(self.channel.clone())
            .commit(self.req(CommitSnapshotRequest {
                snapshotter: snapshotter.into(),
                name: name.into(),
                key: key.into(),
                labels,
            }))
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::AlreadyExists => Ok(false),
            Err(s) => {
                Err(anyhow!(status_msg(&s))).with_context(|| format!("commit of snapshot {name}"))
            }
        }
    }

    pub async fn remove(&self, snapshotter: &str, key: &str) -> Result<()> {
        SnapshotsClient::new(self.channel.clone())
            .remove(self.req(RemoveSnapshotRequest {
                snapshotter: snapshotter.into(),
                key: key.into(),
            }))
            .await
            .map_err(|s| anyhow!(status_msg(&s)))
            .with_context(|| format!("remove of snapshot {key:?}"))?;
        Ok(())
    }

    /// Applies the layer `diff` (already in the content store) onto `mounts`
    /// and returns the descriptor of what was applied (its digest is the
    /// layer's diff ID).
    pub async fn apply(&self, diff: Descriptor, mounts: Vec<Mount>) -> Result<Descriptor> {
        let digest = diff.digest.clone();
        let resp = DiffClient::new(self.channel.clone())
            .apply(self.req(ApplyRequest {
                diff: Some(diff),
                mounts,
                ..Default::default()
            }))
            .await
            .map_err(|s| anyhow!(status_msg(&s)))
            .with_context(|| format!("cannot apply layer {digest}"))?
            .into_inner();
        resp.applied
            .ok_or_else(|| anyhow!("containerd applied layer {digest} but returned no descriptor"))
    }

    pub async fn get_image(&self, name: &str) -> Result<Option<Image>> {
        let r = ImagesClient::new(self.channel.clone())
            .get(self.req(GetImageRequest { name: name.into() }))
            .await;
        match r {
            Ok(resp) => Ok(resp.into_inner().image),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => {
                Err(anyhow!(status_msg(&s))).with_context(|| format!("cannot get image {name}"))
            }
        }
    }

    /// Creates the image record `name -> target`, or points an existing one
    /// at `target`.
    pub async fn put_image(&self, name: &str, target: Descriptor) -> Result<()> {
        let image = Image {
            name: name.into(),
            target: Some(target),
            ..Default::default()
        };
        let mut images = ImagesClient::new(self.channel.clone());
        let created = images
            .create(self.req(CreateImageRequest {
                image: Some(image.clone()),
                ..Default::default()
            }))
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                images
                    .update(self.req(UpdateImageRequest {
                        image: Some(image),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["target".into()],
                        }),
                        ..Default::default()
                    }))
                    .await
                    .map_err(|s| anyhow!(status_msg(&s)))
                    .with_context(|| format!("cannot update image {name}"))?;
                Ok(())
            }
            Err(s) => {
                Err(anyhow!(status_msg(&s))).with_context(|| format!("cannot create image {name}"))
            }
        }
    }
}

/// Why one attempt at a content write failed.
enum WriteFailure {
    /// Another client holds the ref: it is writing the same blob.
    Locked(String),
    /// The content is already committed (by us earlier or someone else).
    Exists,
    Other(anyhow::Error),
}

impl WriteFailure {
    fn from_status(s: &tonic::Status) -> WriteFailure {
        // containerd answers Unavailable for "ref ... locked".
        if s.code() == Code::Unavailable {
            WriteFailure::Locked(status_msg(s))
        } else if s.code() == Code::AlreadyExists {
            WriteFailure::Exists
        } else {
            WriteFailure::Other(anyhow!(status_msg(s)))
        }
    }
}

async fn send(
    tx: &mut futures::channel::mpsc::Sender<WriteContentRequest>,
    req: WriteContentRequest,
) -> Result<(), WriteFailure> {
    tx.send(req)
        .await
        .map_err(|_| WriteFailure::Other(anyhow!("containerd closed the write stream")))
}

/// The offset in the next answer of a content write stream.
async fn next_offset(
    responses: &mut tonic::Streaming<WriteContentResponse>,
) -> Result<i64, WriteFailure> {
    match responses.message().await {
        Ok(Some(r)) => Ok(r.offset),
        Ok(None) => Err(WriteFailure::Other(anyhow!(
            "containerd closed the write stream"
        ))),
        Err(s) => Err(WriteFailure::from_status(&s)),
    }
}

/// A gRPC status as one lowercase-first line: containerd's message already
/// says what failed; the code is added only when the message is empty.
fn status_msg(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        s.message().to_string()
    }
}

/// `t` as an RFC 3339 UTC timestamp (`2024-01-02T03:04:05Z`), the format
/// containerd's `gc.expire` label wants.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).expect("u64 seconds / 86400 is below 2^63") + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        let at = |s| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z");
    }
}
