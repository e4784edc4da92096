//! A VPC across two hosts under a 3-node controller, and the leader's
//! `kill -9`: three `ferro-controller` processes in the root namespace (on
//! the underlay bridge's address, distinct ports) and two "hosts", each a
//! network namespace running a `ferro-agent` and a `ferro-netd` given all
//! three controllers. Guest A pings guest B (the test guest's
//! `ferro.pingloop=1`: an echo every 100 ms) across the overlay while the
//! leader is killed; the test asserts that
//!
//! - the ping goes on: at most [`MAX_LOST`] echoes lost from just before
//!   the kill until after the checks below (printed);
//! - a new leader is elected, both agents heartbeat to it, and a new
//!   instance launched through it runs and is programmed on the other
//!   host (its FDB entry on that host's VXLAN device): netd follows the
//!   leader;
//! - the killed node, restarted, rejoins and catches up with the leader;
//! - then `kill -9` and a restart of netd, and of the agent, on A's host
//!   (inside the same ping window) cut nothing either.
//!
//! Needs KVM and root; it never skips.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::procs::Procs;
use common::vpc::{
    authed, console, guest_image, in_ns, log_tails, remove_cgroups, run_in, start_hosts,
    vpc_with_subnet, wait_console, HostsSpec,
};
use ferro_proto::compute::v1 as pb;
use ferro_testkit::KillVmms;
use pb::compute_client::ComputeClient;
use tonic::transport::Channel;

/// Echo requests that may go unanswered across the failover: one in
/// flight at each end of the window.
const MAX_LOST: u32 = 2;
/// At least this many requests must span the window (10 a second).
const MIN_SENT: u32 = 20;

/// The last `pingloop` counts (requests sent, replies) on a console.
fn pingloop(console: &str) -> Option<(u32, u32)> {
    let line = console
        .lines()
        .rev()
        .find(|l| l.contains("ferro-guest: pingloop "))?;
    let field = |name: &str| -> Option<u32> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
    };
    Some((field("sent=")?, field("replies=")?))
}

/// A compute client of the node at index `i`.
async fn node_client(procs: &Procs, i: usize) -> ComputeClient<Channel> {
    ComputeClient::connect(procs.url(i))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to controller node {}: {e}", i + 1))
}

