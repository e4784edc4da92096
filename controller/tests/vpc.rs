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
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::vpc::{
    authed, guest_image, in_ns, run_in, start_hosts, vpc_with_subnet, HostsSpec, Proc,
};
use ferro_proto::compute::v1 as pb;
use ferro_testkit::KillVmms;
use pb::compute_client::ComputeClient;
use tonic::transport::Channel;

async fn run(
    c: &mut ComputeClient<Channel>,
    key: &str,
    image: &str,
    subnet: &str,
    ip: &str,
) -> pb::Instance {
    run_in(c, key, image, subnet, ip, &[]).await
}

async fn wait_console(
    c: &mut ComputeClient<Channel>,
    key: &str,
    id: &str,
    want: &[String],
    dir: &std::path::Path,
) -> String {
    common::vpc::wait_console(c, key, id, want, &[dir]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vpc_spans_hosts_with_dhcp_metadata_and_isolation() {
    ferro_testkit::require_kvm_root();
    ferro_testkit::require_tool("ip");
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

    let prefix = format!("vpc-{tag}");
    let hosts = start_hosts(
        &HostsSpec {
            dir: &dir,
            net,
            prefix: &prefix,
            controllers: std::slice::from_ref(&ctl_addr),
            admin_key: &key,
            volumes: false,
        },
        &underlay.hosts,
    )
    .await;

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
        let (_, s) = vpc_with_subnet(&mut c, &key, "10.20.0.0/16", "10.20.1.0/24", "az-1").await;
        subnets.push(s);
    }
    let register = |name: &str, cmdline: String| guest_image(name, &guest, &cmdline);
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
    common::vpc::remove_cgroups(&prefix, 2);
    let _ = std::fs::remove_dir_all(&dir);
}
