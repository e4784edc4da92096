//! What the guest does on its network once it has an address: the
//! instance metadata service over IMDSv2 (a token from
//! `PUT /latest/api/token`, then GETs carrying it), and the probes the
//! command line asks for (`ferro.ping=A.B.C.D`, `ferro.tcp=A.B.C.D:PORT`).
//! Everything runs from the idle loop's polls, one step at a time, and
//! reports on the console (docs/test-guest.md).

use smoltcp::iface::{Interface, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::{icmp, tcp};
use smoltcp::wire::{IpAddress, Icmpv4Packet, Icmpv4Repr, Ipv4Address};

use crate::say;

/// The metadata service's address.
const IMDS: Ipv4Address = Ipv4Address::new(169, 254, 169, 254);
/// How long one HTTP exchange or probe may take.
const STEP_TIMEOUT_MS: i64 = 3000;
/// Attempts per step before it is reported failed.
const ATTEMPTS: u32 = 5;
/// Echo replies a ping probe wants.
const PINGS: u16 = 3;
/// Echo requests it may send for them, 200 ms apart: the first ones may be
/// lost while neighbours are resolved on both ends (smoltcp drops a packet
/// waiting for ARP) and while a new interface's rules reach every host.
const PING_TRIES: u16 = 20;
/// How long a ping probe waits for its replies.
const PING_TIMEOUT_MS: i64 = 5000;
/// With `ferro.pingloop=1`: an echo request this often, forever.
const PING_LOOP_INTERVAL_MS: i64 = 100;
/// With `ferro.pingloop=1`: a `pingloop` line every this many requests.
const PING_LOOP_REPORT: u32 = 10;

/// The metadata paths fetched, in order, after the token.
const PATHS: [&str; 4] = [
    "instance-id",
    "local-ipv4",
    "placement/availability-zone",
    "public-keys/0/openssh-key",
];

/// An IPv4 endpoint from the command line.
#[derive(Clone, Copy)]
pub struct Target {
    pub addr: [u8; 4],
    pub port: u16,
}

impl Target {
    /// `A.B.C.D` (port 0) or `A.B.C.D:PORT`.
    pub fn parse(s: &str) -> Option<Self> {
        let (ip, port) = match s.split_once(':') {
            Some((ip, p)) => (ip, p.parse().ok()?),
            None => (s, 0),
        };
        let mut addr = [0u8; 4];
        let mut parts = ip.split('.');
        for b in addr.iter_mut() {
            *b = parts.next()?.parse().ok()?;
        }
        parts.next().is_none().then_some(Target { addr, port })
    }

    fn ip(&self) -> Ipv4Address {
        let [a, b, c, d] = self.addr;
        Ipv4Address::new(a, b, c, d)
    }
}

/// What the client is doing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The IMDSv2 token.
    Token,
    /// `PATHS[n]`.
    Get(usize),
    /// The ping probe.
    Ping,
    /// The TCP probe.
    Tcp,
    /// Nothing left.
    Done,
}

/// One HTTP exchange or TCP probe in flight.
struct Exchange {
    started: i64,
    sent: bool,
    len: usize,
}

/// The client's state between polls.
pub struct Client {
    tcp: SocketHandle,
    icmp: SocketHandle,
    step: Step,
    attempt: u32,
    exchange: Option<Exchange>,
    response: [u8; 2048],
    token: [u8; 128],
    token_len: usize,
    port: u16,
    ping: Option<Target>,
    tcp_target: Option<Target>,
    pings_sent: u16,
    pings_seen: u16,
    ping_started: i64,
    /// `ferro.pingloop=1`: the ping probe never ends.
    ping_loop: bool,
    loop_sent: u32,
    loop_seen: u32,
}

impl Client {
    /// A client over the two sockets of `sockets`.
    pub fn new(
        tcp: SocketHandle,
        icmp: SocketHandle,
        ping: Option<Target>,
        ping_loop: bool,
        tcp_target: Option<Target>,
        seed: u64,
    ) -> Self {
        Client {
            tcp,
            icmp,
            step: Step::Token,
            attempt: 0,
            exchange: None,
            response: [0; 2048],
            token: [0; 128],
            token_len: 0,
            port: 49152 + (seed % 8192) as u16,
            ping,
            tcp_target,
            pings_sent: 0,
            pings_seen: 0,
            ping_started: 0,
            ping_loop,
            loop_sent: 0,
            loop_seen: 0,
        }
    }

    fn next_port(&mut self) -> u16 {
        self.port = if self.port >= 65000 { 49152 } else { self.port + 1 };
        self.port
    }

    fn advance(&mut self) {
        self.attempt = 0;
        self.exchange = None;
        self.step = match self.step {
            Step::Token => Step::Get(0),
            Step::Get(n) if n + 1 < PATHS.len() => Step::Get(n + 1),
            Step::Get(_) => Step::Ping,
            Step::Ping => Step::Tcp,
            Step::Tcp | Step::Done => Step::Done,
        };
    }

