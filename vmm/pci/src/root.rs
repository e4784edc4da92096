//! The PCI root complex: bus 0 with a host bridge and up to 31 functions.
//!
//! One [`PciRoot`] is inserted by the VMM at three ranges, told apart by the
//! `base` the bus passes to [`BusDevice`]:
//!
//! - port I/O `0xCF8..0xD00` ([`PCI_CONFIG_IO_SIZE`] bytes): configuration
//!   mechanism #1 — a 32-bit address latch at 0xCF8 (bit 31 enable, bus,
//!   device, function, register) and a data window at 0xCFC..0xCFF that
//!   takes 1-, 2- and 4-byte accesses;
//! - MMIO ECAM ([`ECAM_SIZE`] bytes, bus 0 only): offset
//!   `dev << 15 | fn << 12 | reg`;
//! - the 32-bit MMIO window: every access is dispatched to the function
//!   whose BAR *currently* covers it, so the guest may re-program BARs
//!   without the VMM relocating anything on its buses.
//!
//! BARs are assigned from the window when a device is added (naturally
//! aligned, bump allocation) and memory decoding is switched on, as firmware
//! would do. A BAR is decoded only while memory decoding is on and the BAR
//! lies wholly inside the window; [`PciDevice::bar_moved`] tells the device
//! whenever that changes.
//!
//! Only function 0 of each slot exists; other functions, other buses and
//! empty slots read as all-ones (master abort) and ignore writes.

use std::ops::RangeInclusive;

use crate::bus::BusDevice;
use crate::config::{
    access_mask, read_partial, write_partial, PciBarKind, PciBarRegion, PciConfiguration,
    PciHeader, BAR0_REG, COMMAND_MEMORY_SPACE, COMMAND_REG, NUM_BARS,
};
use crate::device::PciDevice;
use ferro_virtio::warn_limited;

/// First port of configuration mechanism #1.
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
/// Ports taken by configuration mechanism #1 (0xCF8..=0xCFF).
pub const PCI_CONFIG_IO_SIZE: u64 = 8;
/// Size of the ECAM region for bus 0 (32 devices × 8 functions × 4 KiB).
pub const ECAM_SIZE: u64 = 1 << 20;
/// Slots on bus 0; slot 0 holds the host bridge.
pub const NUM_SLOTS: usize = 32;
/// Vendor id of the host bridge (Red Hat, as QEMU's generic PCIe host).
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x1b36;
/// Device id of the host bridge.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0008;
/// Class code of a host bridge.
pub const HOST_BRIDGE_CLASS: u32 = 0x06_00_00;

const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Bits of the 0xCF8 latch that hold state: enable, bus, device, function,
/// register (the two low bits are always zero).
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;
const DATA_PORT_OFFSET: u64 = 4;

/// Errors from building the root complex or adding devices.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RootError {
    /// All 31 device slots of bus 0 are taken.
    #[error("no free slot on PCI bus 0")]
    NoFreeSlot,
    /// A BAR does not fit in what is left of the MMIO window.
    #[error("no room in the PCI MMIO window for a {size:#x}-byte BAR")]
    WindowFull {
        /// Size of the BAR that did not fit.
        size: u64,
    },
    /// The ranges given to [`PciRoot::new`] are empty, overflow or overlap.
    #[error("invalid PCI layout: {0}")]
    Layout(&'static str),
}

/// Where the VMM places the root complex's three ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciRootLayout {
    /// Port I/O base of configuration mechanism #1, normally
    /// [`PCI_CONFIG_IO_PORT`]; spans [`PCI_CONFIG_IO_SIZE`] ports.
    pub io_base: u64,
    /// MMIO base of ECAM for bus 0; spans [`ECAM_SIZE`] bytes.
    pub ecam_base: u64,
    /// Start of the 32-bit MMIO window BARs are assigned from.
    pub mmio_base: u64,
    /// Size of that window.
    pub mmio_size: u64,
}

