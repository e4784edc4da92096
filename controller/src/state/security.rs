//! Security groups: per-VPC sets of stateful allow rules, the default group
//! every VPC has, the groups of each interface, and nothing deleted that an
//! interface or another group's rule still uses (DependencyViolation).
//!
//! What a host enforces is derived from this state by
//! [`ClusterState::host_network`](super::ClusterState::host_network); the
//! rules here are only validated and kept.

use super::network::dependency;
use super::query::{any_of, check_exist, Listing, Page};
use super::*;
use crate::net::Cidr;

/// The most groups one interface may be in (EC2's default quota).
pub const MAX_GROUPS_PER_INTERFACE: usize = 5;
/// The most rules per direction of one group.
pub const MAX_RULES_PER_DIRECTION: usize = 60;

/// The id of `vpc_id`'s default group: `sg-` and the VPC id's hex, so it
/// is known without a lookup and made with the VPC in one command.
pub fn default_group_id(vpc_id: &str) -> String {
    format!("sg-{}", vpc_id.trim_start_matches("vpc-"))
}

/// Everything out (as EC2 gives a new group).
fn allow_all_out() -> SgRule {
    SgRule {
        protocol: Protocol::All,
        from_port: 0,
        to_port: 0,
        peer: Peer::Cidr("0.0.0.0/0".into()),
    }
}

/// The default group of `vpc`: members reach each other, everything out.
pub(super) fn default_group(vpc: &Vpc) -> SecurityGroup {
    let id = default_group_id(&vpc.id);
    SecurityGroup {
        id: id.clone(),
        vpc_id: vpc.id.clone(),
        name: "default".into(),
        description: "default VPC security group".into(),
        ingress: vec![SgRule {
            protocol: Protocol::All,
            from_port: 0,
            to_port: 0,
            peer: Peer::Group(id),
        }],
        egress: vec![allow_all_out()],
        tags: Tags::new(),
        created_at_ms: vpc.created_at_ms,
    }
}

fn check_group_name(name: &str) -> Result<(), StateError> {
    if name.is_empty() || name.len() > 255 {
        return invalid("group_name: must be 1 to 255 characters");
    }
    if !name.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return invalid("group_name: only printable ASCII characters are allowed");
    }
    if name.starts_with("sg-") {
        return invalid("group_name: may not start with \"sg-\"");
    }
    Ok(())
}

impl ClusterState {
    /// From format 2: every VPC gets a VNI (in id order) and its default
    /// group, every interface without groups the default group of its VPC.
    pub(super) fn upgrade_to_security_groups(&mut self) {
        let ids: Vec<String> = self.vpcs.keys().cloned().collect();
        for id in ids {
            if self.vpcs[&id].vni == 0 {
                let vni = self.free_vni();
                self.vpcs.get_mut(&id).expect("listed above").vni = vni;
            }
            let g = default_group(&self.vpcs[&id]);
            self.security_groups.entry(g.id.clone()).or_insert(g);
        }
        for i in self.instances.values_mut() {
            if let Some(n) = i.network.as_mut() {
                if n.security_groups.is_empty() {
                    n.security_groups = vec![default_group_id(&n.vpc_id)];
                }
            }
        }
    }

    /// The lowest VNI no VPC has.
    pub(super) fn free_vni(&self) -> u32 {
        let used: BTreeSet<u32> = self.vpcs.values().map(|v| v.vni).collect();
        (1..=0xff_ffff).find(|n| !used.contains(n)).unwrap_or(0)
    }

