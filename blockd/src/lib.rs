//! `ferro-blockd`: Ferrocloud's block volume daemon, one per host.
//!
//! This first slice is the data path only: each configured volume is a
//! sparse file on this host, served to one ferro-vmm at a time over
//! vhost-user-blk (rust-vmm's `vhost-user-backend`). Replication across
//! hosts, epochs and fencing, and the controller's configuration come in
//! later slices; they plug in behind [`store::Store`], which every request
//! reads and writes through.
//!
//! Modules:
//! - [`request`]: the sans-IO request decoder (and its fuzzing entry point,
//!   [`request::decode_bytes`]).
//! - [`handler`]: executing one descriptor chain against a store.
//! - [`store`]: the [`store::Store`] trait and the local sparse file.
//! - [`backend`]: the vhost-user-blk device (features, config, queue loop).
//! - [`server`]: a volume's socket, serving one frontend after another.
//! - [`config`]: parsing `--volume` specs.

pub mod backend;
pub mod config;
pub mod handler;
pub mod request;
pub mod server;
pub mod store;
