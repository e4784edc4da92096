//! VPCs and subnets: their blocks checked ([`crate::net::Cidr`]), subnets
//! inside their VPC and never overlapping, the default VPC with one
//! default subnet per zone, and nothing deleted that something still uses
//! (EC2's DependencyViolation), and the addresses of interfaces (IPAM).
//! Security groups are in `security`.

use super::query::{any_of, check_exist, Listing, Page};
use super::*;
use crate::net::Cidr;

/// The default VPC's block, as EC2's.
pub const DEFAULT_VPC_CIDR: &str = "172.31.0.0/16";
/// The prefix of the default subnets (one per zone).
pub const DEFAULT_SUBNET_PREFIX: u8 = 20;

fn block(field: &str, cidr: &str) -> Result<Cidr, StateError> {
    let c = Cidr::parse(cidr).map_err(|e| E::InvalidArgument(format!("{field}: {e}")))?;
    if !(16..=28).contains(&c.prefix()) {
        return invalid(format!(
            "{field}: {c} is a /{}; a block must be /16 to /28",
            c.prefix()
        ));
    }
    Ok(c)
}

pub(super) fn dependency(m: String) -> StateError {
    E::FailedPrecondition(format!("DependencyViolation: {m}"))
}

/// The MAC of instance `id`'s primary interface: locally administered
/// `02:fc:` and four bytes of the id.
pub fn mac_of(id: &str) -> String {
    // FNV-1a of the id: stable, and spread over the four bytes.
    let h = id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!(
        "02:fc:{:02x}:{:02x}:{:02x}:{:02x}",
        (h >> 24) as u8,
        (h >> 16) as u8,
        (h >> 8) as u8,
        h as u8
    )
}

/// What one launch knows of each subnet's addresses: those in use (and by
/// whom) and where the search for the lowest free one goes on.
#[derive(Debug, Default)]
pub struct Ipam(std::collections::HashMap<String, (BTreeMap<u32, String>, u32)>);

impl ClusterState {
    /// The subnet an instance launched with `spec` lands in, checked: the
    /// given one (which pins the zone), else none yet (the zone's default
    /// subnet once placed).
    pub(super) fn launch_subnet(&self, spec: &RunSpec) -> Result<Option<&Subnet>, StateError> {
        if !spec.private_ip.is_empty() && spec.count != 1 {
            return invalid("private_ip_address: only with count 1");
        }
        if spec.subnet_id.is_empty() {
            if !spec.private_ip.is_empty() {
                return invalid("private_ip_address: needs subnet_id");
            }
            return Ok(None);
        }
        let Some(s) = self.subnets.get(&spec.subnet_id) else {
            return Err(E::NotFound(format!(
                "subnet_id: no subnet {:?}",
                spec.subnet_id
            )));
        };
        if !spec.az.is_empty() && spec.az != s.az {
            return invalid(format!(
                "availability_zone: subnet {} is in {}, not {}",
                s.id, s.az, spec.az
            ));
        }
        Ok(Some(s))
    }

    /// The subnets an instance placed in zone `az` without a subnet may
    /// get its address from: the default VPC's subnets of that zone, its
    /// default subnet first (more subnets added to the default VPC take
    /// over when the default one is full).
    pub(super) fn default_subnets(&self, az: &str) -> Vec<Subnet> {
        let Some(vpc) = self.vpcs.values().find(|v| v.is_default) else {
            return vec![];
        };
        let mut v: Vec<Subnet> = self
            .subnets
            .values()
            .filter(|s| s.vpc_id == vpc.id && s.az == az)
            .cloned()
            .collect();
        v.sort_by_key(|s| !s.is_default);
        v
    }

    /// Addresses in use in subnet `subnet_id` (by instances not gone).
    fn used_addresses(&self, subnet_id: &str) -> BTreeMap<u32, String> {
        self.instances
            .values()
            .filter(|i| !i.is_final())
            .filter_map(|i| {
                let n = i.network.as_ref()?;
                (n.subnet_id == subnet_id)
                    .then(|| n.private_ip.parse::<std::net::Ipv4Addr>().ok())
                    .flatten()
                    .map(|a| (u32::from(a), i.id.clone()))
            })
            .collect()
    }

