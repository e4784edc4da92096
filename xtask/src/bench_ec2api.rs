//! `cargo xtask bench ec2api`: what the EC2 Query endpoint's translation
//! costs. A release `ferro-controller` serving both APIs holds 1,000
//! instances on 100 fake hosts (they never run: the hosts only
//! heartbeat); then, alternating so that other load hits both, each call
//! through the EC2 endpoint (SigV4-signed HTTP POST on a kept-alive
//! connection, the XML read whole) next to the same call through the gRPC
//! API (the baseline):
//!
//! 1. DescribeInstances of all 1,000 (one page of 1,000), 30 times each;
//! 2. RunInstances of one instance, 100 times each.
//!
//! p50/p99 of both and their ratio (target: EC2 within 1.5× of gRPC),
//! written to `target/bench/ec2api.json`.

use std::net::SocketAddr;
use std::time::Instant;

use ferro_controller::ec2::sigv4;
use ferro_proto::compute::v1 as pb;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::bench_controller::daemons::{
    bearer, compute, register_image, start_controller, Compute, Scratch,
};
use crate::bench_controller::{met, rpc, rss::heartbeat_fake_hosts};
use crate::measure::{root, stats};

type Result<T> = std::result::Result<T, String>;

const HOSTS: usize = 100;
const INSTANCES: u32 = 1_000;
const DESCRIBES: usize = 30;
const RUNS: usize = 100;
const TARGET_RATIO: f64 = 1.5;

/// A kept-alive HTTP/1.1 connection to the EC2 endpoint, signing as one
/// key.
struct Ec2 {
    conn: BufReader<TcpStream>,
    host: String,
    key: String,
    secret: String,
}

impl Ec2 {
    /// POST `body`; the status and the response body.
    async fn call(&mut self, body: &str) -> Result<(u16, String)> {
        let now = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs()) as i64;
        let headers = sigv4::sign_post(
            &self.host,
            body.as_bytes(),
            &self.key,
            &self.secret,
            "local",
            now,
        );
        let mut req = String::from("POST / HTTP/1.1\r\n");
        for (k, v) in &headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
        let io = |e: std::io::Error| format!("EC2 endpoint: {e}");
        self.conn
            .get_mut()
            .write_all(req.as_bytes())
            .await
            .map_err(io)?;
        let mut line = String::new();
        self.conn.read_line(&mut line).await.map_err(io)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("EC2 endpoint: bad status line {line:?}"))?;
        let mut len = None;
        loop {
            line.clear();
            self.conn.read_line(&mut line).await.map_err(io)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                }
            }
        }
        let len = len.ok_or("EC2 endpoint: no content-length")?;
        let mut buf = vec![0u8; len];
        self.conn.read_exact(&mut buf).await.map_err(io)?;
        Ok((status, String::from_utf8_lossy(&buf).into_owned()))
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// p50/p99 of both and the ratios, printed.
fn compare(what: &str, ec2: Vec<f64>, grpc: Vec<f64>) -> Value {
    let (e, g) = (stats(ec2), stats(grpc));
    let r50 = e["p50"].as_f64().unwrap_or(f64::NAN) / g["p50"].as_f64().unwrap_or(f64::NAN);
    let r99 = e["p99"].as_f64().unwrap_or(f64::NAN) / g["p99"].as_f64().unwrap_or(f64::NAN);
    let ok = r50 <= TARGET_RATIO;
    println!(
        "{what}: EC2 p50 {:.2} ms p99 {:.2} ms; gRPC (baseline) p50 {:.2} ms p99 {:.2} ms; \
         EC2/gRPC p50 {r50:.2} p99 {r99:.2} (target <= {TARGET_RATIO}: {})",
        e["p50"].as_f64().unwrap_or(f64::NAN),
        e["p99"].as_f64().unwrap_or(f64::NAN),
        g["p50"].as_f64().unwrap_or(f64::NAN),
        g["p99"].as_f64().unwrap_or(f64::NAN),
        met(ok)
    );
    json!({"ec2_ms": e, "grpc_ms": g, "ratio_p50": r50, "ratio_p99": r99, "target_max_ratio": TARGET_RATIO, "met": ok})
}

