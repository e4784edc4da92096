//! The instance metadata service: EC2's IMDSv2 on `169.254.169.254:80`,
//! served on each local interface's TAP.
//!
//! Identity is the TAP, never an address: each TAP has its own server
//! ([`server`]) with its own packet socket, its own user-space TCP/IP stack
//! (smoltcp) that is the VPC router to the guest, and only that
//! interface's [`InterfaceData`] and [`Tokens`]. A request with a forged
//! source address still reaches only the data of the TAP it came in on.
//!
//! - [`http`]: a bounded HTTP/1.x request parser and response writer;
//! - [`service`]: [`handle`], the whole of IMDSv2 as a pure function;
//! - [`socket`]: the `AF_PACKET` socket (ARP and IPv4 to the router MAC);
//! - [`server`]: the smoltcp glue, one tokio task per TAP;
//! - [`Metadata::sync`]: tasks kept in step with the state.

pub mod http;
pub mod server;
pub mod service;
pub mod socket;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ferro_proto::compute::v1::{HostNetwork, LocalInterface, VpcOnHost};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::desired::{self, Mac};
pub use http::{Request, Response, Status};
pub use service::{handle, InterfaceData, Tokens};

/// The metadata service's address.
pub const IMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Its port.
pub const IMDS_PORT: u16 = 80;

/// How each TAP's server behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// A connection is aborted this long after it opened (slow or stuck
    /// clients free their socket).
    pub request_timeout: Duration,
    /// TCP sockets listening per TAP: how many requests may be in flight.
    pub connections: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            request_timeout: Duration::from_secs(10),
            connections: 4,
        }
    }
}

/// What a TAP's stack is; a change restarts its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    /// The TAP's ifindex.
    pub ifindex: u32,
    /// The VPC router's MAC ([`desired::router_mac`], as DHCP's answers).
    pub router_mac: Mac,
    /// The subnet's router.
    pub router_ip: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix: u8,
}

/// A local interface the controller described in a way the metadata
/// service cannot serve.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[error("interface of {instance_id}: bad {field} {value:?}")]
pub struct BadInterface {
    /// The instance.
    pub instance_id: String,
    /// The field.
    pub field: &'static str,
    /// Its value.
    pub value: String,
}

/// A TAP to serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// The TAP.
    pub tap: String,
    /// The VPC (for logs).
    pub vpc_id: String,
    /// Its stack.
    pub link: Link,
    /// What its guest reads.
    pub data: InterfaceData,
}

impl InterfaceData {
    /// The data of `l` in `vpc`, with group names from `net`, and the link
    /// of its TAP at `ifindex`.
    pub fn from_state(
        net: &HostNetwork,
        vpc: &VpcOnHost,
        l: &LocalInterface,
        ifindex: u32,
    ) -> Result<(Link, Self), BadInterface> {
        let bad = |field, value: &str| BadInterface {
            instance_id: l.instance_id.clone(),
            field,
            value: value.to_string(),
        };
        let ip = |field, v: &str| v.parse::<Ipv4Addr>().map_err(|_| bad(field, v));
        let mac = desired::parse_mac(&l.mac)
            .filter(|m| m[0] & 1 == 0)
            .ok_or_else(|| bad("mac", &l.mac))?;
        let (_, prefix) = desired::parse_cidr(&l.subnet_cidr)
            .ok_or_else(|| bad("subnet_cidr", &l.subnet_cidr))?;
        let link = Link {
            ifindex,
            router_mac: desired::router_mac(vpc.vni),
            router_ip: ip("router_ip", &l.router_ip)?,
            prefix,
        };
        let names: HashMap<&str, &str> = net
            .groups
            .iter()
            .filter_map(|g| g.group.as_ref())
            .map(|g| (g.group_id.as_str(), g.group_name.as_str()))
            .collect();
        let security_groups = l
            .security_group_ids
            .iter()
            .filter_map(|id| Some((id.clone(), names.get(id.as_str())?.to_string())))
            .collect();
        let data = InterfaceData {
            instance_id: l.instance_id.clone(),
            mac: desired::fmt_mac(&mac),
            private_ip: ip("private_ip", &l.private_ip)?,
            hostname: l.hostname.clone(),
            availability_zone: l.availability_zone.clone(),
            instance_type: l.instance_type.clone(),
            region: l.region.clone(),
            image_id: l.image_id.clone(),
            public_key: l.public_key.clone(),
            key_name: l.key_name.clone(),
            user_data: l.user_data.clone(),
            security_groups,
            subnet_id: l.subnet_id.clone(),
            subnet_cidr: l.subnet_cidr.clone(),
            vpc_id: vpc.vpc_id.clone(),
            vpc_cidr: vpc.cidr_block.clone(),
        };
        Ok((link, data))
    }
}

