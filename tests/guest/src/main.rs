//! ferro-test-guest: a tiny x86-64 kernel that exercises ferro-vmm's boot
//! path, ACPI tables, PCI and virtio devices, and reports on COM1 in the
//! format of `docs/test-guest.md`.
//!
//! Only the entry code and interrupt stubs in [`boot`] run at CPL0; all the
//! Rust code runs at CPL3 (see `boot.rs` for why).

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod acpi;
mod apic;
mod boot;
mod bootparams;
mod cpu;
mod fault;
mod mem;
mod netclient;
mod netstack;
mod pci;
mod serial;
mod smp;
mod virtio;

use core::sync::atomic::{AtomicU64, Ordering};

use bootparams::{cmdline_value, BootParams, CMDLINE_MAX, E820_RAM};
use netclient::Target;
use netstack::{Ipv4Cidr, NetConfig, NetStack};
use virtio::blk::{Blk, IO_LEN};
use virtio::net::Net;
use virtio::rng::Rng;

/// How long the BSP waits for the APs to come up (after the INIT delay).
const AP_TIMEOUT_MS: u64 = 2000;

/// Most disks the self-test drives.
const MAX_DISKS: usize = 8;

/// What to do once the self-test is done (`ferro.exit=`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Reset through the i8042.
    Reboot,
    /// Power off through ACPI S5.
    Poweroff,
    /// Stay up answering ARP/ICMP until Ctrl-Alt-Del.
    Idle,
}

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

/// TSC ticks per millisecond (computed once).
pub fn tsc_khz() -> u64 {
    match TSC_KHZ.load(Ordering::Relaxed) {
        0 => {
            let khz = cpu::tsc_khz().max(1);
            TSC_KHZ.store(khz, Ordering::Relaxed);
            khz
        }
        khz => khz,
    }
}

