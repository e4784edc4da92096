//! `cargo xtask bench blockd [--secs N]`: block volume I/O (issue #13).
//!
//! Six workloads, each on five targets measured in the same run:
//!
//! - `host`: this process doing the same `pread`/`pwrite` on a file on the
//!   same filesystem (the baseline);
//! - `local_file`: the virtio-blk device model over a file (ferro-vmm's
//!   `--disk` path today), driven through [`BlockHarness`] in process;
//! - `vhost_1_replica`: a real `ferro-blockd --volume` process serving a
//!   file, reached over vhost-user by ferro-vmm's own frontend
//!   ([`VhostUserBlkHarness`]: memfd guest memory, kick and call eventfds);
//! - `vhost_2_replicas`, `vhost_3_replicas`: the same frontend to a primary
//!   [`ReplicatedStore`] (local copy plus one or two backups), each "host"
//!   a process in its own network namespace, primary and backups joined by
//!   veth pairs the bench creates and removes (traffic never leaves them).
//!
//! There is no controller here: the primary and the backups are blockd's
//! library run by this binary in child processes (`xtask __blockd-role`),
//! the backups at a fixed epoch and the primary with an [`Authority`] that
//! refuses every removal: a backup failing mid-run fences the primary, the
//! guest I/O fails and the bench stops with an error rather than measuring
//! a degraded volume. Production fencing is untouched.
//!
//! Workloads: 4 KiB random read and write at QD1 (p50/p99 latency of each
//! request, submission to completion) and at QD32 (IOPS), 1 MiB sequential
//! read and write at QD32 (MiB/s). Writes are not flushed. By default every
//! file is read and written with direct I/O (`O_DIRECT`): blockd's replica
//! files as in production, and the host baseline through an `io_uring` that
//! keeps the workload's depth in flight, replacing each completion as it
//! comes (as `fio --direct=1 --ioengine=io_uring` does). `--buffered` runs
//! every target through the page cache instead, the host one request after
//! another, and writes `blockd-buffered.json`. Every file is written in
//! full first, so no target reads holes.
//!
//! Fairness: targets take turns in short slices, round after round, so
//! drift (CPU frequency, other load) hits all alike. The device-model
//! target runs in this process and is timed around push, `process` and
//! collecting completions: it has no eventfd hops, where the vhost-user
//! targets include the kick and call eventfds and ferro-vmm's connection
//! thread, as a guest would see them. blockd executes the requests of one
//! queue pass as a batch and completes them together, so at depth it keeps
//! the disk less busy than the host's ring (the gap the QD32 ratios show).
//! On a 2-core machine the 2- and 3-replica targets run three or four busy
//! processes on two cores: their ratios include that contention.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferro_blockd::direct::AlignedBuf;
use ferro_blockd::replica::{Replica, ReplicaServer};
use ferro_blockd::replication::{Authority, Backup, Fenced, Options, ReplicatedStore};
use ferro_blockd::server::Volume;
use ferro_blockd::store::{IoMode, LocalFile, Store};
use ferro_virtio::testing::{BlockHarness, VhostUserBlkHarness};
use io_uring::{opcode, types, IoUring};
use serde_json::{json, Value};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::measure::{percentile, root, target_dir, Rng};

type Result<T> = std::result::Result<T, String>;

/// Size of every volume and file.
const FILE_SIZE: u64 = 256 << 20;
/// Deepest queue used (and data slots of each harness).
const DEPTH: usize = 32;
/// Largest request.
const MAX_IO: usize = 1 << 20;
/// The epoch the bench's replicas hold.
const EPOCH: u64 = 1;
/// Longest wait for one completion before the bench gives up.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// One target's turn.
const SLICE: Duration = Duration::from_millis(25);

