//! The order of a layer's chunks in the blob: what read-ahead
//! (`hints/ahead.rs`) and background fetch (`background.rs`) walk.

use std::sync::Arc;

use crate::format::Chunk;

/// Indices into a layer's chunks in blob order, one per blob range: the
/// order of read-ahead and background fetch. The chunks of an eStargz TOC
/// are in blob order already, each range once, so for most layers nothing
/// is stored (4 bytes per chunk saved for as long as the layer is mounted).
#[derive(Clone)]
pub(crate) struct BlobOrder {
    /// `None`: the identity over `len` chunks.
    sorted: Option<Arc<[u32]>>,
    len: usize,
}

impl BlobOrder {
    pub(crate) fn new(chunks: &[Chunk]) -> BlobOrder {
        let in_order = chunks
            .windows(2)
            .all(|w| w[0].blob_range.0 < w[1].blob_range.0 && w[0].blob_range <= w[1].blob_range);
        if in_order {
            return BlobOrder {
                sorted: None,
                len: chunks.len(),
            };
        }
        let count = u32::try_from(chunks.len()).expect("the index builder checks chunks fit u32");
        let mut order: Vec<u32> = (0..count).collect();
        order.sort_by_key(|&i| chunks[i as usize].blob_range);
        order.dedup_by_key(|i| chunks[*i as usize].blob_range.0);
        BlobOrder {
            len: order.len(),
            sorted: Some(order.into()),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The chunk index at position `pos` in blob order.
    pub(crate) fn get(&self, pos: usize) -> Option<u32> {
        match &self.sorted {
            _ if pos >= self.len => None,
            Some(order) => Some(order[pos]),
            // `pos < len`, and the index builder checks that fits u32.
            None => u32::try_from(pos).ok(),
        }
    }

    /// Chunk indices from position `from` on, in blob order.
    pub(crate) fn iter_from(&self, from: usize) -> impl DoubleEndedIterator<Item = u32> + '_ {
        (from..self.len).filter_map(|p| self.get(p))
    }

    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = u32> + '_ {
        self.iter_from(0)
    }

    /// The chunks of the blob, `chunks` being the layer's (the list this
    /// order was made from), in blob order, each range once.
    pub(crate) fn chunks<'a>(
        &'a self,
        chunks: &'a [Chunk],
    ) -> impl Iterator<Item = &'a Chunk> + 'a {
        self.iter().map(|i| &chunks[i as usize])
    }

    /// The first position whose chunk index fails `pred` (which must hold
    /// for a prefix of the order), by binary search.
    pub(crate) fn partition_point(&self, mut pred: impl FnMut(u32) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(self.get(mid).expect("mid is below len")) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::chunk_at as chunk;

    #[test]
    fn chunks_in_blob_order_store_nothing_and_others_are_sorted_once_per_range() {
        let ordered = BlobOrder::new(&[chunk(0, 10), chunk(10, 20), chunk(25, 30)]);
        assert!(ordered.sorted.is_none());
        assert_eq!(ordered.iter().collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(ordered.partition_point(|i| i < 2), 2);

        // Out of order, and two chunks sharing one range (a hard link's).
        let mixed = BlobOrder::new(&[chunk(20, 30), chunk(0, 10), chunk(20, 30), chunk(10, 20)]);
        assert_eq!(mixed.iter().collect::<Vec<_>>(), vec![1, 3, 0]);
        assert_eq!(mixed.iter_from(1).rev().collect::<Vec<_>>(), vec![0, 3]);
        assert_eq!(mixed.get(3), None);
    }
}
