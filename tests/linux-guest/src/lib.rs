//! The Linux-guest harness: stock Linux guests under ferro-vmm on hosts whose
//! own KVM cannot run a guest kernel.
//!
//! On the project's CI machines `/dev/kvm` is nested KVM that emulates guest
//! kernel mode and dies on SSE, so no Linux boots on it directly. One level
//! down it does: QEMU's software emulator (TCG) emulates an AMD CPU with SVM
//! (`-cpu EPYC,+svm,+npt`), so a Linux **L1** booted in it loads `kvm-amd`,
//! and ferro-vmm running inside L1 boots an **L2** Linux on that `/dev/kvm`
//! with Linux's own virtio drivers. On a host with VMX or SVM the same
//! ferro-vmm runs Linux directly; the harness only exists because these
//! machines lack that.
//!
//! Everything comes from apt packages and the project's own binaries:
//! Debian's cloud kernel (bzImage for L1, ELF vmlinux or bzImage for L2,
//! modules for both), `busybox-static` for both userlands, and ferro-vmm
//! with its shared libraries. Images are uncompressed `newc` initramfs
//! archives ([`cpio::Archive`]) written under `target/linux-guest/` and
//! rewritten only when an input changes.
//!
//! A scenario is two shell scripts: L2's `/init` body and L1's body, which
//! starts ferro-vmm (in the background, its console tee'd to `/l2.log` so the
//! script can wait for what L2 prints), drives it (control socket through
//! `ferro-vmmctl`, TAPs, files) and checks the results. Both report on the
//! console with lines the host parses ([`Console`]):
//!
//! - `CHECK <name> ok [detail]` / `CHECK <name> FAIL [detail]`
//! - `VALUE <key>=<value>`
//!
//! An L1 can be a whole cloud host: [`L1`] takes any project binary (its
//! libraries follow), any module of the kernel package (bridge, vxlan,
//! nf_tables), and QEMU TAP NICs ([`Qemu::tap`]) that join it to network
//! namespaces of the test.

pub mod cpio;
pub mod kernel;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub use cpio::Archive;
pub use kernel::GuestKernel;

