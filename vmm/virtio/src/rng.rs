//! virtio-rng: an entropy source backed by the host's `getrandom(2)`.
//!
//! The driver posts device-writable buffers; the device fills them with
//! random bytes, at most [`MAX_BYTES_PER_REQUEST`] per chain, and returns how
//! many it wrote. A chain with a driver-readable or out-of-memory buffer is
//! returned with length 0.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::Bytes;

use crate::chain::{drain_queue, walk_chain, Desc, QueueError};
use crate::ratelimit::LogRateLimiter;
use crate::worker::{DeviceWorker, QueueProcessor, QueueWorker, WorkerOptions};
use crate::{
    device_type, ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};

/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of entropy handed out per chain at most.
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;
/// Descriptors accepted per chain.
const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;

/// Counters of the rng device.
#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Chains processed.
    pub requests: AtomicU64,
    /// Random bytes written to the guest.
    pub bytes: AtomicU64,
    /// Chains rejected or failed.
    pub errors: AtomicU64,
}

/// The queue logic of virtio-rng.
pub struct RngHandler {
    buf: Vec<u8>,
    descs: Vec<Desc>,
    metrics: Arc<RngMetrics>,
    limiter: Arc<LogRateLimiter>,
}

impl RngHandler {
    /// A handler updating `metrics`.
    pub fn new(metrics: Arc<RngMetrics>) -> Self {
        RngHandler {
            buf: vec![0; MAX_BYTES_PER_REQUEST],
            descs: Vec::new(),
            metrics,
            limiter: Arc::default(),
        }
    }

    fn process_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        match self.fill_chain(mem, chain) {
            Ok(written) => {
                self.metrics
                    .bytes
                    .fetch_add(written as u64, Ordering::Relaxed);
                // Bounded by MAX_BYTES_PER_REQUEST.
                written as u32
            }
            Err(e) => {
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
                crate::warn_ratelimited!(self.limiter, error = %e, "rng request rejected");
                0
            }
        }
    }

    fn fill_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<usize, RngError> {
        walk_chain(chain, MAX_DESCRIPTORS, &mut self.descs).map_err(RngError::Chain)?;
        if let Some(bad) = self.descs.iter().find(|d| !d.writable || !d.in_memory(mem)) {
            return Err(RngError::BadDescriptor(*bad));
        }
        let mut written = 0;
        for desc in &self.descs {
            let n = (desc.len as usize).min(MAX_BYTES_PER_REQUEST - written);
            if n == 0 {
                break;
            }
            let buf = &mut self.buf[..n];
            getrandom(buf).map_err(RngError::Entropy)?;
            mem.write_slice(buf, desc.addr)
                .map_err(|_| RngError::BadDescriptor(*desc))?;
            written += n;
        }
        Ok(written)
    }
}

impl QueueProcessor for RngHandler {
    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<bool, QueueError> {
        let limiter = self.limiter.clone();
        drain_queue(queue, mem, &limiter, |chain| self.process_chain(mem, chain))
    }
}

/// Why an rng chain was rejected.
#[derive(Debug, thiserror::Error)]
enum RngError {
    #[error("invalid chain")]
    Chain(#[source] crate::chain::ChainError),
    #[error("descriptor not writable or outside guest memory: {0:?}")]
    BadDescriptor(Desc),
    #[error("getrandom failed")]
    Entropy(#[source] io::Error),
}

/// Fills `buf` from the host's entropy pool.
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes
        // that outlives the call; getrandom writes at most that many bytes.
        let ret = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // Non-negative and at most `rest.len()`.
        filled += ret as usize;
    }
    Ok(())
}

/// The virtio-rng device.
pub struct Rng {
    id: String,
    acked_features: u64,
    options: WorkerOptions,
    metrics: Arc<RngMetrics>,
    worker: DeviceWorker<QueueWorker<RngHandler>>,
}

impl Rng {
    /// A new rng device named `id` whose thread is shaped by `options`.
    pub fn new(id: impl Into<String>, options: WorkerOptions) -> Self {
        Rng {
            id: id.into(),
            acked_features: 0,
            options,
            metrics: Arc::default(),
            worker: DeviceWorker::default(),
        }
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << crate::VIRTIO_RING_F_EVENT_IDX)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.device_features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        mut queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError> {
        crate::prepare_queues(&mut queues, 1, &mem, self.acked_features)?;
        let queue = queues.remove(0);
        let handler = RngHandler::new(self.metrics.clone());
        let name = format!("virtio-rng-{}", self.id);
        self.worker
            .start_queue(&name, mem, queue, interrupt, handler, &self.options)
    }

    fn reset(&mut self) -> bool {
        self.worker.stop();
        self.acked_features = 0;
        true
    }

    fn id(&self) -> &str {
        &self.id
    }
}
