//! What every Describe call shares: paging by id, tag filters, the checks
//! of ids asked for, and the filters on an instance's primary interface
//! (VPC, subnet, address, security groups) that DescribeInstances and
//! DescribeNetworkInterfaces both take.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::*;

/// A page of results and the token of the next one (empty at the end).
pub type Page<T> = (Vec<T>, String);

/// The page size when a call pages by default and `max_results` is 0.
pub const DEFAULT_PAGE: usize = 100;
/// The largest `max_results`.
pub const MAX_PAGE: u32 = 1000;

/// Where a page starts and how long it is. The token is the last id of
/// the previous page: results are ordered by id, so every match is
/// returned exactly once across pages, even if others come and go between
/// calls.
#[derive(Clone, Debug)]
pub struct Paging {
    limit: usize,
    after: String,
}

impl Paging {
    /// `max_results` (0: `default`; at most [`MAX_PAGE`]) and the token.
    pub fn new(max_results: u32, next_token: &str, default: usize) -> Result<Self, StateError> {
        let limit = match max_results {
            0 => default,
            n if n > MAX_PAGE => return invalid(format!("max_results: at most {MAX_PAGE}")),
            n => n as usize,
        };
        Ok(Self {
            limit,
            after: next_token.to_string(),
        })
    }

    /// The values of `map` (keyed by the paging id) after the token.
    pub fn rest<'a, V>(&self, map: &'a BTreeMap<String, V>) -> impl Iterator<Item = &'a V> {
        use std::ops::Bound::{Excluded, Unbounded};
        let range = if self.after.is_empty() {
            map.range::<String, _>(..)
        } else {
            map.range::<String, _>((Excluded(&self.after), Unbounded))
        };
        range.map(|(_, v)| v)
    }

    /// One page of `items` (matches, ordered by `id`).
    pub fn page<T>(&self, items: impl Iterator<Item = T>, id: impl Fn(&T) -> &str) -> Page<T> {
        let mut out: Vec<T> = items
            .filter(|x| self.after.is_empty() || id(x) > self.after.as_str())
            .take(self.limit.saturating_add(1))
            .collect();
        if out.len() <= self.limit {
            return (out, String::new());
        }
        out.truncate(self.limit);
        let next = out.last().map(|x| id(x).to_string()).unwrap_or_default();
        (out, next)
    }
}

/// One tag of one resource, as DescribeTags lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagRow {
    /// The resource's id.
    pub resource_id: String,
    /// EC2's name of its kind: `instance`, `image`, `key-pair`,
    /// `placement-group`, `vpc`, `subnet`, `security-group`, `volume`,
    /// `dedicated-host`.
    pub resource_type: &'static str,
    /// Tag key.
    pub key: String,
    /// Tag value.
    pub value: String,
    /// `resource_id key`: the paging order.
    cursor: String,
}

/// What DescribeTags asks for; each non-empty list must match (any of its
/// values).
#[derive(Clone, Debug, Default)]
pub struct TagQuery {
    /// Resource ids.
    pub resource_ids: Vec<String>,
    /// Resource types ([`TagRow::resource_type`]).
    pub resource_types: Vec<String>,
    /// Keys.
    pub keys: Vec<String>,
    /// Values.
    pub values: Vec<String>,
    /// Page size (0: 100; at most 1000).
    pub max_results: u32,
    /// Start after this cursor.
    pub next_token: String,
}

