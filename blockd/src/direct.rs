//! Direct I/O for a volume file: `O_DIRECT` (no host page cache between
//! the guest and the disk) and `io_uring` (a batch of requests in flight at
//! once, as the guest queued them).
//!
//! Why: a volume served out of the host's page cache caches the guest's
//! data twice (the guest has its own page cache), makes one host's memory
//! pressure every volume's latency, and measures memory copies rather than
//! the disk. Direct I/O needs buffers and offsets aligned as the
//! filesystem says (`statx` `STATX_DIOALIGN`); [`Direct::fits`] checks a
//! request, and [`crate::store::LocalFile`] sends one that does not fit
//! through its buffered descriptor instead (the kernel keeps the two
//! coherent: a direct read writes back the cached range first, a direct
//! write drops it). [`AlignedBuf`] gives the write path buffers that fit.
//!
//! A filesystem without `O_DIRECT` (tmpfs before 6.6) gives no [`Direct`];
//! a kernel with `io_uring` disabled gives one that does its batch one
//! request after another.

use std::alloc::Layout;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use io_uring::{opcode, types, IoUring};

/// Entries of each volume's submission queue (the most a batch keeps in
/// flight; a longer batch goes in turns).
const RING_ENTRIES: u32 = 64;

/// A heap buffer whose start is aligned for direct I/O (4 KiB, which every
/// filesystem's `STATX_DIOALIGN` memory alignment divides).
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

/// Alignment of every [`AlignedBuf`].
pub const BUF_ALIGN: usize = 4096;

// SAFETY: an AlignedBuf owns its allocation outright, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads, like &Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return AlignedBuf {
                ptr: std::ptr::NonNull::<u8>::dangling(),
                len,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(ptr) else {
            std::alloc::handle_alloc_error(layout);
        };
        AlignedBuf { ptr, len }
    }

    /// A copy of `data`.
    pub fn copy_of(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, BUF_ALIGN).expect("buffer size overflows")
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with this very layout.
            unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes (zeroed at
        // allocation), or dangling with `len` 0.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// One request of a batch: read into or write from `iov` at `offset`.
pub struct Request {
    /// True for a write.
    pub write: bool,
    /// Byte offset in the file.
    pub offset: u64,
    /// The buffers, in order. The caller keeps them valid (and, for a
    /// read, unaliased) until [`Direct::run`] returns.
    pub iov: Vec<libc::iovec>,
}

/// A volume file opened `O_DIRECT`, with its ring.
pub struct Direct {
    file: File,
    /// `None` where the kernel refuses `io_uring`.
    ring: Option<Mutex<IoUring>>,
    /// Alignment of memory, and of offsets and lengths.
    mem_align: usize,
    offset_align: u64,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct")
            .field("io_uring", &self.ring.is_some())
            .field("mem_align", &self.mem_align)
            .field("offset_align", &self.offset_align)
            .finish()
    }
}

