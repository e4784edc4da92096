//! The `Hosts` service: agents' heartbeats.

use std::collections::BTreeSet;
use std::sync::Arc;

use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::hosts_server::Hosts;
use ferro_raft::Replicator;
use tonic::{Request, Response, Status};

use super::convert::host_report;
use super::{caller, status};
use crate::controller::Controller;
use crate::executor::observation;
use crate::state::ClusterState;

/// The `ferro.compute.v1.Hosts` service.
pub struct HostsService<R> {
    ctl: Arc<Controller<R>>,
}

impl<R: Replicator<ClusterState>> HostsService<R> {
    /// A service over `ctl`.
    pub fn new(ctl: Arc<Controller<R>>) -> Self {
        Self { ctl }
    }
}

#[tonic::async_trait]
impl<R: Replicator<ClusterState>> Hosts for HostsService<R> {
    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.ctl
            .authorize(caller(&req)?, false)
            .await
            .map_err(status)?;
        let peer = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        let report = host_report(&r, peer).map_err(|e| status(e.into()))?;
        let observed = r.instances.iter().map(observation).collect();
        let images: BTreeSet<String> = r.images.into_iter().map(|i| i.id).collect();
        self.ctl
            .heartbeat(report, observed, images)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::HeartbeatResponse {
            interval_ms: self.ctl.settings().heartbeat_interval_ms,
        }))
    }
}
