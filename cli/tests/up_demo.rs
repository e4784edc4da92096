//! End to end: `ferro up --demo` with real `ferro-controller`,
//! `ferro-agent`, `ferro-netd` and `ferro-vmm` processes booting the
//! project's test guest, which gets its address over DHCP and its id and
//! key from the metadata service; then nothing of it left on the host.
//!
//! Needs KVM and root. It never skips: a missing precondition fails the
//! test with a message naming it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferro_cli::up::files::{cgroup_dirs, host_names, Layout};

/// The daemons `ferro up` starts, next to the `ferro` binary under test.
fn build_daemons() {
    let dir = Path::new(env!("CARGO_BIN_EXE_ferro")).parent().unwrap();
    for (package, bin) in [
        ("ferro-controller", "ferro-controller"),
        ("ferro-agent", "ferro-agent"),
        ("ferro-vmm", "ferro-vmm"),
        ("ferro-netd", "ferro-netd"),
        ("ferro-blockd", "ferro-blockd"),
    ] {
        let path = ferro_testkit::workspace_bin(package, bin);
        assert_eq!(
            path.parent(),
            Some(dir),
            "{bin} was built outside the directory of ferro ({})",
            dir.display()
        );
    }
}

/// Processes whose command line mentions both `what` and `dir`.
fn processes(what: &str, dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.parse::<u32>().is_err() {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(what) && cmd.contains(&needle) {
            out.push(format!("{name}: {cmd}"));
        }
    }
    out
}

