//! The sans-IO core of convergence: what exists ([`Observed`]) and what
//! should ([`Desired`]) in, the netlink operations that close the gap
//! ([`Op`]) out. [`plan`] is level-triggered and minimal: a dataplane
//! that matches gives no operation, so a restarted netd changes nothing
//! that works (no flush-and-recreate).
//!
//! Only netd's own devices (`fbr*`, `fvx*`, see [`crate::desired`]) are
//! created, changed or deleted. TAPs are the agent's: they are attached to
//! their VPC's bridge, set up, or detached from a netd bridge, never
//! deleted or reconfigured otherwise.
//!
//! A VPC's VXLAN port does not learn: each remote interface is a static
//! bridge entry on it beside the VXLAN device's own entry, so nothing of a
//! removed interface outlives it (a learned entry would, for the ageing
//! time). Bridge entries are only read and changed on netd's VXLAN ports;
//! what the bridge learns on TAPs is its own business.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::desired::{is_ours, vxlan_port, Desired, Mac, Underlay, Vpc};

/// A VXLAN device's settings that netd cares about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VxlanAttrs {
    /// VNI.
    pub vni: u32,
    /// Source address.
    pub local: Option<Ipv4Addr>,
    /// Underlay device name, when pinned (and found).
    pub dev: Option<String>,
    /// UDP destination port.
    pub port: u16,
    /// Source-MAC learning (netd wants it off).
    pub learning: bool,
    /// ARP proxy from the neighbour table (netd wants it on).
    pub proxy: bool,
    /// A default remote or group (netd wants none: nothing floods).
    pub remote: Option<Ipv4Addr>,
}

/// A bridge's settings that netd cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgeAttrs {
    /// `nf_call_iptables`: bridged IPv4 goes through the IPv4 hooks
    /// (`br_netfilter`), which the security groups' conntrack needs
    /// (netd wants it on). `None` when the kernel does not report it (no
    /// `br_netfilter` support): nothing to repair then.
    pub nf_call_iptables: Option<bool>,
}

/// How a link behaves as a bridge port (`IFLA_BRPORT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortAttrs {
    /// Source-MAC learning.
    pub learning: bool,
    /// Unknown unicast is flooded to the port.
    pub flood: bool,
}

impl PortAttrs {
    /// What a link gets when it joins a bridge.
    pub const KERNEL_DEFAULT: PortAttrs = PortAttrs {
        learning: true,
        flood: true,
    };
    /// What netd wants on its VXLAN ports: no learning (remote MACs are
    /// static entries, gone as soon as the interface is), unicast flooding
    /// on (the VXLAN device's own FDB routes or drops what the bridge does
    /// not know).
    pub const VXLAN: PortAttrs = PortAttrs {
        learning: false,
        flood: true,
    };
}

/// A bridge FDB entry (`NDA_MASTER`) of a port, other than the port's own
/// address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BridgeEntry {
    /// `static` (`NUD_NOARP`): stays until deleted; what netd adds.
    Static,
    /// Learned (or added `dynamic`): ages out.
    Dynamic,
}

/// The kind of a link, as far as netd cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// A Linux bridge.
    Bridge(BridgeAttrs),
    /// A VXLAN device.
    Vxlan(VxlanAttrs),
    /// Anything else (a TAP, a veth, the underlay NIC...).
    Other,
}

/// One link of the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// What it is.
    pub kind: LinkKind,
    /// The name of its master (bridge), if enslaved.
    pub master: Option<String>,
    /// Its bridge port settings, when enslaved to a bridge.
    pub port: Option<PortAttrs>,
    /// Administratively up.
    pub up: bool,
    /// MTU.
    pub mtu: u32,
}

/// What the kernel has, read at the start of every convergence.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// Every link, by name.
    pub links: BTreeMap<String, Link>,
    /// The `NTF_SELF` FDB entries (MAC, remote) of netd's VXLAN devices,
    /// by device name.
    pub fdb: BTreeMap<String, BTreeSet<(Mac, Ipv4Addr)>>,
    /// The bridge FDB entries (`NDA_MASTER`, `NTF_SELF` unset) of netd's
    /// VXLAN devices as bridge ports, by device name: MAC → kind. The
    /// port's own address (`permanent`) is left out.
    pub bridge_fdb: BTreeMap<String, BTreeMap<Mac, BridgeEntry>>,
    /// The neighbour entries (IP → MAC, any state) of netd's VXLAN
    /// devices, by device name.
    pub neigh: BTreeMap<String, BTreeMap<Ipv4Addr, Mac>>,
}

