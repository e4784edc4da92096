//! The commands that change the cluster state (the entries of the
//! replicated log) and what applying one returns. Every field added to a
//! command is `#[serde(default)]`, so entries an older controller wrote
//! still read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{CaMaterial, StateError};
use crate::model::*;

/// What RunInstances asks for (everything but the generated ids).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// How many, 1 to 100.
    pub count: u32,
    /// Type name.
    pub instance_type: String,
    /// Image id or name.
    pub image: String,
    /// Zone, empty for any.
    pub az: String,
    /// Key pair name, empty for none.
    pub key_name: String,
    /// User data, at most [`MAX_USER_DATA`] bytes.
    pub user_data: Vec<u8>,
    /// Placement group name, empty for none.
    pub placement_group: String,
    /// Tags for every instance.
    pub tags: Tags,
    /// Idempotency token, empty for none.
    pub client_token: String,
    /// Spread instead of bin-pack.
    pub spread: bool,
    /// What a power-off from inside the guest does.
    #[serde(default)]
    pub shutdown_behavior: ShutdownBehavior,
    /// The subnet of the primary interface (empty: the default subnet of
    /// the zone it is placed in). Pins the zone. Not serialized when empty,
    /// so client tokens of requests without it hash as before.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subnet_id: String,
    /// The primary private address (empty: the lowest free one); count 1
    /// only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub private_ip: String,
    /// The primary interface's groups (empty: its VPC's default group).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    /// Blank volumes made for each instance and attached to it (EC2's
    /// block device mappings). Not serialized when empty, as above.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block_devices: Vec<BlockDeviceSpec>,
    /// Boot from a volume made from the image's root disk (its `device` is
    /// ignored: always `/dev/vda`). Not serialized when absent, as above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume: Option<BlockDeviceSpec>,
}

/// A blank volume made for, and attached to, each instance of a launch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDeviceSpec {
    /// Its device name, `/dev/vdb` to `/dev/vdz`.
    pub device: String,
    /// Size, GiB.
    pub size_gib: u64,
    /// `standard` or `durable` (empty: standard).
    pub volume_type: String,
    /// Terminating the instance deletes the volume.
    pub delete_on_termination: bool,
}

/// A host's self-description from its heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    /// Host id.
    pub id: String,
    /// Zone.
    pub az: String,
    /// Agent endpoint.
    pub address: String,
    /// vCPUs offered.
    pub vcpus_total: u32,
    /// Memory offered, MiB.
    pub memory_total_mib: u64,
    /// CPU model.
    pub cpu_model: String,
    /// Agent version.
    pub agent_version: String,
    /// KVM present.
    pub kvm_present: bool,
    /// Disk space offered to volume replicas, GiB (0: none, or an agent
    /// that predates volumes).
    #[serde(default)]
    pub disk_total_gib: u64,
}

/// What CreateVolume asks for (everything but the generated id).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// Size, GiB.
    pub size_gib: u64,
    /// Zone.
    pub az: String,
    /// `standard` or `durable` (empty: standard).
    pub volume_type: String,
    /// Tags.
    pub tags: Tags,
    /// Idempotency token, empty for none.
    pub client_token: String,
}

/// One instance as a host reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// Instance id.
    pub instance_id: String,
    /// Its observed state.
    pub state: ObservedState,
    /// The host's reason.
    pub reason: String,
    /// Stopped because the guest powered itself off.
    #[serde(default)]
    pub stopped_by_guest: bool,
    /// The host's stamp of this observation (0: unstamped, from an agent
    /// that predates stamps); a lower stamp than the one applied is stale.
    #[serde(default)]
    pub seq: u64,
    /// The TAP of its first NIC (empty: none or not reported).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tap: String,
}

