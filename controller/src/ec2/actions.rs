//! EC2 actions, each mapped onto the `ferro.compute.v1` call that does the
//! same: parameters in EC2's encoding → the gRPC request → the gRPC
//! answer → EC2's XML. No rule is checked here that the gRPC API does not
//! check itself, except the shape of EC2's own parameters.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::compute_server::Compute;
use ferro_raft::Replicator;

use super::error::from_status;
use super::query::Params;
use super::sigv4::iso8601_ms;
use super::xml::Xml;
use super::{Ctx, Ec2Error};
use crate::state::ClusterState;

/// The EC2 actions this endpoint answers (others are `InvalidAction`).
pub const ACTIONS: &[&str] = &[
    "DescribeRegions",
    "DescribeAvailabilityZones",
    "DescribeInstanceTypes",
    "DescribeImages",
    "RegisterImage",
    "DeregisterImage",
    "RunInstances",
    "DescribeInstances",
    "DescribeInstanceStatus",
    "StartInstances",
    "StopInstances",
    "RebootInstances",
    "TerminateInstances",
    "GetConsoleOutput",
    "CreateKeyPair",
    "ImportKeyPair",
    "DescribeKeyPairs",
    "DeleteKeyPair",
    "CreateTags",
    "DeleteTags",
    "DescribeTags",
    "CreatePlacementGroup",
    "DescribePlacementGroups",
    "DeletePlacementGroup",
    "DescribeInstanceAttribute",
    "ModifyInstanceAttribute",
];

pub(super) type Res = Result<String, Ec2Error>;

/// Answer `action`.
pub async fn dispatch<R: Replicator<ClusterState>>(ctx: &Ctx<R>, action: &str, p: &Params) -> Res {
    match action {
        "DescribeRegions" => describe_regions(ctx, p).await,
        "DescribeAvailabilityZones" => describe_zones(ctx, p).await,
        "DescribeInstanceTypes" => describe_instance_types(ctx, p).await,
        "DescribeImages" => describe_images(ctx, p).await,
        "RegisterImage" => register_image(ctx, p).await,
        "DeregisterImage" => deregister_image(ctx, p).await,
        "RunInstances" => run_instances(ctx, p).await,
        "DescribeInstances" => describe_instances(ctx, p).await,
        "DescribeInstanceStatus" => describe_instance_status(ctx, p).await,
        "StartInstances" | "StopInstances" | "RebootInstances" | "TerminateInstances" => {
            change_state(ctx, action, p).await
        }
        "GetConsoleOutput" => console_output(ctx, p).await,
        "CreateKeyPair" => create_key_pair(ctx, p).await,
        "ImportKeyPair" => import_key_pair(ctx, p).await,
        "DescribeKeyPairs" => describe_key_pairs(ctx, p).await,
        "DeleteKeyPair" => delete_key_pair(ctx, p).await,
        "CreateTags" | "DeleteTags" => tags(ctx, action, p).await,
        "DescribeTags" => describe_tags(ctx, p).await,
        "CreatePlacementGroup" => create_group(ctx, p).await,
        "DescribePlacementGroups" => describe_groups(ctx, p).await,
        "DeletePlacementGroup" => {
            let req = pb::DeletePlacementGroupRequest {
                name: p.required("GroupName")?.to_string(),
            };
            ok(
                ctx.svc.delete_placement_group(ctx.req(req)).await,
                "InvalidPlacementGroup.Unknown",
            )?;
            returned(ctx, action)
        }
        "DescribeInstanceAttribute" => describe_attribute(ctx, p).await,
        "ModifyInstanceAttribute" => modify_attribute(ctx, p).await,
        other => match super::network::dispatch(ctx, other, p).await {
            Some(r) => r,
            None => Err(Ec2Error::new(
                400,
                "InvalidAction",
                format!("The action {other} is not valid for this web service."),
            )),
        },
    }
}

/// A gRPC answer, or its EC2 error with `not_found` as the default
/// not-found code.
pub(super) fn ok<T>(
    r: Result<tonic::Response<T>, tonic::Status>,
    not_found: &str,
) -> Result<T, Ec2Error> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| from_status(&s, not_found))
}

pub(super) fn done<R: Replicator<ClusterState>>(
    ctx: &Ctx<R>,
    action: &str,
    f: impl FnOnce(&mut Xml),
) -> Res {
    let mut x = Xml::response(action, &ctx.request_id);
    f(&mut x);
    Ok(x.finish(action))
}

/// `true` as EC2's `<return>` answers.
pub(super) fn returned<R: Replicator<ClusterState>>(ctx: &Ctx<R>, action: &str) -> Res {
    done(ctx, action, |x| {
        x.leaf("return", "true");
    })
}

