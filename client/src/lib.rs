//! `ferro-client`: how every Ferrocloud program talks to the controller
//! cluster — the CLI, the agents' heartbeats and joins, and the daemons to
//! come (netd, blockd).
//!
//! - [`Client`]: a lazily connecting channel to one of the configured
//!   endpoints, with the bearer credential, TLS (a given CA or the
//!   system's roots), timeouts and HTTP/2 keep-alive pings (a node that
//!   stopped answering is left within ~1 s), and [`Client::call`], which
//!   follows the leader a follower names and moves round the endpoints.
//! - [`leader`]: the sans-IO decisions of that ([`leader::Failover`]) and
//!   the answers' markers: `x-ferro-leader` (where the leader is),
//!   `x-ferro-retry` (the call did nothing: safe to send again) and
//!   `x-ferro-outcome: unknown` (a write that may still commit: send again
//!   only what is idempotent or carries a client token).

pub mod leader;

use std::future::Future;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use leader::{Failover, Hop};

/// How long to wait for a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often an HTTP/2 ping checks that the node still answers.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(250);
/// A ping unanswered this long ends the connection.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(750);

/// Where and how to reach the controllers.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Every controller endpoint (`http://host:port` or `https://…`), at
    /// least one; calls start at the first.
    pub endpoints: Vec<String>,
    /// The bearer credential (an API key or a host's key); none for calls
    /// that need none (`Hosts.Join`).
    pub api_key: Option<String>,
    /// The CA (PEM) of `https://` endpoints; the system's roots if none.
    pub ca_pem: Option<String>,
    /// Retries per call after failures that are not redirects.
    pub max_retries: usize,
    /// How long one call may take.
    pub call_timeout: Duration,
}

impl ClientConfig {
    /// `endpoints` with `api_key`, the system's roots and the defaults.
    pub fn new(endpoints: Vec<String>, api_key: Option<String>) -> Self {
        Self {
            endpoints,
            api_key,
            ca_pem: None,
            max_retries: leader::MAX_RETRIES,
            call_timeout: CALL_TIMEOUT,
        }
    }
}

/// A failed call or a client that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No endpoint was given.
    #[error("no controller endpoint is configured")]
    NoEndpoint,
    /// The endpoint is not a valid URI.
    #[error("invalid endpoint {0}")]
    Endpoint(String, #[source] tonic::transport::Error),
    /// The credential cannot be sent as metadata.
    #[error("the API key is not valid in a header")]
    ApiKey,
    /// The server (or the transport) answered with an error; the endpoint
    /// that was called last.
    #[error("{}", status_message(.0, .1))]
    Status(tonic::Status, String),
}

impl CallError {
    /// The gRPC status, when the call got one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            CallError::Status(s, _) => Some(s),
            _ => None,
        }
    }
}

