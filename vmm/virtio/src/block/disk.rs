//! The raw-file disk behind virtio-blk.
//!
//! Data moves between the file and guest RAM with `pread`/`pwrite` straight
//! into the guest's mapping (no bounce buffer). Only ranges validated by the
//! request parser reach this module, and each is resolved again through
//! `GuestMemory::get_slices`, so a bad address fails instead of touching
//! host memory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::BitmapSlice;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

use super::request::SECTOR_SIZE;
use crate::GuestMemoryMmap;

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image could not be opened.
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image size could not be read.
    #[error("cannot stat disk image {}", path.display())]
    Stat {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A raw disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    capacity: u64,
    read_only: bool,
}

impl Disk {
    /// Opens `path`, read-only (`O_RDONLY`) if `read_only`. The capacity is
    /// the file size in whole sectors; a trailing partial sector is unused.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|source| DiskError::Stat {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        Ok(Disk {
            file,
            capacity: len / SECTOR_SIZE,
            read_only,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The open image file (tests inspect its open flags).
    #[cfg(test)]
    pub(crate) fn file_for_tests(&self) -> &File {
        &self.file
    }

    /// Whether the image was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads `len` bytes at file `offset` into guest memory at `addr`.
    pub fn read_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        let mut offset = offset;
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let slice = slice.map_err(io::Error::other)?;
            self.pread_exact(&slice, offset)?;
            offset += slice.len() as u64;
        }
        Ok(())
    }

    /// Writes `len` bytes of guest memory at `addr` to file `offset`.
    pub fn write_from_guest(
        &self,
        mem: &GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
        offset: u64,
    ) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let mut offset = offset;
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let slice = slice.map_err(io::Error::other)?;
            self.pwrite_all(&slice, offset)?;
            offset += slice.len() as u64;
        }
        Ok(())
    }

    /// Flushes written data to stable storage (`fdatasync`).
    pub fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn pread_exact<B: BitmapSlice>(&self, slice: &VolatileSlice<B>, offset: u64) -> io::Result<()> {
        let guard = slice.ptr_guard_mut();
        let mut done = 0;
        while done < slice.len() {
            let pos = file_offset(offset, done)?;
            // SAFETY: `guard` keeps the slice's mapping alive; the pointer
            // plus `done` stays within the slice (done < len), and the kernel
            // writes at most `len - done` bytes there. The fd is owned by
            // `self.file` and open.
            let ret = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    guard.as_ptr().add(done).cast(),
                    slice.len() - done,
                    pos,
                )
            };
            done += check_io(ret, "pread hit end of file")?;
        }
        slice.bitmap().mark_dirty(0, slice.len());
        Ok(())
    }

    fn pwrite_all<B: BitmapSlice>(&self, slice: &VolatileSlice<B>, offset: u64) -> io::Result<()> {
        let guard = slice.ptr_guard();
        let mut done = 0;
        while done < slice.len() {
            let pos = file_offset(offset, done)?;
            // SAFETY: `guard` keeps the slice's mapping alive; the pointer
            // plus `done` stays within the slice and the kernel reads at most
            // `len - done` bytes from it. The fd is owned by `self.file`.
            let ret = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    guard.as_ptr().add(done).cast(),
                    slice.len() - done,
                    pos,
                )
            };
            done += check_io(ret, "pwrite wrote nothing")?;
        }
        Ok(())
    }
}

fn file_offset(offset: u64, done: usize) -> io::Result<libc::off_t> {
    offset
        .checked_add(done as u64)
        .and_then(|o| libc::off_t::try_from(o).ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Turns a `pread`/`pwrite` return value into a byte count; 0 is an error
/// (the file shrank under us), `EINTR` is a retryable 0.
fn check_io(ret: isize, zero: &'static str) -> io::Result<usize> {
    match ret {
        0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, zero)),
        n if n > 0 => Ok(n as usize),
        _ => {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(err)
            }
        }
    }
}
