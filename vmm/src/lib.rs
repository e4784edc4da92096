//! `ferro-vmm`: Ferrocloud's KVM microVM monitor, one process per VM.
//!
//! It boots a Linux kernel (ELF vmlinux or bzImage) directly through the
//! 64-bit Linux boot protocol — no BIOS — with ACPI tables describing the
//! vCPUs and a PCI host bridge, and offers virtio 1.x devices over PCI with
//! MSI-X (block, net, rng), a 16550 serial console and an i8042 for reset.
//! The host agent drives it through a control socket ([`control`]).
//!
//! Modules, in boot order:
//! - [`config`]: flags and TOML file, validated up front.
//! - [`arch`]: the address map, CPUID, boot registers and the zero page.
//! - [`acpi`]: RSDP, XSDT, FADT, MADT, MCFG, DSDT.
//! - [`devices`]: serial, i8042, ACPI power management.
//! - [`pci`]: the PCI root complex and virtio-pci devices.
//! - [`vcpu`]: vCPU threads and their exit handler.
//! - [`vm`]: building and running the whole VM.
//! - [`seccomp`]: per-thread system call filters.
//! - [`control`]: the agent's control socket.

/// Exit status of ferro-vmm when the guest reset itself (reboot from
/// inside: i8042, ACPI reset register, triple fault). A power-off and a stop
/// from the control socket exit 0; errors exit 1 (2 for bad arguments).
/// The supervisor decides what a reset means (the agent starts the guest
/// again in place, as EC2 does for a reboot from inside).
pub const EXIT_GUEST_RESET: u8 = 10;

pub mod acpi;
pub mod arch;
pub mod config;
pub mod control;
pub mod devices;
pub mod exitstats;
pub mod pci;
pub mod seccomp;
pub mod smbios;
pub mod vcpu;
pub mod vm;

/// Guest memory as used throughout the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
