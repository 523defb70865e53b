//! Index inodes as the kernel sees them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::format::{FileKind, Inode};

pub(super) fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Dir => FileType::Directory,
        FileKind::Reg => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
    }
}

/// The kernel's `new_encode_dev`: what FUSE's 32-bit `rdev` carries.
pub(super) fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

fn time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

pub(super) fn attr(ino: u64, i: &Inode) -> FileAttr {
    let t = time(i.mtime());
    let (major, minor) = i.rdev();
    FileAttr {
        ino: INodeNo(ino),
        size: i.size(),
        blocks: i.size().div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(i.kind()),
        perm: (i.mode() & 0o7777) as u16,
        nlink: i.nlink(),
        uid: i.uid(),
        gid: i.gid(),
        rdev: encode_dev(major, minor),
        blksize: 4096,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_round_trip_through_the_kernel_encoding() {
        // What the kernel's new_decode_dev does with FUSE's rdev.
        let decode = |d: u32| ((d & 0xfff00) >> 8, (d & 0xff) | ((d >> 12) & 0xfff00));
        for (maj, min) in [(0, 0), (1, 3), (8, 1), (259, 70000)] {
            assert_eq!(decode(encode_dev(maj, min)), (maj, min));
        }
    }

    #[test]
    fn times_before_the_epoch_survive() {
        assert_eq!(time(-5), UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(
            time(1_700_000_000),
            UNIX_EPOCH + Duration::from_secs(1_700_000_000)
        );
    }
}
