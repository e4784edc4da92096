//! Heartbeats to the controller: every interval, this host's facts, its
//! instances and its images (`ferro.compute.v1.Hosts/Heartbeat`).
//!
//! The report is built by calling this agent's own service methods, so the
//! controller sees exactly what `HostInfo`, `ListInstances` and
//! `ListImages` answer. Failures are logged and retried at the next beat.

use std::time::Duration;

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

/// The controller URLs of a `controller` setting: one URL or several
/// separated by commas.
pub fn parse_controllers(setting: &str) -> Vec<String> {
    setting
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Where the next heartbeat goes: the leader a follower named, else the
/// next configured controller after a failure, else the same one.
#[derive(Debug)]
pub struct Target {
    controllers: Vec<String>,
    next: usize,
    current: String,
}

impl Target {
    /// Start at the first of `controllers` (which must not be empty).
    pub fn new(controllers: Vec<String>) -> Self {
        let current = controllers.first().cloned().unwrap_or_default();
        Self {
            controllers,
            next: 1,
            current,
        }
    }

    /// The URL to heartbeat to.
    pub fn current(&self) -> &str {
        &self.current
    }

    /// After a failed beat: follow the named leader, or move to the next
    /// configured controller. Returns whether the target changed.
    pub fn failed(&mut self, e: &tonic::Status) -> bool {
        let before = self.current.clone();
        if let Some(leader) = leader_of(e) {
            // The named leader speaks TLS if the node that named it does.
            self.current = if self.current.starts_with("https://") {
                leader.replacen("http://", "https://", 1)
            } else {
                leader
            };
        } else if !self.controllers.is_empty() {
            self.current = self.controllers[self.next % self.controllers.len()].clone();
            self.next = (self.next + 1) % self.controllers.len();
        }
        self.current != before
    }
}

/// A lazily connecting client of the controller at `url`.
pub fn client_for(
    url: &str,
    ca_pem: Option<&str>,
) -> Option<HostsClient<tonic::transport::Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_string()).and_then(|e| {
        if !url.starts_with("https://") {
            return Ok(e);
        }
        let tls = tonic::transport::ClientTlsConfig::new();
        let tls = match ca_pem {
            Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
            None => tls.with_native_roots(),
        };
        e.tls_config(tls)
    });
    match endpoint {
        Ok(e) => Some(HostsClient::new(
            e.connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5))
                .connect_lazy(),
        )),
        Err(e) => {
            tracing::error!(controller = %url, "bad controller URL: {e}");
            None
        }
    }
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
    let mut target = Target::new(hb.controllers.clone());
    let ca = hb.ca_pem.as_deref();
    let Some(mut client) = client_for(target.current(), ca) else {
        return;
    };
    let auth: Result<tonic::metadata::MetadataValue<_>, _> =
        format!("Bearer {}", hb.api_key).parse();
    let Ok(auth) = auth else {
        tracing::error!("the host credential is not valid in a header");
        return;
    };
    let mut interval = hb.interval;
    let mut failures = FailureLog::default();
    let mut hops = 0;
    loop {
        let mut wait = interval;
        match report(&svc, &hb.address).await {
            Ok(r) => {
                let mut req = Request::new(r);
                req.metadata_mut().insert("authorization", auth.clone());
                match client.heartbeat(req).await {
                    Ok(resp) => {
                        failures.succeeded(target.current());
                        hops = 0;
                        let ms = resp.into_inner().interval_ms;
                        if ms > 0 {
                            interval = Duration::from_millis(u64::from(ms));
                        }
                        wait = interval;
                    }
                    Err(e) => {
                        failures.failed(target.current(), &e);
                        wait = failures.backoff(interval);
                        if target.failed(&e) {
                            if let Some(c) = client_for(target.current(), ca) {
                                client = c;
                                hops += 1;
                                // A follower named the leader, or another
                                // controller may answer: try it at once,
                                // a few times in a row at most.
                                if hops <= MAX_HOPS {
                                    continue;
                                }
                            }
                        }
                        hops = 0;
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

/// Leaders followed at once before waiting.
pub const MAX_HOPS: u32 = 3;

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

/// The leader's URL from an UNAVAILABLE answer's `x-ferro-leader`.
fn leader_of(e: &tonic::Status) -> Option<String> {
    if e.code() != tonic::Code::Unavailable {
        return None;
    }
    let addr = e.metadata().get("x-ferro-leader")?.to_str().ok()?;
    Some(format!("http://{addr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_named_leader() {
        let mut st = tonic::Status::unavailable("not the leader");
        st.metadata_mut()
            .insert("x-ferro-leader", "10.0.0.2:7400".parse().unwrap());
        assert_eq!(leader_of(&st).as_deref(), Some("http://10.0.0.2:7400"));
        assert_eq!(leader_of(&tonic::Status::unavailable("x")), None);
        assert_eq!(leader_of(&tonic::Status::internal("x")), None);
    }

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

    #[test]
    fn settings_list_several_controllers() {
        assert_eq!(
            parse_controllers(" http://a:1 , http://b:1,,"),
            vec!["http://a:1", "http://b:1"]
        );
        assert!(parse_controllers(" , ").is_empty());
    }

    #[test]
    fn a_failure_moves_to_the_named_leader_or_the_next_controller() {
        let mut t = Target::new(vec!["http://a:1".into(), "http://b:1".into()]);
        assert_eq!(t.current(), "http://a:1");
        // A dead controller: the next one.
        assert!(t.failed(&tonic::Status::unavailable("connection refused")));
        assert_eq!(t.current(), "http://b:1");
        assert!(t.failed(&tonic::Status::unavailable("connection refused")));
        assert_eq!(t.current(), "http://a:1");
        // A follower names the leader, even one not configured.
        let mut st = tonic::Status::unavailable("not the leader");
        st.metadata_mut()
            .insert("x-ferro-leader", "10.0.0.9:7400".parse().unwrap());
        assert!(t.failed(&st));
        assert_eq!(t.current(), "http://10.0.0.9:7400");
        // Over TLS, the leader is followed over TLS.
        let mut tls = Target::new(vec!["https://a:1".into()]);
        assert!(tls.failed(&st));
        assert_eq!(tls.current(), "https://10.0.0.9:7400");
        // A single controller stays put.
        let mut one = Target::new(vec!["http://a:1".into()]);
        assert!(!one.failed(&tonic::Status::internal("x")));
        assert_eq!(one.current(), "http://a:1");
    }
}
