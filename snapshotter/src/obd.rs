//! overlaybd layers on the snapshotter's side: what a Prepare's labels say
//! about one ([`overlaybd_layer`]), and the mount that serves a stacked
//! disk as a directory tree ([`DiskMount`]: the disk as a FUSE file, a
//! read-only loop device over it, the kernel's ext4 mounted `ro,noload`
//! on that), torn down in reverse on [`DiskMount::detach`], on drop, and
//! when any step of [`DiskMount::attach`] fails: nothing stays attached.
//!
//! A committed snapshot of an overlaybd chain is served as the stack of
//! its layers up to it: [`stack_label`] records the stack on the snapshot
//! (so a restart can mount it again), [`stack_key`] names its mount.
//!
//! A mount can outlive its daemon: [`DiskMount::hand_over`] leaves the
//! FUSE file, the loop device and the tree in place (the FUSE connection
//! kept by the holder), and the next daemon takes them back with
//! [`DiskMount::adopt`] after checking they are what it left.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use nix::mount::{MntFlags, MsFlags};
use tarn_fs::Digest;
use tarn_fs::digest::DigestError;
use tarn_fs::disk::LazyDisk;
use tarn_fs::format::overlaybd::stack::MAX_LAYERS;
use tarn_fs::fuse::{DISK_NAME, FuseError, MountHandle, MountOptions, adopt_disk, mount_disk};

use crate::mountinfo;

/// The descriptor annotations of an overlaybd layer, as containerd passes
/// them to Prepare (OVERLAYBD.md; accelerated-container-image's
/// `pkg/label/label.go`).
pub const OBD_VERSION: &str = "containerd.io/snapshot/overlaybd/version";
pub const OBD_BLOB_DIGEST: &str = "containerd.io/snapshot/overlaybd/blob-digest";
pub const OBD_BLOB_SIZE: &str = "containerd.io/snapshot/overlaybd/blob-size";
pub const OBD_FS_TYPE: &str = "containerd.io/snapshot/overlaybd/blob-fs-type";
/// `yes` on an image's acceleration layer: a plain tar holding the trace
/// to replay (`tarn_fs::format::overlaybd::trace`), not a disk layer.
pub const OBD_ACCELERATION: &str = "containerd.io/snapshot/overlaybd/acceleration-layer";

/// The one filesystem an overlaybd disk is mounted as here (the reference
/// tools' default; `noload` is ext4's).
pub const EXT4: &str = "ext4";

/// The source of a disk's FUSE mount in mountinfo: `tarn-obd-` and the
/// start of its stack key (`Disks` names them).
pub const DISK_FSNAME_PREFIX: &str = "tarn-obd-";

/// An overlaybd layer, as a Prepare's labels describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObdLabels {
    pub blob_digest: Digest,
    pub blob_size: u64,
}

/// Why labels that name an overlaybd layer cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ObdLabelError {
    #[error("overlaybd layer without a {OBD_BLOB_DIGEST} label")]
    NoDigest,
    #[error("bad {OBD_BLOB_DIGEST} label")]
    BadDigest(#[source] DigestError),
    #[error("overlaybd layer without a numeric {OBD_BLOB_SIZE} label")]
    BadSize,
    #[error("overlaybd layer of filesystem {0:?}: only ext4 is mounted")]
    FsType(String),
}

/// `None` if the labels do not name an overlaybd layer (no version
/// label); the layer, or why it cannot be served, if they do.
pub fn overlaybd_layer(
    labels: &BTreeMap<String, String>,
) -> Option<Result<ObdLabels, ObdLabelError>> {
    labels.get(OBD_VERSION)?;
    Some(read_labels(labels))
}

/// Whether the labels name an acceleration layer ([`OBD_ACCELERATION`]).
pub fn acceleration_layer(labels: &BTreeMap<String, String>) -> bool {
    labels.get(OBD_ACCELERATION).is_some_and(|v| v == "yes")
}

