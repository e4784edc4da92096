//! The virtio 1.x modern PCI transport (virtio spec §4.1) with MSI-X.
//!
//! [`VirtioPciDevice`] presents any [`VirtioDevice`] as a PCI function:
//! vendor 0x1af4, device 0x1040 + virtio type, revision 1, subsystem
//! 0x1af4/0x0040. Everything lives in one 64-bit, non-prefetchable memory
//! BAR (BAR 0/1; the root places it below 4 GiB) of [`BAR_SIZE`] bytes, one
//! 4 KiB page per structure:
//!
//! | BAR offset | structure | capability |
//! |---|---|---|
//! | `0x0000` | common configuration (0x38 bytes) | `VIRTIO_PCI_CAP_COMMON_CFG` |
//! | `0x1000` | ISR status (1 byte, read-to-clear) | `VIRTIO_PCI_CAP_ISR_CFG` |
//! | `0x2000` | device-specific configuration | `VIRTIO_PCI_CAP_DEVICE_CFG` |
//! | `0x3000` | notifications, queue *n* at `+4n` | `VIRTIO_PCI_CAP_NOTIFY_CFG`, multiplier 4 |
//! | `0x4000` | MSI-X table (queues + 1 vectors) | MSI-X |
//! | `0x5000` | MSI-X PBA | MSI-X |
//!
//! plus a `VIRTIO_PCI_CAP_PCI_CFG` capability giving access to the BAR
//! through configuration space. Vector 0..n are free for the driver to
//! assign; there are `num_queues + 1` of them.
//!
//! The device is activated when the driver sets `DRIVER_OK` (see
//! [`status`]): each ready queue is handed over with a fresh eventfd, which
//! is registered as an ioeventfd at the queue's notify address (and moved
//! when the guest moves the BAR). A notify write that still reaches the
//! transport — no ioeventfd, or through the PCI_CFG capability — signals the
//! same eventfd.

mod common_cfg;
mod interrupt;
pub mod status;

use std::sync::{Arc, Mutex};