/// Harness errors. Missing tools or files are [`Error::Precondition`], with
/// the package or script that provides them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("precondition missing: {0}")]
    Precondition(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QEMU did not finish within {secs} s; last console lines:\n{tail}")]
    Timeout { secs: u64, tail: String },
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The busybox applets linked into both userlands.
const APPLETS: &[&str] = &[
    "sh",
    "ash",
    "mount",
    "umount",
    "ls",
    "cat",
    "echo",
    "poweroff",
    "reboot",
    "sleep",
    "insmod",
    "ifconfig",
    "ip",
    "ping",
    "dd",
    "md5sum",
    "basename",
    "readlink",
    "tr",
    "cut",
    "grep",
    "awk",
    "sed",
    "head",
    "tail",
    "wc",
    "cmp",
    "truncate",
    "tunctl",
    "tee",
    "nproc",
    "uname",
    "dmesg",
    "mkdir",
    "rm",
    "cp",
    "mv",
    "wget",
    "httpd",
    "nc",
    "sync",
    "kill",
    "seq",
    "stat",
    "test",
    "printf",
    "sha256sum",
    "hexdump",
    "od",
    "blockdev",
    "mke2fs",
    "timeout",
    "ps",
    "true",
    "false",
    "xargs",
    "find",
    "touch",
    "expr",
    "date",
    "uptime",
    "switch_root",
    "ln",
    "chmod",
];

/// Shell helpers sourced by every `/init` (L1 and L2).
const COMMON_SH: &str = r#"
ok() { echo "CHECK $1 ok${2:+ $2}"; }
fail() { echo "CHECK $1 FAIL${2:+ $2}"; }
# check NAME CMD...: CHECK NAME ok if CMD succeeds.
check() { local c=$1; shift; if "$@"; then ok "$c"; else fail "$c" "($*)"; fi; }
value() { echo "VALUE $1=$2"; }
up() { cut -d' ' -f1 /proc/uptime; }
"#;

/// Extra helpers of L1: ferro-vmm in the background with its console in
/// /l2.log, waits on what L2 prints, its exit status and run time.
const L1_SH: &str = r#"
# vm_start PROGRAM ARGS...: run a VMM in the background, its console and
# stderr in /l2.log (and on L1's console).
vm_start() {
  rm -f /vmm.rc /l2.log; touch /l2.log
  VMM_T0=$(up)
  ( "$@" 2>&1; echo $? > /vmm.rc ) | tee -a /l2.log &
}
# vmm_start ARGS...: run ferro-vmm in the background.
vmm_start() { vm_start /bin/ferro-vmm "$@"; }
# l2_wait PATTERN [SECONDS]: wait until L2 printed PATTERN.
l2_wait() {
  local n=$(( ${2:-120} * 10 ))
  while [ $n -gt 0 ]; do
    grep -q "$1" /l2.log && return 0
    [ -e /vmm.rc ] && { grep -q "$1" /l2.log; return $?; }
    sleep 0.1; n=$((n - 1))
  done
  return 1
}
# vmm_wait [SECONDS]: wait for ferro-vmm to exit; VMM_RC and VMM_SECS.
vmm_wait() {
  local n=$(( ${1:-300} * 10 ))
  while [ ! -e /vmm.rc ] && [ $n -gt 0 ]; do sleep 0.1; n=$((n - 1)); done
  if [ ! -e /vmm.rc ]; then VMM_RC=timeout; value vmm_exit timeout; return 1; fi
  sleep 0.2
  VMM_RC=$(cat /vmm.rc)
  VMM_SECS=$(awk -v a="$VMM_T0" -v b="$(up)" 'BEGIN { printf "%.2f", b - a }')
  value vmm_exit "$VMM_RC"; value vmm_secs "$VMM_SECS"
}
ctl() { /bin/ferro-vmmctl "$@"; }
# expect NAME PATTERN CMD...: run CMD, show its output, CHECK NAME ok if the
# output contains PATTERN.
expect() {
  local c=$1 p=$2 o; shift 2
  o=$("$@" 2>&1); echo "$o"
  case "$o" in *"$p"*) ok "$c" ;; *) fail "$c" "($* said: $o)" ;; esac
}
"#;

/// A busybox userland with kernel modules and an `/init` script: the common
/// part of L1 and L2 images.
#[derive(Debug, Clone)]
pub struct Userland {
    archive: Archive,
    modules: Vec<String>,
    init: String,
    helpers: String,
}

impl Userland {
    /// busybox and its applets, and `modules` (with their dependencies)
    /// from `kernel`, loaded in order by `/init` before the script runs.
    pub fn new(kernel: &GuestKernel, modules: &[&str]) -> Result<Self, Error> {
        let busybox = Path::new("/bin/busybox");
        if !busybox.exists() {
            return Err(Error::Precondition(
                "/bin/busybox (install the Debian package busybox-static)".into(),
            ));
        }
        let mut a = Archive::new();
        for d in ["proc", "sys", "dev", "tmp", "run", "etc", "root"] {
            a.dir(d);
        }
        a.file("bin/busybox", busybox, 0o755);
        for app in APPLETS {
            a.symlink(&format!("bin/{app}"), "busybox");
        }
        a.symlink("sbin", "bin");
        let mut names = Vec::new();
        for (name, path) in kernel.modules_for(modules)? {
            a.file(&format!("m/{name}.ko"), path, 0o644);
            names.push(name);
        }
        Ok(Self {
            archive: a,
            modules: names,
            init: String::new(),
            helpers: COMMON_SH.to_string(),
        })
    }

