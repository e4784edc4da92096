//! IMDSv2, sans-IO: [`handle`] answers one request from one interface's
//! [`InterfaceData`] and [`Tokens`]. It never sees an address: the caller
//! owns exactly one interface (the TAP the request came in on), so a forged
//! source address still reaches only that interface's data and tokens.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::http::{Request, Response, Status};

/// The path of token requests (no other version has it).
pub const TOKEN_PATH: &str = "/latest/api/token";
/// The header of a token request giving its lifetime.
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// The header carrying a token.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// Longest token lifetime (6 hours, as EC2).
pub const MAX_TTL_SECS: u64 = 21_600;
/// Random bytes per token.
pub const TOKEN_BYTES: usize = 32;
/// Most live tokens per interface; the one expiring first makes room.
pub const MAX_TOKENS: usize = 1024;
/// Versions listed at `/` (any `YYYY-MM-DD` is served).
const VERSIONS: [&str; 5] = ["1.0", "2009-04-04", "2016-09-02", "2021-03-23", "latest"];

/// What one interface's guest may read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceData {
    /// `meta-data/instance-id`.
    pub instance_id: String,
    /// `meta-data/mac`, lower case.
    pub mac: String,
    /// `meta-data/local-ipv4`.
    pub private_ip: Ipv4Addr,
    /// `meta-data/hostname` and `local-hostname` (empty: absent).
    pub hostname: String,
    /// `meta-data/placement/availability-zone` (empty: absent).
    pub availability_zone: String,
    /// `meta-data/instance-type` (empty: absent).
    pub instance_type: String,
    /// The cluster's region, for the instance identity document.
    pub region: String,
    /// The instance's image (`meta-data/ami-id`; empty: absent).
    pub image_id: String,
    /// The OpenSSH public key line (empty: no `public-keys/`).
    pub public_key: String,
    /// Its key pair's name.
    pub key_name: String,
    /// `user-data` (empty: absent).
    pub user_data: Vec<u8>,
    /// The interface's security groups: (id, name).
    pub security_groups: Vec<(String, String)>,
    /// The subnet (empty: absent).
    pub subnet_id: String,
    /// The subnet's block, `a.b.c.d/n`.
    pub subnet_cidr: String,
    /// The VPC.
    pub vpc_id: String,
    /// The VPC's block (empty: absent).
    pub vpc_cidr: String,
}

/// The live tokens of one interface.
#[derive(Debug, Default)]
pub struct Tokens {
    /// Token → (the instance it was issued to, when it expires).
    live: HashMap<String, (String, Instant)>,
}

impl Tokens {
    /// Issue `token` to `instance_id` until `expires`.
    fn issue(&mut self, token: String, instance_id: &str, now: Instant, expires: Instant) {
        self.live.retain(|_, (_, e)| *e > now);
        if self.live.len() >= MAX_TOKENS {
            let first = self
                .live
                .iter()
                .min_by_key(|(_, (_, e))| *e)
                .map(|(t, _)| t.clone());
            if let Some(t) = first {
                self.live.remove(&t);
            }
        }
        self.live.insert(token, (instance_id.to_string(), expires));
    }

    /// Whether `token` was issued to `instance_id` and is unexpired.
    pub fn valid(&self, token: &str, instance_id: &str, now: Instant) -> bool {
        self.live
            .get(token)
            .is_some_and(|(id, e)| id == instance_id && now < *e)
    }

