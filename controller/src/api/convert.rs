//! Conversions between the model and `ferro.compute.v1` messages.

use ferro_proto::compute::v1 as pb;

use crate::model::*;
use crate::state::{
    BlockDeviceSpec, HostReport, InterfaceFilter, Listing, NetworkInterface, RunSpec, StateChange,
    StateError, VolumeSpec, IN_USE,
};

/// Tags from the wire; a duplicate key is INVALID_ARGUMENT.
pub fn tags_in(tags: Vec<pb::Tag>) -> Result<Tags, StateError> {
    let mut out = Tags::new();
    for t in tags {
        if out.insert(t.key.clone(), t.value).is_some() {
            return Err(StateError::InvalidArgument(format!(
                "tags.key: {:?} is given twice",
                t.key
            )));
        }
    }
    Ok(out)
}

/// Tags to the wire.
pub fn tags_out(tags: &Tags) -> Vec<pb::Tag> {
    tags.iter()
        .map(|(k, v)| pb::Tag {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

/// Tag filters off the wire: (key, value), an empty value matching any.
pub fn tag_filters_in(tags: Vec<pb::TagFilter>) -> Vec<(String, String)> {
    tags.into_iter().map(|t| (t.key, t.value)).collect()
}

/// The paging and tag part of a Describe request.
pub fn listing_in(
    ids: Vec<String>,
    tags: Vec<pb::TagFilter>,
    max_results: u32,
    next_token: String,
) -> Listing {
    Listing {
        ids,
        tags: tag_filters_in(tags),
        max_results,
        next_token,
    }
}

/// The interface filters of a request (DescribeInstances and
/// DescribeNetworkInterfaces name them alike).
macro_rules! net_filter_in {
    ($r:ident) => {
        $crate::state::NetFilter {
            vpcs: $r.vpc_ids,
            subnets: $r.subnet_ids,
            private_ips: $r.private_ip_addresses,
            group_ids: $r.security_group_ids,
            group_names: $r.security_group_names,
        }
    };
}
pub(crate) use net_filter_in;

/// A DescribeNetworkInterfaces request.
pub fn interface_filter_in(r: pb::DescribeNetworkInterfacesRequest) -> InterfaceFilter {
    InterfaceFilter {
        ids: r.network_interface_ids,
        instances: r.instance_ids,
        azs: r.availability_zones,
        macs: r.mac_addresses,
        net: net_filter_in!(r),
        tags: tag_filters_in(r.tags),
        max_results: r.max_results,
        next_token: r.next_token,
    }
}

/// A network interface to the wire.
pub fn interface_out(x: &NetworkInterface) -> pb::NetworkInterface {
    pb::NetworkInterface {
        network_interface_id: x.id.clone(),
        instance_id: x.instance_id.clone(),
        device_index: 0,
        subnet_id: x.net.subnet_id.clone(),
        vpc_id: x.net.vpc_id.clone(),
        availability_zone: x.az.clone(),
        private_ip_address: x.net.private_ip.clone(),
        mac_address: x.net.mac.clone(),
        groups: x
            .groups
            .iter()
            .map(|(id, name)| pb::GroupIdentifier {
                group_id: id.clone(),
                group_name: name.clone(),
            })
            .collect(),
        status: IN_USE.into(),
        host_id: x.host_id.clone(),
        tags: tags_out(&x.tags),
    }
}

/// A RunInstances request.
pub fn run_spec(r: pb::RunInstancesRequest) -> Result<RunSpec, StateError> {
    Ok(RunSpec {
        count: r.count,
        instance_type: r.instance_type,
        image: r.image_id,
        az: r.availability_zone,
        key_name: r.key_name,
        user_data: r.user_data,
        placement_group: r.placement_group,
        tags: tags_in(r.tags)?,
        client_token: r.client_token,
        spread: r.strategy == pb::PlacementStrategy::Spread as i32,
        subnet_id: r.subnet_id,
        private_ip: r.private_ip_address,
        security_group_ids: r.security_group_ids,
        block_devices: r
            .block_device_mappings
            .into_iter()
            .map(|m| BlockDeviceSpec {
                device: m.device_name,
                size_gib: m.volume_size_gib,
                volume_type: m.volume_type,
                delete_on_termination: m.delete_on_termination.unwrap_or(true),
            })
            .collect(),
        root_volume: r.root_volume.map(|m| BlockDeviceSpec {
            device: String::new(),
            size_gib: m.volume_size_gib,
            volume_type: m.volume_type,
            delete_on_termination: m.delete_on_termination.unwrap_or(true),
        }),
        shutdown_behavior: ShutdownBehavior::parse(&r.instance_initiated_shutdown_behavior)
            .ok_or_else(|| {
                StateError::InvalidArgument(format!(
                    "instance_initiated_shutdown_behavior: {:?} is not stop or terminate",
                    r.instance_initiated_shutdown_behavior
                ))
            })?,
    })
}

pub use crate::lifecycle::{state_in, state_out};

fn desired_out(d: DesiredState) -> pb::DesiredState {
    match d {
        DesiredState::Running => pb::DesiredState::Running,
        DesiredState::Stopped => pb::DesiredState::Stopped,
        DesiredState::Terminated => pb::DesiredState::Terminated,
    }
}

fn observed_out(o: ObservedState) -> pb::ObservedState {
    use pb::ObservedState as P;
    match o {
        ObservedState::Absent => P::Absent,
        ObservedState::Created => P::Created,
        ObservedState::Starting => P::Starting,
        ObservedState::Running => P::Running,
        ObservedState::Stopping => P::Stopping,
        ObservedState::Stopped => P::Stopped,
        ObservedState::Rebooting => P::Rebooting,
        ObservedState::Failed => P::Failed,
        ObservedState::Deleting => P::Deleting,
        ObservedState::Unknown => P::Unknown,
    }
}

/// An instance to the wire (user data only as its size).
pub fn instance_out(i: &Instance) -> pb::Instance {
    pb::Instance {
        instance_id: i.id.clone(),
        instance_type: i.instance_type.clone(),
        image_id: i.image_id.clone(),
        availability_zone: i.az.clone(),
        host_id: i.host_id.clone(),
        key_name: i.key_name.clone(),
        placement_group: i.placement_group.clone(),
        state: state_out(i.public_state()) as i32,
        desired_state: desired_out(i.desired) as i32,
        observed_state: observed_out(i.observed) as i32,
        state_reason: i.observed_reason.clone(),
        vcpus: i.vcpus,
        memory_mib: i.memory_mib,
        launch_time_ms: i.launched_at_ms,
        tags: tags_out(&i.tags),
        client_token: i.client_token.clone(),
        reservation_id: i.reservation_id.clone(),
        user_data_bytes: i.user_data.len() as u32,
        // Only when asked (DescribeInstancesRequest.include_user_data).
        user_data: Vec::new(),
        instance_initiated_shutdown_behavior: i.shutdown_behavior.as_str().into(),
        subnet_id: i
            .network
            .as_ref()
            .map(|n| n.subnet_id.clone())
            .unwrap_or_default(),
        vpc_id: i
            .network
            .as_ref()
            .map(|n| n.vpc_id.clone())
            .unwrap_or_default(),
        private_ip_address: i
            .network
            .as_ref()
            .map(|n| n.private_ip.clone())
            .unwrap_or_default(),
        mac_address: i
            .network
            .as_ref()
            .map(|n| n.mac.clone())
            .unwrap_or_default(),
        security_group_ids: i
            .network
            .as_ref()
            .map(|n| n.security_groups.clone())
            .unwrap_or_default(),
        block_device_mappings: Vec::new(),
        root_device_type: if i.root_volume.is_some() {
            "ebs"
        } else {
            "instance-store"
        }
        .into(),
        root_volume_id: i.root_volume.clone().unwrap_or_default(),
    }
}

/// A volume's attachment to the wire.
pub fn attachment_out(volume_id: &str, a: &VolumeAttachment) -> pb::VolumeAttachment {
    pb::VolumeAttachment {
        volume_id: volume_id.into(),
        instance_id: a.instance_id.clone(),
        device: a.device.clone(),
        state: a.state.as_str().into(),
        delete_on_termination: a.delete_on_termination,
    }
}

/// A volume to the wire.
pub fn volume_out(v: &Volume) -> pb::Volume {
    pb::Volume {
        volume_id: v.id.clone(),
        size_gib: v.size_gib,
        availability_zone: v.az.clone(),
        volume_type: v.volume_type.as_str().into(),
        state: v.state.as_str().into(),
        attachments: v
            .attachment
            .iter()
            .map(|a| attachment_out(&v.id, a))
            .collect(),
        tags: tags_out(&v.tags),
        created_at_ms: v.created_at_ms,
        client_token: v.client_token.clone(),
        replica_host_ids: v.replicas.clone(),
        epoch: v.epoch,
    }
}

/// A CreateVolume request.
pub fn volume_spec(r: pb::CreateVolumeRequest) -> Result<VolumeSpec, StateError> {
    Ok(VolumeSpec {
        size_gib: r.size_gib,
        az: r.availability_zone,
        volume_type: r.volume_type,
        tags: tags_in(r.tags)?,
        client_token: r.client_token,
    })
}

/// State changes to the wire.
pub fn changes_out(c: Vec<StateChange>) -> pb::InstanceStateChangesResponse {
    pb::InstanceStateChangesResponse {
        changes: c
            .into_iter()
            .map(|c| pb::InstanceStateChange {
                instance_id: c.id,
                previous_state: state_out(c.previous) as i32,
                current_state: state_out(c.current) as i32,
            })
            .collect(),
    }
}

/// A host to the wire; `last_seen_ms` from the leader's liveness when newer.
pub fn host_out(h: &Host, last_seen_ms: Option<u64>) -> pb::Host {
    pb::Host {
        host_id: h.id.clone(),
        availability_zone: h.az.clone(),
        address: h.address.clone(),
        health: match h.health {
            HostHealth::Healthy => pb::HostHealth::Healthy,
            HostHealth::Unreachable => pb::HostHealth::Unreachable,
        } as i32,
        last_seen_ms: last_seen_ms.unwrap_or(0).max(h.last_seen_ms),
        vcpus_total: h.vcpus_total,
        memory_total_mib: h.memory_total_mib,
        vcpus_allocated: h.vcpus_allocated,
        memory_allocated_mib: h.memory_allocated_mib,
        instances: h.instances,
        cpu_model: h.cpu_model.clone(),
        agent_version: h.agent_version.clone(),
        kvm_present: h.kvm_present,
        tags: tags_out(&h.tags),
        disk_total_gib: h.disk_total_gib,
        disk_allocated_gib: h.disk_allocated_gib,
    }
}

/// An image to the wire.
pub fn image_out(i: &Image, registered_hosts: u32) -> pb::Image {
    pb::Image {
        image_id: i.id.clone(),
        name: i.name.clone(),
        kernel_path: i.kernel_path.clone(),
        initrd_path: i.initrd_path.clone(),
        rootdisk_path: i.rootdisk_path.clone(),
        cmdline_extra: i.cmdline_extra.clone(),
        created_at_ms: i.created_at_ms,
        tags: tags_out(&i.tags),
        registered_hosts,
        host_errors: Vec::new(),
    }
}

/// A key pair to the wire.
pub fn key_pair_out(k: &KeyPair) -> pb::KeyPair {
    pb::KeyPair {
        key_name: k.name.clone(),
        key_pair_id: k.id.clone(),
        fingerprint: k.fingerprint.clone(),
        public_key: k.public_key.clone(),
        created_at_ms: k.created_at_ms,
        tags: tags_out(&k.tags),
    }
}

/// A placement group to the wire.
pub fn group_out(g: &PlacementGroup) -> pb::PlacementGroup {
    pb::PlacementGroup {
        name: g.name.clone(),
        group_id: g.id.clone(),
        strategy: g.strategy.as_str().into(),
        tags: tags_out(&g.tags),
        created_at_ms: g.created_at_ms,
    }
}

/// An API key to the wire (never its hash).
pub fn api_key_out(k: &ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id.clone(),
        name: k.name.clone(),
        admin: k.role() == Role::Admin,
        created_at_ms: k.created_at_ms,
        role: k.role().as_str().into(),
        host_id: k.host_id.clone(),
    }
}

/// A heartbeat's host description; `peer_ip` replaces an unspecified IP in
/// the agent's address.
pub fn host_report(
    r: &pb::HeartbeatRequest,
    peer_ip: Option<std::net::IpAddr>,
) -> Result<HostReport, StateError> {
    let h = r
        .host
        .as_ref()
        .ok_or_else(|| StateError::InvalidArgument("host: required".into()))?;
    let mut address = r.address.clone();
    if let Some(ip) = peer_ip {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        address = address.replace("0.0.0.0", &ip).replace("[::]", &ip);
    }
    if !(address.starts_with("http://") || address.starts_with("https://")) {
        return Err(StateError::InvalidArgument(
            "address: must be an http:// or https:// URL".into(),
        ));
    }
    Ok(HostReport {
        id: h.host_id.clone(),
        az: h.availability_zone.clone(),
        address,
        vcpus_total: h.vcpus_total,
        memory_total_mib: h.memory_total_mib,
        cpu_model: h.cpu_model.clone(),
        agent_version: h.agent_version.clone(),
        kvm_present: h.kvm_present,
        disk_total_gib: h.disk_total_gib,
    })
}

/// `SHA256:<unpadded base64>` of `blob`, as `ssh-keygen -l` prints it.
pub fn fingerprint(blob: &[u8]) -> String {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(blob))
    )
}