impl Direct {
    /// Opens `path` (which exists) for direct I/O; `None` when its
    /// filesystem does not do direct I/O.
    pub fn open(path: &Path) -> io::Result<Option<Self>> {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some((mem_align, offset_align)) = dio_align(&file)? else {
            return Ok(None);
        };
        if mem_align as usize > BUF_ALIGN {
            // The bounce and write buffers would not do.
            return Ok(None);
        }
        let ring = match IoUring::new(RING_ENTRIES) {
            Ok(r) => Some(Mutex::new(r)),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring unavailable; direct I/O one request at a time");
                None
            }
        };
        Ok(Some(Direct {
            file,
            ring,
            mem_align: mem_align as usize,
            offset_align: u64::from(offset_align),
        }))
    }

    /// True if a request at `offset` over `iov` meets the alignment direct
    /// I/O needs: offset and every buffer's length a multiple of the
    /// offset alignment, every buffer's start of the memory alignment.
    pub fn fits(&self, offset: u64, iov: &[libc::iovec]) -> bool {
        offset.is_multiple_of(self.offset_align)
            && iov.iter().all(|v| {
                (v.iov_len as u64).is_multiple_of(self.offset_align)
                    && (v.iov_base as usize).is_multiple_of(self.mem_align)
            })
    }

    /// Carries out `requests` (each of which [`Direct::fits`]), all in
    /// flight at once up to the ring's size, and returns one result per
    /// request, in order. Requests that overlap must not be in one call:
    /// they run in no set order.
    ///
    /// # Safety
    ///
    /// Every iovec of `requests` names memory valid for its length until
    /// this returns, and no Rust reference to a read's buffers exists
    /// meanwhile (the kernel writes them).
    pub unsafe fn run(&self, requests: &[Request]) -> Vec<io::Result<()>> {
        let Some(ring) = &self.ring else {
            // SAFETY: this function's own contract.
            return requests
                .iter()
                .map(|r| unsafe { self.sync(r, 0) })
                .collect();
        };
        let mut ring = ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut results: Vec<io::Result<()>> = Vec::with_capacity(requests.len());
        for turn in requests.chunks(RING_ENTRIES as usize) {
            results.extend(self.run_turn(&mut ring, turn));
        }
        results
    }

    /// One ring-full of requests, under [`Direct::run`]'s contract.
    fn run_turn(&self, ring: &mut IoUring, requests: &[Request]) -> Vec<io::Result<()>> {
        let fd = types::Fd(self.file.as_raw_fd());
        let mut done: Vec<Option<io::Result<usize>>> = requests.iter().map(|_| None).collect();
        let mut pushed = 0;
        for (i, r) in requests.iter().enumerate() {
            let Ok(n) = u32::try_from(r.iov.len()) else {
                done[i] = Some(Err(io::Error::other("too many buffers")));
                continue;
            };
            let entry = if r.write {
                opcode::Writev::new(fd, r.iov.as_ptr(), n)
                    .offset(r.offset)
                    .build()
            } else {
                opcode::Readv::new(fd, r.iov.as_ptr(), n)
                    .offset(r.offset)
                    .build()
            };
            let entry = entry.user_data(i as u64);
            // SAFETY: the iovecs and the buffers they name stay valid
            // until this function has reaped every completion below (the
            // contract of `run`, this function's only caller); the file is
            // this Direct's.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                done[i] = Some(Err(io::Error::other("submission queue full")));
                continue;
            }
            pushed += 1;
        }
        let mut reaped = 0;
        if pushed > 0 {
            spin(ring);
        }
        while reaped < pushed {
            match ring.submit_and_wait(pushed - reaped) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // What was pushed may be in flight: the buffers must
                // outlive it, so wait on rather than return.
                Err(e) => {
                    tracing::error!(error = %e, "io_uring wait failed; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            for cqe in ring.completion() {
                let i = cqe.user_data() as usize;
                let res = cqe.result();
                done[i] = Some(if res < 0 {
                    Err(io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res as usize)
                });
                reaped += 1;
            }
        }
        requests
            .iter()
            .zip(done)
            .map(|(r, d)| match d {
                // SAFETY: `run`'s contract.
                Some(Ok(n)) => unsafe { self.sync(r, n) },
                Some(Err(e)) => Err(e),
                None => Err(io::Error::other("request never completed")),
            })
            .collect()
    }

    /// Finishes `r` from byte `done` on, synchronously (all of it when
    /// `done` is 0; the rest of a short transfer otherwise).
    ///
    /// # Safety
    ///
    /// As [`Direct::run`].
    unsafe fn sync(&self, r: &Request, done: usize) -> io::Result<()> {
        let mut iov = r.iov.clone();
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        if done >= total {
            return Ok(());
        }
        let start = advance(&mut iov, 0, done);
        // SAFETY: this function's contract.
        unsafe {
            vectored_all(
                &self.file,
                r.write,
                &mut iov[start..],
                r.offset + done as u64,
            )
        }
    }
}

/// The default of [`spin_window`].
pub const SPIN_DEFAULT: std::time::Duration = std::time::Duration::from_micros(50);

