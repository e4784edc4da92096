//! virtio-net without a guest: an in-memory backend, plus one real TAP.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::testing::guest_memory;

const W: u16 = VRING_DESC_F_WRITE as u16;

#[derive(Default)]
struct MemBackend {
    to_guest: Mutex<VecDeque<Vec<u8>>>,
    from_guest: Mutex<Vec<Vec<u8>>>,
}

impl NetBackend for MemBackend {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self.to_guest.lock().unwrap().pop_front();
        let frame = frame.ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        self.from_guest.lock().unwrap().push(frame.to_vec());
        Ok(frame.len())
    }
}

struct Fixture {
    mem: GuestMemoryMmap,
    backend: Arc<MemBackend>,
    handler: NetHandler<Arc<MemBackend>>,
    metrics: Arc<NetMetrics>,
}

impl Fixture {
    fn new() -> Self {
        let backend = Arc::new(MemBackend::default());
        let metrics = Arc::new(NetMetrics::default());
        let handler = NetHandler::new(backend.clone(), metrics.clone());
        Fixture {
            mem: guest_memory(0x40_0000),
            backend,
            handler,
            metrics,
        }
    }

    fn frame(&self, len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
}

/// Chains given as lists of (addr, len, flags); next fields filled in.
fn raw_chains(chains: &[&[(u64, u32, u16)]]) -> Vec<RawDescriptor> {
    let mut raw = Vec::new();
    for chain in chains {
        let base = raw.len();
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let next = i + 1 < chain.len();
            let flags = if next {
                flags | VRING_DESC_F_NEXT as u16
            } else {
                flags
            };
            raw.push(Descriptor::new(addr, len, flags, (base + i + 1) as u16).into());
        }
    }
    raw
}

fn used(vq: &MockSplitQueue<GuestMemoryMmap>, i: u16) -> (u32, u32) {
    let elem = vq.used().ring().ref_at(i as usize).unwrap().load();
    (elem.id(), elem.len())
}

#[test]
fn tx_gathers_chain_into_one_frame() {
    let mut f = Fixture::new();
    let frame = f.frame(12 + 60, 1);
    f.mem
        .write_slice(&frame[..12], GuestAddress(0x10_0000))
        .unwrap();
    f.mem
        .write_slice(&frame[12..], GuestAddress(0x20_0000))
        .unwrap();
    let vq = MockSplitQueue::new(&f.mem, 16);
    vq.add_desc_chains(&raw_chains(&[&[(0x10_0000, 12, 0), (0x20_0000, 60, 0)]]), 0)
        .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(f.handler.process_tx(&f.mem, &mut q).unwrap());
    assert_eq!(*f.backend.from_guest.lock().unwrap(), vec![frame]);
    assert_eq!(used(&vq, 0), (0, 0));
    assert_eq!(f.metrics.tx_frames.load(Ordering::Relaxed), 1);
}