/// The tags of every taggable resource matching `q`, ordered by resource
/// id then key, one page.
pub fn describe_tags(s: &ClusterState, q: &TagQuery) -> Result<Page<TagRow>, StateError> {
    const TYPES: [&str; 9] = [
        "instance",
        "image",
        "key-pair",
        "placement-group",
        "vpc",
        "subnet",
        "security-group",
        "volume",
        "dedicated-host",
    ];
    if let Some(t) = q
        .resource_types
        .iter()
        .find(|t| !TYPES.contains(&t.as_str()))
    {
        return invalid(format!(
            "resource_types: {t:?} is not one of {}",
            TYPES.join(", ")
        ));
    }
    let paging = Paging::new(q.max_results, &q.next_token, DEFAULT_PAGE)?;
    let mut rows: Vec<TagRow> = Vec::new();
    let mut add = |id: &str, ty: &'static str, tags: &Tags| {
        if !any_of(&q.resource_ids, id)
            || !(q.resource_types.is_empty() || q.resource_types.iter().any(|t| t == ty))
        {
            return;
        }
        for (k, v) in tags {
            if any_of(&q.keys, k) && any_of(&q.values, v) {
                rows.push(TagRow {
                    resource_id: id.to_string(),
                    resource_type: ty,
                    key: k.clone(),
                    value: v.clone(),
                    cursor: format!("{id} {k}"),
                });
            }
        }
    };
    for i in s.instances.values() {
        add(&i.id, "instance", &i.tags);
    }
    for i in s.images.values() {
        add(&i.id, "image", &i.tags);
    }
    for k in s.key_pairs.values() {
        add(&k.id, "key-pair", &k.tags);
    }
    for g in s.groups.values() {
        add(&g.id, "placement-group", &g.tags);
    }
    for v in s.vpcs.values() {
        add(&v.id, "vpc", &v.tags);
    }
    for n in s.subnets.values() {
        add(&n.id, "subnet", &n.tags);
    }
    for g in s.security_groups.values() {
        add(&g.id, "security-group", &g.tags);
    }
    for v in s.volumes.values() {
        add(&v.id, "volume", &v.tags);
    }
    for h in s.hosts.values() {
        add(&h.id, "dedicated-host", &h.tags);
    }
    rows.sort_by(|a, b| a.cursor.cmp(&b.cursor));
    Ok(paging.page(rows.into_iter(), |r| r.cursor.as_str()))
}

/// Whether `tags` has every wanted (key, value); an empty value matches
/// any value.
pub fn tags_match(tags: &Tags, want: &[(String, String)]) -> bool {
    // Entries of one key are alternatives (EC2's `tag:KEY` with several
    // values); different keys must all match.
    want.iter().all(|(k, _)| {
        tags.get(k).is_some_and(|have| {
            want.iter()
                .filter(|(k2, _)| k2 == k)
                .any(|(_, v)| v.is_empty() || have == v)
        })
    })
}

/// NOT_FOUND naming `field` unless every id in `ids` is a key of `map`.
pub fn check_exist<V>(
    map: &BTreeMap<String, V>,
    ids: &[String],
    field: &str,
    what: &str,
) -> Result<(), StateError> {
    match ids.iter().find(|id| !map.contains_key(*id)) {
        Some(id) => Err(E::NotFound(format!("{field}: no {what} {id:?}"))),
        None => Ok(()),
    }
}

/// Whether a filter list lets `value` through (an empty list lets all).
pub fn any_of(list: &[String], value: &str) -> bool {
    list.is_empty() || list.iter().any(|x| x == value)
}

/// The part of a Describe call every resource has: ids, tags, paging.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// Only these ids (all must exist).
    pub ids: Vec<String>,
    /// Every (key, value) must match; an empty value matches any.
    pub tags: Vec<(String, String)>,
    /// Page size (at most 1000; 0: the call's default).
    pub max_results: u32,
    /// The last id of the previous page.
    pub next_token: String,
}

