//! The I/O around [`service::handle`] for one TAP: its [`RouterSocket`]
//! feeds a smoltcp interface that is the VPC router to the guest (the
//! router MAC, `169.254.169.254/32` and the router's address in the
//! subnet), so smoltcp answers ARP for both addresses and ICMP echo, and
//! its TCP sockets listening on `169.254.169.254:80` carry the HTTP.
//!
//! One tokio task per TAP: it polls smoltcp when the socket is readable,
//! when smoltcp's `poll_delay` or a connection's deadline comes, and when
//! the interface's data changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, IpCidr, IpListenEndpoint};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::watch;

use super::http::{self, Parsed, Response, Status};
use super::service::{self, InterfaceData, Tokens};
use super::socket::{self, RouterSocket};
use super::{Link, Settings, IMDS_IP, IMDS_PORT};
use crate::dhcp::server::RateLimit;

/// Why a TAP's server stopped (the next sync starts another).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The packet socket could not be opened or registered.
    #[error("cannot open the metadata socket")]
    Socket(#[source] std::io::Error),
    /// No randomness for smoltcp's seed.
    #[error("cannot read randomness")]
    Random(#[source] std::io::Error),
}

/// Frames read per poll before the task yields.
const BUDGET: usize = 64;
/// The receive buffer: a GSO frame from the guest may exceed the MTU.
const RX_FRAME: usize = 65_536 + 14;
/// The largest frame sent (Ethernet, no VLAN tag).
const MAX_FRAME: usize = 1514;
/// A request and its body, at most.
const MAX_REQUEST: usize = http::MAX_HEAD + http::MAX_BODY;
const TCP_RX_BUF: usize = 4096;
const TCP_TX_BUF: usize = 8192;

/// smoltcp's view of the TAP.
struct TapDevice<'a> {
    sock: &'a RouterSocket,
    rx: Vec<u8>,
    tx: Vec<u8>,
    budget: usize,
    err_log: RateLimit,
}

struct Rx<'a>(&'a [u8]);

struct Tx<'a> {
    sock: &'a RouterSocket,
    buf: &'a mut Vec<u8>,
    err_log: &'a mut RateLimit,
}

impl RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.buf.clear();
        self.buf.resize(len, 0);
        let r = f(self.buf);
        if let Err(e) = self.sock.send(self.buf) {
            if let Some(held) = self.err_log.allow() {
                tracing::warn!(held, "cannot send a frame to the guest: {e}");
            }
        }
        r
    }
}

impl Device for TapDevice<'_> {
    type RxToken<'a>
        = Rx<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = Tx<'a>
    where
        Self: 'a;

    fn receive(
        &mut self,
        _now: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        if self.budget == 0 {
            return None;
        }
        let n = match self.sock.recv(&mut self.rx) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) => {
                // ENETDOWN while the TAP is down: nothing to read now.
                if let Some(held) = self.err_log.allow() {
                    tracing::warn!(held, "metadata socket: {e}");
                }
                return None;
            }
        };
        self.budget -= 1;
        let TapDevice {
            sock,
            rx,
            tx,
            err_log,
            ..
        } = self;
        let tx = Tx {
            sock,
            buf: tx,
            err_log,
        };
        Some((Rx(&rx[..n]), tx))
    }

    fn transmit(&mut self, _now: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx {
            sock: self.sock,
            buf: &mut self.tx,
            err_log: &mut self.err_log,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        // A guest with checksum offload leaves TCP checksums to be filled
        // on the way out; a TAP hands them over unfilled. The link is
        // memory, so only the IPv4 header checksum is checked.
        caps.checksum.tcp = Checksum::Tx;
        caps.checksum.udp = Checksum::Tx;
        caps
    }
}