struct Workload {
    name: &'static str,
    write: bool,
    size: u32,
    sequential: bool,
    depth: usize,
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "randread_4k_qd1",
        write: false,
        size: 4096,
        sequential: false,
        depth: 1,
    },
    Workload {
        name: "randwrite_4k_qd1",
        write: true,
        size: 4096,
        sequential: false,
        depth: 1,
    },
    Workload {
        name: "randread_4k_qd32",
        write: false,
        size: 4096,
        sequential: false,
        depth: DEPTH,
    },
    Workload {
        name: "randwrite_4k_qd32",
        write: true,
        size: 4096,
        sequential: false,
        depth: DEPTH,
    },
    Workload {
        name: "seqread_1m_qd32",
        write: false,
        size: 1 << 20,
        sequential: true,
        depth: DEPTH,
    },
    Workload {
        name: "seqwrite_1m_qd32",
        write: true,
        size: 1 << 20,
        sequential: true,
        depth: DEPTH,
    },
];

/// Requests per batch within a slice.
fn batch(w: &Workload) -> usize {
    if w.depth == 1 {
        8
    } else if w.size >= 1 << 20 {
        DEPTH
    } else {
        4 * DEPTH
    }
}

/// Where each target's next request goes: its own random stream and its
/// own sequential cursor.
struct Offsets {
    rng: Rng,
    cursor: u64,
}

impl Offsets {
    fn new(seed: u64) -> Self {
        Offsets {
            rng: Rng(seed | 1),
            cursor: 0,
        }
    }

    fn next(&mut self, w: &Workload) -> u64 {
        let size = u64::from(w.size);
        let blocks = FILE_SIZE / size;
        let block = if w.sequential {
            self.cursor += 1;
            self.cursor % blocks
        } else {
            self.rng.next() % blocks
        };
        block * size
    }
}

/// One thing the workloads run against.
trait Target {
    /// Runs `n` requests of `w` at its depth; pushes each request's
    /// latency (µs) at QD1; returns the busy time.
    fn run(&mut self, w: &Workload, n: usize, lat: &mut Vec<f64>) -> Result<Duration>;
}

/// The host doing the same I/O on a file: with direct I/O, `O_DIRECT` and
/// at depth an `io_uring` keeping that many requests in flight (as `fio
/// --direct=1 --ioengine=io_uring` would); through the page cache, one
/// request after another (see the module docs).
struct Host {
    file: File,
    bufs: Vec<AlignedBuf>,
    at: Offsets,
    ring: Option<IoUring>,
}

impl Host {
    /// Pushes request `slot` of `w` onto the ring.
    fn push(&mut self, w: &Workload, slot: usize) -> Result<()> {
        let ring = self.ring.as_mut().expect("a ring");
        let off = self.at.next(w);
        let fd = types::Fd(self.file.as_raw_fd());
        let buf = self.bufs[slot].as_ptr().cast_mut();
        let entry = if w.write {
            opcode::Write::new(fd, buf, w.size).offset(off).build()
        } else {
            opcode::Read::new(fd, buf, w.size).offset(off).build()
        };
        // SAFETY: slot `slot`'s buffer is this target's, at least `size`
        // bytes, and not touched again until its completion is reaped.
        unsafe { ring.submission().push(&entry.user_data(slot as u64)) }
            .map_err(|_| "host: submission queue full".to_string())
    }

    /// Sustained depth on the ring: every completion is replaced by a new
    /// request on its slot until `n` were submitted.
    fn run_ring(&mut self, w: &Workload, n: usize) -> Result<Duration> {
        let start = Instant::now();
        let mut submitted = w.depth.min(n);
        for slot in 0..submitted {
            self.push(w, slot)?;
        }
        let mut completed = 0;
        while completed < n {
            let ring = self.ring.as_mut().expect("a ring");
            ring.submit_and_wait(1)
                .map_err(|e| format!("host: io_uring: {e}"))?;
            let done: Vec<(usize, i32)> = ring
                .completion()
                .map(|c| (c.user_data() as usize, c.result()))
                .collect();
            for (slot, res) in done {
                if res != w.size as i32 {
                    return Err(format!("host: I/O returned {res}, not {}", w.size));
                }
                completed += 1;
                if submitted < n {
                    self.push(w, slot)?;
                    submitted += 1;
                }
            }
        }
        Ok(start.elapsed())
    }
}

