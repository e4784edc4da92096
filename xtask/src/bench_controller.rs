//! Controller benchmarks, each printed next to a baseline from the same run
//! and written with its target to `target/bench/controller.json`:
//!
//! 1. **Committed writes/s**, fsync on, 3 in-process `ferro-raft` nodes on
//!    loopback ([`ferro_raft::bench_committed_writes`]: 200,000 writes from
//!    512 concurrent proposers); baseline: 1 node. Median of 3 alternating
//!    rounds.
//! 2. **RunInstances → `running`** (p50/p99) on an all-in-one: real
//!    `ferro-controller`, `ferro-agent` and `ferro-vmm` processes (release),
//!    configured as `ferro up` configures them (defaults: the reconcile
//!    loop runs every 200 ms), booting the test guest on the smallest
//!    instance type. One untimed warm-up launch, then one instance at a
//!    time: RunInstances, DescribeInstances every 5 ms until `running`,
//!    terminate, wait for `terminated`. Launches start at offsets spread
//!    over the reconcile period (untimed pauses), not phase-locked to it.
//!    Baseline: the agent's own CreateInstance + StartInstance → `running`
//!    (GetInstance every 5 ms) for the same instance size, on a standalone
//!    agent on the same host.
//! 3. **Scheduler decision** over 10,000 hosts (p50/p99 of 1,000 calls of
//!    [`scheduler::pick`]); also with the candidate list built per decision,
//!    as the state machine does for every RunInstances.
//! 4. **Controller RSS** with 10,000 instances: a release `ferro-controller`,
//!    1,000 fake hosts registered through Hosts/Heartbeat with an unreachable
//!    agent address, then 100 × RunInstances of 100; `VmRSS` of the process.
//!    Baseline: the same process with the hosts and 0 instances.
//!
//! `--only AREA` runs one measure and replaces only its entry in the JSON.
//! The JSON also records the load average at the start: the machine may be
//! shared, and measures 1 and 2 are sensitive to other work on it.
//!
//! Measures 1 and 3 run inside this process. `cargo xtask` is an alias for
//! `cargo run --release -p xtask`, so they are compiled in release; a debug
//! build of xtask refuses to run rather than print debug figures.
//!
//! Everything started is cleaned up, on error too: instances are terminated
//! through the API before the agent stops, then leftover VMMs (found by
//! their command line naming the scratch directory), cgroups, TAPs and the
//! scratch directory are removed. Needs root and /dev/kvm for measure 2.

pub(crate) mod daemons;
mod launch;
pub(crate) mod rss;

use crate::measure::{root, stats};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferro_controller::scheduler::{self, Candidate, Request, Strategy};
use serde_json::{json, Value};

pub(crate) type Result<T> = std::result::Result<T, String>;

const RAFT_WRITES: usize = 200_000;
const RAFT_CONCURRENCY: usize = 512;
const RAFT_ROUNDS: usize = 3;
const TARGET_WRITES_PER_SEC: f64 = 10_000.0;
const TARGET_DECISION_MS: f64 = 1.0;
const SCHED_HOSTS: usize = 10_000;
const SCHED_DECISIONS: usize = 1_000;

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(f64::NAN)
}

pub(crate) fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn rpc(what: &'static str) -> impl Fn(tonic::Status) -> String {
    move |s| format!("{what}: {:?}: {}", s.code(), s.message())
}

/// The binaries and the guest kernel the process measures need.
struct Binaries {
    controller: PathBuf,
    agent: PathBuf,
    vmm: PathBuf,
    guest: PathBuf,
}

