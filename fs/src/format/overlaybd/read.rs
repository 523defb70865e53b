//! Reading the stacked disk from its layers' blobs: [`StackedDisk`] holds
//! each layer's [`Layer`] and [`BlobSource`] and the merged [`DiskMap`],
//! and returns the bytes of any virtual range, reading only the blob
//! ranges (whole ZFile blocks) that hold them and checking each block.
//!
//! No cache and no merging of reads: this is the reference path for tests
//! and tools; the fetch engine serves the same map lazily (see
//! docs/architecture.md).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use super::ObdError;
use super::lsmt::SECTOR;
use super::open::{Layer, MAX_OPEN_STEPS, OpenStep, open_step};
use super::stack::{DiskMap, Source, layer_index, sectors_of};
use crate::Intent;
use crate::format::Piece;
use crate::num::usize_from;
use crate::registry::BlobSource;

/// The most bytes one [`StackedDisk::read`] returns.
pub const MAX_READ: u64 = 16 << 20;

/// Opens the layer in `blob` by the steps of [`open_step`], one ranged read
/// each.
pub async fn open_layer(blob: &dyn BlobSource) -> Result<Layer, ObdError> {
    let size = blob.size();
    let mut fetched = Vec::new();
    for _ in 0..=MAX_OPEN_STEPS {
        match open_step(&fetched, size)? {
            OpenStep::Ready(layer) => return Ok(layer),
            OpenStep::Fetch(range) => {
                let bytes = read_exact(blob, range.clone(), Intent::Open).await?;
                fetched.push(Piece {
                    offset: range.start,
                    bytes,
                });
            }
        }
    }
    Err(ObdError::TooManySteps(MAX_OPEN_STEPS))
}

/// An image's layers stacked into one disk, readable by byte range.
pub struct StackedDisk {
    layers: Vec<(Layer, Arc<dyn BlobSource>)>,
    map: DiskMap,
}

impl StackedDisk {
    /// Opens each blob (bottom layer first) and stacks them.
    pub async fn open(blobs: Vec<Arc<dyn BlobSource>>) -> Result<StackedDisk, ObdError> {
        let mut layers = Vec::with_capacity(blobs.len());
        for blob in blobs {
            let layer = open_layer(blob.as_ref()).await?;
            layers.push((layer, blob));
        }
        StackedDisk::new(layers)
    }

    /// Stacks opened layers, bottom first; the disk has the top layer's
    /// size.
    pub fn new(layers: Vec<(Layer, Arc<dyn BlobSource>)>) -> Result<StackedDisk, ObdError> {
        let size = layers
            .last()
            .map(|(l, _)| l.virtual_size)
            .ok_or_else(|| ObdError::Stack("no layers".into()))?;
        let map = DiskMap::stack(layers.iter().map(|(l, _)| &l.extents[..]), size)?;
        Ok(StackedDisk { layers, map })
    }

    pub fn map(&self) -> &DiskMap {
        &self.map
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.map.virtual_size()
    }

    /// The bytes of `range` of the disk (at most [`MAX_READ`] of them).
    pub async fn read(&self, range: Range<u64>) -> Result<Vec<u8>, ObdError> {
        let size = self.size();
        if range.start > range.end || range.end > size || range.end - range.start > MAX_READ {
            return Err(ObdError::OutOfDisk { range, size });
        }
        let mut out = vec![0u8; usize_from(range.end - range.start)];
        for seg in self.map.segments_in(sectors_of(&range)) {
            let Source::Layer { layer, moffset } = seg.source else {
                continue;
            };
            // The part of the segment inside the read, in disk bytes.
            let from = range.start.max(seg.start * SECTOR);
            let to = range.end.min(seg.end() * SECTOR);
            let raw_start = moffset * SECTOR + (from - seg.start * SECTOR);
            let raw = raw_start..raw_start + (to - from);
            let (layer, blob) = self
                .layers
                .get(layer_index(layer))
                .ok_or_else(|| ObdError::Stack(format!("no layer {layer}")))?;
            let (blob_range, plain_start) = layer.blob_range_for(raw.clone());
            let fetched = read_exact(blob.as_ref(), blob_range, Intent::OnDemand).await?;
            let plain = layer.decode(raw.clone(), &fetched)?;
            let skip = usize_from(raw.start - plain_start);
            let len = usize_from(raw.end - raw.start);
            let src = plain.get(skip..skip + len).ok_or_else(|| {
                ObdError::Stack(format!(
                    "layer {layer:?} short of LSMT bytes {}..{}",
                    raw.start, raw.end
                ))
            })?;
            let at = usize_from(from - range.start);
            out[at..at + len].copy_from_slice(src);
        }
        Ok(out)
    }
}

/// Exactly `range` of `blob`.
async fn read_exact(
    blob: &dyn BlobSource,
    range: Range<u64>,
    intent: Intent,
) -> Result<Bytes, ObdError> {
    let bytes = blob.read_range(range.clone(), intent).await?;
    if bytes.len() as u64 != range.end - range.start {
        return Err(ObdError::Fetched {
            got: range.start..range.start + bytes.len() as u64,
            want: range,
        });
    }
    Ok(bytes)
}