/// Unwraps a result or panics with its message (the panic line names it).
fn check<T>(r: Result<T, &'static str>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// The Rust entry point, called at CPL3 by `ferro_user_entry` after the
/// `hello` line, with the physical address of `boot_params`.
#[no_mangle]
extern "C" fn ferro_main(boot_params: u64) -> ! {
    serial::Serial::init();
    boot::init_idt();
    tsc_khz();

    let bp = BootParams::new(boot_params);
    let mut cmdline_buf = [0u8; CMDLINE_MAX];
    let cmdline = bp.cmdline(&mut cmdline_buf);
    say!("cmdline={cmdline}");

    let (mut entries, mut ram) = (0u32, 0u64);
    for e in bp.e820() {
        entries += 1;
        if e.kind == E820_RAM {
            ram += e.size;
        }
    }
    say!("e820 entries={entries} ram_mib={}", ram >> 20);

    let exit = match cmdline_value(cmdline, "ferro.exit") {
        Some("reboot") => Exit::Reboot,
        Some("poweroff") => Exit::Poweroff,
        Some("idle") | None => Exit::Idle,
        Some(_) => panic!("bad ferro.exit= (want reboot, poweroff or idle)"),
    };
    let net_cfg = NetConfig {
        ip: cmdline_value(cmdline, "ferro.ip").map(|s| Ipv4Cidr::parse(s).expect("bad ferro.ip= (want A.B.C.D/N)")),
        ping: cmdline_value(cmdline, "ferro.ping").map(|s| Target::parse(s).expect("bad ferro.ping= (want A.B.C.D)")),
        ping_loop: cmdline_value(cmdline, "ferro.pingloop") == Some("1"),
        tcp: cmdline_value(cmdline, "ferro.tcp")
            .map(|s| Target::parse(s).filter(|t| t.port != 0).expect("bad ferro.tcp= (want A.B.C.D:PORT)")),
    };
    let write_list = cmdline_value(cmdline, "ferro.write").unwrap_or("");
    let blk_loop = cmdline_value(cmdline, "ferro.blkloop");
    let blk_write = cmdline_value(cmdline, "ferro.blkwrite") == Some("1");

    // Interrupts: legacy PICs off, local APIC on, 100 Hz timer, IF=1 from
    // here on.
    apic::disable_legacy_pic();
    let lapic = apic::LocalApic::enable();
    if lapic.id() != 0 {
        panic!("boot CPU has APIC ID {} (MSI-X messages target 0)", lapic.id());
    }
    lapic.start_timer();
    boot::enable_interrupts();

    let rsdp = acpi::find_rsdp(bp.rsdp()).expect("no ACPI RSDP");
    let acpi = check(acpi::parse(rsdp));
    let ecam = acpi.ecam.expect("no MCFG (ECAM) table");
    say!("acpi cpus={} ecam={:#x} buses={}-{}", acpi.cpus, ecam.base, ecam.first_bus, ecam.last_bus);

    // SMP: INIT every AP now and start them after the PCI and virtio
    // probes, which overlap the 10 ms INIT-to-STARTUP delay.
    let aps = smp::Startup::begin(&lapic, lapic.id(), acpi.apic_ids());

    // PCI: enumerate through ECAM, cross-check the first function via 0xcf8.
    let mut found = [None; 64];
    let mut n = 0;
    for bus in ecam.first_bus..=ecam.last_bus {
        pci::scan_bus(ecam.base, bus, |f| {
            say!("pci {:02x}:{:02x}.{} {:04x}:{:04x} class={:06x}", f.bus, f.dev, f.func, f.vendor(), f.device(), f.class());
            if n < found.len() {
                found[n] = Some(f);
                n += 1;
            }
        });
    }
    let first = found[0].expect("no PCI devices");
    let legacy = pci::legacy_read32(first.bus, first.dev, first.func, 0);
    if legacy != first.read32(0) {
        panic!("PCI 0xcf8 read {legacy:#x} disagrees with ECAM {:#x}", first.read32(0));
    }

    // Virtio devices, in PCI order.
    let mut disks: [Option<Blk>; MAX_DISKS] = Default::default();
    let mut nic: Option<Net> = None;
    let mut seed = cpu::rdtsc();
    for f in found.iter().flatten().filter(|f| f.vendor() == virtio::VENDOR) {
        match f.device() {
            virtio::DEVICE_BLK => {
                let blk = check(Blk::probe(*f));
                say!("virtio-blk serial={} sectors={} ro={} msix={}", blk.serial(), blk.sectors, blk.read_only() as u8, blk.msix_vectors());
                if let Some(slot) = disks.iter_mut().find(|d| d.is_none()) {
                    *slot = Some(blk);
                }
            }
            virtio::DEVICE_NET => {
                let net = check(Net::probe(*f));
                let m = net.mac;
                say!("virtio-net mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} msix={}", m[0], m[1], m[2], m[3], m[4], m[5], net.msix_vectors());
                if nic.is_none() {
                    nic = Some(net);
                }
            }
            virtio::DEVICE_RNG => {
                let mut rng = check(Rng::probe(*f));
                let mut bytes = [0u8; 64];
                let got = check(rng.fill(&mut bytes));
                say!("virtio-rng bytes={got} nonzero={}", bytes[..got].iter().any(|&b| b != 0) as u8);
                for chunk in bytes[..got].chunks(8) {
                    seed ^= chunk.iter().fold(0u64, |a, &b| a << 8 | b as u64);
                }
            }
            _ => {}
        }
    }
    say!("smp {}", aps.finish(&lapic, AP_TIMEOUT_MS));
    say!("devices ready");

    // Disk I/O.
    let pattern = write_pattern();
    for blk in disks.iter_mut().flatten() {
        let hash = fnv1a64(check(blk.read_start()));
        say!("blk serial={} read sector0 fnv64={hash:016x}", blk.serial());
        // `*` names every writable disk (a volume's serial is its id, not
        // known when the command line is written).
        let listed = write_list.split(',').any(|s| !s.is_empty() && (s == blk.serial() || (s == "*" && !blk.read_only())));
        if listed {
            let write = check(blk.write_start(&pattern));
            let flush = check(blk.flush());
            say!("blk serial={} write status={write} flush status={flush}", blk.serial());
        }
    }

    // Interrupts raced with our polling; give the last MSI a moment.
    let settle = virtio::Deadline::after_ms(20);
    while !settle.passed() {
        core::hint::spin_loop();
    }
    say!("irq count={}", msix_irqs());

    let mut stack = None;
    if let Some(net) = nic {
        let mut s = NetStack::new(net, &net_cfg, seed);
        s.poll();
        match net_cfg.ip {
            Some(cidr) => say!("net ip={cidr} up"),
            None => say!("net dhcp started"),
        }
        stack = Some(s);
    }
    say!("selftest done");

    if let Some(serial) = blk_loop {
        // A disk attached only at some starts (a volume): without it, say so
        // and go on.
        match disks.iter_mut().flatten().find(|b| b.serial() == serial) {
            Some(blk) => blk_loop_forever(blk, blk_write),
            None => say!("blk loop: no disk serial={serial}"),
        }
    }
    match exit {
        Exit::Reboot => cpu::reset(),
        Exit::Poweroff => cpu::poweroff(),
        Exit::Idle => idle(stack),
    }
}

/// `ferro.blkloop=`: read sector 0 every 200 ms forever, each read waiting
/// up to 60 s, and print its hash. With `ferro.blkwrite=1` each round
/// first writes [`loop_pattern`] of its number and flushes it (each
/// waiting up to 60 s), and prints both statuses: a line is printed only
/// once the write is acknowledged.
fn blk_loop_forever(blk: &mut Blk, write: bool) -> ! {
    for n in 1u64.. {
        if write {
            let (w, f) = check(blk.write_flush_within(&loop_pattern(n), 60_000));
            let hash = fnv1a64(check(blk.read_start_within(60_000)));
            say!("blk serial={} loop={n} write={w} flush={f} fnv64={hash:016x}", blk.serial());
        } else {
            let hash = fnv1a64(check(blk.read_start_within(60_000)));
            say!("blk serial={} loop={n} fnv64={hash:016x}", blk.serial());
        }
        let pause = virtio::Deadline::after_ms(200);
        while !pause.passed() {
            core::hint::spin_loop();
        }
    }
    unreachable!()
}

/// MSI-X interrupts received so far (all vectors handed to virtio queues).
fn msix_irqs() -> u64 {
    (virtio::MSIX_FIRST_VECTOR..=virtio::MSIX_LAST_VECTOR).map(boot::irq_count).sum()
}

/// Serves the network and waits for interrupts until Ctrl-Alt-Del.
fn idle(mut stack: Option<NetStack>) -> ! {
    // Halting needs a wake-up source: if the 100 Hz timer does not tick
    // within 100 ms, interrupts are not being delivered, so poll instead.
    let ticks = boot::irq_count(apic::TIMER_VECTOR);
    let deadline = virtio::Deadline::after_ms(100);
    while boot::irq_count(apic::TIMER_VECTOR) == ticks && !deadline.passed() {
        core::hint::spin_loop();
    }
    let can_halt = boot::irq_count(apic::TIMER_VECTOR) != ticks;
    if !can_halt {
        say!("warning: no timer interrupts, idling by polling");
    }
    let mut keyboard = CtrlAltDel::default();
    loop {
        if let Some(s) = stack.as_mut() {
            s.poll();
        }
        if keyboard.poll() {
            cpu::reset();
        }
        if can_halt {
            boot::halt();
        } else {
            core::hint::spin_loop();
        }
    }
}

/// Watches the i8042 for the Ctrl-Alt-Del make codes (0x1d, 0x38, 0xe0 0x53)
/// that ferro-vmm injects for a graceful shutdown.
#[derive(Default)]
struct CtrlAltDel {
    ctrl: bool,
    alt: bool,
    extended: bool,
}

impl CtrlAltDel {
    /// Drains the i8042 output buffer; true once Ctrl-Alt-Del was pressed.
    fn poll(&mut self) -> bool {
        while cpu::inb(0x64) & 1 != 0 {
            let code = cpu::inb(0x60);
            let extended = core::mem::take(&mut self.extended);
            match code {
                0xe0 => self.extended = true,
                0x1d => self.ctrl = true,
                0x9d => self.ctrl = false,
                0x38 => self.alt = true,
                0xb8 => self.alt = false,
                0x53 if extended && self.ctrl && self.alt => return true,
                _ => {}
            }
        }
        false
    }
}

/// The 4096 bytes written by `ferro.write=`: byte `i` is `i as u8 ^ 0x5a`,
/// then the first 16 bytes are `FERRO-GUEST-WROTE`[..16].
/// The block round `n` of a writing `ferro.blkloop=` writes: the
/// `ferro.write=` pattern with bytes 16..24 holding `n` (little endian).
fn loop_pattern(n: u64) -> [u8; IO_LEN] {
    let mut p = write_pattern();
    p[16..24].copy_from_slice(&n.to_le_bytes());
    p
}

fn write_pattern() -> [u8; IO_LEN] {
    let mut p = [0u8; IO_LEN];
    for (i, b) in p.iter_mut().enumerate() {
        *b = i as u8 ^ 0x5a;
    }
    p[..16].copy_from_slice(&b"FERRO-GUEST-WROTE"[..16]);
    p
}

/// FNV-1a, 64-bit.
fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // Interrupts off: nothing else runs once we are here.
    boot::disable_interrupts();
    match info.location() {
        Some(l) => say!("panic: {} ({}:{})", info.message(), l.file(), l.line()),
        None => say!("panic: {}", info.message()),
    }
    cpu::reset()
}

/// The prebuilt `core` of the host target names the unwinding personality
/// routine; with `panic = "abort"` nothing ever unwinds, so it is never
/// called (release builds drop the reference through LTO, debug builds link
/// against this).
#[no_mangle]
extern "C" fn rust_eh_personality() {}
