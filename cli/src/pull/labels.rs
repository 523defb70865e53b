//! Pure helpers of the pull: chain IDs, and the labels containerd's garbage
//! collector and a remote snapshotter expect, by the conventions of
//! containerd 1.6 (`images.ChildGCLabels`, the unpacker) and of stargz-style
//! and CRI pull clients (DESIGN.md §2).

use std::collections::HashMap;

use anyhow::{Context, Result};
use tarn_fs::Digest;

/// containerd refuses a label whose key and value together exceed this.
const MAX_LABEL_LEN: usize = 4096;

pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
pub const STARGZ_REFERENCE: &str = "containerd.io/snapshot/remote/stargz.reference";
pub const STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
pub const STARGZ_LAYERS: &str = "containerd.io/snapshot/remote/stargz.layers";
pub const STARGZ_PREFETCH: &str = "containerd.io/snapshot/remote/stargz.prefetch";
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// containerd forwards to a snapshotter only labels with this prefix (and
/// `containerd.io/snapshot.ref`), so layer annotations with it ride along.
const SNAPSHOT_LABEL_PREFIX: &str = "containerd.io/snapshot/";

/// The `rootfs.diff_ids` of an image config.
pub fn diff_ids(config: &[u8]) -> Result<Vec<Digest>> {
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(serde::Deserialize)]
    struct RootFs {
        diff_ids: Vec<String>,
    }
    let c: Config =
        serde_json::from_slice(config).context("image config has no rootfs.diff_ids")?;
    c.rootfs
        .diff_ids
        .iter()
        .map(|d| {
            d.parse::<Digest>()
                .with_context(|| format!("bad diff id {d:?} in image config"))
        })
        .collect()
}

/// Chain IDs of a layer stack: the first is its diff ID, each next one is
/// `sha256(parent_chain + " " + diff_id)` (OCI image spec).
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => *d,
            Some(parent) => Digest::of(format!("{parent} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Labels on the manifest that keep its config and layers alive.
pub fn manifest_gc_labels(config: &Digest, layers: &[Digest]) -> HashMap<String, String> {
    let mut l = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        config.to_string(),
    )]);
    for (i, d) in layers.iter().enumerate() {
        l.insert(format!("containerd.io/gc.ref.content.l.{i}"), d.to_string());
    }
    l
}

/// The label on the config that keeps the unpacked snapshot chain alive.
pub fn config_gc_labels(snapshotter: &str, top_chain: &Digest) -> HashMap<String, String> {
    HashMap::from([(
        format!("containerd.io/gc.ref.snapshot.{snapshotter}"),
        top_chain.to_string(),
    )])
}

/// What every layer's snapshot labels are built from.
pub struct ImageFacts<'a> {
    pub reference: &'a str,
    pub manifest_digest: &'a Digest,
    pub layers: &'a [Digest],
    pub prefetch_size: Option<u64>,
}

