//! The multi-host fixture: network namespaces as hosts (each running a
//! real `ferro-netd`) on a shared underlay bridge, namespaces as
//! instances plugged in place of TAPs, and a fake controller serving
//! `Hosts.WatchHostNetwork` from states the test sets.
//!
//! Everything lives in namespaces the fixture creates (named with the
//! test's pid and tag); [`Cluster`]'s `Drop` kills the netd processes and
//! deletes the namespaces, also when the test fails (then it prints the
//! netd logs).

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferro_proto::compute::v1::hosts_server::{Hosts, HostsServer};
use ferro_proto::compute::v1::{
    HeartbeatRequest, HeartbeatResponse, HostNetwork, JoinRequest, JoinResponse, LocalInterface,
    RemoteInterface, VpcOnHost, WatchHostNetworkRequest,
};
use tokio::sync::watch;
use tokio_stream::StreamExt;

pub mod dhcp_client;
pub mod ping;

/// The underlay's prefix; host `i` is `.i+1`, the fake controller `.254`.
pub const UNDERLAY: [u8; 3] = [10, 99, 0];
/// The fake controller's port.
pub const CONTROLLER_PORT: u16 = 7400;

/// Run `cmd` (a shell-free argv), panicking with its output on failure.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`run`], `None` on failure.
pub fn try_run(args: &[&str]) -> Option<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Panic with a clear message unless the test can run here.
pub fn preconditions(tag: &str) {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "the multi-host netd tests need root (network namespaces, bridges, VXLAN)"
    );
    assert!(
        try_run(&["ip", "-V"]).is_some(),
        "the multi-host netd tests need iproute2's `ip`"
    );
    assert!(
        try_run(&["bridge", "-V"]).is_some(),
        "the multi-host netd tests need iproute2's `bridge`"
    );
    let probe = format!("{tag}-probe");
    let ok = try_run(&["ip", "netns", "add", &probe]).is_some();
    assert!(ok, "cannot create a network namespace (`ip netns add`)");
    let vx = try_run(&[
        "ip", "-n", &probe, "link", "add", "name", "vx", "type", "vxlan", "id", "1", "dstport",
        "4789",
    ]);
    let br = try_run(&[
        "ip", "-n", &probe, "link", "add", "name", "br0", "type", "bridge",
    ]);
    let _ = try_run(&["ip", "netns", "del", &probe]);
    assert!(
        vx.is_some(),
        "the kernel cannot create VXLAN devices (module vxlan)"
    );
    assert!(
        br.is_some(),
        "the kernel cannot create bridges (module bridge)"
    );
}

/// Run `f` on a thread inside network namespace `ns`: sockets it creates
/// belong to `ns` wherever they are used afterwards.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a namespace file we hold open; it changes
            // only this thread's network namespace.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    })
}

/// Poll `cond` every 100 ms for up to `timeout`.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An interface in the test's model of the cloud.
#[derive(Clone, Debug)]
pub struct Iface {
    /// Instance id (also names its namespace).
    pub id: String,
    /// Index of the host it runs on.
    pub host: usize,
    /// MAC.
    pub mac: String,
    /// Address.
    pub ip: Ipv4Addr,
    /// TAP name on its host.
    pub tap: String,
}

/// A VPC of the model.
#[derive(Clone, Debug)]
pub struct Vpc {
    /// Id.
    pub id: String,
    /// VNI.
    pub vni: u32,
    /// Its block (and the one subnet's).
    pub cidr: String,
    /// Its interfaces.
    pub ifaces: Vec<Iface>,
}

impl Vpc {
    /// `10.0.0.0/24` with `ifaces`.
    pub fn new(id: &str, vni: u32, ifaces: Vec<Iface>) -> Self {
        Self {
            id: id.into(),
            vni,
            cidr: "10.0.0.0/24".into(),
            ifaces,
        }
    }
}

/// An interface `id` on host `host` with the last bytes of its MAC and IP.
pub fn iface(id: &str, host: usize, mac_last: u8, ip_last: u8, tap: &str) -> Iface {
    Iface {
        id: id.into(),
        host,
        mac: format!("02:00:00:00:00:{mac_last:02x}"),
        ip: Ipv4Addr::new(10, 0, 0, ip_last),
        tap: tap.into(),
    }
}

/// The underlay address of host `i`.
pub fn underlay_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(UNDERLAY[0], UNDERLAY[1], UNDERLAY[2], i as u8 + 1)
}

