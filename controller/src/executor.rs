//! Carries out the reconciler's [`Action`]s over the agents' gRPC API, and
//! runs the reconcile loop on the leader.
//!
//! Each action runs in its own task, at most one per instance (or image and
//! host) at a time. Answers that mean "already done" (ALREADY_EXISTS on
//! create, FAILED_PRECONDITION on start or stop, NOT_FOUND on delete) count
//! as success: the next heartbeat shows the truth either way.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferro_proto::agent::v1 as pb;
use ferro_proto::agent::v1::agent_client::AgentClient;
use ferro_raft::Replicator;
use tonic::transport::Channel;
use tonic::Code;
use tracing::Instrument;

use crate::controller::{Controller, ControllerError};
use crate::model::ObservedState;
use crate::reconciler::{plan, track_terminated, Action, Inputs, StartResources};
use crate::retry::Log;
use crate::state::{ClusterState, Command, Observation};

/// The shortest time between two reconcile passes.
pub const MIN_GAP: Duration = Duration::from_millis(10);

/// How long one agent call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

pub use crate::lifecycle::observed_from_agent;

/// An agent instance as an observation.
pub fn observation(i: &pb::Instance) -> Observation {
    Observation {
        instance_id: i.spec.as_ref().map(|s| s.id.clone()).unwrap_or_default(),
        state: observed_from_agent(i.state),
        reason: i.reason.clone(),
        stopped_by_guest: i.stopped_by_guest,
        seq: i.seq,
        tap: i.taps.first().cloned().unwrap_or_default(),
    }
}

/// Runs actions against agents.
pub struct Executor<R> {
    ctl: Arc<Controller<R>>,
    busy: Mutex<HashSet<String>>,
    /// When this leader first saw each instance terminated.
    terminated_since: Mutex<HashMap<String, u64>>,
}

impl<R: Replicator<ClusterState>> Executor<R> {
    /// An executor for `ctl`.
    pub fn new(ctl: Arc<Controller<R>>) -> Arc<Self> {
        Arc::new(Self {
            ctl,
            busy: Mutex::new(HashSet::new()),
            terminated_since: Mutex::new(HashMap::new()),
        })
    }

    fn client(
        &self,
        host_id: &str,
        address: &str,
    ) -> Result<AgentClient<Channel>, ControllerError> {
        self.ctl.agent_client(host_id, address, CALL_TIMEOUT)
    }

