//! Start profiles: what a workload read in its first seconds, per layer,
//! as a document (`application/vnd.tarn.profile.v1+json`), and its replay
//! as a prefetch on a later start of the same image.
//!
//! A profile comes from this node's own recording or from the registry,
//! where anyone could have pushed it: it is a hint, never trusted. Parsing
//! bounds its size and every count; replaying it looks each path up in the
//! layer's verified index and clips each range to the file, so a profile
//! naming what the layer does not hold fetches nothing for that entry, and
//! every byte fetched is verified like any other.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Digest;
use crate::fetch::Hint;
use crate::format::{Chunk, FileKind};

use super::{Access, Layer};

/// The profile document's media type (also its OCI artifact type).
pub const MEDIA_TYPE: &str = "application/vnd.tarn.profile.v1+json";
/// The largest profile document read.
pub const MAX_BYTES: usize = 4 << 20;
/// Layers one profile may name.
pub const MAX_LAYERS: usize = 512;
/// Files one layer's section may name.
pub const MAX_FILES: usize = 1 << 16;
/// Ranges one file may name.
pub const MAX_RANGES: usize = 64;
/// Of a file opened but never read through FUSE (its bytes came from the
/// kernel's caches when recorded), the head prefetched.
pub const UNRANGED_HEAD: u64 = 1 << 20;

/// A start profile: per layer, the files read in first-access order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Profile {
    pub media_type: String,
    /// The image it was recorded from (informative only).
    #[serde(default)]
    pub image: String,
    pub layers: Vec<LayerProfile>,
}

/// One layer's section of a profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerProfile {
    pub digest: Digest,
    pub files: Vec<FileProfile>,
}

/// A file a profile names: its path in the layer, when it was first
/// touched, and the byte ranges read (`[offset, length]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FileProfile {
    pub path: String,
    #[serde(default)]
    pub first_access_micros: u64,
    #[serde(default)]
    pub ranges: Vec<[u64; 2]>,
}

/// Why a profile document was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    #[error("{0} bytes: at most {MAX_BYTES}")]
    TooLarge(usize),
    #[error("not a profile: {0}")]
    Json(String),
    #[error("media type {0:?}, not {MEDIA_TYPE}")]
    MediaType(String),
    #[error("{0} layers: at most {MAX_LAYERS}")]
    TooManyLayers(usize),
    #[error("layer {0}: {1} files, at most {MAX_FILES}")]
    TooManyFiles(Digest, usize),
    #[error("layer {0}, {1:?}: {2} ranges, at most {MAX_RANGES}")]
    TooManyRanges(Digest, String, usize),
}

impl Profile {
    /// A recording's result as a profile of `image`; layers where nothing
    /// was touched are left out.
    pub fn from_recording(image: &str, layers: Vec<(Digest, Vec<Access>)>) -> Profile {
        let layers = layers
            .into_iter()
            .filter(|(_, files)| !files.is_empty())
            .map(|(digest, files)| LayerProfile {
                digest,
                files: files
                    .into_iter()
                    .map(|a| FileProfile {
                        path: a.path,
                        first_access_micros: micros(a.first),
                        ranges: a.ranges.iter().map(|&(s, e)| [s, e - s]).collect(),
                    })
                    .collect(),
            })
            .collect();
        Profile {
            media_type: MEDIA_TYPE.to_owned(),
            image: image.to_owned(),
            layers,
        }
    }

    /// Reads a document, bounded in size and in every count.
    pub fn parse(bytes: &[u8]) -> Result<Profile, ProfileError> {
        if bytes.len() > MAX_BYTES {
            return Err(ProfileError::TooLarge(bytes.len()));
        }
        let p: Profile =
            serde_json::from_slice(bytes).map_err(|e| ProfileError::Json(e.to_string()))?;
        if p.media_type != MEDIA_TYPE {
            return Err(ProfileError::MediaType(p.media_type));
        }
        if p.layers.len() > MAX_LAYERS {
            return Err(ProfileError::TooManyLayers(p.layers.len()));
        }
        for l in &p.layers {
            if l.files.len() > MAX_FILES {
                return Err(ProfileError::TooManyFiles(l.digest, l.files.len()));
            }
            if let Some(f) = l.files.iter().find(|f| f.ranges.len() > MAX_RANGES) {
                return Err(ProfileError::TooManyRanges(
                    l.digest,
                    f.path.clone(),
                    f.ranges.len(),
                ));
            }
        }
        Ok(p)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a profile serializes")
    }

    /// The section of layer `digest`, if the profile has one.
    pub fn layer(&self, digest: &Digest) -> Option<&LayerProfile> {
        self.layers.iter().find(|l| l.digest == *digest)
    }

    /// How many files the profile names, across layers.
    pub fn files(&self) -> usize {
        self.layers.iter().map(|l| l.files.len()).sum()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// What replaying a layer's section did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Chunks the replay asked for (cached ones included).
    pub chunks: usize,
    /// Chunks fetched by it.
    pub fetched: usize,
    /// Entries that named no regular file of the layer.
    pub missing: usize,
    /// Ranges that reached past their file's end (clipped, or dropped).
    pub out_of_bounds: usize,
    /// Nothing done: another replay ran on this layer.
    pub busy: bool,
}

/// Marks a layer's replay running; clears the mark when dropped.
struct Replaying<'a>(&'a AtomicBool);

