//! Security groups and anti-spoofing in nftables: [`ruleset`] renders
//! this host's rules from a [`HostNetwork`] (pure), [`apply`] replaces
//! netd's tables with them in one atomic `nft -f` transaction.
//!
//! # Layout
//!
//! `table bridge ferro`, on every bridge's ports (the TAPs):
//!
//! - `prerouting` (priority -300): `iifname vmap { tap : jump as_<tap> }`,
//!   the anti-spoofing chains ([`crate::antispoof`]);
//! - `route` (prerouting, priority -200): the VPC router between subnets.
//!   A frame from a TAP to its VPC's router MAC whose IPv4 destination is
//!   an interface of the VPC (on any host) gets that interface's MAC as
//!   its destination, so the bridge forwards it there (over VXLAN when it
//!   is remote) and the security-group chains judge it as any other; the
//!   source MAC stays the sender's, and the TTL is not lowered (one hop
//!   that no guest sees). Other frames to the router MAC (the router's own
//!   address, metadata, destinations outside the VPC) are left for the
//!   `router_mac` chain;
//! - `router_mac` (forward, priority -10): frames from a TAP or VXLAN port
//!   to its VPC's router MAC ([`crate::desired::router_mac`]) are dropped,
//!   counted in `to_router`. netd's DHCP and metadata servers take them
//!   off the TAP with `AF_PACKET` before the bridge sees them, so the
//!   bridge never learns the router MAC and would flood them (a guest's
//!   metadata requests) to every other port;
//! - `host_input` (input): frames a netd bridge would deliver to the host
//!   from a TAP or VXLAN port (to the bridge's MAC, broadcasts) are
//!   dropped, counted in `to_host`: the bridges have no address, and a
//!   guest never reaches the host's stack through them;
//! - `egress` (forward, priority 0): `iifname vmap { tap : jump eg_<tap> }`;
//! - `ingress` (forward, priority 10): `oifname vmap { tap : jump in_<tap> }`;
//! - `eg_<tap>`/`in_<tap>`: established or related → accept, invalid →
//!   drop, non-IPv4 (ARP, already checked) → accept, then a jump to
//!   `ge_<group>`/`gi_<group>` per group of the interface, then drop;
//! - `gi_<group>`/`ge_<group>`: the group's ingress/egress rules, each an
//!   `accept` (a union: any rule allowing is enough), shared by every
//!   interface of the group;
//! - sets `g_<group>` (ipv4_addr): each group's members, for rules whose
//!   peer is a group;
//! - counters `spoof_<tap>`, `ipv6_<tap>`;
//! - `postrouting`: clears netd's mark bits again.
//!
//! A frame between two local interfaces crosses the forward hook once: an
//! `accept` in `egress` ends that base chain only, so `ingress` (a later
//! priority) still runs. From or to the VXLAN port only the local side's
//! chain applies (it is in neither vmap); the remote host applies its own.
//! Each vmap is one hash lookup, so 1,000 interfaces cost what 1 does, and
//! a group's rules exist once whatever its number of members.
//!
//! # Conntrack
//!
//! This kernel has no conntrack in the bridge family
//! (`CONFIG_NF_CONNTRACK_BRIDGE`): `ct` rules in `table bridge` are
//! refused. Bridged IPv4 reaches the IPv4 hooks (and conntrack) through
//! `br_netfilter` instead, when `net.bridge.bridge-nf-call-iptables` (or
//! the bridge's `nf_call_iptables`) is on. `table ip ferro` uses that:
//! `zone` (raw priority) puts each VPC's traffic in its own conntrack zone
//! (VPCs may use the same addresses), `state` (after conntrack) marks the
//! packet [`MARK_ESTABLISHED`] or [`MARK_INVALID`], and the bridge chains
//! read the mark. Without `br_netfilter` nothing is marked: replies are
//! then dropped unless a rule allows them (it fails closed).
//!
//! The underlay's VXLAN packets themselves (UDP to netd's VXLAN port) are
//! exempt from conntrack (`notrack` in `vxlan_in` and `vxlan_out`, raw
//! priority; [`underlay_notrack_rules`]): netd reads no state of the outer
//! packets, and tracking them cost a lookup per packet and an entry per
//! tunnelled flow (see the netd benchmark in `docs/architecture.md`).
//!
//! DHCP and metadata answers netd sends on a TAP with `AF_PACKET` go out
//! of the TAP directly, never through the bridge, so no hook sees them.
//!
//! # Bad data
//!
//! A rule, group or interface the controller sent malformed is left out
//! ([`Skipped`], logged with [`Ruleset::warn_skipped`]); the rest applies.
//! A left-out rule allows nothing; an interface with a malformed MAC or
//! address gets an anti-spoofing chain that drops everything. A TAP name
//! that cannot be written in nftables (other than ASCII letters, digits,
//! `_`, `-`, `.`) is left out, unfiltered: the agent's names never are.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use ferro_proto::compute::v1::{HostNetwork, SecurityGroup, SecurityGroupRule};

use crate::antispoof;
use crate::desired::{
    bridge_name, fmt_mac, netmask, parse_cidr, parse_mac, router_mac, vxlan_name, MAX_VNI,
};

/// The name of netd's two tables, `bridge ferro` and `ip ferro`.
/// The name of netd's two tables (`ferro`, or `ferro_<prefix>` for a
/// netd with its own name prefix, so several in one namespace never take
/// each other's rules).
pub fn table_name() -> &'static str {
    crate::desired::table_name()
}
/// Packet mark bit: conntrack found the packet established or related.
pub const MARK_ESTABLISHED: u32 = 0x0100_0000;
/// Packet mark bit: conntrack found the packet invalid.
pub const MARK_INVALID: u32 = 0x0200_0000;
const MARKS: u32 = MARK_ESTABLISHED | MARK_INVALID;
/// The counter of frames to a VPC router MAC dropped in the bridge.
pub const TO_ROUTER_COUNTER: &str = "to_router";
/// The counter of frames a netd bridge would have delivered to the host.
pub const TO_HOST_COUNTER: &str = "to_host";

/// Which rules of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Traffic to members; the peer is the source.
    Ingress,
    /// Traffic from members; the peer is the destination.
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// Something of the state left out of the ruleset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Skipped {
    /// A rule that cannot be rendered.
    #[error("group {group_id}: {direction} rule {index}: {reason}")]
    Rule {
        /// Its group.
        group_id: String,
        /// Ingress or egress.
        direction: Direction,
        /// Its position in the group's list.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A group (all its rules), or one of its members.
    #[error("group {group_id}: {reason}")]
    Group {
        /// The group.
        group_id: String,
        /// What is wrong.
        reason: String,
    },
    /// A local interface, or one of its groups.
    #[error("interface {instance_id} (TAP {tap:?}): {reason}")]
    Interface {
        /// The instance.
        instance_id: String,
        /// Its TAP.
        tap: String,
        /// What is wrong.
        reason: String,
    },
}

