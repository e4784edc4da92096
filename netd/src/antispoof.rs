//! Anti-spoofing — **not built yet**.
//!
//! A guest must send only from its own MAC and address (and ARP only for
//! its own address). The plan: per TAP, in the same nftables bridge table
//! as the security groups, `iifname TAP ether saddr != MAC drop`,
//! `ip saddr != IP drop` (DHCP from 0.0.0.0 allowed), and an ARP rule on
//! `arp saddr ip`/`arp saddr ether`; rendered from `LocalInterface.mac`
//! and `private_ip`. Until then the DHCP server already answers only the
//! interface's own MAC on its own TAP.
//
// TODO(antispoof): per-TAP source MAC/IP/ARP filters.
