//! The fuzz targets' seed corpus, written into `<dir>/<target>/`: small
//! eStargz layers made by tarn's writer, and their footers, TOC JSON and
//! chunks. `make fuzz` writes it before fuzzing (through the `layer`
//! target, see [`SEEDS_ENV`]), so no binary seed is committed.

use std::error::Error;
use std::fs;
use std::path::Path;

use crate::{chunk_input, open_layer};
use tar::{EntryType, Header};
use tarn_fs::format::estargz::{
    FOOTER_SIZE, LEGACY_FOOTER_SIZE, WriteOptions, decode_toc, footer_bytes, parse_footer,
    write_estargz,
};
use tarn_fs::format::{Estargz, Format};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Set to a directory, the `layer` target writes the seeds there and exits
/// instead of fuzzing. (A binary of its own would not link: cargo-fuzz
/// instruments every binary of the project for libFuzzer, and a second,
/// uninstrumented build of tarn-fs would double `make fuzz`'s build time.)
pub const SEEDS_ENV: &str = "TARN_FUZZ_WRITE_SEEDS";

/// If [`SEEDS_ENV`] is set, writes the seeds and exits the process.
pub fn write_seeds_if_asked() {
    let Some(dir) = std::env::var_os(SEEDS_ENV) else {
        return;
    };
    match write_seeds(Path::new(&dir)) {
        Ok(n) => {
            println!("seeds: wrote {n} seeds under {}", dir.display());
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("seeds: {e}");
            std::process::exit(1);
        }
    }
}

/// Writes the seed corpus under `dir`; returns how many seeds.
pub fn write_seeds(dir: &Path) -> Result<usize> {
    let mut n = 0;
    for (i, (tar, opts)) in layers()?.into_iter().enumerate() {
        let mut blob = Vec::new();
        write_estargz(&tar[..], &mut blob, &opts)?;
        n += seeds_of(dir, i, &blob)?;
    }
    // A legacy (47-byte) footer: a bare 22-byte extra field, no `SG`
    // subfield header.
    let mut legacy = footer_bytes(0x1234).to_vec();
    legacy.drain(12..16);
    legacy[10..12].copy_from_slice(&22u16.to_le_bytes());
    if legacy.len() != LEGACY_FOOTER_SIZE {
        return Err("the legacy footer seed is not 47 bytes".into());
    }
    put(dir, "footer", "legacy", &legacy)?;
    Ok(n + 1)
}

/// Writes the seeds that one blob gives each target; returns how many.
fn seeds_of(dir: &Path, i: usize, blob: &[u8]) -> Result<usize> {
    let len = u64::try_from(blob.len())?;
    let loc = parse_footer(blob, len)?;
    let toc_start = usize::try_from(loc.toc_offset)?;
    let json = decode_toc(&blob[toc_start..blob.len() - FOOTER_SIZE])?;
    let (index, _) = open_layer(blob)?;
    put(dir, "layer", &format!("{i}"), blob)?;
    put(dir, "footer", &format!("{i}"), &blob[toc_start..])?;
    put(dir, "toc", &format!("{i}"), &json.json)?;
    let mut n = 3;
    for inode in index.inodes() {
        for chunk in index.file_chunks(&inode) {
            let r = usize::try_from(chunk.blob_range.0)?..usize::try_from(chunk.blob_range.1)?;
            // Only chunks the decoder accepts: each one a path to success.
            Estargz::default().decode_chunk(chunk, &blob[r.clone()])?;
            put(
                dir,
                "chunk",
                &format!("{i}-{n}"),
                &chunk_input(chunk, &blob[r]),
            )?;
            n += 1;
        }
    }
    Ok(n)
}

fn put(dir: &Path, target: &str, name: &str, bytes: &[u8]) -> Result<()> {
    let d = dir.join(target);
    fs::create_dir_all(&d)?;
    fs::write(d.join(format!("seed-{name}")), bytes)?;
    Ok(())
}

/// Small tars covering every entry kind, chunked files, xattrs, whiteouts
/// and hardlinks, with the writer options that exercise chunking and the
/// prefetch landmark.
fn layers() -> Result<Vec<(Vec<u8>, WriteOptions)>> {
    let small = WriteOptions {
        chunk_size: 512,
        ..WriteOptions::default()
    };
    let prioritized = WriteOptions {
        chunk_size: 1024,
        prioritized: vec!["bin/tool".into()],
        ..WriteOptions::default()
    };
    Ok(vec![
        (everything()?, small),
        (everything()?, prioritized),
        (one_file(b"hello\n")?, WriteOptions::default()),
        (one_file(b"")?, WriteOptions::default()),
    ])
}

fn everything() -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let tool: Vec<u8> = (0..3000u32).flat_map(|i| i.to_le_bytes()).collect();
    let entry = |ty: EntryType, mode: u32, size: usize| -> Result<Header> {
        let mut h = Header::new_gnu();
        h.set_entry_type(ty);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(100);
        h.set_mtime(1_700_000_000);
        h.set_size(u64::try_from(size)?);
        Ok(h)
    };
    let dir = |b: &mut tar::Builder<Vec<u8>>, path: &str| -> Result<()> {
        Ok(b.append_data(&mut entry(EntryType::Directory, 0o755, 0)?, path, &[][..])?)
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]| -> Result<()> {
        Ok(b.append_data(
            &mut entry(EntryType::Regular, mode, data.len())?,
            path,
            data,
        )?)
    };
    dir(&mut b, "etc/")?;
    file(&mut b, "etc/hosts", 0o644, b"127.0.0.1\n")?;
    b.append_pax_extensions([("SCHILY.xattr.user.note", &b"seed"[..])])?;
    file(&mut b, "bin/tool", 0o4755, &tool)?;
    b.append_link(&mut entry(EntryType::Symlink, 0o777, 0)?, "bin/sh", "tool")?;
    b.append_link(
        &mut entry(EntryType::Link, 0o755, 0)?,
        "bin/hard",
        "bin/tool",
    )?;
    file(&mut b, "etc/.wh.gone", 0o644, b"")?;
    dir(&mut b, "var/")?;
    file(&mut b, "var/.wh..wh..opq", 0o644, b"")?;
    b.append_data(&mut entry(EntryType::Fifo, 0o600, 0)?, "run/fifo", &[][..])?;
    let mut dev = entry(EntryType::Char, 0o666, 0)?;
    dev.set_device_major(1)?;
    dev.set_device_minor(3)?;
    b.append_data(&mut dev, "dev/null", &[][..])?;
    Ok(b.into_inner()?)
}

fn one_file(data: &[u8]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(u64::try_from(data.len())?);
    b.append_data(&mut h, "file", data)?;
    Ok(b.into_inner()?)
}
