//! DHCP for local interfaces: each interface's address is fixed by the
//! controller, so the server is stateless. [`respond`] is the whole
//! decision, a pure function from a frame the guest sent to the frame to
//! send back; [`server`] runs one packet socket per TAP around it.
//!
//! Only the interface's own MAC is answered (the socket is bound to its
//! TAP, so the TAP identifies the interface and the MAC authenticates the
//! request). The answer leaves the TAP as a frame from the VPC's router MAC
//! and the router's address: the bridge has no address of its own.

pub mod frame;
pub mod server;
pub mod socket;

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, HType, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use ferro_proto::compute::v1::LocalInterface;

use crate::desired::{self, Mac};
use frame::{Udp4, BROADCAST_MAC};

/// Lease time announced (option 51). Leases never change while the
/// interface exists, so this only bounds how long a guest keeps an
/// address after its interface is gone.
pub const LEASE_SECS: u32 = 3600;
/// The DHCP server port.
pub const SERVER_PORT: u16 = 67;
/// The DHCP client port.
pub const CLIENT_PORT: u16 = 68;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const FIXED_LEN: usize = 240;

/// What one local interface is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The instance (for logs).
    pub instance_id: String,
    /// The interface's MAC: the only client answered.
    pub mac: Mac,
    /// Its address (yiaddr).
    pub ip: Ipv4Addr,
    /// Its subnet's mask (option 1).
    pub mask: Ipv4Addr,
    /// The subnet's router (option 3), also the server id (option 54).
    pub router: Ipv4Addr,
    /// The DNS resolver (option 6), if any.
    pub dns: Option<Ipv4Addr>,
    /// Option 12, if any.
    pub hostname: String,
    /// Option 26.
    pub mtu: u16,
    /// Source MAC of answers.
    pub router_mac: Mac,
}

/// A local interface the controller described in a way DHCP cannot use.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("interface of {instance_id}: bad {field} {value:?}")]
pub struct BadInterface {
    /// The instance.
    pub instance_id: String,
    /// The field.
    pub field: &'static str,
    /// Its value.
    pub value: String,
}

impl Lease {
    /// The lease of `iface` in the VPC of `vni`, announcing `mtu`.
    pub fn new(iface: &LocalInterface, vni: u32, mtu: u32) -> Result<Self, BadInterface> {
        let bad = |field, value: &str| BadInterface {
            instance_id: iface.instance_id.clone(),
            field,
            value: value.to_string(),
        };
        let ip = |field, v: &str| v.parse::<Ipv4Addr>().map_err(|_| bad(field, v));
        let mac = desired::parse_mac(&iface.mac)
            .filter(|m| m[0] & 1 == 0)
            .ok_or_else(|| bad("mac", &iface.mac))?;
        let (_, len) = desired::parse_cidr(&iface.subnet_cidr)
            .ok_or_else(|| bad("subnet_cidr", &iface.subnet_cidr))?;
        let dns = match iface.dns_ip.as_str() {
            "" => None,
            v => Some(ip("dns_ip", v)?),
        };
        Ok(Lease {
            instance_id: iface.instance_id.clone(),
            mac,
            ip: ip("private_ip", &iface.private_ip)?,
            mask: desired::netmask(len),
            router: ip("router_ip", &iface.router_ip)?,
            dns,
            hostname: iface.hostname.clone(),
            mtu: u16::try_from(mtu.clamp(576, 9000)).unwrap_or(1500),
            router_mac: desired::router_mac(vni),
        })
    }
}

/// Why a frame from a guest is dropped as malformed (counted, never
/// answered).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Not a well-formed IPv4/UDP frame.
    #[error(transparent)]
    Frame(#[from] frame::FrameError),
    /// Too short for BOOTP or without the DHCP magic cookie.
    #[error("not a DHCP message")]
    NotDhcp,
    /// dhcproto could not decode it.
    #[error("undecodable DHCP message: {0}")]
    Decode(String),
    /// Not a BOOTREQUEST.
    #[error("not a BOOTREQUEST")]
    NotRequest,
    /// Not Ethernet hardware addresses.
    #[error("hardware type or length is not Ethernet")]
    NotEthernet,
    /// No option 53.
    #[error("no DHCP message type")]
    NoMessageType,
    /// Options overrun the message, or one netd reads has a bad length
    /// or is repeated.
    #[error("malformed options")]
    Options,
}

/// The answer to `frame`, a frame the guest of `lease` sent on its TAP:
/// `Ok(None)` when nothing is to be answered (another MAC, another
/// server's transaction, a RELEASE), `Err` when the frame is malformed.
pub fn respond(lease: &Lease, frame: &[u8]) -> Result<Option<Vec<u8>>, Malformed> {
    let udp = frame::parse_udp4(frame)?;
    if udp.dst_port != SERVER_PORT {
        return Ok(None);
    }
    if udp.src_mac != lease.mac {
        return Ok(None);
    }
    let p = udp.payload;
    if p.len() < FIXED_LEN || p[236..240] != MAGIC {
        return Err(Malformed::NotDhcp);
    }
    let clean = sanitize(p)?;
    let req =
        Message::decode(&mut Decoder::new(&clean)).map_err(|e| Malformed::Decode(e.to_string()))?;
    if req.opcode() != Opcode::BootRequest {
        return Err(Malformed::NotRequest);
    }
    // Checked before chaddr(), which slices by hlen.
    if req.htype() != HType::Eth || req.hlen() != 6 {
        return Err(Malformed::NotEthernet);
    }
    if req.chaddr() != lease.mac {
        return Ok(None);
    }
    let kind = req.opts().msg_type().ok_or(Malformed::NoMessageType)?;
    let answer = match kind {
        MessageType::Discover => Some(Answer::Offer),
        MessageType::Request => decide_request(lease, &req),
        MessageType::Inform => Some(Answer::Inform),
        // A static lease: nothing to free or to mark declined.
        _ => None,
    };
    Ok(answer.map(|a| reply(lease, &req, a)))
}

