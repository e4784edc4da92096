//! Hosts, images, key pairs, zones, instance types and the cluster.

use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::cluster_client::ClusterClient;
use ferro_proto::compute::v1::compute_client::ComputeClient;
use serde_json::json;

use super::pages::list_all;
use super::{done, parse_tag_filters, parse_tags, CommandError};
use crate::args::{self, Format};
use crate::client::{Client, ClientError};
use crate::output::{self, print};
use crate::table::Table;

/// `ferro hosts …`.
pub async fn hosts(client: &mut Client, format: Format) -> Result<(), CommandError> {
    let all = list_all(client, pb::DescribeHostsRequest::default()).await?;
    let (t, j) = output::hosts(&all);
    print(format, &t, &j);
    Ok(())
}

/// `ferro hosts join HOST_ID`: prints the one-time token.
pub async fn join_host(
    client: &mut Client,
    format: Format,
    host_id: String,
    ttl: u32,
) -> Result<(), CommandError> {
    let req = pb::CreateJoinTokenRequest {
        host_id,
        ttl_seconds: ttl,
    };
    let r = client
        .call(|ch| {
            let req = req.clone();
            async move { ComputeClient::new(ch).create_join_token(req).await }
        })
        .await?;
    match format {
        Format::Json => println!(
            "{}",
            json!({"host_id": r.host_id, "token": r.token, "expires_at_ms": r.expires_at_ms})
        ),
        Format::Table => {
            println!("{}", r.token);
            eprintln!(
                "ferro: a one-time token for host {:?}, valid {ttl} s: put `join_token = \"{}\"` \
                 in that host's agent configuration (with `host_id = \"{}\"` and `controller`)",
                r.host_id, r.token, r.host_id
            );
        }
    }
    Ok(())
}

/// `ferro hosts revoke HOST_ID`.
pub async fn revoke_host(
    client: &mut Client,
    format: Format,
    host_id: String,
) -> Result<(), CommandError> {
    let req = pb::RevokeHostRequest {
        host_id: host_id.clone(),
    };
    client
        .call(|ch| {
            let req = req.clone();
            async move { ComputeClient::new(ch).revoke_host(req).await }
        })
        .await?;
    done(
        format,
        &format!("revoked host {host_id:?}'s credential"),
        json!({"host_id": host_id, "revoked": true}),
    );
    Ok(())
}

/// `images register` as a request.
pub fn register_request(
    name: &str,
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
    rootdisk: Option<&std::path::Path>,
    cmdline_extra: &str,
    tags: Vec<pb::Tag>,
) -> pb::RegisterImageRequest {
    let path = |p: Option<&std::path::Path>| p.map(|p| p.display().to_string()).unwrap_or_default();
    pb::RegisterImageRequest {
        name: name.into(),
        kernel_path: kernel.display().to_string(),
        initrd_path: path(initrd),
        rootdisk_path: path(rootdisk),
        cmdline_extra: cmdline_extra.into(),
        tags,
    }
}

/// Registers an image.
pub async fn register_image(
    client: &mut Client,
    req: pb::RegisterImageRequest,
) -> Result<pb::Image, ClientError> {
    client
        .call(|ch| {
            let req = req.clone();
            async move { ComputeClient::new(ch).register_image(req).await }
        })
        .await
}

fn absolute(p: std::path::PathBuf) -> std::path::PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

/// `ferro images …`.
pub async fn images(
    client: &mut Client,
    format: Format,
    cmd: args::Images,
) -> Result<(), CommandError> {
    match cmd {
        args::Images::Register {
            name,
            kernel,
            initrd,
            rootdisk,
            cmdline_extra,
            tags,
        } => {
            let initrd = initrd.map(absolute);
            let rootdisk = rootdisk.map(absolute);
            // The paths are read on every host, not here; but a path that
            // does not exist on this machine is worth a word.
            let kernel_abs = absolute(kernel.clone());
            for p in std::iter::once(&kernel_abs)
                .chain(initrd.as_ref())
                .chain(rootdisk.as_ref())
            {
                if !p.exists() {
                    eprintln!(
                        "ferro: warning: {} does not exist on this machine; it must exist at \
                         that path on every host (a host that cannot open it is shown in the \
                         instances' state reason)",
                        p.display()
                    );
                }
            }
            let req = register_request(
                &name,
                &absolute(kernel),
                initrd.as_deref(),
                rootdisk.as_deref(),
                &cmdline_extra,
                parse_tags(&tags)?,
            );
            let img = register_image(client, req).await?;
            let (t, _) = output::images(std::slice::from_ref(&img));
            print(format, &t, &output::image_json(&img));
        }
        args::Images::List => {
            let resp = client
                .call(|ch| async move {
                    ComputeClient::new(ch)
                        .describe_images(pb::DescribeImagesRequest::default())
                        .await
                })
                .await?;
            let (t, j) = output::images(&resp.images);
            print(format, &t, &j);
        }
        args::Images::Deregister { image } => {
            let req = pb::DeregisterImageRequest {
                image_id: image.clone(),
            };
            client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).deregister_image(req).await }
                })
                .await?;
            done(
                format,
                &format!("deregistered {image}"),
                json!({"image_id": image}),
            );
        }
    }
    Ok(())
}

