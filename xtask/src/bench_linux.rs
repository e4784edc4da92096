//! Stock Linux under ferro-vmm, and under Firecracker when a peer binary is
//! given, inside one L1 of the Linux-guest harness (QEMU TCG with nested
//! SVM): boot to userspace, the guest-visible disk and the network through
//! Linux's own drivers.
//!
//! Emulated time is slow and noisy, so every figure is compared with another
//! measured in the same L1 run: ferro-vmm against Firecracker (runs
//! alternate), and the guest's disk and network against L1 doing the same
//! work itself (its tmpfs and its loopback: the ceiling, not a peer).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use ferro_linux_guest::{l2, work_dir, Console, GuestKernel, Qemu, L1, VIRTIO_MODULES};
use serde_json::{json, Value};

use crate::measure::percentile;

type Result<T> = std::result::Result<T, String>;

/// The L2 `/init`: what to do comes from `ferro.bench=` on its command line.
const L2_SCRIPT: &str = r#"
t() { local a=$(up); "$@" >/dev/null 2>&1; awk -v a="$a" -v b="$(up)" 'BEGIN { printf "%.2f", b - a }'; }
mode=$(sed -n 's/.*ferro.bench=\([a-z]*\).*/\1/p' /proc/cmdline)
case "$mode" in
disk)
  value disk_1m_write_s "$(t dd if=/dev/zero of=/dev/vda bs=1M count=64 oflag=direct)"
  value disk_1m_read_s "$(t dd if=/dev/vda of=/dev/null bs=1M count=64 iflag=direct)"
  value disk_4k_write_s "$(t dd if=/dev/zero of=/dev/vda bs=4096 count=4096 oflag=direct)"
  value disk_4k_read_s "$(t dd if=/dev/vda of=/dev/null bs=4096 count=4096 iflag=direct)"
  ;;
net)
  ifconfig eth0 10.9.9.2 netmask 255.255.255.0 up
  value net_rx_s "$(t wget -q -O /dev/null http://10.9.9.1/big.bin)"
  mkdir -p /www; dd if=/dev/zero of=/www/big.bin bs=1M count=32 2>/dev/null
  httpd -p 80 -h /www
  echo "L2 serving"
  n=0; until wget -q -O /dev/null http://10.9.9.1/done 2>/dev/null; do sleep 0.2; n=$((n + 1)); [ $n -gt 600 ] && break; done
  ;;
esac
reboot -f
"#;

/// The L1 script: alternating runs of each VMM, then L1's own baselines.
fn l1_script(runs: usize, peer: bool) -> String {
    format!(
        r#"
RUNS={runs}
CMD="console=ttyS0 reboot=k panic=1 rdinit=/init quiet"
tunctl -t tap0 >/dev/null; ifconfig tap0 10.9.9.1 netmask 255.255.255.0 up
mkdir -p /www; dd if=/dev/zero of=/www/big.bin bs=1M count=32 2>/dev/null
httpd -p 10.9.9.1:80 -h /www
httpd -p 127.0.0.1:8080 -h /www
truncate -s 128M /disk.img
t() {{ local a=$(up); "$@" >/dev/null 2>&1; awk -v a="$a" -v b="$(up)" 'BEGIN {{ printf "%.2f", b - a }}'; }}
ferro() {{
  mode=$1
  case $mode in
    disk) dev="--disk path=/disk.img,id=data0" ;;
    net) dev="--net tap=tap0,mac=06:00:00:00:00:02" ;;
    *) dev="" ;;
  esac
  vmm_start --kernel /l2/vmlinux --initrd /l2/initrd --memory 256 --vcpus 1 --serial stdout $dev \
    --cmdline "$CMD ferro.bench=$mode"
}}
fc() {{
  mode=$1; pci=""; dev=', "drives": []'
  case $mode in
    disk) pci=--enable-pci; dev=', "drives": [{{"drive_id": "data0", "path_on_host": "/disk.img", "is_root_device": false, "is_read_only": false}}]' ;;
    net) pci=--enable-pci; dev=', "drives": [], "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:02"}}]' ;;
  esac
  cat > /fc.json <<J
{{"boot-source": {{"kernel_image_path": "/l2/vmlinux", "initrd_path": "/l2/initrd", "boot_args": "$CMD ferro.bench=$mode"}},
 "machine-config": {{"vcpu_count": 1, "mem_size_mib": 256}}$dev}}
