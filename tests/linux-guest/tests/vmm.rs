//! ferro-vmm booting Debian's stock cloud kernel with Linux's own drivers,
//! inside QEMU's emulator with nested SVM (see the crate docs and
//! docs/architecture.md, "The Linux-guest harness").
//!
//! Each test boots one L1 (QEMU, TCG) that runs ferro-vmm on its
//! `/dev/kvm`; the L2 Linux checks its devices and prints `CHECK` lines.

use std::path::PathBuf;
use std::time::Duration;

use ferro_linux_guest::{l2, work_dir, Console, GuestKernel, Qemu, L1, VIRTIO_MODULES};

fn kernel() -> GuestKernel {
    ferro_testkit::require_kvm_root();
    ferro_testkit::require_tool("qemu-system-x86_64");
    let dir = ferro_testkit::workspace_root().join("target/guest-kernel");
    GuestKernel::locate(&dir).unwrap_or_else(|e| panic!("{e}"))
}

/// Build the L2 image (`l2_script` as its /init body) and the L1 image
/// (`l1_script`, with the L2 kernels and image under /l2), then boot L1.
fn run(name: &str, l2_script: &str, l1_script: &str, qemu: impl Fn(Qemu) -> Qemu) -> Console {
    run_with(name, l2_script, l1_script, qemu, |_| {})
}

/// [`run`], with `extra` adding to L1's userland.
fn run_with(
    name: &str,
    l2_script: &str,
    l1_script: &str,
    qemu: impl Fn(Qemu) -> Qemu,
    extra: impl FnOnce(&mut L1),
) -> Console {
    let k = kernel();
    let dir = work_dir(&ferro_testkit::workspace_root(), name);
    let l2_img = l2(&k, VIRTIO_MODULES, l2_script)
        .unwrap()
        .write(&dir.join("l2.cpio"), "L2")
        .unwrap();
    let vmm = ferro_testkit::workspace_bin("ferro-vmm", "ferro-vmm");
    let ctl = PathBuf::from(env!("CARGO_BIN_EXE_ferro-vmmctl"));
    let mut l1 = L1::new(&k, &[], &vmm, &ctl).unwrap();
    l1.userland()
        .file(&k.vmlinux, "l2/vmlinux")
        .file(&k.bzimage, "l2/bzImage")
        .file(&l2_img, "l2/initrd");
    extra(&mut l1);
    l1.script(l1_script);
    let img = l1.write(&dir.join("l1.cpio")).unwrap();
    let q = qemu(Qemu::new(&k.bzimage, &img).timeout(Duration::from_secs(400)));
    let console = q.run().unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: L1 run took {:.1} s", console.secs);
    console
}

const L2_CMDLINE: &str = "console=ttyS0 panic=1 rdinit=/init quiet";

