//! RunInstances → `running` on an all-in-one (real controller, agent and
//! VMMs), next to the agent's own CreateInstance + StartInstance →
//! `running` on a standalone agent.

use std::time::{Duration, Instant};

use ag::agent_client::AgentClient;
use ferro_proto::agent::v1 as ag;
use ferro_proto::compute::v1 as pb;
use serde_json::{json, Value};
use tonic::transport::Channel;

use super::daemons::{
    compute, join_token, register_image, smallest_type, start_agent, start_controller, state_name,
    Compute, Proc, Scratch, BENCH_HOST, IMAGE_CMDLINE, STATE_TIMEOUT,
};
use super::{met, ms, num, rpc, stats, Binaries, Result};

const TARGET_P50_MS: f64 = 300.0;
const TARGET_P99_MS: f64 = 1_000.0;
/// The controller's reconcile period (its default, as `ferro up` runs it).
const RECONCILE_MS: f64 = 200.0;
/// How often DescribeInstances (or the agent's GetInstance) is polled.
const POLL: Duration = Duration::from_millis(5);
/// The all-in-one; dropped in field order: agent, controller, files.
struct AllInOne {
    agent: Proc,
    controller: Proc,
    client: Compute,
    _scratch: Scratch,
}

impl AllInOne {
    async fn start(bins: &Binaries) -> Result<Self> {
        let scratch = Scratch::new("l")?;
        let (mut controller, addr, key) =
            start_controller(&bins.controller, &scratch, "", "info").await?;
        let mut client = compute(&mut controller, addr, &key).await?;
        let token = join_token(&mut client).await?;
        let (mut agent, _) = start_agent(bins, &scratch, Some((addr, &token)))?;
        let deadline = Instant::now() + STATE_TIMEOUT;
        loop {
            agent.check()?;
            controller.check()?;
            let hosts = client
                .describe_hosts(pb::DescribeHostsRequest::default())
                .await
                .map_err(rpc("DescribeHosts"))?
                .into_inner()
                .hosts;
            if hosts
                .iter()
                .any(|h| h.health == pb::HostHealth::Healthy as i32)
            {
                break;
            }
            if Instant::now() > deadline {
                return Err("the agent's host never became healthy".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            agent,
            controller,
            client,
            _scratch: scratch,
        })
    }

    /// `id` as DescribeInstances shows it; `None` once it is purged.
    async fn describe(&mut self, id: &str) -> Result<Option<pb::Instance>> {
        let req = pb::DescribeInstancesRequest {
            instance_ids: vec![id.into()],
            ..Default::default()
        };
        match self.client.describe_instances(req).await {
            Ok(r) => Ok(r.into_inner().instances.into_iter().next()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(rpc("DescribeInstances")(s)),
        }
    }

    /// Polls every `every` until `id` is in state `want`; returns the
    /// DescribeInstances round-trips (ms).
    async fn wait(
        &mut self,
        id: &str,
        want: pb::InstanceState,
        every: Duration,
    ) -> Result<Vec<f64>> {
        let deadline = Instant::now() + STATE_TIMEOUT;
        let mut rtts = Vec::new();
        loop {
            // A dead daemon fails the wait at once (waitpid WNOHANG, µs).
            self.agent.check()?;
            self.controller.check()?;
            let t = Instant::now();
            let Some(i) = self.describe(id).await? else {
                if want == pb::InstanceState::Terminated {
                    return Ok(rtts);
                }
                return Err(format!("{id} is not described"));
            };
            rtts.push(ms(t.elapsed()));
            if i.state == want as i32 {
                return Ok(rtts);
            }
            if i.state == pb::InstanceState::Failed as i32 || Instant::now() > deadline {
                return Err(format!(
                    "{id} is {} ({}), waiting for {}",
                    state_name(i.state),
                    i.state_reason,
                    want.as_str_name()
                ));
            }
            tokio::time::sleep(every).await;
        }
    }

    async fn terminate(&mut self, ids: &[String]) -> Result<()> {
        let req = pb::TerminateInstancesRequest {
            instance_ids: ids.to_vec(),
        };
        let r = self.client.terminate_instances(req).await;
        r.map_err(rpc("TerminateInstances"))?;
        for id in ids {
            self.wait(id, pb::InstanceState::Terminated, Duration::from_millis(20))
                .await?;
        }
        Ok(())
    }

    /// One launch: RunInstances → `running`, then terminated. Returns the
    /// latency and the DescribeInstances round-trips, in ms.
    async fn launch(
        &mut self,
        run: &pb::RunInstancesRequest,
        live: &mut Vec<String>,
    ) -> Result<(f64, Vec<f64>)> {
        let t = Instant::now();
        let r = self.client.run_instances(run.clone()).await;
        let r = r.map_err(rpc("RunInstances"))?.into_inner();
        let id = r
            .instances
            .first()
            .map(|i| i.instance_id.clone())
            .ok_or("RunInstances returned no instance")?;
        live.push(id.clone());
        let rtts = self.wait(&id, pb::InstanceState::Running, POLL).await?;
        let latency = ms(t.elapsed());
        self.terminate(std::slice::from_ref(&id)).await?;
        live.retain(|l| *l != id);
        Ok((latency, rtts))
    }
}

/// An untimed pause before launch `n`, spreading the launches evenly over
/// the reconcile period (golden-ratio steps). Each launch follows a
/// terminate, which completes just after a reconcile pass; without it
/// every launch would start at the same point of the loop instead of at
/// a random one, as a user's does.
fn phase(n: usize) -> Duration {
    let frac = (n as f64 * 0.618_033_988_75).fract();
    Duration::from_secs_f64(frac * RECONCILE_MS / 1e3)
}

/// The timed launches; ids not yet terminated are left in `live`.
async fn launches(
    aio: &mut AllInOne,
    bins: &Binaries,
    runs: usize,
    live: &mut Vec<String>,
) -> Result<(pb::InstanceType, Vec<f64>, Vec<f64>)> {
    let ty = smallest_type(&mut aio.client).await?;
    let image_id = register_image(&mut aio.client, "ferro-test-guest", &bins.guest).await?;
    let pid = std::process::id();
    let mut latencies = Vec::new();
    let mut rtts = Vec::new();
    // Run 0 is the untimed warm-up (image registration on the agent).
    for n in 0..=runs {
        let run = pb::RunInstancesRequest {
            count: 1,
            instance_type: ty.name.clone(),
            image_id: image_id.clone(),
            client_token: format!("bench-{pid}-{n}"),
            ..Default::default()
        };
        tokio::time::sleep(phase(n)).await;
        let (latency, r) = aio.launch(&run, live).await?;
        if n > 0 {
            latencies.push(latency);
            rtts.extend(r);
        }
    }
    Ok((ty, latencies, rtts))
}

/// Baseline: the agent alone, CreateInstance + StartInstance → running.
async fn agent_baseline(bins: &Binaries, ty: &pb::InstanceType, runs: usize) -> Result<Vec<f64>> {
    let scratch = Scratch::new("b")?;
    let (mut agent, addr) = start_agent(bins, &scratch, None)?;
    let mut c = loop {
        agent.check()?;
        if let Ok(ch) = crate::agent_tls::channel(&addr.to_string(), BENCH_HOST).await {
            break AgentClient::new(ch);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let img = ag::RegisterImageRequest {
        id: "guest".into(),
        kernel_path: bins.guest.display().to_string(),
        ..Default::default()
    };
    c.register_image(img)
        .await
        .map_err(rpc("agent RegisterImage"))?;
    let mut out = Vec::new();
    for n in 0..=runs {
        let id = format!("i-bench{n:04}");
        let t = Instant::now();
        let r = agent_launch(&mut c, &id, ty).await;
        let latency = ms(t.elapsed());
        let deleted = c
            .delete_instance(ag::DeleteInstanceRequest { id: id.clone() })
            .await;
        r?;
        deleted.map_err(rpc("agent DeleteInstance"))?;
        if n > 0 {
            out.push(latency);
        }
    }
    drop(agent);
    drop(scratch);
    Ok(out)
}

async fn agent_launch(c: &mut AgentClient<Channel>, id: &str, ty: &pb::InstanceType) -> Result<()> {
    let spec = ag::InstanceSpec {
        id: id.into(),
        vcpus: ty.vcpus,
        memory_mib: ty.memory_mib,
        image_id: "guest".into(),
        cmdline_extra: IMAGE_CMDLINE.into(),
        ..Default::default()
    };
    let create = ag::CreateInstanceRequest { spec: Some(spec) };
    c.create_instance(create)
        .await
        .map_err(rpc("agent CreateInstance"))?;
    let start = ag::StartInstanceRequest {
        id: id.into(),
        volumes: None,
        resources: None,
    };
    c.start_instance(start)
        .await
        .map_err(rpc("agent StartInstance"))?;
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let get = ag::GetInstanceRequest { id: id.into() };
        let i = c
            .get_instance(get)
            .await
            .map_err(rpc("agent GetInstance"))?;
        if i.get_ref().state == ag::InstanceState::Running as i32 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{id} never ran on the agent: {:?}", i.get_ref()));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Measure 2; `runs` timed launches after one warm-up.
pub(super) async fn bench(bins: &Binaries, runs: usize) -> Result<Value> {
    let mut aio = AllInOne::start(bins).await?;
    let mut live = Vec::new();
    let result = launches(&mut aio, bins, runs, &mut live).await;
    if !live.is_empty() {
        // Leave nothing on the host: the agent keeps VMMs when it stops.
        let _ = aio.terminate(&live).await;
    }
    drop(aio);
    let (ty, latencies, rtts) = result?;
    let base = stats(agent_baseline(bins, &ty, runs).await?);
    let lat = stats(latencies);
    let rtt = stats(rtts);
    let ok = num(&lat, "p50") < TARGET_P50_MS && num(&lat, "p99") < TARGET_P99_MS;
    println!(
        "RunInstances → running ({}): p50 {:.1} ms, p99 {:.1} ms (target p50 < {TARGET_P50_MS:.0}, p99 < {TARGET_P99_MS:.0}: {}); baseline agent Create+Start → running p50 {:.1} ms, p99 {:.1} ms; DescribeInstances round-trip p50 {:.2} ms",
        ty.name,
        num(&lat, "p50"),
        num(&lat, "p99"),
        met(ok),
        num(&base, "p50"),
        num(&base, "p99"),
        num(&rtt, "p50"),
    );
    Ok(json!({
        "instance_type": ty.name,
        "run_to_running_ms": lat,
        "baseline_agent_create_start_to_running_ms": base,
        "describe_round_trip_ms": rtt,
        "poll_interval_ms": ms(POLL),
        "config": "as `ferro up` writes it: reconcile_interval_ms 200, heartbeat_interval_ms 1000 (defaults)",
        "launch_offsets": "spread evenly over the reconcile period",
        "target_p50_ms": TARGET_P50_MS,
        "target_p99_ms": TARGET_P99_MS,
        "met": ok,
    }))
}
