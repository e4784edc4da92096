//! CPL3 access to the x86 machine: port I/O (allowed by `IOPL=3`), `cpuid`,
//! the TSC, and resetting through the i8042.

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: IOPL=3 allows port I/O at CPL3; the callers own the devices.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// Writes a 32-bit word to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) };
}

/// Reads a 32-bit word from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// `cpuid` leaf/subleaf: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc is allowed at CPL3 (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per millisecond: the hypervisor leaf 0x40000010 (KVM/VMware
/// convention), else CPUID 0x15/0x16, else a 2 GHz guess.
pub fn tsc_khz() -> u64 {
    let (hv_max, ..) = cpuid(0x4000_0000, 0);
    if hv_max >= 0x4000_0010 {
        let (khz, ..) = cpuid(0x4000_0010, 0);
        if khz != 0 {
            return khz as u64;
        }
    }
    let (max, ..) = cpuid(0, 0);
    if max >= 0x15 {
        let (den, num, crystal_hz, _) = cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal_hz != 0 {
            return crystal_hz as u64 * num as u64 / den as u64 / 1000;
        }
    }
    if max >= 0x16 {
        let (base_mhz, ..) = cpuid(0x16, 0);
        if base_mhz != 0 {
            return base_mhz as u64 * 1000;
        }
    }
    2_000_000
}

/// Powers the machine off: SLP_TYP 5 with SLP_EN to the hardware-reduced
/// ACPI sleep control register (port 0x600, as our FADT says); ferro-vmm
/// exits with status 0.
pub fn poweroff() -> ! {
    outb(0x600, (5 << 2) | (1 << 5));
    loop {
        core::hint::spin_loop();
    }
}

/// Resets the machine: pulse the reset line through the i8042 (0xfe to port
/// 0x64); ferro-vmm exits with status 10 (a guest reset).
pub fn reset() -> ! {
    outb(0x64, 0xfe);
    loop {
        core::hint::spin_loop();
    }
}
