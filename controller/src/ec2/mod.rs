//! The EC2 Query API: an HTTP endpoint speaking EC2's own protocol, so
//! the aws CLI and boto3 drive Ferrocloud unchanged.
//!
//! A request is `Action=…&Version=…&…`, form-encoded in a POST body (or a
//! GET query), signed with AWS Signature Version 4 ([`sigv4`]) by an API
//! key: its id is the access key id, its `ec2_secret` the secret access
//! key. The signature's scope must be this cluster's region and service
//! `ec2`, and the request at most 15 minutes old. Each action
//! ([`actions`]) reads EC2's parameters ([`query`]), calls the very gRPC
//! method of `ferro.compute.v1` that does the same (in process, as the
//! key's caller: every rule, check and role is the gRPC API's own) and
//! writes its answer as EC2's XML ([`xml`]); a failure becomes EC2's
//! error document and code ([`error`]). An action that does not exist is
//! `InvalidAction` naming it.
//!
//! A node that is not the leader forwards the request as it came (the
//! signature stays valid) to the leader's EC2 endpoint — the leader's host,
//! this node's EC2 port: every node serves EC2 on the same port — and
//! relays the answer; once only (`x-ferro-forwarded`), and a leader that
//! cannot be reached is 503 Unavailable naming it.

pub mod actions;
pub mod error;
pub mod network;
pub mod query;
pub mod sigv4;
pub mod tls;
pub mod xml;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use ferro_raft::Replicator;
use tracing::Instrument;

use crate::api::{CallerKey, ComputeService};
use crate::controller::{new_id, Controller};
use crate::state::ClusterState;

pub use error::Ec2Error;
use query::Params;

/// The largest request body taken (EC2's own limit is about this).
pub const MAX_BODY: usize = 1 << 20;

/// What every action gets: the gRPC service to call, as whom, and the
/// request's id.
pub struct Ctx<R: Replicator<ClusterState>> {
    /// The compute service.
    pub svc: ComputeService<R>,
    /// The caller's key hash, as the gRPC interceptor would attach it.
    key: CallerKey,
    /// This answer's `requestId`.
    pub request_id: String,
    /// The cluster's region.
    pub region: String,
}

impl<R: Replicator<ClusterState>> Ctx<R> {
    /// A gRPC request carrying the caller's credential.
    pub fn req<T>(&self, m: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(m);
        r.extensions_mut().insert(self.key.clone());
        r
    }
}

/// Serve the EC2 endpoint on `listener` until the task is dropped: HTTPS
/// with `tls`, else plain HTTP.
pub async fn serve<R: Replicator<ClusterState>>(
    ctl: Arc<Controller<R>>,
    listener: tokio::net::TcpListener,
    tls: Option<tls::Ec2Tls>,
) -> std::io::Result<()> {
    let port = listener.local_addr()?.port();
    let to_leader = tls.as_ref().and_then(|t| t.client().cloned());
    let app = axum::Router::new().fallback(
        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let ctl = ctl.clone();
            let to_leader = to_leader.clone();
            async move {
                if !ctl.is_leader() {
                    let to = Leader {
                        port,
                        tls: to_leader.as_ref(),
                    };
                    return forward(&ctl, to, &method, &uri, &headers, &body).await;
                }
                handle(&ctl, method, uri, headers, body).await
            }
        },
    );
    match tls {
        Some(t) => axum::serve(tls::TlsListener::new(listener, &t)?, app).await,
        None => {
            use axum::serve::ListenerExt;
            // Answers go out at once, not after Nagle's wait.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app).await
        }
    }
}

/// How the leader's endpoint is reached: its host, this node's EC2 port,
/// over TLS when this node serves TLS.
#[derive(Clone, Copy)]
struct Leader<'a> {
    port: u16,
    tls: Option<&'a Arc<tokio_rustls::rustls::ClientConfig>>,
}

/// The header a forwarded request carries.
const FORWARDED: &str = "x-ferro-forwarded";

