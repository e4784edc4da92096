//! IMDSv2 from the guest's side: every path, every status, tokens.

use std::time::{Duration, Instant};

use ferro_proto::compute::v1::{
    GroupOnHost, HostNetwork, LocalInterface, SecurityGroup, VpcOnHost,
};

use super::http::{parse, Parsed};
use super::service::{MAX_TOKENS, TOKEN_BYTES};
use super::*;

const RANDOM: [u8; 32] = [0xab; 32];

fn data() -> InterfaceData {
    InterfaceData {
        instance_id: "i-0123456789abcdef0".into(),
        mac: "02:00:0a:00:00:05".into(),
        private_ip: Ipv4Addr::new(10, 0, 0, 5),
        hostname: "ip-10-0-0-5".into(),
        availability_zone: "fc-1a".into(),
        instance_type: "t3.micro".into(),
        region: "fc".into(),
        image_id: "img-0123456789abcdef".into(),
        public_key: "ssh-ed25519 AAAA me@laptop".into(),
        key_name: "laptop".into(),
        user_data: b"#cloud-config\n\x00\xff".to_vec(),
        security_groups: vec![
            ("sg-1".into(), "default".into()),
            ("sg-2".into(), "web".into()),
        ],
        subnet_id: "subnet-1".into(),
        subnet_cidr: "10.0.0.0/24".into(),
        vpc_id: "vpc-1".into(),
        vpc_cidr: "10.0.0.0/16".into(),
    }
}

fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> Request {
    Request {
        method: method.into(),
        path: path.into(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
    }
}

/// A client of one interface.
struct Guest {
    data: InterfaceData,
    tokens: Tokens,
    now: Instant,
}

impl Guest {
    fn new() -> Self {
        Guest {
            data: data(),
            tokens: Tokens::default(),
            now: Instant::now(),
        }
    }

    fn send(&mut self, r: &Request) -> Response {
        handle(r, &self.data, &mut self.tokens, self.now, &RANDOM)
    }

    fn token(&mut self, ttl: &str) -> Response {
        self.send(&req(
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", ttl)],
        ))
    }

    fn get_with(&mut self, path: &str, token: &str) -> Response {
        self.send(&req("GET", path, &[("X-aws-ec2-metadata-token", token)]))
    }

    /// GET with a fresh token: (status, body).
    fn get(&mut self, path: &str) -> (u16, String) {
        let t = self.token("60");
        assert_eq!(t.status, Status::Ok);
        let token = String::from_utf8(t.body).unwrap();
        let r = self.get_with(path, &token);
        (
            r.status.code(),
            String::from_utf8_lossy(&r.body).into_owned(),
        )
    }

    fn ok(&mut self, path: &str) -> String {
        let (code, body) = self.get(path);
        assert_eq!(code, 200, "{path}: {body}");
        body
    }

    fn missing(&mut self, path: &str) {
        let (code, body) = self.get(path);
        assert_eq!(code, 404, "{path}: {body}");
    }
}

#[test]
fn a_token_is_random_hex_and_announces_its_ttl() {
    let mut g = Guest::new();
    let r = g.token("21600");
    assert_eq!(r.status, Status::Ok);
    assert_eq!(r.body, "ab".repeat(TOKEN_BYTES).as_bytes());
    assert_eq!(
        r.headers,
        [("X-aws-ec2-metadata-token-ttl-seconds", "21600".to_string())]
    );
    assert_eq!(g.tokens.len(), 1);
}

#[test]
fn bad_ttls_are_400() {
    let mut g = Guest::new();
    for ttl in [
        "",
        "0",
        "21601",
        "-1",
        "1.5",
        "abc",
        "99999999999999999999",
        "+5",
        " ",
    ] {
        assert_eq!(g.token(ttl).status, Status::BadRequest, "{ttl:?}");
    }
    let r = g.send(&req("PUT", "/latest/api/token", &[]));
    assert_eq!(r.status, Status::BadRequest);
    assert!(g.tokens.is_empty());
    assert_eq!(g.token("1").status, Status::Ok);
}

#[test]
fn proxied_token_requests_are_403() {
    let mut g = Guest::new();
    let r = g.send(&req(
        "PUT",
        "/latest/api/token",
        &[
            ("X-aws-ec2-metadata-token-ttl-seconds", "60"),
            ("x-forwarded-for", "10.0.0.9"),
        ],
    ));
    assert_eq!(r.status, Status::Forbidden);
    assert!(g.tokens.is_empty());
}

#[test]
fn too_little_randomness_is_500_never_a_weak_token() {
    let mut g = Guest::new();
    let r = handle(
        &req(
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
        ),
        &g.data,
        &mut g.tokens,
        g.now,
        &RANDOM[..31],
    );
    assert_eq!(r.status, Status::Internal);
    assert!(g.tokens.is_empty());
}

#[test]
fn gets_need_a_valid_unexpired_token() {
    let mut g = Guest::new();
    let path = "/latest/meta-data/instance-id";
    assert_eq!(g.send(&req("GET", path, &[])).status, Status::Unauthorized);
    assert_eq!(g.get_with(path, "").status, Status::Unauthorized);
    assert_eq!(g.get_with(path, "nonsense").status, Status::Unauthorized);
    let t = String::from_utf8(g.token("2").body).unwrap();
    assert_eq!(g.get_with(path, &t).status, Status::Ok);
    // Unknown paths are checked after the token, as EC2 does.
    assert_eq!(
        g.send(&req("GET", "/nope", &[])).status,
        Status::Unauthorized
    );
    g.now += Duration::from_millis(1999);
    assert_eq!(g.get_with(path, &t).status, Status::Ok);
    g.now += Duration::from_millis(1);
    assert_eq!(g.get_with(path, &t).status, Status::Unauthorized);
}

#[test]
fn another_interfaces_token_is_refused() {
    let mut a = Guest::new();
    let mut b = Guest::new();
    b.data.instance_id = "i-b".into();
    let ta = String::from_utf8(a.token("60").body).unwrap();
    let r = b.get_with("/latest/meta-data/instance-id", &ta);
    assert_eq!(r.status, Status::Unauthorized);
    // Even the same Tokens refuses a token issued to another instance
    // (a TAP handed to a new instance keeps no old token).
    let mut tokens = std::mem::take(&mut a.tokens);
    let r = handle(
        &req(
            "GET",
            "/latest/meta-data/instance-id",
            &[("X-aws-ec2-metadata-token", &ta)],
        ),
        &b.data,
        &mut tokens,
        b.now,
        &RANDOM,
    );
    assert_eq!(r.status, Status::Unauthorized);
}

#[test]
fn tokens_are_bounded_and_expired_ones_dropped() {
    let mut g = Guest::new();
    for i in 0..MAX_TOKENS + 10 {
        let mut random = [0u8; 32];
        random[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let r = handle(
            &req(
                "PUT",
                "/latest/api/token",
                &[("X-aws-ec2-metadata-token-ttl-seconds", "100")],
            ),
            &g.data,
            &mut g.tokens,
            g.now + Duration::from_millis(i as u64),
            &random,
        );
        assert_eq!(r.status, Status::Ok);
    }
    assert_eq!(g.tokens.len(), MAX_TOKENS);
    g.now += Duration::from_secs(200);
    g.token("1");
    assert_eq!(g.tokens.len(), 1);
}

#[test]
fn methods() {
    let mut g = Guest::new();
    let t = String::from_utf8(g.token("60").body).unwrap();
    let h = [("X-aws-ec2-metadata-token", t.as_str())];
    for m in ["POST", "DELETE", "HEAD", "OPTIONS", "get", "PATCH"] {
        let r = g.send(&req(m, "/latest/meta-data/", &h));
        assert_eq!(r.status, Status::MethodNotAllowed, "{m}");
        assert_eq!(r.headers, [("Allow", "GET, PUT".to_string())]);
    }
    let r = g.send(&req("PUT", "/latest/meta-data/", &h));
    assert_eq!(r.status, Status::MethodNotAllowed);
    let r = g.send(&req("GET", "/latest/api/token", &h));
    assert_eq!(r.status, Status::MethodNotAllowed);
    assert_eq!(r.headers, [("Allow", "PUT".to_string())]);
    // The token path is /latest's only.
    let r = g.send(&req(
        "PUT",
        "/2021-03-23/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
    ));
    assert_eq!(r.status, Status::MethodNotAllowed);
}

#[test]
fn every_leaf() {
    let mut g = Guest::new();
    let m = "/latest/meta-data";
    assert_eq!(g.ok(&format!("{m}/instance-id")), "i-0123456789abcdef0");
    assert_eq!(g.ok(&format!("{m}/local-ipv4")), "10.0.0.5");
    assert_eq!(g.ok(&format!("{m}/mac")), "02:00:0a:00:00:05");
    assert_eq!(g.ok(&format!("{m}/hostname")), "ip-10-0-0-5");
    assert_eq!(g.ok(&format!("{m}/local-hostname")), "ip-10-0-0-5");
    assert_eq!(g.ok(&format!("{m}/instance-type")), "t3.micro");
    assert_eq!(g.ok(&format!("{m}/placement/availability-zone")), "fc-1a");
    assert_eq!(g.ok(&format!("{m}/security-groups")), "default\nweb");
    assert_eq!(
        g.ok(&format!("{m}/public-keys/0/openssh-key")),
        "ssh-ed25519 AAAA me@laptop"
    );
    let n = format!("{m}/network/interfaces/macs/02:00:0a:00:00:05");
    for (leaf, want) in [
        ("device-number", "0"),
        ("local-ipv4s", "10.0.0.5"),
        ("local-hostname", "ip-10-0-0-5"),
        ("mac", "02:00:0a:00:00:05"),
        ("subnet-id", "subnet-1"),
        ("subnet-ipv4-cidr-block", "10.0.0.0/24"),
        ("vpc-id", "vpc-1"),
        ("vpc-ipv4-cidr-block", "10.0.0.0/16"),
        ("vpc-ipv4-cidr-blocks", "10.0.0.0/16"),
        ("security-group-ids", "sg-1\nsg-2"),
        ("security-groups", "default\nweb"),
    ] {
        assert_eq!(g.ok(&format!("{n}/{leaf}")), want, "{leaf}");
    }
    // A leaf with a trailing slash is still the leaf.
    assert_eq!(g.ok(&format!("{m}/instance-id/")), "i-0123456789abcdef0");
    g.missing(&format!("{m}/instance-id/more"));
    g.missing(&format!("{m}/kernel-id"));
}

#[test]
fn every_listing() {
    let mut g = Guest::new();
    assert_eq!(
        g.ok("/latest/meta-data/"),
        "ami-id\nhostname\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\nmac\n\
         network/\nplacement/\npublic-keys/\nsecurity-groups"
    );
    assert_eq!(g.ok("/latest/meta-data"), g.ok("/latest/meta-data/"));
    assert_eq!(g.ok("/latest/meta-data/placement/"), "availability-zone");
    assert_eq!(g.ok("/latest/meta-data/public-keys/"), "0=laptop");
    assert_eq!(g.ok("/latest/meta-data/public-keys/0/"), "openssh-key");
    assert_eq!(g.ok("/latest/meta-data/network/"), "interfaces/");
    assert_eq!(g.ok("/latest/meta-data/network/interfaces/"), "macs/");
    assert_eq!(
        g.ok("/latest/meta-data/network/interfaces/macs/"),
        "02:00:0a:00:00:05/"
    );
    assert_eq!(
        g.ok("/latest/meta-data/network/interfaces/macs/02:00:0a:00:00:05/"),
        "device-number\nlocal-hostname\nlocal-ipv4s\nmac\nsecurity-group-ids\n\
         security-groups\nsubnet-id\nsubnet-ipv4-cidr-block\nvpc-id\n\
         vpc-ipv4-cidr-block\nvpc-ipv4-cidr-blocks"
    );
    assert_eq!(g.ok("/latest/"), "dynamic/\nmeta-data/\nuser-data");
    assert_eq!(g.ok("/latest"), "dynamic/\nmeta-data/\nuser-data");
    assert_eq!(g.ok("/"), "1.0\n2009-04-04\n2016-09-02\n2021-03-23\nlatest");
}

#[test]
fn the_instance_identity_document_names_the_asking_instance() {
    let mut g = Guest::new();
    assert_eq!(g.ok("/latest/dynamic/"), "instance-identity/");
    assert_eq!(g.ok("/latest/dynamic/instance-identity/"), "document");
    let doc = g.ok("/2021-03-23/dynamic/instance-identity/document");
    let v: serde_json::Value = serde_json::from_str(&doc).expect("JSON");
    assert_eq!(v["instanceId"], "i-0123456789abcdef0");
    assert_eq!(v["region"], "fc");
    assert_eq!(v["availabilityZone"], "fc-1a");
    assert_eq!(v["privateIp"], "10.0.0.5");
    assert_eq!(v["instanceType"], "t3.micro");
    assert_eq!(v["imageId"], "img-0123456789abcdef");
    assert_eq!(g.ok("/latest/meta-data/ami-id"), "img-0123456789abcdef");
}

#[test]
fn user_data_is_raw_bytes() {
    let mut g = Guest::new();
    let t = String::from_utf8(g.token("60").body).unwrap();
    let r = g.get_with("/latest/user-data", &t);
    assert_eq!(r.status, Status::Ok);
    assert_eq!(r.body, b"#cloud-config\n\x00\xff");
    assert_eq!(r.content_type, "application/octet-stream");
    g.data.user_data.clear();
    g.missing("/latest/user-data");
    assert_eq!(g.ok("/latest/"), "dynamic/\nmeta-data/");
}

#[test]
fn absent_facts_are_404_and_unlisted() {
    let mut g = Guest::new();
    g.data.public_key.clear();
    g.data.availability_zone.clear();
    g.data.instance_type.clear();
    g.data.hostname.clear();
    g.data.security_groups.clear();
    g.data.subnet_id.clear();
    g.data.vpc_cidr.clear();
    g.data.image_id.clear();
    for p in [
        "public-keys/",
        "public-keys/0/openssh-key",
        "placement/availability-zone",
        "placement/",
        "instance-type",
        "hostname",
        "local-hostname",
        "security-groups",
    ] {
        g.missing(&format!("/latest/meta-data/{p}"));
    }
    assert_eq!(
        g.ok("/latest/meta-data/"),
        "instance-id\nlocal-ipv4\nmac\nnetwork/"
    );
    let n = "/latest/meta-data/network/interfaces/macs/02:00:0a:00:00:05/";
    assert_eq!(
        g.ok(n),
        "device-number\nlocal-ipv4s\nmac\nsubnet-ipv4-cidr-block\nvpc-id"
    );
}

#[test]
fn version_prefixes() {
    let mut g = Guest::new();
    for v in ["latest", "1.0", "2009-04-04", "2021-03-23", "2099-12-31"] {
        assert_eq!(
            g.ok(&format!("/{v}/meta-data/instance-id")),
            "i-0123456789abcdef0",
            "{v}"
        );
    }
    for v in [
        "2009-4-04",
        "20090404",
        "2009-04-04x",
        "v1",
        "..",
        "LATEST",
        "meta-data",
    ] {
        g.missing(&format!("/{v}/meta-data/instance-id"));
    }
    g.missing("/latest/nope");
    g.missing("/latest/meta-data/nope");
    g.missing("/latest/meta-data/network/interfaces/macs/02:00:0a:00:00:06/mac");
    g.missing("/latest/meta-data/../meta-data/instance-id");
}

#[test]
fn a_whole_exchange_from_bytes_to_bytes() {
    let mut g = Guest::new();
    let raw = b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\n\
        X-aws-ec2-metadata-token-ttl-seconds: 30\r\n\r\n";
    let Parsed::Complete { request, .. } = parse(raw) else {
        panic!("not parsed");
    };
    let out = g.send(&request).to_bytes();
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    let token = text.rsplit("\r\n\r\n").next().unwrap().to_string();
    let raw = format!(
        "GET /latest/meta-data/local-ipv4 HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n\r\n"
    );
    let Parsed::Complete { request, .. } = parse(raw.as_bytes()) else {
        panic!("not parsed");
    };
    let text = String::from_utf8(g.send(&request).to_bytes()).unwrap();
    assert!(text.contains("Content-Length: 8\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n10.0.0.5"), "{text}");
}

fn net() -> HostNetwork {
    let local = |id: &str, ip: &str, tap: &str| LocalInterface {
        instance_id: id.into(),
        mac: "02:00:0A:00:00:05".into(),
        private_ip: ip.into(),
        subnet_cidr: "10.0.0.0/24".into(),
        router_ip: "10.0.0.1".into(),
        tap: tap.into(),
        security_group_ids: vec!["sg-1".into(), "sg-gone".into()],
        user_data: b"hi".to_vec(),
        subnet_id: "subnet-1".into(),
        ..Default::default()
    };
    HostNetwork {
        vpcs: vec![VpcOnHost {
            vpc_id: "vpc-1".into(),
            vni: 0x10203,
            cidr_block: "10.0.0.0/16".into(),
            local: vec![
                local("i-a", "10.0.0.5", "fct-a"),
                local("i-b", "10.0.0.6", "fct-b"),
                local("i-c", "bad", "fct-c"),
                local("i-d", "10.0.0.8", ""),
                local("i-e", "10.0.0.9", "fct-e"),
                local("i-f", "10.0.0.10", "fct-e"),
                local("i-g", "10.0.0.11", "fbr1"),
                local("i-h", "10.0.0.12", "fct-none"),
            ],
            ..Default::default()
        }],
        groups: vec![GroupOnHost {
            group: Some(SecurityGroup {
                group_id: "sg-1".into(),
                group_name: "default".into(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn the_state_becomes_one_server_per_tap() {
    let index = |t: &str| match t {
        "fct-none" => None,
        t => Some(t.len() as u32),
    };
    let (wanted, bad) = wanted(&net(), index);
    let taps: Vec<&str> = wanted.iter().map(|w| w.tap.as_str()).collect();
    assert_eq!(taps, ["fct-a", "fct-b"]);
    let mut fields: Vec<_> = bad
        .iter()
        .map(|b| (b.instance_id.as_str(), b.field))
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            ("i-c", "private_ip"),
            ("i-e", "tap"),
            ("i-f", "tap"),
            ("i-g", "tap")
        ]
    );
    let a = &wanted[0];
    assert_eq!(
        a.link,
        Link {
            ifindex: 5,
            router_mac: [0x02, 0xfe, 0x01, 0x02, 0x03, 0x01],
            router_ip: Ipv4Addr::new(10, 0, 0, 1),
            prefix: 24,
        }
    );
    assert_eq!(a.link.router_mac, desired::router_mac(0x10203));
    assert_eq!(a.data.mac, "02:00:0a:00:00:05");
    assert_eq!(a.data.private_ip, Ipv4Addr::new(10, 0, 0, 5));
    assert_eq!(
        a.data.security_groups,
        [("sg-1".to_string(), "default".to_string())]
    );
    assert_eq!(a.data.vpc_id, "vpc-1");
    assert_eq!(a.data.vpc_cidr, "10.0.0.0/16");
    assert_eq!(a.data.user_data, b"hi");
    assert_eq!(wanted[1].data.instance_id, "i-b");
}

#[test]
fn sync_starts_updates_and_stops_servers() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut m = Metadata::default();
        // No TAP exists here.
        m.sync_with(&net(), |_| None);
        assert!(m.is_empty());
        let mut n = net();
        n.vpcs[0].local.truncate(2);
        m.sync_with(&n, |t| Some(1000 + t.len() as u32));
        let mut taps: Vec<&str> = m.taps().collect();
        taps.sort();
        assert_eq!(taps, ["fct-a", "fct-b"]);
        // New data in place; a new instance behind a TAP restarts it.
        n.vpcs[0].local[0].user_data = b"new".to_vec();
        n.vpcs[0].local[1].instance_id = "i-b2".into();
        m.sync_with(&n, |t| Some(1000 + t.len() as u32));
        assert_eq!(m.running["fct-a"].data.borrow().user_data, b"new");
        assert_eq!(m.running["fct-b"].instance_id, "i-b2");
        n.vpcs[0].local.remove(0);
        m.sync_with(&n, |t| Some(1000 + t.len() as u32));
        assert_eq!(m.taps().collect::<Vec<_>>(), ["fct-b"]);
        m.sync_with(&HostNetwork::default(), |_| Some(1));
        assert!(m.is_empty());
    });
}
