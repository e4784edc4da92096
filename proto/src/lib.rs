//! Ferrocloud's gRPC API definitions, generated from the `.proto` files
//! under `proto/` by `tonic-prost-build`.
//!
//! Packages are versioned (`ferro.agent.v1`); fields are never renumbered.
//! Field documentation lives in the `.proto` files and is carried into the
//! generated Rust docs.

/// The per-host agent's API (`ferro.agent.v1`).
pub mod agent {
    /// Version 1.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("ferro.agent.v1");
    }
}

/// The controller's public API (`ferro.compute.v1`): instances, images, key
/// pairs, placement groups, hosts, cluster membership and agent heartbeats.
pub mod compute {
    /// Version 1.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("ferro.compute.v1");
    }
}

/// Whether `id` is a volume id as the controller makes them: `vol-` and
/// 16 lowercase hex digits (shared by the controller, which checks what
/// blockd reports, and blockd, which names its replica files so).
pub fn is_volume_id(id: &str) -> bool {
    id.strip_prefix("vol-").is_some_and(|h| {
        h.len() == 16
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Replication traffic between controller nodes (`ferro.raft.v1`), used by
/// `ferro-raft`.
pub mod raft {
    /// Version 1.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("ferro.raft.v1");
    }
}