impl PciRootLayout {
    fn validate(&self) -> Result<(), RootError> {
        let window_end = self
            .mmio_base
            .checked_add(self.mmio_size)
            .ok_or(RootError::Layout("window overflows"))?;
        let ecam_end = self
            .ecam_base
            .checked_add(ECAM_SIZE)
            .ok_or(RootError::Layout("ECAM overflows"))?;
        if self.mmio_size == 0 {
            return Err(RootError::Layout("empty MMIO window"));
        }
        if self.ecam_base < window_end && self.mmio_base < ecam_end {
            return Err(RootError::Layout("ECAM overlaps the MMIO window"));
        }
        if self.io_base == self.ecam_base || self.io_base == self.mmio_base {
            return Err(RootError::Layout("port I/O base equals an MMIO base"));
        }
        Ok(())
    }

    fn window_contains(&self, address: u64, size: u64) -> bool {
        let end = self.mmio_base + self.mmio_size;
        address >= self.mmio_base && address.checked_add(size).is_some_and(|e| e <= end)
    }
}

/// A function on bus 0, as ACPI tables need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciDeviceInfo {
    /// Device number on bus 0 (function is always 0).
    pub slot: u8,
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Class code (base << 16 | sub << 8 | prog-if).
    pub class_code: u32,
}

/// The host bridge at 00:00.0: identity only.
struct HostBridge(PciConfiguration);

impl HostBridge {
    fn new() -> Self {
        Self(PciConfiguration::new(&PciHeader {
            vendor_id: HOST_BRIDGE_VENDOR_ID,
            device_id: HOST_BRIDGE_DEVICE_ID,
            class_code: HOST_BRIDGE_CLASS,
            ..Default::default()
        }))
    }
}

impl PciDevice for HostBridge {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.0.read_register(reg_idx)
    }
    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        self.0.write_register(reg_idx, offset, data)
    }
    fn bars(&self) -> Vec<PciBarRegion> {
        Vec::new()
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// A BAR and where it is decoded now.
struct BarMapping {
    region: PciBarRegion,
    address: Option<u64>,
}

struct Slot {
    device: Box<dyn PciDevice>,
    bars: Vec<BarMapping>,
}

/// Which of the root's three ranges an access came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Range {
    Io,
    Ecam,
    Window,
}

/// The root complex (see the module docs).
pub struct PciRoot {
    layout: PciRootLayout,
    slots: Vec<Option<Slot>>,
    /// The 0xCF8 latch.
    config_address: u32,
    /// Next free address of the MMIO window.
    next_mmio: u64,
}

impl PciRoot {
    /// A root complex with only the host bridge, at `layout`.
    pub fn new(layout: PciRootLayout) -> Result<Self, RootError> {
        layout.validate()?;
        let mut slots: Vec<Option<Slot>> = (0..NUM_SLOTS).map(|_| None).collect();
        slots[0] = Some(Slot {
            device: Box::new(HostBridge::new()),
            bars: Vec::new(),
        });
        Ok(Self {
            layout,
            slots,
            config_address: 0,
            next_mmio: layout.mmio_base,
        })
    }

    /// The ranges given at construction.
    pub fn layout(&self) -> PciRootLayout {
        self.layout
    }

    /// The MMIO window as (base, size), for the host bridge's `_CRS`.
    pub fn mmio_window(&self) -> (u64, u64) {
        (self.layout.mmio_base, self.layout.mmio_size)
    }

    /// ECAM as (base, size), for the MCFG table.
    pub fn ecam(&self) -> (u64, u64) {
        (self.layout.ecam_base, ECAM_SIZE)
    }

    /// Bus numbers behind the root (for MCFG and `_BBN`/`_CRS`): bus 0 only.
    pub fn bus_range(&self) -> RangeInclusive<u8> {
        0..=0
    }

    /// Every function on bus 0, host bridge (slot 0) included.
    pub fn devices(&mut self) -> Vec<PciDeviceInfo> {
        let mut infos = Vec::new();
        for (slot, entry) in self.slots.iter_mut().enumerate() {
            let Some(entry) = entry else { continue };
            let ids = entry.device.read_config_register(0);
            infos.push(PciDeviceInfo {
                slot: slot as u8,
                vendor_id: ids as u16,
                device_id: (ids >> 16) as u16,
                class_code: entry.device.read_config_register(2) >> 8,
            });
        }
        infos
    }

