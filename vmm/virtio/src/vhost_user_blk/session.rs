//! One connection to a vhost-user backend, on rust-vmm's `vhost` frontend.
//!
//! [`Session::connect`] negotiates what every connection needs (owner,
//! features, the `CONFIG` protocol feature); [`Session::start`] hands the
//! backend the guest's memory (memfd regions with `SET_MEM_TABLE`) and the
//! rings. Ring indices come from the guest's own used ring, so a session
//! started after the backend restarted resumes where the guest's completed
//! requests end: requests the old backend took but never completed are
//! executed again.

use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::Ordering;

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::{ActivatedQueue, GuestMemoryMmap, VIRTIO_F_VERSION_1};

/// Errors talking to the backend.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A protocol step failed (including a backend that went away).
    #[error("vhost-user {0} failed")]
    Protocol(&'static str, #[source] vhost::Error),
    /// The backend lacks something we need.
    #[error("the backend does not offer {0}")]
    Missing(&'static str),
    /// A guest memory region has no file to share, or a ring is not in RAM.
    #[error("guest memory cannot be shared: {0}")]
    Memory(&'static str),
}

fn step(name: &'static str) -> impl FnOnce(vhost::Error) -> SessionError {
    move |e| SessionError::Protocol(name, e)
}

/// A negotiated connection.
pub struct Session {
    frontend: Frontend,
    features: u64,
}

impl Session {
    /// Connects to `socket` and negotiates owner, features and `CONFIG`.
    pub fn connect(socket: &Path, num_queues: usize) -> Result<Self, SessionError> {
        let mut frontend = Frontend::connect(socket, num_queues as u64).map_err(step("connect"))?;
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(SessionError::Missing("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(SessionError::Missing("VIRTIO_F_VERSION_1"));
        }
        let protocol = frontend
            .get_protocol_features()
            .map_err(step("GET_PROTOCOL_FEATURES"))?;
        if !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(SessionError::Missing("VHOST_USER_PROTOCOL_F_CONFIG"));
        }
        frontend
            .set_protocol_features(VhostUserProtocolFeatures::CONFIG)
            .map_err(step("SET_PROTOCOL_FEATURES"))?;
        Ok(Session { frontend, features })
    }

    /// The virtio features the backend offers (without the vhost-user bit).
    pub fn features(&self) -> u64 {
        self.features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// The first `len` bytes of the device config space.
    pub fn read_config(&mut self, len: usize) -> Result<Vec<u8>, SessionError> {
        let (_, config) = self
            .frontend
            .get_config(0, len as u32, VhostUserConfigFlags::WRITABLE, &vec![0; len])
            .map_err(step("GET_CONFIG"))?;
        Ok(config)
    }

    /// Shares guest memory and starts every queue: the guest's notify
    /// eventfd becomes the ring's kick, `calls[i]` its call. Each kick is
    /// signalled once, so requests the guest queued while no backend was
    /// there are picked up.
    pub fn start(
        &mut self,
        acked_features: u64,
        mem: &GuestMemoryMmap,
        queues: &[ActivatedQueue],
        calls: &[EventFd],
    ) -> Result<(), SessionError> {
        let features = acked_features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        self.frontend
            .set_features(features)
            .map_err(step("SET_FEATURES"))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| SessionError::Memory("a region is not backed by a file"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(step("SET_MEM_TABLE"))?;
        for (q, call) in queues.iter().zip(calls) {
            self.start_queue(mem, q, call)?;
        }
        for q in queues {
            // The kick is the guest's own doorbell eventfd; one more count
            // only makes the backend look at the ring.
            let _ = q.notify.write(1);
        }
        Ok(())
    }

    fn start_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        q: &ActivatedQueue,
        call: &EventFd,
    ) -> Result<(), SessionError> {
        let i = usize::from(q.index);
        let queue = &q.queue;
        let hva = |gpa: u64| {
            mem.get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|_| SessionError::Memory("a ring is outside guest RAM"))
        };
        let config = VringConfigData {
            queue_max_size: queue.max_size(),
            queue_size: queue.size(),
            flags: 0,
            desc_table_addr: hva(queue.desc_table())?,
            used_ring_addr: hva(queue.used_ring())?,
            avail_ring_addr: hva(queue.avail_ring())?,
            log_addr: None,
        };
        let Wrapping(base) = queue
            .used_idx(mem, Ordering::Acquire)
            .map_err(|_| SessionError::Memory("the used ring is unreadable"))?;
        let f = &mut self.frontend;
        f.set_vring_num(i, queue.size())
            .map_err(step("SET_VRING_NUM"))?;
        f.set_vring_addr(i, &config)
            .map_err(step("SET_VRING_ADDR"))?;
        f.set_vring_base(i, base).map_err(step("SET_VRING_BASE"))?;
        f.set_vring_call(i, call).map_err(step("SET_VRING_CALL"))?;
        f.set_vring_kick(i, &q.notify)
            .map_err(step("SET_VRING_KICK"))?;
        f.set_vring_enable(i, true)
            .map_err(step("SET_VRING_ENABLE"))?;
        Ok(())
    }

    /// Stops queues `0..n` (`GET_VRING_BASE`), as on a device reset.
    pub fn stop(&mut self, n: usize) -> Result<(), SessionError> {
        for i in 0..n {
            self.frontend
                .get_vring_base(i)
                .map_err(step("GET_VRING_BASE"))?;
        }
        Ok(())
    }
}

impl AsRawFd for Session {
    fn as_raw_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }
}
