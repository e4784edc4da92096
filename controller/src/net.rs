//! IPv4 CIDR blocks for VPCs and subnets: parsing (canonical network
//! address required), containment, overlap and the addresses EC2 reserves.
//! Sans-IO and unit-tested.

use std::fmt;
use std::net::Ipv4Addr;

/// An IPv4 CIDR block: a network address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    net: u32,
    prefix: u8,
}

impl Cidr {
    /// Parse `a.b.c.d/n`; the address must be the block's network address
    /// (`10.0.0.1/16` is refused, naming `10.0.0.0/16`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR block (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to 32"))?;
        let c = Self {
            net: u32::from(addr) & mask(prefix),
            prefix,
        };
        if c.net != u32::from(addr) {
            return Err(format!("{s:?} is not a network address; the block is {c}"));
        }
        Ok(c)
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.net)
    }

    /// How many addresses the block holds.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// Whether `other` lies wholly inside this block.
    pub fn contains(&self, other: &Cidr) -> bool {
        other.prefix >= self.prefix && other.net & mask(self.prefix) == self.net
    }

    /// Whether `addr` is in this block.
    pub fn contains_addr(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == self.net
    }

    /// Whether the two blocks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other) || other.contains(self)
    }

    /// Whether instances may be given `addr`: in the block, and not one of
    /// the addresses EC2 keeps (the network address, .1 the router, .2 DNS,
    /// .3 reserved, and the last).
    pub fn assignable(&self, addr: Ipv4Addr) -> bool {
        let a = u32::from(addr);
        self.contains_addr(addr) && a - self.net >= 4 && u64::from(a - self.net) < self.size() - 1
    }

    /// Addresses instances may be given (the block less the five reserved).
    pub fn assignable_count(&self) -> u64 {
        self.size().saturating_sub(5)
    }

    /// The `i`-th subblock of prefix `prefix` (e.g. the default VPC's
    /// per-zone /20 subnets).
    pub fn subblock(&self, prefix: u8, i: u32) -> Option<Cidr> {
        if prefix < self.prefix || prefix > 32 {
            return None;
        }
        let count = 1u64 << (prefix - self.prefix);
        if u64::from(i) >= count {
            return None;
        }
        let step = 1u64 << (32 - u32::from(prefix));
        Some(Cidr {
            net: self.net + (u64::from(i) * step) as u32,
            prefix,
        })
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network(), self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_parse_canonically_and_bad_ones_say_why() {
        let c = Cidr::parse("172.31.0.0/16").unwrap();
        assert_eq!(c.to_string(), "172.31.0.0/16");
        assert_eq!(c.size(), 65536);
        let e = Cidr::parse("10.0.0.1/16").unwrap_err();
        assert!(e.contains("the block is 10.0.0.0/16"), "{e}");
        for bad in ["10.0.0.0", "10.0.0/8", "10.0.0.0/33", "x/8", "10.0.0.0/-1"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn containment_overlap_and_reserved_addresses() {
        let vpc = Cidr::parse("10.0.0.0/16").unwrap();
        let a = Cidr::parse("10.0.1.0/24").unwrap();
        let b = Cidr::parse("10.0.1.128/25").unwrap();
        let c = Cidr::parse("10.0.2.0/24").unwrap();
        let out = Cidr::parse("10.1.0.0/24").unwrap();
        assert!(vpc.contains(&a) && vpc.contains(&b) && !vpc.contains(&out));
        assert!(!a.contains(&vpc));
        assert!(a.overlaps(&b) && b.overlaps(&a) && !a.overlaps(&c));
        let n = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        for reserved in ["10.0.1.0", "10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.255"] {
            assert!(!a.assignable(n(reserved)), "{reserved}");
        }
        assert!(a.assignable(n("10.0.1.4")) && a.assignable(n("10.0.1.254")));
        assert!(!a.assignable(n("10.0.2.4")));
        assert_eq!(a.assignable_count(), 251);
    }

    #[test]
    fn subblocks_tile_the_block() {
        let vpc = Cidr::parse("172.31.0.0/16").unwrap();
        assert_eq!(vpc.subblock(20, 0).unwrap().to_string(), "172.31.0.0/20");
        assert_eq!(vpc.subblock(20, 1).unwrap().to_string(), "172.31.16.0/20");
        assert_eq!(vpc.subblock(20, 15).unwrap().to_string(), "172.31.240.0/20");
        assert!(vpc.subblock(20, 16).is_none());
        assert!(vpc.subblock(8, 0).is_none());
    }
}
