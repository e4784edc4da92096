//! The operations the API offers, over any [`Replicator`].
//!
//! Writes become [`Command`]s carrying fresh ids, times and random bytes
//! (made here, never inside `apply`). Reads run on the leader. Agents'
//! heartbeats update the leader-local [`Liveness`] on every beat and are
//! written to the replicated state only when something changed, so an idle
//! cluster of 1,000 hosts does not write 1,000 log entries per interval.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use ferro_raft::{Member, ReplicationError, Replicator};

use crate::model::*;
use crate::state::{
    any_of, check_exist, sha256_hex, tags_match, ClusterState, Command, HostReport, NetFilter,
    Observation, Output, Paging, RunSpec, StateChange, StateError, DEFAULT_PAGE,
};

/// Errors of controller operations; the API maps each to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// Refused by the state machine.
    #[error(transparent)]
    State(#[from] StateError),
    /// Replication failed or this node is not the leader.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// No or an unknown API key.
    #[error("{0}")]
    Unauthenticated(String),
    /// A host's agent failed.
    #[error("{0}")]
    Agent(String),
    /// The answer of `apply` was not the expected kind.
    #[error("unexpected state machine output")]
    Unexpected,
    /// The cluster CA could not make or sign a certificate.
    #[error("certificate authority: {0}")]
    Pki(#[from] ferro_pki::PkiError),
}

type Result<T> = std::result::Result<T, ControllerError>;

/// What the leader last heard from a host (not replicated: a new leader
/// rebuilds it from the next heartbeats).
#[derive(Clone, Debug, Default)]
pub struct Seen {
    /// Unix ms of the last heartbeat.
    pub last_ms: u64,
    /// Images in the agent's store.
    pub images: BTreeSet<String>,
    /// Instances the agent lists (any state).
    pub instances: BTreeSet<String>,
}

/// Host liveness as this node saw it.
pub type Liveness = HashMap<String, Seen>;

/// Filters and paging of DescribeInstances.
#[derive(Clone, Debug, Default)]
pub struct InstanceFilter {
    /// Only these ids (all must exist).
    pub ids: Vec<String>,
    /// Only these public states.
    pub states: Vec<PublicState>,
    /// Only these zones.
    pub azs: Vec<String>,
    /// Only these instance types.
    pub types: Vec<String>,
    /// Only these hosts.
    pub hosts: Vec<String>,
    /// On the primary interface: VPC, subnet, address, groups.
    pub net: NetFilter,
    /// Every (key, value) must match; an empty value matches any.
    pub tags: Vec<(String, String)>,
    /// Page size (0: 100; at most 1000).
    pub max_results: u32,
    /// Start after this instance id.
    pub next_token: String,
}

pub use crate::state::Page;

/// Settings of a controller node.
#[derive(Clone, Debug)]
pub struct Settings {
    /// A host missing heartbeats this long is unreachable.
    pub heartbeat_timeout_ms: u64,
    /// The interval agents are told to heartbeat at.
    pub heartbeat_interval_ms: u32,
    /// Whether the replicator really replicates (shown by ClusterStatus).
    pub replicated: bool,
    /// How long terminated instances stay visible before they are purged.
    pub terminated_retention_ms: u64,
    /// The type of a volume asked for without one.
    pub default_volume_type: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            heartbeat_timeout_ms: 10_000,
            heartbeat_interval_ms: 1_000,
            replicated: false,
            terminated_retention_ms: 3_600_000,
            default_volume_type: "standard".into(),
        }
    }
}

/// Fresh random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // getrandom only fails when the OS has no entropy source at all, which
    // a Linux host with a running controller always has.
    getrandom::getrandom(&mut b).expect("the OS random source failed");
    b
}

/// `prefix` followed by 16 random lowercase hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", crate::state::hex(&random_bytes::<8>()))
}

/// A new API key secret (`fk_` and 64 hex digits) and its record.
pub fn new_api_key(name: &str, role: Role, now_ms: u64) -> (String, ApiKey) {
    let secret = format!("fk_{}", crate::state::hex(&random_bytes::<32>()));
    let key = ApiKey {
        id: new_id("ak-"),
        name: name.into(),
        secret_sha256: sha256_hex(secret.as_bytes()),
        admin: role == Role::Admin,
        created_at_ms: now_ms,
        role: Some(role),
        host_id: String::new(),
        ec2_secret: crate::state::hex(&random_bytes::<20>()),
    };
    (secret, key)
}

