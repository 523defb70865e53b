//! overlaybd layers on the remote path: a Prepare whose labels carry the
//! overlaybd annotations ([`obd::overlaybd_layer`]) is served as the
//! stack of the parent snapshot's layers plus this one, mounted as one
//! disk ([`crate::disks`]) and committed under its chain ID, as an
//! eStargz layer is; anything that fails falls back per layer, counted
//! by cause. The snapshot records its stack ([`labels::TARN_OBD_STACK`])
//! and, as [`labels::TARN_LAYER_DIGEST`], the stack's key, so Remove,
//! Cleanup and a restart find the disk from the metastore alone (a
//! restart with the holder takes the running disk over, see
//! [`crate::disks`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use tarn_fs::Digest;
use tarn_fs::disk::DiskLayer;
use tarn_fs::fetch::HintCounts;
use tarn_fs::format::overlaybd::stack::MAX_LAYERS;

use super::{RemoteSnapshotter, Why, blocking};
use crate::disks::DiskStatus;
use crate::errors::chain;
use crate::fallback::Fallback;
use crate::labels::{self, Decision, RemoteLayer};
use crate::mounts::Mount;
use crate::obd::{self, ObdLabelError, ObdLabels, StackLabelError};
use crate::seams::{Mounter, Resolve, ResolveError};
use crate::snapshotter::Result;

