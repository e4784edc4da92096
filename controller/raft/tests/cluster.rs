//! In-process clusters on loopback (one address per cluster): replication, failover, catch-up by
//! snapshot, partitions, leader redirection, membership, and the
//! committed-writes benchmark.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferro_raft::{
    bench_committed_writes, Member, RaftConfig, RaftReplicator, ReplicationError, Replicator,
    ServerHandle, StateMachine,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

/// A toy key-value store.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Kv {
    map: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
enum Cmd {
    Put(String, u64),
}

impl StateMachine for Kv {
    type Command = Cmd;
    type Response = Option<u64>;

    fn apply(&mut self, Cmd::Put(k, v): Cmd) -> Option<u64> {
        self.map.insert(k, v)
    }

    /// The key "format" plays the state's format: this build reads 1.
    fn upgrade(&mut self) -> Result<(), String> {
        match self.map.get("format").copied().unwrap_or(0) {
            f if f <= 1 => Ok(()),
            f => Err(format!(
                "state format {f} is newer than this build reads (1)"
            )),
        }
    }
}

type Node = Arc<RaftReplicator<Kv>>;

struct Running {
    node: Node,
    server: ServerHandle,
}

/// Nodes 1..=n with fixed addresses and data dirs, started and stopped at will.
struct Cluster {
    _dir: tempfile::TempDir,
    configs: Vec<RaftConfig>,
    nodes: Vec<Option<Running>>,
}

