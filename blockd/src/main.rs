//! `ferro-blockd` binary: parse flags, open the volumes, serve each on its
//! own thread; with `--controller`, follow the replicas the controller
//! places on this host. Without a controller, `--replica` replicas are
//! held for primaries elsewhere (`--volume …,backups=`) on
//! `--replica-listen`: a fixed replica set, for tests and benchmarks.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ferro_blockd::config::{parse_replica, parse_volume};
use ferro_blockd::follow::FollowConfig;
use ferro_blockd::replica::Replica;
use ferro_blockd::replica::ReplicaServer;
use ferro_blockd::replica_dir::ReplicaDir;
use ferro_blockd::server::Volume;

/// Ferrocloud block volume daemon: serves volumes over vhost-user-blk.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Volume: id=SERIAL,path=FILE,size=SIZE[K|M|G|T],socket=PATH
    /// [,backups=NAME@IP:PORT[+…],epoch=N][,io=direct|buffered] (with
    /// backups, every write also goes to those replica servers; one failing
    /// fails the I/O; io: O_DIRECT where the filesystem allows, the
    /// default, or the host page cache); repeatable.
    #[arg(long, value_name = "SPEC", required_unless_present_any = ["controller", "replica"])]
    volume: Vec<String>,
    /// Without a controller: hold a replica for a primary elsewhere,
    /// id=ID,size=SIZE[,epoch=N], in `--replica-dir`, served on
    /// `--replica-listen`; repeatable.
    #[arg(long, value_name = "SPEC", requires_all = ["replica_dir", "replica_listen"], conflicts_with = "controller")]
    replica: Vec<String>,
    /// Where `--replica` replicas live.
    #[arg(long, value_name = "DIR")]
    replica_dir: Option<PathBuf>,
    /// A controller endpoint (http(s)://host:port); repeatable. Follows the
    /// replicas the controller places on this host.
    #[arg(long, value_name = "URL", requires_all = ["host_id", "api_key_file", "data_dir"])]
    controller: Vec<String>,
    /// This host's id, as the controller knows it.
    #[arg(long)]
    host_id: Option<String>,
    /// The host's API key (the agent's credential, role host).
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// The CA of https:// controllers.
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Where the replicas live (`<dir>/replicas/`).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Serve this host's replicas to their primaries on IP:PORT (port 0:
    /// any free one); reported to the controller. An address the other
    /// hosts reach (the underlay's), not 0.0.0.0.
    #[arg(long, value_name = "IP:PORT")]
    replica_listen: Option<std::net::SocketAddr>,
}

/// Print an error and its causes on one line.
fn report(err: &dyn std::error::Error) {
    eprintln!("ferro-blockd: error: {}", ferro_blockd::error_chain(err));
}

/// The controller follower the flags ask for, with its replica
/// directory opened.
fn follower(cli: &Cli) -> Result<Option<(FollowConfig, ReplicaDir)>, ExitCode> {
    if cli.controller.is_empty() {
        return Ok(None);
    }
    let mut controllers = Vec::new();
    for c in &cli.controller {
        match ferro_client::normalize_endpoint(c) {
            Ok(u) => controllers.push(u),
            Err(m) => {
                eprintln!("ferro-blockd: error: --controller {c:?}: {m}");
                return Err(ExitCode::from(2));
            }
        }
    }
    let (Some(host_id), Some(api_key_file), Some(data_dir)) =
        (&cli.host_id, &cli.api_key_file, &cli.data_dir)
    else {
        eprintln!(
            "ferro-blockd: error: --controller needs --host-id, --api-key-file and --data-dir"
        );
        return Err(ExitCode::from(2));
    };
    let dir = match ReplicaDir::open(&data_dir.join("replicas")) {
        Ok(d) => d,
        Err(e) => {
            report(&e);
            return Err(ExitCode::from(1));
        }
    };
    let mut replica_addr = None;
    if let Some(addr) = cli.replica_listen {
        if addr.ip().is_unspecified() {
            eprintln!(
                "ferro-blockd: error: --replica-listen {addr}: give the address other hosts reach, not {}",
                addr.ip()
            );
            return Err(ExitCode::from(2));
        }
        match ReplicaServer::start(dir.replica(), addr) {
            Ok(server) => {
                let bound = server.local_addr();
                eprintln!("ferro-blockd: replica server on {bound}");
                replica_addr = Some(bound);
                // Serves for the life of the process.
                std::mem::forget(server);
            }
            Err(e) => {
                eprintln!("ferro-blockd: error: --replica-listen {addr}: {e}");
                return Err(ExitCode::from(1));
            }
        }
    }
    let cfg = FollowConfig {
        host_id: host_id.clone(),
        controllers,
        api_key_file: api_key_file.clone(),
        ca_file: cli.ca_file.clone(),
        replica_addr,
        serve_dir: data_dir.join("vhost"),
    };
    Ok(Some((cfg, dir)))
}

