//! ferro-netd on several "hosts" (network namespaces on one underlay
//! bridge), each running the real binary against a fake controller, with
//! "instances" (namespaces on veths named as the state's TAPs). Needs
//! root; a missing precondition fails the test with a message.

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use ferro_proto::compute::v1::{GroupOnHost, HostNetwork, SecurityGroup, SecurityGroupRule};

use support::dhcp_client::{self, Lease};
use support::ping::{ping, tcp_echo};
use support::{iface, wait_until, Cluster, Iface, Vpc};

const WAIT: Duration = Duration::from_secs(15);
const TICK: Duration = Duration::from_millis(200);

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, last)
}

/// Publish `vpcs` with every local interface in a group that allows
/// everything: the fixture's states have no groups, and without one netd
/// lets no new IPv4 reach an interface. The group is added under the
/// same revision, before netd's next round.
fn publish_open(c: &mut Cluster, vpcs: &[Vpc]) {
    c.publish(vpcs);
    for h in &c.hosts {
        h.state.send_modify(open_group);
    }
}

fn open_group(n: &mut HostNetwork) {
    let all = || SecurityGroupRule {
        protocol: "all".into(),
        cidr: "0.0.0.0/0".into(),
        ..Default::default()
    };
    n.groups.push(GroupOnHost {
        group: Some(SecurityGroup {
            group_id: "sg-open".into(),
            ingress: vec![all()],
            egress: vec![all()],
            ..Default::default()
        }),
        member_ips: Vec::new(),
    });
    for l in n.vpcs.iter_mut().flat_map(|v| v.local.iter_mut()) {
        l.security_group_ids.push("sg-open".into());
    }
}

/// Plug every interface of `vpcs` (with its own MAC) and wait until each
/// TAP is up in its VPC's bridge.
fn plug_all(c: &mut Cluster, vpcs: &[Vpc]) {
    for v in vpcs {
        for i in &v.ifaces {
            c.plug(&i.id, i.host, &i.tap, &i.mac);
        }
    }
}

fn wait_attached(c: &Cluster, vpcs: &[Vpc]) {
    for v in vpcs {
        let br = format!("fbr{:x}", v.vni);
        for i in &v.ifaces {
            assert!(
                wait_until(WAIT, || c.attached(i.host, &i.tap, &br)),
                "{} of {} never joined {br} on host {}",
                i.tap,
                i.id,
                i.host
            );
        }
    }
}

fn configure_all(c: &Cluster, ifaces: &[&Iface]) {
    for i in ifaces {
        c.configure(&i.id, &format!("{}/24", i.ip));
    }
}

/// busybox's `udhcpc` on `ns`'s eth0 (3 tries, 1 s apart, no address
/// applied): what its script saw, one line per event.
fn udhcpc(ns: &str) -> String {
    assert!(std::path::Path::new("/bin/busybox").exists(), "precondition missing: /bin/busybox (apt package busybox-static; deploy/install-deps.sh installs it)");
    let script = std::env::temp_dir().join(format!("ferro-udhcpc-{}.sh", std::process::id()));
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"$1 ip=$ip subnet=$subnet router=$router dns=$dns mtu=$mtu \
         hostname=$hostname lease=$lease serverid=$serverid\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", ns, "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n",
        ])
        .args(["-t", "3", "-T", "1", "-s"])
        .arg(&script)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn expected_lease(last: u8, vni: u32, acked_to: [u8; 6]) -> Lease {
    Lease {
        ip: ip(last),
        mask: Some(Ipv4Addr::new(255, 255, 255, 0)),
        router: vec![ip(1)],
        dns: vec![ip(2)],
        mtu: Some(1450),
        hostname: Some(format!("ip-10-0-0-{last}")),
        lease_secs: Some(3600),
        server_id: Some(ip(1)),
        server_mac: ferro_netd::desired::router_mac(vni),
        server_ip: ip(1),
        acked_to,
    }
}

