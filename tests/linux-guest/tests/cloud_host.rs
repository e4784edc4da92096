//! An EC2 user's story end to end, with clients nobody here wrote: a stock
//! Debian 12 image (debootstrap from apt, with Debian's own cloud-init,
//! ifupdown + dhclient and openssh-server; `tests/linux-guest/debian/
//! build-image.sh`) launched as an instance of a real Ferrocloud.
//!
//! - The controller runs in the root namespace.
//! - Host A is a network namespace on the underlay bridge with an agent
//!   and a netd, as in the namespace multi-host tests.
//! - Host B is an L1 under QEMU's emulator with nested SVM (the Linux-guest
//!   harness): a whole cloud host whose agent, netd, nftables and ferro-vmm
//!   run inside it, joined to the underlay by a QEMU TAP NIC. Its agent
//!   joins with a one-time token like any host's.
//!
//! The Debian instance runs on host B under ferro-vmm; its TAP is managed
//! by host B's netd like any instance's. Its own dhclient gets the lease
//! from netd's DHCP, cloud-init's EC2 datasource reads IMDSv2 and installs
//! the key pair's public key for the `debian` user, and `ssh` from another
//! instance's namespace on host A, across the VXLAN overlay and through the
//! VPC router, logs in with the private key CreateKeyPair returned.
//! Needs root, KVM, QEMU and debootstrap; about three minutes under TCG.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ferro_testkit::{spawn_in, KillVmms, Proc};
use std::time::{Duration, Instant};

use ferro_linux_guest::{l2, work_dir, GuestKernel, Qemu, L1};
use ferro_proto::compute::v1 as pb;
use pb::compute_client::ComputeClient;
use tonic::transport::Channel;

