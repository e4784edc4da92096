//! The cluster's data model: the records the replicated state holds.
//!
//! Every record is plain data (serde), kept in ordered maps so iteration
//! order, and therefore every decision made over it, is the same on every
//! node. Intent (what users asked for) and observation (what hosts report)
//! are separate fields (STYLE 9).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// Tags: key → value, on every kind of resource.
pub type Tags = BTreeMap<String, String>;

/// The most tags a resource may carry.
pub const MAX_TAGS: usize = 50;

/// An availability zone of the cluster's region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AvailabilityZone {
    /// Its name, e.g. `az-1`.
    pub name: String,
}

/// Whether a host heartbeats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostHealth {
    /// Heartbeating.
    Healthy,
    /// Missed heartbeats for longer than the timeout.
    Unreachable,
}

/// A host, registered by its agent's first heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// The agent's `host_id`.
    pub id: String,
    /// Its availability zone.
    pub az: String,
    /// The agent's gRPC endpoint, `http://ip:port`.
    pub address: String,
    /// vCPUs the agent offers.
    pub vcpus_total: u32,
    /// Guest memory the agent offers, MiB.
    pub memory_total_mib: u64,
    /// vCPUs held by instances placed here (not finally terminated).
    pub vcpus_allocated: u32,
    /// Memory held by instances placed here, MiB.
    pub memory_allocated_mib: u64,
    /// Instances placed here and holding capacity.
    pub instances: u32,
    /// Health, from heartbeats.
    pub health: HostHealth,
    /// Unix ms of the heartbeat that last changed this record.
    pub last_seen_ms: u64,
    /// `/proc/cpuinfo` model name.
    pub cpu_model: String,
    /// The agent's version.
    pub agent_version: String,
    /// `/dev/kvm` exists.
    pub kvm_present: bool,
    /// Tags.
    pub tags: Tags,
    /// The underlay address its netd reported (other hosts send its VXLAN
    /// traffic there); empty until a netd watches.
    #[serde(default)]
    pub underlay_ip: String,
    /// Disk space its agent offers volume replicas, GiB (0: not reported,
    /// so no replica is placed here).
    #[serde(default)]
    pub disk_total_gib: u64,
    /// Disk space held by the volume replicas placed here, GiB.
    #[serde(default)]
    pub disk_allocated_gib: u64,
    /// Where its blockd's replica server listens (`ip:port`), as blockd
    /// reported it; empty until one does.
    #[serde(default)]
    pub blockd_addr: String,
}

impl Host {
    /// vCPUs not yet placed.
    pub fn free_vcpus(&self) -> u32 {
        self.vcpus_total.saturating_sub(self.vcpus_allocated)
    }
    /// Memory not yet placed, MiB.
    pub fn free_memory_mib(&self) -> u64 {
        self.memory_total_mib
            .saturating_sub(self.memory_allocated_mib)
    }
    /// Disk space not yet given to volume replicas, GiB.
    pub fn free_disk_gib(&self) -> u64 {
        self.disk_total_gib.saturating_sub(self.disk_allocated_gib)
    }
}

/// An instance type: a named size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceType {
    /// e.g. `f1.small`.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u64,
}

/// The instance types a new cluster starts with (t-shirt sizes).
pub fn default_instance_types() -> Vec<InstanceType> {
    [
        ("f1.nano", 1, 128),
        ("f1.micro", 1, 256),
        ("f1.small", 1, 512),
        ("f1.medium", 2, 1024),
        ("f1.large", 2, 2048),
        ("f1.xlarge", 4, 4096),
        ("f1.2xlarge", 8, 8192),
    ]
    .into_iter()
    .map(|(n, v, m)| InstanceType {
        name: n.into(),
        vcpus: v,
        memory_mib: m,
    })
    .collect()
}

/// An image, registered centrally and pushed to every host's agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// `img-<16 hex>`; also its id in the agents' stores.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Kernel path on every host.
    pub kernel_path: String,
    /// Initrd path, empty for none.
    pub initrd_path: String,
    /// Root disk path, empty for none.
    pub rootdisk_path: String,
    /// Kernel command line extras for its instances.
    pub cmdline_extra: String,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Tags.
    pub tags: Tags,
}

/// A key pair's public half.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPair {
    /// `key-<16 hex>`.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// The public key line.
    pub public_key: String,
    /// `SHA256:<base64>`.
    pub fingerprint: String,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Tags.
    pub tags: Tags,
}

/// How a placement group places its members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupStrategy {
    /// Never two members on one host.
    Spread,
    /// Members on as few hosts as possible, in one zone.
    Cluster,
}

impl GroupStrategy {
    /// Parse `spread` or `cluster`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "spread" => Some(Self::Spread),
            "cluster" => Some(Self::Cluster),
            _ => None,
        }
    }
    /// `spread` or `cluster`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Spread => "spread",
            Self::Cluster => "cluster",
        }
    }
}

