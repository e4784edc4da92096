//! The controller process: one gRPC server carrying the compute API, the
//! agents' heartbeats and Raft, plus the reconcile loop on the leader.

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use ferro_proto::compute::v1::cluster_server::ClusterServer;
use ferro_proto::compute::v1::compute_server::ComputeServer;
use ferro_proto::compute::v1::hosts_server::HostsServer;
use ferro_raft::{RaftConfig, RaftReplicator, Replicator};
use tokio::signal::unix::{signal, SignalKind};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;

use crate::api::{authenticate, ClusterService, ComputeService, HostsService};
use crate::config::ControllerConfig;
use crate::controller::{Controller, Settings};
use crate::executor::Executor;
use crate::state::ClusterState;

/// Errors that end the controller.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The Raft node could not open.
    #[error("cannot open the raft node")]
    Open(#[from] ferro_raft::OpenError),
    /// Raft failed.
    #[error("replication failed")]
    Replication(#[from] ferro_raft::ReplicationError),
    /// The listen address could not be bound.
    #[error("cannot listen on {0}")]
    Listen(std::net::SocketAddr, #[source] std::io::Error),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signal(#[source] std::io::Error),
    /// A TLS file could not be read.
    #[error("cannot read {0}")]
    TlsFile(std::path::PathBuf, #[source] std::io::Error),
    /// The TLS files cannot serve the EC2 endpoint.
    #[error("the EC2 endpoint's TLS")]
    Ec2Tls(#[source] crate::ec2::tls::TlsError),
    /// The admin key file could not be written.
    #[error("cannot write {0}")]
    KeyFile(std::path::PathBuf, #[source] std::io::Error),
    /// The gRPC server failed.
    #[error("gRPC server failed")]
    Serve(#[from] tonic::transport::Error),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// The three public services over `ctl`, behind the bearer-key interceptor.
#[allow(clippy::type_complexity)]
pub fn services<R: Replicator<ClusterState>>(
    ctl: &Arc<Controller<R>>,
) -> (
    InterceptedService<
        ComputeServer<ComputeService<R>>,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
    InterceptedService<
        ClusterServer<ClusterService<R>>,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
    InterceptedService<
        HostsServer<HostsService<R>>,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
) {
    let auth: fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> = authenticate;
    (
        ComputeServer::with_interceptor(ComputeService::new(ctl.clone()), auth),
        ClusterServer::with_interceptor(ClusterService::new(ctl.clone()), auth),
        HostsServer::with_interceptor(HostsService::new(ctl.clone()), auth),
    )
}

/// Run a controller node until SIGTERM or SIGINT. Prints
/// `ferro-controller: listening on ADDR` once it serves and, on the node
/// that bootstraps a new cluster, the admin API key once
/// (`ferro-controller: admin API key: fk_...`, also written to
/// `<data_dir>/admin.key`, mode 0600).
pub async fn run(cfg: ControllerConfig) -> Result<(), ServerError> {
    // The span covers the node's own work; entered only while the future
    // runs (a guard held across awaits would tag other tasks' events).
    let span = tracing::info_span!("controller", node_id = cfg.node_id);
    serve(cfg).instrument(span).await
}

async fn serve(cfg: ControllerConfig) -> Result<(), ServerError> {
    let mut term = signal(SignalKind::terminate()).map_err(ServerError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServerError::Signal)?;
    let members = cfg.members()?;
    let mut raft_cfg = RaftConfig::new(cfg.node_id, cfg.advertise(), cfg.data_dir.join("raft"));
    raft_cfg.snapshot_every = cfg.snapshot_every;
    // Peers see this node's Raft traffic come from the address it listens
    // on (when it listens on one).
    raft_cfg.source_ip = Some(cfg.listen.ip()).filter(|ip| !ip.is_unspecified());
    let read = |p: &std::path::PathBuf| {
        std::fs::read_to_string(p).map_err(|e| ServerError::TlsFile(p.clone(), e))
    };
    let (identity, ec2_tls) = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(c), Some(k)) => {
            let (cert, key) = (read(c)?, read(k)?);
            let ca = cfg.tls_ca_file.as_ref().map(read).transpose()?;
            // The EC2 endpoint serves the same certificate (only when it
            // is served: a key rustls cannot use must not stop the rest).
            let ec2_tls = match cfg.ec2_listen {
                Some(_) => Some(
                    crate::ec2::tls::Ec2Tls::from_pem(
                        cert.as_bytes(),
                        key.as_bytes(),
                        ca.as_deref().map(str::as_bytes),
                    )
                    .map_err(ServerError::Ec2Tls)?,
                ),
                None => None,
            };
            (
                Some(tonic::transport::Identity::from_pem(cert, key)),
                ec2_tls,
            )
        }
        _ => (None, None),
    };
    raft_cfg.peer_tls_ca_pem = cfg.tls_ca_file.as_ref().map(read).transpose()?;
    // Keep fewer entries than one snapshot interval behind it, so a node
    // that was away for longer catches up from the snapshot.
    raft_cfg.keep_logs_after_snapshot = raft_cfg.keep_logs_after_snapshot.min(cfg.snapshot_every);
    let repl = RaftReplicator::<ClusterState>::open(raft_cfg).await?;
    let raft_service = repl.grpc_service();
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| ServerError::Listen(cfg.listen, e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServerError::Listen(cfg.listen, e))?;
    let ctl = Controller::new(
        repl,
        Settings {
            heartbeat_timeout_ms: cfg.heartbeat_timeout_ms,
            heartbeat_interval_ms: cfg.heartbeat_interval_ms,
            replicated: true,
            terminated_retention_ms: cfg.terminated_retention_ms,
            default_volume_type: cfg.default_volume_type.clone(),
        },
    );
    let (compute, cluster, hosts) = services(&ctl);
    let ec2 = match cfg.ec2_listen {
        Some(a) => {
            let scheme = if ec2_tls.is_some() { "https" } else { "http" };
            let (bound, task) = crate::ec2::start(ctl.clone(), a, ec2_tls)
                .await
                .map_err(|e| ServerError::Listen(a, e))?;
            tracing::info!(%bound, scheme, "serving the EC2 Query API");
            println!("ferro-controller: EC2 endpoint on {scheme}://{bound}");
            Some(task)
        }
        None => None,
    };
    // Small answers must not wait for Nagle's algorithm: the builder's
    // `tcp_nodelay` applies only to sockets tonic accepts itself, not to
    // an incoming stream (a unary answer's last frame otherwise waits for
    // the client's delayed ACK, ~40 ms).
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|c| {
            let _ = c.set_nodelay(true);
        })
    });
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = identity {
        builder =
            builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
        tracing::info!("serving TLS");
    }
    let server = tokio::spawn(
        builder
            .tcp_nodelay(true)
            .add_service(raft_service)
            .add_service(compute)
            .add_service(cluster)
            .add_service(hosts)
            .serve_with_incoming_shutdown(incoming, shutdown),
    );
    tracing::info!(%addr, "serving");
    println!("ferro-controller: listening on {addr}");
    let lowest = members.iter().map(|m| m.id).min() == Some(cfg.node_id);
    if lowest {
        // A no-op on a node that was initialized before (a restart).
        ctl.replicator().initialize(members).await?;
    }
    let azs = if cfg.availability_zones.is_empty() {
        vec!["az-1".to_string()]
    } else {
        cfg.availability_zones.clone()
    };
    let bootstrap = tokio::spawn(bootstrap_when_leading(
        ctl.clone(),
        cfg.region.clone(),
        azs,
        cfg.data_dir.join("admin.key"),
    ));
    let exec = Executor::new(ctl.clone());
    let reconciler = tokio::spawn(exec.run(Duration::from_millis(cfg.reconcile_interval_ms)));
    let r = server.await;
    if let Some(t) = ec2 {
        t.abort();
    }
    reconciler.abort();
    bootstrap.abort();
    ctl.replicator().shutdown().await;
    match r {
        Ok(r) => Ok(r?),
        Err(_) => Ok(()),
    }
}

/// Bootstraps a fresh cluster from whichever node leads first: checks
/// every 200 ms until this node's replica shows a bootstrapped state with
/// a cluster CA. The
/// node that bootstraps prints the admin key once and writes it to
/// `key_file`. Leadership may move at any time (a restarted node can
/// briefly believe it still leads), so a refused attempt is only retried.
async fn bootstrap_when_leading<R: Replicator<ClusterState>>(
    ctl: Arc<Controller<R>>,
    region: String,
    azs: Vec<String>,
    key_file: std::path::PathBuf,
) {
    let mut deferred = 0u32;
    loop {
        let done = ctl
            .replicator()
            .read_local(|s| !s.region.is_empty())
            .unwrap_or(false);
        if done {
            // A cluster bootstrapped before it had a CA or a default VPC
            // gets them.
            match ctl.ensure_ca().await {
                Ok(true) if ctl.ensure_default_vpc().await.is_ok() => return,
                Ok(true) => {}
                Ok(false) => {}
                Err(e) => tracing::info!(error = %crate::chain(&e), "cluster CA deferred"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        if ctl.is_leader() {
            match ctl.bootstrap(&region, azs.clone()).await {
                Ok(Some(secret)) => {
                    if let Err(e) = write_key_file(&key_file, &secret) {
                        tracing::error!(error = %crate::chain(&e), "cannot keep the admin API key");
                    }
                    println!("ferro-controller: admin API key: {secret}");
                    return;
                }
                Ok(None) => return,
                // Expected while leadership settles: said once, then quietly.
                Err(e) if deferred == 0 => {
                    deferred += 1;
                    tracing::info!(error = %crate::chain(&e), "bootstrap deferred (retrying)")
                }
                Err(e) => {
                    deferred += 1;
                    tracing::debug!(error = %crate::chain(&e), deferred, "bootstrap deferred")
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn write_key_file(path: &std::path::Path, secret: &str) -> Result<(), ServerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e| ServerError::KeyFile(path.into(), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    writeln!(f, "{secret}").map_err(err)
}