/// The key blob of an OpenSSH public key line.
pub fn parse_public_key(line: &str) -> Result<Vec<u8>, StateError> {
    use base64::Engine;
    let bad = || {
        StateError::InvalidArgument(
            "public_key: expected an OpenSSH public key line (\"ssh-ed25519 AAAA...\")".into(),
        )
    };
    let mut parts = line.split_whitespace();
    let kind = parts.next().ok_or_else(bad)?;
    if !kind.starts_with("ssh-") && !kind.starts_with("ecdsa-") {
        return Err(bad());
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(parts.next().ok_or_else(bad)?)
        .map_err(|_| bad())?;
    Ok(blob)
}

/// A VPC to the wire.
pub fn vpc_out(v: &Vpc) -> pb::Vpc {
    pb::Vpc {
        vpc_id: v.id.clone(),
        cidr_block: v.cidr.clone(),
        is_default: v.is_default,
        tags: tags_out(&v.tags),
        created_at_ms: v.created_at_ms,
        vni: v.vni,
    }
}

/// A subnet to the wire.
pub fn subnet_out(s: &Subnet) -> pb::Subnet {
    pb::Subnet {
        subnet_id: s.id.clone(),
        vpc_id: s.vpc_id.clone(),
        cidr_block: s.cidr.clone(),
        availability_zone: s.az.clone(),
        is_default: s.is_default,
        tags: tags_out(&s.tags),
        created_at_ms: s.created_at_ms,
        available_addresses: crate::net::Cidr::parse(&s.cidr)
            .map(|c| c.assignable_count())
            .unwrap_or(0),
    }
}

/// A security group rule from the wire: a known protocol, ports that fit
/// 16 bits and exactly one peer (the state checks the rest).
pub fn rule_in(field: &str, r: &pb::SecurityGroupRule) -> Result<SgRule, StateError> {
    let bad = |m: String| StateError::InvalidArgument(format!("{field}: {m}"));
    let protocol = match r.protocol.to_ascii_lowercase().as_str() {
        "tcp" | "6" => Protocol::Tcp,
        "udp" | "17" => Protocol::Udp,
        "icmp" | "1" => Protocol::Icmp,
        "all" | "-1" => Protocol::All,
        p => return Err(bad(format!("protocol {p:?} is not tcp, udp, icmp or all"))),
    };
    let port = |p: u32| u16::try_from(p).map_err(|_| bad(format!("port {p} is above 65535")));
    let peer = match (r.cidr.is_empty(), r.group_id.is_empty()) {
        (false, true) => Peer::Cidr(r.cidr.clone()),
        (true, false) => Peer::Group(r.group_id.clone()),
        _ => return Err(bad("give exactly one of cidr and group_id".into())),
    };
    Ok(SgRule {
        protocol,
        from_port: port(r.from_port)?,
        to_port: port(r.to_port)?,
        peer,
    })
}

/// A security group rule to the wire.
pub fn rule_out(r: &SgRule) -> pb::SecurityGroupRule {
    let (cidr, group_id) = match &r.peer {
        Peer::Cidr(c) => (c.clone(), String::new()),
        Peer::Group(g) => (String::new(), g.clone()),
    };
    pb::SecurityGroupRule {
        protocol: r.protocol.as_str().into(),
        from_port: r.from_port.into(),
        to_port: r.to_port.into(),
        cidr,
        group_id,
    }
}

/// A security group to the wire.
pub fn security_group_out(g: &SecurityGroup) -> pb::SecurityGroup {
    pb::SecurityGroup {
        group_id: g.id.clone(),
        group_name: g.name.clone(),
        description: g.description.clone(),
        vpc_id: g.vpc_id.clone(),
        ingress: g.ingress.iter().map(rule_out).collect(),
        egress: g.egress.iter().map(rule_out).collect(),
        tags: tags_out(&g.tags),
        created_at_ms: g.created_at_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_tag_keys_are_refused() {
        let t = |k: &str| pb::Tag {
            key: k.into(),
            value: "v".into(),
        };
        assert!(tags_in(vec![t("a"), t("b")]).is_ok());
        let e = tags_in(vec![t("a"), t("a")]).unwrap_err();
        assert!(e.to_string().starts_with("tags.key"));
    }

    #[test]
    fn public_keys_parse_and_fingerprint() {
        let line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGk2zGHkV1c3g2c5G0uYkT7b5x0b1m7zv4W6xrJtq1Yc me@host";
        let blob = parse_public_key(line).unwrap();
        assert!(fingerprint(&blob).starts_with("SHA256:"));
        assert!(parse_public_key("garbage").is_err());
        assert!(parse_public_key("ssh-rsa !!!").is_err());
    }

    #[test]
    fn heartbeat_address_takes_the_peer_ip() {
        let r = pb::HeartbeatRequest {
            host: Some(Default::default()),
            address: "http://0.0.0.0:7420".into(),
            ..Default::default()
        };
        let h = host_report(&r, Some("10.1.2.3".parse().unwrap())).unwrap();
        assert_eq!(h.address, "http://10.1.2.3:7420");
    }
}
