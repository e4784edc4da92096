//! The instance metadata service (IMDSv2 on 169.254.169.254) — **not
//! built yet**.
//!
//! The state already carries what it serves: `LocalInterface`'s
//! `availability_zone`, `instance_type`, `public_key`/`key_name`,
//! `user_data`, `hostname`, `subnet_id`. The plan: answer, per TAP,
//! frames to 169.254.169.254:80 (ARP for it answered with the VPC's
//! router MAC, [`crate::desired::router_mac`]) with a small user-space
//! TCP/HTTP endpoint, or a veth into a per-host metadata namespace with
//! policy routing by source TAP; `PUT /latest/api/token` then
//! `X-aws-ec2-metadata-token` on every `GET`, hop limit 1.
//
// TODO(metadata): IMDSv2 server; ARP/router responder for router_ip too.