impl Cluster {
    async fn new(n: usize, tweak: impl Fn(&mut RaftConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut configs = Vec::new();
        // Each cluster on a loopback address of its own: a node restarted
        // on its port cannot find it taken by another test's ephemeral
        // bind (they all bind 127.0.0.1 or their own address).
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ip = format!("127.0.{}.{}", 100 + (k / 250) % 100, 1 + k % 250);
        for id in 1..=n as u64 {
            // Reserve an ephemeral port, then release it for the node.
            let port = std::net::TcpListener::bind((ip.as_str(), 0))
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut c =
                RaftConfig::new(id, format!("{ip}:{port}"), dir.path().join(id.to_string()));
            tweak(&mut c);
            configs.push(c);
        }
        let mut cluster = Self {
            _dir: dir,
            configs,
            nodes: Vec::new(),
        };
        for id in 1..=n as u64 {
            cluster.nodes.push(None);
            cluster.start(id).await;
        }
        cluster
    }

    /// Starts (or restarts) node `id` on its address and data dir.
    async fn start(&mut self, id: u64) {
        let config = self.configs[id as usize - 1].clone();
        let listener = bind_retry(&config.addr).await;
        let node = Arc::new(RaftReplicator::<Kv>::open(config).await.unwrap());
        let server = node.serve(listener);
        self.nodes[id as usize - 1] = Some(Running { node, server });
    }

    /// Stops node `id` (its data dir stays).
    async fn stop(&mut self, id: u64) {
        let r = self.nodes[id as usize - 1].take().expect("node running");
        r.node.set_partitioned(true);
        r.server.stop().await;
        r.node.shutdown().await;
    }

    fn node(&self, id: u64) -> &Node {
        &self.nodes[id as usize - 1]
            .as_ref()
            .expect("node running")
            .node
    }

    fn members(&self) -> Vec<Member> {
        self.configs
            .iter()
            .map(|c| Member {
                id: c.node_id,
                addr: c.addr.clone(),
            })
            .collect()
    }

    async fn init(&self) -> Node {
        self.node(1).initialize(self.members()).await.unwrap();
        self.leader().await
    }

    /// Waits for a running node that all running nodes agree leads.
    async fn leader(&self) -> Node {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let running: Vec<&Node> = self.nodes.iter().flatten().map(|r| &r.node).collect();
            let leaders: Vec<Option<u64>> =
                running.iter().map(|n| n.leader().map(|m| m.id)).collect();
            if let Some(Some(id)) = leaders.first() {
                if leaders.iter().all(|l| *l == Some(*id)) {
                    if let Some(n) = running.iter().find(|n| n.node_id() == *id) {
                        return (*n).clone();
                    }
                }
            }
            assert!(Instant::now() < deadline, "no agreed leader: {leaders:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn shutdown(mut self) {
        for id in 1..=self.nodes.len() as u64 {
            if self.nodes[id as usize - 1].is_some() {
                self.stop(id).await;
            }
        }
    }
}

async fn bind_retry(addr: &str) -> TcpListener {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot bind {addr}");
}

fn put(k: impl Into<String>, v: u64) -> Cmd {
    Cmd::Put(k.into(), v)
}

/// Waits until `node`'s local state satisfies `pred`.
async fn eventually(node: &Node, what: &str, pred: impl Fn(&Kv) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.read_local(&pred).unwrap() {
        assert!(
            Instant::now() < deadline,
            "node {}: timed out waiting for {what}",
            node.node_id()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Writes through whichever node leads, following redirects and retrying
/// while there is no leader.
async fn write_retry(c: &Cluster, cmd: Cmd) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leader = c.leader().await;
        match leader.write(cmd.clone()).await {
            Ok(r) => return r,
            Err(e) => assert!(Instant::now() < deadline, "write kept failing: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_write_read_restart_keeps_state() {
    let mut c = Cluster::new(1, |_| {}).await;
    let leader = c.init().await;
    assert_eq!(leader.write(put("a", 1)).await.unwrap(), None);
    assert_eq!(leader.write(put("a", 2)).await.unwrap(), Some(1));
    for i in 0..100 {
        leader.write(put(format!("k{i}"), i)).await.unwrap();
    }
    assert_eq!(
        leader.read(|s| s.map.get("a").copied()).await.unwrap(),
        Some(2)
    );
    leader.snapshot_now().await.unwrap();
    leader.write(put("after-snapshot", 7)).await.unwrap();
    drop(leader);

    c.stop(1).await;
    c.start(1).await;
    let leader = c.leader().await;
    assert_eq!(
        leader
            .read(|s| (s.map.get("a").copied(), s.map.len()))
            .await
            .unwrap(),
        (Some(2), 102)
    );
    assert_eq!(
        leader
            .read(|s| s.map.get("after-snapshot").copied())
            .await
            .unwrap(),
        Some(7)
    );
    // Re-initializing an initialized node is a no-op.
    leader.initialize_single().await.unwrap();
    assert_eq!(leader.members(), c.members());
    c.shutdown().await;
}

/// A snapshot written in a format this build cannot read is refused when
/// the node opens, with the state machine's reason; nothing is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_newer_format_is_refused_at_start() {
    let mut c = Cluster::new(1, |_| {}).await;
    let leader = c.init().await;
    leader.write(put("format", 2)).await.unwrap();
    leader.snapshot_now().await.unwrap();
    drop(leader);
    c.stop(1).await;
    let e = match RaftReplicator::<Kv>::open(c.configs[0].clone()).await {
        Ok(_) => panic!("a snapshot of a newer format was opened"),
        Err(e) => e,
    };
    let mut msg = e.to_string();
    let mut cur = std::error::Error::source(&e);
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    assert!(msg.contains("newer than this build reads"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_writes() {
    let c = Cluster::new(3, |_| {}).await;
    let leader = c.init().await;
    for i in 0..200 {
        leader.write(put(format!("k{i}"), i)).await.unwrap();
    }
    for id in 1..=3 {
        eventually(c.node(id), "200 keys", |s| s.map.len() == 200).await;
    }
    assert_eq!(leader.read(|s| s.map["k199"]).await.unwrap(), 199);
    assert_eq!(leader.members().len(), 3);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_answers_not_leader_naming_the_leader() {
    let c = Cluster::new(3, |_| {}).await;
    let leader = c.init().await;
    let follower = (1..=3)
        .map(|id| c.node(id))
        .find(|n| n.node_id() != leader.node_id())
        .unwrap();
    match follower.write(put("x", 1)).await {
        Err(ReplicationError::NotLeader { leader: Some(m) }) => assert_eq!(m, leader.me()),
        other => panic!("expected NotLeader naming the leader, got {other:?}"),
    }
    match follower.read(|s| s.map.len()).await {
        Err(ReplicationError::NotLeader { leader: Some(m) }) => assert_eq!(m.id, leader.node_id()),
        other => panic!("expected NotLeader, got {other:?}"),
    }
    assert_eq!(follower.leader(), Some(leader.me()));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_stop_elects_a_new_leader_and_loses_no_committed_write() {
    let mut c = Cluster::new(3, |_| {}).await;
    let leader = c.init().await;
    let mut acked = Vec::new();
    for i in 0..300 {
        leader.write(put(format!("k{i}"), i)).await.unwrap();
        acked.push(i);
    }
    let old = leader.node_id();
    drop(leader);
    c.stop(old).await;

    let new = c.leader().await;
    assert_ne!(new.node_id(), old);
    for i in 300..600 {
        write_retry(&c, put(format!("k{i}"), i)).await;
        acked.push(i);
    }
    let new = c.leader().await;
    let missing = new
        .read(move |s| {
            acked
                .iter()
                .filter(|i| !s.map.contains_key(&format!("k{i}")))
                .count()
        })
        .await;
    assert_eq!(missing.unwrap(), 0);

    // The old leader comes back as a follower and catches up.
    c.start(old).await;
    eventually(c.node(old), "600 keys", |s| s.map.len() == 600).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_node_catches_up_by_snapshot() {
    let mut c = Cluster::new(3, |cfg| {
        // Concurrent writes share log entries: 10,000 writes make far fewer
        // entries, so snapshot often enough to compact past the lagging node.
        cfg.snapshot_every = 100;
        cfg.keep_logs_after_snapshot = 10;
    })
    .await;
    let leader = c.init().await;
    let lagging = if leader.node_id() == 3 { 2 } else { 3 };
    c.stop(lagging).await;

    let mut tasks = Vec::new();
    for w in 0..50u64 {
        let leader = leader.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200u64 {
                leader.write(put(format!("k{w}-{i}"), i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = leader.stats();
    assert!(
        stats.snapshots_built >= 1,
        "leader built no snapshot: {stats:?}"
    );
    assert!(stats.purged.is_some(), "leader compacted no log: {stats:?}");

    c.start(lagging).await;
    eventually(c.node(lagging), "10,000 keys", |s| s.map.len() == 10_000).await;
    let stats = c.node(lagging).stats();
    assert!(
        stats.snapshots_installed >= 1,
        "no snapshot installed: {stats:?}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_stops_accepting_writes() {
    let c = Cluster::new(3, |cfg| cfg.request_timeout = Duration::from_secs(2)).await;
    let leader = c.init().await;
    leader.write(put("before", 1)).await.unwrap();
    leader.set_partitioned(true);
    // After an election timeout the old leader refuses writes.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let started = Instant::now();
    match leader.write(put("lost", 1)).await {
        Err(
            ReplicationError::Unavailable(_)
            | ReplicationError::Indeterminate(_)
            | ReplicationError::NotLeader { .. },
        ) => {}
        other => panic!("partitioned leader accepted a write: {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        leader.read(|s| s.map.len()).await.is_err(),
        "partitioned leader served a read"
    );

    // The majority elects another leader and goes on.
    let others: Vec<&Node> = (1..=3)
        .map(|id| c.node(id))
        .filter(|n| n.node_id() != leader.node_id())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    let new = loop {
        let l = others[0].leader().filter(|m| m.id != leader.node_id());
        if let Some(m) = l {
            break c.node(m.id).clone();
        }
        assert!(Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    new.write(put("after", 2)).await.unwrap();

    // Healed, the old leader follows and gets the new write.
    leader.set_partitioned(false);
    eventually(&leader, "the write made during the partition", |s| {
        s.map.contains_key("after")
    })
    .await;
    assert!(!leader.read_local(|s| s.map.contains_key("lost")).unwrap());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_and_remove_member() {
    let mut c = Cluster::new(3, |_| {}).await;
    // Start as a single-node cluster of node 1, then grow to 3 and shrink.
    c.node(1).initialize_single().await.unwrap();
    let leader = c.leader_of(1).await;
    for i in 0..50 {
        leader.write(put(format!("k{i}"), i)).await.unwrap();
    }
    let m = c.members();
    leader.add_member(m[1].clone()).await.unwrap();
    leader.add_member(m[2].clone()).await.unwrap();
    assert_eq!(leader.members(), m);
    eventually(c.node(3), "50 keys", |s| s.map.len() == 50).await;

    leader.remove_member(3).await.unwrap();
    assert_eq!(leader.members(), m[..2].to_vec());
    leader.write(put("after-remove", 1)).await.unwrap();
    c.stop(3).await;
    leader.write(put("with-3-stopped", 1)).await.unwrap();
    c.shutdown().await;
}

impl Cluster {
    /// Waits until node `id` sees itself as leader.
    async fn leader_of(&self, id: u64) -> Node {
        let n = self.node(id).clone();
        let m = n.wait_for_leader(Duration::from_secs(10)).await.unwrap();
        assert_eq!(m.id, id);
        n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_three_nodes_committed_writes() {
    let rate = bench_committed_writes(3, 30_000, 1_024).await.unwrap();
    println!("committed writes/s (3 nodes, loopback, fsync on): {rate:.0}");
    assert!(rate > 0.0);
}
