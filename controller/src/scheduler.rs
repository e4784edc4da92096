//! The scheduler: a pure function from hosts and a request to placements.
//!
//! Filters first (zone, health, free capacity, placement group), then
//! scores the hosts that pass: bin-packing (the fullest host that fits) by
//! default, spreading (the emptiest) on request. Ties go to the earlier
//! candidate, so the same input always gives the same answer — the state
//! machine runs this inside `apply`, on every replica.
//!
//! One decision is a single pass over the candidates: O(hosts), no
//! allocation. `cargo xtask bench controller --only scheduler` times it over 10,000
//! hosts.

/// A host as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Index of the host in the caller's list (returned in placements).
    pub index: usize,
    /// Zone name.
    pub az: String,
    /// Whether it heartbeats.
    pub healthy: bool,
    /// vCPUs offered.
    pub vcpus_total: u32,
    /// Memory offered, MiB.
    pub memory_total_mib: u64,
    /// vCPUs free.
    pub free_vcpus: u32,
    /// Memory free, MiB.
    pub free_memory_mib: u64,
    /// Members of the request's placement group already on it.
    pub group_members: u32,
}

/// How to rank the hosts that fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Strategy {
    /// The fullest host that fits.
    #[default]
    BinPack,
    /// The emptiest host that fits.
    Spread,
}

/// A placement group constraint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// Never two members on one host.
    Spread,
    /// Prefer hosts that already hold members.
    Cluster,
}

/// What to place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// vCPUs per instance.
    pub vcpus: u32,
    /// Memory per instance, MiB.
    pub memory_mib: u64,
    /// Only this zone, when set.
    pub az: Option<&'a str>,
    /// Placement group constraint.
    pub group: Option<Group>,
    /// Ranking.
    pub strategy: Strategy,
}

/// Why nothing could be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// No host passes the filters for instance number `placed + 1`.
    #[error("no host has room for instance {} of {count} ({vcpus} vCPUs, {memory_mib} MiB{})", .placed + 1, .az.as_ref().map_or(String::new(), |a| format!(" in {a}")))]
    NoCapacity {
        /// Instances that did fit before.
        placed: usize,
        /// Instances requested.
        count: usize,
        /// vCPUs each.
        vcpus: u32,
        /// Memory each.
        memory_mib: u64,
        /// The zone asked for.
        az: Option<String>,
    },
}

fn passes(c: &Candidate, req: &Request<'_>) -> bool {
    c.healthy
        && c.free_vcpus >= req.vcpus
        && c.free_memory_mib >= req.memory_mib
        && req.az.is_none_or(|a| a == c.az)
        && !(req.group == Some(Group::Spread) && c.group_members > 0)
}

/// Free share after placing, in thousandths summed over vCPUs and memory
/// (0..=2000). Lower means fuller.
fn free_after(c: &Candidate, req: &Request<'_>) -> u64 {
    let v = u64::from(c.free_vcpus - req.vcpus) * 1000 / u64::from(c.vcpus_total.max(1));
    let m = (c.free_memory_mib - req.memory_mib) * 1000 / c.memory_total_mib.max(1);
    v + m
}

/// Higher is better.
fn score(c: &Candidate, req: &Request<'_>) -> i64 {
    let free = free_after(c, req) as i64;
    let base = match req.strategy {
        Strategy::BinPack => 2000 - free,
        Strategy::Spread => free,
    };
    let cluster_bonus = if req.group == Some(Group::Cluster) && c.group_members > 0 {
        10_000
    } else {
        0
    };
    base + cluster_bonus
}

/// The best candidate for one instance, or `None` when none fits.
pub fn pick(candidates: &[Candidate], req: &Request<'_>) -> Option<usize> {
    let mut best: Option<(i64, usize)> = None;
    for (pos, c) in candidates.iter().enumerate() {
        if !passes(c, req) {
            continue;
        }
        let s = score(c, req);
        if best.is_none_or(|(bs, _)| s > bs) {
            best = Some((s, pos));
        }
    }
    best.map(|(_, pos)| pos)
}

