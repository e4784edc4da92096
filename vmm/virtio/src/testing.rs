//! Harness for driving device models without a guest (feature `test-utils`).
//!
//! Used by this crate's unit tests, the `cargo xtask bench vmm` benchmarks
//! and the fuzz targets.
//!
//! # API
//!
//! - [`TempImage::new(tag, bytes)`](TempImage::new): a raw image file under
//!   `std::env::temp_dir()`, removed on drop.
//! - [`guest_memory(size)`]: one RAM region at guest address 0.
//! - [`DriverQueue`]: the driver side of a split virtqueue placed in guest
//!   memory: [`add_chain`](DriverQueue::add_chain) writes descriptors and
//!   publishes the head in the avail ring,
//!   [`pop_used`](DriverQueue::pop_used) reads completions,
//!   [`device_queue`](DriverQueue::device_queue) builds the device-side
//!   [`Queue`].
//! - [`BlockHarness`]: a block device model (handler + disk) on one queue of
//!   [`BLOCK_HARNESS_QUEUE_SIZE`] with a data area of `depth` slots of
//!   `max_io` bytes:
//!   - `BlockHarness::new(path, read_only, depth, max_io)`;
//!   - `push_read(slot, sector, len)` / `push_write(slot, sector, len)`
//!     queue one request using data slot `slot` (`slot < depth`);
//!   - `data_mut(slot)` / `data(slot)` access a slot's bytes;
//!   - `run()` processes everything available and returns the completions
//!     as `(head, used_len, status)`; `notified()` counts the interrupts the
//!     handler asked for.
//!   - at most `BLOCK_HARNESS_QUEUE_SIZE / 3` requests may be in flight.
//! - [`NetHarness`]: the net rx/tx logic over any `NetBackend` (an
//!   `Arc<Tap>` for benchmarks): `new(backend)`, `push_tx(frame)`,
//!   `run_tx()`, `post_rx(n)`, `run_rx()`.
//! - [`CountingInterrupt`]: a `VirtioInterrupt` that counts.
//! - [`shared_guest_memory(size)`]: guest memory in a memfd, as ferro-vmm
//!   makes it for vhost-user devices (a backend can map it).
//! - [`VhostUserBlkHarness`]: a client speaking vhost-user to a block
//!   backend's socket (such as `ferro-blockd`) through ferro-vmm's own
//!   frontend, [`VhostUserBlk`](crate::vhost_user_blk::VhostUserBlk),
//!   activated over memfd guest memory with an in-memory driver queue: the
//!   harness fills the ring with virtio-blk requests, kicks the ring's
//!   eventfd and waits for the backend's completions, which reach it as the
//!   device's queue interrupt (an eventfd):
//!   - `VhostUserBlkHarness::connect(socket, depth, max_io)`;
//!   - `push_read(slot, sector, len)` / `push_write(slot, sector, len)`
//!     queue a request on data slot `slot`, `kick()` tells the backend;
//!   - `wait(timeout)` blocks until at least one request completed and
//!     returns the completions as `(slot, used_len, status)`.
//!
//! A queue depth of 32 with 4 KiB random I/O:
//!
//! ```no_run
//! # use ferro_virtio::testing::BlockHarness;
//! let mut h = BlockHarness::new("/tmp/disk.img".as_ref(), false, 32, 1 << 20).unwrap();
//! for slot in 0..32 {
//!     h.push_read(slot, slot as u64 * 8, 4096);
//! }
//! let done = h.run();
//! assert_eq!(done.len(), 32);
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::block::{BlockHandler, BlockMetrics, Disk};
use crate::worker::QueueProcessor;
use crate::{GuestMemoryMmap, InterruptKind, VirtioInterrupt};

pub use vhost_user::{shared_guest_memory, VhostUserBlkHarness};

/// Guest memory of `size` bytes at guest address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("cannot map guest memory")
}

/// A uniquely named file under the temp dir, deleted on drop.
#[derive(Debug)]
pub struct TempImage {
    path: PathBuf,
}