    /// Checks one rule of group `sg` (of VPC `vpc_id`) and makes it
    /// canonical; `field` names it in errors.
    fn check_rule(&self, vpc_id: &str, field: &str, r: &SgRule) -> Result<SgRule, StateError> {
        let mut r = r.clone();
        if r.protocol.has_ports() {
            if r.from_port == 0 || r.from_port > r.to_port {
                return invalid(format!(
                    "{field}: ports {}-{} are not a range of 1 to 65535",
                    r.from_port, r.to_port
                ));
            }
        } else if r.from_port != 0 || r.to_port != 0 {
            return invalid(format!(
                "{field}: {} has no ports (give 0 and 0)",
                r.protocol.as_str()
            ));
        }
        r.peer = match &r.peer {
            Peer::Cidr(c) => {
                let c = Cidr::parse(c).map_err(|e| E::InvalidArgument(format!("{field}: {e}")))?;
                Peer::Cidr(c.to_string())
            }
            Peer::Group(g) => match self.security_groups.get(g) {
                None => return Err(E::NotFound(format!("{field}: no security group {g:?}"))),
                Some(o) if o.vpc_id != vpc_id => {
                    return invalid(format!(
                        "{field}: group {g} is in {}, not in {vpc_id}",
                        o.vpc_id
                    ))
                }
                Some(_) => Peer::Group(g.clone()),
            },
        };
        Ok(r)
    }

    /// The groups an interface in `vpc_id` gets: `ids` checked (existing,
    /// of that VPC, no repeats, at most five), or the VPC's default group.
    pub(super) fn interface_groups(
        &self,
        vpc_id: &str,
        ids: &[String],
    ) -> Result<Vec<String>, StateError> {
        if ids.is_empty() {
            return Ok(vec![default_group_id(vpc_id)]);
        }
        if ids.len() > MAX_GROUPS_PER_INTERFACE {
            return invalid(format!(
                "security_group_ids: at most {MAX_GROUPS_PER_INTERFACE} groups"
            ));
        }
        let mut seen = BTreeSet::new();
        for id in ids {
            let Some(g) = self.security_groups.get(id) else {
                return Err(E::NotFound(format!(
                    "security_group_ids: no security group {id:?}"
                )));
            };
            if g.vpc_id != vpc_id {
                return invalid(format!(
                    "security_group_ids: group {id} is in {}, not in the interface's {vpc_id}",
                    g.vpc_id
                ));
            }
            if !seen.insert(id) {
                return invalid(format!("security_group_ids: {id} is given twice"));
            }
        }
        Ok(ids.to_vec())
    }

    pub(super) fn create_security_group(&mut self, mut g: SecurityGroup) -> Response {
        if !self.vpcs.contains_key(&g.vpc_id) {
            return Err(E::NotFound(format!("vpc_id: no VPC {:?}", g.vpc_id)));
        }
        check_group_name(&g.name)?;
        if g.description.len() > 255 {
            return invalid("description: at most 255 characters");
        }
        check_tags(&g.tags)?;
        if self
            .security_groups
            .values()
            .any(|o| o.vpc_id == g.vpc_id && o.name == g.name)
        {
            return Err(E::AlreadyExists(format!(
                "group_name: {:?} exists in {}",
                g.name, g.vpc_id
            )));
        }
        if self.security_groups.contains_key(&g.id) {
            return Err(E::AlreadyExists(format!("group_id: {} exists", g.id)));
        }
        g.ingress.clear();
        g.egress = vec![allow_all_out()];
        self.security_groups.insert(g.id.clone(), g.clone());
        Ok(Output::SecurityGroup(g))
    }

    /// What still uses group `id`: live interfaces and other groups' rules.
    fn group_users(&self, id: &str) -> Vec<String> {
        let mut users: Vec<String> = self
            .instances
            .values()
            .filter(|i| !i.is_final())
            .filter(|i| {
                i.network
                    .as_ref()
                    .is_some_and(|n| n.security_groups.iter().any(|g| g == id))
            })
            .map(|i| i.id.clone())
            .collect();
        users.extend(
            self.security_groups
                .values()
                .filter(|g| g.id != id)
                .filter(|g| {
                    g.ingress
                        .iter()
                        .chain(&g.egress)
                        .any(|r| r.peer == Peer::Group(id.to_string()))
                })
                .map(|g| format!("the rules of {}", g.id)),
        );
        users
    }

    pub(super) fn delete_security_group(&mut self, id: &str) -> Response {
        let Some(g) = self.security_groups.get(id) else {
            return Err(E::NotFound(format!("group_id: no security group {id:?}")));
        };
        if g.name == "default" {
            return Err(dependency(format!(
                "{id} is the default group of {}; it goes with its VPC",
                g.vpc_id
            )));
        }
        let users = self.group_users(id);
        if !users.is_empty() {
            return Err(dependency(format!(
                "security group {id} is in use by {}",
                users.join(", ")
            )));
        }
        self.security_groups.remove(id);
        Ok(Output::Done)
    }