/// `ferro keys …`.
pub async fn keys(
    client: &mut Client,
    format: Format,
    cmd: args::Keys,
) -> Result<(), CommandError> {
    match cmd {
        args::Keys::Create {
            name,
            private_key_file,
        } => {
            let req = pb::CreateKeyPairRequest {
                key_name: name,
                tags: Vec::new(),
            };
            let resp = client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).create_key_pair(req).await }
                })
                .await?;
            let kp = resp.key_pair.unwrap_or_default();
            if let Some(path) = &private_key_file {
                write_private_key(path, &resp.private_key)?;
            }
            let shown = private_key_file.is_none().then_some(resp.private_key);
            match format {
                Format::Json => {
                    let mut j = output::key_json(&kp);
                    if let Some(k) = shown {
                        j["private_key"] = k.into();
                    }
                    print(format, &Table::default(), &j);
                }
                Format::Table => {
                    print!("{}", output::keys(std::slice::from_ref(&kp)).0);
                    match (shown, &private_key_file) {
                        (Some(k), _) => print!("private key (shown only now):\n{k}"),
                        (None, Some(p)) => println!("private key written to {}", p.display()),
                        (None, None) => {}
                    }
                }
            }
        }
        args::Keys::Import {
            name,
            public_key_file,
        } => {
            let text = std::fs::read_to_string(&public_key_file)
                .map_err(|e| CommandError::ReadFile(public_key_file.clone(), e))?;
            let req = pb::ImportKeyPairRequest {
                key_name: name,
                public_key: text.trim().to_string(),
                tags: Vec::new(),
            };
            let kp = client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).import_key_pair(req).await }
                })
                .await?;
            let (t, _) = output::keys(std::slice::from_ref(&kp));
            print(format, &t, &output::key_json(&kp));
        }
        args::Keys::List => {
            let resp = client
                .call(|ch| async move {
                    ComputeClient::new(ch)
                        .describe_key_pairs(pb::DescribeKeyPairsRequest::default())
                        .await
                })
                .await?;
            let (t, j) = output::keys(&resp.key_pairs);
            print(format, &t, &j);
        }
        args::Keys::Delete { name } => {
            let req = pb::DeleteKeyPairRequest {
                key_name: name.clone(),
            };
            client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).delete_key_pair(req).await }
                })
                .await?;
            done(
                format,
                &format!("deleted key pair {name}"),
                json!({"key_name": name}),
            );
        }
    }
    Ok(())
}

