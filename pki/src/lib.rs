//! `ferro-pki`: the cluster's own certificate authority.
//!
//! The controllers keep one CA in their replicated state (generated when the
//! cluster bootstraps), so whichever node leads can issue certificates:
//! - an **agent certificate** when a host joins: a server certificate whose
//!   only name is [`agent_server_name`] of the host id, with the
//!   `serverAuth` usage only. The agent makes its key pair itself and sends
//!   only the public key ([`NewKey`]); the private key never leaves the host.
//! - a **controller certificate** each controller issues itself at start:
//!   a client certificate with the `clientAuth` usage only.
//!
//! Agents accept only TLS clients whose certificate chains to the CA and
//! carries `clientAuth`, so another host's agent certificate cannot reach an
//! agent; the controller checks that the agent it dials presents the name of
//! the host it means to reach.
//!
//! Reloading the CA needs only its common name and key ([`CaMaterial`]):
//! a child certificate names its issuer by the CA's distinguished name and
//! key identifier, both derived from those two.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber, SignatureAlgorithm,
    PKCS_ECDSA_P256_SHA256,
};
use serde::{Deserialize, Serialize};

/// The DNS suffix of agent certificate names.
pub const AGENT_NAME_SUFFIX: &str = "agent.ferro.internal";

/// How long an agent certificate is valid (no rotation yet: a host rejoins
/// to get a new one).
pub const AGENT_CERT_DAYS: i64 = 5 * 365;

/// How long a controller's client certificate is valid; a controller issues
/// a new one at every start.
pub const CONTROLLER_CERT_DAYS: i64 = 365;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A key or certificate could not be made or read.
    #[error("{0}: {1}")]
    Rcgen(&'static str, #[source] rcgen::Error),
    /// A public key is not an uncompressed P-256 point.
    #[error("public key: expected 65 bytes of an uncompressed P-256 point, got {0} bytes")]
    PublicKey(usize),
    /// A host id cannot be a DNS label.
    #[error(
        "host id {0:?} cannot be named in a certificate (letters, digits and '-' only, at most 63)"
    )]
    HostId(String),
    /// No randomness.
    #[error("no randomness for a serial number: {0}")]
    Random(String),
}

type Result<T> = std::result::Result<T, PkiError>;

/// The name an agent's certificate carries and the controller expects when
/// it dials that host: `<host_id>.agent.ferro.internal`.
pub fn agent_server_name(host_id: &str) -> String {
    format!("{host_id}.{AGENT_NAME_SUFFIX}")
}

/// Whether `host_id` can name a host in its certificate: a DNS label of 1
/// to 63 letters, digits and '-', not starting or ending with '-'. The one
/// rule for host ids (agent config, join tokens, certificates).
pub fn valid_host_id(host_id: &str) -> bool {
    !host_id.is_empty()
        && host_id.len() <= 63
        && host_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !host_id.starts_with('-')
        && !host_id.ends_with('-')
}

/// What the replicated state keeps of the CA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaMaterial {
    /// The CA's common name.
    pub common_name: String,
    /// The CA certificate (PEM), handed to agents at join.
    pub cert_pem: String,
    /// The CA's private key (PKCS#8 PEM).
    pub key_pem: String,
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Certificate (PEM).
    pub cert_pem: String,
    /// Private key (PKCS#8 PEM).
    pub key_pem: String,
}

/// A fresh key pair: the private key stays where it was made; the public
/// key travels.
#[derive(Clone, Debug)]
pub struct NewKey {
    /// Private key (PKCS#8 PEM).
    pub key_pem: String,
    /// Public key: an uncompressed P-256 point (65 bytes).
    pub public_key: Vec<u8>,
}

/// Make a P-256 key pair.
pub fn generate_key() -> Result<NewKey> {
    let kp = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| PkiError::Rcgen("generate a key", e))?;
    Ok(NewKey {
        key_pem: kp.serialize_pem(),
        public_key: kp.public_key_raw().to_vec(),
    })
}

/// A P-256 public key received from elsewhere.
struct RemoteKey(Vec<u8>);

impl PublicKeyData for RemoteKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// The loaded CA, ready to issue.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn ca_params(common_name: &str) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| PkiError::Rcgen("CA parameters", e))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Ferrocloud");
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

