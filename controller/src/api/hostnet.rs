//! What one host's network daemon is told: its part of the VPCs, derived
//! from the cluster state on every change (`Hosts.WatchHostNetwork`).
//!
//! A host sees the VPCs it has an interface of; in each, its own
//! interfaces (with what DHCP and the metadata service hand out) and the
//! VPC's interfaces elsewhere with their hosts' underlay addresses; and the
//! security groups its interfaces are in or whose rules they name, with
//! the members' addresses. Nothing of a VPC without a local interface
//! reaches the host.

use std::collections::{BTreeMap, BTreeSet};

use ferro_proto::compute::v1 as pb;

use super::convert::security_group_out;
use crate::model::*;
use crate::net::Cidr;
use crate::state::ClusterState;

/// The inner MTU announced to guests: a 1500-byte underlay less VXLAN's
/// 50 bytes of headers.
pub const INNER_MTU: u32 = 1450;

/// `ip-172-31-0-4`, EC2's private host name.
pub fn hostname(ip: &str) -> String {
    format!("ip-{}", ip.replace('.', "-"))
}

/// Instances with a live interface (not gone for good, placed).
fn live(s: &ClusterState) -> impl Iterator<Item = (&Instance, &Interface)> {
    s.instances
        .values()
        .filter(|i| !i.is_final() && !i.host_id.is_empty())
        .filter_map(|i| i.network.as_ref().map(|n| (i, n)))
}

fn local(s: &ClusterState, i: &Instance, n: &Interface) -> pb::LocalInterface {
    let cidr = s
        .subnets
        .get(&n.subnet_id)
        .map(|x| x.cidr.clone())
        .unwrap_or_default();
    let (router_ip, dns_ip) = Cidr::parse(&cidr)
        .map(|c| {
            let base = u32::from(c.network());
            (
                std::net::Ipv4Addr::from(base + 1).to_string(),
                std::net::Ipv4Addr::from(base + 2).to_string(),
            )
        })
        .unwrap_or_default();
    let key = s.key_pairs.get(&i.key_name);
    pb::LocalInterface {
        instance_id: i.id.clone(),
        mac: n.mac.clone(),
        private_ip: n.private_ip.clone(),
        subnet_cidr: cidr,
        router_ip,
        dns_ip,
        hostname: hostname(&n.private_ip),
        tap: n.tap.clone(),
        security_group_ids: n.security_groups.clone(),
        availability_zone: i.az.clone(),
        instance_type: i.instance_type.clone(),
        public_key: key.map(|k| k.public_key.clone()).unwrap_or_default(),
        key_name: key.map(|k| k.name.clone()).unwrap_or_default(),
        user_data: i.user_data.clone(),
        subnet_id: n.subnet_id.clone(),
        region: s.region.clone(),
        image_id: i.image_id.clone(),
    }
}