/// `ferro cluster …`.
pub async fn cluster(
    client: &mut Client,
    format: Format,
    cmd: args::Cluster,
) -> Result<(), CommandError> {
    let resp = match cmd {
        args::Cluster::Status => {
            client
                .call(|ch| async move {
                    ClusterClient::new(ch)
                        .cluster_status(pb::ClusterStatusRequest {})
                        .await
                })
                .await?
        }
        args::Cluster::AddNode { node_id, address } => {
            let req = pb::AddNodeRequest {
                member: Some(pb::ClusterMember { node_id, address }),
            };
            client
                .call(|ch| {
                    let req = req.clone();
                    async move { ClusterClient::new(ch).add_node(req).await }
                })
                .await?
        }
        args::Cluster::RemoveNode { node_id } => {
            client
                .call(|ch| async move {
                    ClusterClient::new(ch)
                        .remove_node(pb::RemoveNodeRequest { node_id })
                        .await
                })
                .await?
        }
    };
    // Ask every other member about itself: a node that does not answer is
    // shown as such, not as a follower.
    let scheme = if client.endpoint().starts_with("https://") {
        "https"
    } else {
        "http"
    };
    let mut peers = std::collections::BTreeMap::new();
    for m in resp.members.iter().filter(|m| m.node_id != resp.node_id) {
        let url = format!("{scheme}://{}", m.address);
        let answer = match client.only(&url, std::time::Duration::from_secs(2)) {
            Ok(mut c) => c
                .call(|ch| async move {
                    ClusterClient::new(ch)
                        .cluster_status(pb::ClusterStatusRequest {})
                        .await
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.node.ok_or_else(|| "no status".to_string())),
            Err(e) => Err(e.to_string()),
        };
        peers.insert(m.node_id, answer);
    }
    let (t, j) = output::cluster(&resp, &peers);
    print(format, &t, &j);
    Ok(())
}

/// A VPC as a row and as JSON.
fn vpc_row(v: &pb::Vpc) -> ([String; 4], serde_json::Value) {
    (
        [
            v.vpc_id.clone(),
            v.cidr_block.clone(),
            if v.is_default { "yes" } else { "no" }.into(),
            output::time(v.created_at_ms),
        ],
        json!({"vpc_id": v.vpc_id, "cidr_block": v.cidr_block, "is_default": v.is_default,
               "created_at_ms": v.created_at_ms}),
    )
}

/// `ferro vpcs …`.
pub async fn vpcs(
    client: &mut Client,
    format: Format,
    cmd: args::Vpcs,
) -> Result<(), CommandError> {
    let list = match cmd {
        args::Vpcs::Create { cidr, tags } => {
            let req = pb::CreateVpcRequest {
                cidr_block: cidr,
                tags: parse_tags(&tags)?,
            };
            vec![
                client
                    .call(|ch| {
                        let req = req.clone();
                        async move { ComputeClient::new(ch).create_vpc(req).await }
                    })
                    .await?,
            ]
        }
        args::Vpcs::List { tags } => {
            let req = pb::DescribeVpcsRequest {
                tags: parse_tag_filters(&tags)?,
                ..Default::default()
            };
            list_all(client, req).await?
        }
        args::Vpcs::Delete { id } => {
            let req = pb::DeleteVpcRequest { vpc_id: id.clone() };
            client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).delete_vpc(req).await }
                })
                .await?;
            done(
                format,
                &format!("deleted {id}"),
                json!({"vpc_id": id, "deleted": true}),
            );
            return Ok(());
        }
    };
    let mut t = Table::new(["VPC", "CIDR", "DEFAULT", "CREATED"]);
    let mut j = Vec::new();
    for v in &list {
        let (row, js) = vpc_row(v);
        t.row(row);
        j.push(js);
    }
    print(format, &t, &serde_json::Value::Array(j));
    Ok(())
}

/// `ferro subnets …`.
pub async fn subnets(
    client: &mut Client,
    format: Format,
    cmd: args::Subnets,
) -> Result<(), CommandError> {
    let list = match cmd {
        args::Subnets::Create {
            vpc,
            cidr,
            az,
            tags,
        } => {
            let req = pb::CreateSubnetRequest {
                vpc_id: vpc,
                cidr_block: cidr,
                availability_zone: az,
                tags: parse_tags(&tags)?,
            };
            vec![
                client
                    .call(|ch| {
                        let req = req.clone();
                        async move { ComputeClient::new(ch).create_subnet(req).await }
                    })
                    .await?,
            ]
        }
        args::Subnets::List { vpc, tags } => {
            let req = pb::DescribeSubnetsRequest {
                vpc_ids: vpc.into_iter().collect(),
                tags: parse_tag_filters(&tags)?,
                ..Default::default()
            };
            list_all(client, req).await?
        }
        args::Subnets::Delete { id } => {
            let req = pb::DeleteSubnetRequest {
                subnet_id: id.clone(),
            };
            client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).delete_subnet(req).await }
                })
                .await?;
            done(
                format,
                &format!("deleted {id}"),
                json!({"subnet_id": id, "deleted": true}),
            );
            return Ok(());
        }
    };
    let mut t = Table::new(["SUBNET", "VPC", "CIDR", "AZ", "FREE", "DEFAULT"]);
    let mut j = Vec::new();
    for s in &list {
        t.row([
            s.subnet_id.clone(),
            s.vpc_id.clone(),
            s.cidr_block.clone(),
            s.availability_zone.clone(),
            s.available_addresses.to_string(),
            if s.is_default { "yes" } else { "no" }.into(),
        ]);
        j.push(json!({"subnet_id": s.subnet_id, "vpc_id": s.vpc_id, "cidr_block": s.cidr_block,
                      "availability_zone": s.availability_zone, "available_addresses": s.available_addresses,
                      "is_default": s.is_default, "created_at_ms": s.created_at_ms}));
    }
    print(format, &t, &serde_json::Value::Array(j));
    Ok(())
}