impl Skipped {
    /// The group concerned, if any.
    pub fn group_id(&self) -> Option<&str> {
        match self {
            Skipped::Rule { group_id, .. } | Skipped::Group { group_id, .. } => Some(group_id),
            Skipped::Interface { .. } => None,
        }
    }
}

/// A named set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Set {
    /// Its nftables type.
    pub kind: &'static str,
    /// Its elements, sorted.
    pub elements: Vec<String>,
}

/// A chain: a base chain has a hook.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// `type filter hook … priority …; policy accept;`, for base chains.
    pub hook: Option<String>,
    /// Its rules in order, in `nft` syntax.
    pub rules: Vec<String>,
}

/// One of netd's tables as it should be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// `bridge` or `ip`.
    pub family: &'static str,
    /// Named counters.
    pub counters: BTreeSet<String>,
    /// Named sets.
    pub sets: BTreeMap<String, Set>,
    /// Chains by name.
    pub chains: BTreeMap<String, Chain>,
}

/// The objects of a table in the kernel, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Existing {
    /// Chains.
    pub chains: BTreeSet<String>,
    /// Sets and maps.
    pub sets: BTreeSet<String>,
    /// Counters.
    pub counters: BTreeSet<String>,
}

/// netd's whole ruleset for this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    /// `table bridge ferro`: anti-spoofing and the groups' rules.
    pub bridge: Table,
    /// `table ip ferro`: conntrack zones and state marks.
    pub ip: Table,
    /// What the state had that could not be used.
    pub skipped: Vec<Skipped>,
}

/// Errors of `nft`.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// `nft` could not be started (not installed?).
    #[error("cannot run nft")]
    Spawn(#[source] std::io::Error),
    /// `nft` failed.
    #[error("nft {args} failed: {stderr}")]
    Failed {
        /// Its arguments.
        args: String,
        /// What it printed (shortened).
        stderr: String,
    },
}

impl NftError {
    /// Whether `nft` failed because the table does not exist.
    pub fn is_no_such_table(&self) -> bool {
        matches!(self, NftError::Failed { stderr, .. } if stderr.contains("No such file or directory"))
    }
}

/// Run `nft args`, with `stdin` as its input; its standard output.
pub(crate) fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error shows as nft's failure below.
        let _ = pipe.write_all(input.as_bytes());
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if stderr.len() > 2000 {
        let cut = (0..=2000).rev().find(|&i| stderr.is_char_boundary(i));
        stderr.truncate(cut.unwrap_or(0));
        stderr.push('…');
    }
    Err(NftError::Failed {
        args: args.join(" "),
        stderr,
    })
}

/// Replace netd's two tables with `r` in one transaction: packets see
/// the old rules or the new ones, never none. Counters of interfaces that
/// stay keep counting; objects no longer wanted are deleted. No other
/// table is touched. The first call in a process also makes sure
/// `br_netfilter`, which the conntrack marks need, is loaded
/// ([`crate::sysctl::ensure_br_netfilter`]).
pub fn apply(r: &Ruleset) -> Result<(), NftError> {
    static BR_NETFILTER: std::sync::Once = std::sync::Once::new();
    BR_NETFILTER.call_once(crate::sysctl::ensure_br_netfilter);
    let existing = [existing(r.bridge.family)?, existing(r.ip.family)?];
    nft(&["-f", "-"], Some(&r.script(&existing))).map(drop)
}

/// What netd's table of `family` holds now.
pub fn existing(family: &str) -> Result<Existing, NftError> {
    let table = table_name();
    match nft(&["-t", "list", "table", family, table], None) {
        Ok(listing) => Ok(parse_existing(&listing)),
        Err(e) if e.is_no_such_table() => Ok(Existing::default()),
        Err(e) => Err(e),
    }
}

/// The object names of an `nft -t list table` listing.
pub fn parse_existing(listing: &str) -> Existing {
    let mut e = Existing::default();
    for line in listing.lines().map(str::trim) {
        let Some((kind, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some(name) = rest.strip_suffix(" {") else {
            continue;
        };
        let name = name.trim_matches('"').to_string();
        match kind {
            "chain" => e.chains.insert(name),
            "set" | "map" => e.sets.insert(name),
            "counter" => e.counters.insert(name),
            _ => false,
        };
    }
    e
}

impl Table {
    fn new(family: &'static str) -> Self {
        Table {
            family,
            counters: BTreeSet::new(),
            sets: BTreeMap::new(),
            chains: BTreeMap::new(),
        }
    }

    /// The table as `nft -f` input, complete (for reading and tests).
    pub fn render(&self) -> String {
        let table = table_name();
        let mut s = String::new();
        self.declare(&mut s);
        s.push_str(&format!("flush table {} {table}\n", self.family));
        self.define(&mut s);
        s
    }

    /// Every object, empty (an `add`: what exists stays, counters keep
    /// their values).
    fn declare(&self, s: &mut String) {
        let table = table_name();
        let _ = writeln!(s, "table {} {table} {{", self.family);
        for c in &self.counters {
            let _ = writeln!(s, "\tcounter {c} {{\n\t}}");
        }
        for (name, set) in &self.sets {
            let _ = writeln!(s, "\tset {name} {{\n\t\ttype {}\n\t}}", set.kind);
        }
        for (name, chain) in &self.chains {
            let _ = writeln!(s, "\tchain {name} {{");
            if let Some(hook) = &chain.hook {
                let _ = writeln!(s, "\t\t{hook}");
            }
            s.push_str("\t}\n");
        }
        s.push_str("}\n");
    }

    /// Set elements and rules, into objects that exist and are empty.
    fn define(&self, s: &mut String) {
        let table = table_name();
        for name in self.sets.keys() {
            let _ = writeln!(s, "flush set {} {table} {name}", self.family);
        }
        let _ = writeln!(s, "table {} {table} {{", self.family);
        for (name, set) in self.sets.iter().filter(|(_, set)| !set.elements.is_empty()) {
            let _ = writeln!(
                s,
                "\tset {name} {{\n\t\ttype {}\n\t\telements = {{ {} }}\n\t}}",
                set.kind,
                set.elements.join(", ")
            );
        }
        for (name, chain) in self.chains.iter().filter(|(_, c)| !c.rules.is_empty()) {
            let _ = writeln!(s, "\tchain {name} {{");
            for rule in &chain.rules {
                let _ = writeln!(s, "\t\t{rule}");
            }
            s.push_str("\t}\n");
        }
        s.push_str("}\n");
    }

    /// Deletes what `existing` has and this table does not.
    fn delete_stale(&self, existing: &Existing, s: &mut String) {
        let table = table_name();
        let f = self.family;
        for c in existing
            .chains
            .iter()
            .filter(|c| !self.chains.contains_key(*c))
        {
            let _ = writeln!(s, "delete chain {f} {table} {c}");
        }
        for set in existing.sets.iter().filter(|n| !self.sets.contains_key(*n)) {
            let _ = writeln!(s, "delete set {f} {table} {set}");
        }
        for c in existing.counters.difference(&self.counters) {
            let _ = writeln!(s, "delete counter {f} {table} {c}");
        }
    }
}

impl Ruleset {
    /// The `nft -f` transaction that turns tables holding `existing`
    /// (bridge, ip) into this ruleset: declare everything, flush both
    /// tables' rules, delete stale objects, fill sets and chains.
    pub fn script(&self, existing: &[Existing; 2]) -> String {
        let table = table_name();
        let tables = [&self.bridge, &self.ip];
        let mut s = String::new();
        for t in tables {
            t.declare(&mut s);
        }
        for t in tables {
            let _ = writeln!(s, "flush table {} {table}", t.family);
        }
        for (t, e) in tables.iter().zip(existing) {
            t.delete_stale(e, &mut s);
        }
        for t in tables {
            t.define(&mut s);
        }
        s
    }

    /// Log what was left out, one warning each (call once per state).
    pub fn warn_skipped(&self) {
        for s in &self.skipped {
            match s.group_id() {
                Some(group_id) => tracing::warn!(group_id, "security groups: left out: {s}"),
                None => tracing::warn!("security groups: left out: {s}"),
            }
        }
    }
}

/// A group of the state, usable.
struct Group<'a> {
    group: &'a SecurityGroup,
    members: BTreeSet<Ipv4Addr>,
}

/// A local interface of the state, usable.
struct Iface<'a> {
    vni: u32,
    mac: Option<crate::desired::Mac>,
    ip: Option<Ipv4Addr>,
    groups: BTreeSet<&'a str>,
}