/// Place `count` instances, all or nothing. Returns the chosen
/// `Candidate::index` per instance; `candidates` is updated (free capacity
/// and group members) as if they were placed.
pub fn place(
    candidates: &mut [Candidate],
    req: &Request<'_>,
    count: usize,
) -> Result<Vec<usize>, ScheduleError> {
    let mut out = Vec::with_capacity(count);
    for placed in 0..count {
        let Some(pos) = pick(candidates, req) else {
            return Err(ScheduleError::NoCapacity {
                placed,
                count,
                vcpus: req.vcpus,
                memory_mib: req.memory_mib,
                az: req.az.map(str::to_string),
            });
        };
        let c = &mut candidates[pos];
        c.free_vcpus -= req.vcpus;
        c.free_memory_mib -= req.memory_mib;
        c.group_members += 1;
        out.push(c.index);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(index: usize, az: &str, vcpus: u32, mem: u64) -> Candidate {
        Candidate {
            index,
            az: az.into(),
            healthy: true,
            vcpus_total: vcpus,
            memory_total_mib: mem,
            free_vcpus: vcpus,
            free_memory_mib: mem,
            group_members: 0,
        }
    }

    fn req(vcpus: u32, mem: u64) -> Request<'static> {
        Request {
            vcpus,
            memory_mib: mem,
            az: None,
            group: None,
            strategy: Strategy::BinPack,
        }
    }

    #[test]
    fn binpack_fills_the_fullest_host_first() {
        let mut hosts = vec![host(0, "a", 8, 8192), host(1, "a", 8, 8192)];
        hosts[1].free_vcpus = 4;
        hosts[1].free_memory_mib = 4096;
        assert_eq!(place(&mut hosts, &req(1, 512), 2).unwrap(), vec![1, 1]);
    }

    #[test]
    fn spread_strategy_picks_the_emptiest_host() {
        let mut hosts = vec![host(0, "a", 8, 8192), host(1, "a", 8, 8192)];
        let r = Request {
            strategy: Strategy::Spread,
            ..req(1, 512)
        };
        assert_eq!(place(&mut hosts, &r, 4).unwrap(), vec![0, 1, 0, 1]);
    }

    #[test]
    fn filters_zone_health_and_capacity() {
        let mut hosts = vec![
            host(0, "a", 8, 8192),
            host(1, "b", 8, 8192),
            host(2, "b", 1, 8192),
            host(3, "b", 8, 8192),
        ];
        hosts[3].healthy = false;
        let r = Request {
            az: Some("b"),
            ..req(2, 1024)
        };
        assert_eq!(place(&mut hosts, &r, 1).unwrap(), vec![1]);
    }

    #[test]
    fn never_oversubscribes_and_fails_whole() {
        let mut hosts = vec![host(0, "a", 4, 1024), host(1, "a", 4, 1024)];
        // 8 vCPUs in total: 8 instances fit, a 9th does not.
        let out = place(&mut hosts.clone(), &req(1, 128), 8).unwrap();
        assert_eq!(out.iter().filter(|&&i| i == 0).count(), 4);
        let e = place(&mut hosts, &req(1, 128), 9).unwrap_err();
        assert!(matches!(e, ScheduleError::NoCapacity { placed: 8, .. }));
        // Memory is a limit too.
        let mut hosts = vec![host(0, "a", 64, 1024)];
        assert!(place(&mut hosts, &req(1, 512), 3).is_err());
    }

    #[test]
    fn spread_group_never_shares_a_host() {
        let mut hosts: Vec<_> = (0..3).map(|i| host(i, "a", 64, 65536)).collect();
        hosts[2].group_members = 1;
        let r = Request {
            group: Some(Group::Spread),
            ..req(1, 128)
        };
        let out = place(&mut hosts, &r, 2).unwrap();
        assert_eq!(out, vec![0, 1]);
        assert!(
            place(&mut hosts, &r, 1).is_err(),
            "every host holds a member"
        );
    }

    #[test]
    fn cluster_group_prefers_hosts_with_members() {
        let mut hosts = vec![host(0, "a", 8, 8192), host(1, "a", 64, 65536)];
        hosts[1].group_members = 1;
        let r = Request {
            group: Some(Group::Cluster),
            ..req(1, 128)
        };
        assert_eq!(place(&mut hosts, &r, 2).unwrap(), vec![1, 1]);
    }

    #[test]
    fn decisions_are_deterministic() {
        let hosts: Vec<_> = (0..100).map(|i| host(i, "a", 8, 8192)).collect();
        let a = place(&mut hosts.clone(), &req(1, 256), 50).unwrap();
        let b = place(&mut hosts.clone(), &req(1, 256), 50).unwrap();
        assert_eq!(a, b);
    }
}