/// Whether `id` looks like an instance id: `i-` and hex digits.
fn well_formed(id: &str) -> bool {
    id.strip_prefix("i-")
        .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Instance ids of `InstanceId.N`, each `i-` and hex digits.
fn instance_ids(p: &Params) -> Result<Vec<String>, Ec2Error> {
    let ids = p.list("InstanceId");
    if let Some(bad) = ids.iter().find(|id| !well_formed(id)) {
        return Err(Ec2Error::malformed_instance(bad));
    }
    Ok(ids)
}

/// Refuse filters this endpoint does not know.
pub(super) fn unknown_filter(name: &str) -> Ec2Error {
    Ec2Error::new(
        400,
        "InvalidParameterValue",
        format!("The filter '{name}' is invalid"),
    )
}

pub(super) fn tags_in(t: Vec<(String, String)>) -> Vec<pb::Tag> {
    t.into_iter()
        .map(|(key, value)| pb::Tag { key, value })
        .collect()
}

pub(super) fn tag_pairs(t: &[pb::Tag]) -> impl Iterator<Item = (&str, &str)> {
    t.iter().map(|t| (t.key.as_str(), t.value.as_str()))
}

/// EC2's instance state code and name.
fn state_of(s: i32) -> (u32, &'static str) {
    use pb::InstanceState as S;
    match S::try_from(s).unwrap_or(S::Unspecified) {
        S::Running | S::Rebooting => (16, "running"),
        S::ShuttingDown => (32, "shutting-down"),
        S::Terminated => (48, "terminated"),
        S::Stopping => (64, "stopping"),
        S::Stopped | S::Failed => (80, "stopped"),
        // Pending, or unknown while its host is unreachable.
        _ => (0, "pending"),
    }
}

fn state_xml(x: &mut Xml, tag: &str, s: i32) {
    let (code, name) = state_of(s);
    x.wrap(tag, |x| {
        x.leaf("code", &code.to_string()).leaf("name", name);
    });
}

pub(super) fn page_size(p: &Params) -> Result<u32, Ec2Error> {
    match p.u64("MaxResults")? {
        None => Ok(0),
        Some(n) if (5..=1000).contains(&n) => Ok(n as u32),
        Some(n) => Err(Ec2Error::invalid(format!(
            "MaxResults: {n} is not between 5 and 1000"
        ))),
    }
}

async fn describe_regions<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let wanted = p.list("RegionName");
    if let Some(w) = wanted.iter().find(|w| **w != ctx.region) {
        return Err(Ec2Error::new(
            400,
            "InvalidParameterValue",
            format!("Invalid region: {w} (this cloud is region {})", ctx.region),
        ));
    }
    done(ctx, "DescribeRegions", |x| {
        x.items("regionInfo", [&ctx.region], |x, r| {
            x.leaf("regionName", r)
                .leaf("regionEndpoint", "")
                .leaf("optInStatus", "opt-in-not-required");
        });
    })
}

async fn describe_zones<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let names = p.list("ZoneName");
    let r = ok(
        ctx.svc
            .describe_availability_zones(ctx.req(pb::DescribeAvailabilityZonesRequest {}))
            .await,
        "InvalidAvailabilityZone",
    )?;
    if let Some(n) = names
        .iter()
        .find(|n| !r.availability_zones.iter().any(|z| &z.name == *n))
    {
        return Err(Ec2Error::new(
            400,
            "InvalidParameterValue",
            format!("Invalid availability zone: [{n}]"),
        ));
    }
    done(ctx, "DescribeAvailabilityZones", |x| {
        let zones = r
            .availability_zones
            .iter()
            .filter(|z| names.is_empty() || names.contains(&z.name));
        x.items("availabilityZoneInfo", zones, |x, z| {
            x.leaf("zoneName", &z.name)
                .leaf("zoneId", &z.name)
                .leaf("zoneState", &z.state)
                .leaf("regionName", &z.region)
                .leaf("zoneType", "availability-zone")
                .leaf("optInStatus", "opt-in-not-required")
                .open("messageSet")
                .close("messageSet");
        });
    })
}

async fn describe_instance_types<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let r = ok(
        ctx.svc
            .describe_instance_types(ctx.req(pb::DescribeInstanceTypesRequest {
                names: p.list("InstanceType"),
            }))
            .await,
        "InvalidInstanceType",
    )?;
    done(ctx, "DescribeInstanceTypes", |x| {
        x.items("instanceTypeSet", &r.instance_types, |x, t| {
            x.leaf("instanceType", &t.name)
                .wrap("vCpuInfo", |x| {
                    x.leaf("defaultVCpus", &t.vcpus.to_string());
                })
                .wrap("memoryInfo", |x| {
                    x.leaf("sizeInMiB", &t.memory_mib.to_string());
                })
                .leaf("hypervisor", "ferro-vmm")
                .wrap("processorInfo", |x| {
                    x.items("supportedArchitectures", ["x86_64"], |x, a| {
                        x.text(a);
                    });
                });
        });
    })
}

fn image_xml(x: &mut Xml, i: &pb::Image) {
    x.leaf("imageId", &i.image_id)
        .leaf("imageLocation", &i.kernel_path)
        .leaf("imageState", "available")
        .leaf("imageOwnerId", "self")
        .leaf("creationDate", &iso8601_ms(i.created_at_ms))
        .leaf("isPublic", "false")
        .leaf("architecture", "x86_64")
        .leaf("imageType", "machine")
        .leaf("name", &i.name)
        .leaf("rootDeviceType", "instance-store")
        .leaf("rootDeviceName", "/dev/vda")
        .leaf("virtualizationType", "hvm")
        .leaf("hypervisor", "ferro-vmm")
        .tag_set(tag_pairs(&i.tags));
}

