//! The controller's TOML configuration (see `deploy/controller.example.toml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is not valid TOML for this schema: the file and the
    /// parser's message on one line.
    #[error("{path}: {message}", path = .0.display(), message = .1)]
    Parse(PathBuf, String),
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// toml's error as one line, with the line it points at.
fn one_line(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().replace('\n', " ").trim().to_string();
    match e.span() {
        Some(sp) => format!(
            "{msg} (line {})",
            text[..sp.start.min(text.len())].matches('\n').count() + 1
        ),
        None => msg,
    }
}

/// A controller node's configuration. Unknown keys are errors.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// This node's id in the cluster (never reused).
    pub node_id: u64,
    /// gRPC listen address (API, agents' heartbeats and Raft).
    pub listen: SocketAddr,
    /// The `host:port` other nodes and clients reach this node at; defaults
    /// to `listen`.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Where the Raft log and state live.
    pub data_dir: PathBuf,
    /// The region's name.
    #[serde(default = "default_region")]
    pub region: String,
    /// Zones created at bootstrap (hosts may add more by heartbeating).
    #[serde(default)]
    pub availability_zones: Vec<String>,
    /// The initial members as `"id=host:port"`, this node included; empty
    /// for a single-node cluster. The node with the lowest id initializes.
    #[serde(default)]
    pub peers: Vec<String>,
    /// A host missing heartbeats this long is unreachable.
    #[serde(default = "default_hb_timeout")]
    pub heartbeat_timeout_ms: u64,
    /// The interval agents heartbeat at.
    #[serde(default = "default_hb_interval")]
    pub heartbeat_interval_ms: u32,
    /// The reconcile loop's period.
    #[serde(default = "default_reconcile")]
    pub reconcile_interval_ms: u64,
    /// Snapshot the state (and compact the Raft log behind it) every this
    /// many applied entries.
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every: u64,
    /// Terminated instances stay visible (state `terminated`) this long,
    /// then are forgotten with the client tokens that named them.
    #[serde(default = "default_retention")]
    pub terminated_retention_ms: u64,
    /// Serve TLS with this certificate chain (PEM); with `tls_key_file`.
    /// Clients and agents then use `https://` URLs.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// The CA (PEM) that signed the controllers' certificates: this node
    /// verifies its peers against it. Required with TLS and several
    /// nodes.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Serve the EC2 Query API (SigV4-signed requests) here: HTTPS with
    /// this node's `tls_cert_file`, else plain HTTP; none: not served.
    #[serde(default)]
    pub ec2_listen: Option<SocketAddr>,
    /// The type of a volume asked for without one (CreateVolume, a launch's
    /// block devices and root volume): `single`, `standard` or `durable`.
    /// A cloud of one host (`ferro up`) can only hold `single` volumes.
    #[serde(default = "default_volume_type")]
    pub default_volume_type: String,
}

fn default_volume_type() -> String {
    "standard".into()
}

fn default_region() -> String {
    "local".into()
}
fn default_hb_timeout() -> u64 {
    10_000
}
fn default_hb_interval() -> u32 {
    1_000
}
fn default_reconcile() -> u64 {
    200
}
fn default_snapshot_every() -> u64 {
    5_000
}
fn default_retention() -> u64 {
    3_600_000
}