    /// A host binary at `dest`, with the shared libraries `ldd` lists at
    /// their own paths.
    pub fn binary(&mut self, src: &Path, dest: &str) -> Result<&mut Self, Error> {
        if !src.exists() {
            return Err(Error::Precondition(format!(
                "{} does not exist",
                src.display()
            )));
        }
        self.archive.file(dest, src, 0o755);
        let out = Command::new("ldd")
            .arg(src)
            .output()
            .map_err(|e| Error::Precondition(format!("cannot run ldd: {e}")))?;
        for lib in String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            self.archive.file(lib, lib, 0o755);
        }
        Ok(self)
    }

    /// A host file at `dest`.
    pub fn file(&mut self, src: &Path, dest: &str) -> &mut Self {
        self.archive.file(dest, src, 0o644);
        self
    }

    /// A file with the given contents at `dest`.
    pub fn bytes(&mut self, dest: &str, data: impl Into<Vec<u8>>) -> &mut Self {
        self.archive.bytes(dest, data, 0o755);
        self
    }

    /// The kernel's module tree under `/lib/modules/<version>/` (only the
    /// `kernel/` subdirectories in `subdirs`, plus every `modules.*` index)
    /// and kmod as `/bin/modprobe`, so the kernel loads what it needs on
    /// demand (nftables expressions, bridge, VXLAN) as on a real host.
    pub fn module_tree(
        &mut self,
        kernel: &GuestKernel,
        subdirs: &[&str],
    ) -> Result<&mut Self, Error> {
        let version = kernel
            .modules
            .file_name()
            .and_then(|v| v.to_str())
            .ok_or_else(|| {
                Error::Precondition("the kernel's modules directory has no name".into())
            })?
            .to_string();
        let base = format!("lib/modules/{version}");
        let entries =
            std::fs::read_dir(&kernel.modules).map_err(|e| Error::io(&kernel.modules, e))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("modules.") {
                self.archive
                    .file(&format!("{base}/{name}"), e.path(), 0o644);
            }
        }
        for sub in subdirs {
            let dir = kernel.modules.join("kernel").join(sub);
            self.add_tree(&dir, &format!("{base}/kernel/{sub}"))?;
        }
        let kmod = Path::new("/usr/bin/kmod");
        if !kmod.exists() {
            return Err(Error::Precondition(
                "/usr/bin/kmod (install the Debian package kmod)".into(),
            ));
        }
        self.binary(kmod, "bin/kmod")?;
        for app in ["modprobe", "lsmod", "modinfo"] {
            self.archive.symlink(&format!("bin/{app}"), "kmod");
        }
        Ok(self)
    }

    fn add_tree(&mut self, dir: &Path, dest: &str) -> Result<(), Error> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if path.is_dir() {
                self.add_tree(&path, &format!("{dest}/{name}"))?;
            } else {
                self.archive.file(&format!("{dest}/{name}"), path, 0o644);
            }
        }
        Ok(())
    }

    /// The script `/init` runs after mounting and loading modules.
    pub fn script(&mut self, body: &str) -> &mut Self {
        self.init = body.to_string();
        self
    }

    fn with_helpers(&mut self, extra: &str) -> &mut Self {
        self.helpers.push_str(extra);
        self
    }

    /// Write the image to `out` (skipped if unchanged).
    pub fn write(&self, out: &Path, level: &str) -> Result<PathBuf, Error> {
        let mut a = self.archive.clone();
        let modules = self.modules.join(" ");
        let init = format!(
            "#!/bin/sh\n\
             mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev\n\
             echo \"{level} init at $(cut -d' ' -f1 /proc/uptime)\"\n\
             ip link set lo up\n\
             {helpers}\n\
             for m in {modules}; do insmod /m/$m.ko || echo \"{level} insmod $m failed\"; done\n\
             echo \"{level} userspace at $(up)\"\n\
             {body}\n\
             echo \"{level} end of script\"\n\
             poweroff -f\n",
            helpers = self.helpers,
            body = self.init,
        );
        a.bytes("init", init, 0o755);
        a.write_cached(out)?;
        Ok(out.to_path_buf())
    }
}