/// Why a recorded stack could not be mounted again at start.
#[derive(Debug, thiserror::Error)]
enum RestoreDiskError {
    #[error("no image reference recorded")]
    NoImageRef,
    #[error(transparent)]
    Stack(#[from] StackLabelError),
    #[error("not restored within {0:?}")]
    Timeout(std::time::Duration),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Mount(#[from] obd::DiskMountError),
    #[error("mount task failed")]
    Task(#[from] tokio::task::JoinError),
}

impl<R: Resolve, M: Mounter<R::Layer>> RemoteSnapshotter<R, M> {
    /// Prepare of an overlaybd layer (`obd`, read from its labels): lazily
    /// as a disk when its labels name an image (any of the label sources
    /// eStargz reads: CRI, stargz-style, `tarn pull`), else ordinarily.
    pub(super) async fn prepare_disk(
        &self,
        key: String,
        parent: Option<String>,
        labels: BTreeMap<String, String>,
        obd: std::result::Result<ObdLabels, ObdLabelError>,
    ) -> Result<Vec<Mount>> {
        // No TOC to verify: overlaybd blocks are checked by their CRCs.
        match labels::decide(&labels, parent.is_some(), true) {
            Decision::Ordinary => {}
            Decision::Fallback(unfit) => self.fallback(&key, None, unfit.into()),
            Decision::Remote { chain_id, layer } => {
                let served = match obd {
                    Ok(top) => {
                        self.prepare_stack(&chain_id, parent.clone(), labels.clone(), &layer, top)
                            .await
                    }
                    Err(e) => Err(Fallback::from(e).into()),
                };
                self.settle(&key, &chain_id, "overlaybd layer", &layer.digest, served)?;
            }
        }
        let sn = self.sn.clone();
        blocking(move || sn.prepare(&key, parent.as_deref(), labels)).await
    }

    /// Mounts the stack of `parent`'s layers plus `top` and commits it as
    /// `chain_id`. On any error nothing is left: no disk, no record.
    async fn prepare_stack(
        &self,
        chain_id: &str,
        parent: Option<String>,
        labels: BTreeMap<String, String>,
        layer: &RemoteLayer,
        top: ObdLabels,
    ) -> std::result::Result<(), Why> {
        let started = Instant::now();
        let _chain = self.chains.lock(chain_id.to_owned()).await;
        let (name, sn) = (chain_id.to_owned(), self.sn.clone());
        if blocking(move || sn.stat(&name)).await.is_ok() {
            return Ok(());
        }
        // An acceleration layer is no disk layer: its snapshot serves its
        // parent's stack and names its trace.
        let accel = obd::acceleration_layer(&labels);
        let mut stack = match &parent {
            None if accel => return Err(Fallback::ObdParent("(none)".into()).into()),
            None => Vec::new(),
            Some(p) => {
                let (name, sn) = (p.clone(), self.sn.clone());
                let info = blocking(move || sn.stat(&name))
                    .await
                    .map_err(Why::Snapshot)?;
                match info.labels.get(labels::TARN_OBD_STACK) {
                    Some(s) => obd::parse_stack(s).map_err(Fallback::from)?,
                    None => return Err(Fallback::ObdParent(p.clone()).into()),
                }
            }
        };
        let blob_size = top.blob_size;
        let trace = if accel {
            Some(obd::stack_label(std::slice::from_ref(&top)))
        } else {
            if stack.len() >= MAX_LAYERS {
                return Err(Fallback::from(StackLabelError::TooMany(stack.len() + 1)).into());
            }
            stack.push(top);
            None
        };
        let key = obd::stack_key(&stack);
        let _disk = self.layers.lock(key).await;
        let fresh = !self.disks.is_mounted(&key);
        if fresh {
            let timeout = self.options.resolve_timeout;
            let layers = tokio::time::timeout(timeout, self.disk_layers(&layer.image_ref, &stack))
                .await
                .map_err(|_| Fallback::ResolveTimeout(timeout))?
                .map_err(Fallback::from)?;
            let disks = self.disks.clone();
            let started = layers.clone();
            blocking(move || disks.attach(key, layers))
                .await
                .map_err(Fallback::from)?;
            self.start_disk_background(&started);
        }
        let recorded = RemoteLayer {
            image_ref: layer.image_ref.clone(),
            digest: key,
            toc_digest: None,
        };
        let mut labels = labels::remote_labels(labels, &recorded, blob_size);
        labels.insert(labels::TARN_OBD_STACK.into(), obd::stack_label(&stack));
        if let Some(trace) = trace {
            labels.insert(labels::TARN_OBD_TRACE.into(), trace);
        }
        let (name, sn) = (chain_id.to_owned(), self.sn.clone());
        let created = blocking(move || sn.create_remote(&name, parent.as_deref(), labels)).await;
        if let Err(e) = created {
            if fresh {
                let disks = self.disks.clone();
                let _ = tokio::task::spawn_blocking(move || disks.detach(&key)).await;
            }
            return Err(Why::Snapshot(e));
        }
        tracing::info!(
            chain_id,
            layer = %layer.digest,
            stack = %key,
            layers = stack.len(),
            image = %layer.image_ref,
            mounted = fresh,
            elapsed_ms = started.elapsed().as_millis(),
            "overlaybd layer: answering already exists"
        );
        Ok(())
    }

    /// Every layer of `stack` opened (or shared with a mounted stack),
    /// all at once.
    async fn disk_layers(
        &self,
        image_ref: &str,
        stack: &[ObdLabels],
    ) -> std::result::Result<Vec<Arc<DiskLayer>>, ResolveError> {
        let opens = stack.iter().map(|l| {
            self.resolver
                .disk_layer(image_ref, l.blob_digest, l.blob_size)
        });
        futures::future::join_all(opens).await.into_iter().collect()
    }

    /// Tears down the disk `key` if it is one and no snapshot uses it;
    /// called with the key's lock held.
    /// A snapshot (a container's) is being prepared on `parent`: if that is
    /// an overlaybd stack of tarn's, its ext4 metadata is fetched ahead of
    /// the container's first lookups, the image's trace replayed if it has
    /// an acceleration layer, then its entrypoint fetched
    /// ([`Disks::warm`]). A node with no disk mounted reads nothing for
    /// this.
    pub(super) async fn warm_disk_under(&self, parent: &str) {
        if self.disks.known().is_empty() {
            return;
        }
        let (name, sn) = (parent.to_owned(), self.sn.clone());
        let Ok(info) = blocking(move || sn.stat(&name)).await else {
            return;
        };
        if !labels::is_disk(&info.labels) {
            return;
        }
        let Some(key) = labels::remote_layer(&info.labels) else {
            return;
        };
        let (Some(image_ref), false) = (
            info.labels.get(labels::TARN_IMAGE_REF),
            self.disks.warmed(&key),
        ) else {
            return;
        };
        let blob = info
            .labels
            .get(labels::TARN_OBD_TRACE)
            .and_then(|t| obd::parse_stack(t).ok())
            .and_then(|mut b| b.pop());
        let trace = match blob {
            Some(b) => {
                self.resolver
                    .trace(image_ref, b.blob_digest, b.blob_size)
                    .await
            }
            None => None,
        };
        let entry = self.resolver.entrypoint(image_ref).await;
        self.disks.warm(&key, entry, trace);
    }

    pub(super) async fn detach_disk(&self, key: Digest) {
        let disks = self.disks.clone();
        let _ = tokio::task::spawn_blocking(move || disks.detach(&key)).await;
    }

    /// Mounts every recorded overlaybd stack again (at start), in
    /// parallel, or takes over the mount a predecessor handed to the
    /// holder (`Disks::attach`): its layers are opened from the recorded
    /// stack either way. A stack that cannot come back is logged; its
    /// snapshots fail their reads until removed.
    pub(super) async fn restore_disks(&self, snapshots: &[(String, BTreeMap<String, String>)]) {
        let restores =
            snapshots
                .iter()
                .filter(|(_, l)| labels::is_disk(l))
                .map(|(name, l)| async move {
                    let started = Instant::now();
                    match self.restore_disk(l).await {
                        Ok(key) => tracing::info!(
                            snapshot = %name,
                            stack = %key,
                            elapsed_ms = started.elapsed().as_millis(),
                            "overlaybd disk restored"
                        ),
                        Err(e) => tracing::error!(
                            snapshot = %name,
                            error = %chain(&e),
                            "overlaybd disk not restored"
                        ),
                    }
                });
        futures::future::join_all(restores).await;
    }

    async fn restore_disk(
        &self,
        l: &BTreeMap<String, String>,
    ) -> std::result::Result<Digest, RestoreDiskError> {
        let image_ref = l
            .get(labels::TARN_IMAGE_REF)
            .ok_or(RestoreDiskError::NoImageRef)?;
        let stack = obd::parse_stack(
            l.get(labels::TARN_OBD_STACK)
                .map(String::as_str)
                .unwrap_or_default(),
        )?;
        let key = obd::stack_key(&stack);
        let _disk = self.layers.lock(key).await;
        if self.disks.is_mounted(&key) {
            return Ok(key);
        }
        let timeout = self.options.restore_timeout;
        let layers = tokio::time::timeout(timeout, self.disk_layers(image_ref, &stack))
            .await
            .map_err(|_| RestoreDiskError::Timeout(timeout))??;
        let disks = self.disks.clone();
        let started = layers.clone();
        tokio::task::spawn_blocking(move || disks.attach(key, layers)).await??;
        self.start_disk_background(&started);
        Ok(key)
    }

    /// With background fetch on (`[fetch] background`), each blob of a
    /// mounted disk is read whole at background priority and its sha256
    /// checked (`tarn_fs::disk::DiskLayer::start_background`; a layer
    /// shared with another stack is read once).
    fn start_disk_background(&self, layers: &[Arc<DiskLayer>]) {
        if self.options.warm.background {
            for l in layers {
                l.start_background();
            }
        }
    }

    /// Blobs of the mounted disks by check (`unverified`, `verifying`,
    /// `verified`, `failed`), each blob once however many stacks share
    /// it, for the metrics.
    pub(super) fn disk_checks(&self) -> Vec<(&'static str, u64)> {
        let mut seen = std::collections::HashSet::new();
        let mut out: Vec<(&'static str, u64)> = ["unverified", "verifying", "verified", "failed"]
            .into_iter()
            .map(|c| (c, 0))
            .collect();
        for l in self.disks.status().iter().flat_map(|d| &d.layers) {
            if !seen.insert(l.digest) {
                continue;
            }
            let name = l.check().name();
            if let Some((_, n)) = out.iter_mut().find(|(c, _)| *c == name) {
                *n += 1;
            }
        }
        out
    }

    /// The hint figures of the mounted disks' blobs, each blob once
    /// however many stacks share it, summed, for the metrics.
    pub(super) fn disk_hints(&self) -> HintCounts {
        let mut seen = std::collections::HashSet::new();
        let mut out = HintCounts::default();
        for l in self.disks.status().iter().flat_map(|d| &d.layers) {
            if seen.insert(l.digest) {
                out.add(&l.layer.hint_stats());
            }
        }
        out
    }

    /// The mounted overlaybd stacks, for the admin API.
    pub fn disks(&self) -> Vec<DiskStatus> {
        self.disks.status()
    }
}
