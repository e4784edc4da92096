//! The convergence loop: on every new state and every resync interval,
//! observe the kernel, [`plan`], apply each operation, and keep the DHCP
//! and metadata servers in step. Level-triggered: a failed operation is simply planned
//! again next round, and manual damage is repaired within an interval.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use ferro_proto::compute::v1::HostNetwork;
use tokio::sync::watch;

use crate::config::Config;
use crate::desired::{local_interfaces, Desired, Underlay};
use crate::dhcp::server::{Servers, Wanted};
use crate::dhcp::Lease;
use crate::metadata::{Metadata, Settings};
use crate::netlink::{Netlink, NetlinkError};
use crate::plan::{plan, Op};

/// How often an unchanged ruleset is applied again anyway.
const NFT_REPAIR: Duration = Duration::from_secs(30);

/// The loop's state between rounds.
struct Converger {
    cfg: Arc<Config>,
    nl: Netlink,
    dhcp: Servers,
    metadata: Metadata,
    /// The nftables ruleset last applied, and when (it is applied again
    /// when it changes, and every `NFT_REPAIR` to undo manual damage).
    nft: Option<(crate::security_groups::Ruleset, Instant)>,
    revision: Option<u64>,
    /// When each failing operation was last logged.
    failing: HashMap<String, Instant>,
}

/// Converge until `states` closes. Nothing is changed before the first
/// state arrives: a restarted netd keeps the dataplane as it found it.
pub async fn run(
    cfg: Arc<Config>,
    mut states: watch::Receiver<Option<HostNetwork>>,
) -> Result<(), NetlinkError> {
    let mut c = Converger {
        nl: Netlink::connect()?,
        dhcp: Servers::default(),
        metadata: Metadata::new(Settings::default()),
        nft: None,
        revision: None,
        failing: HashMap::new(),
        cfg: cfg.clone(),
    };
    let mut tick = tokio::time::interval(cfg.resync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = states.changed() => if changed.is_err() { return Ok(()) },
            _ = tick.tick() => {}
        }
        let Some(net) = states.borrow_and_update().clone() else {
            continue;
        };
        c.round(&net).await;
    }
}

impl Converger {
    async fn round(&mut self, net: &HostNetwork) {
        let underlay = Underlay {
            local_ip: self.cfg.underlay_ip,
            dev: self.cfg.underlay_dev.clone(),
            mtu: self.cfg.mtu,
        };
        let (desired, skipped) = Desired::from_state(net, &underlay);
        let new_revision = self.revision != Some(net.revision);
        if new_revision {
            tracing::info!(
                revision = net.revision,
                vpcs = desired.vpcs.len(),
                "new network state"
            );
            for s in &skipped {
                tracing::warn!("left out: {s}");
            }
            self.revision = Some(net.revision);
        }
        // Filters first: a TAP is attached to its bridge only once the
        // rules that police it are in place.
        self.sync_nft(net, new_revision);
        let observed = match self.nl.observe().await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!("cannot read the dataplane: {}", crate::chain(&e));
                return;
            }
        };
        for op in plan(&desired, &observed) {
            self.apply(&desired, &op).await;
        }
        for vpc in desired.vpcs.values() {
            for dev in [vpc.bridge(), vpc.vxlan()] {
                match crate::sysctl::harden(&dev) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(vpc_id = %vpc.vpc_id, "{dev}: {n} sysctls set"),
                    Err(e) if new_revision => {
                        tracing::warn!(vpc_id = %vpc.vpc_id, "{dev}: cannot set sysctls: {e}")
                    }
                    Err(_) => {}
                }
            }
        }
        self.sync_dhcp(net, new_revision);
        let nl = &self.nl;
        self.metadata.sync_with(net, |tap| nl.index(tap));
    }

    async fn apply(&mut self, desired: &Desired, op: &Op) {
        let vpc_id = vpc_of(desired, op).unwrap_or("-");
        let span = tracing::info_span!("op", vpc_id);
        // Entered only around the logging: a guard held across the await
        // would tag other tasks' events on this thread.
        let result = self.nl.apply(op).instrument(span.clone()).await;
        let _g = span.enter();
        match result {
            Ok(()) => {
                tracing::info!("{op}");
                self.failing.remove(&op.to_string());
            }
            Err(e) => {
                let key = op.to_string();
                let due = self
                    .failing
                    .get(&key)
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                if due {
                    tracing::warn!("{op} failed (retried every round): {}", crate::chain(&e));
                    if self.failing.len() > 1000 {
                        self.failing.clear();
                    }
                    self.failing.insert(key, Instant::now());
                }
            }
        }
    }

    /// Security groups and anti-spoofing: one nft transaction when the
    /// ruleset changed (or is due for repair).
    fn sync_nft(&mut self, net: &HostNetwork, new_revision: bool) {
        let rs = crate::security_groups::ruleset(net);
        if new_revision {
            rs.warn_skipped();
        }
        let due = match &self.nft {
            Some((last, at)) => *last != rs || at.elapsed() >= NFT_REPAIR,
            None => true,
        };
        if !due {
            return;
        }
        // nft runs as a child process; this runtime has threads to spare.
        match tokio::task::block_in_place(|| crate::security_groups::apply(&rs)) {
            Ok(()) => self.nft = Some((rs, Instant::now())),
            Err(e) => {
                self.nft = None;
                let key = "nft".to_string();
                let due = self
                    .failing
                    .get(&key)
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
                if due {
                    tracing::warn!(
                        "cannot apply the security groups (retried every round): {}",
                        crate::chain(&e)
                    );
                    self.failing.insert(key, Instant::now());
                }
            }
        }
    }

    fn sync_dhcp(&mut self, net: &HostNetwork, log: bool) {
        let mtu = if net.mtu != 0 { net.mtu } else { self.cfg.mtu };
        let mut wanted = Vec::new();
        for (vpc, l) in local_interfaces(net) {
            if l.tap.is_empty() {
                continue;
            }
            let Some(ifindex) = self.nl.index(&l.tap) else {
                continue;
            };
            match Lease::new(l, vpc.vni, mtu) {
                Ok(lease) => wanted.push(Wanted {
                    tap: l.tap.clone(),
                    ifindex,
                    vpc_id: vpc.vpc_id.clone(),
                    lease,
                }),
                Err(e) if log => tracing::warn!(vpc_id = %vpc.vpc_id, "no DHCP: {e}"),
                Err(_) => {}
            }
        }
        self.dhcp.sync(wanted);
    }
}

/// The VPC an operation is for, for logs.
fn vpc_of<'a>(desired: &'a Desired, op: &Op) -> Option<&'a str> {
    let dev = op.device();
    let vni = crate::desired::vni_of(dev, crate::desired::bridge_prefix())
        .or_else(|| crate::desired::vni_of(dev, crate::desired::vxlan_prefix()));
    let vpc = match vni {
        Some(v) => desired.vpcs.get(&v),
        None => desired
            .vpcs
            .values()
            .find(|v| v.taps.iter().any(|t| t == dev)),
    };
    vpc.map(|v| v.vpc_id.as_str())
}
