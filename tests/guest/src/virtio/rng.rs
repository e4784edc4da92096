//! virtio-rng (virtio spec 1.2 §5.4): one queue of device-writable buffers.

use super::{Buf, Result, VirtioPci, Virtqueue};
use crate::mem::dma_alloc;
use crate::pci::PciFunction;

/// A virtio entropy source.
pub struct Rng {
    /// The transport: owned for as long as the queue is in use.
    _dev: VirtioPci,
    vq: Virtqueue,
    buf: u64,
}

/// Largest single read.
const BUF_LEN: usize = 256;

impl Rng {
    /// Brings the device up.
    pub fn probe(func: PciFunction) -> Result<Rng> {
        let mut dev = VirtioPci::probe(func)?;
        dev.init(0)?;
        let vq = dev.setup_queue(0, 8)?;
        dev.driver_ok();
        Ok(Rng { _dev: dev, vq, buf: dma_alloc(BUF_LEN, 64) })
    }

    /// Fills `out` with entropy; returns how many bytes the device supplied.
    pub fn fill(&mut self, out: &mut [u8]) -> Result<usize> {
        let mut done = 0;
        let mut attempts = 0;
        while done < out.len() && attempts < 16 {
            attempts += 1;
            let want = (out.len() - done).min(BUF_LEN);
            self.vq.add(&[Buf { addr: self.buf, len: want as u32, device_writes: true }]).ok_or("virtio-rng: queue full")?;
            self.vq.notify();
            let (_, len) = self.vq.wait_used(5000)?;
            let len = (len as usize).min(want);
            // SAFETY: the device wrote `len` bytes into our DMA buffer.
            let got = unsafe { core::slice::from_raw_parts(self.buf as *const u8, len) };
            out[done..done + len].copy_from_slice(got);
            done += len;
        }
        Ok(done)
    }
}