use ferro_virtio::{device_type, GuestMemoryMmap, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

use self::common_cfg::{CommonConfig, QueueConfig, COMMON_CFG_SIZE};
pub use self::interrupt::{InterruptState, NO_VECTOR};
use crate::config::{
    ConfigError, PciBarKind, PciBarRegion, PciConfiguration, PciHeader, CAP_ID_MSIX,
    CAP_ID_VENDOR_SPECIFIC,
};
use crate::device::PciDevice;
use crate::interrupt::{IoEventRegistrar, MsiSink};
use crate::msix::{self, MsixConfig, MsixError, MSIX_CAP_WRITABLE};
use ferro_virtio::warn_limited;

/// Vendor id of every virtio PCI function.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem id of modern virtio functions.
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x40;
/// Index of the (64-bit) BAR holding every structure.
pub const VIRTIO_BAR: usize = 0;
/// Size of that BAR.
pub const BAR_SIZE: u64 = 0x8000;
/// BAR offset of the common configuration.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// BAR offset of the ISR status byte.
pub const ISR_CFG_OFFSET: u64 = 0x1000;
/// BAR offset of the device-specific configuration.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// BAR offset of the notification area.
pub const NOTIFY_CFG_OFFSET: u64 = 0x3000;
/// BAR offset of the MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// BAR offset of the MSI-X PBA.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Distance between the notify addresses of consecutive queues.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Most queues a device may have: the MSI-X table page holds 256 vectors,
/// one of which is the config vector.
pub const MAX_QUEUES: usize = 255;

/// Size of each structure's page in the BAR.
const REGION_SIZE: u64 = 0x1000;
const DEVICE_CFG_SIZE: u32 = REGION_SIZE as u32;

/// `cfg_type` values of the virtio vendor capabilities.
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
/// Length of `struct virtio_pci_cap`.
const VIRTIO_CAP_LEN: usize = 16;

/// Class codes: network controller, other mass storage, unclassified.
const CLASS_NETWORK: u32 = 0x02_00_00;
const CLASS_STORAGE_OTHER: u32 = 0x01_80_00;
const CLASS_OTHER: u32 = 0xff_00_00;

/// Errors from wrapping a device in the PCI transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The device has no queues or more than [`MAX_QUEUES`].
    #[error("unsupported queue count {0}")]
    QueueCount(usize),
    /// A maximum queue size is zero, not a power of two or above 32768.
    #[error("queue {index} has invalid maximum size {size}")]
    QueueSize {
        /// Queue index.
        index: usize,
        /// The size the device reported.
        size: u16,
    },
    /// The MSI-X table could not be built.
    #[error("cannot set up MSI-X")]
    Msix(#[source] MsixError),
    /// The configuration space could not be built.
    #[error("cannot build the PCI configuration space")]
    Config(#[source] ConfigError),
}

/// Which structure of the BAR an access falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarRegion {
    Common,
    Isr,
    Device,
    Notify,
    MsixTable,
    MsixPba,
}

impl BarRegion {
    /// The structure holding `[offset, offset + len)` and the offset inside
    /// it; `None` if the access is outside the layout or straddles pages.
    fn decode(offset: u64, len: usize) -> Option<(Self, u64)> {
        let inner = offset % REGION_SIZE;
        if len == 0 || inner + len as u64 > REGION_SIZE {
            return None;
        }
        let region = match offset / REGION_SIZE {
            0 => Self::Common,
            1 => Self::Isr,
            2 => Self::Device,
            3 => Self::Notify,
            4 => Self::MsixTable,
            5 => Self::MsixPba,
            _ => return None,
        };
        Some((region, inner))
    }
}

/// Byte offsets of the capabilities the transport watches.
#[derive(Clone, Copy, Debug)]
struct CapOffsets {
    msix: usize,
    pci_cfg: usize,
}

/// A virtio device behind the modern PCI transport (see the module docs).
pub struct VirtioPciDevice {
    device: Box<dyn VirtioDevice>,
    config: PciConfiguration,
    caps: CapOffsets,
    common: CommonConfig,
    interrupt: Arc<InterruptState>,
    mem: GuestMemoryMmap,
    ioevents: Arc<dyn IoEventRegistrar>,
    /// Where the guest decodes the BAR now.
    bar_address: Option<u64>,
    /// BAR address at which the ioeventfds are registered, if they are.
    ioevent_base: Option<u64>,
    /// Per queue, the transport's copy of the eventfd handed to the device;
    /// empty while the device is not active.
    notify_fds: Vec<Option<EventFd>>,
    activated: bool,
}

impl VirtioPciDevice {
    /// Wrap `device`. Queues will be validated against `mem` and the device
    /// activated with it; MSIs go to `msi`, notify doorbells are registered
    /// with `ioevents`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        msi: Arc<dyn MsiSink>,
        ioevents: Arc<dyn IoEventRegistrar>,
    ) -> Result<Self, VirtioPciError> {
        let queues = queue_configs(device.queue_max_sizes())?;
        let msix = MsixConfig::new(queues.len() + 1, msi).map_err(VirtioPciError::Msix)?;
        let num_vectors = msix.num_vectors();
        let mut config = PciConfiguration::new(&header(device.device_type()));
        let bar = PciBarRegion {
            index: VIRTIO_BAR,
            size: BAR_SIZE,
            kind: PciBarKind::Memory64,
            prefetchable: false,
        };
        config.add_bar(bar).map_err(VirtioPciError::Config)?;
        let caps = add_capabilities(&mut config, queues.len(), num_vectors)
            .map_err(VirtioPciError::Config)?;
        let interrupt = Arc::new(InterruptState::new(
            Arc::new(Mutex::new(msix)),
            queues.len(),
        ));
        Ok(Self {
            device,
            config,
            caps,
            common: CommonConfig::new(queues),
            interrupt,
            mem,
            ioevents,
            bar_address: None,
            ioevent_base: None,
            notify_fds: Vec::new(),
            activated: false,
        })
    }

    /// The wrapped device's identifier, for logs.
    pub fn id(&self) -> &str {
        self.device.id()
    }

    /// Guest physical address of queue `index`'s notify doorbell, if the BAR
    /// is decoded.
    pub fn notify_address(&self, index: u16) -> Option<u64> {
        self.bar_address.map(|bar| {
            bar + NOTIFY_CFG_OFFSET + u64::from(index) * u64::from(NOTIFY_OFF_MULTIPLIER)
        })
    }

    fn msix_cap_reg(&self) -> usize {
        self.caps.msix / 4
    }

    /// Register of `pci_cfg_data` in the PCI_CFG capability.
    fn pci_cfg_data_reg(&self) -> usize {
        self.caps.pci_cfg / 4 + 4
    }

    /// (bar, offset, length) the driver set in the PCI_CFG capability, if
    /// they describe a valid access to our BAR.
    fn pci_cfg_window(&self) -> Option<(usize, u64, usize)> {
        let reg = self.caps.pci_cfg / 4;
        let bar = (self.config.read_register(reg + 1) & 0xff) as usize;
        let offset = u64::from(self.config.read_register(reg + 2));
        let len = self.config.read_register(reg + 3) as usize;
        let valid = bar == VIRTIO_BAR
            && matches!(len, 1 | 2 | 4)
            && offset % len as u64 == 0
            && offset + len as u64 <= BAR_SIZE;
        valid.then_some((bar, offset, len))
    }

    fn pci_cfg_read(&mut self) -> u32 {
        let Some((bar, offset, len)) = self.pci_cfg_window() else {
            warn_limited!(id = self.device.id(), "invalid VIRTIO_PCI_CAP_PCI_CFG read");
            return 0;
        };
        let mut bytes = [0u8; 4];
        self.bar_read(bar, offset, &mut bytes[..len]);
        u32::from_le_bytes(bytes)
    }

    fn pci_cfg_write(&mut self, reg_offset: u64, data: &[u8]) {
        match self.pci_cfg_window() {
            Some((bar, offset, len)) if reg_offset == 0 && data.len() >= len => {
                self.bar_write(bar, offset, &data[..len])
            }
            _ => warn_limited!(
                id = self.device.id(),
                "invalid VIRTIO_PCI_CAP_PCI_CFG write"
            ),
        }
    }

    fn notify(&mut self, offset: u64) {
        let index = (offset / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
        match self.notify_fds.get(index) {
            Some(Some(fd)) => {
                if let Err(e) = fd.write(1) {
                    warn_limited!(id = self.device.id(), index, error = %e, "cannot signal queue eventfd");
                }
            }
            _ => warn_limited!(
                id = self.device.id(),
                index,
                "notify for a queue that is not active"
            ),
        }
    }

    fn isr_read(&self, offset: u64, data: &mut [u8]) {
        if offset == 0 {
            data[0] = self.interrupt.take_isr();
        }
    }
}

fn header(virtio_type: u32) -> PciHeader {
    let class_code = match virtio_type {
        device_type::NET => CLASS_NETWORK,
        device_type::BLOCK => CLASS_STORAGE_OTHER,
        _ => CLASS_OTHER,
    };
    PciHeader {
        vendor_id: VIRTIO_PCI_VENDOR_ID,
        device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(virtio_type as u16),
        revision_id: 1,
        class_code,
        subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
        subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        interrupt_pin: 0,
    }
}

fn queue_configs(max_sizes: &[u16]) -> Result<Vec<QueueConfig>, VirtioPciError> {
    if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
        return Err(VirtioPciError::QueueCount(max_sizes.len()));
    }
    max_sizes
        .iter()
        .enumerate()
        .map(|(index, &size)| {
            QueueConfig::new(size).ok_or(VirtioPciError::QueueSize { index, size })
        })
        .collect()
}

