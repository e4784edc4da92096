//! The `Hosts` service: agents' heartbeats and joins, the network
//! daemons' watches of their host's network state, and the volume
//! daemons' watches of their host's replicas and reports of what they
//! hold.

use std::collections::BTreeSet;
use std::sync::Arc;
use tracing::Instrument;

use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::hosts_server::Hosts;
use ferro_raft::Replicator;
use tonic::{Request, Response, Status};

use super::convert::host_report;
use super::{caller, status};
use crate::controller::Controller;
use crate::executor::observation;
use crate::state::{ClusterState, Command, Output};

/// How often a watch looks for a change of its host's network state.
pub const WATCH_POLL: std::time::Duration = std::time::Duration::from_millis(100);

type NetworkStream = tokio_stream::wrappers::ReceiverStream<Result<pb::HostNetwork, Status>>;
type VolumesStream = tokio_stream::wrappers::ReceiverStream<Result<pb::HostVolumes, Status>>;

/// A message of a host's watch: carries the revision it is sent at.
trait Revisioned: Clone + PartialEq + Send + Sync + 'static {
    fn set_revision(&mut self, revision: u64);
}

impl Revisioned for pb::HostNetwork {
    fn set_revision(&mut self, revision: u64) {
        self.revision = revision;
    }
}

impl Revisioned for pb::HostVolumes {
    fn set_revision(&mut self, revision: u64) {
        self.revision = revision;
    }
}

/// Follow what `derive` makes of the state for `host_id`: sent now, then
/// whenever it changes (looked for every [`WATCH_POLL`]), with a revision
/// that only grows. Ends when the caller goes or this node stops being
/// the leader (the caller gets the error naming the leader and follows).
fn watch_host<R, T, F>(
    ctl: Arc<Controller<R>>,
    host_id: String,
    name: &'static str,
    derive: F,
) -> tokio::sync::mpsc::Receiver<Result<T, Status>>
where
    R: Replicator<ClusterState>,
    T: Revisioned,
    F: Fn(&ClusterState, &str) -> T + Clone + Send + Sync + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let span = tracing::info_span!("watch", name, host_id = %host_id);
        let mut last: Option<T> = None;
        let mut revision = 0;
        loop {
            let (h, f) = (host_id.clone(), derive.clone());
            let now = match ctl.read(move |s| f(s, &h)).await {
                Ok(n) => n,
                Err(e) => {
                    // Not the leader any more: the daemon follows the
                    // named one.
                    let _ = tx.send(Err(status(e))).await;
                    break;
                }
            };
            if last.as_ref() != Some(&now) {
                let mut out = now.clone();
                // The log index it was read at (and at least one more
                // than the last one sent, also over a replicator without
                // a log).
                let applied = ctl.replicator().stats().last_applied.unwrap_or(0);
                revision = applied.max(revision + 1);
                out.set_revision(revision);
                span.in_scope(|| tracing::debug!(revision, "changed"));
                if tx.send(Ok(out)).await.is_err() {
                    break;
                }
                last = Some(now);
            }
            tokio::select! {
                _ = tx.closed() => break,
                _ = tokio::time::sleep(WATCH_POLL) => {}
            }
        }
    });
    rx
}

/// The `ferro.compute.v1.Hosts` service.
pub struct HostsService<R> {
    ctl: Arc<Controller<R>>,
}

impl<R: Replicator<ClusterState>> HostsService<R> {
    /// A service over `ctl`.
    pub fn new(ctl: Arc<Controller<R>>) -> Self {
        Self { ctl }
    }

    /// A change of a volume's in-sync set asked by the host whose key hash
    /// is `key_hash` (the state machine checks it may, at `epoch`): the
    /// volume's new epoch.
    async fn replica_set_change(
        &self,
        key_hash: String,
        volume_id: String,
        epoch: u64,
        replica: String,
        change: impl FnOnce(String, u64, String, String) -> Command,
    ) -> Result<u64, Status> {
        let key = self.ctl.authenticate_host(key_hash).await.map_err(status)?;
        let out = self
            .ctl
            .write(change(volume_id, epoch, replica, key.host_id))
            .await
            .map_err(status)?;
        match out {
            Output::Epoch(epoch) => Ok(epoch),
            _ => Err(Status::internal("a replica set change returned no epoch")),
        }
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
        let rx = watch_host(self.ctl.clone(), host_id, "watch_host_network", |s, h| {
            super::hostnet::host_network(s, h, 0)
        });
        Ok(Response::new(NetworkStream::new(rx)))
    }

    type WatchHostVolumesStream = VolumesStream;

    async fn watch_host_volumes(
        &self,
        req: Request<pb::WatchHostVolumesRequest>,
    ) -> Result<Response<VolumesStream>, Status> {
        let hash = caller(&req)?;
        let key = self.ctl.authenticate_host(hash).await.map_err(status)?;
        let rx = watch_host(
            self.ctl.clone(),
            key.host_id,
            "watch_host_volumes",
            super::hostvol::host_volumes,
        );
        Ok(Response::new(VolumesStream::new(rx)))
    }