/// Whether `name` can be part of an nftables identifier as netd writes
/// them (prefix + name) and of a quoted string: TAP names and group ids.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// The rules `net` asks for on this host.
pub fn ruleset(net: &HostNetwork) -> Ruleset {
    let mut skipped = Vec::new();
    let groups = groups(net, &mut skipped);
    let ifaces = interfaces(net, &groups, &mut skipped);
    let mut bridge = Table::new("bridge");
    for (id, g) in &groups {
        let elements = g.members.iter().map(Ipv4Addr::to_string).collect();
        bridge.sets.insert(
            set_name(id),
            Set {
                kind: "ipv4_addr",
                elements,
            },
        );
    }
    let used: BTreeSet<&str> = ifaces
        .values()
        .flat_map(|i| i.groups.iter().copied())
        .collect();
    for id in used {
        for dir in [Direction::Ingress, Direction::Egress] {
            let rules = group_rules(groups[id].group, dir, &groups, &mut skipped);
            bridge
                .chains
                .insert(group_chain(id, dir), Chain { hook: None, rules });
        }
    }
    for (tap, i) in &ifaces {
        bridge.counters.insert(antispoof::spoof_counter(tap));
        bridge.counters.insert(antispoof::ipv6_counter(tap));
        let rules = antispoof::rules(tap, i.mac, i.ip);
        bridge
            .chains
            .insert(antispoof::chain_name(tap), Chain { hook: None, rules });
        for dir in [Direction::Ingress, Direction::Egress] {
            let rules = interface_rules(&i.groups, dir);
            bridge
                .chains
                .insert(interface_chain(tap, dir), Chain { hook: None, rules });
        }
    }
    let vmap = |key: &str, chain: &dyn Fn(&str) -> String| -> Vec<String> {
        let entries: Vec<String> = ifaces
            .keys()
            .map(|tap| format!("\"{tap}\" : jump {}", chain(tap)))
            .collect();
        vmap_rule(key, &entries)
    };
    let base = |hook: &str, prio: i32, rules: Vec<String>| Chain {
        hook: Some(format!(
            "type filter hook {hook} priority {prio}; policy accept;"
        )),
        rules,
    };
    let chains = [
        (
            "prerouting",
            base("prerouting", -300, vmap("iifname", &antispoof::chain_name)),
        ),
        (
            "egress",
            base(
                "forward",
                0,
                vmap("iifname", &|t| interface_chain(t, Direction::Egress)),
            ),
        ),
        (
            "ingress",
            base(
                "forward",
                10,
                vmap("oifname", &|t| interface_chain(t, Direction::Ingress)),
            ),
        ),
        (
            "router_mac",
            base("forward", -10, router_mac_rules(&ifaces)),
        ),
        ("route", base("prerouting", -200, route_rules(net, &ifaces))),
        ("host_input", base("input", 0, host_input_rules(&ifaces))),
        ("postrouting", base("postrouting", 0, vec![clear_marks()])),
    ];
    bridge.counters.insert(TO_ROUTER_COUNTER.into());
    bridge.counters.insert(TO_HOST_COUNTER.into());
    bridge
        .chains
        .extend(chains.map(|(n, c)| (n.to_string(), c)));
    Ruleset {
        bridge,
        ip: ip_table(&ifaces),
        skipped,
    }
}

/// `key vmap { entries }`, or nothing without entries.
fn vmap_rule(key: &str, entries: &[String]) -> Vec<String> {
    if entries.is_empty() {
        return Vec::new();
    }
    vec![format!("{key} vmap {{ {} }}", entries.join(", "))]
}

/// The VNIs of `ifaces` that can be netd's devices.
fn vnis(ifaces: &BTreeMap<&str, Iface>) -> BTreeSet<u32> {
    ifaces
        .values()
        .map(|i| i.vni)
        .filter(|v| (1..=MAX_VNI).contains(v))
        .collect()
}

/// Drop frames from each TAP and VXLAN port to its VPC's router MAC.
fn router_mac_rules(ifaces: &BTreeMap<&str, Iface>) -> Vec<String> {
    let taps = ifaces
        .iter()
        .filter(|(_, i)| (1..=MAX_VNI).contains(&i.vni))
        .map(|(tap, i)| (tap.to_string(), i.vni));
    let vxlans = vnis(ifaces).into_iter().map(|v| (vxlan_name(v), v));
    let elements: Vec<String> = taps
        .chain(vxlans)
        .map(|(port, vni)| format!("\"{port}\" . {}", fmt_mac(&router_mac(vni))))
        .collect();
    if elements.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "iifname . ether daddr {{ {} }} counter name {TO_ROUTER_COUNTER} drop",
        elements.join(", ")
    )]
}

