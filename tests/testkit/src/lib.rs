//! Fixtures shared by the integration tests of every Ferrocloud crate.
//!
//! Tests that need KVM, root or the stock kernel never skip: a missing
//! precondition fails the test with a message naming it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Fail unless this process runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "precondition missing: this test must run as root");
}

/// Fail unless this process can use KVM, as root.
pub fn require_kvm_root() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "precondition missing: /dev/kvm does not exist (KVM is required for this test)"
    );
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "precondition missing: this test must run as root");
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .expect("precondition missing: cannot open /dev/kvm read-write");
}

/// The Debian package that brings each external tool the tests run.
const TOOL_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("nft", "nftables"),
    ("openssl", "openssl"),
    ("ssh-keygen", "openssh-client"),
    ("pgrep", "procps"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("ssh", "openssh-client"),
    ("debootstrap", "debootstrap"),
    ("mkfs.ext4", "e2fsprogs"),
];

/// A `Command` for external tool `name`, failing the test at once with the
/// Debian package to install if the tool is not on `PATH`
/// (`deploy/install-deps.sh` installs them all).
pub fn tool(name: &str) -> Command {
    require_tool(name);
    Command::new(name)
}

/// Fail unless external tool `name` is on `PATH`, naming its package.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if !found {
        let pkg = TOOL_PACKAGES
            .iter()
            .find(|(t, _)| *t == name)
            .map_or("its package", |(_, p)| p);
        panic!(
            "precondition missing: the `{name}` tool is not on PATH \
             (install the Debian package {pkg}; deploy/install-deps.sh does)"
        );
    }
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("tests/testkit sits two levels below the workspace root")
        .to_path_buf()
}

/// The profile directory the running test binary was built into
/// (`<target>/debug`), wherever the target directory is.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("cannot locate the test binary");
    // <target>/<profile>/deps/<test binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary lives in <target>/<profile>/deps")
        .to_path_buf()
}

/// Return binary `bin` of workspace package `package`, built for this test
/// run.
///
/// `cargo test --workspace` (what `scripts/test.sh` runs) already builds the
/// binaries of every package with integration tests, with the workspace's
/// unified features, before any test starts; `scripts/test.sh` says so by
/// setting `FERRO_TEST_PREBUILT=1`, and the binary is used as is. Building
/// again from inside a test would compile a second copy of every dependency
/// (RocksDB included) under a different feature set. Without that variable
/// (a single test run by hand), the binary is built once per test process.
pub fn workspace_bin(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let path = profile_dir().join(bin);
    if std::env::var_os("FERRO_TEST_PREBUILT").is_some() {
        assert!(
            path.is_file(),
            "{bin} not found at {} although FERRO_TEST_PREBUILT is set: \
             run the tests with `cargo test --workspace` so that it is built",
            path.display()
        );
        return path;
    }
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == bin) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", package, "--bin", bin])
            .current_dir(workspace_root())
            .status()
            .unwrap_or_else(|e| panic!("cannot run cargo build -p {package}: {e}"));
        assert!(status.success(), "building {bin} failed");
        built.push(bin.to_string());
    }
    assert!(path.exists(), "{bin} not found at {}", path.display());
    path
}

/// Build (once) and return the project's test guest ELF.
pub fn guest_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| {
        let out = Command::new("bash")
            .arg(workspace_root().join("tests/guest/build.sh"))
            .output()
            .expect("cannot run tests/guest/build.sh");
        assert!(
            out.status.success(),
            "building the test guest failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = PathBuf::from(stdout.trim().lines().last().unwrap_or_default());
        assert!(path.exists(), "test guest not found at {}", path.display());
        path
    })
    .clone()
}

/// Debian's stock kernel (ELF), unpacked by `deploy/fetch-guest-kernel.sh`.
pub fn stock_vmlinux() -> PathBuf {
    let p = workspace_root().join("target/guest-kernel/vmlinux");
    assert!(
        p.exists(),
        "precondition missing: {} (run deploy/fetch-guest-kernel.sh)",
        p.display()
    );
    p
}

