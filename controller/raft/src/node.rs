//! [`RaftReplicator`]: a [`Replicator`] over openraft, RocksDB and gRPC.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{
    CheckIsLeaderError, ClientWriteError, ForwardToLeader, InitializeError, RaftError,
};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState, SnapshotPolicy};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;

use crate::batch::{self, Proposal};
use crate::network::{NetControl, NetworkFactory, RaftGrpc};
use crate::store::{self, Counters, LogStore, SmData, SmStore, StoreError};
use crate::types::TypeConfig;
use crate::{Member, NodeId, ReplicationError, Replicator, StateMachine};

/// How a node is set up. [`RaftConfig::new`] gives the defaults below.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    /// This node's id, unique in the cluster and never reused.
    pub node_id: NodeId,
    /// The `host:port` peers reach this node's gRPC endpoint at.
    pub addr: String,
    /// Where the RocksDB database lives (created if missing).
    pub data_dir: PathBuf,
    /// Leader heartbeat period (default 100 ms).
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomized election timeout (default 300 ms).
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout (default 600 ms).
    pub election_timeout_max: Duration,
    /// Build a snapshot (and compact the log) every this many applied
    /// entries (default 5,000).
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot for slow followers (default 1,000).
    pub keep_logs_after_snapshot: u64,
    /// Most entries in one AppendEntries RPC (default 2,000).
    pub max_entries_per_rpc: u64,
    /// How long a write or read may wait for a quorum (default 5 s).
    pub request_timeout: Duration,
    /// A leader whose last acknowledgement from a quorum is older than
    /// this refuses writes at once with `Unavailable` (it is likely cut
    /// off; a new leader is elected after the election timeout). Default 1 s.
    pub quorum_loss_timeout: Duration,
    /// Concurrent writes are batched into log entries; at most this many
    /// batches are in flight at once (default 8).
    pub max_batches_in_flight: usize,
    /// Make connections to peers from this local address (default: the
    /// kernel's choice). A node listening on one address of a multi-homed
    /// host sends from it too, so peers and firewalls see one address per
    /// node.
    pub source_ip: Option<std::net::IpAddr>,
    /// Connect to peers over TLS, verifying their certificates against
    /// this CA (PEM). Peers' addresses must match their certificates
    /// (an IP address SAN for `ip:port` members). `None`: plaintext.
    pub peer_tls_ca_pem: Option<String>,
}

impl RaftConfig {
    /// The defaults for node `node_id` reachable at `addr`, storing under `data_dir`.
    pub fn new(node_id: NodeId, addr: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_id,
            addr: addr.into(),
            data_dir: data_dir.into(),
            heartbeat_interval: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(300),
            election_timeout_max: Duration::from_millis(600),
            snapshot_every: 5_000,
            keep_logs_after_snapshot: 1_000,
            max_entries_per_rpc: 2_000,
            request_timeout: Duration::from_secs(5),
            quorum_loss_timeout: Duration::from_secs(1),
            max_batches_in_flight: 8,
            source_ip: None,
            peer_tls_ca_pem: None,
        }
    }

    fn openraft(&self) -> Result<openraft::Config, OpenError> {
        let ms = |d: Duration| d.as_millis() as u64;
        let config = openraft::Config {
            cluster_name: "ferro-controller".into(),
            heartbeat_interval: ms(self.heartbeat_interval),
            election_timeout_min: ms(self.election_timeout_min),
            election_timeout_max: ms(self.election_timeout_max),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_logs_after_snapshot,
            max_payload_entries: self.max_entries_per_rpc,
            ..Default::default()
        };
        config
            .validate()
            .map_err(|e| OpenError::Config(e.to_string()))
    }
}