/// Per VPC: frames from its TAPs to its router MAC for one of its
/// interfaces' addresses are sent to that interface's MAC.
fn route_rules(net: &HostNetwork, ifaces: &BTreeMap<&str, Iface>) -> Vec<String> {
    let mut rules = Vec::new();
    for v in net.vpcs.iter().filter(|v| (1..=MAX_VNI).contains(&v.vni)) {
        let taps: Vec<String> = ifaces
            .iter()
            .filter(|(_, i)| i.vni == v.vni && i.mac.is_some() && i.ip.is_some())
            .map(|(t, _)| format!("\"{t}\""))
            .collect();
        let mut targets = BTreeMap::new();
        let all = v
            .local
            .iter()
            .map(|l| (&l.private_ip, &l.mac))
            .chain(v.remote.iter().map(|r| (&r.private_ip, &r.mac)));
        for (ip, mac) in all {
            let (Ok(ip), Some(mac)) = (ip.parse::<Ipv4Addr>(), parse_mac(mac)) else {
                continue;
            };
            if mac[0] & 1 == 0 {
                targets.entry(ip).or_insert(mac);
            }
        }
        if taps.is_empty() || targets.is_empty() {
            continue;
        }
        let map: Vec<String> = targets
            .iter()
            .map(|(ip, mac)| format!("{ip} : {}", fmt_mac(mac)))
            .collect();
        rules.push(format!(
            "iifname {{ {} }} ether daddr {} ether daddr set ip daddr map {{ {} }}",
            taps.join(", "),
            fmt_mac(&router_mac(v.vni)),
            map.join(", ")
        ));
    }
    rules
}

/// Drop what a netd bridge would deliver to the host from its ports.
fn host_input_rules(ifaces: &BTreeMap<&str, Iface>) -> Vec<String> {
    let ports: Vec<String> = ifaces
        .keys()
        .map(|t| t.to_string())
        .chain(vnis(ifaces).into_iter().map(vxlan_name))
        .map(|p| format!("\"{p}\""))
        .collect();
    if ports.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "iifname {{ {} }} counter name {TO_HOST_COUNTER} drop",
        ports.join(", ")
    )]
}

fn clear_marks() -> String {
    format!(
        "meta mark & {MARKS:#010x} != 0 meta mark set meta mark & {:#010x}",
        !MARKS
    )
}

/// `table ip ferro`: a conntrack zone per VPC, and conntrack's verdict as
/// mark bits for the bridge table. In the IPv4 hooks `br_netfilter`
/// gives the bridge as the input device, not the port: both key on
/// netd's bridges, `fbr<vni>`.
fn ip_table(ifaces: &BTreeMap<&str, Iface>) -> Table {
    let bridges: BTreeMap<String, u32> = vnis(ifaces)
        .into_iter()
        .map(|v| (bridge_name(v), zone(v)))
        .collect();
    let mut t = Table::new("ip");
    let elements = bridges.keys().map(|b| format!("\"{b}\"")).collect();
    t.sets.insert(
        "bridges".into(),
        Set {
            kind: "ifname",
            elements,
        },
    );
    let zones: Vec<String> = bridges
        .iter()
        .map(|(b, z)| format!("\"{b}\" : {z}"))
        .collect();
    let zone_rules = if zones.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "ct zone set iifname map {{ {} }}",
            zones.join(", ")
        )]
    };
    let keep = !MARKS;
    let state_rules = vec![
        "iifname != @bridges return".to_string(),
        format!("meta mark & {MARKS:#010x} != 0 meta mark set meta mark & {keep:#010x}"),
        format!("ct state established,related meta mark set meta mark | {MARK_ESTABLISHED:#010x}"),
        format!("ct state invalid meta mark set meta mark | {MARK_INVALID:#010x}"),
    ];
    let base = |prio: i32, rules| Chain {
        hook: Some(format!(
            "type filter hook prerouting priority {prio}; policy accept;"
        )),
        rules,
    };
    t.chains.insert("zone".into(), base(-300, zone_rules));
    t.chains.insert("state".into(), base(-150, state_rules));
    let (rx, tx) = underlay_notrack_rules(crate::desired::vxlan_port());
    t.chains.insert("vxlan_in".into(), base(-300, rx));
    t.chains.insert(
        "vxlan_out".into(),
        Chain {
            hook: Some("type filter hook output priority -300; policy accept;".into()),
            rules: tx,
        },
    );
    t
}

/// The underlay's VXLAN packets skip conntrack: (prerouting, output)
/// rules for the VXLAN UDP port `port`. The outer packets need no state
/// (no rule of netd reads it), and tracking them cost a lookup and an
/// entry per tunnelled packet and flow. The inner packets are tracked as
/// before: the VXLAN device drops the outer packet's conntrack reference
/// when it encapsulates and decapsulates. On the way in only packets to
/// this host's own addresses are exempt, so VXLAN a host forwards for
/// others is tracked as it was, and never a guest's own packets (bridged
/// IPv4 comes through prerouting too, with a bridge as `iifname`): a
/// guest's flow to that port, even to an address the host also has,
/// stays tracked and stateful.
pub fn underlay_notrack_rules(port: u16) -> (Vec<String>, Vec<String>) {
    (
        vec![format!(
            "udp dport {port} iifname != @bridges fib daddr type local notrack"
        )],
        vec![format!("udp dport {port} notrack")],
    )
}

/// The conntrack zone of VNI `vni` (1 to 65535; VNIs are given from 1
/// up, so they are distinct below 65536).
pub fn zone(vni: u32) -> u32 {
    1 + (vni.max(1) - 1) % 0xffff
}

/// The set of group `id`'s member addresses.
pub fn set_name(id: &str) -> String {
    format!("g_{id}")
}

/// The chain of group `id`'s rules in `dir`.
pub fn group_chain(id: &str, dir: Direction) -> String {
    match dir {
        Direction::Ingress => format!("gi_{id}"),
        Direction::Egress => format!("ge_{id}"),
    }
}

/// The chain of traffic to (ingress) or from (egress) `tap`.
pub fn interface_chain(tap: &str, dir: Direction) -> String {
    match dir {
        Direction::Ingress => format!("in_{tap}"),
        Direction::Egress => format!("eg_{tap}"),
    }
}