J
  vm_start /bin/firecracker --no-api --config-file /fc.json $pci
}}
record() {{
  vm=$1; mode=$2; i=$3
  if [ "$mode" = net ]; then
    if l2_wait "L2 serving" 300; then echo "RESULT $vm net $i net_tx_s=$(t wget -q -O /dev/null http://10.9.9.2/big.bin)"; fi
    touch /www/done
  fi
  vmm_wait 300
  rm -f /www/done
  echo "RESULT $vm $mode $i exit=$VMM_RC"
  echo "RESULT $vm $mode $i exit_s=$VMM_SECS"
  sed -n 's/.*L2 init at \([0-9.]*\).*/\1/p' /l2.log | head -1 | sed "s/^/RESULT $vm $mode $i init_uptime_s=/"
  grep "VALUE " /l2.log | sed "s/.*VALUE /RESULT $vm $mode $i /"
}}
for mode in boot disk net; do
  n=$RUNS; [ $mode != boot ] && n=$(( (RUNS + 1) / 2 ))
  for i in $(seq 1 $n); do
    ferro $mode; record ferro $mode $i
    if [ {peer} = 1 ]; then fc $mode; record firecracker $mode $i; fi
  done
done
# L1 doing the same work itself: its tmpfs (no O_DIRECT there) and loopback.
echo "RESULT l1 disk 1 disk_1m_write_s=$(t dd if=/dev/zero of=/base.img bs=1M count=64 conv=fsync)"
echo "RESULT l1 disk 1 disk_1m_read_s=$(t dd if=/base.img of=/dev/null bs=1M count=64)"
echo "RESULT l1 disk 1 disk_4k_write_s=$(t dd if=/dev/zero of=/base.img bs=4096 count=4096 conv=notrunc,fsync)"
echo "RESULT l1 disk 1 disk_4k_read_s=$(t dd if=/base.img of=/dev/null bs=4096 count=4096)"
echo "RESULT l1 net 1 net_rx_s=$(t wget -q -O /dev/null http://127.0.0.1:8080/big.bin)"
"#,
        peer = u8::from(peer)
    )
}

/// `RESULT vm mode run key=value` lines, as vm -> mode -> key -> values.
type Results = BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<f64>>>>;

fn parse(console: &Console) -> Results {
    let mut r = Results::new();
    for l in &console.lines {
        let Some(i) = l.find("RESULT ") else { continue };
        let parts: Vec<&str> = l[i + 7..].split_whitespace().collect();
        let [vm, mode, _run, kv] = parts.as_slice() else {
            continue;
        };
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        if let Ok(v) = v.parse::<f64>() {
            r.entry(vm.to_string())
                .or_default()
                .entry(mode.to_string())
                .or_default()
                .entry(k.to_string())
                .or_default()
                .push(v);
        }
    }
    r
}

fn median(r: &Results, vm: &str, mode: &str, key: &str) -> Option<f64> {
    let mut v = r.get(vm)?.get(mode)?.get(key)?.clone();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    Some(percentile(&v, 0.5))
}

/// MiB/s of moving `mib` MiB in `secs` seconds.
fn rate(mib: f64, secs: Option<f64>) -> Option<f64> {
    secs.filter(|s| *s > 0.0).map(|s| mib / s)
}