/// One change to the dataplane. Links are named; the executor resolves
/// names to indexes when it runs each operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Create a bridge, up, with this MTU and `nf_call_iptables` on.
    CreateBridge {
        /// Its name.
        name: String,
        /// Its MTU.
        mtu: u32,
    },
    /// Create a VXLAN device enslaved to `bridge`, up.
    CreateVxlan {
        /// Its name.
        name: String,
        /// The bridge it joins.
        bridge: String,
        /// VNI.
        vni: u32,
        /// Underlay source, device and inner MTU.
        underlay: Underlay,
    },
    /// Set a link's master, up flag and (for netd's own devices) MTU.
    SetLink {
        /// The link.
        name: String,
        /// The bridge it must be in.
        master: Option<String>,
        /// New MTU, when it differs.
        mtu: Option<u32>,
    },
    /// Turn a netd bridge's `nf_call_iptables` on.
    SetNfCallIptables {
        /// The bridge.
        name: String,
    },
    /// Set a bridge port's learning and unicast flooding.
    SetPort {
        /// The port.
        name: String,
        /// Source-MAC learning.
        learning: bool,
        /// Unknown unicast flooding.
        flood: bool,
    },
    /// Take a link out of a netd bridge (TAPs of interfaces gone).
    Detach {
        /// The link.
        name: String,
    },
    /// Delete one of netd's own links.
    DeleteLink {
        /// The link.
        name: String,
    },
    /// Add or replace the FDB entry of `mac` on `vxlan`: sent to `dst`.
    SetFdb {
        /// The VXLAN device.
        vxlan: String,
        /// The remote interface's MAC.
        mac: Mac,
        /// Its host's underlay address.
        dst: Ipv4Addr,
    },
    /// Delete one FDB entry.
    DelFdb {
        /// The VXLAN device.
        vxlan: String,
        /// The MAC.
        mac: Mac,
        /// The remote of the entry.
        dst: Ipv4Addr,
    },
    /// Add or replace the bridge's static entry of `mac` on port `vxlan`
    /// (`bridge fdb replace MAC dev VXLAN master static`).
    SetBridgeFdb {
        /// The VXLAN device.
        vxlan: String,
        /// The remote interface's MAC.
        mac: Mac,
    },
    /// Delete the bridge's entry of `mac` on port `vxlan` (static or
    /// learned).
    DelBridgeFdb {
        /// The VXLAN device.
        vxlan: String,
        /// The MAC.
        mac: Mac,
    },
    /// Add or replace a permanent neighbour entry `ip` → `mac`.
    SetNeigh {
        /// The VXLAN device.
        vxlan: String,
        /// The remote interface's address.
        ip: Ipv4Addr,
        /// Its MAC.
        mac: Mac,
    },
    /// Delete a neighbour entry.
    DelNeigh {
        /// The VXLAN device.
        vxlan: String,
        /// Its address.
        ip: Ipv4Addr,
    },
}

