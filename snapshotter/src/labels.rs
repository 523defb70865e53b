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
/// containerd >= 2.3 on every extraction Prepare (core/unpack/unpacker.go):
/// the chain ID of the layer below, and this layer's uncompressed digest.
/// In parallel unpack the Prepare has no parent and this label is the only
/// place the parent is named (the parent itself comes at Commit).
pub const PARENT_CHAIN_ID: &str = "containerd.io/snapshot/parent-chain-id";
pub const DIFF_ID: &str = "containerd.io/snapshot/diff-id";
/// Set with the CRI ones by containerd's AppendInfoHandlerWrapper
/// (pkg/snapshotters/annotations.go); tarn reads the manifest digest
/// (start profiles), not the layers.
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// Marks a snapshot served from a remote layer (the stargz convention).
pub const REMOTE: &str = "containerd.io/snapshot/remote";
/// What tarn records on a remote snapshot to restore its mount.
pub const TARN_IMAGE_REF: &str = "containerd.io/snapshot/tarn.image-ref";
pub const TARN_LAYER_DIGEST: &str = "containerd.io/snapshot/tarn.layer-digest";
pub const TARN_TOC_DIGEST: &str = "containerd.io/snapshot/tarn.toc-digest";
pub const TARN_BLOB_SIZE: &str = "containerd.io/snapshot/tarn.blob-size";
/// The manifest digest of the image a remote snapshot was pulled for,
/// when start profiles are on and CRI did not name it
/// ([`CRI_MANIFEST_DIGEST`]): what a container on it is profiled under.
pub const TARN_MANIFEST_DIGEST: &str = "containerd.io/snapshot/tarn.manifest-digest";
/// On the snapshot of an overlaybd chain: its stack, the layer blobs
/// bottom first as `digest@size,...` (`crate::obd::stack_label`). Its
/// [`TARN_LAYER_DIGEST`] is then the stack's key, not a blob.
pub const TARN_OBD_STACK: &str = "containerd.io/snapshot/tarn.obd-stack";
/// On the snapshot of an overlaybd image's acceleration layer: its blob
/// (`digest@size`), whose trace is replayed when a container is prepared
/// on it. The snapshot's stack is its parent's.
pub const TARN_OBD_TRACE: &str = "containerd.io/snapshot/tarn.obd-trace";

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
    /// Prepared without its parent, which only [`PARENT_CHAIN_ID`] names
    /// (containerd 2.x's parallel unpack). A lazy snapshot is committed at
    /// Prepare, and containerd looks it up by the parent it sent (none):
    /// committed on the labelled parent it is not found, committed without
    /// one it hides every lower layer. An ordinary snapshot gets its parent
    /// at Commit instead.
    #[error(
        "prepared without its parent (parallel unpack; {PARENT_CHAIN_ID} {0}): a lazy snapshot cannot be re-parented"
    )]
    NoParent(String),
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
/// `has_parent`: whether the Prepare named a parent.
pub fn decide(
    labels: &BTreeMap<String, String>,
    has_parent: bool,
    allow_unverified: bool,
) -> Decision {
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
    if let Some(p) = labels.get(PARENT_CHAIN_ID).filter(|_| !has_parent) {
        return Decision::Fallback(Unfit::NoParent(p.clone()));
    }
    Decision::Remote {
        chain_id: chain_id.clone(),
        layer: RemoteLayer {
            image_ref,
            digest,
            toc_digest,
        },
    }
}

