//! Printing results: an aligned [`Table`] for people or JSON for scripts,
//! and the JSON/row views of the API's messages.

use ferro_proto::compute::v1 as pb;
use serde_json::{json, Value};

use crate::args::Format;
use crate::table::Table;

/// Prints `table` or `json` to stdout per `format`.
pub fn print(format: Format, table: &Table, json: &Value) {
    match format {
        Format::Table => print!("{table}"),
        Format::Json => println!("{}", serde_json::to_string_pretty(json).unwrap_or_default()),
    }
}

/// `INSTANCE_STATE_SHUTTING_DOWN` → `shutting-down`, given the prefix.
pub fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix)
        .unwrap_or(full)
        .to_ascii_lowercase()
        .replace('_', "-")
}

/// The user-facing name of an instance state.
pub fn state_name(state: i32) -> String {
    pb::InstanceState::try_from(state).map_or_else(
        |_| format!("state-{state}"),
        |s| enum_name(s.as_str_name(), "INSTANCE_STATE_"),
    )
}

/// Parses a state name as [`state_name`] prints it.
/// The instance state names `--state` takes.
pub const STATE_NAMES: &[&str] = &[
    "pending",
    "running",
    "stopping",
    "stopped",
    "shutting-down",
    "terminated",
    "rebooting",
    "failed",
    "unknown",
];

pub fn parse_state(name: &str) -> Option<pb::InstanceState> {
    if !STATE_NAMES.contains(&name.to_ascii_lowercase().as_str()) {
        return None;
    }
    let full = format!(
        "INSTANCE_STATE_{}",
        name.to_ascii_uppercase().replace('-', "_")
    );
    pb::InstanceState::from_str_name(&full)
}

fn desired_name(v: i32) -> String {
    pb::DesiredState::try_from(v).map_or_else(
        |_| v.to_string(),
        |s| enum_name(s.as_str_name(), "DESIRED_STATE_"),
    )
}

fn observed_name(v: i32) -> String {
    pb::ObservedState::try_from(v).map_or_else(
        |_| v.to_string(),
        |s| enum_name(s.as_str_name(), "OBSERVED_STATE_"),
    )
}

fn health_name(v: i32) -> String {
    pb::HostHealth::try_from(v).map_or_else(
        |_| v.to_string(),
        |s| enum_name(s.as_str_name(), "HOST_HEALTH_"),
    )
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC); `-` for 0.
pub fn time(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 → (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Tags as a JSON object.
pub fn tags_json(tags: &[pb::Tag]) -> Value {
    Value::Object(
        tags.iter()
            .map(|t| (t.key.clone(), Value::String(t.value.clone())))
            .collect(),
    )
}

fn tags_text(tags: &[pb::Tag]) -> String {
    let v: Vec<String> = tags
        .iter()
        .map(|t| format!("{}={}", t.key, t.value))
        .collect();
    v.join(",")
}

/// `s`, or `-` when empty.
pub fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.into()
    }
}

/// An instance as JSON.
pub fn instance_json(i: &pb::Instance) -> Value {
    json!({
        "instance_id": i.instance_id,
        "state": state_name(i.state),
        "desired_state": desired_name(i.desired_state),
        "observed_state": observed_name(i.observed_state),
        "state_reason": i.state_reason,
        "instance_type": i.instance_type,
        "vcpus": i.vcpus,
        "memory_mib": i.memory_mib,
        "image_id": i.image_id,
        "availability_zone": i.availability_zone,
        "host_id": i.host_id,
        "key_name": i.key_name,
        "placement_group": i.placement_group,
        "launch_time_ms": i.launch_time_ms,
        "reservation_id": i.reservation_id,
        "client_token": i.client_token,
        "user_data_bytes": i.user_data_bytes,
        "instance_initiated_shutdown_behavior": i.instance_initiated_shutdown_behavior,
        "subnet_id": i.subnet_id,
        "vpc_id": i.vpc_id,
        "private_ip_address": i.private_ip_address,
        "mac_address": i.mac_address,
        "security_group_ids": i.security_group_ids,
        "block_device_mappings": i.block_device_mappings.iter().map(attachment_json).collect::<Vec<_>>(),
        "root_device_type": i.root_device_type,
        "root_volume_id": i.root_volume_id,
        "tags": tags_json(&i.tags),
    })
}

