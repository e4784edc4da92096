use super::*;

const MAC: Mac = [2, 0, 0, 0, 0, 4];

fn iface() -> LocalInterface {
    LocalInterface {
        instance_id: "i-1".into(),
        mac: "02:00:00:00:00:04".into(),
        private_ip: "10.0.0.4".into(),
        subnet_cidr: "10.0.0.0/24".into(),
        router_ip: "10.0.0.1".into(),
        dns_ip: "10.0.0.2".into(),
        hostname: "ip-10-0-0-4".into(),
        tap: "fct1".into(),
        ..Default::default()
    }
}

fn lease() -> Lease {
    Lease::new(&iface(), 0x10, 1450).unwrap()
}

fn message(kind: MessageType, mac: Mac) -> Message {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(0x1234_5678, z, z, z, z, &mac);
    m.opts_mut().insert(DhcpOption::MessageType(kind));
    m
}

fn frame_of(m: &Message, src_mac: Mac) -> Vec<u8> {
    let payload = m.to_vec().unwrap();
    frame::build_udp4(&Udp4 {
        src_mac,
        dst_mac: BROADCAST_MAC,
        src_ip: m.ciaddr(),
        dst_ip: Ipv4Addr::BROADCAST,
        src_port: CLIENT_PORT,
        dst_port: SERVER_PORT,
        payload: &payload,
    })
}

/// The answer to `m`, parsed: (frame header, message).
fn ask(m: &Message) -> Option<(Udp4<'static>, Message)> {
    let out = respond(&lease(), &frame_of(m, MAC)).unwrap()?;
    assert!(frame::udp_checksum_ok(&out));
    let out: &'static [u8] = Box::leak(out.into_boxed_slice());
    let udp = frame::parse_udp4(out).unwrap();
    let msg = Message::decode(&mut Decoder::new(udp.payload)).unwrap();
    Some((udp, msg))
}

#[test]
fn discover_gets_an_offer_with_every_option() {
    let (udp, m) = ask(&message(MessageType::Discover, MAC)).unwrap();
    assert_eq!(udp.src_mac, [2, 0xfe, 0, 0, 0x10, 1]);
    assert_eq!(udp.dst_mac, MAC, "unicast without the broadcast flag");
    assert_eq!(udp.src_ip, Ipv4Addr::new(10, 0, 0, 1));
    assert_eq!(udp.dst_ip, Ipv4Addr::new(10, 0, 0, 4));
    assert_eq!((udp.src_port, udp.dst_port), (67, 68));
    assert_eq!(m.opcode(), Opcode::BootReply);
    assert_eq!(m.xid(), 0x1234_5678);
    assert_eq!(m.yiaddr(), Ipv4Addr::new(10, 0, 0, 4));
    assert_eq!(m.chaddr(), MAC);
    let o = m.opts();
    assert_eq!(o.msg_type(), Some(MessageType::Offer));
    let get = |c| o.get(c).cloned();
    assert_eq!(
        get(OptionCode::SubnetMask),
        Some(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
    );
    assert_eq!(
        get(OptionCode::Router),
        Some(DhcpOption::Router(vec![Ipv4Addr::new(10, 0, 0, 1)]))
    );
    assert_eq!(
        get(OptionCode::DomainNameServer),
        Some(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
            10, 0, 0, 2
        )]))
    );
    assert_eq!(
        get(OptionCode::InterfaceMtu),
        Some(DhcpOption::InterfaceMtu(1450))
    );
    assert_eq!(
        get(OptionCode::Hostname),
        Some(DhcpOption::Hostname("ip-10-0-0-4".into()))
    );
    assert_eq!(
        get(OptionCode::AddressLeaseTime),
        Some(DhcpOption::AddressLeaseTime(3600))
    );
    assert_eq!(
        get(OptionCode::ServerIdentifier),
        Some(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 0, 1)))
    );
}

#[test]
fn broadcast_flag_gets_a_broadcast_answer() {
    let mut m = message(MessageType::Discover, MAC);
    m.set_flags(dhcproto::v4::Flags::default().set_broadcast());
    let (udp, _) = ask(&m).unwrap();
    assert_eq!(udp.dst_mac, BROADCAST_MAC);
    assert_eq!(udp.dst_ip, Ipv4Addr::BROADCAST);
}

#[test]
fn request_for_the_address_is_acked_and_another_is_naked() {
    let mut m = message(MessageType::Request, MAC);
    m.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 4)));
    m.opts_mut()
        .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 0, 1)));
    let (_, ack) = ask(&m).unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), Ipv4Addr::new(10, 0, 0, 4));

    let mut m = message(MessageType::Request, MAC);
    m.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 9)));
    let (udp, nak) = ask(&m).unwrap();
    assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    assert_eq!(nak.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(udp.dst_mac, BROADCAST_MAC, "NAKs are broadcast");
    assert!(nak.opts().get(OptionCode::AddressLeaseTime).is_none());
}

#[test]
fn renewal_is_unicast_to_ciaddr() {
    let mut m = message(MessageType::Request, MAC);
    m.set_ciaddr(Ipv4Addr::new(10, 0, 0, 4));
    let (udp, ack) = ask(&m).unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!((udp.dst_mac, udp.dst_ip), (MAC, Ipv4Addr::new(10, 0, 0, 4)));
}

#[test]
fn request_to_another_server_release_and_decline_get_nothing() {
    let mut m = message(MessageType::Request, MAC);
    m.opts_mut()
        .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 0, 99)));
    assert!(ask(&m).is_none());
    assert!(ask(&message(MessageType::Release, MAC)).is_none());
    assert!(ask(&message(MessageType::Decline, MAC)).is_none());
}

