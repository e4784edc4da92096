//! Third-party check of the boot path: Debian's stock kernel, booted
//! directly, must accept our boot params, command line, e820 map and ACPI
//! tables. On this nested-KVM machine guest kernel mode is emulated, so the
//! kernel only gets through early boot in the time we give it (documented in
//! docs/architecture.md); on real hosts it boots fully.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn stock_linux_accepts_boot_params_e820_and_acpi() {
    require_kvm_root();
    let dir = scratch("linux");
    let mut vmm = VmmBuilder::new(&stock_vmlinux(), &dir)
        .args(&[
            "--vcpus",
            "2",
            "--memory",
            "256",
            "--cmdline",
            "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 ferro.marker=42",
        ])
        .spawn();
    let t = Duration::from_secs(60);
    let cmd = vmm.wait_line("Command line:", t);
    assert!(cmd.contains("ferro.marker=42"), "{cmd}");
    vmm.wait_line(
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        t,
    );
    vmm.wait_line(
        "BIOS-e820: [mem 0x00000000e0000000-0x00000000e00fffff] reserved",
        t,
    );
    for table in [
        "ACPI: RSDP",
        "ACPI: XSDT",
        "ACPI: FACP",
        "ACPI: DSDT",
        "ACPI: APIC",
        "ACPI: MCFG",
    ] {
        let l = vmm.wait_line(table, t);
        assert!(l.contains("FERRO"), "{l}");
    }
    vmm.wait_line("smpboot: Allowing 2 CPUs", t);
}
