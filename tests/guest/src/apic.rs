//! The local APIC: enabled (x2APIC through MSRs when CPUID offers it, else
//! xAPIC MMIO at 0xfee00000) so MSI-X messages are delivered, plus a periodic
//! timer that wakes the idle loop.

use crate::boot::{self, SPURIOUS_VECTOR};
use crate::cpu::{cpuid, outb};
use crate::mem::{mmio_read, mmio_write};

/// Vector of the periodic LAPIC timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// `IA32_APIC_BASE`.
const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
/// xAPIC MMIO base (the architectural default; ferro-vmm keeps it).
const XAPIC_BASE: u64 = 0xfee0_0000;

/// Register offsets in xAPIC MMIO form; the x2APIC MSR is 0x800 + off/16.
const REG_ID: u32 = 0x20;
const REG_TPR: u32 = 0x80;
const REG_SVR: u32 = 0xf0;
const REG_ICR_LOW: u32 = 0x300;
const REG_ICR_HIGH: u32 = 0x310;
const REG_LVT_TIMER: u32 = 0x320;
const REG_TIMER_INIT: u32 = 0x380;
const REG_TIMER_DIV: u32 = 0x3e0;

/// ICR delivery status: the xAPIC has not sent the IPI yet.
const ICR_SEND_PENDING: u32 = 1 << 12;

/// LVT timer mode: periodic.
const TIMER_PERIODIC: u32 = 1 << 17;
/// Divide configuration: by 16.
const TIMER_DIV_16: u32 = 0b0011;
/// KVM's APIC bus runs at 1 GHz: 62.5 MHz after the divider, so 625000
/// counts is 10 ms (100 Hz).
const TIMER_COUNT_100HZ: u32 = 625_000;

/// Vector base the legacy 8259 PICs are moved to before being masked, so a
/// stray or spurious PIC interrupt can never look like an exception.
const PIC_VECTOR_BASE: u8 = 0xe0;

/// Reprograms the two legacy 8259 PICs away from the exception vectors (their
/// reset base is 0, so e.g. the i8042's IRQ 1 would arrive as vector 1 through
/// LINT0/ExtINT) and masks every line: devices interrupt through MSI-X only.
pub fn disable_legacy_pic() {
    const PIC1_CMD: u16 = 0x20;
    const PIC1_DATA: u16 = 0x21;
    const PIC2_CMD: u16 = 0xa0;
    const PIC2_DATA: u16 = 0xa1;
    outb(PIC1_CMD, 0x11); // ICW1: init, ICW4 follows
    outb(PIC2_CMD, 0x11);
    outb(PIC1_DATA, PIC_VECTOR_BASE); // ICW2: vector base
    outb(PIC2_DATA, PIC_VECTOR_BASE + 8);
    outb(PIC1_DATA, 0x04); // ICW3: slave on IRQ 2
    outb(PIC2_DATA, 0x02);
    outb(PIC1_DATA, 0x01); // ICW4: 8086 mode
    outb(PIC2_DATA, 0x01);
    outb(PIC1_DATA, 0xff); // mask everything
    outb(PIC2_DATA, 0xff);
}

/// The enabled local APIC.
pub struct LocalApic {
    x2apic: bool,
}

impl LocalApic {
    /// Software-enables the local APIC (x2APIC mode if available), accepts
    /// all priorities, and tells the interrupt stubs how to EOI.
    pub fn enable() -> Self {
        let apic = Self::enable_ap();
        boot::set_x2apic_eoi(apic.x2apic);
        apic
    }

    /// [`LocalApic::enable`] for an AP: the same mode as the BSP (same
    /// CPUID), and the interrupt stubs already know how to EOI.
    pub fn enable_ap() -> Self {
        let (_, _, ecx, _) = cpuid(1, 0);
        let x2apic = ecx & (1 << 21) != 0;
        let base = boot::rdmsr(MSR_APIC_BASE);
        let mut want = base | APIC_BASE_ENABLE;
        if x2apic {
            want |= APIC_BASE_X2APIC;
        }
        if want != base {
            boot::wrmsr(MSR_APIC_BASE, want);
        }
        let apic = LocalApic { x2apic };
        apic.write(REG_TPR, 0);
        apic.write(REG_SVR, 0x100 | SPURIOUS_VECTOR as u32);
        apic
    }

    /// This CPU's APIC ID.
    pub fn id(&self) -> u32 {
        let raw = self.read(REG_ID);
        if self.x2apic {
            raw
        } else {
            raw >> 24
        }
    }

    /// Sends an IPI: `icr_low` (vector, delivery mode, level) to the local
    /// APIC with ID `dest` (physical destination mode, no shorthand).
    pub fn send_ipi(&self, dest: u32, icr_low: u32) {
        if self.x2apic {
            boot::wrmsr(0x800 + REG_ICR_LOW / 16, (dest as u64) << 32 | icr_low as u64);
        } else {
            mmio_write(XAPIC_BASE + REG_ICR_HIGH as u64, dest << 24);
            mmio_write(XAPIC_BASE + REG_ICR_LOW as u64, icr_low);
            while mmio_read::<u32>(XAPIC_BASE + REG_ICR_LOW as u64) & ICR_SEND_PENDING != 0 {
                core::hint::spin_loop();
            }
        }
    }

    /// Starts the periodic 100 Hz timer on [`TIMER_VECTOR`].
    pub fn start_timer(&self) {
        self.write(REG_TIMER_DIV, TIMER_DIV_16);
        self.write(REG_LVT_TIMER, TIMER_PERIODIC | TIMER_VECTOR as u32);
        self.write(REG_TIMER_INIT, TIMER_COUNT_100HZ);
    }

    fn read(&self, reg: u32) -> u32 {
        if self.x2apic {
            boot::rdmsr(0x800 + reg / 16) as u32
        } else {
            mmio_read(XAPIC_BASE + reg as u64)
        }
    }

    fn write(&self, reg: u32, value: u32) {
        if self.x2apic {
            boot::wrmsr(0x800 + reg / 16, value as u64);
        } else {
            mmio_write(XAPIC_BASE + reg as u64, value);
        }
    }
}