    /// An interface for instance `id` in `subnet`: `want` if given (and
    /// free), else the lowest free address. `ipam` holds what one launch
    /// has learnt and given out so far (read from the state once per
    /// subnet).
    pub(super) fn allocate(
        &self,
        id: &str,
        subnet: &Subnet,
        want: &str,
        groups: &[String],
        ipam: &mut Ipam,
    ) -> Result<Interface, StateError> {
        let security_groups = self.interface_groups(&subnet.vpc_id, groups)?;
        let c = Cidr::parse(&subnet.cidr).map_err(E::InvalidArgument)?;
        let first = u32::from(c.network()) + 4;
        let last = u32::from(c.network()) + (c.size() as u32) - 2;
        let pool = ipam
            .0
            .entry(subnet.id.clone())
            .or_insert_with(|| (self.used_addresses(&subnet.id), first));
        let (used, cursor) = pool;
        let addr = if want.is_empty() {
            // Everything below the cursor is taken (it only moves past
            // addresses found taken or given out).
            let found = (*cursor..=last).find(|a| !used.contains_key(a));
            let a = found.ok_or_else(|| {
                E::ResourceExhausted(format!(
                    "subnet_id: subnet {} ({}) has no free address",
                    subnet.id, subnet.cidr
                ))
            })?;
            *cursor = a + 1;
            a
        } else {
            let a: std::net::Ipv4Addr = want.parse().map_err(|_| {
                E::InvalidArgument(format!(
                    "private_ip_address: {want:?} is not an IPv4 address"
                ))
            })?;
            if !c.assignable(a) {
                return invalid(format!(
                    "private_ip_address: {a} is not an address instances may have in {} \
                     (outside it, or one of the five it keeps)",
                    subnet.cidr
                ));
            }
            if let Some(by) = used.get(&u32::from(a)) {
                return Err(E::AlreadyExists(format!(
                    "private_ip_address: {a} is in use by {by}"
                )));
            }
            u32::from(a)
        };
        used.insert(addr, id.to_string());
        Ok(Interface {
            subnet_id: subnet.id.clone(),
            vpc_id: subnet.vpc_id.clone(),
            private_ip: std::net::Ipv4Addr::from(addr).to_string(),
            mac: mac_of(id),
            security_groups,
            tap: String::new(),
        })
    }

    pub(super) fn create_vpc(&mut self, mut vpc: Vpc) -> Response {
        let c = block("cidr_block", &vpc.cidr)?;
        check_tags(&vpc.tags)?;
        if self.vpcs.contains_key(&vpc.id) {
            return Err(E::AlreadyExists(format!("vpc_id: {} exists", vpc.id)));
        }
        if vpc.is_default && self.vpcs.values().any(|v| v.is_default) {
            return Err(E::AlreadyExists("the default VPC exists".into()));
        }
        vpc.cidr = c.to_string();
        if vpc.vni == 0 || self.vpcs.values().any(|v| v.vni == vpc.vni) {
            vpc.vni = self.free_vni();
        }
        if vpc.vni == 0 {
            return Err(E::ResourceExhausted(
                "no free VXLAN network identifier".into(),
            ));
        }
        let g = super::security::default_group(&vpc);
        self.security_groups.insert(g.id.clone(), g);
        self.vpcs.insert(vpc.id.clone(), vpc.clone());
        Ok(Output::Vpc(vpc))
    }

    pub(super) fn delete_vpc(&mut self, id: &str) -> Response {
        if !self.vpcs.contains_key(id) {
            return Err(E::NotFound(format!("vpc_id: no VPC {id:?}")));
        }
        let subnets: Vec<&str> = self
            .subnets
            .values()
            .filter(|s| s.vpc_id == id)
            .map(|s| s.id.as_str())
            .collect();
        if !subnets.is_empty() {
            return Err(dependency(format!(
                "VPC {id} still has subnets {}",
                subnets.join(", ")
            )));
        }
        let default = super::security::default_group_id(id);
        let groups: Vec<&str> = self
            .security_groups
            .values()
            .filter(|g| g.vpc_id == id && g.id != default)
            .map(|g| g.id.as_str())
            .collect();
        if !groups.is_empty() {
            return Err(dependency(format!(
                "VPC {id} still has security groups {}",
                groups.join(", ")
            )));
        }
        self.security_groups.remove(&default);
        self.vpcs.remove(id);
        Ok(Output::Done)
    }

