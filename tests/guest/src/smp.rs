//! Starting the application processors (APs) listed in the MADT.
//!
//! ferro-vmm creates every vCPU with an in-kernel local APIC and leaves the
//! APs waiting for INIT/STARTUP, as on real hardware. The BSP copies the
//! real-mode trampoline (`ferro_ap_tramp` in boot.rs) to [`TRAMPOLINE`],
//! sends INIT to every AP ([`Startup::begin`]) and, at least 10 ms later,
//! starts them one at a time with two STARTUP IPIs ([`Startup::finish`]).
//! Each AP goes 16-bit → 32-bit → long mode on the BSP's GDT and page
//! tables, loads its own TSS (selector `0x40 + 16 * (slot - 1)`, sharing the
//! BSP's I/O bitmap) and CPL0 stack, and enters [`ferro_ap_main`] at CPL3 on
//! its own stack, where it reports its APIC ID and parks in `hlt`.
//!
//! An AP takes no interrupts (nothing targets its APIC). Should it fault, it
//! goes through the same fault path as the BSP (one fault stack: the first
//! fault is reported, a second resets), so its report can interleave with
//! the BSP's output.

use core::sync::atomic::{fence, AtomicU32, Ordering};

use crate::apic::LocalApic;
use crate::boot;
use crate::cpu::rdtsc;
use crate::virtio::Deadline;

/// Most CPUs started (ferro-vmm allows 1–32 vCPUs).
pub const MAX_CPUS: usize = 32;
/// Most APs: every CPU but the BSP.
pub const MAX_APS: usize = MAX_CPUS - 1;
/// Bytes between two AP TSSes (104 used, 16-byte aligned).
pub const AP_TSS_STRIDE: usize = 112;
/// Stack memory per AP: its CPL0 stack, then its CPL3 stack.
pub const AP_STACK: usize = 16384;
/// The CPL0 part of [`AP_STACK`] (interrupt entry and the `ud2` gate).
pub const AP_KERNEL_STACK: usize = 4096;

/// Where the trampoline is copied: a free page below 1 MiB (ferro-vmm uses
/// 0x500 (GDT), 0x7000 (boot_params), 0x8ff0 (boot stack), 0x9000–0xf000
/// (page tables); the guest, loaded at 2 MiB, uses nothing below 1 MiB).
/// The STARTUP vector is its page number.
pub const TRAMPOLINE: u64 = 0x6000;

/// GDT selector of the first AP's TSS (the BSP's is 0x30).
const AP_TSS_SELECTOR: u64 = 0x40;
/// Offset of `rsp0` in a 64-bit TSS.
const TSS_RSP0: usize = 4;
/// Offset of the I/O map base in a 64-bit TSS.
const TSS_IOMAP_BASE: usize = 102;
/// Size of the BSP's TSS before its I/O bitmap, and of the bitmap (plus
/// the terminating 0xff byte, the TSS limit).
const TSS_SIZE: u64 = 104;
const IO_BITMAP_LIMIT: u64 = 8192;

/// ICR: INIT, level assert.
const ICR_INIT: u32 = 0x4500;
/// ICR: STARTUP, level assert; the vector is the trampoline's page number.
const ICR_STARTUP: u32 = 0x4600;

/// What the next AP reads at CPL0 (`ferro_ap_entry64` in boot.rs), written
/// by the BSP before its STARTUP IPIs.
#[repr(C)]
pub struct ApBoot {
    /// +0: top of the CPL0 stack (also the TSS's `rsp0`).
    kernel_rsp: u64,
    /// +8: initial CPL3 `rsp` (as if called: `rsp % 16 == 8`).
    user_rsp: u64,
    /// +16: the AP's slot (1..=MAX_APS), first argument of [`ferro_ap_main`].
    slot: u64,
    /// +24: the GDT selector of its TSS.
    tss_selector: u64,
}

#[no_mangle]
static mut ferro_ap_boot: ApBoot = ApBoot { kernel_rsp: 0, user_rsp: 0, slot: 0, tss_selector: 0 };

extern "C" {
    static ferro_ap_tramp: [u8; 0];
    static ferro_ap_tramp_end: [u8; 0];
    static mut ferro_gdt_ap_tss: [u64; 2 * MAX_APS];
    static mut ferro_ap_tss: [u8; MAX_APS * AP_TSS_STRIDE];
    static ferro_tss: [u8; 0];
    static ferro_ap_stacks: [u8; 0];
}

/// APs that reached [`ferro_ap_main`].
static APS_ONLINE: AtomicU32 = AtomicU32::new(0);
/// Their APIC IDs, by slot - 1.
static AP_IDS: [AtomicU32; MAX_APS] = [const { AtomicU32::new(0) }; MAX_APS];

/// The CPUs running, BSP first.
pub struct Online {
    /// How many (at least 1, the BSP).
    pub count: usize,
    /// Their APIC IDs, the first `count` are valid.
    pub apic_ids: [u32; MAX_CPUS],
}

/// The `smp` line's facts: `cpus_online=<n> apic_ids=<id>,<id>,...`.
impl core::fmt::Display for Online {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "cpus_online={} apic_ids=", self.count)?;
        for (i, id) in self.apic_ids[..self.count].iter().enumerate() {
            write!(f, "{}{id}", if i == 0 { "" } else { "," })?;
        }
        Ok(())
    }
}

/// APs sent INIT by [`Startup::begin`], still to be started.
pub struct Startup {
    bsp: u32,
    aps: [u32; MAX_APS],
    count: usize,
    init_tsc: u64,
}