/// An L2 guest image: a [`Userland`] whose `/init` body is the scenario.
pub fn l2(kernel: &GuestKernel, modules: &[&str], script: &str) -> Result<Userland, Error> {
    let mut u = Userland::new(kernel, modules)?;
    u.script(script);
    Ok(u)
}

/// The virtio modules an L2 needs for ferro-vmm's devices (Debian's cloud
/// kernel builds them as modules).
pub const VIRTIO_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_net", "virtio_rng"];

/// The modules an L1 host needs to run ferro-vmm.
pub const L1_MODULES: &[&str] = &["kvm_amd", "tun"];

/// An L1 host image: KVM, ferro-vmm, `ferro-vmmctl`, the L2 kernel and
/// images, and the scenario's script (with the L1 helpers).
#[derive(Debug, Clone)]
pub struct L1 {
    userland: Userland,
}

impl L1 {
    /// An L1 with `kernel`'s KVM and TUN modules (plus `extra_modules`),
    /// `ferro_vmm` at `/bin/ferro-vmm` and `vmmctl` at `/bin/ferro-vmmctl`.
    pub fn new(
        kernel: &GuestKernel,
        extra_modules: &[&str],
        ferro_vmm: &Path,
        vmmctl: &Path,
    ) -> Result<Self, Error> {
        let mods: Vec<&str> = L1_MODULES.iter().chain(extra_modules).copied().collect();
        let mut u = Userland::new(kernel, &mods)?;
        u.binary(ferro_vmm, "bin/ferro-vmm")?;
        u.binary(vmmctl, "bin/ferro-vmmctl")?;
        u.with_helpers(L1_SH);
        Ok(Self { userland: u })
    }

    /// The userland, to add binaries and files.
    pub fn userland(&mut self) -> &mut Userland {
        &mut self.userland
    }

    /// The scenario's L1 script. `/dev/kvm` is checked before it runs.
    pub fn script(&mut self, body: &str) -> &mut Self {
        let guarded = format!(
            "if [ ! -e /dev/kvm ]; then echo \"CHECK l1_kvm FAIL no /dev/kvm in L1\"; dmesg | tail -5; poweroff -f; fi\n{body}"
        );
        self.userland.script(&guarded);
        self
    }

    /// Write the image.
    pub fn write(&self, out: &Path) -> Result<PathBuf, Error> {
        self.userland.write(out, "L1")
    }
}

/// One QEMU run of an L1 image under TCG with a nested-SVM CPU.
#[derive(Debug, Clone)]
pub struct Qemu {
    kernel: PathBuf,
    initrd: PathBuf,
    memory_mib: u64,
    cpus: u32,
    append: String,
    taps: Vec<(String, String)>,
    disks: Vec<(PathBuf, bool)>,
    timeout: Duration,
    echo: bool,
}

impl Qemu {
    /// Boot `kernel` (the L1 bzImage) with `initrd`: 1 vCPU, 1 GiB.
    pub fn new(kernel: &Path, initrd: &Path) -> Self {
        Self {
            kernel: kernel.to_path_buf(),
            initrd: initrd.to_path_buf(),
            memory_mib: 1024,
            cpus: 1,
            append: String::new(),
            taps: Vec::new(),
            disks: Vec::new(),
            timeout: Duration::from_secs(300),
            echo: true,
        }
    }