/// Longest a batch spins for its first completion before it sleeps
/// ([`SPIN_DEFAULT`], or `FERRO_BLOCKD_SPIN_US` microseconds; 0: never),
/// read once.
pub fn spin_window() -> std::time::Duration {
    static WINDOW: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *WINDOW.get_or_init(|| crate::env_micros("FERRO_BLOCKD_SPIN_US", SPIN_DEFAULT))
}

/// Submits what `ring` holds and spins, up to [`spin_window`], until a
/// completion is posted: a disk answers in tens of microseconds, and a
/// thread that sleeps for that pays a wake-up as long again (more under a
/// hypervisor). Measured by `cargo xtask bench blockd`: 4 KiB reads at QD1
/// 90 → 53 µs p50, at QD32 0.68 → 0.91 of the host's IOPS.
fn spin(ring: &mut IoUring) {
    let window = spin_window();
    if window.is_zero() || ring.submit().is_err() {
        return;
    }
    let start = std::time::Instant::now();
    while ring.completion().is_empty() && start.elapsed() < window {
        std::hint::spin_loop();
    }
}

/// The memory and offset alignment direct I/O on `file` needs, `None` when
/// the filesystem does no direct I/O.
fn dio_align(file: &File) -> io::Result<Option<(u32, u32)>> {
    // SAFETY: statx is plain data; all zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is an empty C string with AT_EMPTY_PATH, so statx
    // looks at the descriptor; `stx` is a valid buffer for the answer.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        // A kernel before 6.1 does not say: assume the strictest usual
        // alignment, which direct I/O on any block device accepts.
        return Ok(Some((BUF_ALIGN as u32, BUF_ALIGN as u32)));
    }
    if stx.stx_dio_mem_align == 0 || stx.stx_dio_offset_align == 0 {
        return Ok(None);
    }
    Ok(Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align)))
}

/// Skips `n` bytes of `iov` from index `first`: returns the index of the
/// first buffer with bytes left, that buffer moved past what was done.
fn advance(iov: &mut [libc::iovec], mut first: usize, mut n: usize) -> usize {
    while n > 0 && first < iov.len() {
        let v = &mut iov[first];
        if n >= v.iov_len {
            n -= v.iov_len;
            first += 1;
        } else {
            // SAFETY: `n` is less than this buffer's length, so the
            // pointer stays inside it.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    first
}

/// `preadv`/`pwritev` of all of `iov` at `offset`, however many calls it
/// takes.
///
/// # Safety
///
/// Each iovec names memory valid for its length for the call, and for a
/// read no Rust reference to it exists meanwhile.
pub unsafe fn vectored_all(
    file: &File,
    write: bool,
    iov: &mut [libc::iovec],
    offset: u64,
) -> io::Result<()> {
    let (mut first, mut at) = (0, offset);
    while first < iov.len() {
        if iov[first].iov_len == 0 {
            first += 1;
            continue;
        }
        let pos = libc::off_t::try_from(at)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        let count = libc::c_int::try_from(iov.len() - first).unwrap_or(libc::c_int::MAX);
        // SAFETY: every iovec from `first` on names memory valid for its
        // length (this function's contract); the descriptor is open.
        let n = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), iov[first..].as_ptr(), count, pos)
            } else {
                libc::preadv(file.as_raw_fd(), iov[first..].as_ptr(), count, pos)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(if write {
                io::Error::new(io::ErrorKind::WriteZero, "volume file took no bytes")
            } else {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("volume file ends before byte {at}"),
                )
            });
        }
        at += n as u64;
        first = advance(iov, first, n as usize);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_are_aligned_and_zeroed() {
        for len in [0, 1, 512, 4096, 65536 + 3] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
            }
        }
        assert_eq!(&AlignedBuf::copy_of(b"abc")[..], b"abc");
    }

    #[test]
    fn advance_moves_across_buffers() {
        let mut a = [0u8; 10];
        let mut b = [0u8; 5];
        let mut iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 10,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 5,
            },
        ];
        assert_eq!(advance(&mut iov, 0, 12), 1);
        assert_eq!(iov[1].iov_len, 3);
        assert_eq!(advance(&mut iov, 1, 3), 2);
    }
}
