//! Per-device sysctls that keep the host out of the VPCs: netd's bridges
//! and VXLAN devices have no address and must not get one by themselves
//! (no IPv6 link-local, no router solicitations into a VPC) nor answer
//! ARP for the host's own addresses (`arp_ignore = 8`). What a guest
//! sends to a bridge's MAC anyway is dropped in nftables (bridge `input`,
//! [`crate::security_groups`]).
//!
//! And `br_netfilter`, without which bridged IPv4 never reaches
//! conntrack: [`ensure_br_netfilter`].

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The settings, as (path under /proc/sys/net with `{}` for the device,
/// value).
const SETTINGS: [(&str, &str); 2] = [
    ("ipv6/conf/{}/disable_ipv6", "1"),
    ("ipv4/conf/{}/arp_ignore", "8"),
];

/// Apply [`SETTINGS`] to `dev` where they differ; returns how many were
/// written. A missing file (no IPv6 in this kernel) is skipped.
pub fn harden(dev: &str) -> io::Result<usize> {
    let mut written = 0;
    for (path, value) in SETTINGS {
        let p = PathBuf::from("/proc/sys/net").join(path.replace("{}", dev));
        match std::fs::read_to_string(&p) {
            Ok(v) if v.trim() == value => {}
            Ok(_) => {
                std::fs::write(&p, value)?;
                written += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

/// Where `br_netfilter`'s sysctls appear once it is loaded.
const BR_NETFILTER_SYSCTLS: &str = "/proc/sys/net/bridge";

/// `br_netfilter` is not loaded and could not be.
#[derive(Debug, thiserror::Error)]
pub enum BrNetfilterError {
    /// `modprobe` could not be run.
    #[error("cannot run modprobe br_netfilter")]
    Spawn(#[source] io::Error),
    /// `modprobe` failed.
    #[error("modprobe br_netfilter failed: {0}")]
    Failed(String),
}

/// Load `br_netfilter` unless it is (`/proc/sys/net/bridge` exists):
/// without it bridged IPv4 skips conntrack, the security groups cannot
/// be stateful and replies are dropped. Whether it was loaded now.
pub fn load_br_netfilter() -> Result<bool, BrNetfilterError> {
    if Path::new(BR_NETFILTER_SYSCTLS).exists() {
        return Ok(false);
    }
    let out = Command::new("modprobe")
        .arg("br_netfilter")
        .output()
        .map_err(BrNetfilterError::Spawn)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(BrNetfilterError::Failed(stderr));
    }
    Ok(true)
}

/// [`load_br_netfilter`], logged: an error names the module and what is
/// lost without it.
pub fn ensure_br_netfilter() {
    match load_br_netfilter() {
        Ok(false) => {}
        Ok(true) => tracing::info!("loaded module br_netfilter"),
        Err(e) => tracing::error!(
            "module br_netfilter is not loaded: the security groups cannot be stateful \
             (replies are dropped): {}",
            crate::chain(&e)
        ),
    }
}
