//! The `fuser::Filesystem` over one [`Layer`].

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    AccessFlags, Errno, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request,
};

use super::attr::{attr, file_type};
use super::ops::{FuseOps, Op, Timed};
use super::passthrough::Passthrough;
use crate::format::ROOT_INO;
use crate::layer::{CachedRead, Layer, LayerError};
use crate::num::usize_from;

/// The layer never changes while mounted: let the kernel keep what it learnt.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);

pub(super) struct LayerFs {
    layer: Arc<Layer>,
    runtime: tokio::runtime::Handle,
    /// Whether to ask the kernel for passthrough at init.
    want_passthrough: bool,
    passthrough: Passthrough,
    ops: Arc<FuseOps>,
}

impl LayerFs {
    pub(super) fn new(
        layer: Arc<Layer>,
        runtime: tokio::runtime::Handle,
        want_passthrough: bool,
        passthrough: Passthrough,
        ops: Arc<FuseOps>,
    ) -> LayerFs {
        LayerFs {
            layer,
            runtime,
            want_passthrough,
            passthrough,
            ops,
        }
    }
}

/// The one mapping from tarn's errors to errno.
fn errno(e: &LayerError) -> Errno {
    match e {
        LayerError::NoInode(_) => Errno::ENOENT,
        LayerError::NotFile(_) => Errno::EISDIR,
        // Fetch, verification and format failures: the bytes cannot be
        // trusted or had, which a reader sees as an I/O error.
        _ => Errno::EIO,
    }
}

/// Replies to a size probe (`size == 0`) or with the data if it fits.
fn reply_sized(reply: ReplyXattr, size: u32, data: &[u8]) {
    let Ok(len) = u32::try_from(data.len()) else {
        return reply.error(Errno::E2BIG);
    };
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if !self.want_passthrough {
            return Ok(());
        }
        match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
            Ok(()) => {
                // Depth 1: backing files must be on a plain filesystem, and
                // overlayfs may still stack on this mount (a container's
                // rootfs), which a depth of 2 would forbid.
                config
                    .set_max_stack_depth(1)
                    .expect("1 is within the kernel's stacking limit");
                self.passthrough.enable();
            }
            Err(_) => tracing::info!("kernel offers no FUSE passthrough; serving reads ourselves"),
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timed = Timed::start(&*self.ops, Op::Lookup);
        let index = self.layer.index();
        match index.lookup(parent.0, name.as_bytes()) {
            Some(ino) => match index.inode(ino) {
                Some(i) => reply.entry(&TTL, &attr(ino, &i), Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timed = Timed::start(&*self.ops, Op::Getattr);
        match self.layer.inode(ino.0) {
            Ok(i) => reply.attr(&TTL, &attr(ino.0, &i)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timed = Timed::start(&*self.ops, Op::Readlink);
        match self.layer.inode(ino.0) {
            Ok(i) if i.kind() == crate::format::FileKind::Symlink => {
                reply.data(self.layer.index().link_target(&i))
            }
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timed = Timed::start(&*self.ops, Op::Open);
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        self.layer.recorder().open(ino.0);
        match self.layer.inode(ino.0) {
            Ok(i) => self.passthrough.open(ino.0, &i, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _timed = Timed::start(&*self.ops, Op::Release);
        reply.ok();
        if let Ok(i) = self.layer.inode(ino.0) {
            self.passthrough.release(ino.0, &i);
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let timed = Timed::start(&*self.ops, Op::Read);
        self.layer.recorder().read(ino.0, offset, u64::from(size));
        match self.layer.read_cached(ino.0, offset, u64::from(size)) {
            Ok(CachedRead::Hit(data)) => reply.data(&data),
            Ok(CachedRead::Miss(pending)) => {
                let pid = req.pid();
                let layer = self.layer.clone();
                // Timed until the reply, which the task sends.
                let timed = timed.hand_over(self.ops.clone());
                self.runtime.spawn(async move {
                    let _timed = timed;
                    layer.prefetch_command(pid);
                    match layer.complete(pending).await {
                        Ok(data) => reply.data(&data),
                        Err(e) => {
                            tracing::warn!(ino = ino.0, offset, error = %e, "read failed");
                            reply.error(errno(&e));
                        }
                    }
                });
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timed = Timed::start(&*self.ops, Op::Opendir);
        match self.layer.inode(ino.0) {
            Ok(i) if i.kind() == crate::format::FileKind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(errno(&e)),
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
        let index = self.layer.index();
        let dir = match self.layer.inode(ino.0) {
            Ok(d) if d.kind() == crate::format::FileKind::Dir => d,
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(errno(&e)),
        };
        // Entry k (0-based) is passed offset k + 1: where the next call resumes.
        let dots = [
            (ino.0, &b"."[..]),
            (dir.parent().unwrap_or(ROOT_INO), &b".."[..]),
        ];
        let entries = dots
            .into_iter()
            .map(|(i, n)| (i, FileType::Directory, n))
            .chain(index.children(&dir).map(|(name, child)| {
                let kind = index
                    .inode(child)
                    .map_or(FileType::RegularFile, |c| file_type(c.kind()));
                (child, kind, name)
            }));
        for (k, (child, kind, name)) in entries.enumerate().skip(usize_from(offset)) {
            if reply.add(INodeNo(child), k as u64 + 1, kind, OsStr::from_bytes(name)) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _timed = Timed::start(&*self.ops, Op::Getxattr);
        if let Err(e) = self.layer.inode(ino.0) {
            return reply.error(errno(&e));
        }
        let xattrs = self.layer.index().xattrs(ino.0);
        match xattrs.binary_search_by(|(n, _)| (**n).cmp(name.as_bytes())) {
            Ok(k) => reply_sized(reply, size, &xattrs[k].1),
            Err(_) => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timed = Timed::start(&*self.ops, Op::Listxattr);
        if let Err(e) = self.layer.inode(ino.0) {
            return reply.error(errno(&e));
        }
        let mut names = Vec::new();
        for (n, _) in self.layer.index().xattrs(ino.0) {
            names.extend_from_slice(n);
            names.push(0);
        }
        reply_sized(reply, size, &names);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let _timed = Timed::start(&*self.ops, Op::Access);
        // Only reached without `default_permissions`; the mount is read-only.
        match self.layer.inode(ino.0) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timed = Timed::start(&*self.ops, Op::Statfs);
        let index = self.layer.index();
        let bytes: u64 = index.inodes().map(|i| i.size()).sum();
        let files = index.inode_count();
        reply.statfs(bytes.div_ceil(4096), 0, 0, files, 0, 4096, 255, 4096);
    }
}