fn serial() -> Result<SerialNumber> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| PkiError::Random(e.to_string()))?;
    // Positive, non-zero.
    b[0] = (b[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&b))
}

fn validity(p: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks a little behind.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
}

impl Ca {
    /// Make a new CA (valid 20 years).
    pub fn generate(common_name: &str) -> Result<CaMaterial> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| PkiError::Rcgen("generate the CA key", e))?;
        let mut p = ca_params(common_name)?;
        validity(&mut p, 20 * 365);
        p.serial_number = Some(serial()?);
        let cert = p
            .self_signed(&key)
            .map_err(|e| PkiError::Rcgen("sign the CA certificate", e))?;
        Ok(CaMaterial {
            common_name: common_name.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Load a CA kept as `m`.
    pub fn load(m: &CaMaterial) -> Result<Self> {
        let key = KeyPair::from_pem(&m.key_pem).map_err(|e| PkiError::Rcgen("CA key", e))?;
        Ok(Self {
            issuer: Issuer::new(ca_params(&m.common_name)?, key),
            cert_pem: m.cert_pem.clone(),
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for host `host_id`'s agent, for `public_key`
    /// (an uncompressed P-256 point, as [`NewKey::public_key`]).
    pub fn issue_agent(&self, host_id: &str, public_key: &[u8]) -> Result<String> {
        if !valid_host_id(host_id) {
            return Err(PkiError::HostId(host_id.to_string()));
        }
        if public_key.len() != 65 || public_key[0] != 4 {
            return Err(PkiError::PublicKey(public_key.len()));
        }
        let name = agent_server_name(host_id);
        let mut p = CertificateParams::new(vec![name.clone()])
            .map_err(|e| PkiError::Rcgen("agent certificate parameters", e))?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(serial()?);
        validity(&mut p, AGENT_CERT_DAYS);
        let cert = p
            .signed_by(&RemoteKey(public_key.to_vec()), &self.issuer)
            .map_err(|e| PkiError::Rcgen("sign the agent certificate", e))?;
        Ok(cert.pem())
    }

    /// A client certificate (and its new key) for controller `name`.
    pub fn issue_controller(&self, name: &str) -> Result<Identity> {
        self.issue_client(&format!("controller {name}"), CONTROLLER_CERT_DAYS)
    }

    /// A client certificate with common name `cn`, valid `days`.
    pub fn issue_client(&self, cn: &str, days: i64) -> Result<Identity> {
        self.issue_with_new_key(cn, ExtendedKeyUsagePurpose::ClientAuth, days)
    }

    /// A certificate for a key made here: common name `cn`, the one usage
    /// `eku`, valid `days`.
    fn issue_with_new_key(
        &self,
        cn: &str,
        eku: ExtendedKeyUsagePurpose,
        days: i64,
    ) -> Result<Identity> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| PkiError::Rcgen("generate a key", e))?;
        let mut p = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| PkiError::Rcgen("certificate parameters", e))?;
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(serial()?);
        validity(&mut p, days);
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| PkiError::Rcgen("sign the certificate", e))?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_refused_with_what_was_wrong() {
        let ca = Ca::load(&Ca::generate("test").unwrap()).unwrap();
        let k = generate_key().unwrap();
        for bad in ["", "h.1", "-h", &"x".repeat(64), "h_1"] {
            let e = ca.issue_agent(bad, &k.public_key).unwrap_err();
            assert!(matches!(e, PkiError::HostId(_)), "{bad}: {e}");
        }
        let e = ca.issue_agent("h1", &k.public_key[..10]).unwrap_err();
        assert!(e.to_string().contains("got 10 bytes"), "{e}");
        assert!(ca.issue_agent("h1", &k.public_key).is_ok());
    }

    #[test]
    fn a_reloaded_ca_signs_the_same_way() {
        let m = Ca::generate("ferro test").unwrap();
        assert!(m.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(m.key_pem.contains("PRIVATE KEY"));
        let a = Ca::load(&m).unwrap();
        let b = Ca::load(&m).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        assert!(Ca::load(&CaMaterial {
            key_pem: "garbage".into(),
            ..m
        })
        .is_err());
    }
}
