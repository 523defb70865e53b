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
                    bail!("more than {MAX_LINKS} symlinks resolving {}", here.display());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_and_dotdot_refused() {
        assert_eq!(clean(Path::new("./a/b")).unwrap(), vec!["a", "b"]);
        assert_eq!(clean(Path::new("/a")).unwrap(), vec!["a"]);
        assert!(clean(Path::new("a/../../etc")).is_err());
    }

    #[test]
    fn symlinks_in_parents_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("real")).unwrap();
        std::os::unix::fs::symlink("/real", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../real", root.join("up")).unwrap();
        std::os::unix::fs::symlink("/real/sub", root.join("etc")).unwrap();
        let p = |s: &str| resolve(root, &clean(Path::new(s)).unwrap()).unwrap();
        assert_eq!(p("abs/x"), root.join("real/x"));
        assert_eq!(p("up/x"), root.join("real/x"));
        // The last component is not followed.
        assert_eq!(p("abs"), root.join("abs"));
        assert_eq!(p("etc/passwd"), root.join("real/sub/passwd"));
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(resolve(root, &clean(Path::new("loop/x")).unwrap()).is_err());
    }
}
