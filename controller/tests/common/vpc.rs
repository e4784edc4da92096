//! Fixtures of the multi-host VPC tests (`vpc.rs`, `vpc_ha.rs`): real
//! `ferro-agent` and `ferro-netd` processes in the namespaces of a
//! [`ferro_testkit::Underlay`], instances of the test guest, and their
//! consoles read through the controller.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferro_proto::compute::v1 as pb;
use pb::compute_client::ComputeClient;
use tonic::transport::Channel;

pub use ferro_testkit::{spawn_args_in, Proc};

/// Runs `args` in namespace `ns`; its standard output.
pub fn in_ns(ns: &str, args: &[&str]) -> String {
    let out = ferro_testkit::tool("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `msg` with `authorization: Bearer <key>`.
pub fn authed<T>(key: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// A daemon of a host: its process and how to start it again.
pub struct Daemon {
    pub proc: Proc,
    bin: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
}

impl Daemon {
    /// `bin --config cfg` in `ns`.
    fn start(ns: &str, bin: PathBuf, cfg: PathBuf, log: PathBuf) -> Self {
        Self::start_args(ns, bin, vec!["--config".into(), cfg.into()], log)
    }

    /// `bin args…` in `ns`.
    fn start_args(ns: &str, bin: PathBuf, args: Vec<OsString>, log: PathBuf) -> Self {
        Daemon {
            proc: spawn_args_in(ns, &bin, &args, &log),
            bin,
            args,
            log,
        }
    }

    /// `kill -9`, then the same daemon again in `ns` (its log appended
    /// to `<log>.restarted`).
    pub fn restart(&mut self, ns: &str) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
        let log = self.log.with_extension("restarted.log");
        self.proc = spawn_args_in(ns, &self.bin, &self.args, &log);
    }
}

/// One host: an agent and a netd in its namespace (and a blockd when the
/// hosts offer volumes).
pub struct HostProcs {
    /// The host's id (`<prefix>-h<n>`).
    pub host_id: String,
    /// Its namespace.
    pub ns: String,
    pub netd: Daemon,
    pub agent: Daemon,
    pub blockd: Option<Daemon>,
    /// blockd's data directory (`<dir>/b<n>`).
    pub blockd_dir: PathBuf,
}

/// What the hosts of a test share.
pub struct HostsSpec<'a> {
    /// Scratch directory: configs, state (`a<n>/`) and logs
    /// (`agent-<n>.log`, `netd-<n>.log`).
    pub dir: &'a Path,
    /// The underlay's second octet (`10.<net>.0.<n>` is host n).
    pub net: u8,
    /// Host ids are `<prefix>-h<n>`; cgroups `ferro-<prefix>-<n>`.
    pub prefix: &'a str,
    /// Every controller node, `ip:port`.
    pub controllers: &'a [String],
    /// The admin key (for the join tokens).
    pub admin_key: &'a str,
    /// Offer 20 GiB of volume space per host and run a `ferro-blockd`
    /// (data in `<dir>/b<n>`, replica server on `10.<net>.0.<n>:7430`).
    pub volumes: bool,
}

/// A `ferro-agent` and a `ferro-netd` in each namespace of `nss` (host n
/// at index n - 1), both given every controller of `spec`.
pub async fn start_hosts(spec: &HostsSpec<'_>, nss: &[String]) -> Vec<HostProcs> {
    let vmm = ferro_testkit::workspace_bin("ferro-vmm", "ferro-vmm");
    let agent_bin = ferro_testkit::workspace_bin("ferro-agent", "ferro-agent");
    let netd_bin = ferro_testkit::workspace_bin("ferro-netd", "ferro-netd");
    let (dir, net, prefix) = (spec.dir, spec.net, spec.prefix);
    let urls: Vec<String> = spec
        .controllers
        .iter()
        .map(|a| format!("http://{a}"))
        .collect();
    let mut hosts = Vec::new();
    for (n, ns) in nss.iter().enumerate() {
        let h = n + 1;
        let host_id = format!("{prefix}-h{h}");
        let token = super::join_token(spec.controllers, spec.admin_key, &host_id).await;
        let state = dir.join(format!("a{h}"));
        let blockd_dir = dir.join(format!("b{h}"));
        let agent_cfg = dir.join(format!("agent-{h}.toml"));
        std::fs::write(
            &agent_cfg,
            format!(
                "host_id = \"{host_id}\"\navailability_zone = \"az-1\"\n\
                 listen = \"10.{net}.0.{h}:7420\"\nstate_dir = \"{}\"\nvcpus = 4\n\
                 memory_mib = 1024\nreserved_memory_mib = 0\nvmm_path = \"{}\"\n\
                 tap_prefix = \"fv{h}\"\ncgroup_parent = \"ferro-{prefix}-{h}\"\n\
                 kernel_cmdline = \"console=ttyS0\"\nstop_timeout_ms = 3000\n\
                 controller = \"{}\"\njoin_token = \"{token}\"\n\
                 heartbeat_interval_ms = 200\n{}",
                state.display(),
                vmm.display(),
                urls.join(","),
                if spec.volumes {
                    format!(
                        "volume_capacity_gib = 20\nblockd_socket_dir = \"{}\"\n",
                        blockd_dir.join("vhost").display()
                    )
                } else {
                    String::new()
                }
            ),
        )
        .unwrap();
        let agent = Daemon::start(
            ns,
            agent_bin.clone(),
            agent_cfg,
            dir.join(format!("agent-{h}.log")),
        );
        let netd_cfg = dir.join(format!("netd-{h}.toml"));
        let quoted: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
        std::fs::write(
            &netd_cfg,
            format!(
                "host_id = \"{host_id}\"\ncontrollers = [{}]\n\
                 underlay_ip = \"10.{net}.0.{h}\"\ncredentials_dir = \"{}\"\n",
                quoted.join(", "),
                state.join("credentials").display()
            ),
        )
        .unwrap();
        let netd = Daemon::start(
            ns,
            netd_bin.clone(),
            netd_cfg,
            dir.join(format!("netd-{h}.log")),
        );
        let blockd = spec.volumes.then(|| {
            // blockd speaks for the host with the key the agent's join
            // brought.
            let key = state.join("credentials").join("host.key");
            let deadline = Instant::now() + Duration::from_secs(30);
            while !key.exists() {
                assert!(Instant::now() < deadline, "host {h} never joined");
                std::thread::sleep(Duration::from_millis(100));
            }
            let mut args: Vec<OsString> = Vec::new();
            for u in &urls {
                args.extend(["--controller".into(), u.into()]);
            }
            args.extend([
                "--host-id".into(),
                host_id.clone().into(),
                "--api-key-file".into(),
                key.into(),
                "--data-dir".into(),
                blockd_dir.clone().into(),
                "--replica-listen".into(),
                format!("10.{net}.0.{h}:7430").into(),
            ]);
            Daemon::start_args(
                ns,
                ferro_testkit::workspace_bin("ferro-blockd", "ferro-blockd"),
                args,
                dir.join(format!("blockd-{h}.log")),
            )
        });
        hosts.push(HostProcs {
            host_id,
            ns: ns.clone(),
            netd,
            agent,
            blockd,
            blockd_dir,
        });
    }
    hosts
}

/// Removes the cgroups [`start_hosts`] named after `prefix` for `n` hosts.
pub fn remove_cgroups(prefix: &str, n: usize) {
    for h in 1..=n {
        for base in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/memory",
        ] {
            let _ = std::fs::remove_dir(Path::new(base).join(format!("ferro-{prefix}-{h}")));
        }
    }
}