/// A placement group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementGroup {
    /// `pg-<16 hex>`.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Its strategy.
    pub strategy: GroupStrategy,
    /// Members holding capacity (not finally terminated).
    pub members: BTreeSet<String>,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Tags.
    pub tags: Tags,
}

pub use crate::lifecycle::{DesiredState, ObservedState, PublicState, ShutdownBehavior};

/// An instance: intent, placement and observation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// `i-<16 hex>`.
    pub id: String,
    /// `r-<16 hex>`: the RunInstances call that launched it.
    pub reservation_id: String,
    /// Instance type name.
    pub instance_type: String,
    /// vCPUs (from the type at launch).
    pub vcpus: u32,
    /// Memory, MiB (from the type at launch).
    pub memory_mib: u64,
    /// Image id.
    pub image_id: String,
    /// Zone.
    pub az: String,
    /// Host it is bound to. Never rescheduled, except an instance booted
    /// from a volume that is stopped on a host that went away: its next
    /// start places it on another host of its zone.
    pub host_id: String,
    /// Key pair name, empty for none.
    pub key_name: String,
    /// Placement group name, empty for none.
    pub placement_group: String,
    /// User data for the guest.
    pub user_data: Vec<u8>,
    /// Tags.
    pub tags: Tags,
    /// Client token of the launch, empty for none.
    pub client_token: String,
    /// Intent.
    pub desired: DesiredState,
    /// Observation.
    pub observed: ObservedState,
    /// The host's reason for the last observed change.
    pub observed_reason: String,
    /// The host's stamp of the last observation applied (0: none stamped);
    /// an older report never overrides a newer one.
    #[serde(default)]
    pub observed_seq: u64,
    /// Its primary network interface (none: launched before VPCs, or in
    /// a zone without a default subnet).
    #[serde(default)]
    pub network: Option<Interface>,
    /// Reboots requested; the reconciler reboots while this exceeds
    /// `reboots_done`.
    pub reboots_requested: u64,
    /// Reboots carried out.
    pub reboots_done: u64,
    /// Whether its vCPUs and memory are counted on its host.
    pub holds_capacity: bool,
    /// Unix ms.
    pub launched_at_ms: u64,
    /// What a power-off from inside the guest does.
    #[serde(default)]
    pub shutdown_behavior: ShutdownBehavior,
    /// Booted from this volume (its root disk, `/dev/vda`); none: its root
    /// disk is its host's copy of the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume: Option<String>,
}

impl Instance {
    /// Whether it is gone for good: terminated and deleted from its host.
    pub fn is_final(&self) -> bool {
        self.desired == DesiredState::Terminated && self.observed == ObservedState::Absent
    }

    /// The state users see.
    pub fn public_state(&self) -> PublicState {
        crate::lifecycle::public_state(
            self.desired,
            self.observed,
            self.reboots_requested > self.reboots_done,
        )
    }
}

/// An instance's primary network interface: its subnet, address, MAC and
/// security groups (each host's ferro-netd carries it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Its subnet.
    pub subnet_id: String,
    /// The subnet's VPC.
    pub vpc_id: String,
    /// The private IPv4 address, unique in the VPC while the instance is
    /// not gone.
    pub private_ip: String,
    /// `02:fc:…`, derived from the instance id.
    pub mac: String,
    /// Its security groups (all of its VPC), at least one.
    #[serde(default)]
    pub security_groups: Vec<String>,
    /// The TAP its host's agent made for it (empty until reported).
    #[serde(default)]
    pub tap: String,
}

/// A VPC: a private IPv4 network (docs/architecture.md, "VPCs").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vpc {
    /// `vpc-<16 hex>`.
    pub id: String,
    /// Its block, canonical (`172.31.0.0/16`), /16 to /28.
    pub cidr: String,
    /// The default VPC (RunInstances without a subnet lands there).
    pub is_default: bool,
    /// Tags.
    pub tags: Tags,
    /// Unix ms.
    pub created_at_ms: u64,
    /// The VXLAN network identifier of its traffic between hosts, unique
    /// (0 only in a state written before VNIs, until upgraded).
    #[serde(default)]
    pub vni: u32,
}

/// A subnet: a block of its VPC in one zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    /// `subnet-<16 hex>`.
    pub id: String,
    /// Its VPC.
    pub vpc_id: String,
    /// Its block, inside the VPC's, /16 to /28.
    pub cidr: String,
    /// Its zone.
    pub az: String,
    /// The default subnet of its zone in the default VPC.
    pub is_default: bool,
    /// Tags.
    pub tags: Tags,
    /// Unix ms.
    pub created_at_ms: u64,
}