/// Errors opening a node.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The configuration is inconsistent (e.g. heartbeat not below the election timeout).
    #[error("invalid raft configuration: {0}")]
    Config(String),
    /// The data directory could not be created.
    #[error("cannot create the data directory")]
    DataDir(#[source] std::io::Error),
    /// The store could not be opened.
    #[error("cannot open the raft store")]
    Store(#[source] StoreError),
    /// openraft failed to start.
    #[error("cannot start raft: {0}")]
    Start(String),
}

/// Counters of one node, for tests and monitoring.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaftStats {
    /// Snapshots this node built from its own state.
    pub snapshots_built: u64,
    /// Snapshots this node received from a leader and installed.
    pub snapshots_installed: u64,
    /// WAL fsyncs (each covers one or more log appends).
    pub wal_syncs: u64,
    /// Index of the last applied log entry.
    pub last_applied: Option<u64>,
    /// Index of the last log entry.
    pub last_log_index: Option<u64>,
    /// Index up to which the log has been compacted away.
    pub purged: Option<u64>,
    /// Current term.
    pub term: u64,
    /// What this node is now: `leader`, `follower`, `candidate`,
    /// `learner` or `shutdown`.
    pub role: String,
}

/// A running standalone Raft gRPC server (see [`RaftReplicator::serve`]).
pub struct ServerHandle {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl ServerHandle {
    /// Stops accepting connections, closes the open ones and waits (at most
    /// a few seconds) for the server to end.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(3), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// A node of a Raft-replicated `S`: openraft 0.9, RocksDB storage, gRPC
/// transport. Cheap to share behind an `Arc`.
pub struct RaftReplicator<S: StateMachine> {
    raft: Raft<TypeConfig<S>>,
    proposals: tokio::sync::mpsc::UnboundedSender<Proposal<S>>,
    state: Arc<RwLock<SmData<S>>>,
    control: Arc<NetControl>,
    counters: Arc<Counters>,
    config: RaftConfig,
    lease: Arc<std::sync::Mutex<Lease>>,
}

/// What the leader last reported about its quorum, and when this node saw
/// the report: a read may be served from the local state, without a quorum
/// round, while the lease holds (see [`Lease::valid`]).
#[derive(Clone, Copy, Debug, Default)]
struct Lease {
    /// When the report was seen.
    seen: Option<std::time::Instant>,
    /// This node leads, and has applied an entry of its own term (so every
    /// entry of earlier leaders is applied here too).
    leading_and_caught_up: bool,
    /// The report's age of the last quorum acknowledgement, in ms: counted
    /// from when the acknowledged request was *sent*, so followers heard
    /// from this leader at least that recently.
    since_quorum_ack_ms: Option<u64>,
}

impl Lease {
    /// Whether a read may be served locally now: the last quorum
    /// acknowledgement is younger than `lease` (half the shortest election
    /// timeout, so no follower can have elected another leader since).
    fn valid(&self, lease: Duration) -> bool {
        match (self.seen, self.since_quorum_ack_ms) {
            (Some(seen), Some(ms)) if self.leading_and_caught_up => {
                Duration::from_millis(ms) + seen.elapsed() < lease
            }
            _ => false,
        }
    }
}

impl<S: StateMachine> RaftReplicator<S> {
    /// Opens the node's store under `config.data_dir` and starts Raft. A
    /// fresh node waits to be initialized ([`Self::initialize`]) or added to
    /// a cluster; a restarted one rejoins its cluster. The node needs its
    /// gRPC service ([`Self::grpc_service`]) served at `config.addr`.
    pub async fn open(config: RaftConfig) -> Result<Self, OpenError> {
        let raft_config = Arc::new(config.openraft()?);
        std::fs::create_dir_all(&config.data_dir).map_err(OpenError::DataDir)?;
        let db = store::open_db(&config.data_dir).map_err(OpenError::Store)?;
        let counters = Arc::new(Counters::default());
        let log = LogStore::<S>::new(db.clone(), counters.clone());
        let sm = SmStore::<S>::open(db, counters.clone()).map_err(OpenError::Store)?;
        let state = sm.shared();
        let control = Arc::new(NetControl::default());
        let network = NetworkFactory {
            control: control.clone(),
            source_ip: config.source_ip,
            tls: config.peer_tls_ca_pem.as_ref().map(|ca| {
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            }),
        };
        let raft = Raft::new(config.node_id, raft_config, network, log, sm)
            .await
            .map_err(|e| OpenError::Start(e.to_string()))?;
        let lease = Arc::new(std::sync::Mutex::new(Lease::default()));
        {
            let (mut rx, lease) = (raft.metrics(), lease.clone());
            tokio::spawn(async move {
                loop {
                    let l = {
                        let m = rx.borrow_and_update();
                        let term = m.current_term;
                        Lease {
                            seen: Some(std::time::Instant::now()),
                            leading_and_caught_up: m.state == ServerState::Leader
                                && m.last_applied.is_some_and(|l| l.leader_id.term == term),
                            since_quorum_ack_ms: m.millis_since_quorum_ack,
                        }
                    };
                    if let Ok(mut g) = lease.lock() {
                        *g = l;
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
        let proposals = batch::spawn(raft.clone(), config.max_batches_in_flight, map_write_error);
        Ok(Self {
            raft,
            proposals,
            state,
            control,
            counters,
            config,
            lease,
        })
    }

    /// Makes a new cluster of `members` (which must include this node). Call
    /// it on one node of a fresh cluster; the others only need to be
    /// opened and served. A no-op on a node that is already initialized.
    pub async fn initialize(&self, members: Vec<Member>) -> Result<(), ReplicationError> {
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .into_iter()
            .map(|m| (m.id, BasicNode { addr: m.addr }))
            .collect();
        // Already initialized (a restart): nothing to do, and nothing for
        // openraft to log as an error.
        if self.raft.is_initialized().await.unwrap_or(false) {
            return Ok(());
        }
        match self.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(RaftError::APIError(e)) => Err(ReplicationError::Membership(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(ReplicationError::Unavailable(e.to_string())),
        }
    }

    /// Initializes a single-node cluster of this node (all-in-one).
    pub async fn initialize_single(&self) -> Result<(), ReplicationError> {
        self.initialize(vec![self.me()]).await
    }

    /// This node as a [`Member`].
    pub fn me(&self) -> Member {
        Member {
            id: self.config.node_id,
            addr: self.config.addr.clone(),
        }
    }

    /// The `ferro.raft.v1.Raft` gRPC service of this node, to add to the
    /// tonic `Server` that listens on `config.addr` (next to other services).
    /// Build that server with `tcp_nodelay(true)`: replication latency
    /// suffers from Nagle's algorithm otherwise.
    pub fn grpc_service(&self) -> ferro_proto::raft::v1::raft_server::RaftServer<RaftGrpc<S>> {
        ferro_proto::raft::v1::raft_server::RaftServer::new(RaftGrpc::new(
            self.raft.clone(),
            self.control.clone(),
        ))
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
    }

    /// Serves only the Raft service on `listener` (tests, or a dedicated
    /// replication port) until the returned handle is stopped.
    pub fn serve(&self, listener: TcpListener) -> ServerHandle {
        let service = self.grpc_service();
        let (stop, stopped) = oneshot::channel::<()>();
        // Small replies must not wait for Nagle's algorithm.
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
            conn.inspect(|c| {
                let _ = c.set_nodelay(true);
            })
        });
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await
        });
        ServerHandle { stop, task }
    }

    /// Waits until some node is known as leader, up to `timeout`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<Member, ReplicationError> {
        let mut rx = self.raft.metrics();
        let found = tokio::time::timeout(timeout, async {
            loop {
                if let Some(m) = self.leader() {
                    return m;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        })
        .await;
        found.map_err(|_| ReplicationError::Unavailable("no leader elected in time".into()))
    }

    /// Fault injection for tests: a partitioned node drops all Raft traffic,
    /// sent and received, until this is called again with `false`.
    pub fn set_partitioned(&self, partitioned: bool) {
        self.control.set_partitioned(partitioned);
    }

    /// Builds a snapshot of everything applied so far (and compacts the log
    /// behind it), and returns once that snapshot is on disk. Openraft's
    /// trigger only queues the build; waiting for the snapshot metric to
    /// cover the applied index is what makes "now" true.
    pub async fn snapshot_now(&self) -> Result<(), ReplicationError> {
        let applied = self.raft.metrics().borrow().last_applied.map(|l| l.index);
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| ReplicationError::Unavailable(e.to_string()))?;
        let Some(applied) = applied else {
            return Ok(());
        };
        self.raft
            .wait(Some(Duration::from_secs(30)))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= applied),
                "snapshot covers the applied log",
            )
            .await
            .map(|_| ())
            .map_err(|e| ReplicationError::Unavailable(format!("snapshot not built: {e}")))
    }

