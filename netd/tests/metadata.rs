//! The metadata service end to end, in network namespaces this test
//! creates: a "host" namespace with a bridge and two veth "TAPs" whose
//! peers sit in two "instance" namespaces (10.0.0.2 and 10.0.0.3 in
//! 10.0.0.0/24, default route via the router 10.0.0.1). `Metadata` runs in
//! the host namespace (a thread that entered it); the instances use curl
//! as a guest would. Needs root, `ip` and `curl`.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferro_netd::metadata::{Metadata, Settings};
use ferro_proto::compute::v1::{
    GroupOnHost, HostNetwork, LocalInterface, SecurityGroup, VpcOnHost,
};

const TIMEOUT: Duration = Duration::from_secs(2);

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    out
}

fn ok(args: &[&str]) {
    let out = run(Command::new(args[0]).args(&args[1..]));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn preconditions() {
    // SAFETY: geteuid(2) has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(uid, 0, "the metadata namespace test must run as root");
    for tool in ["ip", "curl"] {
        let found = Command::new(tool).arg("-V").output().is_ok();
        assert!(
            found,
            "the metadata namespace test needs `{tool}` installed"
        );
    }
}

/// The namespaces, deleted on drop (even when the test fails).
struct Namespaces {
    host: String,
    a: String,
    b: String,
}

impl Namespaces {
    fn create() -> Self {
        let pid = std::process::id();
        let ns = Namespaces {
            host: format!("fmd{pid}h"),
            a: format!("fmd{pid}a"),
            b: format!("fmd{pid}b"),
        };
        for n in [&ns.host, &ns.a, &ns.b] {
            ok(&["ip", "netns", "add", n]);
        }
        let h = ns.host.as_str();
        ok(&["ip", "-n", h, "link", "add", "br0", "type", "bridge"]);
        ok(&["ip", "-n", h, "link", "set", "br0", "up"]);
        for (inst, tap, mac, ip) in [
            (&ns.a, "tapa", MAC_A, "10.0.0.2/24"),
            (&ns.b, "tapb", MAC_B, "10.0.0.3/24"),
        ] {
            ok(&[
                "ip", "-n", h, "link", "add", tap, "type", "veth", "peer", "name", "eth0", "netns",
                inst,
            ]);
            ok(&["ip", "-n", h, "link", "set", tap, "master", "br0", "up"]);
            ok(&[
                "ip", "-n", inst, "link", "set", "eth0", "address", mac, "up",
            ]);
            ok(&["ip", "-n", inst, "link", "set", "lo", "up"]);
            ok(&["ip", "-n", inst, "addr", "add", ip, "dev", "eth0"]);
            ok(&[
                "ip", "-n", inst, "route", "add", "default", "via", "10.0.0.1",
            ]);
        }
        ns
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in [&self.host, &self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Move this thread into namespace `ns`.
fn enter(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).expect("namespace file");
    // SAFETY: setns(2) with an open namespace descriptor and its type; it
    // changes only this thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

const MAC_A: &str = "02:00:00:00:00:0a";
const MAC_B: &str = "02:00:00:00:00:0b";

fn iface(id: &str, mac: &str, ip: &str, tap: &str) -> LocalInterface {
    LocalInterface {
        instance_id: id.into(),
        mac: mac.into(),
        private_ip: ip.into(),
        subnet_cidr: "10.0.0.0/24".into(),
        router_ip: "10.0.0.1".into(),
        hostname: format!("ip-{}", ip.replace('.', "-")),
        tap: tap.into(),
        security_group_ids: vec!["sg-1".into()],
        availability_zone: "fc-1a".into(),
        instance_type: "t3.micro".into(),
        public_key: format!("ssh-ed25519 AAAA {id}@laptop"),
        key_name: format!("key-{id}"),
        user_data: format!("#!/bin/sh\necho {id}\n").into_bytes(),
        subnet_id: "subnet-1".into(),
        ..Default::default()
    }
}

fn state(locals: Vec<LocalInterface>) -> HostNetwork {
    HostNetwork {
        host_id: "h1".into(),
        revision: 1,
        vpcs: vec![VpcOnHost {
            vpc_id: "vpc-1".into(),
            vni: 0x42,
            cidr_block: "10.0.0.0/16".into(),
            local: locals,
            ..Default::default()
        }],
        groups: vec![GroupOnHost {
            group: Some(SecurityGroup {
                group_id: "sg-1".into(),
                group_name: "default".into(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        mtu: 1450,
    }
}

/// `Metadata` on a thread inside the host namespace; each state sent is
/// synced, and the number of TAPs served comes back.
struct Server {
    states: tokio::sync::mpsc::UnboundedSender<HostNetwork>,
    served: mpsc::Receiver<usize>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(host: &str) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<HostNetwork>();
        let (served_tx, served) = mpsc::channel();
        let host = host.to_string();
        let thread = std::thread::spawn(move || {
            enter(&host);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut m = Metadata::new(Settings {
                    request_timeout: TIMEOUT,
                    connections: 4,
                });
                while let Some(net) = rx.recv().await {
                    m.sync(&net);
                    let _ = served_tx.send(m.len());
                }
            });
        });
        Server {
            states: tx,
            served,
            thread: Some(thread),
        }
    }

    fn sync(&self, net: HostNetwork) -> usize {
        self.states.send(net).expect("server thread alive");
        self.served
            .recv_timeout(Duration::from_secs(5))
            .expect("server synced")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let (tx, _) = tokio::sync::mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.states, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// curl in namespace `ns`: (status, body); status 0 when no answer came.
fn curl(ns: &str, args: &[&str]) -> (u16, String) {
    let out = run(Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-sS",
            "-m",
            "3",
            "-w",
            "\n%{http_code}",
        ])
        .args(args));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

const IMDS: &str = "http://169.254.169.254";

fn token(ns: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "-X",
        "PUT",
        "-H",
        "X-aws-ec2-metadata-token-ttl-seconds: 300",
    ];
    args.extend_from_slice(extra);
    let url = format!("{IMDS}/latest/api/token");
    args.push(&url);
    let (code, body) = curl(ns, &args);
    assert_eq!(code, 200, "token in {ns}: {body}");
    assert!(body.len() >= 43, "short token {body:?}");
    body
}

fn get(ns: &str, token: &str, path: &str, extra: &[&str]) -> (u16, String) {
    let header = format!("X-aws-ec2-metadata-token: {token}");
    let url = format!("{IMDS}/latest/{path}");
    let mut args = vec!["-H", header.as_str()];
    args.extend_from_slice(extra);
    args.push(&url);
    curl(ns, &args)
}

fn get_ok(ns: &str, token: &str, path: &str) -> String {
    let (code, body) = get(ns, token, path, &[]);
    assert_eq!(code, 200, "GET {path} in {ns}: {body}");
    body
}

/// A TCP client inside namespace `ns` (a thread that entered it).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        f()
    })
    .join()
    .expect("namespace thread")
}

/// How the server ended a connection that sent half a request: read
/// until EOF or reset, or `None` if it stayed open for `wait`.
fn ended_within(mut s: TcpStream, wait: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(wait)).ok()?;
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return None,
            Err(_) => return Some(start.elapsed()),
        }
    }
}

