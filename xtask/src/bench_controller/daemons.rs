//! The processes and files the controller benchmarks start and remove:
//! daemons killed when dropped, scratch directories that take the agent's
//! leftovers (VMMs, cgroups, TAPs) with them, and the gRPC clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferro_proto::compute::v1 as pb;
use pb::compute_client::ComputeClient;
use pb::hosts_client::HostsClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{rpc, Binaries, Result};
use std::net::IpAddr;

/// The test image's command line extras, as `ferro up` registers it.
pub(crate) const IMAGE_CMDLINE: &str = "ferro.exit=idle";
/// How long a daemon or an instance gets to reach a state.
pub(crate) const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// A daemon we started; killed (SIGKILL, by its pid) when dropped.
pub(crate) struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub(crate) fn spawn(
        name: &'static str,
        bin: &Path,
        config: &Path,
        log: &Path,
        level: &str,
    ) -> Result<Self> {
        Self::spawn_cmd(name, Command::new(bin), config, log, level)
    }

    /// As [`Proc::spawn`], the program and its first arguments in `cmd`
    /// (e.g. `ip netns exec NS BIN`).
    pub(crate) fn spawn_cmd(
        name: &'static str,
        mut cmd: Command,
        config: &Path,
        log: &Path,
        level: &str,
    ) -> Result<Self> {
        let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let bin = format!("{cmd:?}");
        let child = cmd
            .arg("--config")
            .arg(config)
            .env("FERRO_LOG", level)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {bin}: {e}"))?;
        Ok(Self {
            name,
            child,
            log: log.to_path_buf(),
        })
    }

    /// An error naming the exit and the log's tail if it has exited.
    pub(crate) fn check(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(st)) => {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Err(format!("{} exited ({st}):\n{}", self.name, tail.join("\n")))
            }
            Err(e) => Err(format!("{}: {e}", self.name)),
        }
    }

    /// A `/proc/<pid>/status` field in MiB (`VmRSS`, `VmHWM`).
    pub(crate) fn status_mib(&self, field: &str) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(f64::NAN);
        kib / 1024.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory plus the host resources an agent rooted in it may
/// create; all removed when dropped (drop the processes first).
pub(crate) struct Scratch {
    dir: PathBuf,
    tap_prefix: String,
    cgroup_parent: String,
}

