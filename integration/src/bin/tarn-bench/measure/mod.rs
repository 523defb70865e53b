//! The measurements taken outside the daemon: each returns one JSON value.

pub mod admin;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tarn_fs::format::estargz::{decode_toc, parse_footer};

/// Sums the registry's "response completed" lines after byte offset `from`.
/// The registry writes one JSON object per request; `http.response.written`
/// is the body it sent (206 bodies for ranged GETs included).
pub fn reglog(log: &Path, from: u64) -> Result<Value> {
    let mut file =
        File::open(log).with_context(|| format!("cannot open registry log {}", log.display()))?;
    let end = file
        .metadata()
        .context("cannot stat the registry log")?
        .len();
    file.seek(SeekFrom::Start(from.min(end)))
        .context("cannot seek in the registry log")?;
    let (bytes, requests) = sum_responses(BufReader::new(file.take(end.saturating_sub(from))))?;
    Ok(json!({ "bytes": bytes, "requests": requests, "end": end }))
}

/// (body bytes, requests) of the access-log lines in `reader`; lines that
/// are not JSON (the registry's start-up banner) are skipped.
fn sum_responses(reader: impl BufRead) -> Result<(u64, u64)> {
    let (mut bytes, mut requests) = (0u64, 0u64);
    for line in reader.lines() {
        let line = line.context("cannot read the registry log")?;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let completed = v
            .get("msg")
            .and_then(Value::as_str)
            .is_some_and(|m| m.starts_with("response completed"));
        if completed {
            requests += 1;
            bytes += v
                .get("http.response.written")
                .and_then(Value::as_u64)
                .unwrap_or(0);
        }
    }
    Ok((bytes, requests))
}

/// One sequential pass with 1 MiB reads, as `dd bs=1M` would do.
pub fn read(path: &Path) -> Result<Value> {
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
    Ok(json!({ "bytes": total, "secs": secs, "mb_per_s": total as f64 / 1e6 / secs.max(1e-9) }))
}

/// Depth-first walk with one lstat per entry.
pub fn walk(root: &Path) -> Result<Value> {
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
    Ok(
        json!({ "entries": entries, "secs": secs, "entries_per_s": entries as f64 / secs.max(1e-9) }),
    )
}

pub fn rss(pid: u32) -> Result<Value> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    Ok(
        json!({ "rss_bytes": parse_vm_rss(&status).with_context(|| format!("no VmRSS in {path}"))? }),
    )
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

/// Entries in the TOC of each blob, read from the blob's footer and TOC
/// member only.
pub fn toc_entries(blobs: &[PathBuf]) -> Result<Value> {
    let mut total = 0usize;
    let mut per_blob = Vec::new();
    for blob in blobs {
        let n = count_toc_entries(blob)
            .with_context(|| format!("cannot read the TOC of {}", blob.display()))?;
        total += n;
        per_blob.push(json!({ "blob": blob, "entries": n }));
    }
    Ok(json!({ "toc_entries": total, "blobs": per_blob }))
}

fn count_toc_entries(blob: &Path) -> Result<usize> {
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
    Ok(decode_toc(&toc)?.parse()?.entries.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reglog_counts_only_completed_responses_after_the_mark() {
        let mut log = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(
            log,
            r#"{{"msg":"response completed","http.response.written":100}}"#
        )
        .expect("write");
        let mark = log.as_file().metadata().expect("stat").len();
        writeln!(log, "not json at all").expect("write");
        writeln!(
            log,
            r#"{{"msg":"response completed","http.response.written":7,"http.response.status":206}}"#
        )
        .expect("write");
        writeln!(log, r#"{{"msg":"response completed"}}"#).expect("write");
        writeln!(
            log,
            r#"{{"msg":"authorized request","http.response.written":9999}}"#
        )
        .expect("write");
        let all = reglog(log.path(), 0).expect("reglog");
        assert_eq!(all["bytes"], 107);
        assert_eq!(all["requests"], 3);
        let since = reglog(log.path(), mark).expect("reglog");
        assert_eq!(since["bytes"], 7);
        assert_eq!(since["requests"], 2);
    }

    #[test]
    fn read_and_walk_see_every_byte_and_entry() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        std::fs::write(dir.path().join("a/b/f"), vec![1u8; 3 << 20]).expect("write");
        std::os::unix::fs::symlink("f", dir.path().join("a/b/l")).expect("symlink");
        let r = read(&dir.path().join("a/b/f")).expect("read");
        assert_eq!(r["bytes"], 3 << 20);
        let w = walk(dir.path()).expect("walk");
        // a, a/b, a/b/f, a/b/l: the symlink is counted, not followed.
        assert_eq!(w["entries"], 4);
    }

    #[test]
    fn vm_rss_is_parsed_in_bytes() {
        let status = "Name:\ttarn\nVmPeak:\t  9000 kB\nVmRSS:\t   1234 kB\nThreads:\t4\n";
        assert_eq!(parse_vm_rss(status), Some(1234 * 1024));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert!(
            rss(std::process::id()).expect("own rss")["rss_bytes"]
                .as_u64()
                .expect("number")
                > 0
        );
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
        let blob = dir.path().join("blob");
        let mut out = File::create(&blob).expect("create");
        write_estargz(&tar[..], &mut out, &WriteOptions::default()).expect("write estargz");
        drop(out);
        let v = toc_entries(&[blob]).expect("toc entries");
        assert!(v["toc_entries"].as_u64().expect("number") >= 3, "{v}");
    }
}