async fn describe_images<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let r = ok(
        ctx.svc
            .describe_images(ctx.req(pb::DescribeImagesRequest {
                image_ids: p.list("ImageId"),
            }))
            .await,
        "InvalidAMIID.NotFound",
    )?;
    let filters = p.filters()?;
    let keep = |i: &pb::Image| -> Result<bool, Ec2Error> {
        for f in &filters {
            let have = match f.0.as_str() {
                "name" => i.name.clone(),
                "image-id" => i.image_id.clone(),
                n => return Err(unknown_filter(n)),
            };
            if !f.1.contains(&have) {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let mut images = Vec::new();
    for i in &r.images {
        if keep(i)? {
            images.push(i);
        }
    }
    done(ctx, "DescribeImages", |x| {
        x.items("imagesSet", images, image_xml);
    })
}

async fn register_image<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    // EC2's ImageLocation carries the kernel; our own parameters name the
    // rest (the API's RegisterImage takes host paths).
    let req = pb::RegisterImageRequest {
        name: p.required("Name")?.to_string(),
        kernel_path: p
            .get("KernelPath")
            .or(p.get("ImageLocation"))
            .ok_or_else(|| Ec2Error::missing("ImageLocation"))?
            .to_string(),
        initrd_path: p.get("InitrdPath").unwrap_or_default().to_string(),
        rootdisk_path: p.get("RootDiskPath").unwrap_or_default().to_string(),
        cmdline_extra: p.get("KernelCommandLine").unwrap_or_default().to_string(),
        tags: tags_in(p.tag_specifications("image")?),
    };
    let i = ok(
        ctx.svc.register_image(ctx.req(req)).await,
        "InvalidAMIID.NotFound",
    )?;
    done(ctx, "RegisterImage", |x| {
        x.leaf("imageId", &i.image_id);
    })
}

async fn deregister_image<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let req = pb::DeregisterImageRequest {
        image_id: p.required("ImageId")?.to_string(),
    };
    ok(
        ctx.svc.deregister_image(ctx.req(req)).await,
        "InvalidAMIID.NotFound",
    )?;
    returned(ctx, "DeregisterImage")
}

fn instance_xml(x: &mut Xml, i: &pb::Instance, index: usize) {
    let ebs = i.root_device_type == "ebs";
    x.leaf("instanceId", &i.instance_id)
        .leaf("imageId", &i.image_id);
    state_xml(x, "instanceState", i.state);
    x.opt("reason", &i.state_reason)
        .opt("keyName", &i.key_name)
        .leaf("amiLaunchIndex", &index.to_string())
        .leaf("instanceType", &i.instance_type)
        .leaf("launchTime", &iso8601_ms(i.launch_time_ms))
        .wrap("placement", |x| {
            x.leaf("availabilityZone", &i.availability_zone)
                .leaf("groupName", &i.placement_group)
                .leaf("tenancy", "default")
                .leaf("hostId", &i.host_id);
        })
        .wrap("monitoring", |x| {
            x.leaf("state", "disabled");
        })
        .opt("subnetId", &i.subnet_id)
        .opt("vpcId", &i.vpc_id)
        .opt("privateIpAddress", &i.private_ip_address)
        .items("groupSet", &i.security_group_ids, |x, g| {
            x.leaf("groupId", g);
        })
        .leaf("architecture", "x86_64")
        .leaf("rootDeviceType", if ebs { "ebs" } else { "instance-store" })
        .leaf("rootDeviceName", "/dev/vda")
        .items("blockDeviceMapping", &i.block_device_mappings, |x, a| {
            x.leaf("deviceName", &a.device).wrap("ebs", |x| {
                x.leaf("volumeId", &a.volume_id)
                    .leaf("status", &a.state)
                    .leaf("deleteOnTermination", &a.delete_on_termination.to_string());
            });
        })
        .leaf("virtualizationType", "hvm")
        .leaf("hypervisor", "ferro-vmm")
        .tag_set(tag_pairs(&i.tags));
    if !i.mac_address.is_empty() {
        x.items("networkInterfaceSet", [i], |x, i| {
            x.leaf("subnetId", &i.subnet_id)
                .leaf("vpcId", &i.vpc_id)
                .leaf("macAddress", &i.mac_address)
                .leaf("privateIpAddress", &i.private_ip_address)
                .leaf("status", "in-use");
        });
    }
}

