//! netd's TOML configuration (`ferro-netd --config FILE`).
//!
//! ```toml
//! host_id = "host-a"
//! controllers = ["https://10.0.0.1:7400", "https://10.0.0.2:7400"]
//! underlay_ip = "10.99.0.1"
//! underlay_dev = "eth0"        # optional
//! # credentials_dir = "/var/lib/ferro-agent/credentials"   (the default)
//! # or: api_key_file = "...", ca_file = "..."
//! # mtu = 1450
//! # name_prefix = "f"          # devices fbr<vni>, fvx<vni>
//! # vxlan_port = 4789
//! ```

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The agent's credentials directory under its default `state_dir`.
pub const DEFAULT_CREDENTIALS_DIR: &str = "/var/lib/ferro-agent/credentials";

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{}: {message}{}", path.display(), line.map_or(String::new(), |l| format!(" (line {l})")))]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message on one line (it names the field).
        message: String,
        /// The line it points at, if any.
        line: Option<usize>,
    },
    /// A field has a value netd cannot use.
    #[error("{}: {field}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    host_id: String,
    controllers: Vec<String>,
    underlay_ip: String,
    #[serde(default)]
    underlay_dev: Option<String>,
    #[serde(default)]
    credentials_dir: Option<PathBuf>,
    #[serde(default)]
    api_key_file: Option<PathBuf>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default = "default_mtu")]
    mtu: u32,
    #[serde(default = "default_resync")]
    resync_interval_ms: u64,
    #[serde(default = "default_prefix")]
    name_prefix: String,
    #[serde(default = "default_port")]
    vxlan_port: u16,
}

fn default_prefix() -> String {
    crate::desired::DEFAULT_NAME_PREFIX.into()
}
fn default_port() -> u16 {
    crate::desired::DEFAULT_VXLAN_PORT
}

fn default_mtu() -> u32 {
    1450
}
fn default_resync() -> u64 {
    2000
}

/// Where the host's bearer key and the cluster CA are read from (at every
/// connection, so a host that joins or rejoins after netd started is
/// picked up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// The host's API key (role host).
    pub api_key_file: PathBuf,
    /// The CA of `https://` controllers; the system's roots when `None`
    /// or when the file does not exist.
    pub ca_file: Option<PathBuf>,
}

/// netd's validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// This host's id, as the controller knows it.
    pub host_id: String,
    /// Every controller URL, normalised (`http(s)://host:port`).
    pub controllers: Vec<String>,
    /// This host's address on the underlay: the VXLAN devices' source.
    pub underlay_ip: Ipv4Addr,
    /// The device the VXLAN devices sit on; any when `None`.
    pub underlay_dev: Option<String>,
    /// The host's credential and the cluster CA.
    pub credentials: Credentials,
    /// The inner MTU of bridges and VXLAN devices (the underlay's less 50).
    pub mtu: u32,
    /// How often the dataplane is compared with the last state even when
    /// nothing changed (repairs manual damage).
    pub resync_interval: Duration,
    /// What its device names start with (1 to 3 lowercase letters or
    /// digits): `<prefix>br<vni>`, `<prefix>vx<vni>`.
    pub name_prefix: String,
    /// The UDP port of its VXLAN devices (every host of a cluster must use
    /// the same).
    pub vxlan_port: u16,
}

/// Longest Linux interface name.
pub const IFNAMSIZ_MAX: usize = 15;

