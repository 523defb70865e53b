//! The image's entrypoint, fetched while the container is being created.
//!
//! Whatever else a container does, it first runs the program its image
//! config names (`Entrypoint`, else `Cmd`). An image that was not optimized
//! has no prioritized files, so without this the first read of that program
//! is a miss: one round trip plus the program's bytes, on the start path.
//! Once an image's layers are resolved, the program is found across them
//! (topmost layer first, through `PATH` and symbolic links) and fetched as a
//! prefetch; a script's interpreter (`#!`) and a program's libraries follow.
//!
//! A Kubernetes pod may run another command than the image's: then these
//! are bytes fetched early that may not be read, as with any prefetch.

use std::sync::Arc;

use crate::fetch::Hint;
use crate::format::FileKind;

use super::elf;
use crate::layer::{CachedRead, Layer};

/// The image config's program; parsed with the manifest code.
pub use crate::registry::Entrypoint;
/// Interpreters followed: a script run by a script run by a program.
pub(crate) const MAX_HOPS: usize = 3;
/// Symbolic links followed across layers, per lookup.
const MAX_LINKS: usize = 40;

impl Entrypoint {
    /// The absolute paths `argv0` may be, in the order a shell tries them.
    pub(crate) fn candidates(&self) -> Vec<String> {
        if self.argv0.contains('/') {
            return vec![absolute(&self.workdir, &self.argv0)];
        }
        self.path
            .split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| format!("{}/{}", d.trim_end_matches('/'), self.argv0))
            .collect()
    }
}

/// `path` from directory `dir` (`.` and `..` are left to the lookup).
fn absolute(dir: &str, path: &str) -> String {
    if path.starts_with('/') {
        return path.to_owned();
    }
    let (dir, path) = (dir.trim_matches('/'), path.trim_start_matches("./"));
    if dir.is_empty() {
        format!("/{path}")
    } else {
        format!("/{dir}/{path}")
    }
}

/// Fetches the entrypoint of an image whose layers are `layers` (bottom
/// first) with `Intent::Prefetch`, within the link's speculation budget:
/// at most `read_ahead_max` compressed bytes of it (it is run, so it is
/// read: a script whole, a program's pages as it runs), then its
/// interpreter or its libraries. Returns the paths fetched. Nothing when
/// speculation is off.
pub async fn prefetch_entrypoint(layers: &[Arc<Layer>], entry: &Entrypoint) -> Vec<String> {
    let mut fetched = Vec::new();
    if layers
        .first()
        .is_some_and(|l| !l.fetcher.scheduler().config().speculate)
    {
        return fetched;
    }
    let mut candidates = entry.candidates();
    for _ in 0..MAX_HOPS {
        let Some((path, layer, ino)) = candidates
            .iter()
            .find_map(|c| find(layers, c).map(|(l, i)| (c.clone(), l, i)))
        else {
            break;
        };
        let Ok(inode) = layer.inode(ino) else { break };
        let max = layer.fetcher.scheduler().config().read_ahead_max;
        let mut budget = max;
        let chunks: Vec<_> = layer
            .index
            .file_chunks(&inode)
            .iter()
            .take_while(|c| {
                let len = c.blob_range.1 - c.blob_range.0;
                let fits = len <= budget;
                budget = budget.saturating_sub(len);
                fits
            })
            .copied()
            .collect();
        if layer
            .fetcher
            .warm_for(Hint::Entrypoint, &chunks)
            .await
            .is_err()
        {
            break;
        }
        fetched.push(path);
        let head = {
            let layer = layer.clone();
            tokio::task::spawn_blocking(move || match layer.read_cached(ino, 0, 256) {
                Ok(CachedRead::Hit(d)) => d,
                _ => Vec::new(),
            })
            .await
            .unwrap_or_default()
        };
        match interpreter(&head) {
            Some(interp) => candidates = vec![interp],
            None => {
                layer.prefetch_libraries(ino);
                break;
            }
        }
    }
    fetched
}

/// The interpreter a `#!` line names.
pub(crate) fn interpreter(head: &[u8]) -> Option<String> {
    let line = head.strip_prefix(b"#!")?.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let interp = line.split_whitespace().next()?;
    interp.starts_with('/').then(|| interp.to_owned())
}

/// The regular file at `path` in the union of `layers` (bottom first): the
/// topmost layer that has it, following links across layers. Whiteouts
/// are not consulted: at worst a hidden file is fetched early.
fn find(layers: &[Arc<Layer>], path: &str) -> Option<(Arc<Layer>, u64)> {
    let mut path = path.to_owned();
    'links: for _ in 0..MAX_LINKS {
        for layer in layers.iter().rev() {
            if let Some(ino) = elf::resolve_file(&layer.index, path.as_bytes()) {
                return Some((layer.clone(), ino));
            }
            // A link whose target another layer holds (`/bin/sh` in an
            // upper layer, its shell in a lower one).
            if let Some(target) = link_at(layer, &path) {
                path = target;
                continue 'links;
            }
        }
        return None;
    }
    None
}

/// If `path`'s last name is a symbolic link in `layer` (its directory found
/// through the layer's own links), the absolute path it points to.
fn link_at(layer: &Layer, path: &str) -> Option<String> {
    let (dir, name) = path.rsplit_once('/')?;
    let index = &layer.index;
    let parent = if dir.is_empty() {
        crate::format::ROOT_INO
    } else {
        elf::resolve_dir(index, dir.as_bytes())?
    };
    let ino = index.lookup(parent, name.as_bytes())?;
    let inode = index.inode(ino)?;
    if inode.kind() != FileKind::Symlink {
        return None;
    }
    let target = std::str::from_utf8(index.link_target(&inode)).ok()?;
    Some(absolute(dir, target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_is_looked_for_as_a_shell_would() {
        let e = Entrypoint::from_config(br#"{"config":{"Cmd":["python3","-c","1"]}}"#).unwrap();
        assert_eq!(e.candidates()[1], "/usr/local/bin/python3");
        let e = Entrypoint::from_config(
            br#"{"config":{"Entrypoint":[],"Cmd":["./run"],"WorkingDir":"/app/"}}"#,
        )
        .unwrap();
        assert_eq!(e.candidates(), vec!["/app/run".to_owned()]);
    }

    #[test]
    fn a_shebang_names_an_absolute_interpreter() {
        assert_eq!(interpreter(b"#!/bin/sh\necho"), Some("/bin/sh".to_owned()));
        assert_eq!(
            interpreter(b"#! /usr/bin/env python3\n"),
            Some("/usr/bin/env".to_owned())
        );
        assert_eq!(interpreter(b"#!sh\n"), None);
        assert_eq!(interpreter(b"\x7fELF"), None);
    }
}
