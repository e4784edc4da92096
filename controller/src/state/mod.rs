//! The replicated cluster state and the commands that change it.
//!
//! [`ClusterState`] implements [`ferro_raft::StateMachine`]: `apply` is
//! deterministic. Ids, timestamps and random material arrive inside the
//! [`Command`]; nothing here reads a clock or a random source. Placement
//! runs inside `apply` (the [`scheduler`](crate::scheduler) is pure), so
//! two concurrent launches can never both take a host's last free vCPU.
//!
//! Input is validated here too, with errors naming the field, so every
//! replica refuses the same commands.
//!
//! One module per resource, each with its validation and tests:
//! `commands` (the log entries and outputs), `instances` (launch,
//! placement, intent, capacity), `hosts` (heartbeats, ordered
//! observations), `attributes` (ModifyInstanceAttribute: type, user
//! data, shutdown behaviour, groups), `catalog` (images, key pairs,
//! groups, tags), `access`
//! (API keys, roles, join tokens, the cluster CA) and `network` (VPCs,
//! subnets), `security` (security groups), `interfaces` (the network
//! interfaces derived from instances) and `volumes` (block volumes:
//! replica placement, attachments); `query` holds what the Describe
//! calls share (paging, tag and interface filters). This file holds the state itself, its
//! format and the dispatch of `apply`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::*;
use crate::scheduler;

mod access;
mod attributes;
mod catalog;
mod commands;
mod hosts;
mod instances;
mod interfaces;
mod network;
mod query;
mod security;
mod volumes;

pub use access::{check_host_id, MAX_JOIN_TOKEN_TTL_MS};
use attributes::check_user_data;
pub use commands::*;
pub use ferro_pki::CaMaterial;
pub use interfaces::{
    describe_interfaces, interface_id, InterfaceFilter, NetworkInterface, IN_USE,
};
pub use network::{
    describe_subnets, describe_vpcs, mac_of, SubnetFilter, VpcFilter, DEFAULT_SUBNET_PREFIX,
    DEFAULT_VPC_CIDR,
};
pub use query::{
    any_of, check_exist, describe_tags, tags_match, Listing, NetFilter, Page, Paging, TagQuery,
    TagRow, DEFAULT_PAGE, MAX_PAGE,
};
pub use security::{default_group_id, describe_security_groups, GroupFilter};
pub use volumes::{
    attachments_of, check_device, describe_volumes, place_replicas, DiskCandidate, VolumeFilter,
    MAX_VOLUME_GIB,
};

/// Why a command or query was refused. Each maps to one gRPC code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StateError {
    /// A field is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// A named resource does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A resource with that name or id exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The resource is not in a state that allows this.
    #[error("{0}")]
    FailedPrecondition(String),
    /// No capacity.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The caller's key may not do this.
    #[error("{0}")]
    PermissionDenied(String),
}

use StateError as E;

fn invalid<T>(m: impl Into<String>) -> Result<T, StateError> {
    Err(E::InvalidArgument(m.into()))
}

/// The format of [`ClusterState`] this build writes. Raise it with every
/// change to what the state holds; [`ClusterState::upgrade`] brings older
/// formats up to date and refuses newer ones.
pub const STATE_FORMAT: u32 = 4;

