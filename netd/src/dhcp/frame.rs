//! Ethernet II / IPv4 / UDP frames, parsed and built by hand: netd's
//! bridges have no IP address (two VPCs may use the same block), so DHCP
//! answers are written straight onto the TAP as whole frames.

use std::net::Ipv4Addr;

use crate::desired::Mac;

/// Ethertype of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// The broadcast MAC.
pub const BROADCAST_MAC: Mac = [0xff; 6];
const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const UDP_LEN: usize = 8;
const PROTO_UDP: u8 = 17;

/// Why a frame is not an IPv4 UDP datagram netd can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than its headers say.
    #[error("truncated frame")]
    Truncated,
    /// Not IPv4 (or VLAN-tagged).
    #[error("not an IPv4 frame")]
    NotIpv4,
    /// A bad IPv4 header: version, length, checksum.
    #[error("bad IPv4 header")]
    BadIpHeader,
    /// Not UDP.
    #[error("not UDP")]
    NotUdp,
    /// A fragment.
    #[error("fragmented datagram")]
    Fragment,
}

/// A UDP datagram in an Ethernet frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Udp4<'a> {
    /// Ethernet source.
    pub src_mac: Mac,
    /// Ethernet destination.
    pub dst_mac: Mac,
    /// IP source.
    pub src_ip: Ipv4Addr,
    /// IP destination.
    pub dst_ip: Ipv4Addr,
    /// UDP source port.
    pub src_port: u16,
    /// UDP destination port.
    pub dst_port: u16,
    /// The UDP payload.
    pub payload: &'a [u8],
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn mac_at(b: &[u8], at: usize) -> Mac {
    let mut m = [0; 6];
    m.copy_from_slice(&b[at..at + 6]);
    m
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// The Internet checksum (RFC 1071) of `data`, starting from `sum`.
pub fn checksum(data: &[u8], mut sum: u32) -> u16 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The UDP pseudo-header's sum.
fn pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, udp_len: u16) -> u32 {
    let (s, d) = (src.octets(), dst.octets());
    [
        u16::from_be_bytes([s[0], s[1]]),
        u16::from_be_bytes([s[2], s[3]]),
        u16::from_be_bytes([d[0], d[1]]),
        u16::from_be_bytes([d[2], d[3]]),
        u16::from(PROTO_UDP),
        udp_len,
    ]
    .iter()
    .map(|w| u32::from(*w))
    .sum()
}

/// The UDP datagram in `frame`. The IPv4 header checksum is checked; the
/// UDP checksum is not (a guest's offloaded transmit leaves it partial).
pub fn parse_udp4(frame: &[u8]) -> Result<Udp4<'_>, FrameError> {
    if frame.len() < ETH_LEN + IP_LEN {
        return Err(FrameError::Truncated);
    }
    if be16(frame, 12) != ETHERTYPE_IPV4 {
        return Err(FrameError::NotIpv4);
    }
    let ip = &frame[ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2));
    if ip[0] >> 4 != 4 || ihl < IP_LEN || total < ihl {
        return Err(FrameError::BadIpHeader);
    }
    if ip.len() < total {
        return Err(FrameError::Truncated);
    }
    if checksum(&ip[..ihl], 0) != 0 {
        return Err(FrameError::BadIpHeader);
    }
    if ip[9] != PROTO_UDP {
        return Err(FrameError::NotUdp);
    }
    if be16(ip, 6) & 0x3fff != 0 {
        return Err(FrameError::Fragment);
    }
    let udp = &ip[ihl..total];
    if udp.len() < UDP_LEN {
        return Err(FrameError::Truncated);
    }
    let udp_len = usize::from(be16(udp, 4));
    if udp_len < UDP_LEN || udp_len > udp.len() {
        return Err(FrameError::Truncated);
    }
    Ok(Udp4 {
        dst_mac: mac_at(frame, 0),
        src_mac: mac_at(frame, 6),
        src_ip: ip_at(ip, 12),
        dst_ip: ip_at(ip, 16),
        src_port: be16(udp, 0),
        dst_port: be16(udp, 2),
        payload: &udp[UDP_LEN..udp_len],
    })
}

