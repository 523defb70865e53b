//! Snapshots with containerd's overlayfs snapshotter semantics.
//!
//! Layout under the root: `metadata.redb` (the [`MetaStore`]) and
//! `snapshots/<id>/{fs,work}`. A new snapshot's directory is built as
//! `snapshots/new-*` and renamed to its id inside the metadata transaction,
//! so a crash leaves either a recorded snapshot with its directory or a
//! stray directory that [`Snapshotter::cleanup`] removes. Removal deletes
//! directories only after the transaction committed.
//!
//! Every method blocks (redb, filesystem): call them from the blocking pool.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::filters::{self, Filter};
use crate::metastore::{self, Info, Kind, MetaStore, Usage};
use crate::mounts::{self, Layout, Mount, Stack};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Meta(#[from] metastore::Error),
    #[error(transparent)]
    Filter(#[from] filters::Error),
    #[error("{context}")]
    Io { context: String, source: io::Error },
    #[error("snapshot task failed")]
    Task(#[from] tokio::task::JoinError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io {
        context: context.into(),
        source,
    }
}

pub struct Snapshotter {
    ms: MetaStore,
    layout: Layout,
    /// Temp dirs of creations in flight, which cleanup must not take for
    /// strays.
    creating: Mutex<HashSet<PathBuf>>,
    temp_seq: AtomicU64,
}

impl Snapshotter {
    /// Opens the snapshotter rooted at `root`, creating it if needed.
    pub fn open(root: &Path) -> Result<Self> {
        let layout = Layout::new(root);
        for dir in [root, layout.snapshots_dir(), layout.layers_dir()] {
            std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
            // Snapshot contents are container filesystems: root only.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(format!("chmod {}", dir.display())))?;
        }
        let ms = MetaStore::open(&root.join("metadata.redb"))?;
        Ok(Snapshotter {
            ms,
            layout,
            creating: Mutex::default(),
            temp_seq: AtomicU64::new(0),
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::Active, key, parent, labels)
    }

    pub fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels)
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let s = self.ms.snapshot(key)?;
        Ok(mounts::mounts(&self.layout, &Stack::of(&s)))
    }

    /// Commits Active `key` as `name`, recording its disk usage. `parent`
    /// is containerd 2.x's rebase: the parent of a snapshot prepared
    /// without one, set in the same transaction as the commit.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        parent: Option<&str>,
    ) -> Result<()> {
        let (record, _) = self.ms.get(key)?;
        // A non-active key is refused by the store; no need to measure it.
        let usage = if record.kind == Kind::Active {
            disk_usage(&self.layout.fs(record.id))?
        } else {
            Usage::default()
        };
        self.ms.update(|tx| {
            if let Some(p) = parent {
                tx.rebase(key, p)?;
            }
            tx.commit(key, name, usage, labels)
        })?;
        Ok(())
    }

    /// Creates the committed snapshot `name` of a remote layer, whose
    /// content is the layer's FUSE mount (made by the caller).
    pub fn create_remote(
        &self,
        name: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        self.ms
            .update(|tx| tx.create_committed(name, parent, labels))?;
        Ok(())
    }

    /// Removes `key` (refused while it has children) and every directory no
    /// snapshot references. Returns the remote layer the snapshot was made
    /// of, whose mount may now be unused.
    pub fn remove(&self, key: &str) -> Result<Option<tarn_fs::Digest>> {
        let (removed, strays) = self.ms.update(|tx| {
            let r = tx.remove(key)?;
            Ok::<_, Error>((r, self.strays(&tx.ids()?)?))
        })?;
        self.delete(strays);
        Ok(crate::labels::remote_layer(&removed.labels))
    }

    /// The remote snapshots: name and labels of each.
    pub fn remote_snapshots(&self) -> Result<Vec<Info>> {
        let mut infos = self.ms.list()?;
        infos.retain(|i| crate::labels::remote_layer(&i.labels).is_some());
        Ok(infos)
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        Ok(self.ms.get(key)?.1)
    }

    pub fn update(&self, info: &Info, fieldpaths: &[String]) -> Result<Info> {
        Ok(self.ms.update(|tx| tx.update_info(info, fieldpaths))?)
    }

    /// Usage of `key`: measured now for an active snapshot (its upper dir
    /// changes), as recorded at commit otherwise.
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let (record, _) = self.ms.get(key)?;
        if record.kind == Kind::Active {
            disk_usage(&self.layout.fs(record.id))
        } else {
            Ok(record.usage)
        }
    }

    pub fn list<S: AsRef<str>>(&self, filters: &[S]) -> Result<Vec<Info>> {
        let filter = Filter::parse(filters)?;
        let mut infos = self.ms.list()?;
        infos.retain(|i| filter.matches(i));
        Ok(infos)
    }

    /// Number of snapshots, for the admin API.
    pub fn count(&self) -> Result<usize> {
        Ok(self.ms.ids()?.len())
    }

    /// Deletes every snapshot directory no snapshot references.
    pub fn cleanup(&self) -> Result<()> {
        let strays = self.ms.update(|tx| self.strays(&tx.ids()?))?;
        self.delete(strays);
        Ok(())
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let temp = self.temp_dir(kind)?;
        let result = self.ms.update(|tx| {
            let s = Stack::of(&tx.create(kind, key, parent, labels)?);
            if let Some(&parent_id) = s.parent_ids.first() {
                // The new layer's root starts owned like its parent's, so a
                // container sees the same owner of `/` in every layer.
                let pfs = self.layout.lower(&s, parent_id);
                let md =
                    std::fs::metadata(&pfs).map_err(io_err(format!("stat {}", pfs.display())))?;
                let fs = temp.join("fs");
                std::os::unix::fs::lchown(&fs, Some(md.uid()), Some(md.gid()))
                    .map_err(io_err(format!("chown {}", fs.display())))?;
            }
            let dir = self.layout.dir(s.id);
            std::fs::rename(&temp, &dir).map_err(io_err(format!(
                "rename {} to {}",
                temp.display(),
                dir.display()
            )))?;
            Ok::<_, Error>(s)
        });
        self.creating
            .lock()
            .expect("creating set poisoned")
            .remove(&temp);
        if result.is_err() {
            // Rolled back: neither the record nor the directory stays. (If
            // the rename happened but the commit failed, the renamed
            // directory is a stray that the next cleanup deletes.)
            let _ = std::fs::remove_dir_all(&temp);
        }
        Ok(mounts::mounts(&self.layout, &result?))
    }

    /// Makes `snapshots/new-*` with `fs` (and `work` for an active
    /// snapshot), registered so cleanup leaves it alone.
    fn temp_dir(&self, kind: Kind) -> Result<PathBuf> {
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .layout
            .snapshots_dir()
            .join(format!("new-{}-{seq}", std::process::id()));
        self.creating
            .lock()
            .expect("creating set poisoned")
            .insert(temp.clone());
        let made = (|| {
            mkdir(&temp, 0o700)?;
            mkdir(&temp.join("fs"), 0o755)?;
            if kind == Kind::Active {
                mkdir(&temp.join("work"), 0o711)?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            self.creating
                .lock()
                .expect("creating set poisoned")
                .remove(&temp);
            let _ = std::fs::remove_dir_all(&temp);
            return Err(e);
        }
        Ok(temp)
    }

    /// Directories under `snapshots/` that no id in `ids` names and no
    /// creation in flight owns.
    fn strays(&self, ids: &HashSet<u64>) -> Result<Vec<PathBuf>> {
        let dir = self.layout.snapshots_dir();
        let creating = self.creating.lock().expect("creating set poisoned").clone();
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(format!("read {}", dir.display())))? {
            let entry = entry.map_err(io_err(format!("read {}", dir.display())))?;
            let path = entry.path();
            let name = entry.file_name();
            let referenced = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if !referenced && !creating.contains(&path) {
                out.push(path);
            }
        }
        Ok(out)
    }

    fn delete(&self, dirs: Vec<PathBuf>) {
        for dir in dirs {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                // Not fatal: the next Remove or Cleanup tries again.
                tracing::warn!(dir = %dir.display(), error = %e, "failed to remove snapshot directory");
            }
        }
    }
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    std::fs::create_dir(path).map_err(io_err(format!("create {}", path.display())))?;
    // Explicit, so the daemon's umask does not decide container-visible modes.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err(format!("chmod {}", path.display())))
}

