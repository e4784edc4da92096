//! `ferro-agent`: the per-host daemon that runs, watches and keeps
//! instances (ferro-vmm microVMs) behind the `ferro.agent.v1` gRPC API.
//!
//! Layers, from the edge inwards:
//! - [`service`]: the gRPC service; converts ([`convert`]) and delegates.
//! - [`manager`]: the registry of instances, capacity accounting, create
//!   and recovery after an agent restart.
//! - [`supervisor`]: one task per instance carrying out what its state
//!   machine decides; it sees the agent around it only through
//!   [`supervisor::Context`] (which the manager implements).
//! - [`machine`]: the sans-IO lifecycle (intent vs observed), unit-tested.
//! - Host-facing helpers: [`process`] (spawn, pidfds, re-attach),
//!   [`control`] (the VMM control socket), [`resources`] (cgroups, TAPs,
//!   disks through `ferro-hostops`), [`console`] (bounded console logs),
//!   [`persist`] (atomic JSON state), [`host`] (host facts), [`events`]
//!   (the `WatchEvents` stream), [`config`] and [`spec`].
//! - [`heartbeat`]: reports to the controller when one is configured;
//!   [`order`] stamps every change so older reports never win.
//! - [`credentials`]: the host's credential and certificates, from a join
//!   or the configuration; the gRPC port serves only mutual TLS.
//!
//! VMMs run in their own sessions, so stopping or killing the agent never
//! stops an instance; a restarted agent re-attaches to them.

pub mod config;
pub mod console;
pub mod control;
pub mod convert;
pub mod credentials;
pub mod events;
pub mod heartbeat;
pub mod host;
pub mod machine;
pub mod manager;
pub mod order;
pub mod persist;
pub mod process;
pub mod resources;
pub mod service;
pub mod spec;
pub mod supervisor;

use ferro_proto::agent::v1::agent_server::AgentServer;
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tracing::Instrument;

pub use config::AgentConfig;

/// Errors that end the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The manager could not start.
    #[error("cannot start the instance manager")]
    Manager(#[from] manager::ManagerError),
    /// The listen address could not be bound.
    #[error("cannot listen on {0}")]
    Listen(std::net::SocketAddr, #[source] std::io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signal(#[source] std::io::Error),
    /// The gRPC server failed.
    #[error("gRPC server failed")]
    Serve(#[from] tonic::transport::Error),
    /// No credentials.
    #[error(transparent)]
    Credentials(#[from] credentials::CredentialsError),
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An error and its sources, `: `-separated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Run the agent until SIGTERM or SIGINT. Instances keep running after it
/// returns. Prints `ferro-agent: listening on ADDR` once it serves (after
/// joining the cluster on a first start with `join_token`).
pub async fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    // Entered only while the future runs (a guard held across awaits
    // would tag other tasks' events on the same thread).
    let span = tracing::info_span!("agent", host_id = %cfg.host_id);
    serve(cfg).instrument(span).await
}

async fn serve(cfg: AgentConfig) -> Result<(), AgentError> {
    let listen = cfg.listen;
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let creds = credentials::obtain(&cfg).await?;
    let manager = manager::Manager::open(cfg).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| AgentError::Listen(listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| AgentError::Listen(listen, e))?;
    tracing::info!(%addr, "serving");
    println!("ferro-agent: listening on {addr}");
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down; instances keep running");
    };
    let heartbeats = start_heartbeats(&manager, addr, creds.host_key.clone());
    // Only clients with a certificate from the client CA (the controllers)
    // get past the handshake.
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &creds.cert_pem,
            &creds.key_pem,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(
            &creds.client_ca_pem,
        ));
    let served = tonic::transport::Server::builder()
        .tls_config(tls)?
        .add_service(AgentServer::new(service::AgentService::new(manager)))
        .serve_with_incoming_shutdown(
            // Small answers must not wait for Nagle's algorithm (the
            // builder's tcp_nodelay does not reach an incoming stream).
            TcpListenerStream::new(listener).map(|conn| {
                conn.inspect(|c| {
                    let _ = c.set_nodelay(true);
                })
            }),
            shutdown,
        )
        .await;
    if let Some(h) = heartbeats {
        h.abort();
    }
    served?;
    Ok(())
}

/// Start the heartbeat task when a controller is configured.
fn start_heartbeats(
    manager: &manager::Manager,
    addr: std::net::SocketAddr,
    host_key: Option<String>,
) -> Option<tokio::task::JoinHandle<()>> {
    let cfg = &manager.inner().cfg;
    let controllers = cfg.controllers()?;
    let hb = heartbeat::Heartbeat {
        controllers,
        api_key: host_key?,
        address: cfg
            .advertise
            .clone()
            .unwrap_or_else(|| format!("https://{addr}")),
        interval: std::time::Duration::from_millis(cfg.heartbeat_interval_ms),
        // Checked readable when the configuration was loaded.
        ca_pem: cfg
            .controller_ca_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok()),
    };
    tracing::info!(controllers = ?hb.controllers, "heartbeating");
    let svc = service::AgentService::new(manager.clone());
    Some(tokio::spawn(heartbeat::run(svc, hb)))
}
