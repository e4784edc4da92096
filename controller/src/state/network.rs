//! VPCs and subnets: their blocks checked ([`crate::net::Cidr`]), subnets
//! inside their VPC and never overlapping, the default VPC with one
//! default subnet per zone, and nothing deleted that something still uses
//! (EC2's DependencyViolation). Security groups, interfaces and addresses
//! come next beside them.

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

fn dependency(m: String) -> StateError {
    E::FailedPrecondition(format!("DependencyViolation: {m}"))
}

impl ClusterState {
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
        if self.subnets.remove(id).is_none() {
            return Err(E::NotFound(format!("subnet_id: no subnet {id:?}")));
        }
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
}