impl Op {
    /// The link the operation is on.
    pub fn device(&self) -> &str {
        match self {
            Op::CreateBridge { name, .. }
            | Op::CreateVxlan { name, .. }
            | Op::SetLink { name, .. }
            | Op::SetNfCallIptables { name }
            | Op::SetPort { name, .. }
            | Op::Detach { name }
            | Op::DeleteLink { name } => name,
            Op::SetFdb { vxlan, .. }
            | Op::DelFdb { vxlan, .. }
            | Op::SetBridgeFdb { vxlan, .. }
            | Op::DelBridgeFdb { vxlan, .. }
            | Op::SetNeigh { vxlan, .. }
            | Op::DelNeigh { vxlan, .. } => vxlan,
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use crate::desired::fmt_mac;
        match self {
            Op::CreateBridge { name, mtu } => write!(f, "create bridge {name} mtu {mtu}"),
            Op::CreateVxlan {
                name,
                bridge,
                vni,
                underlay,
            } => write!(
                f,
                "create vxlan {name} id {vni} local {} in {bridge}",
                underlay.local_ip
            ),
            Op::SetLink { name, master, mtu } => {
                write!(f, "set {name} up")?;
                match master {
                    Some(m) => write!(f, " master {m}")?,
                    None => write!(f, " nomaster")?,
                }
                match mtu {
                    Some(m) => write!(f, " mtu {m}"),
                    None => Ok(()),
                }
            }
            Op::SetNfCallIptables { name } => {
                write!(f, "set {name} type bridge nf_call_iptables 1")
            }
            Op::SetPort {
                name,
                learning,
                flood,
            } => {
                let on = |b: &bool| if *b { "on" } else { "off" };
                write!(
                    f,
                    "set {name} type bridge_slave learning {} flood {}",
                    on(learning),
                    on(flood)
                )
            }
            Op::Detach { name } => write!(f, "detach {name}"),
            Op::DeleteLink { name } => write!(f, "delete {name}"),
            Op::SetFdb { vxlan, mac, dst } => {
                write!(f, "fdb replace {} dev {vxlan} dst {dst}", fmt_mac(mac))
            }
            Op::DelFdb { vxlan, mac, dst } => {
                write!(f, "fdb del {} dev {vxlan} dst {dst}", fmt_mac(mac))
            }
            Op::SetBridgeFdb { vxlan, mac } => {
                write!(f, "fdb replace {} dev {vxlan} master static", fmt_mac(mac))
            }
            Op::DelBridgeFdb { vxlan, mac } => {
                write!(f, "fdb del {} dev {vxlan} master", fmt_mac(mac))
            }
            Op::SetNeigh { vxlan, ip, mac } => {
                write!(f, "neigh replace {ip} lladdr {} dev {vxlan}", fmt_mac(mac))
            }
            Op::DelNeigh { vxlan, ip } => write!(f, "neigh del {ip} dev {vxlan}"),
        }
    }
}

/// The VXLAN settings netd builds for `vni` on `u`.
pub fn wanted_vxlan(vni: u32, u: &Underlay) -> VxlanAttrs {
    VxlanAttrs {
        vni,
        local: Some(u.local_ip),
        dev: u.dev.clone(),
        port: vxlan_port(),
        learning: false,
        proxy: true,
        remote: None,
    }
}

/// The operations that turn `observed` into `desired`, in an order that
/// works: links first (bridges before their VXLAN devices and ports),
/// then entries, then what is to go.
pub fn plan(desired: &Desired, observed: &Observed) -> Vec<Op> {
    let mut ops = Vec::new();
    for vpc in desired.vpcs.values() {
        plan_vpc(vpc, &desired.underlay, observed, &mut ops);
    }
    plan_removals(desired, observed, &mut ops);
    ops
}

fn plan_vpc(vpc: &Vpc, u: &Underlay, observed: &Observed, ops: &mut Vec<Op>) {
    let br = vpc.bridge();
    plan_bridge(&br, u, observed, ops);
    let fresh = plan_vxlan(vpc, u, observed, ops);
    for tap in &vpc.taps {
        match observed.links.get(tap) {
            Some(l) if l.master.as_ref() != Some(&br) || !l.up => ops.push(Op::SetLink {
                name: tap.clone(),
                master: Some(br.clone()),
                mtu: None,
            }),
            _ => {}
        }
    }
    plan_entries(vpc, fresh, observed, ops);
}

fn plan_bridge(br: &str, u: &Underlay, observed: &Observed, ops: &mut Vec<Op>) {
    let Some(l) = observed.links.get(br) else {
        ops.push(Op::CreateBridge {
            name: br.to_string(),
            mtu: u.mtu,
        });
        return;
    };
    let LinkKind::Bridge(attrs) = l.kind else {
        ops.push(Op::DeleteLink {
            name: br.to_string(),
        });
        ops.push(Op::CreateBridge {
            name: br.to_string(),
            mtu: u.mtu,
        });
        return;
    };
    let mtu = (l.mtu != u.mtu).then_some(u.mtu);
    if mtu.is_some() || !l.up || l.master.is_some() {
        ops.push(Op::SetLink {
            name: br.to_string(),
            master: None,
            mtu,
        });
    }
    if attrs.nf_call_iptables == Some(false) {
        ops.push(Op::SetNfCallIptables {
            name: br.to_string(),
        });
    }
}

/// What a VXLAN device lacks after this round's link operations.
#[derive(Clone, Copy, Debug, Default)]
struct Fresh {
    /// (Re)created: it has no entries at all.
    device: bool,
    /// (Re)joins its bridge: the bridge has no entries on it.
    port: bool,
}

/// `vpc`'s VXLAN device, a port of its bridge with [`PortAttrs::VXLAN`].
fn plan_vxlan(vpc: &Vpc, u: &Underlay, observed: &Observed, ops: &mut Vec<Op>) -> Fresh {
    let (br, vx) = (vpc.bridge(), vpc.vxlan());
    let fresh = match observed.links.get(&vx) {
        Some(l) if l.kind == LinkKind::Vxlan(wanted_vxlan(vpc.vni, u)) => {
            let mtu = (l.mtu != u.mtu).then_some(u.mtu);
            let joins = l.master.as_ref() != Some(&br);
            if mtu.is_some() || !l.up || joins {
                ops.push(Op::SetLink {
                    name: vx.clone(),
                    master: Some(br.clone()),
                    mtu,
                });
            }
            if !joins && l.port == Some(PortAttrs::VXLAN) {
                return Fresh::default();
            }
            Fresh {
                device: false,
                port: joins,
            }
        }
        other => {
            if other.is_some() {
                ops.push(Op::DeleteLink { name: vx.clone() });
            }
            ops.push(Op::CreateVxlan {
                name: vx.clone(),
                bridge: br,
                vni: vpc.vni,
                underlay: u.clone(),
            });
            Fresh {
                device: true,
                port: true,
            }
        }
    };
    // A new port starts with the kernel's defaults (learning on).
    let PortAttrs { learning, flood } = PortAttrs::VXLAN;
    ops.push(Op::SetPort {
        name: vx,
        learning,
        flood,
    });
    fresh
}

/// The FDB (the VXLAN device's and its bridge's) and neighbour entries
/// of the remote interfaces: what is missing or wrong, then what is stale.
fn plan_entries(vpc: &Vpc, fresh: Fresh, observed: &Observed, ops: &mut Vec<Op>) {
    let vx = vpc.vxlan();
    let (empty_fdb, empty_bridge, empty_neigh) =
        (BTreeSet::new(), BTreeMap::new(), BTreeMap::new());
    let (fdb, neigh) = if fresh.device {
        (&empty_fdb, &empty_neigh)
    } else {
        (
            observed.fdb.get(&vx).unwrap_or(&empty_fdb),
            observed.neigh.get(&vx).unwrap_or(&empty_neigh),
        )
    };
    let bridge = match fresh.port {
        true => &empty_bridge,
        false => observed.bridge_fdb.get(&vx).unwrap_or(&empty_bridge),
    };
    for (mac, (ip, dst)) in &vpc.remotes {
        let has = fdb.iter().filter(|(m, _)| m == mac).map(|(_, d)| *d);
        if has.collect::<Vec<_>>() != [*dst] {
            // A replace also drops the entry to the old host.
            ops.push(Op::SetFdb {
                vxlan: vx.clone(),
                mac: *mac,
                dst: *dst,
            });
        }
        if bridge.get(mac) != Some(&BridgeEntry::Static) {
            ops.push(Op::SetBridgeFdb {
                vxlan: vx.clone(),
                mac: *mac,
            });
        }
        if neigh.get(ip) != Some(mac) {
            ops.push(Op::SetNeigh {
                vxlan: vx.clone(),
                ip: *ip,
                mac: *mac,
            });
        }
    }
    for (mac, dst) in fdb {
        if !vpc.remotes.contains_key(mac) {
            ops.push(Op::DelFdb {
                vxlan: vx.clone(),
                mac: *mac,
                dst: *dst,
            });
        }
    }
    for mac in bridge.keys() {
        if !vpc.remotes.contains_key(mac) {
            ops.push(Op::DelBridgeFdb {
                vxlan: vx.clone(),
                mac: *mac,
            });
        }
    }
    let wanted_ips: BTreeSet<Ipv4Addr> = vpc.remotes.values().map(|(ip, _)| *ip).collect();
    for ip in neigh.keys() {
        if !wanted_ips.contains(ip) {
            ops.push(Op::DelNeigh {
                vxlan: vx.clone(),
                ip: *ip,
            });
        }
    }
}

fn plan_removals(desired: &Desired, observed: &Observed, ops: &mut Vec<Op>) {
    // Links that belong in some netd bridge (each VPC's VXLAN and TAPs).
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    for v in desired.vpcs.values() {
        wanted.insert(v.vxlan());
        wanted.extend(v.taps.iter().cloned());
    }
    let kept_bridges: BTreeSet<String> = desired.vpcs.values().map(Vpc::bridge).collect();
    for (name, l) in &observed.links {
        let ours = is_ours(name);
        let wanted_here = desired
            .vpcs
            .values()
            .any(|v| v.bridge() == *name || v.vxlan() == *name);
        if ours && !wanted_here {
            ops.push(Op::DeleteLink { name: name.clone() });
            continue;
        }
        // A port of a kept netd bridge that should not be there: a TAP of
        // an interface that left this VPC (or something added by hand).
        let in_kept = l.master.as_ref().is_some_and(|m| kept_bridges.contains(m));
        if in_kept && !wanted.contains(name) {
            ops.push(Op::Detach { name: name.clone() });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{bridge_name, vxlan_name};

    fn underlay() -> Underlay {
        Underlay {
            local_ip: Ipv4Addr::new(10, 99, 0, 1),
            dev: None,
            mtu: 1450,
        }
    }

    const A2: Mac = [2, 0, 0, 0, 0, 0xa2];
    const B2: Mac = [2, 0, 0, 0, 0, 0xb2];

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }
    fn host(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, 0, last)
    }

    /// (VNI, TAPs, remotes as (MAC, last byte of IP, last byte of host)).
    type VpcSpec<'a> = (u32, Vec<&'a str>, Vec<(Mac, u8, u8)>);

