//! How a virtio device behind the PCI transport signals the driver.
//!
//! [`InterruptState`] is shared between the transport (which the guest
//! programs: vectors, ISR reads) and the device's worker threads (which
//! trigger). Each [`InterruptKind`] maps to the MSI-X vector the driver chose
//! for it — `queue_msix_vector` of that queue or `config_msix_vector` — and
//! goes through the MSI-X table, so masking and pending bits apply.
//! [`NO_VECTOR`] means the driver wants no interrupt for that source.

use std::io;
use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ferro_virtio::{InterruptKind, VirtioInterrupt};

use crate::msix::MsixConfig;

/// "No vector" value of `config_msix_vector` / `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;
/// ISR bit: a queue has new used buffers.
pub const ISR_QUEUE: u8 = 1 << 0;
/// ISR bit: the device configuration changed.
pub const ISR_CONFIG: u8 = 1 << 1;

/// Interrupt routing of one virtio-pci function.
pub struct InterruptState {
    msix: Arc<Mutex<MsixConfig>>,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    isr: AtomicU8,
    config_generation: AtomicU8,
}

impl InterruptState {
    /// Routing for `num_queues` queues over `msix`, every source unmapped.
    pub fn new(msix: Arc<Mutex<MsixConfig>>, num_queues: usize) -> Self {
        Self {
            msix,
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..num_queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            isr: AtomicU8::new(0),
            config_generation: AtomicU8::new(0),
        }
    }

    /// The MSI-X state; a panic elsewhere while holding it leaves plain data
    /// behind, so a poisoned lock is still used.
    pub fn msix(&self) -> MutexGuard<'_, MsixConfig> {
        self.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Vector the driver assigned to configuration changes.
    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    /// Vector of queue `index` ([`NO_VECTOR`] for a missing queue).
    pub fn queue_vector(&self, index: u16) -> u16 {
        self.queue_vectors
            .get(usize::from(index))
            .map_or(NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    /// Set the config vector; out-of-range vectors become [`NO_VECTOR`].
    /// Returns what was stored (what the driver reads back).
    pub fn set_config_vector(&self, vector: u16) -> u16 {
        let vector = self.checked_vector(vector);
        self.config_vector.store(vector, Ordering::Release);
        vector
    }

    /// Set queue `index`'s vector; out-of-range vectors become [`NO_VECTOR`].
    pub fn set_queue_vector(&self, index: u16, vector: u16) {
        let vector = self.checked_vector(vector);
        if let Some(v) = self.queue_vectors.get(usize::from(index)) {
            v.store(vector, Ordering::Release);
        }
    }

    /// Read and clear the ISR status byte.
    pub fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    /// Current `config_generation`.
    pub fn config_generation(&self) -> u8 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Back to the post-reset state: every source unmapped, ISR clear.
    pub fn reset(&self) {
        self.config_vector.store(NO_VECTOR, Ordering::Release);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::Release);
        }
        self.isr.store(0, Ordering::Release);
    }

    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix().num_vectors() {
            vector
        } else {
            NO_VECTOR
        }
    }
}

impl VirtioInterrupt for InterruptState {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        let vector = match kind {
            InterruptKind::Queue(index) => {
                if usize::from(index) >= self.queue_vectors.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("no queue {index}"),
                    ));
                }
                self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
                self.queue_vector(index)
            }
            InterruptKind::Config => {
                self.config_generation.fetch_add(1, Ordering::AcqRel);
                self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
                self.config_vector()
            }
        };
        if vector == NO_VECTOR {
            return Ok(());
        }
        self.msix().trigger(vector)
    }
}