/// Waits until `f` holds, polling every 200 ms for up to `secs`; panics
/// naming `what`, with the logs of `logs`.
async fn until<F, Fut>(what: &str, secs: u64, logs: &[&std::path::Path], mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting until {what}\n{}",
            log_tails(logs)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_survives_the_controller_leaders_kill_and_netd_follows_the_new_leader() {
    ferro_testkit::require_kvm_root();
    ferro_testkit::require_tool("ip");
    ferro_testkit::require_tool("bridge");
    let guest = ferro_testkit::guest_elf();
    let pid = std::process::id();
    let tag = format!("{:04x}", pid & 0xffff);
    // Short: an agent's state directory must fit 32 bytes.
    let dir = PathBuf::from(format!("/tmp/fc-vha-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _vmms = KillVmms(dir.clone());
    let net = 100 + (pid % 40) as u8;
    let underlay = ferro_testkit::Underlay::new(&format!("h{}", &tag[1..]), 2, net);

    // Three controller nodes on the underlay bridge's address.
    let ip = format!("10.{net}.0.254");
    let mut procs = Procs::new("vpc-ha", &[ip.as_str(); 3], 3, |_| {
        "availability_zones = [\"az-1\"]\nheartbeat_interval_ms = 200\n\
         heartbeat_timeout_ms = 5000\nreconcile_interval_ms = 50\n"
            .into()
    });
    for i in 0..3 {
        procs.spawn(i);
    }
    let key = procs.admin_key(30).await;
    let ctl_dir = procs.dir.clone();
    let logs = [dir.as_path(), ctl_dir.as_path()];
    let all = [0, 1, 2];
    let leader = procs.wait_leader(&key, &all, 30).await;
    let prefix = format!("vha-{tag}");
    let mut hosts = start_hosts(
        &HostsSpec {
            dir: &dir,
            net,
            prefix: &prefix,
            controllers: &procs.addrs,
            admin_key: &key,
            volumes: false,
        },
        &underlay.hosts,
    )
    .await;
    let mut c = node_client(&procs, leader).await;
    until("both agents heartbeat", 20, &logs, || {
        let mut c = c.clone();
        let key = key.clone();
        async move {
            c.describe_hosts(authed(&key, pb::DescribeHostsRequest::default()))
                .await
                .is_ok_and(|r| r.into_inner().hosts.len() == 2)
        }
    })
    .await;

    let (_, subnet) = vpc_with_subnet(&mut c, &key, "10.20.0.0/16", "10.20.1.0/24", "az-1").await;
    for (name, cmdline) in [
        ("idle", "ferro.exit=idle"),
        (
            "pingloop",
            "ferro.exit=idle ferro.ping=10.20.1.20 ferro.pingloop=1",
        ),
    ] {
        c.register_image(authed(&key, guest_image(name, &guest, cmdline)))
            .await
            .unwrap();
    }
    let b = run_in(&mut c, &key, "idle", &subnet, "10.20.1.20", &[]).await;
    wait_console(
        &mut c,
        &key,
        &b.instance_id,
        &["dhcp lease ip=10.20.1.20/24".to_string()],
        &logs,
    )
    .await;
    let a = run_in(&mut c, &key, "pingloop", &subnet, "10.20.1.10", &[]).await;
    assert_ne!(a.host_id, b.host_id, "spread puts A and B on two hosts");
    // A pings B: two reports in a row with every echo answered.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut prev = None;
    loop {
        let now = pingloop(&console(&mut c, &key, &a.instance_id).await);
        if let (Some((s0, r0)), Some((s1, r1))) = (prev, now) {
            if s1 > s0 && r1.saturating_sub(r0) >= s1 - s0 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "A's pings never reached B steadily (last report {now:?}):\n{}",
            log_tails(&logs)
        );
        prev = now;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }

    // kill -9 of the leader while A pings B.
    let (sent0, replies0) = pingloop(&console(&mut c, &key, &a.instance_id).await)
        .expect("A's console has pingloop lines");
    procs.kill9(leader);
    // Heartbeats seen after this went to another node.
    let killed_at = now_ms();
    let others: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
    let new_leader = procs.wait_leader(&key, &others, 20).await;
    let mut c = node_client(&procs, new_leader).await;

    // Both agents heartbeat to the new leader.
    until("both agents heartbeat to the new leader", 20, &logs, || {
        let (mut c, key) = (c.clone(), key.clone());
        async move {
            let Ok(r) = c
                .describe_hosts(authed(&key, pb::DescribeHostsRequest::default()))
                .await
            else {
                return false;
            };
            let hosts = r.into_inner().hosts;
            hosts.len() == 2 && hosts.iter().all(|h| h.last_seen_ms > killed_at)
        }
    })
    .await;

    // An instance launched through the new leader runs (its host's agent
    // and netd follow: it gets its lease) and the other host's netd
    // programs it.
    let n = run_in(&mut c, &key, "idle", &subnet, "10.20.1.30", &[]).await;
    wait_console(
        &mut c,
        &key,
        &n.instance_id,
        &["dhcp lease ip=10.20.1.30/24".to_string()],
        &logs,
    )
    .await;
    let other = hosts
        .iter()
        .find(|h| h.host_id != n.host_id)
        .expect("two hosts");
    let mac = n.mac_address.clone();
    until(
        &format!(
            "the new instance's MAC {mac} is in {}'s FDB (netd follows the new leader)",
            other.host_id
        ),
        10,
        &logs,
        || {
            let (ns, mac) = (other.ns.clone(), mac.clone());
            async move { in_ns(&ns, &["bridge", "fdb", "show"]).contains(&mac) }
        },
    )
    .await;

    // The killed node restarts, rejoins and catches up.
    let applied = procs
        .status(new_leader, &key)
        .await
        .and_then(|s| s.node)
        .map(|n| n.last_applied_index)
        .expect("the new leader answers ClusterStatus");
    procs.spawn(leader);
    until(
        &format!(
            "node {} rejoins as a follower and applies index {applied}",
            leader + 1
        ),
        30,
        &logs,
        || {
            let procs = &procs;
            let key = key.clone();
            async move {
                procs.status(leader, &key).await.is_some_and(|s| {
                    s.leader.is_some()
                        && s.node.is_some_and(|n| {
                            n.role == "follower" && n.last_applied_index >= applied
                        })
                })
            }
        },
    )
    .await;

    // And a kill -9 and restart of netd, then of the agent, on A's host.
    let host_a = hosts
        .iter_mut()
        .find(|h| h.host_id == a.host_id)
        .expect("A's host");
    let ns_a = host_a.ns.clone();
    host_a.netd.restart(&ns_a);
    tokio::time::sleep(Duration::from_secs(2)).await;
    host_a.agent.restart(&ns_a);
    // Heartbeats seen after this come from the new agent.
    let restarted_at = now_ms();
    let host_a_id = a.host_id.clone();
    until("A's restarted agent heartbeats", 20, &logs, || {
        let (mut c, key, id) = (c.clone(), key.clone(), host_a_id.clone());
        async move {
            let Ok(r) = c
                .describe_hosts(authed(&key, pb::DescribeHostsRequest::default()))
                .await
            else {
                return false;
            };
            r.into_inner()
                .hosts
                .iter()
                .any(|h| h.host_id == id && h.last_seen_ms > restarted_at)
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The ping went on all along.
    let (sent1, replies1) = pingloop(&console(&mut c, &key, &a.instance_id).await)
        .expect("A's console has pingloop lines");
    let (sent, replies) = (sent1 - sent0, replies1 - replies0);
    let lost = sent.saturating_sub(replies);
    println!(
        "A → B ping across the leader's kill -9, the new leader's election, the old \
         leader's return and restarts of netd and the agent on A's host: {sent} echo \
         requests, {replies} replies, {lost} lost"
    );
    assert!(
        sent >= MIN_SENT,
        "only {sent} echo requests spanned the failover (want at least {MIN_SENT})"
    );
    assert!(
        lost <= MAX_LOST,
        "{lost} of {sent} echoes lost across the failover (at most {MAX_LOST} allowed)\n{}",
        log_tails(&logs)
    );

    c.terminate_instances(authed(
        &key,
        pb::TerminateInstancesRequest {
            instance_ids: vec![a.instance_id, b.instance_id, n.instance_id],
        },
    ))
    .await
    .unwrap();
    // Give the agents a moment to stop the guests before the namespaces go.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(hosts);
    drop(underlay);
    remove_cgroups(&prefix, 2);
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}