/// The state of host `h` in the model `vpcs`.
pub fn host_network(h: usize, vpcs: &[Vpc], revision: u64) -> HostNetwork {
    let mut out = HostNetwork {
        host_id: format!("host-{h}"),
        revision,
        mtu: 1450,
        ..Default::default()
    };
    for v in vpcs {
        if !v.ifaces.iter().any(|i| i.host == h) {
            continue;
        }
        let mut vpc = VpcOnHost {
            vpc_id: v.id.clone(),
            vni: v.vni,
            cidr_block: v.cidr.clone(),
            ..Default::default()
        };
        for i in &v.ifaces {
            if i.host == h {
                let o = i.ip.octets();
                vpc.local.push(LocalInterface {
                    instance_id: i.id.clone(),
                    mac: i.mac.clone(),
                    private_ip: i.ip.to_string(),
                    subnet_cidr: v.cidr.clone(),
                    router_ip: "10.0.0.1".into(),
                    dns_ip: "10.0.0.2".into(),
                    hostname: format!("ip-{}-{}-{}-{}", o[0], o[1], o[2], o[3]),
                    tap: i.tap.clone(),
                    ..Default::default()
                });
            } else {
                vpc.remote.push(RemoteInterface {
                    instance_id: i.id.clone(),
                    mac: i.mac.clone(),
                    private_ip: i.ip.to_string(),
                    host_id: format!("host-{}", i.host),
                    underlay_ip: underlay_ip(i.host).to_string(),
                });
            }
        }
        out.vpcs.push(vpc);
    }
    out
}

/// The fake controller: one state channel per host key.
#[derive(Clone, Default)]
struct FakeHosts {
    states: Arc<Mutex<HashMap<String, watch::Receiver<HostNetwork>>>>,
    connects: Arc<Mutex<HashMap<String, usize>>>,
}

type VolumesStream = Pin<
    Box<
        dyn tokio_stream::Stream<
                Item = Result<ferro_proto::compute::v1::HostVolumes, tonic::Status>,
            > + Send,
    >,
>;

type StateStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<HostNetwork, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Hosts for FakeHosts {
    async fn heartbeat(
        &self,
        _: tonic::Request<HeartbeatRequest>,
    ) -> Result<tonic::Response<HeartbeatResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake controller"))
    }

    async fn join(
        &self,
        _: tonic::Request<JoinRequest>,
    ) -> Result<tonic::Response<JoinResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake controller"))
    }

    type WatchHostNetworkStream = StateStream;

    async fn watch_host_network(
        &self,
        req: tonic::Request<WatchHostNetworkRequest>,
    ) -> Result<tonic::Response<StateStream>, tonic::Status> {
        let key = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_string();
        let rx = self.states.lock().unwrap().get(&key).cloned();
        let rx = rx.ok_or_else(|| tonic::Status::unauthenticated("unknown key"))?;
        *self.connects.lock().unwrap().entry(key).or_default() += 1;
        let s = tokio_stream::wrappers::WatchStream::new(rx).map(Ok);
        Ok(tonic::Response::new(Box::pin(s)))
    }

    type WatchHostVolumesStream = VolumesStream;

    async fn watch_host_volumes(
        &self,
        _: tonic::Request<ferro_proto::compute::v1::WatchHostVolumesRequest>,
    ) -> Result<tonic::Response<VolumesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake controller"))
    }

    async fn report_volume_replicas(
        &self,
        _: tonic::Request<ferro_proto::compute::v1::ReportVolumeReplicasRequest>,
    ) -> Result<
        tonic::Response<ferro_proto::compute::v1::ReportVolumeReplicasResponse>,
        tonic::Status,
    > {
        Err(tonic::Status::unimplemented("fake controller"))
    }

    async fn remove_volume_replica(
        &self,
        _: tonic::Request<ferro_proto::compute::v1::RemoveVolumeReplicaRequest>,
    ) -> Result<tonic::Response<ferro_proto::compute::v1::RemoveVolumeReplicaResponse>, tonic::Status>
    {
        Err(tonic::Status::unimplemented("fake controller"))
    }

    async fn add_volume_replica(
        &self,
        _: tonic::Request<ferro_proto::compute::v1::AddVolumeReplicaRequest>,
    ) -> Result<tonic::Response<ferro_proto::compute::v1::AddVolumeReplicaResponse>, tonic::Status>
    {
        Err(tonic::Status::unimplemented("fake controller"))
    }

    async fn open_volume_session(
        &self,
        _: tonic::Request<ferro_proto::compute::v1::OpenVolumeSessionRequest>,
    ) -> Result<tonic::Response<ferro_proto::compute::v1::OpenVolumeSessionResponse>, tonic::Status>
    {
        Err(tonic::Status::unimplemented("fake controller"))
    }

    async fn close_volume_session(
        &self,
        _: tonic::Request<ferro_proto::compute::v1::CloseVolumeSessionRequest>,
    ) -> Result<tonic::Response<ferro_proto::compute::v1::CloseVolumeSessionResponse>, tonic::Status>
    {
        Err(tonic::Status::unimplemented("fake controller"))
    }
}

