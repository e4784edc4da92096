//! An `AF_PACKET` socket bound to one interface that receives the IPv4
//! UDP frames to one port (a classic BPF filter in the kernel) and sends
//! whole Ethernet frames out of that interface.
//!
//! Bound to a TAP, what it receives with a packet type other than
//! `PACKET_OUTGOING` is what the guest sent; what it sends goes to the
//! guest alone (not through the bridge).

use std::io;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub use crate::packet::{Received, TapSocket as PacketSocket};

const ETH_P_IP: u16 = 0x0800;
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

/// A socket on interface `ifindex` receiving the IPv4 UDP frames to
/// `udp_port`.
pub fn open(ifindex: u32, udp_port: u16) -> io::Result<PacketSocket> {
    PacketSocket::open(ifindex, &mut udp_port_filter(udp_port))
}

/// A [`PacketSocket`] on the tokio reactor.
#[derive(Debug)]
pub struct AsyncPacketSocket(AsyncFd<PacketSocket>);

impl AsyncPacketSocket {
    /// See [`PacketSocket::open`]. Needs a tokio runtime.
    pub fn open(ifindex: u32, udp_port: u16) -> io::Result<Self> {
        open(ifindex, udp_port).and_then(Self::new)
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
