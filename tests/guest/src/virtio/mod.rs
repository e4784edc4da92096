//! Virtio 1.x over modern PCI (virtio spec 1.2 §4.1): capability discovery,
//! device initialisation (§3.1), MSI-X, and split virtqueues (§2.7).

pub mod blk;
pub mod net;
pub mod rng;

use core::sync::atomic::{fence, AtomicU8, Ordering};

use crate::cpu::rdtsc;
use crate::mem::{dma_alloc, mmio_read, mmio_write};
use crate::pci::{PciFunction, CMD_BUS_MASTER, CMD_INTX_DISABLE, CMD_MEMORY};

/// Red Hat / virtio PCI vendor ID.
pub const VENDOR: u16 = 0x1af4;
/// Modern virtio PCI device IDs are 0x1040 + device type.
pub const DEVICE_NET: u16 = 0x1041;
/// virtio-blk.
pub const DEVICE_BLK: u16 = 0x1042;
/// virtio-rng (entropy).
pub const DEVICE_RNG: u16 = 0x1044;

/// `VIRTIO_F_VERSION_1`: required, this driver is modern-only.
pub const F_VERSION_1: u64 = 1 << 32;

/// Device status bits (§2.1).
const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_FAILED: u8 = 0x80;

/// `virtio_pci_cap.cfg_type` values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
/// PCI capability IDs.
const PCI_CAP_VENDOR: u8 = 0x09;
const PCI_CAP_MSIX: u8 = 0x11;

/// `struct virtio_pci_common_cfg` offsets.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// "No MSI-X vector" for `config_msix_vector` / `queue_msix_vector`.
const NO_VECTOR: u16 = 0xffff;

/// First CPU vector handed to MSI-X messages; one per queue, in probe order.
pub const MSIX_FIRST_VECTOR: u8 = 0x30;
/// One past the last vector handed out.
pub const MSIX_LAST_VECTOR: u8 = 0x7f;
static NEXT_VECTOR: AtomicU8 = AtomicU8::new(MSIX_FIRST_VECTOR);

/// Errors while bringing a device up.
pub type Result<T> = core::result::Result<T, &'static str>;

/// The MSI-X capability of a function.
#[derive(Clone, Copy, Debug)]
pub struct Msix {
    cap: u16,
    table: u64,
    /// Number of table entries.
    pub size: u16,
}

/// A modern virtio-pci function with its configuration structures mapped.
pub struct VirtioPci {
    /// The PCI function.
    pub func: PciFunction,
    common: u64,
    notify: u64,
    notify_multiplier: u32,
    #[allow(dead_code)]
    isr: u64,
    device_cfg: u64,
    /// MSI-X capability, when present.
    pub msix: Option<Msix>,
    /// Negotiated features.
    pub features: u64,
}

impl VirtioPci {
    /// Finds the COMMON/NOTIFY/ISR/DEVICE configuration structures and the
    /// MSI-X capability, and enables memory decoding and bus mastering.
    pub fn probe(func: PciFunction) -> Result<Self> {
        let (mut common, mut notify, mut isr, mut device_cfg) = (None, None, None, None);
        let mut notify_multiplier = 0;
        let mut msix = None;
        for (id, off) in func.capabilities() {
            match id {
                PCI_CAP_VENDOR => {
                    let cfg_type = func.read8(off + 3);
                    let bar = func.read8(off + 4);
                    let offset = func.read32(off + 8) as u64;
                    if bar > 5 {
                        continue;
                    }
                    let Some(base) = func.bar(bar) else { continue };
                    let addr = base + offset;
                    match cfg_type {
                        CAP_COMMON if common.is_none() => common = Some(addr),
                        CAP_NOTIFY if notify.is_none() => {
                            notify = Some(addr);
                            notify_multiplier = func.read32(off + 16);
                        }
                        CAP_ISR if isr.is_none() => isr = Some(addr),
                        CAP_DEVICE if device_cfg.is_none() => device_cfg = Some(addr),
                        _ => {}
                    }
                }
                PCI_CAP_MSIX => {
                    let control = func.read16(off + 2);
                    let table = func.read32(off + 4);
                    if let Some(base) = func.bar((table & 7) as u8) {
                        msix = Some(Msix {
                            cap: off,
                            table: base + (table & !7) as u64,
                            size: (control & 0x7ff) + 1,
                        });
                    }
                }
                _ => {}
            }
        }
        func.enable(CMD_MEMORY | CMD_BUS_MASTER | CMD_INTX_DISABLE);
        Ok(VirtioPci {
            func,
            common: common.ok_or("virtio: no COMMON_CFG capability")?,
            notify: notify.ok_or("virtio: no NOTIFY_CFG capability")?,
            notify_multiplier,
            isr: isr.ok_or("virtio: no ISR_CFG capability")?,
            device_cfg: device_cfg.unwrap_or(0),
            msix,
            features: 0,
        })
    }

    fn status(&self) -> u8 {
        mmio_read(self.common + common::DEVICE_STATUS)
    }

    fn set_status(&self, status: u8) {
        mmio_write(self.common + common::DEVICE_STATUS, status);
    }