/// One TCP socket and the request it is serving.
struct Conn {
    handle: SocketHandle,
    /// When the connection was first seen out of LISTEN.
    since: Option<Instant>,
    buf: Vec<u8>,
    /// The answer and how much of it is queued.
    out: Option<(Vec<u8>, usize)>,
    /// An abort's RST had one poll to leave.
    reset_sent: bool,
}

fn listen(s: &mut tcp::Socket<'_>) {
    let ep = IpListenEndpoint {
        addr: Some(IMDS_IP.into()),
        port: IMDS_PORT,
    };
    // Only fails on a port of 0 or an open socket, which it is not.
    if let Err(e) = s.listen(ep) {
        tracing::warn!("cannot listen: {e}");
    }
}

impl Conn {
    fn new(sockets: &mut SocketSet<'_>) -> Self {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_RX_BUF]),
            tcp::SocketBuffer::new(vec![0; TCP_TX_BUF]),
        );
        s.set_nagle_enabled(false);
        // As EC2's default hop limit of 1: a container behind NAT in the
        // guest gets no answer.
        s.set_hop_limit(Some(1));
        s.set_timeout(Some(smoltcp::time::Duration::from_secs(10)));
        listen(&mut s);
        Conn {
            handle: sockets.add(s),
            since: None,
            buf: Vec::new(),
            out: None,
            reset_sent: false,
        }
    }

    fn relisten(&mut self, s: &mut tcp::Socket<'_>) {
        listen(s);
        self.since = None;
        self.buf = Vec::new();
        self.out = None;
        self.reset_sent = false;
    }

    /// Move this connection on: read, answer, send, close, re-listen.
    fn service(
        &mut self,
        sockets: &mut SocketSet<'_>,
        data: &InterfaceData,
        tokens: &mut Tokens,
        timeout: Duration,
    ) {
        let now = Instant::now();
        let s = sockets.get_mut::<tcp::Socket>(self.handle);
        match s.state() {
            tcp::State::Listen => return,
            // Our FIN and theirs are both acknowledged: nothing is owed.
            tcp::State::TimeWait => return self.relisten(s),
            tcp::State::Closed if s.remote_endpoint().is_some() && !self.reset_sent => {
                self.reset_sent = true;
                return;
            }
            tcp::State::Closed => return self.relisten(s),
            _ => {}
        }
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) >= timeout {
            tracing::debug!("connection timed out");
            s.abort();
            return;
        }
        if s.state() == tcp::State::SynReceived {
            return;
        }
        if self.out.is_none() {
            self.read(s);
            let answer = match http::parse(&self.buf) {
                Parsed::Partial if s.may_recv() => return,
                // The client closed its half with half a request.
                Parsed::Partial => Response::error(Status::BadRequest),
                Parsed::Complete { request, .. } => {
                    let random = socket::random(service::TOKEN_BYTES).unwrap_or_default();
                    let r = service::handle(&request, data, tokens, now, &random);
                    tracing::debug!(method = %request.method, path = %request.path,
                        status = r.status.code(), "request");
                    r
                }
                Parsed::Bad(status) => Response::error(status),
            };
            self.out = Some((answer.to_bytes(), 0));
            self.buf = Vec::new();
        }
        if let Some((bytes, sent)) = &mut self.out {
            while *sent < bytes.len() && s.can_send() {
                match s.send_slice(&bytes[*sent..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => *sent += n,
                }
            }
            if *sent == bytes.len() {
                s.close();
            }
        }
    }

    fn read(&mut self, s: &mut tcp::Socket<'_>) {
        while s.can_recv() && self.buf.len() < MAX_REQUEST {
            let room = MAX_REQUEST - self.buf.len();
            let got = s.recv(|b| {
                let n = b.len().min(room);
                (n, b[..n].to_vec())
            });
            match got {
                Ok(b) if !b.is_empty() => self.buf.extend_from_slice(&b),
                _ => break,
            }
        }
    }

    /// When this connection must be looked at again, at the latest.
    fn deadline(&self, timeout: Duration) -> Option<Instant> {
        self.since.map(|t| t + timeout)
    }
}

