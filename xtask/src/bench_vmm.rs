//! VMM benchmarks: boot time, memory overhead, virtio-blk device model
//! throughput against the host doing the same I/O on the same file.

use crate::measure::{percentile, root, Rng};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use ferro_virtio::net::{NetBackend, Tap};
use ferro_virtio::testing::{BlockHarness, NetHarness, NET_HARNESS_SLOTS};
use serde_json::{json, Value};

type Result<T> = std::result::Result<T, String>;

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn stats(mut v: Vec<f64>) -> Value {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    json!({"median": percentile(&v, 0.5), "p90": percentile(&v, 0.9), "min": v[0], "runs": v.len()})
}

/// Time from spawn to the guest's first console line, to `needle`, and to exit.
fn time_boot(mut cmd: Command, needle: &str) -> Result<(f64, f64, f64)> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn: {e}"))?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut first = None;
    let mut ready = None;
    for line in lines.by_ref() {
        let line = line.map_err(|e| e.to_string())?;
        let t = start.elapsed().as_secs_f64() * 1e3;
        // The guest's first line (a peer VMM may print its own lines first).
        if line.contains("ferro-guest: ") {
            first.get_or_insert(t);
        }
        if line.contains(needle) {
            ready = Some(t);
        }
    }
    child.wait().map_err(|e| e.to_string())?;
    let exit = start.elapsed().as_secs_f64() * 1e3;
    Ok((
        first.ok_or("no console output")?,
        ready.ok_or(format!("no `{needle}` line"))?,
        exit,
    ))
}

fn ferro_cmd(vmm: &Path, guest: &Path, extra: &str) -> Command {
    let mut c = Command::new(vmm);
    c.args([
        "--vcpus", "2", "--memory", "128", "--serial", "stdout", "--kernel",
    ])
    .arg(guest)
    .args(["--cmdline", &format!("console=ttyS0 {extra}")]);
    c
}

/// Firecracker's config for the same guest, written under a temp dir.
fn firecracker_config(guest: &Path) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("ferro-bench-fc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let cfg = dir.join("vm.json");
    // Firecracker logs to stdout unless told otherwise; keep its log out of
    // the console stream we time.
    let log = dir.join("firecracker.log");
    File::create(&log).map_err(|e| e.to_string())?;
    let body = json!({
        "boot-source": {"kernel_image_path": guest, "boot_args": "console=ttyS0 ferro.exit=reboot"},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 128},
        "drives": [], "network-interfaces": [],
        "logger": {"log_path": log, "level": "Warning"}
    });
    std::fs::write(&cfg, body.to_string()).map_err(|e| e.to_string())?;
    Ok(cfg)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    percentile(&v, 0.5)
}

/// Boot times of ferro-vmm and, when given, of Firecracker on the same
/// guest; runs of the two alternate so machine drift hits both alike.
fn bench_boot(vmm: &Path, guest: &Path, runs: usize, peer: Option<&Path>) -> Result<Value> {
    let peer_cfg = peer.map(|_| firecracker_config(guest)).transpose()?;
    let (mut first, mut ready, mut exit, mut peer_first) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let (f, r, e) = time_boot(ferro_cmd(vmm, guest, "ferro.exit=reboot"), "devices ready")?;
        first.push(f);
        ready.push(r);
        exit.push(e);
        if let (Some(fc), Some(cfg)) = (peer, &peer_cfg) {
            let mut c = Command::new(fc);
            c.args(["--no-api", "--config-file"]).arg(cfg);
            let (f, _, _) = time_boot(c, "ferro-guest: hello")?;
            peer_first.push(f);
        }
    }
    let mut out = json!({
        "first_line_ms": stats(first.clone()),
        "devices_ready_ms": stats(ready.clone()),
        "exit_ms": stats(exit),
    });
    println!(
        "boot: first guest line median {:.1} ms p90 {:.1} ms; devices ready median {:.1} ms p90 {:.1} ms ({runs} runs)",
        out["first_line_ms"]["median"].as_f64().unwrap(),
        out["first_line_ms"]["p90"].as_f64().unwrap(),
        out["devices_ready_ms"]["median"].as_f64().unwrap(),
        out["devices_ready_ms"]["p90"].as_f64().unwrap(),
    );
    if !peer_first.is_empty() {
        let ratio = median(&first) / median(&peer_first);
        println!(
            "boot: firecracker first guest line median {:.1} ms (same guest, alternating runs); ferro/firecracker = {ratio:.2} (target <= 1.00)",
            median(&peer_first)
        );
        out["peer_firecracker_first_line_ms"] = stats(peer_first);
        out["ratio_vs_firecracker"] = json!(ratio);
    }
    Ok(out)
}

