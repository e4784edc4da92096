//! The controller's RSS holding 10,000 instances on 1,000 fake hosts,
//! next to the same process holding the hosts and no instances.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferro_proto::agent::v1 as ag;
use ferro_proto::compute::v1 as pb;
use pb::compute_client::ComputeClient;
use pb::hosts_client::HostsClient;
use serde_json::{json, Value};

use super::daemons::{
    bearer, channel, compute, register_image, smallest_type, start_controller, Hosts, Scratch,
};
use super::{met, rpc, Binaries, Result};

const TARGET_RSS_MIB: f64 = 300.0;
const FAKE_HOSTS: usize = 1_000;
const RSS_BATCHES: usize = 100;
const RSS_BATCH: u32 = 100;
/// Registers `n` hosts of 16 vCPUs / 16 GiB, 8 heartbeaters in
/// parallel; the address is unreachable, nothing answers there.
pub(crate) async fn heartbeat_fake_hosts(addr: SocketAddr, key: &str, n: usize) -> Result<()> {
    let mut tasks = Vec::new();
    for chunk in 0..8 {
        let ch = channel(addr).await?;
        let mut admin = ComputeClient::with_interceptor(ch.clone(), bearer(key)?);
        let mut join = HostsClient::new(ch.clone());
        tasks.push(tokio::spawn(async move {
            for i in (chunk..n).step_by(8) {
                // Each fake host joins and heartbeats with its own key.
                let host_id = format!("fake-{i:04}");
                let token = admin
                    .create_join_token(pb::CreateJoinTokenRequest {
                        host_id: host_id.clone(),
                        ttl_seconds: 600,
                    })
                    .await
                    .map_err(rpc("CreateJoinToken"))?
                    .into_inner()
                    .token;
                let public_key = ferro_pki::generate_key()
                    .map_err(|e| e.to_string())?
                    .public_key;
                let host_key = join
                    .join(pb::JoinRequest {
                        host_id: host_id.clone(),
                        token,
                        public_key,
                    })
                    .await
                    .map_err(rpc("Join"))?
                    .into_inner()
                    .host_key;
                let mut h: Hosts = HostsClient::with_interceptor(ch.clone(), bearer(&host_key)?);
                let hb = pb::HeartbeatRequest {
                    host: Some(ag::HostInfoResponse {
                        host_id,
                        availability_zone: "az-1".into(),
                        cpu_model: "fake".into(),
                        vcpus_total: 16,
                        memory_total_mib: 16_384,
                        kvm_present: true,
                        agent_version: "fake".into(),
                        ..Default::default()
                    }),
                    address: "http://127.0.0.1:1".into(),
                    ..Default::default()
                };
                h.heartbeat(hb).await.map_err(rpc("Heartbeat"))?;
            }
            Ok::<_, String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// Measure 4.
pub(super) async fn bench(bins: &Binaries) -> Result<Value> {
    let scratch = Scratch::new("r")?;
    // The fake hosts heartbeat once; a long timeout keeps them healthy.
    let extra = "heartbeat_timeout_ms = 3600000\n";
    let (mut p, addr, key) = start_controller(&bins.controller, &scratch, extra, "error").await?;
    let mut c = compute(&mut p, addr, &key).await?;
    let ty = smallest_type(&mut c).await?;
    let image_id = register_image(&mut c, "guest", &bins.guest).await?;
    heartbeat_fake_hosts(addr, &key, FAKE_HOSTS).await?;
    let hosts = c
        .describe_hosts(pb::DescribeHostsRequest {
            max_results: FAKE_HOSTS as u32,
            ..Default::default()
        })
        .await
        .map_err(rpc("DescribeHosts"))?
        .into_inner()
        .hosts;
    if hosts.len() != FAKE_HOSTS {
        return Err(format!(
            "{} hosts registered, not {FAKE_HOSTS}",
            hosts.len()
        ));
    }
    // 10,000 addresses: more than the default /20 of the zone holds.
    let vpc = c
        .describe_vpcs(pb::DescribeVpcsRequest::default())
        .await
        .map_err(rpc("DescribeVpcs"))?
        .into_inner()
        .vpcs
        .into_iter()
        .find(|v| v.is_default)
        .ok_or("no default VPC")?;
    c.create_subnet(pb::CreateSubnetRequest {
        vpc_id: vpc.vpc_id,
        cidr_block: "172.31.64.0/18".into(),
        availability_zone: "az-1".into(),
        tags: vec![],
    })
    .await
    .map_err(rpc("CreateSubnet"))?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let base = p.status_mib("VmRSS");
    let t = Instant::now();
    for _ in 0..RSS_BATCHES {
        let run = pb::RunInstancesRequest {
            count: RSS_BATCH,
            instance_type: ty.name.clone(),
            image_id: image_id.clone(),
            ..Default::default()
        };
        c.run_instances(run).await.map_err(rpc("RunInstances"))?;
    }
    let instances = RSS_BATCHES * RSS_BATCH as usize;
    let per_sec = instances as f64 / t.elapsed().as_secs_f64();
    // A few reconcile passes over all of them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    p.check()?;
    let rss = p.status_mib("VmRSS");
    let hwm = p.status_mib("VmHWM");
    let ok = rss < TARGET_RSS_MIB;
    println!(
        "controller RSS with {instances} instances on {FAKE_HOSTS} hosts: {rss:.1} MiB, peak {hwm:.1} MiB (target < {TARGET_RSS_MIB:.0}: {}); baseline 0 instances: {base:.1} MiB; RunInstances ×{RSS_BATCH}: {per_sec:.0} instances/s",
        met(ok)
    );
    Ok(json!({
        "instances": instances,
        "hosts": FAKE_HOSTS,
        "rss_mib": rss,
        "peak_rss_mib": hwm,
        "baseline_zero_instances_rss_mib": base,
        "run_instances_per_sec": per_sec,
        "target_max_mib": TARGET_RSS_MIB,
        "met": ok,
    }))
}
