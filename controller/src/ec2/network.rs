//! EC2's VPC, subnet, security group and network interface actions, and
//! its volume actions, over the `ferro.compute.v1` calls that do the same.

use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::compute_server::Compute;
use ferro_raft::Replicator;

use super::actions::{done, ok, page_size, returned, tag_pairs, tags_in, unknown_filter, Res};
use super::query::{Filter, Params};
use super::sigv4::iso8601_ms;
use super::xml::Xml;
use super::{Ctx, Ec2Error};
use crate::state::ClusterState;

/// The actions of this module.
pub const ACTIONS: &[&str] = &[
    "CreateVpc",
    "DescribeVpcs",
    "DeleteVpc",
    "CreateSubnet",
    "DescribeSubnets",
    "DeleteSubnet",
    "CreateSecurityGroup",
    "DescribeSecurityGroups",
    "DeleteSecurityGroup",
    "AuthorizeSecurityGroupIngress",
    "AuthorizeSecurityGroupEgress",
    "RevokeSecurityGroupIngress",
    "RevokeSecurityGroupEgress",
    "DescribeNetworkInterfaces",
    "CreateVolume",
    "DescribeVolumes",
    "DeleteVolume",
    "AttachVolume",
    "DetachVolume",
];

/// Answer `action` if it is one of [`ACTIONS`].
pub async fn dispatch<R: Replicator<ClusterState>>(
    ctx: &Ctx<R>,
    action: &str,
    p: &Params,
) -> Option<Res> {
    Some(match action {
        "CreateVpc" => create_vpc(ctx, p).await,
        "DescribeVpcs" => describe_vpcs(ctx, p).await,
        "DeleteVpc" | "DeleteSubnet" | "DeleteSecurityGroup" | "DeleteVolume" => {
            delete(ctx, action, p).await
        }
        "CreateSubnet" => create_subnet(ctx, p).await,
        "DescribeSubnets" => describe_subnets(ctx, p).await,
        "CreateSecurityGroup" => create_group(ctx, p).await,
        "DescribeSecurityGroups" => describe_groups(ctx, p).await,
        "AuthorizeSecurityGroupIngress" => rules(ctx, action, p, true, false).await,
        "AuthorizeSecurityGroupEgress" => rules(ctx, action, p, true, true).await,
        "RevokeSecurityGroupIngress" => rules(ctx, action, p, false, false).await,
        "RevokeSecurityGroupEgress" => rules(ctx, action, p, false, true).await,
        "DescribeNetworkInterfaces" => describe_interfaces(ctx, p).await,
        "CreateVolume" => create_volume(ctx, p).await,
        "DescribeVolumes" => describe_volumes(ctx, p).await,
        "AttachVolume" | "DetachVolume" => attachment(ctx, action, p).await,
        _ => return None,
    })
}

/// DeleteVpc, DeleteSubnet, DeleteSecurityGroup, DeleteVolume.
async fn delete<R: Replicator<ClusterState>>(ctx: &Ctx<R>, action: &str, p: &Params) -> Res {
    let r = match action {
        "DeleteVpc" => {
            let vpc_id = p.required("VpcId")?.to_string();
            ok(
                ctx.svc
                    .delete_vpc(ctx.req(pb::DeleteVpcRequest { vpc_id }))
                    .await,
                "InvalidVpcID.NotFound",
            )
            .map(drop)
        }
        "DeleteSubnet" => {
            let subnet_id = p.required("SubnetId")?.to_string();
            ok(
                ctx.svc
                    .delete_subnet(ctx.req(pb::DeleteSubnetRequest { subnet_id }))
                    .await,
                "InvalidSubnetID.NotFound",
            )
            .map(drop)
        }
        "DeleteSecurityGroup" => {
            let group_id = p.required("GroupId")?.to_string();
            ok(
                ctx.svc
                    .delete_security_group(ctx.req(pb::DeleteSecurityGroupRequest { group_id }))
                    .await,
                "InvalidGroup.NotFound",
            )
            .map(drop)
        }
        _ => {
            let volume_id = p.required("VolumeId")?.to_string();
            ok(
                ctx.svc
                    .delete_volume(ctx.req(pb::DeleteVolumeRequest { volume_id }))
                    .await,
                "InvalidVolume.NotFound",
            )
            .map(drop)
        }
    };
    r.and_then(|()| returned(ctx, action))
}

