//! An overlaybd image's stacked disk as one read-only regular file,
//! `DISK_NAME` in the mount's root, of the disk's virtual size: what a
//! loop device is attached to (read-only) and the kernel's ext4 mounts.
//!
//! A read is planned on the FUSE thread ([`LazyDisk::read_cached`]: zeros
//! for holes, the cache's bytes) and answered there when nothing is
//! missing; otherwise it goes to the runtime and is answered when the
//! missing blocks arrive.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, Request,
};

use super::ops::{FuseOps, Op, Timed};
use super::{
    FuseError, MountHandle, MountOptions, passthrough, resend_or_warn, session_config, watch,
};
use crate::disk::LazyDisk;
use crate::format::ROOT_INO;
use crate::num::usize_from;

/// The disk file's name in the mount's root.
pub const DISK_NAME: &str = "disk";
/// The disk file's inode.
const DISK_INO: u64 = 2;
/// The disk never changes while mounted.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

struct DiskFs {
    disk: Arc<LazyDisk>,
    runtime: tokio::runtime::Handle,
    ops: Arc<FuseOps>,
}

fn attr(ino: u64, disk: &LazyDisk) -> FileAttr {
    let (kind, perm, size, nlink) = if ino == ROOT_INO {
        (FileType::Directory, 0o555, 0, 2)
    } else {
        (FileType::RegularFile, 0o444, disk.size(), 1)
    };
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Filesystem for DiskFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timed = Timed::start(&*self.ops, Op::Lookup);
        if parent.0 == ROOT_INO && name == DISK_NAME {
            reply.entry(&TTL, &attr(DISK_INO, &self.disk), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timed = Timed::start(&*self.ops, Op::Getattr);
        match ino.0 {
            ROOT_INO | DISK_INO => reply.attr(&TTL, &attr(ino.0, &self.disk)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timed = Timed::start(&*self.ops, Op::Open);
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        match ino.0 {
            // Immutable: the page cache may keep what it read.
            DISK_INO => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            ROOT_INO => reply.error(Errno::EISDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    // losetup flushes and syncs the file it attaches: nothing is ever
    // written, so both succeed (fuser's defaults answer ENOSYS with a
    // warning each time).
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let timed = Timed::start(&*self.ops, Op::Read);
        if ino.0 != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        let planned = match self.disk.read_cached(offset, u64::from(size)) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(offset, error = %e, "disk read failed");
                return reply.error(Errno::EIO);
            }
        };
        if planned.is_complete() {
            return reply.data(&planned.into_bytes());
        }
        let timed = timed.hand_over(self.ops.clone());
        let disk = self.disk.clone();
        self.runtime.spawn(async move {
            let _timed = timed;
            let heads = planned.heads().to_vec();
            match planned.complete().await {
                Ok(data) => {
                    reply.data(&data);
                    // A program just started: its libraries are next.
                    disk.prefetch_libraries(&heads);
                }
                Err(e) => {
                    tracing::warn!(offset, error = %e, "disk read failed");
                    // The bytes cannot be had or trusted: an I/O error.
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timed = Timed::start(&*self.ops, Op::Opendir);
        match ino.0 {
            ROOT_INO => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            DISK_INO => reply.error(Errno::ENOTDIR),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _timed = Timed::start(&*self.ops, Op::Readdir);
        if ino.0 != ROOT_INO {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT_INO, FileType::Directory, "."),
            (ROOT_INO, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_NAME),
        ];
        for (k, (child, kind, name)) in entries.into_iter().enumerate().skip(usize_from(offset)) {
            if reply.add(INodeNo(child), k as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timed = Timed::start(&*self.ops, Op::Statfs);
        reply.statfs(self.disk.size().div_ceil(4096), 0, 0, 2, 0, 4096, 255, 4096);
    }
}

/// Mounts `disk` at `mountpoint` as one read-only file, [`DISK_NAME`].
/// Reads that miss the cache run on `runtime`, which must outlive the
/// mount. `options.passthrough` and `journal` do not apply (nothing is
/// passed through); with `handed_over` every worker reads the one fd a
/// holder keeps, as for a layer (module docs of `fuse`).
pub fn mount_disk(
    disk: Arc<LazyDisk>,
    mountpoint: &Path,
    runtime: tokio::runtime::Handle,
    options: &MountOptions,
) -> Result<MountHandle, FuseError> {
    let mount_error = |error| FuseError::Mount {
        path: mountpoint.to_path_buf(),
        error,
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName(options.fsname.clone()),
        fuser::MountOption::Subtype("tarn-disk".to_string()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoExec,
    ];
    let config = session_config(config, options);
    let fs = DiskFs {
        disk,
        runtime,
        ops: options.ops.clone(),
    };
    let session = fuser::Session::new(fs, mountpoint, &config).map_err(mount_error)?;
    let conn = Arc::new(OnceLock::new());
    let fd = session.as_fd().try_clone_to_owned().map_err(mount_error)?;
    let _ = conn.set(fd);
    let background = session.spawn().map_err(mount_error)?;
    let counters = Arc::new(passthrough::Counters::default());
    watch(background, mountpoint, counters, conn).map_err(mount_error)
}

/// Serves `disk` on `fd`, the connection of a disk mount at `mountpoint`
/// that another process initialised ([`mount_disk`] with `handed_over`)
/// and maybe died serving: no mount, no INIT, and the requests that
/// process read but did not answer are sent again, as [`super::adopt`]
/// does for a layer. Nothing else carries over: the disk file's inode,
/// generation, attributes and file handle (0) are the same in every
/// process serving the same stack.
pub fn adopt_disk(
    disk: Arc<LazyDisk>,
    mountpoint: &Path,
    fd: OwnedFd,
    runtime: tokio::runtime::Handle,
    options: &MountOptions,
) -> Result<MountHandle, FuseError> {
    let adopt_error = |error| FuseError::Adopt {
        path: mountpoint.to_path_buf(),
        error,
    };
    let mut config = session_config(fuser::Config::default(), options);
    // Adopted, it will be handed over again.
    config.clone_fd = false;
    let conn = Arc::new(OnceLock::new());
    let _ = conn.set(fd.try_clone().map_err(adopt_error)?);
    let fs = DiskFs {
        disk,
        runtime,
        ops: options.ops.clone(),
    };
    let session = fuser::Session::from_initialized_fd(fs, fd, config.acl, config);
    if let Some(c) = conn.get() {
        resend_or_warn(c.as_fd(), mountpoint);
    }
    let background = session.spawn().map_err(adopt_error)?;
    let counters = Arc::new(passthrough::Counters::default());
    watch(background, mountpoint, counters, conn).map_err(adopt_error)
}
