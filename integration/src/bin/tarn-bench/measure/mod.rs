//! The measurements taken outside the daemon: each returns [`Facts`], the
//! `NAME=VALUE` words `scripts/bench.sh` hands on to `tarn-bench note`.

pub mod admin;
pub mod gaps;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tarn_fs::Digest;
use tarn_fs::format::estargz::{TocJson, decode_toc, parse_footer};
use tarn_integration::reglog::{self, Traffic};

use crate::runs::{Facts, median};

/// Runs `pass` `passes` times (at least once) and keeps the facts of the
/// pass of median time: a pass over cached data takes a fraction of a
/// second, and one pass alone moved S4's ratio by 0.05-0.1 between runs.
pub fn median_pass(passes: usize, mut pass: impl FnMut() -> Result<Facts>) -> Result<Facts> {
    let mut runs = Vec::new();
    for _ in 0..passes.max(1) {
        runs.push(pass()?.0);
    }
    let mut m = median(runs).context("no pass ran")?;
    for spread in ["runs", "secs_min", "secs_max"] {
        m.remove(spread);
    }
    Ok(Facts(m))
}

/// The registry's traffic between two marks of its log.
#[allow(clippy::cast_precision_loss)]
pub fn traffic(log: &Path, from: u64, to: u64) -> Result<Facts> {
    let requests = reglog::read_between(log, from, to)
        .with_context(|| format!("cannot read registry log {}", log.display()))?;
    let t = Traffic::of(&requests);
    Ok(Facts::new([
        ("bytes", t.bytes as f64),
        ("requests", t.requests as f64),
    ]))
}

/// `pass`, after writing back dirty pages and emptying the kernel's page,
/// dentry and inode caches when `drop`: the pass then reads from what the
/// snapshotter itself keeps, and `page_cache_mb` says how much page cache
/// it took (a block cached twice, under a FUSE file and under ext4 over
/// it, counts twice; so do the daemon's reads of its own cache files).
#[allow(clippy::cast_precision_loss)]
pub fn pass_cold(drop: bool, pass: impl FnOnce() -> Result<Facts>) -> Result<Facts> {
    if !drop {
        return pass();
    }
    nix::unistd::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3")
        .context("cannot drop the kernel's caches (/proc/sys/vm/drop_caches; root only)")?;
    let before = page_cache_kib()?;
    let mut facts = pass()?;
    let grew = page_cache_kib()?.saturating_sub(before);
    facts.push("page_cache_mb", grew as f64 / 1024.0);
    Ok(facts)
}

/// `Cached` of /proc/meminfo, KiB.
fn page_cache_kib() -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("Cached:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no Cached line in /proc/meminfo")
}

/// One sequential pass with 1 MiB reads, as `dd bs=1M` would do.
#[allow(clippy::cast_precision_loss)]
pub fn read(path: &Path) -> Result<Facts> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let start = Instant::now();
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Facts::new([
        ("bytes", total as f64),
        ("secs", secs),
        ("mb_per_s", total as f64 / 1e6 / secs.max(1e-9)),
    ]))
}

/// Depth-first walk with one lstat per entry.
#[allow(clippy::cast_precision_loss)]
pub fn walk(root: &Path) -> Result<Facts> {
    let start = Instant::now();
    let mut stack: Vec<PathBuf> = vec![root.to_owned()];
    let mut entries = 0u64;
    while let Some(dir) = stack.pop() {
        let listing =
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
        for entry in listing {
            let path = entry
                .with_context(|| format!("cannot list {}", dir.display()))?
                .path();
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("cannot stat {}", path.display()))?;
            entries += 1;
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Facts::new([
        ("entries", entries as f64),
        ("secs", secs),
        ("entries_per_s", entries as f64 / secs.max(1e-9)),
    ]))
}

#[allow(clippy::cast_precision_loss)]
pub fn rss(pid: u32) -> Result<Facts> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let rss = parse_vm_rss(&status).with_context(|| format!("no VmRSS in {path}"))?;
    Ok(Facts::new([("rss_bytes", rss as f64)]))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Entries in the TOCs of the layers the daemon serves lazily, their