/// A volume attachment as JSON.
pub fn attachment_json(a: &pb::VolumeAttachment) -> Value {
    json!({
        "volume_id": a.volume_id,
        "instance_id": a.instance_id,
        "device": a.device,
        "state": a.state,
        "delete_on_termination": a.delete_on_termination,
    })
}

/// A volume attachment as one line: `/dev/vdb vol-… (attached)`.
pub fn attachment_text(a: &pb::VolumeAttachment) -> String {
    let dot = if a.delete_on_termination {
        ", delete on termination"
    } else {
        ""
    };
    format!("{} {} ({}{dot})", a.device, a.volume_id, a.state)
}

/// Instances as a table, one row each.
pub fn instances_table(list: &[pb::Instance]) -> Table {
    let mut t = Table::new([
        "INSTANCE", "STATE", "TYPE", "IMAGE", "AZ", "HOST", "LAUNCHED",
    ]);
    for i in list {
        t.row([
            i.instance_id.clone(),
            state_name(i.state),
            i.instance_type.clone(),
            i.image_id.clone(),
            dash(&i.availability_zone),
            dash(&i.host_id),
            time(i.launch_time_ms),
        ]);
    }
    t
}

/// One instance in detail: a two-column FIELD/VALUE table.
pub fn instance_detail(i: &pb::Instance) -> Table {
    let mut t = Table::new(["FIELD", "VALUE"]);
    let rows = [
        ("instance", i.instance_id.clone()),
        ("state", state_name(i.state)),
        ("desired", desired_name(i.desired_state)),
        ("observed", observed_name(i.observed_state)),
        ("reason", dash(&i.state_reason)),
        (
            "type",
            format!(
                "{} ({} vCPU, {} MiB)",
                i.instance_type, i.vcpus, i.memory_mib
            ),
        ),
        ("image", i.image_id.clone()),
        ("az", dash(&i.availability_zone)),
        ("host", dash(&i.host_id)),
        ("private ip", dash(&i.private_ip_address)),
        ("subnet", dash(&i.subnet_id)),
        ("vpc", dash(&i.vpc_id)),
        ("mac", dash(&i.mac_address)),
        ("security groups", dash(&i.security_group_ids.join(", "))),
        ("key", dash(&i.key_name)),
        (
            "on guest power-off",
            dash(&i.instance_initiated_shutdown_behavior),
        ),
        ("placement group", dash(&i.placement_group)),
        ("root device", root_device(i)),
        ("launched", time(i.launch_time_ms)),
        ("reservation", dash(&i.reservation_id)),
        ("tags", dash(&tags_text(&i.tags))),
    ];
    for (k, v) in rows {
        t.row([k.to_string(), v]);
    }
    for a in &i.block_device_mappings {
        t.row(["volume".to_string(), attachment_text(a)]);
    }
    t
}

/// "ebs (vol-…)" or "instance-store".
fn root_device(i: &pb::Instance) -> String {
    match i.root_device_type.as_str() {
        "ebs" => format!("ebs ({})", i.root_volume_id),
        t => dash(t),
    }
}

/// Network interfaces as a table and as JSON.
pub fn interfaces(list: &[pb::NetworkInterface]) -> (Table, Value) {
    let mut t = Table::new([
        "INTERFACE",
        "INSTANCE",
        "PRIVATE IP",
        "SUBNET",
        "VPC",
        "AZ",
        "MAC",
        "GROUPS",
        "STATUS",
    ]);
    let mut j = Vec::new();
    for x in list {
        let groups: Vec<String> = x
            .groups
            .iter()
            .map(|g| format!("{} ({})", g.group_id, g.group_name))
            .collect();
        t.row([
            x.network_interface_id.clone(),
            dash(&x.instance_id),
            x.private_ip_address.clone(),
            x.subnet_id.clone(),
            x.vpc_id.clone(),
            dash(&x.availability_zone),
            x.mac_address.clone(),
            dash(&groups.join(", ")),
            x.status.clone(),
        ]);
        j.push(json!({
            "network_interface_id": x.network_interface_id,
            "instance_id": x.instance_id,
            "device_index": x.device_index,
            "private_ip_address": x.private_ip_address,
            "subnet_id": x.subnet_id,
            "vpc_id": x.vpc_id,
            "availability_zone": x.availability_zone,
            "mac_address": x.mac_address,
            "groups": x.groups.iter().map(|g| json!({"group_id": g.group_id, "group_name": g.group_name})).collect::<Vec<_>>(),
            "status": x.status,
            "host_id": x.host_id,
            "tags": tags_json(&x.tags),
        }));
    }
    (t, Value::Array(j))
}