impl Target for Host {
    fn run(&mut self, w: &Workload, n: usize, lat: &mut Vec<f64>) -> Result<Duration> {
        if w.depth > 1 && self.ring.is_some() {
            return self.run_ring(w, n);
        }
        let size = w.size as usize;
        let start = Instant::now();
        for i in 0..n {
            let off = self.at.next(w);
            let buf = &mut self.bufs[i % DEPTH][..size];
            let t = Instant::now();
            if w.write {
                self.file.write_all_at(buf, off)
            } else {
                self.file.read_exact_at(buf, off)
            }
            .map_err(|e| format!("host I/O: {e}"))?;
            if w.depth == 1 {
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(start.elapsed())
    }
}

/// The virtio-blk device model over a file, in process.
struct DeviceModel {
    h: BlockHarness,
    at: Offsets,
}

impl Target for DeviceModel {
    fn run(&mut self, w: &Workload, n: usize, lat: &mut Vec<f64>) -> Result<Duration> {
        let mut busy = Duration::ZERO;
        let mut done = 0;
        while done < n {
            let k = w.depth.min(n - done);
            let offs: Vec<u64> = (0..k).map(|_| self.at.next(w)).collect();
            let t = Instant::now();
            for (slot, off) in offs.iter().enumerate() {
                if w.write {
                    self.h.push_write(slot, off / 512, w.size);
                } else {
                    self.h.push_read(slot, off / 512, w.size);
                }
            }
            self.h.process();
            let c = self.h.completions();
            let took = t.elapsed();
            if c.len() != k || c.iter().any(|(_, _, st)| *st != 0) {
                return Err("the device model returned an error status".into());
            }
            if w.depth == 1 {
                lat.push(took.as_secs_f64() * 1e6);
            }
            busy += took;
            done += k;
        }
        Ok(busy)
    }
}

/// A volume served over vhost-user, through ferro-vmm's frontend.
struct Vhost {
    name: &'static str,
    h: VhostUserBlkHarness,
    at: Offsets,
}

impl Vhost {
    fn push(&mut self, w: &Workload, slot: usize) {
        let sector = self.at.next(w) / 512;
        if w.write {
            self.h.push_write(slot, sector, w.size);
        } else {
            self.h.push_read(slot, sector, w.size);
        }
    }

    fn check(&self, c: &[(usize, u32, u8)]) -> Result<()> {
        if c.iter().any(|(_, _, st)| *st != 0) {
            return Err(format!(
                "{}: the volume returned an I/O error (a replicated volume fails its I/O once a \
                 backup fails: the bench's authority removes no replica; see the logs)",
                self.name
            ));
        }
        Ok(())
    }
}

impl Target for Vhost {
    fn run(&mut self, w: &Workload, n: usize, lat: &mut Vec<f64>) -> Result<Duration> {
        let name = self.name;
        let io = |e: std::io::Error| format!("{name}: {e}");
        let start = Instant::now();
        if w.depth == 1 {
            for _ in 0..n {
                let t = Instant::now();
                self.push(w, 0);
                self.h.kick().map_err(io)?;
                let c = self.h.wait(IO_TIMEOUT).map_err(io)?;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
                self.check(&c)?;
            }
            return Ok(start.elapsed());
        }
        // Sustained depth: every completion is replaced by a new request
        // on its slot until `n` were submitted.
        let mut submitted = w.depth.min(n);
        for slot in 0..submitted {
            self.push(w, slot);
        }
        self.h.kick().map_err(io)?;
        let mut completed = 0;
        while completed < n {
            let c = self.h.wait(IO_TIMEOUT).map_err(io)?;
            self.check(&c)?;
            completed += c.len();
            let mut pushed = false;
            for (slot, _, _) in c {
                if submitted < n {
                    self.push(w, slot);
                    submitted += 1;
                    pushed = true;
                }
            }
            if pushed {
                self.h.kick().map_err(io)?;
            }
        }
        Ok(start.elapsed())
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    sh(Command::new("ip").args(args))
}

/// The bench's network namespaces, removed on drop (which takes their
/// veths with them).
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Host A (the primary) and hosts B and C (backups), each a namespace;
/// A reaches B on 10.213.1.0/30 and C on 10.213.2.0/30 over veth pairs
/// made inside the namespaces. Returns the namespaces and the backups'
/// addresses.
fn network() -> Result<(Netns, [String; 2])> {
    let tag = std::process::id() % 100_000;
    let names: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|h| format!("fbb{tag}{h}"))
        .collect();
    let mut ns = Netns(Vec::new());
    for n in &names {
        ip(&["netns", "add", n])?;
        ns.0.push(n.clone());
        ip(&["-n", n, "link", "set", "lo", "up"])?;
    }
    let a = &names[0];
    let mut addrs = [String::new(), String::new()];
    for (i, b) in names[1..].iter().enumerate() {
        let net = i + 1;
        let (here, there) = (format!("to{}", ["b", "c"][i]), "toa".to_string());
        ip(&[
            "-n", a, "link", "add", &here, "type", "veth", "peer", "name", &there, "netns", b,
        ])?;
        ip(&[
            "-n",
            a,
            "addr",
            "add",
            &format!("10.213.{net}.1/30"),
            "dev",
            &here,
        ])?;
        ip(&[
            "-n",
            b,
            "addr",
            "add",
            &format!("10.213.{net}.2/30"),
            "dev",
            &there,
        ])?;
        ip(&["-n", a, "link", "set", &here, "up"])?;
        ip(&["-n", b, "link", "set", &there, "up"])?;
        addrs[i] = format!("10.213.{net}.2:7400");
    }
    Ok((ns, addrs))
}

/// Writes `path` in full (so nothing reads holes) and syncs it, so the
/// writeback does not land in the middle of the measures.
fn prefill(path: &Path) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let f = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let chunk = vec![0xa5u8; 1 << 20];
    for i in 0..(FILE_SIZE >> 20) {
        f.write_all_at(&chunk, i << 20)
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))
}

