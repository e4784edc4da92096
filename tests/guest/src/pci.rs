//! PCI configuration space: ECAM (from the MCFG) for enumeration, and the
//! legacy 0xcf8/0xcfc mechanism to cross-check it.

use crate::cpu::{inl, outl};
use crate::mem::{mmio_read, mmio_write};

/// A function's configuration space in the ECAM window.
#[derive(Clone, Copy, Debug)]
pub struct PciFunction {
    /// Bus number.
    pub bus: u8,
    /// Device number.
    pub dev: u8,
    /// Function number.
    pub func: u8,
    /// Address of its 4 KiB of configuration space.
    cfg: u64,
}

/// PCI command register bits.
pub const CMD_MEMORY: u16 = 1 << 1;
/// Bus mastering (DMA, and MSI/MSI-X writes).
pub const CMD_BUS_MASTER: u16 = 1 << 2;
/// INTx disable.
pub const CMD_INTX_DISABLE: u16 = 1 << 10;

impl PciFunction {
    /// The function at `bus:dev.func` of the ECAM window at `ecam_base`.
    pub fn new(ecam_base: u64, bus: u8, dev: u8, func: u8) -> Self {
        let cfg = ecam_base + ((bus as u64) << 20 | (dev as u64) << 15 | (func as u64) << 12);
        PciFunction { bus, dev, func, cfg }
    }

    /// 8-bit config read.
    pub fn read8(&self, off: u16) -> u8 {
        mmio_read(self.cfg + off as u64)
    }
    /// 16-bit config read.
    pub fn read16(&self, off: u16) -> u16 {
        mmio_read(self.cfg + off as u64)
    }
    /// 32-bit config read.
    pub fn read32(&self, off: u16) -> u32 {
        mmio_read(self.cfg + off as u64)
    }
    /// 16-bit config write.
    pub fn write16(&self, off: u16, v: u16) {
        mmio_write(self.cfg + off as u64, v)
    }

    /// Vendor ID (0xffff: nothing there).
    pub fn vendor(&self) -> u16 {
        self.read16(0x00)
    }
    /// Device ID.
    pub fn device(&self) -> u16 {
        self.read16(0x02)
    }
    /// Class code, subclass and programming interface (24 bits).
    pub fn class(&self) -> u32 {
        self.read32(0x08) >> 8
    }

    /// The address a BAR decodes (memory BARs; 64-bit BARs combined).
    pub fn bar(&self, index: u8) -> Option<u64> {
        let off = 0x10 + 4 * index as u16;
        let lo = self.read32(off);
        if lo & 1 != 0 {
            return None; // I/O BAR
        }
        let mut addr = (lo & !0xf) as u64;
        if (lo >> 1) & 3 == 2 {
            addr |= (self.read32(off + 4) as u64) << 32;
        }
        (addr != 0).then_some(addr)
    }

    /// Sets bits in the command register.
    pub fn enable(&self, bits: u16) {
        let cmd = self.read16(0x04);
        self.write16(0x04, cmd | bits);
    }

    /// The capability list: (id, offset) pairs.
    pub fn capabilities(&self) -> Capabilities<'_> {
        let has_list = self.read16(0x06) & (1 << 4) != 0;
        let first = if has_list { self.read8(0x34) & !3 } else { 0 };
        Capabilities { func: self, next: first, budget: 48 }
    }
}

/// Iterator over a function's capability list.
pub struct Capabilities<'a> {
    func: &'a PciFunction,
    next: u8,
    budget: u8,
}

impl Iterator for Capabilities<'_> {
    type Item = (u8, u16);
    fn next(&mut self) -> Option<(u8, u16)> {
        if self.next < 0x40 || self.budget == 0 {
            return None;
        }
        self.budget -= 1;
        let off = self.next as u16;
        let id = self.func.read8(off);
        self.next = self.func.read8(off + 1) & !3;
        Some((id, off))
    }
}

/// Enumerates bus `bus` through ECAM, calling `f` for each function present.
pub fn scan_bus(ecam_base: u64, bus: u8, mut f: impl FnMut(PciFunction)) {
    for dev in 0..32 {
        let f0 = PciFunction::new(ecam_base, bus, dev, 0);
        if f0.vendor() == 0xffff {
            continue;
        }
        let multi = f0.read8(0x0e) & 0x80 != 0;
        for func in 0..if multi { 8 } else { 1 } {
            let pf = PciFunction::new(ecam_base, bus, dev, func);
            if pf.vendor() != 0xffff {
                f(pf);
            }
        }
    }
}

/// Reads a config dword through configuration mechanism #1 (0xcf8/0xcfc).
pub fn legacy_read32(bus: u8, dev: u8, func: u8, off: u8) -> u32 {
    let addr = 1 << 31 | (bus as u32) << 16 | (dev as u32) << 11 | (func as u32) << 8 | (off & 0xfc) as u32;
    outl(0xcf8, addr);
    inl(0xcfc)
}
