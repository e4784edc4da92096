//! ACPI: find the RSDP, walk the XSDT (or RSDT), count the enabled CPUs in
//! the MADT and read the ECAM window from the MCFG.

use crate::mem::{read_phys, read_phys_bytes};

/// What the guest needs from the ACPI tables.
#[derive(Debug, Default)]
pub struct AcpiInfo {
    /// Enabled local APIC and x2APIC entries in the MADT.
    pub cpus: u32,
    /// Their APIC IDs, in MADT order (the first [`APIC_IDS_MAX`]).
    pub apic_ids: [u32; APIC_IDS_MAX],
    /// Local APIC address from the MADT header.
    pub lapic_addr: u32,
    /// First ECAM window of PCI segment 0.
    pub ecam: Option<Ecam>,
}

/// Most APIC IDs kept from the MADT (ferro-vmm allows 32 vCPUs).
pub const APIC_IDS_MAX: usize = 32;

impl AcpiInfo {
    /// The APIC IDs of the enabled CPUs, in MADT order.
    pub fn apic_ids(&self) -> &[u32] {
        &self.apic_ids[..(self.cpus as usize).min(APIC_IDS_MAX)]
    }

    fn add_cpu(&mut self, apic_id: u32) {
        if let Some(slot) = self.apic_ids.get_mut(self.cpus as usize) {
            *slot = apic_id;
        }
        self.cpus += 1;
    }
}

/// One MCFG allocation.
#[derive(Clone, Copy, Debug)]
pub struct Ecam {
    /// Base address (the address of bus 0's configuration space).
    pub base: u64,
    /// First bus decoded.
    pub first_bus: u8,
    /// Last bus decoded.
    pub last_bus: u8,
}

/// Length of the common SDT header.
const SDT_HEADER: u64 = 36;

/// Searches `[start, end)` on 16-byte boundaries for a valid RSDP.
fn scan_rsdp(start: u64, end: u64) -> Option<u64> {
    (start..end).step_by(16).find(|&a| {
        let sig: [u8; 8] = read_phys(a);
        &sig == b"RSD PTR " && checksum(a, 20)
    })
}

/// True when the `len` bytes at `addr` sum to zero.
fn checksum(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(read_phys::<u8>(addr + i))) == 0
}

/// Finds the RSDP: `boot_params.acpi_rsdp_addr` if set, else the EBDA and
/// the BIOS area 0xe0000..0x100000.
pub fn find_rsdp(hint: Option<u64>) -> Option<u64> {
    if let Some(addr) = hint {
        let sig: [u8; 8] = read_phys(addr);
        if &sig == b"RSD PTR " {
            return Some(addr);
        }
    }
    let ebda = (read_phys::<u16>(0x40e) as u64) << 4;
    if (0x80000..0xa0000).contains(&ebda) {
        if let Some(a) = scan_rsdp(ebda, ebda + 1024) {
            return Some(a);
        }
    }
    scan_rsdp(0xe0000, 0x100000)
}

/// Walks the tables under the RSDP at `rsdp`.
pub fn parse(rsdp: u64) -> Result<AcpiInfo, &'static str> {
    let revision: u8 = read_phys(rsdp + 15);
    let (root, entry_size) = if revision >= 2 && read_phys::<u64>(rsdp + 24) != 0 {
        (read_phys::<u64>(rsdp + 24), 8)
    } else {
        (read_phys::<u32>(rsdp + 16) as u64, 4)
    };
    let root_len: u32 = read_phys(root + 4);
    if !checksum(root, root_len as u64) {
        return Err("bad XSDT/RSDT checksum");
    }
    let mut info = AcpiInfo::default();
    let count = (root_len as u64 - SDT_HEADER) / entry_size;
    for i in 0..count {
        let at = root + SDT_HEADER + i * entry_size;
        let table = if entry_size == 8 { read_phys::<u64>(at) } else { read_phys::<u32>(at) as u64 };
        let mut sig = [0u8; 4];
        read_phys_bytes(table, &mut sig);
        let len: u32 = read_phys(table + 4);
        match &sig {
            b"APIC" => parse_madt(table, len as u64, &mut info),
            b"MCFG" => parse_mcfg(table, len as u64, &mut info),
            _ => {}
        }
    }
    Ok(info)
}

/// MADT: local APIC address at +36, flags at +40, entries from +44. Local
/// APIC entries (type 0) hold the APIC ID at +3 and flags at +4, local
/// x2APIC entries (type 9) the ID at +4 and flags at +8.
fn parse_madt(table: u64, len: u64, info: &mut AcpiInfo) {
    info.lapic_addr = read_phys(table + 36);
    let mut off = 44;
    while off + 2 <= len {
        let kind: u8 = read_phys(table + off);
        let elen: u8 = read_phys(table + off + 1);
        if elen < 2 {
            break;
        }
        let usable = |flags: u32| flags & 1 != 0; // enabled
        match kind {
            0 if usable(read_phys(table + off + 4)) => info.add_cpu(read_phys::<u8>(table + off + 3) as u32),
            9 if usable(read_phys(table + off + 8)) => info.add_cpu(read_phys(table + off + 4)),
            _ => {}
        }
        off += elen as u64;
    }
}

/// MCFG: 8 reserved bytes after the header, then 16-byte allocations.
fn parse_mcfg(table: u64, len: u64, info: &mut AcpiInfo) {
    let mut off = 44;
    while off + 16 <= len {
        let segment: u16 = read_phys(table + off + 8);
        if segment == 0 && info.ecam.is_none() {
            info.ecam = Some(Ecam {
                base: read_phys(table + off),
                first_bus: read_phys(table + off + 10),
                last_bus: read_phys(table + off + 11),
            });
        }
        off += 16;
    }
}
