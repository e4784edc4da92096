//! virtio-blk over a raw image file.
//!
//! - [`request`]: the pure request parser and its validation rules.
//! - [`disk`]: the image file and the `pread`/`pwrite` into guest RAM.
//! - [`handler`]: the queue logic (parse, execute, status, used ring).
//!
//! Offered features: `VERSION_1`, `RING_EVENT_IDX`, `FLUSH`, `SEG_MAX`,
//! `BLK_SIZE`, and `RO` for read-only images. Requests: `IN`, `OUT`, `FLUSH`,
//! `GET_ID`; anything else gets `VIRTIO_BLK_S_UNSUPP`. On a read-only image
//! `OUT` gets `VIRTIO_BLK_S_IOERR`.

pub mod disk;
pub mod handler;
pub mod request;

use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};

pub use disk::{Disk, DiskError};
pub use handler::{BlockHandler, BlockMetrics};
pub use request::{ParseError, Request, RequestType, MAX_REQUEST_BYTES, SECTOR_SIZE};

use crate::worker::{DeviceWorker, QueueWorker, WorkerOptions};
use crate::{
    device_type, ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request advertised in `seg_max`; with the header and
/// status a request fits the ring without indirect descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Descriptors accepted per chain.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Logical block size advertised in `blk_size`.
pub const BLOCK_SIZE: u32 = 512;
/// Length of the configuration space we expose (through `blk_size`).
const CONFIG_LEN: usize = 24;

/// How to build a block device.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    /// Device id, used in logs and, truncated to 20 bytes, as the serial
    /// returned by `GET_ID`.
    pub id: String,
    /// Path of the raw image.
    pub path: PathBuf,
    /// Open `O_RDONLY`, offer `VIRTIO_BLK_F_RO` and fail writes.
    pub read_only: bool,
}

/// The virtio-blk device.
pub struct Block {
    id: String,
    disk: Arc<Disk>,
    config_space: [u8; CONFIG_LEN],
    acked_features: u64,
    options: WorkerOptions,
    metrics: Arc<BlockMetrics>,
    worker: DeviceWorker<QueueWorker<BlockHandler>>,
}

impl Block {
    /// Opens the image of `config`; the worker thread follows `options`.
    pub fn new(config: BlockConfig, options: WorkerOptions) -> Result<Self, DiskError> {
        let disk = Disk::open(&config.path, config.read_only)?;
        Ok(Block {
            config_space: config_space(disk.capacity()),
            disk: Arc::new(disk),
            id: config.id,
            acked_features: 0,
            options,
            metrics: Arc::default(),
            worker: DeviceWorker::default(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }
}

/// `struct virtio_blk_config` up to `blk_size`: capacity, size_max (0),
/// seg_max, geometry (0), blk_size.
fn config_space(capacity: u64) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    config[0..8].copy_from_slice(&capacity.to_le_bytes());
    config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    config[20..24].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
    config
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        let mut features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if self.disk.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.device_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config_space, offset, data);
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
        let handler = BlockHandler::new(self.disk.clone(), &self.id, self.metrics.clone());
        let name = format!("virtio-blk-{}", self.id);
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

#[cfg(test)]
mod tests;