/// Applies `p`'s filters to `req`: `tag:KEY` and `tag-key` to its tag
/// filters (`tags`), every other name to the list `field` names for it
/// (none: the filter is unknown).
fn apply_filters<T>(
    p: &Params,
    req: &mut T,
    tags: impl Fn(&mut T) -> &mut Vec<pb::TagFilter>,
    field: impl for<'a> Fn(&'a mut T, &str) -> Option<&'a mut Vec<String>>,
) -> Result<(), Ec2Error> {
    for f in p.filters()? {
        if tag_filter(&f, tags(req))? {
            continue;
        }
        match field(req, &f.0) {
            Some(list) => list.extend(f.1),
            None => return Err(unknown_filter(&f.0)),
        }
    }
    Ok(())
}

/// `tag:KEY` and `tag-key` filters as the gRPC API's tag filters; false
/// for another filter.
fn tag_filter(f: &Filter, out: &mut Vec<pb::TagFilter>) -> Result<bool, Ec2Error> {
    if f.0 == "tag-key" {
        out.extend(f.1.iter().map(|key| pb::TagFilter {
            key: key.clone(),
            value: String::new(),
        }));
        return Ok(true);
    }
    let Some(key) = f.0.strip_prefix("tag:") else {
        return Ok(false);
    };
    if f.1.is_empty() || f.1.iter().any(String::is_empty) {
        return Err(Ec2Error::invalid(format!(
            "filter {}: give its values",
            f.0
        )));
    }
    out.extend(f.1.iter().map(|value| pb::TagFilter {
        key: key.to_string(),
        value: value.clone(),
    }));
    Ok(true)
}

async fn create_vpc<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let req = pb::CreateVpcRequest {
        cidr_block: p.required("CidrBlock")?.to_string(),
        tags: tags_in(p.tag_specifications("vpc")?),
    };
    let v = ok(
        ctx.svc.create_vpc(ctx.req(req)).await,
        "InvalidVpcID.NotFound",
    )?;
    done(ctx, "CreateVpc", |x| {
        x.wrap("vpc", |x| vpc_xml(x, &v));
    })
}

fn vpc_xml(x: &mut Xml, v: &pb::Vpc) {
    x.leaf("vpcId", &v.vpc_id)
        .leaf("state", "available")
        .leaf("cidrBlock", &v.cidr_block)
        .leaf("ownerId", "self")
        .leaf("instanceTenancy", "default")
        .leaf("isDefault", &v.is_default.to_string())
        .tag_set(tag_pairs(&v.tags));
}

async fn describe_vpcs<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let mut req = pb::DescribeVpcsRequest {
        vpc_ids: p.list("VpcId"),
        max_results: page_size(p)?,
        next_token: p.get("NextToken").unwrap_or_default().to_string(),
        ..Default::default()
    };
    apply_filters(
        p,
        &mut req,
        |r| &mut r.tags,
        |r, name| {
            Some(match name {
                "vpc-id" => &mut r.vpc_ids,
                _ => return None,
            })
        },
    )?;
    let r = ok(
        ctx.svc.describe_vpcs(ctx.req(req)).await,
        "InvalidVpcID.NotFound",
    )?;
    done(ctx, "DescribeVpcs", |x| {
        x.items("vpcSet", &r.vpcs, vpc_xml);
        x.opt("nextToken", &r.next_token);
    })
}

fn subnet_xml(x: &mut Xml, s: &pb::Subnet) {
    x.leaf("subnetId", &s.subnet_id)
        .leaf("state", "available")
        .leaf("vpcId", &s.vpc_id)
        .leaf("cidrBlock", &s.cidr_block)
        .leaf(
            "availableIpAddressCount",
            &s.available_addresses.to_string(),
        )
        .leaf("availabilityZone", &s.availability_zone)
        .leaf("defaultForAz", &s.is_default.to_string())
        .leaf("mapPublicIpOnLaunch", "false")
        .tag_set(tag_pairs(&s.tags));
}

async fn create_subnet<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let req = pb::CreateSubnetRequest {
        vpc_id: p.required("VpcId")?.to_string(),
        cidr_block: p.required("CidrBlock")?.to_string(),
        availability_zone: p.get("AvailabilityZone").unwrap_or_default().to_string(),
        tags: tags_in(p.tag_specifications("subnet")?),
    };
    let s = ok(
        ctx.svc.create_subnet(ctx.req(req)).await,
        "InvalidVpcID.NotFound",
    )?;
    done(ctx, "CreateSubnet", |x| {
        x.wrap("subnet", |x| subnet_xml(x, &s));
    })
}