/// DHCP gives each interface exactly its lease (unicast, or broadcast
/// when asked), a MAC that is not the interface's gets nothing even on
/// the interface's TAP, and instances of one VPC on two hosts reach each
/// other over VXLAN (ICMP and TCP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t01_dhcp_leases_and_cross_host_traffic() {
    let mut c = Cluster::start("a", 2).await;
    let a1 = iface("a1", 0, 0xa1, 4, "fct1");
    let a2 = iface("a2", 1, 0xa2, 5, "fct2");
    let a3 = iface("a3", 0, 0xa3, 6, "fct3");
    let vpcs = vec![Vpc::new(
        "vpc-a",
        0x10,
        vec![a1.clone(), a2.clone(), a3.clone()],
    )];
    c.plug("a1", 0, "fct1", &a1.mac);
    c.plug("a2", 1, "fct2", &a2.mac);
    // a3's TAP carries a guest whose MAC is not a3's.
    c.plug("f1", 0, "fct3", "02:00:00:00:00:ee");
    publish_open(&mut c, &vpcs);
    for (h, tap) in [(0, "fct1"), (1, "fct2"), (0, "fct3")] {
        assert!(wait_until(WAIT, || c.attached(h, tap, "fbr10")), "{tap}");
    }

    let got = dhcp_client::obtain(c.inst("a1"), &a1.mac, false).await;
    let mac_a1 = ferro_netd::desired::parse_mac(&a1.mac).unwrap();
    assert_eq!(got, Some(expected_lease(4, 0x10, mac_a1)));
    let got = dhcp_client::obtain(c.inst("a2"), &a2.mac, true).await;
    assert_eq!(got, Some(expected_lease(5, 0x10, [0xff; 6])));
    let foreign = dhcp_client::obtain(c.inst("f1"), "02:00:00:00:00:ee", false).await;
    assert_eq!(foreign, None, "a foreign MAC got a lease");
    // A client nobody here wrote: busybox's udhcpc gets exactly the lease,
    // and nothing for the foreign MAC.
    let (n1, nf) = (c.inst("a1").to_string(), c.inst("f1").to_string());
    let (real, real_foreign) = tokio::task::spawn_blocking(move || (udhcpc(&n1), udhcpc(&nf)))
        .await
        .unwrap();
    assert!(
        real.contains(
            "bound ip=10.0.0.4 subnet=255.255.255.0 router=10.0.0.1 dns=10.0.0.2 \
             mtu=1450 hostname=ip-10-0-0-4 lease=3600 serverid=10.0.0.1"
        ),
        "udhcpc's lease:\n{real}"
    );
    assert!(
        !real_foreign.contains("bound"),
        "udhcpc of a foreign MAC:\n{real_foreign}"
    );

    assert!(c
        .fdb(0, "fvx10")
        .contains("02:00:00:00:00:a2 dst 10.99.0.2 self permanent"));
    assert!(c
        .neigh(0, "fvx10")
        .contains("10.0.0.5 lladdr 02:00:00:00:00:a2 PERMANENT"));
    configure_all(&c, &[&a1, &a2]);
    let (n1, n2) = (c.inst("a1").to_string(), c.inst("a2").to_string());
    let (st, back) = tokio::task::spawn_blocking(move || {
        (
            ping(&n1, ip(5), 5, TICK),
            tcp_echo(&n2, ip(5), &n1, b"over vxlan"),
        )
    })
    .await
    .unwrap();
    assert_eq!(st.received, 5, "a1 -> a2 across hosts: {st:?}");
    assert_eq!(back, b"over vxlan");
}

