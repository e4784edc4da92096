//! The CLI's connection to the controller: `ferro-client`'s [`Client`]
//! (bearer key, TLS, timeouts, leader following) with the CLI's
//! configuration and its one extra hint: when nothing answers at the
//! default endpoint, say how to configure one.

use std::future::Future;

pub use ferro_client::{Auth, AuthChannel};

use crate::config::Config;

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The client could not be built.
    #[error(transparent)]
    Setup(ferro_client::CallError),
    /// The CA file could not be read.
    #[error("ca_file: cannot read {}", .0.display())]
    CaFile(std::path::PathBuf, #[source] std::io::Error),
    /// The server (or the transport) answered with an error.
    #[error("{}", ferro_client::status_message(.0, .1))]
    Status(tonic::Status, String),
    /// Nothing answers at the default endpoint, and none was configured.
    #[error(
        "{}; no controller endpoint is configured: pass --endpoint URL, set FERRO_ENDPOINT, \
         or put `endpoint = \"http://HOST:7400\"` in ~/.config/ferro/config.toml \
         (`ferro up` writes that file)",
        ferro_client::status_message(.0, .1)
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

/// A connection to the controller that follows the leader.
#[derive(Debug, Clone)]
pub struct Client {
    inner: ferro_client::Client,
    endpoint_is_default: bool,
}

impl Client {
    /// A lazily connecting client for `cfg`.
    pub fn new(cfg: &Config) -> Result<Self, ClientError> {
        let mut c = ferro_client::ClientConfig::new(cfg.endpoints.clone(), cfg.api_key.clone());
        // The endpoint in use first (the configured one, or a leader).
        if !c.endpoints.contains(&cfg.endpoint) {
            c.endpoints.insert(0, cfg.endpoint.clone());
        } else if let Some(i) = c.endpoints.iter().position(|e| *e == cfg.endpoint) {
            c.endpoints.rotate_left(i);
        }
        c.ca_pem = cfg
            .ca_file
            .as_ref()
            .map(|p| std::fs::read_to_string(p).map_err(|e| ClientError::CaFile(p.clone(), e)))
            .transpose()?;
        Ok(Self {
            inner: ferro_client::Client::new(c).map_err(ClientError::Setup)?,
            endpoint_is_default: cfg.endpoint_is_default,
        })
    }

    /// The endpoint calls go to now (the leader once one was followed).
    pub fn endpoint(&self) -> &str {
        self.inner.endpoint()
    }

    /// A client of `endpoint` alone that tries once within `timeout`.
    pub fn only(&self, endpoint: &str, timeout: std::time::Duration) -> Result<Self, ClientError> {
        Ok(Self {
            inner: self
                .inner
                .only(endpoint, timeout)
                .map_err(ClientError::Setup)?,
            endpoint_is_default: false,
        })
    }

    /// [`ferro_client::Client::call`]: requests must be idempotent or carry
    /// a client token.
    pub async fn call<T, F, Fut>(&mut self, call: F) -> Result<T, ClientError>
    where
        F: FnMut(AuthChannel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match self.inner.call(call).await {
            Ok(t) => Ok(t),
            Err(ferro_client::CallError::Status(s, ep))
                if self.endpoint_is_default && ferro_client::is_transport(&s) =>
            {
                Err(ClientError::Unconfigured(s, ep))
            }
            Err(ferro_client::CallError::Status(s, ep)) => Err(ClientError::Status(s, ep)),
            Err(e) => Err(ClientError::Setup(e)),
        }
    }
}