    /// Stops Raft on this node. The store closes when the last handle drops.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(node = self.config.node_id, "raft shutdown: {e}");
        }
    }

    fn member(&self, id: NodeId) -> Option<Member> {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| Member {
                id,
                addr: n.addr.clone(),
            })
    }

    /// Refuses a write early when this node leads but has not heard from a
    /// quorum for longer than `quorum_loss_timeout` (it is likely cut off).
    fn check_quorum_fresh(&self) -> Result<(), ReplicationError> {
        let m = self.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return Ok(());
        }
        let voters = m.membership_config.membership().voter_ids().count();
        // `None` right after an election: the first heartbeats are on their way.
        let stale = m
            .millis_since_quorum_ack
            .is_some_and(|ms| ms > self.config.quorum_loss_timeout.as_millis() as u64);
        if voters > 1 && stale {
            return Err(ReplicationError::Unavailable(format!(
                "leader {} has not heard from a quorum for {} ms",
                self.config.node_id,
                m.millis_since_quorum_ack.unwrap_or_default()
            )));
        }
        Ok(())
    }

    async fn with_timeout<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, ReplicationError>>,
    ) -> Result<T, ReplicationError> {
        tokio::time::timeout(self.config.request_timeout, fut)
            .await
            .unwrap_or_else(|_| {
                Err(ReplicationError::Unavailable(format!(
                    "{what} timed out waiting for a quorum"
                )))
            })
    }

    async fn change_membership(
        &self,
        change: ChangeMembers<NodeId, BasicNode>,
    ) -> Result<(), ReplicationError> {
        self.raft
            .change_membership(change, false)
            .await
            .map(|_| ())
            .map_err(map_write_error)
    }
}