/// The controller's operations over a replicator.
pub struct Controller<R> {
    repl: R,
    settings: Settings,
    liveness: Mutex<Liveness>,
    /// Signalled after every committed write through this node, so the
    /// reconciler acts at once instead of at its next period.
    changed: tokio::sync::Notify,
    /// Clients of the agents, over mutual TLS.
    pub(crate) agents: crate::access::AgentClients,
    /// Failing reconcile actions (leader-local).
    pub(crate) failures: Mutex<crate::retry::Failures>,
}

impl<R: Replicator<ClusterState>> Controller<R> {
    /// A controller over `repl`.
    pub fn new(repl: R, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            repl,
            settings,
            liveness: Mutex::new(Liveness::new()),
            changed: tokio::sync::Notify::new(),
            agents: crate::access::AgentClients::default(),
            failures: Mutex::default(),
        })
    }

    /// The replicator.
    pub fn replicator(&self) -> &R {
        &self.repl
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// A copy of the leader-local liveness.
    pub fn liveness(&self) -> Liveness {
        self.liveness.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Why the reconciler cannot get `i` where it should be, if it keeps
    /// failing: its own action, or registering its image on its host.
    pub fn failure_reason(&self, i: &Instance) -> Option<String> {
        let f = self.failures.lock().ok()?;
        let now = crate::now_ms();
        f.get(&i.id)
            .or_else(|| {
                (i.observed == ObservedState::Absent && i.desired != DesiredState::Terminated)
                    .then(|| f.get(&format!("{}/{}", i.host_id, i.image_id)))
                    .flatten()
            })
            .map(|f| f.reason(now))
    }

    /// Which of `hosts` fail to register `image_id`: "host: why
    /// (attempts, …)".
    pub fn image_errors<'a>(
        &self,
        image_id: &str,
        hosts: impl Iterator<Item = &'a String>,
    ) -> Vec<String> {
        let Ok(f) = self.failures.lock() else {
            return vec![];
        };
        let now = crate::now_ms();
        let mut out: Vec<String> = hosts
            .filter_map(|h| {
                f.get(&format!("{h}/{image_id}"))
                    .map(|x| format!("{h}: {}", x.reason(now)))
            })
            .collect();
        out.sort();
        out
    }

    /// Note that `host_id`'s agent now has `image_id`.
    pub fn note_image(&self, host_id: &str, image_id: &str) {
        if let Ok(mut l) = self.liveness.lock() {
            if let Some(seen) = l.get_mut(host_id) {
                seen.images.insert(image_id.into());
            }
        }
    }

    /// Whether this node leads.
    pub fn is_leader(&self) -> bool {
        self.repl
            .leader()
            .is_some_and(|m| m.id == self.repl.node_id())
    }

    /// Write `command`, turning a state machine refusal into an error.
    pub async fn write(&self, command: Command) -> Result<Output> {
        let out = self.repl.write(command).await??;
        self.changed.notify_one();
        Ok(out)
    }

    /// Resolves after the next committed write through this node (or at
    /// once if one happened since the last call).
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Run `f` over the state on the leader.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ClusterState) -> T + Send + 'static,
    ) -> Result<T> {
        Ok(self.repl.read(f).await?)
    }

    /// Bootstrap a new cluster; returns the admin secret, or `None` when it
    /// was bootstrapped before.
    pub async fn bootstrap(&self, region: &str, azs: Vec<String>) -> Result<Option<String>> {
        let (secret, key) = new_api_key("admin", Role::Admin, crate::now_ms());
        let ca = crate::access::new_cluster_ca(region)?;
        let r = self
            .write(Command::Bootstrap {
                region: region.into(),
                azs,
                instance_types: default_instance_types(),
                admin_key: key,
                ca: Some(ca),
            })
            .await;
        let made = match r {
            Ok(_) => Some(secret),
            Err(ControllerError::State(StateError::FailedPrecondition(_))) => None,
            Err(e) => return Err(e),
        };
        self.ensure_default_vpc().await?;
        Ok(made)
    }

    /// Create the default VPC (and a default subnet per zone) unless one
    /// exists: at bootstrap, and at start for a cluster bootstrapped before
    /// VPCs existed.
    pub async fn ensure_default_vpc(&self) -> Result<()> {
        let zones = self.read(|s| (!s.vpcs.values().any(|v| v.is_default)).then_some(s.azs.len()));
        let Some(zones) = zones.await? else {
            return Ok(());
        };
        self.write(Command::CreateDefaultVpc {
            vpc_id: new_id("vpc-"),
            subnet_ids: (0..zones).map(|_| new_id("subnet-")).collect(),
            now_ms: crate::now_ms(),
        })
        .await?;
        Ok(())
    }

    /// Launch instances.
    pub async fn run_instances(&self, spec: RunSpec) -> Result<(String, Vec<Instance>)> {
        let n = spec.count.min(100) as usize;
        let cmd = Command::RunInstances {
            instance_ids: (0..n).map(|_| new_id("i-")).collect(),
            volume_ids: (0..n
                * (spec.block_devices.len().min(25) + spec.root_volume.is_some() as usize))
                .map(|_| new_id("vol-"))
                .collect(),
            reservation_id: new_id("r-"),
            now_ms: crate::now_ms(),
            spec,
        };
        match self.write(cmd).await? {
            Output::Launched {
                reservation_id,
                instances,
            } => Ok((reservation_id, instances)),
            _ => Err(ControllerError::Unexpected),
        }
    }

    /// Change intent.
    pub async fn set_desired(
        &self,
        ids: Vec<String>,
        desired: DesiredState,
    ) -> Result<Vec<StateChange>> {
        changes(self.write(Command::SetDesired { ids, desired }).await?)
    }

    /// Request reboots.
    pub async fn reboot(&self, ids: Vec<String>) -> Result<Vec<StateChange>> {
        changes(self.write(Command::Reboot { ids }).await?)
    }

    /// DescribeInstances.
    pub async fn describe_instances(&self, f: InstanceFilter) -> Result<Page<Instance>> {
        Ok(self.read(move |s| describe_instances(s, &f)).await??)
    }

    /// Record a heartbeat; writes to the replicated state only on change.
    pub async fn heartbeat(
        &self,
        report: HostReport,
        observed: Vec<Observation>,
        images: BTreeSet<String>,
        listed_seq: u64,
    ) -> Result<()> {
        let now = crate::now_ms();
        if let Ok(mut l) = self.liveness.lock() {
            l.insert(
                report.id.clone(),
                Seen {
                    last_ms: now,
                    images,
                    instances: observed.iter().map(|o| o.instance_id.clone()).collect(),
                },
            );
        }
        let (r, o) = (report.clone(), observed.clone());
        let changed = self
            .read(move |s| heartbeat_changes(s, &r, &o, listed_seq))
            .await?;
        if changed {
            self.write(Command::Heartbeat {
                host: report,
                observed,
                complete: true,
                now_ms: now,
                listed_seq,
            })
            .await?;
        }
        Ok(())
    }

    /// Record what an agent answered for one instance.
    pub async fn observe(&self, host_id: &str, o: Observation) -> Result<()> {
        self.write(Command::Observe {
            host_id: host_id.into(),
            observed: vec![o],
        })
        .await
        .map(|_| ())
    }

    /// The cluster members, this node and the leader.
    pub fn cluster_status(&self) -> (Vec<Member>, u64, Option<Member>) {
        (self.repl.members(), self.repl.node_id(), self.repl.leader())
    }
}