fn read_labels(labels: &BTreeMap<String, String>) -> Result<ObdLabels, ObdLabelError> {
    let digest = labels.get(OBD_BLOB_DIGEST).ok_or(ObdLabelError::NoDigest)?;
    let blob_digest: Digest = digest.parse().map_err(ObdLabelError::BadDigest)?;
    let blob_size: u64 = labels
        .get(OBD_BLOB_SIZE)
        .and_then(|s| s.parse().ok())
        .ok_or(ObdLabelError::BadSize)?;
    match labels.get(OBD_FS_TYPE).map(String::as_str) {
        None | Some(EXT4) => {}
        Some(other) => return Err(ObdLabelError::FsType(other.to_owned())),
    }
    Ok(ObdLabels {
        blob_digest,
        blob_size,
    })
}

/// Why a recorded stack cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum StackLabelError {
    #[error("overlaybd stack label entry {0:?} is not digest@size")]
    Entry(String),
    #[error("overlaybd stack of {0} layers is over the {MAX_LAYERS}-layer limit")]
    TooMany(usize),
    #[error("empty overlaybd stack label")]
    Empty,
}

/// The stack's layer blobs, bottom first, as recorded on its snapshot.
pub fn stack_label(stack: &[ObdLabels]) -> String {
    let entries: Vec<String> = stack
        .iter()
        .map(|l| format!("{}@{}", l.blob_digest, l.blob_size))
        .collect();
    entries.join(",")
}

/// The stack [`stack_label`] recorded; bounded, as a label may have been
/// edited by anyone with access to containerd.
pub fn parse_stack(label: &str) -> Result<Vec<ObdLabels>, StackLabelError> {
    if label.is_empty() {
        return Err(StackLabelError::Empty);
    }
    let mut out = Vec::new();
    for entry in label.split(',') {
        if out.len() == MAX_LAYERS {
            return Err(StackLabelError::TooMany(label.split(',').count()));
        }
        let bad = || StackLabelError::Entry(entry.chars().take(200).collect());
        let (digest, size) = entry.split_once('@').ok_or_else(bad)?;
        out.push(ObdLabels {
            blob_digest: digest.parse().map_err(|_| bad())?,
            blob_size: size.parse().map_err(|_| bad())?,
        });
    }
    Ok(out)
}

/// The name of a stack's mount (`ROOT/layers/<hex>`): a digest of its
/// blobs in order, so two chains share a mount only if they stack the
/// same layers, and it never equals a blob's digest.
pub fn stack_key(stack: &[ObdLabels]) -> Digest {
    let mut text = String::from("tarn overlaybd stack v1\n");
    for l in stack {
        text.push_str(&l.blob_digest.to_string());
        text.push('\n');
    }
    Digest::of(text.as_bytes())
}

/// Why a disk could not be attached or detached.
#[derive(Debug, thiserror::Error)]
pub enum DiskMountError {
    #[error("stacking the disk")]
    Stack(#[from] tarn_fs::disk::DiskError),
    #[error("mount task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("creating {path}: {error}")]
    Dir { path: PathBuf, error: io::Error },
    #[error(transparent)]
    Fuse(#[from] FuseError),
    #[error("{action} loop device for {file}: {reason}")]
    Loop {
        action: &'static str,
        file: PathBuf,
        reason: String,
    },
    #[error("mounting {dev} at {path} as ext4 ro,noload: {error}")]
    Mount {
        dev: String,
        path: PathBuf,
        error: nix::Error,
    },
    #[error("unmounting {path}: {error}")]
    Unmount { path: PathBuf, error: nix::Error },
    #[error("what a previous daemon left at {dir} cannot be taken over")]
    Leftover {
        dir: PathBuf,
        #[source]
        why: Leftover,
    },
}

/// How a disk a previous daemon left differs from one [`DiskMount::attach`]
/// sets up.
#[derive(Debug, thiserror::Error)]
pub enum Leftover {
    #[error("no loop device over the disk file")]
    NoLoop,
    #[error("{0} loop devices over the disk file")]
    Loops(usize),
    #[error("loop device {0} is writable")]
    Writable(String),
    #[error("nothing mounted at the tree")]
    NoTree,
    #[error("{fstype} from {from} mounted at the tree, not ext4 from {dev}")]
    OtherTree {
        fstype: String,
        from: String,
        dev: String,
    },
}

/// How a disk's loop device reads its FUSE file
/// (`[snapshotter] loop_direct_io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoopIo {
    /// Through the FUSE file's page cache: a block ext4 reads is then
    /// cached twice, under the FUSE file and under ext4's own file.
    Buffered,
    /// `losetup --direct-io=on`: the loop device's reads skip the FUSE
    /// file's page cache and go to the daemon (its chunk cache) each time
    /// ext4's page cache misses. The default (`make bench` S4, S6).
    #[default]
    Direct,
}

impl LoopIo {
    fn flag(self) -> &'static str {
        match self {
            LoopIo::Buffered => "--direct-io=off",
            LoopIo::Direct => "--direct-io=on",
        }
    }
}

