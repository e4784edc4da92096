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
        let hash = caller(&req)?;
        let peer = req.remote_addr().map(|a| a.ip());
        let r = req.into_inner();
        let report = host_report(&r, peer).map_err(|e| status(e.into()))?;
        // Only the host's own credential speaks for it; nothing of the
        // report is used before this.
        self.ctl
            .authorize_host(hash, &report.id)
            .await
            .map_err(status)?;
        let observed = r.instances.iter().map(observation).collect();
        let images: BTreeSet<String> = r.images.into_iter().map(|i| i.id).collect();
        self.ctl
            .heartbeat(report, observed, images, r.listed_seq)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::HeartbeatResponse {
            interval_ms: self.ctl.settings().heartbeat_interval_ms,
        }))
    }

    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let r = req.into_inner();
        let span = tracing::info_span!("join", host_id = %r.host_id);
        let _g = span.enter();
        let joined = self
            .ctl
            .join(&r.host_id, &r.token, &r.public_key)
            .await
            .map_err(status)?;
        tracing::info!("host joined");
        Ok(Response::new(pb::JoinResponse {
            host_key: joined.host_key,
            certificate_pem: joined.certificate_pem,
            ca_pem: joined.ca_pem,
        }))
    }
}
