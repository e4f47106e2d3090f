//! The flat layout gradients are exchanged in: every gradient tensor, flattened, one after the
//! other in the module's visiting order, in one buffer cut into buckets of at most
//! [`BUCKET_FLOATS`]. The same layout serves every collective: the host ones (TCP, MPI, NCCL
//! staged through the host) reduce the buffer read back from the device, NCCL reduces it where
//! it lies in device memory; either way the gradients are then views of the reduced buffer.

use std::ops::Range;

/// Floats per all-reduce call (25 MB, PyTorch DDP's default bucket size).
pub const BUCKET_FLOATS: usize = (25 << 20) / 4;

/// Where each tensor lies in the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlatLayout {
    /// One range per tensor, in order, back to back from 0.
    pub ranges: Vec<Range<usize>>,
}

impl FlatLayout {
    /// The layout of tensors of these element counts, in this order.
    pub fn new(lens: impl IntoIterator<Item = usize>) -> Self {
        let mut start = 0;
        let ranges = lens
            .into_iter()
            .map(|len| {
                let r = start..start + len;
                start += len;
                r
            })
            .collect();
        FlatLayout { ranges }
    }

    /// Floats in the buffer.
    pub fn len(&self) -> usize {
        self.ranges.last().map_or(0, |r| r.end)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The all-reduce calls over the buffer: [`buckets`] of its length.
    pub fn buckets(&self, bucket: usize) -> Vec<Range<usize>> {
        buckets(self.len(), bucket)
    }
}

/// The all-reduce calls over a buffer of `len` floats: consecutive ranges of at most `bucket`
/// floats covering it exactly. Buckets cut through tensors where they fall (a reduce is
/// elementwise, so a tensor split over two calls is reduced the same).
pub fn buckets(len: usize, bucket: usize) -> Vec<Range<usize>> {
    assert!(bucket > 0, "bucket size 0");
    (0..len.div_ceil(bucket))
        .map(|i| i * bucket..((i + 1) * bucket).min(len))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_lie_back_to_back_in_order() {
        let l = FlatLayout::new([3, 0, 5, 1]);
        assert_eq!(l.ranges, vec![0..3, 3..3, 3..8, 8..9]);
        assert_eq!(l.len(), 9);
        assert!(FlatLayout::new([]).is_empty());
    }

    #[test]
    fn buckets_cover_the_buffer_exactly_and_cut_through_tensors() {
        let l = FlatLayout::new([4, 7, 2]);
        assert_eq!(l.buckets(5), vec![0..5, 5..10, 10..13]);
        assert_eq!(l.buckets(13), vec![0..13]);
        assert_eq!(l.buckets(100), vec![0..13]);
        assert_eq!(FlatLayout::new([]).buckets(5), Vec::<Range<usize>>::new());
        for bucket in 1..20 {
            let b = l.buckets(bucket);
            assert_eq!(b.first().unwrap().start, 0);
            assert_eq!(b.last().unwrap().end, 13);
            assert!(b.windows(2).all(|w| w[0].end == w[1].start));
            assert!(b.iter().all(|r| !r.is_empty() && r.len() <= bucket));
        }
    }

    /// ResNet50's 25.6M gradients take 4 buckets of at most 25 MB.
    #[test]
    fn resnet50_takes_four_ddp_sized_buckets() {
        let l = FlatLayout::new([25_557_032]);
        let b = l.buckets(BUCKET_FLOATS);
        assert_eq!(b.len(), 4);
        assert_eq!(b[0].len(), BUCKET_FLOATS);
    }
}
