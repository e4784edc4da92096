//! Hardware-reduced ACPI sleep control (power off) and reset registers.

use ferro_pci::BusDevice;

use super::{ExitReason, ExitSignal};
use crate::arch::layout::{ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT};

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_S5: u8 = 5;

/// Sleep control at 0x600 (status at 0x601), reset register at 0x604.
pub struct AcpiPm {
    exit: ExitSignal,
}

impl AcpiPm {
    /// Ports handled, as `(base, len)` pairs.
    pub const RANGES: [(u16, u16); 2] = [(ACPI_SLEEP_CONTROL_PORT, 2), (ACPI_RESET_PORT, 1)];

    /// A device that ends the VM through `exit`.
    pub fn new(exit: ExitSignal) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let port = base + offset;
        if port == u64::from(ACPI_SLEEP_CONTROL_PORT)
            && value & SLP_EN != 0
            && (value >> SLP_TYP_SHIFT) & 0x7 == SLP_TYP_S5
        {
            tracing::info!("guest powered off through ACPI");
            self.exit.request(ExitReason::PowerOff);
        } else if port == u64::from(ACPI_RESET_PORT) && value == ACPI_RESET_VALUE {
            tracing::info!("guest reset through the ACPI reset register");
            self.exit.request(ExitReason::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_and_reset() {
        let exit = ExitSignal::new().unwrap();
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(u64::from(ACPI_SLEEP_CONTROL_PORT), 0, &[SLP_EN | (3 << 2)]);
        assert_eq!(exit.reason(), None, "S3 is not power off");
        pm.write(u64::from(ACPI_SLEEP_CONTROL_PORT), 0, &[SLP_EN | (5 << 2)]);
        assert_eq!(exit.reason(), Some(ExitReason::PowerOff));
        let exit = ExitSignal::new().unwrap();
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(u64::from(ACPI_RESET_PORT), 0, &[ACPI_RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