/// Host `host_id`'s network state at `revision`.
pub fn host_network(s: &ClusterState, host_id: &str, revision: u64) -> pb::HostNetwork {
    let mut vpcs: BTreeMap<&str, pb::VpcOnHost> = BTreeMap::new();
    let mut groups: BTreeSet<&str> = BTreeSet::new();
    for (i, n) in live(s).filter(|(i, _)| i.host_id == host_id) {
        let Some(v) = s.vpcs.get(&n.vpc_id) else {
            continue;
        };
        let e = vpcs.entry(&v.id).or_insert_with(|| pb::VpcOnHost {
            vpc_id: v.id.clone(),
            vni: v.vni,
            cidr_block: v.cidr.clone(),
            ..Default::default()
        });
        e.local.push(local(s, i, n));
        groups.extend(n.security_groups.iter().map(String::as_str));
    }
    for (i, n) in live(s).filter(|(i, _)| i.host_id != host_id) {
        if let Some(e) = vpcs.get_mut(n.vpc_id.as_str()) {
            e.remote.push(pb::RemoteInterface {
                instance_id: i.id.clone(),
                mac: n.mac.clone(),
                private_ip: n.private_ip.clone(),
                host_id: i.host_id.clone(),
                underlay_ip: s
                    .hosts
                    .get(&i.host_id)
                    .map(|h| h.underlay_ip.clone())
                    .unwrap_or_default(),
            });
        }
    }
    // The groups the local ones' rules name are needed for their members.
    let referenced: BTreeSet<&str> = groups
        .iter()
        .filter_map(|g| s.security_groups.get(*g))
        .flat_map(|g| g.ingress.iter().chain(&g.egress))
        .filter_map(|r| match &r.peer {
            Peer::Group(g) => Some(g.as_str()),
            Peer::Cidr(_) => None,
        })
        .collect();
    groups.extend(referenced);
    let mut members: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (_, n) in live(s) {
        for g in &n.security_groups {
            if groups.contains(g.as_str()) {
                members
                    .entry(g.as_str())
                    .or_default()
                    .push(n.private_ip.clone());
            }
        }
    }
    pb::HostNetwork {
        host_id: host_id.into(),
        revision,
        vpcs: vpcs.into_values().collect(),
        groups: groups
            .iter()
            .filter_map(|g| s.security_groups.get(*g))
            .map(|g| pb::GroupOnHost {
                group: Some(security_group_out(g)),
                member_ips: members.remove(g.id.as_str()).unwrap_or_default(),
            })
            .collect(),
        mtu: INNER_MTU,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(vpc: &str, subnet: &str, ip: &str, groups: &[&str]) -> Interface {
        Interface {
            subnet_id: subnet.into(),
            vpc_id: vpc.into(),
            private_ip: ip.into(),
            mac: crate::state::mac_of(ip),
            security_groups: groups.iter().map(|g| g.to_string()).collect(),
            tap: format!("tap-{ip}"),
        }
    }

    fn instance(id: &str, host: &str, n: Interface) -> Instance {
        Instance {
            id: id.into(),
            reservation_id: "r-1".into(),
            instance_type: "f1.small".into(),
            vcpus: 1,
            memory_mib: 128,
            image_id: "img-1".into(),
            az: "az-1".into(),
            host_id: host.into(),
            key_name: String::new(),
            placement_group: String::new(),
            user_data: vec![],
            tags: Tags::new(),
            client_token: String::new(),
            desired: DesiredState::Running,
            observed: ObservedState::Running,
            observed_reason: String::new(),
            observed_seq: 0,
            network: Some(n),
            reboots_requested: 0,
            reboots_done: 0,
            holds_capacity: true,
            launched_at_ms: 1,
            shutdown_behavior: ShutdownBehavior::Stop,
            root_volume: None,
        }
    }

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for (id, vni) in [("vpc-a", 1), ("vpc-b", 2)] {
            s.vpcs.insert(
                id.into(),
                Vpc {
                    id: id.into(),
                    cidr: "10.0.0.0/16".into(),
                    is_default: false,
                    tags: Tags::new(),
                    created_at_ms: 1,
                    vni,
                },
            );
        }
        for (id, vpc) in [("subnet-a", "vpc-a"), ("subnet-b", "vpc-b")] {
            s.subnets.insert(
                id.into(),
                Subnet {
                    id: id.into(),
                    vpc_id: vpc.into(),
                    cidr: "10.0.1.0/24".into(),
                    az: "az-1".into(),
                    is_default: false,
                    tags: Tags::new(),
                    created_at_ms: 1,
                },
            );
        }
        for (id, vpc, rules) in [
            ("sg-web", "vpc-a", vec![Peer::Group("sg-app".into())]),
            ("sg-app", "vpc-a", vec![]),
            ("sg-b", "vpc-b", vec![]),
        ] {
            s.security_groups.insert(
                id.into(),
                SecurityGroup {
                    id: id.into(),
                    vpc_id: vpc.into(),
                    name: id.into(),
                    description: String::new(),
                    ingress: rules
                        .into_iter()
                        .map(|peer| SgRule {
                            protocol: Protocol::Tcp,
                            from_port: 80,
                            to_port: 80,
                            peer,
                        })
                        .collect(),
                    egress: vec![],
                    tags: Tags::new(),
                    created_at_ms: 1,
                },
            );
        }
        for h in ["h1", "h2", "h3"] {
            s.hosts.insert(
                h.into(),
                Host {
                    id: h.into(),
                    az: "az-1".into(),
                    address: String::new(),
                    vcpus_total: 8,
                    memory_total_mib: 8192,
                    vcpus_allocated: 0,
                    memory_allocated_mib: 0,
                    instances: 0,
                    health: HostHealth::Healthy,
                    last_seen_ms: 1,
                    cpu_model: String::new(),
                    agent_version: String::new(),
                    kvm_present: true,
                    tags: Tags::new(),
                    underlay_ip: format!("10.99.0.{}", &h[1..]),
                    blockd_addr: String::new(),
                    disk_total_gib: 0,
                    disk_allocated_gib: 0,
                },
            );
        }
        let add = |s: &mut ClusterState, i: Instance| {
            s.instances.insert(i.id.clone(), i);
        };
        add(
            &mut s,
            instance(
                "i-1",
                "h1",
                iface("vpc-a", "subnet-a", "10.0.1.4", &["sg-web"]),
            ),
        );
        add(
            &mut s,
            instance(
                "i-2",
                "h2",
                iface("vpc-a", "subnet-a", "10.0.1.5", &["sg-app"]),
            ),
        );
        add(
            &mut s,
            instance(
                "i-3",
                "h2",
                iface("vpc-b", "subnet-b", "10.0.1.4", &["sg-b"]),
            ),
        );
        add(
            &mut s,
            instance(
                "i-4",
                "h3",
                iface("vpc-b", "subnet-b", "10.0.1.5", &["sg-b"]),
            ),
        );
        s
    }

    /// A host learns only the VPCs it has interfaces in: its own with DHCP
    /// facts, the others' with their hosts' underlay addresses, and the
    /// groups its interfaces need (named ones with their members).
    #[test]
    fn a_host_sees_only_its_vpcs_and_the_groups_it_needs() {
        let s = state();
        let h1 = host_network(&s, "h1", 7);
        assert_eq!(h1.revision, 7);
        assert_eq!(h1.vpcs.len(), 1, "vpc-b has nothing on h1");
        let v = &h1.vpcs[0];
        assert_eq!((v.vpc_id.as_str(), v.vni), ("vpc-a", 1));
        let l = &v.local[0];
        assert_eq!(
            (
                l.private_ip.as_str(),
                l.router_ip.as_str(),
                l.dns_ip.as_str()
            ),
            ("10.0.1.4", "10.0.1.1", "10.0.1.2")
        );
        assert_eq!(l.hostname, "ip-10-0-1-4");
        assert_eq!(l.tap, "tap-10.0.1.4");
        assert_eq!(v.remote.len(), 1);
        assert_eq!(v.remote[0].underlay_ip, "10.99.0.2");
        let g: Vec<(&str, &[String])> = h1
            .groups
            .iter()
            .map(|g| {
                (
                    g.group.as_ref().unwrap().group_id.as_str(),
                    &g.member_ips[..],
                )
            })
            .collect();
        assert_eq!(
            g,
            vec![
                ("sg-app", &["10.0.1.5".to_string()][..]),
                ("sg-web", &["10.0.1.4".to_string()][..])
            ]
        );
        // h2 has both VPCs; the same addresses in each stay apart.
        let h2 = host_network(&s, "h2", 7);
        assert_eq!(h2.vpcs.len(), 2);
        let b = h2.vpcs.iter().find(|v| v.vpc_id == "vpc-b").unwrap();
        assert_eq!(b.remote.len(), 1);
        assert_eq!(b.remote[0].host_id, "h3");
        assert!(!h2.groups.iter().any(|g| g.member_ips.is_empty()));
    }

    /// Gone instances leave every host's view; an unknown host sees
    /// nothing.
    #[test]
    fn gone_instances_leave_the_view() {
        let mut s = state();
        let i = s.instances.get_mut("i-2").unwrap();
        i.desired = DesiredState::Terminated;
        i.observed = ObservedState::Absent;
        let h1 = host_network(&s, "h1", 8);
        assert!(h1.vpcs[0].remote.is_empty());
        assert!(host_network(&s, "h9", 8).vpcs.is_empty());
    }

    /// The metadata service follows ModifyInstanceAttribute: the type and
    /// user data changed while the instance is stopped are in the host's
    /// next network state (the watch sends it because it differs).
    #[test]
    fn a_modified_type_and_user_data_reach_the_metadata_service() {
        use ferro_raft::StateMachine;
        let mut s = state();
        s.region = "local".into();
        for t in default_instance_types() {
            s.instance_types.insert(t.name.clone(), t);
        }
        let i = s.instances.get_mut("i-1").unwrap();
        (i.desired, i.observed) = (DesiredState::Stopped, ObservedState::Stopped);
        let before = host_network(&s, "h1", 1);
        s.apply(crate::state::Command::ModifyInstance {
            id: "i-1".into(),
            change: crate::state::InstanceChange {
                instance_type: Some("f1.micro".into()),
                user_data: Some(b"#cloud-config\n".to_vec()),
                ..Default::default()
            },
        })
        .unwrap();
        let after = host_network(&s, "h1", 1);
        assert_ne!(before, after);
        let l = &after.vpcs[0].local[0];
        assert_eq!(l.instance_type, "f1.micro");
        assert_eq!(l.user_data, b"#cloud-config\n");
    }
}