/// Two VPCs with the same block (and the same address on one host) on the
/// same two hosts: each works, and not one packet crosses between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t02_vpcs_with_the_same_cidr_are_isolated() {
    let mut c = Cluster::start("b", 2).await;
    let a1 = iface("a1", 0, 0xa1, 4, "fct1");
    let a2 = iface("a2", 1, 0xa2, 5, "fct2");
    let b1 = iface("b1", 0, 0xb1, 4, "fct3");
    let b2 = iface("b2", 1, 0xb2, 6, "fct4");
    let vpcs = vec![
        Vpc::new("vpc-a", 0x10, vec![a1.clone(), a2.clone()]),
        Vpc::new("vpc-b", 0x20, vec![b1.clone(), b2.clone()]),
    ];
    plug_all(&mut c, &vpcs);
    publish_open(&mut c, &vpcs);
    wait_attached(&c, &vpcs);
    configure_all(&c, &[&a1, &a2, &b1, &b2]);
    let ns = |id: &str| c.inst(id).to_string();
    let (na1, nb1) = (ns("a1"), ns("b1"));
    let ok = tokio::task::spawn_blocking(move || {
        (ping(&na1, ip(5), 3, TICK), ping(&nb1, ip(6), 3, TICK))
    })
    .await
    .unwrap();
    assert_eq!((ok.0.received, ok.1.received), (3, 3), "{ok:?}");

    let before: Vec<u64> = ["a2", "b1", "b2"].iter().map(|i| c.rx_packets(i)).collect();
    let (na1, nb1) = (ns("a1"), ns("b1"));
    let cross = tokio::task::spawn_blocking(move || {
        // a1 -> b2's address (only in VPC B); b1 -> a2's (only in VPC A).
        (ping(&na1, ip(6), 5, TICK), ping(&nb1, ip(5), 5, TICK))
    })
    .await
    .unwrap();
    assert_eq!((cross.0.received, cross.1.received), (0, 0), "{cross:?}");
    let after: Vec<u64> = ["a2", "b1", "b2"].iter().map(|i| c.rx_packets(i)).collect();
    assert_eq!(before, after, "packets crossed VPCs (rx of a2, b1, b2)");
}

/// `bridge -n <host h> ARGS`.
fn bridge_cmd(c: &Cluster, h: usize, args: &[&str]) -> String {
    let mut a = vec!["bridge", "-n", c.hosts[h].ns.as_str()];
    a.extend_from_slice(args);
    support::run(&a)
}

/// Whether host `h`'s VPC `vni` is as netd builds it: the VXLAN port
/// does not learn (unicast flooding on), the bridge calls the IPv4 hooks.
fn ports_and_bridge_set(c: &Cluster, h: usize, vni: u32) -> bool {
    let vx = c.host_ip(h, &["-d", "link", "show", &format!("fvx{vni:x}")]);
    let br = c.host_ip(h, &["-d", "link", "show", &format!("fbr{vni:x}")]);
    vx.is_some_and(|l| l.contains(" learning off flood on "))
        && br.is_some_and(|l| l.contains(" nf_call_iptables 1 "))
}

