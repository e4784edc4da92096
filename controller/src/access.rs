//! Authorization by role, hosts joining, and the TLS identity the
//! controller presents to agents.
//!
//! | caller | may call |
//! | --- | --- |
//! | admin key | everything a user key may, API keys, join tokens, host revocation, cluster membership |
//! | user key | the compute API (instances, images, key pairs, groups, tags, hosts and zones described) |
//! | host key | `Hosts.Heartbeat` for its own host id only |
//! | no key | `Hosts.Join` with a valid one-time join token |
//!
//! docs/architecture.md ("Roles") carries the same table.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ferro_proto::agent::v1::agent_client::AgentClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use ferro_pki::{Ca, CaMaterial, Identity};
use ferro_raft::Replicator;

use crate::controller::{new_id, random_bytes, Controller, ControllerError};
use crate::model::*;
use crate::state::{check_host_id, hex, sha256_hex, ClusterState, Command, Output, StateError};

type Result<T> = std::result::Result<T, ControllerError>;

/// A new cluster CA for region `region`.
pub fn new_cluster_ca(region: &str) -> Result<CaMaterial> {
    Ok(Ca::generate(&format!("Ferrocloud cluster CA ({region})"))?)
}

/// What a host gets for its join token.
#[derive(Clone, Debug)]
pub struct Joined {
    /// The bearer key of its heartbeats.
    pub host_key: String,
    /// Its agent's server certificate (PEM).
    pub certificate_pem: String,
    /// The cluster CA (PEM).
    pub ca_pem: String,
}

/// The client side of the controller's TLS to agents: the CA agents'
/// certificates chain to and this node's client certificate.
#[derive(Clone, Debug)]
pub struct AgentTls {
    /// The cluster CA (PEM).
    pub ca_pem: String,
    /// This node's client certificate and key.
    pub identity: Identity,
}

/// This node's clients of the agents: its [`AgentTls`], made once from the
/// replicated CA, and one lazily connecting channel per host and address.
#[derive(Debug, Default)]
pub struct AgentClients {
    tls: Mutex<Option<AgentTls>>,
    clients: Mutex<HashMap<String, AgentClient<Channel>>>,
}

fn denied(m: impl Into<String>) -> ControllerError {
    StateError::PermissionDenied(m.into()).into()
}

fn unknown_key() -> ControllerError {
    ControllerError::Unauthenticated("unknown API key (deleted, revoked or never issued)".into())
}

/// Whether `key` may make a call needing `admin` (else any user call).
pub fn check_role(key: &ApiKey, admin: bool) -> Result<()> {
    match key.role() {
        Role::Host => Err(denied(format!(
            "this is host {:?}'s credential: it may only send that host's heartbeats",
            key.host_id
        ))),
        Role::User if admin => Err(denied("an admin API key is required")),
        _ => Ok(()),
    }
}

/// Whether `key` may speak for host `host_id`.
pub fn check_host(key: &ApiKey, host_id: &str) -> Result<()> {
    match key.role() {
        Role::Host if key.host_id == host_id => Ok(()),
        Role::Host => Err(denied(format!(
            "this is host {:?}'s credential, not host {host_id:?}'s",
            key.host_id
        ))),
        r => Err(denied(format!(
            "only host {host_id:?}'s own credential may send its heartbeats, not a key with role {}",
            r.as_str()
        ))),
    }
}

impl<R: Replicator<ClusterState>> Controller<R> {
    /// The key whose secret hashes to `hash`, if it may make a call needing
    /// `admin` (else any user call). Host keys may make none.
    pub async fn authorize(&self, hash: String, admin: bool) -> Result<ApiKey> {
        let key = self
            .read(move |s| s.api_key_by_hash(&hash).cloned())
            .await?
            .ok_or_else(unknown_key)?;
        check_role(&key, admin)?;
        Ok(key)
    }

    /// Like [`Self::authorize`], against this node's own replica (a
    /// follower's may lag the leader's by a few entries). Only for
    /// node-local, read-only answers such as ClusterStatus.
    pub fn authorize_local(&self, hash: String, admin: bool) -> Result<ApiKey> {
        let key = self
            .replicator()
            .read_local(move |s| s.api_key_by_hash(&hash).cloned())?
            .ok_or_else(unknown_key)?;
        check_role(&key, admin)?;
        Ok(key)
    }