/// Run the Linux-guest benchmark: `runs` boots of each VMM (half as many
/// disk and network runs).
pub fn bench(
    root: &Path,
    vmm: &Path,
    vmmctl: &Path,
    peer: Option<&Path>,
    runs: usize,
) -> Result<Value> {
    let k = GuestKernel::locate(&root.join("target/guest-kernel")).map_err(|e| e.to_string())?;
    let dir = work_dir(root, "bench");
    let l2_img = l2(&k, VIRTIO_MODULES, L2_SCRIPT)
        .and_then(|u| u.write(&dir.join("l2.cpio"), "L2"))
        .map_err(|e| e.to_string())?;
    let mut l1 = L1::new(&k, &[], vmm, vmmctl).map_err(|e| e.to_string())?;
    if let Some(fc) = peer {
        l1.userland()
            .binary(fc, "bin/firecracker")
            .map_err(|e| e.to_string())?;
    }
    l1.userland()
        .file(&k.vmlinux, "l2/vmlinux")
        .file(&l2_img, "l2/initrd");
    l1.script(&l1_script(runs, peer.is_some()));
    let img = l1.write(&dir.join("l1.cpio")).map_err(|e| e.to_string())?;
    let console = Qemu::new(&k.bzimage, &img)
        .memory_mib(2048)
        .timeout(Duration::from_secs(60 * 40))
        .echo(std::env::var_os("FERRO_BENCH_ECHO").is_some())
        .run()
        .map_err(|e| e.to_string())?;
    let r = parse(&console);
    let m = |vm: &str, mode: &str, key: &str| median(&r, vm, mode, key);
    let mut out = json!({"l1_seconds": console.secs, "runs": runs});
    let vms: Vec<&str> = if peer.is_some() {
        vec!["ferro", "firecracker"]
    } else {
        vec!["ferro"]
    };
    for vm in &vms {
        let failed = r
            .get(*vm)
            .map(|modes| {
                modes
                    .values()
                    .flat_map(|k| k.get("exit").into_iter().flatten())
                    // Every run ends in a reboot from inside: ferro-vmm exits
                    // 10 for that, Firecracker 0.
                    .filter(|c| **c != 0.0 && **c != 10.0)
                    .count()
            })
            .unwrap_or(0);
        let disk = |key: &str, mib: f64| rate(mib, m(vm, "disk", key));
        out[*vm] = json!({
            "boot_exit_s_median": m(vm, "boot", "exit_s"),
            "boot_init_uptime_s_median": m(vm, "boot", "init_uptime_s"),
            "disk_1m_write_mib_s": disk("disk_1m_write_s", 64.0),
            "disk_1m_read_mib_s": disk("disk_1m_read_s", 64.0),
            "disk_4k_write_mib_s": disk("disk_4k_write_s", 16.0),
            "disk_4k_read_mib_s": disk("disk_4k_read_s", 16.0),
            "net_rx_mib_s": rate(32.0, m(vm, "net", "net_rx_s")),
            "net_tx_mib_s": rate(32.0, m(vm, "net", "net_tx_s")),
            "failed_runs": failed,
        });
        println!(
            "linux [{vm}]: boot process start -> exit median {:.2} s, guest uptime at /init {:.2} s; \
             disk 1M write {:.1} read {:.1} MiB/s, 4K write {:.2} read {:.2} MiB/s (O_DIRECT, QD1); \
             net guest rx {:.1} tx {:.1} MiB/s; {failed} failed runs",
            m(vm, "boot", "exit_s").unwrap_or(f64::NAN),
            m(vm, "boot", "init_uptime_s").unwrap_or(f64::NAN),
            disk("disk_1m_write_s", 64.0).unwrap_or(f64::NAN),
            disk("disk_1m_read_s", 64.0).unwrap_or(f64::NAN),
            disk("disk_4k_write_s", 16.0).unwrap_or(f64::NAN),
            disk("disk_4k_read_s", 16.0).unwrap_or(f64::NAN),
            rate(32.0, m(vm, "net", "net_rx_s")).unwrap_or(f64::NAN),
            rate(32.0, m(vm, "net", "net_tx_s")).unwrap_or(f64::NAN),
        );
    }
    let base = json!({
        "disk_1m_write_mib_s": rate(64.0, m("l1", "disk", "disk_1m_write_s")),
        "disk_1m_read_mib_s": rate(64.0, m("l1", "disk", "disk_1m_read_s")),
        "disk_4k_write_mib_s": rate(16.0, m("l1", "disk", "disk_4k_write_s")),
        "disk_4k_read_mib_s": rate(16.0, m("l1", "disk", "disk_4k_read_s")),
        "net_loopback_mib_s": rate(32.0, m("l1", "net", "net_rx_s")),
    });
    println!("linux [L1 itself, same run]: {base}");
    out["l1_baseline"] = base;
    // Ratios: ferro-vmm over the peer (time: lower is better; rates: higher).
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let mut ratios = json!({});
    for key in [
        "disk_1m_write_mib_s",
        "disk_1m_read_mib_s",
        "disk_4k_write_mib_s",
        "disk_4k_read_mib_s",
    ] {
        ratios[format!("ferro_vs_l1_{key}")] = json!(ratio(
            out["ferro"][key].as_f64(),
            out["l1_baseline"][key].as_f64()
        ));
    }
    ratios["ferro_vs_l1_net_rx"] = json!(ratio(
        out["ferro"]["net_rx_mib_s"].as_f64(),
        out["l1_baseline"]["net_loopback_mib_s"].as_f64()
    ));
    if peer.is_some() {
        for key in [
            "boot_exit_s_median",
            "boot_init_uptime_s_median",
            "disk_1m_write_mib_s",
            "disk_1m_read_mib_s",
            "disk_4k_write_mib_s",
            "disk_4k_read_mib_s",
            "net_rx_mib_s",
            "net_tx_mib_s",
        ] {
            ratios[format!("ferro_vs_firecracker_{key}")] = json!(ratio(
                out["ferro"][key].as_f64(),
                out["firecracker"][key].as_f64()
            ));
        }
    }
    println!("linux ratios (same L1 run; boot: ferro/firecracker time, lower is better; rates: higher is better): {ratios}");
    out["ratios"] = ratios;
    Ok(out)
}