/// blobs found in the OCI layouts given; fails when none is found.
#[allow(clippy::cast_precision_loss)]
pub fn toc_entries(digests: &[String], layouts: &[PathBuf]) -> Result<Facts> {
    let blobs: Vec<PathBuf> = digests
        .iter()
        .filter_map(|d| {
            let hex = d.strip_prefix("sha256:")?;
            layouts
                .iter()
                .map(|l| l.join("blobs/sha256").join(hex))
                .find(|b| b.is_file())
        })
        .collect();
    if blobs.is_empty() {
        bail!("no lazily mounted layers");
    }
    let mut total = 0usize;
    for blob in &blobs {
        total += count_toc_entries(blob)
            .with_context(|| format!("cannot read the TOC of {}", blob.display()))?;
    }
    Ok(Facts::new([
        ("toc_entries", total as f64),
        ("layers", blobs.len() as f64),
    ]))
}

/// The bytes of an OCI layout's layer blobs (of its first manifest): what a
/// full fetch of the image moves.
#[allow(clippy::cast_precision_loss)]
pub fn layout_bytes(layout: &Path) -> Result<Facts> {
    let total: u64 = layers(layout)?.iter().map(|(_, size)| size).sum();
    Ok(Facts::new([("bytes", total as f64)]))
}

/// The layer blobs of an OCI layout's first manifest, with their sizes.
fn layers(layout: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let json = |p: &Path| -> Result<Value> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("bad JSON in {}", p.display()))
    };
    let blob = |digest: &str| -> Result<PathBuf> {
        let hex = digest
            .strip_prefix("sha256:")
            .with_context(|| format!("{digest} is not a sha256 digest"))?;
        Ok(layout.join("blobs/sha256").join(hex))
    };
    let index = json(&layout.join("index.json"))?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json names no manifest")?;
    let manifest = json(&blob(digest)?)?;
    let layers = manifest["layers"]
        .as_array()
        .context("manifest has no layers")?;
    layers
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().context("layer without digest")?;
            Ok((
                blob(digest)?,
                l["size"].as_u64().context("layer without size")?,
            ))
        })
        .collect()
}

fn count_toc_entries(blob: &Path) -> Result<usize> {
    Ok(read_toc(blob)?.parse()?.entries.len())
}

/// The TOC of an eStargz blob on disk, unpacked.
fn read_toc(blob: &Path) -> Result<TocJson> {
    let mut file = File::open(blob)?;
    let size = file.metadata()?.len();
    let tail_len = size.min(64 << 10);
    file.seek(SeekFrom::Start(size - tail_len))?;
    let mut tail = vec![0u8; usize::try_from(tail_len).context("tail length fits in memory")?];
    file.read_exact(&mut tail)?;
    let loc = parse_footer(&tail, size)?;
    if loc.toc_range.end > size || loc.toc_range.start > loc.toc_range.end {
        bail!(
            "toc range {:?} outside a blob of {size} bytes",
            loc.toc_range
        );
    }
    let toc_len =
        usize::try_from(loc.toc_range.end - loc.toc_range.start).context("toc fits in memory")?;
    let mut toc = vec![0u8; toc_len];
    file.seek(SeekFrom::Start(loc.toc_range.start))?;
    file.read_exact(&mut toc)?;
    Ok(decode_toc(&toc)?)
}

/// What the layers of some images list (eStargz TOCs): every chunk once
/// per digest with its plain length, and every file's chunks by the
/// file's digest (the key of its whole-file object).
#[derive(Debug, Default)]
struct Contents {
    chunks: BTreeMap<Digest, u64>,
    files: BTreeMap<Digest, Vec<Digest>>,
}