/// A stacked disk mounted as a tree: `<dir>/disk/disk` (the FUSE file),
/// a read-only loop device over it, `<dir>/fs` (ext4, read-only).
pub struct DiskMount {
    fs: PathBuf,
    fuse: Option<MountHandle>,
    dev: Option<String>,
    mounted: bool,
}

impl DiskMount {
    /// Mounts `disk` under `dir` (created if missing). Reads that miss the
    /// cache run on `runtime`; the loop device reads the FUSE file with
    /// `loop_io`. On failure, whatever was set up is undone.
    pub fn attach(
        disk: Arc<LazyDisk>,
        dir: &Path,
        runtime: tokio::runtime::Handle,
        options: &MountOptions,
        loop_io: LoopIo,
    ) -> Result<DiskMount, DiskMountError> {
        let fuse_dir = dir.join("disk");
        let fs = dir.join("fs");
        for d in [&fuse_dir, &fs] {
            std::fs::create_dir_all(d).map_err(|error| DiskMountError::Dir {
                path: d.clone(),
                error,
            })?;
        }
        // From here on, dropping `m` undoes what is set up so far.
        let mut m = DiskMount {
            fs: fs.clone(),
            fuse: Some(mount_disk(disk, &fuse_dir, runtime, options)?),
            dev: None,
            mounted: false,
        };
        let file = fuse_dir.join(DISK_NAME);
        let out = Command::new("losetup")
            .args(["--read-only", "--find", "--show", loop_io.flag()])
            .arg(&file)
            .output();
        let dev = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            Ok(o) => return Err(loop_error("attaching a", &file, &o.stderr)),
            Err(e) => return Err(loop_error("attaching a", &file, e.to_string().as_bytes())),
        };
        m.dev = Some(dev.clone());
        nix::mount::mount(
            Some(dev.as_str()),
            fs.as_path(),
            Some(EXT4),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            // No journal replay: the disk is read-only, and a layer is a
            // cleanly unmounted filesystem.
            Some("noload"),
        )
        .map_err(|error| DiskMountError::Mount {
            dev,
            path: fs,
            error,
        })?;
        m.mounted = true;
        Ok(m)
    }

    /// Takes over the disk mount a previous daemon left under `dir` and
    /// handed over: serves `disk` on `fd` (that mount's FUSE connection,
    /// kept by the holder) once the loop device over the disk file and
    /// the ext4 tree on it are checked to be as [`DiskMount::attach`]
    /// leaves them. Nothing is changed when they are not: the caller lets
    /// go of `fd`, clears the rest ([`clear_stale`]) and attaches afresh.
    pub fn adopt(
        disk: Arc<LazyDisk>,
        dir: &Path,
        fd: OwnedFd,
        runtime: tokio::runtime::Handle,
        options: &MountOptions,
    ) -> Result<DiskMount, DiskMountError> {
        let dev = left_as_attached(dir).map_err(|why| DiskMountError::Leftover {
            dir: dir.to_owned(),
            why,
        })?;
        let fuse = adopt_disk(disk, &dir.join("disk"), fd, runtime, options)?;
        Ok(DiskMount {
            fs: dir.join("fs"),
            fuse: Some(fuse),
            dev: Some(dev),
            mounted: true,
        })
    }

    /// A new fd of the disk's FUSE connection, for the holder.
    pub fn connection(&self) -> io::Result<OwnedFd> {
        self.fuse
            .as_ref()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "no FUSE mount"))?
            .connection()
    }

    /// Stops serving and leaves everything in place for the next daemon
    /// (this process is about to exit; the holder keeps the connection):
    /// the tree stays mounted, the loop device attached, the FUSE file
    /// mounted, and the reads they send wait for the next daemon.
    pub fn hand_over(mut self) {
        if let Some(fuse) = self.fuse.take() {
            fuse.forget();
        }
        self.dev = None;
        self.mounted = false;
    }

    /// The mounted tree: the lower dir of a container's overlay.
    pub fn fs(&self) -> &Path {
        &self.fs
    }

    /// The loop device the tree is mounted from.
    pub fn device(&self) -> Option<&str> {
        self.dev.as_deref()
    }

    /// Unmounts the tree, detaches the loop device and unmounts the FUSE
    /// file. A tree still used (a running container's overlay) is
    /// detached lazily, and its loop device cleared once it is let go.
    pub fn detach(mut self) -> Result<(), DiskMountError> {
        self.tear_down()
    }

    /// Every step is tried; the first error is returned.
    fn tear_down(&mut self) -> Result<(), DiskMountError> {
        let mut first = Ok(());
        if std::mem::take(&mut self.mounted)
            && let Err(error) = nix::mount::umount2(&self.fs, MntFlags::MNT_DETACH)
        {
            first = Err(DiskMountError::Unmount {
                path: self.fs.clone(),
                error,
            });
        }
        if let Some(dev) = self.dev.take() {
            // A device still in use gets autoclear: it goes with its last user.
            let out = Command::new("losetup").args(["--detach", &dev]).output();
            let failed = match out {
                Ok(o) if o.status.success() => None,
                Ok(o) => Some(o.stderr),
                Err(e) => Some(e.to_string().into_bytes()),
            };
            if let Some(reason) = failed
                && first.is_ok()
            {
                first = Err(loop_error("detaching the", Path::new(&dev), &reason));
            }
        }
        if let Some(fuse) = self.fuse.take()
            && let Err(e) = fuse.unmount()
            && first.is_ok()
        {
            first = Err(e.into());
        }
        first
    }
}