async fn run_instances<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let min = p
        .u64("MinCount")?
        .ok_or_else(|| Ec2Error::missing("MinCount"))?;
    let max = p
        .u64("MaxCount")?
        .ok_or_else(|| Ec2Error::missing("MaxCount"))?;
    if min == 0 || max < min {
        return Err(Ec2Error::invalid(format!(
            "MinCount {min} and MaxCount {max}: want 1 <= MinCount <= MaxCount"
        )));
    }
    if max > 100 {
        return Err(Ec2Error::invalid("MaxCount: at most 100"));
    }
    let user_data = match p.get("UserData") {
        None => Vec::new(),
        Some(u) => base64::engine::general_purpose::STANDARD
            .decode(u.trim())
            .map_err(|_| Ec2Error::invalid("UserData: not valid base64"))?,
    };
    let mut groups = p.list("SecurityGroupId");
    if !p.list("SecurityGroup").is_empty() {
        return Err(Ec2Error::invalid(
            "SecurityGroup (names): give SecurityGroupId.N (ids) instead",
        ));
    }
    groups.dedup();
    let req = pb::RunInstancesRequest {
        // All or nothing: the scheduler places the whole count or none.
        count: max as u32,
        instance_type: p.get("InstanceType").unwrap_or("f1.nano").to_string(),
        image_id: p.required("ImageId")?.to_string(),
        availability_zone: p
            .get("Placement.AvailabilityZone")
            .unwrap_or_default()
            .to_string(),
        key_name: p.get("KeyName").unwrap_or_default().to_string(),
        user_data,
        placement_group: p.get("Placement.GroupName").unwrap_or_default().to_string(),
        tags: tags_in(p.tag_specifications("instance")?),
        client_token: p.get("ClientToken").unwrap_or_default().to_string(),
        instance_initiated_shutdown_behavior: p
            .get("InstanceInitiatedShutdownBehavior")
            .unwrap_or_default()
            .to_string(),
        subnet_id: p.get("SubnetId").unwrap_or_default().to_string(),
        private_ip_address: p.get("PrivateIpAddress").unwrap_or_default().to_string(),
        security_group_ids: groups,
        ..Default::default()
    };
    let r = ok(
        ctx.svc.run_instances(ctx.req(req)).await,
        "InvalidAMIID.NotFound",
    )?;
    done(ctx, "RunInstances", |x| {
        x.leaf("reservationId", &r.reservation_id)
            .leaf("ownerId", "self")
            .open("groupSet")
            .close("groupSet");
        x.items(
            "instancesSet",
            r.instances.iter().enumerate(),
            |x, (n, i)| instance_xml(x, i, n),
        );
    })
}

/// The gRPC DescribeInstances request of EC2's parameters and filters.
fn describe_request(p: &Params) -> Result<pb::DescribeInstancesRequest, Ec2Error> {
    let mut r = pb::DescribeInstancesRequest {
        instance_ids: instance_ids(p)?,
        max_results: page_size(p)?,
        next_token: p.get("NextToken").unwrap_or_default().to_string(),
        ..Default::default()
    };
    for f in p.filters()? {
        let values = f.1.clone();
        match f.0.as_str() {
            "instance-id" => r.instance_ids.extend(values),
            "instance-state-name" => {
                for v in values {
                    use pb::InstanceState as S;
                    let s = match v.as_str() {
                        "pending" => vec![S::Pending, S::Unknown],
                        "running" => vec![S::Running, S::Rebooting],
                        "shutting-down" => vec![S::ShuttingDown],
                        "terminated" => vec![S::Terminated],
                        "stopping" => vec![S::Stopping],
                        "stopped" => vec![S::Stopped, S::Failed],
                        _ => {
                            return Err(Ec2Error::invalid(format!(
                                "instance-state-name: {v:?} is not an instance state"
                            )))
                        }
                    };
                    r.states.extend(s.into_iter().map(|s| s as i32));
                }
            }
            "instance-type" => r.instance_types.extend(values),
            "availability-zone" => r.availability_zones.extend(values),
            "vpc-id" => r.vpc_ids.extend(values),
            "subnet-id" => r.subnet_ids.extend(values),
            "private-ip-address" => r.private_ip_addresses.extend(values),
            "instance.group-id" | "group-id" => r.security_group_ids.extend(values),
            "tag-key" => r.tags.extend(values.into_iter().map(|key| pb::TagFilter {
                key,
                value: String::new(),
            })),
            n if n.starts_with("tag:") => {
                let key = n["tag:".len()..].to_string();
                if values.iter().any(String::is_empty) || values.is_empty() {
                    return Err(Ec2Error::invalid(format!("filter {n}: give its values")));
                }
                r.tags.extend(values.into_iter().map(|value| pb::TagFilter {
                    key: key.clone(),
                    value,
                }));
            }
            n => return Err(unknown_filter(n)),
        }
    }
    Ok(r)
}

async fn describe_instances<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let req = describe_request(p)?;
    let r = ok(
        ctx.svc.describe_instances(ctx.req(req)).await,
        "InvalidInstanceID.NotFound",
    )?;
    // Reservations in the order of their first instance.
    let mut reservations: Vec<(&str, Vec<&pb::Instance>)> = Vec::new();
    for i in &r.instances {
        match reservations
            .iter_mut()
            .find(|(id, _)| *id == i.reservation_id)
        {
            Some((_, v)) => v.push(i),
            None => reservations.push((&i.reservation_id, vec![i])),
        }
    }
    done(ctx, "DescribeInstances", |x| {
        x.items("reservationSet", &reservations, |x, (id, list)| {
            x.leaf("reservationId", id)
                .leaf("ownerId", "self")
                .open("groupSet")
                .close("groupSet");
            x.items("instancesSet", list.iter().enumerate(), |x, (n, i)| {
                instance_xml(x, i, n)
            });
        });
        x.opt("nextToken", &r.next_token);
    })
}