    async fn report_volume_replicas(
        &self,
        req: Request<pb::ReportVolumeReplicasRequest>,
    ) -> Result<Response<pb::ReportVolumeReplicasResponse>, Status> {
        let hash = caller(&req)?;
        let key = self.ctl.authenticate_host(hash).await.map_err(status)?;
        let host_id = key.host_id;
        let r = req.into_inner();
        let held = super::hostvol::held(&r).map_err(Status::invalid_argument)?;
        let incarnations = super::hostvol::incarnations(&r);
        if !r.replica_addr.is_empty() {
            if r.replica_addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(Status::invalid_argument(format!(
                    "replica_addr: {:?} is not ip:port",
                    r.replica_addr
                )));
            }
            let (h, addr) = (host_id.clone(), r.replica_addr.clone());
            let known = self
                .ctl
                .read(move |s| s.hosts.get(&h).map(|h| h.blockd_addr == addr))
                .await
                .map_err(status)?;
            if known == Some(false) {
                self.ctl
                    .write(Command::SetBlockdAddr {
                        host_id: host_id.clone(),
                        addr: r.replica_addr,
                    })
                    .await
                    .map_err(status)?;
            }
        }
        let (h, check, inc) = (host_id.clone(), held.clone(), incarnations.clone());
        let changes = self
            .ctl
            .read(move |s| s.replicas_report_changes(&h, &check, &inc))
            .await
            .map_err(status)?;
        if !changes {
            return Ok(Response::new(pb::ReportVolumeReplicasResponse {
                changed: 0,
            }));
        }
        let out = self
            .ctl
            .write(Command::ReportReplicas {
                host_id,
                held,
                incarnations,
            })
            .await
            .map_err(status)?;
        let changed = match out {
            Output::Count(n) => n,
            _ => 0,
        };
        Ok(Response::new(pb::ReportVolumeReplicasResponse { changed }))
    }

    async fn remove_volume_replica(
        &self,
        req: Request<pb::RemoveVolumeReplicaRequest>,
    ) -> Result<Response<pb::RemoveVolumeReplicaResponse>, Status> {
        let host = caller(&req)?;
        let r = req.into_inner();
        let change = |volume_id, epoch, replica, caller| Command::RemoveReplica {
            volume_id,
            epoch,
            replica,
            caller,
        };
        let epoch = self
            .replica_set_change(host, r.volume_id, r.epoch, r.replica_host_id, change)
            .await?;
        Ok(Response::new(pb::RemoveVolumeReplicaResponse { epoch }))
    }

    async fn add_volume_replica(
        &self,
        req: Request<pb::AddVolumeReplicaRequest>,
    ) -> Result<Response<pb::AddVolumeReplicaResponse>, Status> {
        let host = caller(&req)?;
        let r = req.into_inner();
        let change = |volume_id, epoch, replica, caller| Command::AddReplica {
            volume_id,
            epoch,
            replica,
            caller,
        };
        let epoch = self
            .replica_set_change(host, r.volume_id, r.epoch, r.replica_host_id, change)
            .await?;
        Ok(Response::new(pb::AddVolumeReplicaResponse { epoch }))
    }

    async fn open_volume_session(
        &self,
        req: Request<pb::OpenVolumeSessionRequest>,
    ) -> Result<Response<pb::OpenVolumeSessionResponse>, Status> {
        let hash = caller(&req)?;
        let key = self.ctl.authenticate_host(hash).await.map_err(status)?;
        let r = req.into_inner();
        let out = self
            .ctl
            .write(Command::OpenVolumeSession {
                volume_id: r.volume_id,
                epoch: r.epoch,
                caller: key.host_id,
            })
            .await
            .map_err(status)?;
        match out {
            Output::Session {
                session,
                was_clean,
                epoch,
            } => Ok(Response::new(pb::OpenVolumeSessionResponse {
                session,
                was_clean,
                epoch,
            })),
            _ => Err(Status::internal("opening a session returned no session")),
        }
    }

    async fn close_volume_session(
        &self,
        req: Request<pb::CloseVolumeSessionRequest>,
    ) -> Result<Response<pb::CloseVolumeSessionResponse>, Status> {
        let hash = caller(&req)?;
        let key = self.ctl.authenticate_host(hash).await.map_err(status)?;
        let r = req.into_inner();
        self.ctl
            .write(Command::CloseVolumeSession {
                volume_id: r.volume_id,
                epoch: r.epoch,
                session: r.session,
                caller: key.host_id,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CloseVolumeSessionResponse {}))
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
        let joined = self
            .ctl
            .join(&r.host_id, &r.token, &r.public_key)
            .instrument(span.clone())
            .await
            .map_err(status)?;
        span.in_scope(|| tracing::info!("host joined"));
        Ok(Response::new(pb::JoinResponse {
            host_key: joined.host_key,
            certificate_pem: joined.certificate_pem,
            ca_pem: joined.ca_pem,
        }))
    }
}
