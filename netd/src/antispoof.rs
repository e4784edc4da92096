//! Anti-spoofing: a guest sends only from its own MAC and IPv4 address,
//! and ARP only for them.
//!
//! Per TAP, a chain `as_<tap>` in netd's bridge table, jumped to from the
//! bridge's prerouting hook (priority -300): before the bridge learns the
//! source MAC (a spoofed MAC never poisons the FDB) and before conntrack
//! sees the packet. What it lets through:
//!
//! - IPv4 from the interface's address, or DHCP (UDP 68 → 67) from
//!   0.0.0.0;
//! - ARP (Ethernet/IPv4) whose sender is the interface's MAC and address,
//!   or 0.0.0.0 (probes);
//!
//! all of it only with the interface's source MAC. Everything else is
//! dropped and counted in `spoof_<tap>`, except IPv6 (VPCs are IPv4
//! only), dropped and counted apart in `ipv6_<tap>` since guests with IPv6
//! enabled send some on their own. [`counters`] reads both.
//!
//! The rules are rendered here; [`crate::security_groups`] puts them in
//! the table and applies it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::desired::{fmt_mac, Mac};
use crate::security_groups::{nft, table_name, NftError};

/// The anti-spoofing chain of `tap`.
pub fn chain_name(tap: &str) -> String {
    format!("as_{tap}")
}

/// The counter of `tap`'s spoofed frames.
pub fn spoof_counter(tap: &str) -> String {
    format!("spoof_{tap}")
}

/// The counter of `tap`'s IPv6 frames.
pub fn ipv6_counter(tap: &str) -> String {
    format!("ipv6_{tap}")
}

/// The rules of `tap`'s chain; without a MAC or address (the controller
/// sent a malformed one) every frame is dropped and counted.
pub fn rules(tap: &str, mac: Option<Mac>, ip: Option<Ipv4Addr>) -> Vec<String> {
    let spoof = spoof_counter(tap);
    let (Some(mac), Some(ip)) = (mac, ip) else {
        return vec![format!("counter name {spoof} drop")];
    };
    let mac = fmt_mac(&mac);
    vec![
        format!("ether saddr != {mac} counter name {spoof} drop"),
        format!("ether type ip6 counter name {} drop", ipv6_counter(tap)),
        format!("ip saddr {ip} return"),
        "ip saddr 0.0.0.0 udp sport 68 udp dport 67 return".to_string(),
        format!(
            "arp htype 1 arp ptype ip arp hlen 6 arp plen 4 \
             arp saddr ether {mac} arp saddr ip {{ 0.0.0.0, {ip} }} return"
        ),
        format!("counter name {spoof} drop"),
    ]
}

/// Packets and bytes of one counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

/// What one TAP's anti-spoofing dropped since its chain was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Frames with a foreign source MAC, IPv4 or ARP sender, or neither
    /// IPv4, ARP nor IPv6.
    pub spoofed: Count,
    /// IPv6 frames.
    pub ipv6: Count,
}

/// The anti-spoofing counters of every TAP in netd's table, by TAP
/// (none when the table does not exist yet).
pub fn counters() -> Result<BTreeMap<String, Counters>, NftError> {
    match nft(&["list", "counters", "table", "bridge", table_name()], None) {
        Ok(listing) => Ok(parse_counters(&listing)),
        Err(e) if e.is_no_such_table() => Ok(BTreeMap::new()),
        Err(e) => Err(e),
    }
}

/// The counters of an `nft list counters` listing, by TAP.
pub fn parse_counters(listing: &str) -> BTreeMap<String, Counters> {
    let mut out = BTreeMap::<String, Counters>::new();
    let mut current: Option<String> = None;
    for line in listing.lines().map(str::trim) {
        if let Some(name) = line
            .strip_prefix("counter ")
            .and_then(|l| l.strip_suffix(" {"))
        {
            current = Some(name.trim_matches('"').to_string());
            continue;
        }
        let (Some(name), Some(count)) = (&current, parse_count(line)) else {
            continue;
        };
        if let Some(tap) = name.strip_prefix("spoof_") {
            out.entry(tap.to_string()).or_default().spoofed = count;
        } else if let Some(tap) = name.strip_prefix("ipv6_") {
            out.entry(tap.to_string()).or_default().ipv6 = count;
        }
        current = None;
    }
    out
}

/// `packets N bytes M`.
fn parse_count(line: &str) -> Option<Count> {
    let mut words = line.split_whitespace();
    let (Some("packets"), Some(p), Some("bytes"), Some(b)) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    Some(Count {
        packets: p.parse().ok()?,
        bytes: b.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_sends_from_its_mac_and_address_only() {
        let r = rules(
            "fct1",
            Some([2, 0, 0, 0, 0, 0xa]),
            Some([10, 0, 0, 10].into()),
        );
        assert_eq!(
            r,
            [
                "ether saddr != 02:00:00:00:00:0a counter name spoof_fct1 drop",
                "ether type ip6 counter name ipv6_fct1 drop",
                "ip saddr 10.0.0.10 return",
                "ip saddr 0.0.0.0 udp sport 68 udp dport 67 return",
                "arp htype 1 arp ptype ip arp hlen 6 arp plen 4 arp saddr ether \
                 02:00:00:00:00:0a arp saddr ip { 0.0.0.0, 10.0.0.10 } return",
                "counter name spoof_fct1 drop",
            ]
        );
    }

    #[test]
    fn without_a_mac_or_address_everything_is_dropped() {
        assert_eq!(
            rules("fct1", None, Some([10, 0, 0, 10].into())),
            ["counter name spoof_fct1 drop"]
        );
        assert_eq!(
            rules("fct1", Some([2, 0, 0, 0, 0, 1]), None),
            ["counter name spoof_fct1 drop"]
        );
    }

    #[test]
    fn counters_are_read_by_tap() {
        let listing = "table bridge ferro {\n\
            \tcounter ipv6_fct1 {\n\t\tpackets 3 bytes 210\n\t}\n\n\
            \tcounter spoof_fct1 {\n\t\tpackets 2 bytes 84\n\t}\n\n\
            \tcounter spoof_fct2 {\n\t\tpackets 0 bytes 0\n\t}\n\n\
            \tcounter other {\n\t\tpackets 9 bytes 9\n\t}\n}\n";
        let c = parse_counters(listing);
        assert_eq!(c.len(), 2);
        assert_eq!(
            c["fct1"],
            Counters {
                spoofed: Count {
                    packets: 2,
                    bytes: 84
                },
                ipv6: Count {
                    packets: 3,
                    bytes: 210
                },
            }
        );
        assert_eq!(c["fct2"], Counters::default());
    }
}