/// One host: a namespace running netd.
pub struct Host {
    /// Namespace.
    pub ns: String,
    /// netd's configuration file.
    pub config: PathBuf,
    /// netd's log.
    pub log: PathBuf,
    /// The running netd.
    pub netd: Option<Child>,
    /// Its state channel.
    pub state: watch::Sender<HostNetwork>,
}

/// The whole fixture.
pub struct Cluster {
    /// Prefix of everything created.
    pub tag: String,
    /// The underlay namespace (bridge + fake controller).
    pub underlay: String,
    /// The hosts.
    pub hosts: Vec<Host>,
    /// Instance namespaces, by instance id.
    pub instances: HashMap<String, String>,
    dir: PathBuf,
    fake: FakeHosts,
    revision: u64,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Cluster {
    /// `n` hosts on an underlay, with the fake controller running. Call
    /// inside a multi-threaded tokio runtime.
    pub async fn start(tag: &str, n: usize) -> Cluster {
        let tag = format!("fn{}{tag}", std::process::id());
        preconditions(&tag);
        let dir = std::env::temp_dir().join(&tag);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let underlay = format!("{tag}-ul");
        let mut c = Cluster {
            tag: tag.clone(),
            underlay: underlay.clone(),
            hosts: Vec::new(),
            instances: HashMap::new(),
            dir,
            fake: FakeHosts::default(),
            revision: 0,
            server: None,
        };
        run(&["ip", "netns", "add", &underlay]);
        let ul = |args: &[&str]| {
            let mut a = vec!["ip", "-n", underlay.as_str()];
            a.extend_from_slice(args);
            run(&a)
        };
        ul(&["link", "add", "name", "ul", "type", "bridge"]);
        ul(&["link", "set", "ul", "up"]);
        ul(&["addr", "add", "10.99.0.254/24", "dev", "ul"]);
        ul(&["link", "set", "lo", "up"]);
        c.serve_controller();
        for i in 0..n {
            c.add_host(i);
        }
        c
    }

    fn serve_controller(&mut self) {
        let addr = SocketAddr::from((Ipv4Addr::new(10, 99, 0, 254), CONTROLLER_PORT));
        let listener = in_ns(&self.underlay, || TcpListener::bind(addr)).expect("bind controller");
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let svc = HostsServer::new(self.fake.clone());
        self.server = Some(tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        }));
    }

    fn add_host(&mut self, i: usize) {
        let ns = format!("{}-h{i}", self.tag);
        run(&["ip", "netns", "add", &ns]);
        // No IPv6 chatter from anything in this namespace.
        in_ns(&ns, disable_ipv6);
        let port = format!("up{i}");
        run(&[
            "ip",
            "-n",
            &self.underlay,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
        run(&[
            "ip",
            "-n",
            &self.underlay,
            "link",
            "set",
            &port,
            "master",
            "ul",
            "up",
        ]);
        let addr = format!("{}/24", underlay_ip(i));
        run(&["ip", "-n", &ns, "addr", "add", &addr, "dev", "eth0"]);
        run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        let key = format!("key-host-{i}");
        let key_file = self.dir.join(format!("host-{i}.key"));
        std::fs::write(&key_file, format!("{key}\n")).unwrap();
        let config = self.dir.join(format!("netd-{i}.toml"));
        // Host 0 pins the underlay device; the others leave it free.
        let dev = if i == 0 {
            "underlay_dev = \"eth0\"\n"
        } else {
            ""
        };
        std::fs::write(
            &config,
            format!(
                "host_id = \"host-{i}\"\ncontrollers = [\"http://10.99.0.254:{CONTROLLER_PORT}\"]\n\
                 underlay_ip = \"{}\"\n{dev}api_key_file = \"{}\"\nresync_interval_ms = 1000\n",
                underlay_ip(i),
                key_file.display()
            ),
        )
        .unwrap();
        let (tx, rx) = watch::channel(host_network(i, &[], 0));
        self.fake.states.lock().unwrap().insert(key, rx);
        let log = self.dir.join(format!("netd-{i}.log"));
        let mut host = Host {
            ns,
            config,
            log,
            netd: None,
            state: tx,
        };
        start_netd(&mut host);
        self.hosts.push(host);
    }

    /// Publish the model `vpcs` to every host (a new revision).
    pub fn publish(&mut self, vpcs: &[Vpc]) {
        self.revision += 1;
        for (i, h) in self.hosts.iter().enumerate() {
            h.state.send_replace(host_network(i, vpcs, self.revision));
        }
    }

    /// An instance namespace plugged into host `h` by a veth whose host
    /// end is `tap` (down, as the agent leaves a new TAP) and whose other
    /// end, `eth0`, has `mac`.
    pub fn plug(&mut self, id: &str, h: usize, tap: &str, mac: &str) -> String {
        let ns = format!("{}-{id}", self.tag);
        run(&["ip", "netns", "add", &ns]);
        in_ns(&ns, disable_ipv6);
        let host_ns = self.hosts[h].ns.clone();
        run(&[
            "ip", "-n", &host_ns, "link", "add", "name", tap, "type", "veth", "peer", "name",
            "eth0", "netns", &ns,
        ]);
        run(&["ip", "-n", &ns, "link", "set", "eth0", "address", mac]);
        run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        self.instances.insert(id.to_string(), ns.clone());
        ns
    }

    /// The namespace of instance `id`.
    pub fn inst(&self, id: &str) -> &str {
        &self.instances[id]
    }

    /// Give instance `id` its address (after DHCP told it).
    pub fn configure(&self, id: &str, cidr: &str) {
        run(&[
            "ip",
            "-n",
            self.inst(id),
            "addr",
            "add",
            cidr,
            "dev",
            "eth0",
        ]);
    }

    /// `ip -n <host h> ARGS`.
    pub fn host_ip(&self, h: usize, args: &[&str]) -> Option<String> {
        let mut a = vec!["ip", "-n", self.hosts[h].ns.as_str()];
        a.extend_from_slice(args);
        try_run(&a)
    }

    /// `bridge -n <host h> fdb show dev DEV`.
    pub fn fdb(&self, h: usize, dev: &str) -> String {
        try_run(&["bridge", "-n", &self.hosts[h].ns, "fdb", "show", "dev", dev]).unwrap_or_default()
    }

    /// `ip -n <host h> neigh show dev DEV`.
    pub fn neigh(&self, h: usize, dev: &str) -> String {
        self.host_ip(h, &["neigh", "show", "dev", dev])
            .unwrap_or_default()
    }

    /// Whether `tap` on host `h` is up in bridge `bridge`.
    pub fn attached(&self, h: usize, tap: &str, bridge: &str) -> bool {
        self.host_ip(h, &["-o", "link", "show", tap])
            .is_some_and(|s| s.contains(&format!("master {bridge} ")) && s.contains(",UP"))
    }

    /// A link's ifindex on host `h`.
    pub fn ifindex(&self, h: usize, dev: &str) -> Option<u32> {
        let s = self.host_ip(h, &["-o", "link", "show", dev])?;
        s.split(':').next()?.trim().parse().ok()
    }

    /// Received packets of instance `id`'s eth0.
    pub fn rx_packets(&self, id: &str) -> u64 {
        let s = run(&[
            "ip",
            "netns",
            "exec",
            self.inst(id),
            "cat",
            "/sys/class/net/eth0/statistics/rx_packets",
        ]);
        s.trim().parse().unwrap()
    }

    /// Kill netd on host `h` with SIGKILL.
    pub fn kill_netd(&mut self, h: usize) {
        if let Some(mut c) = self.hosts[h].netd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start netd on host `h` again.
    pub fn restart_netd(&mut self, h: usize) {
        start_netd(&mut self.hosts[h]);
    }

    /// How often host `h`'s netd opened the state stream.
    pub fn connects(&self, h: usize) -> usize {
        let key = format!("key-host-{h}");
        self.fake
            .connects
            .lock()
            .unwrap()
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// netd's log on host `h`.
    pub fn log(&self, h: usize) -> String {
        std::fs::read_to_string(&self.hosts[h].log).unwrap_or_default()
    }
}

fn disable_ipv6() {
    for p in ["all", "default"] {
        let f = format!("/proc/sys/net/ipv6/conf/{p}/disable_ipv6");
        let _ = std::fs::write(f, "1");
    }
}

fn start_netd(h: &mut Host) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&h.log)
        .unwrap();
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &h.ns,
            env!("CARGO_BIN_EXE_ferro-netd"),
            "--config",
        ])
        .arg(&h.config)
        .env("FERRO_LOG", "info,ferro_netd=debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start ferro-netd");
    h.netd = Some(child);
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            if let Some(mut c) = h.netd.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if let Some(s) = self.server.take() {
            s.abort();
        }
        if std::thread::panicking() {
            for (i, h) in self.hosts.iter().enumerate() {
                let log = std::fs::read_to_string(&h.log).unwrap_or_default();
                eprintln!("----- netd log of host {i} ({}) -----\n{log}", h.ns);
            }
        }
        for ns in self.instances.values() {
            let _ = try_run(&["ip", "netns", "del", ns]);
        }
        for h in &self.hosts {
            let _ = try_run(&["ip", "netns", "del", &h.ns]);
        }
        let _ = try_run(&["ip", "netns", "del", &self.underlay]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