/// ELF vmlinux, 1 vCPU, an initrd, a read-write and a read-only disk, a NIC
/// and the rng: Linux's virtio drivers bind and work, then `poweroff` goes
/// through ACPI S5.
#[test]
fn linux_elf_devices_and_poweroff() {
    let l2_script = r#"
value l2_cpus "$(nproc)"
for d in /sys/bus/virtio/devices/*; do
  echo "L2 $(basename $d) device=$(cat $d/device) driver=$(basename $(readlink $d/driver) 2>/dev/null)"
done
check drivers_bound [ "$(ls -d /sys/bus/virtio/devices/*/driver | wc -l)" = 4 ]
check initrd_is_root grep -q "rdinit=/init" /proc/cmdline
# Disks: serials, read-only flag, write cache (flush).
check vda_serial [ "$(cat /sys/block/vda/serial)" = data0 ]
check vdb_serial [ "$(cat /sys/block/vdb/serial)" = ro0 ]
check vda_writable [ "$(cat /sys/block/vda/ro)" = 0 ]
check vdb_readonly [ "$(cat /sys/block/vdb/ro)" = 1 ]
check vda_flush grep -q "write back" /sys/block/vda/queue/write_cache
value vdb_md5 "$(md5sum < /dev/vdb | cut -d' ' -f1)"
if dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null; then fail vdb_write_refused; else ok vdb_write_refused; fi
# A pattern in thousands of O_DIRECT requests of mixed sizes, flushed, read back in other sizes.
dd if=/dev/urandom of=/pat bs=1M count=8 2>/dev/null
P=$(md5sum < /pat | cut -d' ' -f1); value pat_md5 "$P"
dd if=/pat of=/dev/vda bs=512 count=2048 oflag=direct 2>/dev/null
dd if=/pat of=/dev/vda bs=4096 skip=256 seek=256 count=512 oflag=direct 2>/dev/null
dd if=/pat of=/dev/vda bs=65536 skip=48 seek=48 count=48 oflag=direct 2>/dev/null
dd if=/pat of=/dev/vda bs=1M skip=6 seek=6 count=2 oflag=direct conv=fsync 2>/dev/null
check pattern_8k [ "$(dd if=/dev/vda bs=8192 count=1024 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = "$P" ]
check pattern_128k [ "$(dd if=/dev/vda bs=131072 count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = "$P" ]
sync
# rng.
check rng_current grep -q virtio /sys/class/misc/hw_random/rng_current
check rng_read [ "$(dd if=/dev/hwrng bs=64 count=4 2>/dev/null | wc -c)" = 256 ]
# NIC: offloads negotiated, ping, TCP both ways.
for d in /sys/bus/virtio/devices/*; do [ "$(cat $d/device)" = 0x0001 ] && F=$(cat $d/features); done
bit() { echo "$F" | cut -c$(( $1 + 1 )); }
value net_features "$F"
check net_csum_tso_offered [ "$(bit 0)$(bit 1)$(bit 7)$(bit 11)" = 1111 ]
ifconfig eth0 10.9.9.2 netmask 255.255.255.0 up
check net_ping ping -c 3 -W 2 10.9.9.1
wget -q -O /down.bin http://10.9.9.1/down.bin; value l2_down_md5 "$(md5sum < /down.bin | cut -d' ' -f1)"
mkdir -p /www; dd if=/dev/urandom of=/www/up.bin bs=1M count=8 2>/dev/null
value l2_up_md5 "$(md5sum < /www/up.bin | cut -d' ' -f1)"
httpd -p 80 -h /www
echo "L2 upload ready"
n=0; until wget -q -O /dev/null http://10.9.9.1/done 2>/dev/null; do sleep 0.5; n=$((n + 1)); [ $n -gt 240 ] && break; done
poweroff -f
"#;
    let l1_script = format!(
        r#"
tunctl -t tap0 >/dev/null; ifconfig tap0 10.9.9.1 netmask 255.255.255.0 up
truncate -s 16M /data.img
dd if=/dev/urandom of=/ro.img bs=1M count=2 2>/dev/null
value ro_md5_before "$(md5sum < /ro.img | cut -d' ' -f1)"
mkdir -p /www; dd if=/dev/urandom of=/www/down.bin bs=1M count=8 2>/dev/null
value l1_down_md5 "$(md5sum < /www/down.bin | cut -d' ' -f1)"
httpd -p 10.9.9.1:80 -h /www
vmm_start --kernel /l2/vmlinux --initrd /l2/initrd --memory 256 --vcpus 1 --serial stdout \
  --disk path=/data.img,id=data0 --disk path=/ro.img,ro=on,id=ro0 \
  --net tap=tap0,mac=06:00:00:00:00:02 --cmdline "{L2_CMDLINE}"
if l2_wait "L2 upload ready" 300; then
  s=/sys/class/net/tap0/statistics
  rb=$(cat $s/rx_bytes); rp=$(cat $s/rx_packets)
  wget -q -O /up.bin http://10.9.9.2/up.bin
  value l1_up_md5 "$(md5sum < /up.bin | cut -d' ' -f1)"
  value tap_rx_bytes_per_packet $(( ($(cat $s/rx_bytes) - rb) / ($(cat $s/rx_packets) - rp + 1) ))
  value tap_tx_bytes_per_packet $(( $(cat $s/tx_bytes) / ($(cat $s/tx_packets) + 1) ))
  touch /www/done
fi
vmm_wait 300
check vmm_exit_0 [ "$VMM_RC" = 0 ]
check vmm_reports_poweroff grep -q "VM ended: the guest powered off" /l2.log
value data_md5 "$(dd if=/data.img bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1)"
value ro_md5_after "$(md5sum < /ro.img | cut -d' ' -f1)"
"#
    );
    let c = run("devices", l2_script, &l1_script, |q| q.memory_mib(1536));
    c.assert_checks(&[
        "drivers_bound",
        "initrd_is_root",
        "vda_serial",
        "vdb_serial",
        "vda_writable",
        "vdb_readonly",
        "vda_flush",
        "vdb_write_refused",
        "pattern_8k",
        "pattern_128k",
        "rng_current",
        "rng_read",
        "net_csum_tso_offered",
        "net_ping",
        "vmm_exit_0",
        "vmm_reports_poweroff",
    ]);
    let v = |k: &str| c.value(k).unwrap_or_else(|| panic!("no VALUE {k}"));
    assert_eq!(v("l2_cpus"), "1");
    // The read-only disk: L2 read what L1 wrote, and nothing changed it.
    assert_eq!(v("vdb_md5"), v("ro_md5_before"));
    assert_eq!(v("ro_md5_after"), v("ro_md5_before"));
    // The pattern L2 wrote is in L1's file.
    assert_eq!(v("data_md5"), v("pat_md5"));
    // TCP both ways, byte-exact.
    assert_eq!(v("l2_down_md5"), v("l1_down_md5"));
    assert_eq!(v("l1_up_md5"), v("l2_up_md5"));
    // TSO in use: frames from the guest reach the TAP larger than the MTU.
    let per: u64 = v("tap_rx_bytes_per_packet").parse().unwrap();
    assert!(per > 1514, "guest TX frames average {per} bytes: no TSO");
}

/// A bzImage with 4 vCPUs (Linux starts the APs from our MADT) and more
/// than 3 GiB of memory (RAM split around the PCI hole), then `reboot`
/// with Linux's default method: ferro-vmm reports a reset (exit status 10).
#[test]
fn linux_bzimage_4_vcpus_4_gib_reboot() {
    let l2_script = r#"
value l2_cpus "$(nproc)"
value l2_online "$(cat /sys/devices/system/cpu/online)"
check four_cpus [ "$(grep -c ^processor /proc/cpuinfo)" = 4 ]
value mem_total_kb "$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
check ram_above_4g grep -q "^100000000-.* : System RAM" /proc/iomem
grep "System RAM" /proc/iomem | sed 's/^/L2 iomem /'
reboot -f
"#;
    let l1_script = format!(
        r#"
vmm_start --kernel /l2/bzImage --initrd /l2/initrd --memory 4096 --vcpus 4 --serial stdout \
  --cmdline "{L2_CMDLINE}"
vmm_wait 360
check vmm_exit_reset [ "$VMM_RC" = 10 ]
check vmm_reports_reset grep -q "VM ended: the guest reset" /l2.log
"#
    );
    let c = run("smp-bzimage", l2_script, &l1_script, |q| {
        q.memory_mib(5632).cpus(2)
    });
    c.assert_checks(&[
        "four_cpus",
        "ram_above_4g",
        "vmm_exit_reset",
        "vmm_reports_reset",
    ]);
    assert_eq!(c.value("l2_online").unwrap(), "0-3");
    let kb: u64 = c.value("mem_total_kb").unwrap().parse().unwrap();
    assert!(kb > 3_500_000, "MemTotal {kb} kB of a 4 GiB guest");
}

/// The control socket against a running Linux: pause stops it, resume lets
/// it go on, and a graceful shutdown delivers Ctrl-Alt-Del to Linux, which
/// powers off.
#[test]
fn linux_pause_resume_and_graceful_shutdown() {
    // PID 1 asks the kernel to signal it on Ctrl-Alt-Del (as init systems
    // do), and powers off when it arrives.
    let l2_script = r#"
echo 0 > /proc/sys/kernel/ctrl-alt-del
trap 'echo "L2 got ctrl-alt-del"; poweroff -f' INT
i=0; while [ $i -lt 100000 ]; do echo "TICK $i"; i=$((i + 1)); sleep 0.2; done
"#;
    let l1_script = format!(
        r#"
vmm_start --kernel /l2/vmlinux --initrd /l2/initrd --memory 256 --vcpus 1 --serial stdout \
  --control-socket /vm.sock --cmdline "{L2_CMDLINE}"
check ticking l2_wait "TICK 5" 300
expect status_running '"running"' ctl /vm.sock '{{"op":"status"}}'
expect pause '"paused"' ctl /vm.sock '{{"op":"pause"}}'
sleep 0.5; a=$(grep -c TICK /l2.log); sleep 3; b=$(grep -c TICK /l2.log)
value ticks_while_paused $((b - a))
check no_ticks_while_paused [ $((b - a)) -eq 0 ]
expect resume '"running"' ctl /vm.sock '{{"op":"resume"}}'
check ticks_after_resume l2_wait "TICK $((b + 3))" 60
expect shutdown_graceful '"graceful":true' ctl /vm.sock '{{"op":"shutdown","timeout_ms":60000}}'
vmm_wait 120
check cad_reached_linux grep -q "L2 got ctrl-alt-del" /l2.log
check vmm_exit_0 [ "$VMM_RC" = 0 ]
"#
    );
    // One vCPU: under heavy load a 2-vCPU L2 once left ferro-vmm's second
    // vCPU thread stuck inside L1's kvm-amd after power-off (an L1 soft
    // lockup, see docs/architecture.md); SMP is covered by the bzImage test.
    let c = run("control", l2_script, &l1_script, |q| q.memory_mib(1024));
    c.assert_checks(&[
        "ticking",
        "status_running",
        "pause",
        "no_ticks_while_paused",
        "resume",
        "ticks_after_resume",
        "shutdown_graceful",
        "cad_reached_linux",
        "vmm_exit_0",
    ]);
}

/// Linux booted from a replicated volume: `ferro-blockd` primaries with
/// a fixed replica set (no controller) serve a 3-replica volume as the
/// boot disk (`boot=on`: first on the PCI bus although given last, so
/// Linux names it vda) and a 2-replica data volume, the backups being two
/// more ferro-blockd processes over TCP in L1. The first boot makes the
/// "image" — a root filesystem with busybox and an init on vda — and
/// writes a pattern to vdb with O_DIRECT; the second boot's initramfs only
/// loads virtio_blk and switches root to vda, whose own init reads the
/// pattern back. Every replica file is then byte-identical to its
/// primary's.
#[test]
fn linux_boots_from_a_replicated_volume() {
    let l2_script = r#"
check vda_is_the_boot_volume [ "$(cat /sys/block/vda/serial)" = vol0 ]
check vdb_is_the_data_volume [ "$(cat /sys/block/vdb/serial)" = vol1 ]
mkdir -p /mnt /newroot
if grep -q ferro.phase=1 /proc/cmdline; then
  check mkfs_root mke2fs /dev/vda 16384
  check mount_root mount -t ext2 /dev/vda /mnt
  mkdir -p /mnt/bin /mnt/proc /mnt/sys /mnt/dev
  cp /bin/busybox /mnt/bin/busybox
  cat > /mnt/init <<'EOF_INIT'
#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc; $B mount -t sysfs sys /sys; $B mount -t devtmpfs dev /dev
echo "volume init: pid $$"
if $B grep -q '^/dev/vda / ' /proc/mounts; then echo "CHECK root_is_vda ok"; else echo "CHECK root_is_vda FAIL $($B cat /proc/mounts)"; fi
[ "$$" = 1 ] && echo "CHECK volume_init_is_pid1 ok" || echo "CHECK volume_init_is_pid1 FAIL"
echo "VALUE saved_md5=$($B cat /pat_md5)"
echo "VALUE read_md5=$($B dd if=/dev/vdb bs=65536 count=64 iflag=direct 2>/dev/null | $B md5sum | $B cut -d' ' -f1)"
$B poweroff -f
EOF_INIT
  chmod 755 /mnt/init
  dd if=/dev/urandom of=/pat bs=65536 count=64 2>/dev/null
  P=$(md5sum < /pat | cut -d' ' -f1); value pat_md5 "$P"
  echo "$P" > /mnt/pat_md5
  check pattern_written dd if=/pat of=/dev/vdb bs=65536 oflag=direct conv=fsync
  umount /mnt; sync
else
  check mount_new_root mount -t ext2 /dev/vda /newroot
  exec switch_root /newroot /init
fi
poweroff -f
"#;
    let l1_script = format!(
        r#"
mkdir -p /rb /rc
/bin/ferro-blockd --replica id=vol0,size=32M --replica id=vol1,size=32M --replica-dir /rb --replica-listen 127.0.0.1:7431 > /b.log 2>&1 &
/bin/ferro-blockd --replica id=vol0,size=32M --replica-dir /rc --replica-listen 127.0.0.1:7432 > /c.log 2>&1 &
n=0; until grep -q "replica server on" /b.log && grep -q "replica server on" /c.log || [ $n -gt 300 ]; do sleep 0.1; n=$((n + 1)); done
/bin/ferro-blockd   --volume id=vol0,path=/a0.img,size=32M,socket=/vol0.sock,backups=b@127.0.0.1:7431+c@127.0.0.1:7432   --volume id=vol1,path=/a1.img,size=32M,socket=/vol1.sock,backups=b@127.0.0.1:7431 > /a.log 2>&1 &
n=0; until [ -S /vol0.sock ] && [ -S /vol1.sock ] || [ $n -gt 300 ]; do sleep 0.1; n=$((n + 1)); done
check blockd_serves [ -S /vol0.sock ]
for phase in 1 2; do
  vmm_start --kernel /l2/vmlinux --initrd /l2/initrd --memory 256 --vcpus 1 --serial stdout     --vhost-user-blk socket=/vol1.sock,id=vol1 --vhost-user-blk socket=/vol0.sock,id=vol0,boot=on     --cmdline "{L2_CMDLINE} ferro.phase=$phase"
  vmm_wait 300
  check vmm${{phase}}_exit_0 [ "$VMM_RC" = 0 ]
done
sum() {{ md5sum < "$1" | cut -d' ' -f1; }}
check vol0_replica_b_identical [ "$(sum /rb/vol0.vol)" = "$(sum /a0.img)" ]
check vol0_replica_c_identical [ "$(sum /rc/vol0.vol)" = "$(sum /a0.img)" ]
check vol1_replica_b_identical [ "$(sum /rb/vol1.vol)" = "$(sum /a1.img)" ]
cat /a.log
"#
    );
    let blockd = ferro_testkit::workspace_bin("ferro-blockd", "ferro-blockd");
    let c = run_with(
        "boot-volume",
        l2_script,
        &l1_script,
        |q| q.memory_mib(1536),
        |l1| {
            l1.userland()
                .binary(&blockd, "bin/ferro-blockd")
                .unwrap_or_else(|e| panic!("{e}"));
        },
    );
    c.assert_checks(&[
        "blockd_serves",
        "vda_is_the_boot_volume",
        "vdb_is_the_data_volume",
        "mkfs_root",
        "mount_root",
        "pattern_written",
        "vmm1_exit_0",
        "mount_new_root",
        "root_is_vda",
        "volume_init_is_pid1",
        "vmm2_exit_0",
        "vol0_replica_b_identical",
        "vol0_replica_c_identical",
        "vol1_replica_b_identical",
    ]);
    let v = |k: &str| c.value(k).unwrap_or_else(|| panic!("no VALUE {k}"));
    assert_eq!(
        v("saved_md5"),
        v("pat_md5"),
        "the md5 saved on the root volume"
    );
    assert_eq!(
        v("read_md5"),
        v("pat_md5"),
        "the pattern read back from vdb"
    );
}

/// A volume served by `ferro-blockd` over vhost-user-blk (guest memory in
/// memfds shared with it): Linux's own virtio_blk driver writes and reads
/// back a pattern in thousands of O_DIRECT requests and makes a
/// filesystem; after its VM powers off (the volume "detached"), a second
/// VM on the same volume ("attached" again) mounts that filesystem and
/// reads the file and the pattern back.
#[test]
fn linux_on_a_vhost_user_volume_keeps_its_filesystem_across_attachments() {
    let l2_script = r#"
check vda_serial [ "$(cat /sys/block/vda/serial)" = vol0 ]
check vda_flush grep -q "write back" /sys/block/vda/queue/write_cache
mkdir -p /mnt
if grep -q ferro.phase=1 /proc/cmdline; then
  dd if=/dev/urandom of=/pat bs=1M count=8 2>/dev/null
  P=$(md5sum < /pat | cut -d' ' -f1); value pat_md5 "$P"
  # At 32 MiB, past the filesystem: 4 KiB and 64 KiB requests, flushed.
  dd if=/pat of=/dev/vda bs=4096 seek=8192 count=1024 oflag=direct 2>/dev/null
  dd if=/pat of=/dev/vda bs=65536 skip=64 seek=576 count=64 oflag=direct conv=fsync 2>/dev/null
  check pattern_read_back [ "$(dd if=/dev/vda bs=131072 skip=256 count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" = "$P" ]
  check mkfs mke2fs /dev/vda 16384
  check mount_new mount -t ext2 /dev/vda /mnt
  echo hello-volume > /mnt/hello; cp /pat /mnt/pat; umount /mnt; sync
else
  check mount_again mount -t ext2 /dev/vda /mnt
  check file_survives [ "$(cat /mnt/hello)" = hello-volume ]
  value fs_pat_md5 "$(md5sum < /mnt/pat | cut -d' ' -f1)"
  value raw_pat_md5 "$(dd if=/dev/vda bs=131072 skip=256 count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
  umount /mnt
fi
poweroff -f
"#;
    let l1_script = format!(
        r#"
truncate -s 64M /vol.img
/bin/ferro-blockd --volume id=vol0,path=/vol.img,size=64M,socket=/vol.sock > /blockd.log 2>&1 &
n=0; until [ -S /vol.sock ] || [ $n -gt 300 ]; do sleep 0.1; n=$((n + 1)); done
check blockd_serves [ -S /vol.sock ]
for phase in 1 2; do
  vmm_start --kernel /l2/vmlinux --initrd /l2/initrd --memory 256 --vcpus 1 --serial stdout \
    --vhost-user-blk socket=/vol.sock,id=vol0 --cmdline "{L2_CMDLINE} ferro.phase=$phase"
  vmm_wait 300
  check vmm${{phase}}_exit_0 [ "$VMM_RC" = 0 ]
done
value file_pat_md5 "$(dd if=/vol.img bs=131072 skip=256 count=64 2>/dev/null | md5sum | cut -d' ' -f1)"
cat /blockd.log
"#
    );
    let blockd = ferro_testkit::workspace_bin("ferro-blockd", "ferro-blockd");
    let c = run_with(
        "volume",
        l2_script,
        &l1_script,
        |q| q.memory_mib(1536),
        |l1| {
            l1.userland()
                .binary(&blockd, "bin/ferro-blockd")
                .unwrap_or_else(|e| panic!("{e}"));
        },
    );
    c.assert_checks(&[
        "blockd_serves",
        "vda_serial",
        "vda_flush",
        "pattern_read_back",
        "mkfs",
        "mount_new",
        "vmm1_exit_0",
        "mount_again",
        "file_survives",
        "vmm2_exit_0",
    ]);
    let v = |k: &str| c.value(k).unwrap_or_else(|| panic!("no VALUE {k}"));
    assert_eq!(v("fs_pat_md5"), v("pat_md5"), "the file's pattern");
    assert_eq!(v("raw_pat_md5"), v("pat_md5"), "the raw pattern");
    assert_eq!(
        v("file_pat_md5"),
        v("pat_md5"),
        "the pattern in blockd's file"
    );
}
