//! `ferro interfaces …` (alias `network-interfaces`): the instances'
//! primary network interfaces.

use ferro_proto::compute::v1 as pb;

use super::pages::list_all;
use super::{parse_tag_filters, with_net_filters, CommandError};
use crate::args::{self, Format};
use crate::client::Client;
use crate::output::{self, print};

/// The DescribeNetworkInterfaces request of `ferro interfaces list`.
pub fn list_request(
    f: args::ListInterfaces,
) -> Result<pb::DescribeNetworkInterfacesRequest, CommandError> {
    let req = pb::DescribeNetworkInterfacesRequest {
        instance_ids: f.instances,
        availability_zones: f.azs,
        tags: parse_tag_filters(&f.tags)?,
        ..Default::default()
    };
    Ok(with_net_filters!(req, f.net))
}

/// `ferro interfaces list`: every matching interface, as a table or JSON.
pub async fn list(
    client: &mut Client,
    format: Format,
    f: args::ListInterfaces,
) -> Result<(), CommandError> {
    let all = list_all(client, list_request(f)?).await?;
    let (t, j) = output::interfaces(&all);
    print(format, &t, &j);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command, Interfaces};
    use clap::Parser;

    fn parse(argv: &[&str]) -> args::ListInterfaces {
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Interfaces(Interfaces::List(f)) => f,
            c => panic!("parsed as {c:?}"),
        }
    }

    #[test]
    fn flags_become_filters_and_the_alias_works() {
        let f = parse(&[
            "ferro",
            "network-interfaces",
            "list",
            "--vpc",
            "vpc-1",
            "--subnet",
            "subnet-1",
            "--instance",
            "i-1",
            "--private-ip",
            "10.0.0.4",
            "--group",
            "sg-1",
            "--group",
            "web",
            "--tag",
            "env=ci",
        ]);
        let r = list_request(f).unwrap();
        assert_eq!(r.vpc_ids, ["vpc-1"]);
        assert_eq!(r.subnet_ids, ["subnet-1"]);
        assert_eq!(r.instance_ids, ["i-1"]);
        assert_eq!(r.private_ip_addresses, ["10.0.0.4"]);
        assert_eq!(r.security_group_ids, ["sg-1"]);
        assert_eq!(r.security_group_names, ["web"]);
        assert_eq!(r.tags[0].value, "ci");
        let none = list_request(parse(&["ferro", "interfaces", "list"])).unwrap();
        assert_eq!(none, pb::DescribeNetworkInterfacesRequest::default());
        let bad = parse(&["ferro", "interfaces", "list", "--tag", "=x"]);
        assert!(list_request(bad).is_err());
    }
}
