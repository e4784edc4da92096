//! COM1: a 16550 UART whose interrupt is an irqfd on ISA IRQ 4.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferro_pci::BusDevice;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the UART's interrupt by writing its irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes; notes the first byte the guest writes.
pub struct ConsoleSink {
    out: Box<dyn Write + Send>,
    first_output: Arc<AtomicBool>,
}

impl ConsoleSink {
    /// Wrap `out`; `first_output` flips to true on the first byte.
    pub fn new(out: Box<dyn Write + Send>, first_output: Arc<AtomicBool>) -> Self {
        Self { out, first_output }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.first_output.store(true, Ordering::Relaxed);
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The COM1 device on the port I/O bus.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleSink>,
}

impl SerialDevice {
    /// A UART signalling `irq` and writing to `sink`.
    pub fn new(irq: EventFd, sink: ConsoleSink) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), sink),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            // Output errors (a full disk, a closed pipe) must not stop the guest.
            let _ = self.uart.write(offset as u8, data[0]);
            if offset == 0 && data[0] == b'\n' {
                let _ = self.uart.writer_mut().flush();
            }
        }
    }
}