/// Starts `cmd` with its stderr in `log` and waits for the line `ready`
/// on its stdout.
fn start_ready(mut cmd: Command, log: &Path, what: &str) -> Result<Proc> {
    let err = File::create(log).map_err(|e| e.to_string())?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let out = child.stdout.take().expect("piped stdout");
    let proc = Proc(child);
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.trim() != "ready" {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        return Err(format!("{what} did not start:\n{log}"));
    }
    Ok(proc)
}

fn wait_socket(socket: &Path, proc: &mut Proc, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Ok(Some(st)) = proc.0.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!("ferro-blockd exited ({st}):\n{log}"));
        }
        if Instant::now() > deadline {
            return Err(format!("ferro-blockd never bound {}", socket.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The 1-minute load average (other work on the machine skews the
/// figures; recorded beside them).
fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Per workload, per target: the measures.
fn measure(targets: &mut [(&str, &mut dyn Target)], secs: f64, only: &[String]) -> Result<Value> {
    let mut out = json!({});
    for w in WORKLOADS.iter().filter(|w| selected(w, only)) {
        let mut lat: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
        let mut busy = vec![Duration::ZERO; targets.len()];
        let mut count = vec![0usize; targets.len()];
        let (start, n) = (Instant::now(), batch(w));
        let mut round = 0;
        while start.elapsed().as_secs_f64() < secs {
            // Each round starts with the next target, so none always runs
            // right after the same other one (whose writeback, say, it
            // would pay for).
            for k in 0..targets.len() {
                let i = (round + k) % targets.len();
                let slice = Instant::now();
                while slice.elapsed() < SLICE {
                    busy[i] += targets[i].1.run(w, n, &mut lat[i])?;
                    count[i] += n;
                }
            }
            round += 1;
        }
        let mut per = json!({});
        for (i, (name, _)) in targets.iter().enumerate() {
            let rate = count[i] as f64 / busy[i].as_secs_f64();
            let mut m = json!({
                "requests": count[i],
                "iops": rate,
                "mibps": rate * f64::from(w.size) / f64::from(1 << 20),
            });
            if w.depth == 1 {
                let v = &mut lat[i];
                v.sort_by(|a, b| a.total_cmp(b));
                m["p50_us"] = json!(percentile(v, 0.5));
                m["p99_us"] = json!(percentile(v, 0.99));
            }
            per[*name] = m;
        }
        out[w.name] = per;
    }
    Ok(out)
}

const TARGETS: [&str; 5] = [
    "host",
    "local_file",
    "vhost_1_replica",
    "vhost_2_replicas",
    "vhost_3_replicas",
];

/// The figure each workload is judged by: p50 latency at QD1, IOPS at
/// QD32 (4 KiB), MiB/s for 1 MiB.
fn key(w: &Workload) -> (&'static str, &'static str) {
    if w.depth == 1 {
        ("p50_us", "µs p50, lower is better")
    } else if w.size >= 1 << 20 {
        ("mibps", "MiB/s")
    } else {
        ("iops", "IOPS")
    }
}

/// Whether `--only` (empty: every workload) names `w`.
fn selected(w: &Workload, only: &[String]) -> bool {
    only.is_empty() || only.iter().any(|o| o == w.name)
}

/// Prints the table and the targets; adds the ratios to `r`.
fn report(r: &mut Value) -> Value {
    let f = |r: &Value, w: &str, t: &str, k: &str| r[w][t][k].as_f64().unwrap_or(f64::NAN);
    for w in &WORKLOADS {
        if r.get(w.name).is_none() {
            continue;
        }
        let (k, unit) = key(w);
        println!("{} ({unit}):", w.name);
        let host = f(r, w.name, "host", k);
        let one = f(r, w.name, "vhost_1_replica", k);
        for t in TARGETS {
            let v = f(r, w.name, t, k);
            let extra = if w.depth == 1 {
                format!(" (p99 {:.1})", f(r, w.name, t, "p99_us"))
            } else if w.size >= 1 << 20 {
                format!(" ({:.0} req/s)", f(r, w.name, t, "iops"))
            } else {
                String::new()
            };
            println!(
                "  {t:<17} {v:>10.1}{extra}; vs host {:.2}, vs 1-replica {:.2}",
                v / host,
                v / one
            );
            r[w.name][t]["ratio_vs_host"] = json!(v / host);
            r[w.name][t]["ratio_vs_1_replica"] = json!(v / one);
        }
    }
    let mut targets = Vec::new();
    let mut target = |name: String, ratio: f64, min: Option<f64>, max: Option<f64>| {
        if ratio.is_nan() {
            return println!("target: {name}: not measured (--only)");
        }
        let met = min.is_none_or(|m| ratio >= m) && max.is_none_or(|m| ratio <= m);
        let bound = match (min, max) {
            (Some(m), _) => format!(">= {m:.2}"),
            (_, Some(m)) => format!("<= {m:.2}"),
            _ => String::new(),
        };
        println!(
            "target: {name} = {ratio:.3} (target {bound}: {})",
            if met { "met" } else { "MISSED" }
        );
        targets.push(json!({"name": name, "ratio": ratio, "target": bound, "met": met}));
    };
    for w in ["randread_4k_qd32", "randwrite_4k_qd32"] {
        target(
            format!("1-replica vhost-user / host, {w} IOPS"),
            f(r, w, "vhost_1_replica", "iops") / f(r, w, "host", "iops"),
            Some(0.80),
            None,
        );
    }
    for t in ["vhost_2_replicas", "vhost_3_replicas"] {
        let n = &t[6..7];
        let w = "randwrite_4k_qd1";
        target(
            format!("{n}-replica / 1-replica, {w} p50 latency"),
            f(r, w, t, "p50_us") / f(r, w, "vhost_1_replica", "p50_us"),
            None,
            Some(2.0),
        );
        let w = "randwrite_4k_qd32";
        target(
            format!("{n}-replica / 1-replica, {w} IOPS"),
            f(r, w, t, "iops") / f(r, w, "vhost_1_replica", "iops"),
            Some(0.50),
            None,
        );
    }
    json!(targets)
}

/// Entry point for `cargo xtask bench blockd`.
pub fn run(args: &[String]) -> Result<()> {
    let mut secs = 8.0;
    let mut only = Vec::new();
    let mut io = IoMode::Direct;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => {
                secs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|s: &f64| *s > 0.0)
                    .ok_or("--secs needs a positive number")?
            }
            "--only" => {
                let names = it.next().ok_or("--only needs workload names")?;
                for n in names.split(',') {
                    if !WORKLOADS.iter().any(|w| w.name == n) {
                        let all: Vec<&str> = WORKLOADS.iter().map(|w| w.name).collect();
                        return Err(format!(
                            "--only: no workload {n:?} (workloads: {})",
                            all.join(", ")
                        ));
                    }
                    only.push(n.to_string());
                }
            }
            "--buffered" => io = IoMode::Buffered,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("needs root (network namespaces for the replicated volumes)".into());
    }
    let root = root();
    let target = target_dir();
    // FERRO_BENCH_BLOCKD: a ferro-blockd binary to use instead of building
    // the release one (to try the bench itself out quickly).
    let blockd = match std::env::var_os("FERRO_BENCH_BLOCKD") {
        Some(p) => PathBuf::from(p),
        None => {
            sh(Command::new("cargo")
                .args(["build", "--release", "-p", "ferro-blockd"])
                .current_dir(&root))?;
            target.join("release/ferro-blockd")
        }
    };
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = target.join(format!("tmp/bench-blockd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = bench(&dir, &blockd, &me, secs, &only, io);
    let _ = std::fs::remove_dir_all(&dir);
    let mut report_json = result?;
    let targets = report(&mut report_json["workloads"]);
    report_json["targets"] = targets;
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let file = out.join(match io {
        IoMode::Direct => "blockd.json",
        IoMode::Buffered => "blockd-buffered.json",
    });
    std::fs::write(&file, serde_json::to_string_pretty(&report_json).unwrap())
        .map_err(|e| e.to_string())?;
    println!("results written to {}", file.display());
    Ok(())
}

fn bench(
    dir: &Path,
    blockd: &Path,
    me: &Path,
    secs: f64,
    only: &[String],
    io: IoMode,
) -> Result<Value> {
    let io_arg = match io {
        IoMode::Direct => "direct",
        IoMode::Buffered => "buffered",
    };
    let t0 = Instant::now();
    let files = [
        "host.img",
        "local.img",
        "r1.vol",
        "a/r2.vol",
        "a/r3.vol",
        "b/r2.vol",
        "b/r3.vol",
        "c/r3.vol",
    ];
    for f in files {
        prefill(&dir.join(f))?;
    }
    let size = FILE_SIZE.to_string();
    // Declared first so it goes last, after the processes in it.
    let (ns, [addr_b, addr_c]) = network()?;
    let backup = |host: &str, ns: &str, addr: &str, vols: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(me)
            .args(["__blockd-role", "backup", "--io", io_arg, "--dir"])
            .arg(dir.join(host))
            .args(["--listen", addr]);
        for v in vols {
            c.args(["--vol", &format!("{v}:{size}")]);
        }
        let log = dir.join(format!("backup-{host}.log"));
        start_ready(c, &log, &format!("backup {host}"))
    };
    let _b = backup("b", &ns.0[1], &addr_b, &["r2", "r3"])?;
    let _c = backup("c", &ns.0[2], &addr_c, &["r3"])?;
    let vol = |id: &str, backups: &str| {
        format!(
            "{id},{},{size},{},{backups}",
            dir.join(format!("a/{id}.vol")).display(),
            dir.join(format!("{id}.sock")).display()
        )
    };
    let mut primary = Command::new("ip");
    primary
        .args(["netns", "exec", &ns.0[0]])
        .arg(me)
        .args(["__blockd-role", "primary", "--io", io_arg])
        .args(["--vol", &vol("r2", &format!("b@{addr_b}"))])
        .args(["--vol", &vol("r3", &format!("b@{addr_b}+c@{addr_c}"))]);
    let _a = start_ready(primary, &dir.join("primary-a.log"), "primary a")?;
    let r1_sock = dir.join("r1.sock");
    let r1_log = dir.join("blockd-r1.log");
    let mut r1 = Proc(
        Command::new(blockd)
            .arg("--volume")
            .arg(format!(
                "id=r1,path={},size={size},socket={},io={io_arg}",
                dir.join("r1.vol").display(),
                r1_sock.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&r1_log).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| format!("{}: {e}", blockd.display()))?,
    );
    wait_socket(&r1_sock, &mut r1, &r1_log)?;
    let load_before = loadavg();
    println!(
        "blockd bench: 5 targets ready in {:.1} s (files of {} MiB, {secs} s per workload; \
         load average {load_before:.2}: the vhost-user targets' wake-ups suffer most from other work)",
        t0.elapsed().as_secs_f64(),
        FILE_SIZE >> 20
    );

    let connect = |name: &'static str, sock: &Path, seed: u64| -> Result<Vhost> {
        let h = VhostUserBlkHarness::connect(sock, DEPTH, MAX_IO)
            .map_err(|e| format!("{name}: {}", ferro_blockd::error_chain(&e)))?;
        if h.capacity() != FILE_SIZE / 512 {
            return Err(format!("{name}: capacity {} sectors", h.capacity()));
        }
        Ok(Vhost {
            name,
            h,
            at: Offsets::new(seed),
        })
    };
    let direct = io == IoMode::Direct;
    let host_file = File::options()
        .read(true)
        .write(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(dir.join("host.img"))
        .map_err(|e| format!("host.img: {e}"))?;
    let ring = if direct {
        Some(IoUring::new(DEPTH as u32).map_err(|e| format!("host: io_uring: {e}"))?)
    } else {
        None
    };
    let mut host = Host {
        file: host_file,
        bufs: (0..DEPTH)
            .map(|_| AlignedBuf::copy_of(&[0x5a; MAX_IO]))
            .collect(),
        at: Offsets::new(0x9e37_79b9),
        ring,
    };
    let mut model = DeviceModel {
        h: BlockHarness::new(&dir.join("local.img"), false, DEPTH, MAX_IO)
            .map_err(|e| e.to_string())?,
        at: Offsets::new(0x2545_f491),
    };
    let mut v1 = connect("vhost_1_replica", &r1_sock, 0x1234_5677)?;
    let mut v2 = connect("vhost_2_replicas", &dir.join("r2.sock"), 0x7654_3211)?;
    let mut v3 = connect("vhost_3_replicas", &dir.join("r3.sock"), 0x0bad_cafe)?;
    let mut targets: [(&str, &mut dyn Target); 5] = [
        (TARGETS[0], &mut host),
        (TARGETS[1], &mut model),
        (TARGETS[2], &mut v1),
        (TARGETS[3], &mut v2),
        (TARGETS[4], &mut v3),
    ];
    let workloads = measure(&mut targets, secs, only)?;
    Ok(json!({
        "load_average_1m": {"before": load_before, "after": loadavg()},
        "file_mib": FILE_SIZE >> 20,
        "secs_per_workload": secs,
        "slice_ms": SLICE.as_millis() as u64,
        "network": "primary and backups in network namespaces joined by veth pairs",
        "io": io_arg,
        "workloads": workloads,
    }))
}

/// An authority that never removes a replica: the bench has no
/// controller, and a backup failing must end the run (the primary is then
/// fenced and its I/O fails), not let it go on measuring a smaller set.
struct NoRemoval;

impl Authority for NoRemoval {
    fn remove_replica(
        &self,
        volume: &str,
        epoch: u64,
        replica: &str,
    ) -> std::result::Result<u64, Fenced> {
        eprintln!(
            "bench primary: backup {replica} of {volume} failed at epoch {epoch}; \
             this bench removes no replica, so the volume stops"
        );
        Err(Fenced {
            volume: volume.to_string(),
            epoch,
        })
    }

    /// Never asked: no replica leaves the set, so none is resynced.
    fn add_replica(
        &self,
        volume: &str,
        epoch: u64,
        _replica: &str,
    ) -> std::result::Result<u64, Fenced> {
        Err(Fenced {
            volume: volume.to_string(),
            epoch,
        })
    }
}

/// `xtask __blockd-role backup --dir D --listen ADDR --vol ID:SIZE...`
/// and `xtask __blockd-role primary --vol ID,PATH,SIZE,SOCKET,B@ADDR[+...]...`:
/// the bench's hosts, each run inside its network namespace. Prints
/// `ready` once serving, then serves until killed.
pub fn role(args: &[String]) -> Result<()> {
    let (role, rest) = args.split_first().ok_or("which role?")?;
    let mut dir = None;
    let mut listen = None;
    let mut vols = Vec::new();
    let mut io = IoMode::Direct;
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let v = it.next().ok_or(format!("{a} needs a value"))?;
        match a.as_str() {
            "--dir" => dir = Some(PathBuf::from(v)),
            "--listen" => listen = Some(v.clone()),
            "--vol" => vols.push(v.clone()),
            "--io" if v == "direct" => io = IoMode::Direct,
            "--io" if v == "buffered" => io = IoMode::Buffered,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    match role.as_str() {
        "backup" => {
            let dir = dir.ok_or("--dir")?;
            let replica = Arc::new(Replica::new(&dir));
            for v in &vols {
                let (id, size) = v.split_once(':').ok_or("--vol ID:SIZE")?;
                let size: u64 = size.parse().map_err(|_| "--vol ID:SIZE")?;
                let store = LocalFile::open_or_create_with(&replica.data_path(id), size, io)
                    .map_err(|e| ferro_blockd::error_chain(&e))?;
                replica
                    .open_volume_with(id, Box::new(store))
                    .map_err(|e| ferro_blockd::error_chain(&e))?;
                replica
                    .set_epoch(id, EPOCH)
                    .map_err(|e| ferro_blockd::error_chain(&e))?;
            }
            let server = ReplicaServer::start(replica, listen.ok_or("--listen")?.as_str())
                .map_err(|e| e.to_string())?;
            println!("ready");
            let _server = server;
            loop {
                std::thread::park();
            }
        }
        "primary" => {
            let mut volumes = Vec::new();
            for v in &vols {
                let p: Vec<&str> = v.split(',').collect();
                let [id, path, size, socket, backups] = p[..] else {
                    return Err(format!("--vol {v}: ID,PATH,SIZE,SOCKET,B@ADDR[+...]"));
                };
                let size: u64 = size.parse().map_err(|_| format!("--vol {v}: size"))?;
                let backups = backups
                    .split('+')
                    .map(|b| -> Result<Backup> {
                        let (id, addr) = b.split_once('@').ok_or("B@ADDR")?;
                        Ok(Backup {
                            id: id.to_string(),
                            addr: addr.parse().map_err(|_| format!("bad address {addr}"))?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let local = LocalFile::open_or_create_with(Path::new(path), size, io)
                    .map_err(|e| ferro_blockd::error_chain(&e))?;
                let store = ReplicatedStore::open(
                    id,
                    EPOCH,
                    Box::new(local),
                    &backups,
                    Arc::new(NoRemoval),
                    Options::default(),
                )
                .map_err(|e| ferro_blockd::error_chain(&e))?;
                if store.in_sync().len() != backups.len() {
                    return Err(format!("{id}: not every backup is in sync"));
                }
                let store: Arc<dyn Store> = Arc::new(store);
                volumes.push(
                    Volume::with_store(id, Path::new(socket), store)
                        .map_err(|e| ferro_blockd::error_chain(&e))?,
                );
            }
            let threads: Vec<_> = volumes
                .into_iter()
                .map(|v| std::thread::spawn(move || v.serve()))
                .collect();
            println!("ready");
            for t in threads {
                if let Ok(Err(e)) = t.join() {
                    return Err(ferro_blockd::error_chain(&e));
                }
            }
            Ok(())
        }
        other => Err(format!("unknown role {other}")),
    }
}