/// Undoes what a killed daemon left under `dir` (a [`DiskMount`]'s
/// directory), or a held disk that did not check out: every mount at the
/// tree (the ext4 tree and whatever was mounted over it), loop devices
/// over the disk file, the FUSE file's mounts. Best effort: what is not
/// there is fine, the rest is logged.
pub fn clear_stale(dir: &Path) {
    let (fs, fuse_dir) = (dir.join("fs"), dir.join("disk"));
    let file = fuse_dir.join(DISK_NAME);
    // The ext4 tree first: under another mount it would keep its loop
    // device (autoclear) and the FUSE file, and the fresh tree would be
    // stacked on it.
    unmount_stacked(&fs);
    for l in loops_backed_by(&file) {
        tracing::info!(dev = %l.dev, file = %file.display(), "detaching a loop device a previous daemon left");
        let _ = Command::new("losetup").args(["--detach", &l.dev]).output();
    }
    unmount_stacked(&fuse_dir);
}

/// The most mounts [`clear_stale`] takes off one path: anyone with root
/// may have mounted over a disk's directories.
const MAX_STACKED: usize = 16;

/// Lazily unmounts the mounts stacked at `path`, topmost first, until
/// nothing is mounted there (EINVAL) or [`MAX_STACKED`] are gone.
fn unmount_stacked(path: &Path) {
    let mut gone = 0;
    while gone < MAX_STACKED && nix::mount::umount2(path, MntFlags::MNT_DETACH).is_ok() {
        gone += 1;
    }
    if gone > 1 {
        tracing::info!(path = %path.display(), mounts = gone, "unmounted mounts stacked on a disk's directory");
    }
    if gone == MAX_STACKED {
        tracing::warn!(path = %path.display(), "{MAX_STACKED} mounts stacked on a disk's directory unmounted: any more are left");
    }
}

