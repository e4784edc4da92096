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