    /// The key whose secret hashes to `hash`, if it is host `host_id`'s own
    /// credential.
    pub async fn authorize_host(&self, hash: String, host_id: &str) -> Result<ApiKey> {
        let key = self
            .read(move |s| s.api_key_by_hash(&hash).cloned())
            .await?
            .ok_or_else(unknown_key)?;
        check_host(&key, host_id)?;
        Ok(key)
    }

    /// The host key whose secret hashes to `hash` (any other role is
    /// refused): who a host-only call speaks for.
    pub async fn authenticate_host(&self, hash: String) -> Result<ApiKey> {
        let key = self
            .read(move |s| s.api_key_by_hash(&hash).cloned())
            .await?
            .ok_or_else(unknown_key)?;
        if key.role() != Role::Host {
            return Err(denied(format!(
                "only a host's own credential may watch its network, not a key with role {}",
                key.role().as_str()
            )));
        }
        Ok(key)
    }

    /// A one-time join token for `host_id`, valid `ttl_ms`.
    pub async fn create_join_token(&self, host_id: &str, ttl_ms: u64) -> Result<(String, u64)> {
        check_host_id("host_id", host_id)?;
        let token = format!("fj_{}", hex(&random_bytes::<32>()));
        let now_ms = crate::now_ms();
        let expires_at_ms = now_ms + ttl_ms;
        self.write(Command::CreateJoinToken {
            host_id: host_id.into(),
            token_sha256: sha256_hex(token.as_bytes()),
            expires_at_ms,
            now_ms,
        })
        .await?;
        Ok((token, expires_at_ms))
    }

    /// Host `host_id` joins with `token`: its agent's certificate for
    /// `public_key` and its new credential. The previous credential of the
    /// host stops working.
    pub async fn join(&self, host_id: &str, token: &str, public_key: &[u8]) -> Result<Joined> {
        check_host_id("host_id", host_id)?;
        let ca = self
            .read(|s| s.ca.clone())
            .await?
            .ok_or_else(|| StateError::FailedPrecondition("the cluster CA is not ready".into()))?;
        let ca = Ca::load(&ca)?;
        let certificate_pem = ca.issue_agent(host_id, public_key).map_err(|e| match e {
            ferro_pki::PkiError::PublicKey(_) | ferro_pki::PkiError::HostId(_) => {
                ControllerError::State(StateError::InvalidArgument(e.to_string()))
            }
            e => e.into(),
        })?;
        let secret = format!("fk_{}", hex(&random_bytes::<32>()));
        let now_ms = crate::now_ms();
        let key = ApiKey {
            id: new_id("ak-"),
            name: format!("host-{host_id}-{}", hex(&random_bytes::<4>())),
            secret_sha256: sha256_hex(secret.as_bytes()),
            admin: false,
            created_at_ms: now_ms,
            role: Some(Role::Host),
            host_id: host_id.into(),
            ec2_secret: String::new(),
        };
        let out = self
            .write(Command::JoinHost {
                host_id: host_id.into(),
                token_sha256: sha256_hex(token.as_bytes()),
                now_ms,
                key,
            })
            .await?;
        match out {
            Output::ApiKey(_) => Ok(Joined {
                host_key: secret,
                certificate_pem,
                ca_pem: ca.cert_pem().to_string(),
            }),
            _ => Err(ControllerError::Unexpected),
        }
    }

    /// Revoke host `host_id`'s credential and unused join tokens.
    pub async fn revoke_host(&self, host_id: &str) -> Result<()> {
        self.write(Command::RevokeHost {
            host_id: host_id.into(),
        })
        .await
        .map(|_| ())
    }

    /// Keep a new cluster CA if the replicated state has none (a cluster
    /// bootstrapped before there was one). True when one is kept.
    pub async fn ensure_ca(&self) -> Result<bool> {
        if self.replicator().read_local(|s| s.ca.is_some())? {
            return Ok(true);
        }
        if !self.is_leader() {
            return Ok(false);
        }
        let region = self.replicator().read_local(|s| s.region.clone())?;
        self.write(Command::SetClusterCa {
            ca: new_cluster_ca(&region)?,
        })
        .await?;
        Ok(true)
    }

