//! Legacy platform devices on the port I/O bus.
//!
//! - [`serial`]: COM1, a 16550 UART (vm-superio) writing to a file or stdout.
//! - [`i8042`]: the keyboard controller, for CPU reset and Ctrl-Alt-Del.
//! - [`acpi_pm`]: the hardware-reduced ACPI sleep and reset registers.
//! - [`cmos`]: the CMOS real-time clock, reading the host's clock.

pub mod acpi_pm;
pub mod cmos;
pub mod i8042;
pub mod serial;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Why the guest asked the VMM to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitReason {
    /// Reset (reboot): i8042 0xFE, ACPI reset register or triple fault.
    Reset = 1,
    /// Power off through the ACPI sleep control register.
    PowerOff = 2,
    /// Stopped from the control socket.
    Stopped = 3,
    /// A vCPU hit an error it cannot continue from.
    Error = 4,
}

/// A one-shot "the VM should end" signal shared by devices and vCPUs.
#[derive(Clone)]
pub struct ExitSignal {
    reason: Arc<AtomicU8>,
    evt: Arc<EventFd>,
}

impl ExitSignal {
    /// A fresh, unsignalled exit.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Arc::new(AtomicU8::new(0)),
            evt: Arc::new(EventFd::new(0)?),
        })
    }

    /// Request the VM end for `reason`; the first reason wins.
    pub fn request(&self, reason: ExitReason) {
        let _ = self
            .reason
            .compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
        let _ = self.evt.write(1);
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        match self.reason.load(Ordering::SeqCst) {
            1 => Some(ExitReason::Reset),
            2 => Some(ExitReason::PowerOff),
            3 => Some(ExitReason::Stopped),
            4 => Some(ExitReason::Error),
            _ => None,
        }
    }

    /// The (blocking) eventfd that becomes readable on request.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}
