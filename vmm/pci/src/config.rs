//! A PCI type-0 (endpoint) configuration space.
//!
//! The space is kept as 1024 little-endian dwords (256 bytes conventional
//! plus the PCIe extended space reachable through ECAM) together with a mask
//! of the bits the guest may write. Everything a guest can do to the space —
//! BAR size probing included — falls out of that mask:
//!
//! - a BAR's writable bits are the address bits above its size, so writing
//!   all-ones and reading back yields the size mask with the read-only type
//!   bits, exactly as on hardware;
//! - capabilities are read-only unless their owner marks some bits writable
//!   ([`PciConfiguration::set_writable_mask`]) and reacts to the writes;
//! - the extended space past 256 bytes reads as zero (no extended
//!   capabilities) and ignores writes.
//!
//! Accesses are 1, 2 or 4 bytes inside one dword; anything else (and any
//! register index past the end) reads as all-ones and writes are dropped,
//! which is what a guest sees for a master abort.

use ferro_virtio::warn_limited;

/// Size of the whole (extended) configuration space of one function.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the conventional configuration space (where capabilities live).
pub const CONVENTIONAL_CONFIG_SIZE: usize = 256;
/// Number of 32-bit registers in [`CONFIG_SPACE_SIZE`].
pub const NUM_CONFIG_REGISTERS: usize = CONFIG_SPACE_SIZE / 4;
/// Number of BARs of a type-0 header.
pub const NUM_BARS: usize = 6;
/// Register index of BAR 0.
pub const BAR0_REG: usize = 4;
/// Register index of the command (low half) and status (high half) words.
pub const COMMAND_REG: usize = 1;
/// Command register: respond to I/O space accesses.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command register: respond to memory space accesses (BAR decoding).
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register: the device may master the bus (DMA, MSI).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Status register: the capability list at 0x34 is valid.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Capability id of a vendor-specific capability (virtio uses these).
pub const CAP_ID_VENDOR_SPECIFIC: u8 = 0x09;
/// Capability id of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;

const CLASS_REG: usize = 2;
const HEADER_REG: usize = 3;
const SUBSYSTEM_REG: usize = 11;
const CAP_PTR_OFFSET: usize = 0x34;
const INTERRUPT_REG: usize = 15;
const FIRST_CAP_OFFSET: usize = 0x40;
/// Command bits a guest may change: I/O, memory, bus master, parity error
/// response, SERR# enable and INTx disable.
const COMMAND_WRITABLE: u32 = 0x0547;
/// Low bits of a memory BAR that encode its type and never hold address bits.
const BAR_MEM_TYPE_BITS: u32 = 0xf;
const BAR_MEM_64BIT: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 0b1000;
/// Smallest memory BAR the type bits leave room for.
const MIN_BAR_SIZE: u64 = 16;

/// Errors from building a configuration space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A BAR index past the header's six BARs (or BAR 5 for a 64-bit BAR).
    #[error("invalid BAR index {0}")]
    BarIndex(usize),
    /// BAR sizes are powers of two from 16 bytes (2 GiB at most for 32-bit BARs).
    #[error("invalid BAR size {0:#x}")]
    BarSize(u64),
    /// The BAR slot (or the upper half of a 64-bit BAR) is already taken.
    #[error("BAR {0} is already in use")]
    BarInUse(usize),
    /// The capability does not fit in the conventional configuration space.
    #[error("no room for a {0}-byte capability")]
    CapabilitySpace(usize),
}

/// Width of a memory BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciBarKind {
    /// A 32-bit memory BAR (one register).
    Memory32,
    /// A 64-bit memory BAR (two registers, the upper one at `index + 1`).
    Memory64,
}

/// A memory BAR a device exposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBarRegion {
    /// BAR index (0..6); a 64-bit BAR also occupies `index + 1`.
    pub index: usize,
    /// Size in bytes, a power of two.
    pub size: u64,
    /// 32- or 64-bit.
    pub kind: PciBarKind,
    /// Whether the BAR is marked prefetchable.
    pub prefetchable: bool,
}

impl PciBarRegion {
    /// The address the guest programmed, given the BAR's low register and
    /// (for 64-bit BARs) the register after it.
    pub fn address_from(&self, low: u32, high: u32) -> u64 {
        let low = u64::from(low & !BAR_MEM_TYPE_BITS);
        match self.kind {
            PciBarKind::Memory32 => low,
            PciBarKind::Memory64 => (u64::from(high) << 32) | low,
        }
    }

