//! `ferro-blockd`: Ferrocloud's block volume daemon, one per host.
//!
//! Each configured volume is served to one ferro-vmm at a time over
//! vhost-user-blk (rust-vmm's `vhost-user-backend`); every request reads and
//! writes through a [`store::Store`]. Today's daemon serves a sparse file on
//! this host. With `--controller` it also follows the replicas the
//! controller places on this host ([`follow`], [`replica_dir`]): made,
//! reported held (which makes a new volume `available`), and removed when
//! the volume is deleted. Replication across hosts is built as a library
//! beside it: a primary's [`replication::ReplicatedStore`] is a `Store` that
//! writes its local copy and every in-sync backup synchronously (the writes
//! of one pass over the queue pipelined: all sent, then all acks), backups
//! answer it through [`replica::Replica`], and every frame between them
//! carries the volume's epoch so a replaced primary is fenced ([`replica`]
//! states the rule). The controller grants epochs
//! ([`authority::ControllerAuthority`]); blockd's replica server answers
//! primaries for the replicas it holds, at the epoch the controller gives
//! those in sync. The volumes attached to this host's instances are
//! served by their primary here ([`serve`]), which also resyncs each of
//! their replicas that fell out of sync and came back
//! ([`replication::ReplicatedStore::resync`]: the dirty map, or the
//! regions whose checksums differ, copied while writes go on, then the
//! controller puts it back in sync at a raised epoch). The agent hands
//! each socket to the VMM at the instance's start (its
//! `blockd_socket_dir` is this daemon's `<data-dir>/vhost`).
//!
//! Modules:
//! - [`request`]: the sans-IO request decoder (and its fuzzing entry point,
//!   [`request::decode_bytes`]).
//! - [`handler`]: executing the descriptor chains of one pass over the
//!   queue against a store, their writes as one batch.
//! - [`store`]: the [`store::Store`] trait and the local sparse file.
//! - [`backend`]: the vhost-user-blk device (features, config, queue loop).
//! - [`server`]: a volume's socket, serving one frontend after another.
//! - [`config`]: parsing `--volume` specs.
//! - [`replica_dir`]: this host's replica files converged to the controller's
//!   list (pure plan, then the filesystem).
//! - [`follow`]: the controller session (watch, converge, report, serve,
//!   and resync the replicas of volumes nobody serves).
//! - [`serve`]: the volumes attached to this host's instances, served as
//!   their primary over vhost-user.
//! - [`wire`]: the sans-IO replication protocol: frames, their layout, and
//!   the decoder fuzzed by `fuzz/fuzz_targets/blockd_wire.rs`.
//! - [`link`]: frames over a blocking TCP stream.
//! - [`replica`]: the backup side: the fencing rules, each volume's replica
//!   and epoch, and its TCP server.
//! - [`meta`]: a replica's epoch file (atomic replace; quarantine if
//!   corrupt).
//! - [`replication`]: the primary side, [`replication::ReplicatedStore`],
//!   and the [`replication::Authority`] it asks before dropping a backup.
//! - [`authority`]: the controller as the [`replication::Authority`]
//!   (`Hosts.RemoveVolumeReplica`, `Hosts.AddVolumeReplica`).
//! - [`dirty`]: the dirty-region bitmap that resync (and later incremental
//!   snapshots) copy from.
//! - [`resync`]: which regions a returning replica is sent (sans-IO: region
//!   checksums, their comparison, the byte ranges to copy).

/// An error and its causes on one line (`a: b: c`).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// A duration in microseconds from environment variable `name`, or
/// `default` when it is unset or not a number (tuning knobs read once).
pub fn env_micros(name: &str, default: std::time::Duration) -> std::time::Duration {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(default, std::time::Duration::from_micros)
}

#[cfg(feature = "daemon")]
pub mod authority;
pub mod backend;
pub mod config;
pub mod direct;
pub mod dirty;
#[cfg(feature = "daemon")]
pub mod follow;
pub mod handler;
pub mod link;
pub mod meta;
pub mod replica;
#[cfg(feature = "daemon")]
pub mod replica_dir;
pub mod replication;
pub mod request;
pub mod resync;
#[cfg(feature = "daemon")]
pub mod serve;
pub mod server;
pub mod store;
pub mod wire;
