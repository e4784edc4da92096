//! Shared fixtures for the agent's integration tests: a real `ferro-agent`
//! process with its own state directory, TAP prefix and cgroup parent,
//! driving real `ferro-vmm` processes that boot the project's test guest.
//!
//! These tests need KVM and root. They never skip: a missing precondition
//! fails the test with a message naming it.
#![allow(dead_code, unused_imports)] // each test binary uses a different part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferro_proto::agent::v1 as pb;
use pb::agent_client::AgentClient;
use tonic::transport::Channel;

pub use pb::InstanceState as S;

pub use ferro_testkit::{guest_elf, require_kvm_root};

/// Build (once) and return the ferro-vmm binary of this workspace.
pub fn vmm_bin() -> PathBuf {
    ferro_testkit::workspace_bin("ferro-vmm", "ferro-vmm")
}

/// A `ferro-agent` process under test, isolated by `name`.
pub struct Agent {
    pub name: String,
    pub state_dir: PathBuf,
    pub config: PathBuf,
    pub tap_prefix: String,
    pub cgroup_parent: String,
    pub child: Option<Child>,
    pub addr: String,
}

impl Agent {
    /// Start an agent for test `name` (≤ 8 chars) using TAP prefix `tap`
    /// (4 chars, unique per test), with `extra` TOML lines.
    pub fn start(name: &str, tap: &str, extra: &str) -> Self {
        require_kvm_root();
        let vmm = vmm_bin();
        let pid = std::process::id();
        let state_dir = PathBuf::from(format!("/tmp/fa-{name}-{pid}"));
        let _ = std::fs::remove_dir_all(&state_dir);
        std::fs::create_dir_all(&state_dir).unwrap();
        let config = state_dir.join("agent.toml");
        let cgroup_parent = format!("ferro-test-{name}-{pid}");
        let tls = ferro_testkit::pki::agent_tls_config(&format!("test-{name}"), &state_dir);
        let text = format!(
            r#"host_id = "test-{name}"
availability_zone = "az-test"
listen = "127.0.0.1:0"
state_dir = "{}"
vcpus = 64
memory_mib = 8192
reserved_memory_mib = 0
vmm_path = "{}"
tap_prefix = "{tap}"
cgroup_parent = "{cgroup_parent}"
kernel_cmdline = "console=ttyS0"
stop_timeout_ms = 3000
{tls}
{extra}
"#,
            state_dir.display(),
            vmm.display()
        );
        std::fs::write(&config, text).unwrap();
        let mut agent = Self {
            name: name.into(),
            state_dir,
            config,
            tap_prefix: tap.into(),
            cgroup_parent,
            child: None,
            addr: String::new(),
        };
        agent.spawn();
        agent
    }

