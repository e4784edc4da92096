//! The gRPC connection to the controller: the bearer token, timeouts and
//! transparent retries at the leader ([`crate::leader`]).

use std::future::Future;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use crate::config::Config;
use crate::leader::{Failover, Hop};

/// How long to wait for a TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often an HTTP/2 ping checks that the node still answers.
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(500);
/// A ping unanswered this long ends the connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a valid URI.
    #[error("invalid endpoint {0}")]
    Endpoint(String, #[source] tonic::transport::Error),
    /// The API key cannot be sent as metadata.
    #[error("the API key is not valid in a header")]
    ApiKey,
    /// The CA file could not be read.
    #[error("ca_file: cannot read {}", .0.display())]
    CaFile(std::path::PathBuf, #[source] std::io::Error),
    /// The server (or the transport) answered with an error.
    #[error("{}", status_message(.0, .1))]
    Status(tonic::Status, String),
    /// Nothing answers at the default endpoint, and none was configured.
    #[error(
        "{}; no controller endpoint is configured: pass --endpoint URL, set FERRO_ENDPOINT, \
         or put `endpoint = \"http://HOST:7400\"` in ~/.config/ferro/config.toml \
         (`ferro up` writes that file)",
        status_message(.0, .1)
    )]
    Unconfigured(tonic::Status, String),
}

impl ClientError {
    /// The gRPC status, when the call got one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Status(s, _) | ClientError::Unconfigured(s, _) => Some(s),
            _ => None,
        }
    }
}

/// The server's message, or what the code means when it sent none; for a
/// transport failure, which endpoint could not be reached.
fn status_message(s: &tonic::Status, endpoint: &str) -> String {
    let msg = s.message();
    let transport = std::error::Error::source(s).is_some();
    match (s.code(), msg.is_empty()) {
        (tonic::Code::Unavailable, _) if transport => {
            format!(
                "cannot reach the controller at {endpoint}: {}",
                transport_cause(s)
            )
        }
        (code, true) => format!("{code}"),
        (_, false) => msg.to_string(),
    }
}

/// The call failed in the transport (no answer from a server).
fn is_transport(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable && std::error::Error::source(s).is_some()
}

/// The innermost cause of a transport failure (e.g. "Connection refused").
fn transport_cause(s: &tonic::Status) -> String {
    let mut cur: &dyn std::error::Error = s;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Adds `authorization: Bearer <key>` to every request.
#[derive(Clone, Debug)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Auth {
    /// Bearer authentication with `key`, or none.
    pub fn new(key: Option<&str>) -> Result<Self, ClientError> {
        key.map(|k| {
            format!("Bearer {k}")
                .parse()
                .map_err(|_| ClientError::ApiKey)
        })
        .transpose()
        .map(Auth)
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel that authenticates; what generated clients are built on.
pub type AuthChannel = InterceptedService<Channel, Auth>;

/// A connection to the controller that follows the leader.
#[derive(Debug, Clone)]
pub struct Client {
    /// Every configured controller endpoint.
    endpoints: Vec<String>,
    endpoint: String,
    /// The CA (PEM) for `https://` endpoints; the system's roots if none.
    ca_pem: Option<String>,
    auth: Auth,
    channel: Option<Channel>,
    endpoint_is_default: bool,
}

impl Client {
    /// A lazily connecting client for `cfg`.
    pub fn new(cfg: &Config) -> Result<Self, ClientError> {
        Ok(Self {
            endpoints: cfg.endpoints.clone(),
            endpoint: cfg.endpoint.clone(),
            ca_pem: cfg
                .ca_file
                .as_ref()
                .map(|p| std::fs::read_to_string(p).map_err(|e| ClientError::CaFile(p.clone(), e)))
                .transpose()?,
            auth: Auth::new(cfg.api_key.as_deref())?,
            channel: None,
            endpoint_is_default: cfg.endpoint_is_default,
        })
    }

    /// The endpoint calls go to now (the leader once one was followed).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn channel(&mut self) -> Result<AuthChannel, ClientError> {
        if self.channel.is_none() {
            let mut ep = Endpoint::from_shared(self.endpoint.clone())
                .map_err(|e| ClientError::Endpoint(self.endpoint.clone(), e))?;
            if self.endpoint.starts_with("https://") {
                let tls = tonic::transport::ClientTlsConfig::new();
                let tls = match &self.ca_pem {
                    Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                    None => tls.with_native_roots(),
                };
                ep = ep
                    .tls_config(tls)
                    .map_err(|e| ClientError::Endpoint(self.endpoint.clone(), e))?;
            }
            // HTTP/2 pings find a node that accepted the connection but
            // stopped answering (a paused process) within ~1.5 s, so the
            // call moves on to another node instead of waiting out
            // CALL_TIMEOUT.
            let ep = ep
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true);
            self.channel = Some(ep.connect_lazy());
        }
        let ch = self.channel.clone().expect("channel was just set");
        Ok(InterceptedService::new(ch, self.auth.clone()))
    }

    /// Runs `call` (which builds a generated client on the channel and
    /// makes one request), retrying at the leader when a follower names
    /// one, and at the other configured endpoints when a node does not
    /// answer or an election is under way ([`crate::leader::Failover`]).
    /// `call` may run several times, so requests must be idempotent or
    /// carry a client token.
    pub async fn call<T, F, Fut>(&mut self, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(AuthChannel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut failover = Failover::new(self.endpoints.clone());
        loop {
            let status = match call(self.channel()?).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => s,
            };
            match failover.next(&status, &self.endpoint) {
                Hop::Follow(next) => self.switch(next),
                Hop::Retry(next, pause) => {
                    tokio::time::sleep(pause).await;
                    self.switch(next);
                }
                Hop::Fail if self.endpoint_is_default && is_transport(&status) => {
                    return Err(ClientError::Unconfigured(status, self.endpoint.clone()))
                }
                Hop::Fail => return Err(ClientError::Status(status, self.endpoint.clone())),
            }
        }
    }

    fn switch(&mut self, endpoint: String) {
        if endpoint != self.endpoint {
            self.endpoint = endpoint;
            self.channel = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_is_added() {
        let mut auth = Auth::new(Some("fk_123")).unwrap();
        let req = auth.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer fk_123"
        );
        let mut none = Auth::new(None).unwrap();
        assert!(none
            .call(tonic::Request::new(()))
            .unwrap()
            .metadata()
            .get("authorization")
            .is_none());
    }

    #[test]
    fn server_message_is_shown_as_is() {
        let s = tonic::Status::not_found("instance i-9 not found");
        let e = ClientError::Status(s, "http://a:1".into());
        assert_eq!(e.to_string(), "instance i-9 not found");
        let e = ClientError::Status(tonic::Status::internal(""), "http://a:1".into());
        assert_eq!(e.to_string(), "Internal error");
    }
}
