//! Host-side operations used by `ferro-agent`.
//!
//! Plain blocking `std` code: every function performs a few syscalls and
//! returns, so the agent may call them from a blocking thread pool.
//!
//! Modules:
//! - [`cgroup`]: per-instance cgroups (v1 hybrid or v2) with CPU and memory
//!   limits, and joining them from a `pre_exec` hook.
//! - [`tap`]: persistent TAP devices and Linux bridges through ioctls.
//! - [`images`]: the local image store (kernel, initrd, root disk with
//!   SHA-256 metadata) and per-instance disk clones.
//!
//! Every module has its own `thiserror` error enum whose messages name the
//! path, interface or id concerned.

#![warn(missing_docs)]

pub mod cgroup;
pub mod images;
mod names;

/// The one rule for instance and image ids, used by the agent's spec
/// validation, cgroup names and the image store: 1 to 64 characters from
/// `[A-Za-z0-9_-]`.
pub use names::is_valid_id as valid_id;
pub mod tap;
#[cfg(test)]
mod test_util;