#[test]
fn tx_drops_malformed_chains_but_returns_them() {
    let mut f = Fixture::new();
    let big = (MAX_BUFFER_LEN - 12 + 1) as u32;
    let vq = MockSplitQueue::new(&f.mem, 16);
    let chains = raw_chains(&[
        &[(0x10_0000, 12, 0), (0x20_0000, big, 0)], // oversized
        &[(0x10_0000, 12, 0), (0x20_0000, 60, W)],  // device-writable
        &[(0x10_0000, 12, 0), (0x3f_ffff, 60, 0)],  // past guest RAM
        &[(0x10_0000, 8, 0)],                       // shorter than a header
        &[(u64::MAX - 4, 16, 0)],                   // address wraps
    ]);
    vq.add_desc_chains(&chains, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(f.handler.process_tx(&f.mem, &mut q).unwrap());
    assert!(f.backend.from_guest.lock().unwrap().is_empty());
    assert_eq!(vq.used().idx().load(), 5);
    assert_eq!(f.metrics.tx_dropped.load(Ordering::Relaxed), 5);
}

#[test]
fn tx_accepts_largest_frame() {
    let mut f = Fixture::new();
    let vq = MockSplitQueue::new(&f.mem, 16);
    let len = (MAX_BUFFER_LEN - 12) as u32;
    vq.add_desc_chains(
        &raw_chains(&[&[(0x10_0000, 12, 0), (0x20_0000, len, 0)]]),
        0,
    )
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    f.handler.process_tx(&f.mem, &mut q).unwrap();
    assert_eq!(
        f.backend.from_guest.lock().unwrap()[0].len(),
        MAX_BUFFER_LEN
    );
}

#[test]
fn rx_writes_frame_and_sets_num_buffers() {
    let mut f = Fixture::new();
    let mut frame = f.frame(12 + 100, 3);
    frame[10] = 0xaa;
    frame[11] = 0xbb;
    f.backend.to_guest.lock().unwrap().push_back(frame.clone());
    let vq = MockSplitQueue::new(&f.mem, 16);
    vq.add_desc_chains(
        &raw_chains(&[&[(0x10_0000, 64, W), (0x20_0000, 1500, W)]]),
        0,
    )
    .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(f.handler.process_rx(&f.mem, &mut q).unwrap());
    assert_eq!(used(&vq, 0), (0, 112));
    let mut expect = frame;
    expect[10..12].copy_from_slice(&1u16.to_le_bytes());
    let mut got = f.guest(0x10_0000, 64);
    got.extend(f.guest(0x20_0000, 48));
    assert_eq!(got, expect);
    assert_eq!(f.metrics.rx_frames.load(Ordering::Relaxed), 1);
}

#[test]
fn rx_without_buffers_keeps_frame_and_stops_reading() {
    let mut f = Fixture::new();
    let first = f.frame(80, 1);
    let second = f.frame(90, 2);
    f.backend
        .to_guest
        .lock()
        .unwrap()
        .extend([first.clone(), second.clone()]);
    let vq = MockSplitQueue::new(&f.mem, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(!f.handler.process_rx(&f.mem, &mut q).unwrap());
    assert!(f.handler.rx_pending());
    assert_eq!(
        f.backend.to_guest.lock().unwrap().len(),
        1,
        "second frame left in the backend"
    );
    assert_eq!(f.metrics.rx_no_buffers.load(Ordering::Relaxed), 1);

    // The driver posts two buffers and notifies.
    vq.add_desc_chains(
        &raw_chains(&[&[(0x10_0000, 1500, W)], &[(0x20_0000, 1500, W)]]),
        0,
    )
    .unwrap();
    assert!(f.handler.process_rx(&f.mem, &mut q).unwrap());
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(used(&vq, 0), (0, 80));
    assert_eq!(used(&vq, 1), (1, 90));
    assert_eq!(f.guest(0x10_0000 + 12, 68), first[12..]);
    assert_eq!(f.guest(0x20_0000 + 12, 78), second[12..]);
    assert!(!f.handler.rx_pending());
}

#[test]
fn rx_frame_too_big_is_dropped_and_buffer_reused() {
    let mut f = Fixture::new();
    let big = f.frame(2000, 1);
    let small = f.frame(100, 2);
    f.backend
        .to_guest
        .lock()
        .unwrap()
        .extend([big, small.clone()]);
    let vq = MockSplitQueue::new(&f.mem, 16);
    vq.add_desc_chains(&raw_chains(&[&[(0x10_0000, 1500, W)]]), 0)
        .unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(f.handler.process_rx(&f.mem, &mut q).unwrap());
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(used(&vq, 0), (0, 100));
    assert_eq!(f.guest(0x10_0000 + 12, 88), small[12..]);
    assert_eq!(f.metrics.rx_dropped.load(Ordering::Relaxed), 1);
}

#[test]
fn rx_bad_chain_returned_empty_and_frame_kept() {
    let mut f = Fixture::new();
    let frame = f.frame(100, 5);
    f.backend.to_guest.lock().unwrap().push_back(frame.clone());
    let vq = MockSplitQueue::new(&f.mem, 16);
    let chains = raw_chains(&[
        &[(0x10_0000, 1500, 0)], // driver-readable
        &[(0x3f_ff00, 1500, W)], // past guest RAM
        &[(0x20_0000, 1500, W)], // good
    ]);
    vq.add_desc_chains(&chains, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    f.mem
        .write_slice(&[0x77; 16], GuestAddress(0x10_0000))
        .unwrap();
    assert!(f.handler.process_rx(&f.mem, &mut q).unwrap());
    assert_eq!(vq.used().idx().load(), 3);
    assert_eq!(used(&vq, 0), (0, 0));
    assert_eq!(used(&vq, 1), (1, 0));
    assert_eq!(used(&vq, 2), (2, 100));
    assert_eq!(
        f.guest(0x10_0000, 16),
        [0x77; 16],
        "readable buffer untouched"
    );
    assert_eq!(f.metrics.bad_chains.load(Ordering::Relaxed), 2);
}

#[test]
fn offload_flags_follow_guest_features() {
    use virtio_bindings::virtio_net::*;
    let bit = |b: u32| 1u64 << b;
    assert_eq!(tap_offload_flags(0), 0);
    assert_eq!(
        tap_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)),
        0,
        "TSO needs CSUM"
    );
    assert_eq!(
        tap_offload_flags(
            bit(VIRTIO_NET_F_GUEST_CSUM)
                | bit(VIRTIO_NET_F_GUEST_TSO4)
                | bit(VIRTIO_NET_F_GUEST_ECN)
        ),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO_ECN
    );
}

#[test]
fn tap_rejects_bad_names() {
    assert!(matches!(Tap::open(""), Err(TapError::InvalidName(_))));
    assert!(matches!(
        Tap::open("a-name-longer-than-15"),
        Err(TapError::InvalidName(_))
    ));
    assert!(matches!(Tap::open("a/b"), Err(TapError::InvalidName(_))));
}

fn tap_name(tag: &str) -> String {
    format!("fvt{tag}{}", std::process::id() % 100_000)
}

/// Brings `name` up so the kernel passes frames between it and sockets.
fn link_up(name: &str) {
    // SAFETY: plain socket creation; the fd is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(sock >= 0);
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the ifreq, which lives across the call.
    let ret = unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr) };
    let err = io::Error::last_os_error();
    // SAFETY: closing the socket created above.
    unsafe { libc::close(sock) };
    assert_eq!(ret, 0, "cannot bring {name} up: {err}");
}