    pub(super) fn create_subnet(&mut self, mut subnet: Subnet) -> Response {
        let Some(vpc) = self.vpcs.get(&subnet.vpc_id) else {
            return Err(E::NotFound(format!("vpc_id: no VPC {:?}", subnet.vpc_id)));
        };
        let c = block("cidr_block", &subnet.cidr)?;
        let v = Cidr::parse(&vpc.cidr).map_err(E::InvalidArgument)?;
        if !v.contains(&c) {
            return invalid(format!("cidr_block: {c} is not inside the VPC's {v}"));
        }
        if !self.azs.contains_key(&subnet.az) {
            return Err(E::NotFound(format!(
                "availability_zone: no zone {:?}",
                subnet.az
            )));
        }
        check_tags(&subnet.tags)?;
        if let Some(o) = self.subnets.values().find(|o| {
            o.vpc_id == subnet.vpc_id && Cidr::parse(&o.cidr).is_ok_and(|oc| oc.overlaps(&c))
        }) {
            return invalid(format!(
                "cidr_block: {c} overlaps subnet {} ({})",
                o.id, o.cidr
            ));
        }
        if self.subnets.contains_key(&subnet.id) {
            return Err(E::AlreadyExists(format!("subnet_id: {} exists", subnet.id)));
        }
        subnet.cidr = c.to_string();
        self.subnets.insert(subnet.id.clone(), subnet.clone());
        Ok(Output::Subnet(subnet))
    }

    pub(super) fn delete_subnet(&mut self, id: &str) -> Response {
        if !self.subnets.contains_key(id) {
            return Err(E::NotFound(format!("subnet_id: no subnet {id:?}")));
        }
        let users: Vec<&str> = self
            .instances
            .values()
            .filter(|i| !i.is_final())
            .filter(|i| i.network.as_ref().is_some_and(|n| n.subnet_id == id))
            .map(|i| i.id.as_str())
            .collect();
        if !users.is_empty() {
            return Err(dependency(format!(
                "subnet {id} is in use by {}",
                users.join(", ")
            )));
        }
        self.subnets.remove(id);
        Ok(Output::Done)
    }

    /// The default VPC and a default subnet per zone (in zone order), with
    /// the given ids; nothing if a default VPC exists.
    pub(super) fn create_default_vpc(
        &mut self,
        vpc_id: String,
        subnet_ids: Vec<String>,
        now_ms: u64,
    ) -> Response {
        if self.vpcs.values().any(|v| v.is_default) {
            return Ok(Output::Done);
        }
        let c = Cidr::parse(DEFAULT_VPC_CIDR).map_err(E::InvalidArgument)?;
        let azs: Vec<String> = self.azs.keys().cloned().collect();
        if subnet_ids.len() < azs.len() {
            return invalid("subnet_ids: one per zone is needed");
        }
        self.create_vpc(Vpc {
            id: vpc_id.clone(),
            cidr: c.to_string(),
            is_default: true,
            tags: Tags::new(),
            created_at_ms: now_ms,
            vni: 0,
        })?;
        for (i, (az, id)) in azs.into_iter().zip(subnet_ids).enumerate() {
            let Some(sub) = c.subblock(DEFAULT_SUBNET_PREFIX, i as u32) else {
                break;
            };
            self.create_subnet(Subnet {
                id,
                vpc_id: vpc_id.clone(),
                cidr: sub.to_string(),
                az,
                is_default: true,
                tags: Tags::new(),
                created_at_ms: now_ms,
            })?;
        }
        Ok(Output::Done)
    }
}

/// What DescribeVpcs asks for: ids, tags, paging (0: all at once).
pub type VpcFilter = Listing;

/// DescribeVpcs over a state: filter, order by id, page.
pub fn describe_vpcs(s: &ClusterState, f: &VpcFilter) -> Result<Page<Vpc>, StateError> {
    f.select(
        &s.vpcs,
        ("vpc_ids", "VPC"),
        usize::MAX,
        |v| &v.tags,
        |_| true,
    )
}

/// What DescribeSubnets asks for.
#[derive(Clone, Debug, Default)]
pub struct SubnetFilter {
    /// Ids, tags and paging (0: all at once).
    pub list: Listing,
    /// Only of these VPCs (all must exist).
    pub vpcs: Vec<String>,
    /// Only in these zones.
    pub azs: Vec<String>,
}

