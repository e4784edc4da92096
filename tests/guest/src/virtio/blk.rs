//! virtio-blk (virtio spec 1.2 §5.2): serial number (GET_ID), capacity, the
//! read-only bit, and synchronous read/write/flush requests.

use super::{Buf, Result, VirtioPci, Virtqueue};
use crate::mem::dma_alloc;
use crate::pci::PciFunction;

/// `VIRTIO_BLK_F_RO`.
const F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_FLUSH`.
const F_FLUSH: u64 = 1 << 9;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

/// Request status: success.
pub const S_OK: u8 = 0;
/// Request status: unsupported.
pub const S_UNSUPP: u8 = 2;

/// Length of the GET_ID serial.
const ID_LEN: usize = 20;
/// Bytes the self-test reads and writes (8 sectors).
pub const IO_LEN: usize = 4096;
/// Per-request timeout.
const TIMEOUT_MS: u64 = 5000;

/// A virtio-blk disk.
pub struct Blk {
    dev: VirtioPci,
    vq: Virtqueue,
    /// Request header (16 bytes) followed by the status byte at +16.
    req: u64,
    /// One 4 KiB data buffer.
    data: u64,
    serial: [u8; ID_LEN],
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
}

impl Blk {
    /// Brings the disk up and reads its serial.
    pub fn probe(func: PciFunction) -> Result<Blk> {
        let mut dev = VirtioPci::probe(func)?;
        dev.init(F_RO | F_FLUSH)?;
        let vq = dev.setup_queue(0, 16)?;
        dev.driver_ok();
        let sectors = dev.cfg64(0);
        let mut blk = Blk { dev, vq, req: dma_alloc(32, 16), data: dma_alloc(IO_LEN, 4096), serial: [0; ID_LEN], sectors };
        let status = blk.request(T_GET_ID, 0, ID_LEN as u32, true)?;
        if status == S_OK {
            // SAFETY: `data` is our DMA buffer; the device has finished.
            let id = unsafe { core::slice::from_raw_parts(blk.data as *const u8, ID_LEN) };
            blk.serial.copy_from_slice(id);
        }
        Ok(blk)
    }

    /// The serial (GET_ID), up to the first NUL.
    pub fn serial(&self) -> &str {
        let len = self.serial.iter().position(|&b| b == 0).unwrap_or(ID_LEN);
        core::str::from_utf8(&self.serial[..len]).unwrap_or("<not utf-8>")
    }

    /// True when the device offered `VIRTIO_BLK_F_RO`.
    pub fn read_only(&self) -> bool {
        self.dev.features & F_RO != 0
    }

    /// MSI-X vectors of the function.
    pub fn msix_vectors(&self) -> u16 {
        self.dev.msix_vectors()
    }

    /// Issues one request with `len` bytes of the data buffer (none for a
    /// zero `len`) and waits for it; returns the device's status byte.
    fn request(&mut self, kind: u32, sector: u64, len: u32, device_writes: bool) -> Result<u8> {
        self.request_within(kind, sector, len, device_writes, TIMEOUT_MS)
    }

    /// [`Blk::request`] with its own timeout.
    fn request_within(&mut self, kind: u32, sector: u64, len: u32, device_writes: bool, timeout_ms: u64) -> Result<u8> {
        // SAFETY: `req` is our 32-byte DMA block; no request is in flight.
        unsafe {
            let hdr = self.req as *mut u32;
            hdr.write_volatile(kind);
            hdr.add(1).write_volatile(0);
            (self.req as *mut u64).add(1).write_volatile(sector);
            ((self.req + 16) as *mut u8).write_volatile(0xff);
        }
        let hdr = Buf { addr: self.req, len: 16, device_writes: false };
        let status = Buf { addr: self.req + 16, len: 1, device_writes: true };
        let data = Buf { addr: self.data, len, device_writes };
        let head = if len == 0 { self.vq.add(&[hdr, status]) } else { self.vq.add(&[hdr, data, status]) };
        head.ok_or("virtio-blk: queue full")?;
        self.vq.notify();
        self.vq.wait_used(timeout_ms)?;
        // SAFETY: the device has completed the request.
        Ok(unsafe { ((self.req + 16) as *const u8).read_volatile() })
    }

    /// Bytes [`Blk::read_start`] reads: 4096, or the whole of a smaller
    /// disk (a one-sector user-data disk).
    fn start_len(&self) -> usize {
        core::cmp::min(IO_LEN as u64, self.sectors.saturating_mul(512)) as usize
    }

    /// Reads the first 4096 bytes of the disk (all of a smaller one).
    pub fn read_start(&mut self) -> Result<&[u8]> {
        let len = self.start_len();
        let status = self.request(T_IN, 0, len as u32, true)?;
        if status != S_OK {
            return Err("virtio-blk: read failed");
        }
        // SAFETY: the device filled the buffer; it stays ours until the next request.
        Ok(unsafe { core::slice::from_raw_parts(self.data as *const u8, len) })
    }

    /// Reads the first 4096 bytes, waiting up to `timeout_ms` (for a backend
    /// that restarts under the loop of `ferro.blkloop=`).
    pub fn read_start_within(&mut self, timeout_ms: u64) -> Result<&[u8]> {
        let len = self.start_len();
        let status = self.request_within(T_IN, 0, len as u32, true, timeout_ms)?;
        if status != S_OK {
            return Err("virtio-blk: read failed");
        }
        // SAFETY: the device filled the buffer; it stays ours until the next request.
        Ok(unsafe { core::slice::from_raw_parts(self.data as *const u8, len) })
    }

    /// Writes `pattern` to sectors 0..8; returns the status.
    pub fn write_start(&mut self, pattern: &[u8; IO_LEN]) -> Result<u8> {
        // SAFETY: our 4 KiB DMA buffer; no request is in flight.
        unsafe { core::ptr::copy_nonoverlapping(pattern.as_ptr(), self.data as *mut u8, IO_LEN) };
        self.request(T_OUT, 0, IO_LEN as u32, false)
    }

    /// Like [`Blk::write_start`] then [`Blk::flush`], each waiting up to
    /// `timeout_ms` (for a backend that restarts or fails over under the
    /// loop of `ferro.blkloop=` with `ferro.blkwrite=1`); both statuses.
    pub fn write_flush_within(&mut self, pattern: &[u8; IO_LEN], timeout_ms: u64) -> Result<(u8, u8)> {
        // SAFETY: our 4 KiB DMA buffer; no request is in flight.
        unsafe { core::ptr::copy_nonoverlapping(pattern.as_ptr(), self.data as *mut u8, IO_LEN) };
        let write = self.request_within(T_OUT, 0, IO_LEN as u32, false, timeout_ms)?;
        if self.dev.features & F_FLUSH == 0 {
            return Ok((write, S_UNSUPP));
        }
        Ok((write, self.request_within(T_FLUSH, 0, 0, false, timeout_ms)?))
    }

    /// Flushes the write cache; `S_UNSUPP` without sending when the device
    /// did not offer `VIRTIO_BLK_F_FLUSH`.
    pub fn flush(&mut self) -> Result<u8> {
        if self.dev.features & F_FLUSH == 0 {
            return Ok(S_UNSUPP);
        }
        self.request(T_FLUSH, 0, 0, false)
    }
}
