//! Following the controller: `Hosts.WatchHostVolumes` gives the replicas
//! this host is to hold (all of them on connect, again after every
//! change); after each, and every [`RESYNC`] besides, the replica
//! directory is converged and what it holds reported with
//! `Hosts.ReportVolumeReplicas`. A replica the controller tells this host
//! to resync (`ReplicaOnHost.resync`: a volume no instance serves, this
//! host its first replica in sync) is resynced from this host's copy on
//! a thread of its own ([`resync_unserved`]), again after a failure (after
//! [`RESYNC_RETRY`], or at once when its replica server moved) until it is
//! back in sync. The calls go through `ferro-client`
//! (leader following, TLS, the host's bearer key). When the stream breaks
//! the loop reconnects with back-off; replicas are never touched while no
//! state is known.
//!
//! On SIGTERM or SIGINT ([`stop_on_signal`]) the daemon stops cleanly: its
//! queues stall at the end of the passes running, each served volume is
//! flushed to every in-sync replica and its session closed clean where it
//! can be, then the process exits. The VMMs keep their requests on their
//! rings and reconnect to the next blockd, which serves those volumes
//! without comparing their replicas.

use std::path::PathBuf;
use std::time::Duration;

use ferro_client::{Client, ClientConfig};
use ferro_proto::compute::v1::hosts_client::HostsClient;
use ferro_proto::compute::v1::{HostVolumes, ReportVolumeReplicasRequest, WatchHostVolumesRequest};

use std::sync::{Arc, Mutex};

use crate::authority::ControllerAuthority;
use crate::replica_dir::ReplicaDir;
use crate::replication::{Backup, Options, ReplicatedStore, RESYNC_RETRY};
use crate::serve::Serving;
use crate::store::LocalFile;

/// How often the directory is converged and reported without a change.
pub const RESYNC: Duration = Duration::from_secs(5);
/// Longest pause between attempts to reach the controller.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Longest a stop on SIGTERM takes before the process exits anyway,
/// leaving the sessions not yet closed open (the next primary compares
/// those volumes' replicas).
pub const STOP_LIMIT: Duration = Duration::from_secs(20);

/// Where the controller is and who this host is.
#[derive(Clone, Debug)]
pub struct FollowConfig {
    /// This host's id.
    pub host_id: String,
    /// Every controller endpoint.
    pub controllers: Vec<String>,
    /// The host's API key (role host), read at every connection.
    pub api_key_file: PathBuf,
    /// The CA of `https://` controllers, if any.
    pub ca_file: Option<PathBuf>,
    /// Where this host's replica server listens, reported to the
    /// controller (peers' primaries connect there); none: not served.
    pub replica_addr: Option<std::net::SocketAddr>,
    /// Where the vhost-user sockets of the served volumes go.
    pub serve_dir: PathBuf,
}

