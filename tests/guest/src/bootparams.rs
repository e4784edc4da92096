//! The Linux boot protocol's zero page (`struct boot_params`): command line,
//! e820 memory map and the RSDP address.

use crate::mem::{read_phys, read_phys_bytes};

const ACPI_RSDP_ADDR: u64 = 0x070;
const EXT_CMD_LINE_PTR: u64 = 0x0c8;
const E820_ENTRIES: u64 = 0x1e8;
const CMD_LINE_PTR: u64 = 0x228;
const CMDLINE_SIZE: u64 = 0x238;
const E820_TABLE: u64 = 0x2d0;
/// `E820_MAX_ENTRIES_ZEROPAGE`.
const E820_MAX: usize = 128;
/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// One e820 map entry.
#[derive(Clone, Copy, Debug)]
pub struct E820Entry {
    /// First byte.
    #[allow(dead_code)] // part of the entry; the self-test only sums sizes
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// 1 = RAM, 2 = reserved, 3 = ACPI, ...
    pub kind: u32,
}

/// What the guest uses from `boot_params`.
pub struct BootParams {
    base: u64,
}

/// Longest command line kept.
pub const CMDLINE_MAX: usize = 2048;

impl BootParams {
    /// Wraps the zero page at physical `base` (from `%rsi` at entry).
    pub fn new(base: u64) -> Self {
        BootParams { base }
    }

    /// The kernel command line, copied into `buf`.
    pub fn cmdline<'a>(&self, buf: &'a mut [u8; CMDLINE_MAX]) -> &'a str {
        let lo: u32 = read_phys(self.base + CMD_LINE_PTR);
        let hi: u32 = read_phys(self.base + EXT_CMD_LINE_PTR);
        let ptr = (hi as u64) << 32 | lo as u64;
        if ptr == 0 {
            return "";
        }
        let size: u32 = read_phys(self.base + CMDLINE_SIZE);
        let max = if size == 0 { CMDLINE_MAX } else { (size as usize).min(CMDLINE_MAX) };
        read_phys_bytes(ptr, &mut buf[..max]);
        let len = buf[..max].iter().position(|&b| b == 0).unwrap_or(max);
        core::str::from_utf8(&buf[..len]).unwrap_or("<not utf-8>")
    }

    /// The e820 entries.
    pub fn e820(&self) -> impl Iterator<Item = E820Entry> + '_ {
        let n: u8 = read_phys(self.base + E820_ENTRIES);
        (0..(n as usize).min(E820_MAX)).map(move |i| {
            let e = self.base + E820_TABLE + 20 * i as u64;
            E820Entry { addr: read_phys(e), size: read_phys(e + 8), kind: read_phys(e + 16) }
        })
    }

    /// `acpi_rsdp_addr`, if the loader filled it in.
    pub fn rsdp(&self) -> Option<u64> {
        let addr: u64 = read_phys(self.base + ACPI_RSDP_ADDR);
        (addr != 0).then_some(addr)
    }
}

/// The value of `key=` on a command line (first match), if any.
pub fn cmdline_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
}
