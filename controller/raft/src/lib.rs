//! `ferro-raft`: the controller's replicated state, behind a small trait.
//!
//! The controller's data model is a deterministic [`StateMachine`]: commands
//! go in, responses come out, and the whole state serializes for snapshots.
//! A [`Replicator`] makes such a state machine durable and replicated:
//! writes are linearizable (committed by a majority, fsynced), reads are
//! served by the leader after confirming it still leads, and a node that
//! is not the leader answers [`ReplicationError::NotLeader`] naming the
//! leader so clients can follow it.
//!
//! Implementations: a Raft cluster (openraft 0.9 with RocksDB storage and a
//! gRPC transport) and, for tests of the layers above, a single-process
//! in-memory replicator.
//!
//! Start a node with [`RaftReplicator::open`], serve its
//! [`RaftReplicator::grpc_service`] on its address, and on a fresh cluster
//! call [`RaftReplicator::initialize`] once on one node:
//!
//! ```ignore
//! let node = RaftReplicator::<MyState>::open(RaftConfig::new(1, "10.0.0.1:7000", "/var/lib/ferro/raft")).await?;
//! tonic::transport::Server::builder()
//!     .tcp_nodelay(true)
//!     .add_service(node.grpc_service()) // next to the controller's own services
//!     .serve(addr);
//! node.initialize_single().await?;      // all-in-one, or:
//! node.initialize(vec![m1, m2, m3]).await?; // on one node of a fresh 3-node cluster
//! let reply = node.write(cmd).await?;   // NotLeader { leader } on followers
//! ```
//!
//! Durability: the log lives in RocksDB and every append is fsynced (WAL
//! sync, shared by concurrent appends) before it counts; concurrent writes
//! are batched into one log entry. The state machine lives in memory and is
//! snapshotted (JSON) every `snapshot_every` entries, which compacts the
//! log; a restart loads the snapshot and re-applies the committed log.

mod batch;
mod bench;
mod network;
mod node;
mod store;
mod types;

pub use bench::{bench_committed_writes, BenchError, BenchKv};
pub use network::RaftGrpc;
pub use node::{OpenError, RaftConfig, RaftReplicator, RaftStats, ServerHandle};
pub use store::StoreError;

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A node id in the controller cluster.
pub type NodeId = u64;

/// A deterministic state machine: the same commands in the same order give
/// the same state and responses on every node.
pub trait StateMachine: Serialize + DeserializeOwned + Default + Send + Sync + 'static {
    /// A write, as stored in the replicated log.
    type Command: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static;
    /// What applying a command returns to the proposer.
    type Response: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static;

    /// Apply one committed command. Must not do I/O or read clocks: any
    /// time or randomness the command needs is inside the command.
    fn apply(&mut self, command: Self::Command) -> Self::Response;

    /// Called on every state decoded from a snapshot (at start and when a
    /// leader installs one) and on the empty state of a new node, before it
    /// is used: bring an older format up to date, or refuse one this build
    /// cannot read (a newer controller wrote it) with a message saying so.
    /// A refused snapshot is never applied.
    fn upgrade(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// A cluster member as clients see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Member {
    /// Node id.
    pub id: NodeId,
    /// Address of its gRPC endpoint (`host:port`).
    pub addr: String,
}

/// Errors of a replicated operation.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ReplicationError {
    /// This node is not the leader; `leader` is the one it knows of.
    #[error("not the leader; leader is {}", .leader.as_ref().map_or("unknown".to_string(), |m| format!("node {} at {}", m.id, m.addr)))]
    NotLeader {
        /// The current leader, if known.
        leader: Option<Member>,
    },
    /// No quorum could be reached; the write was not proposed (or the read
    /// not served): safe to send again.
    #[error("no quorum: {0}")]
    Unavailable(String),
    /// A proposed write got no answer in time: it may still commit. Only an
    /// idempotent write (or one with a client token) may be sent again.
    #[error("outcome unknown: {0}")]
    Indeterminate(String),
    /// Storage failed.
    #[error("storage error: {0}")]
    Storage(String),
    /// A membership change was refused.
    #[error("membership change refused: {0}")]
    Membership(String),
}

