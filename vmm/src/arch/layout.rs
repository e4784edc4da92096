//! The guest physical address map of a Ferrocloud microVM.
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_7000  boot_params (zero page)
//! 0x0000_8ff0  boot stack     0x0000_9000  PML4, PDPT (0xa000), PDs (0xb000..)
//! 0x0002_0000  command line   0x0009_fc00  EBDA ─┐ reserved
//! 0x000e_0000  RSDP + ACPI tables ──────────────┘ (to 0x10_0000)
//! 0x0010_0000  RAM (kernel loaded at its ELF physical address)
//! 0xc000_0000  PCI 32-bit MMIO window (BARs), 512 MiB
//! 0xe000_0000  PCI ECAM, bus 0 (1 MiB)
//! 0xfec0_0000  IOAPIC         0xfee0_0000  local APIC
//! 0x1_0000_0000 RAM above 4 GiB when the guest has more than 3 GiB
//! ```

/// GDT used at boot.
pub const BOOT_GDT_START: u64 = 0x500;
/// Maximum GDT entries at boot.
pub const BOOT_GDT_MAX: usize = 8;
/// Zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directories (four, mapping the first 4 GiB with 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the command line, including its NUL.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the extended BIOS data area: RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the RSDP and the other ACPI tables live (legacy RSDP search area).
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI area; the 64 KiB above it are the BIOS segment.
pub const ACPI_END: u64 = 0xf0000;
/// The real-mode reset vector (F000:FFF0), where a CPU or a kernel's
/// "BIOS reboot" starts: it holds a stub that resets through the i8042.
pub const RESET_VECTOR: u64 = 0xffff0;
/// First byte of high memory; kernels load at or above this.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the hole below 4 GiB reserved for devices.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
/// Start of RAM above the 32-bit hole.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;
/// PCI 32-bit MMIO window, where BARs are allocated.
pub const PCI_MMIO_START: u64 = 0xc000_0000;
/// Size of the PCI MMIO window.
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration access (ECAM), bus 0 only.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// ECAM size for one bus.
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// TSS area KVM needs on Intel hosts (3 pages below the identity map page).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Port of the first 16550 UART.
pub const COM1_PORT: u16 = 0x3f8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;
/// i8042 data port (the command port is 0x64).
pub const I8042_DATA_PORT: u16 = 0x60;
/// ISA IRQ of the i8042 keyboard.
pub const I8042_IRQ: u32 = 1;
/// PCI configuration mechanism #1 ports (0xcf8 address, 0xcfc data).
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// CMOS real-time clock index port (data at +1).
pub const RTC_PORT: u16 = 0x70;
/// ACPI sleep control register (hardware-reduced ACPI).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI reset register.
pub const ACPI_RESET_PORT: u16 = 0x604;
/// Value written to [`ACPI_RESET_PORT`] to reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;