/// The whole replicated state of a cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// The format this state was written in (0: before formats existed).
    #[serde(default)]
    pub format: u32,
    /// Region name; empty until bootstrap.
    pub region: String,
    /// Zones by name.
    pub azs: BTreeMap<String, AvailabilityZone>,
    /// Hosts by id.
    pub hosts: BTreeMap<String, Host>,
    /// Instance types by name.
    pub instance_types: BTreeMap<String, InstanceType>,
    /// Images by id.
    pub images: BTreeMap<String, Image>,
    /// Key pairs by name.
    pub key_pairs: BTreeMap<String, KeyPair>,
    /// Placement groups by name.
    pub groups: BTreeMap<String, PlacementGroup>,
    /// Instances by id.
    pub instances: BTreeMap<String, Instance>,
    /// Client tokens.
    pub tokens: BTreeMap<String, TokenRecord>,
    /// API keys by id.
    pub api_keys: BTreeMap<String, ApiKey>,
    /// API key id by secret hash.
    pub api_key_by_hash: BTreeMap<String, String>,
    /// Unused join tokens by sha256.
    #[serde(default)]
    pub join_tokens: BTreeMap<String, JoinToken>,
    /// The cluster CA (set at bootstrap).
    #[serde(default)]
    pub ca: Option<CaMaterial>,
    /// VPCs by id.
    #[serde(default)]
    pub vpcs: BTreeMap<String, Vpc>,
    /// Subnets by id.
    #[serde(default)]
    pub subnets: BTreeMap<String, Subnet>,
    /// Security groups by id.
    #[serde(default)]
    pub security_groups: BTreeMap<String, SecurityGroup>,
    /// Volumes by id.
    #[serde(default)]
    pub volumes: BTreeMap<String, Volume>,
    /// CreateVolume client tokens.
    #[serde(default)]
    pub volume_tokens: BTreeMap<String, VolumeToken>,
}

impl ferro_raft::StateMachine for ClusterState {
    type Command = Command;
    type Response = Response;

    fn upgrade(&mut self) -> Result<(), String> {
        match self.format {
            // 0 → 1: roles on API keys, join tokens and the cluster CA;
            // 1 → 2: VPCs and subnets; 2 → 3: VNIs, security groups (a
            // default group per VPC, interfaces in it), TAPs and underlay
            // addresses; 3 → 4: volumes, their client tokens and the hosts'
            // disk space (none of which a format-3 state has: the serde
            // defaults, empty and 0, are right as they are). All read with
            // serde defaults, then filled in here.
            f if f <= STATE_FORMAT => {
                if f < 3 {
                    self.upgrade_to_security_groups();
                }
                self.format = STATE_FORMAT;
                Ok(())
            }
            f => Err(format!(
                "the cluster state is in format {f}, written by a newer ferro-controller; \
                 this one reads formats up to {STATE_FORMAT}: run the newer version \
                 (nothing was changed)"
            )),
        }
    }