fn forward(f: ForwardToLeader<NodeId, BasicNode>) -> ReplicationError {
    let leader = match (f.leader_id, f.leader_node) {
        (Some(id), Some(node)) => Some(Member {
            id,
            addr: node.addr,
        }),
        _ => None,
    };
    ReplicationError::NotLeader { leader }
}

fn map_write_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ReplicationError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => forward(f),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ReplicationError::Membership(e.to_string())
        }
        RaftError::Fatal(e) => fatal(e),
    }
}

fn map_read_error(e: RaftError<NodeId, CheckIsLeaderError<NodeId, BasicNode>>) -> ReplicationError {
    match e {
        RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => forward(f),
        RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
            ReplicationError::Unavailable(format!(
                "this leader cannot reach a majority of the cluster (answered: nodes {:?})",
                q.got
            ))
        }
        RaftError::Fatal(e) => fatal(e),
    }
}

fn fatal(e: openraft::error::Fatal<NodeId>) -> ReplicationError {
    match e {
        openraft::error::Fatal::StorageError(s) => ReplicationError::Storage(s.to_string()),
        other => ReplicationError::Unavailable(other.to_string()),
    }
}

fn poisoned() -> ReplicationError {
    ReplicationError::Storage("state machine poisoned".into())
}

impl<S: StateMachine> Replicator<S> for RaftReplicator<S> {
    async fn write(&self, command: S::Command) -> Result<S::Response, ReplicationError> {
        self.check_quorum_fresh()?;
        let (reply, response) = tokio::sync::oneshot::channel();
        self.proposals
            .send(Proposal { command, reply })
            .map_err(|_| ReplicationError::Unavailable("the proposer has stopped".into()))?;
        // Proposed: from here on, no answer means the write may still
        // commit later (callers that retry use client tokens).
        let r = self
            .with_timeout("write", async {
                response.await.unwrap_or_else(|_| {
                    Err(ReplicationError::Indeterminate(
                        "the proposer stopped before the write was answered".into(),
                    ))
                })
            })
            .await;
        match r {
            Err(ReplicationError::Unavailable(m)) if m.contains("timed out") => Err(
                ReplicationError::Indeterminate(format!("{m}; the write may still commit")),
            ),
            r => r,
        }
    }

