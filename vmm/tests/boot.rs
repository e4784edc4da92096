//! Booting the project's test guest under real KVM: boot protocol, ACPI,
//! PCI enumeration, SMP, and `reboot` ending the VMM with status 0.

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
    assert!(
        status.success(),
        "reboot must end the VMM with 0, got {status}"
    );
}
