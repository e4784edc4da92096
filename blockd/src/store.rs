//! Where a volume's blocks live: the [`Store`] trait the request path reads
//! and writes through, and today's only implementation, [`LocalFile`], a
//! sparse file on this host.
//!
//! [`crate::replication::ReplicatedStore`] implements the same trait,
//! acknowledging a write only once every in-sync replica has it and carrying
//! the volume's epoch so a fenced primary cannot write; it also overrides
//! [`Store::write_batch`], which the request path uses for the writes of
//! one pass over the queue, so their replication round trips overlap.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

use crate::direct::{vectored_all, AlignedBuf, Direct, Request};
use crate::request::SECTOR_SIZE;

/// Errors opening or creating a volume file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be opened or created.
    #[error("cannot open volume file {0}")]
    Open(PathBuf, #[source] io::Error),
    /// The file exists with a size other than the one asked for.
    #[error("volume file {path} is {actual} bytes, not {wanted}")]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The configured size.
        wanted: u64,
    },
    /// The size is zero or not a whole number of sectors.
    #[error("volume size {0} is not a non-zero multiple of 512 bytes")]
    BadSize(u64),
}

/// A volume's block storage. Offsets and lengths are bytes, already checked
/// against [`Store::capacity`] by the request decoder.
pub trait Store: Send + Sync {
    /// Capacity in 512-byte sectors.
    fn capacity(&self) -> u64;
    /// Fill `buf` from byte `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Fill the guest buffers `bufs`, in order, from byte `offset`, as
    /// [`Store::read_at`] fills one. A store over a file reads straight
    /// into them; the default reads into a buffer of its own and copies
    /// ([`read_through_buffer`]).
    fn read_into(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        read_through_buffer(self, bufs, offset)
    }
    /// Fill each `(offset, bufs)` of `reads` as [`Store::read_into`] does,
    /// and return one result per read, in order. A store over a file with
    /// direct I/O has them all in flight at once; the default reads them
    /// one by one.
    fn read_batch(&self, reads: &[(u64, &[VolatileSlice<'_>])]) -> Vec<io::Result<()>> {
        reads
            .iter()
            .map(|&(offset, bufs)| self.read_into(bufs, offset))
            .collect()
    }
    /// Write `buf` at byte `offset`; durable only after [`Store::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Write each `(offset, data)` of `writes` as [`Store::write_at`] does,
    /// and return one result per write, in order. Writes that overlap land
    /// in order. A store whose writes wait on the network (replication)
    /// overlaps their round trips; the default writes them one by one.
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<io::Result<()>> {
        writes
            .iter()
            .map(|&(offset, data)| self.write_at(data, offset))
            .collect()
    }
    /// [`Store::write_batch`] by a primary holding epoch `epoch`. A store
    /// that is a replica with an epoch of its own (the primary's own
    /// host's copy, [`crate::replica::LocalReplica`]) refuses every write
    /// once it has taken a newer epoch: that primary was fenced. Others
    /// ignore the epoch.
    fn write_batch_at(&self, epoch: u64, writes: &[(u64, &[u8])]) -> Vec<io::Result<()>> {
        let _ = epoch;
        self.write_batch(writes)
    }
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// No frontend is connected: nothing is asked of the store until one
    /// is. A replicated store makes its writes durable everywhere and
    /// closes its serving session clean
    /// ([`crate::replication::ReplicatedStore::close_idle`]). By default
    /// nothing.
    fn idle(&self) {}
    /// A lock every queue pass over this store holds, shared, from popping
    /// its requests until their completions are signalled, where the store
    /// can be stopped for good ([`crate::serve::Switch::shut_down`] takes
    /// it exclusively and keeps it). By default none.
    fn passes(&self) -> Option<&std::sync::RwLock<()>> {
        None
    }
    /// The CRC32C of each `region`-byte region of the `len` bytes at
    /// `offset`, the last one cut ([`crate::resync::region_sums`]). A
    /// sparse file's store skips its holes.
    fn sums(&self, offset: u64, len: u64, region: u64) -> io::Result<Vec<u32>> {
        crate::resync::region_sums(|b, at| self.read_at(b, at), offset, len, region)
    }
}

/// [`Store::read_into`] by way of [`Store::read_at`] and a bounce buffer.
pub fn read_through_buffer<S: Store + ?Sized>(
    store: &S,
    bufs: &[VolatileSlice<'_>],
    offset: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; bufs.iter().map(|b| b.len()).sum()];
    store.read_at(&mut buf, offset)?;
    let mut done = 0;
    for b in bufs {
        b.copy_from(&buf[done..done + b.len()]);
        done += b.len();
    }
    Ok(())
}

/// How a [`LocalFile`] reaches the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IoMode {
    /// `O_DIRECT` and `io_uring` where the filesystem does direct I/O
    /// ([`crate::direct`]), through the page cache where it does not.
    #[default]
    Direct,
    /// Always through the host's page cache.
    Buffered,
}

/// A volume as one sparse file on the local host.
#[derive(Debug)]
pub struct LocalFile {
    /// Buffered: requests direct I/O cannot take, holes, `fdatasync`.
    file: File,
    /// The same file opened for direct I/O, if the filesystem allows it.
    direct: Option<Direct>,
    sectors: u64,
}

impl LocalFile {
    /// Opens `path` with direct I/O where its filesystem allows
    /// ([`IoMode::Direct`]), creating it sparse at `size` bytes if it is
    /// missing. An existing file must already have that size.
    pub fn open_or_create(path: &Path, size: u64) -> Result<Self, StoreError> {
        Self::open_or_create_with(path, size, IoMode::Direct)
    }

    /// [`LocalFile::open_or_create`] with I/O through `mode`.
    pub fn open_or_create_with(path: &Path, size: u64, mode: IoMode) -> Result<Self, StoreError> {
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(StoreError::BadSize(size));
        }
        let open = |e| StoreError::Open(path.to_path_buf(), e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open)?;
        let actual = file.metadata().map_err(open)?.len();
        if actual == 0 {
            file.set_len(size).map_err(open)?;
        } else if actual != size {
            return Err(StoreError::SizeMismatch {
                path: path.to_path_buf(),
                actual,
                wanted: size,
            });
        }
        let direct = match mode {
            IoMode::Direct => Direct::open(path).map_err(open)?,
            IoMode::Buffered => None,
        };
        if mode == IoMode::Direct && direct.is_none() {
            tracing::info!(path = %path.display(), "no direct I/O on this filesystem; using the page cache");
        }
        Ok(LocalFile {
            file,
            direct,
            sectors: size / SECTOR_SIZE,
        })
    }

    /// True if the file is read and written with direct I/O.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The direct descriptor if a request of `len` bytes at `offset` can
    /// take it once its buffers are aligned.
    fn direct_for(&self, offset: u64, len: usize) -> Option<&Direct> {
        let d = self.direct.as_ref()?;
        let probe = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: len,
        };
        d.fits(offset, &[probe]).then_some(d)
    }
}