/// Runs at drop: kills the VMMs of a state dir, deletes namespaces and links.
struct Cleanup {
    _vmms: KillVmms,
    netns: Vec<String>,
    links: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for l in &self.links {
            let _ = Command::new("ip").args(["link", "del", l]).status();
        }
    }
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn authed<T>(key: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

/// The Debian image, built (or reused) by the project's script: a disk
/// holding `rootfs.ext4`, which host B mounts read-only.
fn debian_images_disk() -> PathBuf {
    ferro_testkit::require_tool("debootstrap");
    let root = ferro_testkit::workspace_root();
    let out = work_dir(&root, "debian");
    let status = Command::new("bash")
        .arg(root.join("tests/linux-guest/debian/build-image.sh"))
        .arg(&out)
        .status()
        .expect("cannot run build-image.sh");
    assert!(status.success(), "building the Debian image failed");
    let disk = out.join("images.ext4");
    assert!(disk.exists(), "{} missing", disk.display());
    disk
}

/// The initrd of the Debian guest: Debian's cloud kernel has virtio_blk
/// as a module, so a small busybox initrd loads it, mounts the root disk
/// and hands over to Debian's systemd.
fn debian_initrd(k: &GuestKernel, dir: &Path) -> PathBuf {
    let script = "mkdir -p /newroot\n\
         mount -t ext4 -o rw /dev/vda /newroot || { echo 'initrd: cannot mount /dev/vda'; poweroff -f; }\n\
         umount /proc /sys; mount --move /dev /newroot/dev\n\
         exec switch_root /newroot /sbin/init\n";
    l2(k, &["virtio_pci", "virtio_blk"], script)
        .unwrap()
        .write(&dir.join("debian-initrd.cpio"), "initrd")
        .unwrap()
}

/// Host B's `/init` body: the cloud host's set-up from its kernel command
/// line (`ferro.ip`, `ferro.ctl`, `ferro.host`, `ferro.token`), then the
/// agent and netd, whose logs follow on the console.
const HOST_B: &str = r#"
for w in $(cat /proc/cmdline); do
  case "$w" in ferro.*=*) k=${w%%=*}; k=${k#ferro.}; eval "P_$k='${w#*=}'" ;; esac
done
echo /bin/modprobe > /proc/sys/kernel/modprobe
mkdir -p /images /data /etc
mount -t ext4 -o ro,noload /dev/vda /images || fail images_disk
mount -t ext4 /dev/vdb /data || fail data_disk
mount -t cgroup2 cgroup2 /sys/fs/cgroup || fail cgroup2
ip link set eth0 up
ip addr add "$P_ip" dev eth0
check underlay ping -c 1 -W 10 "${P_ctl%:*}"
cat > /etc/agent.toml <<EOF
host_id = "$P_host"
availability_zone = "az-2"
listen = "${P_ip%/*}:7420"
state_dir = "/data/agent"
vcpus = 2
memory_mib = 1024
reserved_memory_mib = 0
vmm_path = "/bin/ferro-vmm"
tap_prefix = "fl"
cgroup_parent = "ferro"
kernel_cmdline = "console=ttyS0"
stop_timeout_ms = 5000
controller = "http://$P_ctl"
join_token = "$P_token"
heartbeat_interval_ms = 500
EOF
cat > /etc/netd.toml <<EOF
host_id = "$P_host"
controllers = ["http://$P_ctl"]
underlay_ip = "${P_ip%/*}"
credentials_dir = "/data/agent/credentials"
EOF
touch /agent.log /netd.log
FERRO_LOG=info ferro-agent --config /etc/agent.toml >> /agent.log 2>&1 &
FERRO_LOG=info ferro-netd --config /etc/netd.toml >> /netd.log 2>&1 &
echo "L1 cloud host started"
tail -f /agent.log /netd.log
"#;

/// Modules host B loads on demand (kmod from the kernel's module tree):
/// nftables, the bridge, VXLAN and what they depend on.
const HOST_B_MODULE_DIRS: &[&str] = &["net", "drivers/net", "lib", "crypto", "arch/x86/crypto"];

struct Controller {
    _proc: Proc,
    addr: String,
    key: String,
}

fn start_controller(dir: &Path, listen_ip: &str) -> Controller {
    let port = std::net::TcpListener::bind(format!("{listen_ip}:0"))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("{listen_ip}:{port}");
    let cfg = dir.join("controller.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = 1\nlisten = \"{addr}\"\ndata_dir = \"{}\"\n\
             availability_zones = [\"az-1\", \"az-2\"]\nheartbeat_interval_ms = 500\n\
             heartbeat_timeout_ms = 20000\nreconcile_interval_ms = 100\n",
            dir.join("ctl").display()
        ),
    )
    .unwrap();
    let bin = ferro_testkit::workspace_bin("ferro-controller", "ferro-controller");
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .env("FERRO_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("controller.log")).unwrap())
        .spawn()
        .unwrap();
    let mut key = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(k) = line.strip_prefix("ferro-controller: admin API key: ") {
            key = k.to_string();
            break;
        }
    }
    assert!(key.starts_with("fk_"), "no admin key printed");
    Controller {
        _proc: Proc(child),
        addr,
        key,
    }
}

async fn join_token(c: &mut ComputeClient<Channel>, key: &str, host: &str) -> String {
    c.create_join_token(authed(
        key,
        pb::CreateJoinTokenRequest {
            host_id: host.into(),
            ttl_seconds: 3600,
        },
    ))
    .await
    .unwrap()
    .into_inner()
    .token
}