impl TempImage {
    /// Creates the file with `contents`; `tag` goes into the name.
    pub fn new(tag: &str, contents: &[u8]) -> io::Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "ferro-virtio-{tag}-{}-{}.img",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        std::fs::write(&path, contents)?;
        Ok(TempImage { path })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Counts interrupts instead of delivering them.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    /// Queue interrupts per queue index 0..4.
    pub queue: [AtomicU64; 4],
    /// Config-change interrupts.
    pub config: AtomicU64,
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        let counter = match kind {
            InterruptKind::Queue(i) => self.queue.get(usize::from(i)),
            InterruptKind::Config => Some(&self.config),
        };
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Turns `(addr, len, flags)` triples into [`Desc`](crate::chain::Desc)s.
pub fn descs(triples: &[(u64, u32, u16)]) -> Vec<crate::chain::Desc> {
    triples
        .iter()
        .map(|&(addr, len, flags)| crate::chain::Desc {
            addr: GuestAddress(addr),
            len,
            writable: flags & VRING_DESC_F_WRITE as u16 != 0,
        })
        .collect()
}

/// The driver side of a split virtqueue in guest memory.
#[derive(Debug)]
pub struct DriverQueue {
    size: u16,
    desc_table: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// One buffer of a chain pushed by [`DriverQueue::add_chain`].
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

impl DriverQueue {
    /// A queue of `size` entries (power of two) whose rings start at `base`
    /// and take [`DriverQueue::footprint`] bytes.
    pub fn new(base: GuestAddress, size: u16) -> Self {
        let desc_table = base;
        let avail = base.unchecked_add(16 * u64::from(size));
        let used = avail
            .unchecked_add(6 + 2 * u64::from(size))
            .unchecked_align_up(4);
        DriverQueue {
            size,
            desc_table,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Bytes of guest memory the rings of a queue of `size` use.
    pub fn footprint(size: u16) -> u64 {
        let size = u64::from(size);
        16 * size + (6 + 2 * size).div_ceil(4) * 4 + 6 + 8 * size
    }

    /// The device-side queue, ready, for the same rings.
    pub fn device_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size must be a power of two");
        q.set_size(self.size);
        q.set_desc_table_address(
            Some(self.desc_table.0 as u32),
            Some((self.desc_table.0 >> 32) as u32),
        );
        q.set_avail_ring_address(Some(self.avail.0 as u32), Some((self.avail.0 >> 32) as u32));
        q.set_used_ring_address(Some(self.used.0 as u32), Some((self.used.0 >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Makes a virtio-blk request available: its 16-byte header at `header`
    /// (and status byte right after, set to 0xff until the device answers),
    /// `len` data bytes at `data`. Returns the head index.
    pub fn add_blk_request(
        &mut self,
        mem: &GuestMemoryMmap,
        header: GuestAddress,
        data: GuestAddress,
        kind: u32,
        sector: u64,
        len: u32,
    ) -> u16 {
        let status = header.unchecked_add(16);
        let mut raw = [0u8; 16];
        raw[0..4].copy_from_slice(&kind.to_le_bytes());
        raw[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, header).unwrap();
        mem.write_obj(0xffu8, status).unwrap();
        let bufs = [
            Buf {
                addr: header,
                len: 16,
                writable: false,
            },
            Buf {
                addr: data,
                len,
                writable: kind == VIRTIO_BLK_T_IN,
            },
            Buf {
                addr: status,
                len: 1,
                writable: true,
            },
        ];
        self.add_chain(mem, &bufs)
    }

    /// Writes `bufs` as one chain (descriptor slots are reused round robin)
    /// and makes it available. Returns the head index.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, buf) in bufs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if buf.writable { VRING_DESC_F_WRITE } else { 0 } as u16;
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let addr = self.desc_table.unchecked_add(16 * u64::from(index));
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&buf.addr.0.to_le_bytes());
            raw[8..12].copy_from_slice(&buf.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&self.next_desc.to_le_bytes());
            mem.write_slice(&raw, addr)
                .expect("descriptor table in memory");
        }
        let slot = self
            .avail
            .unchecked_add(4 + 2 * u64::from(self.avail_idx % self.size));
        mem.write_obj(head.to_le(), slot)
            .expect("avail ring in memory");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), self.avail.unchecked_add(2))
            .expect("avail ring in memory");
        head
    }

    /// The next completion `(head, len)` the device added, if any.
    pub fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u16, u32)> {
        let idx: u16 = mem.read_obj(self.used.unchecked_add(2)).ok()?;
        if u16::from_le(idx) == self.used_seen {
            return None;
        }
        let elem = self
            .used
            .unchecked_add(4 + 8 * u64::from(self.used_seen % self.size));
        let id: u32 = mem.read_obj(elem).ok()?;
        let len: u32 = mem.read_obj(elem.unchecked_add(4)).ok()?;
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((u32::from_le(id) as u16, u32::from_le(len)))
    }
}

/// Queue size of [`BlockHarness`].
pub const BLOCK_HARNESS_QUEUE_SIZE: u16 = 256;
/// Where request headers and status bytes live.
const HEADERS: GuestAddress = GuestAddress(0x10_0000);
/// Where data slots start.
const DATA: GuestAddress = GuestAddress(0x20_0000);

/// A block device model on an in-memory queue, for tests and benchmarks.
pub struct BlockHarness {
    /// Guest memory holding the rings, headers and data slots.
    pub mem: GuestMemoryMmap,
    driver: DriverQueue,
    queue: Queue,
    handler: BlockHandler,
    metrics: Arc<BlockMetrics>,
    depth: usize,
    max_io: usize,
    pending: Vec<(u16, usize)>,
    notified: u64,
}

impl BlockHarness {
    /// Opens the image at `path` and lays out `depth` data slots of
    /// `max_io` bytes each.
    pub fn new(path: &Path, read_only: bool, depth: usize, max_io: usize) -> io::Result<Self> {
        let disk = Disk::open(path, read_only).map_err(io::Error::other)?;
        let size = DATA.0 as usize + depth * max_io;
        let mem = guest_memory(size);
        let driver = DriverQueue::new(GuestAddress(0), BLOCK_HARNESS_QUEUE_SIZE);
        let queue = driver.device_queue();
        let metrics = Arc::new(BlockMetrics::default());
        let handler = BlockHandler::new(Arc::new(disk), "harness", metrics.clone());
        Ok(BlockHarness {
            mem,
            driver,
            queue,
            handler,
            metrics,
            depth,
            max_io,
            pending: Vec::new(),
            notified: 0,
        })
    }