async fn describe_instance_status<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let all = p.bool("IncludeAllInstances")?.unwrap_or(false);
    let mut req = describe_request(p)?;
    if !all && req.states.is_empty() {
        req.states.push(pb::InstanceState::Running as i32);
        req.states.push(pb::InstanceState::Rebooting as i32);
    }
    let r = ok(
        ctx.svc.describe_instances(ctx.req(req)).await,
        "InvalidInstanceID.NotFound",
    )?;
    done(ctx, "DescribeInstanceStatus", |x| {
        x.items("instanceStatusSet", &r.instances, |x, i| {
            let running = state_of(i.state).0 == 16;
            let status = if running { "ok" } else { "not-applicable" };
            x.leaf("instanceId", &i.instance_id)
                .leaf("availabilityZone", &i.availability_zone);
            state_xml(x, "instanceState", i.state);
            for tag in ["systemStatus", "instanceStatus"] {
                x.wrap(tag, |x| {
                    x.leaf("status", status);
                });
            }
        });
        x.opt("nextToken", &r.next_token);
    })
}

async fn change_state<R: Replicator<ClusterState>>(ctx: &Ctx<R>, action: &str, p: &Params) -> Res {
    let ids = instance_ids(p)?;
    if ids.is_empty() {
        return Err(Ec2Error::missing("InstanceId.1"));
    }
    let nf = "InvalidInstanceID.NotFound";
    let r = match action {
        "StartInstances" => ok(
            ctx.svc
                .start_instances(ctx.req(pb::StartInstancesRequest { instance_ids: ids }))
                .await,
            nf,
        )?,
        "StopInstances" => ok(
            ctx.svc
                .stop_instances(ctx.req(pb::StopInstancesRequest {
                    instance_ids: ids,
                    force: p.bool("Force")?.unwrap_or(false),
                }))
                .await,
            nf,
        )?,
        "RebootInstances" => {
            ok(
                ctx.svc
                    .reboot_instances(ctx.req(pb::RebootInstancesRequest { instance_ids: ids }))
                    .await,
                nf,
            )?;
            return returned(ctx, action);
        }
        _ => ok(
            ctx.svc
                .terminate_instances(ctx.req(pb::TerminateInstancesRequest { instance_ids: ids }))
                .await,
            nf,
        )?,
    };
    done(ctx, action, |x| {
        x.items("instancesSet", &r.changes, |x, c| {
            x.leaf("instanceId", &c.instance_id);
            state_xml(x, "currentState", c.current_state);
            state_xml(x, "previousState", c.previous_state);
        });
    })
}

async fn console_output<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let id = checked_instance_id(p)?;
    let r = ok(
        ctx.svc
            .get_console_output(ctx.req(pb::GetConsoleOutputRequest {
                instance_id: id,
                max_bytes: 0,
            }))
            .await,
        "InvalidInstanceID.NotFound",
    )?;
    done(ctx, "GetConsoleOutput", |x| {
        x.leaf("instanceId", &r.instance_id)
            .leaf("timestamp", &iso8601_ms(crate::now_ms()))
            .leaf(
                "output",
                &base64::engine::general_purpose::STANDARD.encode(&r.output),
            );
    })
}

fn key_pair_xml(x: &mut Xml, k: &pb::KeyPair) {
    x.leaf("keyPairId", &k.key_pair_id)
        .leaf("keyName", &k.key_name)
        .leaf("keyFingerprint", &k.fingerprint)
        .leaf("keyType", "ed25519")
        .opt("publicKey", &k.public_key)
        .leaf("createTime", &iso8601_ms(k.created_at_ms))
        .tag_set(tag_pairs(&k.tags));
}

async fn create_key_pair<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    if let Some(t) = p.get("KeyType").filter(|t| *t != "ed25519") {
        return Err(Ec2Error::invalid(format!(
            "KeyType: {t:?} is not supported (ed25519 only)"
        )));
    }
    let req = pb::CreateKeyPairRequest {
        key_name: p.required("KeyName")?.to_string(),
        tags: tags_in(p.tag_specifications("key-pair")?),
    };
    let r = ok(
        ctx.svc.create_key_pair(ctx.req(req)).await,
        "InvalidKeyPair.NotFound",
    )?;
    let k = r.key_pair.unwrap_or_default();
    done(ctx, "CreateKeyPair", |x| {
        x.leaf("keyName", &k.key_name)
            .leaf("keyFingerprint", &k.fingerprint)
            .leaf("keyMaterial", &r.private_key)
            .leaf("keyPairId", &k.key_pair_id)
            .tag_set(tag_pairs(&k.tags));
    })
}

async fn import_key_pair<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let material = base64::engine::general_purpose::STANDARD
        .decode(p.required("PublicKeyMaterial")?.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            Ec2Error::invalid("PublicKeyMaterial: not base64 of an OpenSSH public key")
        })?;
    let req = pb::ImportKeyPairRequest {
        key_name: p.required("KeyName")?.to_string(),
        public_key: material.trim().to_string(),
        tags: tags_in(p.tag_specifications("key-pair")?),
    };
    let k = ok(
        ctx.svc.import_key_pair(ctx.req(req)).await,
        "InvalidKeyPair.NotFound",
    )?;
    done(ctx, "ImportKeyPair", |x| {
        x.leaf("keyName", &k.key_name)
            .leaf("keyFingerprint", &k.fingerprint)
            .leaf("keyPairId", &k.key_pair_id)
            .tag_set(tag_pairs(&k.tags));
    })
}

