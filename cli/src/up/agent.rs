//! The agent's own gRPC API, for what the controller may not offer: the
//! console of an instance, read straight from its host.

use std::time::Duration;

use ferro_proto::agent::v1 as agent_pb;
use ferro_proto::agent::v1::agent_client::AgentClient;

/// An agent call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent could not be reached or answered with an error.
    #[error("agent call failed: {}", .0.message())]
    Call(#[source] tonic::Status),
    /// The agent's endpoint is not valid.
    #[error("cannot connect to the agent at {0}")]
    Connect(String, #[source] tonic::transport::Error),
}

/// The console log of `id` from the agent at `endpoint` (`http://host:port`).
pub async fn console(endpoint: &str, id: &str) -> Result<Vec<u8>, AgentError> {
    let ch = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| AgentError::Connect(endpoint.to_string(), e))?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    let req = agent_pb::GetConsoleOutputRequest {
        id: id.to_string(),
        max_bytes: 0,
    };
    let resp = AgentClient::new(ch)
        .get_console_output(req)
        .await
        .map_err(AgentError::Call)?;
    Ok(resp.into_inner().data)
}
