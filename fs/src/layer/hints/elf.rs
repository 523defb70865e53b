//! A program's shared libraries, fetched before the loader asks for them.
//!
//! A dynamically linked program that starts reads its libraries one after
//! another: the loader opens each, reads its headers and maps it, then the
//! next. On a lazily fetched layer each of those is a round trip, in series
//! (four for Python: libm, libz, libexpat, libc). Once the program's dynamic
//! section has been fetched, its `DT_NEEDED` names are known, so the
//! libraries the same layer holds are fetched together, while the loader is
//! still on the first. Each library's own dependencies follow it.
//!
//! By value: the loader reads a library's headers and dynamic section and
//! maps the rest, of which a program touches the pages it calls. A library
//! that fits in the link's speculation room is fetched whole (one GET, no
//! round trip more); a larger one only in the parts the loader reads
//! (its first chunk, then the chunks of its dynamic section and string
//! table, as examining it asks for them), the rest on demand.
//!
//! Only 64-bit little-endian ELF is read; anything else (or anything
//! malformed) is "not a program" and costs nothing more. All bytes read
//! here came from the cache, verified.

use std::cell::Cell;
use std::ops::Range;
use std::sync::Arc;

use crate::fetch::Hint;
use crate::format::{Chunk, FileKind, LayerIndex, ROOT_INO};
use crate::layer::{CachedRead, Layer, plan};
use crate::num::usize_from;

impl Layer {
    /// After a miss on file `ino`: if it is a program, fetches the parts
    /// of it that tell its libraries (as examining it asks for them), then
    /// the libraries it needs that this layer holds, each by value (see the
    /// module docs), then theirs. Each file is looked at until that can be
    /// decided, then never again.
    pub(in crate::layer) fn prefetch_libraries(self: &Arc<Self>, ino: u64) {
        let config = self.fetcher.scheduler().config();
        if config.read_ahead == 0
            || !config.speculate
            || self
                .examined
                .lock()
                .expect("examined set poisoned")
                .contains(&ino)
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            for _ in 0..MAX_ROUNDS {
                let finder = me.clone();
                let Ok((libraries, want)) =
                    tokio::task::spawn_blocking(move || finder.libraries(ino)).await
                else {
                    return;
                };
                for lib in libraries {
                    me.prefetch_library(lib);
                }
                let Some(want) = want else { return };
                let chunks = me.file_chunks_in(ino, &want);
                if chunks.is_empty() || me.fetcher.warm_for(Hint::Library, &chunks).await.is_err() {
                    return;
                }
            }
        });
    }

    /// Fetches library `lib`: whole if it fits in the link's room now, else
    /// its first chunk (its headers); then looks at it for its own.
    fn prefetch_library(self: &Arc<Self>, lib: u64) {
        let Ok(inode) = self.inode(lib) else { return };
        let all = self.index.file_chunks(&inode);
        let bytes: u64 = all.iter().map(|c| c.blob_range.1 - c.blob_range.0).sum();
        let scheduler = self.fetcher.scheduler();
        let max = scheduler.config().read_ahead_max;
        let chunks = if bytes <= max.min(scheduler.speculation_room()) {
            all.to_vec()
        } else {
            all.iter().take(1).copied().collect()
        };
        let me = self.clone();
        tokio::spawn(async move {
            if me.fetcher.warm_for(Hint::Library, &chunks).await.is_ok() {
                me.prefetch_libraries(lib);
            }
        });
    }

    /// The chunks of file `ino` that hold its bytes `range`.
    fn file_chunks_in(&self, ino: u64, range: &Range<u64>) -> Vec<Chunk> {
        let Ok(inode) = self.inode(ino) else {
            return Vec::new();
        };
        self.index
            .file_chunks(&inode)
            .iter()
            .filter(|c| c.file_offset < range.end && c.file_offset + c.size > range.start)
            .copied()
            .collect()
    }

    /// The libraries of file `ino` found in this layer, if it is a program
    /// (blocking: reads the cache), and the range of it whose bytes are not
    /// cached yet that would tell more.
    fn libraries(&self, ino: u64) -> (Vec<u64>, Option<Range<u64>>) {
        let Ok(inode) = self.inode(ino) else {
            return (Vec::new(), None);
        };
        let chunks = self.index.file_chunks(&inode);
        let want = Cell::new(None);
        let read = |offset: u64, len: usize| match plan::plan_read(
            chunks,
            inode.size(),
            offset,
            len as u64,
            self.fetcher.cache(),
        ) {
            CachedRead::Hit(d) if d.len() == len => Some(d),
            _ => {
                want.set(Some(offset..offset + len as u64));
                None
            }
        };
        let resolve = |name: &[u8], needs: &Needs| {
            candidates(name, needs)
                .iter()
                .find_map(|path| resolve_file(&self.index, path))
        };
        let mut found = match examine(inode.size(), &read) {
            // The loader is mapped first: it need not wait for the rest.
            Examined::NotYet { interp } => {
                let needs = Needs::default();
                let found = interp.and_then(|i| resolve(&i, &needs)).into_iter();
                return (found.collect(), want.take());
            }
            Examined::NotElf => Vec::new(),
            Examined::Needs(needs) => {
                let mut found: Vec<u64> = Vec::new();
                let names = needs.needed.iter().chain(&needs.interp);
                for name in names {
                    let lib = resolve(name, &needs);
                    if let Some(lib) = lib.filter(|l| *l != ino && !found.contains(l)) {
                        found.push(lib);
                    }
                }
                found
            }
        };
        let mut examined = self.examined.lock().expect("examined set poisoned");
        examined.insert(ino);
        found.retain(|l| !examined.contains(l));
        tracing::debug!(ino, libraries = found.len(), "looked for libraries");
        (found, None)
    }
}