/// What a security group rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP, with a port range.
    Tcp,
    /// UDP, with a port range.
    Udp,
    /// ICMP, every type.
    Icmp,
    /// Everything.
    All,
}

impl Protocol {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
            Protocol::All => "all",
        }
    }

    /// Whether it has ports.
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

/// The other end of a rule's traffic.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    /// An IPv4 block, canonical.
    Cidr(String),
    /// The members of a group of the same VPC.
    Group(String),
}

/// One allow rule of a security group.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SgRule {
    /// What it matches.
    pub protocol: Protocol,
    /// First port (tcp/udp; 0 otherwise).
    pub from_port: u16,
    /// Last port (tcp/udp; 0 otherwise).
    pub to_port: u16,
    /// Source (ingress) or destination (egress).
    pub peer: Peer,
}

/// A security group: stateful allow rules for the interfaces in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityGroup {
    /// `sg-<16 hex>`.
    pub id: String,
    /// Its VPC.
    pub vpc_id: String,
    /// Unique in the VPC; `default` for the VPC's default group.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Allowed inbound traffic.
    pub ingress: Vec<SgRule>,
    /// Allowed outbound traffic.
    pub egress: Vec<SgRule>,
    /// Tags.
    pub tags: Tags,
    /// Unix ms.
    pub created_at_ms: u64,
}

/// A volume's type: how many copies of it are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeType {
    /// One replica: nothing survives the loss of its host. For a cloud
    /// of one host (`ferro up`) and scratch data.
    Single,
    /// Two replicas.
    Standard,
    /// Three replicas.
    Durable,
}

impl VolumeType {
    /// Parse `single`, `standard` or `durable`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "single" => Some(Self::Single),
            "standard" => Some(Self::Standard),
            "durable" => Some(Self::Durable),
            _ => None,
        }
    }
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Standard => "standard",
            Self::Durable => "durable",
        }
    }
    /// Replicas kept, on distinct hosts of the volume's zone.
    pub fn replicas(self) -> usize {
        match self {
            Self::Single => 1,
            Self::Standard => 2,
            Self::Durable => 3,
        }
    }
}

/// A volume's state, as EC2 names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// Its replicas are being made.
    Creating,
    /// Ready, not attached.
    Available,
    /// Attached to an instance.
    InUse,
    /// Being deleted.
    Deleting,
    /// Deleted.
    Deleted,
    /// Failed.
    Error,
}

impl VolumeState {
    /// Every state, for parsing.
    pub const ALL: [VolumeState; 6] = [
        Self::Creating,
        Self::Available,
        Self::InUse,
        Self::Deleting,
        Self::Deleted,
        Self::Error,
    ];
    /// EC2's name (`in-use`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Available => "available",
            Self::InUse => "in-use",
            Self::Deleting => "deleting",
            Self::Deleted => "deleted",
            Self::Error => "error",
        }
    }
    /// Parse EC2's name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// An attachment's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachmentState {
    /// Being attached.
    Attaching,
    /// Attached (for a stopped instance: from its next start).
    Attached,
    /// Being detached.
    Detaching,
    /// Detached (only ever reported, never kept).
    Detached,
}

impl AttachmentState {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Attaching => "attaching",
            Self::Attached => "attached",
            Self::Detaching => "detaching",
            Self::Detached => "detached",
        }
    }
}

/// A volume's attachment to an instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeAttachment {
    /// The instance.
    pub instance_id: String,
    /// Its device name on the instance, `/dev/vdb` to `/dev/vdz`.
    pub device: String,
    /// Its state.
    pub state: AttachmentState,
    /// Terminating the instance deletes the volume (else detaches it).
    pub delete_on_termination: bool,
}

/// A block volume: its size and zone, the hosts holding its replicas and
/// the epoch of that replica set (docs/architecture.md, "Volumes").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// `vol-<16 hex>`.
    pub id: String,
    /// Size, GiB (1 to 16384).
    pub size_gib: u64,
    /// Its zone; its replicas and the instances it attaches to are there.
    pub az: String,
    /// Its type.
    pub volume_type: VolumeType,
    /// Tags.
    pub tags: Tags,
    /// Unix ms.
    pub created_at_ms: u64,
    /// Its state.
    pub state: VolumeState,
    /// Its attachment, if any (one instance at a time).
    pub attachment: Option<VolumeAttachment>,
    /// The hosts holding its replicas, distinct, of its zone.
    pub replicas: Vec<String>,
    /// The replica set's epoch: raised with every change of `replicas`.
    pub epoch: u64,
    /// Client token of the creation, empty for none.
    pub client_token: String,
    /// The replica hosts whose blockd reports holding it at `epoch` (while
    /// `deleting`: at any epoch). Empty in a state written before blockd
    /// reported replicas.
    #[serde(default)]
    pub held: BTreeSet<String>,
    /// Replica hosts removed from the in-sync set (a primary reported them
    /// failed and the epoch was raised without them): they take no writes
    /// until a resync brings them back.
    #[serde(default)]
    pub out_of_sync: BTreeSet<String>,
    /// The image its replicas were filled from (a root volume); none: made
    /// blank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_image: Option<String>,
    /// The last serving session a primary opened (0: none yet).
    #[serde(default)]
    pub session: u64,
    /// The host that opened `session`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub session_host: String,
    /// The primary of `session` closed it clean: every write it
    /// acknowledged was flushed to every in-sync replica, none failed, its
    /// replicas were compared, and it writes no more. The in-sync replicas
    /// are then identical, so the next primary need not compare them.
    /// Cleared when a session opens and whenever the epoch moves.
    #[serde(default)]
    pub clean: bool,
    /// Replica host → the incarnation its blockd reported for its replica
    /// file (chosen when the file is made). A different one later means
    /// the file was made again, blank: that replica leaves the in-sync set.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub incarnations: BTreeMap<String, u64>,
}