/// Why a session with the controller ended.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// The host's key could not be read.
    #[error("cannot read the host's key {0} (has the host joined?)")]
    Key(String, #[source] std::io::Error),
    /// A call failed.
    #[error(transparent)]
    Call(#[from] ferro_client::CallError),
    /// The stream broke.
    #[error("the volume stream broke: {}", .0.message())]
    Stream(tonic::Status),
    /// The controller ended the stream.
    #[error("the controller ended the volume stream")]
    Ended,
    /// The replica directory failed.
    #[error(transparent)]
    Replicas(#[from] crate::replica_dir::ReplicaDirError),
}

/// The served volumes, kept across sessions (made at the first state).
type SharedServing = Arc<Mutex<Option<Serving>>>;

/// The (volume, replica, replica server) resyncs running as no one's
/// primary, or lately failed.
type Resyncing = Arc<Mutex<std::collections::BTreeSet<(String, String, String)>>>;

/// Follow the controller forever, converging `dir`.
pub async fn follow(cfg: FollowConfig, dir: ReplicaDir) {
    let mut failures: u32 = 0;
    let serving: SharedServing = Arc::default();
    let resyncing: Resyncing = Arc::default();
    tokio::spawn(stop_on_signal(serving.clone()));
    loop {
        let e = session(&cfg, &dir, &serving, &resyncing, &mut failures).await;
        failures += 1;
        if failures == 1 || failures.is_multiple_of(30) {
            tracing::warn!(
                failures,
                "cannot follow this host's volumes: {}",
                crate::error_chain(&e)
            );
        }
        let exp = failures.saturating_sub(1).min(6);
        let pause = Duration::from_millis(250)
            .saturating_mul(1 << exp)
            .min(MAX_BACKOFF);
        tokio::time::sleep(ferro_client::jitter(pause)).await;
    }
}

/// Waits for SIGTERM or SIGINT, then stops the daemon: every served
/// volume stopped and shut down ([`Serving::shut_down`]), within
/// [`STOP_LIMIT`]; then exits, with status 0 when all of it was done in
/// time (1 otherwise). The served volumes stay locked until the exit, so
/// no converge opens or re-learns one after it was shut down.
async fn stop_on_signal(serving: SharedServing) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            return tracing::warn!(
                "cannot catch SIGTERM ({e}): a stop will leave the served volumes' sessions open"
            );
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        signal = name,
        "stopping: stalling the queues, closing the served volumes"
    );
    let stopping = tokio::task::spawn_blocking(move || {
        let mut served = serving
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = served.as_mut() {
            s.shut_down();
        }
        tracing::info!("stopped");
        std::process::exit(0);
    });
    if tokio::time::timeout(STOP_LIMIT, stopping).await.is_err() {
        tracing::warn!("stopping took longer than {STOP_LIMIT:?}; exiting with sessions left open");
    }
    std::process::exit(1);
}

/// A controller client with the host's key.
fn client_config(cfg: &FollowConfig) -> Result<ClientConfig, FollowError> {
    let key = std::fs::read_to_string(&cfg.api_key_file)
        .map_err(|e| FollowError::Key(cfg.api_key_file.display().to_string(), e))?;
    let mut ccfg = ClientConfig::new(cfg.controllers.clone(), Some(key.trim().to_string()));
    ccfg.ca_pem = cfg
        .ca_file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok());
    ccfg.max_retries = cfg.controllers.len();
    ccfg.call_timeout = Duration::from_secs(10);
    Ok(ccfg)
}

/// Starts a resync of each replica the controller tells this host to
/// resync (as no one's primary: a [`ReplicatedStore`] over this host's own
/// copy alone, comparing checksums), unless one is running already.
fn resync_unserved(
    dir: &ReplicaDir,
    want: &HostVolumes,
    ccfg: &ClientConfig,
    handle: &tokio::runtime::Handle,
    resyncing: &Resyncing,
) {
    for r in want.replicas.iter().filter(|r| r.in_sync && !r.deleting) {
        for target in &r.resync {
            let Some((addr, server)) = r
                .peers
                .iter()
                .find(|p| p.host_id == *target)
                .and_then(|p| Some((p.addr.parse().ok()?, p.addr.clone())))
            else {
                continue;
            };
            let key = (r.volume_id.clone(), target.clone(), server);
            if !resyncing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.clone())
            {
                continue;
            }
            let backup = Backup {
                id: target.clone(),
                addr,
            };
            let (path, size, epoch) = (dir.path(&r.volume_id), r.size_bytes, r.epoch);
            let (ccfg, handle, running) = (ccfg.clone(), handle.clone(), resyncing.clone());
            let unspawned = key.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("resync-{}", r.volume_id))
                .spawn(move || {
                    let volume = key.0.clone();
                    let store = (|| {
                        let local = LocalFile::open_or_create(&path, size).map_err(|e| e.to_string())?;
                        let client = Client::new(ccfg).map_err(|e| e.to_string())?;
                        let authority = Arc::new(ControllerAuthority::new(client, handle));
                        ReplicatedStore::open(
                            &volume,
                            epoch,
                            Box::new(local),
                            &[],
                            authority,
                            Options::default(),
                        )
                        .map_err(|e| crate::error_chain(&e))
                    })();
                    let done = match store {
                        // It logs what it copied, or why it failed.
                        Ok(s) => s.resync(&backup).is_ok(),
                        Err(e) => {
                            tracing::warn!(volume_id = %volume, replica = %backup.id, "cannot resync: {e}");
                            false
                        }
                    };
                    if !done {
                        // Not again at this address for a while.
                        std::thread::sleep(RESYNC_RETRY);
                    }
                    running.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                });
            if let Err(e) = spawned {
                tracing::warn!(volume_id = %r.volume_id, "cannot start a resync: {e}");
                resyncing
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&unspawned);
            }
        }
    }
}