/// smoltcp's clock: time since `epoch`.
fn clock(epoch: Instant) -> smoltcp::time::Instant {
    let us = i64::try_from(epoch.elapsed().as_micros()).unwrap_or(i64::MAX);
    smoltcp::time::Instant::from_micros(us)
}

/// Serve `link` until `data`'s sender is dropped (or the task aborted).
pub async fn serve(
    link: Link,
    mut data: watch::Receiver<Arc<InterfaceData>>,
    settings: Settings,
) -> Result<(), ServeError> {
    let sock = RouterSocket::open(link.ifindex, link.router_mac).map_err(ServeError::Socket)?;
    // SAFETY: `sock` owns its descriptor (an OwnedFd that `as_raw_fd`
    // always returns) and the AsyncFd owns `sock`, so the descriptor stays
    // open and the same for the AsyncFd's whole life.
    let afd = unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }
        .map_err(|e| ServeError::Socket(e.into()))?;
    let seed = socket::random(8).map_err(ServeError::Random)?;
    let mut dev = TapDevice {
        sock: afd.get_ref(),
        rx: vec![0; RX_FRAME],
        tx: Vec::with_capacity(MAX_FRAME),
        budget: 0,
        err_log: RateLimit::new(Duration::from_secs(60)),
    };
    let epoch = Instant::now();
    let mut config = Config::new(EthernetAddress(link.router_mac).into());
    config.random_seed = u64::from_le_bytes(seed.try_into().unwrap_or_default());
    let mut iface = Interface::new(config, &mut dev, clock(epoch));
    iface.update_ip_addrs(|a| {
        // Two addresses fit smoltcp's default of two; pushing cannot fail.
        let _ = a.push(IpCidr::new(IMDS_IP.into(), 32));
        let _ = a.push(IpCidr::new(link.router_ip.into(), link.prefix));
    });
    let mut sockets = SocketSet::new(Vec::new());
    let mut conns: Vec<Conn> = (0..settings.connections.max(1))
        .map(|_| Conn::new(&mut sockets))
        .collect();
    let mut tokens = Tokens::default();
    tracing::debug!(router_ip = %link.router_ip, "serving metadata");
    loop {
        let current = data.borrow_and_update().clone();
        dev.budget = BUDGET;
        iface.poll(clock(epoch), &mut dev, &mut sockets);
        for c in &mut conns {
            c.service(
                &mut sockets,
                &current,
                &mut tokens,
                settings.request_timeout,
            );
        }
        // Send what the connections queued.
        iface.poll(clock(epoch), &mut dev, &mut sockets);
        let more = dev.budget == 0;
        let delay = if more {
            Duration::ZERO
        } else {
            next_wake(
                &mut iface,
                &sockets,
                &conns,
                epoch,
                settings.request_timeout,
            )
        };
        tokio::select! {
            r = afd.readable() => match r {
                Ok(mut g) => g.clear_ready(),
                Err(e) => return Err(ServeError::Socket(e)),
            },
            _ = tokio::time::sleep(delay) => {}
            changed = data.changed() => if changed.is_err() { return Ok(()) },
        }
        if more {
            tokio::task::yield_now().await;
        }
    }
}

/// How long until smoltcp or a connection needs a poll (at most a minute).
fn next_wake(
    iface: &mut Interface,
    sockets: &SocketSet<'_>,
    conns: &[Conn],
    epoch: Instant,
    timeout: Duration,
) -> Duration {
    let now = Instant::now();
    let smol = iface
        .poll_delay(clock(epoch), sockets)
        .map(|d| Duration::from_micros(d.total_micros()));
    let conn = conns
        .iter()
        .filter_map(|c| c.deadline(timeout))
        .map(|t| t.saturating_duration_since(now))
        .min();
    [smol, conn]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(Duration::from_secs(60))
}
