//! The `Compute` service: authenticate, convert, delegate.

use std::sync::Arc;

use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::compute_server::Compute;
use ferro_raft::Replicator;
use tonic::{Request, Response, Status};

use super::convert::*;
use super::{caller, status};
use crate::controller::{new_api_key, new_id, Controller, InstanceFilter};
use crate::model::*;
use crate::state::{
    any_of, describe_interfaces, describe_security_groups, describe_subnets, describe_vpcs,
    sha256_hex, ClusterState, Command, GroupFilter, InstanceChange, Output, StateError,
    SubnetFilter, VolumeFilter, DEFAULT_PAGE,
};

type Res<T> = Result<Response<T>, Status>;

/// The `ferro.compute.v1.Compute` service.
pub struct ComputeService<R> {
    ctl: Arc<Controller<R>>,
}

impl<R: Replicator<ClusterState>> ComputeService<R> {
    /// A service over `ctl`.
    pub fn new(ctl: Arc<Controller<R>>) -> Self {
        Self { ctl }
    }

    async fn auth<T>(&self, req: &Request<T>, admin: bool) -> Result<ApiKey, Status> {
        self.ctl
            .authorize(caller(req)?, admin)
            .await
            .map_err(status)
    }

    async fn write(&self, c: Command) -> Result<Output, Status> {
        self.ctl.write(c).await.map_err(status)
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ClusterState) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, Status> {
        self.ctl
            .read(f)
            .await
            .map_err(status)?
            .map_err(|e| status(e.into()))
    }

    /// The volume attachments of each of `instances` (volume id,
    /// attachment), in device order.
    async fn attachments(
        &self,
        instances: &[crate::model::Instance],
    ) -> Result<Vec<Vec<(String, crate::model::VolumeAttachment)>>, Status> {
        let ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
        self.read(move |s| {
            Ok(ids
                .iter()
                .map(|id| crate::state::attachments_of(s, id))
                .collect())
        })
        .await
    }
}

impl<R: Replicator<ClusterState>> ComputeService<R> {
    async fn change_rules(
        &self,
        req: Request<pb::SecurityGroupRulesRequest>,
        add: bool,
    ) -> Res<pb::SecurityGroupRulesResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let rules = r
            .rules
            .iter()
            .enumerate()
            .map(|(n, x)| rule_in(&format!("rules[{n}]"), x))
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        let c = Command::ChangeSecurityGroupRules {
            group_id: r.group_id,
            egress: r.egress,
            rules,
            add,
        };
        match self.write(c).await? {
            Output::SecurityGroup(g) => Ok(Response::new(pb::SecurityGroupRulesResponse {
                security_group: Some(security_group_out(&g)),
            })),
            _ => Err(Status::internal("unexpected output")),
        }
    }
}

impl<R: Replicator<ClusterState>> ComputeService<R> {
    async fn attachment(&self, c: Command) -> Res<pb::VolumeAttachmentResponse> {
        match self.write(c).await? {
            Output::Attachment {
                volume_id,
                attachment,
            } => Ok(Response::new(pb::VolumeAttachmentResponse {
                attachment: Some(attachment_out(&volume_id, &attachment)),
            })),
            _ => Err(Status::internal("unexpected output")),
        }
    }
}

fn bad(e: StateError) -> Status {
    status(e.into())
}

/// Look up `names` in `map` (all of it when empty); NOT_FOUND names `field`.
fn select<T: Clone>(
    map: &std::collections::BTreeMap<String, T>,
    names: &[String],
    field: &str,
) -> Result<Vec<T>, StateError> {
    if names.is_empty() {
        return Ok(map.values().cloned().collect());
    }
    names
        .iter()
        .map(|n| {
            map.get(n)
                .cloned()
                .ok_or_else(|| StateError::NotFound(format!("{field}: no {n:?}")))
        })
        .collect()
}

