//! The `ferro.agent.v1.Agent` gRPC service: converts requests, delegates to
//! the [`Manager`] and the instance supervisors, and maps errors to codes.

use std::pin::Pin;
use std::time::Duration;

use ferro_hostops::images::{Image, ImageError};
use ferro_proto::agent::v1 as pb;
use pb::agent_server::Agent;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::machine::{Input, Phase};
use crate::manager::{Manager, ManagerError};
use crate::spec::{check_volumes, AttachedVolume};
use crate::supervisor::{InstanceHandle, OpError};
use crate::{chain, console, convert, host, resources};

/// Extra time an RPC waits beyond the VMM's own timeouts.
const SLACK: Duration = Duration::from_secs(15);
/// How long a start waits for ferro-blockd to serve its volumes.
const VOLUME_WAIT: Duration = Duration::from_secs(20);
/// Default console tail.
const DEFAULT_TAIL: u32 = 64 * 1024;

/// The service.
pub struct AgentService {
    manager: Manager,
}

impl AgentService {
    /// A service over `manager`.
    pub fn new(manager: Manager) -> Self {
        Self { manager }
    }

    fn instance(&self, h: &InstanceHandle) -> pb::Instance {
        let spec = h.spec();
        let taps = resources::taps(&self.manager.inner().cfg, &spec);
        convert::instance(&spec, &h.observed(), taps)
    }

    /// Apply `input`, then wait until the instance leaves `busy` phases.
    async fn drive(
        &self,
        id: &str,
        input: Input,
        busy: &[Phase],
        timeout: Duration,
    ) -> Result<Response<pb::Instance>, Status> {
        let h = self.manager.get(id).map_err(status)?;
        h.op(input).await.map_err(op_status)?;
        let done = h.wait(timeout, |o| !busy.contains(&o.phase)).await;
        if done.is_none() {
            return Err(Status::deadline_exceeded(format!(
                "instance {id} is still {:?}",
                h.observed().phase
            )));
        }
        Ok(Response::new(self.instance(&h)))
    }

