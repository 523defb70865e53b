//! What a name in a layer may be: the one place every TOC entry name, hardlink
//! target, whiteout target, symlink target and extended attribute goes
//! through before the index builder uses it.
//!
//! Per class, the outcome and why:
//!
//! - `.` and empty components (`./a`, `a//b`, `dir/`): dropped, the name kept.
//!   Tar writers produce them (`tar -C dir .` names `./a`; directories end in
//!   `/`) and they mean one unambiguous path, as `filepath.Clean` in
//!   containerd's tar applier reads them.
//! - `..` components: the layer is refused. A name that climbs is either an
//!   escape or a second spelling of another entry; containerd's applier
//!   refuses breakouts too.
//! - A NUL byte in a name: refused. No file can be called that; shown, the
//!   name ends at the NUL and two entries list as one.
//! - A component over [`NAME_MAX`] bytes, a path of [`PATH_MAX`] bytes or
//!   more: refused. The kernel refuses such names (`ENAMETOOLONG`), so a
//!   directory holding one cannot be listed or looked up, and an unbounded
//!   path is unbounded work (and, built recursively, a stack overflow). An
//!   applier creating the file would fail the same way and the pull with it.
//! - Whiteouts `.wh..`, `.wh...`: refused; they would hide the directory
//!   itself or its parent, or show as extra `.`/`..` entries. `.wh.` alone
//!   too: it hides nothing nameable.
//! - Symlink targets: any bytes the kernel accepts (they are resolved in the
//!   container, so `..` and absolute targets are legal); empty, with a NUL,
//!   or [`PATH_MAX`] bytes or more: refused, `symlink(2)` would refuse them.
//! - Extended attributes: overlay's own (`trusted.overlay.*`,
//!   `user.overlay.*`) other than `opaque` are dropped (see
//!   [`is_overlay_private`]); names that are empty, hold a NUL or exceed
//!   [`XATTR_NAME_MAX`], and values over [`XATTR_SIZE_MAX`], are refused,
//!   as `setxattr(2)` would.

use std::fmt;

use crate::format::FormatError;

/// Longest file name component the kernel accepts (`NAME_MAX`).
pub const NAME_MAX: usize = 255;
/// Size of the kernel's buffer for a path, its final NUL included
/// (`PATH_MAX`): a layer's paths are shorter.
pub const PATH_MAX: usize = 4096;
/// Longest extended attribute name (`XATTR_NAME_MAX`).
pub const XATTR_NAME_MAX: usize = 255;
/// Largest extended attribute value (`XATTR_SIZE_MAX`).
pub const XATTR_SIZE_MAX: usize = 65536;

pub(super) const WHITEOUT_PREFIX: &str = ".wh.";
/// Prefix of AUFS's own metadata entries (`.wh..wh.plnk`, `.wh..wh.aufs`),
/// of which only the opaque marker means something to overlay.
pub(super) const WHITEOUT_META_PREFIX: &str = ".wh..wh.";
pub(super) const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";
/// The opaque-directory xattr, the one overlay xattr a layer may carry.
pub(super) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// The same in overlay's `userxattr` mode.
const USER_OPAQUE_XATTR: &str = "user.overlay.opaque";

/// How much of a hostile name an error shows: enough to find the entry,
/// not so much that a 4 KiB (or 1 MB) name floods a one-line error.
const SHOWN_MAX: usize = 120;

/// A name as errors show it: quoted, cut after [`SHOWN_MAX`] bytes with
/// its length said.
pub(crate) struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if s.len() <= SHOWN_MAX {
            return write!(f, "{s:?}");
        }
        let mut cut = SHOWN_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        write!(f, "{:?}... ({} bytes)", &s[..cut], s.len())
    }
}

fn refuse(name: &str, why: impl fmt::Display) -> FormatError {
    FormatError::Toc(format!("{}: {why}", Shown(name)))
}

