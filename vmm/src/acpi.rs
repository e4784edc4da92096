//! ACPI tables, so that a stock kernel finds its CPUs (MADT), the PCI host
//! bridge (DSDT + MCFG), the legacy devices, and how to power off and reset
//! (hardware-reduced FADT with sleep control and reset registers).

use acpi_tables::aml::{self, AddressSpace, AddressSpaceCacheable};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::layout::*;
use crate::GuestMemoryMmap;

const OEM_ID: [u8; 6] = *b"FERRO ";
const OEM_TABLE_ID: [u8; 8] = *b"FERROVMM";
const OEM_REVISION: u32 = 1;

/// Errors while writing ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the ACPI area.
    #[error("ACPI tables need {needed} bytes, the area has {room}")]
    TooBig {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        room: u64,
    },
    /// Writing to guest memory failed.
    #[error("cannot write ACPI tables to guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// What the tables describe.
#[derive(Clone, Copy, Debug)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC ids 0..n).
    pub vcpus: u8,
    /// PCI MMIO window `(base, size)`.
    pub pci_mmio: (u64, u64),
    /// ECAM base for bus 0.
    pub ecam_base: u64,
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

fn children(names: &[aml::Name]) -> Vec<&dyn Aml> {
    names.iter().map(|n| n as &dyn Aml).collect()
}

/// The DSDT body: PCI host bridge, COM1, PS/2 keyboard and the S5 state.
fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let (mmio_base, mmio_size) = cfg.pci_mmio;
    let bus = AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = aml::IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, 8);
    let mmio = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio_base as u32,
        (mmio_base + mmio_size - 1) as u32,
        None,
    );
    let pci_crs = aml::ResourceTemplate::new(vec![&bus, &cfg_io, &mmio]);
    let (hid, cid) = (aml::EISAName::new("PNP0A08"), aml::EISAName::new("PNP0A03"));
    let pci_names = [
        aml::Name::new("_HID".into(), &hid),
        aml::Name::new("_CID".into(), &cid),
        aml::Name::new("_ADR".into(), &aml::ZERO),
        aml::Name::new("_SEG".into(), &aml::ZERO),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_BBN".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &pci_crs),
    ];
    let pci = aml::Device::new("_SB_.PCI0".into(), children(&pci_names));
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_names = [
        aml::Name::new("_HID".into(), &com1_hid),
        aml::Name::new("_UID".into(), &aml::ZERO),
        aml::Name::new("_CRS".into(), &com1_crs),
    ];
    let com1 = aml::Device::new("_SB_.COM1".into(), children(&com1_names));
    let kbd_data = aml::IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1);
    let kbd_cmd = aml::IO::new(I8042_DATA_PORT + 4, I8042_DATA_PORT + 4, 1, 1);
    let kbd_irq = aml::Interrupt::new(true, true, false, false, I8042_IRQ);
    let kbd_crs = aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_hid = aml::EISAName::new("PNP0303");
    let kbd_names = [
        aml::Name::new("_HID".into(), &kbd_hid),
        aml::Name::new("_CRS".into(), &kbd_crs),
    ];
    let kbd = aml::Device::new("_SB_.PS2K".into(), children(&kbd_names));
    // The CMOS clock, so Linux's rtc_cmos finds it through PNP (no IRQ:
    // it raises none).
    let rtc_io = aml::IO::new(RTC_PORT, RTC_PORT, 1, 2);
    let rtc_crs = aml::ResourceTemplate::new(vec![&rtc_io]);
    let rtc_hid = aml::EISAName::new("PNP0B00");
    let rtc_names = [
        aml::Name::new("_HID".into(), &rtc_hid),
        aml::Name::new("_CRS".into(), &rtc_crs),
    ];
    let rtc = aml::Device::new("_SB_.RTC_".into(), children(&rtc_names));
    // \_S5: SLP_TYP 5 written to the sleep control register powers off.
    let s5_pkg = aml::Package::new(vec![&5u8]);
    let s5 = aml::Name::new("_S5_".into(), &s5_pkg);
    for dev in [&pci as &dyn Aml, &com1, &kbd, &rtc, &s5] {
        dev.to_aml_bytes(&mut sdt);
    }
    sdt.as_slice().to_vec()
}

fn io_port(port: u16) -> GAS {
    GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sleep_control_reg = io_port(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_port(ACPI_SLEEP_CONTROL_PORT + 1);
    fadt.reset_reg = io_port(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    // Bit 1 of IA-PC boot arch: "8042 present".
    fadt.iapc_boot_arch = 2u16.into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"FERROVMM").into();
    bytes_of(&fadt.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(
            id,
            id,
            acpi_tables::madt::EnabledStatus::Enabled,
        ));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    bytes_of(&madt)
}

fn mcfg(ecam: u64) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(ecam, 0, 0, 0);
    bytes_of(&mcfg)
}

/// Write all tables into the ACPI area; returns the RSDP address.
pub fn write_tables(mem: &GuestMemoryMmap, cfg: &AcpiConfig) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut cursor = ACPI_START + 64;
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let addr = cursor;
        let end = addr + bytes.len() as u64;
        if end > ACPI_END {
            return Err(AcpiError::TooBig {
                needed: end - ACPI_START,
                room: ACPI_END - ACPI_START,
            });
        }
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(AcpiError::Memory)?;
        cursor = (end + 7) & !7;
        Ok(addr)
    };
    let dsdt_addr = place(&dsdt(cfg))?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(cfg.vcpus))?;
    let mcfg_addr = place(&mcfg(cfg.ecam_base))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(addr);
    }
    let xsdt_addr = place(&bytes_of(&xsdt))?;
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    mem.write_slice(&rsdp, GuestAddress(rsdp_addr))
        .map_err(AcpiError::Memory)?;
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut v = vec![0u8; len as usize];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn tables_chain_from_rsdp_with_valid_checksums() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let cfg = AcpiConfig {
            vcpus: 4,
            pci_mmio: (PCI_MMIO_START, PCI_MMIO_SIZE),
            ecam_base: PCI_ECAM_START,
        };
        let rsdp = write_tables(&mem, &cfg).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, rsdp).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let xsdt = table_at(&mem, xsdt_addr);
        assert!(checksum_ok(&xsdt));
        let sigs: Vec<[u8; 4]> = xsdt[36..]
            .chunks(8)
            .map(|c| {
                let t = table_at(&mem, u64::from_le_bytes(c.try_into().unwrap()));
                assert!(checksum_ok(&t), "bad checksum");
                t[..4].try_into().unwrap()
            })
            .collect();
        assert_eq!(sigs, vec![*b"FACP", *b"APIC", *b"MCFG"]);
        // MADT: 4 local APIC entries (type 0) and one IOAPIC (type 1).
        let madt = table_at(&mem, u64::from_le_bytes(xsdt[44..52].try_into().unwrap()));
        let mut off = 44;
        let mut kinds = Vec::new();
        while off < madt.len() {
            kinds.push(madt[off]);
            off += madt[off + 1] as usize;
        }
        assert_eq!(kinds, vec![0, 0, 0, 0, 1]);
        // DSDT is referenced by the FADT and names the PCI host bridge.
        let fadt = table_at(&mem, u64::from_le_bytes(xsdt[36..44].try_into().unwrap()));
        let dsdt_addr = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = table_at(&mem, dsdt_addr);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(4).any(|w| w == b"PCI0"));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
    }
}
