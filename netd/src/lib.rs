//! `ferro-netd`: the per-host VPC dataplane daemon.
//!
//! It follows this host's network state from the controller
//! (`Hosts.WatchHostNetwork`, [`watch`]) and converges the kernel to it
//! ([`converge`]), level-triggered, on every new state and every resync
//! interval:
//!
//! - per VPC with interfaces here, a bridge `fbr<vni hex>` and a VXLAN
//!   device `fvx<vni hex>` (VNI, local = the underlay address, port 4789,
//!   no learning, ARP proxy, no default remote: nothing floods between
//!   hosts) enslaved to it; the agent's TAPs attached to their VPC's bridge;
//! - per remote interface, an FDB entry MAC → its host's underlay address
//!   and a permanent neighbour entry IP → MAC on the VXLAN device;
//! - per local interface, a DHCP server on its TAP ([`dhcp`]) and the
//!   VPC router with the instance metadata service, IMDSv2 on
//!   169.254.169.254 ([`metadata`]): a smoltcp stack on the TAP's own
//!   packet socket, so an instance is known by the TAP its request came in
//!   on, never by the address it claims.
//!
//! The decisions are pure and unit-tested: [`desired`] (the state as
//! names and parsed addresses), [`plan`] (observed + desired → netlink
//! operations), [`dhcp::respond`] (a guest's frame → the answer frame).
//! The I/O around them is thin: [`netlink`] (rtnetlink), [`dhcp::socket`]
//! (`AF_PACKET`), [`watch`] (gRPC through `ferro-client`).
//!
//! Only netd's own devices are ever created or deleted; a restart reads
//! what exists and changes only the difference, so traffic flows on.
//! Security groups and anti-spoofing in nftables: [`security_groups`],
//! [`antispoof`].

pub mod antispoof;
pub mod config;
pub mod converge;
pub mod desired;
pub mod dhcp;
pub mod metadata;
pub mod netlink;
pub mod packet;
pub mod plan;
pub mod security_groups;
pub mod sysctl;
pub mod watch;

use std::sync::Arc;

pub use config::{Config, ConfigError};

/// Errors that stop netd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The netlink socket could not be opened.
    #[error("cannot manage the dataplane")]
    Netlink(#[from] netlink::NetlinkError),
    /// Signal handlers could not be installed.
    #[error("cannot wait for signals")]
    Signals(#[source] std::io::Error),
}

/// `e` and its causes, separated by ": ".
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

/// Run until SIGTERM or SIGINT. The dataplane stays as it is when netd
/// stops: the next netd takes it over.
pub async fn run(cfg: Config) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    crate::desired::set_naming(&cfg.name_prefix, cfg.vxlan_port);
    let cfg = Arc::new(cfg);
    tracing::info!(host_id = %cfg.host_id, underlay_ip = %cfg.underlay_ip, "ferro-netd starting");
    let (tx, rx) = tokio::sync::watch::channel(None);
    let follower = tokio::spawn(watch::follow(cfg.clone(), tx));
    let result = tokio::select! {
        r = converge::run(cfg, rx) => r.map_err(Error::from),
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    };
    follower.abort();
    tracing::info!("ferro-netd stopping; the dataplane is left as it is");
    result
}
