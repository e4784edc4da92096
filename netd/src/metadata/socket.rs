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
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::desired::Mac;

const ETH_P_ALL: u16 = 0x0003;
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

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The raw socket (non-blocking).
#[derive(Debug)]
pub struct RouterSocket {
    fd: OwnedFd,
}

impl RouterSocket {
    /// A socket on interface `ifindex` for frames to `router_mac`.
    pub fn open(ifindex: u32, router_mac: Mac) -> io::Result<Self> {
        // Protocol 0: nothing is queued before the filter is attached and
        // the socket bound to its interface.
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        })?;
        // SAFETY: `raw` is a new descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sock = RouterSocket { fd };
        sock.attach_filter(router_mac)?;
        let one: libc::c_int = 1;
        // SAFETY: PACKET_IGNORE_OUTGOING takes an int, passed by pointer
        // with its size. Older kernels refuse it; `recv` also checks.
        let _ = unsafe {
            libc::setsockopt(
                sock.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_IGNORE_OUTGOING,
                (&one as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        addr.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: `addr` is a valid sockaddr_ll and its size is given.
        check(unsafe {
            libc::bind(
                sock.fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        })?;
        Ok(sock)
    }

    fn attach_filter(&self, mac: Mac) -> io::Result<()> {
        let mut prog = router_filter(mac);
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_mut_ptr(),
        };
        // SAFETY: `fprog` points at `prog`, alive for the call; the kernel
        // copies and validates the program.
        check(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&fprog as *const libc::sock_fprog).cast(),
                size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        })?;
        Ok(())
    }

    /// The next frame the guest sent, into `buf` (truncated to its size):
    /// its length, or `WouldBlock` when none is queued.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: plain data; all-zero is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is writable for its length, `from`/`len`
            // describe a sockaddr_ll the kernel fills.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if from.sll_pkttype != libc::PACKET_OUTGOING {
                return Ok(n as usize);
            }
        }
    }

    /// Send `frame` to the guest.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is readable for its length; the socket is bound,
        // so no address is needed.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for RouterSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for RouterSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
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
