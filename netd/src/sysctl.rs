//! Per-device sysctls that keep the host out of the VPCs: netd's bridges
//! and VXLAN devices have no address and must not get one by themselves
//! (no IPv6 link-local, no router solicitations into a VPC) nor answer
//! ARP for the host's own addresses (`arp_ignore = 8`).
//!
//! TODO(security-groups): a guest that learns a bridge's MAC can still
//! send IP to the host's addresses through it; the nftables slice drops
//! everything a netd bridge delivers to the host (bridge `input`).

use std::io;
use std::path::PathBuf;

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
