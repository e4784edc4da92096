//! The reconciler's decisions, sans-IO (STYLE 9, 10).
//!
//! [`plan`] takes a snapshot of the replicated state, the leader's view of
//! host liveness, the set of operations already in flight and the time, and
//! returns [`Action`]s. It is level-triggered: it looks only at where each
//! instance is versus where it should be, so running it again after a lost
//! answer or a leader change repeats nothing harmful (agent calls are
//! idempotent or refused harmlessly). The [`executor`](crate::executor)
//! carries the actions out.
//!
//! An instance is bound to its host. While its host is unreachable nothing
//! is done to it, so it cannot run twice. The one exception is made by the
//! state, not here: an instance booted from a volume and stopped on a host
//! that went away is bound to another host when it is started, and when
//! the old host comes back its stale copy there is deleted
//! ([`Action::DeleteStale`]).

use std::collections::{HashMap, HashSet};

use crate::controller::Liveness;
use crate::model::*;
use crate::state::ClusterState;

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Register `image` with the agent at `address`.
    RegisterImage {
        /// Host id.
        host_id: String,
        /// Agent endpoint.
        address: String,
        /// The image.
        image: Image,
    },
    /// Create the instance on its host (then start it when wanted).
    Create {
        /// Agent endpoint.
        address: String,
        /// The instance.
        instance: Box<Instance>,
        /// Image kernel command line extras.
        cmdline_extra: String,
        /// Start it once created.
        start: bool,
        /// The volumes attached to it (volume id, device), in device order.
        volumes: Vec<(String, String)>,
    },
    /// Start it.
    Start {
        /// Agent endpoint.
        address: String,
        /// Host id.
        host_id: String,
        /// Instance id.
        id: String,
        /// The volumes attached to it (volume id, device), in device order:
        /// an attachment made while it was stopped takes effect here.
        volumes: Vec<(String, String)>,
        /// Its size and user data now: a type or user data changed while
        /// it was stopped takes effect here.
        resources: StartResources,
    },
    /// Stop it.
    Stop {
        /// Agent endpoint.
        address: String,
        /// Host id.
        host_id: String,
        /// Instance id.
        id: String,
    },
    /// Reboot it, then acknowledge reboot `generation`.
    Reboot {
        /// Agent endpoint.
        address: String,
        /// Host id.
        host_id: String,
        /// Instance id.
        id: String,
        /// `reboots_requested`.
        generation: u64,
    },
    /// Delete it from its host.
    Delete {
        /// Agent endpoint.
        address: String,
        /// Host id.
        host_id: String,
        /// Instance id.
        id: String,
    },
    /// Delete the copy of an instance that a host lists but that is bound
    /// to another host now (it moved while this host was away). Its
    /// answer is not an observation of the instance.
    DeleteStale {
        /// Agent endpoint.
        address: String,
        /// The host holding the stale copy.
        host_id: String,
        /// Instance id.
        id: String,
    },
    /// These hosts missed their heartbeats.
    MarkUnreachable(Vec<String>),
    /// Forget these terminated instances (kept visible for the retention
    /// time, then purged from the state).
    Purge(Vec<String>),
}

impl Action {
    /// What it does, for a failure's message.
    pub fn describe(&self) -> String {
        match self {
            Action::RegisterImage { host_id, image, .. } => {
                format!("registering image {} on host {host_id}", image.id)
            }
            Action::Create { instance, .. } => format!("creating on host {}", instance.host_id),
            Action::Start { host_id, .. } => format!("starting on host {host_id}"),
            Action::Stop { host_id, .. } => format!("stopping on host {host_id}"),
            Action::Reboot { host_id, .. } => format!("rebooting on host {host_id}"),
            Action::Delete { host_id, .. } => format!("deleting on host {host_id}"),
            Action::DeleteStale { host_id, .. } => {
                format!("deleting a stale copy on host {host_id}")
            }
            Action::MarkUnreachable(_) => "marking hosts unreachable".into(),
            Action::Purge(_) => "purging terminated instances".into(),
        }
    }

    /// The key under which it is in flight: one operation per instance (or
    /// per image and host) at a time.
    pub fn key(&self) -> String {
        match self {
            Action::RegisterImage { host_id, image, .. } => format!("{host_id}/{}", image.id),
            Action::Create { instance, .. } => instance.id.clone(),
            Action::Start { id, .. }
            | Action::Stop { id, .. }
            | Action::Reboot { id, .. }
            | Action::Delete { id, .. } => id.clone(),
            Action::DeleteStale { host_id, id, .. } => format!("{host_id}/{id}"),
            Action::MarkUnreachable(_) => "unreachable".into(),
            Action::Purge(_) => "purge".into(),
        }
    }
}

