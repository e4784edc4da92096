//! A dirty-region bitmap: which fixed-size regions of a volume were written.
//!
//! A degraded primary marks every region it writes while a replica is out of
//! its in-sync set; the resync that brings the replica back copies only those
//! regions. Incremental snapshots will use the same map (regions written
//! since the last snapshot).

/// The default region: 1 MiB, 1024 bits (128 bytes) per GiB of volume.
pub const DEFAULT_REGION: u64 = 1 << 20;

/// One bit per region of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyMap {
    region: u64,
    regions: u64,
    bits: Vec<u64>,
}

impl DirtyMap {
    /// A clean map of a `size`-byte volume in `region`-byte regions
    /// (`region` is rounded up to a power of two, at least 512).
    pub fn new(size: u64, region: u64) -> Self {
        let region = region.max(512).next_power_of_two();
        let regions = size.div_ceil(region);
        DirtyMap {
            region,
            regions,
            bits: vec![0; regions.div_ceil(64) as usize],
        }
    }

    /// Region size in bytes.
    pub fn region_size(&self) -> u64 {
        self.region
    }

    /// Marks every region that `len` bytes at `offset` touch (clamped to
    /// the volume).
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / self.region;
        let last =
            (offset.saturating_add(len - 1) / self.region).min(self.regions.saturating_sub(1));
        for r in first..=last {
            self.bits[(r / 64) as usize] |= 1 << (r % 64);
        }
    }

    /// True if region `r` is dirty.
    pub fn is_dirty(&self, r: u64) -> bool {
        r < self.regions && self.bits[(r / 64) as usize] & (1 << (r % 64)) != 0
    }

    /// The dirty region indices, in order.
    pub fn regions(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.regions).filter(|r| self.is_dirty(*r))
    }

    /// How many regions are dirty.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// True if nothing is dirty.
    pub fn is_clean(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    /// Adds every region dirty in `other` (a map of the same shape).
    pub fn merge(&mut self, other: &DirtyMap) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
    }

    /// Marks everything clean.
    pub fn clear(&mut self) {
        self.bits.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_every_touched_region_and_nothing_else() {
        let mut m = DirtyMap::new(10 << 20, 1 << 20);
        assert!(m.is_clean());
        m.mark(0, 512);
        m.mark((3 << 20) - 512, 1024); // straddles regions 2 and 3
        m.mark(9 << 20, 1 << 20);
        m.mark(5 << 20, 0);
        assert_eq!(m.regions().collect::<Vec<_>>(), vec![0, 2, 3, 9]);
        assert_eq!(m.count(), 4);
        m.mark(u64::MAX - 10, 100); // past the end: clamped, no panic
        assert!(m.is_dirty(9));
        assert!(!m.is_dirty(10));
    }

    #[test]
    fn merges_and_clears() {
        let mut a = DirtyMap::new(200 << 20, DEFAULT_REGION);
        let mut b = a.clone();
        a.mark(0, 1);
        b.mark(130 << 20, 1);
        a.merge(&b);
        assert_eq!(a.regions().collect::<Vec<_>>(), vec![0, 130]);
        a.clear();
        assert!(a.is_clean());
    }

    #[test]
    fn region_size_is_a_power_of_two() {
        assert_eq!(DirtyMap::new(1 << 20, 1000).region_size(), 1024);
        assert_eq!(DirtyMap::new(1 << 20, 1).region_size(), 512);
    }
}
