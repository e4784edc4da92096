//! The controller as a volume's configuration [`Authority`]: a primary's
//! request to drop a failed backup becomes `Hosts.RemoveVolumeReplica`,
//! to take a resynced one back `Hosts.AddVolumeReplica`, and its serving
//! session's opening and clean close `Hosts.OpenVolumeSession` and
//! `Hosts.CloseVolumeSession`, made with this host's credential.
//!
//! The primary's I/O path is synchronous (vhost-user worker threads), the
//! controller client async: each call is run on a tokio runtime's handle
//! from the calling thread, which must not be one of that runtime's own
//! worker threads.
//!
//! A controller that cannot be reached is asked again (with back-off) for
//! up to [`ControllerAuthority::patience`]: the guest's I/O stalls
//! meanwhile rather than going on without the authority's word. Only an
//! answer that the caller's epoch is stale (`FAILED_PRECONDITION`), a
//! refusal, or running out of patience count as fenced.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferro_client::Client;
use ferro_proto::compute::v1::hosts_client::HostsClient;
use ferro_proto::compute::v1::{
    AddVolumeReplicaRequest, CloseVolumeSessionRequest, OpenVolumeSessionRequest,
    RemoveVolumeReplicaRequest,
};

use crate::replication::{Authority, Fenced, Session};

/// The controller, reached through a [`Client`] holding the host's key.
pub struct ControllerAuthority {
    client: Mutex<Client>,
    handle: tokio::runtime::Handle,
    /// How long an unreachable controller is retried before the primary
    /// gives up (and fails the I/O).
    pub patience: Duration,
}

impl ControllerAuthority {
    /// Calls through `client` on `handle`'s runtime.
    pub fn new(client: Client, handle: tokio::runtime::Handle) -> Self {
        Self {
            client: Mutex::new(client),
            handle,
            patience: Duration::from_secs(30),
        }
    }
}

impl ControllerAuthority {
    /// Runs `call` until it answers, retrying transport failures with
    /// back-off for up to [`Self::patience`]; any other refusal, or running
    /// out of patience, is `Fenced`.
    fn ask<T, F, Fut>(
        &self,
        what: &str,
        volume: &str,
        epoch: u64,
        replica: &str,
        call: F,
    ) -> Result<T, Fenced>
    where
        F: Fn(ferro_client::AuthChannel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let fenced = || Fenced {
            volume: volume.to_string(),
            epoch,
        };
        let deadline = Instant::now() + self.patience;
        let mut pause = Duration::from_millis(100);
        let mut client = self.client.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let answer = self.handle.block_on(client.call(&call));
            match answer {
                Ok(r) => return Ok(r),
                Err(e) => {
                    let transport = e.status().is_none_or(ferro_client::is_transport);
                    if !transport || Instant::now() >= deadline {
                        tracing::error!(
                            volume,
                            epoch,
                            replica,
                            what,
                            "the controller refused: {e}"
                        );
                        return Err(fenced());
                    }
                    tracing::warn!(
                        volume,
                        epoch,
                        replica,
                        what,
                        "cannot reach the controller, asking again: {e}"
                    );
                    std::thread::sleep(ferro_client::jitter(pause));
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

impl Authority for ControllerAuthority {
    fn remove_replica(&self, volume: &str, epoch: u64, replica: &str) -> Result<u64, Fenced> {
        let req = RemoveVolumeReplicaRequest {
            volume_id: volume.to_string(),
            epoch,
            replica_host_id: replica.to_string(),
        };
        let r = self.ask("remove", volume, epoch, replica, |ch| {
            let req = req.clone();
            async move { HostsClient::new(ch).remove_volume_replica(req).await }
        })?;
        Ok(r.epoch)
    }

    fn add_replica(&self, volume: &str, epoch: u64, replica: &str) -> Result<u64, Fenced> {
        let req = AddVolumeReplicaRequest {
            volume_id: volume.to_string(),
            epoch,
            replica_host_id: replica.to_string(),
        };
        let r = self.ask("add", volume, epoch, replica, |ch| {
            let req = req.clone();
            async move { HostsClient::new(ch).add_volume_replica(req).await }
        })?;
        Ok(r.epoch)
    }

    fn open_session(&self, volume: &str, epoch: u64) -> Result<Session, Fenced> {
        let req = OpenVolumeSessionRequest {
            volume_id: volume.to_string(),
            epoch,
        };
        let r = self.ask("open session", volume, epoch, "", |ch| {
            let req = req.clone();
            async move { HostsClient::new(ch).open_volume_session(req).await }
        })?;
        Ok(Session {
            id: r.session,
            was_clean: r.was_clean,
            epoch: r.epoch,
        })
    }

    fn close_session(&self, volume: &str, epoch: u64, session: u64) -> Result<(), Fenced> {
        let req = CloseVolumeSessionRequest {
            volume_id: volume.to_string(),
            epoch,
            session,
        };
        self.ask("close session", volume, epoch, "", |ch| {
            let req = req.clone();
            async move { HostsClient::new(ch).close_volume_session(req).await }
        })?;
        Ok(())
    }
}