/// Times a file is fetched further and looked at again for its libraries:
/// headers, program headers, dynamic section, string table.
const MAX_ROUNDS: usize = 4;

/// What looking at a file's first bytes found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Examined {
    /// Not a dynamically linked 64-bit little-endian ELF file.
    NotElf,
    /// An ELF file whose dynamic section or string table is not cached
    /// yet; its loader if the headers naming it are.
    NotYet { interp: Option<Vec<u8>> },
    /// The libraries it names.
    Needs(Needs),
}

#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Needs {
    /// `PT_INTERP`: the loader.
    pub interp: Option<Vec<u8>>,
    /// `DT_NEEDED`, in order.
    pub needed: Vec<Vec<u8>>,
    /// `DT_RUNPATH` or `DT_RPATH` directories.
    pub runpath: Vec<Vec<u8>>,
    /// `e_machine`, for the multiarch directories.
    pub machine: u16,
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;
/// Bounds that no real program reaches: a malformed header cannot make
/// this read much.
const MAX_PHDRS: usize = 128;
const MAX_DYNAMIC: u64 = 64 << 10;
const MAX_NAME: u64 = 4096;
const MAX_NEEDED: usize = 128;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

struct Phdr {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// Reads the libraries of a file of `size` bytes through `read(offset,
/// len)`, which answers from the cache only (`None`: not cached).
pub(crate) fn examine(size: u64, read: &dyn Fn(u64, usize) -> Option<Vec<u8>>) -> Examined {
    let mut interp = None;
    match try_examine(size, read, &mut interp) {
        Ok(Some(needs)) => Examined::Needs(needs),
        Ok(None) => Examined::NotElf,
        Err(NotCached) => Examined::NotYet { interp },
    }
}

struct NotCached;

/// Sets `interp` as soon as it is read: the kernel maps the loader at
/// `execve`, before the program's dynamic section is ever touched.
fn try_examine(
    size: u64,
    read: &dyn Fn(u64, usize) -> Option<Vec<u8>>,
    interp: &mut Option<Vec<u8>>,
) -> Result<Option<Needs>, NotCached> {
    // Within the file, and cached; `Ok(None)`: past its end.
    let get = |offset: u64, len: u64| -> Result<Option<Vec<u8>>, NotCached> {
        match offset.checked_add(len) {
            Some(end) if end <= size => read(offset, usize_from(len)).map(Some).ok_or(NotCached),
            _ => Ok(None),
        }
    };
    let Some(h) = get(0, 64)? else {
        return Ok(None);
    };
    // Magic, 64-bit, little-endian, version 1.
    if h[..4] != *b"\x7fELF" || h[4] != 2 || h[5] != 1 || h[6] != 1 {
        return Ok(None);
    }
    let machine = u16_at(&h, 18).unwrap_or(0);
    let (phoff, phentsize, phnum) = (
        u64_at(&h, 32).unwrap_or(0),
        u16_at(&h, 54).unwrap_or(0),
        u16_at(&h, 56).unwrap_or(0),
    );
    if phentsize < 56 || phnum == 0 || usize::from(phnum) > MAX_PHDRS {
        return Ok(None);
    }
    let Some(table) = get(phoff, u64::from(phentsize) * u64::from(phnum))? else {
        return Ok(None);
    };
    let phdrs: Vec<Phdr> = table
        .chunks_exact(usize::from(phentsize))
        .filter_map(|p| {
            Some(Phdr {
                kind: u32_at(p, 0)?,
                offset: u64_at(p, 8)?,
                vaddr: u64_at(p, 16)?,
                filesz: u64_at(p, 32)?,
            })
        })
        .collect();
    let Some(dynamic) = phdrs.iter().find(|p| p.kind == PT_DYNAMIC) else {
        return Ok(None); // statically linked
    };
    if let Some(p) = phdrs.iter().find(|p| p.kind == PT_INTERP)
        && p.filesz <= MAX_NAME
        && let Some(name) = get(p.offset, p.filesz)?
    {
        *interp = Some(until_nul(&name).to_vec());
    }
    let mut needs = Needs {
        machine,
        interp: interp.clone(),
        ..Needs::default()
    };
    let Some(entries) = get(dynamic.offset, dynamic.filesz.min(MAX_DYNAMIC))? else {
        return Ok(None);
    };
    let (mut strtab, mut strsz) = (None, None);
    let (mut needed, mut paths) = (Vec::new(), Vec::new());
    for e in entries.chunks_exact(16) {
        let (tag, val) = (u64_at(e, 0).unwrap_or(0), u64_at(e, 8).unwrap_or(0));
        match tag {
            DT_NULL => break,
            DT_NEEDED if needed.len() < MAX_NEEDED => needed.push(val),
            DT_STRTAB => strtab = Some(val),
            DT_STRSZ => strsz = Some(val),
            DT_RPATH | DT_RUNPATH => paths.push(val),
            _ => {}
        }
    }
    let (Some(strtab), Some(strsz)) = (strtab, strsz) else {
        return Ok(None);
    };
    // DT_STRTAB is an address: the load segment holding it gives its offset.
    let Some(table) = phdrs
        .iter()
        .filter(|p| p.kind == PT_LOAD)
        .find(|p| strtab >= p.vaddr && strtab - p.vaddr < p.filesz)
        .map(|p| p.offset + (strtab - p.vaddr))
    else {
        return Ok(None);
    };
    let string = |at: u64| -> Result<Option<Vec<u8>>, NotCached> {
        if at >= strsz {
            return Ok(None);
        }
        let len = (strsz - at).min(MAX_NAME);
        Ok(get(table + at, len)?.map(|s| until_nul(&s).to_vec()))
    };
    for at in needed {
        needs.needed.extend(string(at)?);
    }
    for at in paths {
        if let Some(list) = string(at)? {
            needs
                .runpath
                .extend(list.split(|&b| b == b':').map(<[u8]>::to_vec));
        }
    }
    Ok(Some(needs))
}

fn until_nul(b: &[u8]) -> &[u8] {
    b.split(|&c| c == 0).next().unwrap_or_default()
}

/// Where the loader looks for `name`: the runpath's absolute directories,
/// then the system's (with the multiarch ones of `machine`). A name with a
/// slash is a path of its own.
pub(crate) fn candidates(name: &[u8], needs: &Needs) -> Vec<Vec<u8>> {
    if name.contains(&b'/') {
        return if name.starts_with(b"/") {
            vec![name.to_vec()]
        } else {
            Vec::new()
        };
    }
    let triple: &[u8] = match needs.machine {
        62 => b"x86_64-linux-gnu",
        183 => b"aarch64-linux-gnu",
        40 => b"arm-linux-gnueabihf",
        21 => b"powerpc64le-linux-gnu",
        22 => b"s390x-linux-gnu",
        243 => b"riscv64-linux-gnu",
        _ => b"",
    };
    let mut dirs: Vec<Vec<u8>> = needs
        .runpath
        .iter()
        .filter(|d| d.starts_with(b"/"))
        .cloned()
        .collect();
    if !triple.is_empty() {
        dirs.push([b"/lib/", triple].concat());
        dirs.push([b"/usr/lib/", triple].concat());
    }
    for d in ["/lib64", "/usr/lib64", "/lib", "/usr/lib", "/usr/local/lib"] {
        dirs.push(d.as_bytes().to_vec());
    }
    dirs.into_iter()
        .map(|mut d| {
            d.push(b'/');
            d.extend_from_slice(name);
            d
        })
        .collect()
}

/// The regular file at absolute `path` in `index`, following symbolic links
/// that stay inside the layer (a library's name is usually a link to its
/// versioned file, and `/lib` may be a link to `/usr/lib`).
pub(super) fn resolve_file(index: &LayerIndex, path: &[u8]) -> Option<u64> {
    resolve(index, path).filter(|&i| index.inode(i).is_some_and(|n| n.kind() == FileKind::Reg))
}

/// The directory at absolute `path` in `index`, as [`resolve_file`] finds
/// files.
pub(super) fn resolve_dir(index: &LayerIndex, path: &[u8]) -> Option<u64> {
    resolve(index, path).filter(|&i| index.inode(i).is_some_and(|n| n.kind() == FileKind::Dir))
}

/// A tree of files that paths are looked up in: a layer's index, or the
/// ext4 tree of an overlaybd disk (`disk/hints.rs`).
pub(crate) trait Tree {
    /// The root directory's inode number.
    fn root(&self) -> u64;
    /// The inode of `name` in directory `dir`.
    fn lookup(&self, dir: u64, name: &[u8]) -> Option<u64>;
    /// Where `ino` points, if it is a symbolic link.
    fn link(&self, ino: u64) -> Option<Vec<u8>>;
}

impl Tree for LayerIndex {
    fn root(&self) -> u64 {
        ROOT_INO
    }