fn contents_of(layouts: &[PathBuf]) -> Result<Contents> {
    let mut out = Contents::default();
    for layout in layouts {
        for (blob, _) in layers(layout)? {
            let toc = read_toc(&blob)
                .with_context(|| format!("cannot read the TOC of {}", blob.display()))?;
            let digest = |s: &str| -> Result<Digest> {
                s.parse()
                    .with_context(|| format!("bad digest {s:?} in {}", blob.display()))
            };
            // A `chunk` entry has neither a size nor a digest of its own
            // file: those are the `reg` entry's before it.
            let (mut file_size, mut file) = (0u64, None);
            for e in &toc.parse()?.entries {
                if e.kind == "reg" {
                    file_size = e.size;
                    file = (!e.digest.is_empty())
                        .then(|| digest(&e.digest[..]))
                        .transpose()?;
                }
                if (e.kind != "reg" && e.kind != "chunk") || e.chunk_digest.is_empty() {
                    continue;
                }
                let len = if e.chunk_size > 0 {
                    e.chunk_size
                } else {
                    file_size.saturating_sub(e.chunk_offset)
                };
                let chunk = digest(&e.chunk_digest[..])?;
                out.chunks.insert(chunk, len);
                if let Some(f) = file {
                    out.files.entry(f).or_default().push(chunk);
                }
            }
        }
    }
    Ok(out)
}