    /// Wait (at most [`VOLUME_WAIT`]) until this host's ferro-blockd serves
    /// every one of `volumes`: it starts serving a volume once the
    /// controller lists it as attached to an instance here.
    async fn wait_served(&self, volumes: &[AttachedVolume]) -> Result<(), Status> {
        let cfg = &self.manager.inner().cfg;
        let deadline = tokio::time::Instant::now() + VOLUME_WAIT;
        loop {
            let Some(e) = resources::unserved_volume(cfg, volumes) else {
                return Ok(());
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(chain(&e)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn stop_timeout(&self, ms: u32) -> u32 {
        if ms == 0 {
            self.manager.inner().cfg.stop_timeout_ms
        } else {
            ms
        }
    }
}

/// The gRPC status of a manager error; the message is the whole chain.
pub fn status(e: ManagerError) -> Status {
    let msg = chain(&e);
    match e {
        ManagerError::InvalidSpec(_) => Status::invalid_argument(msg),
        ManagerError::UnknownImage(_) | ManagerError::NotFound(_) => Status::not_found(msg),
        ManagerError::Duplicate(_) => Status::already_exists(msg),
        ManagerError::Capacity(_) => Status::resource_exhausted(msg),
        ManagerError::Image(ImageError::AlreadyExists(_)) => Status::already_exists(msg),
        ManagerError::Image(ImageError::InvalidId(_) | ImageError::Io { .. }) => {
            Status::invalid_argument(msg)
        }
        ManagerError::Image(ImageError::NotFound(_)) => Status::not_found(msg),
        ManagerError::Op(e) => op_status(e),
        _ => Status::internal(msg),
    }
}

fn op_status(e: OpError) -> Status {
    match e {
        OpError::WrongState(w) => Status::failed_precondition(w.to_string()),
        OpError::Gone(g) => Status::not_found(g.to_string()),
        e @ OpError::Persist(_) => Status::internal(chain(&e)),
    }
}

fn image(i: Image) -> pb::Image {
    let size = i
        .rootdisk
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .map_or(0, |m| m.len());
    pb::Image {
        id: i.id,
        kernel_sha256: i.kernel_sha256,
        initrd_sha256: i.initrd_sha256.unwrap_or_default(),
        rootdisk_sha256: i.rootdisk_sha256.unwrap_or_default(),
        rootdisk_size_bytes: size,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::InstanceEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn create_instance(
        &self,
        req: Request<pb::CreateInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is missing"))?;
        let default = self.manager.inner().cfg.restart.policy;
        let spec = convert::spec_from_pb(spec, default);
        let h = self.manager.create(spec).await.map_err(status)?;
        Ok(Response::new(self.instance(&h)))
    }

    async fn start_instance(
        &self,
        req: Request<pb::StartInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let r = req.into_inner();
        let h = self.manager.get(&r.id).map_err(status)?;
        let volumes = match r.volumes {
            None => None,
            Some(set) => Some(
                check_volumes(&h.spec(), convert::volumes_from_pb(set.volumes))
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            ),
        };
        if let Some(res) = r.resources {
            let span = tracing::info_span!("start", instance_id = %r.id);
            self.manager
                .resize(&h, convert::resources_from_pb(res))
                .instrument(span)
                .await
                .map_err(status)?;
        }
        if matches!(
            h.observed().phase,
            Phase::Created | Phase::Stopped | Phase::Failed
        ) {
            let want = volumes.clone().unwrap_or_else(|| h.observed().volumes);
            self.wait_served(&want).await?;
        }
        self.drive(&r.id, Input::Start { volumes }, &[Phase::Starting], SLACK)
            .await
    }

    async fn stop_instance(
        &self,
        req: Request<pb::StopInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let r = req.into_inner();
        let timeout_ms = self.stop_timeout(r.timeout_ms);
        let wait = Duration::from_millis(timeout_ms.into()) + SLACK;
        let input = Input::Stop { timeout_ms };
        self.drive(&r.id, input, &[Phase::Stopping], wait).await
    }

    async fn reboot_instance(
        &self,
        req: Request<pb::RebootInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let r = req.into_inner();
        let timeout_ms = self.stop_timeout(r.timeout_ms);
        let wait = Duration::from_millis(timeout_ms.into()) + SLACK;
        let busy = [Phase::Rebooting, Phase::Starting];
        self.drive(&r.id, Input::Reboot { timeout_ms }, &busy, wait)
            .await
    }

    async fn delete_instance(
        &self,
        req: Request<pb::DeleteInstanceRequest>,
    ) -> Result<Response<pb::DeleteInstanceResponse>, Status> {
        let id = req.into_inner().id;
        let h = self.manager.get(&id).map_err(status)?;
        h.op(Input::Delete).await.map_err(op_status)?;
        let done = h.wait(SLACK, |o| o.phase == Phase::Deleted).await;
        if done.is_none() {
            return Err(Status::deadline_exceeded(format!(
                "instance {id} is still being deleted"
            )));
        }
        Ok(Response::new(pb::DeleteInstanceResponse {
            seq: crate::order::next_seq(),
        }))
    }

    async fn get_instance(
        &self,
        req: Request<pb::GetInstanceRequest>,
    ) -> Result<Response<pb::Instance>, Status> {
        let h = self.manager.get(&req.into_inner().id).map_err(status)?;
        Ok(Response::new(self.instance(&h)))
    }

    async fn list_instances(
        &self,
        _req: Request<pb::ListInstancesRequest>,
    ) -> Result<Response<pb::ListInstancesResponse>, Status> {
        // Stamped and read together (see `order`).
        let guard = crate::order::listing();
        let listed_seq = crate::order::next_seq();
        let mut instances: Vec<pb::Instance> = self
            .manager
            .list()
            .iter()
            .map(|h| self.instance(h))
            .collect();
        drop(guard);
        // Quarantined instances are reported as failed, with where their
        // files went, so an operator sees them.
        instances.extend(
            self.manager
                .quarantined()
                .into_iter()
                .map(|q| pb::Instance {
                    spec: Some(pb::InstanceSpec {
                        id: q.id,
                        ..Default::default()
                    }),
                    state: pb::InstanceState::Failed as i32,
                    reason: format!(
                        "quarantined: {} (files moved to {})",
                        q.reason,
                        q.moved_to.display()
                    ),
                    ..Default::default()
                }),
        );
        Ok(Response::new(pb::ListInstancesResponse {
            instances,
            listed_seq,
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let only = req.into_inner().instance_id;
        let rx = self.manager.inner().events.subscribe();
        let stream =
            tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |r| match r {
                Ok(e) if only.is_empty() || e.instance_id == only => Some(Ok(e)),
                Ok(_) => None,
                Err(e) => Some(Err(Status::data_loss(format!("watcher fell behind: {e}")))),
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_console_output(
        &self,
        req: Request<pb::GetConsoleOutputRequest>,
    ) -> Result<Response<pb::GetConsoleOutputResponse>, Status> {
        let r = req.into_inner();
        let h = self.manager.get(&r.id).map_err(status)?;
        let max = if r.max_bytes == 0 {
            DEFAULT_TAIL
        } else {
            r.max_bytes
        };
        let paths =
            crate::persist::InstancePaths::new(&self.manager.inner().cfg.state_dir, &h.spec().id);
        let (data, truncated) = console::tail(&paths.console(), max.into())
            .map_err(|e| Status::internal(format!("cannot read the console log: {e}")))?;
        Ok(Response::new(pb::GetConsoleOutputResponse {
            data,
            truncated,
        }))
    }

    async fn host_info(
        &self,
        _req: Request<pb::HostInfoRequest>,
    ) -> Result<Response<pb::HostInfoResponse>, Status> {
        let inner = self.manager.inner();
        let (vcpus, mem, n) = self.manager.allocated();
        let version = match inner.cgroups.version() {
            ferro_hostops::cgroup::CgroupVersion::V1 => "v1",
            ferro_hostops::cgroup::CgroupVersion::V2 => "v2",
        };
        Ok(Response::new(pb::HostInfoResponse {
            host_id: inner.cfg.host_id.clone(),
            availability_zone: inner.cfg.availability_zone.clone(),
            cpu_model: host::cpu_model(),
            host_cpus: host::cpus(),
            vcpus_total: inner.cfg.vcpus,
            vcpus_allocated: vcpus,
            memory_host_mib: host::mem_total_mib(),
            memory_free_mib: host::mem_available_mib(),
            memory_total_mib: inner.memory_offered_mib,
            memory_allocated_mib: mem,
            kvm_present: host::kvm_present(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            cgroup_version: version.into(),
            instances: n as u32,
            disk_total_gib: inner.cfg.volume_capacity_gib,
        }))
    }

    async fn register_image(
        &self,
        req: Request<pb::RegisterImageRequest>,
    ) -> Result<Response<pb::Image>, Status> {
        let r = req.into_inner();
        if r.kernel_path.is_empty() {
            return Err(Status::invalid_argument("kernel_path is empty"));
        }
        let i = self
            .manager
            .register_image(r.id, r.kernel_path, r.initrd_path, r.rootdisk_path)
            .await
            .map_err(status)?;
        Ok(Response::new(image(i)))
    }

    async fn list_images(
        &self,
        _req: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let images = self
            .manager
            .inner()
            .images
            .list()
            .into_iter()
            .map(image)
            .collect();
        Ok(Response::new(pb::ListImagesResponse { images }))
    }
}
