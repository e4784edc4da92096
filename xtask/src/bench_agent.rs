//! Agent benchmarks: CreateInstance+StartInstance to the test guest's first
//! console line (p50/p99), launches per second with 10 in parallel, and the
//! agent's RSS with 20 instances. Baseline: spawning ferro-vmm directly to
//! the same console line, in the same run. Needs root and /dev/kvm.

use crate::measure::{root, stats};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferro_proto::agent::v1 as pb;
use pb::agent_client::AgentClient;
use serde_json::{json, Value};
use tonic::transport::Channel;

type Result<T> = std::result::Result<T, String>;

const FIRST_LINE: &str = "ferro-guest: hello";

fn build() -> Result<(PathBuf, PathBuf, PathBuf)> {
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "ferro-agent", "-p", "ferro-vmm"])
        .current_dir(root())
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    if !st.success() {
        return Err("cargo build --release -p ferro-agent -p ferro-vmm failed".into());
    }
    let out = Command::new("bash")
        .arg(root().join("tests/guest/build.sh"))
        .output()
        .map_err(|e| format!("tests/guest/build.sh: {e}"))?;
    let guest = String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .unwrap_or("")
        .to_string();
    let rel = root().join("target/release");
    Ok((
        rel.join("ferro-agent"),
        rel.join("ferro-vmm"),
        PathBuf::from(guest),
    ))
}

/// A throwaway agent with its own state directory, TAP prefix and cgroup.
struct BenchAgent {
    child: Child,
    dir: PathBuf,
    addr: String,
    cgroup_parent: String,
}

impl BenchAgent {
    fn start(agent: &Path, vmm: &Path) -> Result<Self> {
        let pid = std::process::id();
        let dir = PathBuf::from(format!("/tmp/fa-bench-{pid}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let cgroup_parent = format!("ferro-bench-{pid}");
        let config = dir.join("agent.toml");
        let text = format!(
            "host_id = \"bench\"\navailability_zone = \"bench\"\nlisten = \"127.0.0.1:0\"\n\
             state_dir = \"{}\"\nvcpus = 64\nmemory_mib = 8192\nreserved_memory_mib = 0\n\
             vmm_path = \"{}\"\ntap_prefix = \"fbn\"\ncgroup_parent = \"{cgroup_parent}\"\n\
             kernel_cmdline = \"console=ttyS0\"\n{}",
            dir.display(),
            vmm.display(),
            crate::agent_tls::agent_config("bench", &dir),
        );
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        let mut child = Command::new(agent)
            .arg("--config")
            .arg(&config)
            .env("FERRO_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn ferro-agent: {e}"))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let addr = line
            .trim()
            .strip_prefix("ferro-agent: listening on ")
            .ok_or(format!("agent did not start: {line:?}"))?;
        Ok(Self {
            addr: addr.to_string(),
            child,
            dir,
            cgroup_parent,
        })
    }

    fn console(&self, id: &str) -> PathBuf {
        self.dir.join("instances").join(id).join("console.log")
    }

    fn rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        for base in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/memory",
        ] {
            let _ = std::fs::remove_dir(Path::new(base).join(&self.cgroup_parent));
        }
    }
}