use std::future::Future;
use std::sync::RwLock;

/// A replicated [`StateMachine`] as the controller's API layer uses it.
pub trait Replicator<S: StateMachine>: Send + Sync + 'static {
    /// Propose `command`; resolves once it is committed by a majority and
    /// applied on this node, with the state machine's response.
    fn write(
        &self,
        command: S::Command,
    ) -> impl Future<Output = Result<S::Response, ReplicationError>> + Send;

    /// Run `f` over the state after confirming this node still leads
    /// (a linearizable read).
    fn read<R, F>(&self, f: F) -> impl Future<Output = Result<R, ReplicationError>> + Send
    where
        R: Send + 'static,
        F: FnOnce(&S) -> R + Send + 'static;

    /// Run `f` over this node's local state without checking leadership:
    /// possibly stale, but served by any node (followers included).
    fn read_local<R>(&self, f: impl FnOnce(&S) -> R) -> Result<R, ReplicationError>;

    /// This node's replication counters and role.
    fn stats(&self) -> RaftStats;

    /// The leader this node knows of.
    fn leader(&self) -> Option<Member>;

    /// This node's id.
    fn node_id(&self) -> NodeId;

    /// The current voting members.
    fn members(&self) -> Vec<Member>;

    /// Add a voting member (it catches up first).
    fn add_member(
        &self,
        member: Member,
    ) -> impl Future<Output = Result<(), ReplicationError>> + Send;

    /// Remove a voting member.
    fn remove_member(
        &self,
        id: NodeId,
    ) -> impl Future<Output = Result<(), ReplicationError>> + Send;
}

/// A single-process, in-memory [`Replicator`]: always the leader, nothing
/// durable. For tests of the layers above the replication layer.
pub struct MemReplicator<S: StateMachine> {
    state: RwLock<S>,
    me: Member,
}

impl<S: StateMachine> MemReplicator<S> {
    /// A replicator over a fresh default state, as node `me`.
    pub fn new(me: Member) -> Self {
        Self {
            state: RwLock::new(S::default()),
            me,
        }
    }
}

impl<S: StateMachine> Replicator<S> for MemReplicator<S> {
    async fn write(&self, command: S::Command) -> Result<S::Response, ReplicationError> {
        // A poisoned lock means a panic inside `apply`: the state may be
        // half-applied, which a real replica would also refuse to serve.
        let mut state = self
            .state
            .write()
            .map_err(|_| ReplicationError::Storage("state machine poisoned".into()))?;
        Ok(state.apply(command))
    }

    async fn read<R, F>(&self, f: F) -> Result<R, ReplicationError>
    where
        R: Send + 'static,
        F: FnOnce(&S) -> R + Send + 'static,
    {
        let state = self
            .state
            .read()
            .map_err(|_| ReplicationError::Storage("state machine poisoned".into()))?;
        Ok(f(&state))
    }

    fn read_local<R>(&self, f: impl FnOnce(&S) -> R) -> Result<R, ReplicationError> {
        let state = self
            .state
            .read()
            .map_err(|_| ReplicationError::Storage("state machine poisoned".into()))?;
        Ok(f(&state))
    }

    fn stats(&self) -> RaftStats {
        RaftStats {
            role: "leader".into(),
            ..RaftStats::default()
        }
    }

    fn leader(&self) -> Option<Member> {
        Some(self.me.clone())
    }

    fn node_id(&self) -> NodeId {
        self.me.id
    }

    fn members(&self) -> Vec<Member> {
        vec![self.me.clone()]
    }

    async fn add_member(&self, member: Member) -> Result<(), ReplicationError> {
        Err(ReplicationError::Membership(format!(
            "an in-memory replicator cannot add node {}",
            member.id
        )))
    }

    async fn remove_member(&self, id: NodeId) -> Result<(), ReplicationError> {
        Err(ReplicationError::Membership(format!(
            "an in-memory replicator cannot remove node {id}"
        )))
    }
}