/// An interface's chain: state first, non-IPv4 through, then its groups.
fn interface_rules(groups: &BTreeSet<&str>, dir: Direction) -> Vec<String> {
    let mut rules = vec![
        format!("meta mark & {MARK_ESTABLISHED:#010x} == {MARK_ESTABLISHED:#010x} accept"),
        format!("meta mark & {MARK_INVALID:#010x} == {MARK_INVALID:#010x} drop"),
        "ether type != ip accept".to_string(),
    ];
    rules.extend(
        groups
            .iter()
            .map(|g| format!("jump {}", group_chain(g, dir))),
    );
    rules.push("drop".into());
    rules
}

/// Group `g`'s rules in `dir`, deduplicated, in the state's order; the
/// malformed ones left out.
fn group_rules(
    g: &SecurityGroup,
    dir: Direction,
    groups: &BTreeMap<&str, Group>,
    skipped: &mut Vec<Skipped>,
) -> Vec<String> {
    let list = match dir {
        Direction::Ingress => &g.ingress,
        Direction::Egress => &g.egress,
    };
    let mut out: Vec<String> = Vec::new();
    for (index, r) in list.iter().enumerate() {
        match rule(r, dir, groups) {
            Ok(text) if !out.contains(&text) => out.push(text),
            Ok(_) => {}
            Err(reason) => skipped.push(Skipped::Rule {
                group_id: g.group_id.clone(),
                direction: dir,
                index,
                reason,
            }),
        }
    }
    out
}

/// One rule as an `accept` statement.
fn rule(
    r: &SecurityGroupRule,
    dir: Direction,
    groups: &BTreeMap<&str, Group>,
) -> Result<String, String> {
    let field = match dir {
        Direction::Ingress => "ip saddr",
        Direction::Egress => "ip daddr",
    };
    let mut parts = Vec::new();
    match (r.cidr.as_str(), r.group_id.as_str()) {
        (cidr, "") if !cidr.is_empty() => {
            let (ip, len) = parse_cidr(cidr).ok_or(format!("bad CIDR {cidr:?}"))?;
            let net = Ipv4Addr::from(ip.to_bits() & netmask(len).to_bits());
            match len {
                0 => {}
                32 => parts.push(format!("{field} {net}")),
                _ => parts.push(format!("{field} {net}/{len}")),
            }
        }
        ("", id) if !id.is_empty() => {
            if !groups.contains_key(id) {
                return Err(format!("peer group {id:?} is not in the state"));
            }
            parts.push(format!("{field} @{}", set_name(id)));
        }
        _ => return Err("needs exactly one of a CIDR and a group".into()),
    }
    match r.protocol.as_str() {
        p @ ("tcp" | "udp") => {
            let (from, to) = (r.from_port, r.to_port);
            if from == 0 || from > to || to > 65535 {
                return Err(format!(
                    "{p} ports {from}-{to} are not a range of 1 to 65535"
                ));
            }
            if from == to {
                parts.push(format!("{p} dport {from}"));
            } else {
                parts.push(format!("{p} dport {from}-{to}"));
            }
        }
        "icmp" => parts.push("ip protocol icmp".into()),
        "all" => {}
        p => return Err(format!("unknown protocol {p:?}")),
    }
    parts.push("accept".into());
    Ok(parts.join(" "))
}

/// The usable groups of `net` by id.
fn groups<'a>(net: &'a HostNetwork, skipped: &mut Vec<Skipped>) -> BTreeMap<&'a str, Group<'a>> {
    let mut out = BTreeMap::new();
    for gh in &net.groups {
        let Some(g) = &gh.group else { continue };
        let skip = |reason: &str| Skipped::Group {
            group_id: g.group_id.clone(),
            reason: reason.into(),
        };
        if !valid_name(&g.group_id) {
            skipped.push(skip("not a usable group id"));
            continue;
        }
        if out.contains_key(g.group_id.as_str()) {
            skipped.push(skip("listed twice"));
            continue;
        }
        let mut members = BTreeSet::new();
        for m in &gh.member_ips {
            match m.parse::<Ipv4Addr>() {
                Ok(ip) => {
                    members.insert(ip);
                }
                Err(_) => skipped.push(skip(&format!("bad member address {m:?}"))),
            }
        }
        out.insert(g.group_id.as_str(), Group { group: g, members });
    }
    out
}

