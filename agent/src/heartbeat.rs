//! Heartbeats to the controller: every interval, this host's facts, its
//! instances and its images (`ferro.compute.v1.Hosts/Heartbeat`).
//!
//! The report is built by calling this agent's own service methods, so the
//! controller sees exactly what `HostInfo`, `ListInstances` and
//! `ListImages` answer. Calls go through `ferro-client` (leader following,
//! TLS, the host's credential); failures back off and are logged once.

use std::time::Duration;

use ferro_client::{Client, ClientConfig};
use ferro_proto::agent::v1 as pb;
use ferro_proto::agent::v1::agent_server::Agent;
use ferro_proto::compute::v1::hosts_client::HostsClient;
use ferro_proto::compute::v1::HeartbeatRequest;
use tonic::Request;

use crate::service::AgentService;

/// What the heartbeat loop needs.
pub struct Heartbeat {
    /// Controller URLs (every node of the controller cluster, or any of
    /// them: followers name the leader).
    pub controllers: Vec<String>,
    /// The host's credential (its bearer key).
    pub api_key: String,
    /// This agent's URL for the controller.
    pub address: String,
    /// Initial interval.
    pub interval: Duration,
    /// The CA (PEM) for `https://` controllers; the system's roots when
    /// `None`.
    pub ca_pem: Option<String>,
}

/// Build one heartbeat from the service's own answers.
pub async fn report(svc: &AgentService, address: &str) -> Result<HeartbeatRequest, tonic::Status> {
    let host = svc.host_info(Request::new(pb::HostInfoRequest {})).await?;
    let instances = svc
        .list_instances(Request::new(pb::ListInstancesRequest {}))
        .await?;
    let images = svc
        .list_images(Request::new(pb::ListImagesRequest {}))
        .await?;
    let instances = instances.into_inner();
    Ok(HeartbeatRequest {
        host: Some(host.into_inner()),
        address: address.to_string(),
        instances: instances.instances,
        images: images.into_inner().images,
        listed_seq: instances.listed_seq,
    })
}

/// Heartbeat forever. After a failure the next beat waits longer
/// (doubling from the interval up to [`MAX_BACKOFF`], with jitter), a
/// follower's named leader is tried at once (at most [`MAX_HOPS`] times in
/// a row), and a repeated failure is logged once, then once a minute with
/// a count.
pub async fn run(svc: AgentService, hb: Heartbeat) {
    let mut cfg = ClientConfig::new(hb.controllers.clone(), Some(hb.api_key.clone()));
    cfg.ca_pem = hb.ca_pem.clone();
    // One round of the controllers per beat (a named leader is followed
    // at once); the loop below backs off between beats.
    cfg.max_retries = hb.controllers.len();
    cfg.call_timeout = Duration::from_secs(5);
    let mut client = match Client::new(cfg) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("cannot heartbeat: {e}");
            return;
        }
    };
    let mut interval = hb.interval;
    let mut failures = FailureLog::default();
    loop {
        let mut wait = interval;
        match report(&svc, &hb.address).await {
            Ok(r) => {
                let sent = client
                    .call(|ch| {
                        let r = r.clone();
                        async move { HostsClient::new(ch).heartbeat(r).await }
                    })
                    .await;
                match sent {
                    Ok(resp) => {
                        failures.succeeded(client.endpoint());
                        if resp.interval_ms > 0 {
                            interval = Duration::from_millis(u64::from(resp.interval_ms));
                        }
                        wait = interval;
                    }
                    Err(e) => {
                        let status = e
                            .status()
                            .cloned()
                            .unwrap_or_else(|| tonic::Status::internal(e.to_string()));
                        failures.failed(client.endpoint(), &status);
                        wait = failures.backoff(interval);
                    }
                }
            }
            Err(e) => tracing::warn!("cannot build the heartbeat: {}", e.message()),
        }
        tokio::time::sleep(wait).await;
    }
}

/// Longest wait between failed heartbeats.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Failed heartbeats in a row: logged once, then once a minute.
#[derive(Debug, Default)]
pub struct FailureLog {
    in_a_row: u32,
    since_log: u32,
    logged_at: Option<std::time::Instant>,
}

impl FailureLog {
    fn failed(&mut self, controller: &str, e: &tonic::Status) {
        self.in_a_row += 1;
        self.since_log += 1;
        let due = self
            .logged_at
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if due {
            let denied = matches!(
                e.code(),
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
            );
            if denied {
                tracing::error!(code = ?e.code(), %controller, failures = self.since_log,
                    "heartbeat refused: {} (revoked? rejoin with a new token from `ferro hosts join`)", e.message());
            } else {
                tracing::warn!(code = ?e.code(), %controller, failures = self.since_log,
                    "heartbeat failed: {}", e.message());
            }
            self.logged_at = Some(std::time::Instant::now());
            self.since_log = 0;
        }
    }

    fn succeeded(&mut self, controller: &str) {
        if self.in_a_row > 0 {
            tracing::info!(%controller, failures = self.in_a_row, "heartbeats answered again");
        }
        *self = Self::default();
    }

    /// The wait before the next beat after `in_a_row` failures.
    fn backoff(&self, interval: Duration) -> Duration {
        let exp = self.in_a_row.saturating_sub(1).min(8);
        let d = interval
            .saturating_mul(1 << exp)
            .min(MAX_BACKOFF.max(interval));
        crate::credentials::jitter(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_up_to_the_cap() {
        let mut f = FailureLog::default();
        let st = tonic::Status::unavailable("no quorum");
        let i = Duration::from_millis(1000);
        f.failed("http://a:1", &st);
        assert!(f.backoff(i) < Duration::from_millis(1500));
        for _ in 0..20 {
            f.failed("http://a:1", &st);
        }
        let b = f.backoff(i);
        assert!(b >= MAX_BACKOFF / 2 && b < MAX_BACKOFF * 3 / 2, "{b:?}");
        f.succeeded("http://a:1");
        assert_eq!(f.in_a_row, 0);
    }
}