/// Whether a parentless snapshot with these labels awaits its parent at
/// Commit: an extraction of containerd 2.x's parallel unpack.
pub fn awaits_parent(labels: &BTreeMap<String, String>) -> bool {
    labels.get(PARENT_CHAIN_ID).is_some_and(|p| !p.is_empty())
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

/// Whether a remote snapshot (its labels) is an overlaybd stack, served
/// as a disk, not as one layer.
pub fn is_disk(labels: &BTreeMap<String, String>) -> bool {
    labels.contains_key(TARN_OBD_STACK)
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

/// The layer of a remote snapshot (its `labels`) if it has uncompressed
/// digest `diff_id`: a layer already on the node that an image layer
/// Prepare without the remote-snapshot labels can be served from, as
/// containerd itself reuses snapshots by the config's diff IDs.
pub fn same_layer(labels: &BTreeMap<String, String>, diff_id: &str) -> Option<Restore> {
    if diff_id.is_empty() || labels.get(DIFF_ID).map(String::as_str) != Some(diff_id) {
        return None;
    }
    restore_info(labels)
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
            let Decision::Remote { chain_id, layer } = decide(&labels, false, false) else {
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
        assert!(matches!(decide(&l(&[]), false, false), Decision::Ordinary));
        let no_ref = decide(
            &l(&[(SNAPSHOT_REF, "c"), (STARGZ_DIGEST, &a)]),
            false,
            false,
        );
        assert!(matches!(&no_ref, Decision::Fallback(r) if r.to_string().contains("reference")));
        let no_toc = l(&[
            (SNAPSHOT_REF, "c"),
            (STARGZ_REFERENCE, "r/x:1"),
            (STARGZ_DIGEST, &a),
        ]);
        assert!(
            matches!(decide(&no_toc, false, false), Decision::Fallback(r) if r.to_string().contains("toc.digest"))
        );
        assert!(
            matches!(decide(&no_toc, false, true), Decision::Remote { layer, .. } if layer.toc_digest.is_none()),
            "allowed unverified layers are served without a TOC digest"
        );
        let bad = l(&[
            (SNAPSHOT_REF, "c"),
            (STARGZ_REFERENCE, "r/x:1"),
            (STARGZ_DIGEST, "sha256:../../etc"),
            (TOC_DIGEST, &a),
        ]);
        assert!(matches!(
            decide(&bad, false, false),
            Decision::Fallback(Unfit::BadLayerDigest(_))
        ));
        assert_eq!(remote_layer(&l(&[(TARN_LAYER_DIGEST, "../x")])), None);
    }

    #[test]
    fn a_remote_layer_is_found_by_its_diff_id() {
        let (a, t, diff) = (d('a'), d('b'), d('c'));
        let prepared = l(&[
            (SNAPSHOT_REF, "chain"),
            (DIFF_ID, &diff),
            (CRI_IMAGE_REF, "r/x:1"),
            (CRI_LAYER_DIGEST, &a),
            (TOC_DIGEST, &t),
        ]);
        let Decision::Remote { layer, .. } = decide(&prepared, true, false) else {
            panic!("remote");
        };
        let committed = remote_labels(prepared, &layer, 99);
        let found = same_layer(&committed, &diff).expect("same diff id");
        assert_eq!(found.layer, layer);
        assert_eq!(found.blob_size, 99);
        assert_eq!(same_layer(&committed, &d('e')), None);
        assert_eq!(same_layer(&committed, ""), None);
        let mut plain = committed.clone();
        plain.remove(TARN_LAYER_DIGEST);
        assert_eq!(same_layer(&plain, &diff), None, "not a remote snapshot");
    }

    /// containerd 2.3's unpacker labels every extraction with its diff ID
    /// and, above the first layer, its parent's chain ID; in parallel
    /// unpack the Prepare itself has no parent.
    #[test]
    fn a_parentless_prepare_naming_its_parent_in_a_label_is_not_lazy() {
        let (a, t) = (d('a'), d('b'));
        let labels = l(&[
            (SNAPSHOT_REF, "chain-2"),
            (DIFF_ID, &d('c')),
            (PARENT_CHAIN_ID, "chain-1"),
            (CRI_IMAGE_REF, "r/x:1"),
            (CRI_LAYER_DIGEST, &a),
            (CRI_IMAGE_LAYERS, &a),
            (CRI_MANIFEST_DIGEST, &d('e')),
            (TOC_DIGEST, &t),
        ]);
        // Sequential unpack (and the transfer service): the parent is given.
        assert!(matches!(
            decide(&labels, true, false),
            Decision::Remote { chain_id, .. } if chain_id == "chain-2"
        ));
        // Parallel unpack: the parent comes only at Commit.
        let Decision::Fallback(why) = decide(&labels, false, false) else {
            panic!("a parentless layer above another must not be lazy");
        };
        assert!(matches!(&why, Unfit::NoParent(p) if p == "chain-1"));
        assert!(why.to_string().contains("chain-1"), "{why}");
        assert!(awaits_parent(&labels));

        // The bottom layer has no parent to name: lazy either way.
        let mut bottom = labels.clone();
        bottom.remove(PARENT_CHAIN_ID);
        assert!(matches!(
            decide(&bottom, false, false),
            Decision::Remote { .. }
        ));
        assert!(!awaits_parent(&bottom));
        // Labels that cannot be lazy say so first, whatever the parent.
        bottom.remove(CRI_IMAGE_REF);
        let mut no_ref = bottom.clone();
        no_ref.insert(PARENT_CHAIN_ID.into(), "chain-1".into());
        assert!(matches!(
            decide(&no_ref, false, false),
            Decision::Fallback(Unfit::NoImageRef)
        ));
    }
}
