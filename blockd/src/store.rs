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
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
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

/// A volume as one sparse file on the local host.
#[derive(Debug)]
pub struct LocalFile {
    file: File,
    sectors: u64,
}

impl LocalFile {
    /// Opens `path`, creating it sparse at `size` bytes if it is missing. An
    /// existing file must already have that size.
    pub fn open_or_create(path: &Path, size: u64) -> Result<Self, StoreError> {
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
        Ok(LocalFile {
            file,
            sectors: size / SECTOR_SIZE,
        })
    }
}

impl Store for LocalFile {
    fn capacity(&self) -> u64 {
        self.sectors
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// `preadv` straight into the guest's buffers: no bounce buffer to
    /// zero and copy out of (on a page-cache read those were a third of
    /// the copying).
    fn read_into(&self, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let guards: Vec<_> = bufs.iter().map(VolatileSlice::ptr_guard_mut).collect();
        let mut iov: Vec<libc::iovec> = guards
            .iter()
            .filter(|g| g.len() > 0)
            .map(|g| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: g.len(),
            })
            .collect();
        let (mut first, mut at) = (0, offset);
        while first < iov.len() {
            let pos = libc::off_t::try_from(at)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
            let count = libc::c_int::try_from(iov.len() - first).unwrap_or(libc::c_int::MAX);
            // SAFETY: every iovec from `first` on points into guest memory
            // that `guards` keep mapped, for the length of its slice; the
            // kernel writes those bytes and no Rust reference to them
            // exists. The descriptor is this store's own.
            let n =
                unsafe { libc::preadv(self.file.as_raw_fd(), iov[first..].as_ptr(), count, pos) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("volume file ends before byte {at}"),
                ));
            }
            let mut n = n as usize;
            at += n as u64;
            while n > 0 {
                let v = &mut iov[first];
                if n >= v.iov_len {
                    n -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: `n` is less than this iovec's length, so the
                    // pointer stays inside the same guest buffer.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                    v.iov_len -= n;
                    n = 0;
                }
            }
        }
        Ok(())
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

impl LocalFile {
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
