//! Mount specs of a snapshot: a pure function of the snapshot, its parents
//! and where their directories are, as containerd's overlayfs snapshotter
//! computes them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tarn_fs::Digest;

use crate::labels;
use crate::metastore::{Kind, Snapshot};

/// A snapshot as its mounts see it: its id and its ancestors' ids,
/// nearest first, and which ancestors are remote layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    pub id: u64,
    pub kind: Kind,
    pub parent_ids: Vec<u64>,
    /// Parents that are remote layers: id -> layer digest (their content is
    /// the layer's FUSE mount, not their own directory).
    pub remote: BTreeMap<u64, Digest>,
    /// Remote parents that are overlaybd stacks: the tree of each already
    /// holds every layer below it (`labels::is_disk`).
    pub disks: BTreeSet<u64>,
    /// A parentless extraction that gets its parent at Commit (containerd
    /// 2.x's parallel unpack; [`labels::awaits_parent`]).
    pub awaits_parent: bool,
}

impl Stack {
    /// `s`'s stack, its remote parents told by their labels.
    pub fn of(s: &Snapshot) -> Stack {
        Stack {
            id: s.id,
            kind: s.kind,
            parent_ids: s.parents.iter().map(|p| p.id).collect(),
            remote: s
                .parents
                .iter()
                .filter_map(|p| Some((p.id, labels::remote_layer(&p.labels)?)))
                .collect(),
            disks: s
                .parents
                .iter()
                .filter(|p| labels::is_disk(&p.labels))
                .map(|p| p.id)
                .collect(),
            awaits_parent: s.parents.is_empty() && labels::awaits_parent(&s.labels),
        }
    }
}

/// One mount a client applies (containerd's `Mount`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Where snapshot directories live: `<root>/snapshots/<id>/{fs,work}`,
/// and remote layers' FUSE mounts: `<root>/layers/<digest hex>/fs`.
///
/// Remote layers live outside `snapshots/` and are named by layer digest,
/// not snapshot id: one mount serves every snapshot (chain ID) made of
/// that layer, the snapshot cleanup never walks into a FUSE mount, and a
/// restarted daemon finds a layer's mountpoint from its digest alone.
#[derive(Debug, Clone)]
pub struct Layout {
    snapshots: PathBuf,
    layers: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Self {
        Layout {
            snapshots: root.join("snapshots"),
            layers: root.join("layers"),
        }
    }

    pub fn layers_dir(&self) -> &Path {
        &self.layers
    }

    pub fn layer_dir(&self, digest: &Digest) -> PathBuf {
        self.layers.join(digest.hex())
    }

    /// The FUSE mountpoint of a remote layer.
    pub fn layer_fs(&self, digest: &Digest) -> PathBuf {
        self.layer_dir(digest).join("fs")
    }

    /// What a snapshot of `s`'s ancestry with id `id` contributes as a
    /// lower layer: its own fs dir, or its layer's FUSE mount.
    pub fn lower(&self, s: &Stack, id: u64) -> PathBuf {
        match s.remote.get(&id) {
            Some(d) => self.layer_fs(d),
            None => self.fs(id),
        }
    }

    pub fn snapshots_dir(&self) -> &Path {
        &self.snapshots
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.snapshots.join(id.to_string())
    }