/// An instance's size and user data as every start gives them to the
/// agent (ModifyInstanceAttribute changes them while it is stopped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartResources {
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// User data (empty: none).
    pub user_data: Vec<u8>,
}

impl StartResources {
    /// Those of `i`.
    pub fn of(i: &Instance) -> Self {
        Self {
            vcpus: i.vcpus,
            memory_mib: i.memory_mib,
            user_data: i.user_data.clone(),
        }
    }
}

/// Inputs of [`plan`] besides the state.
#[derive(Clone, Debug)]
pub struct Inputs {
    /// Leader-local liveness.
    pub liveness: Liveness,
    /// Keys of actions in flight.
    pub busy: HashSet<String>,
    /// Unix ms now.
    pub now_ms: u64,
    /// Unix ms at which this node became leader (hosts get a full timeout
    /// from then before they are declared unreachable).
    pub leader_since_ms: u64,
    /// Heartbeat timeout.
    pub timeout_ms: u64,
    /// Leader-local: when this leader first saw each instance terminated
    /// (see [`track_terminated`]).
    pub terminated_since: HashMap<String, u64>,
    /// How long a terminated instance stays visible before it is purged.
    pub retention_ms: u64,
}

/// Keeps `since` (instance id → when first seen terminated) in step with
/// the state: new terminated instances get `now_ms`, ids no longer
/// terminated (or gone) are dropped. Leader-local: a new leader starts the
/// clock again, so an instance is always visible for at least the
/// retention time.
pub fn track_terminated(s: &ClusterState, since: &mut HashMap<String, u64>, now_ms: u64) {
    since.retain(|id, _| s.instances.get(id).is_some_and(Instance::is_final));
    for i in s.instances.values().filter(|i| i.is_final()) {
        since.entry(i.id.clone()).or_insert(now_ms);
    }
}

/// Decide what to do.
pub fn plan(s: &ClusterState, inp: &Inputs) -> Vec<Action> {
    let mut out = Vec::new();
    let mut lost = Vec::new();
    for h in s.hosts.values() {
        if h.health != HostHealth::Healthy {
            continue;
        }
        let last = inp.liveness.get(&h.id).map_or(inp.leader_since_ms, |seen| {
            seen.last_ms.max(inp.leader_since_ms)
        });
        if inp.now_ms.saturating_sub(last) > inp.timeout_ms {
            lost.push(h.id.clone());
        }
    }
    let healthy = |id: &str| {
        s.hosts
            .get(id)
            .is_some_and(|h| h.health == HostHealth::Healthy && !lost.iter().any(|l| l == id))
    };
    for h in s.hosts.values().filter(|h| healthy(&h.id)) {
        let Some(seen) = inp.liveness.get(&h.id) else {
            continue;
        };
        for img in s.images.values().filter(|i| !seen.images.contains(&i.id)) {
            let a = Action::RegisterImage {
                host_id: h.id.clone(),
                address: h.address.clone(),
                image: img.clone(),
            };
            if !inp.busy.contains(&a.key()) {
                out.push(a);
            }
        }
        // Copies of instances bound elsewhere now (moved while this host
        // was away), and of terminated ones (a create that was in flight
        // when the instance was terminated ends after it was found gone:
        // terminated is final, its copy is just deleted). An id the state
        // does not know is left alone.
        for id in &seen.instances {
            let Some(i) = s.instances.get(id) else {
                continue;
            };
            if i.host_id == h.id && !i.is_final() {
                continue;
            }
            let a = Action::DeleteStale {
                address: h.address.clone(),
                host_id: h.id.clone(),
                id: id.clone(),
            };
            if !inp.busy.contains(&a.key()) {
                out.push(a);
            }
        }
    }
    for i in s.instances.values() {
        if i.is_final() || inp.busy.contains(&i.id) || !healthy(&i.host_id) {
            continue;
        }
        let host = &s.hosts[&i.host_id];
        if let Some(a) = instance_action(s, i, host, inp) {
            out.push(a);
        }
    }
    if !lost.is_empty() {
        out.push(Action::MarkUnreachable(lost));
    }
    let mut expired: Vec<String> = inp
        .terminated_since
        .iter()
        .filter(|(id, t)| {
            inp.now_ms.saturating_sub(**t) >= inp.retention_ms
                && s.instances.get(*id).is_some_and(Instance::is_final)
        })
        .map(|(id, _)| id.clone())
        .collect();
    if !expired.is_empty() && !inp.busy.contains("purge") {
        expired.sort();
        // Bounded log entries: at most 1,000 per pass.
        expired.truncate(1000);
        out.push(Action::Purge(expired));
    }
    out
}