/// State changes (start/stop/reboot/terminate answers).
pub fn changes(list: &[pb::InstanceStateChange]) -> (Table, Value) {
    let mut t = Table::new(["INSTANCE", "PREVIOUS", "CURRENT"]);
    let mut j = Vec::new();
    for c in list {
        let (p, n) = (state_name(c.previous_state), state_name(c.current_state));
        t.row([c.instance_id.clone(), p.clone(), n.clone()]);
        j.push(json!({"instance_id": c.instance_id, "previous_state": p, "current_state": n}));
    }
    (t, Value::Array(j))
}

/// Hosts.
pub fn hosts(list: &[pb::Host]) -> (Table, Value) {
    let mut t = Table::new([
        "HOST",
        "AZ",
        "HEALTH",
        "VCPUS",
        "MEMORY MIB",
        "INSTANCES",
        "ADDRESS",
        "LAST SEEN",
    ]);
    let mut j = Vec::new();
    for h in list {
        let health = health_name(h.health);
        t.row([
            h.host_id.clone(),
            h.availability_zone.clone(),
            health.clone(),
            format!("{}/{}", h.vcpus_allocated, h.vcpus_total),
            format!("{}/{}", h.memory_allocated_mib, h.memory_total_mib),
            h.instances.to_string(),
            h.address.clone(),
            time(h.last_seen_ms),
        ]);
        j.push(json!({
            "host_id": h.host_id, "availability_zone": h.availability_zone,
            "address": h.address, "health": health, "last_seen_ms": h.last_seen_ms,
            "vcpus_total": h.vcpus_total, "memory_total_mib": h.memory_total_mib,
            "vcpus_allocated": h.vcpus_allocated, "memory_allocated_mib": h.memory_allocated_mib,
            "instances": h.instances, "cpu_model": h.cpu_model,
            "agent_version": h.agent_version, "kvm_present": h.kvm_present,
            "tags": tags_json(&h.tags),
        }));
    }
    (t, Value::Array(j))
}

/// An image as JSON.
pub fn image_json(i: &pb::Image) -> Value {
    json!({
        "image_id": i.image_id, "name": i.name, "kernel_path": i.kernel_path,
        "initrd_path": i.initrd_path, "rootdisk_path": i.rootdisk_path,
        "cmdline_extra": i.cmdline_extra, "created_at_ms": i.created_at_ms,
        "registered_hosts": i.registered_hosts, "tags": tags_json(&i.tags),
        "host_errors": i.host_errors,
    })
}

/// Images.
pub fn images(list: &[pb::Image]) -> (Table, Value) {
    let mut t = Table::new([
        "IMAGE",
        "NAME",
        "KERNEL",
        "CMDLINE EXTRA",
        "HOSTS",
        "CREATED",
        "FAILING ON",
    ]);
    for i in list {
        let failing: Vec<&str> = i
            .host_errors
            .iter()
            .filter_map(|e| e.split_once(':').map(|(h, _)| h))
            .collect();
        t.row([
            i.image_id.clone(),
            i.name.clone(),
            i.kernel_path.clone(),
            dash(&i.cmdline_extra),
            i.registered_hosts.to_string(),
            time(i.created_at_ms),
            dash(&failing.join(",")),
        ]);
    }
    (t, Value::Array(list.iter().map(image_json).collect()))
}

/// A key pair as JSON.
pub fn key_json(k: &pb::KeyPair) -> Value {
    json!({
        "key_name": k.key_name, "key_pair_id": k.key_pair_id, "fingerprint": k.fingerprint,
        "public_key": k.public_key, "created_at_ms": k.created_at_ms, "tags": tags_json(&k.tags),
    })
}