/// A TOC name (an entry's, or a hardlink's target: a path in the layer) as
/// a clean relative path, components joined by one `/`; the root is the
/// empty path. See the module doc for what is dropped and what refused.
pub(crate) fn clean_path(name: &str) -> Result<String, FormatError> {
    if name.len() >= PATH_MAX {
        return Err(refuse(
            name,
            format!(
                "a name of {} bytes is longer than PATH_MAX ({PATH_MAX})",
                name.len()
            ),
        ));
    }
    let mut out = String::with_capacity(name.len());
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(refuse(name, "a name with '..' escapes the layer")),
            c => {
                check_component(name, c)?;
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    Ok(out)
}

fn check_component(name: &str, c: &str) -> Result<(), FormatError> {
    if c.contains('\0') {
        return Err(refuse(name, "a name with a NUL byte"));
    }
    if c.len() > NAME_MAX {
        return Err(refuse(
            name,
            format!(
                "a component of {} bytes is longer than NAME_MAX ({NAME_MAX})",
                c.len()
            ),
        ));
    }
    Ok(())
}

/// What a name's last component says about the entry, whiteouts decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Base<'a> {
    /// An ordinary name.
    Plain,
    /// `.wh..wh..opq`: the directory holding it is opaque.
    Opaque,
    /// `.wh.NAME`: NAME (a plain component) is deleted.
    Whiteout(&'a str),
    /// Other `.wh..wh.*`: AUFS metadata, meaningless here; dropped, as
    /// containerd's applier skips it.
    AufsMeta,
}

/// Classifies `base`, the last component of the clean path of `name`
/// (which [`clean_path`] already checked).
pub(crate) fn classify<'a>(name: &str, base: &'a str) -> Result<Base<'a>, FormatError> {
    if base == OPAQUE_WHITEOUT {
        return Ok(Base::Opaque);
    }
    if base.starts_with(WHITEOUT_META_PREFIX) {
        return Ok(Base::AufsMeta);
    }
    match base.strip_prefix(WHITEOUT_PREFIX) {
        None => Ok(Base::Plain),
        Some("") => Err(refuse(name, "whiteout of an empty name")),
        Some(hidden @ ("." | "..")) => Err(refuse(
            name,
            format!("whiteout of {hidden:?} would hide a directory, not an entry of it"),
        )),
        Some(hidden) => Ok(Base::Whiteout(hidden)),
    }
}

/// A symlink's target, checked: what `symlink(2)` would accept.
pub(crate) fn check_symlink_target(name: &str, target: &str) -> Result<(), FormatError> {
    if target.is_empty() {
        return Err(refuse(name, "a symlink to an empty target"));
    }
    if target.contains('\0') {
        return Err(refuse(name, "a symlink target with a NUL byte"));
    }
    if target.len() >= PATH_MAX {
        return Err(refuse(
            name,
            format!(
                "a symlink target of {} bytes is longer than PATH_MAX ({PATH_MAX})",
                target.len()
            ),
        ));
    }
    Ok(())
}

/// Whether `key` is one of overlayfs's own xattrs, which steer the overlay
/// mounted above the layer (`redirect` and `origin` point it at other
/// paths, `metacopy` makes it look for data elsewhere, `upper`, `impure`,
/// `nlink`, `whiteout` ...): a layer has no business setting them. Only the
/// opaque marker stays, which is how a whiteout of a whole directory's
/// lower content reaches overlay.
pub(crate) fn is_overlay_private(key: &str) -> bool {
    (key.starts_with("trusted.overlay.") || key.starts_with("user.overlay."))
        && key != OPAQUE_XATTR
        && key != USER_OPAQUE_XATTR
}

/// An extended attribute's name and decoded value, checked as
/// `setxattr(2)` would.
pub(crate) fn check_xattr(name: &str, key: &str, value: &[u8]) -> Result<(), FormatError> {
    if key.is_empty() || key.contains('\0') || key.len() > XATTR_NAME_MAX {
        return Err(refuse(
            name,
            format!(
                "xattr name {} is empty, holds a NUL or is longer than {XATTR_NAME_MAX} bytes",
                Shown(key)
            ),
        ));
    }
    if value.len() > XATTR_SIZE_MAX {
        return Err(refuse(
            name,
            format!(
                "xattr {} of {} bytes is larger than {XATTR_SIZE_MAX}",
                Shown(key),
                value.len()
            ),
        ));
    }
    Ok(())
}
