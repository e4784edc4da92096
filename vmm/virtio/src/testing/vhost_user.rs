//! A vhost-user-blk client harness: ferro-vmm's own frontend
//! ([`VhostUserBlk`]) over memfd guest memory, driven through an in-memory
//! driver queue, so tests and benchmarks exercise a backend (such as
//! `ferro-blockd`) the way a guest under ferro-vmm does, minus the guest.
//!
//! The path a request takes is the VMM's: the harness writes the chain and
//! the avail index into shared memory and writes the ring's kick eventfd
//! (the guest's doorbell ioeventfd in a VM); the backend executes it and
//! signals its call eventfd; the device's connection thread turns that into
//! the queue interrupt, here an eventfd the harness waits on.
//!
//! `VIRTIO_RING_F_EVENT_IDX` is not acknowledged: the harness does not keep
//! the ring's `used_event`, so the backend signals after every drain (at
//! worst more interrupts than a Linux guest takes, never fewer).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Address, Bytes, FileOffset, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DriverQueue, DATA, HEADERS};
use crate::vhost_user_blk::{VhostUserBlk, VhostUserBlkConfig, QUEUE_SIZE};
use crate::{
    ActivatedQueue, GuestMemoryMmap, InterruptKind, VirtioDevice, VirtioInterrupt, WorkerOptions,
    VIRTIO_RING_F_EVENT_IDX,
};

/// Guest memory of `size` bytes at guest address 0 in a memfd, shared
/// (`MAP_SHARED`) so a vhost-user backend can map the same pages.
pub fn shared_guest_memory(size: usize) -> io::Result<GuestMemoryMmap> {
    // SAFETY: the name is a NUL-terminated literal; the call only returns a
    // new descriptor or an error.
    let fd = unsafe { libc::memfd_create(c"ferro-harness-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)?;
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        size,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(io::Error::other)
}

/// The queue interrupt as an eventfd the harness can wait on.
struct EventInterrupt(EventFd);

impl VirtioInterrupt for EventInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        if let InterruptKind::Queue(_) = kind {
            self.0.write(1)?;
        }
        Ok(())
    }
}

/// A vhost-user-blk device (ferro-vmm's frontend) connected to a backend,
/// with `depth` data slots of `max_io` bytes in shared guest memory.
pub struct VhostUserBlkHarness {
    /// Guest memory holding the rings, headers and data slots (a memfd the
    /// backend maps too).
    pub mem: GuestMemoryMmap,
    device: VhostUserBlk,
    driver: DriverQueue,
    kick: EventFd,
    interrupt: Arc<EventInterrupt>,
    depth: usize,
    max_io: usize,
    /// The data slot of each descriptor head in flight.
    pending: Vec<Option<usize>>,
}

impl VhostUserBlkHarness {
    /// Connects to the backend on `socket`, negotiates, and activates the
    /// device's one queue; at most `depth` requests of up to `max_io` bytes
    /// may be in flight (`depth <= QUEUE_SIZE / 3`).
    pub fn connect(socket: &Path, depth: usize, max_io: usize) -> io::Result<Self> {
        assert!(
            depth > 0 && depth <= usize::from(QUEUE_SIZE) / 3,
            "depth out of range"
        );
        let config = VhostUserBlkConfig {
            id: "harness".into(),
            socket: socket.to_path_buf(),
        };
        let mut device =
            VhostUserBlk::new(config, WorkerOptions::default()).map_err(io::Error::other)?;
        device.ack_features(device.device_features() & !(1 << VIRTIO_RING_F_EVENT_IDX));
        let mem = shared_guest_memory(DATA.0 as usize + depth * max_io)?;
        let driver = DriverQueue::new(GuestAddress(0), QUEUE_SIZE);
        let notify = EventFd::new(EFD_NONBLOCK)?;
        let kick = notify.try_clone()?;
        let interrupt = Arc::new(EventInterrupt(EventFd::new(EFD_NONBLOCK)?));
        let queue = ActivatedQueue {
            index: 0,
            queue: driver.device_queue(),
            notify,
        };
        device
            .activate(mem.clone(), interrupt.clone(), vec![queue])
            .map_err(io::Error::other)?;
        Ok(VhostUserBlkHarness {
            mem,
            device,
            driver,
            kick,
            interrupt,
            depth,
            max_io,
            pending: vec![None; usize::from(QUEUE_SIZE)],
        })
    }

    /// The capacity the backend reports, in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.device.capacity()
    }

    /// Queues a read of `len` bytes at `sector` into data slot `slot`
    /// (call [`kick`](Self::kick) to tell the backend).
    pub fn push_read(&mut self, slot: usize, sector: u64, len: u32) {
        self.push(VIRTIO_BLK_T_IN, slot, sector, len);
    }

    /// Queues a write of `len` bytes from data slot `slot` to `sector`.
    pub fn push_write(&mut self, slot: usize, sector: u64, len: u32) {
        self.push(VIRTIO_BLK_T_OUT, slot, sector, len);
    }

    fn push(&mut self, kind: u32, slot: usize, sector: u64, len: u32) {
        assert!(
            slot < self.depth && len as usize <= self.max_io,
            "slot or len out of range"
        );
        let header = HEADERS.unchecked_add(32 * slot as u64);
        let data = self.slot_addr(slot);
        let head = self
            .driver
            .add_blk_request(&self.mem, header, data, kind, sector, len);
        self.pending[usize::from(head)] = Some(slot);
    }

    /// Tells the backend the ring has new requests (the guest's doorbell).
    pub fn kick(&self) -> io::Result<()> {
        self.kick.write(1)
    }

    /// Completions so far, without waiting: `(slot, used_len, status)`.
    pub fn completions(&mut self) -> Vec<(usize, u32, u8)> {
        let mut done = Vec::new();
        while let Some((head, len)) = self.driver.pop_used(&self.mem) {
            let Some(slot) = self
                .pending
                .get_mut(usize::from(head))
                .and_then(Option::take)
            else {
                continue;
            };
            let addr = HEADERS.unchecked_add(32 * slot as u64 + 16);
            let status = self.mem.read_obj::<u8>(addr).unwrap_or(0xff);
            done.push((slot, len, status));
        }
        done
    }

    /// Waits up to `timeout` for the queue interrupt and returns the
    /// completions (at least one unless the wait timed out, which is an
    /// error).
    pub fn wait(&mut self, timeout: Duration) -> io::Result<Vec<(usize, u32, u8)>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let done = self.completions();
            if !done.is_empty() {
                return Ok(done);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no completion from the vhost-user backend",
                ));
            }
            let mut pfd = libc::pollfd {
                fd: self.interrupt.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            let _ = self.interrupt.0.read();
        }
    }

    fn slot_addr(&self, slot: usize) -> GuestAddress {
        DATA.unchecked_add((slot * self.max_io) as u64)
    }

    /// The bytes of data slot `slot`.
    pub fn data(&self, slot: usize, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, self.slot_addr(slot)).unwrap();
        buf
    }

    /// Fills data slot `slot` with `bytes`.
    pub fn set_data(&mut self, slot: usize, bytes: &[u8]) {
        self.mem.write_slice(bytes, self.slot_addr(slot)).unwrap();
    }
}