    /// One step of work; `now` is in milliseconds.
    pub fn poll(&mut self, iface: &mut Interface, sockets: &mut SocketSet<'_>, now: i64) {
        match self.step {
            Step::Token | Step::Get(_) => self.http(iface, sockets, now),
            Step::Ping => self.ping(sockets, now),
            Step::Tcp => self.tcp_probe(iface, sockets, now),
            Step::Done => {}
        }
    }

    /// Builds the request of the current step into `buf`.
    fn request(&self, buf: &mut [u8]) -> usize {
        let mut w = Writer { buf, len: 0 };
        match self.step {
            Step::Token => {
                w.put(b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n");
                w.put(b"X-aws-ec2-metadata-token-ttl-seconds: 300\r\nContent-Length: 0\r\n");
            }
            Step::Get(n) => {
                w.put(b"GET /latest/meta-data/");
                w.put(PATHS[n].as_bytes());
                w.put(b" HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token: ");
                w.put(&self.token[..self.token_len]);
                w.put(b"\r\n");
            }
            _ => {}
        }
        w.put(b"Connection: close\r\n\r\n");
        w.len
    }

    fn http(&mut self, iface: &mut Interface, sockets: &mut SocketSet<'_>, now: i64) {
        let port = if self.exchange.is_none() { self.next_port() } else { 0 };
        let s = sockets.get_mut::<tcp::Socket>(self.tcp);
        let Some(x) = self.exchange.as_mut() else {
            if s.is_open() {
                s.abort();
                return;
            }
            if s.connect(iface.context(), (IpAddress::Ipv4(IMDS), 80), port).is_err() {
                return;
            }
            self.exchange = Some(Exchange { started: now, sent: false, len: 0 });
            return;
        };
        if !x.sent {
            if !s.may_send() {
                if now - x.started > STEP_TIMEOUT_MS {
                    s.abort();
                    self.retry("no connection");
                }
                return;
            }
            let mut req = [0u8; 512];
            let len = self.request(&mut req);
            let s = sockets.get_mut::<tcp::Socket>(self.tcp);
            if s.send_slice(&req[..len]) == Ok(len) {
                self.exchange.as_mut().expect("in flight").sent = true;
            }
            return;
        }
        while s.can_recv() {
            let x = self.exchange.as_mut().expect("in flight");
            match s.recv_slice(&mut self.response[x.len..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => x.len += n,
            }
            if x.len == self.response.len() {
                break;
            }
        }
        let x = self.exchange.as_mut().expect("in flight");
        let finished = x.sent && !s.may_recv() && x.len > 0;
        let timed_out = now - x.started > STEP_TIMEOUT_MS;
        if !finished && !timed_out {
            return;
        }
        let len = x.len;
        s.abort();
        if timed_out && !finished {
            self.retry("timed out");
            return;
        }
        let (status, body) = parse_response(&self.response[..len]);
        match (self.step, status) {
            (Step::Token, 200) if !body.is_empty() && body.len() <= self.token.len() => {
                self.token[..body.len()].copy_from_slice(body);
                self.token_len = body.len();
                say!("imds token bytes={}", body.len());
                self.advance();
            }
            (Step::Get(n), 200) => {
                say!("imds {}={}", PATHS[n], core::str::from_utf8(body).unwrap_or("<not utf-8>").trim_end());
                self.advance();
            }
            (Step::Get(n), 404) => {
                say!("imds {} none", PATHS[n]);
                self.advance();
            }
            (_, code) => {
                say!("imds status={code}");
                self.retry("bad answer");
            }
        }
    }

    fn retry(&mut self, why: &str) {
        self.exchange = None;
        self.attempt += 1;
        if self.attempt >= ATTEMPTS {
            match self.step {
                Step::Token | Step::Get(_) => say!("imds failed: {why}"),
                Step::Tcp => say!("tcp failed: {why}"),
                _ => {}
            }
            // Without a token nothing more of the metadata can be read.
            if self.step == Step::Token {
                self.step = Step::Get(PATHS.len() - 1);
            }
            self.advance();
        }
    }

    fn ping(&mut self, sockets: &mut SocketSet<'_>, now: i64) {
        let Some(t) = self.ping else {
            self.advance();
            return;
        };
        let s = sockets.get_mut::<icmp::Socket>(self.icmp);
        if !s.is_open() {
            let _ = s.bind(icmp::Endpoint::Ident(0xfe01));
            self.ping_started = now;
        }
        if self.ping_loop {
            self.ping_loop(t, sockets, now);
            return;
        }
        let caps = ChecksumCapabilities::default();
        let due = self.ping_started + i64::from(self.pings_sent) * 200;
        if self.pings_sent < PING_TRIES && self.pings_seen < PINGS && now >= due && s.can_send() {
            let repr = Icmpv4Repr::EchoRequest { ident: 0xfe01, seq_no: self.pings_sent, data: b"ferro-ping" };
            if let Ok(buf) = s.send(repr.buffer_len(), IpAddress::Ipv4(t.ip())) {
                repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps);
                self.pings_sent += 1;
            }
        }
        while let Ok((data, _)) = s.recv() {
            if let Ok(p) = Icmpv4Packet::new_checked(data) {
                if let Ok(Icmpv4Repr::EchoReply { ident: 0xfe01, .. }) = Icmpv4Repr::parse(&p, &caps) {
                    self.pings_seen += 1;
                }
            }
        }
        if self.pings_seen >= PINGS || now - self.ping_started > PING_TIMEOUT_MS {
            let [a, b, c, d] = t.addr;
            say!("ping {a}.{b}.{c}.{d} replies={}/{} sent={}", self.pings_seen.min(PINGS), PINGS, self.pings_sent);
            self.advance();
        }
    }

    /// `ferro.pingloop=1`: an echo request every 100 ms, forever; every
    /// 10 requests a line with the requests sent and replies seen so far.
    fn ping_loop(&mut self, t: Target, sockets: &mut SocketSet<'_>, now: i64) {
        let s = sockets.get_mut::<icmp::Socket>(self.icmp);
        let caps = ChecksumCapabilities::default();
        let due = self.ping_started + i64::from(self.loop_sent) * PING_LOOP_INTERVAL_MS;
        if now >= due && s.can_send() {
            let seq_no = self.loop_sent as u16;
            let repr = Icmpv4Repr::EchoRequest { ident: 0xfe01, seq_no, data: b"ferro-ping" };
            if let Ok(buf) = s.send(repr.buffer_len(), IpAddress::Ipv4(t.ip())) {
                repr.emit(&mut Icmpv4Packet::new_unchecked(buf), &caps);
                self.loop_sent += 1;
                if self.loop_sent % PING_LOOP_REPORT == 0 {
                    let [a, b, c, d] = t.addr;
                    say!("pingloop {a}.{b}.{c}.{d} sent={} replies={}", self.loop_sent, self.loop_seen);
                }
            }
        }
        while let Ok((data, _)) = s.recv() {
            if let Ok(p) = Icmpv4Packet::new_checked(data) {
                if let Ok(Icmpv4Repr::EchoReply { ident: 0xfe01, .. }) = Icmpv4Repr::parse(&p, &caps) {
                    self.loop_seen += 1;
                }
            }
        }
    }

    fn tcp_probe(&mut self, iface: &mut Interface, sockets: &mut SocketSet<'_>, now: i64) {
        let Some(t) = self.tcp_target else {
            self.advance();
            return;
        };
        let port = if self.exchange.is_none() { self.next_port() } else { 0 };
        let s = sockets.get_mut::<tcp::Socket>(self.tcp);
        let [a, b, c, d] = t.addr;
        let Some(x) = self.exchange.as_mut() else {
            if s.is_open() {
                s.abort();
                return;
            }
            if s.connect(iface.context(), (IpAddress::Ipv4(t.ip()), t.port), port).is_ok() {
                self.exchange = Some(Exchange { started: now, sent: false, len: 0 });
            }
            return;
        };
        if !x.sent && s.may_send() {
            if s.send_slice(b"hello from ferro-test-guest\n").is_ok() {
                x.sent = true;
                say!("tcp {a}.{b}.{c}.{d}:{} connected", t.port);
            }
            return;
        }
        while s.can_recv() {
            match s.recv_slice(&mut self.response[x.len..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => x.len += n,
            }
            if x.len == self.response.len() {
                break;
            }
        }
        let got_line = self.response[..x.len].contains(&b'\n');
        if x.sent && (got_line || !s.may_recv()) {
            let text = core::str::from_utf8(&self.response[..x.len]).unwrap_or("<not utf-8>");
            say!("tcp {a}.{b}.{c}.{d}:{} received={}", t.port, text.trim_end());
            s.close();
            self.advance();
        } else if now - x.started > STEP_TIMEOUT_MS {
            s.abort();
            self.retry("timed out");
        }
    }
}

/// Appends bytes to a fixed buffer (silently cut at its end).
struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn put(&mut self, b: &[u8]) {
        let n = b.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }
}

/// The status code and body of an HTTP/1.x response (0 and empty when it
/// is not one).
fn parse_response(r: &[u8]) -> (u16, &[u8]) {
    let Some(head_end) = r.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, &[]);
    };
    let head = &r[..head_end];
    let status = head
        .split(|&b| b == b' ')
        .nth(1)
        .and_then(|s| core::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, &r[head_end + 4..])
}
