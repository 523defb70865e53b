//! Access recordings across layers (admin `StartRecording` and
//! `StopRecording`, for `tarn optimize`): one id names a session on each
//! of an image's mounted layers. The handles are kept, so a layer
//! unmounted meanwhile still answers what it saw.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Notify;

use tarn_fs::Digest;
use tarn_fs::layer::{Access, RecordError};

use crate::seams::LayerHandle;

/// Recordings running at once across the daemon.
pub const MAX_RECORDINGS: usize = 16;
/// Layers one recording may name (an image's layers: manifests are bounded
/// well below this).
pub const MAX_LAYERS: usize = 512;

/// Why a recording could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{MAX_RECORDINGS} recordings are already running")]
    TooMany,
    #[error("{0} layers named: at most {MAX_LAYERS}")]
    TooManyLayers(usize),
    #[error("layer {0}: {1}")]
    Layer(Digest, RecordError),
}

/// A recording started: its id and the layers it could not record (not
/// mounted lazily by this daemon).
#[derive(Debug)]
pub struct Started {
    pub id: u64,
    pub not_recorded: Vec<Digest>,
}

pub struct Recordings<L> {
    next: AtomicU64,
    running: Mutex<HashMap<u64, Vec<(Digest, L)>>>,
}

impl<L> Default for Recordings<L> {
    fn default() -> Self {
        Recordings {
            // Ids are not reused within a process: a stale id finds nothing.
            next: AtomicU64::new(1),
            running: Mutex::default(),
        }
    }
}

impl<L: LayerHandle> Recordings<L> {
    /// Starts a recording on each of `digests` that `handle` finds.
    pub fn start(
        &self,
        digests: &[Digest],
        handle: impl Fn(&Digest) -> Option<L>,
    ) -> Result<Started, StartError> {
        if digests.len() > MAX_LAYERS {
            return Err(StartError::TooManyLayers(digests.len()));
        }
        let mut running = self.running.lock().expect("recordings poisoned");
        if running.len() >= MAX_RECORDINGS {
            return Err(StartError::TooMany);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (mut on, mut not_recorded) = (Vec::new(), Vec::new());
        for d in digests {
            if on.iter().any(|(x, _)| x == d) {
                continue;
            }
            match handle(d) {
                Some(l) => match l.start_recording(id) {
                    Ok(()) => on.push((*d, l)),
                    Err(e) => {
                        for (_, l) in &on {
                            l.stop_recording(id);
                        }
                        return Err(StartError::Layer(*d, e));
                    }
                },
                None => not_recorded.push(*d),
            }
        }
        running.insert(id, on);
        Ok(Started { id, not_recorded })
    }

    /// Ends recording `id`: per layer, the files it saw in first-access
    /// order. `None` if no such recording runs.
    pub fn stop(&self, id: u64) -> Option<Vec<(Digest, Vec<Access>)>> {
        let layers = self
            .running
            .lock()
            .expect("recordings poisoned")
            .remove(&id)?;
        Some(
            layers
                .into_iter()
                .map(|(d, l)| (d, l.stop_recording(id).unwrap_or_default()))
                .collect(),
        )
    }
}

/// First starts being recorded for start profiles: by the key of the
/// container's snapshot, the image's manifest digest and what ends the
/// recording early (the snapshot's removal).
#[derive(Default)]
pub struct Learning(Mutex<HashMap<String, (Digest, Arc<Notify>)>>);

impl Learning {
    /// Notes that snapshot `key`'s start of `manifest` is recorded; `None`
    /// when that image is being recorded already, or too many are.
    pub fn begin(&self, key: &str, manifest: Digest) -> Option<Arc<Notify>> {
        let mut map = self.0.lock().expect("learning poisoned");
        if map.len() >= MAX_RECORDINGS || map.values().any(|(m, _)| *m == manifest) {
            return None;
        }
        let notify = Arc::new(Notify::new());
        map.insert(key.to_owned(), (manifest, notify.clone()));
        Some(notify)
    }

    /// Snapshot `key` is gone (or its recording ended): its recording, if
    /// any, ends now.
    pub fn done(&self, key: &str) {
        let gone = self.0.lock().expect("learning poisoned").remove(key);
        if let Some((_, notify)) = gone {
            notify.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeLayer;

    #[test]
    fn a_recording_names_what_it_could_not_record_and_stops_once() {
        let r: Recordings<FakeLayer> = Recordings::default();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let started = r
            .start(&[a, b, a], |d| {
                (*d == a).then_some(FakeLayer { digest: *d })
            })
            .unwrap();
        assert_eq!(started.not_recorded, vec![b]);
        let stopped = r.stop(started.id).unwrap();
        assert_eq!(stopped.len(), 1);
        assert_eq!(stopped[0].0, a);
        assert!(r.stop(started.id).is_none());
        for _ in 0..MAX_RECORDINGS {
            r.start(&[a], |_| None).unwrap();
        }
        assert!(matches!(r.start(&[a], |_| None), Err(StartError::TooMany)));
    }
}
