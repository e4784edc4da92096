//! `ferro-controller`: Ferrocloud's control plane.
//!
//! Layers, from the inside out:
//! - [`model`]: the records (hosts, instances, images, key pairs, ...);
//!   [`lifecycle`]: the instance-state vocabulary and its conversions.
//! - [`scheduler`]: pure placement (filters, then scoring).
//! - [`state`]: the replicated [`ClusterState`](state::ClusterState), a
//!   deterministic `ferro_raft::StateMachine` over [`state::Command`]s.
//! - [`reconciler`]: the sans-IO decisions that drive agents toward the
//!   desired state, and [`executor`] which carries them out over gRPC.
//! - [`controller`]: the operations the API offers, over any
//!   `ferro_raft::Replicator`, plus the leader's view of host liveness.
//! - [`api`]: the `ferro.compute.v1` gRPC services (thin: convert and
//!   delegate) and bearer-key authentication.
//! - [`sshkey`]: Ed25519 key pairs in OpenSSH formats for CreateKeyPair.
//! - [`config`] and [`server`]: the TOML configuration and the process.

pub mod access;
pub mod api;
pub mod config;
pub mod controller;
pub mod ec2;
pub mod executor;
pub mod lifecycle;
pub mod model;
pub mod net;
pub mod reconciler;
pub mod retry;
pub mod scheduler;
pub mod server;
pub mod sshkey;
pub mod state;

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

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