    fn apply(&mut self, command: Command) -> Response {
        let _span = tracing::debug_span!("apply").entered();
        if self.region.is_empty() && !matches!(command, Command::Bootstrap { .. }) {
            return Err(E::FailedPrecondition(
                "the cluster is not bootstrapped".into(),
            ));
        }
        match command {
            Command::Bootstrap {
                region,
                azs,
                instance_types,
                admin_key,
                ca,
            } => {
                let out = self.bootstrap(region, azs, instance_types, admin_key)?;
                if let Some(ca) = ca {
                    self.set_cluster_ca(ca)?;
                }
                Ok(out)
            }
            Command::RunInstances {
                spec,
                instance_ids,
                reservation_id,
                now_ms,
                volume_ids,
            } => self.run_instances(spec, instance_ids, reservation_id, now_ms, volume_ids),
            Command::SetDesired { ids, desired } => self.set_desired(&ids, desired),
            Command::Reboot { ids } => self.reboot(&ids),
            Command::SetShutdownBehavior { id, behavior } => {
                self.check_ids(std::slice::from_ref(&id))?;
                let i = self.instances.get_mut(&id).expect("checked above");
                if i.desired == DesiredState::Terminated {
                    return Err(E::FailedPrecondition(format!(
                        "instance_id: {id} is terminated"
                    )));
                }
                i.shutdown_behavior = behavior;
                Ok(Output::Done)
            }
            Command::AckReboot { id, generation } => {
                if let Some(i) = self.instances.get_mut(&id) {
                    i.reboots_done = i.reboots_done.max(generation);
                }
                Ok(Output::Done)
            }
            Command::Heartbeat {
                host,
                observed,
                complete,
                now_ms,
                listed_seq,
            } => self.heartbeat(host, observed, complete, now_ms, listed_seq),
            Command::Observe { host_id, observed } => {
                self.observe(&host_id, observed);
                Ok(Output::Done)
            }
            Command::MarkUnreachable { host_ids } => {
                for h in &host_ids {
                    self.mark_unreachable(h);
                }
                Ok(Output::Done)
            }
            Command::RegisterImage { image } => self.register_image(image),
            Command::DeregisterImage { image } => self.deregister_image(&image),
            Command::AddKeyPair { key_pair } => self.add_key_pair(key_pair),
            Command::DeleteKeyPair { name } => match self.key_pairs.remove(&name) {
                Some(_) => Ok(Output::Done),
                None => Err(E::NotFound(format!("key_name: no key pair {name:?}"))),
            },
            Command::CreatePlacementGroup { group } => self.create_group(group),
            Command::DeletePlacementGroup { name } => self.delete_group(&name),
            Command::CreateTags { resource_ids, tags } => self.create_tags(&resource_ids, tags),
            Command::DeleteTags { resource_ids, tags } => self.delete_tags(&resource_ids, &tags),
            Command::CreateApiKey { key } => self.create_api_key(key),
            Command::DeleteApiKey { id } => self.delete_api_key(&id),
            Command::SetClusterCa { ca } => self.set_cluster_ca(ca),
            Command::CreateJoinToken {
                host_id,
                token_sha256,
                expires_at_ms,
                now_ms,
            } => self.create_join_token(&host_id, token_sha256, expires_at_ms, now_ms),
            Command::JoinHost {
                host_id,
                token_sha256,
                now_ms,
                key,
            } => self.join_host(&host_id, &token_sha256, now_ms, key),
            Command::RevokeHost { host_id } => self.revoke_host(&host_id),
            Command::CreateVpc { vpc } => self.create_vpc(vpc),
            Command::DeleteVpc { id } => self.delete_vpc(&id),
            Command::CreateSubnet { subnet } => self.create_subnet(subnet),
            Command::DeleteSubnet { id } => self.delete_subnet(&id),
            Command::CreateDefaultVpc {
                vpc_id,
                subnet_ids,
                now_ms,
            } => self.create_default_vpc(vpc_id, subnet_ids, now_ms),
            Command::CreateSecurityGroup { group } => self.create_security_group(group),
            Command::DeleteSecurityGroup { id } => self.delete_security_group(&id),
            Command::ChangeSecurityGroupRules {
                group_id,
                egress,
                rules,
                add,
            } => self.change_rules(&group_id, egress, &rules, add),
            Command::SetSecurityGroups { id, groups } => self.set_instance_groups(&id, &groups),
            Command::SetUnderlay { host_id, ip } => {
                let Some(h) = self.hosts.get_mut(&host_id) else {
                    return Err(E::NotFound(format!("host_id: no host {host_id:?}")));
                };
                if ip.parse::<std::net::Ipv4Addr>().is_err() {
                    return invalid(format!("underlay_ip: {ip:?} is not an IPv4 address"));
                }
                h.underlay_ip = ip;
                Ok(Output::Done)
            }
            Command::CreateVolume {
                spec,
                volume_id,
                now_ms,
            } => self.create_volume(spec, volume_id, now_ms),
            Command::DeleteVolume { id } => self.delete_volume(&id),
            Command::RemoveReplica {
                volume_id,
                epoch,
                replica,
                caller,
            } => self.remove_replica(&volume_id, epoch, &replica, &caller),
            Command::AddReplica {
                volume_id,
                epoch,
                replica,
                caller,
            } => self.add_replica(&volume_id, epoch, &replica, &caller),
            Command::OpenVolumeSession {
                volume_id,
                epoch,
                caller,
            } => self.open_volume_session(&volume_id, epoch, &caller),
            Command::CloseVolumeSession {
                volume_id,
                epoch,
                session,
                caller,
            } => self.close_volume_session(&volume_id, epoch, session, &caller),
            Command::SetBlockdAddr { host_id, addr } => {
                let Some(h) = self.hosts.get_mut(&host_id) else {
                    return Err(E::NotFound(format!("host_id: no host {host_id:?}")));
                };
                if addr.parse::<std::net::SocketAddr>().is_err() {
                    return invalid(format!("replica_addr: {addr:?} is not ip:port"));
                }
                h.blockd_addr = addr;
                Ok(Output::Done)
            }
            Command::ReportReplicas {
                host_id,
                held,
                incarnations,
            } => Ok(Output::Count(self.report_replicas(
                &host_id,
                &held,
                &incarnations,
            ))),
            Command::AttachVolume {
                volume_id,
                instance_id,
                device,
                delete_on_termination,
            } => self.attach_volume(&volume_id, &instance_id, &device, delete_on_termination),
            Command::DetachVolume {
                volume_id,
                instance_id,
                force,
            } => self.detach_volume(&volume_id, &instance_id, force),
            Command::PurgeInstances { ids } => {
                self.purge_instances(&ids);
                Ok(Output::Done)
            }
            Command::ModifyInstance { id, change } => self.modify_instance(&id, change),
        }
    }
}

