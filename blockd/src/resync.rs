//! Resync, sans-IO: which regions a replica that fell behind must be sent.
//!
//! A primary that has served the volume continuously since it dropped the
//! replica knows them: its [`DirtyMap`] (every region written while the
//! replica was out, plus those not yet flushed everywhere when it was
//! dropped). Otherwise (the primary restarted, or a write failed part-way
//! and left the copies different where nothing was acknowledged) the good
//! copy and the returning one are compared region by region with CRC32C
//! checksums ([`region_sums`] on each side, the `Checksums` frame for a
//! remote copy) and only the regions that differ ([`mark_differing`]) are
//! copied. [`copy_extents`] turns a map into the byte ranges to copy.
//!
//! The loop that copies them while the volume keeps taking writes is the
//! primary's ([`crate::replication::ReplicatedStore::resync`]).

use std::io;

use crate::dirty::DirtyMap;

/// The CRC32C of each `region`-byte region of the `len` bytes at `offset`
/// (the last one cut at `offset + len`), reading through `read`.
pub fn region_sums(
    read: impl FnMut(&mut [u8], u64) -> io::Result<()>,
    offset: u64,
    len: u64,
    region: u64,
) -> io::Result<Vec<u32>> {
    sparse_region_sums(read, |_, _| Ok(false), offset, len, region)
}

/// Like [`region_sums`], without reading a region that `hole(at, n)` says
/// is all zeros (a hole of a sparse file): its sum is that of zeros. A
/// mostly empty volume is compared at the speed of its holes.
pub fn sparse_region_sums(
    mut read: impl FnMut(&mut [u8], u64) -> io::Result<()>,
    mut hole: impl FnMut(u64, u64) -> io::Result<bool>,
    offset: u64,
    len: u64,
    region: u64,
) -> io::Result<Vec<u32>> {
    if region == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "region size 0"));
    }
    let end = offset
        .checked_add(len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
    let region_len = usize::try_from(region)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "region too large"))?;
    let mut buf = vec![0u8; region_len.min(usize::try_from(len).unwrap_or(usize::MAX))];
    let mut sums = Vec::with_capacity(regions_in(len, region) as usize);
    let mut at = offset;
    // The sum of a region of zeros, by length (the last may be cut).
    let mut zeros: Option<(usize, u32)> = None;
    while at < end {
        let n = (end - at).min(region) as usize;
        let chunk = &mut buf[..n];
        if hole(at, n as u64)? {
            let sum = match zeros {
                Some((len, sum)) if len == n => sum,
                _ => {
                    chunk.fill(0);
                    let sum = crate::wire::crc32c(chunk);
                    zeros = Some((n, sum));
                    sum
                }
            };
            sums.push(sum);
        } else {
            read(chunk, at)?;
            sums.push(crate::wire::crc32c(chunk));
        }
        at += n as u64;
    }
    Ok(sums)
}

/// How many `region`-byte regions `len` bytes span (the last one partial).
pub fn regions_in(len: u64, region: u64) -> u64 {
    if region == 0 {
        return 0;
    }
    len.div_ceil(region)
}

/// Marks in `map` each region, from the one at `offset` on, whose good
/// checksum differs from the other copy's; a region only one side has a
/// checksum for counts as differing. `offset` must start a region of
/// `map`'s size, and both lists be of that region size.
pub fn mark_differing(map: &mut DirtyMap, offset: u64, good: &[u32], theirs: &[u32]) {
    let region = map.region_size();
    let n = good.len().max(theirs.len());
    for i in 0..n {
        if good.get(i) != theirs.get(i) {
            map.mark(offset + i as u64 * region, 1);
        }
    }
}

/// The byte ranges (offset, length) of `map`'s dirty regions in a
/// `size`-byte volume, in order, the last one cut at the end.
pub fn copy_extents(map: &DirtyMap, size: u64) -> Vec<(u64, u64)> {
    let region = map.region_size();
    map.regions()
        .filter_map(|r| {
            let start = r.checked_mul(region)?;
            let end = start.saturating_add(region).min(size);
            (start < end).then_some((start, end - start))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(data: &[u8]) -> impl FnMut(&mut [u8], u64) -> io::Result<()> + '_ {
        |buf, at| {
            let at = at as usize;
            buf.copy_from_slice(&data[at..at + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn sums_cover_each_region_and_cut_the_last() {
        let data: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let sums = region_sums(file(&data), 0, 2500, 1024).unwrap();
        assert_eq!(sums.len(), 3);
        assert_eq!(sums[0], crate::wire::crc32c(&data[..1024]));
        assert_eq!(sums[2], crate::wire::crc32c(&data[2048..2500]));
        let mid = region_sums(file(&data), 1024, 1024, 1024).unwrap();
        assert_eq!(mid, [sums[1]]);
        assert!(region_sums(file(&data), 0, 0, 1024).unwrap().is_empty());
        assert!(region_sums(file(&data), u64::MAX, 2, 1024).is_err());
        assert!(region_sums(file(&data), 0, 10, 0).is_err());
        assert_eq!(regions_in(2500, 1024), 3);
        assert_eq!(regions_in(2048, 1024), 2);
    }

    #[test]
    fn a_hole_sums_as_zeros_without_being_read() {
        let mut data = vec![0u8; 4096 + 100];
        data[1500] = 7;
        let plain = region_sums(file(&data), 0, data.len() as u64, 1024).unwrap();
        let mut reads = Vec::new();
        let read = |buf: &mut [u8], at: u64| {
            reads.push(at);
            file(&data)(buf, at)
        };
        // Regions 0, 2 and the cut last one are holes; 1 and 3 are read.
        let hole = |at: u64, _| Ok(at != 1024 && at != 3072);
        let sparse = sparse_region_sums(read, hole, 0, data.len() as u64, 1024).unwrap();
        assert_eq!(sparse, plain);
        assert_eq!(reads, [1024, 3072]);
    }

    #[test]
    fn only_regions_that_differ_are_planned() {
        let size = 8 * 1024 + 100;
        let good: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let mut theirs = good.clone();
        theirs[1024 + 7] ^= 1; // region 1
        theirs[5 * 1024] ^= 0x80; // region 5
        theirs[size - 1] ^= 1; // region 8, the partial last one
        let g = region_sums(file(&good), 0, size as u64, 1024).unwrap();
        let t = region_sums(file(&theirs), 0, size as u64, 1024).unwrap();
        let mut map = DirtyMap::new(size as u64, 1024);
        mark_differing(&mut map, 0, &g, &t);
        assert_eq!(map.regions().collect::<Vec<_>>(), [1, 5, 8]);
        assert_eq!(
            copy_extents(&map, size as u64),
            [(1024, 1024), (5 * 1024, 1024), (8 * 1024, 100)]
        );
        // Identical copies: nothing to copy.
        let mut clean = DirtyMap::new(size as u64, 1024);
        mark_differing(&mut clean, 0, &g, &g);
        assert!(clean.is_clean());
        // A later batch marks from its own offset; a missing sum differs.
        let mut later = DirtyMap::new(size as u64, 1024);
        mark_differing(&mut later, 4 * 1024, &g[4..6], &t[4..5]);
        assert_eq!(later.regions().collect::<Vec<_>>(), [5]);
    }
}
