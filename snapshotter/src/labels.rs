//! The labels of the remote-snapshot protocol (DESIGN.md §2), pure: what a
//! Prepare's labels say about the layer, and the labels tarn puts on a
//! remote snapshot so a restarted daemon can mount its layer again.

use std::collections::BTreeMap;

use tarn_fs::Digest;
use tarn_fs::digest::DigestError;

/// The chain ID the committed snapshot of an image layer is to be named.
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// The layer annotation with the sha256 of the uncompressed TOC JSON.
pub const TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Marks a snapshot served from a remote layer (the stargz convention).
pub const REMOTE: &str = "containerd.io/snapshot/remote";
/// What tarn records on a remote snapshot to restore its mount.
pub const TARN_IMAGE_REF: &str = "containerd.io/snapshot/tarn.image-ref";
pub const TARN_LAYER_DIGEST: &str = "containerd.io/snapshot/tarn.layer-digest";
pub const TARN_TOC_DIGEST: &str = "containerd.io/snapshot/tarn.toc-digest";
pub const TARN_BLOB_SIZE: &str = "containerd.io/snapshot/tarn.blob-size";

/// A layer to serve lazily, as a Prepare describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLayer {
    /// The image reference the layer is pulled from.
    pub image_ref: String,
    pub digest: Digest,
    /// `None` only when unverified layers are allowed.
    pub toc_digest: Option<Digest>,
}

