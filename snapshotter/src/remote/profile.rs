//! Start profiles on the remote path: a container's snapshot prepared on a
//! chain of lazy layers is the start of its image. With a profile for the
//! image kept here, the start prefetches it; without one, the start is
//! recorded and becomes the profile (`crate::profiles`).

use std::sync::Arc;

use tarn_fs::Digest;
use tarn_fs::layer::profile::Profile;

use super::{RemoteSnapshotter, blocking};
use crate::labels;
use crate::profiles::ProfileStore;
use crate::seams::{LayerHandle, Mounter, Resolve};
use crate::snapshotter::Snapshotter;

/// Snapshots walked from a container's parent down its chain.
const MAX_CHAIN: usize = 512;

/// The image under a container's snapshot, as its chain's labels say.
struct Chain {
    manifest: Digest,
    image_ref: String,
    /// Lazy layers, bottom first.
    layers: Vec<Digest>,
}

/// The chain below `parent`, if its top was pulled lazily with a manifest
/// digest. Blocking.
fn chain_of(sn: &Snapshotter, parent: &str) -> Option<Chain> {
    let top = sn.stat(parent).ok()?;
    let manifest = top
        .labels
        .get(labels::TARN_MANIFEST_DIGEST)
        .or_else(|| top.labels.get(labels::CRI_MANIFEST_DIGEST))?
        .parse()
        .ok()?;
    let image_ref = top.labels.get(labels::TARN_IMAGE_REF)?.clone();
    let mut layers = Vec::new();
    let mut next = Some(top);
    for _ in 0..MAX_CHAIN {
        let Some(info) = next.take() else { break };
        if !labels::is_disk(&info.labels) {
            layers.extend(labels::remote_layer(&info.labels));
        }
        next = info.parent.as_deref().and_then(|p| sn.stat(p).ok());
    }
    layers.reverse();
    Some(Chain {
        manifest,
        image_ref,
        layers,
    })
}

impl<R: Resolve, M: Mounter<R::Layer>> RemoteSnapshotter<R, M> {
    /// A container's snapshot `key` is prepared on `parent`: with start
    /// profiles on, replays the image's profile, or records this start.
    pub(super) async fn start_profile(&self, key: &str, parent: &str) {
        let Some(store) = self.profiles.clone() else {
            return;
        };
        let (name, sn) = (parent.to_owned(), self.sn.clone());
        let Ok(Some(chain)) =
            blocking(move || Ok::<_, tokio::task::JoinError>(chain_of(&sn, &name))).await
        else {
            return;
        };
        let (s, m) = (store.clone(), chain.manifest);
        let known = blocking(move || Ok::<_, tokio::task::JoinError>(s.load(&m)))
            .await
            .ok()
            .flatten();
        match known {
            Some(profile) => self.replay(&chain, &profile),
            None => self.learn(key, chain, store),
        }
    }

    /// Prefetches `profile` on the chain's mounted layers (chunks cached
    /// already cost nothing).
    fn replay(&self, chain: &Chain, profile: &Profile) {
        for d in &chain.layers {
            let (Some(section), Some(layer)) = (profile.layer(d), self.layers.handle(d)) else {
                continue;
            };
            let section = section.clone();
            tokio::spawn(async move { layer.replay_profile(&section).await });
        }
    }

    /// Records the start in snapshot `key` for the profile's length, or
    /// until the snapshot is removed, then keeps what it read as the
    /// image's profile.
    fn learn(&self, key: &str, chain: Chain, store: Arc<ProfileStore>) {
        let Some(ended) = self.learning.begin(key, chain.manifest) else {
            return;
        };
        let started = match self
            .recordings
            .start(&chain.layers, |d| self.layers.handle(d))
        {
            Ok(s) => s,
            Err(e) => {
                self.learning.done(key);
                tracing::info!(image = %chain.image_ref, error = %e, "start profile: not recorded");
                return;
            }
        };
        tracing::info!(
            image = %chain.image_ref,
            manifest = %chain.manifest,
            key,
            secs = store.record.as_secs(),
            "start profile: recording this first start"
        );
        let (recordings, learning, key) = (
            self.recordings.clone(),
            self.learning.clone(),
            key.to_owned(),
        );
        tokio::spawn(async move {
            let _ = tokio::time::timeout(store.record, ended.notified()).await;
            learning.done(&key);
            let Some(layers) = recordings.stop(started.id) else {
                return;
            };
            let profile = Profile::from_recording(&chain.image_ref, layers);
            if profile.files() == 0 {
                tracing::info!(image = %chain.image_ref, "start profile: nothing was read; none kept");
                return;
            }
            let (files, n) = (profile.files(), profile.layers.len());
            let manifest = chain.manifest;
            let saved =
                blocking(move || Ok::<_, tokio::task::JoinError>(store.save(&manifest, &profile)))
                    .await;
            match saved {
                Ok(Ok(())) => tracing::info!(
                    image = %chain.image_ref,
                    %manifest,
                    files,
                    layers = n,
                    "start profile learned"
                ),
                Ok(Err(e)) => {
                    tracing::warn!(%manifest, error = %e, "cannot keep the start profile")
                }
                Err(e) => tracing::warn!(%manifest, error = %e, "start profile: save task failed"),
            }
        });
    }

    /// The kept profile document of `manifest` (`tarn profile`), if
    /// start profiles are on and one is kept.
    pub async fn profile_document(&self, manifest: Digest) -> Option<Vec<u8>> {
        let store = self.profiles.clone()?;
        blocking(move || Ok::<_, tokio::task::JoinError>(store.document(&manifest)))
            .await
            .ok()
            .flatten()
    }

    /// Whether start profiles are on.
    pub fn profiles_on(&self) -> bool {
        self.profiles.is_some()
    }
}
