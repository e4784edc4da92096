//! A minimal i8042 keyboard controller: enough for Linux's i8042/atkbd
//! drivers to probe it, for `reboot` (command 0xFE resets the machine) and
//! for a graceful shutdown request (an injected Ctrl-Alt-Del).

use std::collections::VecDeque;

use ferro_pci::BusDevice;
use vmm_sys_util::eventfd::EventFd;

use super::{ExitReason, ExitSignal};

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Status (read) and command (write) port.
pub const COMMAND_PORT: u16 = 0x64;

const STATUS_OUT_FULL: u8 = 1 << 0;
const STATUS_SYS: u8 = 1 << 2;
const STATUS_CMD: u8 = 1 << 3;
const STATUS_UNLOCKED: u8 = 1 << 4;

const CB_KBD_INT: u8 = 1 << 0;
const CB_SYS: u8 = 1 << 2;
const CB_AUX_DISABLED: u8 = 1 << 5;
const CB_XLATE: u8 = 1 << 6;

const CMD_READ_CB: u8 = 0x20;
const CMD_WRITE_CB: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_BUF: u8 = 0xd2;
const CMD_RESET_CPU: u8 = 0xfe;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_SELF_TEST_OK: u8 = 0xaa;

/// Ctrl, Alt, Delete pressed then released, in scan code set 1 (what a
/// translating controller delivers).
pub const CTRL_ALT_DEL: [u8; 10] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d, 0, 0];

/// The controller state.
pub struct I8042 {
    exit: ExitSignal,
    irq: EventFd,
    command_byte: u8,
    pending_cmd: Option<u8>,
    out: VecDeque<u8>,
}

impl I8042 {
    /// A controller raising IRQ 1 through `irq` and resetting through `exit`.
    pub fn new(exit: ExitSignal, irq: EventFd) -> Self {
        Self {
            exit,
            irq,
            command_byte: CB_KBD_INT | CB_SYS | CB_AUX_DISABLED | CB_XLATE,
            pending_cmd: None,
            out: VecDeque::new(),
        }
    }

    /// Queue a Ctrl-Alt-Del key sequence, as a person at the console would.
    pub fn send_ctrl_alt_del(&mut self) {
        for code in &CTRL_ALT_DEL[..8] {
            self.push(*code);
        }
    }

