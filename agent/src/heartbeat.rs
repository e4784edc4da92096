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
    /// Controller URL.
    pub controller: String,
    /// Bearer key.
    pub api_key: String,
    /// This agent's URL for the controller.
    pub address: String,
    /// Initial interval.
    pub interval: Duration,
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
    Ok(HeartbeatRequest {
        host: Some(host.into_inner()),
        address: address.to_string(),
        instances: instances.into_inner().instances,
        images: images.into_inner().images,
    })
}

/// Heartbeat forever.
pub async fn run(svc: AgentService, hb: Heartbeat) {
    let endpoint = match tonic::transport::Endpoint::from_shared(hb.controller.clone()) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5)),
        Err(e) => {
            tracing::error!(controller = %hb.controller, "bad controller URL: {e}");
            return;
        }
    };
    let mut client = HostsClient::new(endpoint.connect_lazy());
    let mut target = hb.controller.clone();
    let auth: Result<tonic::metadata::MetadataValue<_>, _> =
        format!("Bearer {}", hb.api_key).parse();
    let Ok(auth) = auth else {
        tracing::error!("controller_api_key is not valid in a header");
        return;
    };
    let mut interval = hb.interval;
    loop {
        match report(&svc, &hb.address).await {
            Ok(r) => {
                let mut req = Request::new(r);
                req.metadata_mut().insert("authorization", auth.clone());
                match client.heartbeat(req).await {
                    Ok(resp) => {
                        let ms = resp.into_inner().interval_ms;
                        if ms > 0 {
                            interval = Duration::from_millis(u64::from(ms));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(code = ?e.code(), controller = %target, "heartbeat failed: {}", e.message());
                        // A follower names the leader: heartbeat there next.
                        if let Some(leader) = leader_of(&e) {
                            if let Ok(ep) = tonic::transport::Endpoint::from_shared(leader.clone())
                            {
                                let ep = ep
                                    .connect_timeout(Duration::from_secs(2))
                                    .timeout(Duration::from_secs(5));
                                client = HostsClient::new(ep.connect_lazy());
                                target = leader;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!("cannot build the heartbeat: {}", e.message()),
        }
        tokio::time::sleep(interval).await;
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
}
