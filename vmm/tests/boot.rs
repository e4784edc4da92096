//! Booting the project's test guest under real KVM: boot protocol, ACPI,
//! PCI enumeration, SMP, and a reset and a power-off from inside ending the VMM
//! with their own exit statuses.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn test_guest_boots_reads_acpi_and_pci_then_reboots() {
    require_kvm_root();
    let dir = scratch("boot");
    let mut vmm = VmmBuilder::new(&guest_elf(), &dir)
        .args(&[
            "--vcpus",
            "2",
            "--memory",
            "128",
            "--cmdline",
            "console=ttyS0 ferro.exit=reboot",
        ])
        .spawn();
    vmm.wait_line("ferro-guest: hello", Duration::from_secs(20));
    let cmdline = vmm.wait_line("ferro-guest: cmdline=", Duration::from_secs(20));
    assert!(cmdline.contains("ferro.exit=reboot"), "{cmdline}");
    let e820 = vmm.wait_line("ferro-guest: e820", Duration::from_secs(20));
    assert!(e820.contains("ram_mib=12"), "about 127 MiB usable: {e820}");
    let acpi = vmm.wait_line("ferro-guest: acpi", Duration::from_secs(20));
    assert!(acpi.contains("cpus=2"), "MADT must list both vCPUs: {acpi}");
    assert!(acpi.contains("ecam=0xe0000000"), "{acpi}");
    let smp = vmm.wait_line("ferro-guest: smp", Duration::from_secs(20));
    assert!(
        smp.contains("smp cpus_online=2 "),
        "the second vCPU must come up (INIT/STARTUP): {smp}"
    );
    assert!(smp.ends_with("apic_ids=0,1"), "{smp}");
    vmm.wait_line(
        "ferro-guest: pci 00:00.0 1b36:0008",
        Duration::from_secs(20),
    );
    vmm.wait_line("1af4:1044", Duration::from_secs(20));
    let rng = vmm.wait_line("ferro-guest: virtio-rng", Duration::from_secs(20));
    assert!(rng.contains("nonzero=1"), "{rng}");
    vmm.wait_line("ferro-guest: devices ready", Duration::from_secs(20));
    let status = vmm.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(i32::from(ferro_vmm::EXIT_GUEST_RESET)),
        "a reboot from inside must end the VMM with the reset status, got {status}"
    );
}

/// A power-off from inside (ACPI S5) ends the VMM with status 0, apart from
/// a reset (status 10), so a supervisor can tell them apart.
#[test]
fn test_guest_poweroff_exits_0_not_the_reset_status() {
    require_kvm_root();
    let dir = scratch("poweroff");
    let mut vmm = VmmBuilder::new(&guest_elf(), &dir)
        .args(&[
            "--memory",
            "64",
            "--cmdline",
            "console=ttyS0 ferro.exit=poweroff",
        ])
        .spawn();
    vmm.wait_line("ferro-guest: devices ready", Duration::from_secs(20));
    let status = vmm.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(0),
        "power-off must exit 0, got {status}"
    );
}