/// Relay a request to the leader's EC2 endpoint (its host, `port`).
async fn forward<R: Replicator<ClusterState>>(
    ctl: &Arc<Controller<R>>,
    to: Leader<'_>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let request_id = new_id("req-");
    let unavailable = |m: String| {
        let e = Ec2Error::new(503, "Unavailable", m);
        xml_response(e.status, e.to_xml(&request_id))
    };
    let (_, _, leader) = ctl.cluster_status();
    let Some(leader) = leader else {
        return unavailable("no leader is elected; try again".into());
    };
    if headers.contains_key(FORWARDED) {
        return unavailable(format!(
            "forwarded to a node that is not the leader either (the leader is node {} at {})",
            leader.id, leader.addr
        ));
    }
    let host = leader
        .addr
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .rsplit_once(':')
        .map_or(leader.addr.as_str(), |(h, _)| h)
        .to_string();
    let target = format!("{host}:{}", to.port);
    match relay(&target, to.tls, method, uri, headers, body, true).await {
        Ok((status, content_type, body)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, [("content-type", content_type)], body).into_response()
        }
        Err(e) => unavailable(format!(
            "this node is not the leader and cannot reach the leader's EC2 endpoint {target} \
             (node {}): {e}",
            leader.id
        )),
    }
}

/// A signed form POST to the EC2 endpoint at `target` (for tests and
/// tools without an AWS SDK), over HTTPS trusting `ca_pem` when given:
/// the status and the body.
pub async fn post_signed(
    target: &str,
    ca_pem: Option<&[u8]>,
    form: &str,
    access_key: &str,
    secret: &str,
    region: &str,
) -> std::io::Result<(u16, String)> {
    let now = (crate::now_ms() / 1000) as i64;
    let mut headers = HeaderMap::new();
    for (k, v) in sigv4::sign_post(target, form.as_bytes(), access_key, secret, region, now) {
        let name =
            axum::http::HeaderName::from_bytes(k.as_bytes()).map_err(std::io::Error::other)?;
        let value = axum::http::HeaderValue::from_str(&v).map_err(std::io::Error::other)?;
        headers.insert(name, value);
    }
    let uri: Uri = "/".parse().map_err(std::io::Error::other)?;
    let tls = ca_pem
        .map(tls::client_config)
        .transpose()
        .map_err(std::io::Error::other)?;
    let (status, _, body) = relay(
        target,
        tls.as_ref(),
        &Method::POST,
        &uri,
        &headers,
        form.as_bytes(),
        false,
    )
    .await?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// One HTTP/1.1 exchange with `target` (connection closed after it), over
/// TLS with `tls`: the status, content type and body.
async fn relay(
    target: &str,
    tls: Option<&Arc<tokio_rustls::rustls::ClientConfig>>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    forwarded: bool,
) -> std::io::Result<(u16, String, Vec<u8>)> {
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect(target),
    )
    .await
    .map_err(|_| std::io::Error::other("connect timed out"))??;
    match tls {
        Some(cfg) => {
            let conn = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                tls::connect(cfg, target, tcp),
            )
            .await
            .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
            exchange(conn, method, uri, headers, body, forwarded).await
        }
        None => exchange(tcp, method, uri, headers, body, forwarded).await,
    }
}

async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut conn: S,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    forwarded: bool,
) -> std::io::Result<(u16, String, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        if matches!(
            k.as_str(),
            "connection" | "content-length" | "transfer-encoding"
        ) {
            continue;
        }
        if let Ok(v) = v.to_str() {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    req.push_str(&format!(
        "{}connection: close\r\ncontent-length: {}\r\n\r\n",
        if forwarded {
            format!("{FORWARDED}: 1\r\n")
        } else {
            String::new()
        },
        body.len()
    ));
    conn.write_all(req.as_bytes()).await?;
    conn.write_all(body).await?;
    conn.flush().await?;
    let mut raw = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        conn.read_to_end(&mut raw),
    )
    .await
    .map_err(|_| std::io::Error::other("the leader did not answer in time"))??;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header in the leader's answer"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line from the leader"))?;
    let content_type = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map_or("text/xml;charset=UTF-8".to_string(), |(_, v)| {
            v.trim().to_string()
        });
    Ok((status, content_type, raw[split + 4..].to_vec()))
}

/// Bind `addr` and serve on it in the background; the bound address.
pub async fn start<R: Replicator<ClusterState>>(
    ctl: Arc<Controller<R>>,
    addr: SocketAddr,
    tls: Option<tls::Ec2Tls>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = serve(ctl, listener, tls).await {
            tracing::error!("the EC2 endpoint stopped: {e}");
        }
    });
    Ok((bound, task))
}