/// An Ethernet frame carrying `d` in IPv4/UDP, with both checksums.
pub fn build_udp4(d: &Udp4<'_>) -> Vec<u8> {
    let udp_len = UDP_LEN + d.payload.len();
    let total = IP_LEN + udp_len;
    let mut f = Vec::with_capacity(ETH_LEN + total);
    f.extend_from_slice(&d.dst_mac);
    f.extend_from_slice(&d.src_mac);
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    // IPv4: version 4, IHL 5, no DSCP, length, id 0, no fragmentation,
    // TTL 64, UDP, checksum (filled below), addresses.
    let ip_start = f.len();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&(total as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0, 64, PROTO_UDP, 0, 0]);
    f.extend_from_slice(&d.src_ip.octets());
    f.extend_from_slice(&d.dst_ip.octets());
    let ip_sum = checksum(&f[ip_start..], 0);
    f[ip_start + 10..ip_start + 12].copy_from_slice(&ip_sum.to_be_bytes());
    let udp_start = f.len();
    f.extend_from_slice(&d.src_port.to_be_bytes());
    f.extend_from_slice(&d.dst_port.to_be_bytes());
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(d.payload);
    let sum = checksum(
        &f[udp_start..],
        pseudo_sum(d.src_ip, d.dst_ip, udp_len as u16),
    );
    // 0 means "no checksum" in UDP; a computed 0 is sent as all ones.
    let sum = if sum == 0 { 0xffff } else { sum };
    f[udp_start + 6..udp_start + 8].copy_from_slice(&sum.to_be_bytes());
    f
}

/// Whether the UDP checksum of a frame built by [`build_udp4`] (or any
/// unfragmented IPv4 UDP frame without IP options) is right.
pub fn udp_checksum_ok(frame: &[u8]) -> bool {
    let Ok(d) = parse_udp4(frame) else {
        return false;
    };
    let udp = &frame[ETH_LEN + IP_LEN..ETH_LEN + IP_LEN + UDP_LEN + d.payload.len()];
    be16(udp, 6) == 0 || checksum(udp, pseudo_sum(d.src_ip, d.dst_ip, udp.len() as u16)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Udp4<'static> {
        Udp4 {
            src_mac: [2, 0xfe, 0, 0, 1, 1],
            dst_mac: [2, 0, 0, 0, 0, 4],
            src_ip: Ipv4Addr::new(10, 0, 0, 1),
            dst_ip: Ipv4Addr::new(10, 0, 0, 4),
            src_port: 67,
            dst_port: 68,
            payload: b"hello dhcp",
        }
    }

    #[test]
    fn build_then_parse_round_trips_with_valid_checksums() {
        let f = build_udp4(&sample());
        assert_eq!(f.len(), 14 + 20 + 8 + 10);
        assert_eq!(parse_udp4(&f).unwrap(), sample());
        assert_eq!(checksum(&f[14..34], 0), 0);
        assert!(udp_checksum_ok(&f));
        let mut bad = f.clone();
        bad[45] ^= 1;
        assert!(!udp_checksum_ok(&bad));
    }

    #[test]
    fn known_ip_checksum() {
        // The worked example of RFC 1071's usual illustration
        // (Wikipedia's IPv4 header checksum): 0xb861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h, 0), 0xb861);
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let f = build_udp4(&sample());
        for n in 0..f.len() {
            let _ = parse_udp4(&f[..n]);
        }
        assert_eq!(parse_udp4(&f[..20]), Err(FrameError::Truncated));
        let mut v = f.clone();
        v[12] = 0x81;
        assert_eq!(parse_udp4(&v), Err(FrameError::NotIpv4));
        let mut v = f.clone();
        v[14] = 0x46; // IHL 6 without options: checksum no longer matches
        assert_eq!(parse_udp4(&v), Err(FrameError::BadIpHeader));
        let mut v = f.clone();
        v[14 + 4 + 2] = 0x20; // MF set
        assert!(parse_udp4(&v).is_err());
        let mut v = f;
        v[38] = 0xff; // UDP length beyond the datagram
        v[39] = 0xff;
        assert_eq!(parse_udp4(&v), Err(FrameError::Truncated));
    }
}