/// `struct virtio_pci_cap` after cap_vndr/cap_next, followed by `extra`.
fn virtio_cap(cfg_type: u8, offset: u64, length: u32, extra: &[u8]) -> Vec<u8> {
    let mut body = vec![
        (VIRTIO_CAP_LEN + extra.len()) as u8,
        cfg_type,
        VIRTIO_BAR as u8,
        0,
        0,
        0,
    ];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&length.to_le_bytes());
    body.extend_from_slice(extra);
    body
}

fn add_capabilities(
    config: &mut PciConfiguration,
    num_queues: usize,
    num_vectors: u16,
) -> Result<CapOffsets, ConfigError> {
    let msix_body = msix::capability_body(
        num_vectors,
        VIRTIO_BAR as u8,
        MSIX_TABLE_OFFSET as u32,
        VIRTIO_BAR as u8,
        MSIX_PBA_OFFSET as u32,
    );
    let msix = config.add_capability(CAP_ID_MSIX, &msix_body)?;
    config.set_writable_mask(msix / 4, MSIX_CAP_WRITABLE);
    let notify_len = num_queues as u32 * NOTIFY_OFF_MULTIPLIER;
    let caps = [
        virtio_cap(
            VIRTIO_PCI_CAP_COMMON_CFG,
            COMMON_CFG_OFFSET,
            COMMON_CFG_SIZE,
            &[],
        ),
        virtio_cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            NOTIFY_CFG_OFFSET,
            notify_len,
            &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
        ),
        virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, 1, &[]),
        virtio_cap(
            VIRTIO_PCI_CAP_DEVICE_CFG,
            DEVICE_CFG_OFFSET,
            DEVICE_CFG_SIZE,
            &[],
        ),
    ];
    for body in caps {
        config.add_capability(CAP_ID_VENDOR_SPECIFIC, &body)?;
    }
    // The PCI_CFG capability: bar, offset and length are the driver's to set.
    let pci_cfg = config.add_capability(
        CAP_ID_VENDOR_SPECIFIC,
        &virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, &[0; 4]),
    )?;
    let reg = pci_cfg / 4;
    config.set_writable_mask(reg + 1, 0xff);
    config.set_writable_mask(reg + 2, u32::MAX);
    config.set_writable_mask(reg + 3, u32::MAX);
    Ok(CapOffsets { msix, pci_cfg })
}