#[tonic::async_trait]
impl<R: Replicator<ClusterState>> Compute for ComputeService<R> {
    async fn run_instances(
        &self,
        req: Request<pb::RunInstancesRequest>,
    ) -> Res<pb::RunInstancesResponse> {
        self.auth(&req, false).await?;
        let mut spec = run_spec(req.into_inner()).map_err(bad)?;
        let default_type = &self.ctl.settings().default_volume_type;
        for d in spec
            .block_devices
            .iter_mut()
            .chain(spec.root_volume.as_mut())
        {
            if d.volume_type.is_empty() {
                d.volume_type.clone_from(default_type);
            }
        }
        let (reservation_id, instances) = self.ctl.run_instances(spec).await.map_err(status)?;
        let attached = self.attachments(&instances).await?;
        Ok(Response::new(pb::RunInstancesResponse {
            reservation_id,
            instances: instances
                .iter()
                .zip(attached)
                .map(|(i, a)| {
                    let mut out = instance_out(i);
                    out.block_device_mappings =
                        a.iter().map(|(v, a)| attachment_out(v, a)).collect();
                    out
                })
                .collect(),
        }))
    }

    async fn describe_instances(
        &self,
        req: Request<pb::DescribeInstancesRequest>,
    ) -> Res<pb::DescribeInstancesResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let with_user_data = r.include_user_data;
        let f = InstanceFilter {
            ids: r.instance_ids,
            states: r
                .states
                .into_iter()
                .map(state_in)
                .collect::<Result<_, _>>()
                .map_err(bad)?,
            azs: r.availability_zones,
            types: r.instance_types,
            hosts: r.host_ids,
            net: net_filter_in!(r),
            tags: tag_filters_in(r.tags),
            max_results: r.max_results,
            next_token: r.next_token,
        };
        let (list, next_token) = self.ctl.describe_instances(f).await.map_err(status)?;
        let mut attached = self.attachments(&list).await?.into_iter();
        let instances = list
            .iter()
            .map(|i| {
                let mut out = instance_out(i);
                if with_user_data {
                    out.user_data = i.user_data.clone();
                }
                // What the reconciler keeps failing at is the reason to
                // show (this node leads: it answered the read).
                if let Some(r) = self.ctl.failure_reason(i) {
                    out.state_reason = r;
                }
                out.block_device_mappings = attached
                    .next()
                    .unwrap_or_default()
                    .iter()
                    .map(|(v, a)| attachment_out(v, a))
                    .collect();
                out
            })
            .collect();
        Ok(Response::new(pb::DescribeInstancesResponse {
            instances,
            next_token,
        }))
    }

    async fn start_instances(
        &self,
        req: Request<pb::StartInstancesRequest>,
    ) -> Res<pb::InstanceStateChangesResponse> {
        self.auth(&req, false).await?;
        let ids = req.into_inner().instance_ids;
        let c = self
            .ctl
            .set_desired(ids, DesiredState::Running)
            .await
            .map_err(status)?;
        Ok(Response::new(changes_out(c)))
    }

    async fn stop_instances(
        &self,
        req: Request<pb::StopInstancesRequest>,
    ) -> Res<pb::InstanceStateChangesResponse> {
        self.auth(&req, false).await?;
        let ids = req.into_inner().instance_ids;
        let c = self
            .ctl
            .set_desired(ids, DesiredState::Stopped)
            .await
            .map_err(status)?;
        Ok(Response::new(changes_out(c)))
    }

    async fn reboot_instances(
        &self,
        req: Request<pb::RebootInstancesRequest>,
    ) -> Res<pb::InstanceStateChangesResponse> {
        self.auth(&req, false).await?;
        let c = self
            .ctl
            .reboot(req.into_inner().instance_ids)
            .await
            .map_err(status)?;
        Ok(Response::new(changes_out(c)))
    }

    async fn terminate_instances(
        &self,
        req: Request<pb::TerminateInstancesRequest>,
    ) -> Res<pb::InstanceStateChangesResponse> {
        self.auth(&req, false).await?;
        let ids = req.into_inner().instance_ids;
        let c = self
            .ctl
            .set_desired(ids, DesiredState::Terminated)
            .await
            .map_err(status)?;
        Ok(Response::new(changes_out(c)))
    }

    async fn modify_instance_attribute(
        &self,
        req: Request<pb::ModifyInstanceAttributeRequest>,
    ) -> Res<pb::ModifyInstanceAttributeResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let shutdown_behavior = match r.instance_initiated_shutdown_behavior.as_str() {
            "" => None,
            s => Some(ShutdownBehavior::parse(s).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "instance_initiated_shutdown_behavior: {s:?} is not stop or terminate"
                ))
            })?),
        };
        let change = InstanceChange {
            instance_type: (!r.instance_type.is_empty()).then_some(r.instance_type),
            user_data: r.user_data,
            shutdown_behavior,
            security_groups: r.security_group_ids,
        };
        if change == InstanceChange::default() {
            return Err(Status::invalid_argument(
                "give instance_type, user_data, instance_initiated_shutdown_behavior \
                 (stop or terminate) or security_group_ids",
            ));
        }
        // One command: every attribute is checked before any changes.
        self.write(Command::ModifyInstance {
            id: r.instance_id,
            change,
        })
        .await?;
        Ok(Response::new(pb::ModifyInstanceAttributeResponse {}))
    }

    async fn get_console_output(
        &self,
        req: Request<pb::GetConsoleOutputRequest>,
    ) -> Res<pb::GetConsoleOutputResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let id = r.instance_id.clone();
        let (host_id, address, on_host, terminated) = self
            .read(move |s| {
                let i = s.instances.get(&id).ok_or_else(|| {
                    StateError::NotFound(format!("instance_id: no instance {id:?}"))
                })?;
                let address = s
                    .hosts
                    .get(&i.host_id)
                    .map(|h| h.address.clone())
                    .unwrap_or_default();
                Ok((
                    i.host_id.clone(),
                    address,
                    i.observed != crate::model::ObservedState::Absent,
                    i.desired == crate::model::DesiredState::Terminated,
                ))
            })
            .await?;
        let empty = |id: String| {
            Response::new(pb::GetConsoleOutputResponse {
                instance_id: id,
                output: Vec::new(),
                truncated: false,
            })
        };
        if !on_host {
            if terminated {
                return Err(Status::failed_precondition(format!(
                    "instance {} is terminated: its console is gone with it",
                    r.instance_id
                )));
            }
            // Pending: not on its host yet, so nothing written yet (EC2
            // answers with an empty output too).
            return Ok(empty(r.instance_id));
        }
        let mut c = self
            .ctl
            .agent_client(&host_id, &address, std::time::Duration::from_secs(10))
            .map_err(status)?;
        let out = match c
            .get_console_output(ferro_proto::agent::v1::GetConsoleOutputRequest {
                id: r.instance_id.clone(),
                max_bytes: r.max_bytes,
            })
            .await
        {
            Ok(o) => o.into_inner(),
            // Being created on its host right now.
            Err(e) if e.code() == tonic::Code::NotFound && !terminated => {
                return Ok(empty(r.instance_id))
            }
            // Name the host: a bare "tcp connect error" reads as if the
            // controller itself were down.
            Err(e) => {
                return Err(Status::new(
                    e.code(),
                    format!(
                        "instance {}: its host {host_id} ({address}): {}",
                        r.instance_id,
                        e.message()
                    ),
                ))
            }
        };
        Ok(Response::new(pb::GetConsoleOutputResponse {
            instance_id: r.instance_id,
            output: out.data,
            truncated: out.truncated,
        }))
    }

    async fn describe_hosts(
        &self,
        req: Request<pb::DescribeHostsRequest>,
    ) -> Res<pb::DescribeHostsResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let live = self.ctl.liveness();
        let list = listing_in(r.host_ids, vec![], r.max_results, r.next_token);
        let azs = r.availability_zones;
        let (hosts, next_token) = self
            .read(move |s| {
                let keep = |h: &Host| any_of(&azs, &h.az);
                list.select(
                    &s.hosts,
                    ("host_ids", "host"),
                    DEFAULT_PAGE,
                    |h| &h.tags,
                    keep,
                )
            })
            .await?;
        Ok(Response::new(pb::DescribeHostsResponse {
            hosts: hosts
                .iter()
                .map(|h| host_out(h, live.get(&h.id).map(|s| s.last_ms)))
                .collect(),
            next_token,
        }))
    }

    async fn describe_availability_zones(
        &self,
        req: Request<pb::DescribeAvailabilityZonesRequest>,
    ) -> Res<pb::DescribeAvailabilityZonesResponse> {
        self.auth(&req, false).await?;
        let zones = self
            .read(|s| {
                Ok(s.azs
                    .keys()
                    .map(|az| {
                        let hosts = s.hosts.values().filter(|h| &h.az == az);
                        let total = hosts.clone().count() as u32;
                        let healthy =
                            hosts.filter(|h| h.health == HostHealth::Healthy).count() as u32;
                        pb::AvailabilityZone {
                            name: az.clone(),
                            region: s.region.clone(),
                            state: if healthy > 0 { "available" } else { "impaired" }.into(),
                            hosts: total,
                            healthy_hosts: healthy,
                        }
                    })
                    .collect())
            })
            .await?;
        Ok(Response::new(pb::DescribeAvailabilityZonesResponse {
            availability_zones: zones,
        }))
    }

    async fn describe_instance_types(
        &self,
        req: Request<pb::DescribeInstanceTypesRequest>,
    ) -> Res<pb::DescribeInstanceTypesResponse> {
        self.auth(&req, false).await?;
        let names = req.into_inner().names;
        let mut types = self
            .read(move |s| select(&s.instance_types, &names, "names"))
            .await?;
        types.sort_by_key(|t| (t.vcpus, t.memory_mib));
        Ok(Response::new(pb::DescribeInstanceTypesResponse {
            instance_types: types
                .into_iter()
                .map(|t| pb::InstanceType {
                    name: t.name,
                    vcpus: t.vcpus,
                    memory_mib: t.memory_mib,
                })
                .collect(),
        }))
    }

    async fn register_image(&self, req: Request<pb::RegisterImageRequest>) -> Res<pb::Image> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let image = Image {
            id: new_id("img-"),
            name: r.name,
            kernel_path: r.kernel_path,
            initrd_path: r.initrd_path,
            rootdisk_path: r.rootdisk_path,
            cmdline_extra: r.cmdline_extra,
            created_at_ms: crate::now_ms(),
            tags: tags_in(r.tags).map_err(bad)?,
        };
        match self.write(Command::RegisterImage { image }).await? {
            Output::Image(i) => Ok(Response::new(image_out(&i, 0))),
            _ => Err(Status::internal("unexpected output")),
        }
    }

    async fn describe_images(
        &self,
        req: Request<pb::DescribeImagesRequest>,
    ) -> Res<pb::DescribeImagesResponse> {
        self.auth(&req, false).await?;
        let ids = req.into_inner().image_ids;
        let live = self.ctl.liveness();
        let images = self
            .read(move |s| {
                if ids.is_empty() {
                    return Ok(s.images.values().cloned().collect::<Vec<_>>());
                }
                ids.iter()
                    .map(|i| {
                        s.find_image(i).cloned().ok_or_else(|| {
                            StateError::NotFound(format!("image_ids: no image {i:?}"))
                        })
                    })
                    .collect()
            })
            .await?;
        Ok(Response::new(pb::DescribeImagesResponse {
            images: images
                .iter()
                .map(|i| {
                    let n = live.values().filter(|s| s.images.contains(&i.id)).count();
                    let mut out = image_out(i, n as u32);
                    out.host_errors = self.ctl.image_errors(&i.id, live.keys());
                    out
                })
                .collect(),
        }))
    }

    async fn deregister_image(
        &self,
        req: Request<pb::DeregisterImageRequest>,
    ) -> Res<pb::DeregisterImageResponse> {
        self.auth(&req, false).await?;
        let image = req.into_inner().image_id;
        self.write(Command::DeregisterImage { image }).await?;
        Ok(Response::new(pb::DeregisterImageResponse {}))
    }

    async fn create_key_pair(
        &self,
        req: Request<pb::CreateKeyPairRequest>,
    ) -> Res<pb::CreateKeyPairResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let generated = crate::sshkey::generate(&r.key_name);
        let key_pair = KeyPair {
            id: new_id("key-"),
            name: r.key_name,
            public_key: generated.public_line,
            fingerprint: fingerprint(&generated.public_blob),
            created_at_ms: crate::now_ms(),
            tags: tags_in(r.tags).map_err(bad)?,
        };
        match self.write(Command::AddKeyPair { key_pair }).await? {
            Output::KeyPair(k) => Ok(Response::new(pb::CreateKeyPairResponse {
                key_pair: Some(key_pair_out(&k)),
                private_key: generated.private_pem,
            })),
            _ => Err(Status::internal("unexpected output")),
        }
    }

    async fn import_key_pair(&self, req: Request<pb::ImportKeyPairRequest>) -> Res<pb::KeyPair> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let blob = parse_public_key(&r.public_key).map_err(bad)?;
        let key_pair = KeyPair {
            id: new_id("key-"),
            name: r.key_name,
            public_key: r.public_key.trim().to_string(),
            fingerprint: fingerprint(&blob),
            created_at_ms: crate::now_ms(),
            tags: tags_in(r.tags).map_err(bad)?,
        };
        match self.write(Command::AddKeyPair { key_pair }).await? {
            Output::KeyPair(k) => Ok(Response::new(key_pair_out(&k))),
            _ => Err(Status::internal("unexpected output")),
        }
    }

    async fn describe_key_pairs(
        &self,
        req: Request<pb::DescribeKeyPairsRequest>,
    ) -> Res<pb::DescribeKeyPairsResponse> {
        self.auth(&req, false).await?;
        let names = req.into_inner().key_names;
        let keys = self
            .read(move |s| select(&s.key_pairs, &names, "key_names"))
            .await?;
        Ok(Response::new(pb::DescribeKeyPairsResponse {
            key_pairs: keys.iter().map(key_pair_out).collect(),
        }))
    }

    async fn delete_key_pair(
        &self,
        req: Request<pb::DeleteKeyPairRequest>,
    ) -> Res<pb::DeleteKeyPairResponse> {
        self.auth(&req, false).await?;
        let name = req.into_inner().key_name;
        self.write(Command::DeleteKeyPair { name }).await?;
        Ok(Response::new(pb::DeleteKeyPairResponse {}))
    }

    async fn create_placement_group(
        &self,
        req: Request<pb::CreatePlacementGroupRequest>,
    ) -> Res<pb::PlacementGroup> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let strategy = GroupStrategy::parse(&r.strategy).ok_or_else(|| {
            Status::invalid_argument("strategy: must be \"spread\" or \"cluster\"")
        })?;
        let group = PlacementGroup {
            id: new_id("pg-"),
            name: r.name,
            strategy,
            members: Default::default(),
            created_at_ms: crate::now_ms(),
            tags: tags_in(r.tags).map_err(bad)?,
        };
        match self.write(Command::CreatePlacementGroup { group }).await? {
            Output::Group(g) => Ok(Response::new(group_out(&g))),
            _ => Err(Status::internal("unexpected output")),
        }
    }

    async fn describe_placement_groups(
        &self,
        req: Request<pb::DescribePlacementGroupsRequest>,
    ) -> Res<pb::DescribePlacementGroupsResponse> {
        self.auth(&req, false).await?;
        let names = req.into_inner().names;
        let groups = self
            .read(move |s| select(&s.groups, &names, "names"))
            .await?;
        Ok(Response::new(pb::DescribePlacementGroupsResponse {
            placement_groups: groups.iter().map(group_out).collect(),
        }))
    }

    async fn delete_placement_group(
        &self,
        req: Request<pb::DeletePlacementGroupRequest>,
    ) -> Res<pb::DeletePlacementGroupResponse> {
        self.auth(&req, false).await?;
        let name = req.into_inner().name;
        self.write(Command::DeletePlacementGroup { name }).await?;
        Ok(Response::new(pb::DeletePlacementGroupResponse {}))
    }

    async fn create_tags(
        &self,
        req: Request<pb::CreateTagsRequest>,
    ) -> Res<pb::CreateTagsResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let tags = tags_in(r.tags).map_err(bad)?;
        self.write(Command::CreateTags {
            resource_ids: r.resource_ids,
            tags,
        })
        .await?;
        Ok(Response::new(pb::CreateTagsResponse {}))
    }

    async fn describe_tags(
        &self,
        req: Request<pb::DescribeTagsRequest>,
    ) -> Res<pb::DescribeTagsResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let q = crate::state::TagQuery {
            resource_ids: r.resource_ids,
            resource_types: r.resource_types,
            keys: r.keys,
            values: r.values,
            max_results: r.max_results,
            next_token: r.next_token,
        };
        let (rows, next_token) = self
            .read(move |s| crate::state::describe_tags(s, &q))
            .await?;
        Ok(Response::new(pb::DescribeTagsResponse {
            tags: rows
                .into_iter()
                .map(|t| pb::TagDescription {
                    resource_id: t.resource_id,
                    resource_type: t.resource_type.into(),
                    key: t.key,
                    value: t.value,
                })
                .collect(),
            next_token,
        }))
    }

    async fn delete_tags(
        &self,
        req: Request<pb::DeleteTagsRequest>,
    ) -> Res<pb::DeleteTagsResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let tags = r.tags.into_iter().map(|t| (t.key, t.value)).collect();
        self.write(Command::DeleteTags {
            resource_ids: r.resource_ids,
            tags,
        })
        .await?;
        Ok(Response::new(pb::DeleteTagsResponse {}))
    }

    async fn create_api_key(
        &self,
        req: Request<pb::CreateApiKeyRequest>,
    ) -> Res<pb::CreateApiKeyResponse> {
        self.auth(&req, true).await?;
        let r = req.into_inner();
        let role = match (r.role.as_str(), r.admin) {
            ("admin", _) | ("", true) => Role::Admin,
            ("user", false) | ("", false) => Role::User,
            ("user", true) => {
                return Err(Status::invalid_argument(
                    "role: \"user\" contradicts admin: true",
                ))
            }
            ("host", _) => {
                return Err(Status::invalid_argument(
                    "role: host keys are made only by a host joining (ferro hosts join)",
                ))
            }
            (other, _) => {
                return Err(Status::invalid_argument(format!(
                    "role: {other:?} is not one of admin, user"
                )))
            }
        };
        let (secret, key) = new_api_key(&r.name, role, crate::now_ms());
        debug_assert_eq!(key.secret_sha256, sha256_hex(secret.as_bytes()));
        match self.write(Command::CreateApiKey { key }).await? {
            Output::ApiKey(k) => Ok(Response::new(pb::CreateApiKeyResponse {
                key: Some(api_key_out(&k)),
                secret,
                ec2_secret_access_key: k.ec2_secret.clone(),
            })),
            _ => Err(Status::internal("unexpected output")),
        }
    }

    async fn describe_api_keys(
        &self,
        req: Request<pb::DescribeApiKeysRequest>,
    ) -> Res<pb::DescribeApiKeysResponse> {
        self.auth(&req, true).await?;
        let keys = self
            .read(|s| Ok(s.api_keys.values().cloned().collect::<Vec<_>>()))
            .await?;
        Ok(Response::new(pb::DescribeApiKeysResponse {
            keys: keys.iter().map(api_key_out).collect(),
        }))
    }

    async fn delete_api_key(
        &self,
        req: Request<pb::DeleteApiKeyRequest>,
    ) -> Res<pb::DeleteApiKeyResponse> {
        self.auth(&req, true).await?;
        let id = req.into_inner().id;
        self.write(Command::DeleteApiKey { id }).await?;
        Ok(Response::new(pb::DeleteApiKeyResponse {}))
    }

    async fn create_vpc(&self, req: Request<pb::CreateVpcRequest>) -> Res<pb::Vpc> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let vpc = Vpc {
            id: new_id("vpc-"),
            cidr: r.cidr_block,
            is_default: false,
            tags: tags_in(r.tags).map_err(bad)?,
            created_at_ms: crate::now_ms(),
            vni: 0,
        };
        match self.write(Command::CreateVpc { vpc }).await? {
            Output::Vpc(v) => Ok(Response::new(vpc_out(&v))),
            _ => Err(Status::internal("unexpected output")),
        }
    }

    async fn describe_vpcs(
        &self,
        req: Request<pb::DescribeVpcsRequest>,
    ) -> Res<pb::DescribeVpcsResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let f = listing_in(r.vpc_ids, r.tags, r.max_results, r.next_token);
        let (vpcs, next_token) = self.read(move |s| describe_vpcs(s, &f)).await?;
        Ok(Response::new(pb::DescribeVpcsResponse {
            vpcs: vpcs.iter().map(vpc_out).collect(),
            next_token,
        }))
    }

    async fn delete_vpc(&self, req: Request<pb::DeleteVpcRequest>) -> Res<pb::DeleteVpcResponse> {
        self.auth(&req, false).await?;
        let id = req.into_inner().vpc_id;
        self.write(Command::DeleteVpc { id }).await?;
        Ok(Response::new(pb::DeleteVpcResponse {}))
    }

    async fn create_subnet(&self, req: Request<pb::CreateSubnetRequest>) -> Res<pb::Subnet> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let subnet = Subnet {
            id: new_id("subnet-"),
            vpc_id: r.vpc_id,
            cidr: r.cidr_block,
            az: r.availability_zone,
            is_default: false,
            tags: tags_in(r.tags).map_err(bad)?,
            created_at_ms: crate::now_ms(),
        };
        match self.write(Command::CreateSubnet { subnet }).await? {
            Output::Subnet(s) => Ok(Response::new(subnet_out(&s))),
            _ => Err(Status::internal("unexpected output")),
        }
    }

    async fn describe_subnets(
        &self,
        req: Request<pb::DescribeSubnetsRequest>,
    ) -> Res<pb::DescribeSubnetsResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let f = SubnetFilter {
            list: listing_in(r.subnet_ids, r.tags, r.max_results, r.next_token),
            vpcs: r.vpc_ids,
            azs: r.availability_zones,
        };
        let (subnets, next_token) = self.read(move |s| describe_subnets(s, &f)).await?;
        Ok(Response::new(pb::DescribeSubnetsResponse {
            subnets: subnets.iter().map(subnet_out).collect(),
            next_token,
        }))
    }

    async fn delete_subnet(
        &self,
        req: Request<pb::DeleteSubnetRequest>,
    ) -> Res<pb::DeleteSubnetResponse> {
        self.auth(&req, false).await?;
        let id = req.into_inner().subnet_id;
        self.write(Command::DeleteSubnet { id }).await?;
        Ok(Response::new(pb::DeleteSubnetResponse {}))
    }

    async fn create_security_group(
        &self,
        req: Request<pb::CreateSecurityGroupRequest>,
    ) -> Res<pb::SecurityGroup> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let group = SecurityGroup {
            id: new_id("sg-"),
            vpc_id: r.vpc_id,
            name: r.group_name,
            description: r.description,
            ingress: vec![],
            egress: vec![],
            tags: tags_in(r.tags).map_err(bad)?,
            created_at_ms: crate::now_ms(),
        };
        match self.write(Command::CreateSecurityGroup { group }).await? {
            Output::SecurityGroup(g) => Ok(Response::new(security_group_out(&g))),
            _ => Err(Status::internal("unexpected output")),
        }
    }

    async fn describe_security_groups(
        &self,
        req: Request<pb::DescribeSecurityGroupsRequest>,
    ) -> Res<pb::DescribeSecurityGroupsResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let f = GroupFilter {
            list: listing_in(r.group_ids, r.tags, r.max_results, r.next_token),
            vpcs: r.vpc_ids,
            names: r.group_names,
        };
        let (groups, next_token) = self.read(move |s| describe_security_groups(s, &f)).await?;
        Ok(Response::new(pb::DescribeSecurityGroupsResponse {
            security_groups: groups.iter().map(security_group_out).collect(),
            next_token,
        }))
    }

    async fn describe_network_interfaces(
        &self,
        req: Request<pb::DescribeNetworkInterfacesRequest>,
    ) -> Res<pb::DescribeNetworkInterfacesResponse> {
        self.auth(&req, false).await?;
        let f = interface_filter_in(req.into_inner());
        let (list, next_token) = self.read(move |s| describe_interfaces(s, &f)).await?;
        Ok(Response::new(pb::DescribeNetworkInterfacesResponse {
            network_interfaces: list.iter().map(interface_out).collect(),
            next_token,
        }))
    }

    async fn delete_security_group(
        &self,
        req: Request<pb::DeleteSecurityGroupRequest>,
    ) -> Res<pb::DeleteSecurityGroupResponse> {
        self.auth(&req, false).await?;
        let id = req.into_inner().group_id;
        self.write(Command::DeleteSecurityGroup { id }).await?;
        Ok(Response::new(pb::DeleteSecurityGroupResponse {}))
    }

    async fn authorize_security_group_rules(
        &self,
        req: Request<pb::SecurityGroupRulesRequest>,
    ) -> Res<pb::SecurityGroupRulesResponse> {
        self.change_rules(req, true).await
    }

    async fn revoke_security_group_rules(
        &self,
        req: Request<pb::SecurityGroupRulesRequest>,
    ) -> Res<pb::SecurityGroupRulesResponse> {
        self.change_rules(req, false).await
    }

    async fn create_volume(&self, req: Request<pb::CreateVolumeRequest>) -> Res<pb::Volume> {
        self.auth(&req, false).await?;
        let mut spec = volume_spec(req.into_inner()).map_err(bad)?;
        if spec.volume_type.is_empty() {
            spec.volume_type
                .clone_from(&self.ctl.settings().default_volume_type);
        }
        let c = Command::CreateVolume {
            spec,
            volume_id: new_id("vol-"),
            now_ms: crate::now_ms(),
        };
        match self.write(c).await? {
            Output::Volume(v) => Ok(Response::new(volume_out(&v))),
            _ => Err(Status::internal("unexpected output")),
        }
    }

    async fn describe_volumes(
        &self,
        req: Request<pb::DescribeVolumesRequest>,
    ) -> Res<pb::DescribeVolumesResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        let f = VolumeFilter {
            ids: r.volume_ids,
            azs: r.availability_zones,
            instances: r.attachment_instance_ids,
            states: r.states,
            tags: tag_filters_in(r.tags),
            max_results: r.max_results,
            next_token: r.next_token,
        };
        let (volumes, next_token) = self
            .read(move |s| crate::state::describe_volumes(s, &f))
            .await?;
        Ok(Response::new(pb::DescribeVolumesResponse {
            volumes: volumes.iter().map(volume_out).collect(),
            next_token,
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Res<pb::DeleteVolumeResponse> {
        self.auth(&req, false).await?;
        let id = req.into_inner().volume_id;
        self.write(Command::DeleteVolume { id }).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn attach_volume(
        &self,
        req: Request<pb::AttachVolumeRequest>,
    ) -> Res<pb::VolumeAttachmentResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        self.attachment(Command::AttachVolume {
            volume_id: r.volume_id,
            instance_id: r.instance_id,
            device: r.device,
            delete_on_termination: r.delete_on_termination,
        })
        .await
    }

    async fn detach_volume(
        &self,
        req: Request<pb::DetachVolumeRequest>,
    ) -> Res<pb::VolumeAttachmentResponse> {
        self.auth(&req, false).await?;
        let r = req.into_inner();
        self.attachment(Command::DetachVolume {
            volume_id: r.volume_id,
            instance_id: r.instance_id,
            force: r.force,
        })
        .await
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Res<pb::CreateJoinTokenResponse> {
        self.auth(&req, true).await?;
        let r = req.into_inner();
        let ttl_ms = match u64::from(r.ttl_seconds) * 1000 {
            0 => 3_600_000,
            t if t > crate::state::MAX_JOIN_TOKEN_TTL_MS => {
                return Err(Status::invalid_argument(
                    "ttl_seconds: at most 604800 (7 days)",
                ))
            }
            t => t,
        };
        let (token, expires_at_ms) = self
            .ctl
            .create_join_token(&r.host_id, ttl_ms)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::CreateJoinTokenResponse {
            token,
            host_id: r.host_id,
            expires_at_ms,
        }))
    }

    async fn revoke_host(
        &self,
        req: Request<pb::RevokeHostRequest>,
    ) -> Res<pb::RevokeHostResponse> {
        self.auth(&req, true).await?;
        let r = req.into_inner();
        self.ctl.revoke_host(&r.host_id).await.map_err(status)?;
        Ok(Response::new(pb::RevokeHostResponse {}))
    }
}
