//! The `Hosts` service: agents' heartbeats and joins, and the network
//! daemons' watches of their host's network state.

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
use crate::state::{ClusterState, Command};

/// How often a watch looks for a change of its host's network state.
pub const WATCH_POLL: std::time::Duration = std::time::Duration::from_millis(100);

type NetworkStream = tokio_stream::wrappers::ReceiverStream<Result<pb::HostNetwork, Status>>;

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
    type WatchHostNetworkStream = NetworkStream;

    async fn watch_host_network(
        &self,
        req: Request<pb::WatchHostNetworkRequest>,
    ) -> Result<Response<NetworkStream>, Status> {
        let hash = caller(&req)?;
        let r = req.into_inner();
        let key = self.ctl.authenticate_host(hash).await.map_err(status)?;
        let host_id = key.host_id;
        if r.underlay_ip.parse::<std::net::Ipv4Addr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "underlay_ip: {:?} is not an IPv4 address",
                r.underlay_ip
            )));
        }
        let h = host_id.clone();
        let known = self
            .ctl
            .read(move |s| s.hosts.get(&h).map(|h| h.underlay_ip.clone()))
            .await
            .map_err(status)?;
        match known {
            None => {
                return Err(Status::failed_precondition(format!(
                    "host {host_id:?} has not registered yet (its agent's first heartbeat does)"
                )))
            }
            Some(ip) if ip != r.underlay_ip => {
                tracing::info!(host_id, underlay_ip = %r.underlay_ip, "netd reports its underlay address");
                self.ctl
                    .write(Command::SetUnderlay {
                        host_id: host_id.clone(),
                        ip: r.underlay_ip,
                    })
                    .await
                    .map_err(status)?;
            }
            Some(_) => {}
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let ctl = self.ctl.clone();
        tokio::spawn(async move {
            let span = tracing::info_span!("watch_host_network", host_id = %host_id);
            let mut last: Option<pb::HostNetwork> = None;
            let mut revision = 0;
            loop {
                let h = host_id.clone();
                let net = ctl
                    .read(move |s| super::hostnet::host_network(s, &h, 0))
                    .await;
                let net = match net {
                    Ok(n) => n,
                    Err(e) => {
                        // Not the leader any more: the daemon follows the
                        // named one.
                        let _ = tx.send(Err(status(e))).await;
                        break;
                    }
                };
                if last.as_ref() != Some(&net) {
                    let mut out = net.clone();
                    // The log index it was read at (and at least one more
                    // than the last one sent, also over a replicator
                    // without a log).
                    let applied = ctl.replicator().stats().last_applied.unwrap_or(0);
                    revision = applied.max(revision + 1);
                    out.revision = revision;
                    span.in_scope(|| {
                        tracing::debug!(revision = out.revision, "host network changed")
                    });
                    if tx.send(Ok(out)).await.is_err() {
                        break;
                    }
                    last = Some(net);
                }
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = tokio::time::sleep(WATCH_POLL) => {}
                }
            }
        });
        Ok(Response::new(NetworkStream::new(rx)))
    }

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