/// An iovec over each guest buffer `guards` keeps mapped.
fn guest_iov(guards: &[vm_memory::volatile_memory::PtrGuardMut]) -> Vec<libc::iovec> {
    guards
        .iter()
        .filter(|g| g.len() > 0)
        .map(|g| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: g.len(),
        })
        .collect()
}

fn bytes_iov(buf: &[u8]) -> Vec<libc::iovec> {
    vec![libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    }]
}

fn one(mut results: Vec<io::Result<()>>) -> io::Result<()> {
    results.pop().unwrap_or(Ok(()))
}

/// A write's bytes as direct I/O can take them: borrowed when aligned,
/// copied into an [`AlignedBuf`] when not.
enum WriteData<'a> {
    Borrowed(&'a [u8]),
    Copied(AlignedBuf),
}

impl WriteData<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            WriteData::Borrowed(b) => b,
            WriteData::Copied(b) => b,
        }
    }
}

impl Store for LocalFile {
    fn capacity(&self) -> u64 {
        self.sectors
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(d) = self.direct_for(offset, buf.len()) else {
            return self.file.read_exact_at(buf, offset);
        };
        let iov = bytes_iov(buf);
        if d.fits(offset, &iov) {
            let read = Request {
                write: false,
                offset,
                iov,
            };
            // SAFETY: `buf` is borrowed mutably for the call.
            return one(unsafe { d.run(&[read]) });
        }
        let bounce = AlignedBuf::zeroed(buf.len());
        let read = Request {
            write: false,
            offset,
            iov: bytes_iov(&bounce),
        };
        // SAFETY: `bounce` is owned here and outlives the call.
        one(unsafe { d.run(&[read]) })?;
        buf.copy_from_slice(&bounce);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        one(self.write_batch(&[(offset, buf)]))
    }

