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

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::*;
use crate::scheduler;

mod access;

pub use access::{check_host_id, MAX_JOIN_TOKEN_TTL_MS};
pub use ferro_pki::CaMaterial;

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
    /// User data, at most 16 KiB.
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
    /// Forget terminated instances (gone from their hosts) and the client
    /// tokens that only named them. Instances not terminated are kept.
    PurgeInstances {
        /// Instance ids.
        ids: Vec<String>,
    },
}

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
    /// An image.
    Image(Image),
    /// A key pair.
    KeyPair(KeyPair),
    /// A placement group.
    Group(PlacementGroup),
    /// An API key.
    ApiKey(ApiKey),
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

/// The format of [`ClusterState`] this build writes. Raise it with every
/// change to what the state holds; [`ClusterState::upgrade`] brings older
/// formats up to date and refuses newer ones.
pub const STATE_FORMAT: u32 = 1;

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
}

impl ferro_raft::StateMachine for ClusterState {
    type Command = Command;
    type Response = Response;

    fn upgrade(&mut self) -> Result<(), String> {
        match self.format {
            // 0 → 1: roles on API keys, join tokens and the cluster CA,
            // all read with serde defaults.
            f if f <= STATE_FORMAT => {
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
            } => self.run_instances(spec, instance_ids, reservation_id, now_ms),
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
            Command::PurgeInstances { ids } => {
                self.purge_instances(&ids);
                Ok(Output::Done)
            }
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

    /// An image by id or name.
    pub fn find_image(&self, id_or_name: &str) -> Option<&Image> {
        self.images
            .get(id_or_name)
            .or_else(|| self.images.values().find(|i| i.name == id_or_name))
    }

    fn check_run(&self, spec: &RunSpec) -> Result<(InstanceType, Image), StateError> {
        if spec.count == 0 || spec.count > 100 {
            return invalid("count: must be 1 to 100");
        }
        let Some(ty) = self.instance_types.get(&spec.instance_type) else {
            return Err(E::NotFound(format!(
                "instance_type: no instance type {:?}",
                spec.instance_type
            )));
        };
        let Some(image) = self.find_image(&spec.image) else {
            return Err(E::NotFound(format!("image_id: no image {:?}", spec.image)));
        };
        if !spec.az.is_empty() && !self.azs.contains_key(&spec.az) {
            return Err(E::NotFound(format!(
                "availability_zone: no zone {:?}",
                spec.az
            )));
        }
        if !spec.key_name.is_empty() && !self.key_pairs.contains_key(&spec.key_name) {
            return Err(E::NotFound(format!(
                "key_name: no key pair {:?}",
                spec.key_name
            )));
        }
        if !spec.placement_group.is_empty() && !self.groups.contains_key(&spec.placement_group) {
            return Err(E::NotFound(format!(
                "placement_group: no placement group {:?}",
                spec.placement_group
            )));
        }
        if spec.user_data.len() > 16 * 1024 {
            return invalid("user_data: at most 16 KiB");
        }
        let t = &spec.client_token;
        if t.len() > 64 || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return invalid("client_token: at most 64 printable ASCII characters");
        }
        check_tags(&spec.tags)?;
        Ok((ty.clone(), image.clone()))
    }

    fn run_instances(
        &mut self,
        spec: RunSpec,
        ids: Vec<String>,
        reservation_id: String,
        now_ms: u64,
    ) -> Response {
        let request_sha256 = hex(&Sha256::digest(
            serde_json::to_vec(&spec).unwrap_or_default(),
        ));
        if let Some(rec) = self.tokens.get(&spec.client_token) {
            if rec.request_sha256 != request_sha256 {
                return invalid(format!(
                    "client_token: {:?} was used with different parameters",
                    spec.client_token
                ));
            }
            let instances = rec
                .instance_ids
                .iter()
                .filter_map(|id| self.instances.get(id).cloned())
                .collect();
            return Ok(Output::Launched {
                reservation_id: rec.reservation_id.clone(),
                instances,
            });
        }
        let (ty, image) = self.check_run(&spec)?;
        let count = spec.count as usize;
        if ids.len() < count || ids.iter().any(|i| self.instances.contains_key(i)) {
            return invalid("instance ids: too few or not fresh");
        }
        let placements = self.schedule(&spec, &ty)?;
        let mut out = Vec::with_capacity(count);
        for (id, host_id) in ids.into_iter().zip(placements) {
            let az = self.hosts[&host_id].az.clone();
            let inst = Instance {
                id: id.clone(),
                reservation_id: reservation_id.clone(),
                instance_type: ty.name.clone(),
                vcpus: ty.vcpus,
                memory_mib: ty.memory_mib,
                image_id: image.id.clone(),
                az,
                host_id,
                key_name: spec.key_name.clone(),
                placement_group: spec.placement_group.clone(),
                user_data: spec.user_data.clone(),
                tags: spec.tags.clone(),
                client_token: spec.client_token.clone(),
                desired: DesiredState::Running,
                observed: ObservedState::Absent,
                observed_reason: String::new(),
                observed_seq: 0,
                reboots_requested: 0,
                reboots_done: 0,
                holds_capacity: false,
                launched_at_ms: now_ms,
                shutdown_behavior: spec.shutdown_behavior,
            };
            tracing::info!(instance_id = %id, host_id = %inst.host_id, "placed");
            self.instances.insert(id.clone(), inst);
            self.sync_capacity(&id);
            out.push(self.instances[&id].clone());
        }
        if !spec.client_token.is_empty() {
            self.tokens.insert(
                spec.client_token.clone(),
                TokenRecord {
                    request_sha256,
                    reservation_id: reservation_id.clone(),
                    instance_ids: out.iter().map(|i| i.id.clone()).collect(),
                },
            );
        }
        Ok(Output::Launched {
            reservation_id,
            instances: out,
        })
    }

    /// Pick hosts for `spec.count` instances of `ty`.
    fn schedule(&self, spec: &RunSpec, ty: &InstanceType) -> Result<Vec<String>, StateError> {
        let group = self.groups.get(&spec.placement_group);
        let mut members_on: BTreeMap<&str, u32> = BTreeMap::new();
        let mut group_az = None;
        for m in group.iter().flat_map(|g| g.members.iter()) {
            if let Some(i) = self.instances.get(m) {
                *members_on.entry(i.host_id.as_str()).or_default() += 1;
                group_az.get_or_insert(i.az.as_str());
            }
        }
        let group_kind = group.map(|g| match g.strategy {
            GroupStrategy::Spread => scheduler::Group::Spread,
            GroupStrategy::Cluster => scheduler::Group::Cluster,
        });
        let mut az = (!spec.az.is_empty()).then_some(spec.az.as_str());
        if group_kind == Some(scheduler::Group::Cluster) && az.is_none() {
            az = group_az;
        }
        let hosts: Vec<&Host> = self.hosts.values().collect();
        let mut candidates: Vec<scheduler::Candidate> = hosts
            .iter()
            .enumerate()
            .map(|(index, h)| scheduler::Candidate {
                index,
                az: h.az.clone(),
                healthy: h.health == HostHealth::Healthy,
                vcpus_total: h.vcpus_total,
                memory_total_mib: h.memory_total_mib,
                free_vcpus: h.free_vcpus(),
                free_memory_mib: h.free_memory_mib(),
                group_members: members_on.get(h.id.as_str()).copied().unwrap_or(0),
            })
            .collect();
        let req = scheduler::Request {
            vcpus: ty.vcpus,
            memory_mib: ty.memory_mib,
            az,
            group: group_kind,
            strategy: if spec.spread {
                scheduler::Strategy::Spread
            } else {
                scheduler::Strategy::BinPack
            },
        };
        let placed = scheduler::place(&mut candidates, &req, spec.count as usize)
            .map_err(|e| E::ResourceExhausted(format!("insufficient capacity: {e}")))?;
        Ok(placed.into_iter().map(|i| hosts[i].id.clone()).collect())
    }

    /// Count or release the instance's capacity on its host and its
    /// placement group membership, to match whether it is final.
    fn sync_capacity(&mut self, id: &str) {
        let Some(inst) = self.instances.get_mut(id) else {
            return;
        };
        let hold = !inst.is_final();
        if hold == inst.holds_capacity {
            return;
        }
        inst.holds_capacity = hold;
        if let Some(h) = self.hosts.get_mut(&inst.host_id) {
            if hold {
                h.vcpus_allocated += inst.vcpus;
                h.memory_allocated_mib += inst.memory_mib;
                h.instances += 1;
            } else {
                h.vcpus_allocated = h.vcpus_allocated.saturating_sub(inst.vcpus);
                h.memory_allocated_mib = h.memory_allocated_mib.saturating_sub(inst.memory_mib);
                h.instances = h.instances.saturating_sub(1);
            }
        }
        if let Some(g) = self.groups.get_mut(&inst.placement_group) {
            if hold {
                g.members.insert(inst.id.clone());
            } else {
                g.members.remove(&inst.id);
            }
        }
    }

    fn check_ids(&self, ids: &[String]) -> Result<(), StateError> {
        if ids.is_empty() {
            return invalid("instance_ids: at least one id is required");
        }
        for id in ids {
            if !self.instances.contains_key(id) {
                return Err(E::NotFound(format!("instance_ids: no instance {id:?}")));
            }
        }
        Ok(())
    }

    fn set_desired(&mut self, ids: &[String], desired: DesiredState) -> Response {
        self.check_ids(ids)?;
        for id in ids {
            let i = &self.instances[id];
            if i.desired == DesiredState::Terminated && desired != DesiredState::Terminated {
                return Err(E::FailedPrecondition(format!(
                    "instance_ids: {id} is terminated"
                )));
            }
        }
        let mut changes = Vec::with_capacity(ids.len());
        for id in ids {
            let i = self.instances.get_mut(id).expect("checked above");
            let previous = i.public_state();
            i.desired = desired;
            tracing::info!(instance_id = %id, ?desired, "intent changed");
            self.sync_capacity(id);
            let current = self.instances[id].public_state();
            changes.push(StateChange {
                id: id.clone(),
                previous,
                current,
            });
        }
        Ok(Output::Changes(changes))
    }

    fn reboot(&mut self, ids: &[String]) -> Response {
        self.check_ids(ids)?;
        for id in ids {
            if self.instances[id].desired != DesiredState::Running {
                return Err(E::FailedPrecondition(format!(
                    "instance_ids: {id} is not running"
                )));
            }
        }
        let mut changes = Vec::new();
        for id in ids {
            let i = self.instances.get_mut(id).expect("checked above");
            let previous = i.public_state();
            i.reboots_requested += 1;
            changes.push(StateChange {
                id: id.clone(),
                previous,
                current: i.public_state(),
            });
        }
        Ok(Output::Changes(changes))
    }

    fn heartbeat(
        &mut self,
        r: HostReport,
        observed: Vec<Observation>,
        complete: bool,
        now_ms: u64,
        listed_seq: u64,
    ) -> Response {
        check_name("host.host_id", &r.id)?;
        check_name("host.availability_zone", &r.az)?;
        if !self.azs.contains_key(&r.az) {
            tracing::info!(az = %r.az, "new availability zone from a heartbeat");
            self.azs
                .insert(r.az.clone(), AvailabilityZone { name: r.az.clone() });
        }
        let host = self.hosts.entry(r.id.clone()).or_insert_with(|| Host {
            id: r.id.clone(),
            az: r.az.clone(),
            address: String::new(),
            vcpus_total: 0,
            memory_total_mib: 0,
            vcpus_allocated: 0,
            memory_allocated_mib: 0,
            instances: 0,
            health: HostHealth::Healthy,
            last_seen_ms: 0,
            cpu_model: String::new(),
            agent_version: String::new(),
            kvm_present: false,
            tags: Tags::new(),
        });
        if host.health != HostHealth::Healthy {
            tracing::info!(host_id = %r.id, "host is back");
        }
        host.health = HostHealth::Healthy;
        host.last_seen_ms = now_ms;
        host.az = r.az;
        host.address = r.address;
        host.vcpus_total = r.vcpus_total;
        host.memory_total_mib = r.memory_total_mib;
        host.cpu_model = r.cpu_model;
        host.agent_version = r.agent_version;
        host.kvm_present = r.kvm_present;
        let seen = self.observe(&r.id, observed);
        if complete {
            // Not listed: absent, unless the host told us something newer
            // of it than this listing (a create answered after the list
            // was read).
            let missing: Vec<String> = self
                .instances
                .values()
                .filter(|i| i.host_id == r.id && !seen.contains(&i.id))
                .filter(|i| i.observed != ObservedState::Absent)
                .filter(|i| listed_seq == 0 || listed_seq > i.observed_seq)
                .map(|i| i.id.clone())
                .collect();
            for id in missing {
                let i = self.instances.get_mut(&id).expect("listed above");
                i.observed = ObservedState::Absent;
                i.observed_seq = i.observed_seq.max(listed_seq);
                self.sync_capacity(&id);
            }
        }
        Ok(Output::Done)
    }

    /// Apply observations of `host_id`'s instances; returns the ids seen.
    fn observe(
        &mut self,
        host_id: &str,
        observed: Vec<Observation>,
    ) -> std::collections::BTreeSet<String> {
        let mut seen = std::collections::BTreeSet::new();
        for o in observed {
            let Some(i) = self.instances.get_mut(&o.instance_id) else {
                continue;
            };
            if i.host_id != host_id {
                continue;
            }
            seen.insert(o.instance_id.clone());
            if o.seq != 0 && o.seq < i.observed_seq {
                // Older than what was applied (a heartbeat read before an
                // agent's answer that was applied first).
                tracing::debug!(instance_id = %i.id, seq = o.seq, applied = i.observed_seq, "stale observation ignored");
                continue;
            }
            i.observed_seq = i.observed_seq.max(o.seq);
            if i.observed != o.state {
                tracing::info!(instance_id = %i.id, host_id, from = ?i.observed, to = ?o.state, "observed");
            }
            let was = i.observed;
            i.observed = o.state;
            let guest_stop_reason = o.stopped_by_guest && was == ObservedState::Stopped;
            if !guest_stop_reason {
                i.observed_reason = o.reason;
            }
            // The guest powered itself off: the instance asked to stop, so
            // its intent follows (EC2's instance-initiated shutdown), and
            // nothing starts it again. Only on the change into Stopped: a
            // later start by the operator is not undone by a report sent
            // before the host carried it out.
            if o.stopped_by_guest
                && o.state == ObservedState::Stopped
                && was != ObservedState::Stopped
                && i.desired == DesiredState::Running
            {
                i.desired = match i.shutdown_behavior {
                    ShutdownBehavior::Stop => DesiredState::Stopped,
                    ShutdownBehavior::Terminate => DesiredState::Terminated,
                };
                tracing::info!(instance_id = %i.id, desired = ?i.desired, "the guest powered off: instance-initiated shutdown");
                i.observed_reason = format!(
                    "the guest powered off (instance-initiated shutdown behavior: {})",
                    i.shutdown_behavior.as_str()
                );
            }
            self.sync_capacity(&o.instance_id);
        }
        seen
    }

    fn mark_unreachable(&mut self, host_id: &str) {
        let Some(h) = self.hosts.get_mut(host_id) else {
            return;
        };
        h.health = HostHealth::Unreachable;
        tracing::warn!(host_id, "host unreachable");
        for i in self.instances.values_mut() {
            if i.host_id == host_id && !i.is_final() {
                i.observed = ObservedState::Unknown;
                i.observed_reason = "host unreachable".into();
            }
        }
    }

    fn register_image(&mut self, image: Image) -> Response {
        check_name("name", &image.name)?;
        check_tags(&image.tags)?;
        if !image.kernel_path.starts_with('/') {
            return invalid("kernel_path: must be an absolute path");
        }
        for (f, p) in [
            ("initrd_path", &image.initrd_path),
            ("rootdisk_path", &image.rootdisk_path),
        ] {
            if !p.is_empty() && !p.starts_with('/') {
                return invalid(format!("{f}: must be an absolute path"));
            }
        }
        if self.find_image(&image.name).is_some() || self.images.contains_key(&image.id) {
            return Err(E::AlreadyExists(format!(
                "name: an image {:?} exists",
                image.name
            )));
        }
        self.images.insert(image.id.clone(), image.clone());
        Ok(Output::Image(image))
    }

    fn deregister_image(&mut self, id_or_name: &str) -> Response {
        let Some(id) = self.find_image(id_or_name).map(|i| i.id.clone()) else {
            return Err(E::NotFound(format!("image_id: no image {id_or_name:?}")));
        };
        if let Some(user) = self
            .instances
            .values()
            .find(|i| i.image_id == id && !i.is_final())
        {
            return Err(E::FailedPrecondition(format!(
                "image_id: {id} is used by instance {}",
                user.id
            )));
        }
        self.images.remove(&id);
        Ok(Output::Done)
    }

    fn purge_instances(&mut self, ids: &[String]) {
        let mut gone = BTreeSet::new();
        for id in ids {
            if self.instances.get(id).is_some_and(Instance::is_final) {
                self.instances.remove(id);
                gone.insert(id.clone());
            }
        }
        if gone.is_empty() {
            return;
        }
        for g in self.groups.values_mut() {
            g.members.retain(|m| !gone.contains(m));
        }
        let instances = &self.instances;
        self.tokens
            .retain(|_, t| t.instance_ids.iter().any(|i| instances.contains_key(i)));
    }

    fn add_key_pair(&mut self, k: KeyPair) -> Response {
        check_name("key_name", &k.name)?;
        check_tags(&k.tags)?;
        if self.key_pairs.contains_key(&k.name) {
            return Err(E::AlreadyExists(format!(
                "key_name: a key pair {:?} exists",
                k.name
            )));
        }
        self.key_pairs.insert(k.name.clone(), k.clone());
        Ok(Output::KeyPair(k))
    }

    fn create_group(&mut self, g: PlacementGroup) -> Response {
        check_name("name", &g.name)?;
        check_tags(&g.tags)?;
        if self.groups.contains_key(&g.name) {
            return Err(E::AlreadyExists(format!(
                "name: a placement group {:?} exists",
                g.name
            )));
        }
        self.groups.insert(g.name.clone(), g.clone());
        Ok(Output::Group(g))
    }

    fn delete_group(&mut self, name: &str) -> Response {
        let Some(g) = self.groups.get(name) else {
            return Err(E::NotFound(format!("name: no placement group {name:?}")));
        };
        if let Some(m) = g.members.iter().next() {
            return Err(E::FailedPrecondition(format!(
                "name: placement group {name:?} still holds instance {m}"
            )));
        }
        self.groups.remove(name);
        Ok(Output::Done)
    }

    /// The tags of resource `id`, whatever its kind.
    fn tags_mut(&mut self, id: &str) -> Option<&mut Tags> {
        if let Some(i) = self.instances.get_mut(id) {
            return Some(&mut i.tags);
        }
        if let Some(i) = self.images.get_mut(id) {
            return Some(&mut i.tags);
        }
        if let Some(k) = self.key_pairs.values_mut().find(|k| k.id == id) {
            return Some(&mut k.tags);
        }
        if let Some(g) = self.groups.values_mut().find(|g| g.id == id) {
            return Some(&mut g.tags);
        }
        self.hosts.get_mut(id).map(|h| &mut h.tags)
    }

    fn check_resources(&mut self, ids: &[String]) -> Result<(), StateError> {
        if ids.is_empty() {
            return invalid("resource_ids: at least one id is required");
        }
        for id in ids {
            if self.tags_mut(id).is_none() {
                return Err(E::NotFound(format!("resource_ids: no resource {id:?}")));
            }
        }
        Ok(())
    }

    fn create_tags(&mut self, ids: &[String], tags: Tags) -> Response {
        check_tags(&tags)?;
        self.check_resources(ids)?;
        for id in ids {
            let t = self.tags_mut(id).expect("checked above");
            let mut merged = t.clone();
            merged.extend(tags.clone());
            check_tags(&merged)?;
        }
        for id in ids {
            self.tags_mut(id)
                .expect("checked above")
                .extend(tags.clone());
        }
        Ok(Output::Done)
    }

    fn delete_tags(&mut self, ids: &[String], tags: &[(String, String)]) -> Response {
        self.check_resources(ids)?;
        for id in ids {
            let t = self.tags_mut(id).expect("checked above");
            for (k, v) in tags {
                if v.is_empty() || t.get(k) == Some(v) {
                    t.remove(k);
                }
            }
        }
        Ok(Output::Done)
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
        s.apply(Command::RunInstances {
            spec: RunSpec { count: n, ..spec },
            instance_ids: ids,
            reservation_id: format!("r-{seq}"),
            now_ms: 5,
        })
    }

    fn spec() -> RunSpec {
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
    fn run_places_and_counts_capacity() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 2, 1024);
        add_image(&mut s);
        let mut seq = 0;
        let out = run(&mut s, 2, &mut seq, spec()).unwrap();
        let Output::Launched { instances, .. } = out else {
            panic!()
        };
        assert_eq!(instances.len(), 2);
        assert_eq!(s.hosts["h1"].vcpus_allocated, 2);
        let e = run(&mut s, 1, &mut seq, spec()).unwrap_err();
        assert!(matches!(e, StateError::ResourceExhausted(_)), "{e}");
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
    fn client_token_is_idempotent() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 8, 8192);
        add_image(&mut s);
        let mut seq = 0;
        let sp = RunSpec {
            client_token: "t1".into(),
            ..spec()
        };
        let a = run(&mut s, 2, &mut seq, sp.clone()).unwrap();
        let b = run(&mut s, 2, &mut seq, sp.clone()).unwrap();
        assert_eq!(a, b);
        assert_eq!(s.instances.len(), 2);
        let other = RunSpec {
            instance_type: "f1.nano".into(),
            ..sp
        };
        let e = run(&mut s, 2, &mut seq, other).unwrap_err();
        assert!(e.to_string().starts_with("client_token"), "{e}");
    }

    #[test]
    fn terminate_releases_capacity_once_deleted() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 1, 1024);
        add_image(&mut s);
        let mut seq = 0;
        run(&mut s, 1, &mut seq, spec()).unwrap();
        let id = s.instances.keys().next().unwrap().clone();
        // Observed running on the host.
        let obs = |state| Command::Heartbeat {
            host: HostReport {
                id: "h1".into(),
                az: "az-1".into(),
                address: "http://h1:7420".into(),
                vcpus_total: 1,
                memory_total_mib: 1024,
                cpu_model: String::new(),
                agent_version: String::new(),
                kvm_present: true,
            },
            observed: state,
            complete: true,
            now_ms: 20,
            listed_seq: 0,
        };
        s.apply(obs(vec![Observation {
            instance_id: id.clone(),
            state: ObservedState::Running,
            reason: String::new(),
            stopped_by_guest: false,
            seq: 0,
        }]))
        .unwrap();
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Terminated,
        })
        .unwrap();
        assert_eq!(s.instances[&id].public_state(), PublicState::ShuttingDown);
        assert_eq!(s.hosts["h1"].vcpus_allocated, 1, "still on the host");
        s.apply(obs(vec![])).unwrap();
        assert_eq!(s.instances[&id].public_state(), PublicState::Terminated);
        assert_eq!(s.hosts["h1"].vcpus_allocated, 0);
        let e = s.apply(Command::SetDesired {
            ids: vec![id],
            desired: DesiredState::Running,
        });
        assert!(matches!(e, Err(StateError::FailedPrecondition(_))));
    }

    #[test]
    fn a_guest_power_off_sets_the_intent_by_shutdown_behavior() {
        for (behavior, want) in [
            (ShutdownBehavior::Stop, DesiredState::Stopped),
            (ShutdownBehavior::Terminate, DesiredState::Terminated),
        ] {
            let mut s = bootstrapped();
            add_host(&mut s, "h1", "az-1", 1, 1024);
            add_image(&mut s);
            let mut seq = 0;
            let sp = RunSpec {
                shutdown_behavior: behavior,
                ..spec()
            };
            run(&mut s, 1, &mut seq, sp).unwrap();
            let id = s.instances.keys().next().unwrap().clone();
            let see = |s: &mut ClusterState, state, by_guest| {
                s.apply(Command::Observe {
                    host_id: "h1".into(),
                    observed: vec![Observation {
                        instance_id: id.clone(),
                        state,
                        reason: String::new(),
                        stopped_by_guest: by_guest,
                        seq: 0,
                    }],
                })
                .unwrap();
            };
            see(&mut s, ObservedState::Running, false);
            // Stopped by the agent (not the guest): the intent stays.
            see(&mut s, ObservedState::Stopped, false);
            assert_eq!(s.instances[&id].desired, DesiredState::Running);
            see(&mut s, ObservedState::Running, false);
            see(&mut s, ObservedState::Stopped, true);
            assert_eq!(s.instances[&id].desired, want, "{behavior:?}");
            assert!(s.instances[&id].observed_reason.contains(behavior.as_str()));
        }
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
    fn an_older_report_never_overrides_a_newer_one() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 1, 1024);
        add_image(&mut s);
        let mut seq = 0;
        run(&mut s, 1, &mut seq, spec()).unwrap();
        let id = s.instances.keys().next().unwrap().clone();
        let o = |state, seq| Observation {
            instance_id: id.clone(),
            state,
            reason: String::new(),
            stopped_by_guest: false,
            seq,
        };
        let beat = |s: &mut ClusterState, observed: Vec<Observation>, listed_seq| {
            s.apply(Command::Heartbeat {
                host: HostReport {
                    id: "h1".into(),
                    az: "az-1".into(),
                    address: "http://h1:7420".into(),
                    vcpus_total: 1,
                    memory_total_mib: 1024,
                    cpu_model: "test".into(),
                    agent_version: "0".into(),
                    kvm_present: true,
                },
                observed,
                complete: true,
                now_ms: 1,
                listed_seq,
            })
            .unwrap();
        };
        // The agent answered the create (stamp 100); a heartbeat read
        // before it (50) does not list it: not absent.
        s.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![o(ObservedState::Running, 100)],
        })
        .unwrap();
        beat(&mut s, vec![], 50);
        assert_eq!(s.instances[&id].observed, ObservedState::Running);
        // A stale report of another state is ignored, a newer one applies.
        s.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![o(ObservedState::Stopped, 90)],
        })
        .unwrap();
        assert_eq!(s.instances[&id].observed, ObservedState::Running);
        beat(&mut s, vec![o(ObservedState::Running, 100)], 120);
        assert_eq!(s.instances[&id].observed_seq, 100);
        // Terminated: the capacity stays held until the host confirms.
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Terminated,
        })
        .unwrap();
        // The agent is deleting it (stamp 150); a listing read before that
        // and before the create (a lagging heartbeat) does not list it.
        s.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![o(ObservedState::Deleting, 150)],
        })
        .unwrap();
        beat(&mut s, vec![], 140);
        assert!(
            s.instances[&id].holds_capacity,
            "a stale listing freed capacity"
        );
        assert_eq!(s.instances[&id].public_state(), PublicState::ShuttingDown);
        s.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![o(ObservedState::Absent, 300)],
        })
        .unwrap();
        assert!(!s.instances[&id].holds_capacity);
        assert_eq!(s.instances[&id].public_state(), PublicState::Terminated);
        // A heartbeat read before the delete still listing it: ignored.
        beat(&mut s, vec![o(ObservedState::Running, 200)], 250);
        assert_eq!(s.instances[&id].public_state(), PublicState::Terminated);
        // Unstamped reports (older agents) still apply.
        let mut s2 = bootstrapped();
        add_host(&mut s2, "h1", "az-1", 1, 1024);
        add_image(&mut s2);
        run(&mut s2, 1, &mut seq, spec()).unwrap();
        let id2 = s2.instances.keys().next().unwrap().clone();
        s2.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![Observation {
                instance_id: id2.clone(),
                state: ObservedState::Running,
                reason: String::new(),
                stopped_by_guest: false,
                seq: 0,
            }],
        })
        .unwrap();
        assert_eq!(s2.instances[&id2].observed, ObservedState::Running);
    }

    #[test]
    fn modify_instance_attribute_changes_what_a_power_off_does() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 1, 1024);
        add_image(&mut s);
        let mut seq = 0;
        run(&mut s, 1, &mut seq, spec()).unwrap();
        let id = s.instances.keys().next().unwrap().clone();
        assert_eq!(s.instances[&id].shutdown_behavior, ShutdownBehavior::Stop);
        s.apply(Command::SetShutdownBehavior {
            id: id.clone(),
            behavior: ShutdownBehavior::Terminate,
        })
        .unwrap();
        s.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![Observation {
                instance_id: id.clone(),
                state: ObservedState::Stopped,
                reason: String::new(),
                stopped_by_guest: true,
                seq: 0,
            }],
        })
        .unwrap();
        assert_eq!(s.instances[&id].desired, DesiredState::Terminated);
        // A terminated instance cannot change; an unknown one is NOT_FOUND.
        let e = s
            .apply(Command::SetShutdownBehavior {
                id: id.clone(),
                behavior: ShutdownBehavior::Stop,
            })
            .unwrap_err();
        assert!(matches!(e, E::FailedPrecondition(_)), "{e:?}");
        let e = s
            .apply(Command::SetShutdownBehavior {
                id: "i-nope".into(),
                behavior: ShutdownBehavior::Stop,
            })
            .unwrap_err();
        assert!(matches!(e, E::NotFound(_)), "{e:?}");
    }

    #[test]
    fn unreachable_host_makes_instances_unknown_and_takes_nothing_new() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 8, 8192);
        add_image(&mut s);
        let mut seq = 0;
        run(&mut s, 1, &mut seq, spec()).unwrap();
        s.apply(Command::MarkUnreachable {
            host_ids: vec!["h1".into()],
        })
        .unwrap();
        let i = s.instances.values().next().unwrap();
        assert_eq!(i.public_state(), PublicState::Unknown);
        assert_eq!(i.host_id, "h1");
        assert!(run(&mut s, 1, &mut seq, spec()).is_err());
        add_host(&mut s, "h1", "az-1", 8, 8192);
        assert_eq!(s.hosts["h1"].health, HostHealth::Healthy);
        let i = s.instances.values().next().unwrap();
        assert_eq!(i.observed, ObservedState::Absent);
        assert_eq!(i.host_id, "h1", "never moved");
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

    #[test]
    fn tags_on_any_resource() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 4, 4096);
        add_image(&mut s);
        let tags: Tags = [("env".to_string(), "prod".to_string())].into();
        s.apply(Command::CreateTags {
            resource_ids: vec!["h1".into(), "img-1".into()],
            tags: tags.clone(),
        })
        .unwrap();
        assert_eq!(s.hosts["h1"].tags, tags);
        let e = s.apply(Command::CreateTags {
            resource_ids: vec!["nope".into()],
            tags,
        });
        assert!(matches!(e, Err(StateError::NotFound(_))));
        s.apply(Command::DeleteTags {
            resource_ids: vec!["h1".into()],
            tags: vec![("env".into(), String::new())],
        })
        .unwrap();
        assert!(s.hosts["h1"].tags.is_empty());
    }
}
