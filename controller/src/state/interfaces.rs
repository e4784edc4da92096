//! Network interfaces as DescribeNetworkInterfaces shows them: derived
//! from the instances' primary interfaces (`Instance.network`), not
//! records of their own. An interface's id is `eni-` and its instance's
//! hex digits, so it is stable, unique and the same on every replica, and
//! paging by it follows the instances' order. It exists while its
//! instance holds its address: from the launch until the instance is gone.

use super::query::{any_of, tags_match, NetFilter, Page, Paging, DEFAULT_PAGE};
use super::*;

/// What an interface's status is while attached (a primary interface
/// always is).
pub const IN_USE: &str = "in-use";

/// The id of instance `instance_id`'s primary interface:
/// `i-0123…` → `eni-0123…`.
pub fn interface_id(instance_id: &str) -> String {
    format!(
        "eni-{}",
        instance_id.strip_prefix("i-").unwrap_or(instance_id)
    )
}

/// One interface with what it is shown with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkInterface {
    /// `eni-…`, from the instance id.
    pub id: String,
    /// The instance it is attached to (device 0).
    pub instance_id: String,
    /// The instance's host and zone.
    pub host_id: String,
    /// Its zone.
    pub az: String,
    /// The record: subnet, VPC, address, MAC, groups.
    pub net: Interface,
    /// Its groups as (id, name), in the record's order.
    pub groups: Vec<(String, String)>,
    /// The instance's tags.
    pub tags: Tags,
}

/// What DescribeNetworkInterfaces asks for.
#[derive(Clone, Debug, Default)]
pub struct InterfaceFilter {
    /// Only these `eni-…` (all must exist).
    pub ids: Vec<String>,
    /// Only attached to these instances.
    pub instances: Vec<String>,
    /// Only in these zones.
    pub azs: Vec<String>,
    /// Only with these MACs (any case).
    pub macs: Vec<String>,
    /// VPC, subnet, address and group filters.
    pub net: NetFilter,
    /// The instance's tags: every (key, value) must match.
    pub tags: Vec<(String, String)>,
    /// Page size (0: 100; at most 1000).
    pub max_results: u32,
    /// The last id of the previous page.
    pub next_token: String,
}

fn is_mac(m: &str) -> bool {
    let parts: Vec<&str> = m.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl InterfaceFilter {
    fn check(&self) -> Result<(), StateError> {
        self.net.check()?;
        if let Some(id) = self.ids.iter().find(|id| !id.starts_with("eni-")) {
            return invalid(format!("network_interface_ids: {id:?} is not an eni-… id"));
        }
        if let Some(m) = self.macs.iter().find(|m| !is_mac(m)) {
            return invalid(format!(
                "mac_addresses: {m:?} is not a MAC (six hex bytes separated by colons)"
            ));
        }
        Ok(())
    }

    fn matches(&self, s: &ClusterState, x: &NetworkInterface) -> bool {
        any_of(&self.ids, &x.id)
            && any_of(&self.instances, &x.instance_id)
            && any_of(&self.azs, &x.az)
            && (self.macs.is_empty()
                || self.macs.iter().any(|m| m.eq_ignore_ascii_case(&x.net.mac)))
            && self.net.matches(s, Some(&x.net))
            && tags_match(&x.tags, &self.tags)
    }
}

impl ClusterState {
    /// Every interface, ordered by id.
    pub fn interfaces(&self) -> impl Iterator<Item = NetworkInterface> + '_ {
        self.instances
            .values()
            .filter(|i| !i.is_final())
            .filter_map(|i| Some((i, i.network.as_ref()?)))
            .map(|(i, n)| NetworkInterface {
                id: interface_id(&i.id),
                instance_id: i.id.clone(),
                host_id: i.host_id.clone(),
                az: i.az.clone(),
                groups: n
                    .security_groups
                    .iter()
                    .map(|g| {
                        let name = self.security_groups.get(g).map(|g| g.name.clone());
                        (g.clone(), name.unwrap_or_default())
                    })
                    .collect(),
                net: n.clone(),
                tags: i.tags.clone(),
            })
    }
}