/// `ferro api-keys …`.
pub async fn api_keys(
    client: &mut Client,
    format: Format,
    cmd: args::ApiKeys,
) -> Result<(), CommandError> {
    let row = |k: &pb::ApiKey| {
        [
            k.id.clone(),
            k.name.clone(),
            k.role.clone(),
            if k.host_id.is_empty() {
                "-".to_string()
            } else {
                k.host_id.clone()
            },
            output::time(k.created_at_ms),
        ]
    };
    let key_json = |k: &pb::ApiKey| {
        json!({"id": k.id, "name": k.name, "role": k.role, "host_id": k.host_id,
               "created_at_ms": k.created_at_ms})
    };
    match cmd {
        args::ApiKeys::Create { name, role } => {
            let req = pb::CreateApiKeyRequest {
                name,
                role,
                ..Default::default()
            };
            let r = client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).create_api_key(req).await }
                })
                .await?;
            let k = r.key.unwrap_or_default();
            match format {
                Format::Json => {
                    let mut j = key_json(&k);
                    j["secret"] = json!(r.secret);
                    j["ec2_access_key_id"] = json!(k.id);
                    j["ec2_secret_access_key"] = json!(r.ec2_secret_access_key);
                    println!("{j}");
                }
                Format::Table => {
                    println!("{}", r.secret);
                    eprintln!(
                        "ferro: API key {} ({}, role {}); the secret above is shown only now",
                        k.id, k.name, k.role
                    );
                    if !r.ec2_secret_access_key.is_empty() {
                        eprintln!(
                            "ferro: for the EC2 endpoint (aws configure): access key id {}, \
                             secret access key {}",
                            k.id, r.ec2_secret_access_key
                        );
                    }
                }
            }
        }
        args::ApiKeys::List => {
            let r = client
                .call(|ch| async move {
                    ComputeClient::new(ch)
                        .describe_api_keys(pb::DescribeApiKeysRequest {})
                        .await
                })
                .await?;
            let mut t = Table::new(["ID", "NAME", "ROLE", "HOST", "CREATED"]);
            for k in &r.keys {
                t.row(row(k));
            }
            let j = serde_json::Value::Array(r.keys.iter().map(key_json).collect());
            print(format, &t, &j);
        }
        args::ApiKeys::Delete { id } => {
            let req = pb::DeleteApiKeyRequest { id: id.clone() };
            client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).delete_api_key(req).await }
                })
                .await?;
            done(
                format,
                &format!("deleted API key {id}"),
                json!({"id": id, "deleted": true}),
            );
        }
    }
    Ok(())
}

/// `ferro azs …`.
pub async fn azs(client: &mut Client, format: Format) -> Result<(), CommandError> {
    let resp = client
        .call(|ch| async move {
            ComputeClient::new(ch)
                .describe_availability_zones(pb::DescribeAvailabilityZonesRequest {})
                .await
        })
        .await?;
    let (t, j) = output::azs(&resp.availability_zones);
    print(format, &t, &j);
    Ok(())
}

/// `ferro types …`.
pub async fn types(client: &mut Client, format: Format) -> Result<(), CommandError> {
    let resp = client
        .call(|ch| async move {
            ComputeClient::new(ch)
                .describe_instance_types(pb::DescribeInstanceTypesRequest::default())
                .await
        })
        .await?;
    let (t, j) = output::types(&resp.instance_types);
    print(format, &t, &j);
    Ok(())
}

/// Writes a private key to a new file only its owner can read.
fn write_private_key(path: &std::path::Path, pem: &str) -> Result<(), CommandError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e| CommandError::WriteFile(path.to_path_buf(), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(pem.as_bytes()).map_err(err)
}

fn rule_text(r: &pb::SecurityGroupRule) -> String {
    let ports = match (r.from_port, r.to_port) {
        (0, 0) => String::new(),
        (a, b) if a == b => format!(":{a}"),
        (a, b) => format!(":{a}-{b}"),
    };
    let peer = if r.group_id.is_empty() {
        &r.cidr
    } else {
        &r.group_id
    };
    format!("{}{ports} {peer}", r.protocol)
}

