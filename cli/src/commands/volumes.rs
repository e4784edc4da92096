//! `ferro volumes …`: create, list, attach, detach, delete.

use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::compute_client::ComputeClient;
use std::time::Duration;

use serde_json::{json, Value};

use super::{client_token, done, parse_tags, CommandError};
use crate::args::{self, Format};
use crate::client::Client;
use crate::output::{self, attachment_json, print};
use crate::spinner::{wait_for, Poll, Spinner};
use crate::table::Table;

/// How often `--wait` polls.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// Runs a `ferro volumes` subcommand.
pub async fn run(
    client: &mut Client,
    format: Format,
    cmd: args::Volumes,
) -> Result<(), CommandError> {
    use args::Volumes as V;
    let list = match cmd {
        V::Create {
            size,
            az,
            volume_type,
            tags,
            wait,
        } => {
            let req = pb::CreateVolumeRequest {
                size_gib: size,
                availability_zone: az,
                volume_type,
                tags: parse_tags(&tags)?,
                // One token for every retry of this call.
                client_token: client_token(),
            };
            let v = client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).create_volume(req).await }
                })
                .await?;
            if wait.wait {
                let id = v.volume_id.clone();
                vec![wait_volume(client, &id, Some("available"), wait)
                    .await?
                    .unwrap_or(v)]
            } else {
                vec![v]
            }
        }
        V::List { az, instance } => {
            let req = pb::DescribeVolumesRequest {
                availability_zones: az.into_iter().collect(),
                attachment_instance_ids: instance.into_iter().collect(),
                ..Default::default()
            };
            super::pages::list_all(client, req).await?
        }
        V::Attach {
            volume,
            instance,
            device,
            delete_on_termination,
        } => {
            let req = pb::AttachVolumeRequest {
                volume_id: volume,
                instance_id: instance,
                device,
                delete_on_termination,
            };
            let a = client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).attach_volume(req).await }
                })
                .await?;
            attachment_done(format, a.attachment);
            return Ok(());
        }
        V::Detach { volume, force } => {
            let req = pb::DetachVolumeRequest {
                volume_id: volume,
                instance_id: String::new(),
                force,
            };
            let a = client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).detach_volume(req).await }
                })
                .await?;
            attachment_done(format, a.attachment);
            return Ok(());
        }
        V::Delete { volume, wait } => {
            let req = pb::DeleteVolumeRequest {
                volume_id: volume.clone(),
            };
            client
                .call(|ch| {
                    let req = req.clone();
                    async move { ComputeClient::new(ch).delete_volume(req).await }
                })
                .await?;
            if wait.wait {
                wait_volume(client, &volume, None, wait).await?;
            }
            done(
                format,
                &format!("deleted {volume}"),
                json!({"volume_id": volume, "deleted": true}),
            );
            return Ok(());
        }
    };
    let (t, j) = volumes(&list);
    print(format, &t, &j);
    Ok(())
}

fn attachment_done(format: Format, a: Option<pb::VolumeAttachment>) {
    let a = a.unwrap_or_default();
    done(
        format,
        &format!(
            "{} {} {} as {}",
            a.volume_id, a.state, a.instance_id, a.device
        ),
        attachment_json(&a),
    );
}

/// Volumes as a table and as JSON.
pub fn volumes(list: &[pb::Volume]) -> (Table, Value) {
    let mut t = Table::new([
        "VOLUME", "STATE", "SIZE", "TYPE", "AZ", "ATTACHED", "REPLICAS", "CREATED",
    ]);
    let mut j = Vec::new();
    for v in list {
        let attached: Vec<String> = v
            .attachments
            .iter()
            .map(|a| format!("{} {}", a.instance_id, a.device))
            .collect();
        t.row([
            v.volume_id.clone(),
            v.state.clone(),
            format!("{} GiB", v.size_gib),
            v.volume_type.clone(),
            v.availability_zone.clone(),
            output::dash(&attached.join(", ")),
            v.replica_host_ids.join(","),
            output::time(v.created_at_ms),
        ]);
        j.push(json!({
            "volume_id": v.volume_id,
            "state": v.state,
            "size_gib": v.size_gib,
            "volume_type": v.volume_type,
            "availability_zone": v.availability_zone,
            "attachments": v.attachments.iter().map(attachment_json).collect::<Vec<_>>(),
            "replica_host_ids": v.replica_host_ids,
            "epoch": v.epoch,
            "client_token": v.client_token,
            "created_at_ms": v.created_at_ms,
            "tags": output::tags_json(&v.tags),
        }));
    }
    (t, Value::Array(j))
}

/// Polls until volume `id` is in state `target` (`None`: gone), with a
/// spinner; a volume in `error` ends the wait.
async fn wait_volume(
    client: &Client,
    id: &str,
    target: Option<&str>,
    wait: args::Wait,
) -> Result<Option<pb::Volume>, CommandError> {
    let what = format!("{id} to be {}", target.unwrap_or("deleted"));
    let mut spinner = Spinner::stderr();
    wait_for(
        &mut spinner,
        &what,
        Duration::from_secs(wait.timeout),
        POLL_INTERVAL,
        || {
            let mut c = client.clone();
            let req = pb::DescribeVolumesRequest {
                volume_ids: vec![id.to_string()],
                ..Default::default()
            };
            async move {
                let found = c
                    .call(|ch| {
                        let req = req.clone();
                        async move { ComputeClient::new(ch).describe_volumes(req).await }
                    })
                    .await;
                let v = match found {
                    Ok(r) => r.volumes.into_iter().next(),
                    Err(e)
                        if e.status()
                            .is_some_and(|s| s.code() == tonic::Code::NotFound) =>
                    {
                        None
                    }
                    Err(e) => return Err(e.into()),
                };
                let state = v.as_ref().map(|v| v.state.clone());
                if state.as_deref() == target {
                    return Ok(Poll::Ready(v));
                }
                match state.as_deref() {
                    Some("error") => Err(CommandError::VolumeFailed(id.to_string())),
                    Some(s) => Ok(Poll::Pending(format!("{id}: {s}"))),
                    None => Err(CommandError::VolumeFailed(format!("{id} is gone"))),
                }
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_table_and_json() {
        let v = pb::Volume {
            volume_id: "vol-1".into(),
            size_gib: 8,
            availability_zone: "az-1".into(),
            volume_type: "standard".into(),
            state: "in-use".into(),
            attachments: vec![pb::VolumeAttachment {
                volume_id: "vol-1".into(),
                instance_id: "i-1".into(),
                device: "/dev/vdb".into(),
                state: "attached".into(),
                delete_on_termination: false,
            }],
            replica_host_ids: vec!["h1".into(), "h2".into()],
            epoch: 1,
            ..Default::default()
        };
        let (t, j) = volumes(std::slice::from_ref(&v));
        assert_eq!(
            t.render(),
            "VOLUME  STATE   SIZE   TYPE      AZ    ATTACHED      REPLICAS  CREATED\n\
             vol-1   in-use  8 GiB  standard  az-1  i-1 /dev/vdb  h1,h2     -\n"
        );
        assert_eq!(j[0]["attachments"][0]["device"], "/dev/vdb");
        assert_eq!(j[0]["replica_host_ids"][1], "h2");
    }
}