#[test]
fn inform_gets_options_without_a_lease() {
    let mut m = message(MessageType::Inform, MAC);
    m.set_ciaddr(Ipv4Addr::new(10, 0, 0, 4));
    let (udp, ack) = ask(&m).unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert!(ack.opts().get(OptionCode::AddressLeaseTime).is_none());
    assert!(ack.opts().get(OptionCode::Router).is_some());
    assert_eq!(udp.dst_ip, Ipv4Addr::new(10, 0, 0, 4));
}

#[test]
fn unknown_macs_get_nothing() {
    let other = [2, 0, 0, 0, 0, 99];
    // Another chaddr from the interface's MAC, and the interface's chaddr
    // from another source MAC.
    let m = message(MessageType::Discover, other);
    assert_eq!(respond(&lease(), &frame_of(&m, MAC)), Ok(None));
    let m = message(MessageType::Discover, MAC);
    assert_eq!(respond(&lease(), &frame_of(&m, other)), Ok(None));
}

#[test]
fn malformed_requests_are_errors() {
    let l = lease();
    let good = frame_of(&message(MessageType::Discover, MAC), MAC);
    assert!(matches!(respond(&l, &good[..30]), Err(Malformed::Frame(_))));
    // Wrong op.
    let mut m = message(MessageType::Discover, MAC);
    m.set_opcode(Opcode::BootReply);
    assert_eq!(respond(&l, &frame_of(&m, MAC)), Err(Malformed::NotRequest));
    // No message type.
    let mut m = message(MessageType::Discover, MAC);
    m.opts_mut().clear();
    assert_eq!(
        respond(&l, &frame_of(&m, MAC)),
        Err(Malformed::NoMessageType)
    );
    // A BOOTP-sized payload without the cookie.
    let junk = frame::build_udp4(&Udp4 {
        src_mac: MAC,
        dst_mac: BROADCAST_MAC,
        src_ip: Ipv4Addr::UNSPECIFIED,
        dst_ip: Ipv4Addr::BROADCAST,
        src_port: 68,
        dst_port: 67,
        payload: &[0u8; 300],
    });
    assert_eq!(respond(&l, &junk), Err(Malformed::NotDhcp));
    // An hlen that would overrun chaddr.
    let mut p = message(MessageType::Discover, MAC).to_vec().unwrap();
    p[2] = 200;
    let f = frame::build_udp4(&Udp4 {
        src_mac: MAC,
        dst_mac: BROADCAST_MAC,
        src_ip: Ipv4Addr::UNSPECIFIED,
        dst_ip: Ipv4Addr::BROADCAST,
        src_port: 68,
        dst_port: 67,
        payload: &p,
    });
    assert_eq!(respond(&l, &f), Err(Malformed::NotEthernet));
}

#[test]
fn truncated_and_mutated_requests_never_panic() {
    let l = lease();
    let mut m = message(MessageType::Request, MAC);
    m.opts_mut()
        .insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 4)));
    m.opts_mut().insert(DhcpOption::Hostname("guest".into()));
    let payload = m.to_vec().unwrap();
    let wrap = |p: &[u8]| {
        frame::build_udp4(&Udp4 {
            src_mac: MAC,
            dst_mac: BROADCAST_MAC,
            src_ip: Ipv4Addr::UNSPECIFIED,
            dst_ip: Ipv4Addr::BROADCAST,
            src_port: 68,
            dst_port: 67,
            payload: p,
        })
    };
    for n in 0..payload.len() {
        let _ = respond(&l, &wrap(&payload[..n]));
    }
    // A small deterministic PRNG (xorshift) flipping bytes of the options.
    let mut x: u32 = 0x9e37_79b9;
    for _ in 0..5000 {
        let mut p = payload.clone();
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let at = 236 + (x as usize) % (p.len() - 236);
            p[at] = (x >> 8) as u8;
        }
        let _ = respond(&l, &wrap(&p));
    }
}

#[test]
fn bad_interfaces_are_refused() {
    let mut i = iface();
    i.mac = "01:00:00:00:00:01".into();
    assert_eq!(Lease::new(&i, 1, 1450).unwrap_err().field, "mac");
    let mut i = iface();
    i.subnet_cidr = "10.0.0.0".into();
    assert_eq!(Lease::new(&i, 1, 1450).unwrap_err().field, "subnet_cidr");
    let mut i = iface();
    i.dns_ip = String::new();
    assert_eq!(Lease::new(&i, 1, 1450).unwrap().dns, None);
}

#[test]
fn options_netd_does_not_read_are_dropped_and_bad_ones_refused() {
    let l = lease();
    let mut p = message(MessageType::Discover, MAC).to_vec().unwrap();
    let end = p.iter().rposition(|b| *b == 255).unwrap();
    // Option 152 (BLQ base time) with length 1: dhcproto asserts on its
    // length, so it must never reach the decoder.
    p.splice(end..end, [152, 1, 7]);
    let wrap = |p: &[u8]| {
        frame::build_udp4(&Udp4 {
            src_mac: MAC,
            dst_mac: BROADCAST_MAC,
            src_ip: Ipv4Addr::UNSPECIFIED,
            dst_ip: Ipv4Addr::BROADCAST,
            src_port: 68,
            dst_port: 67,
            payload: p,
        })
    };
    assert!(respond(&l, &wrap(&p)).unwrap().is_some());
    // A requested address of 3 bytes; an option running past the end.
    let mut bad = p.clone();
    bad.splice(end..end, [50, 3, 10, 0, 0]);
    assert_eq!(respond(&l, &wrap(&bad)), Err(Malformed::Options));
    let mut bad = p[..end].to_vec();
    bad.extend_from_slice(&[12, 40, b'x']);
    assert_eq!(respond(&l, &wrap(&bad)), Err(Malformed::Options));
}