    fn push(&mut self, byte: u8) {
        // A real controller holds one byte; a small queue keeps injected
        // sequences whole. Bound it so a guest cannot grow it.
        if self.out.len() < 64 {
            self.out.push_back(byte);
        }
        if self.command_byte & CB_KBD_INT != 0 {
            let _ = self.irq.write(1);
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_SYS | STATUS_UNLOCKED;
        if !self.out.is_empty() {
            s |= STATUS_OUT_FULL;
        }
        if self.pending_cmd.is_some() {
            s |= STATUS_CMD;
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_READ_CB => self.push(self.command_byte),
            CMD_WRITE_CB | CMD_WRITE_OUTP | CMD_WRITE_KBD_BUF => self.pending_cmd = Some(cmd),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST | CMD_AUX_TEST => self.push(0x00),
            CMD_READ_OUTP => self.push(0x01),
            CMD_AUX_DISABLE => self.command_byte |= CB_AUX_DISABLED,
            CMD_AUX_ENABLE => self.command_byte &= !CB_AUX_DISABLED,
            CMD_KBD_DISABLE | CMD_KBD_ENABLE => {}
            CMD_RESET_CPU => {
                tracing::info!("guest reset through the i8042");
                self.exit.request(ExitReason::Reset);
            }
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        match self.pending_cmd.take() {
            Some(CMD_WRITE_CB) => self.command_byte = value,
            Some(CMD_WRITE_KBD_BUF) => self.push(value),
            Some(CMD_WRITE_OUTP) => {
                // Bit 0 of the output port is the CPU reset line (active low).
                if value & 1 == 0 {
                    self.exit.request(ExitReason::Reset);
                }
            }
            _ => self.keyboard(value),
        }
    }

    fn keyboard(&mut self, value: u8) {
        self.push(KBD_ACK);
        match value {
            KBD_RESET => self.push(KBD_SELF_TEST_OK),
            KBD_IDENTIFY => {
                self.push(0xab);
                self.push(0x83);
            }
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, _offset: u64, data: &mut [u8]) {
        let value = match base as u16 {
            COMMAND_PORT => self.status(),
            DATA_PORT => {
                let v = self.out.pop_front().unwrap_or(0);
                // A real controller holds one byte: when the guest takes it,
                // the next one is loaded and interrupts again. Linux's
                // handler reads one byte per interrupt, so without this a
                // multi-byte answer (ACK + keyboard id, a key sequence)
                // would stall after its first byte.
                if !self.out.is_empty() && self.command_byte & CB_KBD_INT != 0 {
                    let _ = self.irq.write(1);
                }
                v
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, base: u64, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match base as u16 {
            COMMAND_PORT => self.command(value),
            DATA_PORT => self.data(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, ExitSignal) {
        let exit = ExitSignal::new().unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042::new(exit.clone(), irq), exit)
    }

    fn read(d: &mut I8042, port: u16) -> u8 {
        let mut b = [0u8];
        d.read(u64::from(port), 0, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_ends_vm() {
        let (mut d, exit) = dev();
        d.write(u64::from(COMMAND_PORT), 0, &[CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn self_test_and_command_byte() {
        let (mut d, exit) = dev();
        d.write(u64::from(COMMAND_PORT), 0, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut d, COMMAND_PORT) & STATUS_OUT_FULL, 0);
        assert_eq!(read(&mut d, DATA_PORT), 0x55);
        assert_eq!(read(&mut d, COMMAND_PORT) & STATUS_OUT_FULL, 0);
        d.write(u64::from(COMMAND_PORT), 0, &[CMD_WRITE_CB]);
        d.write(u64::from(DATA_PORT), 0, &[0x65]);
        d.write(u64::from(COMMAND_PORT), 0, &[CMD_READ_CB]);
        assert_eq!(read(&mut d, DATA_PORT), 0x65);
        d.write(u64::from(DATA_PORT), 0, &[KBD_RESET]);
        assert_eq!(read(&mut d, DATA_PORT), KBD_ACK);
        assert_eq!(read(&mut d, DATA_PORT), KBD_SELF_TEST_OK);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn ctrl_alt_del_is_queued_and_interrupts() {
        let (mut d, _exit) = dev();
        d.send_ctrl_alt_del();
        assert!(d.irq.read().unwrap() > 0);
        let got: Vec<u8> = (0..8).map(|_| read(&mut d, DATA_PORT)).collect();
        assert_eq!(got, CTRL_ALT_DEL[..8]);
    }

    #[test]
    fn each_byte_taken_interrupts_for_the_next() {
        let (mut d, _exit) = dev();
        d.write(u64::from(DATA_PORT), 0, &[KBD_IDENTIFY]);
        assert!(d.irq.read().unwrap() > 0);
        assert_eq!(read(&mut d, DATA_PORT), KBD_ACK);
        assert_eq!(d.irq.read().unwrap(), 1, "no interrupt for the id byte");
        assert_eq!(read(&mut d, DATA_PORT), 0xab);
        assert_eq!(d.irq.read().unwrap(), 1);
        assert_eq!(read(&mut d, DATA_PORT), 0x83);
        assert!(d.irq.read().is_err(), "interrupt with nothing left");
    }

    #[test]
    fn output_queue_is_bounded() {
        let (mut d, _exit) = dev();
        for _ in 0..1000 {
            d.write(u64::from(DATA_PORT), 0, &[0x00]);
        }
        assert_eq!(d.out.len(), 64);
    }
}