    fn desired(vpcs: Vec<VpcSpec<'_>>) -> Desired {
        Desired {
            underlay: underlay(),
            vpcs: vpcs
                .into_iter()
                .map(|(vni, taps, remotes)| {
                    let vpc = Vpc {
                        vpc_id: format!("vpc-{vni}"),
                        vni,
                        taps: taps.into_iter().map(String::from).collect(),
                        remotes: remotes
                            .into_iter()
                            .map(|(m, i, h)| (m, (ip(i), host(h))))
                            .collect(),
                    };
                    (vni, vpc)
                })
                .collect(),
        }
    }

    fn tap(master: Option<&str>, up: bool) -> Link {
        Link {
            kind: LinkKind::Other,
            master: master.map(String::from),
            port: master.map(|_| PortAttrs::KERNEL_DEFAULT),
            up,
            mtu: 1500,
        }
    }

    fn with_taps(names: &[&str]) -> Observed {
        let mut o = Observed::default();
        for n in names {
            o.links.insert(n.to_string(), tap(None, false));
        }
        o
    }

    /// What the kernel would have after `ops` (the executor's effect).
    fn apply(mut o: Observed, ops: &[Op]) -> Observed {
        for op in ops {
            match op {
                Op::CreateBridge { name, mtu } => {
                    let attrs = BridgeAttrs {
                        nf_call_iptables: Some(true),
                    };
                    o.links.insert(
                        name.clone(),
                        Link {
                            kind: LinkKind::Bridge(attrs),
                            master: None,
                            port: None,
                            up: true,
                            mtu: *mtu,
                        },
                    );
                }
                Op::CreateVxlan {
                    name,
                    bridge,
                    vni,
                    underlay,
                } => {
                    let l = Link {
                        kind: LinkKind::Vxlan(wanted_vxlan(*vni, underlay)),
                        master: Some(bridge.clone()),
                        port: Some(PortAttrs::KERNEL_DEFAULT),
                        up: true,
                        mtu: underlay.mtu,
                    };
                    o.links.insert(name.clone(), l);
                }
                Op::SetLink { name, master, mtu } => {
                    let l = o.links.get_mut(name).expect("link exists");
                    l.up = true;
                    if l.master != *master {
                        // A port that joins a bridge anew: defaults, no entries.
                        l.port = master.as_ref().map(|_| PortAttrs::KERNEL_DEFAULT);
                        o.bridge_fdb.remove(name);
                    }
                    l.master = master.clone();
                    if let Some(m) = mtu {
                        l.mtu = *m;
                    }
                }
                Op::SetNfCallIptables { name } => {
                    let l = o.links.get_mut(name).unwrap();
                    l.kind = LinkKind::Bridge(BridgeAttrs {
                        nf_call_iptables: Some(true),
                    });
                }
                Op::SetPort {
                    name,
                    learning,
                    flood,
                } => {
                    let l = o.links.get_mut(name).unwrap();
                    assert!(l.master.is_some(), "{name} is no bridge port");
                    l.port = Some(PortAttrs {
                        learning: *learning,
                        flood: *flood,
                    });
                }
                Op::Detach { name } => {
                    let l = o.links.get_mut(name).unwrap();
                    (l.master, l.port) = (None, None);
                    o.bridge_fdb.remove(name);
                }
                Op::DeleteLink { name } => {
                    o.links.remove(name);
                    o.fdb.remove(name);
                    o.neigh.remove(name);
                    o.bridge_fdb.remove(name);
                    for (port, l) in o.links.iter_mut() {
                        if l.master.as_ref() == Some(name) {
                            (l.master, l.port) = (None, None);
                            o.bridge_fdb.remove(port);
                        }
                    }
                }
                Op::SetFdb { vxlan, mac, dst } => {
                    let e = o.fdb.entry(vxlan.clone()).or_default();
                    e.retain(|(m, _)| m != mac);
                    e.insert((*mac, *dst));
                }
                Op::DelFdb { vxlan, mac, dst } => {
                    o.fdb.get_mut(vxlan).unwrap().remove(&(*mac, *dst));
                }
                Op::SetBridgeFdb { vxlan, mac } => {
                    assert!(o.links[vxlan].master.is_some(), "{vxlan} is no bridge port");
                    let e = o.bridge_fdb.entry(vxlan.clone()).or_default();
                    e.insert(*mac, BridgeEntry::Static);
                }
                Op::DelBridgeFdb { vxlan, mac } => {
                    o.bridge_fdb.get_mut(vxlan).unwrap().remove(mac);
                }
                Op::SetNeigh { vxlan, ip, mac } => {
                    o.neigh.entry(vxlan.clone()).or_default().insert(*ip, *mac);
                }
                Op::DelNeigh { vxlan, ip } => {
                    o.neigh.get_mut(vxlan).unwrap().remove(ip);
                }
            }
        }
        o
    }