impl ControllerConfig {
    /// Read and validate `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        let cfg: Self = toml::from_str(&text)
            .map_err(|e| ConfigError::Parse(path.into(), one_line(&text, &e)))?;
        cfg.validate().map_err(|e| match e {
            ConfigError::Invalid(m) => ConfigError::Invalid(format!("{}: {m}", path.display())),
            other => other,
        })?;
        Ok(cfg)
    }

    /// Parse and validate TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text)
            .map_err(|e| ConfigError::Parse(PathBuf::new(), one_line(text, &e)))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_timeout_ms <= u64::from(self.heartbeat_interval_ms) {
            return Err(ConfigError::Invalid(
                "heartbeat_timeout_ms must exceed heartbeat_interval_ms".into(),
            ));
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::Invalid(
                    "tls_key_file is required with tls_cert_file".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "tls_cert_file is required with tls_key_file".into(),
                ))
            }
            _ => {}
        }
        if self.tls_cert_file.is_none() && self.tls_ca_file.is_some() {
            return Err(ConfigError::Invalid(
                "tls_ca_file needs tls_cert_file and tls_key_file (peers speak TLS only when this node serves it)".into(),
            ));
        }
        if self.tls_cert_file.is_some() && self.tls_ca_file.is_none() && self.peers.len() > 1 {
            return Err(ConfigError::Invalid(
                "tls_ca_file is required with TLS and several peers (to verify them)".into(),
            ));
        }
        if crate::model::VolumeType::parse(&self.default_volume_type).is_none() {
            return Err(ConfigError::Invalid(format!(
                "default_volume_type: {:?} is not \"single\", \"standard\" or \"durable\"",
                self.default_volume_type
            )));
        }
        if self.snapshot_every == 0 {
            return Err(ConfigError::Invalid(
                "snapshot_every must be at least 1".into(),
            ));
        }
        let members = self.members()?;
        if !members.iter().any(|m| m.id == self.node_id) {
            return Err(ConfigError::Invalid(format!(
                "peers must list this node too (node_id {} = its address): without it the node \
                 would start as a learner that never votes; a node joining an existing cluster \
                 lists the current members and itself",
                self.node_id
            )));
        }
        Ok(())
    }

    /// The advertised address.
    pub fn advertise(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// The initial members (this node alone when `peers` is empty).
    pub fn members(&self) -> Result<Vec<ferro_raft::Member>, ConfigError> {
        if self.peers.is_empty() {
            return Ok(vec![ferro_raft::Member {
                id: self.node_id,
                addr: self.advertise(),
            }]);
        }
        self.peers
            .iter()
            .map(|p| {
                let (id, addr) = p.split_once('=').ok_or_else(|| {
                    ConfigError::Invalid(format!("peers: {p:?} is not \"id=host:port\""))
                })?;
                let id = id
                    .parse()
                    .map_err(|_| ConfigError::Invalid(format!("peers: bad node id in {p:?}")))?;
                Ok(ferro_raft::Member {
                    id,
                    addr: addr.into(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "node_id = 1\nlisten = \"127.0.0.1:7400\"\ndata_dir = \"/tmp/x\"\n";

    #[test]
    fn minimal_config_is_a_single_node() {
        let c = ControllerConfig::parse(MIN).unwrap();
        assert_eq!(c.members().unwrap().len(), 1);
        assert_eq!(c.region, "local");
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(ControllerConfig::parse(&format!("{MIN}bogus = 1")).is_err());
        assert!(ControllerConfig::parse(&format!("{MIN}peers = [\"x\"]")).is_err());
        let e =
            ControllerConfig::parse(&format!("{MIN}peers = [\"2=b:1\", \"3=c:1\"]")).unwrap_err();
        assert!(e.to_string().contains("peers must list this node"), "{e}");
        let t = format!("{MIN}heartbeat_timeout_ms = 10\nheartbeat_interval_ms = 100");
        assert!(ControllerConfig::parse(&t).is_err());
    }

    #[test]
    fn tls_settings_come_together() {
        let tls = "tls_cert_file = \"/c.pem\"\ntls_key_file = \"/k.pem\"\n";
        assert!(ControllerConfig::parse(&format!("{MIN}{tls}")).is_ok());
        let e = ControllerConfig::parse(&format!("{MIN}tls_cert_file = \"/c.pem\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls_key_file"), "{e}");
        let e = ControllerConfig::parse(&format!("{MIN}tls_ca_file = \"/ca.pem\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls_ca_file"), "{e}");
        let peers = "peers = [\"1=a:1\", \"2=b:1\", \"3=c:1\"]\n";
        let e = ControllerConfig::parse(&format!("{MIN}{tls}{peers}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls_ca_file"), "{e}");
        assert!(
            ControllerConfig::parse(&format!("{MIN}{tls}{peers}tls_ca_file = \"/ca.pem\"\n"))
                .is_ok()
        );
    }

    #[test]
    fn example_config_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/controller.example.toml");
        ControllerConfig::load(&p).unwrap();
    }
}
