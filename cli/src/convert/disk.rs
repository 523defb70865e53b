//! The virtual disk a conversion builds: a sparse file holding an ext4
//! filesystem (`mkfs.ext4`), attached to a loop device and mounted while a
//! layer is applied ([`Mounted`], torn down on drop, failure included),
//! and read back by its data regions (`SEEK_DATA`/`SEEK_HOLE`) to find
//! what a layer changed.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use nix::unistd::{Whence, lseek};

/// Runs a command; its stderr in the error when it fails.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Makes `path` a sparse file of `size` bytes with a fresh ext4 in it: no
/// journal (every layer is written once, offline, and mounted read-only
/// with `noload` when served), inode tables left for the kernel to
/// initialise (never, since mounts here say `noinit_itable`): only the
/// metadata mkfs writes becomes the base layer's blocks.
pub fn mkfs(path: &Path, size: u64) -> Result<()> {
    let f = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.set_len(size)
        .with_context(|| format!("cannot size {}", path.display()))?;
    drop(f);
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-O",
            "^has_journal",
            "-E",
            "lazy_itable_init=1,nodiscard",
            "-m",
            "0",
        ])
        .arg(path))?;
    Ok(())
}

/// A disk file attached to a loop device and mounted read-write; unmounted
/// and detached on drop.
pub struct Mounted {
    device: Option<String>,
    dir: Option<PathBuf>,
}

impl Mounted {
    /// Attaches `disk` and mounts it at `dir` (which must exist).
    pub fn new(disk: &Path, dir: &Path) -> Result<Mounted> {
        let device = run(Command::new("losetup").args(["--find", "--show"]).arg(disk)).context(
            "cannot attach the disk to a loop device (root and free loop devices are needed)",
        )?;
        let mut m = Mounted {
            device: Some(device),
            dir: None,
        };
        let dev = m.device.clone().unwrap_or_default();
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "noinit_itable", dev.as_str()])
            .arg(dir))
        .context("cannot mount the disk")?;
        m.dir = Some(dir.to_path_buf());
        Ok(m)
    }

    /// Unmounts and detaches now, reporting failure (drop only logs it).
    pub fn close(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if let Some(dir) = self.dir.take() {
            run(Command::new("umount").arg(&dir))?;
        }
        if let Some(dev) = self.device.take() {
            run(Command::new("losetup").args(["-d", &dev]))?;
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            // Last resort: a lazy unmount leaves no mount point busy.
            if let Some(dir) = self.dir.take() {
                let _ = Command::new("umount").arg("-l").arg(&dir).status();
            }
            if let Some(dev) = self.device.take() {
                let _ = Command::new("losetup").args(["-d", &dev]).status();
            }
            tracing::warn!("tearing the conversion's disk down: {e:#}");
        }
    }
}

/// The data regions of `f` (`size` bytes): what is not a hole.
pub fn data_regions(f: &File, size: u64) -> Result<Vec<Range<u64>>> {
    let mut out = Vec::new();
    let mut at = 0u64;
    let end = i64::try_from(size).context("disk too large")?;
    while let Ok(pos) = i64::try_from(at) {
        if pos >= end {
            break;
        }
        let start = match lseek(f.as_fd(), pos, Whence::SeekData) {
            Ok(s) => s,
            // ENXIO: no data after `pos`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e).context("SEEK_DATA"),
        };
        let stop = lseek(f.as_fd(), start, Whence::SeekHole).context("SEEK_HOLE")?;
        let (Ok(s), Ok(e)) = (u64::try_from(start), u64::try_from(stop)) else {
            bail!("negative offset from lseek");
        };
        out.push(s..e.min(size));
        at = e;
    }
    Ok(out)
}

/// The union of two sorted lists of ranges, sorted, merged, and widened to
/// whole `block`s.
pub fn union(a: &[Range<u64>], b: &[Range<u64>], block: u64) -> Vec<Range<u64>> {
    let mut all: Vec<Range<u64>> = a
        .iter()
        .chain(b)
        .map(|r| r.start / block * block..r.end.div_ceil(block) * block)
        .collect();
    all.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Copies sparse file `from` to `to` region by region (holes stay holes).
pub fn copy_sparse(from: &Path, to: &Path, size: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let src = File::open(from).with_context(|| format!("cannot open {}", from.display()))?;
    let dst = File::create(to).with_context(|| format!("cannot create {}", to.display()))?;
    dst.set_len(size)?;
    let mut buf = vec![0u8; 1 << 20];
    for r in data_regions(&src, size)? {
        let mut at = r.start;
        while at < r.end {
            let n = usize::try_from(r.end - at)
                .unwrap_or(buf.len())
                .min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
    }
    dst.sync_all()?;
    Ok(())
}
