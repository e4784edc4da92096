//! The controller's [`HostNetwork`] turned into what this host's dataplane
//! should be: device names, parsed addresses, one entry per VPC with local
//! interfaces. Entries the controller sent malformed are left out (and
//! logged once per state) rather than failing the whole state.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::OnceLock;

use ferro_proto::compute::v1::{HostNetwork, LocalInterface, VpcOnHost};

/// A MAC address.
pub type Mac = [u8; 6];

/// The default name prefix: bridges `fbr<vni hex>`, VXLAN devices
/// `fvx<vni hex>`.
pub const DEFAULT_NAME_PREFIX: &str = "f";
/// The IANA VXLAN port.
pub const DEFAULT_VXLAN_PORT: u16 = 4789;
/// Largest 24-bit VNI.
pub const MAX_VNI: u32 = 0x00ff_ffff;

/// How this netd names its devices and which UDP port its VXLAN devices
/// use. One netd per host network namespace uses the defaults; several in
/// one namespace (`ferro up` beside a test's, say) each need their own, or
/// they would take each other's devices for stale ones.
#[derive(Clone, Debug)]
pub struct Naming {
    bridge: String,
    vxlan: String,
    table: String,
    port: u16,
}

static NAMING: OnceLock<Naming> = OnceLock::new();

/// Sets the process's naming once, at start (later calls change nothing).
pub fn set_naming(prefix: &str, port: u16) {
    let table = if prefix == DEFAULT_NAME_PREFIX {
        "ferro".to_string()
    } else {
        format!("ferro_{prefix}")
    };
    let _ = NAMING.set(Naming {
        bridge: format!("{prefix}br"),
        vxlan: format!("{prefix}vx"),
        table,
        port,
    });
}

fn naming() -> &'static Naming {
    NAMING.get_or_init(|| Naming {
        bridge: format!("{DEFAULT_NAME_PREFIX}br"),
        vxlan: format!("{DEFAULT_NAME_PREFIX}vx"),
        table: "ferro".into(),
        port: DEFAULT_VXLAN_PORT,
    })
}

/// Prefix of netd's bridges (`fbr`, then the VNI in hex).
pub fn bridge_prefix() -> &'static str {
    &naming().bridge
}

/// Prefix of netd's VXLAN devices (`fvx`, then the VNI in hex).
pub fn vxlan_prefix() -> &'static str {
    &naming().vxlan
}

/// The name of netd's nftables tables (`ferro`, or `ferro_<prefix>`).
pub fn table_name() -> &'static str {
    &naming().table
}

/// The UDP port of the VXLAN devices.
pub fn vxlan_port() -> u16 {
    naming().port
}

/// The bridge of VNI `vni`.
pub fn bridge_name(vni: u32) -> String {
    format!("{}{vni:x}", bridge_prefix())
}

/// The VXLAN device of VNI `vni`.
pub fn vxlan_name(vni: u32) -> String {
    format!("{}{vni:x}", vxlan_prefix())
}

/// The VNI of a netd device name of `prefix`, when it is exactly what
/// [`bridge_name`]/[`vxlan_name`] would produce.
pub fn vni_of(name: &str, prefix: &str) -> Option<u32> {
    let hex = name.strip_prefix(prefix)?;
    let vni = u32::from_str_radix(hex, 16).ok()?;
    (vni <= MAX_VNI && format!("{prefix}{vni:x}") == name).then_some(vni)
}

/// Whether `name` is one of netd's bridges or VXLAN devices.
pub fn is_ours(name: &str) -> bool {
    vni_of(name, bridge_prefix()).is_some() || vni_of(name, vxlan_prefix()).is_some()
}

/// The source MAC of DHCP answers (later: of the VPC router) in VNI `vni`:
/// locally administered, unicast, the same on every host.
pub fn router_mac(vni: u32) -> Mac {
    let [_, a, b, c] = vni.to_be_bytes();
    [0x02, 0xfe, a, b, c, 0x01]
}

/// `aa:bb:cc:dd:ee:ff` (case-insensitive).
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `a.b.c.d/len` as (network, prefix length).
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: Ipv4Addr = ip.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    (len <= 32).then_some((ip, len))
}

