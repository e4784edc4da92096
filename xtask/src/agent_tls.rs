//! Benchmarks that drive an agent directly play the controller: the agent
//! serves only mutual TLS, so it gets a certificate from a bench CA and
//! the bench presents that CA's controller certificate.

use std::path::Path;

use ferro_testkit::pki;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The agent configuration lines giving host `host_id` its TLS files
/// (written into `dir`).
pub fn agent_config(host_id: &str, dir: &Path) -> String {
    pki::agent_tls_config(host_id, dir)
}

/// A channel to host `host_id`'s agent at `addr` (`ip:port`).
pub async fn channel(addr: &str, host_id: &str) -> Result<Channel, String> {
    let id = pki::controller_identity();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki::ca().cert_pem))
        .identity(Identity::from_pem(&id.cert_pem, &id.key_pem))
        .domain_name(pki::agent_server_name(host_id));
    Endpoint::from_shared(format!("https://{addr}"))
        .and_then(|e| e.tls_config(tls))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect to the agent at {addr}: {e}"))
}