async fn describe_key_pairs<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let r = ok(
        ctx.svc
            .describe_key_pairs(ctx.req(pb::DescribeKeyPairsRequest {
                key_names: p.list("KeyName"),
            }))
            .await,
        "InvalidKeyPair.NotFound",
    )?;
    let ids = p.list("KeyPairId");
    let with_public = p.bool("IncludePublicKey")?.unwrap_or(false);
    done(ctx, "DescribeKeyPairs", |x| {
        let keys = r
            .key_pairs
            .iter()
            .filter(|k| ids.is_empty() || ids.contains(&k.key_pair_id));
        x.items("keySet", keys, |x, k| {
            let mut k = k.clone();
            if !with_public {
                k.public_key.clear();
            }
            key_pair_xml(x, &k);
        });
    })
}

async fn delete_key_pair<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let req = pb::DeleteKeyPairRequest {
        key_name: p.required("KeyName")?.to_string(),
    };
    match ctx.svc.delete_key_pair(ctx.req(req)).await {
        // EC2 answers true for a key that does not exist.
        Err(s) if s.code() == tonic::Code::NotFound => {}
        r => {
            ok(r, "InvalidKeyPair.NotFound")?;
        }
    }
    returned(ctx, "DeleteKeyPair")
}

async fn tags<R: Replicator<ClusterState>>(ctx: &Ctx<R>, action: &str, p: &Params) -> Res {
    let resource_ids = p.list("ResourceId");
    if resource_ids.is_empty() {
        return Err(Ec2Error::missing("ResourceId.1"));
    }
    let tags = tags_in(p.tags("Tag")?);
    let nf = "InvalidID";
    if action == "CreateTags" {
        ok(
            ctx.svc
                .create_tags(ctx.req(pb::CreateTagsRequest { resource_ids, tags }))
                .await,
            nf,
        )?;
    } else {
        ok(
            ctx.svc
                .delete_tags(ctx.req(pb::DeleteTagsRequest { resource_ids, tags }))
                .await,
            nf,
        )?;
    }
    returned(ctx, action)
}

async fn describe_tags<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let mut req = pb::DescribeTagsRequest {
        max_results: page_size(p)?,
        next_token: p.get("NextToken").unwrap_or_default().to_string(),
        ..Default::default()
    };
    for (name, values) in p.filters()? {
        match name.as_str() {
            "resource-id" => req.resource_ids.extend(values),
            "resource-type" => req.resource_types.extend(values),
            "key" => req.keys.extend(values),
            "value" => req.values.extend(values),
            n => return Err(unknown_filter(n)),
        }
    }
    let r = ok(ctx.svc.describe_tags(ctx.req(req)).await, "InvalidID")?;
    done(ctx, "DescribeTags", |x| {
        x.items("tagSet", &r.tags, |x, t| {
            x.leaf("resourceId", &t.resource_id)
                .leaf("resourceType", &t.resource_type)
                .leaf("key", &t.key)
                .leaf("value", &t.value);
        });
        x.opt("nextToken", &r.next_token);
    })
}

async fn create_group<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let req = pb::CreatePlacementGroupRequest {
        name: p.required("GroupName")?.to_string(),
        strategy: p.get("Strategy").unwrap_or("cluster").to_string(),
        tags: tags_in(p.tag_specifications("placement-group")?),
    };
    let g = ok(
        ctx.svc.create_placement_group(ctx.req(req)).await,
        "InvalidPlacementGroup.Unknown",
    )?;
    done(ctx, "CreatePlacementGroup", |x| {
        x.wrap("placementGroup", |x| group_xml(x, &g));
    })
}

fn group_xml(x: &mut Xml, g: &pb::PlacementGroup) {
    x.leaf("groupName", &g.name)
        .leaf("groupId", &g.group_id)
        .leaf("strategy", &g.strategy)
        .leaf("state", "available")
        .tag_set(tag_pairs(&g.tags));
}

async fn describe_groups<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let r = ok(
        ctx.svc
            .describe_placement_groups(ctx.req(pb::DescribePlacementGroupsRequest {
                names: p.list("GroupName"),
            }))
            .await,
        "InvalidPlacementGroup.Unknown",
    )?;
    let ids = p.list("GroupId");
    done(ctx, "DescribePlacementGroups", |x| {
        let groups = r
            .placement_groups
            .iter()
            .filter(|g| ids.is_empty() || ids.contains(&g.group_id));
        x.items("placementGroupSet", groups, group_xml);
    })
}

