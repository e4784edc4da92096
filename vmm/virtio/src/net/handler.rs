//! The virtio-net queue logic, generic over the frame backend.
//!
//! Frames are exchanged with the backend together with their 12-byte
//! `virtio_net_hdr_v1`, so offload metadata passes through untouched.
//!
//! - TX: the chain (header + frame) is gathered into a buffer and written to
//!   the backend in one call. Chains that are too short, longer than
//!   [`MAX_BUFFER_LEN`], device-writable or outside guest RAM are dropped
//!   and counted; every chain is returned.
//! - RX: a frame read from the backend stays pending until an rx chain can
//!   take it. Without rx buffers the handler stops reading the backend and
//!   resumes on the next rx notification. A frame bigger than the offered
//!   chain is dropped and counted, and the chain is reused for the next one.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::chain::{add_used, drain_queue, walk_chain, Desc, QueueError};
use crate::ratelimit::LogRateLimiter;
use crate::GuestMemoryMmap;

/// Size of `virtio_net_hdr_v1` (the header with `VERSION_1`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame (after the header) accepted in either direction.
pub const MAX_FRAME_LEN: usize = 65562;
/// Largest header + frame.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Descriptors accepted per chain.
const MAX_DESCRIPTORS: usize = 256;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Where frames come from and go to: a TAP, or memory in tests.
pub trait NetBackend: Send + Sync + 'static {
    /// Reads one frame (with vnet header); `WouldBlock` when none is ready.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (with vnet header).
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize>;
}

impl<T: NetBackend> NetBackend for Arc<T> {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read_frame(buf)
    }

    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        (**self).write_frame(frame)
    }
}

/// Counters of a net device.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes (with header) delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Frames read from the backend but dropped (too big for the guest's
    /// buffers, shorter than a header).
    pub rx_dropped: AtomicU64,
    /// Times the guest had no rx buffer for a pending frame.
    pub rx_no_buffers: AtomicU64,
    /// Frames sent by the guest.
    pub tx_frames: AtomicU64,
    /// Bytes (with header) sent by the guest.
    pub tx_bytes: AtomicU64,
    /// Guest frames dropped (malformed chain, oversized, backend error).
    pub tx_dropped: AtomicU64,
    /// Malformed chains on either queue.
    pub bad_chains: AtomicU64,
}

/// Why a chain could not be used.
#[derive(Debug, thiserror::Error)]
enum ChainUse {
    #[error("chain is malformed: {0}")]
    Malformed(&'static str),
    #[error("frame of {need} bytes does not fit {have} bytes of buffers")]
    TooSmall { need: usize, have: u64 },
}

/// rx and tx processing for one queue pair.
pub struct NetHandler<B: NetBackend> {
    backend: B,
    rx_buf: Vec<u8>,
    rx_pending: Option<usize>,
    backend_readable: bool,
    tx_buf: Vec<u8>,
    descs: Vec<Desc>,
    metrics: Arc<NetMetrics>,
    limiter: Arc<LogRateLimiter>,
}

impl<B: NetBackend> NetHandler<B> {
    /// A handler over `backend` updating `metrics`. The backend is assumed
    /// readable until a read says otherwise.
    pub fn new(backend: B, metrics: Arc<NetMetrics>) -> Self {
        NetHandler {
            backend,
            rx_buf: vec![0; MAX_BUFFER_LEN],
            rx_pending: None,
            backend_readable: true,
            tx_buf: vec![0; MAX_BUFFER_LEN],
            descs: Vec::with_capacity(MAX_DESCRIPTORS),
            metrics,
            limiter: Arc::default(),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Records that the backend signalled readability (edge-triggered).
    pub fn set_backend_readable(&mut self) {
        self.backend_readable = true;
    }

    /// Whether a frame read from the backend waits for an rx buffer.
    pub fn rx_pending(&self) -> bool {
        self.rx_pending.is_some()
    }

    /// Moves frames from the backend into rx chains until either runs out.
    /// Returns whether the driver must be interrupted.
    pub fn process_rx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        let mut rechecked = false;
        while let Some(len) = self.next_rx_frame() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // Ask for a notification when buffers arrive; retry once if
                // some arrived meanwhile.
                if !rechecked && queue.enable_notification(mem)? {
                    rechecked = true;
                    continue;
                }
                self.metrics.rx_no_buffers.fetch_add(1, Ordering::Relaxed);
                break;
            };
            rechecked = false;
            used |= self.deliver(mem, queue, chain, len);
        }
        Ok(used && queue.needs_notification(mem)?)
    }

