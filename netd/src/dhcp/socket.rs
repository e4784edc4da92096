//! An `AF_PACKET` socket bound to one interface that receives the IPv4
//! UDP frames to one port (a classic BPF filter in the kernel) and sends
//! whole Ethernet frames out of that interface.
//!
//! Bound to a TAP, what it receives with a packet type other than
//! `PACKET_OUTGOING` is what the guest sent; what it sends goes to the
//! guest alone (not through the bridge).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// A frame received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Its length in the buffer.
    pub len: usize,
    /// The interface sent it (not received it).
    pub outgoing: bool,
}

/// The raw socket.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
}

const ETH_P_IP: u16 = 0x0800;
/// Every protocol: only such a socket sees frames that arrive on a bridge
/// port (a TAP) before the bridge takes them; the filter keeps IPv4 UDP.
const ETH_P_ALL: u16 = 0x0003;

/// `ldh [12]; jeq #0x800; ldb [23]; jeq #17; ldh [20]; jset #0x1fff
/// (fragment); ldxb 4*([14]&0xf); ldh [x+16] (UDP destination port);
/// jeq #port; ret all / ret 0`.
fn udp_port_filter(port: u16) -> [libc::sock_filter; 11] {
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    [
        op(0x28, 0, 0, 12),
        op(0x15, 0, 8, u32::from(ETH_P_IP)),
        op(0x30, 0, 0, 23),
        op(0x15, 0, 6, 17),
        op(0x28, 0, 0, 20),
        op(0x45, 4, 0, 0x1fff),
        op(0xb1, 0, 0, 14),
        op(0x48, 0, 0, 16),
        op(0x15, 0, 1, u32::from(port)),
        op(0x06, 0, 0, 0xffff),
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

impl PacketSocket {
    /// A non-blocking socket on interface `ifindex` receiving the IPv4
    /// UDP frames to `udp_port`.
    pub fn open(ifindex: u32, udp_port: u16) -> io::Result<Self> {
        let proto = ETH_P_ALL.to_be();
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            )
        })?;
        // SAFETY: `raw` is a new descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let sock = PacketSocket { fd };
        sock.attach_filter(udp_port)?;
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
        addr.sll_protocol = proto;
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

    fn attach_filter(&self, port: u16) -> io::Result<()> {
        let mut prog = udp_port_filter(port);
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

    /// One frame into `buf` (truncated to its size), or `WouldBlock`.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        // SAFETY: plain data; all-zero is valid.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buf` is writable for its length, `from`/`len` describe a
        // sockaddr_ll the kernel fills.
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
        Ok(Received {
            len: n as usize,
            outgoing: from.sll_pkttype == libc::PACKET_OUTGOING,
        })
    }

    /// Send `frame` out of the bound interface.
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

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for PacketSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A [`PacketSocket`] on the tokio reactor.
#[derive(Debug)]
pub struct AsyncPacketSocket(AsyncFd<PacketSocket>);

impl AsyncPacketSocket {
    /// See [`PacketSocket::open`]. Needs a tokio runtime.
    pub fn open(ifindex: u32, udp_port: u16) -> io::Result<Self> {
        PacketSocket::open(ifindex, udp_port).and_then(Self::new)
    }

    /// `sock` on the reactor.
    pub fn new(sock: PacketSocket) -> io::Result<Self> {
        // SAFETY: `sock` owns its descriptor (an OwnedFd that `as_raw_fd`
        // always returns) and the AsyncFd owns `sock`, so the descriptor
        // stays open and the same for the AsyncFd's whole life.
        unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }
            .map(Self)
            .map_err(io::Error::from)
    }

    /// The next frame the interface received (outgoing ones skipped).
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|s| s.get_ref().recv(buf)) {
                Ok(Ok(r)) if r.outgoing => continue,
                Ok(Ok(r)) => return Ok(r.len),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Send a frame (a packet socket does not block on a full queue: the
    /// kernel drops instead).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        self.0.get_ref().send(frame)
    }
}