fn changes(o: Output) -> Result<Vec<StateChange>> {
    match o {
        Output::Changes(c) => Ok(c),
        _ => Err(ControllerError::Unexpected),
    }
}

/// Whether a heartbeat says anything the replicated state does not know:
/// any host fact, an instance's state or reason, a newer stamp, or an
/// instance no longer listed (by a listing newer than what is known of it).
pub fn heartbeat_changes(
    s: &ClusterState,
    r: &HostReport,
    observed: &[Observation],
    listed_seq: u64,
) -> bool {
    let Some(h) = s.hosts.get(&r.id) else {
        return true;
    };
    if h.health != HostHealth::Healthy
        || h.az != r.az
        || h.address != r.address
        || h.vcpus_total != r.vcpus_total
        || h.memory_total_mib != r.memory_total_mib
        || h.agent_version != r.agent_version
        || h.cpu_model != r.cpu_model
        || h.kvm_present != r.kvm_present
        || h.disk_total_gib != r.disk_total_gib
    {
        return true;
    }
    let mut listed = BTreeSet::new();
    for o in observed {
        if let Some(i) = s.instances.get(&o.instance_id) {
            if i.host_id == r.id {
                listed.insert(o.instance_id.as_str());
                let stale = o.seq != 0 && o.seq < i.observed_seq;
                // The controller words the reason of a guest power-off
                // itself (with the shutdown behaviour).
                let own_reason = o.stopped_by_guest && i.observed == ObservedState::Stopped;
                let new_tap =
                    !o.tap.is_empty() && i.network.as_ref().is_some_and(|n| n.tap != o.tap);
                if !stale
                    && (i.observed != o.state
                        || (i.observed_reason != o.reason && !own_reason)
                        || o.seq > i.observed_seq
                        || new_tap)
                {
                    return true;
                }
            }
        }
    }
    // An instance placed here that the host no longer lists.
    s.instances.values().any(|i| {
        i.host_id == r.id
            && i.observed != ObservedState::Absent
            && !listed.contains(i.id.as_str())
            && (listed_seq == 0 || listed_seq > i.observed_seq)
    })
}

