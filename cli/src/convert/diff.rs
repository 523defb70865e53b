//! A layer's blocks: the 4 KiB blocks of the disk that differ from the
//! disk before the layer, as extents of an LSMT file. Only the data
//! regions of either disk are read (the rest is holes on both); a block
//! that became zeros is a zeroed extent (a hole through the layers below),
//! a changed one a data extent; runs of either merge up to the longest
//! extent a record holds.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result};
use tarn_fs::format::overlaybd::SECTOR;
use tarn_fs::format::overlaybd::write::{LsmtWriter, MAX_EXTENT_SECTORS};

use super::disk::{data_regions, union};

/// The unit compared: ext4's block.
pub const BLOCK: u64 = 4096;
/// Blocks read at a time from each disk.
const BATCH: u64 = 256;
/// The most blocks one extent covers.
const RUN_BLOCKS: u64 = MAX_EXTENT_SECTORS * SECTOR / BLOCK;
const ZEROS: [u8; 4096] = [0u8; 4096];

/// What a diff wrote.
#[derive(Debug, Default)]
pub struct Diffed {
    /// Blocks written as data.
    pub changed: u64,
    /// Blocks zeroed.
    pub zeroed: u64,
}

/// The run being gathered: data blocks, or zeroed ones, from a block.
enum Run {
    None,
    Data { start: u64, bytes: Vec<u8> },
    Zero { start: u64, blocks: u64 },
}

/// Writes to `out` the blocks of `cur` that differ from `prev` (`None`:
/// the disk before is all zeros); both disks are `size` bytes.
pub fn diff<W: Write>(
    prev: Option<&Path>,
    cur: &Path,
    size: u64,
    out: &mut LsmtWriter<W>,
) -> Result<Diffed> {
    let cur_f = File::open(cur).with_context(|| format!("cannot open {}", cur.display()))?;
    let prev_f = match prev {
        Some(p) => Some(File::open(p).with_context(|| format!("cannot open {}", p.display()))?),
        None => None,
    };
    let mut regions = data_regions(&cur_f, size)?;
    if let Some(p) = &prev_f {
        regions = union(&regions, &data_regions(p, size)?, BLOCK);
    } else {
        regions = union(&regions, &[], BLOCK);
    }
    let mut done = Diffed::default();
    let mut run = Run::None;
    let batch = tarn_fs::num::usize_from(BATCH * BLOCK);
    let mut a = vec![0u8; batch];
    let mut b = vec![0u8; batch];
    for r in regions {
        let r = r.start..r.end.min(size);
        let mut at = r.start;
        while at < r.end {
            let n = tarn_fs::num::usize_from((r.end - at).min(BATCH * BLOCK));
            cur_f.read_exact_at(&mut a[..n], at)?;
            match &prev_f {
                Some(p) => p.read_exact_at(&mut b[..n], at)?,
                None => b[..n].fill(0),
            }
            for (i, (new, old)) in a[..n].chunks(4096).zip(b[..n].chunks(4096)).enumerate() {
                let block = at / BLOCK + i as u64;
                if new == old {
                    flush(&mut run, out)?;
                } else if new == &ZEROS[..new.len()] {
                    done.zeroed += 1;
                    push_zero(&mut run, block, out)?;
                } else {
                    done.changed += 1;
                    push_data(&mut run, block, new, out)?;
                }
            }
            at += n as u64;
        }
        flush(&mut run, out)?;
    }
    flush(&mut run, out)?;
    Ok(done)
}

fn push_data<W: Write>(
    run: &mut Run,
    block: u64,
    data: &[u8],
    out: &mut LsmtWriter<W>,
) -> Result<()> {
    if let Run::Data { start, bytes } = run
        && *start + bytes.len() as u64 / BLOCK == block
        && (bytes.len() as u64 / BLOCK) < RUN_BLOCKS
    {
        bytes.extend_from_slice(data);
        return Ok(());
    }
    flush(run, out)?;
    *run = Run::Data {
        start: block,
        bytes: data.to_vec(),
    };
    Ok(())
}

fn push_zero<W: Write>(run: &mut Run, block: u64, out: &mut LsmtWriter<W>) -> Result<()> {
    if let Run::Zero { start, blocks } = run
        && *start + *blocks == block
        && *blocks < RUN_BLOCKS
    {
        *blocks += 1;
        return Ok(());
    }
    flush(run, out)?;
    *run = Run::Zero {
        start: block,
        blocks: 1,
    };
    Ok(())
}

fn flush<W: Write>(run: &mut Run, out: &mut LsmtWriter<W>) -> Result<()> {
    let sectors_per_block = BLOCK / SECTOR;
    match std::mem::replace(run, Run::None) {
        Run::None => {}
        Run::Data { start, bytes } => out.put(start * sectors_per_block, &bytes)?,
        Run::Zero { start, blocks } => {
            out.zero(start * sectors_per_block, blocks * sectors_per_block)?
        }
    }
    Ok(())
}
