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