/// The labels of layer `i`'s unpack snapshot (Prepare and Commit).
pub fn snapshot_labels(
    facts: &ImageFacts<'_>,
    i: usize,
    chain_id: &Digest,
    annotations: &std::collections::BTreeMap<String, String>,
) -> HashMap<String, String> {
    let mut l: HashMap<String, String> = annotations
        .iter()
        .filter(|(k, _)| k.starts_with(SNAPSHOT_LABEL_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let layer = facts.layers[i].to_string();
    let manifest = facts.manifest_digest.to_string();
    l.insert(SNAPSHOT_REF.into(), chain_id.to_string());
    l.insert(STARGZ_REFERENCE.into(), facts.reference.into());
    l.insert(STARGZ_DIGEST.into(), layer.clone());
    l.insert(
        STARGZ_LAYERS.into(),
        layer_list(STARGZ_LAYERS, &facts.layers[i..]),
    );
    if let Some(size) = facts.prefetch_size {
        l.insert(STARGZ_PREFETCH.into(), size.to_string());
    }
    l.insert(CRI_IMAGE_REF.into(), facts.reference.into());
    l.insert(CRI_LAYER_DIGEST.into(), layer);
    l.insert(CRI_MANIFEST_DIGEST.into(), manifest);
    l.insert(
        CRI_IMAGE_LAYERS.into(),
        layer_list(CRI_IMAGE_LAYERS, &facts.layers[i..]),
    );
    l
}

/// Comma-joined digests, this layer's first, cut before the label would
/// exceed containerd's size limit: the list only helps a snapshotter
/// prefetch, so dropping the tail is safe (as stargz and CRI clients do).
fn layer_list(key: &str, layers: &[Digest]) -> String {
    let mut s = String::new();
    for d in layers {
        let d = d.to_string();
        let add = d.len() + usize::from(!s.is_empty());
        if key.len() + s.len() + add > MAX_LABEL_LEN {
            break;
        }
        if !s.is_empty() {
            s.push(',');
        }
        s.push_str(&d);
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn d(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        // The second chain ID was computed outside Rust with
        // `printf 'sha256:2ad6... sha256:00...01' | sha256sum`.
        let a: Digest = "sha256:2ad6e0e5f2b1e1ddc7d6ec9b6fb6a4ef5e5b0e0e6c4b1e9d6f0a5c8a3d5e6f70"
            .parse()
            .unwrap();
        let b: Digest = "sha256:0000000000000000000000000000000000000000000000000000000000000001"
            .parse()
            .unwrap();
        let ids = chain_ids(&[a, b, b]);
        assert_eq!(ids[0], a);
        assert_eq!(ids[1], Digest::of(format!("{a} {b}").as_bytes()));
        assert_eq!(ids[2], Digest::of(format!("{} {b}", ids[1]).as_bytes()));
        assert_eq!(
            ids[1].to_string(),
            "sha256:5481e832789de9421330a8f5cccadb3634617b5904e1c7ec0f9c76f72fe93230"
        );
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn diff_ids_read_from_config_and_reject_garbage() {
        let c = format!(
            r#"{{"architecture":"amd64","rootfs":{{"type":"layers","diff_ids":["{}","{}"]}}}}"#,
            d("x"),
            d("y")
        );
        assert_eq!(diff_ids(c.as_bytes()).unwrap(), vec![d("x"), d("y")]);
        assert!(diff_ids(br#"{"rootfs":{"diff_ids":["md5:00"]}}"#).is_err());
        assert!(diff_ids(b"{}").is_err());
    }

    #[test]
    fn gc_labels_name_config_layers_and_snapshot() {
        let m = manifest_gc_labels(&d("c"), &[d("l0"), d("l1")]);
        assert_eq!(m["containerd.io/gc.ref.content.config"], d("c").to_string());
        assert_eq!(m["containerd.io/gc.ref.content.l.1"], d("l1").to_string());
        assert_eq!(m.len(), 3);
        let c = config_gc_labels("tarn", &d("top"));
        assert_eq!(
            c["containerd.io/gc.ref.snapshot.tarn"],
            d("top").to_string()
        );
    }

    #[test]
    fn snapshot_labels_carry_both_protocols_and_forwarded_annotations() {
        let layers = [d("l0"), d("l1"), d("l2")];
        let facts = ImageFacts {
            reference: "127.0.0.1:5000/app:1",
            manifest_digest: &d("m"),
            layers: &layers,
            prefetch_size: Some(1024),
        };
        let ann = BTreeMap::from([
            (
                "containerd.io/snapshot/stargz/toc.digest".to_string(),
                d("toc").to_string(),
            ),
            (
                "org.opencontainers.image.title".to_string(),
                "x".to_string(),
            ),
        ]);
        let l = snapshot_labels(&facts, 1, &d("chain"), &ann);
        assert_eq!(l[SNAPSHOT_REF], d("chain").to_string());
        assert_eq!(l[STARGZ_REFERENCE], "127.0.0.1:5000/app:1");
        assert_eq!(l[STARGZ_DIGEST], d("l1").to_string());
        assert_eq!(l[STARGZ_LAYERS], format!("{},{}", d("l1"), d("l2")));
        assert_eq!(l[STARGZ_PREFETCH], "1024");
        assert_eq!(l[CRI_LAYER_DIGEST], d("l1").to_string());
        assert_eq!(l[CRI_MANIFEST_DIGEST], d("m").to_string());
        assert_eq!(l[CRI_IMAGE_LAYERS], l[STARGZ_LAYERS]);
        assert_eq!(
            l["containerd.io/snapshot/stargz/toc.digest"],
            d("toc").to_string()
        );
        assert!(!l.contains_key("org.opencontainers.image.title"));
    }

    #[test]
    fn layer_lists_stay_under_containerds_label_limit() {
        let many: Vec<Digest> = (0..100).map(|i| d(&i.to_string())).collect();
        let s = layer_list(STARGZ_LAYERS, &many);
        assert!(STARGZ_LAYERS.len() + s.len() <= MAX_LABEL_LEN);
        assert!(s.starts_with(&many[0].to_string()));
        let n = s.split(',').count();
        assert!(n > 40 && n < 100, "{n} digests kept");
        assert!(s.split(',').all(|x| x.parse::<Digest>().is_ok()));
    }
}
