//! Following the leader: a fake follower answers UNAVAILABLE naming the
//! leader (in `x-ferro-leader` or only in its message); `ferro` retries
//! there and prints the leader's answer. The bearer key reaches both.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::cluster_server::{Cluster, ClusterServer};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// A fake controller node: the leader answers, a follower redirects.
struct Node {
    id: u64,
    leader: Option<SocketAddr>,
    in_metadata: bool,
    seen_auth: Arc<Mutex<Vec<String>>>,
}

impl Node {
    fn answer(&self, auth: Option<String>) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.seen_auth
            .lock()
            .unwrap()
            .push(auth.unwrap_or_default());
        match self.leader {
            None => Ok(Response::new(pb::ClusterStatusResponse {
                node_id: self.id,
                members: vec![pb::ClusterMember {
                    node_id: self.id,
                    address: "leader:1".into(),
                }],
                leader: Some(pb::ClusterMember {
                    node_id: self.id,
                    address: "leader:1".into(),
                }),
                replicated: true,
                node: None,
            })),
            Some(addr) if self.in_metadata => {
                let mut s = Status::unavailable("not the leader");
                s.metadata_mut()
                    .insert("x-ferro-leader", addr.to_string().parse().unwrap());
                Err(s)
            }
            Some(addr) => Err(Status::unavailable(format!(
                "not the leader; the leader is {addr}"
            ))),
        }
    }
}

#[tonic::async_trait]
impl Cluster for Node {
    async fn cluster_status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let auth = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        self.answer(auth)
    }
    async fn add_node(
        &self,
        _: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn remove_node(
        &self,
        _: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

async fn serve(node: Node) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ClusterServer::new(node))
            .serve_with_incoming(TcpListenerStream::new(l)),
    );
    addr
}

async fn ferro(endpoint: SocketAddr, args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_ferro"))
            .args(&args)
            .env_clear()
            .env("HOME", "/nonexistent")
            .env("FERRO_ENDPOINT", endpoint.to_string())
            .env("FERRO_API_KEY", "fk_test")
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

async fn follows(in_metadata: bool) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let leader = serve(Node {
        id: 2,
        leader: None,
        in_metadata,
        seen_auth: seen.clone(),
    })
    .await;
    let follower = serve(Node {
        id: 1,
        leader: Some(leader),
        in_metadata,
        seen_auth: seen.clone(),
    })
    .await;
    let out = ferro(follower, &["cluster", "status", "--output", "json"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["node_id"], 2, "answered by the leader");
    assert_eq!(*seen.lock().unwrap(), vec!["Bearer fk_test".to_string(); 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_leader_named_in_metadata() {
    follows(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_leader_named_in_the_message() {
    follows(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_loop_ends_with_the_servers_message() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    // Two followers naming each other.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_addr = l.local_addr().unwrap();
    let b = serve(Node {
        id: 2,
        leader: Some(a_addr),
        in_metadata: true,
        seen_auth: seen.clone(),
    })
    .await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ClusterServer::new(Node {
                id: 1,
                leader: Some(b),
                in_metadata: true,
                seen_auth: seen,
            }))
            .serve_with_incoming(TcpListenerStream::new(l)),
    );
    let out = ferro(a_addr, &["cluster", "status"]).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr, "ferro: error: not the leader\n");
}
