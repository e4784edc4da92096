//! HTTPS for the EC2 endpoint: with TLS configured (`tls_cert_file`,
//! `tls_key_file`) the endpoint serves the controller's own certificate,
//! as its gRPC port does, and a follower forwards to the leader's endpoint
//! over TLS, verifying it against the cluster CA (`tls_ca_file`).
//!
//! Each connection's handshake runs in a task of its own (bounded in
//! time), so a client that stalls its handshake holds up nobody else; the
//! finished streams reach the HTTP server through [`TlsListener`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::server::TlsStream;

/// How long a client gets to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file holds nothing usable.
    #[error("{what}: {why}")]
    Pem {
        /// Which file (certificate, key, CA).
        what: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// rustls refused the certificate and key.
    #[error("the certificate and key: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            why: "no CERTIFICATE in it".into(),
        });
    }
    Ok(certs)
}

/// The endpoint's TLS: its server side, and the client side a follower
/// forwards with (none without a CA: a single node never forwards).
#[derive(Clone)]
pub struct Ec2Tls {
    server: Arc<rustls::ServerConfig>,
    client: Option<Arc<rustls::ClientConfig>>,
}

impl Ec2Tls {
    /// From PEM: the certificate chain, its private key, and the CA that
    /// signed the controllers' certificates.
    pub fn from_pem(cert: &[u8], key: &[u8], ca: Option<&[u8]>) -> Result<Self, TlsError> {
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Pem {
            what: "the private key",
            why: e.to_string(),
        })?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs("the certificate", cert)?, key)?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = ca.map(client_config).transpose()?;
        Ok(Self {
            server: Arc::new(server),
            client,
        })
    }

    /// The client side (to the leader), if a CA was given.
    pub fn client(&self) -> Option<&Arc<rustls::ClientConfig>> {
        self.client.as_ref()
    }
}

/// A client trusting the CA `ca` (PEM).
pub fn client_config(ca: &[u8]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs("the CA", ca)? {
        roots.add(c)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Connect to `target` (`host:port`) over TLS, verifying its certificate
/// names `host`.
pub async fn connect(
    cfg: &Arc<rustls::ClientConfig>,
    target: &str,
    tcp: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let host = target.rsplit_once(':').map_or(target, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string()).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await
}

/// Connections that finished their TLS handshake, for `axum::serve`.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accept on `listener`, each handshake in a task of its own. The
    /// accepting stops once this is dropped.
    pub fn new(listener: TcpListener, tls: &Ec2Tls) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    () = tx.closed() => return,
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            // Out of file descriptors and the like: wait
                            // a moment rather than spin.
                            tracing::warn!("EC2 endpoint: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "EC2 endpoint: TLS handshake failed: {e}")
                        }
                        Err(_) => tracing::debug!(%peer, "EC2 endpoint: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accepting task ended (it only does once this is
            // dropped): nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_pem_is_named() {
        let e = Ec2Tls::from_pem(b"junk", b"junk", None).err().unwrap();
        assert!(e.to_string().starts_with("the private key: "), "{e}");
        let e = client_config(b"").err().unwrap();
        assert_eq!(e.to_string(), "the CA: no CERTIFICATE in it");
    }
}