fn rule_json(r: &pb::SecurityGroupRule) -> serde_json::Value {
    json!({"protocol": r.protocol, "from_port": r.from_port, "to_port": r.to_port,
           "cidr": r.cidr, "group_id": r.group_id})
}

/// A port argument: `80` or `8000-8080`.
fn ports(p: Option<&str>, protocol: &str) -> Result<(u32, u32), CommandError> {
    let Some(p) = p else {
        if protocol == "tcp" || protocol == "udp" {
            return Err(CommandError::Usage(format!(
                "--port: {protocol} rules need a port or range (e.g. 22 or 8000-8080)"
            )));
        }
        return Ok((0, 0));
    };
    let num = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| CommandError::Usage(format!("--port: {p:?} is not a port or range")))
    };
    match p.split_once('-') {
        Some((a, b)) => Ok((num(a)?, num(b)?)),
        None => {
            let a = num(p)?;
            Ok((a, a))
        }
    }
}

/// `ferro security-groups …`.
pub async fn security_groups(
    client: &mut Client,
    format: Format,
    cmd: args::SecurityGroups,
) -> Result<(), CommandError> {
    use args::SecurityGroups as S;
    let list = match cmd {
        S::Create {
            vpc,
            name,
            description,
            tags,
        } => {
            let req = pb::CreateSecurityGroupRequest {
                vpc_id: vpc,
                group_name: name,
                description,
                tags: parse_tags(&tags)?,
            };
            vec![
                client
                    .call(|ch| {
                        let req = req.clone();
                        async move { ComputeClient::new(ch).create_security_group(req).await }
                    })
                    .await?,
            ]
        }
        S::List { vpc, name, tags } => {
            let req = pb::DescribeSecurityGroupsRequest {
                vpc_ids: vpc.into_iter().collect(),
                group_names: name.into_iter().collect(),
                tags: parse_tag_filters(&tags)?,
                ..Default::default()
            };
            list_all(client, req).await?
        }
        S::Delete { id } => {
            let req = pb::DeleteSecurityGroupRequest {
                group_id: id.clone(),
            };
            client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).delete_security_group(req).await }
                })
                .await?;
            done(
                format,
                &format!("deleted {id}"),
                json!({"group_id": id, "deleted": true}),
            );
            return Ok(());
        }
        S::Authorize(r) => vec![change_rule(client, r, true).await?],
        S::Revoke(r) => vec![change_rule(client, r, false).await?],
    };
    let mut t = Table::new(["GROUP", "NAME", "VPC", "INGRESS", "EGRESS"]);
    let mut j = Vec::new();
    for g in &list {
        let join = |rs: &[pb::SecurityGroupRule]| {
            let v: Vec<String> = rs.iter().map(rule_text).collect();
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        t.row([
            g.group_id.clone(),
            g.group_name.clone(),
            g.vpc_id.clone(),
            join(&g.ingress),
            join(&g.egress),
        ]);
        j.push(
            json!({"group_id": g.group_id, "group_name": g.group_name, "vpc_id": g.vpc_id,
            "description": g.description,
            "ingress": g.ingress.iter().map(rule_json).collect::<Vec<_>>(),
            "egress": g.egress.iter().map(rule_json).collect::<Vec<_>>()}),
        );
    }
    print(format, &t, &serde_json::Value::Array(j));
    Ok(())
}

async fn change_rule(
    client: &mut Client,
    r: args::RuleArgs,
    add: bool,
) -> Result<pb::SecurityGroup, CommandError> {
    let (from_port, to_port) = ports(r.port.as_deref(), &r.protocol)?;
    let req = pb::SecurityGroupRulesRequest {
        group_id: r.id,
        egress: r.egress,
        rules: vec![pb::SecurityGroupRule {
            protocol: r.protocol,
            from_port,
            to_port,
            cidr: r.cidr.unwrap_or_default(),
            group_id: r.group.unwrap_or_default(),
        }],
    };
    let out = client
        .call(|ch| {
            let req = req.clone();
            async move {
                let mut c = ComputeClient::new(ch);
                if add {
                    c.authorize_security_group_rules(req).await
                } else {
                    c.revoke_security_group_rules(req).await
                }
            }
        })
        .await?;
    out.security_group
        .ok_or_else(|| CommandError::Usage("the controller returned no group".into()))
}