async fn wait_hosts(c: &mut ComputeClient<Channel>, key: &str, n: usize, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let hosts = c
            .describe_hosts(authed(key, pb::DescribeHostsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .hosts;
        if hosts.len() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} hosts joined within {secs} s",
            hosts.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn describe(c: &mut ComputeClient<Channel>, key: &str, id: &str) -> pb::Instance {
    c.describe_instances(authed(
        key,
        pb::DescribeInstancesRequest {
            instance_ids: vec![id.into()],
            ..Default::default()
        },
    ))
    .await
    .unwrap()
    .into_inner()
    .instances
    .remove(0)
}

async fn console(c: &mut ComputeClient<Channel>, key: &str, id: &str) -> String {
    // The whole console: a Debian boot under emulation prints more than the
    // default 64 KiB tail, and cloud-init's network table comes early.
    let req = pb::GetConsoleOutputRequest {
        instance_id: id.into(),
        max_bytes: 1 << 20,
    };
    c.get_console_output(authed(key, req))
        .await
        .map(|r| String::from_utf8_lossy(&r.into_inner().output).into_owned())
        .unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
async fn run_instance(
    c: &mut ComputeClient<Channel>,
    key: &str,
    image: &str,
    itype: &str,
    subnet: &str,
    ip: &str,
    key_name: &str,
) -> pb::Instance {
    c.run_instances(authed(
        key,
        pb::RunInstancesRequest {
            count: 1,
            instance_type: itype.into(),
            image_id: image.into(),
            subnet_id: subnet.into(),
            private_ip_address: ip.into(),
            key_name: key_name.into(),
            ..Default::default()
        },
    ))
    .await
    .unwrap_or_else(|e| panic!("RunInstances {image}: {e}"))
    .into_inner()
    .instances
    .remove(0)
}

async fn subnet(
    c: &mut ComputeClient<Channel>,
    key: &str,
    vpc: &str,
    cidr: &str,
    az: &str,
) -> String {
    c.create_subnet(authed(
        key,
        pb::CreateSubnetRequest {
            vpc_id: vpc.into(),
            cidr_block: cidr.into(),
            availability_zone: az.into(),
            tags: vec![],
        },
    ))
    .await
    .unwrap()
    .into_inner()
    .subnet_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debian_cloud_image_gets_its_lease_and_key_and_takes_ssh() {
    ferro_testkit::require_kvm_root();
    for t in ["qemu-system-x86_64", "ip", "ssh", "mkfs.ext4"] {
        ferro_testkit::require_tool(t);
    }
    let root = ferro_testkit::workspace_root();
    let k =
        GuestKernel::locate(&root.join("target/guest-kernel")).unwrap_or_else(|e| panic!("{e}"));
    let images_disk = debian_images_disk();
    let work = work_dir(&root, "cloud-host");
    std::fs::create_dir_all(&work).unwrap();
    let pid = std::process::id();
    let tag = format!("{:04x}", pid & 0xffff);
    let dir = PathBuf::from(format!("/tmp/fc-cloud-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let net = 150 + (pid % 40) as u8;
    let inst_ns = format!("fci{tag}");
    let l1_tap = format!("fq{tag}");
    let underlay = ferro_testkit::Underlay::new(&tag, 1, net);
    let _cleanup = Cleanup {
        _vmms: KillVmms(dir.clone()),
        netns: vec![inst_ns.clone()],
        links: vec![l1_tap.clone()],
    };
    let ctl = start_controller(&dir, &format!("10.{net}.0.254"));
    let mut c = ComputeClient::connect(format!("http://{}", ctl.addr))
        .await
        .unwrap();
    let key = ctl.key.clone();

    // Host A: agent and netd in a namespace, zone az-1.
    let vmm = ferro_testkit::workspace_bin("ferro-vmm", "ferro-vmm");
    let agent_bin = ferro_testkit::workspace_bin("ferro-agent", "ferro-agent");
    let netd_bin = ferro_testkit::workspace_bin("ferro-netd", "ferro-netd");
    let host_a = format!("cloud-{tag}-a");
    let token_a = join_token(&mut c, &key, &host_a).await;
    let state_a = dir.join("a");
    std::fs::write(
        dir.join("agent-a.toml"),
        format!(
            "host_id = \"{host_a}\"\navailability_zone = \"az-1\"\n\
             listen = \"10.{net}.0.1:7420\"\nstate_dir = \"{}\"\nvcpus = 2\n\
             memory_mib = 512\nreserved_memory_mib = 0\nvmm_path = \"{}\"\n\
             tap_prefix = \"fa{tag}\"\ncgroup_parent = \"ferro-cloud-{pid}\"\n\
             kernel_cmdline = \"console=ttyS0\"\nstop_timeout_ms = 3000\n\
             controller = \"http://{}\"\njoin_token = \"{token_a}\"\n\
             heartbeat_interval_ms = 500\n",
            state_a.display(),
            vmm.display(),
            ctl.addr
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("netd-a.toml"),
        format!(
            "host_id = \"{host_a}\"\ncontrollers = [\"http://{}\"]\n\
             underlay_ip = \"10.{net}.0.1\"\ncredentials_dir = \"{}\"\n",
            ctl.addr,
            state_a.join("credentials").display()
        ),
    )
    .unwrap();
    let ns_a = underlay.hosts[0].clone();
    let _agent_a = spawn_in(
        &ns_a,
        &agent_bin,
        &dir.join("agent-a.toml"),
        &dir.join("agent-a.log"),
    );
    let _netd_a = spawn_in(
        &ns_a,
        &netd_bin,
        &dir.join("netd-a.toml"),
        &dir.join("netd-a.log"),
    );

    // Host B: an L1 cloud host, zone az-2, on the underlay through a TAP.
    let host_b = format!("cloud-{tag}-b");
    let token_b = join_token(&mut c, &key, &host_b).await;
    sh(&format!(
        "ip tuntap add dev {l1_tap} mode tap && ip link set {l1_tap} master {} up",
        underlay.bridge
    ));
    let debian_initrd = debian_initrd(&k, &work);
    let ctl_bin = PathBuf::from(env!("CARGO_BIN_EXE_ferro-vmmctl"));
    let mut l1 = L1::new(
        &k,
        &["virtio_pci", "virtio_blk", "virtio_net"],
        &vmm,
        &ctl_bin,
    )
    .unwrap();
    l1.userland()
        .binary(&agent_bin, "bin/ferro-agent")
        .unwrap()
        .binary(&netd_bin, "bin/ferro-netd")
        .unwrap()
        .binary(Path::new("/usr/sbin/nft"), "bin/nft")
        .unwrap()
        .module_tree(&k, HOST_B_MODULE_DIRS)
        .unwrap()
        .file(&k.bzimage, "debian/vmlinuz")
        .file(&debian_initrd, "debian/initrd");
    l1.script(HOST_B);
    let l1_img = l1.write(&work.join("host-b.cpio")).unwrap();
    let data_disk = dir.join("data.ext4");
    sh(&format!(
        "truncate -s 4G {0} && mkfs.ext4 -q -F {0}",
        data_disk.display()
    ));
    let mut qemu = Qemu::new(&k.bzimage, &l1_img)
        .memory_mib(2560)
        .tap(&l1_tap, "52:54:00:fc:00:02")
        .disk_ro(&images_disk)
        .disk(&data_disk)
        .append(&format!(
            "ferro.ip=10.{net}.0.2/24 ferro.ctl={} ferro.host={host_b} ferro.token={token_b}",
            ctl.addr
        ))
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    qemu.wait_for("L1 cloud host started", Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("host B never started: {e}"));
    let hosts_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        qemu.drain();
        let n = c
            .describe_hosts(authed(&key, pb::DescribeHostsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .hosts
            .len();
        if n == 2 {
            break;
        }
        assert!(
            Instant::now() < hosts_deadline,
            "host B's agent never joined; L1 console:\n{}",
            qemu.tail(40)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_hosts(&mut c, &key, 2, 5).await;
    eprintln!("host B joined after {:.1} s", t0.elapsed().as_secs_f64());

    // The VPC: one subnet per zone; both instances in the default group,
    // whose members may reach each other (ssh included).
    let vpc = c
        .create_vpc(authed(
            &key,
            pb::CreateVpcRequest {
                cidr_block: "10.40.0.0/16".into(),
                tags: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .vpc_id;
    let subnet_a = subnet(&mut c, &key, &vpc, "10.40.1.0/24", "az-1").await;
    let subnet_b = subnet(&mut c, &key, &vpc, "10.40.2.0/24", "az-2").await;
    let kp = c
        .create_key_pair(authed(
            &key,
            pb::CreateKeyPairRequest {
                key_name: "debian-user".into(),
                tags: vec![],
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let key_file = dir.join("id_ed25519");
    std::fs::write(&key_file, &kp.private_key).unwrap();
    sh(&format!("chmod 600 {}", key_file.display()));

    // The Debian image: its files are on host B (the kernel and initrd in
    // its root, the disk on its read-only images disk); host A cannot
    // register it, which only shows in the image's host errors.
    c.register_image(authed(
        &key,
        pb::RegisterImageRequest {
            name: "debian-12".into(),
            kernel_path: "/debian/vmlinuz".into(),
            initrd_path: "/debian/initrd".into(),
            rootdisk_path: "/images/rootfs.ext4".into(),
            cmdline_extra: "root=/dev/vda rw".into(),
            tags: vec![],
        },
    ))
    .await
    .unwrap();
    let guest = ferro_testkit::guest_elf();
    c.register_image(authed(
        &key,
        pb::RegisterImageRequest {
            name: "idle".into(),
            kernel_path: guest.display().to_string(),
            cmdline_extra: "ferro.exit=idle".into(),
            ..Default::default()
        },
    ))
    .await
    .unwrap();

    let deb = run_instance(
        &mut c,
        &key,
        "debian-12",
        "f1.small",
        &subnet_b,
        "10.40.2.10",
        "debian-user",
    )
    .await;
    assert_eq!(deb.host_id, host_b, "the Debian instance runs on host B");
    let client = run_instance(&mut c, &key, "idle", "f1.nano", &subnet_a, "10.40.1.10", "").await;
    assert_eq!(client.host_id, host_a);

    // The client instance's interface becomes a namespace: its TAP on host
    // A is replaced by a veth of the same name whose peer, in the instance
    // namespace, has the instance's MAC and address (netd attaches it to
    // the VPC bridge and polices it like the TAP).
    let deadline = Instant::now() + Duration::from_secs(60);
    let tap_a = loop {
        let links = sh(&format!("ip -n {ns_a} -o link show"));
        if let Some(t) = links
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .find(|n| n.starts_with(&format!("fa{tag}")))
        {
            if describe(&mut c, &key, &client.instance_id).await.state
                == pb::InstanceState::Running as i32
            {
                break t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the client instance never ran on host A"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    sh(&format!(
        "ip netns add {inst_ns} && ip -n {inst_ns} link set lo up && \
         ip -n {ns_a} link del {tap_a} && \
         ip -n {ns_a} link add {tap_a} type veth peer name eth0 netns {inst_ns} && \
         ip -n {ns_a} link set {tap_a} up && \
         ip -n {inst_ns} link set eth0 address {mac} mtu 1450 up && \
         ip -n {inst_ns} addr add 10.40.1.10/24 dev eth0 && \
         ip -n {inst_ns} route add default via 10.40.1.1",
        mac = client.mac_address
    ));

    // The Debian guest boots: its own DHCP client (ifupdown's dhclient),
    // then cloud-init, which prints the addresses it found and the keys it
    // installed on the console.
    // Under two levels of emulation on a busy CI machine this has taken
    // from five to more than eight minutes.
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut out = String::new();
    while Instant::now() < deadline {
        qemu.drain();
        out = console(&mut c, &key, &deb.instance_id).await;
        if out.contains("Cloud-init v.") && out.contains("finished at") {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    std::fs::write(dir.join("debian-console.log"), &out).unwrap();
    eprintln!("--- Debian console (tail):\n{}", tail(&out, 80));
    assert!(
        out.lines()
            .any(|l| l.contains("finished at") && l.contains("Datasource DataSourceEc2")),
        "cloud-init never finished with the EC2 datasource (whole console in {}); L1:\n{}",
        dir.join("debian-console.log").display(),
        qemu.tail(40)
    );
    eprintln!("cloud-init finished at {:.1} s", t0.elapsed().as_secs_f64());
    assert!(
        out.lines()
            .any(|l| l.contains("ci-info") && l.contains("eth0") && l.contains("10.40.2.10")),
        "cloud-init's network table does not show eth0 with 10.40.2.10"
    );
    // cloud-init lists the key it installed for the default user by its
    // sha256 in hex; the controller names it in base64.
    let fp = kp.key_pair.as_ref().unwrap().fingerprint.clone();
    let fp_hex = hex_fingerprint(fp.trim_start_matches("SHA256:"));
    assert!(
        out.contains(&fp_hex),
        "cloud-init did not list the key pair's fingerprint {fp} ({fp_hex})"
    );

    // ssh from the client instance's namespace with the private key. sshd
    // under two levels of emulation can take minutes to answer the first
    // login.
    let deadline = Instant::now() + Duration::from_secs(300);
    let who =
        loop {
            let o = Command::new("ip")
            .args(["netns", "exec", &inst_ns, "ssh"])
            .args(["-i", &key_file.display().to_string()])
            .args([
                "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=15",
                "-o", "LogLevel=ERROR",
                "debian@10.40.2.10",
                "echo user=$(id -un) id=$(cat /var/lib/cloud/data/instance-id) ip=$(hostname -I) \
                 mtu=$(cat /sys/class/net/eth0/mtu); grep -h 'fixed-address\\|option routers' \
                 /var/lib/dhcp/dhclient*.leases | tail -2",
            ])
            .output()
            .unwrap();
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            if o.status.success() && s.contains("user=debian") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "ssh never logged in: {}{}",
                s,
                String::from_utf8_lossy(&o.stderr)
            );
            tokio::time::sleep(Duration::from_secs(3)).await;
        };
    eprintln!("ssh: {who}");
    assert!(who.contains(&format!("id={}", deb.instance_id)), "{who}");
    assert!(who.contains("ip=10.40.2.10"), "{who}");
    // The lease the guest's own dhclient took from netd: its address, the
    // subnet's router and the overlay's MTU.
    assert!(who.contains("mtu=1450"), "{who}");
    assert!(who.contains("fixed-address 10.40.2.10;"), "{who}");
    assert!(who.contains("option routers 10.40.2.1;"), "{who}");
    // A key that is not the pair's is refused.
    let other = dir.join("other");
    sh(&format!(
        "ssh-keygen -q -t ed25519 -N '' -f {}",
        other.display()
    ));
    let o = Command::new("ip")
        .args(["netns", "exec", &inst_ns, "ssh"])
        .args(["-i", &other.display().to_string()])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=15",
            "-o",
            "LogLevel=ERROR",
            "debian@10.40.2.10",
            "true",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success(), "another key logged in");
    eprintln!("total {:.1} s", t0.elapsed().as_secs_f64());

    c.terminate_instances(authed(
        &key,
        pb::TerminateInstancesRequest {
            instance_ids: vec![deb.instance_id.clone(), client.instance_id.clone()],
        },
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    qemu.kill();
    drop(underlay);
    for base in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/memory",
    ] {
        let _ = std::fs::remove_dir(Path::new(base).join(format!("ferro-cloud-{pid}")));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `SHA256:<unpadded base64>` as cloud-init prints it: lowercase hex
/// bytes joined by colons.
fn hex_fingerprint(b64: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut bytes = Vec::new();
    for c in b64.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).expect("base64") as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            bytes.push((bits >> n) as u8);
        }
    }
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