/// Check a user-chosen name: 1 to 64 of `[A-Za-z0-9_.-]`.
pub fn check_name(field: &str, s: &str) -> Result<(), StateError> {
    if s.is_empty() || s.len() > 64 {
        return invalid(format!("{field}: must be 1 to 64 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return invalid(format!(
            "{field}: only letters, digits, '_', '.' and '-' are allowed"
        ));
    }
    Ok(())
}

/// Check tags: count, key and value sizes, reserved prefix.
pub fn check_tags(tags: &Tags) -> Result<(), StateError> {
    if tags.len() > MAX_TAGS {
        return invalid(format!("tags: at most {MAX_TAGS} tags"));
    }
    for (k, v) in tags {
        if k.is_empty() || k.len() > 128 {
            return invalid("tags.key: must be 1 to 128 bytes");
        }
        if k.starts_with("ferro:") {
            return invalid(format!(
                "tags.key: {k:?} uses the reserved prefix \"ferro:\""
            ));
        }
        if v.len() > 256 {
            return invalid(format!("tags.value: the value of {k:?} is over 256 bytes"));
        }
    }
    Ok(())
}

impl ClusterState {
    fn bootstrap(
        &mut self,
        region: String,
        azs: Vec<String>,
        types: Vec<InstanceType>,
        admin_key: ApiKey,
    ) -> Response {
        if !self.region.is_empty() {
            return Err(E::FailedPrecondition(
                "the cluster is already bootstrapped".into(),
            ));
        }
        check_name("region", &region)?;
        for az in &azs {
            check_name("availability_zones", az)?;
        }
        self.region = region;
        for name in azs {
            self.azs.insert(name.clone(), AvailabilityZone { name });
        }
        for t in types {
            self.instance_types.insert(t.name.clone(), t);
        }
        self.create_api_key(admin_key)
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ferro_raft::StateMachine;

    pub(crate) fn bootstrapped() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(Command::Bootstrap {
            region: "local".into(),
            azs: vec!["az-1".into(), "az-2".into()],
            instance_types: default_instance_types(),
            admin_key: ApiKey {
                id: "ak-0".into(),
                name: "admin".into(),
                secret_sha256: sha256_hex(b"secret"),
                admin: true,
                created_at_ms: 1,
                role: Some(Role::Admin),
                host_id: String::new(),
                ec2_secret: String::new(),
            },
            ca: None,
        })
        .unwrap();
        s
    }

    pub(crate) fn add_host(s: &mut ClusterState, id: &str, az: &str, vcpus: u32, mem: u64) {
        s.apply(Command::Heartbeat {
            host: HostReport {
                id: id.into(),
                az: az.into(),
                address: format!("http://{id}:7420"),
                vcpus_total: vcpus,
                memory_total_mib: mem,
                cpu_model: "test".into(),
                agent_version: "0".into(),
                kvm_present: true,
                disk_total_gib: 0,
            },
            observed: vec![],
            complete: true,
            now_ms: 10,
            listed_seq: 0,
        })
        .unwrap();
    }