/// A fresh scratch directory unique to one test of this process.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferro-test-{}-{}", name, std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("cannot create a scratch directory");
    d
}

/// FNV-1a 64 of `data`, as the test guest prints it.
pub fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The 4096 bytes the test guest writes at sector 0 (docs/test-guest.md).
pub fn guest_write_pattern() -> Vec<u8> {
    let mut v: Vec<u8> = (0..4096).map(|i| (i as u8) ^ 0x5a).collect();
    v[..16].copy_from_slice(&b"FERRO-GUEST-WROTE"[..16]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_and_pattern_match_the_guest_contract() {
        assert_eq!(fnv64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64(b"a"), 0xaf63_dc4c_8601_ec8c);
        let p = guest_write_pattern();
        assert_eq!(&p[..16], b"FERRO-GUEST-WROT");
        assert_eq!(p[16], 16 ^ 0x5a);
    }

    #[test]
    fn workspace_root_has_the_manifest() {
        assert!(workspace_root().join("Cargo.toml").exists());
        assert!(workspace_root().join("tests/guest/build.sh").exists());
    }
}

/// A cluster CA for tests that run an agent without a controller: the
/// agent's TLS files and the client certificate a test (playing the
/// controller) calls it with.
pub mod pki {
    use std::path::Path;

    pub use ferro_pki::{agent_server_name, generate_key, Ca, CaMaterial, Identity};

    /// One CA per test process.
    pub fn ca() -> &'static CaMaterial {
        static CA: std::sync::OnceLock<CaMaterial> = std::sync::OnceLock::new();
        CA.get_or_init(|| Ca::generate("ferro test CA").expect("cannot make a test CA"))
    }

    /// Write host `host_id`'s agent certificate, key and the client CA into
    /// `dir`; returns the agent configuration lines naming them.
    pub fn agent_tls_config(host_id: &str, dir: &Path) -> String {
        let issuer = Ca::load(ca()).expect("test CA");
        let key = ferro_pki::generate_key().expect("key");
        let cert = issuer
            .issue_agent(host_id, &key.public_key)
            .expect("agent cert");
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        format!(
            "tls_cert_file = {:?}\ntls_key_file = {:?}\nclient_ca_file = {:?}\n",
            write("agent.crt", &cert),
            write("agent.key", &key.key_pem),
            write("clients-ca.crt", &ca().cert_pem),
        )
    }

    /// A client certificate of the test CA (what a controller presents).
    pub fn controller_identity() -> &'static Identity {
        static ID: std::sync::OnceLock<Identity> = std::sync::OnceLock::new();
        ID.get_or_init(|| {
            Ca::load(ca())
                .and_then(|c| c.issue_controller("test"))
                .expect("controller cert")
        })
    }
}

/// A `Command` that runs `program` inside network namespace `ns` the way
/// a daemon of a test "host" needs it: `ip netns exec` (which also mounts a
/// sysfs of that namespace, so `/sys/class/net` shows its interfaces), with
/// this machine's cgroup hierarchies mounted again at their places under
/// `/sys/fs/cgroup` in the private mount namespace `ip netns exec` makes (its
/// fresh sysfs hides them). The host's own mounts are not touched.
pub fn netns_daemon(ns: &str, program: &Path) -> Command {
    let mut script = String::from("set -e\n");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut mounts: Vec<(String, String, String)> = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mp = left.split(' ').nth(4).unwrap_or("");
        let mut r = right.split(' ');
        let (fstype, _src, opts) = (
            r.next().unwrap_or(""),
            r.next().unwrap_or(""),
            r.next().unwrap_or(""),
        );
        if mp.starts_with("/sys/fs/cgroup") && (fstype == "cgroup" || fstype == "cgroup2") {
            mounts.push((mp.to_string(), fstype.to_string(), opts.to_string()));
        }
    }
    let root_is_v2 = mounts
        .iter()
        .any(|(mp, fs, _)| mp == "/sys/fs/cgroup" && fs == "cgroup2");
    if root_is_v2 {
        script.push_str("mount -t cgroup2 cgroup2 /sys/fs/cgroup\n");
    } else {
        script.push_str("mount -t tmpfs -o mode=755 cgroup_root /sys/fs/cgroup\n");
        for (mp, fstype, opts) in &mounts {
            // Only the controllers (and name=) of a v1 hierarchy select it.
            let opts: Vec<&str> = opts
                .split(',')
                .filter(|o| !matches!(*o, "rw" | "ro") && !o.starts_with("release_agent"))
                .collect();
            let o = if opts.is_empty() {
                String::new()
            } else {
                format!("-o {}", opts.join(","))
            };
            script.push_str(&format!(
                "mkdir -p '{mp}'\nmount -t {fstype} {o} cgroup '{mp}'\n"
            ));
        }
        if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in entries.flatten() {
                if let Ok(target) = std::fs::read_link(e.path()) {
                    script.push_str(&format!(
                        "ln -sfn '{}' '{}'\n",
                        target.display(),
                        e.path().display()
                    ));
                }
            }
        }
    }
    script.push_str("exec \"$@\"\n");
    let mut c = tool("ip");
    c.args(["netns", "exec", ns, "sh", "-c", &script, "sh"])
        .arg(program);
    c
}

