//! The executor: reads the kernel's links, FDB and neighbour entries into
//! an [`Observed`] and carries out [`Op`]s, over `rtnetlink`.
//!
//! FDB entries are `AF_BRIDGE` neighbour messages on the VXLAN device:
//! the device's own with `NTF_SELF` and `NDA_DST` (what `bridge fdb
//! replace MAC dev fvxN dst IP self permanent` sends), the bridge's with
//! `NTF_MASTER` and `NUD_NOARP` (`bridge fdb replace MAC dev fvxN master
//! static`; the kernel reports them with `NDA_MASTER` and no `NTF_SELF`).
//! Neighbour entries are permanent `AF_INET` entries on the VXLAN device,
//! which its `proxy` flag answers ARP from. Bridge port settings
//! (learning, flooding) are `IFLA_INFO_SLAVE_DATA` of the port.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{
    InfoBridge, InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoVxlan, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVxlan};

use crate::desired::{is_ours, vni_of, vxlan_prefix, Mac};
use crate::plan::{BridgeAttrs, BridgeEntry, Link, LinkKind, Observed, Op, PortAttrs, VxlanAttrs};

/// Errors talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket")]
    Connect(#[source] std::io::Error),
    /// A request failed.
    #[error("cannot {0}")]
    Request(String, #[source] rtnetlink::Error),
    /// A link an operation needs does not exist (yet).
    #[error("no link named {0}")]
    NoLink(String),
}

/// A netlink connection and the link indexes last seen.
pub struct Netlink {
    handle: Handle,
    index: HashMap<String, u32>,
}

fn req(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |e| NetlinkError::Request(what, e)
}

impl Netlink {
    /// A connection in this network namespace; its driver runs on the
    /// current tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        Ok(Self {
            handle,
            index: HashMap::new(),
        })
    }

    /// The index of `name` (as of the last [`Self::observe`] or creation).
    pub fn index(&self, name: &str) -> Option<u32> {
        self.index.get(name).copied()
    }

    /// Every link, and the FDB and neighbour entries of netd's VXLAN
    /// devices.
    pub async fn observe(&mut self) -> Result<Observed, NetlinkError> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(req("list links"))?;
        let raw: Vec<RawLink> = msgs.iter().filter_map(raw_link).collect();
        let names: HashMap<u32, String> = raw.iter().map(|l| (l.index, l.name.clone())).collect();
        self.index = raw.iter().map(|l| (l.name.clone(), l.index)).collect();
        let mut obs = Observed::default();
        let mut vxlans: HashMap<u32, String> = HashMap::new();
        for l in raw {
            let master = l.master.and_then(|m| names.get(&m).cloned());
            let kind = match l.kind {
                RawKind::Bridge(a) => LinkKind::Bridge(a),
                RawKind::Vxlan(mut a, dev) => {
                    a.dev = dev.and_then(|d| names.get(&d).cloned());
                    if vni_of(&l.name, vxlan_prefix()).is_some() {
                        vxlans.insert(l.index, l.name.clone());
                    }
                    LinkKind::Vxlan(a)
                }
                RawKind::Other => LinkKind::Other,
            };
            let link = Link {
                kind,
                port: l.port.filter(|_| master.is_some()),
                master,
                up: l.up,
                mtu: l.mtu,
            };
            obs.links.insert(l.name, link);
        }
        self.read_fdb(&vxlans, &mut obs).await?;
        self.read_neigh(&vxlans, &mut obs).await?;
        Ok(obs)
    }

    async fn read_fdb(
        &self,
        vxlans: &HashMap<u32, String>,
        obs: &mut Observed,
    ) -> Result<(), NetlinkError> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(req("list FDB entries"))?;
        for m in msgs {
            let Some(dev) = vxlans.get(&m.header.ifindex) else {
                continue;
            };
            let Some(mac) = lladdr(&m) else { continue };
            if m.header.flags.contains(NeighbourFlags::Own) {
                if let Some(dst) = dst(&m) {
                    obs.fdb.entry(dev.clone()).or_default().insert((mac, dst));
                }
            } else if let Some(kind) = bridge_entry(&m) {
                obs.bridge_fdb
                    .entry(dev.clone())
                    .or_default()
                    .insert(mac, kind);
            }
        }
        Ok(())
    }

    async fn read_neigh(
        &self,
        vxlans: &HashMap<u32, String>,
        obs: &mut Observed,
    ) -> Result<(), NetlinkError> {
        let msgs: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Inet)
            .execute()
            .try_collect()
            .await
            .map_err(req("list neighbour entries"))?;
        for m in msgs {
            let Some(dev) = vxlans.get(&m.header.ifindex) else {
                continue;
            };
            if let Some(ip) = dst(&m) {
                let mac = lladdr(&m).unwrap_or([0; 6]);
                obs.neigh.entry(dev.clone()).or_default().insert(ip, mac);
            }
        }
        Ok(())
    }

    fn need(&self, name: &str) -> Result<u32, NetlinkError> {
        self.index(name)
            .ok_or_else(|| NetlinkError::NoLink(name.to_string()))
    }

    /// Carry out `op`.
    pub async fn apply(&mut self, op: &Op) -> Result<(), NetlinkError> {
        let h = &self.handle;
        match op {
            Op::CreateBridge { name, mtu } => {
                let msg = LinkBridge::new(name)
                    .mtu(*mtu)
                    .nf_call_iptables(true)
                    .up()
                    .build();
                h.link()
                    .add(msg)
                    .execute()
                    .await
                    .map_err(req(format!("create bridge {name}")))?;
                self.learn_index(name).await?;
            }
            Op::CreateVxlan {
                name,
                bridge,
                vni,
                underlay,
            } => {
                let mut b = LinkVxlan::new(name, *vni)
                    .port(crate::desired::vxlan_port())
                    .local(underlay.local_ip)
                    .learning(false)
                    .proxy(true)
                    .mtu(underlay.mtu)
                    .controller(self.need(bridge)?)
                    .up();
                if let Some(dev) = &underlay.dev {
                    b = b.dev(self.need(dev)?);
                }
                h.link()
                    .add(b.build())
                    .execute()
                    .await
                    .map_err(req(format!("create VXLAN device {name}")))?;
                self.learn_index(name).await?;
            }
            Op::SetLink { name, master, mtu } => {
                let mut b = LinkUnspec::new_with_index(self.need(name)?).up();
                b = match master {
                    Some(m) => b.controller(self.need(m)?),
                    None => b.nocontroller(),
                };
                if let Some(m) = mtu {
                    b = b.mtu(*m);
                }
                h.link()
                    .set(b.build())
                    .execute()
                    .await
                    .map_err(req(format!("set up {name}")))?;
            }
            Op::SetNfCallIptables { name } => {
                let msg = LinkMessageBuilder::<LinkBridge>::new_with_info_kind(InfoKind::Bridge)
                    .index(self.need(name)?)
                    .nf_call_iptables(true)
                    .build();
                h.link()
                    .change(msg)
                    .execute()
                    .await
                    .map_err(req(format!("set nf_call_iptables on {name}")))?;
            }
            Op::SetPort {
                name,
                learning,
                flood,
            } => {
                let msg = LinkBridgePort::new(self.need(name)?)
                    .learning(*learning)
                    .flood(*flood)
                    .build();
                h.link()
                    .set_port(msg)
                    .execute()
                    .await
                    .map_err(req(format!("set the bridge port settings of {name}")))?;
            }
            Op::Detach { name } => {
                let msg = LinkUnspec::new_with_index(self.need(name)?)
                    .nocontroller()
                    .build();
                h.link()
                    .set(msg)
                    .execute()
                    .await
                    .map_err(req(format!("detach {name}")))?;
            }
            Op::DeleteLink { name } => {
                // The planner never deletes another's link; this is the
                // last guard.
                if !is_ours(name) {
                    return Err(NetlinkError::NoLink(name.clone()));
                }
                h.link()
                    .del(self.need(name)?)
                    .execute()
                    .await
                    .map_err(req(format!("delete {name}")))?;
                self.index.remove(name);
            }
            Op::SetFdb { vxlan, mac, dst } => {
                h.neighbours()
                    .add_bridge(self.need(vxlan)?, mac)
                    .flags(NeighbourFlags::Own)
                    .destination(IpAddr::V4(*dst))
                    .replace()
                    .execute()
                    .await
                    .map_err(req(format!("set the FDB entry of {mac:02x?} on {vxlan}")))?;
            }
            Op::DelFdb { vxlan, mac, dst } => {
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Bridge;
                m.header.ifindex = self.need(vxlan)?;
                m.header.flags = NeighbourFlags::Own;
                m.header.state = NeighbourState::Permanent;
                m.attributes = vec![
                    NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(*dst)),
                ];
                h.neighbours().del(m).execute().await.map_err(req(format!(
                    "delete the FDB entry of {mac:02x?} on {vxlan}"
                )))?;
            }
            Op::SetBridgeFdb { vxlan, mac } => {
                h.neighbours()
                    .add_bridge(self.need(vxlan)?, mac)
                    .flags(NeighbourFlags::Controller)
                    .state(NeighbourState::Noarp)
                    .replace()
                    .execute()
                    .await
                    .map_err(req(format!(
                        "set the bridge entry of {mac:02x?} on {vxlan}"
                    )))?;
            }
            Op::DelBridgeFdb { vxlan, mac } => {
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Bridge;
                m.header.ifindex = self.need(vxlan)?;
                m.header.flags = NeighbourFlags::Controller;
                m.attributes = vec![NeighbourAttribute::LinkLayerAddress(mac.to_vec())];
                h.neighbours().del(m).execute().await.map_err(req(format!(
                    "delete the bridge entry of {mac:02x?} on {vxlan}"
                )))?;
            }
            Op::SetNeigh { vxlan, ip, mac } => {
                h.neighbours()
                    .add(self.need(vxlan)?, IpAddr::V4(*ip))
                    .link_layer_address(mac)
                    .replace()
                    .execute()
                    .await
                    .map_err(req(format!("set the neighbour entry of {ip} on {vxlan}")))?;
            }
            Op::DelNeigh { vxlan, ip } => {
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Inet;
                m.header.ifindex = self.need(vxlan)?;
                m.attributes = vec![NeighbourAttribute::Destination(NeighbourAddress::Inet(*ip))];
                h.neighbours().del(m).execute().await.map_err(req(format!(
                    "delete the neighbour entry of {ip} on {vxlan}"
                )))?;
            }
        }
        Ok(())
    }

    async fn learn_index(&mut self, name: &str) -> Result<(), NetlinkError> {
        let msg = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
            .map_err(req(format!("look up {name}")))?
            .ok_or_else(|| NetlinkError::NoLink(name.to_string()))?;
        self.index.insert(name.to_string(), msg.header.index);
        Ok(())
    }
}