impl Listing {
    /// The values of `map` (keyed by id) that are asked for, tagged as
    /// asked and pass `keep`, in pages of `default` when `max_results` is
    /// 0. An unknown id is NOT_FOUND naming `field` (`what` names the
    /// resource in the message).
    pub fn select<V: Clone>(
        &self,
        map: &BTreeMap<String, V>,
        (field, what): (&str, &str),
        default: usize,
        tags: impl Fn(&V) -> &Tags,
        keep: impl Fn(&V) -> bool,
    ) -> Result<Page<V>, StateError> {
        check_exist(map, &self.ids, field, what)?;
        let paging = Paging::new(self.max_results, &self.next_token, default)?;
        let ids = BTreeSet::from_iter(self.ids.iter().map(String::as_str));
        let matching = map
            .iter()
            .filter(|(id, _)| ids.is_empty() || ids.contains(id.as_str()))
            .filter(|(_, v)| tags_match(tags(v), &self.tags) && keep(v));
        let (page, next) = paging.page(matching, |(id, _)| id.as_str());
        Ok((page.into_iter().map(|(_, v)| v.clone()).collect(), next))
    }
}

/// INVALID_ARGUMENT naming `field` unless every value starts with `prefix`.
fn check_prefix(field: &str, values: &[String], prefix: &str) -> Result<(), StateError> {
    match values.iter().find(|v| !v.starts_with(prefix)) {
        Some(v) => invalid(format!("{field}: {v:?} is not a {prefix}… id")),
        None => Ok(()),
    }
}

/// Filters on the primary interface of an instance.
#[derive(Clone, Debug, Default)]
pub struct NetFilter {
    /// Only in these VPCs.
    pub vpcs: Vec<String>,
    /// Only in these subnets.
    pub subnets: Vec<String>,
    /// Only with these private addresses (IPv4).
    pub private_ips: Vec<String>,
    /// Only in one of these security groups (by id).
    pub group_ids: Vec<String>,
    /// Only in one of these security groups (by name).
    pub group_names: Vec<String>,
}

impl NetFilter {
    /// Whether no filter is set (then instances without an interface
    /// match too).
    pub fn is_empty(&self) -> bool {
        self.vpcs.is_empty()
            && self.subnets.is_empty()
            && self.private_ips.is_empty()
            && self.group_ids.is_empty()
            && self.group_names.is_empty()
    }

    /// The values checked, errors naming the request's field.
    pub fn check(&self) -> Result<(), StateError> {
        check_prefix("vpc_ids", &self.vpcs, "vpc-")?;
        check_prefix("subnet_ids", &self.subnets, "subnet-")?;
        check_prefix("security_group_ids", &self.group_ids, "sg-")?;
        if let Some(ip) = self
            .private_ips
            .iter()
            .find(|ip| ip.parse::<Ipv4Addr>().is_err())
        {
            return invalid(format!(
                "private_ip_addresses: {ip:?} is not an IPv4 address"
            ));
        }
        Ok(())
    }

    /// Whether interface `n` (of state `s`) passes; `None` (no interface)
    /// passes only an empty filter.
    pub fn matches(&self, s: &ClusterState, n: Option<&Interface>) -> bool {
        let Some(n) = n else {
            return self.is_empty();
        };
        let named = |g: &String| {
            s.security_groups
                .get(g)
                .is_some_and(|g| any_of(&self.group_names, &g.name))
        };
        any_of(&self.vpcs, &n.vpc_id)
            && any_of(&self.subnets, &n.subnet_id)
            && (self.private_ips.is_empty() || self.private_ips.iter().any(|ip| same_ip(ip, n)))
            && (self.group_ids.is_empty()
                || n.security_groups.iter().any(|g| any_of(&self.group_ids, g)))
            && (self.group_names.is_empty() || n.security_groups.iter().any(named))
    }
}