    fn converged(d: &Desired, o: Observed) -> Observed {
        let ops = plan(d, &o);
        let after = apply(o, &ops);
        assert_eq!(plan(d, &after), [], "not idempotent after {ops:?}");
        after
    }

    #[test]
    fn missing_devices_and_entries_are_created_in_order() {
        let d = desired(vec![(1, vec!["fct1"], vec![(A2, 5, 2)])]);
        let ops = plan(&d, &with_taps(&["fct1", "eth0"]));
        assert_eq!(
            ops,
            [
                Op::CreateBridge {
                    name: "fbr1".into(),
                    mtu: 1450
                },
                Op::CreateVxlan {
                    name: "fvx1".into(),
                    bridge: "fbr1".into(),
                    vni: 1,
                    underlay: underlay()
                },
                Op::SetPort {
                    name: "fvx1".into(),
                    learning: false,
                    flood: true
                },
                Op::SetLink {
                    name: "fct1".into(),
                    master: Some("fbr1".into()),
                    mtu: None
                },
                Op::SetFdb {
                    vxlan: "fvx1".into(),
                    mac: A2,
                    dst: host(2)
                },
                Op::SetBridgeFdb {
                    vxlan: "fvx1".into(),
                    mac: A2
                },
                Op::SetNeigh {
                    vxlan: "fvx1".into(),
                    ip: ip(5),
                    mac: A2
                },
            ]
        );
        let after = converged(&d, with_taps(&["fct1", "eth0"]));
        assert_eq!(after.links["eth0"], tap(None, false), "not ours: untouched");
    }

