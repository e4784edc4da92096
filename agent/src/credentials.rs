//! The host's credentials: the bearer key its heartbeats carry (bound to
//! its host id), the agent's server certificate and key, and the CA whose
//! client certificates may call the agent (the cluster CA).
//!
//! A host under a controller gets them by joining once: the agent makes a
//! P-256 key pair, sends the public key with the operator's one-time token
//! (`ferro hosts join <host_id>`) to `Hosts.Join`, and keeps the answer in
//! `<state_dir>/credentials/` (mode 0700, files 0600). A standalone agent
//! (no controller) is given its TLS files in the configuration instead.
//! Either way the agent serves only mutual TLS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferro_client::{Client, ClientConfig};
use ferro_proto::compute::v1::hosts_client::HostsClient;
use ferro_proto::compute::v1::JoinRequest;

use crate::config::AgentConfig;

/// Errors obtaining credentials.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// A credentials file exists but cannot be read; nothing is removed.
    #[error("{0}: cannot read ({1}); the host's credentials are kept as they are: fix or move them, or revoke the host and join it again")]
    Unreadable(PathBuf, String),
    /// The credentials could not be written.
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
    /// No way to get an identity.
    #[error("the agent serves only mutual TLS and has no certificate: give join_token (from `ferro hosts join {0}`) with controller, or tls_cert_file, tls_key_file and client_ca_file for an agent without a controller")]
    NoIdentity(String),
    /// The controller refused the join.
    #[error("the controller refused to join host {host_id}: {message} (make a new token with `ferro hosts join {host_id}`)")]
    Refused {
        /// Host id.
        host_id: String,
        /// The controller's message.
        message: String,
    },
    /// A key could not be made.
    #[error("cannot make a key pair")]
    Key(#[from] ferro_pki::PkiError),
    /// A configured TLS file could not be read.
    #[error("cannot read {0}")]
    TlsFile(PathBuf, #[source] std::io::Error),
}

/// What the agent serves and heartbeats with.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The heartbeat bearer key (joined hosts only).
    pub host_key: Option<String>,
    /// Server certificate (PEM).
    pub cert_pem: String,
    /// Its key (PEM).
    pub key_pem: String,
    /// The CA whose client certificates may call this agent (PEM).
    pub client_ca_pem: String,
}

const FILES: [&str; 4] = ["host.key", "agent.crt", "agent.key", "ca.crt"];

/// Where a joined host keeps its credentials.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("credentials")
}

/// The credentials of an earlier join, if the host joined. A directory
/// that exists but is incomplete or unreadable is an error and is left
/// untouched.
pub fn load_joined(state_dir: &Path) -> Result<Option<Credentials>, CredentialsError> {
    let d = dir(state_dir);
    if !d.exists() {
        return Ok(None);
    }
    let read = |name: &str| {
        let p = d.join(name);
        match std::fs::read_to_string(&p) {
            Ok(s) if !s.trim().is_empty() => Ok(s),
            Ok(_) => Err(CredentialsError::Unreadable(p, "empty".into())),
            Err(e) => Err(CredentialsError::Unreadable(p, e.to_string())),
        }
    };
    Ok(Some(Credentials {
        host_key: Some(read(FILES[0])?.trim().to_string()),
        cert_pem: read(FILES[1])?,
        key_pem: read(FILES[2])?,
        client_ca_pem: read(FILES[3])?,
    }))
}

/// Keep `c` as this host's credentials: written into a fresh directory
/// that is renamed into place, so a crash leaves either none or all.
pub fn store(state_dir: &Path, c: &Credentials) -> Result<(), CredentialsError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let final_dir = dir(state_dir);
    let tmp = state_dir.join(format!("credentials.tmp-{}", std::process::id()));
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |e| CredentialsError::Write(p, e)
    };
    std::fs::create_dir_all(state_dir).map_err(err(state_dir))?;
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(err(&tmp))?;
    let key = c.host_key.clone().unwrap_or_default();
    for (name, text) in FILES
        .iter()
        .zip([&key, &c.cert_pem, &c.key_pem, &c.client_ca_pem])
    {
        let p = tmp.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .map_err(err(&p))?;
        f.write_all(text.as_bytes()).map_err(err(&p))?;
        f.sync_all().map_err(err(&p))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(err(&final_dir))?;
    if let Ok(d) = std::fs::File::open(state_dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The agent's credentials: an earlier join's, the configured TLS files,
/// or a join now (waiting for the controller as long as it takes).
pub async fn obtain(cfg: &AgentConfig) -> Result<Credentials, CredentialsError> {
    if let Some(c) = load_joined(&cfg.state_dir)? {
        tracing::info!("using the credentials of an earlier join");
        return Ok(c);
    }
    if let (Some(cert), Some(key), Some(ca)) =
        (&cfg.tls_cert_file, &cfg.tls_key_file, &cfg.client_ca_file)
    {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p).map_err(|e| CredentialsError::TlsFile(p.clone(), e))
        };
        return Ok(Credentials {
            host_key: None,
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: read(ca)?,
        });
    }
    let (Some(token), Some(controllers)) = (&cfg.join_token, cfg.controllers()) else {
        return Err(CredentialsError::NoIdentity(cfg.host_id.clone()));
    };
    let ca_pem = cfg
        .controller_ca_file
        .as_ref()
        .map(|p| std::fs::read_to_string(p).map_err(|e| CredentialsError::TlsFile(p.clone(), e)))
        .transpose()?;
    let c = join(&cfg.host_id, token, controllers, ca_pem.as_deref()).await?;
    store(&cfg.state_dir, &c)?;
    tracing::info!(dir = %dir(&cfg.state_dir).display(), "joined the cluster");
    Ok(c)
}