    async fn read<R, F>(&self, f: F) -> Result<R, ReplicationError>
    where
        R: Send + 'static,
        F: FnOnce(&S) -> R + Send + 'static,
    {
        // Within the leader's lease the local state is linearizable: no
        // quorum round (and no error per read about a dead follower).
        let lease = self.config.election_timeout_min / 2;
        if self.lease.lock().is_ok_and(|l| l.valid(lease)) {
            let sm = self.state.read().map_err(|_| poisoned())?;
            return Ok(f(&sm.state));
        }
        // A leader cut off from its quorum refuses at once (and quietly)
        // instead of timing out a round per read.
        self.check_quorum_fresh()?;
        self.with_timeout("read", async {
            self.raft
                .ensure_linearizable()
                .await
                .map_err(map_read_error)?;
            let sm = self.state.read().map_err(|_| poisoned())?;
            Ok(f(&sm.state))
        })
        .await
    }

    fn read_local<R>(&self, f: impl FnOnce(&S) -> R) -> Result<R, ReplicationError> {
        let sm = self.state.read().map_err(|_| poisoned())?;
        Ok(f(&sm.state))
    }

    fn stats(&self) -> RaftStats {
        let m = self.raft.metrics().borrow().clone();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        RaftStats {
            snapshots_built: self.counters.snapshots_built.load(Ordering::Relaxed),
            snapshots_installed: self.counters.snapshots_installed.load(Ordering::Relaxed),
            wal_syncs: self.counters.wal_syncs.load(Ordering::Relaxed),
            last_applied: m.last_applied.map(|l| l.index),
            last_log_index: m.last_log_index,
            purged: m.purged.map(|l| l.index),
            term: m.current_term,
            role: role.into(),
        }
    }

    fn leader(&self) -> Option<Member> {
        let id = self.raft.metrics().borrow().current_leader?;
        self.member(id)
    }

    fn node_id(&self) -> NodeId {
        self.config.node_id
    }

    fn members(&self) -> Vec<Member> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let membership = m.membership_config.membership();
        membership
            .voter_ids()
            .filter_map(|id| {
                membership.get_node(&id).map(|n| Member {
                    id,
                    addr: n.addr.clone(),
                })
            })
            .collect()
    }

    async fn add_member(&self, member: Member) -> Result<(), ReplicationError> {
        // The learner is added and caught up (blocking) before it votes.
        self.raft
            .add_learner(member.id, BasicNode { addr: member.addr }, true)
            .await
            .map_err(map_write_error)?;
        self.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([member.id])))
            .await
    }

    async fn remove_member(&self, id: NodeId) -> Result<(), ReplicationError> {
        self.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])))
            .await
    }
}

#[cfg(test)]
mod lease_tests {
    use super::*;

    #[test]
    fn a_lease_holds_only_for_a_caught_up_leader_with_a_fresh_quorum() {
        let lease = Duration::from_millis(150);
        let now = std::time::Instant::now();
        let fresh = Lease {
            seen: Some(now),
            leading_and_caught_up: true,
            since_quorum_ack_ms: Some(40),
        };
        assert!(fresh.valid(lease));
        // Reported long ago: the report's age plus the time since.
        let old = Lease {
            seen: now.checked_sub(Duration::from_millis(200)),
            ..fresh
        };
        assert!(!old.valid(lease));
        assert!(!Lease {
            since_quorum_ack_ms: Some(200),
            ..fresh
        }
        .valid(lease));
        assert!(!Lease {
            leading_and_caught_up: false,
            ..fresh
        }
        .valid(lease));
        assert!(!Lease {
            since_quorum_ack_ms: None,
            ..fresh
        }
        .valid(lease));
        assert!(!Lease::default().valid(lease));
    }
}