    pub fn memory_mib(mut self, m: u64) -> Self {
        self.memory_mib = m;
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// Extra L1 kernel command-line words.
    pub fn append(mut self, words: &str) -> Self {
        self.append = words.to_string();
        self
    }

    /// A virtio NIC in L1 backed by host TAP `name` (created by the test, in
    /// any namespace QEMU can see), with `mac`.
    pub fn tap(mut self, name: &str, mac: &str) -> Self {
        self.taps.push((name.to_string(), mac.to_string()));
        self
    }

    /// A virtio disk in L1 (`/dev/vda`, `/dev/vdb`… in order) backed by
    /// the raw image `path`, read-write.
    pub fn disk(mut self, path: &Path) -> Self {
        self.disks.push((path.to_path_buf(), false));
        self
    }

    /// A read-only virtio disk in L1 (QEMU never writes `path`).
    pub fn disk_ro(mut self, path: &Path) -> Self {
        self.disks.push((path.to_path_buf(), true));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Copy console lines to stderr as they arrive (default on; cargo test
    /// shows them for failing tests and with `--nocapture`).
    pub fn echo(mut self, on: bool) -> Self {
        self.echo = on;
        self
    }

    /// Boot L1 and collect its console until it powers off.
    pub fn run(&self) -> Result<Console, Error> {
        let mut running = self.spawn()?;
        let deadline = running.start + self.timeout;
        loop {
            match running.next_line(deadline) {
                Next::Line(_) => {}
                Next::Exited => break,
                Next::Timeout => {
                    running.kill();
                    return Err(Error::Timeout {
                        secs: self.timeout.as_secs(),
                        tail: running.tail(30),
                    });
                }
            }
        }
        running.finish()
    }

    /// Boot L1 and return at once: the test reads its console with
    /// [`Running::wait_for`] while it drives the L1 from outside (an L1
    /// that is a cloud host runs until [`Running::kill`]).
    pub fn spawn(&self) -> Result<Running, Error> {
        let qemu = "qemu-system-x86_64";
        let mut cmd = Command::new(qemu);
        cmd.args(["-accel", "tcg", "-cpu", "EPYC,+svm,+npt"])
            .args(["-m", &self.memory_mib.to_string()])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-nodefaults", "-no-reboot", "-display", "none"])
            .args(["-serial", "stdio", "-monitor", "none"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args([
                "-append",
                &format!("console=ttyS0 panic=-1 quiet {}", self.append),
            ]);
        for (i, (tap, mac)) in self.taps.iter().enumerate() {
            cmd.args([
                "-netdev",
                &format!("tap,id=n{i},ifname={tap},script=no,downscript=no"),
                "-device",
                &format!("virtio-net-pci,netdev=n{i},mac={mac}"),
            ]);
        }
        for (d, ro) in &self.disks {
            let mode = if *ro { "readonly=on" } else { "cache=unsafe" };
            cmd.arg("-drive")
                .arg(format!("file={},format=raw,if=virtio,{mode}", d.display()));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| {
            Error::Precondition(format!(
                "cannot run {qemu}: {e} (install the Debian package qemu-system-x86)"
            ))
        })?;
        let (tx, rx) = mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let tx2 = tx.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let l = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let err_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // The EPYC model names features TCG lacks; QEMU warns once
                // per feature at start. Noise, not a result.
                if line.contains("TCG doesn't support requested feature") {
                    continue;
                }
                let _ = tx2.send(format!("qemu: {line}"));
            }
        });
        Ok(Running {
            child,
            rx,
            readers: vec![reader, err_reader],
            lines: Vec::new(),
            start: Instant::now(),
            echo: self.echo,
        })
    }
}

/// What [`Running::next_line`] saw.
enum Next {
    Line(usize),
    Exited,
    Timeout,
}

/// A QEMU L1 booted by [`Qemu::spawn`]; killed when dropped.
#[derive(Debug)]
pub struct Running {
    child: std::process::Child,
    rx: mpsc::Receiver<String>,
    readers: Vec<std::thread::JoinHandle<()>>,
    lines: Vec<String>,
    start: Instant,
    echo: bool,
}

impl Running {
    fn next_line(&mut self, deadline: Instant) -> Next {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(left.max(Duration::from_millis(1))) {
            Ok(l) => {
                if self.echo {
                    eprintln!("[{:6.1}] {l}", self.start.elapsed().as_secs_f64());
                }
                self.lines.push(l);
                Next::Line(self.lines.len() - 1)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Next::Exited,
            Err(mpsc::RecvTimeoutError::Timeout) => Next::Timeout,
        }
    }

    /// Wait until L1's console prints a line containing `pat` (lines
    /// printed earlier count too) and return it; an error with the last
    /// lines if L1 exits or `timeout` passes first.
    pub fn wait_for(&mut self, pat: &str, timeout: Duration) -> Result<String, Error> {
        if let Some(l) = self.lines.iter().find(|l| l.contains(pat)) {
            return Ok(l.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_line(deadline) {
                Next::Line(i) if self.lines[i].contains(pat) => return Ok(self.lines[i].clone()),
                Next::Line(_) => {}
                Next::Exited | Next::Timeout => {
                    return Err(Error::Timeout {
                        secs: timeout.as_secs(),
                        tail: format!("(waiting for {pat:?})\n{}", self.tail(40)),
                    })
                }
            }
        }
    }

    /// Take what L1 printed so far without waiting.
    pub fn drain(&mut self) -> &[String] {
        while let Ok(l) = self.rx.try_recv() {
            if self.echo {
                eprintln!("[{:6.1}] {l}", self.start.elapsed().as_secs_f64());
            }
            self.lines.push(l);
        }
        &self.lines
    }

    /// The last `n` console lines.
    pub fn tail(&self, n: usize) -> String {
        self.lines[self.lines.len().saturating_sub(n)..].join("\n")
    }

    /// Stop QEMU now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    fn finish(mut self) -> Result<Console, Error> {
        let status = self
            .child
            .wait()
            .map_err(|e| Error::io(Path::new("qemu-system-x86_64"), e))?;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Ok(Console {
            lines: std::mem::take(&mut self.lines),
            secs: self.start.elapsed().as_secs_f64(),
            qemu_ok: status.success(),
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What an L1 run printed, with the scenario's checks and values.
#[derive(Debug, Clone)]
pub struct Console {
    pub lines: Vec<String>,
    /// Wall-clock seconds from QEMU's start to its exit.
    pub secs: f64,
    /// QEMU exited with status 0.
    pub qemu_ok: bool,
}

impl Console {
    /// `(name, ok, detail)` of every `CHECK` line, in order.
    pub fn checks(&self) -> Vec<(String, bool, String)> {
        self.lines
            .iter()
            .filter_map(|l| {
                let rest = &l[l.find("CHECK ")? + 6..];
                let mut it = rest.splitn(3, ' ');
                let name = it.next()?.to_string();
                let verdict = it.next()?;
                let detail = it.next().unwrap_or("").to_string();
                Some((name, verdict == "ok", detail))
            })
            .collect()
    }

    /// The last `VALUE key=...` printed.
    pub fn value(&self, key: &str) -> Option<String> {
        let pat = format!("VALUE {key}=");
        self.lines
            .iter()
            .rev()
            .find_map(|l| l.find(&pat).map(|i| l[i + pat.len()..].trim().to_string()))
    }

    /// Whether some line contains `pat`.
    pub fn has(&self, pat: &str) -> bool {
        self.lines.iter().any(|l| l.contains(pat))
    }

    /// Fail (with the console) unless every check in `names` was printed and
    /// passed, and no check at all failed.
    pub fn assert_checks(&self, names: &[&str]) {
        let checks = self.checks();
        let failed: Vec<_> = checks.iter().filter(|c| !c.1).collect();
        let missing: Vec<_> = names
            .iter()
            .filter(|n| !checks.iter().any(|c| c.0 == **n && c.1))
            .collect();
        assert!(
            failed.is_empty() && missing.is_empty(),
            "failed checks: {failed:?}; missing checks: {missing:?}\nconsole:\n{}",
            self.lines.join("\n")
        );
    }
}

/// The project's `target/linux-guest` directory, for images and scratch.
pub fn work_dir(workspace: &Path, name: &str) -> PathBuf {
    workspace.join("target/linux-guest").join(name)
}
