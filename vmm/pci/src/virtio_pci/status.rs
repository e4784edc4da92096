//! The `device_status` state machine, activation and reset (virtio spec
//! §2.1, §3.1).
//!
//! - Writing 0 resets: an active device is stopped with
//!   [`VirtioDevice::reset`](ferro_virtio::VirtioDevice::reset), its
//!   ioeventfds are unregistered and every transport register returns to
//!   its initial value (MSI-X table excluded: it is PCI state).
//! - Any other write may only add bits. `FEATURES_OK` sticks only if the
//!   driver accepted a subset of the offer that includes `VERSION_1`; the
//!   device is then told the features.
//! - `DRIVER_OK` (after `FEATURES_OK`) builds a [`Queue`](ferro_virtio::Queue) for each enabled
//!   queue, validates it against guest memory and activates the device. If
//!   that fails the device reports `DEVICE_NEEDS_RESET`.

use std::io;

use ferro_virtio::{ActivateError, ActivatedQueue, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{VirtioPciDevice, NOTIFY_CFG_OFFSET, NOTIFY_OFF_MULTIPLIER};
use ferro_virtio::warn_limited;

/// The driver found the device.
pub const ACKNOWLEDGE: u8 = 1;
/// The driver knows how to drive it.
pub const DRIVER: u8 = 2;
/// The driver is ready.
pub const DRIVER_OK: u8 = 4;
/// Feature negotiation is complete.
pub const FEATURES_OK: u8 = 8;
/// The device hit an error it cannot recover from without a reset.
pub const DEVICE_NEEDS_RESET: u8 = 0x40;
/// The driver gave up on the device.
pub const FAILED: u8 = 0x80;

/// Why `DRIVER_OK` did not start the device.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// An enabled queue's size or addresses are unusable.
    #[error("queue {0} is invalid")]
    InvalidQueue(u16),
    /// An eventfd for a queue notification could not be created.
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] io::Error),
    /// The device refused to start.
    #[error("device activation failed")]
    Device(#[source] ActivateError),
}

impl VirtioPciDevice {
    pub(super) fn set_status(&mut self, value: u8) {
        if value == 0 {
            return self.reset();
        }
        let sticky = self.common.status & DEVICE_NEEDS_RESET;
        let old = self.common.status & !DEVICE_NEEDS_RESET;
        if value & old != old {
            warn_limited!(
                id = self.device.id(),
                old,
                value,
                "driver cleared device status bits"
            );
            return;
        }
        let added = value & !old;
        let mut status = value;
        if added & FEATURES_OK != 0 && !self.accept_features() {
            status &= !FEATURES_OK;
        }
        if added & DRIVER_OK != 0 {
            status = self.driver_ok(status);
        }
        self.common.status = status | sticky;
    }

    /// Check the driver's feature selection; on success tell the device.
    fn accept_features(&mut self) -> bool {
        let offered = self.device.device_features();
        let accepted = self.common.driver_features;
        let unoffered = accepted & !offered;
        let version_1 = accepted & (1 << VIRTIO_F_VERSION_1) != 0;
        if unoffered != 0 || !version_1 {
            warn_limited!(
                id = self.device.id(),
                accepted,
                offered,
                "refusing FEATURES_OK"
            );
            return false;
        }
        self.device.ack_features(accepted);
        true
    }

    /// Handle `DRIVER_OK` being set in `status`; returns the status to keep.
    fn driver_ok(&mut self, status: u8) -> u8 {
        if status & FEATURES_OK == 0 {
            warn_limited!(id = self.device.id(), "DRIVER_OK without FEATURES_OK");
            return status & !DRIVER_OK;
        }
        if self.activated {
            return status;
        }
        match self.activate() {
            Ok(()) => status,
            Err(e) => {
                tracing::error!(
                    id = self.device.id(),
                    error = &e as &dyn std::error::Error,
                    "cannot activate virtio device"
                );
                status | DEVICE_NEEDS_RESET
            }
        }
    }

    fn activate(&mut self) -> Result<(), ActivationError> {
        let event_idx = self.common.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::new();
        let mut fds: Vec<Option<EventFd>> = (0..self.common.queues.len()).map(|_| None).collect();
        for (index, config) in self
            .common
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready)
        {
            let index = index as u16;
            let queue = config
                .build(event_idx, &self.mem)
                .ok_or(ActivationError::InvalidQueue(index))?;
            let notify = EventFd::new(EFD_NONBLOCK).map_err(ActivationError::EventFd)?;
            fds[usize::from(index)] = Some(notify.try_clone().map_err(ActivationError::EventFd)?);
            queues.push(ActivatedQueue {
                index,
                queue,
                notify,
            });
        }
        let interrupt = self.interrupt.clone();
        self.device
            .activate(self.mem.clone(), interrupt, queues)
            .map_err(ActivationError::Device)?;
        self.notify_fds = fds;
        self.activated = true;
        self.register_ioeventfds();
        Ok(())
    }

    fn reset(&mut self) {
        if self.activated {
            if !self.device.reset() {
                tracing::warn!(id = self.device.id(), "virtio device could not be reset");
            }
            self.unregister_ioeventfds();
            self.notify_fds.clear();
            self.activated = false;
        }
        self.common.reset();
        self.interrupt.reset();
    }

    fn notify_addresses(&self, base: u64) -> impl Iterator<Item = (u64, &EventFd)> {
        let stride = u64::from(NOTIFY_OFF_MULTIPLIER);
        self.notify_fds
            .iter()
            .enumerate()
            .filter_map(move |(i, fd)| {
                Some((base + NOTIFY_CFG_OFFSET + i as u64 * stride, fd.as_ref()?))
            })
    }

    /// Register each active queue's eventfd at its notify address, if the
    /// BAR is decoded.
    pub(super) fn register_ioeventfds(&mut self) {
        let Some(base) = self.bar_address else { return };
        for (address, fd) in self.notify_addresses(base) {
            if let Err(e) = self.ioevents.register(address, fd) {
                tracing::warn!(id = self.device.id(), address, error = %e, "cannot register ioeventfd");
            }
        }
        self.ioevent_base = Some(base);
    }

    pub(super) fn unregister_ioeventfds(&mut self) {
        let Some(base) = self.ioevent_base.take() else {
            return;
        };
        for (address, fd) in self.notify_addresses(base) {
            if let Err(e) = self.ioevents.unregister(address, fd) {
                tracing::warn!(id = self.device.id(), address, error = %e, "cannot unregister ioeventfd");
            }
        }
    }
}