enum RawKind {
    Bridge(BridgeAttrs),
    /// With the underlay device's index.
    Vxlan(VxlanAttrs, Option<u32>),
    Other,
}

struct RawLink {
    name: String,
    index: u32,
    master: Option<u32>,
    up: bool,
    mtu: u32,
    kind: RawKind,
    port: Option<PortAttrs>,
}

fn raw_link(m: &LinkMessage) -> Option<RawLink> {
    let mut name = None;
    let mut master = None;
    let mut mtu = 0;
    let mut kind = RawKind::Other;
    let mut port = None;
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Controller(c) if *c != 0 => master = Some(*c),
            LinkAttribute::Mtu(v) => mtu = *v,
            LinkAttribute::LinkInfo(infos) => {
                kind = link_kind(infos);
                port = port_attrs(infos);
            }
            _ => {}
        }
    }
    Some(RawLink {
        name: name?,
        index: m.header.index,
        master,
        up: m.header.flags.contains(LinkFlags::Up),
        mtu,
        kind,
        port,
    })
}

fn link_kind(infos: &[LinkInfo]) -> RawKind {
    let kind = infos.iter().find_map(|i| match i {
        LinkInfo::Kind(k) => Some(k),
        _ => None,
    });
    match kind {
        Some(InfoKind::Bridge) => {
            let nf_call_iptables = infos.iter().find_map(|i| match i {
                LinkInfo::Data(InfoData::Bridge(d)) => d.iter().find_map(|b| match b {
                    InfoBridge::NfCallIpTables(on) => Some(*on),
                    _ => None,
                }),
                _ => None,
            });
            RawKind::Bridge(BridgeAttrs { nf_call_iptables })
        }
        Some(InfoKind::Vxlan) => {
            let data = infos.iter().find_map(|i| match i {
                LinkInfo::Data(InfoData::Vxlan(d)) => Some(d.as_slice()),
                _ => None,
            });
            let (a, dev) = vxlan_attrs(data.unwrap_or_default());
            RawKind::Vxlan(a, dev)
        }
        _ => RawKind::Other,
    }
}