    /// How many tokens are held (expired ones until the next issue).
    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

/// The answer to `req` from the interface of `data`, whose tokens are
/// `tokens`. A new token is made of `random`'s first [`TOKEN_BYTES`].
pub fn handle(
    req: &Request,
    data: &InterfaceData,
    tokens: &mut Tokens,
    now: Instant,
    random: &[u8],
) -> Response {
    match req.method.as_str() {
        "PUT" if req.path == TOKEN_PATH => issue(req, data, tokens, now, random),
        "PUT" => Response::error(Status::MethodNotAllowed).with("Allow", "GET"),
        "GET" if req.path == TOKEN_PATH => {
            Response::error(Status::MethodNotAllowed).with("Allow", "PUT")
        }
        "GET" => {
            let token = req.header(TOKEN_HEADER).unwrap_or("");
            if !tokens.valid(token, &data.instance_id, now) {
                return Response::error(Status::Unauthorized);
            }
            get(&req.path, data)
        }
        _ => Response::error(Status::MethodNotAllowed).with("Allow", "GET, PUT"),
    }
}

fn issue(
    req: &Request,
    data: &InterfaceData,
    tokens: &mut Tokens,
    now: Instant,
    random: &[u8],
) -> Response {
    // EC2 refuses token requests that went through a proxy.
    if req.has("x-forwarded-for") {
        return Response::error(Status::Forbidden);
    }
    let Some(ttl) = req.header(TTL_HEADER).and_then(parse_ttl) else {
        return Response::error(Status::BadRequest);
    };
    let Some(bytes) = random.get(..TOKEN_BYTES) else {
        return Response::error(Status::Internal);
    };
    let token = hex(bytes);
    tokens.issue(
        token.clone(),
        &data.instance_id,
        now,
        now + Duration::from_secs(ttl),
    );
    Response::text(Status::Ok, token).with("X-aws-ec2-metadata-token-ttl-seconds", ttl.to_string())
}

/// A lifetime in seconds, 1 to [`MAX_TTL_SECS`], decimal digits only.
fn parse_ttl(v: &str) -> Option<u64> {
    if v.is_empty() || v.len() > 5 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|t| (1..=MAX_TTL_SECS).contains(t))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `v` names a version: `latest`, `1.0` or a `YYYY-MM-DD` date.
fn is_version(v: &str) -> bool {
    let date = |v: &str| {
        let b = v.as_bytes();
        b.len() == 10
            && b.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                _ => c.is_ascii_digit(),
            })
    };
    v == "latest" || v == "1.0" || date(v)
}

fn get(path: &str, data: &InterfaceData) -> Response {
    let mut parts = path.split('/').filter(|s| !s.is_empty());
    let Some(version) = parts.next() else {
        return Response::text(Status::Ok, VERSIONS.join("\n"));
    };
    if !is_version(version) {
        return Response::error(Status::NotFound);
    }
    let rest: Vec<&str> = parts.collect();
    let node = Node::root(data);
    match node.find(&rest) {
        Some(Node::Leaf(bytes)) if rest.first() == Some(&"user-data") => Response {
            content_type: "application/octet-stream",
            ..Response::text(Status::Ok, bytes.clone())
        },
        Some(Node::Leaf(bytes)) => Response::text(Status::Ok, bytes.clone()),
        Some(Node::Dir(entries)) => Response::text(Status::Ok, listing(entries)),
        None => Response::error(Status::NotFound),
    }
}

/// One name of a listing: how it is looked up, how it is listed.
type Entries = BTreeMap<String, (String, Node)>;

/// The metadata as a tree.
#[derive(Clone, Debug)]
enum Node {
    Leaf(Vec<u8>),
    Dir(Entries),
}

impl Node {
    fn dir() -> Self {
        Node::Dir(BTreeMap::new())
    }

    /// With `name` listed as itself (directories with a `/`), if `node`
    /// is not an empty leaf or directory.
    fn put(self, name: &str, node: Node) -> Self {
        let label = match node {
            Node::Dir(_) => format!("{name}/"),
            Node::Leaf(_) => name.to_string(),
        };
        self.put_as(name, label, node)
    }

    fn put_as(self, name: &str, label: String, node: Node) -> Self {
        let Node::Dir(mut e) = self else {
            return self;
        };
        let empty = match &node {
            Node::Leaf(b) => b.is_empty(),
            Node::Dir(d) => d.is_empty(),
        };
        if !empty {
            e.insert(name.to_string(), (label, node));
        }
        Node::Dir(e)
    }

