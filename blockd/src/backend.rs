//! The vhost-user-blk device as `vhost-user-backend` sees it: features,
//! the config space the frontend reads with `GET_CONFIG`, and the queue
//! loop run when the frontend kicks. The requests of one pass over the
//! queue go to [`RequestHandler`](crate::handler::RequestHandler) as one
//! batch and are completed, in order, with one signal. After emptying the
//! ring the queue thread polls it briefly ([`poll_window`]) before it
//! sleeps until the next kick.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::handler::{collect, GuestMemoryMmap, RequestHandler};
use crate::request::MAX_SEGMENTS;

/// Size of the one request queue.
pub const QUEUE_SIZE: usize = 256;
/// Data segments per request advertised in `seg_max` (header and status
/// take the other two descriptors).
pub const SEG_MAX: u32 = MAX_SEGMENTS as u32 - 2;
/// Logical block size advertised in `blk_size`.
pub const BLOCK_SIZE: u32 = 512;
/// Length of the config space we serve (`struct virtio_blk_config` up to
/// `blk_size`).
const CONFIG_LEN: usize = 24;

/// One volume's vhost-user-blk device.
pub struct BlockBackend {
    handler: RequestHandler,
    mem: Mutex<GuestMemoryAtomic<GuestMemoryMmap>>,
    event_idx: AtomicBool,
    config: [u8; CONFIG_LEN],
}

impl BlockBackend {
    /// A device executing requests with `handler`.
    pub fn new(handler: RequestHandler, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> Self {
        BlockBackend {
            config: config_space(handler.capacity()),
            handler,
            mem: Mutex::new(mem),
            event_idx: AtomicBool::new(false),
        }
    }

    /// One pass over the queue: pops every available request, executes
    /// them as one batch (their writes' replication overlaps) and puts them
    /// on the used ring in the order they came; false if there were none.
    fn pass(&self, vring: &VringRwLock) -> io::Result<bool> {
        let mem = self.mem.lock().unwrap_or_else(|e| e.into_inner()).memory();
        let (mut heads, mut chains) = (Vec::new(), Vec::new());
        {
            let mut vring = vring.get_mut();
            let queue = vring.get_queue_mut();
            while let Some(chain) = queue.pop_descriptor_chain(mem.clone()) {
                heads.push(chain.head_index());
                chains.push(collect(chain));
            }
        }
        if chains.is_empty() {
            return Ok(false);
        }
        let lens = self.handler.handle_batch(&mem, &chains);
        for (head, len) in heads.into_iter().zip(lens) {
            vring
                .add_used(head, len)
                .map_err(|e| io::Error::other(format!("cannot add used entry: {e}")))?;
        }
        Ok(true)
    }

    /// The queue loop: a pass and one signal for it, until a pass finds
    /// nothing; with `EVENT_IDX`, again for requests that raced the
    /// re-enabled notifications.
    fn process(&self, vring: &VringRwLock) -> io::Result<()> {
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let queue_err = |e| io::Error::other(format!("virtqueue: {e}"));
        loop {
            if event_idx {
                vring.disable_notification().map_err(queue_err)?;
            }
            loop {
                // Held from popping to signalling: a store stopped for
                // good (the daemon stopping) waits for the pass, and
                // none starts after it.
                let _pass = self
                    .handler
                    .passes()
                    .map(|l| l.read().unwrap_or_else(PoisonError::into_inner));
                if !self.pass(vring)? {
                    break;
                }
                if vring.needs_notification().map_err(queue_err)? {
                    vring.signal_used_queue()?;
                }
            }
            if self.poll(vring) {
                continue;
            }
            if !event_idx || !vring.enable_notification().map_err(queue_err)? {
                return Ok(());
            }
        }
    }

    /// Looks at the ring for up to [`poll_window`] after emptying it: a
    /// driver keeping its queue full makes the next requests available
    /// right after it reaps the last completions, and finding them here
    /// saves its kick and this thread's wake-up. Whether any came.
    fn poll(&self, vring: &VringRwLock) -> bool {
        let window = poll_window();
        if window.is_zero() {
            return false;
        }
        let mem = self.mem.lock().unwrap_or_else(|e| e.into_inner()).memory();
        let until = std::time::Instant::now() + window;
        loop {
            let more = {
                let state = vring.get_ref();
                let queue = state.get_queue();
                queue
                    .avail_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != queue.next_avail())
            };
            if more {
                return true;
            }
            if std::time::Instant::now() >= until {
                return false;
            }
            std::hint::spin_loop();
        }
    }
}

/// capacity (sectors), size_max (0), seg_max, geometry (0), blk_size.
fn config_space(capacity: u64) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    config[0..8].copy_from_slice(&capacity.to_le_bytes());
    config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    config[20..24].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
    config
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // The frontend picks `size`; a config space is never above 256 bytes.
        let mut out = vec![0u8; (size as usize).min(256)];
        let start = (offset as usize).min(CONFIG_LEN);
        let n = (CONFIG_LEN - start).min(out.len());
        out[..n].copy_from_slice(&self.config[start..start + n]);
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.lock().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected events {evset:?}")));
        }
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(format!("no queue {device_event}")))?;
        self.process(vring)
    }
}

/// How long a queue thread polls its ring after emptying it
/// ([`POLL_DEFAULT`], or `FERRO_BLOCKD_POLL_US` microseconds; 0: never),
/// read once.
pub fn poll_window() -> std::time::Duration {
    static WINDOW: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *WINDOW.get_or_init(|| crate::env_micros("FERRO_BLOCKD_POLL_US", POLL_DEFAULT))
}

/// The default poll after a queue pass.
pub const POLL_DEFAULT: std::time::Duration = std::time::Duration::from_micros(50);

/// The backend the daemon clones into its threads.
pub type SharedBackend = Arc<BlockBackend>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_reads_are_bounded() {
        let store = crate::store::LocalFile::open_or_create(
            &std::env::temp_dir().join(format!("blockd-cfg-{}", std::process::id())),
            1 << 20,
        )
        .unwrap();
        let b = BlockBackend::new(
            RequestHandler::new(Arc::new(store), "v"),
            GuestMemoryAtomic::new(GuestMemoryMmap::default()),
        );
        assert_eq!(b.get_config(0, 8), 2048u64.to_le_bytes());
        assert_eq!(b.get_config(20, 4), 512u32.to_le_bytes());
        assert_eq!(b.get_config(21, 8), vec![2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b.get_config(u32::MAX, 4), vec![0; 4]);
        assert!(b.features() & (1 << VIRTIO_F_VERSION_1) != 0);
    }
}
