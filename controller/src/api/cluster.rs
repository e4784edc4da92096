//! The `Cluster` service: membership through the replicator. Admin keys.

use std::sync::Arc;

use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::cluster_server::Cluster;
use ferro_raft::{Member, Replicator};
use tonic::{Request, Response, Status};

use super::{caller, status};
use crate::controller::Controller;
use crate::state::ClusterState;

/// The `ferro.compute.v1.Cluster` service.
pub struct ClusterService<R> {
    ctl: Arc<Controller<R>>,
}

impl<R: Replicator<ClusterState>> ClusterService<R> {
    /// A service over `ctl`.
    pub fn new(ctl: Arc<Controller<R>>) -> Self {
        Self { ctl }
    }

    fn status_now(&self) -> pb::ClusterStatusResponse {
        let (members, node_id, leader) = self.ctl.cluster_status();
        let st = self.ctl.replicator().stats();
        let m = |m: Member| pb::ClusterMember {
            node_id: m.id,
            address: m.addr,
        };
        pb::ClusterStatusResponse {
            members: members.into_iter().map(m).collect(),
            node_id,
            leader: leader.map(m),
            replicated: self.ctl.settings().replicated,
            node: Some(pb::NodeStatus {
                role: st.role,
                term: st.term,
                last_log_index: st.last_log_index.unwrap_or_default(),
                last_applied_index: st.last_applied.unwrap_or_default(),
                log_purged_index: st.purged.unwrap_or_default(),
                snapshots_built: st.snapshots_built,
                snapshots_installed: st.snapshots_installed,
            }),
        }
    }
}

#[tonic::async_trait]
impl<R: Replicator<ClusterState>> Cluster for ClusterService<R> {
    async fn cluster_status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        // Any node answers, checking the key against its own replica.
        self.ctl
            .authorize_local(caller(&req)?, true)
            .map_err(status)?;
        Ok(Response::new(self.status_now()))
    }

    async fn add_node(
        &self,
        req: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.ctl
            .authorize(caller(&req)?, true)
            .await
            .map_err(status)?;
        let m = req
            .into_inner()
            .member
            .ok_or_else(|| Status::invalid_argument("member: required"))?;
        if m.address.is_empty() {
            return Err(Status::invalid_argument("member.address: required"));
        }
        let member = Member {
            id: m.node_id,
            addr: m.address,
        };
        self.ctl
            .replicator()
            .add_member(member)
            .await
            .map_err(|e| status(e.into()))?;
        Ok(Response::new(self.status_now()))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.ctl
            .authorize(caller(&req)?, true)
            .await
            .map_err(status)?;
        let id = req.into_inner().node_id;
        self.ctl
            .replicator()
            .remove_member(id)
            .await
            .map_err(|e| status(e.into()))?;
        Ok(Response::new(self.status_now()))
    }
}