    /// Queues a read of `len` bytes at `sector` into data slot `slot`.
    pub fn push_read(&mut self, slot: usize, sector: u64, len: u32) -> u16 {
        self.push(VIRTIO_BLK_T_IN, slot, sector, len)
    }

    /// Queues a write of `len` bytes from data slot `slot` to `sector`.
    pub fn push_write(&mut self, slot: usize, sector: u64, len: u32) -> u16 {
        self.push(VIRTIO_BLK_T_OUT, slot, sector, len)
    }

    fn push(&mut self, kind: u32, slot: usize, sector: u64, len: u32) -> u16 {
        assert!(
            slot < self.depth && len as usize <= self.max_io,
            "slot or len out of range"
        );
        let header = HEADERS.unchecked_add(32 * slot as u64);
        let data = self.slot_addr(slot);
        let head = self
            .driver
            .add_blk_request(&self.mem, header, data, kind, sector, len);
        self.pending.push((head, slot));
        head
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

    /// Runs the handler over everything queued; returns the completions as
    /// `(head, used_len, status)`.
    pub fn run(&mut self) -> Vec<(u16, u32, u8)> {
        self.process();
        self.completions()
    }

    /// The device's part of [`run`](Self::run): the handler processes
    /// everything queued (benchmarks time only this).
    pub fn process(&mut self) {
        if self
            .handler
            .process_queue(&self.mem, &mut self.queue)
            .unwrap_or(false)
        {
            self.notified += 1;
        }
    }

    /// The driver's part of [`run`](Self::run): collect completions as
    /// `(head, used_len, status)`.
    pub fn completions(&mut self) -> Vec<(u16, u32, u8)> {
        let mut done = Vec::new();
        while let Some((head, len)) = self.driver.pop_used(&self.mem) {
            let slot = self
                .pending
                .iter()
                .position(|(h, _)| *h == head)
                .map(|i| self.pending.swap_remove(i).1);
            let status = slot.map_or(0xff, |slot| {
                let addr = HEADERS.unchecked_add(32 * slot as u64 + 16);
                self.mem.read_obj::<u8>(addr).unwrap_or(0xff)
            });
            done.push((head, len, status));
        }
        done
    }

    /// Interrupts the handler asked for so far.
    pub fn notified(&self) -> u64 {
        self.notified
    }

    /// The handler's counters.
    pub fn metrics(&self) -> &BlockMetrics {
        &self.metrics
    }
}

/// Slots per direction of [`NetHarness`].
pub const NET_HARNESS_SLOTS: usize = 64;
const NET_SLOT: u64 = 0x1_1000;
const NET_TX: GuestAddress = GuestAddress(0x10_0000);
const NET_RX: GuestAddress = GuestAddress(0x10_0000 + NET_SLOT * NET_HARNESS_SLOTS as u64);

/// A net device model (rx + tx queues) over any [`NetBackend`], for example
/// an `Arc<Tap>` in benchmarks:
///
/// - `NetHarness::new(backend)`;
/// - `push_tx(frame)` queues one tx chain (the caller includes the 12-byte
///   vnet header); at most [`NET_HARNESS_SLOTS`] before `run_tx`;
/// - `run_tx()` sends them and returns how many chains completed;
/// - `post_rx(n)` posts `n` 64 KiB+ rx buffers; `run_rx()` moves frames
///   from the backend into them and returns the frames (with header).
///
/// [`NetBackend`]: crate::net::NetBackend
pub struct NetHarness<B: crate::net::NetBackend> {
    /// Guest memory holding the rings and buffers.
    pub mem: GuestMemoryMmap,
    rx_driver: DriverQueue,
    tx_driver: DriverQueue,
    rx: Queue,
    tx: Queue,
    handler: crate::net::NetHandler<B>,
    tx_slot: usize,
    rx_slot: usize,
    rx_posted: Vec<(u16, usize)>,
}

impl<B: crate::net::NetBackend> NetHarness<B> {
    /// A harness over `backend`.
    pub fn new(backend: B) -> Self {
        let mem = guest_memory(NET_RX.0 as usize + NET_SLOT as usize * NET_HARNESS_SLOTS);
        let rx_driver = DriverQueue::new(GuestAddress(0), 256);
        let tx_driver = DriverQueue::new(GuestAddress(0x8_0000), 256);
        let metrics = Arc::new(crate::net::NetMetrics::default());
        NetHarness {
            rx: rx_driver.device_queue(),
            tx: tx_driver.device_queue(),
            rx_driver,
            tx_driver,
            handler: crate::net::NetHandler::new(backend, metrics),
            mem,
            tx_slot: 0,
            rx_slot: 0,
            rx_posted: Vec::new(),
        }
    }