    /// Writes that direct I/O can take go in flight together (copied into
    /// aligned buffers first if need be), a run of non-overlapping ones at
    /// a time so that overlapping writes land in order; the others go
    /// through the page cache.
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<io::Result<()>> {
        if self.direct.is_none() {
            return writes
                .iter()
                .map(|&(offset, data)| self.file.write_all_at(data, offset))
                .collect();
        }
        let mut results = Vec::with_capacity(writes.len());
        let mut from = 0;
        while from < writes.len() {
            let mut to = from + 1;
            while to < writes.len() && !overlaps_any(&writes[from..to], writes[to]) {
                to += 1;
            }
            results.extend(self.write_run(&writes[from..to]));
            from = to;
        }
        results
    }

    /// `preadv` straight into the guest's buffers, direct when they are
    /// aligned: no bounce buffer to zero and copy out of.
    fn read_into(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        one(self.read_batch(&[(offset, bufs)]))
    }

    /// Reads whose guest buffers direct I/O can take go in flight
    /// together; the others are read one by one.
    fn read_batch(&self, reads: &[(u64, &[VolatileSlice<'_>])]) -> Vec<io::Result<()>> {
        let mut results: Vec<Option<io::Result<()>>> = reads.iter().map(|_| None).collect();
        let mut direct = Vec::new();
        let mut direct_index = Vec::new();
        // Held until the reads are done: guest memory they write.
        let mut held = Vec::with_capacity(reads.len());
        for (i, &(offset, bufs)) in reads.iter().enumerate() {
            let guards: Vec<_> = bufs.iter().map(VolatileSlice::ptr_guard_mut).collect();
            let mut iov = guest_iov(&guards);
            held.push(guards);
            let len: usize = iov.iter().map(|v| v.iov_len).sum();
            match self.direct_for(offset, len) {
                Some(d) if d.fits(offset, &iov) => {
                    direct.push(Request {
                        write: false,
                        offset,
                        iov,
                    });
                    direct_index.push(i);
                }
                Some(_) => results[i] = Some(read_through_buffer(self, bufs, offset)),
                None => {
                    // SAFETY: the iovecs point into guest memory `held`
                    // keeps mapped for the call; no Rust reference to those
                    // bytes exists while the kernel writes them.
                    let r = unsafe { vectored_all(&self.file, false, &mut iov, offset) };
                    results[i] = Some(r);
                }
            }
        }
        if let Some(d) = &self.direct {
            // SAFETY: the guest buffers are mapped for as long as `reads`
            // borrows them and `held` guards them, both past this call, and
            // the kernel is the only writer of them meanwhile.
            let done = unsafe { d.run(&direct) };
            for (i, r) in direct_index.into_iter().zip(done) {
                results[i] = Some(r);
            }
        }
        drop(held);
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(io::Error::other("read not carried out"))))
            .collect()
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn sums(&self, offset: u64, len: u64, region: u64) -> io::Result<Vec<u32>> {
        // Where the next data at or after some offset starts: `None` for
        // none before the end of the file.
        let mut next_data: Option<(u64, Option<u64>)> = None;
        let mut hole = |at: u64, n: u64| -> io::Result<bool> {
            let known =
                next_data.filter(|&(from, data)| from <= at && data.is_none_or(|d| d >= at));
            let data = match known {
                Some((_, data)) => data,
                None => {
                    let data = self.data_from(at)?;
                    next_data = Some((at, data));
                    data
                }
            };
            Ok(data.is_none_or(|d| d >= at + n))
        };
        crate::resync::sparse_region_sums(
            |b, at| self.read_at(b, at),
            &mut hole,
            offset,
            len,
            region,
        )
    }
}

/// True if `w` overlaps any of `run`.
fn overlaps_any(run: &[(u64, &[u8])], w: (u64, &[u8])) -> bool {
    let (at, len) = (w.0, w.1.len() as u64);
    run.iter()
        .any(|&(o, d)| at < o + d.len() as u64 && o < at + len)
}

impl LocalFile {
    /// Writes `run` (no two of which overlap): those direct I/O takes in
    /// flight together, the rest through the page cache.
    fn write_run(&self, run: &[(u64, &[u8])]) -> Vec<io::Result<()>> {
        let mut results: Vec<Option<io::Result<()>>> = run.iter().map(|_| None).collect();
        let mut data = Vec::new();
        let mut index = Vec::new();
        for (i, &(offset, bytes)) in run.iter().enumerate() {
            match self.direct_for(offset, bytes.len()) {
                Some(d) if d.fits(offset, &bytes_iov(bytes)) => {
                    data.push((offset, WriteData::Borrowed(bytes)));
                    index.push(i);
                }
                Some(_) => {
                    data.push((offset, WriteData::Copied(AlignedBuf::copy_of(bytes))));
                    index.push(i);
                }
                None => results[i] = Some(self.file.write_all_at(bytes, offset)),
            }
        }
        if let Some(d) = &self.direct {
            let requests: Vec<Request> = data
                .iter()
                .map(|(offset, w)| Request {
                    write: true,
                    offset: *offset,
                    iov: bytes_iov(w.bytes()),
                })
                .collect();
            // SAFETY: every buffer is borrowed from `run` or owned by
            // `data`, both of which outlive the call; writes only read them.
            let done = unsafe { d.run(&requests) };
            for (i, r) in index.into_iter().zip(done) {
                results[i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(io::Error::other("write not carried out"))))
            .collect()
    }

    /// The first byte of data at or after `at` (`SEEK_DATA`), `None` when
    /// only a hole follows.
    fn data_from(&self, at: u64) -> io::Result<Option<u64>> {
        use std::os::fd::AsRawFd;
        let at = libc::off_t::try_from(at)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: lseek on a descriptor this store owns; it touches no
        // memory, and the file position it moves is never used (every
        // read and write is positional).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), at, libc::SEEK_DATA) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENXIO) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(r as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file store's `preadv` into scattered buffers (one empty, one of
    /// odd length) reads what `read_at` reads and what the bounce-buffer
    /// path reads, and a read past the end of the file is an error.
    #[test]
    fn reads_into_scattered_buffers_match_read_at() {
        let path = std::env::temp_dir().join(format!("blockd-readinto-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let store = LocalFile::open_or_create(&path, 1 << 20).unwrap();
        let pattern: Vec<u8> = (0..12288u32).map(|i| (i * 7 + i / 251) as u8).collect();
        store.write_at(&pattern, 4096).unwrap();
        let mut want = vec![0u8; 9000];
        store.read_at(&mut want, 5000).unwrap();
        for via_buffer in [false, true] {
            let mut mem = vec![0xeeu8; 9100];
            let (a, rest) = mem.split_at_mut(1000);
            let (b, rest) = rest.split_at_mut(0);
            let (c, d) = rest.split_at_mut(4097);
            // SAFETY: each slice is a live, distinct part of `mem`, which
            // outlives `bufs`.
            let bufs: Vec<VolatileSlice<'_>> = [a, b, c, &mut d[..3903]]
                .into_iter()
                .map(|s| unsafe { VolatileSlice::new(s.as_mut_ptr(), s.len()) })
                .collect();
            if via_buffer {
                read_through_buffer(&store, &bufs, 5000).unwrap();
            } else {
                store.read_into(&bufs, 5000).unwrap();
            }
            drop(bufs);
            assert_eq!(&mem[..9000], &want[..], "via buffer: {via_buffer}");
            assert_eq!(&mem[9000..], &[0xee; 100][..], "nothing past the buffers");
        }
        let mut tail = [0u8; 8];
        // SAFETY: `tail` outlives the slice.
        let past = unsafe { VolatileSlice::new(tail.as_mut_ptr(), tail.len()) };
        let e = store.read_into(&[past], (1 << 20) - 4).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        let _ = std::fs::remove_file(&path);
    }

    /// Direct and buffered files hold the same bytes after the same
    /// batches: overlapping writes land in order, unaligned writes and
    /// buffers (which direct I/O cannot take as they are) still land, and a
    /// batch of reads into scattered guest buffers reads them back.
    #[test]
    fn direct_and_buffered_files_agree_on_every_batch() {
        let dir = std::env::temp_dir().join(format!("blockd-direct-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pattern = |seed: u32, len: usize| -> Vec<u8> {
            (0..len as u32)
                .map(|i| (i.wrapping_mul(seed) >> 3) as u8)
                .collect()
        };
        let aligned = AlignedBuf::copy_of(&pattern(3, 8192));
        let mut unaligned_mem = pattern(5, 4097);
        let unaligned = &unaligned_mem[1..];
        let mut images = Vec::new();
        for mode in [IoMode::Direct, IoMode::Buffered] {
            let path = dir.join(format!("{mode:?}"));
            let store = LocalFile::open_or_create_with(&path, 1 << 20, mode).unwrap();
            assert!(mode == IoMode::Direct || !store.is_direct());
            let first = pattern(7, 4096);
            let results = store.write_batch(&[
                (0, &first),
                (8192, &aligned),
                // Overlaps the first: must land after it.
                (2048, unaligned),
                // Not a multiple of any direct alignment.
                (20000, b"odd bytes"),
            ]);
            assert!(results.iter().all(Result::is_ok), "{mode:?}: {results:?}");
            let mut a = AlignedBuf::zeroed(4096);
            let mut b = vec![0u8; 4096 + 512];
            let mut c = AlignedBuf::zeroed(1024);
            // SAFETY: each buffer outlives the slices, which alone are used
            // while they live.
            let (sa, sb, sc) = unsafe {
                (
                    VolatileSlice::new(a.as_mut_ptr(), 4096),
                    VolatileSlice::new(b.as_mut_ptr().add(512), 4096),
                    VolatileSlice::new(c.as_mut_ptr(), 1024),
                )
            };
            let (ba, bb, bc) = ([sa], [sb], [sc]);
            let results = store.read_batch(&[(0, &ba), (4096, &bb), (19968, &bc)]);
            assert!(results.iter().all(Result::is_ok), "{mode:?}: {results:?}");
            assert_eq!(&a[..2048], &first[..2048]);
            assert_eq!(&a[2048..], &unaligned[..2048]);
            assert_eq!(&b[512..512 + 2048], &unaligned[2048..]);
            assert_eq!(&c[32..41], b"odd bytes");
            store.flush().unwrap();
            drop(store);
            images.push(std::fs::read(&path).unwrap());
        }
        assert!(images[0] == images[1], "direct and buffered files differ");
        unaligned_mem.clear();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn created_sparse_reopened_and_size_checked() {
        let dir = std::env::temp_dir().join(format!("blockd-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vol");
        let store = LocalFile::open_or_create(&path, 1 << 30).unwrap();
        assert_eq!(store.capacity(), (1 << 30) / 512);
        store.write_at(b"hello", 4096).unwrap();
        store.flush().unwrap();
        let mut buf = [0u8; 5];
        store.read_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"hello");
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap());
        assert!(
            blocks < 1024,
            "a 1 GiB volume must be sparse ({blocks} blocks)"
        );
        drop(store);
        assert!(LocalFile::open_or_create(&path, 1 << 30).is_ok());
        assert!(matches!(
            LocalFile::open_or_create(&path, 1 << 20),
            Err(StoreError::SizeMismatch { .. })
        ));
        assert!(matches!(
            LocalFile::open_or_create(&path, 1000),
            Err(StoreError::BadSize(1000))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sums_skip_holes_and_match_reading_everything() {
        let dir = std::env::temp_dir().join(format!("blockd-sums-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let size = 64 << 20;
        let store = LocalFile::open_or_create(&dir.join("vol"), size).unwrap();
        // Data in regions 3 and 40 (one write across two regions' border)
        // and at the very end; the rest is holes.
        store.write_at(&[7; 4096], 3 << 20).unwrap();
        store.write_at(&[9; 8192], (41 << 20) - 4096).unwrap();
        store.write_at(&[1; 512], size - 512).unwrap();
        let read_all = crate::resync::region_sums(|b, at| store.read_at(b, at), 0, size, 1 << 20);
        let sparse = store.sums(0, size, 1 << 20).unwrap();
        assert_eq!(sparse, read_all.unwrap());
        let zeros = crate::wire::crc32c(&vec![0; 1 << 20]);
        let data: Vec<usize> = (0..sparse.len()).filter(|&i| sparse[i] != zeros).collect();
        assert_eq!(data, [3, 40, 41, 63]);
        // From the middle of the file, and cut short.
        let part = store.sums((40 << 20) + 512, 3 << 20, 1 << 20).unwrap();
        let want = crate::resync::region_sums(
            |b, at| store.read_at(b, at),
            (40 << 20) + 512,
            3 << 20,
            1 << 20,
        );
        assert_eq!(part, want.unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