/// Level-triggered convergence: damage by hand is repaired; an interface
/// that leaves the state loses its FDB entries (the VXLAN device's and the
/// bridge's) and neighbour entry on the other host, after traffic too (the
/// VXLAN port learns nothing), and its TAP is detached, not deleted; a VPC
/// that leaves loses its bridge and VXLAN device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t03_removals_and_repairs_converge() {
    let mut c = Cluster::start("c", 2).await;
    let a1 = iface("a1", 0, 0xa1, 4, "fct1");
    let a2 = iface("a2", 1, 0xa2, 5, "fct2");
    let b1 = iface("b1", 0, 0xb1, 4, "fct3");
    let b2 = iface("b2", 1, 0xb2, 6, "fct4");
    let mut vpcs = vec![
        Vpc::new("vpc-a", 0x10, vec![a1.clone(), a2.clone()]),
        Vpc::new("vpc-b", 0x20, vec![b1.clone(), b2.clone()]),
    ];
    plug_all(&mut c, &vpcs);
    publish_open(&mut c, &vpcs);
    wait_attached(&c, &vpcs);
    let a2_fdb = "02:00:00:00:00:a2 dst 10.99.0.2 self permanent";
    let a2_br = "02:00:00:00:00:a2 master fbr10 static";
    assert!(wait_until(WAIT, || c.fdb(0, "fvx10").contains(a2_fdb)
        && c.fdb(0, "fvx10").contains(a2_br)));
    assert!(
        ports_and_bridge_set(&c, 0, 0x10),
        "fvx10 learns or fbr10 skips br_netfilter"
    );
    // Traffic both ways: what a learning port would have learned.
    configure_all(&c, &[&a1, &a2]);
    let na1 = c.inst("a1").to_string();
    let st = tokio::task::spawn_blocking(move || ping(&na1, ip(5), 3, TICK))
        .await
        .unwrap();
    assert_eq!(st.received, 3, "a1 -> a2: {st:?}");

    // Damage: an FDB entry, a neighbour entry and a TAP's master.
    let h0 = c.hosts[0].ns.clone();
    support::run(&[
        "bridge",
        "-n",
        &h0,
        "fdb",
        "del",
        "02:00:00:00:00:a2",
        "dev",
        "fvx10",
        "dst",
        "10.99.0.2",
        "self",
    ]);
    support::run(&["ip", "-n", &h0, "neigh", "del", "10.0.0.5", "dev", "fvx10"]);
    support::run(&["ip", "-n", &h0, "link", "set", "fct1", "nomaster"]);
    // And the bridge's: its entry of a2, the port's learning, the
    // bridge's nf_call_iptables; a learned entry on the VXLAN port (stale)
    // and one on a TAP (not netd's).
    bridge_cmd(
        &c,
        0,
        &["fdb", "del", "02:00:00:00:00:a2", "dev", "fvx10", "master"],
    );
    let h0_ip = |args: &str| {
        let mut a = vec!["ip", "-n", &h0];
        a.extend(args.split(' '));
        support::run(&a)
    };
    h0_ip("link set fvx10 type bridge_slave learning on");
    h0_ip("link set fbr10 type bridge nf_call_iptables 0");
    let learned = [
        "fdb",
        "add",
        "02:00:00:00:00:99",
        "dev",
        "fvx10",
        "master",
        "dynamic",
    ];
    bridge_cmd(&c, 0, &learned);
    let on_tap = [
        "fdb",
        "add",
        "02:00:00:00:00:98",
        "dev",
        "fct3",
        "master",
        "dynamic",
    ];
    bridge_cmd(&c, 0, &on_tap);
    assert!(!c.fdb(0, "fvx10").contains(a2_fdb));
    assert!(!ports_and_bridge_set(&c, 0, 0x10));
    assert!(
        wait_until(WAIT, || c.fdb(0, "fvx10").contains(a2_fdb)
            && c.fdb(0, "fvx10").contains(a2_br)
            && !c.fdb(0, "fvx10").contains("02:00:00:00:00:99")
            && ports_and_bridge_set(&c, 0, 0x10)
            && c.neigh(0, "fvx10")
                .contains("10.0.0.5 lladdr 02:00:00:00:00:a2")
            && c.attached(0, "fct1", "fbr10")),
        "damage not repaired: {}",
        c.fdb(0, "fvx10")
    );
    assert!(
        c.fdb(0, "fct3").contains("02:00:00:00:00:98"),
        "an entry on a TAP was touched"
    );
    // Each setting was made once at creation and once in repair: what netd
    // sets, it observes as set (no operation every round).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let log = c.log(0);
    let times = |op: &str| log.lines().filter(|l| l.contains(op)).count();
    assert_eq!(
        times("set fvx10 type bridge_slave learning off flood on"),
        2,
        "{log}"
    );
    assert_eq!(
        times("set fbr10 type bridge nf_call_iptables 1"),
        1,
        "{log}"
    );
    assert_eq!(
        times("fdb replace 02:00:00:00:00:a2 dev fvx10 master static"),
        2,
        "{log}"
    );

    // a2 leaves: no entry of its MAC anywhere on host 0, self or master.
    vpcs[0].ifaces.retain(|i| i.id != "a2");
    publish_open(&mut c, &vpcs);
    let all_fdb = |c: &Cluster| bridge_cmd(c, 0, &["fdb", "show"]);
    assert!(
        wait_until(WAIT, || !all_fdb(&c).contains("02:00:00:00:00:a2")
            && !c.neigh(0, "fvx10").contains("10.0.0.5")),
        "a2's entries stayed on host 0: {} / {}",
        all_fdb(&c),
        c.neigh(0, "fvx10")
    );
    // VPC A has nothing left on host 1: its devices go, the TAP stays.
    assert!(wait_until(WAIT, || c
        .host_ip(1, &["link", "show", "fbr10"])
        .is_none()
        && c.host_ip(1, &["link", "show", "fvx10"]).is_none()));
    let tap = c
        .host_ip(1, &["-o", "link", "show", "fct2"])
        .expect("TAP kept");
    assert!(!tap.contains("master"), "{tap}");
    assert!(c.attached(1, "fct4", "fbr20"), "VPC B untouched");

    // VPC B leaves.
    vpcs.retain(|v| v.id != "vpc-b");
    publish_open(&mut c, &vpcs);
    for h in 0..2 {
        assert!(wait_until(WAIT, || c
            .host_ip(h, &["link", "show", "fbr20"])
            .is_none()
            && c.host_ip(h, &["link", "show", "fvx20"]).is_none()));
    }
    assert!(c.host_ip(0, &["link", "show", "fct3"]).is_some());
    assert!(c.attached(0, "fct1", "fbr10"), "VPC A kept on host 0");
}