    /// The snapshot's content: the upper dir of an active one, the layer of
    /// a committed one.
    pub fn fs(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// overlayfs' scratch dir, only for active snapshots.
    pub fn work(&self, id: u64) -> PathBuf {
        self.dir(id).join("work")
    }
}

/// The mounts of `s`.
///
/// - no parents: a bind mount of its own fs dir (overlay needs at least one
///   lower dir), read-only for a view;
/// - no parents yet (parallel unpack): an overlay mount of the upper dir
///   alone, which is never mounted: containerd's applier sees `overlay`
///   and writes into `upperdir` with whiteouts as overlayfs keeps them
///   (core/diff/apply/apply_linux.go). Through a bind mount it would apply
///   them to an empty directory, where they vanish, and a file the layer
///   deletes would come back once the layer sits on its parent. containerd
///   does the same for its own overlayfs (`bindToOverlay` in
///   core/unpack/unpacker.go), but only for a snapshotter named overlayfs;
/// - a view of a single parent: a read-only bind of that parent;
/// - otherwise overlay with `lowerdir=` nearest parent first, plus
///   `upperdir`/`workdir` for an active snapshot.
///
/// A remote parent contributes its layer's FUSE mountpoint. Of the
/// overlaybd parents only the nearest does: its ext4 tree already holds
/// every layer below it, deletions applied, which the lower ones would
/// bring back.
///
/// `index=off` keeps overlayfs from recording the lower dirs' identity, so a
/// committed layer can be a lower dir of many overlays over its lifetime.
pub fn mounts(layout: &Layout, s: &Stack) -> Vec<Mount> {
    let path = |id: u64| layout.lower(s, id).to_string_lossy().into_owned();
    if s.awaits_parent && s.kind == Kind::Active {
        return vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec!["rw".into(), format!("upperdir={}", path(s.id))],
        }];
    }
    if s.parent_ids.is_empty() {
        let mode = if s.kind == Kind::View { "ro" } else { "rw" };
        return vec![Mount {
            kind: "bind".into(),
            source: layout.fs(s.id).to_string_lossy().into_owned(),
            options: vec![mode.into(), "rbind".into()],
        }];
    }
    let parents = lower_ids(s);
    let mut options = vec!["index=off".to_owned()];
    if s.kind == Kind::Active {
        options.push(format!("workdir={}", layout.work(s.id).display()));
        options.push(format!("upperdir={}", path(s.id)));
    } else if let [only] = parents[..] {
        return vec![Mount {
            kind: "bind".into(),
            source: path(only),
            options: vec!["ro".into(), "rbind".into()],
        }];
    }
    let lower: Vec<String> = parents.iter().map(|&id| path(id)).collect();
    options.push(format!("lowerdir={}", lower.join(":")));
    vec![Mount {
        kind: "overlay".into(),
        source: "overlay".into(),
        options,
    }]
}

