//! The stack: an image's layers merged into one virtual disk, as an ordered
//! map from ranges of sectors to where their bytes are (a layer's LSMT
//! sectors, or zeros). Upper layers win; a zeroed extent punches a hole
//! through everything below it; sectors no layer maps read as zeros.
//!
//! Built one layer at a time, bottom first, each a single sweep over the
//! map so far and the layer's sorted extents (no recursion, linear in
//! their sizes), and bounded by [`MAX_SEGMENTS`] and [`MAX_LAYERS`].

use std::ops::Range;

use super::ObdError;
use super::lsmt::{Extent, SECTOR};
use crate::num::usize_from;

/// The most layers a stack may have.
pub const MAX_LAYERS: usize = 256;
/// The most segments a stack's map may have (about 24 bytes each): four
/// layers' worth of the largest index the reference reader accepts.
pub const MAX_SEGMENTS: usize = 4_000_000;

/// Where a segment's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Zeros: a hole punched by a zeroed extent.
    Zero,
    /// Layer `layer` (0 = the bottom), from sector `moffset` of its LSMT
    /// file.
    Layer { layer: u32, moffset: u64 },
}

/// `len` sectors of the disk from sector `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start: u64,
    pub len: u64,
    pub source: Source,
}

impl Segment {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// The part from sector `at` (inside the segment) on.
    fn from(self, at: u64) -> Segment {
        let cut = at - self.start;
        Segment {
            start: at,
            len: self.len - cut,
            source: match self.source {
                Source::Zero => Source::Zero,
                Source::Layer { layer, moffset } => Source::Layer {
                    layer,
                    moffset: moffset + cut,
                },
            },
        }
    }

    /// The part before sector `at` (inside the segment).
    fn until(self, at: u64) -> Segment {
        Segment {
            len: at - self.start,
            ..self
        }
    }
}

/// The stacked disk's map.
#[derive(Clone, Debug, Default)]
pub struct DiskMap {
    virtual_size: u64,
    segments: Vec<Segment>,
}

impl DiskMap {
    /// Stacks layers given bottom first, each as its sorted extents; the
    /// disk has the top layer's `virtual_size` (bytes).
    pub fn stack<'a>(
        layers: impl IntoIterator<Item = &'a [Extent]>,
        virtual_size: u64,
    ) -> Result<DiskMap, ObdError> {
        let mut map = DiskMap {
            virtual_size,
            segments: Vec::new(),
        };
        for (i, extents) in layers.into_iter().enumerate() {
            if i >= MAX_LAYERS {
                return Err(ObdError::Stack(format!("more than {MAX_LAYERS} layers")));
            }
            let layer = u32::try_from(i).map_err(|_| ObdError::Stack("layer number".into()))?;
            map.segments = overlay(std::mem::take(&mut map.segments), extents, layer)?;
        }
        Ok(map)
    }

    /// Size of the disk in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The segments that overlap sectors `sectors`, in order.
    pub fn segments_in(&self, sectors: Range<u64>) -> &[Segment] {
        let from = self.segments.partition_point(|s| s.end() <= sectors.start);
        let to = self.segments.partition_point(|s| s.start < sectors.end);
        &self.segments[from..to.max(from)]
    }

    /// The byte ranges of the disk that some layer holds data for (not
    /// zeros), adjacent ones joined: what must be read to copy the disk.
    pub fn data_ranges(&self) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for s in &self.segments {
            if s.source == Source::Zero {
                continue;
            }
            let r = s.start * SECTOR..s.end() * SECTOR;
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
        out
    }
}

/// `lower` with `upper`'s extents laid over it: one sweep over both.
fn overlay(lower: Vec<Segment>, upper: &[Extent], layer: u32) -> Result<Vec<Segment>, ObdError> {
    let mut out = Vec::with_capacity(lower.len() + upper.len());
    let mut below = lower.into_iter();
    let mut pending = below.next();
    let push = |out: &mut Vec<Segment>, s: Segment| {
        if out.len() >= MAX_SEGMENTS {
            return Err(ObdError::Stack(format!(
                "the merged map needs more than {MAX_SEGMENTS} segments"
            )));
        }
        out.push(s);
        Ok(())
    };
    for e in upper {
        // What lies below before this extent stays.
        while let Some(s) = pending {
            if s.end() <= e.offset {
                push(&mut out, s)?;
                pending = below.next();
            } else {
                if s.start < e.offset {
                    push(&mut out, s.until(e.offset))?;
                    pending = Some(s.from(e.offset));
                }
                break;
            }
        }
        push(
            &mut out,
            Segment {
                start: e.offset,
                len: u64::from(e.length),
                source: if e.zeroed {
                    Source::Zero
                } else {
                    Source::Layer {
                        layer,
                        moffset: e.moffset,
                    }
                },
            },
        )?;
        // What lies below under this extent goes.
        while let Some(s) = pending {
            if s.end() <= e.end() {
                pending = below.next();
            } else {
                if s.start < e.end() {
                    pending = Some(s.from(e.end()));
                }
                break;
            }
        }
    }
    if let Some(s) = pending {
        push(&mut out, s)?;
    }
    for s in below {
        push(&mut out, s)?;
    }
    Ok(out)
}

/// Sectors `bytes` covers (rounded out to whole sectors).
pub fn sectors_of(bytes: &Range<u64>) -> Range<u64> {
    bytes.start / SECTOR..bytes.end.div_ceil(SECTOR)
}

/// Index of a layer as a `usize`.
pub fn layer_index(layer: u32) -> usize {
    usize_from(u64::from(layer))
}