async fn describe_subnets<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let mut req = pb::DescribeSubnetsRequest {
        subnet_ids: p.list("SubnetId"),
        max_results: page_size(p)?,
        next_token: p.get("NextToken").unwrap_or_default().to_string(),
        ..Default::default()
    };
    apply_filters(
        p,
        &mut req,
        |r| &mut r.tags,
        |r, name| {
            Some(match name {
                "subnet-id" => &mut r.subnet_ids,
                "vpc-id" => &mut r.vpc_ids,
                "availability-zone" => &mut r.availability_zones,
                _ => return None,
            })
        },
    )?;
    let r = ok(
        ctx.svc.describe_subnets(ctx.req(req)).await,
        "InvalidSubnetID.NotFound",
    )?;
    done(ctx, "DescribeSubnets", |x| {
        x.items("subnetSet", &r.subnets, subnet_xml);
        x.opt("nextToken", &r.next_token);
    })
}

fn rule_xml(x: &mut Xml, r: &pb::SecurityGroupRule) {
    let proto = match r.protocol.as_str() {
        "all" => "-1",
        p => p,
    };
    x.leaf("ipProtocol", proto);
    if matches!(proto, "tcp" | "udp") {
        x.leaf("fromPort", &r.from_port.to_string())
            .leaf("toPort", &r.to_port.to_string());
    }
    let cidrs: Vec<&str> = [r.cidr.as_str()]
        .into_iter()
        .filter(|c| !c.is_empty())
        .collect();
    let groups: Vec<&str> = [r.group_id.as_str()]
        .into_iter()
        .filter(|g| !g.is_empty())
        .collect();
    x.items("groups", groups, |x, g| {
        x.leaf("groupId", g);
    })
    .items("ipRanges", cidrs, |x, c| {
        x.leaf("cidrIp", c);
    });
}

fn group_xml(x: &mut Xml, g: &pb::SecurityGroup) {
    x.leaf("ownerId", "self")
        .leaf("groupId", &g.group_id)
        .leaf("groupName", &g.group_name)
        .leaf("groupDescription", &g.description)
        .leaf("vpcId", &g.vpc_id)
        .items("ipPermissions", &g.ingress, rule_xml)
        .items("ipPermissionsEgress", &g.egress, rule_xml)
        .tag_set(tag_pairs(&g.tags));
}

async fn create_group<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let req = pb::CreateSecurityGroupRequest {
        vpc_id: p.required("VpcId")?.to_string(),
        group_name: p.required("GroupName")?.to_string(),
        description: p.required("GroupDescription")?.to_string(),
        tags: tags_in(p.tag_specifications("security-group")?),
    };
    let g = ok(
        ctx.svc.create_security_group(ctx.req(req)).await,
        "InvalidVpcID.NotFound",
    )?;
    done(ctx, "CreateSecurityGroup", |x| {
        x.leaf("return", "true").leaf("groupId", &g.group_id);
    })
}

async fn describe_groups<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let mut req = pb::DescribeSecurityGroupsRequest {
        group_ids: p.list("GroupId"),
        group_names: p.list("GroupName"),
        max_results: page_size(p)?,
        next_token: p.get("NextToken").unwrap_or_default().to_string(),
        ..Default::default()
    };
    apply_filters(
        p,
        &mut req,
        |r| &mut r.tags,
        |r, name| {
            Some(match name {
                "group-id" => &mut r.group_ids,
                "group-name" => &mut r.group_names,
                "vpc-id" => &mut r.vpc_ids,
                _ => return None,
            })
        },
    )?;
    let r = ok(
        ctx.svc.describe_security_groups(ctx.req(req)).await,
        "InvalidGroup.NotFound",
    )?;
    done(ctx, "DescribeSecurityGroups", |x| {
        x.items("securityGroupInfo", &r.security_groups, group_xml);
        x.opt("nextToken", &r.next_token);
    })
}