    /// Put `device` in the first free slot, assign its BARs from the MMIO
    /// window and enable memory decoding. Returns the slot number.
    pub fn add_device(&mut self, mut device: Box<dyn PciDevice>) -> Result<u8, RootError> {
        let slot = self
            .slots
            .iter()
            .position(Option::is_none)
            .ok_or(RootError::NoFreeSlot)?;
        let regions = device.bars();
        let (addresses, next_mmio) = self.allocate(&regions)?;
        for (region, address) in regions.iter().zip(&addresses) {
            program_bar(device.as_mut(), region, *address);
        }
        let command = device.read_config_register(COMMAND_REG) as u16 | COMMAND_MEMORY_SPACE;
        device.write_config_register(COMMAND_REG, 0, &command.to_le_bytes());
        let bars = regions
            .into_iter()
            .map(|region| BarMapping {
                region,
                address: None,
            })
            .collect();
        self.slots[slot] = Some(Slot { device, bars });
        self.next_mmio = next_mmio;
        self.refresh_bars(slot);
        Ok(slot as u8)
    }

    /// Addresses for `regions` (naturally aligned) and the new allocation
    /// cursor; nothing is committed on failure.
    fn allocate(&self, regions: &[PciBarRegion]) -> Result<(Vec<u64>, u64), RootError> {
        let mut cursor = self.next_mmio;
        let mut addresses = Vec::with_capacity(regions.len());
        for region in regions {
            let full = RootError::WindowFull { size: region.size };
            let address = cursor
                .checked_next_multiple_of(region.size)
                .ok_or(full.clone())?;
            if !self.layout.window_contains(address, region.size) {
                return Err(full);
            }
            addresses.push(address);
            cursor = address + region.size;
        }
        Ok((addresses, cursor))
    }

    /// Re-decode the BARs of `slot` and tell the device about changes.
    fn refresh_bars(&mut self, slot: usize) {
        let layout = self.layout;
        let Some(Some(entry)) = self.slots.get_mut(slot) else {
            return;
        };
        let decoding =
            entry.device.read_config_register(COMMAND_REG) as u16 & COMMAND_MEMORY_SPACE != 0;
        for bar in entry.bars.iter_mut() {
            let regs = bar.region.registers();
            let low = entry.device.read_config_register(*regs.start());
            let high = entry.device.read_config_register(*regs.end());
            let address = bar.region.address_from(low, high);
            let decoded =
                (decoding && layout.window_contains(address, bar.region.size)).then_some(address);
            if decoded != bar.address {
                bar.address = decoded;
                entry.device.bar_moved(bar.region.index, decoded);
            }
        }
    }

    fn range(&self, base: u64) -> Option<Range> {
        match base {
            b if b == self.layout.io_base => Some(Range::Io),
            b if b == self.layout.ecam_base => Some(Range::Ecam),
            b if b == self.layout.mmio_base => Some(Range::Window),
            _ => None,
        }
    }

    /// The (slot, register, byte-in-register) selected by the 0xCF8 latch
    /// plus `port_offset` (0..4 into the data port), if it names bus 0 fn 0.
    fn io_target(&self, port_offset: u64) -> Option<(usize, usize, u64)> {
        let address = self.config_address;
        if address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let (bus, dev, func) = (
            (address >> 16) & 0xff,
            (address >> 11) & 0x1f,
            (address >> 8) & 0x7,
        );
        let reg = (address & 0xfc) as usize / 4;
        (bus == 0 && func == 0).then_some((dev as usize, reg, port_offset))
    }

    /// The (slot, register, byte-in-register) an ECAM offset names, if it is
    /// function 0 (the range only covers bus 0).
    fn ecam_target(offset: u64) -> Option<(usize, usize, u64)> {
        if offset >= ECAM_SIZE {
            return None;
        }
        let (dev, func, reg) = ((offset >> 15) & 0x1f, (offset >> 12) & 0x7, offset & 0xfff);
        (func == 0).then_some((dev as usize, reg as usize / 4, reg % 4))
    }