fn ip(args: &[&str]) {
    let out = tool("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The underlay of a multi-host test: a bridge `fu<tag>` in the root
/// namespace with `10.<net>.0.254/24` and, per host, a namespace
/// `fh<tag><i>` whose `eth0` (a veth on the bridge) has `10.<net>.0.<i>`.
/// Removed, with everything in the namespaces, when dropped.
pub struct Underlay {
    /// The bridge, `10.<net>.0.254/24`.
    pub bridge: String,
    /// The host namespaces; host `i` (from 1) has `10.<net>.0.<i>` on its `eth0`.
    pub hosts: Vec<String>,
}

impl Underlay {
    pub fn new(tag: &str, n: usize, net: u8) -> Self {
        let bridge = format!("fu{tag}");
        let _ = tool("ip").args(["link", "del", &bridge]).status();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("10.{net}.0.254/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        let mut hosts = Vec::new();
        for h in 1..=n {
            let ns = format!("fh{tag}{h}");
            let _ = tool("ip").args(["netns", "del", &ns]).status();
            ip(&["netns", "add", &ns]);
            let (outer, inner) = (format!("fo{tag}{h}"), format!("fi{tag}{h}"));
            ip(&[
                "link", "add", &outer, "type", "veth", "peer", "name", &inner,
            ]);
            ip(&["link", "set", &inner, "netns", &ns]);
            ip(&["link", "set", &outer, "master", &bridge, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "link", "set", &inner, "name", "eth0"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.{net}.0.{h}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            hosts.push(ns);
        }
        Underlay { bridge, hosts }
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        for ns in &self.hosts {
            let _ = tool("ip").args(["netns", "del", ns]).status();
        }
        let _ = tool("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// A child process killed (and reaped) when dropped.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills, when dropped, every `ferro-vmm` whose command line names `dir`
/// (an agent's instances: they outlive a killed agent by design).
pub struct KillVmms(pub PathBuf);

impl Drop for KillVmms {
    fn drop(&mut self) {
        let needle = self.0.display().to_string();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            if cmd.contains("ferro-vmm") && cmd.contains(&needle) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

/// Starts daemon `bin --config cfg` in namespace `ns` (see
/// [`netns_daemon`]), its standard error in `log`.
pub fn spawn_in(ns: &str, bin: &Path, cfg: &Path, log: &Path) -> Proc {
    spawn_args_in(ns, bin, &["--config".into(), cfg.into()], log)
}

/// Starts daemon `bin args…` in namespace `ns` (see [`netns_daemon`]), its
/// standard error in `log`.
pub fn spawn_args_in(ns: &str, bin: &Path, args: &[std::ffi::OsString], log: &Path) -> Proc {
    let child = netns_daemon(ns, bin)
        .args(args)
        .env("FERRO_LOG", "info,ferro_netd=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("cannot create the daemon's log"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    Proc(child)
}
