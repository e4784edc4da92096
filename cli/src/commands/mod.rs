//! One function per subcommand: build the request, call through the
//! [`Client`], print through [`crate::output`], wait when asked.
//!
//! - [`instances`]: run, list, describe, start/stop/reboot/terminate
//!   (with `--wait`), console.
//! - [`catalog`]: hosts, images, key pairs, zones, instance types and the
//!   controller cluster.
//! - [`volumes`]: block volumes: create, list, attach, detach, delete.
//! - [`interfaces`]: network interfaces: list.
//!
//! `pages` follows `next_token` through every page of a list call.

pub mod catalog;
pub mod instances;
pub mod interfaces;
mod pages;
pub mod volumes;

use ferro_proto::compute::v1 as pb;

use crate::args::{self, Format};
use crate::client::{Client, ClientError};
use crate::output::print;
use crate::spinner::WaitTimeout;
use crate::table::Table;

pub use catalog::{register_image, register_request};
pub use instances::{console_bytes, describe_all, terminate_and_wait, wait_state};

/// A failed command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The call failed; the server's message.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `--wait` ran out of time.
    #[error(transparent)]
    Timeout(#[from] WaitTimeout),
    /// An instance failed while being waited for.
    #[error("instance {id} failed: {reason}")]
    Failed {
        /// The instance.
        id: String,
        /// The state reason its host reported.
        reason: String,
    },
    /// A volume went to `error` (or away) while being waited for.
    #[error("volume {0} failed")]
    VolumeFailed(String),
    /// A bad argument, caught before calling.
    #[error("{0}")]
    Usage(String),
    /// A local file could not be read.
    #[error("cannot read {}", .0.display())]
    ReadFile(std::path::PathBuf, #[source] std::io::Error),
    /// A file could not be written.
    #[error("cannot write {}", .0.display())]
    WriteFile(std::path::PathBuf, #[source] std::io::Error),
}

/// Runs a controller subcommand (everything but `up`).
pub async fn run(
    client: &mut Client,
    format: Format,
    cmd: args::Command,
) -> Result<(), CommandError> {
    use args::Command as C;
    match cmd {
        C::Instances(c) => instances::run(client, format, c).await,
        C::Hosts(args::Hosts::List) => catalog::hosts(client, format).await,
        C::Hosts(args::Hosts::Join { host_id, ttl }) => {
            catalog::join_host(client, format, host_id, ttl).await
        }
        C::Hosts(args::Hosts::Revoke { host_id }) => {
            catalog::revoke_host(client, format, host_id).await
        }
        C::Images(c) => catalog::images(client, format, c).await,
        C::Keys(c) => catalog::keys(client, format, c).await,
        C::Cluster(c) => catalog::cluster(client, format, c).await,
        C::ApiKeys(c) => catalog::api_keys(client, format, c).await,
        C::Vpcs(c) => catalog::vpcs(client, format, c).await,
        C::Subnets(c) => catalog::subnets(client, format, c).await,
        C::SecurityGroups(c) => catalog::security_groups(client, format, c).await,
        C::Interfaces(args::Interfaces::List(f)) => interfaces::list(client, format, f).await,
        C::Volumes(c) => volumes::run(client, format, c).await,
        C::Azs(args::ListOnly::List) => catalog::azs(client, format).await,
        C::Types(args::ListOnly::List) => catalog::types(client, format).await,
        C::Up(_) => Err(CommandError::Usage(
            "`up` is not a controller command".into(),
        )),
    }
}

/// `KEY=VALUE` (or `KEY` when `value_optional`) → a tag.
pub fn parse_tag(s: &str, value_optional: bool) -> Result<pb::Tag, CommandError> {
    let (key, value) = match s.split_once('=') {
        Some((k, v)) => (k, v),
        None if value_optional => (s, ""),
        None => {
            return Err(CommandError::Usage(format!(
                "--tag {s}: expected KEY=VALUE"
            )))
        }
    };
    if key.is_empty() {
        return Err(CommandError::Usage(format!("--tag {s}: the key is empty")));
    }
    Ok(pb::Tag {
        key: key.into(),
        value: value.into(),
    })
}

pub(crate) fn parse_tags(list: &[String]) -> Result<Vec<pb::Tag>, CommandError> {
    list.iter().map(|t| parse_tag(t, false)).collect()
}

/// `--tag KEY` or `--tag KEY=VALUE` filters.
pub(crate) fn parse_tag_filters(list: &[String]) -> Result<Vec<pb::TagFilter>, CommandError> {
    list.iter()
        .map(|t| {
            parse_tag(t, true).map(|t| pb::TagFilter {
                key: t.key,
                value: t.value,
            })
        })
        .collect()
}

/// `--vpc`, `--subnet`, `--private-ip`, `--group` set on a request with
/// the interface filter fields (DescribeInstances and
/// DescribeNetworkInterfaces name them alike): a group starting with
/// `sg-` is an id, anything else a name.
macro_rules! with_net_filters {
    ($req:expr, $net:expr) => {{
        let (net, mut req) = ($net, $req);
        let (ids, names) = net.groups.into_iter().partition(|g| g.starts_with("sg-"));
        req.vpc_ids = net.vpcs;
        req.subnet_ids = net.subnets;
        req.private_ip_addresses = net.private_ips;
        (req.security_group_ids, req.security_group_names) = (ids, names);
        req
    }};
}
pub(crate) use with_net_filters;

/// A fresh idempotency token: `ferro-cli-<pid>-<nanoseconds>`.
pub fn client_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("ferro-cli-{:x}-{nanos:x}", std::process::id())
}

/// A one-line confirmation, or its JSON.
pub(crate) fn done(format: Format, text: &str, json: serde_json::Value) {
    match format {
        Format::Table => println!("{text}"),
        Format::Json => print(format, &Table::default(), &json),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_parse() {
        let t = parse_tag("env=ci=x", false).unwrap();
        assert_eq!((t.key.as_str(), t.value.as_str()), ("env", "ci=x"));
        assert!(parse_tag("env", false).is_err());
        assert_eq!(parse_tag("env", true).unwrap().value, "");
        assert!(parse_tag("=v", true).is_err());
    }

    #[test]
    fn groups_split_into_ids_and_names() {
        let f = args::NetFilters {
            vpcs: vec!["vpc-1".into()],
            subnets: vec!["subnet-1".into()],
            private_ips: vec!["10.0.0.4".into()],
            groups: vec!["sg-1".into(), "web".into()],
        };
        let r = with_net_filters!(pb::DescribeInstancesRequest::default(), f);
        assert_eq!(r.vpc_ids, ["vpc-1"]);
        assert_eq!(r.subnet_ids, ["subnet-1"]);
        assert_eq!(r.private_ip_addresses, ["10.0.0.4"]);
        assert_eq!(r.security_group_ids, ["sg-1"]);
        assert_eq!(r.security_group_names, ["web"]);
        let t = parse_tag_filters(&["env".into(), "tier=web".into()]).unwrap();
        assert_eq!((t[0].key.as_str(), t[0].value.as_str()), ("env", ""));
        assert_eq!((t[1].key.as_str(), t[1].value.as_str()), ("tier", "web"));
    }

    #[test]
    fn client_tokens_are_printable_and_distinct() {
        let (a, b) = (client_token(), client_token());
        assert_ne!(a, b);
        assert!(a.len() <= 64 && a.bytes().all(|c| c.is_ascii_graphic()));
    }
}