/// `IpPermissions.N` as rules: one per CIDR range and per group pair.
fn permissions(p: &Params) -> Result<Vec<pb::SecurityGroupRule>, Ec2Error> {
    let mut out = Vec::new();
    let mut n = 1;
    while let Some(proto) = p.get(&format!("IpPermissions.{n}.IpProtocol")) {
        let port = |k: &str| -> Result<u32, Ec2Error> {
            match p.get(&format!("IpPermissions.{n}.{k}")) {
                None => Ok(0),
                Some(v) => v
                    .parse::<i64>()
                    .ok()
                    .map(|v| v.max(0) as u32)
                    .ok_or_else(|| {
                        Ec2Error::invalid(format!("IpPermissions.{n}.{k}: {v:?} is not a port"))
                    }),
            }
        };
        let (from, to) = (port("FromPort")?, port("ToPort")?);
        let base = pb::SecurityGroupRule {
            protocol: proto.to_string(),
            from_port: from,
            to_port: to,
            ..Default::default()
        };
        let before = out.len();
        let mut m = 1;
        while let Some(c) = p.get(&format!("IpPermissions.{n}.IpRanges.{m}.CidrIp")) {
            out.push(pb::SecurityGroupRule {
                cidr: c.to_string(),
                ..base.clone()
            });
            m += 1;
        }
        let mut m = 1;
        while let Some(g) = p.get(&format!("IpPermissions.{n}.Groups.{m}.GroupId")) {
            out.push(pb::SecurityGroupRule {
                group_id: g.to_string(),
                ..base.clone()
            });
            m += 1;
        }
        if out.len() == before {
            return Err(Ec2Error::invalid(format!(
                "IpPermissions.{n}: give IpRanges or Groups (UserIdGroupPairs)"
            )));
        }
        n += 1;
    }
    if out.is_empty() {
        return Err(Ec2Error::missing("IpPermissions.1.IpProtocol"));
    }
    Ok(out)
}

async fn rules<R: Replicator<ClusterState>>(
    ctx: &Ctx<R>,
    action: &str,
    p: &Params,
    add: bool,
    egress: bool,
) -> Res {
    let req = pb::SecurityGroupRulesRequest {
        group_id: p.required("GroupId")?.to_string(),
        egress,
        rules: permissions(p)?,
    };
    let r = if add {
        ctx.svc.authorize_security_group_rules(ctx.req(req)).await
    } else {
        ctx.svc.revoke_security_group_rules(ctx.req(req)).await
    };
    ok(r, "InvalidGroup.NotFound")?;
    returned(ctx, action)
}

async fn describe_interfaces<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let mut req = pb::DescribeNetworkInterfacesRequest {
        network_interface_ids: p.list("NetworkInterfaceId"),
        max_results: page_size(p)?,
        next_token: p.get("NextToken").unwrap_or_default().to_string(),
        ..Default::default()
    };
    apply_filters(
        p,
        &mut req,
        |r| &mut r.tags,
        |r, name| {
            Some(match name {
                "network-interface-id" => &mut r.network_interface_ids,
                "vpc-id" => &mut r.vpc_ids,
                "subnet-id" => &mut r.subnet_ids,
                "availability-zone" => &mut r.availability_zones,
                "private-ip-address" | "addresses.private-ip-address" => {
                    &mut r.private_ip_addresses
                }
                "group-id" => &mut r.security_group_ids,
                "group-name" => &mut r.security_group_names,
                "attachment.instance-id" => &mut r.instance_ids,
                "mac-address" => &mut r.mac_addresses,
                _ => return None,
            })
        },
    )?;
    let r = ok(
        ctx.svc.describe_network_interfaces(ctx.req(req)).await,
        "InvalidNetworkInterfaceID.NotFound",
    )?;
    done(ctx, "DescribeNetworkInterfaces", |x| {
        x.items("networkInterfaceSet", &r.network_interfaces, |x, n| {
            x.leaf("networkInterfaceId", &n.network_interface_id)
                .leaf("subnetId", &n.subnet_id)
                .leaf("vpcId", &n.vpc_id)
                .leaf("availabilityZone", &n.availability_zone)
                .leaf("ownerId", "self")
                .leaf("status", &n.status)
                .leaf("macAddress", &n.mac_address)
                .leaf("privateIpAddress", &n.private_ip_address)
                .leaf("interfaceType", "interface")
                .items("groupSet", &n.groups, |x, g| {
                    x.leaf("groupId", &g.group_id)
                        .leaf("groupName", &g.group_name);
                })
                .wrap("attachment", |x| {
                    x.leaf("instanceId", &n.instance_id)
                        .leaf("deviceIndex", &n.device_index.to_string())
                        .leaf("status", "attached");
                })
                .tag_set(tag_pairs(&n.tags));
        });
        x.opt("nextToken", &r.next_token);
    })
}