/// DescribeSubnets over a state: filter, order by id, page.
pub fn describe_subnets(s: &ClusterState, f: &SubnetFilter) -> Result<Page<Subnet>, StateError> {
    check_exist(&s.vpcs, &f.vpcs, "vpc_ids", "VPC")?;
    let keep = |x: &Subnet| any_of(&f.vpcs, &x.vpc_id) && any_of(&f.azs, &x.az);
    let what = ("subnet_ids", "subnet");
    f.list
        .select(&s.subnets, what, usize::MAX, |x| &x.tags, keep)
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use ferro_raft::StateMachine;

    fn vpc(id: &str, cidr: &str) -> Command {
        Command::CreateVpc {
            vpc: Vpc {
                id: id.into(),
                cidr: cidr.into(),
                is_default: false,
                tags: Tags::new(),
                created_at_ms: 1,
                vni: 0,
            },
        }
    }

    fn subnet(id: &str, vpc: &str, cidr: &str, az: &str) -> Command {
        Command::CreateSubnet {
            subnet: Subnet {
                id: id.into(),
                vpc_id: vpc.into(),
                cidr: cidr.into(),
                az: az.into(),
                is_default: false,
                tags: Tags::new(),
                created_at_ms: 1,
            },
        }
    }

    fn launch(s: &mut ClusterState, seq: &mut u64, n: u32, subnet: &str, ip: &str) -> Response {
        run(
            s,
            n,
            seq,
            RunSpec {
                subnet_id: subnet.into(),
                private_ip: ip.into(),
                ..spec()
            },
        )
    }

    fn ips(s: &ClusterState, subnet: &str) -> Vec<String> {
        let mut v: Vec<String> = s
            .instances
            .values()
            .filter(|i| !i.is_final())
            .filter_map(|i| i.network.as_ref())
            .filter(|n| n.subnet_id == subnet)
            .map(|n| n.private_ip.clone())
            .collect();
        v.sort();
        v
    }

    /// Every instance gets a primary interface: the default subnet of its
    /// zone unless given one (which pins the zone); the lowest free address
    /// (never the first four or the last), or the one asked for if free;
    /// freed when the instance is gone; nothing changes on a refusal.
    #[test]
    fn addresses_are_unique_reserved_ones_skipped_and_freed_when_gone() {
        let mut s = bootstrapped();
        s.apply(Command::CreateDefaultVpc {
            vpc_id: "vpc-d".into(),
            subnet_ids: vec!["subnet-d1".into(), "subnet-d2".into()],
            now_ms: 1,
        })
        .unwrap();
        add_host(&mut s, "h1", "az-1", 64, 65536);
        add_image(&mut s);
        let mut seq = 0;
        launch(&mut s, &mut seq, 2, "", "").unwrap();
        assert_eq!(ips(&s, "subnet-d1"), vec!["172.31.0.4", "172.31.0.5"]);
        let macs: std::collections::BTreeSet<_> = s
            .instances
            .values()
            .map(|i| i.network.as_ref().unwrap().mac.clone())
            .collect();
        assert_eq!(macs.len(), 2);
        assert!(macs.iter().all(|m| m.starts_with("02:fc:")));

        s.apply(vpc("vpc-a", "10.0.0.0/16")).unwrap();
        s.apply(subnet("subnet-a", "vpc-a", "10.0.1.0/28", "az-1"))
            .unwrap();
        s.apply(subnet("subnet-b", "vpc-a", "10.0.2.0/28", "az-2"))
            .unwrap();
        launch(&mut s, &mut seq, 1, "subnet-a", "10.0.1.9").unwrap();
        let before = s.instances.len();
        let e = launch(&mut s, &mut seq, 1, "subnet-a", "10.0.1.9").unwrap_err();
        assert!(
            matches!(e, E::AlreadyExists(_)) && e.to_string().contains("in use by"),
            "{e}"
        );
        for bad in ["10.0.1.3", "10.0.1.15", "10.0.2.4", "x"] {
            let e = launch(&mut s, &mut seq, 1, "subnet-a", bad).unwrap_err();
            assert!(e.to_string().contains("private_ip_address"), "{bad}: {e}");
        }
        let e = launch(&mut s, &mut seq, 2, "subnet-a", "10.0.1.10").unwrap_err();
        assert!(e.to_string().contains("only with count 1"), "{e}");
        // A subnet pins the zone: no host in az-2.
        let e = launch(&mut s, &mut seq, 1, "subnet-b", "").unwrap_err();
        assert!(matches!(e, E::ResourceExhausted(_)), "{e}");
        let e = run(
            &mut s,
            1,
            &mut seq,
            RunSpec {
                subnet_id: "subnet-b".into(),
                az: "az-1".into(),
                ..spec()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("subnet subnet-b is in az-2"), "{e}");
        assert_eq!(s.instances.len(), before, "refusals changed nothing");
        // A /28 gives 11 addresses: 1 taken, 10 more fit, then none.
        launch(&mut s, &mut seq, 10, "subnet-a", "").unwrap();
        assert_eq!(ips(&s, "subnet-a").len(), 11);
        let e = launch(&mut s, &mut seq, 1, "subnet-a", "").unwrap_err();
        assert!(e.to_string().contains("has no free address"), "{e}");
        // One gone: its address is free again.
        let gone = s
            .instances
            .values()
            .find(|i| {
                i.network
                    .as_ref()
                    .is_some_and(|n| n.private_ip == "10.0.1.9")
            })
            .unwrap()
            .id
            .clone();
        let e = s
            .apply(Command::DeleteSubnet {
                id: "subnet-a".into(),
            })
            .unwrap_err();
        assert!(e.to_string().contains("DependencyViolation"), "{e}");
        s.apply(Command::SetDesired {
            ids: vec![gone.clone()],
            desired: DesiredState::Terminated,
        })
        .unwrap();
        s.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![Observation {
                instance_id: gone,
                state: ObservedState::Absent,
                reason: String::new(),
                stopped_by_guest: false,
                seq: 0,
                tap: String::new(),
            }],
        })
        .unwrap();
        launch(&mut s, &mut seq, 1, "subnet-a", "").unwrap();
        assert!(ips(&s, "subnet-a").contains(&"10.0.1.9".to_string()));
    }

    #[test]
    fn the_default_vpc_has_a_subnet_per_zone() {
        let mut s = bootstrapped();
        s.apply(Command::CreateDefaultVpc {
            vpc_id: "vpc-d".into(),
            subnet_ids: vec!["subnet-1".into(), "subnet-2".into()],
            now_ms: 1,
        })
        .unwrap();
        assert_eq!(s.vpcs["vpc-d"].cidr, "172.31.0.0/16");
        let cidrs: Vec<(&str, &str)> = s
            .subnets
            .values()
            .map(|x| (x.az.as_str(), x.cidr.as_str()))
            .collect();
        assert_eq!(
            cidrs,
            vec![("az-1", "172.31.0.0/20"), ("az-2", "172.31.16.0/20")]
        );
        // Again: nothing new.
        s.apply(Command::CreateDefaultVpc {
            vpc_id: "vpc-e".into(),
            subnet_ids: vec!["subnet-3".into(), "subnet-4".into()],
            now_ms: 2,
        })
        .unwrap();
        assert_eq!(s.vpcs.len(), 1);
    }

    #[test]
    fn bad_blocks_overlaps_and_dependencies_are_refused_naming_the_field() {
        let mut s = bootstrapped();
        let err = |s: &mut ClusterState, c| s.apply(c).unwrap_err().to_string();
        let e = err(&mut s, vpc("vpc-a", "10.0.0.0/8"));
        assert!(e.contains("cidr_block") && e.contains("/16 to /28"), "{e}");
        let e = err(&mut s, vpc("vpc-a", "10.0.0.1/16"));
        assert!(e.contains("not a network address"), "{e}");
        s.apply(vpc("vpc-a", "10.0.0.0/16")).unwrap();
        s.apply(subnet("subnet-a", "vpc-a", "10.0.1.0/24", "az-1"))
            .unwrap();
        let e = err(&mut s, subnet("subnet-b", "vpc-a", "10.0.1.128/25", "az-1"));
        assert!(e.contains("overlaps subnet subnet-a"), "{e}");
        let e = err(&mut s, subnet("subnet-b", "vpc-a", "10.1.0.0/24", "az-1"));
        assert!(e.contains("not inside the VPC's 10.0.0.0/16"), "{e}");
        let e = err(&mut s, subnet("subnet-b", "vpc-a", "10.0.2.0/24", "az-9"));
        assert!(e.contains("availability_zone"), "{e}");
        let e = err(&mut s, subnet("subnet-b", "vpc-x", "10.0.2.0/24", "az-1"));
        assert!(e.contains("vpc_id"), "{e}");
        // The same block in another VPC is fine.
        s.apply(vpc("vpc-b", "10.0.0.0/16")).unwrap();
        s.apply(subnet("subnet-c", "vpc-b", "10.0.1.0/24", "az-1"))
            .unwrap();
        let e = err(&mut s, Command::DeleteVpc { id: "vpc-a".into() });
        assert!(
            e.contains("DependencyViolation") && e.contains("subnet-a"),
            "{e}"
        );
        assert!(s.vpcs.contains_key("vpc-a"), "nothing changed");
        s.apply(Command::DeleteSubnet {
            id: "subnet-a".into(),
        })
        .unwrap();
        s.apply(Command::DeleteVpc { id: "vpc-a".into() }).unwrap();
        let e = err(&mut s, Command::DeleteVpc { id: "vpc-a".into() });
        assert!(e.contains("no VPC"), "{e}");
    }

    fn tag(s: &mut ClusterState, id: &str, k: &str) {
        s.apply(Command::CreateTags {
            resource_ids: vec![id.into()],
            tags: [(k.to_string(), "1".to_string())].into(),
        })
        .unwrap();
    }

    /// Tag and VPC filters, pages (all at once when max_results is 0),
    /// unknown ids and bad page sizes naming the field.
    #[test]
    fn vpcs_and_subnets_filter_by_tags_and_page() {
        let mut s = bootstrapped();
        for (id, cidr) in [
            ("vpc-1", "10.1.0.0/16"),
            ("vpc-2", "10.2.0.0/16"),
            ("vpc-3", "10.3.0.0/16"),
        ] {
            s.apply(vpc(id, cidr)).unwrap();
        }
        for (id, v, cidr) in [
            ("subnet-1", "vpc-1", "10.1.1.0/24"),
            ("subnet-2", "vpc-1", "10.1.2.0/24"),
            ("subnet-3", "vpc-2", "10.2.1.0/24"),
        ] {
            s.apply(subnet(id, v, cidr, "az-1")).unwrap();
        }
        tag(&mut s, "vpc-2", "env");
        tag(&mut s, "subnet-2", "env");
        let ids = |p: Page<Vpc>| p.0.into_iter().map(|v| v.id).collect::<Vec<_>>();
        let tagged = |k: &str| vec![(k.to_string(), String::new())];
        let all = describe_vpcs(&s, &VpcFilter::default()).unwrap();
        assert_eq!(ids(all), ["vpc-1", "vpc-2", "vpc-3"]);
        let env = VpcFilter {
            tags: tagged("env"),
            ..Default::default()
        };
        assert_eq!(ids(describe_vpcs(&s, &env).unwrap()), ["vpc-2"]);
        let page = VpcFilter {
            max_results: 2,
            ..Default::default()
        };
        let (first, next) = describe_vpcs(&s, &page).unwrap();
        assert_eq!((first.len(), next.as_str()), (2, "vpc-2"));
        let rest = VpcFilter {
            next_token: next,
            ..page
        };
        assert_eq!(ids(describe_vpcs(&s, &rest).unwrap()), ["vpc-3"]);
        let sub = |f: SubnetFilter| {
            describe_subnets(&s, &f).map(|p| p.0.into_iter().map(|x| x.id).collect::<Vec<_>>())
        };
        let in_vpc1 = SubnetFilter {
            vpcs: vec!["vpc-1".into()],
            ..Default::default()
        };
        assert_eq!(sub(in_vpc1.clone()).unwrap(), ["subnet-1", "subnet-2"]);
        let env = SubnetFilter {
            list: Listing {
                tags: tagged("env"),
                ..Default::default()
            },
            ..in_vpc1
        };
        assert_eq!(sub(env).unwrap(), ["subnet-2"]);
        let az2 = SubnetFilter {
            azs: vec!["az-2".into()],
            ..Default::default()
        };
        assert!(sub(az2).unwrap().is_empty());
        let unknown = SubnetFilter {
            vpcs: vec!["vpc-9".into()],
            ..Default::default()
        };
        assert!(matches!(sub(unknown), Err(E::NotFound(m)) if m.starts_with("vpc_ids:")));
        let unknown = VpcFilter {
            ids: vec!["vpc-9".into()],
            ..Default::default()
        };
        assert!(
            matches!(describe_vpcs(&s, &unknown), Err(E::NotFound(m)) if m.starts_with("vpc_ids:"))
        );
        let big = SubnetFilter {
            list: Listing {
                max_results: 1001,
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(matches!(sub(big), Err(E::InvalidArgument(m)) if m.starts_with("max_results:")));
    }
}
