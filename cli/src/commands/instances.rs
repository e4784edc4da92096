//! `ferro instances …`: launch, list, describe, change state (and wait
//! for the target state), console.

use std::io::Write;
use std::time::Duration;

use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::compute_client::ComputeClient;
use serde_json::json;

use super::{client_token, parse_tag_filters, parse_tags, CommandError};
use crate::args::{self, Format, Wait};
use crate::client::{Client, ClientError};
use crate::output::{self, print, state_name};
use crate::spinner::{wait_for, Poll, Spinner};
use crate::table::Table;

/// How often `--wait` polls.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Runs an `instances` subcommand.
pub async fn run(
    client: &mut Client,
    format: Format,
    cmd: args::Instances,
) -> Result<(), CommandError> {
    use args::Instances as I;
    match cmd {
        I::Run(r) => run_instances(client, format, *r).await,
        I::List(f) => list_instances(client, format, f).await,
        I::Describe { ids } => describe(client, format, ids).await,
        I::Start { ids, wait } => change(client, format, Verb::Start, ids, wait).await,
        I::Stop { ids, force, wait } => {
            change(client, format, Verb::Stop { force }, ids, wait).await
        }
        I::Reboot { ids, wait } => change(client, format, Verb::Reboot, ids, wait).await,
        I::Terminate { ids, wait } => change(client, format, Verb::Terminate, ids, wait).await,
        I::Console { id } => console(client, &id).await,
        I::Modify {
            id,
            shutdown_behavior,
            security_groups,
            instance_type,
            user_data,
            no_user_data,
        } => {
            let m = Modify {
                shutdown_behavior,
                security_groups,
                instance_type,
                user_data: match (&user_data, no_user_data) {
                    (Some(p), _) => {
                        Some(std::fs::read(p).map_err(|e| CommandError::ReadFile(p.clone(), e))?)
                    }
                    (None, true) => Some(Vec::new()),
                    (None, false) => None,
                },
            };
            modify(client, format, id, m).await
        }
    }
}

/// What `ferro instances modify` changes.
struct Modify {
    shutdown_behavior: Option<String>,
    security_groups: Vec<String>,
    instance_type: Option<String>,
    user_data: Option<Vec<u8>>,
}

async fn modify(
    client: &mut Client,
    format: Format,
    id: String,
    m: Modify,
) -> Result<(), CommandError> {
    let req = pb::ModifyInstanceAttributeRequest {
        instance_id: id.clone(),
        instance_initiated_shutdown_behavior: m.shutdown_behavior.clone().unwrap_or_default(),
        security_group_ids: m.security_groups.clone(),
        instance_type: m.instance_type.clone().unwrap_or_default(),
        user_data: m.user_data.clone(),
    };
    client
        .call(|ch| {
            let req = req.clone();
            async move { ComputeClient::new(ch).modify_instance_attribute(req).await }
        })
        .await?;
    let mut said = Vec::new();
    if let Some(t) = &m.instance_type {
        said.push(format!("type {t}"));
    }
    match m.user_data.as_ref().map(Vec::len) {
        Some(0) => said.push("user data removed".into()),
        Some(n) => said.push(format!("user data {n} bytes")),
        None => {}
    }
    if let Some(b) = &m.shutdown_behavior {
        said.push(format!("instance-initiated shutdown behavior {b}"));
    }
    if !m.security_groups.is_empty() {
        said.push(format!("security groups {}", m.security_groups.join(", ")));
    }
    super::done(
        format,
        &format!("{id}: {}", said.join("; ")),
        json!({"instance_id": id, "instance_initiated_shutdown_behavior": m.shutdown_behavior,
               "security_group_ids": m.security_groups, "instance_type": m.instance_type,
               "user_data_bytes": m.user_data.as_ref().map(Vec::len)}),
    );
    Ok(())
}

/// `--block-device DEVICE=SIZE_GIB[,type=T][,delete-on-termination=B]`.
fn parse_block_device(spec: &str) -> Result<pb::BlockDeviceMapping, CommandError> {
    let bad = |why: &str| CommandError::Usage(format!("--block-device {spec:?}: {why}"));
    let (device, rest) = spec
        .split_once('=')
        .ok_or_else(|| bad("want DEVICE=SIZE_GIB first"))?;
    let mut m = volume_options("--block-device", rest)?;
    m.device_name = device.to_string();
    Ok(m)
}

