//! The remote path's two seams, so its decisions are unit-tested without
//! root or a registry (the fakes are in the test-only `testing` module):
//!
//! - [`Resolve`]: "open this layer" (manifest, footer, TOC from the
//!   registry); the real one is `resolve::Resolver`.
//! - [`Mounter`]: mount a resolved layer at a path, unmount it, is it
//!   mounted; the real one is `mounter::FuseMounter`.
//!
//! What a resolved layer is stays the implementation's business
//! ([`Resolve::Layer`]); the rest of the remote path sees it only through
//! [`LayerHandle`].

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tarn_fs::Digest;
use tarn_fs::disk::DiskLayer;
use tarn_fs::fetch::FetchStatsSnapshot;
use tarn_fs::format::overlaybd::trace::Trace;
use tarn_fs::layer::Entrypoint;
use tarn_fs::registry::{ClientStats, Reference, RegistryError, ResolvedImage};

use crate::labels::RemoteLayer;

/// A layer opened (footer and TOC fetched and verified), not yet mounted.
#[derive(Clone)]
pub struct Resolved<L> {
    pub layer: L,
    pub blob_size: u64,
    /// The TOC digest the layer was verified against.
    pub toc_digest: Option<Digest>,
}

/// An opened layer as the remote path uses it once mounted.
pub trait LayerHandle: Clone + Send + Sync + 'static {
    /// Fetch figures, for the admin API.
    fn stats(&self) -> FetchStatsSnapshot;
    /// Every chunk is cached: reads no longer touch the network.
    fn complete(&self) -> bool;
    /// The layer's chunks (cache key and plain size), as its index lists
    /// them: what the cache holds for it.
    fn chunks(&self) -> Vec<(Digest, u64)>;
    /// Right after mounting: prefetches the prioritized files, waiting for
    /// them up to `prefetch`, then starts the background fetch if asked.
    fn warm(&self, prefetch: Option<Duration>, background: bool)
    -> impl Future<Output = ()> + Send;
    /// Starts access recording session `id` on this layer.
    fn start_recording(&self, id: u64) -> Result<(), tarn_fs::layer::RecordError>;
    /// Ends session `id`: the files its readers touched, in first-access
    /// order; `None` if it was not running.
    fn stop_recording(&self, id: u64) -> Option<Vec<tarn_fs::layer::Access>>;
    /// Prefetches what a start profile's section for this layer names
    /// (`Layer::replay_profile`); logs what it could not find.
    fn replay_profile(
        &self,
        section: &tarn_fs::layer::profile::LayerProfile,
    ) -> impl Future<Output = ()> + Send;
}

/// Resolution of remote layers.
pub trait Resolve: Send + Sync + 'static {
    type Layer: LayerHandle;

    /// Opens `layer` (blob size from its image's manifest unless given).
    /// Concurrent calls for one digest share one resolution.
    fn layer(
        &self,
        layer: &RemoteLayer,
        blob_size: Option<u64>,
    ) -> impl Future<Output = Result<Resolved<Self::Layer>, ResolveError>> + Send;

    /// Starts resolving, in the background, every lazy layer of
    /// `image_ref` except `skip`.
    fn ahead(&self, image_ref: &str, skip: HashSet<Digest>);

    /// Takes `image` as the manifest of `image_ref` (from `tarn pull`) and
    /// starts resolving its layers ahead. Returns how many are lazy.
    fn expect(&self, image_ref: &str, image: ResolvedImage, skip: HashSet<Digest>) -> usize;

    /// Opens connections to `reference`'s registry in the background.
    fn preconnect(&self, reference: &Reference);

    /// The layer is mounted now: whatever was kept for it may go.
    fn mounted(&self, digest: &Digest);

    /// Opens the overlaybd layer blob `digest` of `image_ref`
    /// (`blob_size` bytes) as one layer of a stacked disk. Concurrent
    /// calls for one digest share one resolution, and a layer still open
    /// in a mounted stack is shared, not opened again. A resolver without
    /// a registry serves none.
    fn disk_layer(
        &self,
        _image_ref: &str,
        _digest: Digest,
        _blob_size: u64,
    ) -> impl Future<Output = Result<Arc<DiskLayer>, ResolveError>> + Send {
        async { Err(ResolveError::NoDisks) }
    }

    /// The digest of `image_ref`'s manifest (the node's platform's), from
    /// the resolver's memo or one GET; nothing for a resolver without a
    /// registry.
    fn manifest_digest(&self, _image_ref: &str) -> impl Future<Output = Option<Digest>> + Send {
        async { None }
    }

    /// The program `image_ref`'s config runs, when entrypoint prefetch is
    /// on (`[fetch] prefetch`); nothing for a resolver without a registry.
    fn entrypoint(&self, _image_ref: &str) -> impl Future<Output = Option<Entrypoint>> + Send {
        async { None }
    }

    /// The trace of an overlaybd image's acceleration layer `digest`
    /// (`blob_size` bytes) of `image_ref`, fetched whole and verified;
    /// nothing (and a log line) if it cannot be had or read, and for a
    /// resolver without a registry.
    fn trace(
        &self,
        _image_ref: &str,
        _digest: Digest,
        _blob_size: u64,
    ) -> impl Future<Output = Option<Trace>> + Send {
        async { None }
    }

    /// What the registry client has received, mirrors apart (`tarn
    /// status`); nothing for a resolver without one.
    fn registry_stats(&self) -> ClientStats {
        ClientStats::default()
    }

    /// What peers sent this node and it sent them (`tarn status`);
    /// nothing without peers.
    fn peer_stats(&self) -> tarn_fs::peer::PeerStats {
        tarn_fs::peer::PeerStats::default()
    }
}