async fn bench(controller: &std::path::Path, guest: &std::path::Path) -> Result<Value> {
    let scratch = Scratch::new("e")?;
    let ec2_addr: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        l.local_addr().map_err(|e| e.to_string())?
    };
    let extra = format!("heartbeat_timeout_ms = 3600000\nec2_listen = \"{ec2_addr}\"\n");
    let (mut p, addr, key) = start_controller(controller, &scratch, &extra, "error").await?;
    let mut c: Compute = compute(&mut p, addr, &key).await?;
    // The measured gRPC client: a kept-alive channel without Nagle, as the
    // EC2 connection (the CLI's client sets the same).
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let mut g_client = pb::compute_client::ComputeClient::with_interceptor(ch, bearer(&key)?);
    let image_id = register_image(&mut c, "guest", guest).await?;
    heartbeat_fake_hosts(addr, &key, HOSTS).await?;
    for _ in 0..INSTANCES / 100 {
        let run = pb::RunInstancesRequest {
            count: 100,
            instance_type: "f1.nano".into(),
            image_id: image_id.clone(),
            ..Default::default()
        };
        c.run_instances(run).await.map_err(rpc("RunInstances"))?;
    }
    let k = c
        .create_api_key(pb::CreateApiKeyRequest {
            name: "ec2-bench".into(),
            role: "user".into(),
            ..Default::default()
        })
        .await
        .map_err(rpc("CreateApiKey"))?
        .into_inner();
    let conn = TcpStream::connect(ec2_addr)
        .await
        .map_err(|e| format!("connect {ec2_addr}: {e}"))?;
    conn.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut ec2 = Ec2 {
        conn: BufReader::new(conn),
        host: ec2_addr.to_string(),
        key: k.key.map(|k| k.id).unwrap_or_default(),
        secret: k.ec2_secret_access_key,
    };
    // Both answer, and the EC2 answer holds every instance.
    let describe = "Action=DescribeInstances&Version=2016-11-15&MaxResults=1000";
    let (status, xml) = ec2.call(describe).await?;
    let n = xml.matches("<instanceId>").count();
    if status != 200 || n != INSTANCES as usize {
        return Err(format!(
            "EC2 DescribeInstances: status {status}, {n} instances:\n{}",
            &xml[..xml.len().min(400)]
        ));
    }
    let all = pb::DescribeInstancesRequest {
        max_results: INSTANCES,
        ..Default::default()
    };
    let (mut e, mut g) = (Vec::new(), Vec::new());
    for _ in 0..DESCRIBES {
        let t = Instant::now();
        let (status, _) = ec2.call(describe).await?;
        e.push(ms(t));
        if status != 200 {
            return Err(format!("EC2 DescribeInstances: status {status}"));
        }
        let t = Instant::now();
        let r = g_client
            .describe_instances(all.clone())
            .await
            .map_err(rpc("DescribeInstances"))?;
        g.push(ms(t));
        if r.into_inner().instances.len() != INSTANCES as usize {
            return Err("gRPC DescribeInstances: not every instance".into());
        }
    }
    let describe_v = compare("DescribeInstances of 1,000", e, g);
    let run_form = format!(
        "Action=RunInstances&Version=2016-11-15&ImageId={image_id}&InstanceType=f1.nano&MinCount=1&MaxCount=1"
    );
    let (mut e, mut g) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let t = Instant::now();
        let (status, xml) = ec2.call(&run_form).await?;
        e.push(ms(t));
        if status != 200 {
            return Err(format!("EC2 RunInstances: status {status}: {xml}"));
        }
        let run = pb::RunInstancesRequest {
            count: 1,
            instance_type: "f1.nano".into(),
            image_id: image_id.clone(),
            ..Default::default()
        };
        let t = Instant::now();
        g_client
            .run_instances(run)
            .await
            .map_err(rpc("RunInstances"))?;
        g.push(ms(t));
    }
    let run_v = compare("RunInstances of 1", e, g);
    Ok(json!({
        "hosts": HOSTS,
        "instances": INSTANCES,
        "describe_instances": describe_v,
        "run_instances": run_v,
    }))
}

/// `cargo xtask bench ec2api`.
pub fn run(_args: &[String]) -> Result<()> {
    if cfg!(debug_assertions) {
        return Err("build in release: cargo xtask bench ec2api".into());
    }
    let st = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "ferro-controller"])
        .current_dir(root())
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    if !st.success() {
        return Err("cargo build --release -p ferro-controller failed".into());
    }
    let controller = root().join("target/release/ferro-controller");
    let guest = ferro_testkit::guest_elf();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let v = rt.block_on(bench(&controller, &guest))?;
    let dir = crate::measure::target_dir().join("bench");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let out = dir.join("ec2api.json");
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", out.display()))?;
    println!("written to {}", out.display());
    Ok(())
}
