//! What one host's volume daemon is told (`Hosts.WatchHostVolumes`): the
//! replicas it is to hold and the volumes it serves to its instances (as
//! their primary), derived from the cluster state on every change; and
//! reading what it reports holding
//! (`Hosts.ReportVolumeReplicas`).

use std::collections::BTreeMap;

use ferro_proto::compute::v1 as pb;
use ferro_proto::is_volume_id;

use crate::model::{Volume, VolumeState};
use crate::state::ClusterState;

/// The most replicas one report may name.
pub const MAX_REPORTED: usize = 100_000;

/// Host `host_id`'s replicas: every volume placed on it, with its size,
/// epoch and replica hosts; a volume being deleted is marked so. A root
/// volume still being made names its image's root disk to fill a new
/// replica from (every replica host reads its own copy of the image).
pub fn host_volumes(s: &ClusterState, host_id: &str) -> pb::HostVolumes {
    let replicas = s
        .volumes
        .values()
        .filter(|v| v.replicas.iter().any(|r| r == host_id))
        .map(|v| pb::ReplicaOnHost {
            volume_id: v.id.clone(),
            size_bytes: v.size_gib << 30,
            epoch: v.epoch,
            replica_host_ids: v.replicas.clone(),
            deleting: v.state == VolumeState::Deleting,
            in_sync: !v.out_of_sync.contains(host_id),
            peers: peers(s, v),
            resync: to_resync(s, v, host_id),
            source_path: source_path(s, v),
            incarnation: v.incarnations.get(host_id).copied().unwrap_or(0),
        })
        .collect();
    let serve = s
        .volumes
        .values()
        .filter_map(|v| {
            let a = v.attachment.as_ref()?;
            let i = s.instances.get(&a.instance_id)?;
            (i.host_id == host_id && !i.is_final()).then(|| pb::ServedVolume {
                volume_id: v.id.clone(),
                instance_id: i.id.clone(),
                size_bytes: v.size_gib << 30,
                epoch: v.epoch,
                peers: peers(s, v),
            })
        })
        .collect();
    pb::HostVolumes {
        host_id: host_id.to_string(),
        revision: 0,
        replicas,
        serve,
    }
}

/// The image file a new replica of `v` is filled from: its image's root
/// disk while `v` is being made; later replicas are resynced from a peer.
fn source_path(s: &ClusterState, v: &Volume) -> String {
    match (&v.source_image, v.state) {
        (Some(img), VolumeState::Creating) => s
            .images
            .get(img)
            .map(|i| i.rootdisk_path.clone())
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// The replicas of `v` out of sync that `host_id` is to resync: all of
/// them when no live instance has `v` attached (its serving host resyncs
/// them otherwise), `v` is not being deleted, and `host_id` is its first
/// replica in sync; else none.
pub fn to_resync(s: &ClusterState, v: &Volume, host_id: &str) -> Vec<String> {
    let served = v
        .attachment
        .as_ref()
        .and_then(|a| s.instances.get(&a.instance_id))
        .is_some_and(|i| !i.is_final());
    if served
        || v.state == VolumeState::Deleting
        || v.in_sync().next().map(String::as_str) != Some(host_id)
    {
        return Vec::new();
    }
    v.replicas
        .iter()
        .filter(|r| v.out_of_sync.contains(*r))
        .cloned()
        .collect()
}

/// Every replica of `v`, in placement order, with its replica server.
fn peers(s: &ClusterState, v: &Volume) -> Vec<pb::ReplicaPeer> {
    v.replicas
        .iter()
        .map(|r| pb::ReplicaPeer {
            host_id: r.clone(),
            addr: s
                .hosts
                .get(r)
                .map(|h| h.blockd_addr.clone())
                .unwrap_or_default(),
            in_sync: !v.out_of_sync.contains(r),
        })
        .collect()
}

/// A report's replica incarnations as volume → incarnation, for those that
/// carry one (a blockd from before incarnations sends 0). Call after
/// [`held`] accepted the report.
pub fn incarnations(r: &pb::ReportVolumeReplicasRequest) -> BTreeMap<String, u64> {
    r.replicas
        .iter()
        .filter(|h| h.incarnation != 0)
        .map(|h| (h.volume_id.clone(), h.incarnation))
        .collect()
}

/// A report's replicas as volume → epoch; an error names the bad entry.
pub fn held(r: &pb::ReportVolumeReplicasRequest) -> Result<BTreeMap<String, u64>, String> {
    if r.replicas.len() > MAX_REPORTED {
        return Err(format!(
            "replicas: {} entries, at most {MAX_REPORTED}",
            r.replicas.len()
        ));
    }
    let mut out = BTreeMap::new();
    for (i, h) in r.replicas.iter().enumerate() {
        if !is_volume_id(&h.volume_id) {
            return Err(format!(
                "replicas[{i}].volume_id: {:?} is not a volume id (vol- and 16 hex digits)",
                h.volume_id
            ));
        }
        if out.insert(h.volume_id.clone(), h.epoch).is_some() {
            return Err(format!(
                "replicas[{i}].volume_id: {} is named twice",
                h.volume_id
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ids: &[&str]) -> pb::ReportVolumeReplicasRequest {
        pb::ReportVolumeReplicasRequest {
            replica_addr: String::new(),
            replicas: ids
                .iter()
                .map(|id| pb::HeldReplica {
                    volume_id: id.to_string(),
                    epoch: 1,
                    incarnation: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn reports_name_their_bad_entry() {
        let ok = "vol-0123456789abcdef";
        assert_eq!(held(&req(&[ok])).unwrap().len(), 1);
        for (ids, want) in [
            (vec![ok, "vol-0123456789ABCDEF"], "replicas[1].volume_id"),
            (vec!["../etc"], "replicas[0].volume_id"),
            (vec![ok, ok], "is named twice"),
        ] {
            let e = held(&req(&ids)).unwrap_err();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
