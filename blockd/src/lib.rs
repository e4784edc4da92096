//! `ferro-blockd`: Ferrocloud's block volume daemon, one per host.
//!
//! Two parts so far. The data path: each configured volume is a sparse
//! file on this host, served to one ferro-vmm at a time over
//! vhost-user-blk (rust-vmm's `vhost-user-backend`). And the replicas the
//! controller places on this host ([`follow`], [`replica_dir`]): made,
//! reported held (which makes a new volume `available`), and removed when
//! the volume is deleted. Replication across hosts, epochs and fencing
//! come in later slices; they plug in behind [`store::Store`], which every
//! request reads and writes through.
//!
//! Modules:
//! - [`request`]: the sans-IO request decoder (and its fuzzing entry point,
//!   [`request::decode_bytes`]).
//! - [`handler`]: executing one descriptor chain against a store.
//! - [`store`]: the [`store::Store`] trait and the local sparse file.
//! - [`backend`]: the vhost-user-blk device (features, config, queue loop).
//! - [`server`]: a volume's socket, serving one frontend after another.
//! - [`config`]: parsing `--volume` specs.
//! - [`replica_dir`]: this host's replica files converged to the controller's
//!   list (pure plan, then the filesystem).
//! - [`follow`]: the controller session (watch, converge, report).

pub mod backend;
pub mod config;
pub mod follow;
pub mod handler;
pub mod replica_dir;
pub mod request;
pub mod server;
pub mod store;
