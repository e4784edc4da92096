//! Test fixtures: an in-process controller over `MemReplicator` and a fake
//! agent that implements `ferro.agent.v1.Agent` in memory.

#![allow(dead_code)]

pub mod procs;
pub mod vpc;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferro_controller::controller::{Controller, Settings};
use ferro_controller::executor::Executor;
use ferro_controller::server::services;
use ferro_controller::state::ClusterState;
use ferro_proto::agent::v1 as ag;
use ferro_proto::agent::v1::agent_server::{Agent, AgentServer};
use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::compute_client::ComputeClient;
use ferro_proto::compute::v1::hosts_client::HostsClient;
use ferro_raft::{MemReplicator, Member};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// A running in-process controller.
pub struct TestController {
    pub addr: SocketAddr,
    pub admin_key: String,
    pub ctl: Arc<Controller<MemReplicator<ClusterState>>>,
}

/// Start a controller on a free port; `reconcile` runs the reconciler.
pub async fn controller(reconcile: bool, timeout_ms: u64) -> TestController {
    controller_with(
        reconcile,
        Settings {
            heartbeat_timeout_ms: timeout_ms,
            heartbeat_interval_ms: 100,
            replicated: false,
            ..Settings::default()
        },
    )
    .await
}

/// Start a controller with `settings` on a free port.
pub async fn controller_with(reconcile: bool, settings: Settings) -> TestController {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let repl = MemReplicator::new(Member {
        id: 1,
        addr: addr.to_string(),
    });
    let ctl = Controller::new(repl, settings);
    let admin_key = ctl
        .bootstrap("local", vec!["az-1".into(), "az-2".into()])
        .await
        .unwrap()
        .unwrap();
    let (compute, cluster, hosts) = services(&ctl);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(compute)
            .add_service(cluster)
            .add_service(hosts)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    if reconcile {
        tokio::spawn(Executor::new(ctl.clone()).run(Duration::from_millis(20)));
    }
    TestController {
        addr,
        admin_key,
        ctl,
    }
}

