//! End to end: a real `ferro-controller` (single-node Raft) and a real
//! `ferro-agent` heartbeating to it, booting the project's test guest
//! under `ferro-vmm`. RunInstances → running → console output →
//! TerminateInstances → nothing left on the host. Needs KVM and root.

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

#[tokio::test]
async fn run_and_terminate_with_a_real_agent() {
    ferro_testkit::require_kvm_root();
    let vmm = ferro_testkit::workspace_bin("ferro-vmm", "ferro-vmm");
    let agent_bin = ferro_testkit::workspace_bin("ferro-agent", "ferro-agent");
    let guest = ferro_testkit::guest_elf();
    let pid = std::process::id();
    let dir = PathBuf::from(format!("/tmp/fc-e2e-{pid}"));
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
    let (_ctl, mut out) = spawn(
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

    let agent_cfg = dir.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        format!(
            "host_id = \"e2e-host\"\navailability_zone = \"az-test\"\nlisten = \"127.0.0.1:0\"\n\
             state_dir = \"{}\"\nvcpus = 4\nmemory_mib = 1024\nreserved_memory_mib = 0\n\
             vmm_path = \"{}\"\ntap_prefix = \"fce\"\ncgroup_parent = \"ferro-e2e-{pid}\"\n\
             kernel_cmdline = \"console=ttyS0\"\nstop_timeout_ms = 3000\n\
             controller = \"http://127.0.0.1:{port}\"\ncontroller_api_key = \"{key}\"\n\
             heartbeat_interval_ms = 200\n",
            dir.join("a").display(),
            vmm.display()
        ),
    )
    .unwrap();
    let (_agent, _agent_out) = spawn(&agent_bin, &agent_cfg, &dir.join("agent.log"));

    let mut c = ComputeClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    let img = pb::RegisterImageRequest {
        name: "test-guest".into(),
        kernel_path: guest.display().to_string(),
        ..Default::default()
    };
    c.register_image(authed(&key, img)).await.unwrap();
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

    let t0 = Instant::now();
    let run = pb::RunInstancesRequest {
        count: 1,
        instance_type: "f1.nano".into(),
        image_id: "test-guest".into(),
        client_token: "e2e".into(),
        ..Default::default()
    };
    let r = c
        .run_instances(authed(&key, run))
        .await
        .unwrap()
        .into_inner();
    let id = r.instances[0].instance_id.clone();
    wait_state(&mut c, &key, &id, pb::InstanceState::Running, &dir).await;
    println!("RunInstances -> running: {:?}", t0.elapsed());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let req = pb::GetConsoleOutputRequest {
            instance_id: id.clone(),
            max_bytes: 0,
        };
        let out = c
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
    c.terminate_instances(authed(&key, term)).await.unwrap();
    wait_state(&mut c, &key, &id, pb::InstanceState::Terminated, &dir).await;
    // Nothing left on the host: no instance directory, no VMM.
    let left: Vec<_> = std::fs::read_dir(dir.join("a/instances"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left on the host: {left:?}");
    let ps = ferro_testkit::tool("pgrep")
        .args(["-f", &format!("{}/a/run", dir.display())])
        .output()
        .unwrap();
    assert!(ps.stdout.is_empty(), "a VMM is still running");
    drop(_agent);
    drop(_ctl);
    let _ = std::fs::remove_dir_all(&dir);
    remove_cgroup_parent(&format!("ferro-e2e-{pid}"));
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