/// DescribeNetworkInterfaces over a state: check, filter, order by id,
/// page.
pub fn describe_interfaces(
    s: &ClusterState,
    f: &InterfaceFilter,
) -> Result<Page<NetworkInterface>, StateError> {
    f.check()?;
    let paging = Paging::new(f.max_results, &f.next_token, DEFAULT_PAGE)?;
    if !f.ids.is_empty() {
        let known: BTreeSet<String> = s.interfaces().map(|x| x.id).collect();
        if let Some(id) = f.ids.iter().find(|id| !known.contains(*id)) {
            return Err(E::NotFound(format!(
                "network_interface_ids: no interface {id:?}"
            )));
        }
    }
    let matching = s.interfaces().filter(|x| f.matches(s, x));
    Ok(paging.page(matching, |x| x.id.as_str()))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{add_host, add_image, bootstrapped, spec};
    use super::*;
    use ferro_raft::StateMachine;

    fn launch(s: &mut ClusterState, ids: &[&str], spec: RunSpec) {
        s.apply(Command::RunInstances {
            spec: RunSpec {
                count: ids.len() as u32,
                ..spec
            },
            instance_ids: ids.iter().map(|x| x.to_string()).collect(),
            reservation_id: format!("r-{}", ids[0]),
            now_ms: 5,
            volume_ids: vec![],
        })
        .unwrap();
    }

    /// A state with the default VPC `vpc-a`, a second VPC (subnet `subnet-b`, group `sg-web` named
    /// "web") and instances `i-a1`, `i-a2` in the default VPC and `i-b1`
    /// in it, tagged tier=web.
    fn two_vpcs() -> ClusterState {
        let mut s = bootstrapped();
        s.apply(Command::CreateDefaultVpc {
            vpc_id: "vpc-a".into(),
            subnet_ids: vec!["subnet-a1".into(), "subnet-a2".into()],
            now_ms: 1,
        })
        .unwrap();
        add_host(&mut s, "h1", "az-1", 16, 16384);
        add_image(&mut s);
        let vpc = Vpc {
            id: "vpc-b".into(),
            cidr: "10.1.0.0/16".into(),
            is_default: false,
            tags: Tags::new(),
            created_at_ms: 0,
            vni: 0,
        };
        s.apply(Command::CreateVpc { vpc }).unwrap();
        let subnet = Subnet {
            id: "subnet-b".into(),
            vpc_id: "vpc-b".into(),
            cidr: "10.1.1.0/24".into(),
            az: "az-1".into(),
            is_default: false,
            tags: Tags::new(),
            created_at_ms: 0,
        };
        s.apply(Command::CreateSubnet { subnet }).unwrap();
        let mut g = security::default_group(&s.vpcs["vpc-b"]);
        (g.id, g.name) = ("sg-web".into(), "web".into());
        s.apply(Command::CreateSecurityGroup { group: g }).unwrap();
        let a = RunSpec {
            az: "az-1".into(),
            ..spec()
        };
        launch(&mut s, &["i-a1", "i-a2"], a);
        let mut b = spec();
        b.subnet_id = "subnet-b".into();
        b.security_group_ids = vec!["sg-web".into()];
        b.tags.insert("tier".into(), "web".into());
        launch(&mut s, &["i-b1"], b);
        s
    }

    fn ids(s: &ClusterState, f: InterfaceFilter) -> Vec<String> {
        describe_interfaces(s, &f)
            .unwrap()
            .0
            .into_iter()
            .map(|x| x.id)
            .collect()
    }

    #[test]
    fn every_instance_has_one_interface_with_its_record() {
        let s = two_vpcs();
        let all = describe_interfaces(&s, &InterfaceFilter::default())
            .unwrap()
            .0;
        assert_eq!(all.len(), 3);
        let b = all.iter().find(|x| x.instance_id == "i-b1").unwrap();
        assert_eq!(b.id, "eni-b1");
        assert_eq!(Some(&b.net), s.instances["i-b1"].network.as_ref());
        assert_eq!(b.groups, vec![("sg-web".to_string(), "web".to_string())]);
        assert_eq!((b.az.as_str(), b.host_id.as_str()), ("az-1", "h1"));
        assert_eq!(b.tags["tier"], "web");
        assert_eq!(interface_id("i-0123456789abcdef"), "eni-0123456789abcdef");
    }

    #[test]
    fn filters_pick_exactly_the_matching_interfaces() {
        let s = two_vpcs();
        let a1 = s.instances["i-a1"].network.clone().unwrap();
        let f = |net: NetFilter| InterfaceFilter {
            net,
            ..Default::default()
        };
        let v = |x: &str| vec![x.to_string()];
        let b = v("eni-b1");
        let default_vpc = a1.vpc_id.clone();
        assert_eq!(
            ids(
                &s,
                f(NetFilter {
                    vpcs: v("vpc-b"),
                    ..Default::default()
                })
            ),
            b
        );
        assert_eq!(
            ids(
                &s,
                f(NetFilter {
                    vpcs: v(&default_vpc),
                    ..Default::default()
                })
            ),
            ["eni-a1", "eni-a2"]
        );
        assert_eq!(
            ids(
                &s,
                f(NetFilter {
                    subnets: v("subnet-b"),
                    ..Default::default()
                })
            ),
            b
        );
        assert_eq!(
            ids(
                &s,
                f(NetFilter {
                    private_ips: v(&a1.private_ip),
                    ..Default::default()
                })
            ),
            ["eni-a1"]
        );
        assert_eq!(
            ids(
                &s,
                f(NetFilter {
                    group_names: v("web"),
                    ..Default::default()
                })
            ),
            b
        );
        assert_eq!(
            ids(
                &s,
                f(NetFilter {
                    group_ids: v("sg-web"),
                    ..Default::default()
                })
            ),
            b
        );
        let by = |g: InterfaceFilter| ids(&s, g);
        assert_eq!(
            by(InterfaceFilter {
                instances: v("i-a2"),
                ..Default::default()
            }),
            ["eni-a2"]
        );
        assert_eq!(
            by(InterfaceFilter {
                macs: v(&a1.mac.to_uppercase()),
                ..Default::default()
            }),
            ["eni-a1"]
        );
        assert_eq!(
            by(InterfaceFilter {
                ids: v("eni-a2"),
                ..Default::default()
            }),
            ["eni-a2"]
        );
        assert_eq!(
            by(InterfaceFilter {
                tags: vec![("tier".into(), String::new())],
                ..Default::default()
            }),
            b
        );
        assert!(by(InterfaceFilter {
            azs: v("az-2"),
            ..Default::default()
        })
        .is_empty());
    }

    #[test]
    fn pages_bad_values_and_gone_instances() {
        let mut s = two_vpcs();
        let page = |token: &str| {
            let f = InterfaceFilter {
                max_results: 2,
                next_token: token.into(),
                ..Default::default()
            };
            describe_interfaces(&s, &f).unwrap()
        };
        let (first, next) = page("");
        assert_eq!((first.len(), next.as_str()), (2, "eni-a2"));
        let (rest, next) = page("eni-a2");
        assert_eq!(
            (rest[0].id.as_str(), rest.len(), next.as_str()),
            ("eni-b1", 1, "")
        );
        let bad = |f: InterfaceFilter, field: &str| {
            let e = describe_interfaces(&s, &f).unwrap_err();
            assert!(
                matches!(&e, E::InvalidArgument(m) if m.starts_with(field)),
                "{e}"
            );
        };
        bad(
            InterfaceFilter {
                macs: vec!["02:fc:zz:00:00:01".into()],
                ..Default::default()
            },
            "mac_addresses:",
        );
        bad(
            InterfaceFilter {
                ids: vec!["i-a1".into()],
                ..Default::default()
            },
            "network_interface_ids:",
        );
        bad(
            InterfaceFilter {
                max_results: 1001,
                ..Default::default()
            },
            "max_results:",
        );
        let f = InterfaceFilter {
            net: NetFilter {
                private_ips: vec!["10.1.1".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        bad(f, "private_ip_addresses:");
        let unknown = InterfaceFilter {
            ids: vec!["eni-zz".into()],
            ..Default::default()
        };
        assert!(matches!(
            describe_interfaces(&s, &unknown),
            Err(E::NotFound(_))
        ));
        // Gone (terminated and deleted from its host): no interface.
        let i = s.instances.get_mut("i-a1").unwrap();
        (i.desired, i.observed) = (DesiredState::Terminated, ObservedState::Absent);
        assert_eq!(ids(&s, InterfaceFilter::default()), ["eni-a2", "eni-b1"]);
    }
}
