//! Shared fixtures for the VMM's integration tests: the project's test
//! guest, a `ferro-vmm` process with its console captured, the control
//! socket, and throwaway network namespaces with a TAP.
//!
//! These tests need KVM and root. They never skip: a missing precondition
//! fails the test with a message naming it.
#![allow(dead_code, unused_imports)] // each test binary uses a different part

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use ferro_testkit::{
    fnv64, guest_elf, guest_write_pattern, require_kvm_root, scratch, stock_vmlinux,
};

/// A running `ferro-vmm` process whose console goes to a file.
pub struct Vmm {
    pub child: Child,
    pub console: PathBuf,
    pub control: PathBuf,
    pub started: Instant,
}

/// Builds the command line of a VMM under test.
pub struct VmmBuilder {
    args: Vec<String>,
    dir: PathBuf,
    netns: Option<String>,
}

impl VmmBuilder {
    /// A VMM booting `kernel` with its files under `dir`.
    pub fn new(kernel: &Path, dir: &Path) -> Self {
        Self {
            args: vec!["--kernel".into(), kernel.display().to_string()],
            dir: dir.to_path_buf(),
            netns: None,
        }
    }

    /// Add raw flags.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Run inside network namespace `ns`.
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
        self
    }

    /// Start the process.
    pub fn spawn(self) -> Vmm {
        let console = self.dir.join("console.log");
        let control = self.dir.join("control.sock");
        let _ = std::fs::remove_file(&console);
        let bin = env!("CARGO_BIN_EXE_ferro-vmm");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = ferro_testkit::tool("ip");
                c.args(["netns", "exec", ns, bin]);
                c
            }
            None => Command::new(bin),
        };
        cmd.args(&self.args)
            .arg("--serial")
            .arg(format!("file:{}", console.display()))
            .arg("--control-socket")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let child = cmd.spawn().expect("cannot start ferro-vmm");
        Vmm {
            child,
            console,
            control,
            started,
        }
    }
}

impl Vmm {
    /// The console output so far.
    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Wait until a console line contains `needle`; return that line.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.console_text();
            // Only whole lines: the console is written byte by byte.
            let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            if let Some(l) = complete.lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "ferro-vmm exited ({status}) before printing `{needle}`; console:\n{text}\nstderr:\n{}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no console line with `{needle}` after {timeout:?}; console:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "ferro-vmm did not exit within {timeout:?}; console:\n{}",
                    self.console_text()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What the process wrote to stderr (after it exited).
    pub fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    }

    /// Send one control request and return the answer as JSON.
    pub fn control(&mut self, request: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut stream = loop {
            match UnixStream::connect(&self.control) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("cannot connect to control socket: {e}"),
            }
        };
        stream.write_all(request.as_bytes()).unwrap();
        stream.write_all(b"\n").unwrap();
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).unwrap();
        if line.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "control socket closed without an answer to {request}; exit {:?}; stderr:\n{}",
                self.child.try_wait(),
                self.stderr()
            );
        }
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer `{line}`: {e}"))
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a command and fail the test if it fails.
pub fn sh(args: &[&str]) {
    let out = ferro_testkit::tool(args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace holding one persistent TAP with a host address;
/// removed on drop.
pub struct TapNs {
    pub ns: String,
    pub tap: String,
}

impl TapNs {
    /// Create namespace `ns` with TAP `tap` addressed `host_cidr`.
    pub fn new(ns: &str, tap: &str, host_cidr: &str) -> Self {
        let _ = ferro_testkit::tool("ip")
            .args(["netns", "del", ns])
            .output();
        sh(&["ip", "netns", "add", ns]);
        sh(&["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"]);
        sh(&[
            "ip", "netns", "exec", ns, "ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr",
        ]);
        sh(&[
            "ip", "netns", "exec", ns, "ip", "addr", "add", host_cidr, "dev", tap,
        ]);
        sh(&["ip", "netns", "exec", ns, "ip", "link", "set", tap, "up"]);
        Self {
            ns: ns.to_string(),
            tap: tap.to_string(),
        }
    }

    /// Run `ping` inside the namespace; returns its output and success.
    pub fn ping(&self, addr: &str, count: u32) -> (bool, String) {
        ferro_testkit::require_tool("ping");
        let out = ferro_testkit::tool("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "ping",
                "-c",
                &count.to_string(),
                "-W",
                "2",
                "-i",
                "0.2",
                addr,
            ])
            .output()
            .expect("cannot run ping (install iputils-ping)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    }
}

impl Drop for TapNs {
    fn drop(&mut self) {
        let _ = ferro_testkit::tool("ip")
            .args(["netns", "del", &self.ns])
            .output();
    }
}
