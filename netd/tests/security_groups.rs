//! Security groups and anti-spoofing with real traffic.
//!
//! Each test builds its own host: a network namespace (named with the pid
//! and the test's tag) holding a bridge with three veth "TAPs" whose peers
//! sit in three instance namespaces (10.0.0.10-12/24), applies netd's
//! ruleset inside it with [`ferro_netd::security_groups::apply`] (from a
//! thread that entered the namespace; `nft` inherits it), and proves
//! what passes with pings, TCP and UDP from threads in the instances'
//! namespaces. [`Host`]'s `Drop` deletes the namespaces, also on failure.
//!
//! `FERRO_SG_KEEP=1` keeps the namespaces for a look afterwards.
//!
//! Needs root, `ip`, `nft`, `ping` and `br_netfilter`; a missing one fails
//! the test with a message, it is never skipped.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferro_netd::antispoof::{self, Counters};
use ferro_netd::security_groups::{apply, ruleset};
use ferro_proto::compute::v1::{
    GroupOnHost, HostNetwork, LocalInterface, SecurityGroup, SecurityGroupRule, VpcOnHost,
};

const WAIT: Duration = Duration::from_millis(800);

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip -n <ns> <cmd>` (`cmd` split at spaces).
fn ip(ns: &str, cmd: &str) -> String {
    let args: Vec<&str> = ["ip", "-n", ns].into_iter().chain(cmd.split(' ')).collect();
    run(&args)
}

fn preconditions() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "these tests need root");
    for tool in [["nft", "--version"], ["ip", "-V"], ["ping", "-V"]] {
        let ok = Command::new(tool[0]).arg(tool[1]).output();
        assert!(
            ok.is_ok_and(|o| o.status.success()),
            "these tests need `{}` on the PATH",
            tool[0]
        );
    }
}

/// Enter network namespace `ns` (this thread only).
fn enter(ns: &str) {
    let f = std::fs::File::open(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("namespace {ns}: {e}"));
    // SAFETY: setns(2) with an open namespace descriptor; it changes only
    // the calling thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// `f` on a thread inside namespace `ns`.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// One of the instances.
struct Inst {
    ns: String,
    tap: String,
    mac: String,
    ip: Ipv4Addr,
}

/// The host namespace with its bridge and three instances, `a`, `b`, `c`.
struct Host {
    ns: String,
    inst: Vec<Inst>,
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::env::var_os("FERRO_SG_KEEP").is_some() {
            eprintln!("FERRO_SG_KEEP: namespaces {}[abc] kept", self.ns);
            return;
        }
        for ns in self.inst.iter().map(|i| &i.ns).chain([&self.ns]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

impl Host {
    fn new(tag: &str) -> Self {
        preconditions();
        let ns = format!("fsg{}{tag}", std::process::id());
        let mut host = Host {
            ns: ns.clone(),
            inst: Vec::new(),
        };
        run(&["ip", "netns", "add", &ns]);
        let sysctl = "/proc/sys/net/bridge/bridge-nf-call-iptables";
        in_ns(&ns, || {
            std::fs::write(sysctl, "1").unwrap_or_else(|e| {
                panic!("br_netfilter is needed for conntrack of bridged traffic: {sysctl}: {e}")
            })
        });
        ip(&ns, "link add fbr7 type bridge");
        ip(&ns, "link set fbr7 up");
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let inst = Inst {
                ns: format!("{ns}{name}"),
                tap: format!("tap{name}"),
                mac: format!("02:00:00:00:00:{:02x}", 10 + i),
                ip: Ipv4Addr::new(10, 0, 0, 10 + i as u8),
            };
            run(&["ip", "netns", "add", &inst.ns]);
            host.inst.push(inst);
            let inst = host.inst.last().unwrap();
            let (tap, n) = (&inst.tap, &inst.ns);
            ip(
                &ns,
                &format!("link add {tap} type veth peer name eth0 netns {n}"),
            );
            ip(&ns, &format!("link set {tap} master fbr7 up"));
            ip(n, &format!("link set eth0 address {}", inst.mac));
            ip(n, &format!("addr add {}/24 dev eth0", inst.ip));
            ip(n, "link set eth0 up");
            ip(n, "link set lo up");
        }
        host
    }

    fn a(&self) -> &Inst {
        &self.inst[0]
    }
    fn b(&self) -> &Inst {
        &self.inst[1]
    }
    fn c(&self) -> &Inst {
        &self.inst[2]
    }

    /// netd's apply, inside the host namespace.
    fn apply(&self, net: &HostNetwork) {
        let r = ruleset(net);
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        in_ns(&self.ns, || apply(&r)).unwrap_or_else(|e| panic!("apply: {e:?}"));
    }

    fn counters(&self) -> BTreeMap<String, Counters> {
        in_ns(&self.ns, antispoof::counters).expect("counters")
    }

    /// The packets of netd's counter `name` (not one per TAP).
    fn dropped(&self, name: &str) -> u64 {
        let out = run(&[
            "ip", "netns", "exec", &self.ns, "nft", "list", "counter", "bridge", "ferro", name,
        ]);
        let n = out
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1);
        n.and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no packets in {out}"))
    }

    fn spoofed(&self, tap: &str) -> u64 {
        self.counters()[tap].spoofed.packets
    }

    /// Both of netd's tables as `nft` lists them.
    fn listing(&self) -> String {
        let t = |f| {
            run(&[
                "ip", "netns", "exec", &self.ns, "nft", "list", "table", f, "ferro",
            ])
        };
        t("bridge") + &t("ip")
    }

    /// The bridge and the instances as the state describes them, with
    /// `groups`; a in sg-a, b in sg-b, c in sg-c.
    fn state(&self, groups: Vec<GroupOnHost>) -> HostNetwork {
        let local = self
            .inst
            .iter()
            .zip(["sg-a", "sg-b", "sg-c"])
            .map(|(i, g)| LocalInterface {
                instance_id: format!("i-{}", i.tap),
                mac: i.mac.clone(),
                private_ip: i.ip.to_string(),
                tap: i.tap.clone(),
                security_group_ids: vec![g.into()],
                ..Default::default()
            })
            .collect();
        HostNetwork {
            vpcs: vec![VpcOnHost {
                vpc_id: "vpc-1".into(),
                vni: 7,
                local,
                ..Default::default()
            }],
            groups,
            ..Default::default()
        }
    }
}

fn rule(protocol: &str, port: u32, cidr: &str, group_id: &str) -> SecurityGroupRule {
    SecurityGroupRule {
        protocol: protocol.into(),
        from_port: port,
        to_port: port,
        cidr: cidr.into(),
        group_id: group_id.into(),
    }
}

fn group(
    id: &str,
    ingress: Vec<SecurityGroupRule>,
    egress: Vec<SecurityGroupRule>,
    members: &[&str],
) -> GroupOnHost {
    GroupOnHost {
        group: Some(SecurityGroup {
            group_id: id.into(),
            vpc_id: "vpc-1".into(),
            ingress,
            egress,
            ..Default::default()
        }),
        member_ips: members.iter().map(|m| m.to_string()).collect(),
    }
}

/// sg-a: no ingress, egress anywhere. sg-b: TCP 8080 and UDP 7000 from
/// the subnet, ICMP from sg-a's members. sg-c: no ingress, egress ICMP
/// only. `a_members` are sg-a's members, `b_extra` more ingress of sg-b.
fn groups(a_members: &[&str], b_extra: Vec<SecurityGroupRule>) -> Vec<GroupOnHost> {
    let anywhere = || vec![rule("all", 0, "0.0.0.0/0", "")];
    let mut b_in = vec![
        rule("tcp", 8080, "10.0.0.0/24", ""),
        rule("udp", 7000, "10.0.0.0/24", ""),
        rule("icmp", 0, "", "sg-a"),
    ];
    b_in.extend(b_extra);
    vec![
        group("sg-a", vec![], anywhere(), a_members),
        group("sg-b", b_in, anywhere(), &["10.0.0.11"]),
        group(
            "sg-c",
            vec![],
            vec![rule("icmp", 0, "0.0.0.0/0", "")],
            &["10.0.0.12"],
        ),
    ]
}

/// A thread in a namespace serving until dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    received: Arc<AtomicUsize>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Server {
    fn spawn(
        ns: &str,
        serve: impl Fn(&AtomicUsize) + Send + 'static,
        bind: impl FnOnce() + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicUsize::new(0));
        let (ns, s, r) = (ns.to_string(), stop.clone(), received.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            enter(&ns);
            bind();
            tx.send(()).unwrap();
            while !s.load(Ordering::Relaxed) {
                serve(&r);
            }
        });
        rx.recv().expect("server thread failed to start");
        Server {
            stop,
            thread: Some(thread),
            received,
        }
    }

    /// Echoes what each TCP connection to `port` sends first.
    fn tcp_echo(ns: &str, port: u16) -> Self {
        let l = Arc::new(std::sync::OnceLock::<TcpListener>::new());
        let l2 = l.clone();
        Server::spawn(
            ns,
            move |_| match l.get().unwrap().accept() {
                // One thread per connection, echoing until the peer
                // closes: a connection can be reused much later.
                Ok((mut c, _)) => {
                    std::thread::spawn(move || {
                        c.set_nonblocking(false).unwrap();
                        let mut buf = [0u8; 64];
                        while let Ok(n @ 1..) = c.read(&mut buf) {
                            let _ = c.write_all(&buf[..n]);
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            },
            move || {
                let listener = TcpListener::bind(("0.0.0.0", port)).unwrap();
                listener.set_nonblocking(true).unwrap();
                l2.set(listener).unwrap();
            },
        )
    }

    /// Counts datagrams to UDP `port`.
    fn udp_sink(ns: &str, port: u16) -> Self {
        let sock = Arc::new(std::sync::OnceLock::<UdpSocket>::new());
        let s2 = sock.clone();
        Server::spawn(
            ns,
            move |n| {
                let mut buf = [0u8; 1500];
                if sock.get().unwrap().recv(&mut buf).is_ok() {
                    n.fetch_add(1, Ordering::SeqCst);
                }
            },
            move || {
                let s = UdpSocket::bind(("0.0.0.0", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                s2.set(s).unwrap();
            },
        )
    }

    fn received(&self) -> usize {
        self.received.load(Ordering::SeqCst)
    }
}

/// Whether a TCP connection from `from` to `to:port` is answered.
fn tcp_ok(from: &Inst, to: &Inst, port: u16) -> bool {
    in_ns(&from.ns, || {
        let Ok(mut c) = TcpStream::connect_timeout(&SocketAddr::from((to.ip, port)), WAIT) else {
            return false;
        };
        echo(&mut c)
    })
}

fn echo(c: &mut TcpStream) -> bool {
    c.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 5];
    c.write_all(b"hello").is_ok() && c.read_exact(&mut buf).is_ok() && &buf == b"hello"
}

fn ping(from: &Inst, to: &Inst) -> bool {
    ping_addr(from, to.ip)
}

fn ping_addr(from: &Inst, to: Ipv4Addr) -> bool {
    let to = to.to_string();
    let args = ["netns", "exec", &from.ns, "ping", "-c", "1", "-W", "1", &to];
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Send 3 datagrams from `src` (an address of `from`) to `to:port`, and
/// wait for them to arrive or not.
fn udp_send(from: &Inst, src: Ipv4Addr, to: &Inst, port: u16) {
    in_ns(&from.ns, || {
        let s = UdpSocket::bind((src, 0)).expect("bind");
        for _ in 0..3 {
            s.send_to(b"x", (to.ip, port)).expect("send");
        }
    });
    std::thread::sleep(Duration::from_millis(300));
}

/// Send one raw Ethernet frame out of interface `ifname` of namespace `ns`.
fn send_frame(ns: &str, ifname: &str, frame: &[u8]) {
    in_ns(ns, || {
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {ifname} in {ns}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments, checked below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `addr` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        let err = std::io::Error::last_os_error();
        // SAFETY: `fd` is ours and closed once.
        unsafe { libc::close(fd) };
        assert_eq!(n, frame.len() as isize, "sendto: {err}");
    });
    std::thread::sleep(Duration::from_millis(200));
}

/// The frames an `ETH_P_ALL` packet socket on `ifname` of `ns` (as
/// netd's DHCP server opens) receives while `during` runs.
fn capture(ns: &str, ifname: &str, during: impl FnOnce()) -> Vec<Vec<u8>> {
    let (ns, ifname) = (ns.to_string(), ifname.to_string());
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        enter(&ns);
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments, checked below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: `addr` is valid for `len` bytes.
        let rc = unsafe { libc::bind(fd, (&raw const addr).cast(), len) };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        let tv_len = std::mem::size_of::<libc::timeval>() as u32;
        // SAFETY: SO_RCVTIMEO takes a timeval, passed with its size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                tv_len,
            )
        };
        tx.send(()).unwrap();
        let (mut frames, end) = (Vec::new(), Instant::now() + Duration::from_secs(1));
        while Instant::now() < end {
            let mut buf = [0u8; 2048];
            // SAFETY: `buf` is valid for its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                frames.push(buf[..n as usize].to_vec());
            }
        }
        // SAFETY: `fd` is ours and closed once.
        unsafe { libc::close(fd) };
        frames
    });
    rx.recv().expect("capture thread failed to start");
    during();
    t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn mac(s: &str) -> [u8; 6] {
    ferro_netd::desired::parse_mac(s).unwrap()
}

/// An Ethernet + IPv4 + UDP frame (UDP checksum 0: none).
fn udp_frame(dst: [u8; 6], src: [u8; 6], ip: (Ipv4Addr, Ipv4Addr), ports: (u16, u16)) -> Vec<u8> {
    let payload = b"offer";
    let udp_len = 8 + payload.len() as u16;
    let mut ipv4 = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ipv4[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
    ipv4.extend(ip.0.octets());
    ipv4.extend(ip.1.octets());
    let sum = ipv4
        .chunks(2)
        .fold(0u32, |s, w| s + u32::from(u16::from_be_bytes([w[0], w[1]])));
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ipv4[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut f = [&dst[..], &src[..], &[0x08, 0x00]].concat();
    f.extend(ipv4);
    f.extend(ports.0.to_be_bytes());
    f.extend(ports.1.to_be_bytes());
    f.extend(udp_len.to_be_bytes());
    f.extend([0, 0]);
    f.extend(payload);
    f
}

/// An ARP reply from `mac`/`ip` to `dst`.
fn arp_reply(dst: &Inst, mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let d = self::mac(&dst.mac);
    let mut f = [&d[..], &mac[..], &[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]].concat();
    f.extend(mac);
    f.extend(ip.octets());
    f.extend(d);
    f.extend(dst.ip.octets());
    f
}

#[test]
fn allowed_traffic_and_its_replies_pass_the_rest_is_dropped() {
    let h = Host::new("t1");
    h.apply(&h.state(groups(&["10.0.0.10"], vec![])));
    let _web = Server::tcp_echo(&h.b().ns, 8080);
    let _other = Server::tcp_echo(&h.b().ns, 8081);
    let _on_a = Server::tcp_echo(&h.a().ns, 8080);
    // b allows 8080 from the subnet; a has no ingress rule, yet the
    // replies reach it (stateful).
    assert!(tcp_ok(h.a(), h.b(), 8080), "a → b:8080 is allowed");
    assert!(
        !tcp_ok(h.a(), h.b(), 8081),
        "a → b:8081 is not in b's ingress"
    );
    assert!(!tcp_ok(h.b(), h.a(), 8080), "a has no ingress rules");
    // c's egress allows only ICMP: its own chain stops it.
    assert!(!tcp_ok(h.c(), h.b(), 8080), "c's egress has no TCP");
    // ICMP to b: from sg-a's members only.
    assert!(ping(h.a(), h.b()), "a is in sg-a");
    assert!(!ping(h.c(), h.b()), "c is not in sg-a");
}

#[test]
fn rules_and_members_take_effect_on_the_next_apply() {
    let h = Host::new("t2");
    h.apply(&h.state(groups(&["10.0.0.10"], vec![])));
    let _other = Server::tcp_echo(&h.b().ns, 8081);
    assert!(!tcp_ok(h.a(), h.b(), 8081));
    assert!(!ping(h.c(), h.b()));
    // A rule added to sg-b, which b is in and uses.
    h.apply(&h.state(groups(
        &["10.0.0.10"],
        vec![rule("tcp", 8081, "10.0.0.10/32", "")],
    )));
    assert!(tcp_ok(h.a(), h.b(), 8081), "the new rule allows a → b:8081");
    // c joins sg-a's members: b's ICMP rule naming sg-a follows.
    h.apply(&h.state(groups(&["10.0.0.10", "10.0.0.12"], vec![])));
    assert!(ping(h.c(), h.b()), "c is now a member of sg-a");
    assert!(!tcp_ok(h.a(), h.b(), 8081), "the rule was removed again");
    // And leaves again.
    h.apply(&h.state(groups(&["10.0.0.10"], vec![])));
    assert!(!ping(h.c(), h.b()));
}

#[test]
fn spoofed_frames_are_dropped_and_counted() {
    let h = Host::new("t3");
    h.apply(&h.state(groups(&["10.0.0.10"], vec![])));
    let (a, b) = (h.a(), h.b());
    let sink = Server::udp_sink(&b.ns, 7000);
    // No ARP needed from a below: it knows b.
    let neigh = format!("neigh replace {} lladdr {} dev eth0", b.ip, b.mac);
    ip(&a.ns, &neigh);
    udp_send(a, a.ip, b, 7000);
    assert_eq!(sink.received(), 3, "a's own address passes");
    let before = h.spoofed("tapa");

    // A source address that is not a's.
    ip(&a.ns, "addr add 10.0.0.99/32 dev eth0");
    udp_send(a, Ipv4Addr::new(10, 0, 0, 99), b, 7000);
    assert_eq!(sink.received(), 3, "a spoofed source address is dropped");
    let after_ip = h.spoofed("tapa");
    assert!(after_ip >= before + 3, "counted: {before} → {after_ip}");

    // ARP claiming another address, then a's own (not counted).
    let claim = arp_reply(b, mac(&a.mac), Ipv4Addr::new(10, 0, 0, 12));
    send_frame(&a.ns, "eth0", &claim);
    let after_arp = h.spoofed("tapa");
    assert_eq!(after_arp, after_ip + 1, "a spoofed ARP sender is dropped");
    send_frame(&a.ns, "eth0", &arp_reply(b, mac(&a.mac), a.ip));
    assert_eq!(h.spoofed("tapa"), after_arp, "a's own ARP passes");

    // A source MAC that is not a's (a new MAC flushes even permanent
    // neighbours: b is set again).
    ip(&a.ns, "link set eth0 address 02:00:00:00:00:99");
    ip(&a.ns, &neigh);
    udp_send(a, a.ip, b, 7000);
    assert_eq!(sink.received(), 3, "a spoofed source MAC is dropped");
    let after_mac = h.spoofed("tapa");
    assert!(
        after_mac >= after_arp + 3,
        "counted: {after_arp} → {after_mac}"
    );
    ip(&a.ns, &format!("link set eth0 address {}", a.mac));

    // IPv6: dropped, counted apart.
    ip(&a.ns, "-6 addr add fd00::10/64 dev eth0 nodad");
    let _ = in_ns(&a.ns, || {
        UdpSocket::bind("[fd00::10]:0").and_then(|s| s.send_to(b"x", "[fd00::11]:7000"))
    });
    std::thread::sleep(Duration::from_millis(300));
    let c = h.counters();
    assert!(c["tapa"].ipv6.packets >= 1, "{c:?}");
    assert_eq!(c["tapb"].spoofed.packets, 0, "{c:?}");
}

#[test]
fn dhcp_to_and_from_netd_needs_no_bridge_rule() {
    let h = Host::new("t4");
    h.apply(&h.state(groups(&["10.0.0.10"], vec![])));
    let (a, c) = (h.a(), h.c());
    // c (sg-c) allows no ingress at all.
    let sink = Server::udp_sink(&c.ns, 68);
    let router = [0x02, 0xfe, 0, 0, 7, 1];
    let ips = (Ipv4Addr::new(10, 0, 0, 1), c.ip);
    // As netd's DHCP server sends: AF_PACKET on the TAP itself.
    send_frame(
        &h.ns,
        &c.tap,
        &udp_frame(mac(&c.mac), router, ips, (67, 68)),
    );
    assert_eq!(sink.received(), 1, "the answer on the TAP reaches c");
    // The same datagram through the bridge (from a, its own addresses)
    // meets c's ingress chain.
    let ips = (a.ip, c.ip);
    send_frame(
        &a.ns,
        "eth0",
        &udp_frame(mac(&c.mac), mac(&a.mac), ips, (67, 68)),
    );
    assert_eq!(sink.received(), 1, "through the bridge it is dropped");
    assert_eq!(h.spoofed("tapa"), 0);

    // c's DHCPDISCOVER: c's egress (ICMP only) drops it in the bridge,
    // a never gets it, yet netd's AF_PACKET socket on the TAP sees it
    // (it sees frames before the bridge does).
    let on_a = Server::udp_sink(&a.ns, 67);
    let any = (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST);
    let discover = udp_frame([0xff; 6], mac(&c.mac), any, (68, 67));
    let seen = capture(&h.ns, &c.tap, || send_frame(&c.ns, "eth0", &discover));
    assert!(seen.contains(&discover), "netd would not see the DISCOVER");
    assert_eq!(on_a.received(), 0, "the DISCOVER crossed the bridge");
    assert_eq!(h.spoofed("tapc"), 0, "DHCP from 0.0.0.0 is not spoofing");
}

#[test]
fn a_thousand_interfaces_apply_in_one_transaction() {
    let h = Host::new("t6");
    let mut net = h.state(groups(&["10.0.0.10"], vec![]));
    let members: Vec<String> = (0..1000)
        .map(|i| format!("10.1.{}.{}", i / 250, i % 250 + 1))
        .collect();
    for (i, ip) in members.iter().enumerate() {
        net.vpcs[0].local.push(LocalInterface {
            instance_id: format!("i-{i}"),
            mac: format!("02:01:00:00:{:02x}:{:02x}", i / 256, i % 256),
            private_ip: ip.clone(),
            tap: format!("fct{i:04}"),
            security_group_ids: vec!["sg-a".into(), "sg-b".into()],
            ..Default::default()
        });
    }
    net.groups[0].member_ips.extend(members);
    let start = Instant::now();
    h.apply(&net);
    let first = start.elapsed();
    let start = Instant::now();
    h.apply(&net);
    let again = start.elapsed();
    let c = h.counters();
    assert_eq!(c.len(), 1003);
    // The instances' traffic is unaffected by the 1,000 others.
    let _web = Server::tcp_echo(&h.b().ns, 8080);
    assert!(tcp_ok(h.a(), h.b(), 8080));
    assert!(!tcp_ok(h.c(), h.b(), 8080));
    // Back to three: 1,000 interfaces' objects deleted in one go.
    h.apply(&h.state(groups(&["10.0.0.10"], vec![])));
    assert_eq!(h.counters().len(), 3);
    eprintln!("1,000 interfaces: first apply {first:?}, again {again:?}");
    assert!(first < Duration::from_secs(20) && again < Duration::from_secs(20));
}

#[test]
fn applying_is_idempotent_atomic_and_keeps_connections_and_counters() {
    let h = Host::new("t5");
    let state = h.state(groups(&["10.0.0.10"], vec![]));
    h.apply(&state);
    let first = h.listing();
    h.apply(&state);
    assert_eq!(
        normalized(&h.listing()),
        normalized(&first),
        "a second apply changes nothing"
    );

    // A spoofed frame counted, then kept across applies.
    let a = h.a();
    send_frame(
        &a.ns,
        "eth0",
        &arp_reply(h.b(), mac(&a.mac), Ipv4Addr::new(10, 0, 0, 77)),
    );
    assert_eq!(h.spoofed("tapa"), 1);
    h.apply(&state);
    assert_eq!(h.spoofed("tapa"), 1, "applying keeps counters");

    // An open connection survives applies (conntrack is not ours).
    let _web = Server::tcp_echo(&h.b().ns, 8080);
    let b_ip = h.b().ip;
    let mut conn = in_ns(&a.ns, || {
        TcpStream::connect_timeout(&SocketAddr::from((b_ip, 8080)), WAIT).expect("connect")
    });
    assert!(echo(&mut conn));

    // Pings every 10 ms while the ruleset is replaced 20 times, with a
    // changing rule: none is lost.
    let b = h.b().ip.to_string();
    let pinger = Command::new("ip")
        .args([
            "netns", "exec", &a.ns, "ping", "-c", "250", "-i", "0.01", "-W", "2", &b,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("ping");
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    for i in 0..20u32 {
        let extra = vec![rule("tcp", 9000 + i, "10.0.0.0/24", "")];
        h.apply(&h.state(groups(&["10.0.0.10"], extra)));
    }
    let mut pinger = pinger;
    let overlapped = pinger.try_wait().expect("ping").is_none();
    let applied = start.elapsed();
    let out = pinger.wait_with_output().expect("ping");
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains(" 0% packet loss"), "{out}");
    assert!(
        overlapped,
        "the ping ended before the 20 applies ({applied:?})"
    );
    assert!(echo(&mut conn), "the open connection still works");

    // An interface that goes away leaves no object behind, and comes back.
    let mut without_c = state.clone();
    without_c.vpcs[0].local.pop();
    h.apply(&without_c);
    let listing = h.listing();
    assert!(
        !listing.contains("tapc") && !listing.contains("gi_sg-c"),
        "{listing}"
    );
    h.apply(&state);
    assert_eq!(
        normalized(&h.listing()),
        normalized(&first),
        "c's objects are back"
    );
}

/// A listing's lines without counter values, sorted: the objects and
/// rules, whatever the order they were created in.
fn normalized(listing: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = listing
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("packets"))
        .collect();
    lines.sort_unstable();
    lines
}

/// A guest's frames to the VPC router MAC (its DHCP and metadata
/// requests) reach netd's packet socket on its TAP and no other guest,
/// although the bridge never learns that MAC; what the bridge would
/// deliver to the host (to its own MAC) is dropped.
#[test]
fn the_router_mac_and_the_host_are_reached_through_no_bridge() {
    let h = Host::new("t7");
    let (a, b) = (h.a(), h.b());
    // Control, without netd's rules: with an address on the bridge, the
    // host's stack answers a guest.
    let host_ip = Ipv4Addr::new(10, 0, 0, 254);
    ip(&h.ns, &format!("addr add {host_ip}/24 dev fbr7"));
    let bridge_mac = run(&[
        "ip",
        "netns",
        "exec",
        &h.ns,
        "cat",
        "/sys/class/net/fbr7/address",
    ]);
    let bridge_mac = mac(bridge_mac.trim());
    assert!(
        ping_addr(a, host_ip),
        "control: the host answers through fbr7"
    );

    h.apply(&h.state(groups(&["10.0.0.10"], vec![])));
    // b allows UDP 7000 from the subnet: what reaches its port arrives.
    let metadata = Ipv4Addr::new(169, 254, 169, 254);
    let frame = |dst| udp_frame(dst, mac(&a.mac), (a.ip, metadata), (40000, 7000));
    let unknown = frame([0x02, 0, 0, 0, 0, 0x77]);
    let on_b = capture(&b.ns, "eth0", || send_frame(&a.ns, "eth0", &unknown));
    assert!(
        on_b.contains(&unknown),
        "control: unknown unicast reaches b"
    );

    let router = frame(ferro_netd::desired::router_mac(7));
    let before = h.dropped("to_router");
    let mut on_b = Vec::new();
    let on_tap = capture(&h.ns, &a.tap, || {
        on_b = capture(&b.ns, "eth0", || send_frame(&a.ns, "eth0", &router));
    });
    assert!(
        on_tap.contains(&router),
        "netd's socket on a's TAP missed it"
    );
    assert!(!on_b.contains(&router), "b saw a's frame to the router MAC");
    assert!(h.dropped("to_router") > before, "not counted");
    assert_eq!(h.spoofed("tapa"), 0);

    // To the bridge's own MAC: dropped before the host's stack, counted.
    let before = h.dropped("to_host");
    send_frame(
        &a.ns,
        "eth0",
        &udp_frame(bridge_mac, mac(&a.mac), (a.ip, host_ip), (40000, 7000)),
    );
    assert_eq!(h.dropped("to_host"), before + 1, "the frame to fbr7's MAC");
    let neigh = format!(
        "neigh replace {host_ip} lladdr {} dev eth0",
        fmt(bridge_mac)
    );
    ip(&a.ns, &neigh);
    assert!(!ping_addr(a, host_ip), "a reached the host's stack");
    assert!(h.dropped("to_host") > before + 1, "the ping is counted");
}

fn fmt(m: [u8; 6]) -> String {
    ferro_netd::desired::fmt_mac(&m)
}
