//! Interrupt delivery and doorbell registration, as seen by PCI devices.
//!
//! The VMM implements these traits on KVM (`KVM_SIGNAL_MSI`,
//! `KVM_IOEVENTFD`); tests implement them with recorders.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// An MSI message as programmed by the driver into an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (lower and upper dwords combined).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// Delivers MSIs to the guest.
pub trait MsiSink: Send + Sync {
    /// Inject `msg` into the guest.
    fn send(&self, msg: MsiMessage) -> io::Result<()>;
}

/// Binds a guest MMIO address to an eventfd so that a guest write there
/// signals the eventfd without an exit to the VMM (KVM's ioeventfd).
pub trait IoEventRegistrar: Send + Sync {
    /// Signal `fd` on any write of any value at MMIO `addr`.
    fn register(&self, addr: u64, fd: &EventFd) -> io::Result<()>;
    /// Undo [`IoEventRegistrar::register`].
    fn unregister(&self, addr: u64, fd: &EventFd) -> io::Result<()>;
}
