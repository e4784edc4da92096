//! Buses, the PCI root complex and the virtio-pci transport of `ferro-vmm`.
//!
//! - [`bus`]: an address space (port I/O or MMIO) mapping ranges to devices.
//! - [`interrupt`]: the traits through which PCI devices raise MSIs and ask
//!   for ioeventfds, implemented by the VMM on top of KVM.
//! - [`config`]: a type-0 configuration space with BAR sizing and a
//!   capability list builder.
//! - [`msix`]: the MSI-X capability, vector table and pending bit array.
//! - [`device`]: [`PciDevice`], what the root complex needs from a function.
//! - [`root`]: [`PciRoot`], bus 0 behind 0xCF8/0xCFC, ECAM and the BAR
//!   MMIO window.
//! - [`virtio_pci`]: [`VirtioPciDevice`], the virtio 1.x modern PCI
//!   transport with MSI-X for any [`ferro_virtio::VirtioDevice`].
//!
//! Guest-triggered warnings go through `ferro_virtio::warn_limited!`.
//!
//! Nothing here depends on KVM: interrupts and doorbells go through the
//! [`MsiSink`] and [`IoEventRegistrar`] traits.

pub mod bus;
pub mod config;
pub mod device;
pub mod interrupt;
pub mod msix;
pub mod root;
pub mod virtio_pci;

pub use bus::{Bus, BusDevice, BusError};
pub use config::{PciBarKind, PciBarRegion, PciConfiguration, PciHeader};
pub use device::PciDevice;
pub use interrupt::{IoEventRegistrar, MsiMessage, MsiSink};
pub use msix::MsixConfig;
pub use root::{
    PciDeviceInfo, PciRoot, PciRootLayout, RootError, ECAM_SIZE, PCI_CONFIG_IO_PORT,
    PCI_CONFIG_IO_SIZE,
};
pub use virtio_pci::{VirtioPciDevice, VirtioPciError};
