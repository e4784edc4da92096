//! The metadata service's own `AF_PACKET` socket on one TAP: it receives
//! what the guest sends to the router (ARP, and IPv4 to the router MAC; a
//! classic BPF filter in the kernel drops the rest) and sends whole
//! Ethernet frames to the guest.
//!
//! It listens to every protocol (`ETH_P_ALL`): only such a socket sees a
//! bridge port's frames before the bridge takes them. Frames the TAP
//! *sends* (another guest's flooded traffic on its way to this guest) are
//! skipped: they are not this guest's.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use crate::packet::TapSocket;

use crate::desired::Mac;

const ETHERTYPE_ARP: u32 = 0x0806;
const ETHERTYPE_IPV4: u32 = 0x0800;
/// The most of a frame the filter keeps (a GSO frame may exceed the MTU).
const SNAP_LEN: u32 = 0x0004_0000;

const PROTO_ICMP: u32 = 1;
const PROTO_TCP: u32 = 6;

/// `ldh [12]; jeq #ARP → accept; jeq #IPv4 else drop; ld [0]; jeq
/// #mac[0..4] else drop; ldh [4]; jeq #mac[4..6] else drop; ldb [23];
/// jeq #TCP → accept; jeq #ICMP → accept; drop`. Only TCP and ICMP reach
/// the stack: a DHCP renewal unicast to the router is the DHCP server's,
/// and must not draw a port unreachable.
fn router_filter(mac: Mac) -> [libc::sock_filter; 12] {
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let hi = u32::from_be_bytes([mac[0], mac[1], mac[2], mac[3]]);
    let lo = u32::from(u16::from_be_bytes([mac[4], mac[5]]));
    [
        op(0x28, 0, 0, 12),
        op(0x15, 8, 0, ETHERTYPE_ARP),
        op(0x15, 0, 8, ETHERTYPE_IPV4),
        op(0x20, 0, 0, 0),
        op(0x15, 0, 6, hi),
        op(0x28, 0, 0, 4),
        op(0x15, 0, 4, lo),
        op(0x30, 0, 0, 23),
        op(0x15, 1, 0, PROTO_TCP),
        op(0x15, 0, 1, PROTO_ICMP),
        op(0x06, 0, 0, SNAP_LEN),
        op(0x06, 0, 0, 0),
    ]
}

/// The metadata service's socket on a TAP.
#[derive(Debug)]
pub struct RouterSocket(TapSocket);

impl RouterSocket {
    /// A socket on interface `ifindex` for frames to `router_mac`.
    pub fn open(ifindex: u32, router_mac: Mac) -> io::Result<Self> {
        TapSocket::open(ifindex, &mut router_filter(router_mac)).map(Self)
    }

    /// The next frame the guest sent, into `buf` (truncated to its size):
    /// its length, or `WouldBlock` when none is queued.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.recv_from_guest(buf)
    }

    /// Send `frame` to the guest.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        self.0.send(frame)
    }
}

impl AsRawFd for RouterSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for RouterSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// `len` bytes of OS randomness (getrandom(2)).
pub fn random(len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is writable for its length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF program the way the kernel would, enough for the
    /// instructions the filter uses.
    fn run(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
        let mut a: u32 = 0;
        let mut pc = 0;
        loop {
            let i = prog[pc];
            let k = i.k as usize;
            pc += 1;
            match i.code {
                0x28 if k + 2 <= pkt.len() => {
                    a = u32::from(u16::from_be_bytes([pkt[k], pkt[k + 1]]))
                }
                0x20 if k + 4 <= pkt.len() => {
                    a = u32::from_be_bytes([pkt[k], pkt[k + 1], pkt[k + 2], pkt[k + 3]])
                }
                0x30 if k < pkt.len() => a = u32::from(pkt[k]),
                0x28 | 0x20 | 0x30 => return 0,
                0x15 => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                0x06 => return i.k,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    fn frame(dst: Mac, ethertype: u16) -> Vec<u8> {
        ip_frame(dst, ethertype, 6)
    }

    fn ip_frame(dst: Mac, ethertype: u16, proto: u8) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 9]);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.resize(60, 0);
        f[23] = proto;
        f
    }

    #[test]
    fn the_filter_keeps_arp_and_ipv4_to_the_router() {
        let router = [0x02, 0xfe, 0, 0, 7, 1];
        let prog = router_filter(router);
        assert_eq!(run(&prog, &frame([0xff; 6], 0x0806)), SNAP_LEN);
        assert_eq!(run(&prog, &frame(router, 0x0806)), SNAP_LEN);
        assert_eq!(run(&prog, &frame(router, 0x0800)), SNAP_LEN);
        assert_eq!(run(&prog, &frame([0x02, 0xfe, 0, 0, 7, 2], 0x0800)), 0);
        assert_eq!(run(&prog, &frame([0x03, 0xfe, 0, 0, 7, 1], 0x0800)), 0);
        assert_eq!(run(&prog, &frame([0xff; 6], 0x0800)), 0);
        assert_eq!(run(&prog, &frame(router, 0x86dd)), 0);
        assert_eq!(run(&prog, &[0u8; 4]), 0);
        assert_eq!(run(&prog, &ip_frame(router, 0x0800, 1)), SNAP_LEN);
        assert_eq!(run(&prog, &ip_frame(router, 0x0800, 17)), 0);
        assert_eq!(run(&prog, &ip_frame(router, 0x0800, 2)), 0);
        assert_eq!(run(&prog, &ip_frame(router, 0x0800, 6)[..23]), 0);
    }

    #[test]
    fn randomness_differs() {
        let (a, b) = (random(32).unwrap(), random(32).unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