/// Disk usage like containerd's `fs.DiskUsage`: allocated blocks of every
/// inode under `root` (hard links counted once) and the number of inodes.
pub fn disk_usage(root: &Path) -> Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let md =
            std::fs::symlink_metadata(&path).map_err(io_err(format!("stat {}", path.display())))?;
        if seen.insert((md.dev(), md.ino())) {
            usage.inodes += 1;
            usage.size += i64::try_from(md.blocks() * 512).unwrap_or(i64::MAX);
        }
        if md.is_dir() {
            for entry in
                std::fs::read_dir(&path).map_err(io_err(format!("read {}", path.display())))?
            {
                stack.push(
                    entry
                        .map_err(io_err(format!("read {}", path.display())))?
                        .path(),
                );
            }
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, Snapshotter) {
        let dir = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open(dir.path()).unwrap();
        (dir, sn)
    }

    #[test]
    fn prepare_lays_out_directories_and_remove_deletes_them() {
        let (dir, sn) = open();
        let m = sn.prepare("k", None, BTreeMap::new()).unwrap();
        let fs = PathBuf::from(&m[0].source);
        assert!(fs.starts_with(dir.path().join("snapshots")));
        let md = std::fs::metadata(&fs).unwrap();
        assert_eq!(
            md.permissions().mode() & 0o7777,
            0o755,
            "root dir of a layer"
        );
        assert!(fs.parent().unwrap().join("work").is_dir());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temp dirs left: {leftovers:?}");

        std::fs::write(fs.join("f"), vec![7u8; 10_000]).unwrap();
        let u = sn.usage("k").unwrap();
        assert_eq!(u.inodes, 2);
        assert!(u.size >= 10_000, "{u:?}");
        sn.commit("c", "k", BTreeMap::new(), None).unwrap();
        assert_eq!(
            sn.usage("c").unwrap(),
            u,
            "committed usage is the recorded one"
        );

        // A view of one parent binds the parent; failed creations leave no dir.
        let v = sn.view("v", Some("c"), BTreeMap::new()).unwrap();
        assert_eq!(PathBuf::from(&v[0].source), fs);
        assert!(sn.view("v", Some("c"), BTreeMap::new()).is_err());
        assert!(sn.prepare("p", Some("missing"), BTreeMap::new()).is_err());
        assert_eq!(
            std::fs::read_dir(dir.path().join("snapshots"))
                .unwrap()
                .count(),
            2
        );

        sn.remove("v").unwrap();
        sn.remove("c").unwrap();
        assert!(!fs.exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("snapshots"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn cleanup_removes_only_unreferenced_dirs() {
        let (dir, sn) = open();
        sn.prepare("k", None, BTreeMap::new()).unwrap();
        let stray = dir.path().join("snapshots/999");
        std::fs::create_dir_all(stray.join("fs")).unwrap();
        let stray_tmp = dir.path().join("snapshots/new-1-1");
        std::fs::create_dir_all(&stray_tmp).unwrap();
        sn.cleanup().unwrap();
        assert!(!stray.exists() && !stray_tmp.exists());
        assert!(sn.mounts("k").is_ok());
        assert_eq!(
            std::fs::read_dir(dir.path().join("snapshots"))
                .unwrap()
                .count(),
            1
        );
        sn.cleanup().unwrap();
    }

    /// containerd 2.x's rebase: the parent comes with Commit, set in the
    /// commit's transaction; a refused commit leaves the active snapshot.
    #[test]
    fn commit_on_a_parent_rebases_a_parentless_snapshot() {
        let (_dir, sn) = open();
        sn.prepare("a", None, BTreeMap::new()).unwrap();
        sn.commit("base", "a", BTreeMap::new(), None).unwrap();
        sn.prepare("other-a", None, BTreeMap::new()).unwrap();
        sn.commit("other", "other-a", BTreeMap::new(), None)
            .unwrap();

        sn.prepare("b", None, BTreeMap::new()).unwrap();
        let e = sn.commit("top", "b", BTreeMap::new(), Some("nope"));
        assert!(matches!(e, Err(Error::Meta(metastore::Error::NotFound(_)))));
        sn.prepare("c", None, BTreeMap::new()).unwrap();
        let e = sn.commit("top", "b", BTreeMap::new(), Some("c"));
        assert!(
            matches!(e, Err(Error::Meta(metastore::Error::InvalidArgument(_)))),
            "an active snapshot is no parent"
        );
        assert_eq!(sn.stat("b").unwrap().kind, Kind::Active, "rolled back");

        sn.commit("top", "b", BTreeMap::new(), Some("base"))
            .unwrap();
        assert_eq!(sn.stat("top").unwrap().parent.as_deref(), Some("base"));
        assert!(sn.remove("base").is_err(), "base has a child now");
        let m = sn.prepare("ctr", Some("top"), BTreeMap::new()).unwrap();
        assert!(m[0].options.last().unwrap().starts_with("lowerdir="));
        assert_eq!(m[0].options.last().unwrap().matches(':').count(), 1);

        // Re-stating the parent is fine; another one is refused.
        sn.prepare("d", Some("base"), BTreeMap::new()).unwrap();
        let e = sn.commit("d2", "d", BTreeMap::new(), Some("other"));
        assert!(matches!(
            e,
            Err(Error::Meta(metastore::Error::FailedPrecondition(_)))
        ));
        sn.commit("d2", "d", BTreeMap::new(), Some("base")).unwrap();
    }

    #[test]
    fn list_applies_filters() {
        let (_dir, sn) = open();
        let l = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        sn.prepare("a", None, l(&[("t", "1")])).unwrap();
        sn.commit("b", "a", l(&[("t", "2")]), None).unwrap();
        sn.prepare("c", Some("b"), BTreeMap::new()).unwrap();
        let names = |f: &[&str]| -> Vec<String> {
            sn.list(f).unwrap().into_iter().map(|i| i.name).collect()
        };
        assert_eq!(names(&[]), vec!["b", "c"]);
        assert_eq!(names(&["parent==b"]), vec!["c"]);
        assert_eq!(names(&["labels.t==2"]), vec!["b"]);
        assert_eq!(names(&["kind==active", "labels.t"]), vec!["b", "c"]);
        assert!(sn.list(&["kind=="]).is_err());
    }
}
