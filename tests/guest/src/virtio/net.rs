//! virtio-net (virtio spec 1.2 §5.1): MAC from the config space, a receive
//! queue kept full of 2 KiB buffers, a transmit queue of 2 KiB buffers. No
//! offloads and no mergeable buffers, so every frame is one buffer behind a
//! 12-byte `virtio_net_hdr`.

use super::{Buf, Result, VirtioPci, Virtqueue};
use crate::mem::dma_alloc;
use crate::pci::PciFunction;

/// `VIRTIO_NET_F_MAC`.
const F_MAC: u64 = 1 << 5;
/// `struct virtio_net_hdr` with `num_buffers` (always present in 1.x).
pub const HDR_LEN: usize = 12;
/// Bytes per buffer: header + the largest untagged Ethernet frame, rounded.
pub const BUF_LEN: usize = 2048;
/// Buffers per queue.
const QUEUE_LEN: u16 = 32;

/// Receive queue index.
const RX: u16 = 0;
/// Transmit queue index.
const TX: u16 = 1;

/// A queue with one DMA buffer per descriptor (chains are one descriptor
/// long, so descriptor id == buffer index).
pub struct Ring {
    vq: Virtqueue,
    bufs: u64,
}

impl Ring {
    fn new(vq: Virtqueue) -> Self {
        let bufs = dma_alloc(BUF_LEN * vq.size() as usize, 4096);
        Ring { vq, bufs }
    }

    fn buf(&self, id: u16) -> u64 {
        self.bufs + (id as usize * BUF_LEN) as u64
    }
}

/// A virtio-net NIC.
pub struct Net {
    dev: VirtioPci,
    /// Receive ring (kept full).
    pub rx: Ring,
    /// Transmit ring.
    pub tx: Ring,
    /// The MAC address from the config space (or a local one).
    pub mac: [u8; 6],
}

impl Net {
    /// Brings the NIC up with every receive buffer posted.
    pub fn probe(func: PciFunction) -> Result<Net> {
        let mut dev = VirtioPci::probe(func)?;
        let features = dev.init(F_MAC)?;
        let rx = Ring::new(dev.setup_queue(RX, QUEUE_LEN)?);
        let tx = Ring::new(dev.setup_queue(TX, QUEUE_LEN)?);
        let mut mac = [0x02, 0xfe, 0, 0, 0, 1];
        if features & F_MAC != 0 {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = dev.cfg8(i as u64);
            }
        }
        let mut net = Net { dev, rx, tx, mac };
        for _ in 0..net.rx.vq.size() {
            net.post_rx_any()?;
        }
        net.dev.driver_ok();
        net.rx.vq.notify();
        Ok(net)
    }

    /// MSI-X vectors of the function.
    pub fn msix_vectors(&self) -> u16 {
        self.dev.msix_vectors()
    }

    /// Posts the next free receive descriptor with its buffer.
    fn post_rx_any(&mut self) -> Result<()> {
        // Chains of one descriptor: the id add() takes is the free-list head,
        // and buffer `id` goes with descriptor `id`.
        let id = self.rx.vq.next_free().ok_or("virtio-net: rx full")?;
        let buf = Buf { addr: self.rx.buf(id), len: BUF_LEN as u32, device_writes: true };
        self.rx.vq.add(&[buf]).ok_or("virtio-net: rx full")?;
        Ok(())
    }

    /// Takes one received frame: (descriptor id, frame bytes without the
    /// virtio header). Hand the id back with [`Self::recycle_rx`].
    pub fn receive(&mut self) -> Option<(u16, &[u8])> {
        let (id, len) = self.rx.vq.pop_used()?;
        let len = (len as usize).clamp(HDR_LEN, BUF_LEN);
        // SAFETY: the device wrote `len` bytes into buffer `id`, which stays
        // ours until it is reposted.
        let frame = unsafe { core::slice::from_raw_parts((self.rx.buf(id) + HDR_LEN as u64) as *const u8, len - HDR_LEN) };
        Some((id, frame))
    }

    /// Reposts receive buffer `id` and kicks the device.
    pub fn recycle_rx(&mut self) {
        if self.post_rx_any().is_ok() {
            self.rx.vq.notify();
        }
    }

    /// Reclaims finished transmit buffers; true when one is free.
    pub fn tx_ready(&mut self) -> bool {
        while self.tx.vq.pop_used().is_some() {}
        self.tx.vq.num_free() > 0
    }

    /// Sends a frame of `len` bytes built by `fill` in a transmit buffer.
    pub fn transmit<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        if !self.tx_ready() || len > BUF_LEN - HDR_LEN {
            return None;
        }
        let id = self.tx.vq.next_free()?;
        let buf = self.tx.buf(id);
        // SAFETY: buffer `id` goes with the free descriptor `id`, which the
        // device does not own until it is added below.
        let bytes = unsafe { core::slice::from_raw_parts_mut(buf as *mut u8, HDR_LEN + len) };
        bytes[..HDR_LEN].fill(0);
        let r = fill(&mut bytes[HDR_LEN..]);
        self.tx.vq.add(&[Buf { addr: buf, len: (HDR_LEN + len) as u32, device_writes: false }])?;
        self.tx.vq.notify();
        Some(r)
    }
}
