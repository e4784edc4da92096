//! Glue between the virtio-net driver and smoltcp: a `phy::Device`, and an
//! interface with one static IPv4 address that answers ARP and ICMP echo
//! (smoltcp's interface does both itself; no sockets are needed).

use smoltcp::iface::{Config, Interface, SocketSet, SocketStorage};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address};

use crate::virtio::net::Net;

/// Largest Ethernet frame (no VLAN tag) we pass around.
const MAX_FRAME: usize = 1514;

/// smoltcp's view of the NIC.
pub struct NetDevice {
    net: Net,
}

/// A received frame, copied out so the receive buffer goes straight back to
/// the device.
pub struct RxFrame {
    buf: [u8; MAX_FRAME],
    len: usize,
}

/// Permission to send one frame.
pub struct TxSlot<'a> {
    net: &'a mut Net,
}

impl RxToken for RxFrame {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.buf[..self.len])
    }
}

impl TxToken for TxSlot<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // `transmit` only fails if the ring filled up since `tx_ready`, which
        // cannot happen single-threaded; drop the frame if it ever does.
        let mut f = Some(f);
        match self.net.transmit(len, |b| (f.take().expect("called once"))(b)) {
            Some(r) => r,
            None => {
                let mut scratch = [0u8; MAX_FRAME];
                (f.take().expect("not called"))(&mut scratch[..len.min(MAX_FRAME)])
            }
        }
    }
}

impl Device for NetDevice {
    type RxToken<'a> = RxFrame;
    type TxToken<'a> = TxSlot<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxFrame, TxSlot<'_>)> {
        if !self.net.tx_ready() {
            return None;
        }
        let (_, frame) = self.net.receive()?;
        let mut rx = RxFrame { buf: [0; MAX_FRAME], len: frame.len().min(MAX_FRAME) };
        rx.buf[..rx.len].copy_from_slice(&frame[..rx.len]);
        self.net.recycle_rx();
        Some((rx, TxSlot { net: &mut self.net }))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxSlot<'_>> {
        self.net.tx_ready().then_some(TxSlot { net: &mut self.net })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = Some(1);
        caps
    }
}

/// An IPv4 address with its prefix length, as in `ferro.ip=A.B.C.D/N`.
#[derive(Clone, Copy)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: [u8; 4],
    /// Prefix length (0..=32).
    pub prefix: u8,
}

impl Ipv4Cidr {
    /// Parses `A.B.C.D/N` (`/N` defaults to 24).
    pub fn parse(s: &str) -> Option<Self> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, p.parse().ok().filter(|&p| p <= 32)?),
            None => (s, 24),
        };
        let mut addr = [0u8; 4];
        let mut parts = ip.split('.');
        for b in addr.iter_mut() {
            *b = parts.next()?.parse().ok()?;
        }
        parts.next().is_none().then_some(Ipv4Cidr { addr, prefix })
    }
}

impl core::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d] = self.addr;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

/// The network stack of the guest: one NIC, one address.
pub struct NetStack {
    dev: NetDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
}

impl NetStack {
    /// Configures `net` with `cidr`.
    pub fn new(net: Net, cidr: Ipv4Cidr, seed: u64) -> Self {
        let mut config = Config::new(EthernetAddress(net.mac).into());
        config.random_seed = seed;
        let mut dev = NetDevice { net };
        let mut iface = Interface::new(config, &mut dev, now());
        let [a, b, c, d] = cidr.addr;
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(Ipv4Address::new(a, b, c, d)), cidr.prefix));
        });
        let storage: &'static mut [SocketStorage<'static>] = &mut [];
        NetStack { dev, iface, sockets: SocketSet::new(storage) }
    }

    /// Processes whatever arrived (ARP, ICMP echo) and sends the replies.
    pub fn poll(&mut self) {
        self.iface.poll(now(), &mut self.dev, &mut self.sockets);
    }
}

/// smoltcp's clock: the TSC in milliseconds.
fn now() -> Instant {
    Instant::from_millis((crate::cpu::rdtsc() / crate::tsc_khz()) as i64)
}
