//! Security groups in nftables — **not built yet** (the next slice).
//!
//! The state already carries what it needs: `HostNetwork.groups` (each
//! group's rules and its members' addresses) and
//! `LocalInterface.security_group_ids`. The plan: one nftables table
//! `ferro` in the bridge family, a chain per TAP jumped to from
//! `forward` by `iifname`/`oifname`, stateful (`ct state
//! established,related accept`), rules rendered from the groups with
//! sets of member addresses, default drop inbound and accept outbound as
//! in EC2. It would be converged like the links: a pure render of the
//! desired ruleset compared with what `nft -j list table` reports, and
//! one atomic `nft -f` transaction for the difference.
//
// TODO(security-groups): render and converge the nftables ruleset.