/// The netmask of a prefix length.
pub fn netmask(len: u8) -> Ipv4Addr {
    let bits = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    Ipv4Addr::from(bits)
}

/// One VPC's dataplane on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vpc {
    /// The VPC id (for logs).
    pub vpc_id: String,
    /// The VXLAN network identifier.
    pub vni: u32,
    /// TAPs of local interfaces that exist in the state (non-empty names).
    pub taps: Vec<String>,
    /// Remote interfaces reachable over the underlay: MAC → (IP, the
    /// underlay address of their host).
    pub remotes: BTreeMap<Mac, (Ipv4Addr, Ipv4Addr)>,
}

impl Vpc {
    /// This VPC's bridge.
    pub fn bridge(&self) -> String {
        bridge_name(self.vni)
    }
    /// This VPC's VXLAN device.
    pub fn vxlan(&self) -> String {
        vxlan_name(self.vni)
    }
}

/// How this host's VXLAN devices are built (from the configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Underlay {
    /// The source address of VXLAN packets.
    pub local_ip: Ipv4Addr,
    /// The device they leave by, if pinned.
    pub dev: Option<String>,
    /// The inner MTU of bridges and VXLAN devices.
    pub mtu: u32,
}

/// The whole dataplane this host should have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// How VXLAN devices are built.
    pub underlay: Underlay,
    /// By VNI.
    pub vpcs: BTreeMap<u32, Vpc>,
}

/// Something in a state that netd leaves out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Skipped {
    /// A VPC's VNI is 0, larger than 24 bits, or another VPC's.
    #[error("VPC {vpc_id}: VNI {vni} is not a usable 24-bit VNI or is used twice")]
    Vni {
        /// The VPC.
        vpc_id: String,
        /// Its VNI.
        vni: u32,
    },
    /// A remote interface with a malformed MAC or address.
    #[error("VPC {vpc_id}: remote interface {instance_id}: bad MAC or address")]
    Remote {
        /// The VPC.
        vpc_id: String,
        /// The instance.
        instance_id: String,
    },
    /// A TAP name the kernel cannot have.
    #[error("VPC {vpc_id}: interface {instance_id}: bad TAP name {tap:?}")]
    Tap {
        /// The VPC.
        vpc_id: String,
        /// The instance.
        instance_id: String,
        /// The name.
        tap: String,
    },
}

/// Whether `tap` can be an interface name and is not one of netd's own.
fn valid_tap(tap: &str) -> bool {
    tap.len() <= crate::config::IFNAMSIZ_MAX
        && !tap.contains(['/', ' ', ':'])
        && tap != "."
        && tap != ".."
        && !is_ours(tap)
}

impl Desired {
    /// What `net` asks of this host, and what in it was left out.
    pub fn from_state(net: &HostNetwork, underlay: &Underlay) -> (Self, Vec<Skipped>) {
        let mut skipped = Vec::new();
        let mut vpcs = BTreeMap::new();
        for v in &net.vpcs {
            if v.local.is_empty() {
                continue;
            }
            if v.vni == 0 || v.vni > MAX_VNI || vpcs.contains_key(&v.vni) {
                skipped.push(Skipped::Vni {
                    vpc_id: v.vpc_id.clone(),
                    vni: v.vni,
                });
                continue;
            }
            vpcs.insert(v.vni, vpc(v, &mut skipped));
        }
        let desired = Desired {
            underlay: underlay.clone(),
            vpcs,
        };
        (desired, skipped)
    }
}

fn vpc(v: &VpcOnHost, skipped: &mut Vec<Skipped>) -> Vpc {
    let mut taps = Vec::new();
    for l in &v.local {
        if l.tap.is_empty() {
            continue;
        }
        if valid_tap(&l.tap) {
            taps.push(l.tap.clone());
        } else {
            skipped.push(Skipped::Tap {
                vpc_id: v.vpc_id.clone(),
                instance_id: l.instance_id.clone(),
                tap: l.tap.clone(),
            });
        }
    }
    let mut remotes = BTreeMap::new();
    for r in &v.remote {
        if r.underlay_ip.is_empty() {
            continue;
        }
        let parsed = (
            parse_mac(&r.mac),
            r.private_ip.parse::<Ipv4Addr>(),
            r.underlay_ip.parse::<Ipv4Addr>(),
        );
        match parsed {
            (Some(mac), Ok(ip), Ok(under)) if mac[0] & 1 == 0 && mac != [0; 6] => {
                remotes.insert(mac, (ip, under));
            }
            _ => skipped.push(Skipped::Remote {
                vpc_id: v.vpc_id.clone(),
                instance_id: r.instance_id.clone(),
            }),
        }
    }
    Vpc {
        vpc_id: v.vpc_id.clone(),
        vni: v.vni,
        taps,
        remotes,
    }
}