/// Wait until `path` holds a complete line containing `needle`.
async fn wait_line(path: &Path, needle: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.lines().any(|l| l.contains(needle)) && text.contains('\n') {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no `{needle}` in {}", path.display()));
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Create+start instance `id` and wait for its first console line; ms.
async fn launch(c: &mut AgentClient<Channel>, a: &BenchAgent, id: &str) -> Result<f64> {
    launch_id(c, &a.console(id), id).await
}

async fn launch_id(c: &mut AgentClient<Channel>, console: &Path, id: &str) -> Result<f64> {
    let spec = pb::InstanceSpec {
        id: id.into(),
        vcpus: 1,
        memory_mib: 64,
        image_id: "guest".into(),
        cmdline_extra: "ferro.exit=idle".into(),
        ..Default::default()
    };
    let t = Instant::now();
    c.create_instance(pb::CreateInstanceRequest { spec: Some(spec) })
        .await
        .map_err(|e| format!("create {id}: {e}"))?;
    c.start_instance(pb::StartInstanceRequest {
        id: id.into(),
        volumes: None,
        resources: None,
    })
    .await
    .map_err(|e| format!("start {id}: {e}"))?;
    wait_line(console, FIRST_LINE).await?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// Launch `<prefix>0..9` at once; seconds until all printed their first line.
async fn parallel_batch(c: &AgentClient<Channel>, a: &BenchAgent, prefix: &str) -> Result<f64> {
    let t = Instant::now();
    let tasks: Vec<_> = (0..10)
        .map(|n| {
            let mut c = c.clone();
            let id = format!("{prefix}{n}");
            let console = a.console(&id);
            tokio::spawn(async move { launch_id(&mut c, &console, &id).await })
        })
        .collect();
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    Ok(t.elapsed().as_secs_f64())
}

async fn delete(c: &mut AgentClient<Channel>, id: &str) -> Result<()> {
    c.delete_instance(pb::DeleteInstanceRequest { id: id.into() })
        .await
        .map(|_| ())
        .map_err(|e| format!("delete {id}: {e}"))
}

/// Baseline: ferro-vmm spawned directly, to its first console line.
fn baseline(vmm: &Path, guest: &Path, runs: usize) -> Result<Vec<f64>> {
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            let mut child = Command::new(vmm)
                .args([
                    "--vcpus",
                    "1",
                    "--memory",
                    "64",
                    "--serial",
                    "stdout",
                    "--cmdline",
                ])
                .arg("console=ttyS0 ferro.exit=idle")
                .arg("--kernel")
                .arg(guest)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?;
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let _ = child.kill();
            let _ = child.wait();
            if !line.contains(FIRST_LINE) {
                return Err(format!("unexpected first line {line:?}"));
            }
            Ok(ms)
        })
        .collect()
}

async fn bench(agent: &Path, vmm: &Path, guest: &Path, runs: usize) -> Result<Value> {
    let a = BenchAgent::start(agent, vmm)?;
    let mut c = AgentClient::new(crate::agent_tls::channel(&a.addr, "bench").await?);
    c.register_image(pb::RegisterImageRequest {
        id: "guest".into(),
        kernel_path: guest.display().to_string(),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;

    let mut serial = Vec::new();
    for n in 0..runs {
        let id = format!("s{n}");
        serial.push(launch(&mut c, &a, &id).await?);
        delete(&mut c, &id).await?;
    }
    let base = baseline(vmm, guest, runs)?;

    // Three batches of 10 parallel launches; deletes are not timed.
    let mut secs = 0.0;
    for r in 0..3 {
        secs += parallel_batch(&c, &a, &format!("p{r}-")).await?;
        for n in 0..10 {
            delete(&mut c, &format!("p{r}-{n}")).await?;
        }
    }
    let launches_per_sec = 30.0 / secs;
    parallel_batch(&c, &a, "q").await?;

    // RSS with 20 instances: the 10 above plus 10 more.
    for n in 10..20 {
        launch(&mut c, &a, &format!("q{n}")).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = a.rss_mib();
    for n in 0..20 {
        delete(&mut c, &format!("q{n}")).await?;
    }

    let serial = stats(serial);
    let base = stats(base);
    println!(
        "launch → first console line: p50 {:.1} ms, p99 {:.1} ms (target p50 < 100, p99 < 250); baseline ferro-vmm alone p50 {:.1} ms, p99 {:.1} ms",
        serial["p50"].as_f64().unwrap_or(0.0),
        serial["p99"].as_f64().unwrap_or(0.0),
        base["p50"].as_f64().unwrap_or(0.0),
        base["p99"].as_f64().unwrap_or(0.0),
    );
    println!("launches/s with 10 in parallel: {launches_per_sec:.1}");
    println!("agent RSS with 20 instances: {rss:.1} MiB (target < 30)");
    Ok(json!({
        "launch_to_first_line_ms": serial,
        "baseline_vmm_to_first_line_ms": base,
        "parallel10_launches_per_sec": launches_per_sec,
        "agent_rss_mib_20_instances": rss,
        "targets": {"p50_ms": 100, "p99_ms": 250, "rss_mib": 30},
    }))
}

/// `cargo xtask bench agent [--runs N]`.
pub fn run(args: &[String]) -> Result<()> {
    let mut runs = 50;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => {
                runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("--runs needs a positive number")?;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/kvm").exists() {
        return Err("needs root and /dev/kvm".into());
    }
    let (agent, vmm, guest) = build()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let report = rt.block_on(bench(&agent, &vmm, &guest, runs))?;
    let out = root().join("target/bench");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let path = out.join("agent.json");
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    println!("wrote {}", path.display());
    Ok(())
}