/// DescribeInstances over a state: filter, order by id, page.
pub fn describe_instances(
    s: &ClusterState,
    f: &InstanceFilter,
) -> std::result::Result<Page<Instance>, StateError> {
    check_exist(&s.instances, &f.ids, "instance_ids", "instance")?;
    f.net.check()?;
    let paging = Paging::new(f.max_results, &f.next_token, DEFAULT_PAGE)?;
    let matching = paging.rest(&s.instances).filter(|i| {
        any_of(&f.ids, &i.id)
            && (f.states.is_empty() || f.states.contains(&i.public_state()))
            && any_of(&f.azs, &i.az)
            && any_of(&f.types, &i.instance_type)
            && any_of(&f.hosts, &i.host_id)
            && tags_match(&i.tags, &f.tags)
            && f.net.matches(s, i.network.as_ref())
    });
    let (page, next) = paging.page(matching, |i| i.id.as_str());
    Ok((page.into_iter().cloned().collect(), next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{add_host, add_image, bootstrapped, run, spec};

    fn report(cpu_model: &str, kvm_present: bool) -> HostReport {
        HostReport {
            id: "h1".into(),
            az: "az-1".into(),
            address: "http://h1:7420".into(),
            vcpus_total: 8,
            memory_total_mib: 8192,
            cpu_model: cpu_model.into(),
            agent_version: "0".into(),
            kvm_present,
            disk_total_gib: 0,
        }
    }

    /// A heartbeat is written to the replicated state when any host fact,
    /// an instance's state or reason, or a newer stamp differs; not when it
    /// repeats what is known, nor for a report older than what is known.
    #[test]
    fn a_heartbeat_is_written_when_it_says_something_new() {
        let mut s = bootstrapped();
        add_host(&mut s, "h1", "az-1", 8, 8192);
        add_image(&mut s);
        let mut seq = 0;
        run(&mut s, 1, &mut seq, spec()).unwrap();
        let id = s.instances.keys().next().unwrap().clone();
        let o = |state, reason: &str, seq| Observation {
            instance_id: id.clone(),
            state,
            reason: reason.into(),
            stopped_by_guest: false,
            seq,
            tap: String::new(),
        };
        use ferro_raft::StateMachine;
        s.apply(Command::Heartbeat {
            host: report("test", true),
            observed: vec![o(ObservedState::Running, "started", 10)],
            complete: true,
            now_ms: 1,
            listed_seq: 11,
        })
        .unwrap();
        let same = [o(ObservedState::Running, "started", 10)];
        assert!(!heartbeat_changes(&s, &report("test", true), &same, 12));
        assert!(heartbeat_changes(&s, &report("EPYC", true), &same, 12));
        assert!(heartbeat_changes(&s, &report("test", false), &same, 12));
        let reason = [o(ObservedState::Running, "restarted in place", 10)];
        assert!(heartbeat_changes(&s, &report("test", true), &reason, 12));
        let newer = [o(ObservedState::Running, "started", 20)];
        assert!(heartbeat_changes(&s, &report("test", true), &newer, 21));
        let older = [o(ObservedState::Stopped, "stopped", 5)];
        assert!(!heartbeat_changes(&s, &report("test", true), &older, 12));
        // Not listed by a listing older than what is known: nothing new.
        assert!(!heartbeat_changes(&s, &report("test", true), &[], 9));
        assert!(heartbeat_changes(&s, &report("test", true), &[], 12));
    }
}