    fn lookup(&self, dir: u64, name: &[u8]) -> Option<u64> {
        LayerIndex::lookup(self, dir, name)
    }

    fn link(&self, ino: u64) -> Option<Vec<u8>> {
        let inode = self.inode(ino)?;
        (inode.kind() == FileKind::Symlink).then(|| self.link_target(&inode).to_vec())
    }
}

/// What absolute `path` names in `tree`, following its symbolic links
/// (at most 40, as the kernel does); `..` stops at the root.
pub(crate) fn resolve(tree: &impl Tree, path: &[u8]) -> Option<u64> {
    const MAX_LINKS: usize = 40;
    // The directories walked so far, for `..`; the names still to walk,
    // last first.
    let mut dirs = vec![tree.root()];
    let mut todo: Vec<Vec<u8>> = components(path);
    let mut links = 0;
    while let Some(name) = todo.pop() {
        match &name[..] {
            b"" | b"." => continue,
            b".." => {
                if dirs.len() > 1 {
                    dirs.pop();
                }
                continue;
            }
            _ => {}
        }
        let ino = tree.lookup(*dirs.last()?, &name)?;
        match tree.link(ino) {
            Some(target) => {
                links += 1;
                if links > MAX_LINKS {
                    return None;
                }
                if target.starts_with(b"/") {
                    dirs.truncate(1);
                }
                todo.extend(components(&target));
            }
            None => dirs.push(ino),
        }
    }
    dirs.last().copied()
}

/// The names of `path`, last first.
fn components(path: &[u8]) -> Vec<Vec<u8>> {
    path.rsplit(|&b| b == b'/').map(<[u8]>::to_vec).collect()
}

/// A minimal x86-64 program that names `needed` (and a loader), with
/// `pad` zero bytes after its headers: a fixture for tests.
#[cfg(test)]
pub(in crate::layer) fn tiny_program(needed: &[&str], pad: usize) -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    let interp = b"/lib64/ld-linux-x86-64.so.2\0";
    let (interp_at, strtab_at) = (64 + 3 * 56, 64 + 3 * 56 + interp.len());
    let mut strtab = vec![0u8];
    let mut names = Vec::new();
    for n in needed {
        names.push(strtab.len() as u64);
        strtab.extend_from_slice(n.as_bytes());
        strtab.push(0);
    }
    let dyn_at = (strtab_at + strtab.len()).next_multiple_of(8);
    let mut dynamic: Vec<(u64, u64)> = names.iter().map(|&n| (DT_NEEDED, n)).collect();
    dynamic.extend([
        (DT_STRTAB, BASE + strtab_at as u64),
        (DT_STRSZ, strtab.len() as u64),
        (DT_NULL, 0),
    ]);
    let len = dyn_at + dynamic.len() * 16 + pad;
    let mut b = vec![0u8; len];
    b[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&3u16.to_le_bytes());
    let phdrs = [
        (PT_LOAD, 0, BASE, len),
        (PT_INTERP, interp_at, BASE + interp_at as u64, interp.len()),
        (PT_DYNAMIC, dyn_at, BASE + dyn_at as u64, dynamic.len() * 16),
    ];
    for (i, (kind, offset, vaddr, size)) in phdrs.into_iter().enumerate() {
        let p = 64 + i * 56;
        b[p..p + 4].copy_from_slice(&kind.to_le_bytes());
        b[p + 8..p + 16].copy_from_slice(&(offset as u64).to_le_bytes());
        b[p + 16..p + 24].copy_from_slice(&vaddr.to_le_bytes());
        b[p + 32..p + 40].copy_from_slice(&(size as u64).to_le_bytes());
    }
    b[interp_at..strtab_at].copy_from_slice(interp);
    b[strtab_at..strtab_at + strtab.len()].copy_from_slice(&strtab);
    for (i, (tag, val)) in dynamic.into_iter().enumerate() {
        let d = dyn_at + i * 16;
        b[d..d + 8].copy_from_slice(&tag.to_le_bytes());
        b[d + 8..d + 16].copy_from_slice(&val.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_names_its_libraries_in_order_and_its_loader() {
        let Examined::Needs(needs) = examine_bytes(&tiny_program(&["libm.so.6", "libc.so.6"], 0))
        else {
            panic!("a dynamically linked program");
        };
        assert_eq!(
            needs.needed,
            vec![b"libm.so.6".to_vec(), b"libc.so.6".to_vec()]
        );
        assert_eq!(
            needs.interp.as_deref(),
            Some(&b"/lib64/ld-linux-x86-64.so.2"[..])
        );
        assert_eq!(needs.machine, 62);
    }

    fn examine_bytes(b: &[u8]) -> Examined {
        let read = |o: u64, n: usize| {
            let o = usize_from(o);
            b.get(o..o + n).map(<[u8]>::to_vec)
        };
        examine(b.len() as u64, &read)
    }

    #[test]
    fn this_test_program_needs_libc() {
        // The test binary is a real dynamically linked program.
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let Examined::Needs(needs) = examine_bytes(&exe) else {
            panic!("the test binary is dynamically linked ELF");
        };
        assert!(needs.needed.iter().any(|n| n == b"libc.so.6"), "{needs:?}");
        let interp = needs.interp.clone().expect("a program has a loader");
        assert!(
            interp.starts_with(b"/lib"),
            "{}",
            String::from_utf8_lossy(&interp)
        );
        let paths = candidates(b"libc.so.6", &needs);
        assert!(paths.iter().any(|p| p.ends_with(b"-linux-gnu/libc.so.6")));
    }

    #[test]
    fn a_dynamic_section_not_cached_yet_is_not_yet() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        // Only the first page "cached".
        let read = |o: u64, n: usize| {
            let o = usize_from(o);
            (o + n <= 4096).then(|| exe[o..o + n].to_vec())
        };
        let Examined::NotYet { interp } = examine(exe.len() as u64, &read) else {
            panic!("the dynamic section is past the first page");
        };
        assert!(interp.is_some_and(|i| i.starts_with(b"/lib")));
    }

    #[test]
    fn other_files_and_garbage_are_not_programs() {
        assert_eq!(examine_bytes(b"#!/bin/sh\necho hi\n"), Examined::NotElf);
        assert_eq!(examine_bytes(b""), Examined::NotElf);
        let mut junk = b"\x7fELF\x02\x01\x01".to_vec();
        junk.resize(64, 0xff);
        assert_eq!(examine_bytes(&junk), Examined::NotElf);
        // A header claiming program headers past the end of the file.
        let mut h = b"\x7fELF\x02\x01\x01".to_vec();
        h.resize(64, 0);
        h[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        h[54..56].copy_from_slice(&56u16.to_le_bytes());
        h[56..58].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(examine_bytes(&h), Examined::NotElf);
    }

    #[test]
    fn paths_resolve_through_links_that_stay_in_the_layer() {
        use crate::format::InodeSpec;
        let node = |kind, parent, children: &[(&str, u64)], target: &str| InodeSpec {
            parent,
            children: children
                .iter()
                .map(|(n, i)| (Box::from(n.as_bytes()), *i))
                .collect(),
            link_target: Box::from(target.as_bytes()),
            ..InodeSpec::new(kind)
        };
        // /lib -> usr/lib; /usr/lib/libz.so.1 -> libz.so.1.2; /usr/lib/loop -> loop;
        // /usr/lib/out -> ../../../etc/libz.so.1.2 (clamped at the root).
        let index = LayerIndex::new(
            vec![
                node(FileKind::Dir, 1, &[("lib", 2), ("usr", 3)], ""),
                node(FileKind::Symlink, 1, &[], "usr/lib"),
                node(FileKind::Dir, 1, &[("lib", 4)], ""),
                node(
                    FileKind::Dir,
                    3,
                    &[
                        ("libz.so.1", 5),
                        ("libz.so.1.2", 6),
                        ("loop", 7),
                        ("out", 8),
                    ],
                    "",
                ),
                node(FileKind::Symlink, 4, &[], "libz.so.1.2"),
                node(FileKind::Reg, 4, &[], ""),
                node(FileKind::Symlink, 4, &[], "loop"),
                node(FileKind::Symlink, 4, &[], "../../../usr/lib/libz.so.1"),
            ],
            Vec::new(),
            0,
            None,
        )
        .unwrap();
        assert_eq!(resolve_file(&index, b"/lib/libz.so.1"), Some(6));
        assert_eq!(resolve_file(&index, b"/usr/lib/out"), Some(6));
        assert_eq!(resolve_file(&index, b"/usr/lib/loop"), None);
        assert_eq!(resolve_file(&index, b"/usr/lib"), None, "a directory");
        assert_eq!(resolve_file(&index, b"/lib/libc.so.6"), None);
        assert_eq!(resolve_dir(&index, b"/lib"), Some(4));
        assert_eq!(resolve_dir(&index, b"/"), Some(1));
    }

    #[test]
    fn names_with_a_slash_are_paths_and_runpaths_come_first() {
        let needs = Needs {
            runpath: vec![b"/opt/app/lib".to_vec(), b"$ORIGIN/../lib".to_vec()],
            machine: 183,
            ..Needs::default()
        };
        assert_eq!(
            candidates(b"/opt/x.so", &needs),
            vec![b"/opt/x.so".to_vec()]
        );
        assert!(candidates(b"sub/x.so", &needs).is_empty());
        let c = candidates(b"liba.so", &needs);
        assert_eq!(c[0], b"/opt/app/lib/liba.so");
        assert_eq!(c[1], b"/lib/aarch64-linux-gnu/liba.so");
        assert!(!c.iter().any(|p| p.starts_with(b"$ORIGIN")));
    }
}