fn attachment_xml(x: &mut Xml, a: &pb::VolumeAttachment) {
    x.leaf("volumeId", &a.volume_id)
        .leaf("instanceId", &a.instance_id)
        .leaf("device", &a.device)
        .leaf("status", &a.state)
        .leaf("deleteOnTermination", &a.delete_on_termination.to_string());
}

fn volume_xml(x: &mut Xml, v: &pb::Volume) {
    x.leaf("volumeId", &v.volume_id)
        .leaf("size", &v.size_gib.to_string())
        .leaf("snapshotId", "")
        .leaf("availabilityZone", &v.availability_zone)
        .leaf("status", &v.state)
        .leaf("createTime", &iso8601_ms(v.created_at_ms))
        .leaf("volumeType", &v.volume_type)
        .leaf("encrypted", "false")
        .leaf("multiAttachEnabled", "false")
        .items("attachmentSet", &v.attachments, attachment_xml)
        .tag_set(tag_pairs(&v.tags));
}

async fn create_volume<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    if p.get("SnapshotId").is_some_and(|s| !s.is_empty()) {
        return Err(Ec2Error::invalid("SnapshotId: snapshots are not built yet"));
    }
    let req = pb::CreateVolumeRequest {
        size_gib: p.u64("Size")?.ok_or_else(|| Ec2Error::missing("Size"))?,
        availability_zone: p.required("AvailabilityZone")?.to_string(),
        volume_type: p.get("VolumeType").unwrap_or_default().to_string(),
        tags: tags_in(p.tag_specifications("volume")?),
        client_token: p.get("ClientToken").unwrap_or_default().to_string(),
    };
    let v = ok(
        ctx.svc.create_volume(ctx.req(req)).await,
        "InvalidVolume.NotFound",
    )?;
    done(ctx, "CreateVolume", |x| volume_xml(x, &v))
}

async fn describe_volumes<R: Replicator<ClusterState>>(ctx: &Ctx<R>, p: &Params) -> Res {
    let mut req = pb::DescribeVolumesRequest {
        volume_ids: p.list("VolumeId"),
        max_results: page_size(p)?,
        next_token: p.get("NextToken").unwrap_or_default().to_string(),
        ..Default::default()
    };
    apply_filters(
        p,
        &mut req,
        |r| &mut r.tags,
        |r, name| {
            Some(match name {
                "volume-id" => &mut r.volume_ids,
                "status" => &mut r.states,
                "availability-zone" => &mut r.availability_zones,
                "attachment.instance-id" => &mut r.attachment_instance_ids,
                _ => return None,
            })
        },
    )?;
    let r = ok(
        ctx.svc.describe_volumes(ctx.req(req)).await,
        "InvalidVolume.NotFound",
    )?;
    done(ctx, "DescribeVolumes", |x| {
        x.items("volumeSet", &r.volumes, volume_xml);
        x.opt("nextToken", &r.next_token);
    })
}

async fn attachment<R: Replicator<ClusterState>>(ctx: &Ctx<R>, action: &str, p: &Params) -> Res {
    let volume_id = p.required("VolumeId")?.to_string();
    let r = if action == "AttachVolume" {
        let req = pb::AttachVolumeRequest {
            volume_id,
            instance_id: p.required("InstanceId")?.to_string(),
            device: p.required("Device")?.to_string(),
            delete_on_termination: false,
        };
        ctx.svc.attach_volume(ctx.req(req)).await
    } else {
        let req = pb::DetachVolumeRequest {
            volume_id,
            instance_id: p.get("InstanceId").unwrap_or_default().to_string(),
            force: p.bool("Force")?.unwrap_or(false),
        };
        ctx.svc.detach_volume(ctx.req(req)).await
    };
    let a = ok(r, "InvalidVolume.NotFound")?
        .attachment
        .unwrap_or_default();
    done(ctx, action, |x| {
        attachment_xml(x, &a);
        x.leaf("attachTime", &iso8601_ms(crate::now_ms()));
    })
}
