//! Conversions between the protobuf messages and the agent's own types.

use ferro_proto::agent::v1 as pb;

use crate::machine::{ExitInfo, Observed, Phase, RestartPolicy};
use crate::spec::{AttachedVolume, DiskSpec, InstanceSpec, NicSpec, Resources};

/// A phase as its protobuf enum.
pub fn phase(p: Phase) -> pb::InstanceState {
    use pb::InstanceState as S;
    match p {
        Phase::Created => S::Created,
        Phase::Starting => S::Starting,
        Phase::Running => S::Running,
        Phase::Stopping => S::Stopping,
        Phase::Stopped => S::Stopped,
        Phase::Rebooting => S::Rebooting,
        Phase::Failed => S::Failed,
        Phase::Deleting => S::Deleting,
        Phase::Deleted => S::Deleted,
    }
}

/// A restart policy as its protobuf enum.
pub fn policy(p: RestartPolicy) -> pb::RestartPolicy {
    match p {
        RestartPolicy::Never => pb::RestartPolicy::Never,
        RestartPolicy::OnFailure => pb::RestartPolicy::OnFailure,
        RestartPolicy::Always => pb::RestartPolicy::Always,
    }
}

/// An exit as its protobuf message.
pub fn exit_info(e: &ExitInfo) -> pb::ExitInfo {
    pb::ExitInfo {
        known: e.known,
        code: e.code,
        signal: e.signal,
        description: e.describe(),
        at_unix_ms: e.at_unix_ms,
    }
}

/// A protobuf spec as the agent's spec, with `default` for an unspecified
/// restart policy. Validation is separate ([`InstanceSpec::validate`]).
pub fn spec_from_pb(s: pb::InstanceSpec, default: RestartPolicy) -> InstanceSpec {
    let restart_policy = match pb::RestartPolicy::try_from(s.restart_policy) {
        Ok(pb::RestartPolicy::Never) => RestartPolicy::Never,
        Ok(pb::RestartPolicy::OnFailure) => RestartPolicy::OnFailure,
        Ok(pb::RestartPolicy::Always) => RestartPolicy::Always,
        _ => default,
    };
    InstanceSpec {
        id: s.id,
        vcpus: s.vcpus,
        memory_mib: s.memory_mib,
        image_id: s.image_id,
        disks: s
            .disks
            .into_iter()
            .map(|d| DiskSpec {
                id: d.id,
                size_bytes: d.size_bytes,
            })
            .collect(),
        nics: s.nics.into_iter().map(|n| NicSpec { mac: n.mac }).collect(),
        user_data: s.user_data,
        cmdline_extra: s.cmdline_extra,
        restart_policy,
        root_volume_id: s.root_volume_id,
        version: crate::persist::FORMAT_VERSION,
        extra: Default::default(),
    }
}

/// A start's size and user data as the agent's.
pub fn resources_from_pb(r: pb::Resources) -> Resources {
    Resources {
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        user_data: r.user_data,
    }
}

/// The agent's spec as protobuf (MACs and policy resolved).
pub fn spec_to_pb(s: &InstanceSpec) -> pb::InstanceSpec {
    pb::InstanceSpec {
        id: s.id.clone(),
        vcpus: s.vcpus,
        memory_mib: s.memory_mib,
        image_id: s.image_id.clone(),
        disks: s
            .disks
            .iter()
            .map(|d| pb::DiskSpec {
                id: d.id.clone(),
                size_bytes: d.size_bytes,
            })
            .collect(),
        nics: (0..s.nics.len())
            .map(|i| pb::NicSpec { mac: s.mac(i) })
            .collect(),
        user_data: s.user_data.clone(),
        cmdline_extra: s.cmdline_extra.clone(),
        restart_policy: policy(s.restart_policy) as i32,
        root_volume_id: s.root_volume_id.clone(),
    }
}

/// Attached volumes from protobuf (checked separately,
/// [`crate::spec::check_volumes`]).
pub fn volumes_from_pb(v: Vec<pb::AttachedVolume>) -> Vec<AttachedVolume> {
    v.into_iter()
        .map(|v| AttachedVolume {
            volume_id: v.volume_id,
            device: v.device,
        })
        .collect()
}

/// Attached volumes as protobuf.
pub fn volumes_to_pb(v: &[AttachedVolume]) -> Vec<pb::AttachedVolume> {
    v.iter()
        .map(|v| pb::AttachedVolume {
            volume_id: v.volume_id.clone(),
            device: v.device.clone(),
        })
        .collect()
}

/// An instance as protobuf.
pub fn instance(spec: &InstanceSpec, obs: &Observed, taps: Vec<String>) -> pb::Instance {
    pb::Instance {
        spec: Some(spec_to_pb(spec)),
        state: phase(obs.phase) as i32,
        want_running: obs.intent == crate::machine::Intent::Running,
        pid: obs.pid.unwrap_or(0),
        last_exit: obs.last_exit.as_ref().map(exit_info),
        reason: obs.reason.clone(),
        restart_count: obs.restart_count,
        next_restart_unix_ms: obs.next_restart_unix_ms,
        taps,
        effective_restart_policy: policy(spec.restart_policy) as i32,
        stopped_by_guest: obs.stopped_by_guest,
        seq: obs.seq,
        volumes: volumes_to_pb(&obs.volumes),
    }
}
