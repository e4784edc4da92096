//! Serving one volume on a vhost-user socket, one frontend at a time.
//!
//! The socket stays bound for the daemon's life. Each connection gets a
//! fresh `VhostUserDaemon` over the same store, so a frontend that goes away
//! (a VMM that exits, or one reconnecting after this daemon restarted) is
//! followed by the next one with no state carried over: the frontend sends
//! the memory table and the rings again, with its rings' indices.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;

use crate::backend::BlockBackend;
use crate::handler::{GuestMemoryMmap, RequestHandler};
use crate::replication::StaticReplicas;
use crate::replication::{Backup, Options, ReplicatedStore, ReplicationError};
use crate::store::{IoMode, LocalFile, Store, StoreError};

/// One volume to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeConfig {
    /// Serial returned by `GET_ID` (at most 20 bytes).
    pub id: String,
    /// The backing sparse file, created at `size` if missing.
    pub path: PathBuf,
    /// Size in bytes (a multiple of 512).
    pub size: u64,
    /// The vhost-user socket to listen on.
    pub socket: PathBuf,
    /// Without a controller: backup replicas every write goes to as well
    /// (this file is the primary's copy); none: a local volume.
    pub backups: Vec<Backup>,
    /// The replica set's epoch the backups were opened at (with backups).
    pub epoch: u64,
    /// Direct I/O (the default) or the page cache (`io=buffered`).
    pub io: IoMode,
}

/// Errors serving a volume; each names the volume.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened.
    #[error("volume {0}")]
    Store(String, #[source] StoreError),
    /// Its backups could not be reached or are not in sync.
    #[error("volume {0}: replication")]
    Replication(String, #[source] ReplicationError),
    /// A backup did not join the replica set.
    #[error("volume {0}: backup {1} is not in sync (is its replica open at epoch {2}?)")]
    BackupBehind(String, String, u64),
    /// The socket could not be bound.
    #[error("cannot listen on {0}")]
    Listen(String, #[source] vhost::vhost_user::Error),
    /// The vhost-user daemon failed to start on a connection
    /// (`vhost_user_backend::Error` is not a `std::error::Error`).
    #[error("volume {0}: cannot serve a connection: {1}")]
    Daemon(String, String),
}

/// A volume with its socket bound, ready to [`Volume::serve`].
pub struct Volume {
    config: VolumeConfig,
    store: Arc<dyn Store>,
    listener: Listener,
}

impl Volume {
    /// Opens (or creates) the store and binds the socket, replacing a stale
    /// socket file left by a previous run.
    /// With backups (and no controller), every write goes to them too,
    /// and a backup that fails fails the I/O ([`StaticReplicas`]).
    pub fn open(config: VolumeConfig) -> Result<Self, ServeError> {
        let local = LocalFile::open_or_create_with(&config.path, config.size, config.io)
            .map_err(|e| ServeError::Store(config.id.clone(), e))?;
        let store: Arc<dyn Store> = if config.backups.is_empty() {
            Arc::new(local)
        } else {
            let r = ReplicatedStore::open(
                &config.id,
                config.epoch,
                Box::new(local),
                &config.backups,
                Arc::new(StaticReplicas),
                Options::default(),
            )
            .map_err(|e| ServeError::Replication(config.id.clone(), e))?;
            let in_sync = r.in_sync();
            if let Some(b) = config.backups.iter().find(|b| !in_sync.contains(&b.id)) {
                return Err(ServeError::BackupBehind(
                    config.id.clone(),
                    b.id.clone(),
                    config.epoch,
                ));
            }
            Arc::new(r)
        };
        let listener = Listener::new(&config.socket, true)
            .map_err(|e| ServeError::Listen(display(&config.socket), e))?;
        Ok(Volume {
            config,
            store,
            listener,
        })
    }

    /// Serves `store` as volume `id` on `socket` (bound now, replacing a
    /// stale socket file).
    pub fn with_store(id: &str, socket: &Path, store: Arc<dyn Store>) -> Result<Self, ServeError> {
        let listener =
            Listener::new(socket, true).map_err(|e| ServeError::Listen(display(socket), e))?;
        Ok(Volume {
            config: VolumeConfig {
                id: id.to_string(),
                path: PathBuf::new(),
                size: store.capacity() * crate::request::SECTOR_SIZE,
                socket: socket.to_path_buf(),
                backups: Vec::new(),
                epoch: 0,
                io: IoMode::default(),
            },
            store,
            listener,
        })
    }

    /// Serves frontends one after another until `stop` is set (looked at
    /// between connections); returns early only when a connection cannot
    /// be set up at all.
    pub fn serve_until(mut self, stop: &std::sync::atomic::AtomicBool) -> Result<(), ServeError> {
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            self.serve_one()?;
        }
        Ok(())
    }

    /// Serves frontends one after another, forever; returns only when a
    /// connection cannot be set up at all.
    pub fn serve(mut self) -> Result<(), ServeError> {
        loop {
            self.serve_one()?;
        }
    }

    /// Accepts one frontend and serves it until it disconnects.
    pub fn serve_one(&mut self) -> Result<(), ServeError> {
        let id = self.config.id.clone();
        let backend = Arc::new(BlockBackend::new(
            RequestHandler::new(self.store.clone(), &id),
            GuestMemoryAtomic::new(GuestMemoryMmap::default()),
        ));
        let mut daemon = VhostUserDaemon::new(
            format!("blockd-{id}"),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::default()),
        )
        .map_err(|e| ServeError::Daemon(id.clone(), e.to_string()))?;
        daemon
            .start(&mut self.listener)
            .map_err(|e| ServeError::Daemon(id.clone(), e.to_string()))?;
        tracing::info!(volume = %id, "frontend connected");
        match daemon.wait() {
            Ok(()) => tracing::info!(volume = %id, "frontend disconnected"),
            Err(e) => tracing::warn!(volume = %id, error = %e, "frontend connection ended"),
        }
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        self.store.idle();
        Ok(())
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