/// A write to the cluster state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    /// Create the region, zones, instance types and the admin key. Only
    /// once: a second bootstrap is `FailedPrecondition`.
    Bootstrap {
        /// Region name.
        region: String,
        /// Zones.
        azs: Vec<String>,
        /// Instance types.
        instance_types: Vec<InstanceType>,
        /// The admin key.
        admin_key: ApiKey,
        /// The cluster CA (absent in commands written before there was one).
        #[serde(default)]
        ca: Option<CaMaterial>,
    },
    /// Launch instances (placement happens here).
    RunInstances {
        /// The request.
        spec: RunSpec,
        /// One fresh `i-…` id per instance (at least `count`).
        instance_ids: Vec<String>,
        /// A fresh `r-…` id.
        reservation_id: String,
        /// Unix ms.
        now_ms: u64,
        /// Fresh `vol-…` ids for the block devices: instance by instance,
        /// each instance's in `spec.block_devices` order.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        volume_ids: Vec<String>,
    },
    /// Set the intent of instances (start, stop, terminate).
    SetDesired {
        /// Instance ids.
        ids: Vec<String>,
        /// The new intent.
        desired: DesiredState,
    },
    /// Change what a power-off from inside the guest does.
    SetShutdownBehavior {
        /// Instance id.
        id: String,
        /// The new behaviour.
        behavior: ShutdownBehavior,
    },
    /// Request a reboot of running instances.
    Reboot {
        /// Instance ids.
        ids: Vec<String>,
    },
    /// The reconciler carried out reboot number `generation`.
    AckReboot {
        /// Instance id.
        id: String,
        /// `reboots_requested` at the time of the reboot.
        generation: u64,
    },
    /// A host reported itself and (some of) its instances.
    Heartbeat {
        /// The host.
        host: HostReport,
        /// Instances it has.
        observed: Vec<Observation>,
        /// `observed` lists every instance on the host: those it does not
        /// list are absent (unless something newer than `listed_seq` is
        /// known of them).
        complete: bool,
        /// Unix ms.
        now_ms: u64,
        /// The host's stamp of its listing (0: unstamped).
        #[serde(default)]
        listed_seq: u64,
    },
    /// What an agent answered about some of its instances.
    Observe {
        /// The host.
        host_id: String,
        /// Its instances.
        observed: Vec<Observation>,
    },
    /// Hosts missed their heartbeats.
    MarkUnreachable {
        /// Host ids.
        host_ids: Vec<String>,
    },
    /// Register an image.
    RegisterImage {
        /// The image, with a fresh id.
        image: Image,
    },
    /// Deregister an image (id or name).
    DeregisterImage {
        /// Id or name.
        image: String,
    },
    /// Store a key pair's public half (created or imported).
    AddKeyPair {
        /// The key pair, with a fresh id.
        key_pair: KeyPair,
    },
    /// Delete a key pair by name.
    DeleteKeyPair {
        /// Name.
        name: String,
    },
    /// Create a placement group.
    CreatePlacementGroup {
        /// The group, with a fresh id and no members.
        group: PlacementGroup,
    },
    /// Delete a placement group by name.
    DeletePlacementGroup {
        /// Name.
        name: String,
    },
    /// Add or overwrite tags.
    CreateTags {
        /// Resource ids.
        resource_ids: Vec<String>,
        /// Tags.
        tags: Tags,
    },
    /// Remove tags (by key, or key and value when the value is not empty).
    DeleteTags {
        /// Resource ids.
        resource_ids: Vec<String>,
        /// Tags.
        tags: Vec<(String, String)>,
    },
    /// Store an API key.
    CreateApiKey {
        /// The key, with a fresh id.
        key: ApiKey,
    },
    /// Delete an API key by id.
    DeleteApiKey {
        /// Id.
        id: String,
    },
    /// Keep the cluster CA, when none is kept yet (clusters bootstrapped
    /// before there was one).
    SetClusterCa {
        /// The CA.
        ca: CaMaterial,
    },
    /// Store a one-time join token for a host (replacing its unused one).
    CreateJoinToken {
        /// The host it is for.
        host_id: String,
        /// sha256 of the token.
        token_sha256: String,
        /// Unix ms.
        expires_at_ms: u64,
        /// Unix ms.
        now_ms: u64,
    },
    /// A host trades its join token for its credential.
    JoinHost {
        /// The joining host.
        host_id: String,
        /// sha256 of the token it presented.
        token_sha256: String,
        /// Unix ms.
        now_ms: u64,
        /// Its new credential (role host, bound to `host_id`).
        key: ApiKey,
    },
    /// Delete a host's credential and unused join tokens.
    RevokeHost {
        /// The host.
        host_id: String,
    },
    /// Create a VPC.
    CreateVpc {
        /// The VPC, with a fresh id.
        vpc: Vpc,
    },
    /// Delete a VPC (refused while it has subnets).
    DeleteVpc {
        /// Id.
        id: String,
    },
    /// Create a subnet.
    CreateSubnet {
        /// The subnet, with a fresh id.
        subnet: Subnet,
    },
    /// Delete a subnet.
    DeleteSubnet {
        /// Id.
        id: String,
    },
    /// Create the default VPC and a default subnet per zone, unless a
    /// default VPC exists.
    CreateDefaultVpc {
        /// Its id.
        vpc_id: String,
        /// One id per zone (zones in name order).
        subnet_ids: Vec<String>,
        /// Unix ms.
        now_ms: u64,
    },
    /// Create a security group (allowing all egress, no ingress).
    CreateSecurityGroup {
        /// The group, with a fresh id.
        group: SecurityGroup,
    },
    /// Delete a security group nothing uses.
    DeleteSecurityGroup {
        /// Id.
        id: String,
    },
    /// Add or remove rules of a group, all or none.
    ChangeSecurityGroupRules {
        /// The group.
        group_id: String,
        /// Egress (else ingress) rules.
        egress: bool,
        /// The rules.
        rules: Vec<SgRule>,
        /// Add (else remove).
        add: bool,
    },
    /// Set the groups of an instance's primary interface.
    SetSecurityGroups {
        /// Instance id.
        id: String,
        /// Its groups from now on.
        groups: Vec<String>,
    },
    /// Record the underlay address a host's netd reported.
    SetUnderlay {
        /// The host.
        host_id: String,
        /// Its address.
        ip: String,
    },
    /// Create a volume (its replicas are placed here).
    CreateVolume {
        /// The request.
        spec: VolumeSpec,
        /// A fresh `vol-…` id.
        volume_id: String,
        /// Unix ms.
        now_ms: u64,
    },
    /// Delete a volume that is not attached.
    DeleteVolume {
        /// Id.
        id: String,
    },
    /// Attach a volume to a stopped instance of its zone.
    AttachVolume {
        /// The volume.
        volume_id: String,
        /// The instance.
        instance_id: String,
        /// `/dev/vdb` to `/dev/vdz`.
        device: String,
        /// Terminating the instance deletes the volume.
        #[serde(default)]
        delete_on_termination: bool,
    },
    /// Detach a volume.
    DetachVolume {
        /// The volume.
        volume_id: String,
        /// The instance it must be attached to (empty: whichever).
        #[serde(default)]
        instance_id: String,
        /// Detach from a running instance too.
        #[serde(default)]
        force: bool,
    },
    /// A host's blockd reports the replicas it holds (the whole set):
    /// volume id → the epoch it has caught up to.
    ReportReplicas {
        /// The host.
        host_id: String,
        /// What it holds.
        held: BTreeMap<String, u64>,
        /// Volume id → the incarnation of its replica file, for those
        /// reported with one.
        #[serde(default)]
        incarnations: BTreeMap<String, u64>,
    },
    /// A volume's primary reports a replica failed: if `epoch` is still
    /// the volume's, the replica leaves the in-sync set and the epoch is
    /// raised (else the caller was fenced).
    RemoveReplica {
        /// The volume.
        volume_id: String,
        /// The epoch the caller holds.
        epoch: u64,
        /// The failed replica's host.
        replica: String,
        /// The host asking (a replica host of the volume, in sync).
        caller: String,
    },
    /// A volume's primary has resynced an out-of-sync replica at `epoch`:
    /// if that is still the volume's epoch, the replica is back in sync
    /// and the epoch is raised (else the caller was fenced).
    AddReplica {
        /// The volume.
        volume_id: String,
        /// The epoch the caller holds (and resynced at).
        epoch: u64,
        /// The resynced replica's host.
        replica: String,
        /// The host asking (serving the volume, or in sync).
        caller: String,
    },
    /// A primary opens a serving session of a volume before it writes
    /// (see [`crate::model::Volume::clean`]).
    OpenVolumeSession {
        /// The volume.
        volume_id: String,
        /// The epoch the caller holds.
        epoch: u64,
        /// The host asking (the one serving the volume).
        caller: String,
    },
    /// The primary of `session` closed the volume clean.
    CloseVolumeSession {
        /// The volume.
        volume_id: String,
        /// The epoch the caller holds.
        epoch: u64,
        /// The session it opened.
        session: u64,
        /// The host asking (the one that opened `session`).
        caller: String,
    },
    /// A host's blockd reports where its replica server listens.
    SetBlockdAddr {
        /// The host.
        host_id: String,
        /// `ip:port`.
        addr: String,
    },
    /// Forget terminated instances (gone from their hosts) and the client
    /// tokens that only named them. Instances not terminated are kept.
    PurgeInstances {
        /// Instance ids.
        ids: Vec<String>,
    },
    /// Change attributes of an instance (ModifyInstanceAttribute), all or
    /// none: every given attribute is checked before any changes.
    ModifyInstance {
        /// Instance id.
        id: String,
        /// What changes.
        change: InstanceChange,
    },
}