    fn config_read(&mut self, target: Option<(usize, usize, u64)>, data: &mut [u8]) {
        data.fill(0xff);
        let Some((slot, reg, offset)) = target else {
            return;
        };
        if access_mask(offset, data.len()).is_none() {
            warn_limited!(
                slot,
                reg,
                offset,
                len = data.len(),
                "invalid PCI config read"
            );
            return;
        }
        if let Some(Some(entry)) = self.slots.get_mut(slot) {
            let value = entry.device.read_config_register(reg);
            read_partial(value, offset, data);
        }
    }

    fn config_write(&mut self, target: Option<(usize, usize, u64)>, data: &[u8]) {
        let Some((slot, reg, offset)) = target else {
            return;
        };
        if write_partial(offset, data).is_none() {
            warn_limited!(
                slot,
                reg,
                offset,
                len = data.len(),
                "invalid PCI config write"
            );
            return;
        }
        let Some(Some(entry)) = self.slots.get_mut(slot) else {
            return;
        };
        entry.device.write_config_register(reg, offset, data);
        if reg == COMMAND_REG || (BAR0_REG..BAR0_REG + NUM_BARS).contains(&reg) {
            self.refresh_bars(slot);
        }
    }

    fn io_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.config_address.to_le_bytes());
        } else if offset >= DATA_PORT_OFFSET {
            self.config_read(self.io_target(offset - DATA_PORT_OFFSET), data);
        } else {
            data.fill(0xff);
        }
    }

    fn io_write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(data);
            self.config_address = u32::from_le_bytes(bytes) & CONFIG_ADDRESS_MASK;
        } else if offset >= DATA_PORT_OFFSET {
            self.config_write(self.io_target(offset - DATA_PORT_OFFSET), data);
        } else {
            warn_limited!(
                offset,
                len = data.len(),
                "partial write to the PCI address port"
            );
        }
    }

    /// The slot and BAR decoding `[address, address + len)`, with the offset
    /// inside the BAR.
    fn bar_target(&self, address: u64, len: usize) -> Option<(usize, usize, u64)> {
        let end = address.checked_add(len as u64)?;
        self.slots.iter().enumerate().find_map(|(slot, entry)| {
            entry.as_ref()?.bars.iter().find_map(|bar| {
                let start = bar.address?;
                if address >= start && end <= start + bar.region.size {
                    Some((slot, bar.region.index, address - start))
                } else {
                    None
                }
            })
        })
    }

    fn window_access(
        &mut self,
        offset: u64,
        len: usize,
    ) -> Option<(&mut dyn PciDevice, usize, u64)> {
        let address = self.layout.mmio_base.checked_add(offset)?;
        let Some((slot, bar, bar_offset)) = self.bar_target(address, len) else {
            warn_limited!(address, len, "access to unclaimed PCI MMIO");
            return None;
        };
        let entry = self.slots[slot].as_mut()?;
        Some((entry.device.as_mut(), bar, bar_offset))
    }
}

/// Write `address` into `region`'s BAR registers, as firmware does.
fn program_bar(device: &mut dyn PciDevice, region: &PciBarRegion, address: u64) {
    let regs = region.registers();
    device.write_config_register(*regs.start(), 0, &(address as u32).to_le_bytes());
    if region.kind == PciBarKind::Memory64 {
        device.write_config_register(*regs.end(), 0, &((address >> 32) as u32).to_le_bytes());
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        match self.range(base) {
            Some(Range::Io) => self.io_read(offset, data),
            Some(Range::Ecam) => self.config_read(Self::ecam_target(offset), data),
            Some(Range::Window) => match self.window_access(offset, data.len()) {
                Some((device, bar, bar_offset)) => device.bar_read(bar, bar_offset, data),
                None => data.fill(0xff),
            },
            None => {
                warn_limited!(base, "PCI root read through an unknown range");
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        match self.range(base) {
            Some(Range::Io) => self.io_write(offset, data),
            Some(Range::Ecam) => self.config_write(Self::ecam_target(offset), data),
            Some(Range::Window) => {
                if let Some((device, bar, bar_offset)) = self.window_access(offset, data.len()) {
                    device.bar_write(bar, bar_offset, data);
                }
            }
            None => warn_limited!(base, "PCI root write through an unknown range"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