fn xml_response(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [("content-type", "text/xml;charset=UTF-8")], body).into_response()
}

async fn handle<R: Replicator<ClusterState>>(
    ctl: &Arc<Controller<R>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request_id = new_id("req-");
    let span = tracing::info_span!("ec2", request_id = %request_id);
    // The span is entered only while the future runs (a guard held
    // across an await would tag other requests' events on this thread).
    match answer(ctl, &method, &uri, &headers, &body, &request_id)
        .instrument(span.clone())
        .await
    {
        Ok(xml) => xml_response(200, xml),
        Err(e) => {
            let _g = span.enter();
            tracing::info!(code = %e.code, status = e.status, "{}", e.message);
            xml_response(e.status, e.to_xml(&request_id))
        }
    }
}

async fn answer<R: Replicator<ClusterState>>(
    ctl: &Arc<Controller<R>>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    request_id: &str,
) -> Result<String, Ec2Error> {
    if method != Method::GET && method != Method::POST {
        return Err(Ec2Error::new(
            405,
            "InvalidHttpRequest",
            format!("method {method} is not GET or POST"),
        ));
    }
    if body.len() > MAX_BODY {
        return Err(Ec2Error::new(
            400,
            "RequestLimitExceeded",
            "the request body is too large",
        ));
    }
    let query = uri.query().unwrap_or_default();
    let params = Params::parse(&[query.as_bytes(), body]);
    let pairs: Vec<(String, String)> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let (key, region) = authenticate(ctl, method, uri, &pairs, body).await?;
    let action = params.required("Action")?.to_string();
    let ctx = Ctx {
        svc: ComputeService::new(ctl.clone()),
        key: CallerKey(key),
        request_id: request_id.to_string(),
        region,
    };
    tracing::info!(action = %action, "EC2 call");
    actions::dispatch(&ctx, &action, &params).await
}

/// Check the request's signature; the caller's key hash and the region.
async fn authenticate<R: Replicator<ClusterState>>(
    ctl: &Arc<Controller<R>>,
    method: &Method,
    uri: &Uri,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(String, String), Ec2Error> {
    use sigv4::SigError as S;
    let header = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.as_str());
    let auth = match header.map(sigv4::parse_authorization) {
        None => return Err(Ec2Error::new(401, "AuthFailure", S::Missing.to_string())),
        Some(Err(e)) => return Err(Ec2Error::new(401, "AuthFailure", e.to_string())),
        Some(Ok(a)) => a,
    };
    let id = auth.access_key.clone();
    let (key, region) = ctl
        .read(move |s| (s.api_keys.get(&id).cloned(), s.region.clone()))
        .await
        .map_err(|e| error::from_status(&crate::api::status(e), "AuthFailure"))?;
    let Some(key) = key.filter(|k| !k.ec2_secret.is_empty()) else {
        return Err(Ec2Error::new(
            401,
            "AuthFailure",
            format!(
                "access key id {:?} is not an API key with an EC2 secret \
                 (create one with `ferro api-keys create`)",
                auth.access_key
            ),
        ));
    };
    if auth.region != region || auth.service != "ec2" {
        return Err(Ec2Error::new(
            403,
            "SignatureDoesNotMatch",
            S::Scope(
                format!("{}/{}", auth.region, auth.service),
                format!("this endpoint is region {region:?}, service \"ec2\""),
            )
            .to_string(),
        ));
    }
    let received = sigv4::Received {
        method: method.as_str(),
        path: uri.path(),
        query: uri.query().unwrap_or_default(),
        headers,
        body,
    };
    let now = (crate::now_ms() / 1000) as i64;
    match sigv4::verify(&received, &auth, &key.ec2_secret, now) {
        Ok(()) => {}
        Err(e @ S::Expired(..)) => return Err(Ec2Error::new(400, "RequestExpired", e.to_string())),
        Err(e @ (S::Mismatch | S::SignedHeaderMissing(_) | S::Scope(..))) => {
            return Err(Ec2Error::new(403, "SignatureDoesNotMatch", e.to_string()))
        }
        Err(e) => return Err(Ec2Error::new(401, "AuthFailure", e.to_string())),
    }
    crate::access::check_role(&key, false)
        .map_err(|e| error::from_status(&crate::api::status(e), "AuthFailure"))?;
    Ok((key.secret_sha256, region))
}