/// A loop device, as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub dev: String,
    pub read_only: bool,
}

/// The loop devices whose backing file is `file`, read from sysfs: never
/// by touching the file (`losetup -j` stats it, which hangs on a FUSE
/// mount nobody serves and fails on a dead one). sysfs names each
/// device's file as it was attached.
pub fn loops_backed_by(file: &Path) -> Vec<LoopDevice> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                return None;
            }
            // Only a bound device has the file.
            let back = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            (Path::new(back.trim_end_matches('\n')) == file).then(|| {
                let ro = std::fs::read_to_string(e.path().join("ro")).unwrap_or_default();
                LoopDevice {
                    dev: format!("/dev/{name}"),
                    read_only: ro.trim() == "1",
                }
            })
        })
        .collect()
}

/// The loop device of the disk under `dir`, if what is there is what
/// [`DiskMount::attach`] sets up ([`check_left`] on this system's loop
/// devices and mounts).
fn left_as_attached(dir: &Path) -> Result<String, Leftover> {
    let file = dir.join("disk").join(DISK_NAME);
    check_left(&loops_backed_by(&file), &dir.join("fs"), &mountinfo::read())
}

/// `loops` (the devices over the disk file) and `mounts` (mountinfo) hold
/// what [`DiskMount::attach`] leaves: one read-only loop device, and ext4
/// from it as the topmost mount at `tree`. The device's path if so.
fn check_left(
    loops: &[LoopDevice],
    tree: &Path,
    mounts: &[mountinfo::MountEntry],
) -> Result<String, Leftover> {
    let dev = match loops {
        [] => return Err(Leftover::NoLoop),
        [one] if !one.read_only => return Err(Leftover::Writable(one.dev.clone())),
        [one] => one.dev.clone(),
        many => return Err(Leftover::Loops(many.len())),
    };
    // Mounts are listed in mount order: the last one at a path is the
    // one its users see.
    let top = mounts
        .iter()
        .rfind(|m| m.mountpoint == tree)
        .ok_or(Leftover::NoTree)?;
    if top.fstype != EXT4 || top.source != dev {
        return Err(Leftover::OtherTree {
            fstype: top.fstype.clone(),
            from: top.source.clone(),
            dev,
        });
    }
    Ok(dev)
}

impl Drop for DiskMount {
    fn drop(&mut self) {
        if let Err(e) = self.tear_down() {
            tracing::warn!(fs = %self.fs.display(), error = %e, "overlaybd disk not fully torn down");
        }
    }
}

