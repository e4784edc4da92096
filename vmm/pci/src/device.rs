//! The interface between the root complex and the functions on its bus.

use crate::config::PciBarRegion;

/// A PCI function as seen by [`PciRoot`](crate::root::PciRoot): a
/// configuration space addressed by 32-bit register, and memory BARs.
///
/// The root owns BAR placement: it allocates each BAR from the MMIO window
/// and programs it through [`PciDevice::write_config_register`] like
/// firmware would, reads the BAR registers back to decode where the guest
/// put them, and forwards accesses that hit a BAR to
/// [`PciDevice::bar_read`]/[`PciDevice::bar_write`] with the offset inside
/// the BAR. Implementations must tolerate any access: the guest controls
/// offsets and sizes.
pub trait PciDevice: Send {
    /// Read the 32-bit configuration register `reg_idx` (byte offset / 4,
    /// up to 1023). Registers that do not exist read as all-ones.
    fn read_config_register(&mut self, reg_idx: usize) -> u32;

    /// Write `data` (1, 2 or 4 bytes) at byte `offset` (0..4) of
    /// configuration register `reg_idx`.
    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]);

    /// The memory BARs of the function; fixed for its lifetime.
    fn bars(&self) -> Vec<PciBarRegion>;

    /// Read `data.len()` bytes at `offset` inside BAR `bar`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);

    /// Write `data` at `offset` inside BAR `bar`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);

    /// BAR `bar` is now decoded at guest physical `address`, or no longer
    /// decoded (`None`: memory decoding off, or the guest placed it outside
    /// the MMIO window). Devices that registered addresses elsewhere (for
    /// example ioeventfds) move them here.
    fn bar_moved(&mut self, _bar: usize, _address: Option<u64>) {}
}