/// A bridge port's settings, from `IFLA_INFO_SLAVE_DATA`.
fn port_attrs(infos: &[LinkInfo]) -> Option<PortAttrs> {
    let data = infos.iter().find_map(|i| match i {
        LinkInfo::PortData(InfoPortData::BridgePort(d)) => Some(d),
        _ => None,
    })?;
    // The kernel's defaults when an attribute is absent.
    let mut p = PortAttrs::KERNEL_DEFAULT;
    for d in data {
        match d {
            InfoBridgePort::Learning(on) => p.learning = *on,
            InfoBridgePort::UnicastFlood(on) => p.flood = *on,
            _ => {}
        }
    }
    Some(p)
}

fn vxlan_attrs(data: &[InfoVxlan]) -> (VxlanAttrs, Option<u32>) {
    let mut a = VxlanAttrs {
        vni: 0,
        local: None,
        dev: None,
        port: 0,
        // The kernel's defaults when an attribute is absent.
        learning: true,
        proxy: false,
        remote: None,
    };
    let mut dev = None;
    for d in data {
        match d {
            InfoVxlan::Id(v) => a.vni = *v,
            InfoVxlan::Local(ip) if !ip.is_unspecified() => a.local = Some(*ip),
            InfoVxlan::Group(ip) if !ip.is_unspecified() => a.remote = Some(*ip),
            InfoVxlan::Link(i) if *i != 0 => dev = Some(*i),
            InfoVxlan::Port(p) => a.port = *p,
            InfoVxlan::Learning(l) => a.learning = *l,
            InfoVxlan::Proxy(p) => a.proxy = *p,
            _ => {}
        }
    }
    (a, dev)
}

fn lladdr(m: &NeighbourMessage) -> Option<Mac> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(l) => l.as_slice().try_into().ok(),
        _ => None,
    })
}

/// The kind of a bridge entry (`NDA_MASTER`, no `NTF_SELF`); `None` for
/// the port's own address (`NUD_PERMANENT`) and non-bridge messages.
fn bridge_entry(m: &NeighbourMessage) -> Option<BridgeEntry> {
    let master = m
        .attributes
        .iter()
        .any(|a| matches!(a, NeighbourAttribute::Controller(_)));
    match m.header.state {
        _ if !master => None,
        NeighbourState::Permanent => None,
        NeighbourState::Noarp => Some(BridgeEntry::Static),
        _ => Some(BridgeEntry::Dynamic),
    }
}

/// `NDA_DST` as IPv4. In an `AF_BRIDGE` message (an FDB entry) the
/// parser cannot know the address family and gives raw bytes.
fn dst(m: &NeighbourMessage) -> Option<Ipv4Addr> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })
}