    /// Tries to put the pending frame of `len` bytes into `chain`; returns
    /// whether a chain went to the used ring.
    fn deliver(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        chain: DescriptorChain<&GuestMemoryMmap>,
        len: usize,
    ) -> bool {
        let head = chain.head_index();
        match self.write_rx_chain(mem, chain, len) {
            Ok(()) => {
                self.rx_pending = None;
                self.metrics.rx_frames.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .rx_bytes
                    .fetch_add(len as u64, Ordering::Relaxed);
                // `len` is at most MAX_BUFFER_LEN.
                add_used(queue, mem, &self.limiter, head, len as u32);
                true
            }
            Err(e @ ChainUse::TooSmall { .. }) => {
                // The chain is fine, the frame is not: drop the frame and
                // offer the same chain to the next one.
                queue.go_to_previous_position();
                self.rx_pending = None;
                self.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                crate::warn_ratelimited!(self.limiter, error = %e, "rx frame dropped");
                false
            }
            Err(e) => {
                self.metrics.bad_chains.fetch_add(1, Ordering::Relaxed);
                crate::warn_ratelimited!(self.limiter, error = %e, "bad rx chain returned empty");
                add_used(queue, mem, &self.limiter, head, 0);
                true
            }
        }
    }

    /// The pending frame's length, reading one from the backend if needed.
    fn next_rx_frame(&mut self) -> Option<usize> {
        while self.rx_pending.is_none() && self.backend_readable {
            match self.backend.read_frame(&mut self.rx_buf) {
                Ok(n) if n < VNET_HDR_LEN => {
                    self.metrics.rx_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(n) => {
                    // Without MRG_RXBUF every frame uses exactly one buffer;
                    // the TAP leaves these bytes untouched.
                    self.rx_buf[NUM_BUFFERS_OFFSET..VNET_HDR_LEN]
                        .copy_from_slice(&1u16.to_le_bytes());
                    self.rx_pending = Some(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        crate::warn_ratelimited!(self.limiter, error = %e, "backend read failed");
                    }
                    self.backend_readable = false;
                }
            }
        }
        self.rx_pending
    }

    fn write_rx_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        len: usize,
    ) -> Result<(), ChainUse> {
        walk_chain(chain, MAX_DESCRIPTORS, &mut self.descs)
            .map_err(|_| ChainUse::Malformed("too many descriptors"))?;
        check_descs(&self.descs, mem, true)?;
        let have: u64 = self.descs.iter().map(|d| u64::from(d.len)).sum();
        if have < len as u64 {
            return Err(ChainUse::TooSmall { need: len, have });
        }
        let mut done = 0;
        for desc in &self.descs {
            let n = (desc.len as usize).min(len - done);
            if n == 0 {
                break;
            }
            write_guest(mem, &self.rx_buf[done..done + n], desc.addr)?;
            done += n;
        }
        Ok(())
    }

    /// Sends every available tx chain to the backend. Returns whether the
    /// driver must be interrupted.
    pub fn process_tx(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, QueueError> {
        let limiter = self.limiter.clone();
        drain_queue(queue, mem, &limiter, |chain| {
            self.send_chain(mem, chain);
            0
        })
    }

    fn send_chain(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) {
        let result = self.gather_tx(mem, chain);
        let len = match result {
            Ok(len) => len,
            Err(e) => {
                self.metrics.bad_chains.fetch_add(1, Ordering::Relaxed);
                self.metrics.tx_dropped.fetch_add(1, Ordering::Relaxed);
                crate::warn_ratelimited!(self.limiter, error = %e, "tx frame dropped");
                return;
            }
        };
        match self.backend.write_frame(&self.tx_buf[..len]) {
            Ok(_) => {
                self.metrics.tx_frames.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .tx_bytes
                    .fetch_add(len as u64, Ordering::Relaxed);
            }
            Err(e) => {
                self.metrics.tx_dropped.fetch_add(1, Ordering::Relaxed);
                crate::warn_ratelimited!(self.limiter, error = %e, "backend write failed, tx frame dropped");
            }
        }
    }

    /// Copies the chain into `tx_buf`; returns its length.
    fn gather_tx(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<usize, ChainUse> {
        walk_chain(chain, MAX_DESCRIPTORS, &mut self.descs)
            .map_err(|_| ChainUse::Malformed("too many descriptors"))?;
        check_descs(&self.descs, mem, false)?;
        let total: u64 = self.descs.iter().map(|d| u64::from(d.len)).sum();
        if total > MAX_BUFFER_LEN as u64 {
            return Err(ChainUse::Malformed("frame too large"));
        }
        if total < VNET_HDR_LEN as u64 {
            return Err(ChainUse::Malformed("shorter than the vnet header"));
        }
        let mut done = 0;
        for desc in &self.descs {
            let end = done + desc.len as usize;
            mem.read_slice(&mut self.tx_buf[done..end], desc.addr)
                .map_err(|_| ChainUse::Malformed("unreadable buffer"))?;
            done = end;
        }
        Ok(done)
    }
}

fn check_descs(descs: &[Desc], mem: &GuestMemoryMmap, writable: bool) -> Result<(), ChainUse> {
    for desc in descs {
        if desc.writable != writable {
            return Err(ChainUse::Malformed("descriptor has the wrong direction"));
        }
        if !desc.in_memory(mem) {
            return Err(ChainUse::Malformed("descriptor outside guest memory"));
        }
    }
    Ok(())
}

fn write_guest(mem: &GuestMemoryMmap, bytes: &[u8], addr: GuestAddress) -> Result<(), ChainUse> {
    mem.write_slice(bytes, addr)
        .map_err(|_| ChainUse::Malformed("unwritable buffer"))
}
