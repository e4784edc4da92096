//! The common configuration structure (virtio spec §4.1.4.3).
//!
//! ```text
//! 0x00 le32 device_feature_select   0x16 le16 queue_select
//! 0x04 le32 device_feature          0x18 le16 queue_size
//! 0x08 le32 driver_feature_select   0x1a le16 queue_msix_vector
//! 0x0c le32 driver_feature          0x1c le16 queue_enable
//! 0x10 le16 config_msix_vector      0x1e le16 queue_notify_off
//! 0x12 le16 num_queues              0x20 le64 queue_desc
//! 0x14 u8   device_status           0x28 le64 queue_driver
//! 0x15 u8   config_generation       0x30 le64 queue_device
//! ```
//!
//! Reads of any width are served from a snapshot of the structure (no read
//! has side effects). Writes must use the field's width — 64-bit fields
//! also as two 32-bit halves — anything else is dropped.

use ferro_virtio::{GuestMemoryMmap, Queue, QueueT};
use vm_memory::GuestAddress;

use super::VirtioPciDevice;
use ferro_virtio::warn_limited;

/// Length of the structure advertised in its capability.
pub(super) const COMMON_CFG_SIZE: u32 = 0x38;

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

/// Largest queue size virtio-queue accepts.
const MAX_QUEUE_SIZE: u16 = 32768;

/// What the driver programmed for one queue; turned into a [`Queue`] at
/// activation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueConfig {
    /// A queue of at most `max_size` entries, or `None` if that size is
    /// not a power of two in 1..=32768.
    pub fn new(max_size: u16) -> Option<Self> {
        (max_size.is_power_of_two() && max_size <= MAX_QUEUE_SIZE).then_some(Self {
            max_size,
            size: max_size,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        })
    }

    fn reset(&mut self) {
        *self = Self {
            max_size: self.max_size,
            size: self.max_size,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        };
    }

    fn address_mut(&mut self, field: u64) -> &mut u64 {
        match field {
            QUEUE_DESC => &mut self.desc,
            QUEUE_DRIVER => &mut self.driver,
            _ => &mut self.device,
        }
    }

    /// The [`Queue`] the driver described, if it is usable with `mem`.
    pub fn build(&self, event_idx: bool, mem: &GuestMemoryMmap) -> Option<Queue> {
        let mut queue = Queue::new(self.max_size).ok()?;
        queue.try_set_size(self.size).ok()?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .ok()?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .ok()?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .ok()?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        queue.is_valid(mem).then_some(queue)
    }
}

/// Transport-side state of the common configuration.
#[derive(Debug)]
pub(super) struct CommonConfig {
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub queue_select: u16,
    pub queues: Vec<QueueConfig>,
}

impl CommonConfig {
    pub fn new(queues: Vec<QueueConfig>) -> Self {
        Self {
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues,
        }
    }

    /// Back to the state after a device reset.
    pub fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        self.queues.iter_mut().for_each(QueueConfig::reset);
    }

    fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn selected_mut(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(usize::from(self.queue_select))
    }
}