    /// Adds (`add`) or removes rules of one direction, all or none.
    pub(super) fn change_rules(
        &mut self,
        id: &str,
        egress: bool,
        rules: &[SgRule],
        add: bool,
    ) -> Response {
        let Some(g) = self.security_groups.get(id) else {
            return Err(E::NotFound(format!("group_id: no security group {id:?}")));
        };
        if rules.is_empty() {
            return invalid("rules: give at least one");
        }
        let mut list = if egress {
            g.egress.clone()
        } else {
            g.ingress.clone()
        };
        for (n, r) in rules.iter().enumerate() {
            let field = format!("rules[{n}]");
            let r = self.check_rule(&g.vpc_id, &field, r)?;
            let at = list.iter().position(|x| *x == r);
            match (add, at) {
                (true, Some(_)) => {
                    return Err(E::AlreadyExists(format!(
                        "{field}: the group has this rule already"
                    )))
                }
                (true, None) => list.push(r),
                (false, Some(i)) => {
                    list.remove(i);
                }
                (false, None) => {
                    return Err(E::NotFound(format!("{field}: the group has no such rule")))
                }
            }
        }
        if list.len() > MAX_RULES_PER_DIRECTION {
            return invalid(format!(
                "rules: a group has at most {MAX_RULES_PER_DIRECTION} rules per direction"
            ));
        }
        let g = self.security_groups.get_mut(id).expect("checked above");
        if egress {
            g.egress = list;
        } else {
            g.ingress = list;
        }
        Ok(Output::SecurityGroup(g.clone()))
    }

    /// Sets the groups of instance `id`'s primary interface.
    pub(super) fn set_instance_groups(&mut self, id: &str, groups: &[String]) -> Response {
        self.check_ids(std::slice::from_ref(&id.to_string()))?;
        if self.instances[id].desired == DesiredState::Terminated {
            return Err(E::FailedPrecondition(format!(
                "instance_id: {id} is terminated"
            )));
        }
        let groups = self.check_instance_groups(id, groups)?;
        let i = self.instances.get_mut(id).expect("checked above");
        if let Some(n) = i.network.as_mut() {
            n.security_groups = groups;
        }
        Ok(Output::Done)
    }

    /// The groups instance `id`'s primary interface may take, checked
    /// (the instance must exist).
    pub(super) fn check_instance_groups(
        &self,
        id: &str,
        groups: &[String],
    ) -> Result<Vec<String>, StateError> {
        let Some(n) = self.instances.get(id).and_then(|i| i.network.as_ref()) else {
            return Err(E::FailedPrecondition(format!(
                "instance_id: {id} has no network interface"
            )));
        };
        if groups.is_empty() {
            return invalid("security_group_ids: give at least one group");
        }
        self.interface_groups(&n.vpc_id, groups)
    }
}

/// What DescribeSecurityGroups asks for.
#[derive(Clone, Debug, Default)]
pub struct GroupFilter {
    /// Ids, tags and paging (0: all at once).
    pub list: Listing,
    /// Only of these VPCs (all must exist).
    pub vpcs: Vec<String>,
    /// Only of these names.
    pub names: Vec<String>,
}

