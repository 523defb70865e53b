//! Paths of a layer's entries under the disk's mount point, resolved the
//! way they would be inside the container: a symlink met on the way is
//! followed as if the mount point were `/`, so a hostile tar cannot write
//! outside it (an absolute link, or `..` past the root, stays inside).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use anyhow::{Result, bail};

/// Symlinks followed while resolving one path, at most (Linux's own limit).
const MAX_LINKS: usize = 40;

/// The entry name `name` of a tar as plain components: leading `/` and
/// `.` dropped; `..` refused.
pub fn clean(name: &Path) -> Result<Vec<OsString>> {
    let mut out = Vec::new();
    for c in name.components() {
        match c {
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => bail!("tar entry {} climbs out with ..", name.display()),
        }
    }
    Ok(out)
}

/// `parts` under `root` with every symlink among the parents followed
/// inside `root`; the last component is not followed (the caller acts on
/// it without following). Missing parents are left as named.
pub fn resolve(root: &Path, parts: &[OsString]) -> Result<PathBuf> {
    let Some((last, parents)) = parts.split_last() else {
        return Ok(root.to_path_buf());
    };
    let mut todo: VecDeque<OsString> = parents.iter().cloned().collect();
    // The resolved components below root.
    let mut done: Vec<OsString> = Vec::new();
    let mut links = 0usize;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            done.pop();
            continue;
        }
        if c == "." || c.is_empty() {
            continue;
        }
        let here: PathBuf = root.join(done.iter().collect::<PathBuf>()).join(&c);
        match std::fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    bail!(
                        "more than {MAX_LINKS} symlinks resolving {}",
                        here.display()
                    );
                }
                let target = std::fs::read_link(&here)?;
                if target.is_absolute() {
                    done.clear();
                }
                for t in target.components().rev() {
                    match t {
                        Component::Normal(n) => todo.push_front(n.to_os_string()),
                        Component::ParentDir => todo.push_front("..".into()),
                        _ => {}
                    }
                }
            }
            _ => done.push(c),
        }
    }
    Ok(root.join(done.iter().collect::<PathBuf>()).join(last))
}