/// Mounting resolved layers. Every method blocks (mount syscalls): call
/// them from the blocking pool.
pub trait Mounter<L>: Send + Sync + 'static {
    /// Mounts `layer` at `mountpoint`, creating it and replacing whatever
    /// a killed daemon left mounted there.
    fn mount(&self, layer: &L, mountpoint: &Path, fsname: &str) -> Result<(), MountError>;
    /// Unmounts whatever is mounted at `mountpoint`; not mounted is fine.
    fn unmount(&self, mountpoint: &Path) -> Result<(), MountError>;
    fn is_mounted(&self, mountpoint: &Path) -> bool;
    /// After every layer was restored at start: lets go of what a
    /// predecessor left that no layer took over.
    fn settle(&self) {}
    /// On shutdown: leaves every mount to a successor process instead of
    /// unmounting it; false if this mounter cannot (then unmount).
    fn hand_over(&self) -> bool {
        false
    }
    /// Since when this process serves the mount at `mountpoint`, and how
    /// many takeovers its connection went through.
    fn served(&self, _mountpoint: &Path) -> Option<Service> {
        None
    }
    /// The holder this mounter hands its connections to, if any: the
    /// overlaybd disks' go to the same one.
    fn holder(&self) -> Option<&crate::holder::Holder> {
        None
    }
    /// The counter of mounts taken over from a predecessor
    /// (`tarn_takeovers_total`), if this mounter keeps one: adopted
    /// overlaybd disks count on the same one.
    fn takeovers(&self) -> Option<&prometheus_client::metrics::counter::Counter> {
        None
    }
}

/// How a mount is served, for `tarn status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// When this process began serving it (mounted or adopted it).
    pub since: std::time::SystemTime,
    /// How many processes adopted its connection from a predecessor.
    pub takeovers: u64,
}

/// Why a layer could not be resolved. Cheap to clone: one resolution is
/// shared by every Prepare waiting for it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Registry(Arc<RegistryError>),
    #[error("image {image_ref} has no layer {digest}")]
    NotInImage { image_ref: String, digest: Digest },
    #[error("opening the layer")]
    Open(#[source] Arc<tarn_fs::layer::LayerError>),
    #[error("resolve task failed")]
    Task(#[source] Arc<tokio::task::JoinError>),
    #[error("opening the overlaybd layer")]
    Disk(#[source] Arc<tarn_fs::disk::DiskError>),
    #[error("this resolver serves no overlaybd layers")]
    NoDisks,
}

impl From<tarn_fs::disk::DiskError> for ResolveError {
    fn from(e: tarn_fs::disk::DiskError) -> Self {
        ResolveError::Disk(Arc::new(e))
    }
}

impl From<RegistryError> for ResolveError {
    fn from(e: RegistryError) -> Self {
        ResolveError::Registry(Arc::new(e))
    }
}

impl From<tarn_fs::layer::LayerError> for ResolveError {
    fn from(e: tarn_fs::layer::LayerError) -> Self {
        ResolveError::Open(Arc::new(e))
    }
}

impl From<tokio::task::JoinError> for ResolveError {
    fn from(e: tokio::task::JoinError) -> Self {
        ResolveError::Task(Arc::new(e))
    }
}

/// Resolved ahead from the registry's manifest, the layer has another TOC
/// than the Prepare names (a tag moved in between).
#[derive(Debug, thiserror::Error)]
#[error("TOC digest {want:?} of the Prepare differs from the manifest's {got:?}")]
pub struct TocMismatch {
    pub want: Option<Digest>,
    pub got: Option<Digest>,
}

/// Why a layer could not be mounted or unmounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("create mountpoint {path}")]
    Mountpoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Fuse(#[from] tarn_fs::fuse::FuseError),
    #[error("mount task failed")]
    Task(#[from] tokio::task::JoinError),
}