/// DescribeSecurityGroups over a state: filter, order by id, page.
pub fn describe_security_groups(
    s: &ClusterState,
    f: &GroupFilter,
) -> Result<Page<SecurityGroup>, StateError> {
    check_exist(&s.vpcs, &f.vpcs, "vpc_ids", "VPC")?;
    let keep = |g: &SecurityGroup| any_of(&f.vpcs, &g.vpc_id) && any_of(&f.names, &g.name);
    let what = ("group_ids", "security group");
    f.list
        .select(&s.security_groups, what, usize::MAX, |g| &g.tags, keep)
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use ferro_raft::StateMachine;

    fn vpc(id: &str) -> Command {
        Command::CreateVpc {
            vpc: Vpc {
                id: id.into(),
                cidr: "10.0.0.0/16".into(),
                is_default: false,
                tags: Tags::new(),
                created_at_ms: 1,
                vni: 0,
            },
        }
    }

    fn group(id: &str, vpc: &str, name: &str) -> Command {
        Command::CreateSecurityGroup {
            group: SecurityGroup {
                id: id.into(),
                vpc_id: vpc.into(),
                name: name.into(),
                description: String::new(),
                ingress: vec![],
                egress: vec![],
                tags: Tags::new(),
                created_at_ms: 1,
            },
        }
    }

    fn tcp(port: u16, peer: Peer) -> SgRule {
        SgRule {
            protocol: Protocol::Tcp,
            from_port: port,
            to_port: port,
            peer,
        }
    }

    fn rules(id: &str, add: bool, r: Vec<SgRule>) -> Command {
        Command::ChangeSecurityGroupRules {
            group_id: id.into(),
            egress: false,
            rules: r,
            add,
        }
    }

    /// Every VPC comes with a VNI of its own and a default group whose
    /// members reach each other; a new group allows all out and nothing in.
    #[test]
    fn a_vpc_has_a_vni_and_a_default_group_a_new_group_allows_only_egress() {
        let mut s = bootstrapped();
        s.apply(vpc("vpc-a")).unwrap();
        s.apply(vpc("vpc-b")).unwrap();
        assert_eq!((s.vpcs["vpc-a"].vni, s.vpcs["vpc-b"].vni), (1, 2));
        let d = &s.security_groups[&default_group_id("vpc-a")];
        assert_eq!(d.name, "default");
        assert_eq!(d.ingress[0].peer, Peer::Group(d.id.clone()));
        s.apply(group("sg-1", "vpc-a", "web")).unwrap();
        let g = &s.security_groups["sg-1"];
        assert!(g.ingress.is_empty());
        assert_eq!(g.egress, vec![allow_all_out()]);
        // The VPC cannot go while a group of its own is left; its default
        // group goes with it, and its VNI is free again.
        let e = s
            .apply(Command::DeleteVpc { id: "vpc-a".into() })
            .unwrap_err();
        assert!(e.to_string().contains("DependencyViolation") && e.to_string().contains("sg-1"));
        s.apply(Command::DeleteSecurityGroup { id: "sg-1".into() })
            .unwrap();
        s.apply(Command::DeleteVpc { id: "vpc-a".into() }).unwrap();
        assert!(!s.security_groups.contains_key(&default_group_id("vpc-a")));
        s.apply(vpc("vpc-c")).unwrap();
        assert_eq!(s.vpcs["vpc-c"].vni, 1);
    }

    #[test]
    fn bad_groups_and_rules_are_refused_naming_the_field_and_change_nothing() {
        let mut s = bootstrapped();
        s.apply(vpc("vpc-a")).unwrap();
        s.apply(vpc("vpc-b")).unwrap();
        s.apply(group("sg-1", "vpc-a", "web")).unwrap();
        s.apply(group("sg-2", "vpc-b", "db")).unwrap();
        let err = |s: &mut ClusterState, c| s.apply(c).unwrap_err().to_string();
        assert!(err(&mut s, group("sg-3", "vpc-a", "web")).contains("exists in vpc-a"));
        assert!(err(&mut s, group("sg-3", "vpc-a", "sg-x")).contains("group_name"));
        assert!(err(&mut s, group("sg-3", "vpc-a", "")).contains("group_name"));
        assert!(err(&mut s, group("sg-3", "vpc-x", "a")).contains("vpc_id"));
        let before = s.clone();
        let bad = [
            (tcp(0, Peer::Cidr("0.0.0.0/0".into())), "ports"),
            (
                SgRule {
                    from_port: 90,
                    to_port: 80,
                    ..tcp(1, Peer::Cidr("0.0.0.0/0".into()))
                },
                "ports",
            ),
            (
                SgRule {
                    protocol: Protocol::Icmp,
                    ..tcp(1, Peer::Cidr("0.0.0.0/0".into()))
                },
                "no ports",
            ),
            (tcp(22, Peer::Cidr("10.0.0.1/8".into())), "rules[1]"),
            (tcp(22, Peer::Group("sg-2".into())), "is in vpc-b"),
            (tcp(22, Peer::Group("sg-9".into())), "no security group"),
        ];
        for (r, want) in bad {
            let ok = tcp(80, Peer::Cidr("0.0.0.0/0".into()));
            let e = err(&mut s, rules("sg-1", true, vec![ok, r]));
            assert!(e.contains(want), "{want}: {e}");
        }
        assert_eq!(s, before, "all or nothing");
        s.apply(rules(
            "sg-1",
            true,
            vec![tcp(22, Peer::Cidr("10.0.0.0/8".into()))],
        ))
        .unwrap();
        let e = err(
            &mut s,
            rules("sg-1", true, vec![tcp(22, Peer::Cidr("10.0.0.0/8".into()))]),
        );
        assert!(e.contains("has this rule already"), "{e}");
        let e = err(
            &mut s,
            rules(
                "sg-1",
                false,
                vec![tcp(23, Peer::Cidr("10.0.0.0/8".into()))],
            ),
        );
        assert!(e.contains("no such rule"), "{e}");
        s.apply(rules(
            "sg-1",
            false,
            vec![tcp(22, Peer::Cidr("10.0.0.0/8".into()))],
        ))
        .unwrap();
        assert!(s.security_groups["sg-1"].ingress.is_empty());
        // A group another group's rule names stays; the default one too.
        s.apply(group("sg-4", "vpc-a", "app")).unwrap();
        s.apply(rules(
            "sg-4",
            true,
            vec![tcp(80, Peer::Group("sg-1".into()))],
        ))
        .unwrap();
        let e = err(&mut s, Command::DeleteSecurityGroup { id: "sg-1".into() });
        assert!(
            e.contains("DependencyViolation") && e.contains("sg-4"),
            "{e}"
        );
        let e = err(
            &mut s,
            Command::DeleteSecurityGroup {
                id: default_group_id("vpc-a"),
            },
        );
        assert!(e.contains("default group"), "{e}");
    }

    /// An instance gets the VPC's default group unless given groups of its
    /// VPC; its groups can be changed while it lives, and a group in use is
    /// not deleted.
    #[test]
    fn interfaces_have_groups_of_their_vpc_which_can_change() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 64, 65536);
        add_image(&mut s);
        s.apply(vpc("vpc-a")).unwrap();
        s.apply(vpc("vpc-b")).unwrap();
        s.apply(Command::CreateSubnet {
            subnet: Subnet {
                id: "subnet-a".into(),
                vpc_id: "vpc-a".into(),
                cidr: "10.0.1.0/24".into(),
                az: "az-1".into(),
                is_default: false,
                tags: Tags::new(),
                created_at_ms: 1,
            },
        })
        .unwrap();
        s.apply(group("sg-1", "vpc-a", "web")).unwrap();
        s.apply(group("sg-2", "vpc-b", "db")).unwrap();
        let mut seq = 0;
        let launch = |s: &mut ClusterState, seq: &mut u64, groups: &[&str]| {
            run(
                s,
                1,
                seq,
                RunSpec {
                    subnet_id: "subnet-a".into(),
                    security_group_ids: groups.iter().map(|g| g.to_string()).collect(),
                    ..spec()
                },
            )
        };
        launch(&mut s, &mut seq, &[]).unwrap();
        let e = launch(&mut s, &mut seq, &["sg-2"]).unwrap_err().to_string();
        assert!(
            e.contains("security_group_ids") && e.contains("vpc-b"),
            "{e}"
        );
        let e = launch(&mut s, &mut seq, &["sg-1", "sg-1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("twice"), "{e}");
        launch(&mut s, &mut seq, &["sg-1"]).unwrap();
        let groups: Vec<Vec<String>> = s
            .instances
            .values()
            .map(|i| i.network.as_ref().unwrap().security_groups.clone())
            .collect();
        assert!(groups.contains(&vec![default_group_id("vpc-a")]));
        assert!(groups.contains(&vec!["sg-1".to_string()]));
        let e = s
            .apply(Command::DeleteSecurityGroup { id: "sg-1".into() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("in use by i-"), "{e}");
        let id = s.instances.keys().next().unwrap().clone();
        let e = s
            .apply(Command::SetSecurityGroups {
                id: id.clone(),
                groups: vec!["sg-2".into()],
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("vpc-b"), "{e}");
        s.apply(Command::SetSecurityGroups {
            id: id.clone(),
            groups: vec!["sg-1".into(), default_group_id("vpc-a")],
        })
        .unwrap();
        assert_eq!(
            s.instances[&id]
                .network
                .as_ref()
                .unwrap()
                .security_groups
                .len(),
            2
        );
    }

    /// A format-2 state (VPCs without VNIs or groups) upgrades: VNIs in id
    /// order, a default group per VPC, interfaces in it.
    #[test]
    fn a_format_2_state_gets_vnis_and_default_groups() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 64, 65536);
        add_image(&mut s);
        s.apply(vpc("vpc-a")).unwrap();
        s.apply(Command::CreateSubnet {
            subnet: Subnet {
                id: "subnet-a".into(),
                vpc_id: "vpc-a".into(),
                cidr: "10.0.1.0/24".into(),
                az: "az-1".into(),
                is_default: false,
                tags: Tags::new(),
                created_at_ms: 1,
            },
        })
        .unwrap();
        let mut seq = 0;
        run(
            &mut s,
            1,
            &mut seq,
            RunSpec {
                subnet_id: "subnet-a".into(),
                ..spec()
            },
        )
        .unwrap();
        s.apply(vpc("vpc-b")).unwrap();
        // What format 2 held.
        s.format = 2;
        s.security_groups.clear();
        for v in s.vpcs.values_mut() {
            v.vni = 0;
        }
        for i in s.instances.values_mut() {
            i.network.as_mut().unwrap().security_groups.clear();
        }
        s.upgrade().unwrap();
        assert_eq!(s.format, STATE_FORMAT);
        assert_eq!((s.vpcs["vpc-a"].vni, s.vpcs["vpc-b"].vni), (1, 2));
        assert_eq!(s.security_groups.len(), 2);
        let i = s.instances.values().next().unwrap();
        assert_eq!(
            i.network.as_ref().unwrap().security_groups,
            vec![default_group_id("vpc-a")]
        );
    }

    #[test]
    fn groups_filter_by_vpc_name_and_tags() {
        let mut s = bootstrapped();
        s.apply(vpc("vpc-1")).unwrap();
        s.apply(group("sg-web", "vpc-1", "web")).unwrap();
        s.apply(Command::CreateTags {
            resource_ids: vec!["sg-web".into()],
            tags: [("tier".to_string(), "web".to_string())].into(),
        })
        .unwrap();
        let ids = |f: GroupFilter| {
            let p = describe_security_groups(&s, &f).unwrap();
            p.0.into_iter().map(|g| g.id).collect::<Vec<_>>()
        };
        assert_eq!(ids(GroupFilter::default()), ["sg-1", "sg-web"]);
        let tagged = |v: &str| Listing {
            tags: vec![("tier".into(), v.into())],
            ..Default::default()
        };
        let web = GroupFilter {
            list: tagged("web"),
            ..Default::default()
        };
        assert_eq!(ids(web), ["sg-web"]);
        let db = GroupFilter {
            list: tagged("db"),
            ..Default::default()
        };
        assert!(ids(db).is_empty());
        let named = GroupFilter {
            names: vec!["default".into()],
            ..Default::default()
        };
        assert_eq!(ids(named), ["sg-1"]);
        let paged = GroupFilter {
            list: Listing {
                max_results: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let (one, next) = describe_security_groups(&s, &paged).unwrap();
        assert_eq!((one[0].id.as_str(), next.as_str()), ("sg-1", "sg-1"));
        let unknown = GroupFilter {
            vpcs: vec!["vpc-9".into()],
            ..Default::default()
        };
        assert!(matches!(
            describe_security_groups(&s, &unknown),
            Err(E::NotFound(_))
        ));
    }
}