fn instance_action(s: &ClusterState, i: &Instance, h: &Host, inp: &Inputs) -> Option<Action> {
    use DesiredState as D;
    use ObservedState as O;
    let address = h.address.clone();
    let host_id = h.id.clone();
    let id = i.id.clone();
    let volumes = || {
        crate::state::attachments_of(s, &i.id)
            .into_iter()
            .map(|(v, a)| (v, a.device))
            .collect()
    };
    // A launch's volumes are made first: the agent could not start the
    // instance before its host's blockd serves them.
    // (Only looked at for a create or a start, not on every pass over a
    // running instance.)
    let volumes_ready = || {
        !s.volumes.values().any(|v| {
            v.state == VolumeState::Creating
                && v.attachment.as_ref().is_some_and(|a| a.instance_id == i.id)
        })
    };
    match (i.desired, i.observed) {
        (_, O::Unknown) => None,
        (D::Terminated, O::Absent | O::Deleting) => None,
        (D::Terminated, _) => Some(Action::Delete {
            address,
            host_id,
            id,
        }),
        (D::Running, O::Absent) => {
            let image_ready = inp
                .liveness
                .get(&h.id)
                .is_some_and(|seen| seen.images.contains(&i.image_id));
            let image = s.images.get(&i.image_id)?;
            (image_ready && volumes_ready()).then(|| Action::Create {
                address,
                instance: Box::new(i.clone()),
                cmdline_extra: image.cmdline_extra.clone(),
                start: true,
                volumes: volumes(),
            })
        }
        (D::Running, O::Created | O::Stopped) => volumes_ready().then(|| Action::Start {
            address,
            host_id,
            id,
            volumes: volumes(),
            resources: StartResources::of(i),
        }),
        (D::Running, O::Running) if i.reboots_requested > i.reboots_done => Some(Action::Reboot {
            address,
            host_id,
            id,
            generation: i.reboots_requested,
        }),
        (D::Stopped, O::Running | O::Starting | O::Rebooting) => Some(Action::Stop {
            address,
            host_id,
            id,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::Seen;
    use crate::state::tests::{add_host, add_image, bootstrapped, run};
    use crate::state::{Command, InstanceChange, Observation, RunSpec};
    use ferro_raft::StateMachine;

    fn inputs(s: &ClusterState, now: u64) -> Inputs {
        let images: std::collections::BTreeSet<String> = s.images.keys().cloned().collect();
        Inputs {
            liveness: s
                .hosts
                .keys()
                .map(|h| {
                    (
                        h.clone(),
                        Seen {
                            last_ms: now,
                            images: images.clone(),
                            instances: Default::default(),
                        },
                    )
                })
                .collect(),
            busy: HashSet::new(),
            now_ms: now,
            leader_since_ms: 0,
            timeout_ms: 1000,
            terminated_since: HashMap::new(),
            retention_ms: 60_000,
        }
    }

    fn one_instance() -> (ClusterState, String) {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 8, 8192);
        add_image(&mut s);
        let mut seq = 0;
        let spec = RunSpec {
            instance_type: "f1.nano".into(),
            image: "guest".into(),
            ..RunSpec::default()
        };
        run(&mut s, 1, &mut seq, spec).unwrap();
        let id = s.instances.keys().next().unwrap().clone();
        (s, id)
    }

    fn observe(s: &mut ClusterState, id: &str, state: ObservedState) {
        s.apply(Command::Observe {
            host_id: "h1".into(),
            observed: vec![Observation {
                instance_id: id.into(),
                state,
                reason: String::new(),
                stopped_by_guest: false,
                seq: 0,
                tap: String::new(),
            }],
        })
        .unwrap();
    }

    #[test]
    fn new_instance_is_created_and_started() {
        let (s, id) = one_instance();
        let a = plan(&s, &inputs(&s, 100));
        assert!(
            matches!(&a[..], [Action::Create { instance, start: true, .. }] if instance.id == id)
        );
    }

    #[test]
    fn a_host_listing_an_instance_bound_elsewhere_deletes_its_stale_copy() {
        let (mut s, id) = one_instance();
        add_host(&mut s, "h2", "az-1", 8, 8192);
        let mut inp = inputs(&s, 100);
        // h2 lists the instance (bound to h1), and an id the state does
        // not know, which is left alone.
        inp.liveness.get_mut("h2").unwrap().instances =
            [id.clone(), "i-00000000000000ff".to_string()].into();
        let stale: Vec<Action> = plan(&s, &inp)
            .into_iter()
            .filter(|a| matches!(a, Action::DeleteStale { .. }))
            .collect();
        assert_eq!(
            stale,
            [Action::DeleteStale {
                address: "http://h2:7420".into(),
                host_id: "h2".into(),
                id: id.clone(),
            }]
        );
        // Its own host listing it is no reason.
        inp.liveness.get_mut("h2").unwrap().instances.clear();
        inp.liveness.get_mut("h1").unwrap().instances = [id.clone()].into();
        assert!(!plan(&s, &inp)
            .iter()
            .any(|a| matches!(a, Action::DeleteStale { .. })));
        // Unless it is terminated (a create that ended after it was gone).
        let mut s2 = s.clone();
        s2.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Terminated,
        })
        .unwrap();
        assert!(s2.instances[&id].is_final(), "never seen on its host");
        assert!(plan(&s2, &inp)
            .iter()
            .any(|a| matches!(a, Action::DeleteStale { host_id, .. } if host_id == "h1")));
        // While one runs, it is not planned again.
        inp.liveness.get_mut("h2").unwrap().instances = [id.clone()].into();
        inp.busy.insert(format!("h2/{id}"));
        assert!(!plan(&s, &inp)
            .iter()
            .any(|a| matches!(a, Action::DeleteStale { .. })));
    }

    #[test]
    fn a_start_carries_the_volumes_attached_meanwhile_in_device_order() {
        let (mut s, id) = one_instance();
        observe(&mut s, &id, ObservedState::Stopped);
        for (vol, dev) in [("vol-2", "/dev/vdc"), ("vol-1", "/dev/vdb"), ("vol-3", "")] {
            s.volumes.insert(
                vol.into(),
                Volume {
                    id: vol.into(),
                    size_gib: 1,
                    az: "az-1".into(),
                    volume_type: VolumeType::Standard,
                    tags: Default::default(),
                    created_at_ms: 0,
                    state: VolumeState::InUse,
                    attachment: (!dev.is_empty()).then(|| VolumeAttachment {
                        instance_id: id.clone(),
                        device: dev.into(),
                        state: AttachmentState::Attached,
                        delete_on_termination: false,
                    }),
                    replicas: vec!["h1".into()],
                    epoch: 1,
                    client_token: String::new(),
                    held: Default::default(),
                    out_of_sync: Default::default(),
                    source_image: None,
                    session: 0,
                    session_host: String::new(),
                    clean: false,
                    incarnations: Default::default(),
                },
            );
        }
        let a = plan(&s, &inputs(&s, 100));
        let want = vec![
            ("vol-1".to_string(), "/dev/vdb".to_string()),
            ("vol-2".to_string(), "/dev/vdc".to_string()),
        ];
        assert!(
            matches!(&a[..], [Action::Start { volumes, .. }] if *volumes == want),
            "{a:?}"
        );
    }

    #[test]
    fn a_start_carries_the_size_and_user_data_changed_while_stopped() {
        let (mut s, id) = one_instance();
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Stopped,
        })
        .unwrap();
        observe(&mut s, &id, ObservedState::Stopped);
        s.apply(Command::ModifyInstance {
            id: id.clone(),
            change: InstanceChange {
                instance_type: Some("f1.medium".into()),
                user_data: Some(b"resized".to_vec()),
                ..Default::default()
            },
        })
        .unwrap();
        assert!(plan(&s, &inputs(&s, 100)).is_empty(), "stopped: nothing");
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Running,
        })
        .unwrap();
        let a = plan(&s, &inputs(&s, 100));
        let want = StartResources {
            vcpus: 2,
            memory_mib: 1024,
            user_data: b"resized".to_vec(),
        };
        assert!(
            matches!(&a[..], [Action::Start { resources, .. }] if *resources == want),
            "{a:?}"
        );
    }

    #[test]
    fn image_is_registered_before_create() {
        let (s, _) = one_instance();
        let mut inp = inputs(&s, 100);
        inp.liveness.get_mut("h1").unwrap().images.clear();
        let a = plan(&s, &inp);
        assert!(matches!(&a[..], [Action::RegisterImage { .. }]), "{a:?}");
    }

    #[test]
    fn converged_instance_needs_nothing() {
        let (mut s, id) = one_instance();
        observe(&mut s, &id, ObservedState::Running);
        assert!(plan(&s, &inputs(&s, 100)).is_empty());
    }

    #[test]
    fn stop_terminate_and_reboot() {
        let (mut s, id) = one_instance();
        observe(&mut s, &id, ObservedState::Running);
        s.apply(Command::Reboot {
            ids: vec![id.clone()],
        })
        .unwrap();
        assert!(matches!(
            plan(&s, &inputs(&s, 1))[..],
            [Action::Reboot { generation: 1, .. }]
        ));
        s.apply(Command::AckReboot {
            id: id.clone(),
            generation: 1,
        })
        .unwrap();
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Stopped,
        })
        .unwrap();
        assert!(matches!(
            plan(&s, &inputs(&s, 1))[..],
            [Action::Stop { .. }]
        ));
        observe(&mut s, &id, ObservedState::Stopped);
        assert!(plan(&s, &inputs(&s, 1)).is_empty());
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Terminated,
        })
        .unwrap();
        assert!(matches!(
            plan(&s, &inputs(&s, 1))[..],
            [Action::Delete { .. }]
        ));
    }

    #[test]
    fn busy_instances_are_left_alone() {
        let (s, id) = one_instance();
        let mut inp = inputs(&s, 100);
        inp.busy.insert(id);
        assert!(plan(&s, &inp).is_empty());
    }

    #[test]
    fn silent_host_becomes_unreachable_and_its_instances_wait() {
        let (mut s, id) = one_instance();
        observe(&mut s, &id, ObservedState::Running);
        let mut inp = inputs(&s, 100);
        inp.now_ms = 5000;
        let a = plan(&s, &inp);
        assert_eq!(a, vec![Action::MarkUnreachable(vec!["h1".into()])]);
        s.apply(Command::MarkUnreachable {
            host_ids: vec!["h1".into()],
        })
        .unwrap();
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Terminated,
        })
        .unwrap();
        // Nothing is done while the host is away, and nothing is moved.
        assert!(plan(&s, &inp).is_empty());
        assert_eq!(s.instances[&id].host_id, "h1");
    }

    #[test]
    fn a_new_leader_gives_hosts_a_full_timeout() {
        let (s, _) = one_instance();
        let mut inp = inputs(&s, 100);
        inp.liveness.clear();
        inp.leader_since_ms = 4500;
        inp.now_ms = 5000;
        assert!(plan(&s, &inp)
            .iter()
            .all(|a| !matches!(a, Action::MarkUnreachable(_))));
    }

    #[test]
    fn terminated_instances_are_purged_after_the_retention_time() {
        let (mut s, id) = one_instance();
        observe(&mut s, &id, ObservedState::Running);
        s.apply(Command::SetDesired {
            ids: vec![id.clone()],
            desired: DesiredState::Terminated,
        })
        .unwrap();
        let mut since = HashMap::new();
        // Shutting down (still on the host): not tracked.
        track_terminated(&s, &mut since, 1_000);
        assert!(since.is_empty());
        observe(&mut s, &id, ObservedState::Absent);
        track_terminated(&s, &mut since, 2_000);
        track_terminated(&s, &mut since, 5_000);
        assert_eq!(since.get(&id), Some(&2_000), "first sighting is kept");
        let mut inp = inputs(&s, 2_000 + 59_999);
        inp.terminated_since = since.clone();
        assert!(plan(&s, &inp)
            .iter()
            .all(|a| !matches!(a, Action::Purge(_))));
        inp.now_ms = 2_000 + 60_000;
        let purge: Vec<_> = plan(&s, &inp)
            .into_iter()
            .filter(|a| matches!(a, Action::Purge(_)))
            .collect();
        assert_eq!(purge, vec![Action::Purge(vec![id.clone()])]);
        // Applied: the instance and its token are gone; tracking follows.
        s.apply(Command::PurgeInstances {
            ids: vec![id.clone()],
        })
        .unwrap();
        assert!(!s.instances.contains_key(&id));
        track_terminated(&s, &mut since, 70_000);
        assert!(since.is_empty());
    }

    #[test]
    fn purge_keeps_instances_that_are_not_terminated() {
        let (mut s, id) = one_instance();
        s.apply(Command::PurgeInstances {
            ids: vec![id.clone()],
        })
        .unwrap();
        assert!(s.instances.contains_key(&id));
    }
}