/// One instance as DescribeInstances shows it (with its user data when
/// `user_data`).
async fn one_instance<R: Replicator<ClusterState>>(
    ctx: &Ctx<R>,
    id: &str,
    user_data: bool,
) -> Result<pb::Instance, Ec2Error> {
    let req = pb::DescribeInstancesRequest {
        instance_ids: vec![id.to_string()],
        include_user_data: user_data,
        ..Default::default()
    };
    let mut r = ok(
        ctx.svc.describe_instances(ctx.req(req)).await,
        "InvalidInstanceID.NotFound",
    )?;
    r.instances.pop().ok_or_else(|| {
        Ec2Error::new(
            400,
            "InvalidInstanceID.NotFound",
            format!("no instance {id}"),
        )
    })
}

fn checked_instance_id(p: &Params) -> Result<String, Ec2Error> {
    let id = p.required("InstanceId")?.to_string();
    if !well_formed(&id) {
        return Err(Ec2Error::malformed_instance(&id));
    }
    Ok(id)
}

async fn describe_attribute<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let id = checked_instance_id(p)?;
    let attr = p.required("Attribute")?.to_string();
    let i = one_instance(ctx, &id, attr == "userData").await?;
    let value = |x: &mut Xml, tag: &str, v: &str| {
        x.wrap(tag, |x| {
            x.leaf("value", v);
        });
    };
    done(ctx, "DescribeInstanceAttribute", |x| {
        x.leaf("instanceId", &i.instance_id);
        match attr.as_str() {
            "instanceType" => value(x, "instanceType", &i.instance_type),
            "instanceInitiatedShutdownBehavior" => value(
                x,
                "instanceInitiatedShutdownBehavior",
                &i.instance_initiated_shutdown_behavior,
            ),
            "rootDeviceName" => value(x, "rootDeviceName", "/dev/vda"),
            // EC2's answer: base64, and no value at all for none.
            "userData" => {
                x.wrap("userData", |x| {
                    if !i.user_data.is_empty() {
                        x.leaf("value", &BASE64.encode(&i.user_data));
                    }
                });
            }
            "groupSet" => {
                x.items("groupSet", &i.security_group_ids, |x, g| {
                    x.leaf("groupId", g);
                });
            }
            "blockDeviceMapping" => {
                x.items("blockDeviceMapping", &i.block_device_mappings, |x, a| {
                    x.leaf("deviceName", &a.device).wrap("ebs", |x| {
                        x.leaf("volumeId", &a.volume_id)
                            .leaf("status", &a.state)
                            .leaf("deleteOnTermination", &a.delete_on_termination.to_string());
                    });
                });
            }
            // The rest are answered as an error below.
            _ => {}
        }
    })
    .and_then(|xml| match attr.as_str() {
        "instanceType"
        | "instanceInitiatedShutdownBehavior"
        | "rootDeviceName"
        | "groupSet"
        | "blockDeviceMapping"
        | "userData" => Ok(xml),
        other => Err(Ec2Error::invalid(format!(
            "Attribute: {other:?} is not supported (instanceType, userData, \
             instanceInitiatedShutdownBehavior, rootDeviceName, groupSet, blockDeviceMapping)"
        ))),
    })
}

async fn modify_attribute<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let id = checked_instance_id(p)?;
    let req = modify_request(id, p)?;
    let asked_type = req.instance_type.clone();
    let r = ok(
        ctx.svc.modify_instance_attribute(ctx.req(req)).await,
        "InvalidInstanceID.NotFound",
    );
    // EC2 answers an unknown type here with InvalidInstanceAttributeValue.
    r.map_err(|e| match e.code.as_str() {
        "InvalidInstanceType" => Ec2Error::new(
            400,
            "InvalidInstanceAttributeValue",
            format!(
                "Value ({asked_type}) for parameter instanceType is invalid: {}",
                e.message
            ),
        ),
        _ => e,
    })?;
    returned(ctx, "ModifyInstanceAttribute")
}

