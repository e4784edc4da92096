//! ICMP echo from an instance namespace (what `ping -i` does), and a TCP
//! exchange between two instances.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::in_ns;

/// Echo requests sent and replies received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingStats {
    /// Sent.
    pub sent: u16,
    /// Answered (each sequence number once).
    pub received: u16,
}

impl PingStats {
    /// Requests without a reply.
    pub fn lost(&self) -> u16 {
        self.sent - self.received
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut s: u32 = data
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn echo(id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![8, 0, 0, 0];
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0x5a; 32]);
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

/// Ping `dst` from namespace `ns`: `count` requests `interval` apart, then
/// wait up to a second for late replies.
pub fn ping(ns: &str, dst: Ipv4Addr, count: u16, interval: Duration) -> PingStats {
    let sock = in_ns(ns, || {
        Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).expect("raw ICMP socket")
    });
    let id = (std::process::id() as u16) ^ u16::from(dst.octets()[3]) ^ count;
    let to = SockAddr::from(SocketAddr::from((dst, 0)));
    let mut got = BTreeSet::new();
    let start = Instant::now();
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    for seq in 0..count {
        // An unreachable destination (no ARP answer) is lost, not fatal.
        let _ = sock.send_to(&echo(id, seq), &to);
        let next = start + interval * u32::from(seq + 1);
        let until = if seq + 1 == count {
            next + Duration::from_secs(1)
        } else {
            next
        };
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left)).unwrap();
            let Ok(n) = sock.recv(&mut buf) else {
                continue;
            };
            // SAFETY: recv initialised the first n bytes.
            let p: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            let ihl = usize::from(p[0] & 0xf) * 4;
            let src = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            let icmp = &p[ihl..];
            if src == dst && icmp.len() >= 8 && icmp[0] == 0 {
                let rid = u16::from_be_bytes([icmp[4], icmp[5]]);
                let rseq = u16::from_be_bytes([icmp[6], icmp[7]]);
                if rid == id {
                    got.insert(rseq);
                }
            }
        }
    }
    PingStats {
        sent: count,
        received: got.len() as u16,
    }
}

/// Send `msg` over TCP from namespace `from` to `to:port` in namespace
/// `server_ns` and read the server's echo of it.
pub fn tcp_echo(server_ns: &str, to: Ipv4Addr, from: &str, msg: &[u8]) -> Vec<u8> {
    let addr = SocketAddr::from((to, 5000));
    let listener = in_ns(server_ns, || TcpListener::bind(addr)).expect("listen");
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        s.write_all(&buf[..n]).unwrap();
    });
    let mut c = in_ns(from, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })
    .expect("connect across hosts");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    c.read_exact(&mut back).unwrap();
    server.join().unwrap();
    back
}
