//! virtio-blk and virtio-net driven by the test guest under real KVM: a
//! pattern read from disk 1, a pattern written to disk 2, a read-only disk
//! refusing writes, MSI-X interrupts, and the host pinging the guest.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn disks_read_write_readonly_and_ping_over_tap() {
    require_kvm_root();
    let dir = scratch("devices");
    let data: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (d1, d2, d3) = (
        dir.join("data.img"),
        dir.join("scratch.img"),
        dir.join("ro.img"),
    );
    std::fs::write(&d1, &data).unwrap();
    std::fs::write(&d2, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&d3, vec![0x11u8; 1 << 20]).unwrap();
    let net = TapNs::new(
        &format!("fvd{}", std::process::id()),
        "ftap0",
        "10.77.0.1/24",
    );

    let mut vmm = VmmBuilder::new(&guest_elf(), &dir)
        .netns(&net.ns)
        .args(&[
            "--vcpus",
            "2",
            "--memory",
            "128",
            "--cmdline",
            "console=ttyS0 ferro.write=scratch,ro ferro.ip=10.77.0.2/24 ferro.exit=idle",
            "--disk",
            &format!("path={},id=data", d1.display()),
            "--disk",
            &format!("path={},id=scratch", d2.display()),
            "--disk",
            &format!("path={},id=ro,ro=on", d3.display()),
            "--net",
            "tap=ftap0,mac=06:00:0a:4d:00:02",
        ])
        .spawn();
    let t = Duration::from_secs(30);
    let ro = vmm.wait_line("virtio-blk serial=ro", t);
    assert!(ro.contains("ro=1"), "{ro}");
    vmm.wait_line("virtio-net mac=06:00:0a:4d:00:02", t);
    vmm.wait_line("ferro-guest: devices ready", t);

    let read = vmm.wait_line("blk serial=data read sector0", t);
    let want = format!("fnv64={:016x}", fnv64(&data[..4096]));
    assert!(
        read.contains(&want),
        "guest read the wrong data: {read} (want {want})"
    );

    let w = vmm.wait_line("blk serial=scratch write", t);
    assert!(
        w.contains("write status=0") && w.contains("flush status=0"),
        "{w}"
    );
    let written = std::fs::read(&d2).unwrap();
    assert_eq!(
        &written[..4096],
        &guest_write_pattern()[..],
        "pattern not in the file"
    );
    assert!(
        written[4096..].iter().all(|b| *b == 0),
        "guest wrote past sector 8"
    );

    let ro_w = vmm.wait_line("blk serial=ro write", t);
    assert!(
        ro_w.contains("write status=1"),
        "read-only disk must refuse writes: {ro_w}"
    );
    assert!(
        std::fs::read(&d3).unwrap().iter().all(|b| *b == 0x11),
        "read-only file changed"
    );

    vmm.wait_line("ferro-guest: net ip=10.77.0.2 up", t);
    let (ok, out) = net.ping("10.77.0.2", 3);
    assert!(
        ok,
        "no ping replies from the guest:\n{out}\nconsole:\n{}",
        vmm.console_text()
    );
    assert!(out.contains("3 received"), "{out}");

    let irq = vmm.wait_line("ferro-guest: irq count=", t);
    let count: u64 = irq.rsplit('=').next().unwrap().trim().parse().unwrap();
    assert!(count > 0, "no MSI-X interrupt reached the guest: {irq}");

    let stop = vmm.control(r#"{"op":"stop"}"#);
    assert_eq!(stop["ok"], true);
    assert!(vmm.wait_exit(Duration::from_secs(10)).success());
}