/// The cache directory `cache` (a daemon's, in use) against the contents
/// of the images in `layouts`: `cache_disk_bytes` (blocks of every file
/// under it), `unique_bytes` (plain bytes of the distinct chunks of those
/// images it holds, as chunks or inside whole-file objects: what it must
/// store), `whole_file_bytes` (the whole-file objects of files of more
/// than one chunk, assembled for passthrough) and `other_bytes` (items that
/// are neither).
#[allow(clippy::cast_precision_loss)]
pub fn cache_figures(cache: &Path, layouts: &[PathBuf]) -> Result<Facts> {
    let contents = contents_of(layouts)?;
    let listing = tarn_fs::cache::list(cache)
        .with_context(|| format!("cannot list the cache {}", cache.display()))?;
    let mut held = BTreeSet::new();
    let (mut whole, mut other) = (0u64, 0u64);
    for (digest, len) in &listing.items {
        if contents.chunks.contains_key(digest) {
            held.insert(*digest);
        } else if let Some(chunks) = contents.files.get(digest) {
            whole += len;
            held.extend(chunks.iter().copied());
        } else {
            other += len;
        }
    }
    let unique: u64 = held.iter().filter_map(|d| contents.chunks.get(d)).sum();
    Ok(Facts::new([
        ("cache_disk_bytes", listing.disk_bytes as f64),
        ("unique_bytes", unique as f64),
        ("whole_file_bytes", whole as f64),
        ("other_bytes", other as f64),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_pass_is_kept_without_the_spread() {
        let mut secs = [3.0, 1.0, 2.0].into_iter();
        let f = median_pass(3, || {
            let s = secs.next().expect("three passes");
            Ok(Facts::new([("secs", s), ("bytes", s * 100.0)]))
        })
        .expect("median");
        assert_eq!(f, Facts::new([("secs", 2.0), ("bytes", 200.0)]));
    }

    #[test]
    fn layout_bytes_sums_the_layers_of_the_manifest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("mkdir");
        std::fs::write(
            dir.path().join("index.json"),
            r#"{"manifests":[{"digest":"sha256:ab"}]}"#,
        )
        .expect("write");
        std::fs::write(
            blobs.join("ab"),
            r#"{"config":{"size":7},"layers":[{"digest":"sha256:01","size":100},{"digest":"sha256:02","size":23}]}"#,
        )
        .expect("write");
        let f = layout_bytes(dir.path()).expect("layout bytes");
        assert_eq!(f, Facts::new([("bytes", 123.0)]));
    }

    #[test]
    fn read_and_walk_see_every_byte_and_entry() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        std::fs::write(dir.path().join("a/b/f"), vec![1u8; 3 << 20]).expect("write");
        std::os::unix::fs::symlink("f", dir.path().join("a/b/l")).expect("symlink");
        let r = read(&dir.path().join("a/b/f")).expect("read");
        assert_eq!(r.0["bytes"], f64::from(3 << 20));
        let w = walk(dir.path()).expect("walk");
        // a, a/b, a/b/f, a/b/l: the symlink is counted, not followed.
        assert_eq!(w.0["entries"], 4.0);
    }

    #[test]
    fn vm_rss_is_parsed_in_bytes() {
        let status = "Name:\ttarn\nVmPeak:\t  9000 kB\nVmRSS:\t   1234 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert!(rss(std::process::id()).expect("own rss").0["rss_bytes"] > 0.0);
    }

    /// An OCI layout at `dir` of one eStargz layer written from `files`
    /// (name, content) in chunks of `chunk_size`.
    fn estargz_layout(dir: &Path, files: &[(&str, &[u8])], chunk_size: u64) {
        use tarn_fs::format::estargz::{WriteOptions, write_estargz};
        let mut tar = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, *data).expect("append");
        }
        let tar = tar.into_inner().expect("tar");
        let mut blob = Vec::new();
        let opts = WriteOptions {
            chunk_size,
            ..WriteOptions::default()
        };
        write_estargz(&tar[..], &mut blob, &opts).expect("write estargz");
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("mkdir");
        let layer = Digest::of(&blob);
        std::fs::write(blobs.join(layer.hex()), &blob).expect("write");
        let manifest = format!(
            r#"{{"layers":[{{"digest":"{layer}","size":{}}}]}}"#,
            blob.len()
        );
        let m = Digest::of(manifest.as_bytes());
        std::fs::write(blobs.join(m.hex()), &manifest).expect("write");
        std::fs::write(
            dir.join("index.json"),
            format!(r#"{{"manifests":[{{"digest":"{m}"}}]}}"#),
        )
        .expect("write");
    }

    #[test]
    #[allow(clippy::cast_precision_loss)]
    fn cache_figures_count_each_chunk_once_alone_or_in_its_whole_file() {
        use tarn_fs::cache::Cache;
        let dir = tempfile::tempdir().expect("temp dir");
        let big: Vec<u8> = (0..300_000u32)
            .map(|i| u8::try_from(i % 251).expect("below 251"))
            .collect();
        let small = b"small file".to_vec();
        let layout = dir.path().join("layout");
        estargz_layout(&layout, &[("big", &big), ("small", &small)], 128 << 10);
        let cache_dir = dir.path().join("cache");
        let cache = Cache::open(&cache_dir).expect("open");
        let parts: Vec<(Digest, u64)> = big
            .chunks(128 << 10)
            .chain([&small[..]])
            .map(|c| {
                cache.insert(&Digest::of(c), c).expect("insert");
                (Digest::of(c), c.len() as u64)
            })
            .collect();
        let unique = (big.len() + small.len()) as f64;
        let f = cache_figures(&cache_dir, std::slice::from_ref(&layout)).expect("figures");
        assert_eq!(f.0["unique_bytes"], unique, "{f}");
        assert_eq!(f.0["whole_file_bytes"], 0.0, "{f}");
        // The big file's whole-file object: its chunks are counted once.
        let whole = cache
            .assemble(&Digest::of(&big), &parts[..3])
            .expect("assemble");
        assert_eq!(whole, tarn_fs::cache::Assembled::Done);
        let f = cache_figures(&cache_dir, &[layout]).expect("figures");
        assert_eq!(f.0["unique_bytes"], unique, "{f}");
        assert_eq!(f.0["whole_file_bytes"], big.len() as f64, "{f}");
        assert_eq!(f.0["other_bytes"], 0.0, "{f}");
        assert!(f.0["cache_disk_bytes"] >= unique, "{f}");
    }

    #[test]
    fn toc_entries_of_a_written_estargz() {
        use tarn_fs::format::estargz::{WriteOptions, write_estargz};
        let mut tar = tar::Builder::new(Vec::new());
        for name in ["x", "y", "z"] {
            let mut h = tar::Header::new_gnu();
            h.set_size(5);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, &b"hello"[..])
                .expect("append");
        }
        let tar = tar.into_inner().expect("tar");
        let dir = tempfile::tempdir().expect("temp dir");
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).expect("mkdir");
        let mut out = File::create(blobs.join("ab")).expect("create");
        write_estargz(&tar[..], &mut out, &WriteOptions::default()).expect("write estargz");
        drop(out);
        let layouts = [dir.path().join("elsewhere"), dir.path().to_owned()];
        let digests = ["sha256:cd".to_owned(), "sha256:ab".to_owned()];
        let f = toc_entries(&digests, &layouts).expect("toc entries");
        assert!(f.0["toc_entries"] >= 3.0, "{f}");
        assert_eq!(f.0["layers"], 1.0);
        assert!(
            toc_entries(&digests[..1], &layouts).is_err(),
            "no layer found"
        );
    }
}