/// The parents that are lower dirs, nearest first: all but the overlaybd
/// stacks under the nearest one.
fn lower_ids(s: &Stack) -> Vec<u64> {
    let mut seen_disk = false;
    s.parent_ids
        .iter()
        .copied()
        .filter(|id| {
            let disk = s.disks.contains(id);
            let keep = !(disk && seen_disk);
            seen_disk |= disk;
            keep
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metastore::Parent;

    fn layout() -> Layout {
        Layout::new(Path::new("/r"))
    }

    fn snap(id: u64, kind: Kind, parents: &[u64]) -> Stack {
        Stack {
            id,
            kind,
            parent_ids: parents.to_vec(),
            remote: BTreeMap::new(),
            disks: BTreeSet::new(),
            awaits_parent: false,
        }
    }

    #[test]
    fn only_the_nearest_overlaybd_parent_is_a_lower_dir() {
        let key = |c: &str| -> Digest { format!("sha256:{}", c.repeat(32)).parse().unwrap() };
        // 9 active on 8 (plain) on 7, 5, 3 (overlaybd stacks).
        let mut s = snap(9, Kind::Active, &[8, 7, 5, 3]);
        for (id, c) in [(7, "07"), (5, "05"), (3, "03")] {
            s.remote.insert(id, key(c));
            s.disks.insert(id);
        }
        let m = mounts(&layout(), &s);
        assert_eq!(
            m[0].options.last().unwrap(),
            &format!(
                "lowerdir=/r/snapshots/8/fs:/r/layers/{}/fs",
                "07".repeat(32)
            )
        );
        // A view of the top of a chain: its one tree, bound read-only.
        let mut v = snap(6, Kind::View, &[7, 5, 3]);
        v.remote = s.remote.clone();
        v.disks = s.disks.clone();
        let m = mounts(&layout(), &v);
        assert_eq!(m[0].kind, "bind");
        assert_eq!(m[0].source, format!("/r/layers/{}/fs", "07".repeat(32)));
    }

    #[test]
    fn remote_parents_are_their_fuse_mounts() {
        let d: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        let mut s = snap(9, Kind::Active, &[7, 4]);
        s.remote.insert(4, d);
        let m = mounts(&layout(), &s);
        assert_eq!(
            m[0].options.last().unwrap(),
            &format!(
                "lowerdir=/r/snapshots/7/fs:/r/layers/{}/fs",
                "ab".repeat(32)
            )
        );
        let mut v = snap(5, Kind::View, &[4]);
        v.remote.insert(4, d);
        assert_eq!(
            mounts(&layout(), &v)[0].source,
            format!("/r/layers/{}/fs", "ab".repeat(32)),
            "a view of a lone remote layer binds its mount"
        );
    }

    #[test]
    fn a_stack_knows_remote_parents_by_their_labels() {
        let d: Digest = format!("sha256:{}", "cd".repeat(32)).parse().unwrap();
        let remote = BTreeMap::from([(labels::TARN_LAYER_DIGEST.to_owned(), d.to_string())]);
        let s = Snapshot {
            id: 9,
            kind: Kind::Active,
            labels: BTreeMap::new(),
            parents: vec![
                Parent {
                    id: 7,
                    labels: BTreeMap::new(),
                },
                Parent {
                    id: 4,
                    labels: remote,
                },
            ],
        };
        let mut want = snap(9, Kind::Active, &[7, 4]);
        want.remote.insert(4, d);
        assert_eq!(Stack::of(&s), want);
    }

    #[test]
    fn lone_active_is_rw_bind_of_own_dir() {
        let m = mounts(&layout(), &snap(1, Kind::Active, &[]));
        assert_eq!(
            m,
            vec![Mount {
                kind: "bind".into(),
                source: "/r/snapshots/1/fs".into(),
                options: vec!["rw".into(), "rbind".into()],
            }]
        );
    }

    #[test]
    fn a_parallel_extraction_is_its_upper_dir_as_overlay() {
        let labelled = |parents: Vec<Parent>| Snapshot {
            id: 3,
            kind: Kind::Active,
            labels: BTreeMap::from([(labels::PARENT_CHAIN_ID.to_owned(), "sha256:c1".to_owned())]),
            parents,
        };
        let s = Stack::of(&labelled(vec![]));
        assert!(s.awaits_parent);
        assert_eq!(
            mounts(&layout(), &s),
            vec![Mount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec!["rw".into(), "upperdir=/r/snapshots/3/fs".into()],
            }]
        );
        // Once it has its parent (sequential unpack, or after a rebase),
        // the label changes nothing.
        let on = Stack::of(&labelled(vec![Parent {
            id: 1,
            labels: BTreeMap::new(),
        }]));
        assert!(!on.awaits_parent);
        assert!(
            mounts(&layout(), &on)[0]
                .options
                .contains(&"lowerdir=/r/snapshots/1/fs".to_owned())
        );
    }

    #[test]
    fn lone_view_is_ro_bind() {
        let m = mounts(&layout(), &snap(2, Kind::View, &[]));
        assert_eq!(m[0].options, vec!["ro", "rbind"]);
        assert_eq!(m[0].source, "/r/snapshots/2/fs");
    }

    #[test]
    fn view_of_one_parent_binds_the_parent_read_only() {
        let m = mounts(&layout(), &snap(5, Kind::View, &[3]));
        assert_eq!(
            m,
            vec![Mount {
                kind: "bind".into(),
                source: "/r/snapshots/3/fs".into(),
                options: vec!["ro".into(), "rbind".into()],
            }]
        );
    }

    #[test]
    fn active_on_parents_is_overlay_nearest_first() {
        let m = mounts(&layout(), &snap(9, Kind::Active, &[7, 4, 1]));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].kind, "overlay");
        assert_eq!(m[0].source, "overlay");
        assert_eq!(
            m[0].options,
            vec![
                "index=off",
                "workdir=/r/snapshots/9/work",
                "upperdir=/r/snapshots/9/fs",
                "lowerdir=/r/snapshots/7/fs:/r/snapshots/4/fs:/r/snapshots/1/fs",
            ]
        );
    }

    #[test]
    fn view_of_several_parents_is_lowerdir_only() {
        let m = mounts(&layout(), &snap(9, Kind::View, &[7, 4]));
        assert_eq!(
            m[0].options,
            vec!["index=off", "lowerdir=/r/snapshots/7/fs:/r/snapshots/4/fs"]
        );
        assert!(!m[0].options.iter().any(|o| o.starts_with("upperdir")));
    }
}