    pub(crate) fn add_image(s: &mut ClusterState) {
        s.apply(Command::RegisterImage {
            image: Image {
                id: "img-1".into(),
                name: "guest".into(),
                kernel_path: "/k".into(),
                initrd_path: String::new(),
                rootdisk_path: String::new(),
                cmdline_extra: String::new(),
                created_at_ms: 1,
                tags: Tags::new(),
            },
        })
        .unwrap();
    }

    pub(crate) fn run(s: &mut ClusterState, n: u32, seq: &mut u64, spec: RunSpec) -> Response {
        let ids = (0..n)
            .map(|_| {
                *seq += 1;
                format!("i-{:016x}", *seq)
            })
            .collect();
        let per = spec.block_devices.len() as u32 + spec.root_volume.is_some() as u32;
        let volume_ids = (0..n * per)
            .map(|k| format!("vol-{:016x}", 0xb000_0000 + u64::from(k) + *seq * 64))
            .collect();
        s.apply(Command::RunInstances {
            spec: RunSpec { count: n, ..spec },
            instance_ids: ids,
            reservation_id: format!("r-{seq}"),
            volume_ids,
            now_ms: 5,
        })
    }

    pub(crate) fn spec() -> RunSpec {
        RunSpec {
            instance_type: "f1.small".into(),
            image: "guest".into(),
            ..RunSpec::default()
        }
    }

    #[test]
    fn commands_before_bootstrap_are_refused() {
        let mut s = ClusterState::default();
        let e = s.apply(Command::MarkUnreachable { host_ids: vec![] });
        assert!(matches!(e, Err(StateError::FailedPrecondition(_))));
    }

    #[test]
    fn errors_name_the_field() {
        let mut s = bootstrapped();
        add_image(&mut s);
        let mut seq = 0;
        let cases = [
            (
                RunSpec {
                    instance_type: "nope".into(),
                    ..spec()
                },
                "instance_type",
            ),
            (
                RunSpec {
                    image: "nope".into(),
                    ..spec()
                },
                "image_id",
            ),
            (
                RunSpec {
                    az: "nope".into(),
                    ..spec()
                },
                "availability_zone",
            ),
            (
                RunSpec {
                    key_name: "nope".into(),
                    ..spec()
                },
                "key_name",
            ),
            (
                RunSpec {
                    placement_group: "nope".into(),
                    ..spec()
                },
                "placement_group",
            ),
        ];
        for (sp, field) in cases {
            let e = run(&mut s, 1, &mut seq, sp).unwrap_err();
            assert!(e.to_string().starts_with(field), "{e}");
        }
        let e = run(&mut s, 0, &mut seq, spec()).unwrap_err();
        assert!(e.to_string().starts_with("count"), "{e}");
    }

    #[test]
    fn older_state_formats_upgrade_and_newer_ones_are_refused() {
        let mut s = bootstrapped();
        s.format = 0;
        let mut old: ClusterState = serde_json::from_str(
            &serde_json::to_string(&s)
                .unwrap()
                .replace("\"format\":0,", ""),
        )
        .unwrap();
        old.upgrade().unwrap();
        assert_eq!(old.format, STATE_FORMAT);
        let mut newer = s.clone();
        newer.format = STATE_FORMAT + 1;
        let e = newer.upgrade().unwrap_err();
        assert!(e.contains("newer ferro-controller"), "{e}");
        assert_eq!(newer.format, STATE_FORMAT + 1, "refused, not changed");
    }

    #[test]
    fn apply_is_deterministic_and_serializes() {
        let build = || {
            let mut s = bootstrapped();
            for h in 0..5 {
                add_host(&mut s, &format!("h{h}"), "az-1", 4, 4096);
            }
            add_image(&mut s);
            let mut seq = 0;
            run(&mut s, 7, &mut seq, spec()).unwrap();
            s
        };
        let a = build();
        assert_eq!(a, build());
        let json = serde_json::to_string(&a).unwrap();
        let back: ClusterState = serde_json::from_str(&json).unwrap();
        assert_eq!(a, back);
    }
}