/// The TAPs of `net` to serve: local interfaces whose TAP has an index
/// (`index_of`), and those left out. A TAP named by two interfaces is
/// served for neither: which guest is behind it is unknown.
pub fn wanted(
    net: &HostNetwork,
    mut index_of: impl FnMut(&str) -> Option<u32>,
) -> (Vec<Wanted>, Vec<BadInterface>) {
    let mut seen = HashMap::<&str, usize>::new();
    for (_, l) in desired::local_interfaces(net) {
        *seen.entry(l.tap.as_str()).or_default() += 1;
    }
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (vpc, l) in desired::local_interfaces(net) {
        if l.tap.is_empty() {
            continue;
        }
        if seen[l.tap.as_str()] > 1 || desired::is_ours(&l.tap) {
            bad.push(BadInterface {
                instance_id: l.instance_id.clone(),
                field: "tap",
                value: l.tap.clone(),
            });
            continue;
        }
        let Some(ifindex) = index_of(&l.tap) else {
            continue;
        };
        match InterfaceData::from_state(net, vpc, l, ifindex) {
            Ok((link, data)) => out.push(Wanted {
                tap: l.tap.clone(),
                vpc_id: vpc.vpc_id.clone(),
                link,
                data,
            }),
            Err(e) => bad.push(e),
        }
    }
    (out, bad)
}

/// The ifindex of `name` in this network namespace.
pub fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a NUL-terminated string alive for the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

struct Running {
    link: Link,
    instance_id: String,
    data: watch::Sender<Arc<InterfaceData>>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The metadata servers, one per TAP. Needs a tokio runtime.
#[derive(Default)]
pub struct Metadata {
    settings: Settings,
    running: HashMap<String, Running>,
    /// What was left out last time (logged when it first appears).
    reported: HashSet<BadInterface>,
}

impl Metadata {
    /// Servers behaving as `settings` says.
    pub fn new(settings: Settings) -> Self {
        Metadata {
            settings,
            ..Default::default()
        }
    }

    /// Serve exactly the local interfaces of `net` whose TAP exists here.
    pub fn sync(&mut self, net: &HostNetwork) {
        self.sync_with(net, if_index);
    }

    /// [`Metadata::sync`] with TAP indexes from `index_of` (e.g. what
    /// netlink observed). A new TAP gets a server; a gone one loses it; a
    /// TAP whose stack changed (ifindex, router, subnet) or whose instance
    /// changed gets a new one; the others get their new data in place,
    /// their tokens kept.
    pub fn sync_with(&mut self, net: &HostNetwork, index_of: impl FnMut(&str) -> Option<u32>) {
        let (wanted, bad) = wanted(net, index_of);
        let bad: HashSet<BadInterface> = bad.into_iter().collect();
        for b in bad.difference(&self.reported) {
            tracing::warn!("no metadata service: {b}");
        }
        self.reported = bad;
        let keep: HashMap<&str, &Wanted> = wanted.iter().map(|w| (w.tap.as_str(), w)).collect();
        self.running.retain(|tap, r| {
            keep.get(tap.as_str()).is_some_and(|w| {
                w.link == r.link && w.data.instance_id == r.instance_id && !r.task.is_finished()
            })
        });
        for w in &wanted {
            match self.running.get(&w.tap) {
                Some(r) => {
                    r.data.send_if_modified(|d| {
                        let changed = **d != w.data;
                        if changed {
                            *d = Arc::new(w.data.clone());
                        }
                        changed
                    });
                }
                None => {
                    let r = self.start(w);
                    self.running.insert(w.tap.clone(), r);
                }
            }
        }
    }

    fn start(&self, w: &Wanted) -> Running {
        let (tx, rx) = watch::channel(Arc::new(w.data.clone()));
        let span = tracing::info_span!("metadata", vpc_id = %w.vpc_id,
            instance_id = %w.data.instance_id, tap = %w.tap);
        let link = w.link;
        let settings = self.settings;
        let task = tokio::spawn(
            async move {
                if let Err(e) = server::serve(link, rx, settings).await {
                    // The task ends; the next sync starts another.
                    tracing::warn!("metadata service stopped: {}", crate::chain(&e));
                }
            }
            .instrument(span),
        );
        Running {
            link: w.link,
            instance_id: w.data.instance_id.clone(),
            data: tx,
            task,
        }
    }

    /// The TAPs served.
    pub fn taps(&self) -> impl Iterator<Item = &str> {
        self.running.keys().map(String::as_str)
    }

    /// How many TAPs are served.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

#[cfg(test)]
mod tests;