/// `--root-volume SIZE_GIB[,type=T][,delete-on-termination=B]`.
fn parse_root_volume(spec: &str) -> Result<pb::RootVolume, CommandError> {
    let m = volume_options("--root-volume", spec)?;
    Ok(pb::RootVolume {
        volume_size_gib: m.volume_size_gib,
        volume_type: m.volume_type,
        delete_on_termination: m.delete_on_termination,
    })
}

/// `SIZE_GIB[,type=T][,delete-on-termination=B]` of option `flag`.
fn volume_options(flag: &str, spec: &str) -> Result<pb::BlockDeviceMapping, CommandError> {
    let bad = |why: &str| CommandError::Usage(format!("{flag} {spec:?}: {why}"));
    let mut parts = spec.split(',');
    let size = parts.next().unwrap_or_default();
    let mut m = pb::BlockDeviceMapping {
        volume_size_gib: size
            .parse()
            .map_err(|_| bad("the size is not a whole number of GiB"))?,
        ..Default::default()
    };
    for p in parts {
        match p.split_once('=') {
            Some(("type", t)) => m.volume_type = t.to_string(),
            Some(("delete-on-termination", b)) => {
                m.delete_on_termination = Some(
                    b.parse()
                        .map_err(|_| bad("delete-on-termination is true or false"))?,
                )
            }
            _ => return Err(bad(&format!("unknown option {p:?}"))),
        }
    }
    Ok(m)
}

async fn run_instances(
    client: &mut Client,
    format: Format,
    r: args::Run,
) -> Result<(), CommandError> {
    let user_data = match &r.user_data {
        Some(p) => std::fs::read(p).map_err(|e| CommandError::ReadFile(p.clone(), e))?,
        None => Vec::new(),
    };
    let req = pb::RunInstancesRequest {
        count: r.count,
        instance_type: r.instance_type,
        image_id: r.image,
        availability_zone: r.az.unwrap_or_default(),
        key_name: r.key_name.unwrap_or_default(),
        user_data,
        placement_group: r.placement_group.unwrap_or_default(),
        tags: parse_tags(&r.tags)?,
        client_token: r.client_token.unwrap_or_else(client_token),
        strategy: if r.spread {
            pb::PlacementStrategy::Spread as i32
        } else {
            pb::PlacementStrategy::Unspecified as i32
        },
        instance_initiated_shutdown_behavior: r.shutdown_behavior,
        subnet_id: r.subnet.unwrap_or_default(),
        private_ip_address: r.private_ip.unwrap_or_default(),
        security_group_ids: r.security_groups.clone(),
        block_device_mappings: r
            .block_devices
            .iter()
            .map(|b| parse_block_device(b))
            .collect::<Result<_, _>>()?,
        root_volume: r
            .root_volume
            .as_deref()
            .map(parse_root_volume)
            .transpose()?,
    };
    let resp = client
        .call(|ch| {
            let req = req.clone();
            async move { ComputeClient::new(ch).run_instances(req).await }
        })
        .await?;
    let ids: Vec<String> = resp
        .instances
        .iter()
        .map(|i| i.instance_id.clone())
        .collect();
    let list = if r.wait.wait {
        wait_state(client, &ids, pb::InstanceState::Running, r.wait).await?
    } else {
        resp.instances
    };
    let json = json!({
        "reservation_id": resp.reservation_id,
        "instances": list.iter().map(output::instance_json).collect::<Vec<_>>(),
    });
    print(format, &output::instances_table(&list), &json);
    Ok(())
}

/// Every instance matching `req`, following `next_token`.
pub async fn describe_all(
    client: &mut Client,
    req: pb::DescribeInstancesRequest,
) -> Result<Vec<pb::Instance>, ClientError> {
    super::pages::list_all(client, req).await
}

