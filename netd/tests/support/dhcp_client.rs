//! A DHCP client for instance namespaces: DISCOVER, OFFER, REQUEST, ACK
//! over a packet socket on the instance's `eth0`, checking what comes back
//! the way a guest would (Ethernet and IP addresses, both checksums,
//! ports, xid) before decoding it with dhcproto.

use std::net::Ipv4Addr;
use std::time::Duration;

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use ferro_netd::dhcp::frame::{build_udp4, Udp4, BROADCAST_MAC};
use ferro_netd::dhcp::socket::AsyncPacketSocket;

use super::in_ns;

/// What the server gave, as a guest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// yiaddr.
    pub ip: Ipv4Addr,
    /// Option 1.
    pub mask: Option<Ipv4Addr>,
    /// Option 3.
    pub router: Vec<Ipv4Addr>,
    /// Option 6.
    pub dns: Vec<Ipv4Addr>,
    /// Option 26.
    pub mtu: Option<u16>,
    /// Option 12.
    pub hostname: Option<String>,
    /// Option 51.
    pub lease_secs: Option<u32>,
    /// Option 54.
    pub server_id: Option<Ipv4Addr>,
    /// The answers' Ethernet source.
    pub server_mac: [u8; 6],
    /// The answers' IP source.
    pub server_ip: Ipv4Addr,
    /// The ACK's Ethernet destination.
    pub acked_to: [u8; 6],
}

/// RFC 1071, written again here so the test does not trust netd's.
fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// A checked answer: DHCP payload, Ethernet source, IP source, Ethernet
/// destination.
type Checked = (Vec<u8>, [u8; 6], Ipv4Addr, [u8; 6]);

/// An answer decoded: the message and the rest of [`Checked`].
type Answer = (Message, [u8; 6], Ipv4Addr, [u8; 6]);

/// Check a frame as a client would; the DHCP payload.
fn check_frame(f: &[u8], mac: [u8; 6], broadcast: bool) -> Option<Checked> {
    if f.len() < 42 || f[12..14] != [8, 0] {
        return None;
    }
    let dst_mac: [u8; 6] = f[0..6].try_into().unwrap();
    let src_mac: [u8; 6] = f[6..12].try_into().unwrap();
    let want_dst = if broadcast { BROADCAST_MAC } else { mac };
    if dst_mac != want_dst {
        return None;
    }
    let ip = &f[14..];
    assert_eq!(ip[0], 0x45, "IPv4 without options");
    assert_eq!(fold(sum16(&ip[..20])), 0xffff, "IPv4 header checksum");
    assert_eq!(ip[9], 17);
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let udp = &ip[20..total];
    assert_eq!(&udp[0..4], &[0, 67, 0, 68], "ports 67 -> 68");
    let ulen = u16::from_be_bytes([udp[4], udp[5]]);
    assert_eq!(usize::from(ulen), udp.len());
    let pseudo = sum16(&ip[12..20]) + 17 + u32::from(ulen);
    assert_eq!(fold(pseudo + sum16(udp)), 0xffff, "UDP checksum");
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    Some((udp[8..].to_vec(), src_mac, src_ip, dst_mac))
}

fn request(kind: MessageType, mac: [u8; 6], xid: u32, broadcast: bool) -> Message {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(xid, z, z, z, z, &mac);
    if broadcast {
        m.set_flags(Flags::default().set_broadcast());
    }
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m.opts_mut().insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::Hostname,
        OptionCode::InterfaceMtu,
    ]));
    m
}

fn frame(m: &Message, mac: [u8; 6]) -> Vec<u8> {
    let payload = m.to_vec().unwrap();
    build_udp4(&Udp4 {
        src_mac: mac,
        dst_mac: BROADCAST_MAC,
        src_ip: Ipv4Addr::UNSPECIFIED,
        dst_ip: Ipv4Addr::BROADCAST,
        src_port: 68,
        dst_port: 67,
        payload: &payload,
    })
}