    fn find(&self, path: &[&str]) -> Option<&Node> {
        match (path.split_first(), self) {
            (None, n) => Some(n),
            (Some((first, rest)), Node::Dir(e)) => e.get(*first)?.1.find(rest),
            (Some(_), Node::Leaf(_)) => None,
        }
    }

    /// Everything under a version.
    fn root(d: &InterfaceData) -> Node {
        Node::dir()
            .put("meta-data", meta_data(d))
            .put("user-data", Node::Leaf(d.user_data.clone()))
            .put("dynamic", dynamic(d))
    }
}

fn leaf(s: impl Into<String>) -> Node {
    Node::Leaf(s.into().into_bytes())
}

fn lines<'a>(it: impl Iterator<Item = &'a str>) -> Node {
    leaf(it.collect::<Vec<_>>().join("\n"))
}

fn listing(entries: &Entries) -> Vec<u8> {
    let names: Vec<&str> = entries.values().map(|(l, _)| l.as_str()).collect();
    names.join("\n").into_bytes()
}

/// `dynamic/instance-identity/document`: the JSON document EC2 serves
/// (unsigned: there is no `signature` or `pkcs7`), which EC2-aware
/// software such as cloud-init reads for the region and the instance.
fn dynamic(d: &InterfaceData) -> Node {
    let doc = serde_json::json!({
        "accountId": "",
        "architecture": "x86_64",
        "availabilityZone": d.availability_zone,
        "imageId": d.image_id,
        "instanceId": d.instance_id,
        "instanceType": d.instance_type,
        "privateIp": d.private_ip.to_string(),
        "region": d.region,
        "version": "2017-09-30",
    });
    let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    Node::dir().put("instance-identity", Node::dir().put("document", leaf(text)))
}

fn meta_data(d: &InterfaceData) -> Node {
    let group_names = || lines(d.security_groups.iter().map(|(_, n)| n.as_str()));
    let keys = if d.public_key.is_empty() {
        Node::dir()
    } else {
        let key = Node::dir().put("openssh-key", leaf(d.public_key.as_str()));
        Node::dir().put_as("0", format!("0={}", d.key_name), key)
    };
    Node::dir()
        .put("instance-id", leaf(d.instance_id.as_str()))
        .put("local-ipv4", leaf(d.private_ip.to_string()))
        .put("mac", leaf(d.mac.as_str()))
        .put("hostname", leaf(d.hostname.as_str()))
        .put("local-hostname", leaf(d.hostname.as_str()))
        .put("instance-type", leaf(d.instance_type.as_str()))
        .put("ami-id", leaf(d.image_id.as_str()))
        .put(
            "placement",
            Node::dir().put("availability-zone", leaf(d.availability_zone.as_str())),
        )
        .put("security-groups", group_names())
        .put("public-keys", keys)
        .put("network", network(d))
}

fn network(d: &InterfaceData) -> Node {
    let group_ids = lines(d.security_groups.iter().map(|(id, _)| id.as_str()));
    let group_names = lines(d.security_groups.iter().map(|(_, n)| n.as_str()));
    let mac = Node::dir()
        .put("device-number", leaf("0"))
        .put("local-hostname", leaf(d.hostname.as_str()))
        .put("local-ipv4s", leaf(d.private_ip.to_string()))
        .put("mac", leaf(d.mac.as_str()))
        .put("security-group-ids", group_ids)
        .put("security-groups", group_names)
        .put("subnet-id", leaf(d.subnet_id.as_str()))
        .put("subnet-ipv4-cidr-block", leaf(d.subnet_cidr.as_str()))
        .put("vpc-id", leaf(d.vpc_id.as_str()))
        .put("vpc-ipv4-cidr-block", leaf(d.vpc_cidr.as_str()))
        .put("vpc-ipv4-cidr-blocks", leaf(d.vpc_cidr.as_str()));
    let macs = Node::dir().put(&d.mac, mac);
    Node::dir().put("interfaces", Node::dir().put("macs", macs))
}