/// The local interfaces of `net` with their VPC's VNI: what the DHCP
/// servers serve.
pub fn local_interfaces(net: &HostNetwork) -> impl Iterator<Item = (&VpcOnHost, &LocalInterface)> {
    net.vpcs
        .iter()
        .filter(|v| v.vni != 0 && v.vni <= MAX_VNI)
        .flat_map(|v| v.local.iter().map(move |l| (v, l)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferro_proto::compute::v1::RemoteInterface;

    #[test]
    fn names_round_trip_and_fit() {
        assert_eq!(bridge_name(0xabcdef), "fbrabcdef");
        assert_eq!(vxlan_name(1), "fvx1");
        assert!(bridge_name(MAX_VNI).len() <= 15);
        assert_eq!(vni_of("fvx1f", vxlan_prefix()), Some(0x1f));
        assert_eq!(vni_of("fvx01", vxlan_prefix()), None);
        assert_eq!(vni_of("fvx", vxlan_prefix()), None);
        assert_eq!(vni_of("fbr1000000", bridge_prefix()), None);
        assert!(is_ours("fbr2"));
        assert!(!is_ours("fct1"));
    }

    #[test]
    fn macs_and_masks() {
        assert_eq!(parse_mac("02:AA:00:00:00:01"), Some([2, 0xaa, 0, 0, 0, 1]));
        assert_eq!(parse_mac("02:aa:00:00:00"), None);
        assert_eq!(parse_mac("02:aa:00:00:00:01:02"), None);
        assert_eq!(parse_mac("2:aa:00:00:00:01"), None);
        assert_eq!(fmt_mac(&[2, 0xaa, 0, 0, 0, 1]), "02:aa:00:00:00:01");
        assert_eq!(netmask(20), Ipv4Addr::new(255, 255, 240, 0));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(
            parse_cidr("10.0.0.0/24"),
            Some((Ipv4Addr::new(10, 0, 0, 0), 24))
        );
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(router_mac(0x010203), [2, 0xfe, 1, 2, 3, 1]);
    }

    #[test]
    fn malformed_entries_are_left_out() {
        let underlay = Underlay {
            local_ip: Ipv4Addr::new(10, 99, 0, 1),
            dev: None,
            mtu: 1450,
        };
        let local = |tap: &str| LocalInterface {
            instance_id: "i-1".into(),
            tap: tap.into(),
            ..Default::default()
        };
        let remote = |mac: &str, under: &str| RemoteInterface {
            instance_id: "i-2".into(),
            mac: mac.into(),
            private_ip: "10.0.0.5".into(),
            underlay_ip: under.into(),
            ..Default::default()
        };
        let net = HostNetwork {
            vpcs: vec![
                VpcOnHost {
                    vpc_id: "vpc-1".into(),
                    vni: 7,
                    local: vec![local("fct1"), local(""), local("fbr9")],
                    remote: vec![
                        remote("02:00:00:00:00:05", "10.99.0.2"),
                        remote("02:00:00:00:00:06", ""),
                        remote("zz", "10.99.0.2"),
                    ],
                    ..Default::default()
                },
                VpcOnHost {
                    vpc_id: "vpc-2".into(),
                    vni: 7,
                    local: vec![local("fct2")],
                    ..Default::default()
                },
                VpcOnHost {
                    vpc_id: "vpc-3".into(),
                    vni: 8,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let (d, skipped) = Desired::from_state(&net, &underlay);
        assert_eq!(d.vpcs.len(), 1);
        let v = &d.vpcs[&7];
        assert_eq!(v.taps, ["fct1"]);
        assert_eq!(v.remotes.len(), 1);
        assert_eq!(skipped.len(), 3, "{skipped:?}");
    }
}
