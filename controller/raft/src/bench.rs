//! The committed-writes benchmark (`cargo xtask bench controller`): an
//! in-process cluster on loopback, fsync on, many concurrent proposers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::{Member, RaftConfig, RaftReplicator, ReplicationError, Replicator, StateMachine};

/// A small key-value state machine, for the benchmark and tests.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BenchKv {
    /// The stored pairs.
    pub map: BTreeMap<String, String>,
}

impl StateMachine for BenchKv {
    /// `(key, value)` to set.
    type Command = (String, String);
    /// The previous value.
    type Response = Option<String>;

    fn apply(&mut self, (k, v): (String, String)) -> Option<String> {
        self.map.insert(k, v)
    }
}

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up the cluster failed.
    #[error("cannot set up the benchmark cluster: {0}")]
    Setup(String),
    /// A write failed.
    #[error("a benchmark write failed")]
    Write(#[source] ReplicationError),
}

/// Starts `nodes` in-process nodes on 127.0.0.1 with data under a
/// temporary directory, then makes `writes` writes from `concurrency`
/// concurrent proposers on the leader. Returns committed writes per second
/// (fsync on). The directory is removed afterwards.
pub async fn bench_committed_writes(
    nodes: usize,
    writes: usize,
    concurrency: usize,
) -> Result<f64, BenchError> {
    let setup = |e: &dyn std::fmt::Display| BenchError::Setup(e.to_string());
    let root = std::env::temp_dir().join(format!("ferro-raft-bench-{}", std::process::id()));
    let mut cluster = Vec::new();
    let mut servers = Vec::new();
    for id in 1..=nodes as u64 {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| setup(&e))?;
        let addr = listener.local_addr().map_err(|e| setup(&e))?.to_string();
        let mut config = RaftConfig::new(id, addr, root.join(id.to_string()));
        config.snapshot_every = 50_000;
        let node = RaftReplicator::<BenchKv>::open(config)
            .await
            .map_err(|e| setup(&e))?;
        servers.push(node.serve(listener));
        cluster.push(Arc::new(node));
    }
    let members: Vec<Member> = cluster.iter().map(|n| n.me()).collect();
    cluster[0]
        .initialize(members)
        .await
        .map_err(|e| setup(&e))?;
    let leader = cluster[0]
        .wait_for_leader(Duration::from_secs(10))
        .await
        .map_err(|e| setup(&e))?;
    let leader = cluster
        .iter()
        .find(|n| n.node_id() == leader.id)
        .cloned()
        .ok_or_else(|| setup(&"leader"))?;

    let concurrency = concurrency.max(1);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let leader = leader.clone();
        let count = writes / concurrency + usize::from(worker < writes % concurrency);
        tasks.push(tokio::spawn(async move {
            for i in 0..count {
                leader
                    .write((format!("k{worker}-{i}"), "v".repeat(32)))
                    .await?;
            }
            Ok::<_, ReplicationError>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| setup(&e))?.map_err(BenchError::Write)?;
    }
    let rate = writes as f64 / start.elapsed().as_secs_f64();
    for n in &cluster {
        n.shutdown().await;
    }
    for s in servers {
        s.stop().await;
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(&root);
    Ok(rate)
}