/// The options a request is read for, with the lengths they must have
/// (`None`: any non-zero length).
const READ_OPTIONS: [(u8, Option<usize>); 8] = [
    (12, None),    // host name
    (50, Some(4)), // requested address
    (53, Some(1)), // message type
    (54, Some(4)), // server identifier
    (55, None),    // parameter request list
    (57, Some(2)), // maximum message size
    (60, None),    // vendor class
    (61, None),    // client identifier
];

/// `p` with only the options netd reads, each checked for its length,
/// ending in an end option. dhcproto's decoders of some other options
/// assert on their length (a guest could make netd panic) and netd has no
/// use for them.
fn sanitize(p: &[u8]) -> Result<Vec<u8>, Malformed> {
    let mut out = p[..FIXED_LEN].to_vec();
    let mut i = FIXED_LEN;
    while i < p.len() {
        let code = p[i];
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let len = usize::from(*p.get(i + 1).ok_or(Malformed::Options)?);
        let value = p.get(i + 2..i + 2 + len).ok_or(Malformed::Options)?;
        let wanted = READ_OPTIONS.iter().find(|(c, _)| *c == code);
        if let Some((_, want)) = wanted {
            if len == 0 || want.is_some_and(|w| w != len) {
                return Err(Malformed::Options);
            }
            if seen(&out, code) {
                // A repeated option (RFC 3396 concatenation): none of
                // these needs it.
                return Err(Malformed::Options);
            }
            out.extend_from_slice(&[code, len as u8]);
            out.extend_from_slice(value);
        }
        i += 2 + len;
    }
    out.push(255);
    Ok(out)
}

/// Whether the sanitized options in `out` already hold `code`.
fn seen(out: &[u8], code: u8) -> bool {
    let mut i = FIXED_LEN;
    while i + 1 < out.len() {
        if out[i] == code {
            return true;
        }
        i += 2 + usize::from(out[i + 1]);
    }
    false
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Offer,
    Ack,
    Nak,
    Inform,
}

fn decide_request(lease: &Lease, req: &Message) -> Option<Answer> {
    if let Some(DhcpOption::ServerIdentifier(s)) = req.opts().get(OptionCode::ServerIdentifier) {
        if *s != lease.router {
            // The client took another server's offer.
            return None;
        }
    }
    let asked = match req.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => *ip,
        _ => req.ciaddr(),
    };
    Some(if asked == lease.ip {
        Answer::Ack
    } else {
        Answer::Nak
    })
}

fn reply(lease: &Lease, req: &Message, a: Answer) -> Vec<u8> {
    let mut m = Message::new_with_id(
        req.xid(),
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        req.giaddr(),
        &lease.mac,
    );
    m.set_opcode(Opcode::BootReply).set_flags(req.flags());
    let o = m.opts_mut();
    let kind = match a {
        Answer::Offer => MessageType::Offer,
        Answer::Nak => MessageType::Nak,
        Answer::Ack | Answer::Inform => MessageType::Ack,
    };
    o.insert(DhcpOption::MessageType(kind));
    o.insert(DhcpOption::ServerIdentifier(lease.router));
    if a != Answer::Nak {
        o.insert(DhcpOption::SubnetMask(lease.mask));
        o.insert(DhcpOption::Router(vec![lease.router]));
        if let Some(dns) = lease.dns {
            o.insert(DhcpOption::DomainNameServer(vec![dns]));
        }
        o.insert(DhcpOption::InterfaceMtu(lease.mtu));
        if !lease.hostname.is_empty() {
            o.insert(DhcpOption::Hostname(lease.hostname.clone()));
        }
    }
    if matches!(a, Answer::Offer | Answer::Ack) {
        m.set_yiaddr(lease.ip);
        let o = m.opts_mut();
        o.insert(DhcpOption::AddressLeaseTime(LEASE_SECS));
        o.insert(DhcpOption::Renewal(LEASE_SECS / 2));
        o.insert(DhcpOption::Rebinding(LEASE_SECS / 8 * 7));
    }
    if a == Answer::Inform {
        m.set_ciaddr(req.ciaddr());
    }
    // Encoding our own message of bounded fields cannot fail; an empty
    // payload would be dropped by the client anyway.
    let payload = m.to_vec().unwrap_or_default();
    let broadcast = a == Answer::Nak || (req.ciaddr().is_unspecified() && req.flags().broadcast());
    let (dst_mac, dst_ip) = if broadcast {
        (BROADCAST_MAC, Ipv4Addr::BROADCAST)
    } else if !req.ciaddr().is_unspecified() {
        (lease.mac, req.ciaddr())
    } else {
        (lease.mac, lease.ip)
    };
    frame::build_udp4(&Udp4 {
        src_mac: lease.router_mac,
        dst_mac,
        src_ip: lease.router,
        dst_ip,
        src_port: SERVER_PORT,
        dst_port: CLIENT_PORT,
        payload: &payload,
    })
}

#[cfg(test)]
mod tests;