    /// Register indices (in the config space) this BAR occupies.
    pub fn registers(&self) -> std::ops::RangeInclusive<usize> {
        let first = BAR0_REG + self.index;
        match self.kind {
            PciBarKind::Memory32 => first..=first,
            PciBarKind::Memory64 => first..=first + 1,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let last = match self.kind {
            PciBarKind::Memory32 => self.index,
            PciBarKind::Memory64 => self.index + 1,
        };
        if last >= NUM_BARS {
            return Err(ConfigError::BarIndex(self.index));
        }
        let max = match self.kind {
            PciBarKind::Memory32 => 1 << 31,
            PciBarKind::Memory64 => 1 << 63,
        };
        if !self.size.is_power_of_two() || self.size < MIN_BAR_SIZE || self.size > max {
            return Err(ConfigError::BarSize(self.size));
        }
        Ok(())
    }
}

/// Identity of a function, written once into its header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Revision id.
    pub revision_id: u8,
    /// Class code: base class << 16 | sub-class << 8 | programming interface.
    pub class_code: u32,
    /// Subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Subsystem id.
    pub subsystem_id: u16,
    /// Interrupt pin (0 = none, 1 = INTA#, ...).
    pub interrupt_pin: u8,
}

/// Split an access at `offset` (within a dword) of `len` bytes into a shift
/// and a mask, or `None` if it is not 1, 2 or 4 bytes inside one dword.
pub fn access_mask(offset: u64, len: usize) -> Option<(u32, u32)> {
    if !matches!(len, 1 | 2 | 4) || offset >= 4 || offset as usize + len > 4 {
        return None;
    }
    let shift = (offset as u32) * 8;
    let mask = if len == 4 {
        u32::MAX
    } else {
        ((1u32 << (len * 8)) - 1) << shift
    };
    Some((shift, mask))
}

/// Copy the bytes of `value` selected by an access at `offset` into `data`;
/// invalid accesses read as all-ones.
pub fn read_partial(value: u32, offset: u64, data: &mut [u8]) {
    match access_mask(offset, data.len()) {
        Some((shift, _)) => {
            let bytes = (value >> shift).to_le_bytes();
            data.copy_from_slice(&bytes[..data.len()]);
        }
        None => data.fill(0xff),
    }
}

/// The value of a (valid) partial write, shifted into place, with its mask.
pub fn write_partial(offset: u64, data: &[u8]) -> Option<(u32, u32)> {
    let (shift, mask) = access_mask(offset, data.len())?;
    let mut bytes = [0u8; 4];
    bytes[..data.len()].copy_from_slice(data);
    Some((u32::from_le_bytes(bytes) << shift, mask))
}

/// A type-0 configuration space (see the module docs).
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    registers: Vec<u32>,
    writable: Vec<u32>,
    bars: [Option<PciBarRegion>; NUM_BARS],
    /// Offset of the last capability in the list (to link the next one).
    last_capability: Option<usize>,
    /// Where the next capability goes.
    next_capability: usize,
}

impl PciConfiguration {
    /// A configuration space with `header`'s identity, no BARs and no
    /// capabilities; memory decoding starts disabled.
    pub fn new(header: &PciHeader) -> Self {
        let mut config = Self {
            registers: vec![0; NUM_CONFIG_REGISTERS],
            writable: vec![0; NUM_CONFIG_REGISTERS],
            bars: [None; NUM_BARS],
            last_capability: None,
            next_capability: FIRST_CAP_OFFSET,
        };
        config.registers[0] = u32::from(header.device_id) << 16 | u32::from(header.vendor_id);
        config.registers[CLASS_REG] =
            (header.class_code & 0xff_ffff) << 8 | u32::from(header.revision_id);
        config.registers[SUBSYSTEM_REG] =
            u32::from(header.subsystem_id) << 16 | u32::from(header.subsystem_vendor_id);
        config.registers[INTERRUPT_REG] = u32::from(header.interrupt_pin) << 8;
        config.writable[COMMAND_REG] = COMMAND_WRITABLE;
        // Cache line size is a plain read/write byte; header type 0.
        config.writable[HEADER_REG] = 0xff;
        // Interrupt line is a scratch byte for the OS.
        config.writable[INTERRUPT_REG] = 0xff;
        config
    }

    /// The register at `reg_idx`, all-ones if there is none.
    pub fn read_register(&self, reg_idx: usize) -> u32 {
        self.registers.get(reg_idx).copied().unwrap_or(u32::MAX)
    }