/// What one ModifyInstanceAttribute changes; `None` (or no groups):
/// unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceChange {
    /// The instance type (its vCPUs and memory with it, also on its host);
    /// stopped instances only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// The user data (empty: none), at most [`MAX_USER_DATA`] bytes;
    /// stopped instances only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<Vec<u8>>,
    /// What a power-off from inside the guest does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_behavior: Option<ShutdownBehavior>,
    /// The primary interface's groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
}

/// The most user data an instance carries, in bytes (RunInstances and
/// ModifyInstanceAttribute; the agent's limit too).
pub const MAX_USER_DATA: usize = 16 * 1024;

/// A state transition as RunInstances/Start/Stop/... report it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// Instance id.
    pub id: String,
    /// Before.
    pub previous: PublicState,
    /// After.
    pub current: PublicState,
}

/// What a successful command returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// Nothing to return.
    Done,
    /// Launched (or, for a repeated client token, previously launched).
    Launched {
        /// Reservation id.
        reservation_id: String,
        /// The instances.
        instances: Vec<Instance>,
    },
    /// Intent changes.
    Changes(Vec<StateChange>),
    /// How many records changed.
    Count(u32),
    /// A volume's epoch (after RemoveReplica or AddReplica).
    Epoch(u64),
    /// A serving session opened: its number, and whether the volume was
    /// closed clean before.
    Session {
        /// The session.
        session: u64,
        /// The previous session closed clean.
        was_clean: bool,
        /// The epoch to serve at (raised to fence another host's primary
        /// that did not close its session clean).
        epoch: u64,
    },
    /// An image.
    Image(Image),
    /// A key pair.
    KeyPair(KeyPair),
    /// A placement group.
    Group(PlacementGroup),
    /// An API key.
    ApiKey(ApiKey),
    /// A VPC.
    Vpc(Vpc),
    /// A subnet.
    Subnet(Subnet),
    /// A security group.
    SecurityGroup(SecurityGroup),
    /// A volume.
    Volume(Volume),
    /// A volume's attachment (after attaching or detaching).
    Attachment {
        /// The volume.
        volume_id: String,
        /// Its attachment.
        attachment: VolumeAttachment,
    },
}

/// The response of `apply`.
pub type Response = Result<Output, StateError>;

/// What a client token remembers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// sha256 of the request, to refuse reuse with other parameters.
    pub request_sha256: String,
    /// Reservation id.
    pub reservation_id: String,
    /// Instance ids.
    pub instance_ids: Vec<String>,
}

/// What a CreateVolume client token remembers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeToken {
    /// sha256 of the request, to refuse reuse with other parameters.
    pub request_sha256: String,
    /// The volume it created.
    pub volume_id: String,
}
