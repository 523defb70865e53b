//! A layer's tar applied onto the mounted disk, as containerd applies one
//! onto a snapshot: OCI whiteouts (`.wh.NAME` removes NAME from the layers
//! below, `.wh..wh..opq` empties its directory of them), then each entry
//! with its owner, mode, xattrs (pax `SCHILY.xattr.*`) and mtime; hard
//! links, symlinks, devices and fifos as themselves. Paths resolve inside
//! the mount point ([`rootpath`](super::rootpath)).

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::{CString, OsString};
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{Context, Result, bail};
use nix::fcntl::{AT_FDCWD, AtFlags};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, fchownat};
use tar::EntryType;

use super::rootpath::{clean, resolve};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const XATTR: &str = "SCHILY.xattr.";

/// What applying a layer did.
#[derive(Debug, Default)]
pub struct Applied {
    pub entries: u64,
    pub whiteouts: u64,
}

/// A reader that counts the bytes read through it.
struct Counting<R> {
    inner: R,
    n: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.set(self.n.get() + k as u64);
        Ok(k)
    }
}

/// Applies the tar read from `tar` onto `root`.
///
/// A tar whose last entry's data ends the stream (no padding, no end
/// blocks: umoci writes such layers) is taken as complete, as long as
/// that data is all there.
pub fn apply(root: &Path, tar: impl Read) -> Result<Applied> {
    let read = Rc::new(Cell::new(0u64));
    let mut archive = tar::Archive::new(Counting {
        inner: tar,
        n: read.clone(),
    });
    let mut done = Applied::default();
    // Paths this layer wrote: an opaque marker keeps them.
    let mut ours: HashSet<PathBuf> = HashSet::new();
    // Directory mtimes, set last (entries written into a directory change
    // it).
    let mut dir_times: Vec<(PathBuf, i64)> = Vec::new();
    let mut entries = archive.entries().context("cannot read the layer's tar")?;
    // Where the last entry's data ends in the stream.
    let mut data_end = None;
    loop {
        let mut entry = match entries.next() {
            None => break,
            Some(Ok(e)) => e,
            Some(Err(e)) if data_end == Some(read.get()) => {
                tracing::info!("the layer's tar ends without padding after its last entry: {e}");
                break;
            }
            Some(Err(e)) => return Err(e).context("cannot read the layer's tar"),
        };
        data_end = Some(entry.raw_file_position() + entry.size());
        let name = entry
            .path()
            .context("tar entry with a bad name")?
            .into_owned();
        let parts = clean(&name)?;
        let Some(last) = parts.last().cloned() else {
            // The root itself: its metadata only.
            set_meta(root, &mut entry, &mut dir_times)?;
            continue;
        };
        let last_str = last.to_string_lossy();
        if let Some(hidden) = last_str.strip_prefix(WHITEOUT) {
            done.whiteouts += 1;
            let parent = resolve(root, &parts)?
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| root.to_path_buf());
            if last_str == OPAQUE {
                empty_dir(&parent, &ours)?;
            } else {
                remove_all(&parent.join(hidden))?;
            }
            continue;
        }
        let path = resolve(root, &parts)?;
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .with_context(|| format!("cannot make {}", parent.display()))?;
        }
        let kind = entry.header().entry_type();
        replace(&path, kind == EntryType::Directory)?;
        create(root, &path, &mut entry, kind)?;
        if kind != EntryType::Link {
            set_meta(&path, &mut entry, &mut dir_times)?;
        }
        // Its parents count as this layer's too: a later opaque marker
        // must not take them (tars need not list every directory).
        for p in path.ancestors().take_while(|p| *p != root) {
            if !ours.insert(p.to_path_buf()) {
                break;
            }
        }
        done.entries += 1;
    }
    for (dir, mtime) in dir_times.iter().rev() {
        set_mtime(dir, *mtime)?;
    }
    Ok(done)
}