/// Key pairs.
pub fn keys(list: &[pb::KeyPair]) -> (Table, Value) {
    let mut t = Table::new(["NAME", "ID", "FINGERPRINT", "CREATED"]);
    for k in list {
        t.row([
            k.key_name.clone(),
            k.key_pair_id.clone(),
            k.fingerprint.clone(),
            time(k.created_at_ms),
        ]);
    }
    (t, Value::Array(list.iter().map(key_json).collect()))
}

/// Availability zones.
pub fn azs(list: &[pb::AvailabilityZone]) -> (Table, Value) {
    let mut t = Table::new(["AZ", "REGION", "STATE", "HOSTS", "HEALTHY"]);
    let mut j = Vec::new();
    for z in list {
        t.row([
            z.name.clone(),
            z.region.clone(),
            z.state.clone(),
            z.hosts.to_string(),
            z.healthy_hosts.to_string(),
        ]);
        j.push(json!({"name": z.name, "region": z.region, "state": z.state,
            "hosts": z.hosts, "healthy_hosts": z.healthy_hosts}));
    }
    (t, Value::Array(j))
}

/// Instance types.
pub fn types(list: &[pb::InstanceType]) -> (Table, Value) {
    let mut t = Table::new(["TYPE", "VCPUS", "MEMORY MIB"]);
    let mut j = Vec::new();
    for ty in list {
        t.row([
            ty.name.clone(),
            ty.vcpus.to_string(),
            ty.memory_mib.to_string(),
        ]);
        j.push(json!({"name": ty.name, "vcpus": ty.vcpus, "memory_mib": ty.memory_mib}));
    }
    (t, Value::Array(j))
}