impl Volume {
    /// The replica hosts in sync, in placement order (the first is the
    /// primary).
    pub fn in_sync(&self) -> impl Iterator<Item = &String> {
        self.replicas
            .iter()
            .filter(|r| !self.out_of_sync.contains(*r))
    }
}

/// What a key may do (docs/architecture.md, "Roles").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything a user may, plus keys, hosts and the cluster.
    Admin,
    /// The compute API: instances, images, key pairs, groups, tags.
    User,
    /// One host's agent: heartbeats for that host only.
    Host,
}

impl Role {
    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Host => "host",
        }
    }
}

/// An API key: only the sha256 of its secret is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKey {
    /// `ak-<16 hex>`.
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Lowercase hex sha256 of the bearer secret.
    pub secret_sha256: String,
    /// The role is admin. Kept beside `role` for state written before roles
    /// existed, which had only this flag.
    pub admin: bool,
    /// Unix ms.
    pub created_at_ms: u64,
    /// The role; absent in state written before roles existed (then
    /// `admin` decides between admin and user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// For a host key: the host it speaks for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_id: String,
    /// The secret that signs EC2 Query requests (AWS Signature Version 4)
    /// made with this key's id as the access key id. SigV4 needs the
    /// secret itself on the verifying side, so it is kept in the state
    /// (beside the cluster CA's key) and shown once, at creation; empty for
    /// keys made before the EC2 endpoint and for host keys.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ec2_secret: String,
}

impl ApiKey {
    /// The key's role.
    pub fn role(&self) -> Role {
        match self.role {
            Some(r) => r,
            None if self.admin => Role::Admin,
            None => Role::User,
        }
    }
}

/// A one-time token an operator made for a host to join with
/// (`ferro hosts join`); only its sha256 is kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// The host it is for.
    pub host_id: String,
    /// Unix ms after which it no longer works.
    pub expires_at_ms: u64,
    /// Unix ms.
    pub created_at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(desired: DesiredState, observed: ObservedState) -> Instance {
        Instance {
            id: "i-1".into(),
            reservation_id: "r-1".into(),
            instance_type: "f1.nano".into(),
            vcpus: 1,
            memory_mib: 128,
            image_id: "img-1".into(),
            az: "az-1".into(),
            host_id: "h1".into(),
            key_name: String::new(),
            placement_group: String::new(),
            user_data: vec![],
            tags: Tags::new(),
            client_token: String::new(),
            desired,
            observed,
            observed_reason: String::new(),
            observed_seq: 0,
            network: None,
            reboots_requested: 0,
            reboots_done: 0,
            holds_capacity: true,
            launched_at_ms: 0,
            shutdown_behavior: ShutdownBehavior::Stop,
            root_volume: None,
        }
    }

    #[test]
    fn public_state_combines_intent_and_observation() {
        use DesiredState as D;
        use ObservedState as O;
        use PublicState as P;
        let cases = [
            (D::Running, O::Absent, P::Pending),
            (D::Running, O::Running, P::Running),
            (D::Running, O::Unknown, P::Unknown),
            (D::Stopped, O::Running, P::Stopping),
            (D::Stopped, O::Stopped, P::Stopped),
            (D::Terminated, O::Running, P::ShuttingDown),
            (D::Terminated, O::Absent, P::Terminated),
            (D::Running, O::Failed, P::Failed),
        ];
        for (d, o, p) in cases {
            assert_eq!(inst(d, o).public_state(), p, "{d:?}/{o:?}");
        }
        let mut i = inst(D::Running, O::Running);
        i.reboots_requested = 1;
        assert_eq!(i.public_state(), P::Rebooting);
    }

    #[test]
    fn seeded_types_are_sorted_by_size() {
        let t = default_instance_types();
        assert!(t.windows(2).all(|w| w[0].memory_mib < w[1].memory_mib));
    }
}