    #[test]
    fn a_tap_not_there_yet_is_skipped_then_attached() {
        let d = desired(vec![(1, vec!["fct1"], vec![])]);
        let o = converged(&d, Observed::default());
        assert!(!o.links.contains_key("fct1"));
        let mut o = o;
        o.links.insert("fct1".into(), tap(None, false));
        let o = converged(&d, o);
        assert_eq!(o.links["fct1"], tap(Some("fbr1"), true));
    }

    #[test]
    fn extras_are_removed_and_foreign_links_kept() {
        let d = desired(vec![(1, vec!["fct1"], vec![(A2, 5, 2)])]);
        let mut o = converged(&d, with_taps(&["fct1", "fct9", "other"]));
        // A VPC that left, a stale entry, a hand-added port.
        o = apply(
            o,
            &[
                Op::CreateBridge {
                    name: bridge_name(2),
                    mtu: 1450,
                },
                Op::CreateVxlan {
                    name: vxlan_name(2),
                    bridge: bridge_name(2),
                    vni: 2,
                    underlay: underlay(),
                },
                Op::SetFdb {
                    vxlan: "fvx1".into(),
                    mac: B2,
                    dst: host(3),
                },
                Op::SetNeigh {
                    vxlan: "fvx1".into(),
                    ip: ip(9),
                    mac: B2,
                },
                Op::SetLink {
                    name: "fct9".into(),
                    master: Some("fbr1".into()),
                    mtu: None,
                },
            ],
        );
        let ops = plan(&d, &o);
        assert_eq!(
            ops,
            [
                Op::DelFdb {
                    vxlan: "fvx1".into(),
                    mac: B2,
                    dst: host(3)
                },
                Op::DelNeigh {
                    vxlan: "fvx1".into(),
                    ip: ip(9)
                },
                Op::DeleteLink {
                    name: "fbr2".into()
                },
                Op::Detach {
                    name: "fct9".into()
                },
                Op::DeleteLink {
                    name: "fvx2".into()
                },
            ]
        );
        let after = converged(&d, o);
        assert!(after.links.contains_key("other"));
        assert_eq!(after.links["fct9"].master, None, "detached, not deleted");
    }