impl Config {
    /// Read and validate `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse and validate `text`, read from `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.message().replace('\n', " ").trim().to_string(),
            line: e
                .span()
                .map(|sp| text[..sp.start.min(text.len())].matches('\n').count() + 1),
        })?;
        let invalid = |field, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            field,
            message,
        };
        if !valid_host_id(&raw.host_id) {
            return Err(invalid(
                "host_id",
                format!("{:?} must be 1 to 63 letters, digits and '-'", raw.host_id),
            ));
        }
        if raw.controllers.is_empty() {
            return Err(invalid("controllers", "needs at least one URL".into()));
        }
        let controllers = raw
            .controllers
            .iter()
            .map(|u| ferro_client::normalize_endpoint(u))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| invalid("controllers", m))?;
        let underlay_ip: Ipv4Addr = raw.underlay_ip.parse().map_err(|_| {
            invalid(
                "underlay_ip",
                format!("{:?} is not an IPv4 address", raw.underlay_ip),
            )
        })?;
        if underlay_ip.is_unspecified() || underlay_ip.is_multicast() || underlay_ip.is_broadcast()
        {
            return Err(invalid(
                "underlay_ip",
                format!("{underlay_ip} is not a unicast address"),
            ));
        }
        if let Some(dev) = &raw.underlay_dev {
            if dev.is_empty() || dev.len() > IFNAMSIZ_MAX || dev.contains(['/', ' ']) {
                return Err(invalid(
                    "underlay_dev",
                    format!("{dev:?} is not an interface name"),
                ));
            }
        }
        if !(576..=9000).contains(&raw.mtu) {
            return Err(invalid("mtu", format!("{} is outside 576..=9000", raw.mtu)));
        }
        let p = &raw.name_prefix;
        if p.is_empty()
            || p.len() > 3
            || !p
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(invalid(
                "name_prefix",
                format!("{p:?} must be 1 to 3 lowercase letters or digits"),
            ));
        }
        if raw.vxlan_port == 0 {
            return Err(invalid("vxlan_port", "0 is not a port".into()));
        }
        if raw.resync_interval_ms < 100 {
            return Err(invalid(
                "resync_interval_ms",
                format!("{} is below 100", raw.resync_interval_ms),
            ));
        }
        let credentials = match (raw.credentials_dir, raw.api_key_file, raw.ca_file) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(invalid(
                    "credentials_dir",
                    "give credentials_dir or api_key_file (with ca_file), not both".into(),
                ))
            }
            (None, None, Some(_)) => {
                return Err(invalid("ca_file", "needs api_key_file".into()));
            }
            (None, Some(key), ca) => Credentials {
                api_key_file: key,
                ca_file: ca,
            },
            (dir, None, None) => {
                let dir = dir.unwrap_or_else(|| PathBuf::from(DEFAULT_CREDENTIALS_DIR));
                Credentials {
                    api_key_file: dir.join("host.key"),
                    ca_file: Some(dir.join("ca.crt")),
                }
            }
        };
        Ok(Config {
            host_id: raw.host_id,
            controllers,
            underlay_ip,
            underlay_dev: raw.underlay_dev,
            credentials,
            mtu: raw.mtu,
            resync_interval: Duration::from_millis(raw.resync_interval_ms),
            name_prefix: raw.name_prefix,
            vxlan_port: raw.vxlan_port,
        })
    }
}

/// The host-id rule of `ferro-pki` (kept here to avoid its crypto
/// dependencies): 1 to 63 ASCII letters, digits and '-'.
fn valid_host_id(h: &str) -> bool {
    !h.is_empty() && h.len() <= 63 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
host_id = "host-a"
controllers = ["10.0.0.1:7400"]
underlay_ip = "10.99.0.1"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("netd.toml"))
    }

    #[test]
    fn defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.controllers, ["http://10.0.0.1:7400"]);
        assert_eq!(c.mtu, 1450);
        assert_eq!(c.underlay_dev, None);
        assert_eq!(
            c.credentials.api_key_file,
            Path::new("/var/lib/ferro-agent/credentials/host.key")
        );
        assert_eq!(c.resync_interval, Duration::from_secs(2));
    }

    #[test]
    fn explicit_key_file() {
        let c = parse(&format!("{MIN}api_key_file = \"/k\"\nca_file = \"/ca\"\n")).unwrap();
        assert_eq!(c.credentials.api_key_file, Path::new("/k"));
        assert_eq!(c.credentials.ca_file.as_deref(), Some(Path::new("/ca")));
    }

    #[test]
    fn errors_name_the_file_and_field() {
        let e = parse(&MIN.replace("10.99.0.1", "10.99.0")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "netd.toml: underlay_ip: \"10.99.0\" is not an IPv4 address"
        );
        let e = parse(&format!("{MIN}mtu = 20000\n")).unwrap_err();
        assert!(e.to_string().starts_with("netd.toml: mtu:"), "{e}");
        let e = parse(&format!("{MIN}bogus = 1\n")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = parse(&MIN.replace("host-a", "host a")).unwrap_err();
        assert!(e.to_string().contains("host_id"), "{e}");
        let e = parse(&MIN.replace("10.0.0.1:7400", "ftp://x:1")).unwrap_err();
        assert!(e.to_string().contains("controllers"), "{e}");
        let e = parse(&format!(
            "{MIN}credentials_dir = \"/c\"\napi_key_file = \"/k\"\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        let e = parse("host_id = \"h\"\n").unwrap_err();
        assert!(e.to_string().contains("controllers"), "{e}");
    }
}
