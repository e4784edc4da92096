//! A CMOS real-time clock (MC146818) at ports 0x70/0x71 that reads the host's
//! clock.
//!
//! Linux registers `rtc_cmos` on every x86 machine and reads the clock at
//! boot. With no device there the reads float high, the "update in progress"
//! bit looks stuck, and the driver polls for it 20,000 times before giving
//! up: each poll a VM exit, ~3.7 s of boot under nested virtualisation. This
//! clock never reports an update in progress, runs in 24-hour BCD mode,
//! keeps the 114 bytes of CMOS RAM, and ignores writes to the time
//! registers (the guest's clock follows the host's; kvmclock is the guest's
//! real time source). It raises no interrupts: no alarms, no periodic ticks.

use std::time::{SystemTime, UNIX_EPOCH};

use ferro_pci::BusDevice;

use crate::arch::layout::RTC_PORT;

/// Index port (bit 7 masks NMIs; ignored).
pub const INDEX_PORT: u16 = RTC_PORT;
/// Data port.
pub const DATA_PORT: u16 = RTC_PORT + 1;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Register A: 32.768 kHz time base, 1024 Hz rate, no update in progress.
const A_VALUE: u8 = 0x26;
/// Register B: 24-hour mode, BCD, no interrupts enabled.
const B_24H: u8 = 0x02;
/// Register D: valid RAM and time.
const D_VRT: u8 = 0x80;

/// The clock and its RAM.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    now: fn() -> u64,
}

fn host_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn bcd(v: u64) -> u8 {
    let v = (v % 100) as u8;
    ((v / 10) << 4) | (v % 10)
}

/// (year, month 1-12, day 1-31) of a count of days since 1970-01-01, in
/// the proleptic Gregorian calendar (H. Hinnant's civil-from-days).
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl Cmos {
    /// A clock reading the host's UTC time.
    pub fn new() -> Self {
        Self::with_clock(host_seconds)
    }

    /// A clock reading `now` (seconds since the Unix epoch), for tests.
    pub fn with_clock(now: fn() -> u64) -> Self {
        Self {
            index: 0,
            ram: [0; 128],
            now,
        }
    }

    fn register(&self, reg: u8) -> u8 {
        let t = (self.now)();
        let days = (t / 86_400) as i64;
        let secs = t % 86_400;
        let (year, month, day) = civil_from_days(days);
        match reg {
            REG_SECONDS => bcd(secs % 60),
            REG_MINUTES => bcd(secs / 60 % 60),
            REG_HOURS => bcd(secs / 3600),
            // 1 = Sunday; 1970-01-01 was a Thursday.
            REG_WEEKDAY => bcd(((days + 4).rem_euclid(7) + 1) as u64),
            REG_DAY => bcd(day),
            REG_MONTH => bcd(month),
            REG_YEAR => bcd(year.rem_euclid(100) as u64),
            REG_CENTURY => bcd((year / 100) as u64),
            REG_A => A_VALUE,
            REG_B => B_24H,
            REG_C => 0,
            REG_D => D_VRT,
            r => self.ram[usize::from(r & 0x7f)],
        }
    }
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let value = match (base + offset) as u16 {
            INDEX_PORT => self.index,
            _ => self.register(self.index),
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match (base + offset) as u16 {
            INDEX_PORT => self.index = value & 0x7f,
            _ => {
                // Time and status registers follow the host; RAM keeps what
                // the guest writes.
                if self.index > REG_D && self.index != REG_CENTURY {
                    self.ram[usize::from(self.index)] = value;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(c: &mut Cmos, reg: u8) -> u8 {
        c.write(u64::from(INDEX_PORT), 0, &[reg | 0x80]);
        let mut b = [0u8];
        c.read(u64::from(DATA_PORT), 0, &mut b);
        b[0]
    }

    #[test]
    fn reads_the_clock_in_bcd() {
        // 2026-12-01 18:55:07 UTC, a Tuesday.
        let mut c = Cmos::with_clock(|| 1_796_151_307);
        assert_eq!(read(&mut c, REG_SECONDS), 0x07);
        assert_eq!(read(&mut c, REG_MINUTES), 0x55);
        assert_eq!(read(&mut c, REG_HOURS), 0x18);
        assert_eq!(read(&mut c, REG_DAY), 0x01);
        assert_eq!(read(&mut c, REG_MONTH), 0x12);
        assert_eq!(read(&mut c, REG_YEAR), 0x26);
        assert_eq!(read(&mut c, REG_CENTURY), 0x20);
        assert_eq!(read(&mut c, REG_WEEKDAY), 0x03);
    }

    #[test]
    fn never_updating_and_valid() {
        let mut c = Cmos::new();
        assert_eq!(read(&mut c, REG_A) & 0x80, 0, "update-in-progress set");
        assert_eq!(read(&mut c, REG_D), D_VRT);
        assert_eq!(read(&mut c, REG_B), B_24H);
    }

    #[test]
    fn ram_keeps_writes_time_ignores_them() {
        let mut c = Cmos::with_clock(|| 0);
        c.write(u64::from(INDEX_PORT), 0, &[0x40]);
        c.write(u64::from(DATA_PORT), 0, &[0x5a]);
        assert_eq!(read(&mut c, 0x40), 0x5a);
        c.write(u64::from(INDEX_PORT), 0, &[REG_HOURS]);
        c.write(u64::from(DATA_PORT), 0, &[0x23]);
        assert_eq!(read(&mut c, REG_HOURS), 0x00);
        assert_eq!(read(&mut c, REG_YEAR), 0x70);
        assert_eq!(read(&mut c, REG_CENTURY), 0x19);
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
    }
}