    #[test]
    fn a_remote_that_moved_host_gets_its_fdb_entry_replaced() {
        let d1 = desired(vec![(1, vec!["fct1"], vec![(A2, 5, 2)])]);
        let o = converged(&d1, with_taps(&["fct1"]));
        let d2 = desired(vec![(1, vec!["fct1"], vec![(A2, 5, 3)])]);
        assert_eq!(
            plan(&d2, &o),
            [Op::SetFdb {
                vxlan: "fvx1".into(),
                mac: A2,
                dst: host(3)
            }]
        );
        let o = converged(&d2, o);
        assert_eq!(o.fdb["fvx1"], BTreeSet::from([(A2, host(3))]));
    }

    #[test]
    fn a_tap_moves_between_vpcs() {
        let d1 = desired(vec![(1, vec!["fct1"], vec![]), (2, vec!["fct2"], vec![])]);
        let o = converged(&d1, with_taps(&["fct1", "fct2"]));
        let d2 = desired(vec![(1, vec![], vec![]), (2, vec!["fct2", "fct1"], vec![])]);
        let ops = plan(&d2, &o);
        assert_eq!(
            ops,
            [Op::SetLink {
                name: "fct1".into(),
                master: Some("fbr2".into()),
                mtu: None
            }]
        );
        converged(&d2, o);
    }

    #[test]
    fn drifted_devices_are_repaired_without_recreating() {
        let d = desired(vec![(1, vec!["fct1"], vec![])]);
        let mut o = converged(&d, with_taps(&["fct1"]));
        o.links.get_mut("fbr1").unwrap().mtu = 1500;
        o.links.get_mut("fvx1").unwrap().up = false;
        o.links.get_mut("fct1").unwrap().master = None;
        let ops = plan(&d, &o);
        assert!(
            ops.iter().all(|op| matches!(op, Op::SetLink { .. })),
            "{ops:?}"
        );
        assert_eq!(ops.len(), 3);
        converged(&d, o);
    }

    #[test]
    fn a_vxlan_with_wrong_settings_or_a_non_bridge_is_recreated() {
        let d = desired(vec![(1, vec![], vec![(A2, 5, 2)])]);
        let mut o = converged(&d, Observed::default());
        if let LinkKind::Vxlan(a) = &mut o.links.get_mut("fvx1").unwrap().kind {
            a.learning = true;
        }
        o.links.get_mut("fbr1").unwrap().kind = LinkKind::Other;
        let ops = plan(&d, &o);
        assert_eq!(
            ops[0],
            Op::DeleteLink {
                name: "fbr1".into()
            }
        );
        assert_eq!(
            ops[2],
            Op::DeleteLink {
                name: "fvx1".into()
            }
        );
        assert!(ops.contains(&Op::SetFdb {
            vxlan: "fvx1".into(),
            mac: A2,
            dst: host(2)
        }));
        converged(&d, o);
    }

