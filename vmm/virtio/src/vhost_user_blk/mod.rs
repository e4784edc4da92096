//! virtio-blk served by a vhost-user backend (such as `ferro-blockd`).
//!
//! - [`session`]: the vhost-user protocol with one backend (rust-vmm's
//!   `vhost` frontend): negotiation, `SET_MEM_TABLE`, the rings.
//! - [`connection`]: the thread that owns the session, turns the backend's
//!   call eventfds into queue interrupts, and reconnects a lost backend.
//!
//! The device connects at construction: the backend decides the features
//! (masked to those whose config fields we read) and the config space
//! (capacity, seg_max, blk_size, …, read once with `GET_CONFIG`). Guest RAM
//! must be file-backed (memfd) so the backend can map it.

pub mod connection;
pub mod session;

use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
};

pub use self::connection::{Activation, Link};
pub use self::session::{Session, SessionError};
use crate::worker::WorkerOptions;
use crate::{
    device_type, ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Queues of the device.
const NUM_QUEUES: usize = 1;
/// Size of the request queue offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Config bytes read from the backend: `struct virtio_blk_config` up to
/// `blk_size`, all the features below describe.
const CONFIG_LEN: usize = 24;
/// `VIRTIO_RING_F_INDIRECT_DESC`.
const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;

/// Features passed through from the backend to the driver.
const PASSED_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_BLK_F_SIZE_MAX)
    | (1 << VIRTIO_BLK_F_SEG_MAX)
    | (1 << VIRTIO_BLK_F_GEOMETRY)
    | (1 << VIRTIO_BLK_F_RO)
    | (1 << VIRTIO_BLK_F_BLK_SIZE)
    | (1 << VIRTIO_BLK_F_FLUSH);

/// How to build a vhost-user-blk device.
#[derive(Clone, Debug)]
pub struct VhostUserBlkConfig {
    /// Device id for logs and thread names.
    pub id: String,
    /// The backend's socket.
    pub socket: PathBuf,
}

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserBlkError {
    /// The first connection failed.
    #[error("cannot set up vhost-user-blk backend {0}")]
    Session(String, #[source] SessionError),
    /// The connection thread could not be started.
    #[error("cannot start the vhost-user thread")]
    Thread(#[source] std::io::Error),
}

/// The vhost-user-blk device.
pub struct VhostUserBlk {
    id: String,
    features: u64,
    acked_features: u64,
    config_space: Vec<u8>,
    link: Link,
}

impl VhostUserBlk {
    /// Connects to the backend of `config`, reads its features and config,
    /// and starts the connection thread (which runs `options`' hook).
    pub fn new(
        config: VhostUserBlkConfig,
        options: WorkerOptions,
    ) -> Result<Self, VhostUserBlkError> {
        let socket = config.socket.display().to_string();
        let session_err = |e| VhostUserBlkError::Session(socket.clone(), e);
        let mut session = Session::connect(&config.socket, NUM_QUEUES).map_err(session_err)?;
        let config_space = session.read_config(CONFIG_LEN).map_err(session_err)?;
        let features = session.features() & PASSED_FEATURES;
        let name = format!("vhost-user-blk-{}", config.id);
        let link = Link::spawn(
            &name,
            config.socket,
            session,
            NUM_QUEUES,
            options.thread_init,
        )
        .map_err(VhostUserBlkError::Thread)?;
        Ok(VhostUserBlk {
            id: config.id,
            features,
            acked_features: 0,
            config_space,
            link,
        })
    }

    /// Capacity in 512-byte sectors, as the backend reported it.
    pub fn capacity(&self) -> u64 {
        let mut b = [0u8; 8];
        crate::read_config_bytes(&self.config_space, 0, &mut b);
        u64::from_le_bytes(b)
    }
}

impl VirtioDevice for VhostUserBlk {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features;
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
        crate::prepare_queues(&mut queues, NUM_QUEUES, &mem, self.acked_features)?;
        self.link.activate(Activation {
            mem,
            interrupt,
            queues,
            features: self.acked_features,
        });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.acked_features = 0;
        self.link.reset()
    }

    fn id(&self) -> &str {
        &self.id
    }
}