/// Join: retried (capped exponential back-off with jitter, a repeated
/// failure logged once per minute) until the controller answers; a refusal
/// is final.
pub async fn join(
    host_id: &str,
    token: &str,
    controllers: Vec<String>,
    ca_pem: Option<&str>,
) -> Result<Credentials, CredentialsError> {
    let key = ferro_pki::generate_key()?;
    let mut cfg = ClientConfig::new(controllers.clone(), None);
    cfg.ca_pem = ca_pem.map(str::to_string);
    cfg.max_retries = controllers.len();
    let refused = |message: String| CredentialsError::Refused {
        host_id: host_id.into(),
        message,
    };
    let mut client = Client::new(cfg).map_err(|e| refused(e.to_string()))?;
    let req = JoinRequest {
        host_id: host_id.into(),
        token: token.into(),
        public_key: key.public_key.clone(),
    };
    let mut delay = Duration::from_millis(200);
    let mut last_log: Option<std::time::Instant> = None;
    let mut failures = 0u32;
    loop {
        let r = client
            .call(|ch| {
                let req = req.clone();
                async move { HostsClient::new(ch).join(req).await }
            })
            .await;
        match r {
            Ok(r) => {
                return Ok(Credentials {
                    host_key: Some(r.host_key),
                    cert_pem: r.certificate_pem,
                    key_pem: key.key_pem,
                    client_ca_pem: r.ca_pem,
                });
            }
            Err(e) => match e.status() {
                Some(s) if is_final(s.code()) => return Err(refused(s.message().to_string())),
                None => return Err(refused(e.to_string())),
                Some(_) => {
                    failures += 1;
                    if last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!(controller = %client.endpoint(), failures, "join not answered yet, retrying: {e}");
                        last_log = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(jitter(delay)).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            },
        }
    }
}

/// Answers that no retry changes.
fn is_final(code: tonic::Code) -> bool {
    use tonic::Code as C;
    matches!(
        code,
        C::PermissionDenied
            | C::InvalidArgument
            | C::Unauthenticated
            | C::NotFound
            | C::AlreadyExists
            | C::Unimplemented
    )
}

pub use ferro_client::jitter;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_credentials_load_and_a_broken_set_is_kept() {
        let sd = std::env::temp_dir()
            .join(format!("agent-cred-{}", std::process::id()))
            .join("state");
        let _ = std::fs::remove_dir_all(&sd);
        assert!(load_joined(&sd).unwrap().is_none());
        let c = Credentials {
            host_key: Some("fk_1".into()),
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
            client_ca_pem: "CA".into(),
        };
        store(&sd, &c).unwrap();
        let l = load_joined(&sd).unwrap().unwrap();
        assert_eq!(l.host_key.as_deref(), Some("fk_1"));
        assert_eq!(l.cert_pem, "CERT");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir(&sd).join("agent.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A missing file: an error naming it, and nothing removed.
        std::fs::remove_file(dir(&sd).join("ca.crt")).unwrap();
        let e = load_joined(&sd).unwrap_err().to_string();
        assert!(e.contains("ca.crt") && e.contains("kept"), "{e}");
        assert!(dir(&sd).join("agent.key").exists());
        let _ = std::fs::remove_dir_all(&sd);
    }

    #[test]
    fn jitter_stays_within_half_and_one_and_a_half() {
        let d = Duration::from_millis(1000);
        for _ in 0..50 {
            let j = jitter(d);
            assert!(j >= Duration::from_millis(500) && j < Duration::from_millis(1500));
        }
    }
}
