//! Start profiles on this node (`[profile]`): one file per image manifest
//! digest, `DIR/<hex>.json`, holding what the image's workload read in its
//! first seconds here (or a profile found in the registry).
//!
//! The first start of an image with no profile is recorded
//! (`RemoteSnapshotter::prepare` of a container's snapshot: the recording
//! runs `record_secs`, or until that snapshot is removed); a later start,
//! or a pull of an image whose profile is known, prefetches it
//! (`Layer::replay_profile`). A file that does not parse is a log line and
//! is set aside as `<hex>.json.bad`, so the next start records afresh.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tarn_fs::Digest;
use tarn_fs::layer::Layer;
use tarn_fs::layer::profile::{LayerProfile, Profile};

/// Where profiles live, and how they are learned.
#[derive(Debug)]
pub struct ProfileStore {
    dir: PathBuf,
    /// How long a first start is recorded.
    pub record: Duration,
    /// Look for a pushed profile in the registry.
    pub registry: bool,
}

impl ProfileStore {
    /// The store in `dir` (made if missing, root-only).
    pub fn open(dir: &Path, record: Duration, registry: bool) -> std::io::Result<ProfileStore> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        Ok(ProfileStore {
            dir: dir.to_owned(),
            record,
            registry,
        })
    }

    fn path(&self, manifest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.json", manifest.hex()))
    }

    /// The profile of `manifest`, if one is kept and reads. Blocking.
    pub fn load(&self, manifest: &Digest) -> Option<Arc<Profile>> {
        let path = self.path(manifest);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read start profile");
                return None;
            }
        };
        match Profile::parse(&bytes) {
            Ok(p) => Some(Arc::new(p)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "start profile ignored: set aside as .bad");
                let _ = std::fs::rename(&path, path.with_extension("json.bad"));
                None
            }
        }
    }

    /// The document of `manifest`'s profile as kept (for `tarn profile`).
    /// Blocking.
    pub fn document(&self, manifest: &Digest) -> Option<Vec<u8>> {
        self.load(manifest).map(|p| p.to_bytes())
    }

    /// Keeps `profile` as `manifest`'s, replacing any (written whole, then
    /// renamed into place). Blocking.
    pub fn save(&self, manifest: &Digest, profile: &Profile) -> std::io::Result<()> {
        let path = self.path(manifest);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, profile.to_bytes())?;
        std::fs::rename(&tmp, &path)
    }
}

/// Replays `section` on `layer`, with a log line of what it did (and of
/// what the profile named that the layer does not hold).
pub async fn replay(layer: &Layer, section: &LayerProfile) {
    let started = std::time::Instant::now();
    match layer.replay_profile(section).await {
        Ok(r) if r.busy => {
            tracing::debug!(layer = %section.digest, "start profile: a replay already runs on this layer");
        }
        Ok(r) if r.missing > 0 || r.out_of_bounds > 0 => tracing::info!(
            layer = %section.digest,
            chunks = r.chunks,
            fetched = r.fetched,
            missing = r.missing,
            out_of_bounds = r.out_of_bounds,
            elapsed_ms = started.elapsed().as_millis(),
            "start profile replayed; it names files or ranges this layer does not hold (ignored)"
        ),
        Ok(r) => tracing::info!(
            layer = %section.digest,
            chunks = r.chunks,
            fetched = r.fetched,
            elapsed_ms = started.elapsed().as_millis(),
            "start profile replayed"
        ),
        Err(e) => {
            tracing::info!(layer = %section.digest, error = %e, "start profile: prefetch failed")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tarn_fs::layer::Access;

    #[test]
    fn a_saved_profile_loads_and_a_corrupt_one_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            ProfileStore::open(&dir.path().join("p"), Duration::from_secs(1), false).unwrap();
        let (m, l) = (Digest::of(b"manifest"), Digest::of(b"layer"));
        assert!(store.load(&m).is_none());
        let access = Access {
            path: "bin/sh".into(),
            first: Duration::ZERO,
            ranges: vec![(0, 10)],
        };
        let p = Profile::from_recording("reg/a:1", vec![(l, vec![access])]);
        store.save(&m, &p).unwrap();
        assert_eq!(*store.load(&m).unwrap(), p);
        std::fs::write(store.path(&m), b"{\"mediaType\": 1").unwrap();
        assert!(store.load(&m).is_none());
        assert!(!store.path(&m).exists(), "the corrupt file is set aside");
        assert!(store.path(&m).with_extension("json.bad").exists());
    }
}