/// The local interfaces of `net` with a TAP, by TAP.
fn interfaces<'a>(
    net: &'a HostNetwork,
    groups: &BTreeMap<&str, Group>,
    skipped: &mut Vec<Skipped>,
) -> BTreeMap<&'a str, Iface<'a>> {
    let mut out = BTreeMap::new();
    for v in &net.vpcs {
        for l in v.local.iter().filter(|l| !l.tap.is_empty()) {
            let skip = |reason: String| Skipped::Interface {
                instance_id: l.instance_id.clone(),
                tap: l.tap.clone(),
                reason,
            };
            if !valid_name(&l.tap) || l.tap.len() > crate::config::IFNAMSIZ_MAX {
                skipped.push(skip("TAP name unusable in nftables".into()));
                continue;
            }
            if out.contains_key(l.tap.as_str()) {
                skipped.push(skip("TAP listed twice".into()));
                continue;
            }
            let mac = parse_mac(&l.mac).filter(|m| m[0] & 1 == 0);
            let ip = l.private_ip.parse::<Ipv4Addr>().ok();
            if mac.is_none() || ip.is_none() {
                skipped.push(skip(
                    "bad MAC or address: all its traffic is dropped".into(),
                ));
            }
            let mut gs = BTreeSet::new();
            for g in &l.security_group_ids {
                if groups.contains_key(g.as_str()) {
                    gs.insert(g.as_str());
                } else {
                    skipped.push(skip(format!("group {g:?} is not in the state")));
                }
            }
            let iface = Iface {
                vni: v.vni,
                mac,
                ip,
                groups: gs,
            };
            out.insert(l.tap.as_str(), iface);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferro_proto::compute::v1::{GroupOnHost, LocalInterface, RemoteInterface, VpcOnHost};

    fn rule(protocol: &str, ports: (u32, u32), cidr: &str, group_id: &str) -> SecurityGroupRule {
        SecurityGroupRule {
            protocol: protocol.into(),
            from_port: ports.0,
            to_port: ports.1,
            cidr: cidr.into(),
            group_id: group_id.into(),
        }
    }

    fn group(id: &str, ingress: Vec<SecurityGroupRule>, members: &[&str]) -> GroupOnHost {
        GroupOnHost {
            group: Some(SecurityGroup {
                group_id: id.into(),
                vpc_id: "vpc-1".into(),
                ingress,
                egress: vec![rule("all", (0, 0), "0.0.0.0/0", "")],
                ..Default::default()
            }),
            member_ips: members.iter().map(|m| m.to_string()).collect(),
        }
    }

    fn local(tap: &str, n: u8, groups: &[&str]) -> LocalInterface {
        LocalInterface {
            instance_id: format!("i-{n}"),
            mac: format!("02:00:00:00:00:{n:02x}"),
            private_ip: format!("10.0.0.{n}"),
            tap: tap.into(),
            security_group_ids: groups.iter().map(|g| g.to_string()).collect(),
            ..Default::default()
        }
    }

    fn net(local: Vec<LocalInterface>, groups: Vec<GroupOnHost>) -> HostNetwork {
        HostNetwork {
            vpcs: vec![VpcOnHost {
                vpc_id: "vpc-1".into(),
                vni: 7,
                local,
                ..Default::default()
            }],
            groups,
            ..Default::default()
        }
    }

    fn rules<'a>(r: &'a Ruleset, chain: &str) -> &'a [String] {
        &r.bridge.chains[chain].rules
    }

    #[test]
    fn cidr_rules_match_the_peer_by_source_or_destination() {
        let g = group(
            "sg-a",
            vec![
                rule("tcp", (22, 22), "10.1.0.0/16", ""),
                rule("tcp", (80, 80), "10.1.2.3/16", ""),
                rule("udp", (53, 53), "192.168.0.9/32", ""),
                rule("tcp", (443, 443), "0.0.0.0/0", ""),
            ],
            &[],
        );
        let r = ruleset(&net(vec![local("fct1", 10, &["sg-a"])], vec![g]));
        assert_eq!(
            rules(&r, "gi_sg-a"),
            [
                "ip saddr 10.1.0.0/16 tcp dport 22 accept",
                "ip saddr 10.1.0.0/16 tcp dport 80 accept",
                "ip saddr 192.168.0.9 udp dport 53 accept",
                "tcp dport 443 accept",
            ]
        );
        assert_eq!(rules(&r, "ge_sg-a"), ["accept"]);
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
    }

    #[test]
    fn port_ranges_icmp_and_all() {
        let g = group(
            "sg-a",
            vec![
                rule("udp", (1000, 2000), "10.0.0.0/8", ""),
                rule("icmp", (0, 0), "10.0.0.0/8", ""),
                rule("all", (0, 0), "172.16.0.0/12", ""),
            ],
            &[],
        );
        let r = ruleset(&net(vec![local("fct1", 10, &["sg-a"])], vec![g]));
        assert_eq!(
            rules(&r, "gi_sg-a"),
            [
                "ip saddr 10.0.0.0/8 udp dport 1000-2000 accept",
                "ip saddr 10.0.0.0/8 ip protocol icmp accept",
                "ip saddr 172.16.0.0/12 accept",
            ]
        );
    }

    #[test]
    fn a_group_peer_is_a_set_of_its_members() {
        let web = group(
            "sg-web",
            vec![rule("icmp", (0, 0), "", "sg-app")],
            &["10.0.0.10"],
        );
        let mut app = group("sg-app", vec![], &["10.0.0.12", "10.0.0.11", "10.0.0.11"]);
        app.group.as_mut().unwrap().egress = vec![rule("tcp", (5432, 5432), "", "sg-web")];
        let r = ruleset(&net(
            vec![
                local("fct1", 10, &["sg-web"]),
                local("fct2", 11, &["sg-app"]),
            ],
            vec![web, app],
        ));
        assert_eq!(
            rules(&r, "gi_sg-web"),
            ["ip saddr @g_sg-app ip protocol icmp accept"]
        );
        assert_eq!(
            rules(&r, "ge_sg-app"),
            ["ip daddr @g_sg-web tcp dport 5432 accept"]
        );
        assert_eq!(
            r.bridge.sets["g_sg-app"].elements,
            ["10.0.0.11", "10.0.0.12"]
        );
        assert_eq!(r.bridge.sets["g_sg-app"].kind, "ipv4_addr");
        assert_eq!(r.bridge.sets["g_sg-web"].elements, ["10.0.0.10"]);
    }

    #[test]
    fn the_default_group_allows_its_own_members() {
        let d = group(
            "sg-default",
            vec![rule("all", (0, 0), "", "sg-default")],
            &["10.0.0.10", "10.0.0.11"],
        );
        let r = ruleset(&net(
            vec![
                local("fct1", 10, &["sg-default"]),
                local("fct2", 11, &["sg-default"]),
            ],
            vec![d],
        ));
        assert_eq!(
            rules(&r, "gi_sg-default"),
            ["ip saddr @g_sg-default accept"]
        );
        assert_eq!(
            r.bridge.sets["g_sg-default"].elements,
            ["10.0.0.10", "10.0.0.11"]
        );
        // One chain per group, jumped to by both interfaces.
        for tap in ["fct1", "fct2"] {
            assert!(rules(&r, &format!("in_{tap}")).contains(&"jump gi_sg-default".to_string()));
            assert!(rules(&r, &format!("eg_{tap}")).contains(&"jump ge_sg-default".to_string()));
        }
    }

    #[test]
    fn an_interface_with_two_groups_jumps_to_both() {
        let r = ruleset(&net(
            vec![local("fct1", 10, &["sg-b", "sg-a"])],
            vec![group("sg-a", vec![], &[]), group("sg-b", vec![], &[])],
        ));
        assert_eq!(
            rules(&r, "in_fct1"),
            [
                "meta mark & 0x01000000 == 0x01000000 accept",
                "meta mark & 0x02000000 == 0x02000000 drop",
                "ether type != ip accept",
                "jump gi_sg-a",
                "jump gi_sg-b",
                "drop",
            ]
        );
        assert_eq!(
            rules(&r, "eg_fct1")[3..],
            ["jump ge_sg-a", "jump ge_sg-b", "drop"]
        );
    }

    #[test]
    fn no_groups_and_empty_groups_allow_no_new_ipv4() {
        let r = ruleset(&net(
            vec![local("fct1", 10, &[]), local("fct2", 11, &["sg-e"])],
            vec![GroupOnHost {
                group: Some(SecurityGroup {
                    group_id: "sg-e".into(),
                    ..Default::default()
                }),
                member_ips: vec![],
            }],
        ));
        assert_eq!(rules(&r, "in_fct1").last().unwrap(), "drop");
        assert_eq!(rules(&r, "in_fct1").len(), 4);
        assert!(rules(&r, "gi_sg-e").is_empty());
        assert!(r.bridge.sets["g_sg-e"].elements.is_empty());
        // An empty set is declared without elements, an empty chain only declared.
        let text = r.bridge.render();
        assert!(
            text.contains("\tset g_sg-e {\n\t\ttype ipv4_addr\n\t}\n"),
            "{text}"
        );
        assert!(!text.contains("elements = {  }"));
    }

    #[test]
    fn bad_rules_are_left_out_and_the_rest_applies() {
        let g = group(
            "sg-a",
            vec![
                rule("tcp", (22, 22), "10.0.0.0/33", ""),
                rule("tcp", (0, 80), "10.0.0.0/8", ""),
                rule("tcp", (90, 80), "10.0.0.0/8", ""),
                rule("udp", (1, 70000), "10.0.0.0/8", ""),
                rule("gre", (0, 0), "10.0.0.0/8", ""),
                rule("all", (0, 0), "10.0.0.0/8", "sg-a"),
                rule("all", (0, 0), "", ""),
                rule("all", (0, 0), "", "sg-gone"),
                rule("tcp", (22, 22), "10.0.0.0/8", ""),
            ],
            &["10.0.0.10", "not-an-ip"],
        );
        let mut l = local("fct1", 10, &["sg-a", "sg-gone"]);
        let bad = LocalInterface {
            mac: "zz".into(),
            ..local("fct2", 11, &["sg-a"])
        };
        l.security_group_ids.push("sg-a".into());
        let r = ruleset(&net(vec![l, bad, local("bad\"tap", 12, &[])], vec![g]));
        assert_eq!(
            rules(&r, "gi_sg-a"),
            ["ip saddr 10.0.0.0/8 tcp dport 22 accept"]
        );
        let rule_skips: Vec<usize> = r
            .skipped
            .iter()
            .filter_map(|s| match s {
                Skipped::Rule {
                    group_id, index, ..
                } if group_id == "sg-a" => Some(*index),
                _ => None,
            })
            .collect();
        assert_eq!(rule_skips, [0, 1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(r.bridge.sets["g_sg-a"].elements, ["10.0.0.10"]);
        assert!(r
            .skipped
            .iter()
            .any(|s| matches!(s, Skipped::Group { reason, .. } if reason.contains("not-an-ip"))));
        // fct1: the unknown group is left out, the known one kept.
        assert_eq!(rules(&r, "in_fct1")[3..], ["jump gi_sg-a", "drop"]);
        // fct2 (bad MAC): everything it sends is dropped.
        assert_eq!(rules(&r, "as_fct2"), ["counter name spoof_fct2 drop"]);
        // The unusable TAP name is in no chain and no vmap.
        assert!(!r.bridge.render().contains("bad"));
        assert_eq!(r.skipped.len(), 8 + 1 + 1 + 1 + 1, "{:#?}", r.skipped);
    }

    #[test]
    fn vmaps_send_each_tap_to_its_chains() {
        let r = ruleset(&net(
            vec![local("fct2", 11, &[]), local("fct1", 10, &[])],
            vec![],
        ));
        assert_eq!(
            rules(&r, "prerouting"),
            ["iifname vmap { \"fct1\" : jump as_fct1, \"fct2\" : jump as_fct2 }"]
        );
        assert_eq!(
            rules(&r, "egress"),
            ["iifname vmap { \"fct1\" : jump eg_fct1, \"fct2\" : jump eg_fct2 }"]
        );
        assert_eq!(
            rules(&r, "ingress"),
            ["oifname vmap { \"fct1\" : jump in_fct1, \"fct2\" : jump in_fct2 }"]
        );
        let hook = |c: &str| r.bridge.chains[c].hook.clone().unwrap();
        assert_eq!(
            hook("egress"),
            "type filter hook forward priority 0; policy accept;"
        );
        assert_eq!(
            hook("ingress"),
            "type filter hook forward priority 10; policy accept;"
        );
        assert_eq!(
            hook("prerouting"),
            "type filter hook prerouting priority -300; policy accept;"
        );
        assert!(
            r.bridge.counters.contains("spoof_fct1") && r.bridge.counters.contains("ipv6_fct2")
        );
    }

    #[test]
    fn frames_to_the_router_mac_or_the_host_are_dropped() {
        let mut n = net(vec![local("fct1", 10, &[]), local("fct2", 11, &[])], vec![]);
        n.vpcs.push(VpcOnHost {
            vpc_id: "vpc-2".into(),
            vni: 0x10000,
            local: vec![local("fct9", 10, &[])],
            ..Default::default()
        });
        let r = ruleset(&n);
        assert_eq!(
            rules(&r, "router_mac"),
            ["iifname . ether daddr { \"fct1\" . 02:fe:00:00:07:01, \"fct2\" . 02:fe:00:00:07:01, \
              \"fct9\" . 02:fe:01:00:00:01, \"fvx7\" . 02:fe:00:00:07:01, \
              \"fvx10000\" . 02:fe:01:00:00:01 } counter name to_router drop"]
        );
        assert_eq!(
            rules(&r, "host_input"),
            [
                "iifname { \"fct1\", \"fct2\", \"fct9\", \"fvx7\", \"fvx10000\" } \
              counter name to_host drop"
            ]
        );
        let hook = |c: &str| r.bridge.chains[c].hook.clone().unwrap();
        // Before the groups' forward chains (priority 0 and 10).
        assert_eq!(
            hook("router_mac"),
            "type filter hook forward priority -10; policy accept;"
        );
        assert_eq!(
            hook("host_input"),
            "type filter hook input priority 0; policy accept;"
        );
        assert!(r.bridge.counters.contains("to_router") && r.bridge.counters.contains("to_host"));
        // No interface: the chains stay empty (no empty set in a rule).
        let r = ruleset(&net(vec![], vec![]));
        assert!(rules(&r, "router_mac").is_empty() && rules(&r, "host_input").is_empty());
    }

    /// The router between subnets: frames from a VPC's TAPs to its router
    /// MAC for an address of the VPC (here or on another host) go to that
    /// interface's MAC; a VPC's map holds only its own interfaces.
    #[test]
    fn the_router_sends_frames_for_vpc_addresses_to_their_interface() {
        let mut n = net(vec![local("fct1", 10, &[]), local("fct2", 11, &[])], vec![]);
        n.vpcs[0].remote.push(RemoteInterface {
            instance_id: "i-r".into(),
            mac: "02:00:00:00:01:01".into(),
            private_ip: "10.0.1.4".into(),
            host_id: "h2".into(),
            underlay_ip: "10.99.0.2".into(),
        });
        n.vpcs[0].remote.push(RemoteInterface {
            mac: "not a mac".into(),
            private_ip: "10.0.1.5".into(),
            ..Default::default()
        });
        n.vpcs.push(VpcOnHost {
            vpc_id: "vpc-2".into(),
            vni: 9,
            local: vec![local("fct9", 12, &[])],
            ..Default::default()
        });
        let r = ruleset(&n);
        assert_eq!(
            rules(&r, "route"),
            [
                "iifname { \"fct1\", \"fct2\" } ether daddr 02:fe:00:00:07:01 ether daddr set ip daddr map \
                 { 10.0.0.10 : 02:00:00:00:00:0a, 10.0.0.11 : 02:00:00:00:00:0b, 10.0.1.4 : 02:00:00:00:01:01 }",
                "iifname { \"fct9\" } ether daddr 02:fe:00:00:09:01 ether daddr set ip daddr map \
                 { 10.0.0.12 : 02:00:00:00:00:0c }",
            ]
        );
        // After anti-spoofing (-300), before the bridge's forwarding.
        assert_eq!(
            r.bridge.chains["route"].hook.as_deref(),
            Some("type filter hook prerouting priority -200; policy accept;")
        );
        assert!(rules(&ruleset(&net(vec![], vec![])), "route").is_empty());
    }

    #[test]
    fn each_vpc_has_its_conntrack_zone() {
        let mut n = net(vec![local("fct1", 10, &[])], vec![]);
        n.vpcs.push(VpcOnHost {
            vpc_id: "vpc-2".into(),
            vni: 0x10000,
            local: vec![local("fct9", 10, &[])],
            ..Default::default()
        });
        let r = ruleset(&n);
        assert_eq!(
            r.ip.chains["zone"].rules,
            ["ct zone set iifname map { \"fbr10000\" : 1, \"fbr7\" : 7 }"]
        );
        assert_eq!(r.ip.sets["bridges"].elements, ["\"fbr10000\"", "\"fbr7\""]);
        assert_eq!(r.ip.chains["state"].rules[0], "iifname != @bridges return");
        assert_eq!(zone(1), 1);
        assert_eq!(zone(65535), 65535);
        // VNI 65536 shares zone 1 with VNI 1 (a host with both and the same addresses is far off).
        assert_eq!(zone(65536), 1);
    }

    #[test]
    fn the_underlay_vxlan_packets_are_not_tracked() {
        let r = ruleset(&net(vec![], vec![]));
        let port = crate::desired::vxlan_port();
        let chain = |c: &str| r.ip.chains[c].clone();
        assert_eq!(
            chain("vxlan_in").rules,
            [format!(
                "udp dport {port} iifname != @bridges fib daddr type local notrack"
            )]
        );
        assert_eq!(
            chain("vxlan_in").hook.as_deref(),
            Some("type filter hook prerouting priority -300; policy accept;")
        );
        assert_eq!(
            chain("vxlan_out").rules,
            [format!("udp dport {port} notrack")]
        );
        assert_eq!(
            chain("vxlan_out").hook.as_deref(),
            Some("type filter hook output priority -300; policy accept;")
        );
        // Before conntrack (-200); the bridged (inner) packets are still
        // put in their zones and marked.
        let with_vpc = ruleset(&net(vec![local("fct1", 10, &[])], vec![]));
        assert!(!with_vpc.ip.chains["zone"].rules.is_empty());
        assert_eq!(with_vpc.ip.chains["vxlan_in"], chain("vxlan_in"));
    }

    #[test]
    fn the_output_is_deterministic() {
        let a = group(
            "sg-a",
            vec![rule("tcp", (1, 2), "", "sg-b")],
            &["10.0.0.10", "10.0.0.11"],
        );
        let b = group(
            "sg-b",
            vec![rule("icmp", (0, 0), "10.0.0.0/8", "")],
            &["10.0.0.11"],
        );
        let l1 = local("fct1", 10, &["sg-a", "sg-b"]);
        let l2 = local("fct2", 11, &["sg-b"]);
        let one = ruleset(&net(
            vec![l1.clone(), l2.clone()],
            vec![a.clone(), b.clone()],
        ));
        let mut l1r = l1;
        l1r.security_group_ids.reverse();
        let two = ruleset(&net(vec![l2, l1r], vec![b, a]));
        let none = [Existing::default(), Existing::default()];
        assert_eq!(one.script(&none), two.script(&none));
        assert_eq!(one, two);
    }

    #[test]
    fn the_transaction_replaces_and_deletes_what_is_stale() {
        let r = ruleset(&net(
            vec![local("fct1", 10, &["sg-a"])],
            vec![group("sg-a", vec![], &[])],
        ));
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        let bridge = Existing {
            chains: names(&["as_fct1", "as_gone", "in_gone"]),
            sets: names(&["g_sg-a", "g_sg-old"]),
            counters: names(&["spoof_fct1", "spoof_gone"]),
        };
        let s = r.script(&[bridge, Existing::default()]);
        let pos = |needle: &str| {
            s.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} not in\n{s}"))
        };
        assert!(
            pos("table bridge ferro {\n\tcounter ipv6_fct1 {\n\t}\n")
                < pos("flush table bridge ferro\n")
        );
        assert!(pos("flush table ip ferro\n") < pos("delete chain bridge ferro as_gone\n"));
        pos("delete chain bridge ferro in_gone\n");
        pos("delete set bridge ferro g_sg-old\n");
        pos("delete counter bridge ferro spoof_gone\n");
        assert!(!s.contains("delete chain bridge ferro as_fct1"));
        assert!(!s.contains("delete counter bridge ferro spoof_fct1"));
        assert!(
            pos("delete counter bridge ferro spoof_gone") < pos("flush set bridge ferro g_sg-a\n")
        );
        assert!(pos("flush set bridge ferro g_sg-a\n") < pos("\t\tjump gi_sg-a\n"));
        assert!(!s.contains("table inet") && !s.contains("ruleset"));
    }

    #[test]
    fn existing_objects_are_read_from_a_listing() {
        let listing =
            "table bridge ferro {\n\tcounter spoof_fct1 {\n\t\tpackets 0 bytes 0\n\t}\n\n\
            \tset g_sg-a {\n\t\ttype ipv4_addr\n\t}\n\n\
            \tchain prerouting {\n\t\ttype filter hook prerouting priority -300; policy accept;\n\
            \t\tiifname vmap { \"fct1\" : jump as_fct1 }\n\t}\n\n\tchain as_fct1 {\n\t}\n}\n";
        let e = parse_existing(listing);
        assert_eq!(
            e.chains.iter().collect::<Vec<_>>(),
            ["as_fct1", "prerouting"]
        );
        assert_eq!(e.sets.iter().collect::<Vec<_>>(), ["g_sg-a"]);
        assert_eq!(e.counters.iter().collect::<Vec<_>>(), ["spoof_fct1"]);
    }
}