/// An AF_PACKET socket bound to `name`, with a receive timeout.
fn packet_socket(name: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; ownership goes to the OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: `cname` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    assert_ne!(ifindex, 0);
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a valid sockaddr_ll of the given size.
    let ret = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: SO_RCVTIMEO reads a timeval of the given size.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(ret, 0);
    sock
}

const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

fn test_ethernet_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0xff; 6]; // broadcast destination
    frame.extend([0x02, 0, 0, 0, 0, 0x01]);
    frame.extend(TEST_ETHERTYPE);
    frame.extend(payload);
    frame
}

#[test]
fn tap_attach_error_names_interface() {
    let name = tap_name("b");
    let _first = Tap::open(&name).expect("tests run as root with /dev/net/tun");
    let err = Tap::open(&name).unwrap_err();
    assert!(matches!(err, TapError::Attach { .. }));
    assert!(err.to_string().contains(&name), "{err}");
}

#[test]
fn tap_round_trip_through_device_logic() {
    use std::os::fd::AsRawFd;
    let name = tap_name("r");
    let tap = Arc::new(Tap::open(&name).expect("tests run as root with /dev/net/tun"));
    link_up(&name);
    let sock = packet_socket(&name);
    let metrics = Arc::new(NetMetrics::default());
    let mut handler = NetHandler::new(tap.clone(), metrics.clone());
    let mem = guest_memory(0x40_0000);

    // Guest -> host: vnet header (no offload) + frame on the tx queue.
    let payload: Vec<u8> = (0..200u32).map(|i| (i * 3) as u8).collect();
    let frame = test_ethernet_frame(&payload);
    mem.write_slice(&[0u8; 12], GuestAddress(0x10_0000))
        .unwrap();
    mem.write_slice(&frame, GuestAddress(0x20_0000)).unwrap();
    let txq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    let chain = raw_chains(&[&[(0x10_0000, 12, 0), (0x20_0000, frame.len() as u32, 0)]]);
    txq.add_desc_chains(&chain, 0).unwrap();
    let mut q: Queue = txq.create_queue().unwrap();
    assert!(handler.process_tx(&mem, &mut q).unwrap());
    assert_eq!(metrics.tx_frames.load(Ordering::Relaxed), 1);
    let mut buf = [0u8; 2048];
    let got = loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        assert!(
            n > 0,
            "frame never reached the host side: {}",
            io::Error::last_os_error()
        );
        if buf[12..14] == TEST_ETHERTYPE {
            break buf[..n as usize].to_vec();
        }
    };
    assert_eq!(got, frame);

    // Host -> guest: a frame sent on the interface arrives in an rx chain.
    let reply = test_ethernet_frame(b"reply from the host side");
    // SAFETY: `reply` is readable for its length.
    let n = unsafe { libc::send(sock.as_raw_fd(), reply.as_ptr().cast(), reply.len(), 0) };
    assert_eq!(n, reply.len() as isize);
    let rxq = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
    rxq.add_desc_chains(&raw_chains(&[&[(0x30_0000, 4096, W)]]), 0)
        .unwrap();
    let mut q: Queue = rxq.create_queue().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        handler.set_backend_readable();
        handler.process_rx(&mem, &mut q).unwrap();
        let mut got = vec![0u8; reply.len()];
        mem.read_slice(&mut got, GuestAddress(0x30_0000 + 12))
            .unwrap();
        if rxq.used().idx().load() > 0 && got == reply {
            break;
        }
        if rxq.used().idx().load() > 0 {
            // Some other frame (IPv6 autoconf) took the buffer: repost it.
            rxq.add_desc_chains(
                &raw_chains(&[&[(0x30_0000, 4096, W)]]),
                rxq.used().idx().load(),
            )
            .unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "reply never reached the guest"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn device_reports_mac_status_and_features() {
    let name = tap_name("d");
    let tap = Tap::open(&name).expect("tests run as root with /dev/net/tun");
    let net = Net::with_tap(
        "net0".into(),
        tap,
        [2, 1, 2, 3, 4, 5],
        WorkerOptions::default(),
    );
    let mut config = [0u8; 8];
    net.read_config(0, &mut config);
    assert_eq!(config, [2, 1, 2, 3, 4, 5, 1, 0]);
    let features = net.device_features();
    assert_ne!(features & (1 << VIRTIO_F_VERSION_1), 0);
    assert_eq!(
        features & (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF),
        0
    );
}