impl PciDevice for VirtioPciDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        if reg_idx == self.pci_cfg_data_reg() {
            return self.pci_cfg_read();
        }
        self.config.read_register(reg_idx)
    }

    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        if reg_idx == self.pci_cfg_data_reg() {
            return self.pci_cfg_write(offset, data);
        }
        self.config.write_register(reg_idx, offset, data);
        if reg_idx == self.msix_cap_reg() {
            let control = (self.config.read_register(reg_idx) >> 16) as u16;
            self.interrupt.msix().set_message_control(control);
        }
    }

    fn bars(&self) -> Vec<PciBarRegion> {
        self.config.bars()
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((region, inner)) =
            BarRegion::decode(offset, data.len()).filter(|_| bar == VIRTIO_BAR)
        else {
            warn_limited!(
                id = self.device.id(),
                bar,
                offset,
                len = data.len(),
                "invalid virtio-pci BAR read"
            );
            return;
        };
        match region {
            BarRegion::Common => self.common_read(inner, data),
            BarRegion::Isr => self.isr_read(inner, data),
            BarRegion::Device => self.device.read_config(inner, data),
            BarRegion::Notify => {}
            BarRegion::MsixTable => self.interrupt.msix().read_table(inner, data),
            BarRegion::MsixPba => self.interrupt.msix().read_pba(inner, data),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let Some((region, inner)) =
            BarRegion::decode(offset, data.len()).filter(|_| bar == VIRTIO_BAR)
        else {
            warn_limited!(
                id = self.device.id(),
                bar,
                offset,
                len = data.len(),
                "invalid virtio-pci BAR write"
            );
            return;
        };
        match region {
            BarRegion::Common => self.common_write(inner, data),
            BarRegion::Device => self.device.write_config(inner, data),
            BarRegion::Notify => self.notify(inner),
            BarRegion::MsixTable => self.interrupt.msix().write_table(inner, data),
            BarRegion::Isr | BarRegion::MsixPba => {
                warn_limited!(
                    id = self.device.id(),
                    offset,
                    "write to a read-only virtio-pci structure"
                )
            }
        }
    }

    fn bar_moved(&mut self, bar: usize, address: Option<u64>) {
        if bar != VIRTIO_BAR {
            return;
        }
        self.unregister_ioeventfds();
        self.bar_address = address;
        if self.activated {
            self.register_ioeventfds();
        }
    }
}

#[cfg(test)]
mod tests;