    /// Queues `frame` (vnet header included) on the tx queue.
    pub fn push_tx(&mut self, frame: &[u8]) {
        let len = frame.len().min(NET_SLOT as usize);
        let addr = NET_TX.unchecked_add(NET_SLOT * (self.tx_slot % NET_HARNESS_SLOTS) as u64);
        self.tx_slot += 1;
        self.mem.write_slice(&frame[..len], addr).unwrap();
        let buf = Buf {
            addr,
            len: len as u32,
            writable: false,
        };
        self.tx_driver.add_chain(&self.mem, &[buf]);
    }

    /// Processes the tx queue; returns the chains completed.
    pub fn run_tx(&mut self) -> usize {
        self.process_tx();
        self.tx_completions()
    }

    /// The device's part of [`run_tx`](Self::run_tx).
    pub fn process_tx(&mut self) {
        let _ = self.handler.process_tx(&self.mem, &mut self.tx);
    }

    /// The driver's part of [`run_tx`](Self::run_tx): completed chains.
    pub fn tx_completions(&mut self) -> usize {
        std::iter::from_fn(|| self.tx_driver.pop_used(&self.mem)).count()
    }

    /// Posts `n` rx buffers of one slot each.
    pub fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let slot = self.rx_slot % NET_HARNESS_SLOTS;
            self.rx_slot += 1;
            let addr = NET_RX.unchecked_add(NET_SLOT * slot as u64);
            let buf = Buf {
                addr,
                len: NET_SLOT as u32,
                writable: true,
            };
            let head = self.rx_driver.add_chain(&self.mem, &[buf]);
            self.rx_posted.push((head, slot));
        }
    }

    /// Moves frames from the backend into posted buffers; returns them.
    pub fn run_rx(&mut self) -> Vec<Vec<u8>> {
        self.process_rx();
        self.rx_frames()
    }

    /// The device's part of [`run_rx`](Self::run_rx): move frames from the
    /// backend into posted buffers.
    pub fn process_rx(&mut self) {
        self.handler.set_backend_readable();
        let _ = self.handler.process_rx(&self.mem, &mut self.rx);
    }

    /// The driver's part of [`run_rx`](Self::run_rx): the received frames.
    pub fn rx_frames(&mut self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        while let Some((head, len)) = self.rx_driver.pop_used(&self.mem) {
            let Some(i) = self.rx_posted.iter().position(|(h, _)| *h == head) else {
                continue;
            };
            let slot = self.rx_posted.remove(i).1;
            let mut frame = vec![0; len as usize];
            let addr = NET_RX.unchecked_add(NET_SLOT * slot as u64);
            self.mem.read_slice(&mut frame, addr).unwrap();
            frames.push(frame);
        }
        frames
    }
}

mod vhost_user;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_harness_runs_queue_depth_32() {
        let image = TempImage::new("harness", &vec![7u8; 1 << 20]).unwrap();
        let mut h = BlockHarness::new(image.path(), false, 32, 4096).unwrap();
        for slot in 0..16 {
            h.set_data(slot, &[slot as u8; 4096]);
            h.push_write(slot, slot as u64 * 8, 4096);
        }
        for slot in 16..32 {
            h.push_read(slot, (slot as u64 - 16) * 8, 4096);
        }
        let done = h.run();
        assert_eq!(done.len(), 32);
        assert!(done.iter().all(|&(_, _, status)| status == 0));
        assert_eq!(h.notified(), 1);
        assert_eq!(
            h.data(20, 4096),
            vec![4u8; 4096],
            "read after write in order"
        );
        let file = std::fs::read(image.path()).unwrap();
        assert_eq!(file[3 * 4096..4 * 4096], [3u8; 4096]);
    }
}