async fn list_instances(
    client: &mut Client,
    format: Format,
    f: args::ListInstances,
) -> Result<(), CommandError> {
    let states = f
        .states
        .iter()
        .map(|s| {
            output::parse_state(s).map(|st| st as i32).ok_or_else(|| {
                CommandError::Usage(format!(
                    "--state {s}: unknown state (valid: {})",
                    output::STATE_NAMES.join(", ")
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let req = pb::DescribeInstancesRequest {
        states,
        availability_zones: f.azs,
        host_ids: f.hosts,
        tags: parse_tag_filters(&f.tags)?,
        ..Default::default()
    };
    let req = super::with_net_filters!(req, f.net);
    let list = describe_all(client, req).await?;
    let json = list.iter().map(output::instance_json).collect();
    print(
        format,
        &output::instances_table(&list),
        &serde_json::Value::Array(json),
    );
    Ok(())
}

async fn describe(
    client: &mut Client,
    format: Format,
    ids: Vec<String>,
) -> Result<(), CommandError> {
    let req = pb::DescribeInstancesRequest {
        instance_ids: ids,
        ..Default::default()
    };
    let list = describe_all(client, req).await?;
    match format {
        Format::Json => {
            let json = list.iter().map(output::instance_json).collect();
            print(format, &Table::default(), &serde_json::Value::Array(json));
        }
        Format::Table => {
            let text: Vec<String> = list
                .iter()
                .map(|i| output::instance_detail(i).render())
                .collect();
            print!("{}", text.join("\n"));
        }
    }
    Ok(())
}

/// A state change verb.
#[derive(Debug, Clone, Copy)]
enum Verb {
    Start,
    Stop { force: bool },
    Reboot,
    Terminate,
}

impl Verb {
    fn target(self) -> pb::InstanceState {
        match self {
            Verb::Start | Verb::Reboot => pb::InstanceState::Running,
            Verb::Stop { .. } => pb::InstanceState::Stopped,
            Verb::Terminate => pb::InstanceState::Terminated,
        }
    }
}

/// Calls Start/Stop/Reboot/TerminateInstances once for `ids`.
async fn call_verb(
    client: &mut Client,
    verb: Verb,
    ids: &[String],
) -> Result<pb::InstanceStateChangesResponse, ClientError> {
    let instance_ids = ids.to_vec();
    client
        .call(|ch| {
            let instance_ids = instance_ids.clone();
            async move {
                let mut c = ComputeClient::new(ch);
                match verb {
                    Verb::Start => {
                        c.start_instances(pb::StartInstancesRequest { instance_ids })
                            .await
                    }
                    Verb::Stop { force } => {
                        c.stop_instances(pb::StopInstancesRequest {
                            instance_ids,
                            force,
                        })
                        .await
                    }
                    Verb::Reboot => {
                        c.reboot_instances(pb::RebootInstancesRequest { instance_ids })
                            .await
                    }
                    Verb::Terminate => {
                        c.terminate_instances(pb::TerminateInstancesRequest { instance_ids })
                            .await
                    }
                }
            }
        })
        .await
}

async fn change(
    client: &mut Client,
    format: Format,
    verb: Verb,
    ids: Vec<String>,
    wait: Wait,
) -> Result<(), CommandError> {
    let resp = call_verb(client, verb, &ids).await?;
    if wait.wait {
        let list = wait_state(client, &ids, verb.target(), wait).await?;
        let json = list.iter().map(output::instance_json).collect();
        print(
            format,
            &output::instances_table(&list),
            &serde_json::Value::Array(json),
        );
    } else {
        let (t, j) = output::changes(&resp.changes);
        print(format, &t, &j);
    }
    Ok(())
}

/// Terminates `ids` and waits until they are terminated.
pub async fn terminate_and_wait(
    client: &mut Client,
    ids: &[String],
    timeout: Duration,
) -> Result<(), CommandError> {
    call_verb(client, Verb::Terminate, ids).await?;
    let wait = Wait {
        wait: true,
        timeout: timeout.as_secs(),
    };
    wait_state(client, ids, pb::InstanceState::Terminated, wait).await?;
    Ok(())
}

/// Polls until every instance in `ids` is in `target`, with a spinner.
/// An instance that becomes `failed` (when the target is not
/// `terminated`) ends the wait with its reason.
pub async fn wait_state(
    client: &mut Client,
    ids: &[String],
    target: pb::InstanceState,
    wait: Wait,
) -> Result<Vec<pb::Instance>, CommandError> {
    let what = format!("{} to be {}", ids.join(", "), state_name(target as i32));
    let mut spinner = Spinner::stderr();
    let client = &*client;
    wait_for(
        &mut spinner,
        &what,
        Duration::from_secs(wait.timeout),
        POLL_INTERVAL,
        || {
            let mut c = client.clone();
            let req = pb::DescribeInstancesRequest {
                instance_ids: ids.to_vec(),
                ..Default::default()
            };
            async move { judge(describe_all(&mut c, req).await?, target) }
        },
    )
    .await
}

/// Whether `list` has reached `target`, failed, or is still on its way.
fn judge(
    list: Vec<pb::Instance>,
    target: pb::InstanceState,
) -> Result<Poll<Vec<pb::Instance>>, CommandError> {
    let failed = pb::InstanceState::Failed as i32;
    if target != pb::InstanceState::Failed && target != pb::InstanceState::Terminated {
        if let Some(i) = list.iter().find(|i| i.state == failed) {
            return Err(CommandError::Failed {
                id: i.instance_id.clone(),
                reason: i.state_reason.clone(),
            });
        }
    }
    let pending: Vec<String> = list
        .iter()
        .filter(|i| i.state != target as i32)
        .map(|i| format!("{}: {}", i.instance_id, state_name(i.state)))
        .collect();
    if pending.is_empty() {
        Ok(Poll::Ready(list))
    } else {
        Ok(Poll::Pending(pending.join(", ")))
    }
}

/// The raw console output of an instance.
pub async fn console_bytes(client: &mut Client, id: &str) -> Result<Vec<u8>, ClientError> {
    let req = pb::GetConsoleOutputRequest {
        instance_id: id.into(),
        max_bytes: 0,
    };
    let resp = client
        .call(|ch| {
            let req = req.clone();
            async move { ComputeClient::new(ch).get_console_output(req).await }
        })
        .await?;
    Ok(resp.output)
}

async fn console(client: &mut Client, id: &str) -> Result<(), CommandError> {
    let out = console_bytes(client, id).await?;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(&out);
    let _ = stdout.flush();
    Ok(())
}

#[cfg(test)]
mod block_device_tests {
    use super::parse_block_device;

    #[test]
    fn block_devices_parse_or_name_the_problem() {
        let m = parse_block_device("/dev/vdb=10,type=durable,delete-on-termination=false").unwrap();
        assert_eq!(
            (
                m.device_name.as_str(),
                m.volume_size_gib,
                m.volume_type.as_str()
            ),
            ("/dev/vdb", 10, "durable")
        );
        assert_eq!(m.delete_on_termination, Some(false));
        assert_eq!(
            parse_block_device("/dev/vdc=1")
                .unwrap()
                .delete_on_termination,
            None
        );
        for bad in [
            "/dev/vdb",
            "/dev/vdb=x",
            "/dev/vdb=1,size=2",
            "/dev/vdb=1,delete-on-termination=maybe",
        ] {
            let e = parse_block_device(bad).unwrap_err().to_string();
            assert!(e.starts_with("--block-device "), "{e}");
        }
        let r = super::parse_root_volume("8,type=durable").unwrap();
        assert_eq!((r.volume_size_gib, r.volume_type.as_str()), (8, "durable"));
        assert_eq!(r.delete_on_termination, None);
        let e = super::parse_root_volume("big").unwrap_err().to_string();
        assert!(e.starts_with("--root-volume \"big\""), "{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, state: pb::InstanceState) -> pb::Instance {
        pb::Instance {
            instance_id: id.into(),
            state: state as i32,
            state_reason: "vmm exited with status 1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn judge_waits_for_all_and_stops_on_failure() {
        use pb::InstanceState as S;
        let r = judge(
            vec![inst("i-1", S::Running), inst("i-2", S::Pending)],
            S::Running,
        )
        .unwrap();
        assert!(matches!(r, Poll::Pending(ref s) if s == "i-2: pending"));
        let r = judge(vec![inst("i-1", S::Running)], S::Running).unwrap();
        assert!(matches!(r, Poll::Ready(ref l) if l.len() == 1));
        let e = judge(vec![inst("i-1", S::Failed)], S::Running).unwrap_err();
        assert_eq!(
            e.to_string(),
            "instance i-1 failed: vmm exited with status 1"
        );
        // Failed instances may still be terminated.
        let r = judge(vec![inst("i-1", S::Failed)], S::Terminated).unwrap();
        assert!(matches!(r, Poll::Pending(_)));
    }
}