fn build() -> Result<Binaries> {
    let packages = ["ferro-controller", "ferro-agent", "ferro-vmm"];
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(["build", "--release"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    let st = cmd
        .current_dir(root())
        .status()
        .map_err(|e| format!("cargo build: {e}"))?;
    if !st.success() {
        return Err(format!("cargo build --release of {packages:?} failed"));
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
    if !out.status.success() || !Path::new(&guest).is_file() {
        return Err(format!("tests/guest/build.sh gave no guest ({guest:?})"));
    }
    let rel = root().join("target/release");
    Ok(Binaries {
        controller: rel.join("ferro-controller"),
        agent: rel.join("ferro-agent"),
        vmm: rel.join("ferro-vmm"),
        guest: PathBuf::from(guest),
    })
}

// ---------------------------------------------------------------- 1. Raft

/// One run of `nodes` nodes; writes/s.
async fn raft_run(nodes: usize) -> Result<f64> {
    let r = ferro_raft::bench_committed_writes(nodes, RAFT_WRITES, RAFT_CONCURRENCY).await;
    // It removes its directory itself, except on error.
    let dir = format!("ferro-raft-bench-{}", std::process::id());
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(dir));
    r.map_err(|e| format!("{nodes} node(s): {e}"))
}

/// `RAFT_ROUNDS` rounds of 3 nodes then 1 node, alternating so that other
/// load on the machine hits both; the medians are compared.
async fn bench_raft() -> Result<Value> {
    let (mut three, mut one) = (Vec::new(), Vec::new());
    for _ in 0..RAFT_ROUNDS {
        three.push(raft_run(3).await?);
        one.push(raft_run(1).await?);
    }
    let (three_s, one_s) = (stats(three.clone()), stats(one.clone()));
    let (t, o) = (num(&three_s, "p50"), num(&one_s, "p50"));
    let ok = t >= TARGET_WRITES_PER_SEC;
    println!(
        "committed writes/s, 3 nodes, fsync on: median {t:.0} of {RAFT_ROUNDS} (target >= {TARGET_WRITES_PER_SEC:.0}: {}); baseline 1 node: median {o:.0} (3 nodes / 1 node = {:.2})",
        met(ok),
        t / o
    );
    Ok(json!({
        "writes_per_run": RAFT_WRITES,
        "concurrency": RAFT_CONCURRENCY,
        "three_nodes_per_sec": three,
        "baseline_one_node_per_sec": one,
        "three_nodes_median": t,
        "one_node_median": o,
        "ratio_three_to_one": t / o,
        "target_min_per_sec": TARGET_WRITES_PER_SEC,
        "met": ok,
    }))
}

// ----------------------------------------------------------- 3. Scheduler

/// 10,000 hosts in three zones, varied free capacity, 2% unhealthy.
fn sched_hosts() -> Vec<Candidate> {
    (0..SCHED_HOSTS)
        .map(|i| Candidate {
            index: i,
            az: format!("az-{}", i % 3),
            healthy: i % 50 != 0,
            vcpus_total: 64,
            memory_total_mib: 262_144,
            free_vcpus: (i % 64) as u32,
            free_memory_mib: ((i * 7919) % 262_144) as u64,
            group_members: 0,
        })
        .collect()
}

/// Times `f` `SCHED_DECISIONS` times after 100 untimed calls; ms each.
fn time_decisions(mut f: impl FnMut()) -> Vec<f64> {
    for _ in 0..100 {
        f();
    }
    (0..SCHED_DECISIONS)
        .map(|_| {
            let t = Instant::now();
            f();
            ms(t.elapsed())
        })
        .collect()
}

fn bench_scheduler() -> Value {
    use std::hint::black_box;
    let hosts = sched_hosts();
    let req = Request {
        vcpus: 2,
        memory_mib: 2048,
        az: None,
        group: None,
        strategy: Strategy::BinPack,
    };
    let pick = stats(time_decisions(|| {
        black_box(scheduler::pick(black_box(&hosts), black_box(&req)));
    }));
    let built = stats(time_decisions(|| {
        let mut c = black_box(&hosts).clone();
        black_box(scheduler::place(&mut c, black_box(&req), 1).ok());
    }));
    let ok = num(&pick, "p99") < TARGET_DECISION_MS;
    println!(
        "scheduler decision over {SCHED_HOSTS} hosts: p50 {:.1} µs, p99 {:.1} µs (target < {TARGET_DECISION_MS} ms: {}); with the candidate list built per decision: p50 {:.1} µs, p99 {:.1} µs",
        num(&pick, "p50") * 1e3,
        num(&pick, "p99") * 1e3,
        met(ok),
        num(&built, "p50") * 1e3,
        num(&built, "p99") * 1e3,
    );
    json!({
        "hosts": SCHED_HOSTS,
        "pick_ms": pick,
        "with_candidates_built_ms": built,
        "target_max_ms": TARGET_DECISION_MS,
        "met": ok,
    })
}

// ------------------------------------------------------------------- entry

const AREAS: [&str; 4] = ["raft", "launch", "scheduler", "rss"];

struct Args {
    runs: usize,
    only: Option<String>,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args {
        runs: 30,
        only: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => {
                a.runs = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("--runs needs a positive number")?;
            }
            "--only" => {
                let v = it.next().ok_or("--only needs an area")?;
                if !AREAS.contains(&v.as_str()) {
                    return Err(format!("--only: one of {}", AREAS.join(", ")));
                }
                a.only = Some(v.clone());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

async fn bench(args: &Args, bins: Option<&Binaries>) -> Result<Value> {
    let wants = |area: &str| args.only.as_deref().is_none_or(|o| o == area);
    let mut report = json!({});
    if wants("raft") {
        report["committed_writes"] = bench_raft().await?;
    }
    if wants("scheduler") {
        report["scheduler"] = tokio::task::spawn_blocking(bench_scheduler)
            .await
            .map_err(|e| e.to_string())?;
    }
    if let Some(bins) = bins {
        if wants("launch") {
            report["run_to_running"] = launch::bench(bins, args.runs).await?;
        }
        if wants("rss") {
            report["controller_rss"] = rss::bench(bins).await?;
        }
    }
    Ok(report)
}

/// `cargo xtask bench controller [--runs N] [--only raft|launch|scheduler|rss]`.
pub fn run(args: &[String]) -> Result<()> {
    let args = parse(args)?;
    if cfg!(debug_assertions) {
        return Err("xtask is a debug build; run it as `cargo xtask` (release)".into());
    }
    let needs_procs = args
        .only
        .as_deref()
        .is_none_or(|o| o == "launch" || o == "rss");
    let bins = if needs_procs {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/kvm").exists() {
            return Err("needs root and /dev/kvm".into());
        }
        Some(build()?)
    } else {
        None
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let measured = rt.block_on(bench(&args, bins.as_ref()))?;
    let out = root().join("target/bench");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let path = out.join("controller.json");
    // With --only, keep the other measures of an earlier run.
    let mut report = match args.only {
        Some(_) => std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({})),
        None => json!({}),
    };
    for (k, v) in measured.as_object().into_iter().flatten() {
        report[k] = v.clone();
        report[k]["loadavg_at_start"] = json!(loadavg.trim());
    }
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    std::fs::write(&path, text).map_err(|e| e.to_string())?;
    println!("wrote {}", path.display());
    Ok(())
}
