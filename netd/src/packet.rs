//! An `AF_PACKET` socket bound to one TAP, with a classic BPF filter in
//! the kernel: what the DHCP server and the VPC router (metadata) read
//! the guest's frames from and answer it on.
//!
//! It listens to every protocol (`ETH_P_ALL`): only such a socket sees a
//! bridge port's frames before the bridge takes them. Bound to a TAP, what
//! it receives with a packet type other than `PACKET_OUTGOING` is what the
//! guest sent; what it sends goes to the guest alone, not through the
//! bridge (so no nftables hook of the bridge sees it).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Every protocol.
const ETH_P_ALL: u16 = 0x0003;

/// A frame received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Its length in the buffer.
    pub len: usize,
    /// The interface sent it (not received it): not the guest's.
    pub outgoing: bool,
}

/// The raw socket (non-blocking).
#[derive(Debug)]
pub struct TapSocket {
    fd: OwnedFd,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl TapSocket {
    /// A socket on interface `ifindex` that receives what `filter`
    /// accepts.
    pub fn open(ifindex: u32, filter: &mut [libc::sock_filter]) -> io::Result<Self> {
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
        let sock = TapSocket { fd };
        let fprog = libc::sock_fprog {
            len: u16::try_from(filter.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
            filter: filter.as_mut_ptr(),
        };
        // SAFETY: `fprog` points at `filter`, alive for the call; the
        // kernel copies and validates the program.
        check(unsafe {
            libc::setsockopt(
                sock.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&fprog as *const libc::sock_fprog).cast(),
                size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        })?;
        let one: libc::c_int = 1;
        // SAFETY: PACKET_IGNORE_OUTGOING takes an int, passed by pointer
        // with its size. Older kernels refuse it; `recv` also tells.
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

    /// The next frame the guest sent (outgoing ones skipped), or
    /// `WouldBlock`: its length.
    pub fn recv_from_guest(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let r = self.recv(buf)?;
            if !r.outgoing {
                return Ok(r.len);
            }
        }
    }

    /// Send `frame` out of the bound interface (to the guest).
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

impl AsRawFd for TapSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for TapSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