/// Opens the `--replica` replicas and serves them on `--replica-listen`
/// (for the process's life); nothing to do without `--replica`.
fn standalone_replicas(cli: &Cli) -> Result<(), ExitCode> {
    if cli.replica.is_empty() {
        if cli.replica_listen.is_some() && cli.controller.is_empty() {
            eprintln!("ferro-blockd: error: --replica-listen needs --controller or --replica");
            return Err(ExitCode::from(2));
        }
        return Ok(());
    }
    let (Some(dir), Some(addr)) = (&cli.replica_dir, cli.replica_listen) else {
        eprintln!("ferro-blockd: error: --replica needs --replica-dir and --replica-listen");
        return Err(ExitCode::from(2));
    };
    let mut specs = Vec::new();
    for spec in &cli.replica {
        match parse_replica(spec) {
            Ok(r) => specs.push(r),
            Err(e) => {
                report(&e);
                return Err(ExitCode::from(2));
            }
        }
    }
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("ferro-blockd: error: --replica-dir {}: {e}", dir.display());
        return Err(ExitCode::from(1));
    }
    let replica = std::sync::Arc::new(Replica::new(dir));
    for r in &specs {
        let opened = replica
            .open_volume(&r.id, r.size)
            .and_then(|_| replica.set_epoch(&r.id, r.epoch));
        if let Err(e) = opened {
            report(&e);
            return Err(ExitCode::from(1));
        }
    }
    match ReplicaServer::start(replica, addr) {
        Ok(server) => {
            eprintln!(
                "ferro-blockd: holding {} replica(s), replica server on {}",
                specs.len(),
                server.local_addr()
            );
            // Serves for the life of the process.
            std::mem::forget(server);
            Ok(())
        }
        Err(e) => {
            eprintln!("ferro-blockd: error: --replica-listen {addr}: {e}");
            Err(ExitCode::from(1))
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRO_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    if let Err(code) = standalone_replicas(&cli) {
        return code;
    }
    let follower = match follower(&cli) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let mut volumes = Vec::new();
    for spec in &cli.volume {
        match parse_volume(spec).map_err(|e| Box::new(e) as Box<dyn std::error::Error>) {
            Ok(cfg) => volumes.push(cfg),
            Err(e) => {
                report(&*e);
                return ExitCode::from(2);
            }
        }
    }
    let mut opened = Vec::new();
    for cfg in volumes {
        match Volume::open(cfg) {
            Ok(v) => opened.push(v),
            Err(e) => {
                report(&e);
                return ExitCode::from(1);
            }
        }
    }
    eprintln!("ferro-blockd: serving {} volume(s)", opened.len());
    if opened.is_empty() && !cli.replica.is_empty() && follower.is_none() {
        // Only replicas: the replica server runs until killed.
        loop {
            std::thread::park();
        }
    }
    if let Some((cfg, dir)) = follower {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a tokio runtime");
            rt.block_on(ferro_blockd::follow::follow(cfg, dir));
        });
        if opened.is_empty() {
            // Nothing else to serve: the follower runs until killed.
            loop {
                std::thread::park();
            }
        }
    }
    let threads: Vec<_> = opened
        .into_iter()
        .map(|v| std::thread::spawn(move || v.serve()))
        .collect();
    for t in threads {
        if let Ok(Err(e)) = t.join() {
            report(&e);
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}