struct Client {
    sock: AsyncPacketSocket,
    mac: [u8; 6],
    broadcast: bool,
}

impl Client {
    /// Send `m` (up to 3 times, 1 s apart) until an answer of `want`
    /// with `m`'s xid arrives.
    async fn exchange(&self, m: &Message, want: MessageType) -> Option<Answer> {
        let f = frame(m, self.mac);
        for _ in 0..3 {
            self.sock.send(&f).unwrap();
            let got = tokio::time::timeout(Duration::from_secs(1), self.answer(m.xid())).await;
            if let Ok(Some((a, smac, sip, dmac))) = got {
                if a.opts().msg_type() == Some(want) {
                    return Some((a, smac, sip, dmac));
                }
                panic!("answered {:?}, wanted {want:?}", a.opts().msg_type());
            }
        }
        None
    }

    async fn answer(&self, xid: u32) -> Option<Answer> {
        let mut buf = vec![0u8; 2048];
        loop {
            let n = self.sock.recv(&mut buf).await.ok()?;
            let Some((p, smac, sip, dmac)) = check_frame(&buf[..n], self.mac, self.broadcast)
            else {
                continue;
            };
            let m = Message::decode(&mut Decoder::new(&p)).expect("decodable answer");
            if m.xid() == xid && m.opcode() == Opcode::BootReply {
                return Some((m, smac, sip, dmac));
            }
        }
    }
}

/// Run DHCP on `eth0` of namespace `ns` whose MAC is `mac`; `None` when
/// no server answers (after 3 DISCOVERs).
pub async fn obtain(ns: &str, mac: &str, broadcast: bool) -> Option<Lease> {
    let mac = ferro_netd::desired::parse_mac(mac).unwrap();
    let sock = in_ns(ns, || {
        // SAFETY: a NUL-terminated name.
        let idx = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
        assert_ne!(idx, 0, "no eth0 in {ns}");
        ferro_netd::dhcp::socket::open(idx, 68).unwrap()
    });
    let c = Client {
        sock: AsyncPacketSocket::new(sock).unwrap(),
        mac,
        broadcast,
    };
    let xid = 0x5eed_0000 | u32::from(mac[5]);
    let (offer, _, _, _) = c
        .exchange(
            &request(MessageType::Discover, mac, xid, broadcast),
            MessageType::Offer,
        )
        .await?;
    let mut req = request(MessageType::Request, mac, xid + 1, broadcast);
    req.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(offer.yiaddr()));
    if let Some(DhcpOption::ServerIdentifier(s)) = offer.opts().get(OptionCode::ServerIdentifier) {
        req.opts_mut().insert(DhcpOption::ServerIdentifier(*s));
    }
    let (ack, server_mac, server_ip, acked_to) = c.exchange(&req, MessageType::Ack).await?;
    let o = ack.opts();
    Some(Lease {
        ip: ack.yiaddr(),
        mask: match o.get(OptionCode::SubnetMask) {
            Some(DhcpOption::SubnetMask(m)) => Some(*m),
            _ => None,
        },
        router: match o.get(OptionCode::Router) {
            Some(DhcpOption::Router(r)) => r.clone(),
            _ => vec![],
        },
        dns: match o.get(OptionCode::DomainNameServer) {
            Some(DhcpOption::DomainNameServer(r)) => r.clone(),
            _ => vec![],
        },
        mtu: match o.get(OptionCode::InterfaceMtu) {
            Some(DhcpOption::InterfaceMtu(m)) => Some(*m),
            _ => None,
        },
        hostname: match o.get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(h)) => Some(h.clone()),
            _ => None,
        },
        lease_secs: match o.get(OptionCode::AddressLeaseTime) {
            Some(DhcpOption::AddressLeaseTime(t)) => Some(*t),
            _ => None,
        },
        server_id: match o.get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(s)) => Some(*s),
            _ => None,
        },
        server_mac,
        server_ip,
        acked_to,
    })
}