    #[test]
    fn remotes_are_static_bridge_entries_and_stale_ones_go() {
        let d = desired(vec![(1, vec!["fct1"], vec![(A2, 5, 2)])]);
        let mut o = converged(&d, with_taps(&["fct1"]));
        assert_eq!(o.links["fvx1"].port, Some(PortAttrs::VXLAN));
        assert_eq!(
            o.bridge_fdb["fvx1"],
            BTreeMap::from([(A2, BridgeEntry::Static)])
        );
        // Learned before learning was off: A2 (to be made static) and
        // B2 (no remote); a guest's MAC learned on its TAP.
        let fvx1 = o.bridge_fdb.get_mut("fvx1").unwrap();
        fvx1.insert(A2, BridgeEntry::Dynamic);
        fvx1.insert(B2, BridgeEntry::Dynamic);
        o.bridge_fdb.insert(
            "fct1".into(),
            BTreeMap::from([([2, 0, 0, 0, 0, 1], BridgeEntry::Dynamic)]),
        );
        assert_eq!(
            plan(&d, &o),
            [
                Op::SetBridgeFdb {
                    vxlan: "fvx1".into(),
                    mac: A2
                },
                Op::DelBridgeFdb {
                    vxlan: "fvx1".into(),
                    mac: B2
                },
            ]
        );
        let o = converged(&d, o);
        // The remote leaves: its three entries go, the TAP's stays.
        let gone = desired(vec![(1, vec!["fct1"], vec![])]);
        assert_eq!(
            plan(&gone, &o),
            [
                Op::DelFdb {
                    vxlan: "fvx1".into(),
                    mac: A2,
                    dst: host(2)
                },
                Op::DelBridgeFdb {
                    vxlan: "fvx1".into(),
                    mac: A2
                },
                Op::DelNeigh {
                    vxlan: "fvx1".into(),
                    ip: ip(5)
                },
            ]
        );
        let o = converged(&gone, o);
        assert!(o.bridge_fdb["fvx1"].is_empty());
        assert_eq!(
            o.bridge_fdb["fct1"].len(),
            1,
            "a TAP's entries are not netd's"
        );
    }

    #[test]
    fn the_vxlan_port_never_learns() {
        let d = desired(vec![(1, vec![], vec![(A2, 5, 2)])]);
        let mut o = converged(&d, Observed::default());
        // Learning turned on by hand.
        o.links.get_mut("fvx1").unwrap().port = Some(PortAttrs::KERNEL_DEFAULT);
        let set_port = Op::SetPort {
            name: "fvx1".into(),
            learning: false,
            flood: true,
        };
        assert_eq!(plan(&d, &o), std::slice::from_ref(&set_port));
        let mut o = converged(&d, o);
        // Out of its bridge: it rejoins, with its settings and bridge
        // entries again (its own entries stayed).
        o.links.get_mut("fvx1").unwrap().master = None;
        o.links.get_mut("fvx1").unwrap().port = None;
        o.bridge_fdb.remove("fvx1");
        assert_eq!(
            plan(&d, &o),
            [
                Op::SetLink {
                    name: "fvx1".into(),
                    master: Some("fbr1".into()),
                    mtu: None
                },
                set_port,
                Op::SetBridgeFdb {
                    vxlan: "fvx1".into(),
                    mac: A2
                },
            ]
        );
        converged(&d, o);
    }

    #[test]
    fn nf_call_iptables_off_is_turned_on_again() {
        let d = desired(vec![(1, vec![], vec![])]);
        let mut o = converged(&d, Observed::default());
        let set = |o: &mut Observed, v| {
            o.links.get_mut("fbr1").unwrap().kind = LinkKind::Bridge(BridgeAttrs {
                nf_call_iptables: v,
            })
        };
        set(&mut o, Some(false));
        assert_eq!(
            plan(&d, &o),
            [Op::SetNfCallIptables {
                name: "fbr1".into()
            }]
        );
        let mut o = converged(&d, o);
        // A kernel that does not report it (no br_netfilter): nothing to do.
        set(&mut o, None);
        assert_eq!(plan(&d, &o), []);
    }

    #[test]
    fn everything_goes_when_no_vpc_is_left() {
        let d = desired(vec![(1, vec!["fct1"], vec![(A2, 5, 2)])]);
        let o = converged(&d, with_taps(&["fct1"]));
        let empty = desired(vec![]);
        let after = converged(&empty, o);
        assert_eq!(after.links.keys().collect::<Vec<_>>(), ["fct1"]);
        assert_eq!(after.links["fct1"].master, None);
    }
}