/// The 32-bit window `select` of a 64-bit feature word.
fn feature_window(features: u64, select: u32) -> u32 {
    match select {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

fn put(image: &mut [u8], offset: u64, bytes: &[u8]) {
    let start = offset as usize;
    image[start..start + bytes.len()].copy_from_slice(bytes);
}

/// `data` as a little-endian integer; only the first 8 bytes count.
fn le_value(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let len = data.len().min(8);
    bytes[..len].copy_from_slice(&data[..len]);
    u64::from_le_bytes(bytes)
}

impl VirtioPciDevice {
    /// The structure as the driver would read it now.
    fn common_image(&self) -> [u8; COMMON_CFG_SIZE as usize] {
        let c = &self.common;
        let mut image = [0u8; COMMON_CFG_SIZE as usize];
        let device_features =
            feature_window(self.device.device_features(), c.device_feature_select);
        put(
            &mut image,
            DEVICE_FEATURE_SELECT,
            &c.device_feature_select.to_le_bytes(),
        );
        put(&mut image, DEVICE_FEATURE, &device_features.to_le_bytes());
        put(
            &mut image,
            DRIVER_FEATURE_SELECT,
            &c.driver_feature_select.to_le_bytes(),
        );
        put(
            &mut image,
            DRIVER_FEATURE,
            &feature_window(c.driver_features, c.driver_feature_select).to_le_bytes(),
        );
        put(
            &mut image,
            CONFIG_MSIX_VECTOR,
            &self.interrupt.config_vector().to_le_bytes(),
        );
        put(
            &mut image,
            NUM_QUEUES,
            &(c.queues.len() as u16).to_le_bytes(),
        );
        put(&mut image, DEVICE_STATUS, &[c.status]);
        put(
            &mut image,
            CONFIG_GENERATION,
            &[self.interrupt.config_generation()],
        );
        put(&mut image, QUEUE_SELECT, &c.queue_select.to_le_bytes());
        put(
            &mut image,
            QUEUE_MSIX_VECTOR,
            &self.interrupt.queue_vector(c.queue_select).to_le_bytes(),
        );
        if let Some(q) = c.selected() {
            put(&mut image, QUEUE_SIZE, &q.size.to_le_bytes());
            put(&mut image, QUEUE_ENABLE, &u16::from(q.ready).to_le_bytes());
            put(&mut image, QUEUE_NOTIFY_OFF, &c.queue_select.to_le_bytes());
            put(&mut image, QUEUE_DESC, &q.desc.to_le_bytes());
            put(&mut image, QUEUE_DRIVER, &q.driver.to_le_bytes());
            put(&mut image, QUEUE_DEVICE, &q.device.to_le_bytes());
        }
        image
    }

    pub(super) fn common_read(&self, offset: u64, data: &mut [u8]) {
        let image = self.common_image();
        let start = offset as usize;
        match image.get(start..start + data.len()) {
            Some(bytes) if matches!(data.len(), 1 | 2 | 4 | 8) => data.copy_from_slice(bytes),
            _ => warn_limited!(
                id = self.device.id(),
                offset,
                len = data.len(),
                "invalid common config read"
            ),
        }
    }

    pub(super) fn common_write(&mut self, offset: u64, data: &[u8]) {
        let value = le_value(data);
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.common.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.common.driver_feature_select = value as u32,
            (DRIVER_FEATURE, 4) => self.write_driver_features(value as u32),
            (CONFIG_MSIX_VECTOR, 2) => {
                self.interrupt.set_config_vector(value as u16);
            }
            (DEVICE_STATUS, 1) => self.set_status(value as u8),
            (QUEUE_SELECT, 2) => self.common.queue_select = value as u16,
            (QUEUE_MSIX_VECTOR, 2) => self
                .interrupt
                .set_queue_vector(self.common.queue_select, value as u16),
            (QUEUE_SIZE, 2) | (QUEUE_ENABLE, 2) => self.write_queue_field(offset, value as u16),
            (QUEUE_DESC..0x38, 4 | 8) if offset % data.len() as u64 == 0 => {
                self.write_queue_address(offset, data)
            }
            _ => warn_limited!(
                id = self.device.id(),
                offset,
                len = data.len(),
                "invalid common config write"
            ),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.common.status & super::status::FEATURES_OK != 0 {
            warn_limited!(
                id = self.device.id(),
                "driver features written after FEATURES_OK"
            );
            return;
        }
        let features = &mut self.common.driver_features;
        match self.common.driver_feature_select {
            0 => *features = (*features & !0xffff_ffff) | u64::from(value),
            1 => *features = (*features & 0xffff_ffff) | u64::from(value) << 32,
            _ => {}
        }
    }

    /// The selected queue, if the driver may still configure it: it exists,
    /// is not enabled yet and the device is not live.
    fn configurable_queue(&mut self) -> Option<&mut QueueConfig> {
        let live = self.common.status & super::status::DRIVER_OK != 0;
        if live || self.common.selected().is_none_or(|q| q.ready) {
            let queue = self.common.queue_select;
            warn_limited!(
                id = self.device.id(),
                queue,
                "write to a missing, enabled or live queue"
            );
            return None;
        }
        self.common.selected_mut()
    }

    fn write_queue_field(&mut self, offset: u64, value: u16) {
        let Some(q) = self.configurable_queue() else {
            return;
        };
        match offset {
            QUEUE_SIZE if value.is_power_of_two() && value <= q.max_size => q.size = value,
            QUEUE_ENABLE if value == 1 => q.ready = true,
            _ => warn_limited!(offset, value, "invalid queue_size or queue_enable value"),
        }
    }

    fn write_queue_address(&mut self, offset: u64, data: &[u8]) {
        let Some(q) = self.configurable_queue() else {
            return;
        };
        let field = offset & !7;
        let address = q.address_mut(field);
        let value = le_value(data);
        *address = match (offset - field, data.len()) {
            (0, 8) => value,
            (0, _) => (*address & !0xffff_ffff) | value,
            _ => (*address & 0xffff_ffff) | value << 32,
        };
    }
}