    /// Run the reconcile loop while this node leads: every `period`, and
    /// after each write committed through this node (a launch, a state
    /// change a heartbeat reported, an agent's answer), at most once per
    /// [`MIN_GAP`]; never returns.
    pub async fn run(self: Arc<Self>, period: Duration) {
        let mut leader_since = None;
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.ctl.changed() => {}
            }
            // Coalesces bursts of writes into one pass.
            tokio::time::sleep(MIN_GAP).await;
            if !self.ctl.is_leader() {
                leader_since = None;
                continue;
            }
            let since = *leader_since.get_or_insert_with(crate::now_ms);
            if let Err(e) = self.clone().tick(since).await {
                tracing::debug!(error = %crate::chain(&e), "reconcile pass failed");
            }
        }
    }

    /// One reconcile pass: plan, then start every action.
    pub async fn tick(self: Arc<Self>, leader_since_ms: u64) -> Result<usize, ControllerError> {
        let now_ms = crate::now_ms();
        let mut inputs = Inputs {
            liveness: self.ctl.liveness(),
            busy: self.busy.lock().map(|b| b.clone()).unwrap_or_default(),
            now_ms,
            leader_since_ms,
            timeout_ms: self.ctl.settings().heartbeat_timeout_ms,
            terminated_since: self
                .terminated_since
                .lock()
                .map(|t| t.clone())
                .unwrap_or_default(),
            retention_ms: self.ctl.settings().terminated_retention_ms,
        };
        let (actions, since) = self
            .ctl
            .read(move |s| {
                track_terminated(s, &mut inputs.terminated_since, now_ms);
                (plan(s, &inputs), inputs.terminated_since)
            })
            .await?;
        if let Ok(mut t) = self.terminated_since.lock() {
            *t = since;
        }
        let n = actions.len();
        if let Ok(mut f) = self.ctl.failures.lock() {
            // Failures of actions no longer wanted are forgotten.
            let planned: HashSet<String> = actions.iter().map(Action::key).collect();
            let busy = self.busy.lock().map(|b| b.clone()).unwrap_or_default();
            f.retain(|k| planned.contains(k) || busy.contains(k));
        }
        for a in actions {
            let key = a.key();
            let waiting = self
                .ctl
                .failures
                .lock()
                .is_ok_and(|f| f.waiting(&key, now_ms));
            if waiting {
                continue;
            }
            if let Ok(mut b) = self.busy.lock() {
                if !b.insert(key.clone()) {
                    continue;
                }
            }
            let me = self.clone();
            tokio::spawn(async move {
                let what = a.describe();
                let r = me.execute(a).await;
                me.settle(&key, &what, r);
                if let Ok(mut b) = me.busy.lock() {
                    b.remove(&key);
                }
            });
        }
        Ok(n)
    }

    /// Record how action `key` went: a failure backs it off and is logged
    /// once, then once a minute with a count.
    fn settle(&self, key: &str, what: &str, r: Result<(), ControllerError>) {
        let Ok(mut f) = self.ctl.failures.lock() else {
            return;
        };
        match r {
            Ok(()) => {
                if let Some(prev) = f.succeeded(key) {
                    tracing::info!(%key, attempts = prev.attempts, "{what} succeeded after failures");
                }
            }
            Err(e) => {
                let error = format!("{what}: {}", crate::chain(&e));
                match f.failed(key, error.clone(), crate::now_ms()) {
                    Log::First => tracing::warn!(%key, "reconcile action failed: {error}"),
                    Log::Again(n) => {
                        tracing::warn!(%key, failures = n, "reconcile action still failing: {error}")
                    }
                    Log::Quiet => {}
                }
            }
        }
    }

    /// Carry out one action.
    pub async fn execute(&self, a: Action) -> Result<(), ControllerError> {
        match a {
            Action::MarkUnreachable(host_ids) => {
                self.ctl
                    .write(Command::MarkUnreachable { host_ids })
                    .await?;
            }
            Action::Purge(ids) => {
                tracing::info!(count = ids.len(), "purging terminated instances");
                self.ctl.write(Command::PurgeInstances { ids }).await?;
            }
            Action::RegisterImage {
                host_id,
                address,
                image,
            } => {
                let span = tracing::info_span!("register_image", %host_id, image_id = %image.id);
                let mut c = self.client(&host_id, &address)?;
                let r = c
                    .register_image(pb::RegisterImageRequest {
                        id: image.id.clone(),
                        kernel_path: image.kernel_path,
                        initrd_path: image.initrd_path,
                        rootdisk_path: image.rootdisk_path,
                    })
                    .instrument(span)
                    .await;
                benign(r, &[Code::AlreadyExists])?;
                self.ctl.note_image(&host_id, &image.id);
            }
            Action::Create {
                address,
                instance,
                cmdline_extra,
                start,
                volumes,
            } => {
                let span = tracing::info_span!("create", instance_id = %instance.id, host_id = %instance.host_id);
                let mut c = self.client(&instance.host_id, &address)?;
                let spec = pb::InstanceSpec {
                    id: instance.id.clone(),
                    vcpus: instance.vcpus,
                    memory_mib: instance.memory_mib,
                    image_id: instance.image_id.clone(),
                    user_data: instance.user_data.clone(),
                    cmdline_extra,
                    nics: instance
                        .network
                        .iter()
                        .map(|n| pb::NicSpec { mac: n.mac.clone() })
                        .collect(),
                    root_volume_id: instance.root_volume.clone().unwrap_or_default(),
                    ..Default::default()
                };
                let r = c
                    .create_instance(pb::CreateInstanceRequest { spec: Some(spec) })
                    .instrument(span.clone())
                    .await;
                if let Some(i) = benign(r, &[Code::AlreadyExists])? {
                    self.ctl.observe(&instance.host_id, observation(&i)).await?;
                }
                if start {
                    let r = c
                        .start_instance(pb::StartInstanceRequest {
                            id: instance.id.clone(),
                            volumes: Some(volume_set(volumes)),
                            resources: Some(resources_out(StartResources::of(&instance))),
                        })
                        .instrument(span)
                        .await;
                    if let Some(i) = benign(r, &[Code::FailedPrecondition])? {
                        self.ctl.observe(&instance.host_id, observation(&i)).await?;
                    }
                }
            }
            Action::Start {
                address,
                host_id,
                id,
                volumes,
                resources,
            } => {
                let span = tracing::info_span!("start", instance_id = %id, %host_id);
                let r = self
                    .client(&host_id, &address)?
                    .start_instance(pb::StartInstanceRequest {
                        id,
                        volumes: Some(volume_set(volumes)),
                        resources: Some(resources_out(resources)),
                    })
                    .instrument(span)
                    .await;
                if let Some(i) = benign(r, &[Code::FailedPrecondition])? {
                    self.ctl.observe(&host_id, observation(&i)).await?;
                }
            }
            Action::Stop {
                address,
                host_id,
                id,
            } => {
                let span = tracing::info_span!("stop", instance_id = %id, %host_id);
                let r = self
                    .client(&host_id, &address)?
                    .stop_instance(pb::StopInstanceRequest { id, timeout_ms: 0 })
                    .instrument(span)
                    .await;
                if let Some(i) = benign(r, &[Code::FailedPrecondition])? {
                    self.ctl.observe(&host_id, observation(&i)).await?;
                }
            }
            Action::Reboot {
                address,
                host_id,
                id,
                generation,
            } => {
                let span = tracing::info_span!("reboot", instance_id = %id, %host_id);
                let r = self
                    .client(&host_id, &address)?
                    .reboot_instance(pb::RebootInstanceRequest {
                        id: id.clone(),
                        timeout_ms: 0,
                    })
                    .instrument(span)
                    .await;
                benign(r, &[Code::FailedPrecondition])?;
                self.ctl
                    .write(Command::AckReboot { id, generation })
                    .await?;
            }
            Action::DeleteStale {
                address,
                host_id,
                id,
            } => {
                let span = tracing::info_span!("delete_stale", instance_id = %id, %host_id);
                let r = self
                    .client(&host_id, &address)?
                    .delete_instance(pb::DeleteInstanceRequest { id })
                    .instrument(span)
                    .await;
                benign(r, &[Code::NotFound])?;
            }
            Action::Delete {
                address,
                host_id,
                id,
            } => {
                let span = tracing::info_span!("delete", instance_id = %id, %host_id);
                let r = self
                    .client(&host_id, &address)?
                    .delete_instance(pb::DeleteInstanceRequest { id: id.clone() })
                    .instrument(span)
                    .await;
                // Gone from the host: confirmed by its answer, stamped after
                // every report that still listed it (NOT_FOUND: never there
                // or gone before).
                let seq = benign(r, &[Code::NotFound])?.map_or(0, |d| d.seq);
                let o = Observation {
                    instance_id: id,
                    state: ObservedState::Absent,
                    reason: "deleted".into(),
                    stopped_by_guest: false,
                    seq,
                    tap: String::new(),
                };
                self.ctl.observe(&host_id, o).await?;
            }
        }
        Ok(())
    }
}

/// The answer, `None` for an error in `ok_codes`, or the error.
fn benign<T>(
    r: Result<tonic::Response<T>, tonic::Status>,
    ok_codes: &[Code],
) -> Result<Option<T>, ControllerError> {
    match r {
        Ok(r) => Ok(Some(r.into_inner())),
        Err(s) if ok_codes.contains(&s.code()) => Ok(None),
        Err(s) => Err(ControllerError::Agent(format!(
            "agent answered {:?}: {}",
            s.code(),
            s.message()
        ))),
    }
}

/// The volumes of a start, as the agent takes them.
fn resources_out(r: StartResources) -> pb::Resources {
    pb::Resources {
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        user_data: r.user_data,
    }
}

fn volume_set(volumes: Vec<(String, String)>) -> pb::VolumeSet {
    pb::VolumeSet {
        volumes: volumes
            .into_iter()
            .map(|(volume_id, device)| pb::AttachedVolume { volume_id, device })
            .collect(),
    }
}