/// The gRPC request of a ModifyInstanceAttribute: each attribute as
/// `<Attribute>.Value` (groups as `GroupId.N`), or one as
/// `Attribute=<name>&Value=<value>`. User data is base64 either way.
fn modify_request(id: String, p: &Params) -> Result<pb::ModifyInstanceAttributeRequest, Ec2Error> {
    let named = p.get("Attribute");
    let supported = [
        "instanceInitiatedShutdownBehavior",
        "instanceType",
        "userData",
    ];
    if let Some(a) = named.filter(|a| !supported.contains(a)) {
        return Err(Ec2Error::invalid(format!(
            "Attribute: {a:?} cannot be modified here (instanceType, userData, \
             instanceInitiatedShutdownBehavior; groups as GroupId.N)"
        )));
    }
    let value = |dotted: &str, attr: &str| {
        p.get(dotted)
            .or(p.get("Value").filter(|_| named == Some(attr)))
    };
    if let Some(k) = ["SourceDestCheck.Value", "DisableApiTermination.Value"]
        .iter()
        .find(|k| p.get(k).is_some())
    {
        return Err(Ec2Error::invalid(format!(
            "{k}: cannot be modified here (InstanceType, UserData, \
             InstanceInitiatedShutdownBehavior and GroupId.N can)"
        )));
    }
    let user_data = value("UserData.Value", "userData")
        .map(|u| {
            BASE64
                .decode(u.trim())
                .map_err(|_| Ec2Error::invalid("UserData: not valid base64"))
        })
        .transpose()?;
    let req = pb::ModifyInstanceAttributeRequest {
        instance_id: id,
        instance_initiated_shutdown_behavior: value(
            "InstanceInitiatedShutdownBehavior.Value",
            "instanceInitiatedShutdownBehavior",
        )
        .unwrap_or_default()
        .to_string(),
        security_group_ids: p.list("GroupId"),
        instance_type: value("InstanceType.Value", "instanceType")
            .unwrap_or_default()
            .to_string(),
        user_data,
    };
    if req.instance_initiated_shutdown_behavior.is_empty()
        && req.security_group_ids.is_empty()
        && req.instance_type.is_empty()
        && req.user_data.is_none()
    {
        return Err(Ec2Error::missing(
            "InstanceType.Value, UserData.Value, InstanceInitiatedShutdownBehavior.Value \
             or GroupId.1",
        ));
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_filters_map_onto_the_grpc_request() {
        let p = Params::parse(&[b"InstanceId.1=i-00ff&MaxResults=5&Filter.1.Name=instance-state-name\
              &Filter.1.Value.1=running&Filter.2.Name=tag:Name&Filter.2.Value.1=a&Filter.2.Value.2=b\
              &Filter.3.Name=tag-key&Filter.3.Value.1=env&Filter.4.Name=instance-type&Filter.4.Value.1=f1.nano"]);
        let r = describe_request(&p).unwrap();
        assert_eq!(r.instance_ids, ["i-00ff"]);
        assert_eq!(r.max_results, 5);
        assert_eq!(
            r.states,
            [
                pb::InstanceState::Running as i32,
                pb::InstanceState::Rebooting as i32
            ]
        );
        assert_eq!(r.tags.len(), 3);
        assert_eq!(r.instance_types, ["f1.nano"]);
        let bad = |q: &str| describe_request(&Params::parse(&[q.as_bytes()])).unwrap_err();
        assert_eq!(
            bad("InstanceId.1=vol-1").code,
            "InvalidInstanceID.Malformed"
        );
        assert_eq!(
            bad("Filter.1.Name=color&Filter.1.Value.1=red").code,
            "InvalidParameterValue"
        );
        assert!(bad("MaxResults=2").message.contains("between 5 and 1000"));
        assert!(
            bad("Filter.1.Name=instance-state-name&Filter.1.Value.1=asleep")
                .message
                .contains("asleep")
        );
    }

    #[test]
    fn modify_takes_each_attribute_in_both_forms() {
        let req = |q: &str| modify_request("i-1".into(), &Params::parse(&[q.as_bytes()]));
        // boto3: UserData={"Value": b"hi"} is sent base64-encoded.
        let r = req("InstanceType.Value=f1.micro&UserData.Value=aGk%3D").unwrap();
        assert_eq!(r.instance_type, "f1.micro");
        assert_eq!(r.user_data.as_deref(), Some(&b"hi"[..]));
        assert!(r.instance_initiated_shutdown_behavior.is_empty());
        let r = req("Attribute=instanceType&Value=f1.small").unwrap();
        assert_eq!((r.instance_type.as_str(), r.user_data), ("f1.small", None));
        let r = req("Attribute=userData&Value=aGk%3D").unwrap();
        assert_eq!(r.user_data.as_deref(), Some(&b"hi"[..]));
        assert!(r.instance_type.is_empty());
        // Present and empty: removed.
        let r = req("UserData.Value=").unwrap();
        assert_eq!(r.user_data.as_deref(), Some(&b""[..]));
        let r = req("Attribute=instanceInitiatedShutdownBehavior&Value=terminate").unwrap();
        assert_eq!(r.instance_initiated_shutdown_behavior, "terminate");
        let r = req("GroupId.1=sg-1&GroupId.2=sg-2").unwrap();
        assert_eq!(r.security_group_ids, ["sg-1", "sg-2"]);
        // A Value belongs to the named attribute only.
        let r = req("Attribute=instanceType&Value=f1.micro&UserData.Value=aGk%3D").unwrap();
        assert_eq!(r.instance_type, "f1.micro");
        assert_eq!(r.user_data.as_deref(), Some(&b"hi"[..]));
        let bad = |q: &str| req(q).unwrap_err();
        assert_eq!(bad("UserData.Value=%%%").code, "InvalidParameterValue");
        assert_eq!(
            bad("Attribute=kernel&Value=x").code,
            "InvalidParameterValue"
        );
        assert_eq!(
            bad("SourceDestCheck.Value=false").code,
            "InvalidParameterValue"
        );
        assert_eq!(bad("").code, "MissingParameter");
    }

    #[test]
    fn states_have_ec2_codes() {
        use pb::InstanceState as S;
        assert_eq!(state_of(S::Pending as i32), (0, "pending"));
        assert_eq!(state_of(S::Running as i32), (16, "running"));
        assert_eq!(state_of(S::ShuttingDown as i32), (32, "shutting-down"));
        assert_eq!(state_of(S::Terminated as i32), (48, "terminated"));
        assert_eq!(state_of(S::Stopping as i32), (64, "stopping"));
        assert_eq!(state_of(S::Stopped as i32), (80, "stopped"));
    }
}