/// kill -9 of netd while traffic flows loses nothing (the dataplane is the
/// kernel's), the restarted netd recreates nothing (same ifindexes), and it
/// follows the state again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t04_netd_restart_keeps_traffic_and_state() {
    let mut c = Cluster::start("d", 2).await;
    let a1 = iface("a1", 0, 0xa1, 4, "fct1");
    let a2 = iface("a2", 1, 0xa2, 5, "fct2");
    let mut vpcs = vec![Vpc::new("vpc-a", 0x10, vec![a1.clone(), a2.clone()])];
    plug_all(&mut c, &vpcs);
    publish_open(&mut c, &vpcs);
    wait_attached(&c, &vpcs);
    configure_all(&c, &[&a1, &a2]);
    let na1 = c.inst("a1").to_string();
    let warm = tokio::task::spawn_blocking(move || ping(&na1, ip(5), 3, TICK))
        .await
        .unwrap();
    assert_eq!(warm.received, 3, "{warm:?}");
    let indexes = |c: &Cluster| (c.ifindex(1, "fbr10"), c.ifindex(1, "fvx10"));
    let before = indexes(&c);

    let na1 = c.inst("a1").to_string();
    let pinger = tokio::task::spawn_blocking(move || ping(&na1, ip(5), 40, TICK));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.kill_netd(1);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    c.restart_netd(1);
    let st = pinger.await.unwrap();
    eprintln!("pings over a netd kill -9 and restart: {st:?}");
    assert!(
        st.lost() <= 5,
        "lost {} of {} pings over a netd restart",
        st.lost(),
        st.sent
    );
    assert!(
        wait_until(WAIT, || c.connects(1) >= 2),
        "restarted netd never connected"
    );
    // A couple of rounds of the new netd, then nothing was recreated.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(indexes(&c), before, "the restarted netd recreated devices");
    let log = c.log(1);
    let restarted = log.rsplit("ferro-netd starting").next().unwrap_or_default();
    assert!(
        !restarted.contains("create "),
        "the restarted netd created something:\n{restarted}"
    );

    // It follows the state: a new interface on host 1.
    let a3 = iface("a3", 1, 0xa3, 7, "fct3");
    c.plug("a3", 1, "fct3", &a3.mac);
    vpcs[0].ifaces.push(a3);
    publish_open(&mut c, &vpcs);
    assert!(wait_until(WAIT, || c.attached(1, "fct3", "fbr10")));
    assert!(wait_until(WAIT, || c
        .fdb(0, "fvx10")
        .contains("02:00:00:00:00:a3 dst 10.99.0.2")));
    // Host 0's netd kept its one stream all along (call timeouts do not
    // cut a healthy stream).
    assert_eq!(c.connects(0), 1, "host 0 reconnected:\n{}", c.log(0));
}