/// Makes `path` as the entry says.
fn create(
    root: &Path,
    path: &Path,
    entry: &mut tar::Entry<'_, impl Read>,
    kind: EntryType,
) -> Result<()> {
    let ctx = || format!("cannot create {}", path.display());
    match kind {
        EntryType::Directory => {
            if !path.is_dir() {
                fs::create_dir(path).with_context(ctx)?;
            }
        }
        EntryType::Regular | EntryType::Continuous => {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .with_context(ctx)?;
            std::io::copy(entry, &mut f).with_context(ctx)?;
        }
        EntryType::Symlink => {
            let target = entry
                .link_name()?
                .ok_or_else(|| anyhow::anyhow!("symlink {} without a target", path.display()))?;
            std::os::unix::fs::symlink(target.as_ref(), path).with_context(ctx)?;
        }
        EntryType::Link => {
            let target = entry
                .link_name()?
                .ok_or_else(|| anyhow::anyhow!("hard link {} without a target", path.display()))?;
            let target = resolve(root, &clean(&target)?)?;
            fs::hard_link(&target, path).with_context(|| {
                format!("cannot link {} to {}", path.display(), target.display())
            })?;
        }
        EntryType::Char | EntryType::Block | EntryType::Fifo => {
            let h = entry.header();
            let sflag = match kind {
                EntryType::Char => SFlag::S_IFCHR,
                EntryType::Block => SFlag::S_IFBLK,
                _ => SFlag::S_IFIFO,
            };
            let major = h.device_major()?.unwrap_or(0);
            let minor = h.device_minor()?.unwrap_or(0);
            mknod(
                path,
                sflag,
                Mode::from_bits_truncate(0o600),
                makedev(u64::from(major), u64::from(minor)),
            )
            .with_context(ctx)?;
        }
        other => bail!("tar entry {} of unsupported type {other:?}", path.display()),
    }
    Ok(())
}

/// Owner, xattrs, mode and (for all but directories, whose times wait)
/// mtime of `path` from the entry. Owner first: chown clears setuid bits.
fn set_meta(
    path: &Path,
    entry: &mut tar::Entry<'_, impl Read>,
    dir_times: &mut Vec<(PathBuf, i64)>,
) -> Result<()> {
    let h = entry.header();
    let uid = u32::try_from(h.uid()?).context("uid out of range")?;
    let gid = u32::try_from(h.gid()?).context("gid out of range")?;
    let mode = h.mode()? & 0o7777;
    let mtime = i64::try_from(h.mtime()?).unwrap_or(0);
    let kind = h.entry_type();
    fchownat(
        AT_FDCWD,
        path,
        Some(Uid::from_raw(uid)),
        Some(Gid::from_raw(gid)),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .with_context(|| format!("cannot chown {}", path.display()))?;
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix(XATTR) {
                set_xattr(path, name, ext.value_bytes())?;
            }
        }
    }
    if kind != EntryType::Symlink {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot chmod {}", path.display()))?;
    }
    if kind == EntryType::Directory {
        dir_times.push((path.to_path_buf(), mtime));
    } else {
        set_mtime(path, mtime)?;
    }
    Ok(())
}

fn set_mtime(path: &Path, mtime: i64) -> Result<()> {
    let t = TimeSpec::new(mtime, 0);
    nix::sys::stat::utimensat(
        AT_FDCWD,
        path,
        &t,
        &t,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .with_context(|| format!("cannot set the mtime of {}", path.display()))
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let n = CString::new(name)?;
    // SAFETY: both strings are NUL-terminated and live across the call;
    // `value` is a valid slice of `value.len()` bytes.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        bail!("cannot set xattr {name} on {}: {e}", path.display());
    }
    Ok(())
}

/// Clears the way for an entry at `path`: what is there goes, unless both
/// are directories (a directory entry then only updates the metadata).
fn replace(path: &Path, is_dir: bool) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() && is_dir => Ok(()),
        Ok(_) => remove_all(path),
        Err(_) => Ok(()),
    }
}

/// Removes `path` whatever it is; nothing there is fine.
fn remove_all(path: &Path) -> Result<()> {
    let r = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => return Ok(()),
    };
    r.with_context(|| format!("cannot remove {}", path.display()))
}

/// An opaque directory: everything in it from the layers below goes.
fn empty_dir(dir: &Path, ours: &HashSet<PathBuf>) -> Result<()> {
    let Ok(children) = fs::read_dir(dir) else {
        return Ok(());
    };
    let children: Vec<OsString> = children
        .filter_map(|c| c.ok().map(|c| c.file_name()))
        .collect();
    for name in children {
        let child = dir.join(&name);
        if !ours.contains(&child) {
            remove_all(&child)?;
        }
    }
    Ok(())
}