    /// A client of host `host_id`'s agent at `address`, over mutual TLS:
    /// the agent must present the certificate the cluster CA issued for
    /// that host id, and this node presents its controller certificate.
    /// Calls time out after `timeout`.
    pub fn agent_client(
        &self,
        host_id: &str,
        address: &str,
        timeout: Duration,
    ) -> Result<AgentClient<Channel>> {
        let cache_key = format!("{host_id} {address} {}", timeout.as_millis());
        if let Some(c) = self
            .agents
            .clients
            .lock()
            .map_err(|_| ControllerError::Unexpected)?
            .get(&cache_key)
        {
            return Ok(c.clone());
        }
        let tls = self.agent_tls()?;
        // Agents serve only TLS; an address written as http:// (an older
        // agent's default) is dialed over TLS all the same.
        let url = match address.strip_prefix("http://") {
            Some(rest) => format!("https://{rest}"),
            None => address.to_string(),
        };
        let cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &tls.identity.cert_pem,
                &tls.identity.key_pem,
            ))
            .domain_name(ferro_pki::agent_server_name(host_id));
        let bad = |e: tonic::transport::Error| {
            ControllerError::Agent(format!("bad agent address {address:?}: {e}"))
        };
        let ep = Endpoint::from_shared(url)
            .map_err(bad)?
            .tls_config(cfg)
            .map_err(bad)?
            .connect_timeout(Duration::from_secs(2))
            .timeout(timeout);
        let c = AgentClient::new(ep.connect_lazy());
        self.agents
            .clients
            .lock()
            .map_err(|_| ControllerError::Unexpected)?
            .insert(cache_key, c.clone());
        Ok(c)
    }

    /// This node's TLS material for dialing agents, made on first use from
    /// the replicated CA.
    pub fn agent_tls(&self) -> Result<AgentTls> {
        let mut c = self
            .agents
            .tls
            .lock()
            .map_err(|_| ControllerError::Unexpected)?;
        if let Some(t) = c.as_ref() {
            return Ok(t.clone());
        }
        let ca = self
            .replicator()
            .read_local(|s| s.ca.clone())?
            .ok_or_else(|| StateError::FailedPrecondition("the cluster CA is not ready".into()))?;
        let loaded = Ca::load(&ca)?;
        let t = AgentTls {
            ca_pem: ca.cert_pem.clone(),
            identity: loaded.issue_controller(&format!("node {}", self.replicator().node_id()))?,
        };
        *c = Some(t.clone());
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(role: Option<Role>, admin: bool, host: &str) -> ApiKey {
        ApiKey {
            id: "ak-1".into(),
            name: "k".into(),
            secret_sha256: "00".into(),
            admin,
            created_at_ms: 0,
            role,
            host_id: host.into(),
            ec2_secret: String::new(),
        }
    }

    #[test]
    fn roles_decide_every_call() {
        let admin = key(Some(Role::Admin), true, "");
        let user = key(Some(Role::User), false, "");
        let host = key(Some(Role::Host), false, "h1");
        let old_admin = key(None, true, "");
        assert!(check_role(&admin, true).is_ok());
        assert!(check_role(&old_admin, true).is_ok());
        assert!(check_role(&user, false).is_ok());
        assert!(check_role(&user, true).is_err());
        // A host key reaches nothing of the compute API.
        let e = check_role(&host, false).unwrap_err().to_string();
        assert!(e.contains("only send that host's heartbeats"), "{e}");
        // Heartbeats: only the host's own credential.
        assert!(check_host(&host, "h1").is_ok());
        let e = check_host(&host, "h2").unwrap_err().to_string();
        assert!(e.contains("not host \"h2\"'s"), "{e}");
        for k in [&admin, &user, &old_admin] {
            let e = check_host(k, "h1").unwrap_err();
            assert!(
                matches!(e, ControllerError::State(StateError::PermissionDenied(_))),
                "{e:?}"
            );
        }
    }
}