    /// Resets the device and negotiates features (§3.1.1 steps 1–6):
    /// accepts `supported & offered`, which must include `VERSION_1`.
    pub fn init(&mut self, supported: u64) -> Result<u64> {
        self.set_status(0);
        let deadline = Deadline::after_ms(1000);
        while self.status() != 0 {
            if deadline.passed() {
                return Err("virtio: device did not reset");
            }
            core::hint::spin_loop();
        }
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let mut offered = 0u64;
        for half in 0..2u32 {
            mmio_write(self.common + common::DEVICE_FEATURE_SELECT, half);
            offered |= (mmio_read::<u32>(self.common + common::DEVICE_FEATURE) as u64) << (32 * half);
        }
        if offered & F_VERSION_1 == 0 {
            self.set_status(STATUS_FAILED);
            return Err("virtio: device does not offer VERSION_1");
        }
        let features = offered & (supported | F_VERSION_1);
        for half in 0..2u32 {
            mmio_write(self.common + common::DRIVER_FEATURE_SELECT, half);
            mmio_write(self.common + common::DRIVER_FEATURE, (features >> (32 * half)) as u32);
        }
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            self.set_status(STATUS_FAILED);
            return Err("virtio: device rejected our features");
        }
        // Configuration changes are not interrupt-driven here.
        mmio_write(self.common + common::CONFIG_MSIX_VECTOR, NO_VECTOR);
        self.features = features;
        Ok(features)
    }

    /// Enables MSI-X with the function masked; entries are unmasked one by
    /// one in [`Self::setup_queue`] and the function mask cleared by
    /// [`Self::driver_ok`].
    fn msix_enable_masked(&self, msix: &Msix) {
        let control = self.func.read16(msix.cap + 2);
        if control & 0x8000 == 0 {
            self.func.write16(msix.cap + 2, control | 0x8000 | 0x4000);
        }
    }

    /// Number of queues the device has.
    pub fn num_queues(&self) -> u16 {
        mmio_read(self.common + common::NUM_QUEUES)
    }

    /// Creates queue `index` with at most `max_size` entries, routes it to
    /// its own MSI-X vector (when the device has MSI-X) and enables it.
    pub fn setup_queue(&mut self, index: u16, max_size: u16) -> Result<Virtqueue> {
        if index >= self.num_queues() {
            return Err("virtio: queue index out of range");
        }
        mmio_write(self.common + common::QUEUE_SELECT, index);
        let device_max: u16 = mmio_read(self.common + common::QUEUE_SIZE);
        if device_max == 0 {
            return Err("virtio: queue not available");
        }
        let size = device_max.min(max_size);
        // Split queues want a power of two for the driver's arithmetic.
        let size = 1 << (15 - size.leading_zeros());
        let mut vq = Virtqueue::new(size, index);
        mmio_write(self.common + common::QUEUE_SIZE, size);
        mmio_write(self.common + common::QUEUE_DESC, vq.desc as u64);
        mmio_write(self.common + common::QUEUE_DRIVER, vq.avail);
        mmio_write(self.common + common::QUEUE_DEVICE, vq.used);

        if let Some(msix) = self.msix {
            let entry = index.min(msix.size - 1);
            let vector = NEXT_VECTOR.load(Ordering::Relaxed);
            if vector <= MSIX_LAST_VECTOR {
                self.msix_enable_masked(&msix);
                NEXT_VECTOR.store(vector + 1, Ordering::Relaxed);
                let e = msix.table + 16 * entry as u64;
                // Address: 0xfee00000 | destination APIC ID 0 << 12.
                mmio_write::<u32>(e, 0xfee0_0000);
                mmio_write::<u32>(e + 4, 0);
                mmio_write::<u32>(e + 8, vector as u32);
                mmio_write::<u32>(e + 12, 0); // unmask
                mmio_write(self.common + common::QUEUE_MSIX_VECTOR, entry);
                if mmio_read::<u16>(self.common + common::QUEUE_MSIX_VECTOR) == NO_VECTOR {
                    return Err("virtio: device refused the queue's MSI-X vector");
                }
            }
        }

        let notify_off: u16 = mmio_read(self.common + common::QUEUE_NOTIFY_OFF);
        vq.notify_addr = self.notify + notify_off as u64 * self.notify_multiplier as u64;
        mmio_write(self.common + common::QUEUE_ENABLE, 1u16);
        Ok(vq)
    }

    /// Sets DRIVER_OK (§3.1.1 step 8) and clears the MSI-X function mask.
    pub fn driver_ok(&self) {
        if let Some(msix) = self.msix {
            let control = self.func.read16(msix.cap + 2);
            if control & 0x8000 != 0 {
                self.func.write16(msix.cap + 2, control & !0x4000);
            }
        }
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    /// Reads a byte of the device-specific configuration.
    pub fn cfg8(&self, off: u64) -> u8 {
        mmio_read(self.device_cfg + off)
    }

    /// Reads a 32-bit field of the device-specific configuration.
    pub fn cfg32(&self, off: u64) -> u32 {
        mmio_read(self.device_cfg + off)
    }

    /// Reads a 64-bit field as two 32-bit reads (stable under
    /// `config_generation`, which these fields never change on us).
    pub fn cfg64(&self, off: u64) -> u64 {
        self.cfg32(off) as u64 | (self.cfg32(off + 4) as u64) << 32
    }

    /// Number of MSI-X table entries (0 without MSI-X).
    pub fn msix_vectors(&self) -> u16 {
        self.msix.map_or(0, |m| m.size)
    }
}