fn control(sock: &Path, req: &str) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("control socket: {e}")),
        }
    };
    writeln!(s, "{req}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Ok(line)
}

/// RSS of the process beyond the guest memory it has touched.
fn bench_memory(vmm: &Path, guest: &Path) -> Result<Value> {
    let dir = std::env::temp_dir().join(format!("ferro-bench-mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sock = dir.join("ctl.sock");
    let console = dir.join("console.log");
    let mut child = Command::new(vmm)
        .args(["--vcpus", "2", "--memory", "256", "--kernel"])
        .arg(guest)
        .args(["--cmdline", "console=ttyS0 ferro.exit=idle", "--serial"])
        .arg(format!("file:{}", console.display()))
        .arg("--control-socket")
        .arg(&sock)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("selftest done")
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err("guest did not finish its self-test".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", child.id()))
        .map_err(|e| e.to_string())?;
    let (mut total_kb, mut guest_kb, mut in_guest) = (0u64, 0u64, false);
    for line in smaps.lines() {
        let mut it = line.split_whitespace();
        match (it.next(), it.next()) {
            (Some("Size:"), Some(v)) => in_guest = v.parse::<u64>().unwrap_or(0) == 256 * 1024,
            (Some("Rss:"), Some(v)) => {
                let kb: u64 = v.parse().unwrap_or(0);
                total_kb += kb;
                if in_guest {
                    guest_kb += kb;
                }
            }
            _ => {}
        }
    }
    control(&sock, r#"{"op":"stop"}"#)?;
    let _ = child.wait();
    let overhead = (total_kb - guest_kb) as f64 / 1024.0;
    println!(
        "memory: VMM RSS {:.1} MiB, guest memory touched {:.1} MiB, overhead {overhead:.2} MiB (target <= 5 MiB, 256 MiB guest)",
        total_kb as f64 / 1024.0,
        guest_kb as f64 / 1024.0
    );
    Ok(
        json!({"rss_mib": total_kb as f64 / 1024.0, "guest_touched_mib": guest_kb as f64 / 1024.0, "overhead_mib": overhead}),
    )
}

const DEPTH: usize = 32;
const FILE_SIZE: u64 = 256 << 20;

/// Requests per second of the device model and of the host on the same I/O.
fn blk_case(
    path: &Path,
    write: bool,
    size: u32,
    sequential: bool,
    secs: f64,
) -> Result<(f64, f64)> {
    let mut h = BlockHarness::new(path, false, DEPTH, size as usize).map_err(|e| e.to_string())?;
    let file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    let blocks = FILE_SIZE / u64::from(size);
    let offset = |rng: &mut Rng, i: u64| {
        if sequential {
            (i % blocks) * u64::from(size)
        } else {
            (rng.next() % blocks) * u64::from(size)
        }
    };
    // The two sides run in alternating batches, so drift (CPU frequency,
    // other load) hits both alike. Each side draws its own offsets from the
    // same distribution: reading what the other just read would find it in
    // the CPU cache. On the
    // device side only its work (`run`) is timed: queuing the requests is
    // the guest driver's work. The host reads into as many buffers as the
    // device model has data slots.
    let mut bufs = vec![vec![0x5au8; size as usize]; DEPTH];
    let (mut rng, mut host_rng, mut done) = (Rng(0x9e37_79b9), Rng(0x2545_f491), 0u64);
    let (mut dev_busy, mut host_busy) = (Duration::ZERO, Duration::ZERO);
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < 2.0 * secs {
        let offs: Vec<u64> = (0..DEPTH)
            .map(|i| offset(&mut rng, done + i as u64))
            .collect();
        for (slot, off) in offs.iter().enumerate() {
            if write {
                h.push_write(slot, off / 512, size);
            } else {
                h.push_read(slot, off / 512, size);
            }
        }
        let t = Instant::now();
        h.process();
        dev_busy += t.elapsed();
        let c = h.completions();
        if c.len() != DEPTH || c.iter().any(|(_, _, st)| *st != 0) {
            return Err("device model returned an error status".into());
        }
        let host_offs: Vec<u64> = (0..DEPTH)
            .map(|i| offset(&mut host_rng, done + i as u64 + blocks / 2))
            .collect();
        let t = Instant::now();
        for (buf, off) in bufs.iter_mut().zip(&host_offs) {
            if write {
                file.write_all_at(buf, *off).map_err(|e| e.to_string())?;
            } else {
                file.read_exact_at(buf, *off).map_err(|e| e.to_string())?;
            }
        }
        host_busy += t.elapsed();
        done += DEPTH as u64;
    }
    let dev = done as f64 / dev_busy.as_secs_f64();
    let host = done as f64 / host_busy.as_secs_f64();
    Ok((dev, host))
}

fn bench_blk() -> Result<Value> {
    let path = std::env::temp_dir().join(format!("ferro-bench-blk-{}.img", std::process::id()));
    {
        let f = File::create(&path).map_err(|e| e.to_string())?;
        let chunk = vec![0xa5u8; 1 << 20];
        for i in 0..(FILE_SIZE >> 20) {
            f.write_all_at(&chunk, i << 20).map_err(|e| e.to_string())?;
        }
    }
    let mut out = json!({});
    for (name, write, size, seq) in [
        ("randread_4k", false, 4096u32, false),
        ("randwrite_4k", true, 4096, false),
        ("seqread_1m", false, 1 << 20, true),
    ] {
        let (dev, host) = blk_case(&path, write, size, seq, 2.0)?;
        let mib = |r: f64| r * f64::from(size) / (1 << 20) as f64;
        let ratio = dev / host;
        println!(
            "virtio-blk {name} qd{DEPTH}: device {dev:.0} req/s ({:.0} MiB/s), host {host:.0} req/s ({:.0} MiB/s), ratio {ratio:.2} (target >= 0.80)",
            mib(dev),
            mib(host)
        );
        out[name] = json!({"device_rps": dev, "device_mibps": mib(dev), "host_rps": host, "host_mibps": mib(host), "ratio": ratio});
    }
    let _ = std::fs::remove_file(&path);
    Ok(out)
}

const FRAME_LEN: usize = 1514;
const VNET_HDR_LEN: usize = 12;

/// An AF_PACKET socket bound to one interface, to inject frames that then
/// come out of the TAP's file descriptor.
struct PacketSocket {
    fd: std::os::fd::OwnedFd,
    addr: libc::sockaddr_ll,
}

impl PacketSocket {
    fn bind(ifname: &str) -> Result<Self> {
        let name = std::ffi::CString::new(ifname).map_err(|e| e.to_string())?;
        // SAFETY: a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(format!("no interface {ifname}"));
        }
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if raw < 0 {
            return Err(format!(
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        Ok(Self { fd, addr })
    }

    fn send(&self, frame: &[u8]) -> Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: the buffer and address are valid for the given lengths.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&self.addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(format!("sendto: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

fn test_frame() -> Vec<u8> {
    let mut f = vec![0u8; FRAME_LEN];
    f[..6].copy_from_slice(&[0x06, 0xfe, 0, 0, 0, 0x99]); // nobody's MAC: dropped by the host
    f[6..12].copy_from_slice(&[0x06, 0xfe, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f
}

/// Frames/s through the virtio-net device model to and from a TAP, next to
/// the host writing and reading the same frames on the same TAP descriptor.
fn bench_net(secs: f64) -> Result<Value> {
    let name = format!("fbn{}", std::process::id() % 100_000);
    let tap = Arc::new(Tap::open(&name).map_err(|e| format!("{e}"))?);
    sh(Command::new("ip").args(["link", "set", &name, "up"]))?;
    let frame = test_frame();
    let mut with_hdr = vec![0u8; VNET_HDR_LEN];
    with_hdr.extend_from_slice(&frame);
    let batch = NET_HARNESS_SLOTS;
    let mut h = NetHarness::new(tap.clone());

    // Each direction alternates device and host batches so drift hits both
    // alike; on the device side only the device's work is timed.
    let (mut dev_tx, mut host_tx) = (Duration::ZERO, Duration::ZERO);
    let (mut tx_frames, start) = (0u64, Instant::now());
    while start.elapsed().as_secs_f64() < 2.0 * secs {
        for _ in 0..batch {
            h.push_tx(&with_hdr);
        }
        let t = Instant::now();
        h.process_tx();
        dev_tx += t.elapsed();
        if h.tx_completions() != batch {
            return Err("device model did not complete every tx chain".into());
        }
        let t = Instant::now();
        for _ in 0..batch {
            tap.write_frame(&with_hdr).map_err(|e| e.to_string())?;
        }
        host_tx += t.elapsed();
        tx_frames += batch as u64;
    }

    // TAP -> guest: frames injected on the interface come out of the TAP
    // descriptor, read by the device model into posted buffers or by the
    // host directly.
    let inject = PacketSocket::bind(&name)?;
    let mut buf = vec![0u8; 65_536];
    while tap.read_frame(&mut buf).is_ok() {}
    let (mut dev_rx, mut host_rx) = (Duration::ZERO, Duration::ZERO);
    let (mut dev_got, mut host_got, start) = (0u64, 0u64, Instant::now());
    while start.elapsed().as_secs_f64() < 2.0 * secs {
        for _ in 0..batch {
            inject.send(&frame)?;
        }
        h.post_rx(batch);
        let t = Instant::now();
        h.process_rx();
        dev_rx += t.elapsed();
        dev_got += h.rx_frames().len() as u64;
        for _ in 0..batch {
            inject.send(&frame)?;
        }
        let t = Instant::now();
        while tap.read_frame(&mut buf).is_ok() {
            host_got += 1;
        }
        host_rx += t.elapsed();
    }
    let fps = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
    let (dev_tx, host_tx) = (fps(tx_frames, dev_tx), fps(tx_frames, host_tx));
    let (dev_rx, host_rx) = (fps(dev_got, dev_rx), fps(host_got, host_rx));
    drop(h);
    drop(tap);
    let _ = Command::new("ip").args(["link", "del", &name]).output();
    println!(
        "virtio-net tx (guest->TAP) {FRAME_LEN}-byte frames: device {dev_tx:.0} frames/s, host write {host_tx:.0} frames/s, ratio {:.2}",
        dev_tx / host_tx
    );
    println!(
        "virtio-net rx (TAP->guest) {FRAME_LEN}-byte frames: device {dev_rx:.0} frames/s, host read {host_rx:.0} frames/s, ratio {:.2}",
        dev_rx / host_rx
    );
    Ok(json!({
        "frame_bytes": FRAME_LEN,
        "tx": {"device_fps": dev_tx, "host_fps": host_tx, "ratio": dev_tx / host_tx},
        "rx": {"device_fps": dev_rx, "host_fps": host_rx, "ratio": dev_rx / host_rx},
    }))
}

/// Entry point for `cargo xtask bench vmm`.
pub fn run(args: &[String]) -> Result<()> {
    let mut runs = 10;
    let mut peer = None;
    let mut only: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--runs needs a number")?
            }
            "--only" => {
                only = Some(
                    it.next()
                        .ok_or("--only needs boot|memory|blk|net|linux")?
                        .clone(),
                )
            }
            "--peer-firecracker" => {
                peer = Some(PathBuf::from(
                    it.next().ok_or("--peer-firecracker needs a path")?,
                ))
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let root = root();
    sh(Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "ferro-vmm",
            "-p",
            "ferro-linux-guest",
        ])
        .current_dir(&root))?;
    let vmm = root.join("target/release/ferro-vmm");
    let guest = PathBuf::from(
        sh(Command::new("bash").arg(root.join("tests/guest/build.sh")))?
            .lines()
            .last()
            .unwrap_or_default(),
    );
    let want = |area: &str| only.as_deref().is_none_or(|o| o == area);
    let mut report = json!({});
    if want("boot") {
        report["boot"] = bench_boot(&vmm, &guest, runs, peer.as_deref())?;
    }
    if want("memory") {
        report["memory"] = bench_memory(&vmm, &guest)?;
    }
    if want("blk") {
        report["virtio_blk"] = bench_blk()?;
    }
    if want("net") {
        report["virtio_net"] = bench_net(2.0)?;
    }
    // Stock Linux inside the Linux-guest harness: minutes of emulated time,
    // so only when asked for by name.
    if only.as_deref() == Some("linux") {
        let ctl = root.join("target/release/ferro-vmmctl");
        report["linux"] = crate::bench_linux::bench(&root, &vmm, &ctl, peer.as_deref(), runs)?;
    }
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let file = out.join("vmm.json");
    std::fs::write(&file, serde_json::to_string_pretty(&report).unwrap())
        .map_err(|e| e.to_string())?;
    println!("results written to {}", file.display());
    Ok(())
}
