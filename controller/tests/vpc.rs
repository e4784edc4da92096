//! A VPC across hosts, end to end with every real process: one
//! `ferro-controller` in the root namespace and two "hosts", each a network
//! namespace on a shared underlay bridge running a `ferro-agent` and a
//! `ferro-netd`; instances are the project's test guest under `ferro-vmm`.
//! Proven with the guests' own traffic: DHCP gives each its address, IMDSv2
//! its own instance id, a guest pings another on the other host; a guest of
//! another VPC with the same block reaches nothing; a guest of another
//! subnet reaches it through the VPC router; a security group lets
//! a ping in only once a rule allows it; a terminated instance's entries
//! leave the other host. Needs KVM and root.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferro_proto::compute::v1 as pb;
use pb::compute_client::ComputeClient;
use tonic::transport::Channel;

/// Kills the child process when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn in_ns(ns: &str, args: &[&str]) -> String {
    let out = ferro_testkit::tool("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn authed<T>(key: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// Kills, when dropped, every `ferro-vmm` whose command line names `dir`
/// (the agents' instances: they outlive a killed agent by design).
struct KillVmms(PathBuf);

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

/// One host: an agent and a netd in namespace `ns`.
struct HostProcs {
    _netd: Proc,
    _agent: Proc,
}

fn spawn_in(ns: &str, bin: &Path, cfg: &Path, log: &Path) -> Proc {
    let child = ferro_testkit::netns_daemon(ns, bin)
        .arg("--config")
        .arg(cfg)
        .env("FERRO_LOG", "info,ferro_netd=debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    Proc(child)
}

async fn console(c: &mut ComputeClient<Channel>, key: &str, id: &str) -> String {
    let req = pb::GetConsoleOutputRequest {
        instance_id: id.into(),
        ..Default::default()
    };
    c.get_console_output(authed(key, req))
        .await
        .map(|r| String::from_utf8_lossy(&r.into_inner().output).into_owned())
        .unwrap_or_default()
}

/// Waits until instance `id`'s console has every line of `want`.
async fn wait_console(
    c: &mut ComputeClient<Channel>,
    key: &str,
    id: &str,
    want: &[String],
    dir: &Path,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let out = console(c, key, id).await;
        if want.iter().all(|w| out.contains(w.as_str())) {
            return out;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = ["controller", "agent-1", "netd-1", "agent-2", "netd-2"]
                .iter()
                .map(|f| {
                    let t =
                        std::fs::read_to_string(dir.join(format!("{f}.log"))).unwrap_or_default();
                    let tail: Vec<&str> = t.lines().rev().take(40).collect();
                    format!(
                        "--- {f}:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                })
                .collect();
            if let Ok(secs) = std::env::var("FERRO_TEST_HOLD_SECS") {
                // Leave everything up for a look by hand.
                eprintln!("holding for {secs} s; logs in {}", dir.display());
                std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(60)));
            }
            panic!(
                "{id}: the console never showed {want:?}:\n{out}\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn run(
    c: &mut ComputeClient<Channel>,
    key: &str,
    image: &str,
    subnet: &str,
    ip: &str,
) -> pb::Instance {
    run_in(c, key, image, subnet, ip, &[]).await
}

async fn run_in(
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
        .unwrap()
        .into_inner()
        .instances
        .remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vpc_spans_hosts_with_dhcp_metadata_and_isolation() {
    ferro_testkit::require_kvm_root();
    ferro_testkit::require_tool("ip");
    let vmm = ferro_testkit::workspace_bin("ferro-vmm", "ferro-vmm");
    let agent_bin = ferro_testkit::workspace_bin("ferro-agent", "ferro-agent");
    let netd_bin = ferro_testkit::workspace_bin("ferro-netd", "ferro-netd");
    let guest = ferro_testkit::guest_elf();
    let pid = std::process::id();
    let tag = format!("{:04x}", pid & 0xffff);
    let dir = PathBuf::from(format!("/tmp/fc-vpc-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let net = 200 + (pid % 50) as u8;
    let _vmms = KillVmms(dir.clone());
    let underlay = ferro_testkit::Underlay::new(&tag, 2, net);

    // The controller in the root namespace, on the underlay bridge.
    let port = std::net::TcpListener::bind(format!("10.{net}.0.254:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ctl_addr = format!("10.{net}.0.254:{port}");
    let ctl_cfg = dir.join("controller.toml");
    std::fs::write(
        &ctl_cfg,
        format!(
            "node_id = 1\nlisten = \"{ctl_addr}\"\ndata_dir = \"{}\"\n\
             availability_zones = [\"az-1\"]\nheartbeat_interval_ms = 200\n\
             heartbeat_timeout_ms = 5000\nreconcile_interval_ms = 50\n",
            dir.join("ctl").display()
        ),
    )
    .unwrap();
    let mut ctl = Command::new(env!("CARGO_BIN_EXE_ferro-controller"))
        .arg("--config")
        .arg(&ctl_cfg)
        .env("FERRO_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("controller.log")).unwrap())
        .spawn()
        .unwrap();
    let mut key = String::new();
    for line in BufReader::new(ctl.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(k) = line.strip_prefix("ferro-controller: admin API key: ") {
            key = k.to_string();
            break;
        }
    }
    let _ctl = Proc(ctl);
    assert!(key.starts_with("fk_"), "no admin key printed");

    let mut hosts = Vec::new();
    for (n, ns) in underlay.hosts.iter().enumerate() {
        let h = n + 1;
        let host_id = format!("vpc-{tag}-h{h}");
        let token = common::join_token(std::slice::from_ref(&ctl_addr), &key, &host_id).await;
        let state = dir.join(format!("a{h}"));
        let agent_cfg = dir.join(format!("agent-{h}.toml"));
        std::fs::write(
            &agent_cfg,
            format!(
                "host_id = \"{host_id}\"\navailability_zone = \"az-1\"\n\
                 listen = \"10.{net}.0.{h}:7420\"\nstate_dir = \"{}\"\nvcpus = 4\n\
                 memory_mib = 1024\nreserved_memory_mib = 0\nvmm_path = \"{}\"\n\
                 tap_prefix = \"fv{h}\"\ncgroup_parent = \"ferro-vpc-{pid}-{h}\"\n\
                 kernel_cmdline = \"console=ttyS0\"\nstop_timeout_ms = 3000\n\
                 controller = \"http://{ctl_addr}\"\njoin_token = \"{token}\"\n\
                 heartbeat_interval_ms = 200\n",
                state.display(),
                vmm.display()
            ),
        )
        .unwrap();
        let agent = spawn_in(
            ns,
            &agent_bin,
            &agent_cfg,
            &dir.join(format!("agent-{h}.log")),
        );
        let netd_cfg = dir.join(format!("netd-{h}.toml"));
        std::fs::write(
            &netd_cfg,
            format!(
                "host_id = \"{host_id}\"\ncontrollers = [\"http://{ctl_addr}\"]\n\
                 underlay_ip = \"10.{net}.0.{h}\"\ncredentials_dir = \"{}\"\n",
                state.join("credentials").display()
            ),
        )
        .unwrap();
        let netd = spawn_in(ns, &netd_bin, &netd_cfg, &dir.join(format!("netd-{h}.log")));
        hosts.push(HostProcs {
            _netd: netd,
            _agent: agent,
        });
    }

    let mut c = ComputeClient::connect(format!("http://{ctl_addr}"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hosts = c
            .describe_hosts(authed(&key, pb::DescribeHostsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .hosts;
        if hosts.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the agents never heartbeated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Two VPCs with the same block, one subnet each.
    let mut subnets = Vec::new();
    for _ in 0..2 {
        let vpc = c
            .create_vpc(authed(
                &key,
                pb::CreateVpcRequest {
                    cidr_block: "10.20.0.0/16".into(),
                    tags: vec![],
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let s = c
            .create_subnet(authed(
                &key,
                pb::CreateSubnetRequest {
                    vpc_id: vpc.vpc_id.clone(),
                    cidr_block: "10.20.1.0/24".into(),
                    availability_zone: "az-1".into(),
                    tags: vec![],
                },
            ))
            .await
            .unwrap()
            .into_inner();
        subnets.push(s.subnet_id);
    }
    let register = |name: &str, cmdline: String| pb::RegisterImageRequest {
        name: name.into(),
        kernel_path: guest.display().to_string(),
        cmdline_extra: cmdline,
        ..Default::default()
    };
    c.register_image(authed(&key, register("idle", "ferro.exit=idle".into())))
        .await
        .unwrap();
    let b = run(&mut c, &key, "idle", &subnets[0], "10.20.1.20").await;
    let b_lines = [
        "dhcp lease ip=10.20.1.20/24 router=10.20.1.1 dns=10.20.1.2".to_string(),
        format!("imds instance-id={}", b.instance_id),
        "imds local-ipv4=10.20.1.20".to_string(),
    ];
    wait_console(&mut c, &key, &b.instance_id, &b_lines, &dir).await;

    // A, on the other host (spread), pings B across the overlay.
    c.register_image(authed(
        &key,
        register("pinger", "ferro.exit=idle ferro.ping=10.20.1.20".into()),
    ))
    .await
    .unwrap();
    let a = run(&mut c, &key, "pinger", &subnets[0], "10.20.1.10").await;
    assert_ne!(a.host_id, b.host_id, "spread puts them on two hosts");
    let a_lines = [
        "dhcp lease ip=10.20.1.10/24".to_string(),
        format!("imds instance-id={}", a.instance_id),
        "ping 10.20.1.20 replies=3/3".to_string(),
    ];
    wait_console(&mut c, &key, &a.instance_id, &a_lines, &dir).await;

    // X, in the other VPC with A's address, on A's host: B is not there.
    let x = run(&mut c, &key, "pinger", &subnets[1], "10.20.1.10").await;
    let x_lines = [
        "dhcp lease ip=10.20.1.10/24".to_string(),
        format!("imds instance-id={}", x.instance_id),
        "ping 10.20.1.20 replies=0/3".to_string(),
    ];
    wait_console(&mut c, &key, &x.instance_id, &x_lines, &dir).await;

    // Between subnets of a VPC, through the VPC router: R in another
    // subnet of B's VPC pings B.
    let other_subnet = c
        .create_subnet(authed(
            &key,
            pb::CreateSubnetRequest {
                vpc_id: b.vpc_id.clone(),
                cidr_block: "10.20.2.0/24".into(),
                availability_zone: "az-1".into(),
                tags: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .subnet_id;
    let r = run(&mut c, &key, "pinger", &other_subnet, "10.20.2.10").await;
    let r_lines = [
        "dhcp lease ip=10.20.2.10/24 router=10.20.2.1".to_string(),
        "ping 10.20.1.20 replies=3/3".to_string(),
    ];
    wait_console(&mut c, &key, &r.instance_id, &r_lines, &dir).await;
    c.terminate_instances(authed(
        &key,
        pb::TerminateInstancesRequest {
            instance_ids: vec![r.instance_id.clone()],
        },
    ))
    .await
    .unwrap();

    // Security groups with the guests' own traffic: C's group lets nothing
    // in, so a ping from the default group gets nothing; once the group
    // allows ICMP from the default group (a rule added to a group in use),
    // the next one gets its replies.
    let vpc1 = b.vpc_id.clone();
    let closed = c
        .create_security_group(authed(
            &key,
            pb::CreateSecurityGroupRequest {
                vpc_id: vpc1.clone(),
                group_name: "closed".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let target = run_in(
        &mut c,
        &key,
        "idle",
        &subnets[0],
        "10.20.1.30",
        std::slice::from_ref(&closed.group_id),
    )
    .await;
    wait_console(
        &mut c,
        &key,
        &target.instance_id,
        &["imds local-ipv4=10.20.1.30".to_string()],
        &dir,
    )
    .await;
    c.register_image(authed(
        &key,
        register("ping-c", "ferro.exit=idle ferro.ping=10.20.1.30".into()),
    ))
    .await
    .unwrap();
    let denied = run(&mut c, &key, "ping-c", &subnets[0], "10.20.1.40").await;
    wait_console(
        &mut c,
        &key,
        &denied.instance_id,
        &["ping 10.20.1.30 replies=0/3".to_string()],
        &dir,
    )
    .await;
    let default_group = b.security_group_ids[0].clone();
    c.authorize_security_group_rules(authed(
        &key,
        pb::SecurityGroupRulesRequest {
            group_id: closed.group_id.clone(),
            egress: false,
            rules: vec![pb::SecurityGroupRule {
                protocol: "icmp".into(),
                group_id: default_group,
                ..Default::default()
            }],
        },
    ))
    .await
    .unwrap();
    let allowed = run(&mut c, &key, "ping-c", &subnets[0], "10.20.1.41").await;
    wait_console(
        &mut c,
        &key,
        &allowed.instance_id,
        &["ping 10.20.1.30 replies=3/3".to_string()],
        &dir,
    )
    .await;
    c.terminate_instances(authed(
        &key,
        pb::TerminateInstancesRequest {
            instance_ids: vec![
                target.instance_id.clone(),
                denied.instance_id.clone(),
                allowed.instance_id.clone(),
            ],
        },
    ))
    .await
    .unwrap();

    // Terminating B removes its entries from A's host.
    let host_of_a = underlay.hosts[if a.host_id.ends_with("h1") { 0 } else { 1 }].clone();
    let fdb = in_ns(&host_of_a, &["bridge", "fdb", "show"]);
    assert!(
        fdb.contains(&b.mac_address),
        "B's MAC is on A's host:\n{fdb}"
    );
    c.terminate_instances(authed(
        &key,
        pb::TerminateInstancesRequest {
            instance_ids: vec![b.instance_id.clone()],
        },
    ))
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let fdb = in_ns(&host_of_a, &["bridge", "fdb", "show"]);
        if !fdb.contains(&b.mac_address) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B's FDB entry stayed on A's host:\n{fdb}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.terminate_instances(authed(
        &key,
        pb::TerminateInstancesRequest {
            instance_ids: vec![a.instance_id.clone(), x.instance_id.clone()],
        },
    ))
    .await
    .unwrap();
    // Give the agents a moment to stop the guests before the namespaces go.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(hosts);
    drop(underlay);
    for h in 1..=2 {
        for base in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/memory",
        ] {
            let _ = std::fs::remove_dir(Path::new(base).join(format!("ferro-vpc-{pid}-{h}")));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
