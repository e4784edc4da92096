//! Glue between the virtio-net driver and smoltcp: a `phy::Device`, and an
//! interface that answers ARP and ICMP echo (smoltcp's interface does both
//! itself), with a static address (`ferro.ip=`) or one leased over DHCP
//! (smoltcp's client), and then the [`netclient`](crate::netclient).

use core::ptr::addr_of_mut;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::{dhcpv4, icmp, tcp};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv4Address};

use crate::netclient::{Client, Target};
use crate::say;
use crate::virtio::net::Net;

// The sockets' memory: the guest has no allocator, and one stack is made
// once (see `NetStack::new`).
static mut SOCKETS: [SocketStorage<'static>; 4] = [SocketStorage::EMPTY; 4];
static mut TCP_RX: [u8; 4096] = [0; 4096];
static mut TCP_TX: [u8; 1024] = [0; 1024];
static mut ICMP_RX: [u8; 512] = [0; 512];
static mut ICMP_TX: [u8; 512] = [0; 512];
static mut ICMP_RX_META: [icmp::PacketMetadata; 4] = [icmp::PacketMetadata::EMPTY; 4];
static mut ICMP_TX_META: [icmp::PacketMetadata; 4] = [icmp::PacketMetadata::EMPTY; 4];

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

/// What the command line asks of the network.
pub struct NetConfig {
    /// A static address; none: DHCP.
    pub ip: Option<Ipv4Cidr>,
    /// `ferro.ping=`.
    pub ping: Option<Target>,
    /// `ferro.pingloop=1`: the ping never ends.
    pub ping_loop: bool,
    /// `ferro.tcp=`.
    pub tcp: Option<Target>,
}

/// The network stack of the guest: one NIC, one address.
pub struct NetStack {
    dev: NetDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
    dhcp: Option<SocketHandle>,
    client: Client,
    configured: bool,
}

impl NetStack {
    /// Configures `net` as `cfg` says. Called at most once: it takes the
    /// sockets' static memory.
    pub fn new(net: Net, cfg: &NetConfig, seed: u64) -> Self {
        let mut config = Config::new(EthernetAddress(net.mac).into());
        config.random_seed = seed;
        let mut dev = NetDevice { net };
        let mut iface = Interface::new(config, &mut dev, now());
        // SAFETY: `NetStack::new` runs once, on the boot CPU, before
        // anything else touches these statics; the references made here
        // are the only ones ever made.
        let (storage, tcp_rx, tcp_tx, icmp_rx, icmp_tx, icmp_rx_meta, icmp_tx_meta) = unsafe {
            (
                &mut *addr_of_mut!(SOCKETS),
                &mut *addr_of_mut!(TCP_RX),
                &mut *addr_of_mut!(TCP_TX),
                &mut *addr_of_mut!(ICMP_RX),
                &mut *addr_of_mut!(ICMP_TX),
                &mut *addr_of_mut!(ICMP_RX_META),
                &mut *addr_of_mut!(ICMP_TX_META),
            )
        };
        let mut sockets = SocketSet::new(&mut storage[..]);
        let tcp = sockets.add(tcp::Socket::new(tcp::SocketBuffer::new(&mut tcp_rx[..]), tcp::SocketBuffer::new(&mut tcp_tx[..])));
        let icmp = sockets.add(icmp::Socket::new(
            icmp::PacketBuffer::new(&mut icmp_rx_meta[..], &mut icmp_rx[..]),
            icmp::PacketBuffer::new(&mut icmp_tx_meta[..], &mut icmp_tx[..]),
        ));
        let mut dhcp = None;
        match cfg.ip {
            Some(cidr) => {
                let [a, b, c, d] = cidr.addr;
                iface.update_ip_addrs(|addrs| {
                    let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(Ipv4Address::new(a, b, c, d)), cidr.prefix));
                });
            }
            None => dhcp = Some(sockets.add(dhcpv4::Socket::new())),
        }
        let client = Client::new(tcp, icmp, cfg.ping, cfg.ping_loop, cfg.tcp, seed);
        NetStack { dev, iface, sockets, dhcp, client, configured: cfg.ip.is_some() }
    }

    /// Processes whatever arrived (ARP, ICMP echo, DHCP), sends the
    /// replies, and moves the client on once there is an address.
    pub fn poll(&mut self) {
        self.iface.poll(now(), &mut self.dev, &mut self.sockets);
        if let Some(h) = self.dhcp {
            match self.sockets.get_mut::<dhcpv4::Socket>(h).poll() {
                Some(dhcpv4::Event::Configured(c)) => {
                    let addr = c.address;
                    self.iface.update_ip_addrs(|addrs| {
                        addrs.clear();
                        let _ = addrs.push(IpCidr::Ipv4(addr));
                    });
                    let routes = self.iface.routes_mut();
                    routes.remove_default_ipv4_route();
                    if let Some(r) = c.router {
                        let _ = routes.add_default_ipv4_route(r);
                    }
                    let dns = c.dns_servers.first().copied().unwrap_or(Ipv4Address::UNSPECIFIED);
                    let router = c.router.unwrap_or(Ipv4Address::UNSPECIFIED);
                    say!("dhcp lease ip={addr} router={router} dns={dns} server={}", c.server.address);
                    self.configured = true;
                }
                // Also sent once at the start, before any lease.
                Some(dhcpv4::Event::Deconfigured) if self.configured => {
                    say!("dhcp lease lost");
                    self.iface.update_ip_addrs(|addrs| addrs.clear());
                    self.configured = false;
                }
                Some(dhcpv4::Event::Deconfigured) | None => {}
            }
        }
        if self.configured {
            self.client.poll(&mut self.iface, &mut self.sockets, now().total_millis());
            self.iface.poll(now(), &mut self.dev, &mut self.sockets);
        }
    }
}

/// smoltcp's clock: the TSC in milliseconds.
fn now() -> Instant {
    Instant::from_millis((crate::cpu::rdtsc() / crate::tsc_khz()) as i64)
}