/// Descriptor flags.
const DESC_NEXT: u16 = 1;
const DESC_WRITE: u16 = 2;

/// `struct virtq_desc`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy)]
pub struct Buf {
    /// Physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it (else it reads it).
    pub device_writes: bool,
}

/// A split virtqueue in DMA memory.
pub struct Virtqueue {
    size: u16,
    index: u16,
    desc: *mut Desc,
    /// `struct virtq_avail`: flags, idx, ring[size], used_event.
    avail: u64,
    /// `struct virtq_used`: flags, idx, ring[size] of (id, len), avail_event.
    used: u64,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
    notify_addr: u64,
}

impl Virtqueue {
    /// Allocates the rings of a queue of `size` (a power of two) entries;
    /// the transport fills in the doorbell address.
    fn new(size: u16, index: u16) -> Self {
        let n = size as usize;
        let desc = dma_alloc(16 * n, 4096) as *mut Desc;
        let avail = dma_alloc(6 + 2 * n, 4096);
        let used = dma_alloc(6 + 8 * n, 4096);
        for i in 0..size {
            // SAFETY: `desc` points to `size` freshly allocated descriptors.
            unsafe { desc.add(i as usize).write_volatile(Desc { addr: 0, len: 0, flags: 0, next: i + 1 }) };
        }
        Virtqueue { size, index, desc, avail, used, free_head: 0, num_free: size, avail_idx: 0, last_used: 0, notify_addr: 0 }
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// The descriptor id the next [`Self::add`] starts its chain with.
    pub fn next_free(&self) -> Option<u16> {
        (self.num_free > 0).then_some(self.free_head)
    }

    /// Chains `bufs` into descriptors and makes the chain available; returns
    /// the head descriptor id. Call [`Self::notify`] to kick the device.
    pub fn add(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.num_free as usize {
            return None;
        }
        let head = self.free_head;
        let mut id = head;
        for (i, b) in bufs.iter().enumerate() {
            // SAFETY: `id` < size: it came from the free list.
            let d = unsafe { &mut *self.desc.add(id as usize) };
            let next = d.next;
            let last = i + 1 == bufs.len();
            let flags = if b.device_writes { DESC_WRITE } else { 0 } | if last { 0 } else { DESC_NEXT };
            // SAFETY: the descriptor is ours until the device returns it.
            unsafe {
                core::ptr::write_volatile(d, Desc { addr: b.addr, len: b.len, flags, next: if last { 0 } else { next } })
            };
            if last {
                self.free_head = next;
            }
            id = next;
        }
        self.num_free -= bufs.len() as u16;
        let slot = self.avail + 4 + 2 * (self.avail_idx % self.size) as u64;
        mmio_write::<u16>(slot, head);
        // The ring entry must be visible before the index that publishes it.
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mmio_write::<u16>(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
        Some(head)
    }

    /// Tells the device there is new work in the queue.
    pub fn notify(&self) {
        mmio_write::<u16>(self.notify_addr, self.index);
    }

    /// Takes one used element: (head id, bytes written), and frees its chain.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let used_idx: u16 = mmio_read(self.used + 2);
        if used_idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let elem = self.used + 4 + 8 * (self.last_used % self.size) as u64;
        let id = mmio_read::<u32>(elem) as u16;
        let len = mmio_read::<u32>(elem + 4);
        self.last_used = self.last_used.wrapping_add(1);
        // Return the chain to the free list.
        let mut tail = id;
        let mut count = 1;
        loop {
            // SAFETY: `tail` < size: ids come from our own chains.
            let d = unsafe { self.desc.add(tail as usize).read_volatile() };
            if d.flags & DESC_NEXT == 0 {
                break;
            }
            tail = d.next;
            count += 1;
        }
        // SAFETY: as above; the device is done with the chain.
        unsafe { (*self.desc.add(tail as usize)).next = self.free_head };
        self.free_head = id;
        self.num_free += count;
        Some((id, len))
    }

    /// Polls the used ring until an element arrives or `timeout_ms` passes.
    pub fn wait_used(&mut self, timeout_ms: u64) -> Result<(u16, u32)> {
        let deadline = Deadline::after_ms(timeout_ms);
        loop {
            if let Some(e) = self.pop_used() {
                return Ok(e);
            }
            if deadline.passed() {
                return Err("virtio: request timed out");
            }
            core::hint::spin_loop();
        }
    }
}

/// A point in time measured with the TSC.
pub struct Deadline(u64);

impl Deadline {
    /// `ms` milliseconds from now.
    pub fn after_ms(ms: u64) -> Self {
        Deadline(rdtsc() + ms * crate::tsc_khz())
    }

    /// True once the deadline is behind us.
    pub fn passed(&self) -> bool {
        rdtsc() >= self.0
    }
}