impl Drop for Replaying<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Layer {
    /// Prefetches what `section` names, in its order, with
    /// `Intent::Prefetch` (counted as [`Hint::Profile`]): each file's
    /// chunks covering its ranges, or its head when it names none. Paths
    /// the layer does not hold and ranges past a file's end are counted,
    /// not fetched. One replay runs on a layer at a time: one asked for
    /// meanwhile (a container's start while the pull's replay still runs)
    /// returns `busy`, since it would only queue the same chunks again
    /// and count them twice.
    pub async fn replay_profile(
        &self,
        section: &LayerProfile,
    ) -> Result<Replayed, super::LayerError> {
        let mut replayed = Replayed::default();
        if self.replaying.swap(true, Ordering::AcqRel) {
            replayed.busy = true;
            return Ok(replayed);
        }
        let _running = Replaying(&self.replaying);
        let chunks = self.profile_chunks(section, &mut replayed);
        replayed.chunks = chunks.len();
        replayed.fetched = self.fetcher.warm_for(Hint::Profile, &chunks).await?;
        Ok(replayed)
    }

    /// The chunks `section` covers, in its order, each once.
    fn profile_chunks(&self, section: &LayerProfile, replayed: &mut Replayed) -> Vec<Chunk> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for file in &section.files {
            let inode = self
                .index
                .resolve(&file.path)
                .and_then(|ino| self.index.inode(ino))
                .filter(|i| i.kind() == FileKind::Reg);
            let Some(inode) = inode else {
                replayed.missing += 1;
                continue;
            };
            let size = inode.size();
            let whole = [[0, size.min(UNRANGED_HEAD)]];
            let ranges: &[[u64; 2]] = if file.ranges.is_empty() {
                &whole
            } else {
                &file.ranges
            };
            for &[offset, len] in ranges {
                let end = offset.saturating_add(len);
                if end > size {
                    replayed.out_of_bounds += 1;
                }
                let end = end.min(size);
                if offset >= end {
                    continue;
                }
                for c in self.index.file_chunks(&inode) {
                    let c_end = c.file_offset + c.size;
                    if c_end > offset && c.file_offset < end && seen.insert(c.digest) {
                        out.push(*c);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(layers: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "mediaType": MEDIA_TYPE,
            "image": "reg/app:1",
            "layers": layers,
        }))
        .unwrap()
    }

    #[test]
    fn a_recording_becomes_a_document_that_reads_back_the_same() {
        let d = Digest::of(b"layer");
        let p = Profile::from_recording(
            "reg/app:1",
            vec![
                (
                    d,
                    vec![Access {
                        path: "app/run.sh".into(),
                        first: Duration::from_micros(10),
                        ranges: vec![(0, 120), (4096, 8192)],
                    }],
                ),
                (Digest::of(b"untouched"), Vec::new()),
            ],
        );
        assert_eq!(p.layers.len(), 1, "untouched layers are left out");
        assert_eq!(
            p.layer(&d).unwrap().files[0].ranges,
            vec![[0, 120], [4096, 4096]]
        );
        let back = Profile::parse(&p.to_bytes()).unwrap();
        assert_eq!(back, p);
        let v: serde_json::Value = serde_json::from_slice(&p.to_bytes()).unwrap();
        assert_eq!(v["layers"][0]["files"][0]["firstAccessMicros"], 10);
    }

    #[test]
    fn corrupt_or_oversized_profiles_are_refused_with_a_reason() {
        assert!(matches!(
            Profile::parse(b"{not json"),
            Err(ProfileError::Json(_))
        ));
        assert!(matches!(
            Profile::parse(br#"{"mediaType":"x","layers":[]}"#),
            Err(ProfileError::MediaType(_))
        ));
        assert!(matches!(
            Profile::parse(&doc(
                serde_json::json!([{"digest": "sha256:zz", "files": []}])
            )),
            Err(ProfileError::Json(_))
        ));
        assert!(matches!(
            Profile::parse(&vec![b' '; MAX_BYTES + 1]),
            Err(ProfileError::TooLarge(_))
        ));
        let d = Digest::of(b"l").to_string();
        let ranges: Vec<[u64; 2]> = (0..=MAX_RANGES as u64).map(|i| [i, 1]).collect();
        assert!(matches!(
            Profile::parse(&doc(
                serde_json::json!([{"digest": d, "files": [{"path": "a", "ranges": ranges}]}])
            )),
            Err(ProfileError::TooManyRanges(..))
        ));
        let layers: Vec<_> = (0..=MAX_LAYERS)
            .map(|_| serde_json::json!({"digest": d, "files": []}))
            .collect();
        assert!(matches!(
            Profile::parse(&doc(serde_json::json!(layers))),
            Err(ProfileError::TooManyLayers(_))
        ));
    }
}