impl Startup {
    /// Copies the trampoline below 1 MiB and sends INIT to every CPU in
    /// `apic_ids` (the MADT's) other than the BSP (`bsp`).
    pub fn begin(lapic: &LocalApic, bsp: u32, apic_ids: &[u32]) -> Self {
        let mut s = Startup { bsp, aps: [0; MAX_APS], count: 0, init_tsc: 0 };
        for &id in apic_ids.iter().filter(|&&id| id != bsp) {
            if s.count < MAX_APS {
                s.aps[s.count] = id;
                s.count += 1;
            }
        }
        if s.count == 0 {
            return s;
        }
        let start = core::ptr::addr_of!(ferro_ap_tramp) as usize;
        let len = core::ptr::addr_of!(ferro_ap_tramp_end) as usize - start;
        assert!(len <= 4096, "AP trampoline larger than a page");
        // SAFETY: TRAMPOLINE is an identity-mapped RAM page below 1 MiB that
        // nothing else uses (see its doc); the source is our own .rodata.
        unsafe { core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE as *mut u8, len) };
        for &id in &s.aps[..s.count] {
            lapic.send_ipi(id, ICR_INIT);
        }
        s.init_tsc = rdtsc();
        s
    }

    /// Starts the APs one by one (10 ms after INIT; STARTUP, 200 µs,
    /// STARTUP again if it has not checked in), waiting up to `timeout_ms`
    /// in all. Stops at the first AP that does not come up: its boot data
    /// stays reserved for it, in case it is only late.
    pub fn finish(self, lapic: &LocalApic, timeout_ms: u64) -> Online {
        let mut online = Online { count: 1, apic_ids: [0; MAX_CPUS] };
        online.apic_ids[0] = self.bsp;
        if self.count == 0 {
            return online;
        }
        let khz = crate::tsc_khz();
        while rdtsc() < self.init_tsc + 10 * khz {
            core::hint::spin_loop();
        }
        let deadline = Deadline::after_ms(timeout_ms);
        for (i, &id) in self.aps[..self.count].iter().enumerate() {
            let slot = i + 1;
            prepare(slot);
            let startup = ICR_STARTUP | (TRAMPOLINE >> 12) as u32;
            lapic.send_ipi(id, startup);
            let retry = rdtsc() + khz / 5; // 200 µs
            while !checked_in(slot) && rdtsc() < retry {
                core::hint::spin_loop();
            }
            if !checked_in(slot) {
                lapic.send_ipi(id, startup);
            }
            while !checked_in(slot) && !deadline.passed() {
                core::hint::spin_loop();
            }
            if !checked_in(slot) {
                break;
            }
            online.apic_ids[slot] = AP_IDS[i].load(Ordering::Acquire);
            online.count += 1;
        }
        online
    }
}

/// True once the AP in `slot` has checked in (they start in slot order).
fn checked_in(slot: usize) -> bool {
    APS_ONLINE.load(Ordering::Acquire) as usize >= slot
}

/// Fills the TSS, its GDT descriptor and [`ferro_ap_boot`] for `slot`.
fn prepare(slot: usize) {
    let i = slot - 1;
    let stacks = core::ptr::addr_of!(ferro_ap_stacks) as u64 + (i * AP_STACK) as u64;
    let kernel_rsp = stacks + AP_KERNEL_STACK as u64;
    // SAFETY: the AP TSS array is ours (link-time .data, identity-mapped and
    // user-accessible); slot `i`'s TSS is not loaded by any CPU yet (one AP
    // per slot, started after this), so plain writes cannot race.
    let tss = unsafe { core::ptr::addr_of_mut!(ferro_ap_tss).cast::<u8>().add(i * AP_TSS_STRIDE) };
    let base = tss as u64;
    let bitmap = core::ptr::addr_of!(ferro_tss) as u64 + TSS_SIZE;
    let iomap = bitmap - base;
    let limit = iomap + IO_BITMAP_LIMIT;
    // SAFETY: as above; both fields lie inside this slot's 104-byte TSS.
    unsafe {
        tss.add(TSS_RSP0).cast::<u64>().write_unaligned(kernel_rsp);
        tss.add(TSS_IOMAP_BASE).cast::<u16>().write_unaligned(iomap as u16);
    }
    let lo = (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0x89 << 40 // present, 64-bit TSS (available)
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56;
    let hi = base >> 32;
    // SAFETY: this slot's descriptor pair in our GDT, not loaded by any CPU
    // yet; the GDT's page is user-accessible. The boot block is read by the
    // AP only after the STARTUP IPI, which the fence below orders after it.
    unsafe {
        let gdt = core::ptr::addr_of_mut!(ferro_gdt_ap_tss).cast::<u64>();
        gdt.add(2 * i).write_volatile(lo);
        gdt.add(2 * i + 1).write_volatile(hi);
        core::ptr::addr_of_mut!(ferro_ap_boot).write_volatile(ApBoot {
            kernel_rsp,
            user_rsp: stacks + AP_STACK as u64 - 8,
            slot: slot as u64,
            tss_selector: AP_TSS_SELECTOR + 16 * i as u64,
        });
    }
    fence(Ordering::SeqCst);
}

/// An AP's first Rust code, at CPL3 on its own stack: enable its local APIC,
/// report its ID, then park in `hlt` (nothing interrupts it).
#[no_mangle]
extern "C" fn ferro_ap_main(slot: u64) -> ! {
    let lapic = LocalApic::enable_ap();
    let i = slot as usize - 1;
    AP_IDS[i].store(lapic.id(), Ordering::Release);
    APS_ONLINE.fetch_add(1, Ordering::AcqRel);
    loop {
        boot::halt();
    }
}
