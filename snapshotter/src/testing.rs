//! Fakes of the remote path's seams ([`crate::seams`]), for unit tests:
//! a resolver answering from a table and a mounter that records.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tarn_fs::Digest;
use tarn_fs::fetch::FetchStatsSnapshot;
use tarn_fs::registry::{Reference, ResolvedImage};

use crate::labels::RemoteLayer;
use crate::seams::{LayerHandle, MountError, Mounter, Resolve, ResolveError, Resolved};

/// A resolved layer that is only its digest.
#[derive(Debug, Clone)]
pub struct FakeLayer {
    pub digest: Digest,
}

impl LayerHandle for FakeLayer {
    fn stats(&self) -> FetchStatsSnapshot {
        FetchStatsSnapshot::default()
    }

    fn complete(&self) -> bool {
        false
    }

    /// One chunk of its own and one every fake layer shares.
    fn chunks(&self) -> Vec<(Digest, u64)> {
        vec![(own_chunk(&self.digest), 1), (Digest::of(SHARED_CHUNK), 1)]
    }

    async fn warm(&self, _prefetch: Option<Duration>, _background: bool) {}

    /// A fake layer has no files: recording it is allowed and sees nothing.
    fn start_recording(&self, _id: u64) -> Result<(), tarn_fs::layer::RecordError> {
        Ok(())
    }

    fn stop_recording(&self, _id: u64) -> Option<Vec<tarn_fs::layer::Access>> {
        Some(Vec::new())
    }

    async fn replay_profile(&self, _section: &tarn_fs::layer::profile::LayerProfile) {}
}

/// The content every [`FakeLayer`] lists as a chunk.
pub const SHARED_CHUNK: &[u8] = b"a chunk every fake layer has";

/// The content of the chunk only `layer` lists.
pub fn own_chunk_data(layer: &Digest) -> Vec<u8> {
    layer.0.to_vec()
}

pub fn own_chunk(layer: &Digest) -> Digest {
    Digest::of(&own_chunk_data(layer))
}

/// What [`FakeResolver`] answers for one layer digest.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Resolved with this TOC digest (the asked one when `None`).
    Resolved {
        toc_digest: Option<Digest>,
    },
    Fails(ResolveError),
    /// Never answers.
    Hangs,
}

/// Resolves every layer (blob size 1000 unless given) unless told
/// otherwise per digest; records what it was asked.
#[derive(Clone, Default)]
pub struct FakeResolver(Arc<ResolverState>);

#[derive(Default)]
struct ResolverState {
    outcomes: Mutex<HashMap<Digest, Outcome>>,
    resolved: Mutex<Vec<Digest>>,
    forgotten: Mutex<Vec<Digest>>,
    ahead: Mutex<Vec<String>>,
}

impl FakeResolver {
    pub fn answer(&self, digest: Digest, outcome: Outcome) {
        self.0.outcomes.lock().unwrap().insert(digest, outcome);
    }

    /// The digests asked for, in order.
    pub fn resolved(&self) -> Vec<Digest> {
        self.0.resolved.lock().unwrap().clone()
    }

    /// The digests told mounted ([`Resolve::mounted`]).
    pub fn forgotten(&self) -> Vec<Digest> {
        self.0.forgotten.lock().unwrap().clone()
    }

    /// The images resolved ahead.
    pub fn ahead_of(&self) -> Vec<String> {
        self.0.ahead.lock().unwrap().clone()
    }
}

impl Resolve for FakeResolver {
    type Layer = FakeLayer;

    async fn layer(
        &self,
        layer: &RemoteLayer,
        blob_size: Option<u64>,
    ) -> Result<Resolved<FakeLayer>, ResolveError> {
        self.0.resolved.lock().unwrap().push(layer.digest);
        let outcome = self.0.outcomes.lock().unwrap().get(&layer.digest).cloned();
        let toc_digest = match outcome {
            None => layer.toc_digest,
            Some(Outcome::Resolved { toc_digest }) => toc_digest.or(layer.toc_digest),
            Some(Outcome::Fails(e)) => return Err(e),
            Some(Outcome::Hangs) => std::future::pending().await,
        };
        Ok(Resolved {
            layer: FakeLayer {
                digest: layer.digest,
            },
            blob_size: blob_size.unwrap_or(1000),
            toc_digest,
        })
    }

    fn ahead(&self, image_ref: &str, _skip: HashSet<Digest>) {
        self.0.ahead.lock().unwrap().push(image_ref.to_owned());
    }

    fn expect(&self, _image_ref: &str, image: ResolvedImage, _skip: HashSet<Digest>) -> usize {
        image.layers.len()
    }

    fn preconnect(&self, _reference: &Reference) {}

    fn mounted(&self, digest: &Digest) {
        self.0.forgotten.lock().unwrap().push(*digest);
    }
}

/// One call a [`FakeMounter`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Mount(PathBuf),
    Unmount(PathBuf),
}

/// Mounts by creating the mountpoint and remembering it; fails the layers
/// it is told to, after creating the mountpoint (as a failing FUSE mount
/// leaves it).
#[derive(Clone, Default)]
pub struct FakeMounter(Arc<MounterState>);

#[derive(Default)]
struct MounterState {
    mounted: Mutex<HashSet<PathBuf>>,
    failing: Mutex<HashSet<Digest>>,
    calls: Mutex<Vec<Call>>,
}

impl FakeMounter {
    pub fn fail(&self, digest: Digest) {
        self.0.failing.lock().unwrap().insert(digest);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.0.calls.lock().unwrap().clone()
    }

    pub fn mounted(&self) -> HashSet<PathBuf> {
        self.0.mounted.lock().unwrap().clone()
    }
}

impl Mounter<FakeLayer> for FakeMounter {
    fn mount(&self, layer: &FakeLayer, mountpoint: &Path, _fsname: &str) -> Result<(), MountError> {
        let call = Call::Mount(mountpoint.to_owned());
        self.0.calls.lock().unwrap().push(call);
        std::fs::create_dir_all(mountpoint).map_err(|source| MountError::Mountpoint {
            path: mountpoint.to_owned(),
            source,
        })?;
        if self.0.failing.lock().unwrap().contains(&layer.digest) {
            return Err(tarn_fs::fuse::FuseError::Mount {
                path: mountpoint.to_owned(),
                error: std::io::Error::from_raw_os_error(libc::EPERM),
            }
            .into());
        }
        self.0.mounted.lock().unwrap().insert(mountpoint.to_owned());
        Ok(())
    }

    fn unmount(&self, mountpoint: &Path) -> Result<(), MountError> {
        let call = Call::Unmount(mountpoint.to_owned());
        self.0.calls.lock().unwrap().push(call);
        self.0.mounted.lock().unwrap().remove(mountpoint);
        Ok(())
    }

    fn is_mounted(&self, mountpoint: &Path) -> bool {
        self.0.mounted.lock().unwrap().contains(mountpoint)
    }
}