/// CPU time of this process (its threads, not curl).
fn cpu_time() -> Duration {
    // SAFETY: rusage is plain data; all-zero is valid.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage(2) fills `u`, which lives for the call.
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    assert_eq!(r, 0, "getrusage");
    let t = |tv: libc::timeval| {
        Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64)
    };
    t(u.ru_utime) + t(u.ru_stime)
}

#[test]
fn imdsv2_per_tap_in_namespaces() {
    preconditions();
    let ns = Namespaces::create();
    let server = Server::start(&ns.host);
    let a = iface("i-aaaa", MAC_A, "10.0.0.2", "tapa");
    let b = iface("i-bbbb", MAC_B, "10.0.0.3", "tapb");
    // A TAP that does not exist is not served.
    let ghost = iface("i-ghost", "02:00:00:00:00:0c", "10.0.0.4", "tapc");
    assert_eq!(server.sync(state(vec![a.clone(), b.clone(), ghost])), 2);

    // The router answers ARP and ICMP echo.
    let ping = run(Command::new("ip").args([
        "netns", "exec", &ns.a, "ping", "-c", "1", "-W", "3", "10.0.0.1",
    ]));
    assert!(
        ping.status.success(),
        "ping of the router from A: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // Each instance gets its own data.
    let ta = token(&ns.a, &[]);
    let tb = token(&ns.b, &[]);
    assert_ne!(ta, tb);
    for (n, t, l) in [(&ns.a, &ta, &a), (&ns.b, &tb, &b)] {
        assert_eq!(get_ok(n, t, "meta-data/instance-id"), l.instance_id);
        assert_eq!(get_ok(n, t, "meta-data/local-ipv4"), l.private_ip);
        assert_eq!(
            get_ok(n, t, "meta-data/public-keys/0/openssh-key"),
            l.public_key
        );
        assert_eq!(get_ok(n, t, "user-data").as_bytes(), l.user_data);
        assert_eq!(get_ok(n, t, "meta-data/security-groups"), "default");
        let m = format!("meta-data/network/interfaces/macs/{}/local-ipv4s", l.mac);
        assert_eq!(get_ok(n, t, &m), l.private_ip);
    }

    // No token, a proxied token request, a huge header.
    let (code, _) = curl(&ns.a, &[&format!("{IMDS}/latest/meta-data/instance-id")]);
    assert_eq!(code, 401, "no token");
    let put = curl(
        &ns.a,
        &[
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 60",
            "-H",
            "X-Forwarded-For: 1.2.3.4",
            &format!("{IMDS}/latest/api/token"),
        ],
    );
    assert_eq!(put.0, 403, "proxied token request: {put:?}");
    let huge = format!("X-Big: {}", "a".repeat(9000));
    assert_eq!(get(&ns.a, &ta, "meta-data/", &["-H", &huge]).0, 431);

    // A's token from B is refused.
    assert_eq!(get(&ns.b, &ta, "meta-data/instance-id", &[]).0, 401);

    // B forging A's address still reads only B's data.
    ok(&[
        "ip",
        "-n",
        &ns.b,
        "addr",
        "add",
        "10.0.0.2/32",
        "dev",
        "eth0",
    ]);
    let forged = ["--interface", "10.0.0.2"];
    let (code, id) = get(&ns.b, &tb, "meta-data/instance-id", &forged);
    assert_eq!((code, id.as_str()), (200, "i-bbbb"), "forged source");
    let (_, ip) = get(&ns.b, &tb, "meta-data/local-ipv4", &forged);
    assert_eq!(ip, "10.0.0.3");
    assert_eq!(get(&ns.b, &ta, "meta-data/instance-id", &forged).0, 401);
    let tf = token(&ns.b, &forged);
    assert_eq!(get_ok(&ns.b, &tf, "user-data").as_bytes(), b.user_data);
    assert_eq!(get(&ns.a, &tf, "meta-data/instance-id", &[]).0, 401);

    // New data reaches a running server in place: A's token still works.
    let mut a2 = a.clone();
    a2.user_data = b"changed".to_vec();
    assert_eq!(server.sync(state(vec![a2, b.clone()])), 2);
    assert_eq!(get_ok(&ns.a, &ta, "user-data"), "changed");

    // Half requests hold a socket only until the timeout; others are
    // served meanwhile.
    let idle = in_ns(&ns.a, || {
        let addr: SocketAddr = "169.254.169.254:80".parse().unwrap();
        (0..3)
            .map(|_| {
                let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).expect("connect");
                s.write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x")
                    .unwrap();
                s
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(get_ok(&ns.a, &ta, "meta-data/instance-id"), "i-aaaa");
    for s in idle {
        let ended = ended_within(s, TIMEOUT * 3);
        assert!(ended.is_some(), "a half request kept its connection");
    }
    for _ in 0..6 {
        assert_eq!(get_ok(&ns.a, &ta, "meta-data/instance-id"), "i-aaaa");
    }

    // Idle servers sleep: no busy polling.
    let before = cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_time() - before;
    assert!(
        used < Duration::from_millis(200),
        "idle servers used {used:?} of CPU in 1 s"
    );

    // An interface leaving the state loses its server.
    assert_eq!(server.sync(state(vec![a.clone()])), 1);
    let (code, _) = get(&ns.b, &tb, "meta-data/instance-id", &["-m", "1"]);
    assert_eq!(code, 0, "B is still served");
    assert_eq!(get_ok(&ns.a, &ta, "meta-data/instance-id"), "i-aaaa");
    drop(server);
    drop(ns);
}
