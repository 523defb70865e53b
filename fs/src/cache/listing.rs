//! What a cache directory holds, read without opening it: for
//! measurements (the benchmark's P7 compares the disk a cache takes with
//! the distinct bytes it holds), never for serving. A running daemon holds
//! the root's lock, so this takes none and trusts nothing it reads: a
//! record being appended is cut off where the pack's scan stops, and no
//! byte is hashed.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::Path;

use super::{PACKS, disk_bytes, pack, pack_path};
use crate::Digest;

/// One cache directory's content as found on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Every key once, with its length: pack records (live or dead) and
    /// object files (chunks and whole-file objects alike).
    pub items: BTreeMap<Digest, u64>,
    /// Blocks of every file under the directory (packs, objects, stamps):
    /// what `du` counts.
    pub disk_bytes: u64,
}

/// Lists the cache directory `dir` (see the module doc).
pub fn list(dir: &Path) -> io::Result<Listing> {
    let mut out = Listing::default();
    let packs_dir = dir.join("packs");
    for i in 0..PACKS {
        let path = pack_path(&packs_dir, i);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let (records, _) = pack::scan(&file)?;
        for r in records {
            out.items.insert(r.digest, u64::from(r.len));
        }
    }
    let objects = dir.join("objects").join("sha256");
    if objects.is_dir() {
        for sub in fs::read_dir(&objects)? {
            let sub = sub?.path();
            if !sub.is_dir() {
                continue;
            }
            for item in fs::read_dir(&sub)? {
                let item = item?;
                let name = item.file_name();
                let Ok(digest) = format!("sha256:{}", name.to_string_lossy()).parse::<Digest>()
                else {
                    continue;
                };
                out.items.insert(digest, item.metadata()?.len());
            }
        }
    }
    // Every file, iteratively: the tree is two levels deep today, but a
    // measurement should not depend on that.
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for item in fs::read_dir(&d)? {
            let item = item?;
            let meta = item.metadata()?;
            if meta.is_dir() {
                dirs.push(item.path());
            } else {
                out.disk_bytes += disk_bytes(&meta);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;

    #[test]
    fn a_cache_in_use_is_listed_with_packs_and_objects() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = Cache::open(dir.path()).expect("open");
        let small = vec![1u8; 100];
        let large = vec![2u8; 200 << 10];
        cache.insert(&Digest::of(&small), &small).expect("insert");
        cache.insert(&Digest::of(&large), &large).expect("insert");
        // Listed while the cache is open (its lock held), as a daemon's is.
        let l = list(dir.path()).expect("list");
        assert_eq!(
            l.items,
            BTreeMap::from([(Digest::of(&small), 100), (Digest::of(&large), 200 << 10)])
        );
        assert!(l.disk_bytes >= (200 << 10) + 100, "{l:?}");
    }
}