/// Why a Prepare's labels do not describe a layer tarn can serve lazily.
#[derive(Debug, thiserror::Error)]
pub enum Unfit {
    #[error("no image reference label")]
    NoImageRef,
    #[error("no layer digest label")]
    NoLayerDigest,
    #[error("bad layer digest label")]
    BadLayerDigest(#[source] DigestError),
    #[error("bad {TOC_DIGEST} label")]
    BadTocDigest(#[source] DigestError),
    #[error("no {TOC_DIGEST} label (not eStargz, or unverifiable; see allow_unverified_layers)")]
    NoTocDigest,
}

/// What to do with a Prepare.
#[derive(Debug)]
pub enum Decision {
    /// Not an image layer (no target chain ID): an ordinary Prepare, not a
    /// fallback (containers' rootfs snapshots are these).
    Ordinary,
    /// An image layer tarn will not serve lazily, with the reason.
    Fallback(Unfit),
    /// Try to serve it lazily, committing it as `chain_id`.
    Remote {
        chain_id: String,
        layer: RemoteLayer,
    },
}

/// Reads a Prepare's labels. Stargz-style labels win over CRI ones when
/// both are present (they come from the client that asked for laziness).
pub fn decide(labels: &BTreeMap<String, String>, allow_unverified: bool) -> Decision {
    let Some(chain_id) = labels.get(SNAPSHOT_REF).filter(|c| !c.is_empty()) else {
        return Decision::Ordinary;
    };
    let get = |a: &str, b: &str| labels.get(a).or_else(|| labels.get(b)).cloned();
    let Some(image_ref) = get(STARGZ_REFERENCE, CRI_IMAGE_REF) else {
        return Decision::Fallback(Unfit::NoImageRef);
    };
    let Some(digest) = get(STARGZ_DIGEST, CRI_LAYER_DIGEST) else {
        return Decision::Fallback(Unfit::NoLayerDigest);
    };
    let digest = match digest.parse::<Digest>() {
        Ok(d) => d,
        Err(e) => return Decision::Fallback(Unfit::BadLayerDigest(e)),
    };
    let toc_digest = match labels.get(TOC_DIGEST).map(|t| t.parse::<Digest>()) {
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => return Decision::Fallback(Unfit::BadTocDigest(e)),
        None if allow_unverified => None,
        None => return Decision::Fallback(Unfit::NoTocDigest),
    };
    Decision::Remote {
        chain_id: chain_id.clone(),
        layer: RemoteLayer {
            image_ref,
            digest,
            toc_digest,
        },
    }
}

/// The labels of the committed remote snapshot: the Prepare's, plus the
/// remote marker and what a restart needs.
pub fn remote_labels(
    mut labels: BTreeMap<String, String>,
    layer: &RemoteLayer,
    blob_size: u64,
) -> BTreeMap<String, String> {
    labels.insert(REMOTE.into(), "remote snapshot".into());
    labels.insert(TARN_IMAGE_REF.into(), layer.image_ref.clone());
    labels.insert(TARN_LAYER_DIGEST.into(), layer.digest.to_string());
    if let Some(t) = layer.toc_digest {
        labels.insert(TARN_TOC_DIGEST.into(), t.to_string());
    }
    labels.insert(TARN_BLOB_SIZE.into(), blob_size.to_string());
    labels
}

/// The layer digest of a remote snapshot, if `labels` are one's.
pub fn remote_layer(labels: &BTreeMap<String, String>) -> Option<Digest> {
    labels.get(TARN_LAYER_DIGEST)?.parse().ok()
}

/// Everything needed to mount a remote snapshot's layer again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restore {
    pub layer: RemoteLayer,
    pub blob_size: u64,
}

pub fn restore_info(labels: &BTreeMap<String, String>) -> Option<Restore> {
    let digest = remote_layer(labels)?;
    let toc_digest = match labels.get(TARN_TOC_DIGEST) {
        Some(t) => Some(t.parse().ok()?),
        None => None,
    };
    Some(Restore {
        layer: RemoteLayer {
            image_ref: labels.get(TARN_IMAGE_REF)?.clone(),
            digest,
            toc_digest,
        },
        blob_size: labels.get(TARN_BLOB_SIZE)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn l(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn stargz_and_cri_labels_both_describe_a_remote_layer() {
        let (a, t) = (d('a'), d('b'));
        for labels in [
            l(&[
                (SNAPSHOT_REF, "chain"),
                (STARGZ_REFERENCE, "r/x:1"),
                (STARGZ_DIGEST, &a),
                (TOC_DIGEST, &t),
            ]),
            l(&[
                (SNAPSHOT_REF, "chain"),
                (CRI_IMAGE_REF, "r/x:1"),
                (CRI_LAYER_DIGEST, &a),
                (TOC_DIGEST, &t),
            ]),
        ] {
            let Decision::Remote { chain_id, layer } = decide(&labels, false) else {
                panic!("not remote: {labels:?}");
            };
            assert_eq!(chain_id, "chain");
            assert_eq!(layer.image_ref, "r/x:1");
            assert_eq!(layer.digest.to_string(), a);
            assert_eq!(layer.toc_digest.map(|t| t.to_string()), Some(t.clone()));

            // What is recorded is enough to restore it.
            let rl = remote_labels(labels.clone(), &layer, 1234);
            assert_eq!(rl[REMOTE], "remote snapshot");
            assert_eq!(
                restore_info(&rl),
                Some(Restore {
                    layer,
                    blob_size: 1234
                })
            );
        }
    }

    #[test]
    fn what_cannot_be_lazy_falls_back_with_a_reason() {
        let a = d('a');
        assert!(matches!(decide(&l(&[]), false), Decision::Ordinary));
        let no_ref = decide(&l(&[(SNAPSHOT_REF, "c"), (STARGZ_DIGEST, &a)]), false);
        assert!(matches!(&no_ref, Decision::Fallback(r) if r.to_string().contains("reference")));
        let no_toc = l(&[
            (SNAPSHOT_REF, "c"),
            (STARGZ_REFERENCE, "r/x:1"),
            (STARGZ_DIGEST, &a),
        ]);
        assert!(
            matches!(decide(&no_toc, false), Decision::Fallback(r) if r.to_string().contains("toc.digest"))
        );
        assert!(
            matches!(decide(&no_toc, true), Decision::Remote { layer, .. } if layer.toc_digest.is_none()),
            "allowed unverified layers are served without a TOC digest"
        );
        let bad = l(&[
            (SNAPSHOT_REF, "c"),
            (STARGZ_REFERENCE, "r/x:1"),
            (STARGZ_DIGEST, "sha256:../../etc"),
            (TOC_DIGEST, &a),
        ]);
        assert!(matches!(
            decide(&bad, false),
            Decision::Fallback(Unfit::BadLayerDigest(_))
        ));
        assert_eq!(remote_layer(&l(&[(TARN_LAYER_DIGEST, "../x")])), None);
    }
}