/// Whether `ip` (checked IPv4) is `n`'s address, whatever its spelling.
fn same_ip(ip: &str, n: &Interface) -> bool {
    ip.parse::<Ipv4Addr>().ok() == n.private_ip.parse::<Ipv4Addr>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> BTreeMap<String, String> {
        (0..n)
            .map(|i| (format!("x-{i:03}"), format!("x-{i:03}")))
            .collect()
    }

    /// Every page of `map` with `size`, following tokens.
    fn walk(map: &BTreeMap<String, String>, size: u32) -> Vec<String> {
        let (mut all, mut token) = (vec![], String::new());
        loop {
            let p = Paging::new(size, &token, DEFAULT_PAGE).unwrap();
            let (items, next) = p.page(p.rest(map).cloned(), |s| s.as_str());
            assert!(items.len() <= size as usize);
            all.extend(items);
            if next.is_empty() {
                return all;
            }
            token = next;
        }
    }

    #[test]
    fn pages_return_every_item_exactly_once() {
        for (n, size) in [(0, 1), (1, 1), (7, 3), (9, 3), (10, 1), (250, 100)] {
            let map = ids(n);
            let want: Vec<String> = map.keys().cloned().collect();
            assert_eq!(walk(&map, size), want, "{n} items in pages of {size}");
        }
        // The default page, and a token naming an id that is gone.
        let map = ids(150);
        let p = Paging::new(0, "", DEFAULT_PAGE).unwrap();
        let (first, next) = p.page(p.rest(&map), |s| s.as_str());
        assert_eq!((first.len(), next.as_str()), (100, "x-099"));
        let p = Paging::new(0, "x-0995", usize::MAX).unwrap();
        let (rest, next) = p.page(p.rest(&map), |s| s.as_str());
        assert_eq!((rest.len(), next.as_str()), (50, ""));
        assert_eq!(rest[0], "x-100");
    }

    #[test]
    fn bad_page_sizes_and_filter_values_name_the_field() {
        let e = Paging::new(1001, "", DEFAULT_PAGE).unwrap_err();
        assert!(matches!(&e, E::InvalidArgument(m) if m.starts_with("max_results:")));
        assert!(Paging::new(1000, "", DEFAULT_PAGE).is_ok());
        let cases = [
            (
                NetFilter {
                    private_ips: vec!["10.0.0.300".into()],
                    ..Default::default()
                },
                "private_ip_addresses:",
            ),
            (
                NetFilter {
                    vpcs: vec!["subnet-1".into()],
                    ..Default::default()
                },
                "vpc_ids:",
            ),
            (
                NetFilter {
                    subnets: vec!["vpc-1".into()],
                    ..Default::default()
                },
                "subnet_ids:",
            ),
            (
                NetFilter {
                    group_ids: vec!["default".into()],
                    ..Default::default()
                },
                "security_group_ids:",
            ),
        ];
        for (f, field) in cases {
            let e = f.check().unwrap_err();
            assert!(
                matches!(&e, E::InvalidArgument(m) if m.starts_with(field)),
                "{e}"
            );
        }
    }

    #[test]
    fn interface_filters_match_each_field() {
        let mut s = ClusterState::default();
        let mut g = security::default_group(&Vpc {
            id: "vpc-1".into(),
            cidr: "10.0.0.0/16".into(),
            is_default: false,
            tags: Tags::new(),
            created_at_ms: 0,
            vni: 1,
        });
        g.id = "sg-web".into();
        g.name = "web".into();
        s.security_groups.insert(g.id.clone(), g);
        let n = Interface {
            subnet_id: "subnet-1".into(),
            vpc_id: "vpc-1".into(),
            private_ip: "10.0.1.4".into(),
            mac: "02:fc:00:00:00:01".into(),
            security_groups: vec!["sg-other".into(), "sg-web".into()],
            tap: String::new(),
        };
        let f = |f: NetFilter| f.matches(&s, Some(&n));
        let v = |x: &str| vec![x.to_string()];
        assert!(f(NetFilter::default()));
        assert!(NetFilter::default().matches(&s, None));
        assert!(f(NetFilter {
            vpcs: vec!["vpc-2".into(), "vpc-1".into()],
            ..Default::default()
        }));
        assert!(!f(NetFilter {
            vpcs: v("vpc-2"),
            ..Default::default()
        }));
        assert!(!NetFilter {
            vpcs: v("vpc-1"),
            ..Default::default()
        }
        .matches(&s, None));
        assert!(f(NetFilter {
            subnets: v("subnet-1"),
            ..Default::default()
        }));
        assert!(!f(NetFilter {
            subnets: v("subnet-2"),
            ..Default::default()
        }));
        assert!(f(NetFilter {
            private_ips: v("10.0.1.4"),
            ..Default::default()
        }));
        assert!(!f(NetFilter {
            private_ips: v("10.0.1.5"),
            ..Default::default()
        }));
        assert!(f(NetFilter {
            group_ids: v("sg-web"),
            ..Default::default()
        }));
        assert!(!f(NetFilter {
            group_ids: v("sg-db"),
            ..Default::default()
        }));
        assert!(f(NetFilter {
            group_names: v("web"),
            ..Default::default()
        }));
        assert!(!f(NetFilter {
            group_names: v("default"),
            ..Default::default()
        }));
        // Every filter must match.
        assert!(!f(NetFilter {
            vpcs: v("vpc-1"),
            subnets: v("subnet-2"),
            ..Default::default()
        }));
    }

    #[test]
    fn tags_are_described_across_resources_in_pages() {
        let mut s = super::super::tests::bootstrapped();
        super::super::tests::add_host(&mut s, "h1", "az-1", 4, 4096);
        super::super::tests::add_image(&mut s);
        s.images.get_mut("img-1").unwrap().tags =
            Tags::from([("env".to_string(), "ci".to_string())]);
        s.hosts.get_mut("h1").unwrap().tags = [
            ("env".to_string(), "prod".to_string()),
            ("rack".to_string(), "r1".to_string()),
        ]
        .into();
        let q = |f: &dyn Fn(&mut TagQuery)| {
            let mut q = TagQuery::default();
            f(&mut q);
            describe_tags(&s, &q).unwrap()
        };
        let (all, next) = q(&|_| {});
        assert_eq!(next, "");
        let got: Vec<(&str, &str, &str)> = all
            .iter()
            .map(|r| (r.resource_id.as_str(), r.resource_type, r.key.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("h1", "dedicated-host", "env"),
                ("h1", "dedicated-host", "rack"),
                ("img-1", "image", "env")
            ]
        );
        assert_eq!(q(&|q| q.keys = vec!["env".into()]).0.len(), 2);
        assert_eq!(
            q(&|q| q.values = vec!["ci".into()]).0[0].resource_id,
            "img-1"
        );
        assert_eq!(q(&|q| q.resource_types = vec!["image".into()]).0.len(), 1);
        // Pages of 2, then the rest.
        let (first, next) = q(&|q| q.max_results = 2);
        assert_eq!((first.len(), next.as_str()), (2, "h1 rack"));
        let (rest, next) = q(&|q| {
            q.max_results = 2;
            q.next_token = "h1 rack".into();
        });
        assert_eq!((rest.len(), next.as_str()), (1, ""));
        let bad = TagQuery {
            resource_types: vec!["bucket".into()],
            ..TagQuery::default()
        };
        assert!(describe_tags(&s, &bad).is_err());
    }

    #[test]
    fn tags_match_key_and_value() {
        let tags: Tags = [("env".to_string(), "ci".to_string())].into();
        let w = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert!(tags_match(&tags, &[]));
        assert!(tags_match(&tags, &w("env", "")));
        assert!(tags_match(&tags, &w("env", "ci")));
        assert!(!tags_match(&tags, &w("env", "prod")));
        assert!(!tags_match(&tags, &w("team", "")));
        // Several values of one key: any of them.
        let mut either = w("env", "prod");
        either.extend(w("env", "ci"));
        assert!(tags_match(&tags, &either));
        either.extend(w("team", "x"));
        assert!(!tags_match(&tags, &either));
    }
}
