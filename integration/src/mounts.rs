//! Applies the mounts a snapshotter returns the way containerd's mount
//! package does (bind, read-only remount, overlay with compacted lowerdirs),
//! on temp dirs that are unmounted when the guard drops.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use tarn_proto::Mount;

/// The mounts of a snapshot applied on a temp dir, undone on drop.
pub struct Mounted {
    pub target: PathBuf,
    mounted: bool,
    _dir: tempfile::TempDir,
}

impl Mounted {
    pub fn new(mounts: &[Mount]) -> Self {
        assert_eq!(mounts.len(), 1, "one mount per snapshot: {mounts:?}");
        let dir = tempfile::Builder::new()
            .prefix("tarn-mnt-")
            .tempdir_in("/tmp")
            .expect("mount dir");
        let mut m = Mounted {
            target: dir.path().to_owned(),
            mounted: false,
            _dir: dir,
        };
        mount(&mounts[0], &m.target);
        m.mounted = true;
        m
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.target.join(rel.trim_start_matches('/'))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            // MNT_DETACH so a failed test with an open file cannot leak it.
            let _ = nix::mount::umount2(&self.target, MntFlags::MNT_DETACH);
        }
    }
}

/// Applies one mount like containerd's mount package does.
pub fn mount(m: &Mount, target: &Path) {
    let ro = m.options.iter().any(|o| o == "ro");
    match m.r#type.as_str() {
        "bind" => {
            let mut flags = MsFlags::MS_BIND;
            if m.options.iter().any(|o| o == "rbind") {
                flags |= MsFlags::MS_REC;
            }
            nix::mount::mount(
                Some(m.source.as_str()),
                target,
                None::<&str>,
                flags,
                None::<&str>,
            )
            .unwrap_or_else(|e| panic!("bind mount {m:?}: {e}"));
            if ro {
                nix::mount::mount(
                    None::<&str>,
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                    None::<&str>,
                )
                .unwrap_or_else(|e| panic!("remount ro {m:?}: {e}"));
            }
        }
        "overlay" => {
            let opts: Vec<String> = m
                .options
                .iter()
                .filter(|o| *o != "ro" && *o != "rw")
                .cloned()
                .collect();
            let flags = if ro {
                MsFlags::MS_RDONLY
            } else {
                MsFlags::empty()
            };
            let (chdir, opts) = compact_lowerdir(opts);
            let data = opts.join(",");
            let target = target.to_owned();
            let source = m.source.clone();
            // Relative lowerdirs need a cwd; give this one thread its own
            // (unshare CLONE_FS), as containerd does, so the process' cwd
            // stays untouched.
            std::thread::spawn(move || {
                if let Some(dir) = chdir {
                    // SAFETY: unshare(CLONE_FS) only detaches this thread's
                    // cwd/umask/root from the process; it touches no memory.
                    let rc = unsafe { libc::unshare(libc::CLONE_FS) };
                    assert_eq!(
                        rc,
                        0,
                        "unshare(CLONE_FS): {}",
                        std::io::Error::last_os_error()
                    );
                    nix::unistd::chdir(&dir).expect("chdir to common lowerdir parent");
                }
                nix::mount::mount(
                    Some(source.as_str()),
                    &target,
                    Some("overlay"),
                    flags,
                    Some(data.as_str()),
                )
            })
            .join()
            .expect("mount thread")
            .unwrap_or_else(|e| panic!("overlay mount {m:?}: {e}"));
        }
        other => panic!("unexpected mount type {other}"),
    }
}

/// Mount data is limited to a page: with many layers, make lowerdirs
/// relative to their common parent (what containerd's mount package does).
fn compact_lowerdir(opts: Vec<String>) -> (Option<PathBuf>, Vec<String>) {
    if opts.iter().map(|o| o.len() + 1).sum::<usize>() < 4000 {
        return (None, opts);
    }
    let Some(idx) = opts.iter().position(|o| o.starts_with("lowerdir=")) else {
        return (None, opts);
    };
    let dirs: Vec<&str> = opts[idx]["lowerdir=".len()..].split(':').collect();
    // Every snapshot dir is <root>/snapshots/<id>/fs.
    let common = Path::new(dirs[0])
        .parent()
        .and_then(Path::parent)
        .expect("snapshot path has a parent")
        .to_owned();
    let rel: Vec<String> = dirs
        .iter()
        .map(|d| {
            Path::new(d)
                .strip_prefix(&common)
                .expect("all lowerdirs share the snapshots dir")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let mut out = opts.clone();
    out[idx] = format!("lowerdir={}", rel.join(":"));
    (Some(common), out)
}