fn taps(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
fn up_demo_boots_the_guest_and_leaves_nothing() {
    ferro_testkit::require_kvm_root();
    build_daemons();
    let guest = ferro_testkit::guest_elf();
    // Short: the agent's state directory (<data>/agent) must fit 32 bytes.
    let data = PathBuf::from(format!("/tmp/fup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);

    let mut child = Command::new(env!("CARGO_BIN_EXE_ferro"))
        .args([
            "up",
            "--demo",
            "--timeout",
            "120",
            "--listen",
            "127.0.0.1:0",
            "--ec2-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&data)
        .arg("--image-kernel")
        .arg(&guest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run ferro up");
    let deadline = Instant::now() + Duration::from_secs(420);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let logs = |name: &str| {
        std::fs::read_to_string(data.join(format!("logs/{name}.log"))).unwrap_or_default()
    };
    assert!(
        out.status.success(),
        "ferro up --demo failed ({}).\nstdout:\n{stdout}\nstderr:\n{stderr}\ncontroller log:\n{}\nagent log:\n{}",
        out.status,
        logs("controller"),
        logs("agent"),
    );
    assert!(
        stdout.contains("ferro-guest: selftest done"),
        "console not shown:\n{stdout}"
    );
    assert!(
        stdout.contains("running"),
        "instance not described as running:\n{stdout}"
    );
    // The default VPC's address, over DHCP; its own id and the demo key
    // pair's public key, over IMDSv2.
    let ip = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("private ip"))
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    assert!(ip.starts_with("172.31."), "no private IP shown:\n{stdout}");
    assert!(
        stdout.contains(&format!(
            "ferro-guest: dhcp lease ip={ip}/20 router=172.31.0.1"
        )),
        "no DHCP lease for {ip} on the console:\n{stdout}\nnetd log:\n{}",
        logs("netd")
    );
    assert!(
        stdout.contains("ferro-guest: imds instance-id=i-"),
        "the guest did not read its instance id:\n{stdout}\nnetd log:\n{}",
        logs("netd")
    );
    assert!(
        stdout.contains("ferro-guest: imds public-keys/0/openssh-key=ssh-ed25519 "),
        "the key pair did not reach the guest:\n{stdout}"
    );

    let (prefix, parent) = host_names(&data);
    let layout = Layout::with_listen(&data, "127.0.0.1:1".parse().unwrap()).unwrap();
    assert_eq!(
        taps(&layout.netd_prefix),
        Vec::<String>::new(),
        "netd's bridges or VXLAN devices left"
    );
    assert_eq!(
        processes("ferro-netd", &data),
        Vec::<String>::new(),
        "netd left"
    );
    assert_eq!(
        processes("ferro-blockd", &data),
        Vec::<String>::new(),
        "blockd left"
    );
    let tables = String::from_utf8_lossy(
        &ferro_testkit::tool("nft")
            .args(["list", "tables"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    let mine = format!("ferro_{}", layout.netd_prefix);
    assert!(
        !tables.lines().any(|l| l.ends_with(&format!(" {mine}"))),
        "netd's nftables tables left:\n{tables}"
    );
    assert_eq!(
        processes("ferro-vmm", &data),
        Vec::<String>::new(),
        "VMM processes left"
    );
    assert_eq!(
        processes("ferro-agent", &data),
        Vec::<String>::new(),
        "agent left"
    );
    assert_eq!(
        processes("ferro-controller", &data),
        Vec::<String>::new(),
        "controller left"
    );
    assert_eq!(taps(&prefix), Vec::<String>::new(), "TAPs left");
    let cgroups: Vec<PathBuf> = cgroup_dirs(&parent)
        .into_iter()
        .filter(|d| d.exists())
        .collect();
    assert_eq!(cgroups, Vec::<PathBuf>::new(), "cgroups left");
    let _ = std::fs::remove_dir_all(&data);
}

/// `ferro up` in the foreground on `data`, its stderr collected by a thread
/// (lines also sent to `lines`).
struct Up {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Up {
    fn start(data: &Path, extra: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferro"))
            .args(["up", "--timeout", "120", "--listen", "127.0.0.1:0"])
            .args(if extra.contains(&"--vcpus") {
                &[][..]
            } else {
                &["--vcpus", "8"][..]
            })
            // Tests run side by side: never the fixed default port.
            .args(if extra.contains(&"--ec2-listen") {
                &[][..]
            } else {
                &["--ec2-listen", "127.0.0.1:0"][..]
            })
            .args(extra)
            .arg("--data-dir")
            .arg(data)
            .arg("--image-kernel")
            .arg(ferro_testkit::guest_elf())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run ferro up");
        let (tx, lines) = std::sync::mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Self {
            child,
            lines,
            seen: vec![],
        }
    }

    /// Wait for a stderr line containing `needle`.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(180);
        while Instant::now() < deadline {
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                self.seen.push(l.clone());
                if l.contains(needle) {
                    return l;
                }
            }
        }
        panic!(
            "`ferro up` never said {needle:?}:\n{}",
            self.seen.join("\n")
        );
    }

    /// Ctrl-C, then wait for the exit and the rest of its output.
    fn interrupt(mut self) -> String {
        // SAFETY: kill with a valid pid and signal.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(l);
        }
        let all = self.seen.join("\n");
        assert!(status.success(), "ferro up failed ({status}):\n{all}");
        all
    }
}

/// Ctrl-C terminates every instance, the ones a user launched too; with
/// `--keep` they stay for the next `ferro up` on the data directory, which
/// resumes them (instead of failing for want of capacity).
#[test]
fn ctrl_c_cleans_up_everything_or_keep_resumes() {
    ferro_testkit::require_kvm_root();
    build_daemons();
    let data = PathBuf::from(format!("/tmp/fuk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let ferro = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ferro"))
            .arg("--config")
            .arg(data.join("client.toml"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ferro {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let image = "ferro-test-guest";

    // A user's own instance beside the demo one; Ctrl-C ends both.
    let mut up = Up::start(&data, &[]);
    up.wait_for("The cloud is up");
    let mine = ferro(&[
        "instances",
        "run",
        "--image",
        image,
        "--type",
        "f1.nano",
        "--wait",
        "-o",
        "json",
    ]);
    assert!(mine.contains("i-"), "{mine}");
    let said = up.interrupt();
    assert!(said.contains("still running: "), "{said}");
    assert!(said.contains("terminating "), "{said}");
    assert_eq!(
        processes("ferro-vmm", &data),
        Vec::<String>::new(),
        "VMMs left:\n{said}"
    );

    // --keep: the instances outlive `ferro up` ...
    let mut up = Up::start(&data, &["--keep"]);
    up.wait_for("The cloud is up");
    ferro(&[
        "instances",
        "run",
        "--image",
        image,
        "--type",
        "f1.nano",
        "--wait",
    ]);
    let said = up.interrupt();
    assert!(said.contains("left running (--keep)"), "{said}");
    assert_eq!(processes("ferro-vmm", &data).len(), 2, "{said}");
    // ... and the next `ferro up` resumes them; its Ctrl-C ends them.
    let mut up = Up::start(&data, &[]);
    let resumed = up.wait_for("resuming the instances");
    assert_eq!(resumed.matches("i-").count(), 2, "{resumed}");
    up.wait_for("The cloud is up");
    let said = up.interrupt();
    assert!(said.contains("terminating "), "{said}");
    assert_eq!(
        processes("ferro-vmm", &data),
        Vec::<String>::new(),
        "VMMs left:\n{said}"
    );
    let (_, parent) = host_names(&data);
    let _ = cgroup_dirs(&parent)
        .into_iter()
        .map(std::fs::remove_dir)
        .count();
    let _ = std::fs::remove_dir_all(&data);
}

/// The EC2 Query endpoint of `ferro up`, driven by the real AWS clients
/// (boto3 and the aws CLI from PyPI, in a virtual environment made by
/// `tests/ec2/venv.sh`) running `tests/ec2/clients.py`: the catalog, key
/// pairs, a VPC with a subnet and a security group, RunInstances with a
/// client token twice, the `instance_running` waiter, filters and tags,
/// console output, stop/start/terminate state codes, paging through 250
/// instances, the errors the clients raise (unknown and malformed ids, a
/// bad parameter, a wrong secret, an expired signature, an unknown
/// action) and the aws CLI's `--output table` and `--query`.
#[test]
fn the_aws_clients_drive_the_ec2_endpoint() {
    ferro_testkit::require_kvm_root();
    ferro_testkit::require_tool("python3");
    ferro_testkit::require_tool("ssh-keygen");
    build_daemons();
    let root = ferro_testkit::workspace_root();
    let venv = Command::new("bash")
        .arg(root.join("tests/ec2/venv.sh"))
        .output()
        .expect("bash tests/ec2/venv.sh");
    assert!(
        venv.status.success(),
        "tests/ec2/venv.sh failed (it needs python3-venv and PyPI):\n{}",
        String::from_utf8_lossy(&venv.stderr)
    );
    let venv = PathBuf::from(String::from_utf8_lossy(&venv.stdout).trim().to_string());
    let data = PathBuf::from(format!("/tmp/fec2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    // Room for 100 f1.nano instances at once (the paging check).
    let mut up = Up::start(
        &data,
        &[
            "--ec2-listen",
            "127.0.0.1:0",
            "--vcpus",
            "128",
            "--memory",
            "20480",
        ],
    );
    up.wait_for("The cloud is up");
    let env_file = std::fs::read_to_string(data.join("ec2.env")).expect("ferro up wrote ec2.env");
    let mut py = Command::new(venv.join("bin/python"));
    py.arg(root.join("tests/ec2/clients.py"))
        .env("FERRO_AWS_CLI", venv.join("bin/aws"))
        // No ~/.aws of the machine's.
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
    for l in env_file.lines() {
        if let Some((k, v)) = l.split_once('=') {
            py.env(k, v);
        }
    }
    let out = py.output().expect("the venv's python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    for l in stdout.lines().filter(|l| l.starts_with("ok ")) {
        eprintln!("ec2 clients: {l}");
    }
    let said = up.interrupt();
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "tests/ec2/clients.py failed:\n{stdout}\n{}\nferro up:\n{said}\ncontroller log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(data.join("logs/controller.log")).unwrap_or_default()
    );
    assert_eq!(
        processes("ferro-vmm", &data),
        Vec::<String>::new(),
        "VMMs left:\n{said}"
    );
    let _ = std::fs::remove_dir_all(&data);
}