/// Cluster status: every member as it answered for itself (`peers`: the
/// other members' own answers, or why they did not answer), the answering
/// node from `s`.
pub fn cluster(
    s: &pb::ClusterStatusResponse,
    peers: &std::collections::BTreeMap<u64, Result<pb::NodeStatus, String>>,
) -> (Table, Value) {
    let leader = s.leader.as_ref().map(|l| l.node_id);
    let mut t = Table::new(["NODE", "ADDRESS", "ROLE", "TERM", "APPLIED", "SNAPSHOTS"]);
    let mut members = Vec::new();
    for m in &s.members {
        let own = if m.node_id == s.node_id {
            s.node.clone().ok_or_else(|| "no status".to_string())
        } else {
            peers
                .get(&m.node_id)
                .cloned()
                .unwrap_or_else(|| Err("not asked".into()))
        };
        let (role, progress) = match &own {
            Ok(n) => {
                let mut role = if n.role.is_empty() {
                    if Some(m.node_id) == leader {
                        "leader"
                    } else {
                        "follower"
                    }
                    .to_string()
                } else {
                    n.role.clone()
                };
                if m.node_id == s.node_id {
                    role.push_str(" (answered)");
                }
                (
                    role,
                    [
                        n.term.to_string(),
                        n.last_applied_index.to_string(),
                        n.snapshots_installed.to_string(),
                    ],
                )
            }
            Err(_) => (
                "unreachable".to_string(),
                ["-".to_string(), "-".to_string(), "-".to_string()],
            ),
        };
        let [term, applied, snaps] = progress;
        t.row([
            m.node_id.to_string(),
            m.address.clone(),
            role,
            term,
            applied,
            snaps,
        ]);
        members.push(match own {
            Ok(n) => json!({
                "node_id": m.node_id,
                "address": m.address,
                "reachable": true,
                "role": n.role,
                "term": n.term,
                "last_log_index": n.last_log_index,
                "last_applied_index": n.last_applied_index,
                "snapshots_installed": n.snapshots_installed,
            }),
            Err(e) => json!({
                "node_id": m.node_id,
                "address": m.address,
                "reachable": false,
                "error": e,
            }),
        });
    }
    let member = |m: &pb::ClusterMember| json!({"node_id": m.node_id, "address": m.address});
    let node = s.node.as_ref().map(|n| {
        json!({
            "role": n.role,
            "term": n.term,
            "last_log_index": n.last_log_index,
            "last_applied_index": n.last_applied_index,
            "log_purged_index": n.log_purged_index,
            "snapshots_built": n.snapshots_built,
            "snapshots_installed": n.snapshots_installed,
        })
    });
    let j = json!({
        "node_id": s.node_id,
        "replicated": s.replicated,
        "leader": s.leader.as_ref().map(member),
        "members": members,
        "node": node,
    });
    (t, j)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_that_does_not_answer_is_shown_unreachable() {
        let m = |id: u64| pb::ClusterMember {
            node_id: id,
            address: format!("10.0.0.{id}:7400"),
        };
        let node = |role: &str| pb::NodeStatus {
            role: role.into(),
            term: 3,
            last_applied_index: 9,
            ..Default::default()
        };
        let s = pb::ClusterStatusResponse {
            node_id: 1,
            members: vec![m(1), m(2), m(3)],
            leader: Some(m(1)),
            node: Some(node("leader")),
            ..Default::default()
        };
        let mut peers = std::collections::BTreeMap::new();
        peers.insert(2, Ok(node("follower")));
        peers.insert(
            3,
            Err("cannot reach the controller at http://10.0.0.3:7400".into()),
        );
        let (t, j) = cluster(&s, &peers);
        let text = t.render();
        assert!(text.contains("leader (answered)"), "{text}");
        assert!(text.contains("follower"), "{text}");
        let row3 = text.lines().find(|l| l.contains("10.0.0.3")).unwrap();
        assert!(row3.contains("unreachable"), "{text}");
        assert_eq!(j["members"][2]["reachable"], false);
    }

    #[test]
    fn state_names_round_trip() {
        assert_eq!(
            state_name(pb::InstanceState::ShuttingDown as i32),
            "shutting-down"
        );
        assert_eq!(state_name(pb::InstanceState::Running as i32), "running");
        assert_eq!(
            parse_state("shutting-down"),
            Some(pb::InstanceState::ShuttingDown)
        );
        assert_eq!(parse_state("Running"), Some(pb::InstanceState::Running));
        assert_eq!(parse_state("bogus"), None);
        assert_eq!(state_name(99), "state-99");
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1_000), "1970-01-01T00:00:01Z");
        assert_eq!(time(1_795_000_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(time(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn interface_table_and_json() {
        let x = pb::NetworkInterface {
            network_interface_id: "eni-1".into(),
            instance_id: "i-1".into(),
            private_ip_address: "10.0.1.4".into(),
            subnet_id: "subnet-1".into(),
            vpc_id: "vpc-1".into(),
            availability_zone: "az-1".into(),
            mac_address: "02:fc:00:00:00:01".into(),
            groups: vec![pb::GroupIdentifier {
                group_id: "sg-1".into(),
                group_name: "web".into(),
            }],
            status: "in-use".into(),
            ..Default::default()
        };
        let (t, j) = interfaces(std::slice::from_ref(&x));
        let lines: Vec<String> = t.render().lines().map(String::from).collect();
        assert!(
            lines[0].starts_with("INTERFACE  INSTANCE  PRIVATE IP"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].starts_with("eni-1      i-1       10.0.1.4"),
            "{}",
            lines[1]
        );
        assert!(lines[1].contains("sg-1 (web)") && lines[1].ends_with("in-use"));
        assert_eq!(j[0]["groups"][0]["group_name"], "web");
        assert_eq!(j[0]["private_ip_address"], "10.0.1.4");
    }

    #[test]
    fn instance_table_and_json() {
        let i = pb::Instance {
            instance_id: "i-0000000000000001".into(),
            instance_type: "f1.small".into(),
            image_id: "img-1".into(),
            state: pb::InstanceState::Pending as i32,
            tags: vec![pb::Tag {
                key: "env".into(),
                value: "ci".into(),
            }],
            ..Default::default()
        };
        let t = instances_table(std::slice::from_ref(&i)).render();
        assert_eq!(
            t,
            "INSTANCE            STATE    TYPE      IMAGE  AZ  HOST  LAUNCHED\n\
             i-0000000000000001  pending  f1.small  img-1  -   -     -\n"
        );
        let j = instance_json(&i);
        assert_eq!(j["state"], "pending");
        assert_eq!(j["tags"]["env"], "ci");
    }
}