fn loop_error(action: &'static str, file: &Path, reason: &[u8]) -> DiskMountError {
    DiskMountError::Loop {
        action,
        file: file.to_owned(),
        reason: String::from_utf8_lossy(reason).trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn overlaybd_layers_are_told_by_their_annotations() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert!(overlaybd_layer(&l(&[("containerd.io/snapshot/cri.image-ref", "x")])).is_none());
        let full = l(&[
            (OBD_VERSION, "0.1.0"),
            (OBD_BLOB_DIGEST, &digest),
            (OBD_BLOB_SIZE, "4096"),
            (OBD_FS_TYPE, "ext4"),
        ]);
        let got = overlaybd_layer(&full).unwrap().unwrap();
        assert_eq!(got.blob_digest, digest.parse().unwrap());
        assert_eq!(got.blob_size, 4096);
        let mut no_size = full.clone();
        no_size.remove(OBD_BLOB_SIZE);
        assert!(matches!(
            overlaybd_layer(&no_size),
            Some(Err(ObdLabelError::BadSize))
        ));
        let mut erofs = full.clone();
        erofs.insert(OBD_FS_TYPE.into(), "erofs".into());
        assert!(matches!(
            overlaybd_layer(&erofs),
            Some(Err(ObdLabelError::FsType(t))) if t == "erofs"
        ));
        let mut bad = full.clone();
        bad.insert(OBD_BLOB_DIGEST.into(), "sha256:xyz".into());
        assert!(matches!(
            overlaybd_layer(&bad),
            Some(Err(ObdLabelError::BadDigest(_)))
        ));
    }

    #[test]
    fn a_disk_is_taken_over_only_as_attach_left_it() {
        let tree = Path::new("/r/layers/ab/fs");
        let lo = |dev: &str, read_only| LoopDevice {
            dev: dev.into(),
            read_only,
        };
        let at = |path: &str, fstype: &str, source: &str| mountinfo::MountEntry {
            mountpoint: PathBuf::from(path),
            fstype: fstype.into(),
            source: source.into(),
        };
        let ext4 = at("/r/layers/ab/fs", "ext4", "/dev/loop3");
        let other = at("/r/layers/cd/fs", "ext4", "/dev/loop4");
        let good = [lo("/dev/loop3", true)];
        assert_eq!(
            check_left(&good, tree, &[other.clone(), ext4.clone()]).unwrap(),
            "/dev/loop3"
        );
        assert!(matches!(
            check_left(&[], tree, std::slice::from_ref(&ext4)),
            Err(Leftover::NoLoop)
        ));
        assert!(matches!(
            check_left(
                &[lo("/dev/loop3", true), lo("/dev/loop5", true)],
                tree,
                std::slice::from_ref(&ext4)
            ),
            Err(Leftover::Loops(2))
        ));
        assert!(matches!(
            check_left(&[lo("/dev/loop3", false)], tree, std::slice::from_ref(&ext4)),
            Err(Leftover::Writable(d)) if d == "/dev/loop3"
        ));
        assert!(matches!(
            check_left(&good, tree, &[other]),
            Err(Leftover::NoTree)
        ));
        // Another device's tree, or something mounted over it.
        let from_other = at("/r/layers/ab/fs", "ext4", "/dev/loop9");
        assert!(matches!(
            check_left(&good, tree, &[from_other]),
            Err(Leftover::OtherTree { from, .. }) if from == "/dev/loop9"
        ));
        let over = at("/r/layers/ab/fs", "tmpfs", "tmpfs");
        assert!(matches!(
            check_left(&good, tree, &[ext4, over]),
            Err(Leftover::OtherTree { fstype, .. }) if fstype == "tmpfs"
        ));
    }

    #[test]
    fn a_stack_is_recorded_and_read_back_and_named_by_its_blobs_in_order() {
        let layer = |c: char, size| ObdLabels {
            blob_digest: format!("sha256:{}", c.to_string().repeat(64))
                .parse()
                .unwrap(),
            blob_size: size,
        };
        let stack = vec![layer('a', 10), layer('b', 20)];
        let label = stack_label(&stack);
        assert_eq!(parse_stack(&label).unwrap(), stack);
        let swapped = vec![layer('b', 20), layer('a', 10)];
        assert_ne!(stack_key(&stack), stack_key(&swapped));
        assert_ne!(stack_key(&stack[..1]), stack[0].blob_digest);
        assert_eq!(stack_key(&stack), stack_key(&stack.clone()));
        assert!(matches!(parse_stack(""), Err(StackLabelError::Empty)));
        assert!(matches!(
            parse_stack("sha256:xyz@1"),
            Err(StackLabelError::Entry(_))
        ));
        let many = vec![label.clone(); MAX_LAYERS].join(",");
        assert!(matches!(
            parse_stack(&many),
            Err(StackLabelError::TooMany(n)) if n == 2 * MAX_LAYERS
        ));
    }
}
