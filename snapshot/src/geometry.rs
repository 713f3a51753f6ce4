//! How a volume of `size` bytes splits into chunks: the one place that
//! derives chunk counts, chunk ranges and the short last chunk, so the chunk
//! map, a restored volume's base, a snapshot's freeze and its manifest all
//! agree on them.

use std::fmt;
use std::ops::{Range, RangeInclusive};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GeometryError {
    #[error("chunk size {0} is not a power of two")]
    NotPowerOfTwo(u64),
}

/// A volume size and a power-of-two chunk size.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkGeometry {
    size: u64,
    shift: u32,
}

impl ChunkGeometry {
    /// Any power-of-two chunk size is accepted here; the range a volume may
    /// use is the daemon's rule, checked where volumes are created.
    pub fn new(size: u64, chunk_size: u64) -> Result<Self, GeometryError> {
        if !chunk_size.is_power_of_two() {
            return Err(GeometryError::NotPowerOfTwo(chunk_size));
        }
        Ok(ChunkGeometry {
            size,
            shift: chunk_size.trailing_zeros(),
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_size(&self) -> u64 {
        1 << self.shift
    }

    pub fn shift(&self) -> u32 {
        self.shift
    }

    /// Chunks covering the volume; the last one may be short.
    pub fn count(&self) -> u64 {
        // No overflow: shifting right first, then adding one for a remainder.
        (self.size >> self.shift) + u64::from(self.size & (self.chunk_size() - 1) != 0)
    }

    pub fn contains(&self, chunk: u64) -> bool {
        chunk < self.count()
    }

    /// First byte of chunk `chunk` (past the end for chunks past the end).
    pub fn offset(&self, chunk: u64) -> u64 {
        chunk.saturating_mul(self.chunk_size())
    }

    /// Bytes of chunk `chunk`: the chunk size, less for the last one, zero
    /// past the end.
    pub fn len(&self, chunk: u64) -> u64 {
        self.chunk_size()
            .min(self.size.saturating_sub(self.offset(chunk)))
    }

    /// The byte range of chunk `chunk`, clipped to the volume.
    pub fn range(&self, chunk: u64) -> Range<u64> {
        let start = self.offset(chunk).min(self.size);
        start..start + self.len(chunk)
    }

    /// The chunk holding byte `offset`.
    pub fn chunk_of(&self, offset: u64) -> u64 {
        offset >> self.shift
    }

    /// Chunks touched by `len > 0` bytes at `offset`; the caller has checked
    /// that the range lies inside the volume.
    pub fn chunks_of(&self, offset: u64, len: u64) -> RangeInclusive<u64> {
        let last = offset.saturating_add(len.max(1) - 1);
        self.chunk_of(offset)..=self.chunk_of(last)
    }

    /// Whether `[offset, offset + len)` covers chunk `chunk` whole.
    pub fn covers(&self, offset: u64, len: u64, chunk: u64) -> bool {
        let r = self.range(chunk);
        offset <= r.start && offset.saturating_add(len) >= r.end
    }

    /// Chunks wholly inside `[offset, offset + len)`.
    pub fn whole_chunks_in(&self, offset: u64, len: u64) -> Range<u64> {
        let end = offset.saturating_add(len);
        let first = offset.div_ceil(self.chunk_size());
        // The last chunk is whole when the range reaches the volume's end.
        let last = if end >= self.size {
            self.count()
        } else {
            end >> self.shift
        };
        first..last.max(first)
    }

    /// The same chunks over a different volume size.
    pub fn with_size(&self, size: u64) -> Self {
        ChunkGeometry {
            size,
            shift: self.shift,
        }
    }
}

impl fmt::Debug for ChunkGeometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ChunkGeometry(size={}, chunk_size={}, count={})",
            self.size,
            self.chunk_size(),
            self.count()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn edges() {
        let g = ChunkGeometry::new(1 << 20, 1 << 19).unwrap();
        assert_eq!(g.count(), 2);
        assert_eq!(g.len(1), 1 << 19);
        assert_eq!(g.len(2), 0);
        let g = ChunkGeometry::new((1 << 20) + 512, 1 << 19).unwrap();
        assert_eq!(g.count(), 3);
        assert_eq!(g.len(2), 512);
        assert_eq!(g.range(2), (1 << 20)..(1 << 20) + 512);
        assert!(g.covers(1 << 20, 512, 2));
        assert!(!g.covers(1 << 20, 511, 2));
        assert_eq!(g.whole_chunks_in(0, (1 << 20) + 512), 0..3);
        assert_eq!(g.whole_chunks_in(1, 1 << 19), 1..1);
        assert!(ChunkGeometry::new(1, 3).is_err());
        let g = ChunkGeometry::new(u64::MAX, 1 << 22).unwrap();
        assert_eq!(g.count(), (u64::MAX >> 22) + 1);
        assert_eq!(g.len(g.count() - 1), (1 << 22) - 1);
        assert_eq!(g.len(u64::MAX), 0);
        assert_eq!(
            g.chunks_of(u64::MAX, 1),
            (u64::MAX >> 22)..=(u64::MAX >> 22)
        );
        let g = ChunkGeometry::new(0, 1 << 16).unwrap();
        assert_eq!(g.count(), 0);
    }

    proptest! {
        #[test]
        fn agrees_with_wide_arithmetic(size in any::<u64>(), shift in 16u32..23, chunk in any::<u64>()) {
            let cs = 1u64 << shift;
            let g = ChunkGeometry::new(size, cs).unwrap();
            let count = (u128::from(size)).div_ceil(u128::from(cs));
            prop_assert_eq!(u128::from(g.count()), count);
            let start = u128::from(chunk) * u128::from(cs);
            let want = (u128::from(size).saturating_sub(start)).min(u128::from(cs));
            prop_assert_eq!(u128::from(g.len(chunk)), want);
        }

        #[test]
        fn lengths_sum_to_the_size(size in 0u64..(64 << 20), shift in 16u32..23) {
            let g = ChunkGeometry::new(size, 1 << shift).unwrap();
            let total: u64 = (0..g.count()).map(|c| g.len(c)).sum();
            prop_assert_eq!(total, size);
        }

        #[test]
        fn whole_chunks_are_covered(size in 1u64..(16 << 20), off in 0u64..(16 << 20), len in 1u64..(8 << 20)) {
            let g = ChunkGeometry::new(size, 1 << 16).unwrap();
            prop_assume!(off < size);
            let len = len.min(size - off);
            for c in g.chunks_of(off, len) {
                prop_assert_eq!(g.covers(off, len, c), g.whole_chunks_in(off, len).contains(&c));
            }
        }
    }
}
