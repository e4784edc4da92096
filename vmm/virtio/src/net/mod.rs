//! virtio-net over a TAP interface.
//!
//! - [`tap`]: opening and configuring the TAP.
//! - [`handler`]: rx/tx logic, generic over [`NetBackend`] so it is tested
//!   with frames in memory.
//! - [`NetWorker`]: the epoll glue (rx notify, tx notify, TAP readable).
//!
//! Offered features: `VERSION_1`, `RING_EVENT_IDX`, `MAC`, `STATUS` (link
//! always up), `CSUM`, `GUEST_CSUM`, `GUEST_TSO4/6`, `GUEST_ECN`,
//! `HOST_TSO4/6`, `HOST_ECN`. The vnet header passes through unchanged in
//! both directions, so the TAP does the segmentation and checksum work;
//! negotiated `GUEST_*` offloads become the TAP's `TUNSETOFFLOAD`. Not
//! offered: `MRG_RXBUF` (every rx frame uses one chain, Linux then posts
//! 64 KiB "big packet" chains when it accepts TSO), UFO/USO, `MQ`, `CTRL_VQ`.

pub mod handler;
pub mod tap;

#[cfg(test)]
mod tests;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use vmm_sys_util::epoll::EventSet;

pub use handler::{
    NetBackend, NetHandler, NetMetrics, MAX_BUFFER_LEN, MAX_FRAME_LEN, VNET_HDR_LEN,
};
pub use tap::{Tap, TapError};

use crate::ratelimit::LogRateLimiter;
use crate::worker::{drain_eventfd, signal, DeviceWorker, EventHandler, Source, WorkerOptions};
use crate::{
    device_type, ActivateError, ActivatedQueue, GuestMemoryMmap, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: u16 = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: u16 = 1;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const BACKEND_TOKEN: u64 = 2;

/// How to build a net device.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Device id for logs.
    pub id: String,
    /// TAP interface to attach to. `Tap::open` would create a missing one
    /// when permitted; ferro-vmm refuses missing TAPs before calling it.
    pub tap_name: String,
    /// MAC address reported to the guest.
    pub mac: [u8; 6],
}

/// Epoll glue of the net device: rx/tx notifications and backend readiness.
pub struct NetWorker<B: NetBackend + AsRawFd> {
    mem: GuestMemoryMmap,
    rx: ActivatedQueue,
    tx: ActivatedQueue,
    interrupt: Arc<dyn VirtioInterrupt>,
    handler: NetHandler<B>,
    limiter: LogRateLimiter,
}

impl<B: NetBackend + AsRawFd> NetWorker<B> {
    /// Glue `handler` to the rx and tx queues.
    pub fn new(
        mem: GuestMemoryMmap,
        rx: ActivatedQueue,
        tx: ActivatedQueue,
        interrupt: Arc<dyn VirtioInterrupt>,
        handler: NetHandler<B>,
    ) -> Self {
        NetWorker {
            mem,
            rx,
            tx,
            interrupt,
            handler,
            limiter: LogRateLimiter::default(),
        }
    }

    /// The sources to register: both notify eventfds and the backend fd
    /// (edge-triggered: the handler reads until `EAGAIN` or remembers).
    pub fn sources(&self) -> [Source; 3] {
        [
            Source {
                fd: self.rx.notify.as_raw_fd(),
                token: RX_TOKEN,
                events: EventSet::IN,
            },
            Source {
                fd: self.tx.notify.as_raw_fd(),
                token: TX_TOKEN,
                events: EventSet::IN,
            },
            Source {
                fd: self.handler.backend().as_raw_fd(),
                token: BACKEND_TOKEN,
                events: EventSet::IN | EventSet::EDGE_TRIGGERED,
            },
        ]
    }

    fn run_rx(&mut self) {
        let result = self.handler.process_rx(&self.mem, &mut self.rx.queue);
        self.finish(result, self.rx.index);
    }

    fn run_tx(&mut self) {
        let result = self.handler.process_tx(&self.mem, &mut self.tx.queue);
        self.finish(result, self.tx.index);
    }

    fn finish(&self, result: Result<bool, crate::chain::QueueError>, index: u16) {
        match result {
            Ok(true) => signal(&*self.interrupt, index, &self.limiter),
            Ok(false) => {}
            Err(e) => {
                crate::warn_ratelimited!(self.limiter, queue = index, error = %e, "net queue processing failed")
            }
        }
    }
}

impl<B: NetBackend + AsRawFd> EventHandler for NetWorker<B> {
    fn on_start(&mut self) {
        self.handler.set_backend_readable();
        self.run_rx();
        self.run_tx();
    }

    fn handle_event(&mut self, token: u64, _events: EventSet) {
        match token {
            RX_TOKEN => {
                drain_eventfd(&self.rx.notify);
                self.run_rx();
            }
            TX_TOKEN => {
                drain_eventfd(&self.tx.notify);
                self.run_tx();
            }
            BACKEND_TOKEN => {
                self.handler.set_backend_readable();
                self.run_rx();
            }
            _ => {}
        }
    }
}

/// The virtio-net device.
pub struct Net {
    id: String,
    tap: Arc<Tap>,
    config_space: [u8; 8],
    acked_features: u64,
    options: WorkerOptions,
    metrics: Arc<NetMetrics>,
    worker: DeviceWorker<NetWorker<Arc<Tap>>>,
}

impl Net {
    /// Opens the TAP of `config`; the worker thread follows `options`.
    pub fn new(config: NetConfig, options: WorkerOptions) -> Result<Self, TapError> {
        let tap = Tap::open(&config.tap_name)?;
        Ok(Self::with_tap(config.id, tap, config.mac, options))
    }

    /// A device over an already open TAP.
    pub fn with_tap(id: String, tap: Tap, mac: [u8; 6], options: WorkerOptions) -> Self {
        let mut config_space = [0u8; 8];
        config_space[..6].copy_from_slice(&mac);
        config_space[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Net {
            id,
            tap: Arc::new(tap),
            config_space,
            acked_features: 0,
            options,
            metrics: Arc::default(),
            worker: DeviceWorker::default(),
        }
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// The TAP interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }
}

/// `TUN_F_*` offloads matching the negotiated `GUEST_*` features: what the
/// TAP may hand to the guest.
pub fn tap_offload_flags(acked_features: u64) -> u32 {
    let has = |bit: u32| acked_features & (1u64 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    flags
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
        ]
        .iter()
        .fold(0, |acc, bit| acc | (1u64 << bit))
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
        crate::prepare_queues(&mut queues, 2, &mem, self.acked_features)?;
        self.tap
            .set_offload(tap_offload_flags(self.acked_features))
            .map_err(|e| ActivateError::Backend(std::io::Error::other(e)))?;
        let tx = queues.remove(1);
        let rx = queues.remove(0);
        let handler = NetHandler::new(self.tap.clone(), self.metrics.clone());
        let glue = NetWorker::new(mem, rx, tx, interrupt, handler);
        let sources = glue.sources();
        let name = format!("virtio-net-{}", self.id);
        self.worker.start(&name, glue, &sources, &self.options)
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
