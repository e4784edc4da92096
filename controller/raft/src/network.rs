//! The gRPC transport (`ferro.raft.v1.Raft`): a client per peer for
//! openraft's replication and elections, and the service that feeds peers'
//! RPCs into the local Raft node. Payloads are JSON-serialized openraft
//! messages.
//!
//! [`NetControl`] is the fault-injection hook: a partitioned node drops all
//! its traffic, both ways.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ferro_proto::raft::v1::raft_client::RaftClient;
use ferro_proto::raft::v1::RaftMessage;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};

use crate::types::TypeConfig;
use crate::{NodeId, StateMachine};

/// Shared switch of a node's network: when partitioned, it neither sends
/// nor answers Raft RPCs.
#[derive(Debug, Default)]
pub(crate) struct NetControl {
    partitioned: AtomicBool,
}

impl NetControl {
    pub(crate) fn set_partitioned(&self, on: bool) {
        self.partitioned.store(on, Ordering::SeqCst);
    }

    pub(crate) fn is_partitioned(&self) -> bool {
        self.partitioned.load(Ordering::SeqCst)
    }
}

/// Transport-level failure, reported to openraft as "unreachable".
#[derive(Debug, thiserror::Error)]
enum TransportError {
    #[error("the local node is partitioned (test hook)")]
    Partitioned,
    #[error("RPC failed")]
    Rpc(#[source] Status),
    #[error("bad payload")]
    Payload(#[source] serde_json::Error),
}

/// Makes a connection per peer (openraft calls it per replication stream).
pub(crate) struct NetworkFactory {
    pub(crate) control: Arc<NetControl>,
    /// The local address outgoing connections are made from, if pinned.
    pub(crate) source_ip: Option<std::net::IpAddr>,
    /// TLS towards peers, when the cluster uses it.
    pub(crate) tls: Option<tonic::transport::ClientTlsConfig>,
}

impl<S: StateMachine> RaftNetworkFactory<TypeConfig<S>> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerConnection {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let channel = Endpoint::from_shared(format!("{scheme}://{}", node.addr))
            .and_then(|e| match &self.tls {
                Some(tls) => e.tls_config(tls.clone()),
                None => Ok(e),
            })
            .map(|e| {
                e.tcp_nodelay(true)
                    .local_address(self.source_ip)
                    .connect_lazy()
            })
            .map_err(|e| format!("bad peer address {}: {e}", node.addr));
        PeerConnection {
            target,
            channel,
            control: self.control.clone(),
        }
    }
}

/// A lazily connected gRPC client to one peer.
pub(crate) struct PeerConnection {
    target: NodeId,
    channel: Result<Channel, String>,
    control: Arc<NetControl>,
}

impl PeerConnection {
    /// Sends one JSON request through `call` and decodes the peer's
    /// `Result<Resp, Err>` reply.
    async fn call<Req, Resp, Err, F, Fut>(
        &self,
        req: &Req,
        option: &RPCOption,
        call: F,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, Err>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        Err: std::error::Error + DeserializeOwned,
        F: FnOnce(RaftClient<Channel>, Request<RaftMessage>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<RaftMessage>, Status>>,
    {
        let unreachable = |e: TransportError| RPCError::Unreachable(Unreachable::new(&e));
        if self.control.is_partitioned() {
            return Err(unreachable(TransportError::Partitioned));
        }
        let channel = match &self.channel {
            Ok(c) => c.clone(),
            Err(e) => {
                return Err(RPCError::Network(NetworkError::new(
                    &std::io::Error::other(e.clone()),
                )))
            }
        };
        let payload =
            serde_json::to_vec(req).map_err(|e| unreachable(TransportError::Payload(e)))?;
        let mut request = Request::new(RaftMessage { payload });
        request.set_timeout(option.hard_ttl());
        let reply = call(RaftClient::new(channel), request)
            .await
            .map_err(|s| unreachable(TransportError::Rpc(s)))?;
        let result: Result<Resp, Err> = serde_json::from_slice(&reply.into_inner().payload)
            .map_err(|e| unreachable(TransportError::Payload(e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl<S: StateMachine> RaftNetwork<TypeConfig<S>> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig<S>>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(&rpc, &option, |mut c, r| async move {
            c.append_entries(r).await
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig<S>>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(&rpc, &option, |mut c, r| async move {
            c.install_snapshot(r).await
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(&rpc, &option, |mut c, r| async move { c.vote(r).await })
            .await
    }
}

/// The `ferro.raft.v1.Raft` gRPC service of one node; mount it with
/// [`crate::RaftReplicator::grpc_service`].
pub struct RaftGrpc<S: StateMachine> {
    raft: Raft<TypeConfig<S>>,
    control: Arc<NetControl>,
}

impl<S: StateMachine> RaftGrpc<S> {
    pub(crate) fn new(raft: Raft<TypeConfig<S>>, control: Arc<NetControl>) -> Self {
        Self { raft, control }
    }

    fn decode<T: DeserializeOwned>(&self, request: Request<RaftMessage>) -> Result<T, Status> {
        if self.control.is_partitioned() {
            return Err(Status::unavailable("partitioned (test hook)"));
        }
        serde_json::from_slice(&request.into_inner().payload)
            .map_err(|e| Status::invalid_argument(format!("bad raft payload: {e}")))
    }
}

fn encode<T: Serialize>(reply: &T) -> Result<Response<RaftMessage>, Status> {
    serde_json::to_vec(reply)
        .map(|payload| Response::new(RaftMessage { payload }))
        .map_err(|e| Status::internal(format!("cannot encode raft reply: {e}")))
}

#[tonic::async_trait]
impl<S: StateMachine> ferro_proto::raft::v1::raft_server::Raft for RaftGrpc<S> {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig<S>> = self.decode(request)?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<NodeId> = self.decode(request)?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig<S>> = self.decode(request)?;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}
