//! End to end: a real `ferro-controller` (single-node Raft) and a real
//! `ferro-agent` heartbeating to it, booting the project's test guest
//! under `ferro-vmm`. RunInstances → running → console output →
//! TerminateInstances → nothing left on the host. Needs KVM and root.

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Spawn `bin --config cfg`, stderr to `log`; return it and its stdout lines.
fn spawn(
    bin: &Path,
    cfg: &Path,
    log: &Path,
) -> (Proc, std::io::Lines<BufReader<std::process::ChildStdout>>) {
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(cfg)
        .env("FERRO_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (Proc(child), lines)
}

fn authed<T>(key: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

async fn state_of(c: &mut ComputeClient<Channel>, key: &str, id: &str) -> pb::Instance {
    let req = pb::DescribeInstancesRequest {
        instance_ids: vec![id.into()],
        ..Default::default()
    };
    c.describe_instances(authed(key, req))
        .await
        .unwrap()
        .into_inner()
        .instances[0]
        .clone()
}

async fn wait_state(
    c: &mut ComputeClient<Channel>,
    key: &str,
    id: &str,
    want: pb::InstanceState,
    dir: &Path,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let i = state_of(c, key, id).await;
        if i.state == want as i32 {
            return;
        }
        if Instant::now() > deadline {
            let logs = ["controller.log", "agent.log"]
                .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default());
            panic!(
                "{id} never reached {want:?}: {i:?}\ncontroller:\n{}\nagent:\n{}",
                logs[0], logs[1]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A single-node controller and one agent with the test guest registered,
/// as `test-guest` (`ferro.exit=idle`) plus any `extra` images
/// (name, kernel command-line words).
struct Cloud {
    dir: PathBuf,
    key: String,
    c: ComputeClient<Channel>,
    pid: u32,
    tag: String,
    _agent: Proc,
    _ctl: Proc,
}

impl Cloud {
    async fn start(tag: &str, tap: &str, extra: &[(&str, &str)]) -> Self {
        ferro_testkit::require_kvm_root();
        let vmm = ferro_testkit::workspace_bin("ferro-vmm", "ferro-vmm");
        let agent_bin = ferro_testkit::workspace_bin("ferro-agent", "ferro-agent");
        let guest = ferro_testkit::guest_elf();
        let pid = std::process::id();
        let dir = PathBuf::from(format!("/tmp/fc-{tag}-{pid}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();

        let port = free_port();
        let ctl_cfg = dir.join("controller.toml");
        std::fs::write(
            &ctl_cfg,
            format!(
                "node_id = 1\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n\
                 availability_zones = [\"az-test\"]\nheartbeat_interval_ms = 200\n\
                 heartbeat_timeout_ms = 5000\nreconcile_interval_ms = 50\n",
                dir.join("ctl").display()
            ),
        )
        .unwrap();
        let (ctl, mut out) = spawn(
            Path::new(env!("CARGO_BIN_EXE_ferro-controller")),
            &ctl_cfg,
            &dir.join("controller.log"),
        );
        let mut key = String::new();
        for line in out.by_ref() {
            let line = line.unwrap();
            if let Some(k) = line.strip_prefix("ferro-controller: admin API key: ") {
                key = k.to_string();
                break;
            }
        }
        assert!(key.starts_with("fk_"), "no admin key printed");
        let host_id = format!("{tag}-host");
        let token = common::join_token(&[format!("127.0.0.1:{port}")], &key, &host_id).await;

        let agent_cfg = dir.join("agent.toml");
        std::fs::write(
            &agent_cfg,
            format!(
                "host_id = \"{tag}-host\"\navailability_zone = \"az-test\"\nlisten = \"127.0.0.1:0\"\n\
                 state_dir = \"{}\"\nvcpus = 4\nmemory_mib = 1024\nreserved_memory_mib = 0\n\
                 vmm_path = \"{}\"\ntap_prefix = \"{tap}\"\ncgroup_parent = \"ferro-{tag}-{pid}\"\n\
                 kernel_cmdline = \"console=ttyS0\"\nstop_timeout_ms = 3000\n\
                 controller = \"http://127.0.0.1:{port}\"\njoin_token = \"{token}\"\n\
                 heartbeat_interval_ms = 200\n",
                dir.join("a").display(),
                vmm.display()
            ),
        )
        .unwrap();
        let (agent, _agent_out) = spawn(&agent_bin, &agent_cfg, &dir.join("agent.log"));

        let mut c = ComputeClient::connect(format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
        for (name, cmdline) in [("test-guest", "")]
            .into_iter()
            .chain(extra.iter().copied())
        {
            let img = pb::RegisterImageRequest {
                name: name.into(),
                kernel_path: guest.display().to_string(),
                cmdline_extra: cmdline.into(),
                ..Default::default()
            };
            c.register_image(authed(&key, img)).await.unwrap();
        }
        // Wait for the host's first heartbeat.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let hosts = c
                .describe_hosts(authed(&key, pb::DescribeHostsRequest::default()))
                .await
                .unwrap()
                .into_inner()
                .hosts;
            if !hosts.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "the agent never heartbeated");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Cloud {
            dir,
            key,
            c,
            pid,
            tag: tag.to_string(),
            _agent: agent,
            _ctl: ctl,
        }
    }

    /// RunInstances of one f1.nano from `image`; its id.
    async fn run(&mut self, image: &str, token: &str, shutdown_behavior: &str) -> String {
        let run = pb::RunInstancesRequest {
            count: 1,
            instance_type: "f1.nano".into(),
            image_id: image.into(),
            client_token: token.into(),
            instance_initiated_shutdown_behavior: shutdown_behavior.into(),
            ..Default::default()
        };
        self.c
            .run_instances(authed(&self.key, run))
            .await
            .unwrap()
            .into_inner()
            .instances[0]
            .instance_id
            .clone()
    }

    async fn wait(&mut self, id: &str, want: pb::InstanceState) {
        wait_state(&mut self.c, &self.key, id, want, &self.dir).await;
    }

    /// VMM processes of this cloud's agent.
    fn vmms(&self) -> Vec<u8> {
        ferro_testkit::tool("pgrep")
            .args(["-f", &format!("{}/a/run", self.dir.display())])
            .output()
            .unwrap()
            .stdout
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        remove_cgroup_parent(&format!("ferro-{}-{}", self.tag, self.pid));
    }
}

#[tokio::test]
async fn run_and_terminate_with_a_real_agent() {
    let mut cloud = Cloud::start("e2e", "fce", &[]).await;
    let (key, dir) = (cloud.key.clone(), cloud.dir.clone());
    let t0 = Instant::now();
    let id = cloud.run("test-guest", "e2e", "").await;
    cloud.wait(&id, pb::InstanceState::Running).await;
    println!("RunInstances -> running: {:?}", t0.elapsed());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let req = pb::GetConsoleOutputRequest {
            instance_id: id.clone(),
            max_bytes: 0,
        };
        let out = cloud
            .c
            .get_console_output(authed(&key, req))
            .await
            .unwrap()
            .into_inner();
        if !out.output.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "no console output");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let term = pb::TerminateInstancesRequest {
        instance_ids: vec![id.clone()],
    };
    cloud
        .c
        .terminate_instances(authed(&key, term))
        .await
        .unwrap();
    cloud.wait(&id, pb::InstanceState::Terminated).await;
    // Nothing left on the host: no instance directory, no VMM.
    let left: Vec<_> = std::fs::read_dir(dir.join("a/instances"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left on the host: {left:?}");
    assert!(cloud.vmms().is_empty(), "a VMM is still running");
}

/// A guest that powers itself off stops the instance for good (behaviour
/// `stop`) or terminates it (`terminate`); nothing starts it again. A guest
/// that reboots itself stays running: its host starts it again in place.
#[tokio::test]
async fn guest_initiated_poweroff_and_reboot_as_ec2_does_them() {
    let mut cloud = Cloud::start(
        "gshut",
        "fcg",
        &[
            ("guest-poweroff", "ferro.exit=poweroff"),
            ("guest-reboot", "ferro.exit=reboot"),
        ],
    )
    .await;
    let stop = cloud.run("guest-poweroff", "g-stop", "stop").await;
    cloud.wait(&stop, pb::InstanceState::Stopped).await;
    let i = state_of(&mut cloud.c, &cloud.key, &stop).await;
    assert_eq!(i.desired_state, pb::DesiredState::Stopped as i32, "{i:?}");
    assert_eq!(i.instance_initiated_shutdown_behavior, "stop");
    // It stays stopped: the reconciler does not start it again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let i = state_of(&mut cloud.c, &cloud.key, &stop).await;
    assert_eq!(i.state, pb::InstanceState::Stopped as i32, "{i:?}");
    assert!(cloud.vmms().is_empty(), "a VMM runs for a stopped instance");

    let term = cloud.run("guest-poweroff", "g-term", "terminate").await;
    cloud.wait(&term, pb::InstanceState::Terminated).await;

    let reboot = cloud.run("guest-reboot", "g-reboot", "stop").await;
    // The test guest resets as soon as it is up: every boot is a reboot
    // from inside. The instance keeps its intent and its host restarts it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let boots = loop {
        let req = pb::GetConsoleOutputRequest {
            instance_id: reboot.clone(),
            max_bytes: 0,
        };
        let out = cloud
            .c
            .get_console_output(authed(&cloud.key, req))
            .await
            // Pending (not on its host yet) answers with an empty output,
            // not NotFound.
            .unwrap()
            .into_inner()
            .output;
        let boots = String::from_utf8_lossy(&out)
            .matches("ferro-guest: hello")
            .count();
        if boots >= 3 || Instant::now() > deadline {
            break boots;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let i = state_of(&mut cloud.c, &cloud.key, &reboot).await;
    assert!(boots >= 3, "booted {boots} times: {i:?}");
    assert_eq!(i.desired_state, pb::DesiredState::Running as i32, "{i:?}");
    assert_ne!(i.state, pb::InstanceState::Stopped as i32, "{i:?}");
    let term = pb::TerminateInstancesRequest {
        instance_ids: vec![stop, reboot.clone()],
    };
    cloud
        .c
        .terminate_instances(authed(&cloud.key, term))
        .await
        .unwrap();
    cloud.wait(&reboot, pb::InstanceState::Terminated).await;
}

/// Remove the (now empty) cgroup parent the agent made, v1 or v2.
fn remove_cgroup_parent(name: &str) {
    for base in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/memory",
    ] {
        let _ = std::fs::remove_dir(Path::new(base).join(name));
    }
}

/// An image whose kernel a host cannot open: the instance stays pending
/// and its state reason says why (the agent's error), retries back off
/// instead of running five times a second, and the failure is logged once,
/// not per retry.
#[tokio::test]
async fn a_failing_image_shows_in_the_reason_with_back_off() {
    let mut cloud = Cloud::start("badimg", "fcb", &[]).await;
    let key = cloud.key.clone();
    let img = pb::RegisterImageRequest {
        name: "missing".into(),
        kernel_path: "/nonexistent/vmlinux".into(),
        ..Default::default()
    };
    cloud.c.register_image(authed(&key, img)).await.unwrap();
    let id = cloud.run("missing", "badimg", "").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let reason = loop {
        let req = pb::DescribeInstancesRequest {
            instance_ids: vec![id.clone()],
            ..Default::default()
        };
        let i = cloud
            .c
            .describe_instances(authed(&key, req))
            .await
            .unwrap()
            .into_inner()
            .instances
            .remove(0);
        assert_eq!(i.state, pb::InstanceState::Pending as i32);
        if i.state_reason.contains("/nonexistent/vmlinux") {
            break i.state_reason;
        }
        assert!(
            Instant::now() < deadline,
            "the reason never named the kernel: {:?}",
            i.state_reason
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("reason: {reason}");
    assert!(reason.contains("registering image"), "{reason}");
    assert!(reason.contains(", retrying in"), "{reason}");
    // Let it keep failing for a while, then count the agent's calls and
    // the controller's lines about it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let agent_log = std::fs::read_to_string(cloud.dir.join("agent.log")).unwrap_or_default();
    let ctl_log = std::fs::read_to_string(cloud.dir.join("controller.log")).unwrap_or_default();
    let warns = ctl_log
        .lines()
        .filter(|l| l.contains("reconcile action") && l.contains("nonexistent"))
        .count();
    assert!(
        warns <= 2,
        "{warns} controller lines about one failing image:\n{ctl_log}"
    );
    let registers = agent_log.matches("/nonexistent/vmlinux").count();
    println!("controller lines: {warns}; agent log mentions: {registers}");
    // The image shows which host cannot register it, and why.
    let imgs = cloud
        .c
        .describe_images(authed(&key, pb::DescribeImagesRequest::default()))
        .await
        .unwrap()
        .into_inner()
        .images;
    let bad = imgs.iter().find(|i| i.name == "missing").unwrap();
    assert_eq!(bad.host_errors.len(), 1, "{bad:?}");
    assert!(
        bad.host_errors[0].starts_with("badimg-host: ")
            && bad.host_errors[0].contains("/nonexistent/vmlinux"),
        "{bad:?}"
    );
    let good = imgs.iter().find(|i| i.name == "test-guest").unwrap();
    assert!(good.host_errors.is_empty(), "{good:?}");
}