/// The server's message, or what the code means when it sent none; for a
/// transport failure, which endpoint could not be reached.
pub fn status_message(s: &tonic::Status, endpoint: &str) -> String {
    let msg = s.message();
    match (s.code(), msg.is_empty()) {
        (tonic::Code::Unavailable, _) if is_transport(s) => {
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
pub fn is_transport(s: &tonic::Status) -> bool {
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

/// `d` scaled by a factor in [0.5, 1.5), so clients that failed together
/// do not retry together.
pub fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    d.mul_f64(0.5 + f64::from(nanos % 1000) / 1000.0)
}

/// `raw` as `http://host:port` or `https://host:port` (no scheme: http).
pub fn normalize_endpoint(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    let (scheme, rest) = match raw.split_once("://") {
        Some((s @ ("http" | "https"), rest)) => (s, rest),
        Some((s, _)) => return Err(format!("unsupported scheme `{s}` (use http or https)")),
        None => ("http", raw),
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') {
        return Err(format!("`{raw}` is not of the form http://host:port"));
    }
    let port = authority.rsplit_once(':').map(|(_, p)| p);
    match port.map(str::parse::<u16>) {
        Some(Ok(p)) if p > 0 => Ok(format!("{scheme}://{authority}")),
        _ => Err(format!("`{raw}` needs a port (http://host:port)")),
    }
}

/// Adds `authorization: Bearer <key>` to every request.
#[derive(Clone, Debug)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Auth {
    /// Bearer authentication with `key`, or none.
    pub fn new(key: Option<&str>) -> Result<Self, CallError> {
        key.map(|k| format!("Bearer {k}").parse().map_err(|_| CallError::ApiKey))
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

/// A connection to the controller cluster that follows the leader.
#[derive(Debug, Clone)]
pub struct Client {
    cfg: ClientConfig,
    endpoint: String,
    auth: Auth,
    channel: Option<Channel>,
}

impl Client {
    /// A lazily connecting client for `cfg`.
    pub fn new(cfg: ClientConfig) -> Result<Self, CallError> {
        let endpoint = cfg
            .endpoints
            .first()
            .cloned()
            .ok_or(CallError::NoEndpoint)?;
        Ok(Self {
            auth: Auth::new(cfg.api_key.as_deref())?,
            endpoint,
            cfg,
            channel: None,
        })
    }

    /// The endpoint calls go to now (the leader once one was followed).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A client of `endpoint` alone (same credential and CA) that gives up
    /// after one try within `timeout`: to ask one node about itself.
    pub fn only(&self, endpoint: &str, timeout: Duration) -> Result<Client, CallError> {
        let mut cfg = self.cfg.clone();
        cfg.endpoints = vec![endpoint.to_string()];
        cfg.max_retries = 0;
        cfg.call_timeout = timeout;
        Client::new(cfg)
    }

    fn channel(&mut self) -> Result<AuthChannel, CallError> {
        if self.channel.is_none() {
            let bad = |e| CallError::Endpoint(self.endpoint.clone(), e);
            let mut ep = Endpoint::from_shared(self.endpoint.clone()).map_err(bad)?;
            if self.endpoint.starts_with("https://") {
                let tls = tonic::transport::ClientTlsConfig::new();
                let tls = match &self.cfg.ca_pem {
                    Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                    None => tls.with_native_roots(),
                };
                ep = ep.tls_config(tls).map_err(bad)?;
            }
            // HTTP/2 pings find a node that accepted the connection but
            // stopped answering (a paused process) within ~1 s, so the
            // call moves on to another node instead of waiting out the
            // call timeout.
            let ep = ep
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(self.cfg.call_timeout)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(false);
            self.channel = Some(ep.connect_lazy());
        }
        let ch = self.channel.clone().expect("channel was just set");
        Ok(InterceptedService::new(ch, self.auth.clone()))
    }

    /// Runs `call` (which builds a generated client on the channel and
    /// makes one request), retrying at the leader when a follower names
    /// one, and at the other configured endpoints when a node does not
    /// answer or an election is under way ([`leader::Failover`]). `call`
    /// may run several times, so requests must be idempotent or carry a
    /// client token.
    pub async fn call<T, F, Fut>(&mut self, mut call: F) -> Result<T, CallError>
    where
        F: FnMut(AuthChannel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut failover = Failover::with_retries(self.cfg.endpoints.clone(), self.cfg.max_retries);
        loop {
            let status = match call(self.channel()?).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => s,
            };
            match failover.next(&status, &self.endpoint) {
                Hop::Follow(next) => self.switch(next),
                Hop::Retry(next, pause) => {
                    tokio::time::sleep(jitter(pause)).await;
                    self.switch(next);
                }
                Hop::Fail => return Err(CallError::Status(status, self.endpoint.clone())),
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
        assert!(matches!(Auth::new(Some("a\nb")), Err(CallError::ApiKey)));
    }

    #[test]
    fn server_message_is_shown_as_is() {
        let s = tonic::Status::not_found("instance i-9 not found");
        let e = CallError::Status(s, "http://a:1".into());
        assert_eq!(e.to_string(), "instance i-9 not found");
        let e = CallError::Status(tonic::Status::internal(""), "http://a:1".into());
        assert_eq!(e.to_string(), "Internal error");
    }

    #[test]
    fn endpoints_are_normalised() {
        assert_eq!(normalize_endpoint("h:1").unwrap(), "http://h:1");
        assert_eq!(normalize_endpoint("https://h:1/").unwrap(), "https://h:1");
        assert!(normalize_endpoint("ftp://h:1").is_err());
        assert!(normalize_endpoint("http://h").is_err());
        assert!(Client::new(ClientConfig::new(vec![], None)).is_err());
    }
}
