//! The COM1 16550 UART (port 0x3f8): polled output, one `ferro-guest: ` line
//! per fact.

use core::fmt;

use crate::cpu::{inb, outb};

const COM1: u16 = 0x3f8;
/// FIFO control register.
const FCR: u16 = COM1 + 2;
/// Line status register.
const LSR: u16 = COM1 + 5;
/// LSR: transmit holding register (and FIFO) empty.
const LSR_THRE: u8 = 0x20;
/// Bytes the transmit FIFO takes once THRE is set.
const FIFO_DEPTH: usize = 16;

/// Writer for COM1. Waits for an empty transmit FIFO and then writes up to 16
/// bytes, so a line costs one status read per 16 bytes.
pub struct Serial {
    room: usize,
}

impl Serial {
    /// Enables and clears the FIFOs.
    pub fn init() {
        outb(FCR, 0x07);
    }

    /// A writer; `Serial::init` must have run.
    pub const fn new() -> Self {
        Serial { room: 0 }
    }

    fn put(&mut self, byte: u8) {
        while self.room == 0 {
            if inb(LSR) & LSR_THRE != 0 {
                self.room = FIFO_DEPTH;
            } else {
                core::hint::spin_loop();
            }
        }
        outb(COM1, byte);
        self.room -= 1;
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Lines end in a bare '\n', like the `hello` line written by the
        // entry code, so that host-side matching sees identical lines.
        for b in s.bytes() {
            self.put(b);
        }
        Ok(())
    }
}

/// Prints one `ferro-guest: ` line to COM1.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut s = $crate::serial::Serial::new();
        let _ = write!(s, "ferro-guest: ");
        let _ = write!(s, $($arg)*);
        let _ = s.write_str("\n");
    }};
}