/// Adds `authorization: Bearer <key>` to every call.
#[derive(Clone)]
pub struct Bearer(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    /// `authorization: Bearer <key>`.
    pub fn new(key: &str) -> Self {
        Self(format!("Bearer {key}").parse().unwrap())
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: Request<()>) -> Result<Request<()>, Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

/// A compute client carrying a key.
pub type Client = ComputeClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A compute client with `key`.
pub async fn client(addr: SocketAddr, key: &str) -> Client {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    ComputeClient::with_interceptor(ch, Bearer(format!("Bearer {key}").parse().unwrap()))
}

/// The fake agent's memory.
#[derive(Default)]
pub struct FakeState {
    pub instances: BTreeMap<String, ag::Instance>,
    pub images: BTreeMap<String, ag::Image>,
    pub calls: Vec<String>,
}

/// An in-memory agent.
#[derive(Clone)]
pub struct FakeAgent {
    pub host_id: String,
    pub az: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Disk space it reports for volume replicas, GiB.
    pub disk_gib: u64,
    pub state: Arc<Mutex<FakeState>>,
    /// What it got when it joined.
    pub joined: Arc<Mutex<Option<Joined>>>,
}

/// A host's answer to joining: its credential, its agent certificate and
/// key, the cluster CA.
#[derive(Clone, Debug)]
pub struct Joined {
    pub host_key: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

/// A one-time join token for `host_id` made with `admin_key`, trying each
/// of `addrs` (the leader answers) for up to 30 s.
pub async fn join_token(addrs: &[String], admin_key: &str, host_id: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        for a in addrs {
            let Ok(ch) = Channel::from_shared(format!("http://{a}"))
                .unwrap()
                .connect()
                .await
            else {
                continue;
            };
            let mut c = ComputeClient::with_interceptor(ch, Bearer::new(admin_key));
            let r = c
                .create_join_token(pb::CreateJoinTokenRequest {
                    host_id: host_id.into(),
                    ttl_seconds: 600,
                })
                .await;
            if let Ok(t) = r {
                return t.into_inner().token;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no join token for {host_id}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Make a join token for `host_id` with `admin_key` and join with it,
/// trying each of `addrs` (the leader answers) for up to 30 s.
pub async fn join_host(addrs: &[String], admin_key: &str, host_id: &str) -> Joined {
    let key = ferro_pki::generate_key().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let token = join_token(addrs, admin_key, host_id).await;
        for a in addrs {
            let Ok(ch) = Channel::from_shared(format!("http://{a}"))
                .unwrap()
                .connect()
                .await
            else {
                continue;
            };
            let r = HostsClient::new(ch)
                .join(pb::JoinRequest {
                    host_id: host_id.into(),
                    token: token.clone(),
                    public_key: key.public_key.clone(),
                })
                .await;
            if let Ok(r) = r {
                let r = r.into_inner();
                return Joined {
                    host_key: r.host_key,
                    cert_pem: r.certificate_pem,
                    key_pem: key.key_pem.clone(),
                    ca_pem: r.ca_pem,
                };
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "host {host_id} could not join"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn set(st: &mut FakeState, id: &str, s: ag::InstanceState) -> Result<ag::Instance, Status> {
    let i = st
        .instances
        .get_mut(id)
        .ok_or_else(|| Status::not_found(format!("id: no instance {id}")))?;
    i.state = s as i32;
    Ok(i.clone())
}

#[tonic::async_trait]
impl Agent for FakeAgent {
    async fn create_instance(
        &self,
        req: Request<ag::CreateInstanceRequest>,
    ) -> Result<Response<ag::Instance>, Status> {
        let spec = req.into_inner().spec.unwrap_or_default();
        let mut st = self.state.lock().unwrap();
        st.calls.push(format!("create {}", spec.id));
        if !st.images.contains_key(&spec.image_id) {
            return Err(Status::not_found("image_id"));
        }
        if st.instances.contains_key(&spec.id) {
            return Err(Status::already_exists("id"));
        }
        let i = ag::Instance {
            spec: Some(spec.clone()),
            state: ag::InstanceState::Created as i32,
            ..Default::default()
        };
        st.instances.insert(spec.id, i.clone());
        Ok(Response::new(i))
    }
    async fn start_instance(
        &self,
        req: Request<ag::StartInstanceRequest>,
    ) -> Result<Response<ag::Instance>, Status> {
        let id = req.into_inner().id;
        let mut st = self.state.lock().unwrap();
        st.calls.push(format!("start {id}"));
        if st.instances.get(&id).map(|i| i.state) == Some(ag::InstanceState::Running as i32) {
            return Err(Status::failed_precondition("running"));
        }
        Ok(Response::new(set(
            &mut st,
            &id,
            ag::InstanceState::Running,
        )?))
    }
    async fn stop_instance(
        &self,
        req: Request<ag::StopInstanceRequest>,
    ) -> Result<Response<ag::Instance>, Status> {
        let id = req.into_inner().id;
        let mut st = self.state.lock().unwrap();
        st.calls.push(format!("stop {id}"));
        Ok(Response::new(set(
            &mut st,
            &id,
            ag::InstanceState::Stopped,
        )?))
    }
    async fn reboot_instance(
        &self,
        req: Request<ag::RebootInstanceRequest>,
    ) -> Result<Response<ag::Instance>, Status> {
        let id = req.into_inner().id;
        let mut st = self.state.lock().unwrap();
        st.calls.push(format!("reboot {id}"));
        Ok(Response::new(set(
            &mut st,
            &id,
            ag::InstanceState::Running,
        )?))
    }
    async fn delete_instance(
        &self,
        req: Request<ag::DeleteInstanceRequest>,
    ) -> Result<Response<ag::DeleteInstanceResponse>, Status> {
        let id = req.into_inner().id;
        let mut st = self.state.lock().unwrap();
        st.calls.push(format!("delete {id}"));
        st.instances
            .remove(&id)
            .ok_or_else(|| Status::not_found("id"))?;
        Ok(Response::new(ag::DeleteInstanceResponse { seq: 0 }))
    }
    async fn get_instance(
        &self,
        req: Request<ag::GetInstanceRequest>,
    ) -> Result<Response<ag::Instance>, Status> {
        let st = self.state.lock().unwrap();
        st.instances
            .get(&req.into_inner().id)
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found("id"))
    }
    async fn list_instances(
        &self,
        _req: Request<ag::ListInstancesRequest>,
    ) -> Result<Response<ag::ListInstancesResponse>, Status> {
        let st = self.state.lock().unwrap();
        Ok(Response::new(ag::ListInstancesResponse {
            listed_seq: 0,
            instances: st.instances.values().cloned().collect(),
        }))
    }
    type WatchEventsStream = tokio_stream::Empty<Result<ag::InstanceEvent, Status>>;
    async fn watch_events(
        &self,
        _req: Request<ag::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        Ok(Response::new(tokio_stream::empty()))
    }
    async fn get_console_output(
        &self,
        req: Request<ag::GetConsoleOutputRequest>,
    ) -> Result<Response<ag::GetConsoleOutputResponse>, Status> {
        let id = req.into_inner().id;
        Ok(Response::new(ag::GetConsoleOutputResponse {
            data: format!("console of {id}\n").into_bytes(),
            truncated: false,
        }))
    }
    async fn host_info(
        &self,
        _req: Request<ag::HostInfoRequest>,
    ) -> Result<Response<ag::HostInfoResponse>, Status> {
        Ok(Response::new(self.host_info_now()))
    }
    async fn register_image(
        &self,
        req: Request<ag::RegisterImageRequest>,
    ) -> Result<Response<ag::Image>, Status> {
        let r = req.into_inner();
        let mut st = self.state.lock().unwrap();
        st.calls.push(format!("register {}", r.id));
        let img = ag::Image {
            id: r.id.clone(),
            ..Default::default()
        };
        if st.images.insert(r.id, img.clone()).is_some() {
            return Err(Status::already_exists("id"));
        }
        Ok(Response::new(img))
    }
    async fn list_images(
        &self,
        _req: Request<ag::ListImagesRequest>,
    ) -> Result<Response<ag::ListImagesResponse>, Status> {
        let st = self.state.lock().unwrap();
        Ok(Response::new(ag::ListImagesResponse {
            images: st.images.values().cloned().collect(),
        }))
    }
}

impl FakeAgent {
    /// A fake host.
    pub fn new(host_id: &str, az: &str, vcpus: u32, memory_mib: u64) -> Self {
        Self {
            host_id: host_id.into(),
            az: az.into(),
            vcpus,
            memory_mib,
            disk_gib: 1000,
            state: Arc::default(),
            joined: Arc::default(),
        }
    }

    /// Join the controller(s) at `addrs` with `admin_key`; returns the
    /// host key (also kept for [`Self::serve`] and [`Self::host_key`]).
    pub async fn join(&self, addrs: &[String], admin_key: &str) -> String {
        let j = join_host(addrs, admin_key, &self.host_id).await;
        let key = j.host_key.clone();
        *self.joined.lock().unwrap() = Some(j);
        key
    }

    /// The host key of its join.
    pub fn host_key(&self) -> String {
        self.joined
            .lock()
            .unwrap()
            .as_ref()
            .expect("the fake agent has not joined")
            .host_key
            .clone()
    }

    pub fn host_info_now(&self) -> ag::HostInfoResponse {
        ag::HostInfoResponse {
            host_id: self.host_id.clone(),
            availability_zone: self.az.clone(),
            cpu_model: "fake".into(),
            vcpus_total: self.vcpus,
            memory_total_mib: self.memory_mib,
            disk_total_gib: self.disk_gib,
            kvm_present: true,
            agent_version: "fake".into(),
            ..Default::default()
        }
    }

    /// The heartbeat it would send, claiming to be at `address`.
    pub fn heartbeat(&self, address: &str) -> pb::HeartbeatRequest {
        let st = self.state.lock().unwrap();
        pb::HeartbeatRequest {
            host: Some(self.host_info_now()),
            address: address.into(),
            instances: st.instances.values().cloned().collect(),
            images: st.images.values().cloned().collect(),
            listed_seq: 0,
        }
    }

    /// Serve it on a free port; returns its URL.
    pub async fn serve(&self) -> String {
        self.serve_on("127.0.0.1:0").await
    }

    /// Serve it on `addr` (port 0: a free one) over mutual TLS with the
    /// certificate of its join, as a real agent does; returns its URL.
    pub async fn serve_on(&self, addr: &str) -> String {
        let j = self
            .joined
            .lock()
            .unwrap()
            .clone()
            .expect("join before serving: agents serve only mutual TLS");
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &j.cert_pem,
                &j.key_pem,
            ))
            .client_ca_root(tonic::transport::Certificate::from_pem(&j.ca_pem));
        tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(tls)
                .unwrap()
                .add_service(AgentServer::new(self.clone()))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        format!("https://{addr}")
    }
}

/// A heartbeat client with `key`.
pub async fn hosts_client(addr: SocketAddr) -> HostsClient<Channel> {
    HostsClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// Send one heartbeat with `key`.
pub async fn beat(
    c: &mut HostsClient<Channel>,
    key: &str,
    hb: pb::HeartbeatRequest,
) -> Result<(), Status> {
    let mut r = Request::new(hb);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    c.heartbeat(r).await.map(|_| ())
}

/// Report, with host key `key`, holding `held` (volume, epoch); how many
/// volumes changed.
pub async fn report_replicas(
    c: &mut HostsClient<Channel>,
    key: &str,
    held: &[(&str, u64)],
) -> Result<u32, Status> {
    let mut r = Request::new(pb::ReportVolumeReplicasRequest {
        replica_addr: String::new(),
        replicas: held
            .iter()
            .map(|(v, e)| pb::HeldReplica {
                volume_id: v.to_string(),
                epoch: *e,
                incarnation: 0,
            })
            .collect(),
    });
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    c.report_volume_replicas(r)
        .await
        .map(|r| r.into_inner().changed)
}

/// The first message of host key `key`'s volume watch.
pub async fn host_volumes(
    c: &mut HostsClient<Channel>,
    key: &str,
) -> Result<pb::HostVolumes, Status> {
    let mut r = Request::new(pb::WatchHostVolumesRequest {});
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let mut s = c.watch_host_volumes(r).await?.into_inner();
    Ok(s.message().await?.expect("a first message"))
}

/// Heartbeat `agent` (served at `url`) with its host key every 50 ms,
/// forever.
pub fn heartbeat_forever(ctl: SocketAddr, agent: FakeAgent, url: String) {
    let key = agent.host_key();
    tokio::spawn(async move {
        let mut c = hosts_client(ctl).await;
        loop {
            let _ = beat(&mut c, &key, agent.heartbeat(&url)).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

/// Poll `f` every 20 ms until it is true or 10 s pass.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// RunInstances of `count` f1.nano instances of image `guest`.
pub fn run_req(count: u32) -> pb::RunInstancesRequest {
    pb::RunInstancesRequest {
        count,
        instance_type: "f1.nano".into(),
        image_id: "guest".into(),
        ..Default::default()
    }
}

/// Registers image `guest`.
pub async fn register(c: &mut Client) -> pb::Image {
    c.register_image(pb::RegisterImageRequest {
        name: "guest".into(),
        kernel_path: "/boot/vmlinux".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
}