    /// Apply a guest write of `data` at byte `offset` within register
    /// `reg_idx`, keeping read-only bits. Invalid accesses are ignored.
    pub fn write_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        let Some((value, mask)) = write_partial(offset, data) else {
            warn_limited!(
                reg_idx,
                offset,
                len = data.len(),
                "invalid PCI config write size"
            );
            return;
        };
        let (Some(reg), Some(writable)) =
            (self.registers.get_mut(reg_idx), self.writable.get(reg_idx))
        else {
            warn_limited!(reg_idx, "PCI config write past the end");
            return;
        };
        let writable = writable & mask;
        *reg = (*reg & !writable) | (value & writable);
    }

    /// Overwrite register `reg_idx` from the device side (no mask applied).
    pub fn set_register(&mut self, reg_idx: usize, value: u32) {
        if let Some(reg) = self.registers.get_mut(reg_idx) {
            *reg = value;
        }
    }

    /// Let the guest write the bits of `mask` in register `reg_idx`.
    pub fn set_writable_mask(&mut self, reg_idx: usize, mask: u32) {
        if let Some(w) = self.writable.get_mut(reg_idx) {
            *w = mask;
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.registers[COMMAND_REG] as u16
    }

    /// Declare a memory BAR; its address starts at 0 (unassigned).
    pub fn add_bar(&mut self, region: PciBarRegion) -> Result<(), ConfigError> {
        region.validate()?;
        for reg in region.registers() {
            let index = reg - BAR0_REG;
            if self.bars[index].is_some() || self.writable[reg] != 0 {
                return Err(ConfigError::BarInUse(index));
            }
        }
        let address_mask = !(region.size - 1);
        let mut low = 0;
        if region.kind == PciBarKind::Memory64 {
            low |= BAR_MEM_64BIT;
            let high_reg = BAR0_REG + region.index + 1;
            self.writable[high_reg] = (address_mask >> 32) as u32;
        }
        if region.prefetchable {
            low |= BAR_PREFETCHABLE;
        }
        let low_reg = BAR0_REG + region.index;
        self.registers[low_reg] = low;
        self.writable[low_reg] = address_mask as u32 & !BAR_MEM_TYPE_BITS;
        self.bars[region.index] = Some(region);
        Ok(())
    }

    /// The BARs declared with [`PciConfiguration::add_bar`].
    pub fn bars(&self) -> Vec<PciBarRegion> {
        self.bars.iter().flatten().copied().collect()
    }

    /// The address currently programmed into BAR `index`, if it exists.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let region = self.bars.get(index).copied().flatten()?;
        let low = self.registers[BAR0_REG + index];
        let high = self.read_register(BAR0_REG + index + 1);
        Some(region.address_from(low, high))
    }

    /// Append a capability with id `cap_id`; `body` is everything after the
    /// id and next-pointer bytes (the first body byte lands at offset + 2).
    /// Returns the capability's byte offset. All its bits start read-only.
    pub fn add_capability(&mut self, cap_id: u8, body: &[u8]) -> Result<usize, ConfigError> {
        let len = 2 + body.len();
        let offset = self.next_capability;
        let end = offset + len;
        if end > CONVENTIONAL_CONFIG_SIZE {
            return Err(ConfigError::CapabilitySpace(len));
        }
        self.set_byte(offset, cap_id);
        self.set_byte(offset + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.set_byte(offset + 2 + i, *b);
        }
        match self.last_capability {
            Some(last) => self.set_byte(last + 1, offset as u8),
            None => {
                self.set_byte(CAP_PTR_OFFSET, offset as u8);
                self.registers[COMMAND_REG] |= u32::from(STATUS_CAP_LIST) << 16;
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = end.next_multiple_of(4);
        Ok(offset)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let (reg, shift) = (offset / 4, (offset % 4) * 8);
        self.registers[reg] = (self.registers[reg] & !(0xff << shift)) | u32::from(value) << shift;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            revision_id: 1,
            class_code: 0x02_00_00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
            interrupt_pin: 0,
        }
    }

    fn write32(c: &mut PciConfiguration, reg: usize, v: u32) {
        c.write_register(reg, 0, &v.to_le_bytes());
    }

    #[test]
    fn identity_registers() {
        let c = PciConfiguration::new(&header());
        assert_eq!(c.read_register(0), 0x1041_1af4);
        assert_eq!(c.read_register(2), 0x0200_0001);
        assert_eq!(c.read_register(11), 0x0040_1af4);
        assert_eq!(c.read_register(NUM_CONFIG_REGISTERS), u32::MAX);
        assert_eq!(c.read_register(0x100 / 4), 0, "extended space reads 0");
    }

    #[test]
    fn ids_are_read_only_and_command_partially_writable() {
        let mut c = PciConfiguration::new(&header());
        write32(&mut c, 0, 0xdead_beef);
        write32(&mut c, 2, 0xdead_beef);
        assert_eq!(c.read_register(0), 0x1041_1af4);
        assert_eq!(c.read_register(2), 0x0200_0001);
        write32(&mut c, COMMAND_REG, 0xffff_ffff);
        assert_eq!(
            c.read_register(COMMAND_REG),
            0x0547,
            "status stays 0, reserved bits 0"
        );
        c.write_register(COMMAND_REG, 0, &[0x02]);
        assert_eq!(c.command(), 0x0502, "byte write touches only the low byte");
        write32(&mut c, 0x200, 0xffff_ffff);
        assert_eq!(c.read_register(0x200), 0, "extended space ignores writes");
    }

    #[test]
    fn partial_and_invalid_accesses() {
        let mut c = PciConfiguration::new(&header());
        c.write_register(15, 0, &[0x0b]);
        assert_eq!(c.read_register(15) & 0xff, 0x0b);
        // Crossing the dword, odd size, 8 bytes: all ignored.
        c.write_register(15, 3, &[1, 2]);
        c.write_register(15, 0, &[1, 2, 3]);
        c.write_register(15, 0, &[9; 8]);
        c.write_register(5000, 0, &[1]);
        assert_eq!(c.read_register(15) & 0xff, 0x0b);
        let mut d = [0u8; 2];
        read_partial(0x1041_1af4, 2, &mut d);
        assert_eq!(d, [0x41, 0x10]);
        read_partial(0x1041_1af4, 3, &mut d);
        assert_eq!(d, [0xff, 0xff], "cross-dword read is all-ones");
    }

    #[test]
    fn bar32_sizing() {
        let mut c = PciConfiguration::new(&header());
        let bar = PciBarRegion {
            index: 1,
            size: 0x4000,
            kind: PciBarKind::Memory32,
            prefetchable: false,
        };
        c.add_bar(bar).unwrap();
        write32(&mut c, 5, u32::MAX);
        assert_eq!(c.read_register(5), 0xffff_c000);
        write32(&mut c, 5, 0xe000_4000);
        assert_eq!(c.bar_address(1), Some(0xe000_4000));
        // Unaligned addresses lose their low bits.
        write32(&mut c, 5, 0xe000_5004);
        assert_eq!(c.bar_address(1), Some(0xe000_4000));
        assert_eq!(c.bar_address(0), None);
    }

    #[test]
    fn bar64_sizing_and_flags() {
        let mut c = PciConfiguration::new(&header());
        let bar = PciBarRegion {
            index: 0,
            size: 0x8000,
            kind: PciBarKind::Memory64,
            prefetchable: true,
        };
        c.add_bar(bar).unwrap();
        assert_eq!(c.read_register(4), 0b1100);
        write32(&mut c, 4, u32::MAX);
        write32(&mut c, 5, u32::MAX);
        assert_eq!(c.read_register(4), 0xffff_800c);
        assert_eq!(c.read_register(5), u32::MAX);
        write32(&mut c, 4, 0xc000_0000);
        write32(&mut c, 5, 0x1);
        assert_eq!(c.bar_address(0), Some(0x1_c000_0000));
        // A byte write to the second byte of the low dword.
        c.write_register(4, 1, &[0x80]);
        assert_eq!(c.bar_address(0), Some(0x1_c000_8000));
        assert_eq!(c.bars(), vec![bar]);
    }

    #[test]
    fn bad_bars_rejected() {
        let mut c = PciConfiguration::new(&header());
        let mut bar = PciBarRegion {
            index: 5,
            size: 0x1000,
            kind: PciBarKind::Memory64,
            prefetchable: false,
        };
        assert_eq!(c.add_bar(bar), Err(ConfigError::BarIndex(5)));
        bar.index = 0;
        bar.size = 0x1001;
        assert_eq!(c.add_bar(bar), Err(ConfigError::BarSize(0x1001)));
        bar.size = 0x1000;
        c.add_bar(bar).unwrap();
        bar.index = 1;
        assert_eq!(c.add_bar(bar), Err(ConfigError::BarInUse(1)));
    }

    #[test]
    fn capability_chain() {
        let mut c = PciConfiguration::new(&header());
        assert_eq!(c.read_register(1) >> 16 & u32::from(STATUS_CAP_LIST), 0);
        let a = c.add_capability(CAP_ID_MSIX, &[0; 10]).unwrap();
        let b = c.add_capability(CAP_ID_VENDOR_SPECIFIC, &[14, 1]).unwrap();
        assert_eq!((a, b), (0x40, 0x4c));
        assert_ne!(c.read_register(1) >> 16 & u32::from(STATUS_CAP_LIST), 0);
        assert_eq!(c.read_register(0x34 / 4) & 0xff, 0x40);
        assert_eq!(c.read_register(0x40 / 4) & 0xffff, 0x4c11);
        assert_eq!(c.read_register(0x4c / 4), 0x010e_0009);
        assert_eq!(
            c.add_capability(CAP_ID_VENDOR_SPECIFIC, &[0; 200]),
            Err(ConfigError::CapabilitySpace(202))
        );
    }
}
