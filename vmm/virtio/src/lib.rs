//! Virtio device models for `ferro-vmm`.
//!
//! Devices here implement [`VirtioDevice`] and never know which transport
//! carries them: the PCI transport (crate `ferro-pci`) reads and writes their
//! configuration, negotiates features and, once the driver sets `DRIVER_OK`,
//! hands them their queues through [`VirtioDevice::activate`]. Devices signal
//! the driver only through the [`VirtioInterrupt`] trait.
//!
//! Each device keeps its queue-processing logic (a handler that takes guest
//! memory and a queue and returns whether the driver must be notified) apart
//! from the thread that waits on eventfds, so the logic is tested by pushing
//! descriptor chains into a `GuestMemoryMmap` without any guest or KVM.
//!
//! Modules:
//! - [`block`]: virtio-blk over a raw file (read, write, flush, get-id, read-only).
//! - [`net`]: virtio-net over a TAP device with the vnet header and offloads.
//! - [`rng`]: virtio-rng backed by the host's `getrandom`.
//! - [`vhost_user_blk`]: virtio-blk served by a vhost-user backend process
//!   (the queues run in the backend; this side shares memory, passes the
//!   doorbells and turns completions into interrupts).
//! - [`worker`]: the epoll thread shared by all devices, and the
//!   [`WorkerOptions`] (thread-init hook) every device takes at construction.
//! - [`chain`]: the descriptor chain walker and queue draining loop.
//! - [`ratelimit`]: rate-limited logging for guest-triggered events.
//! - `testing` (feature `test-utils`): an in-memory driver-side queue and
//!   device harnesses for tests, benchmarks and fuzz targets.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use virtio_queue::{Queue, QueueT};

pub mod block;
pub mod chain;
pub mod net;
pub mod ratelimit;
pub mod rng;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod vhost_user_blk;
pub mod worker;

pub use worker::{ThreadInit, WorkerOptions};

/// Guest memory type used by every device.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Virtio device type ids (virtio 1.x, section 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
}

/// `VIRTIO_F_VERSION_1`: every device here is a modern (1.x) device.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// `VIRTIO_F_RING_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// What a device asks its transport to signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// The used ring of queue `n` has new entries.
    Queue(u16),
    /// The device configuration changed.
    Config,
}

/// How a device notifies the driver; implemented by the transport
/// (MSI-X vectors for PCI) and by test harnesses (counters).
pub trait VirtioInterrupt: Send + Sync {
    /// Deliver an interrupt of `kind` to the driver.
    fn trigger(&self, kind: InterruptKind) -> io::Result<()>;
}

/// A queue handed to a device at activation, with the eventfd the transport
/// signals when the driver notifies that queue.
pub struct ActivatedQueue {
    /// Queue index within the device.
    pub index: u16,
    /// The queue, configured by the driver through the transport.
    pub queue: Queue,
    /// Signalled on every driver notification for this queue.
    pub notify: EventFd,
}

/// Errors from [`VirtioDevice::activate`].
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a number of queues the device does not support.
    #[error("expected {expected} queues, driver configured {got}")]
    QueueCount {
        /// What the device needs.
        expected: usize,
        /// What the driver set up.
        got: usize,
    },
    /// A queue failed validation against guest memory.
    #[error("queue {0} is not valid for guest memory")]
    InvalidQueue(u16),
    /// The device worker could not be started.
    #[error("cannot start device worker")]
    Worker(#[source] io::Error),
    /// The backend could not be prepared (for example TAP offloads).
    #[error("backend setup failed")]
    Backend(#[source] io::Error),
}

/// A virtio device as seen by any transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (see [`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including `VIRTIO_F_VERSION_1`).
    fn device_features(&self) -> u64;
    /// Record the features the driver accepted (a subset of the offer).
    fn ack_features(&mut self, features: u64);
    /// Read from the device-specific configuration space at `offset`.
    /// Reads past the end fill `data` with zeroes.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write the device-specific configuration space; ignored where read-only.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start the device: from now on it processes `queues` and signals
    /// through `interrupt`. Called once per `DRIVER_OK`.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActivatedQueue>,
    ) -> Result<(), ActivateError>;
    /// Stop processing (driver wrote 0 to `device_status`) and return the
    /// device to its pre-activation state. Returns false if it cannot be reset.
    fn reset(&mut self) -> bool;
    /// Short identifier for logs (for example `blk0`).
    fn id(&self) -> &str;
}

/// Copies `config[offset..]` into `data`, zero-filling what lies past the end.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

/// Checks the queues the transport hands over at activation and applies
/// the negotiated `VIRTIO_RING_F_EVENT_IDX`.
pub(crate) fn prepare_queues(
    queues: &mut [ActivatedQueue],
    expected: usize,
    mem: &GuestMemoryMmap,
    acked_features: u64,
) -> Result<(), ActivateError> {
    if queues.len() != expected {
        return Err(ActivateError::QueueCount {
            expected,
            got: queues.len(),
        });
    }
    let event_idx = acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
    for q in queues.iter_mut() {
        if !q.queue.is_valid(mem) {
            return Err(ActivateError::InvalidQueue(q.index));
        }
        q.queue.set_event_idx(event_idx);
    }
    queues.sort_by_key(|q| q.index);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_read_past_end_is_zero() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