impl Scratch {
    pub(crate) fn new(tag: &str) -> Result<Self> {
        let pid = std::process::id();
        // Short: the agent's state_dir (<dir>/agent) must fit sun_path.
        let dir = PathBuf::from(format!("/tmp/fcb-{tag}{pid}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self {
            dir,
            tap_prefix: format!("fb{tag}{:03x}", pid & 0xfff),
            cgroup_parent: format!("ferro-bench-{tag}{pid}"),
        })
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Kill `ferro-vmm` processes whose command line names this directory
    /// (an agent's instances), by pid.
    fn kill_vmms(&self) {
        let needle = self.dir.to_string_lossy().into_owned();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            if comm.trim() == "ferro-vmm" && String::from_utf8_lossy(&cmdline).contains(&needle) {
                // SAFETY: kill(2) has no memory-safety preconditions; the
                // pid names a VMM our agent started under our directory.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }

    fn remove_cgroups(&self) {
        for h in ["", "cpu", "cpu,cpuacct", "memory", "pids"] {
            let parent = Path::new("/sys/fs/cgroup")
                .join(h)
                .join(&self.cgroup_parent);
            if !parent.is_dir() {
                continue;
            }
            for _ in 0..50 {
                let children = std::fs::read_dir(&parent).into_iter().flatten().flatten();
                for c in children.filter(|c| c.path().is_dir()) {
                    let _ = std::fs::remove_dir(c.path());
                }
                if std::fs::remove_dir(&parent).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn remove_taps(&self) {
        let Ok(links) = std::fs::read_dir("/sys/class/net") else {
            return;
        };
        for l in links.flatten() {
            let name = l.file_name().to_string_lossy().into_owned();
            if name.starts_with(&self.tap_prefix) {
                let _ = Command::new("ip").args(["link", "del", &name]).status();
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.kill_vmms();
        std::thread::sleep(Duration::from_millis(100));
        self.remove_cgroups();
        self.remove_taps();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> Result<SocketAddr> {
    free_port_on("127.0.0.1".parse().expect("an address"))
}

fn free_port_on(ip: IpAddr) -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind((ip, 0)).map_err(|e| e.to_string())?;
    l.local_addr().map_err(|e| e.to_string())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Starts a single-node controller in `s` (the config `ferro up` writes,
/// plus `extra` lines); returns it, its address and the admin key.
pub(crate) async fn start_controller(
    bin: &Path,
    s: &Scratch,
    extra: &str,
    level: &str,
) -> Result<(Proc, SocketAddr, String)> {
    start_controller_on(
        bin,
        s,
        "127.0.0.1".parse().expect("an address"),
        extra,
        level,
    )
    .await
}

/// As [`start_controller`], listening on `ip`.
pub(crate) async fn start_controller_on(
    bin: &Path,
    s: &Scratch,
    ip: IpAddr,
    extra: &str,
    level: &str,
) -> Result<(Proc, SocketAddr, String)> {
    let addr = free_port_on(ip)?;
    let data = s.path("controller");
    let config = s.path("controller.toml");
    write(
        &config,
        &format!(
            "node_id = 1\nlisten = \"{addr}\"\ndata_dir = \"{}\"\nregion = \"local\"\n\
             availability_zones = [\"az-1\"]\n{extra}",
            data.display()
        ),
    )?;
    let mut p = Proc::spawn(
        "ferro-controller",
        bin,
        &config,
        &s.path("controller.log"),
        level,
    )?;
    let key_file = data.join("admin.key");
    let deadline = Instant::now() + STATE_TIMEOUT;
    let key = loop {
        p.check()?;
        if let Ok(k) = std::fs::read_to_string(&key_file) {
            if !k.trim().is_empty() {
                break k.trim().to_string();
            }
        }
        if Instant::now() > deadline {
            return Err("the controller wrote no admin.key".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Ok((p, addr, key))
}

/// The bench agent's host id.
pub(crate) const BENCH_HOST: &str = "bench-host";

/// A one-time join token for [`BENCH_HOST`].
pub(crate) async fn join_token(c: &mut Compute) -> Result<String> {
    let r = c
        .create_join_token(pb::CreateJoinTokenRequest {
            host_id: BENCH_HOST.into(),
            ttl_seconds: 600,
        })
        .await
        .map_err(|e| format!("CreateJoinToken: {}", e.message()))?;
    Ok(r.into_inner().token)
}

/// Starts an agent in `s`: joining `controller` with the join token when
/// given, else standalone with TLS files from the bench CA.
pub(super) fn start_agent(
    bins: &Binaries,
    s: &Scratch,
    controller: Option<(SocketAddr, &str)>,
) -> Result<(Proc, SocketAddr)> {
    let addr = free_port()?;
    let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut text = format!(
        "host_id = \"{BENCH_HOST}\"\navailability_zone = \"az-1\"\nlisten = \"{addr}\"\n\
         state_dir = \"{}\"\nvcpus = {vcpus}\nmemory_mib = 2048\nreserved_memory_mib = 256\n\
         vmm_path = \"{}\"\ntap_prefix = \"{}\"\ncgroup_parent = \"{}\"\n",
        s.path("agent").display(),
        bins.vmm.display(),
        s.tap_prefix,
        s.cgroup_parent,
    );
    match controller {
        Some((ctl, token)) => {
            text += &format!("controller = \"http://{ctl}\"\njoin_token = \"{token}\"\n");
        }
        None => text += &crate::agent_tls::agent_config(BENCH_HOST, &s.path("")),
    }
    let config = s.path("agent.toml");
    write(&config, &text)?;
    let p = Proc::spawn(
        "ferro-agent",
        &bins.agent,
        &config,
        &s.path("agent.log"),
        "info",
    )?;
    Ok((p, addr))
}

// ----------------------------------------------------------------- gRPC

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
pub(crate) struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut r: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

pub(crate) type Compute = ComputeClient<InterceptedService<Channel, Bearer>>;
pub(crate) type Hosts = HostsClient<InterceptedService<Channel, Bearer>>;

pub(crate) async fn channel(addr: SocketAddr) -> Result<Channel> {
    Channel::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect {addr}: {e}"))
}

pub(crate) fn bearer(key: &str) -> Result<Bearer> {
    format!("Bearer {key}")
        .parse()
        .map(Bearer)
        .map_err(|_| "the admin key is not ASCII".to_string())
}

/// A compute client, once the controller answers DescribeAvailabilityZones.
pub(crate) async fn compute(p: &mut Proc, addr: SocketAddr, key: &str) -> Result<Compute> {
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        p.check()?;
        if let Ok(ch) = channel(addr).await {
            let mut c = ComputeClient::with_interceptor(ch, bearer(key)?);
            let req = pb::DescribeAvailabilityZonesRequest {};
            if c.describe_availability_zones(req).await.is_ok() {
                return Ok(c);
            }
        }
        if Instant::now() > deadline {
            return Err("the controller never answered".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The instance type with the least memory, then vCPUs (as `ferro up`).
pub(crate) async fn smallest_type(c: &mut Compute) -> Result<pb::InstanceType> {
    c.describe_instance_types(pb::DescribeInstanceTypesRequest::default())
        .await
        .map_err(rpc("DescribeInstanceTypes"))?
        .into_inner()
        .instance_types
        .into_iter()
        .min_by_key(|t| (t.memory_mib, t.vcpus))
        .ok_or_else(|| "no instance types".into())
}

pub(crate) async fn register_image(c: &mut Compute, name: &str, kernel: &Path) -> Result<String> {
    let req = pb::RegisterImageRequest {
        name: name.into(),
        kernel_path: kernel.display().to_string(),
        cmdline_extra: IMAGE_CMDLINE.into(),
        ..Default::default()
    };
    let img = c.register_image(req).await.map_err(rpc("RegisterImage"))?;
    Ok(img.into_inner().image_id)
}

pub(crate) fn state_name(s: i32) -> String {
    pb::InstanceState::try_from(s).map_or(format!("{s}"), |s| s.as_str_name().to_string())
}