async fn session(
    cfg: &FollowConfig,
    dir: &ReplicaDir,
    serving: &SharedServing,
    resyncing: &Resyncing,
    failures: &mut u32,
) -> FollowError {
    let ccfg = match client_config(cfg) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut client = match Client::new(ccfg.clone()) {
        Ok(c) => c,
        Err(e) => return e.into(),
    };
    let stream = client
        .call(|ch| async move {
            HostsClient::new(ch)
                .watch_host_volumes(WatchHostVolumesRequest {})
                .await
        })
        .await;
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => return e.into(),
    };
    let mut desired: Option<HostVolumes> = None;
    loop {
        tokio::select! {
            m = stream.message() => match m {
                Ok(Some(v)) => {
                    if *failures > 0 {
                        tracing::info!(failures = *failures, "following this host's volumes again");
                        *failures = 0;
                    }
                    if !v.host_id.is_empty() && v.host_id != cfg.host_id {
                        tracing::warn!(host_id = %v.host_id, "the controller sent another host's volumes; ignored");
                        continue;
                    }
                    desired = Some(v);
                }
                Ok(None) => return FollowError::Ended,
                Err(s) => return FollowError::Stream(s),
            },
            _ = tokio::time::sleep(RESYNC) => {}
        }
        let Some(want) = &desired else { continue };
        let (d, w) = (dir.clone(), want.clone());
        let (sv, handle, host) = (
            serving.clone(),
            tokio::runtime::Handle::current(),
            cfg.host_id.clone(),
        );
        let (serve_dir, ccfg) = (cfg.serve_dir.clone(), ccfg.clone());
        let resyncing = resyncing.clone();
        let converged = tokio::task::spawn_blocking(move || {
            let held = d.converge(&w)?;
            resync_unserved(&d, &w, &ccfg, &handle, &resyncing);
            let mut sv = sv.lock().unwrap_or_else(|e| e.into_inner());
            if sv.is_none() && !w.serve.is_empty() {
                match Client::new(ccfg) {
                    Ok(c) => {
                        let authority = Arc::new(ControllerAuthority::new(c, handle));
                        let replica = d.replica();
                        let made = Serving::new(
                            &serve_dir,
                            &host,
                            Box::new(move |id: &str, _size: u64| {
                                Ok(replica.local(id).map(|l| Box::new(l) as Box<dyn crate::store::Store>))
                            }),
                            authority,
                        );
                        match made {
                            Ok(s) => *sv = Some(s),
                            Err(e) => tracing::error!(dir = %serve_dir.display(), "cannot serve volumes: {e}"),
                        }
                    }
                    Err(e) => tracing::error!("cannot serve volumes: {e}"),
                }
            }
            if let Some(s) = sv.as_mut() {
                s.converge(&w.serve);
            }
            Ok::<_, crate::replica_dir::ReplicaDirError>(held)
        })
        .await;
        let held = match converged {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => return e.into(),
            Err(e) => {
                tracing::error!("converging the replicas panicked: {e}");
                continue;
            }
        };
        let req = ReportVolumeReplicasRequest {
            replicas: held,
            replica_addr: cfg.replica_addr.map(|a| a.to_string()).unwrap_or_default(),
        };
        let sent = client
            .call(|ch| {
                let req = req.clone();
                async move { HostsClient::new(ch).report_volume_replicas(req).await }
            })
            .await;
        match sent {
            Ok(r) if r.changed > 0 => tracing::info!(
                changed = r.changed,
                revision = want.revision,
                "replicas reported"
            ),
            Ok(_) => {}
            Err(e) => return e.into(),
        }
    }
}