    /// (Re)start the agent process with the same configuration.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.join("agent.log"))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferro-agent"))
            .arg("--config")
            .arg(&self.config)
            .env("FERRO_LOG", "ferro_agent=debug,info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("cannot start ferro-agent");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("ferro-agent: listening on ")
            .unwrap_or_else(|| panic!("agent did not start: {line:?}; log:\n{}", self.log()));
        self.addr = format!("https://{addr}");
        self.child = Some(child);
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("agent.log")).unwrap_or_default()
    }

    /// `kill -9` the agent.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM the agent and wait for it.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("agent not running");
        // SAFETY: kill with a valid pid and signal.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().unwrap()
    }

    /// A gRPC client presenting the test CA's controller certificate.
    pub async fn client(&self) -> AgentClient<Channel> {
        let id = ferro_testkit::pki::controller_identity();
        self.client_with(Some(tonic::transport::Identity::from_pem(
            &id.cert_pem,
            &id.key_pem,
        )))
        .await
        .expect("cannot connect to the agent")
    }

    /// A gRPC client over TLS that trusts the test CA and presents
    /// `identity` (none: no client certificate).
    pub async fn client_with(
        &self,
        identity: Option<tonic::transport::Identity>,
    ) -> Result<AgentClient<Channel>, tonic::transport::Error> {
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                &ferro_testkit::pki::ca().cert_pem,
            ))
            .domain_name(ferro_testkit::pki::agent_server_name(&format!(
                "test-{}",
                self.name
            )));
        if let Some(id) = identity {
            tls = tls.identity(id);
        }
        let ch = tonic::transport::Endpoint::from_shared(self.addr.clone())?
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(AgentClient::new(ch))
    }

    /// ferro-vmm processes belonging to this agent's state directory.
    pub fn vmm_pids(&self) -> Vec<u32> {
        let needle = self.state_dir.display().to_string();
        let mut pids = vec![];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains("ferro-vmm") && cmd.contains(&needle) {
                pids.push(pid);
            }
        }
        pids
    }

    /// TAPs with this agent's prefix.
    pub fn taps(&self) -> Vec<String> {
        std::fs::read_dir("/sys/class/net")
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&self.tap_prefix))
            .collect()
    }

    /// Instance cgroups under this agent's parent, in any hierarchy.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        let mut out = vec![];
        for base in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/memory",
        ] {
            let parent = Path::new(base).join(&self.cgroup_parent);
            if let Ok(rd) = std::fs::read_dir(&parent) {
                out.extend(rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()));
            }
        }
        out
    }

    /// Files left under `instances/` and `run/`.
    pub fn instance_files(&self) -> Vec<PathBuf> {
        let mut out = vec![];
        for sub in ["instances", "run"] {
            if let Ok(rd) = std::fs::read_dir(self.state_dir.join(sub)) {
                out.extend(rd.flatten().map(|e| e.path()));
            }
        }
        out
    }

    /// Assert nothing of any instance is left: process, TAP, cgroup, file.
    pub fn assert_nothing_left(&self) {
        assert_eq!(self.vmm_pids(), Vec::<u32>::new(), "VMM processes left");
        assert_eq!(self.taps(), Vec::<String>::new(), "TAPs left");
        assert_eq!(self.cgroups(), Vec::<PathBuf>::new(), "cgroups left");
        assert_eq!(self.instance_files(), Vec::<PathBuf>::new(), "files left");
    }

    /// Register the test guest as image `guest`.
    pub async fn register_guest(&self, c: &mut AgentClient<Channel>) {
        c.register_image(pb::RegisterImageRequest {
            id: "guest".into(),
            kernel_path: guest_elf().display().to_string(),
            ..Default::default()
        })
        .await
        .expect("RegisterImage");
    }

    /// The console log of instance `id`.
    pub fn console(&self, id: &str) -> String {
        std::fs::read_to_string(
            self.state_dir
                .join("instances")
                .join(id)
                .join("console.log"),
        )
        .unwrap_or_default()
    }

    /// Wait until instance `id`'s console has a line containing `needle`.
    pub fn wait_console(&self, id: &str, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.console(id).lines().any(|l| l.contains(needle)) {
            assert!(
                Instant::now() < deadline,
                "no `{needle}` on {id}'s console:\n{}",
                self.console(id)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in self.vmm_pids() {
            // SAFETY: kill with a pid read from /proc and a valid signal.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
        for t in self.taps() {
            let _ = ferro_testkit::tool("ip").args(["link", "del", &t]).output();
        }
        for base in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/memory",
        ] {
            let parent = Path::new(base).join(&self.cgroup_parent);
            if let Ok(rd) = std::fs::read_dir(&parent) {
                for e in rd.flatten().filter(|e| e.path().is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        } else {
            eprintln!("agent log kept in {}", self.state_dir.display());
        }
    }
}

/// A spec for the test guest staying up (`ferro.exit=idle`).
pub fn guest_spec(id: &str) -> pb::InstanceSpec {
    pb::InstanceSpec {
        id: id.into(),
        vcpus: 1,
        memory_mib: 64,
        image_id: "guest".into(),
        cmdline_extra: "ferro.exit=idle".into(),
        ..Default::default()
    }
}

/// Create and start `spec`, asserting it runs.
pub async fn launch(c: &mut AgentClient<Channel>, spec: pb::InstanceSpec) -> pb::Instance {
    let id = spec.id.clone();
    c.create_instance(pb::CreateInstanceRequest { spec: Some(spec) })
        .await
        .expect("CreateInstance");
    let i = c
        .start_instance(pb::StartInstanceRequest {
            id,
            volumes: None,
            resources: None,
        })
        .await
        .expect("StartInstance")
        .into_inner();
    assert_eq!(i.state(), S::Running, "{}", i.reason);
    i
}

/// GetInstance.
pub async fn get(c: &mut AgentClient<Channel>, id: &str) -> pb::Instance {
    c.get_instance(pb::GetInstanceRequest { id: id.into() })
        .await
        .expect("GetInstance")
        .into_inner()
}