/// Instance `id`'s console through `c` (empty if it cannot be read now).
pub async fn console(c: &mut ComputeClient<Channel>, key: &str, id: &str) -> String {
    let req = pb::GetConsoleOutputRequest {
        instance_id: id.into(),
        ..Default::default()
    };
    c.get_console_output(authed(key, req))
        .await
        .map(|r| String::from_utf8_lossy(&r.into_inner().output).into_owned())
        .unwrap_or_default()
}

/// The last 40 lines of every `*.log` in `dirs`, for failure messages.
pub fn log_tails(dirs: &[&Path]) -> String {
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let t = std::fs::read_to_string(f).unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(40).collect();
            format!(
                "--- {}:\n{}",
                f.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits up to 40 s until instance `id`'s console (read through `c`) has
/// every line of `want`; panics with the console and the logs in `logs`.
pub async fn wait_console(
    c: &mut ComputeClient<Channel>,
    key: &str,
    id: &str,
    want: &[String],
    logs: &[&Path],
) -> String {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let out = console(c, key, id).await;
        if want.iter().all(|w| out.contains(w.as_str())) {
            return out;
        }
        if Instant::now() > deadline {
            if let Ok(secs) = std::env::var("FERRO_TEST_HOLD_SECS") {
                // Leave everything up for a look by hand.
                eprintln!("holding for {secs} s; logs in {logs:?}");
                std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(60)));
            }
            panic!(
                "{id}: the console never showed {want:?}:\n{out}\n{}",
                log_tails(logs)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// RunInstances of one `f1.nano` of `image` in `subnet` at `ip`, spread
/// over the hosts, in `groups` (none: the VPC's default group).
pub async fn run_in(
    c: &mut ComputeClient<Channel>,
    key: &str,
    image: &str,
    subnet: &str,
    ip: &str,
    groups: &[String],
) -> pb::Instance {
    let req = pb::RunInstancesRequest {
        count: 1,
        instance_type: "f1.nano".into(),
        image_id: image.into(),
        subnet_id: subnet.into(),
        private_ip_address: ip.into(),
        strategy: pb::PlacementStrategy::Spread as i32,
        security_group_ids: groups.to_vec(),
        ..Default::default()
    };
    c.run_instances(authed(key, req))
        .await
        .unwrap_or_else(|e| panic!("RunInstances {image} at {ip}: {e}"))
        .into_inner()
        .instances
        .remove(0)
}

/// A RegisterImage of the test guest `guest` named `name` with `cmdline`.
pub fn guest_image(name: &str, guest: &Path, cmdline: &str) -> pb::RegisterImageRequest {
    pb::RegisterImageRequest {
        name: name.into(),
        kernel_path: guest.display().to_string(),
        cmdline_extra: cmdline.into(),
        ..Default::default()
    }
}

/// A new VPC of block `vpc_cidr` with one subnet `subnet_cidr` in zone
/// `az`: (VPC id, subnet id).
pub async fn vpc_with_subnet(
    c: &mut ComputeClient<Channel>,
    key: &str,
    vpc_cidr: &str,
    subnet_cidr: &str,
    az: &str,
) -> (String, String) {
    let vpc = c
        .create_vpc(authed(
            key,
            pb::CreateVpcRequest {
                cidr_block: vpc_cidr.into(),
                tags: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .vpc_id;
    let subnet = c
        .create_subnet(authed(
            key,
            pb::CreateSubnetRequest {
                vpc_id: vpc.clone(),
                cidr_block: subnet_cidr.into(),
                availability_zone: az.into(),
                tags: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .subnet_id;
    (vpc, subnet)
}
