//! The agent's TOML configuration (see `deploy/agent.example.toml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::machine::{Backoff, RestartPolicy};

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
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
        /// The parser's message, on one line (e.g. "missing field `vcpus`").
        message: String,
        /// The line it points at, if any.
        line: Option<usize>,
    },
    /// A value is out of range.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A value in the file is out of range.
    #[error("{path}: {message}", path = .0.display(), message = .1)]
    InvalidIn(PathBuf, String),
}

/// Longest `state_dir`: VMM control sockets live at
/// `<state_dir>/run/<id>.sock`, and a Unix socket path (`sun_path`) holds
/// 107 bytes; ids are up to 64.
pub const MAX_STATE_DIR_LEN: usize = 32;

/// The agent's configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's id, as the controller knows it.
    pub host_id: String,
    /// The availability zone the host is in.
    pub availability_zone: String,
    /// gRPC listen address, e.g. `127.0.0.1:7420`.
    pub listen: SocketAddr,
    /// Where specs, observed state, disks, consoles and images live.
    pub state_dir: PathBuf,
    /// vCPUs offered to instances.
    pub vcpus: u32,
    /// Guest memory offered to instances, in MiB (capped at host RAM minus
    /// `reserved_memory_mib`).
    pub memory_mib: u64,
    /// Host memory kept for the host itself, in MiB.
    #[serde(default = "default_reserved")]
    pub reserved_memory_mib: u64,
    /// Disk space offered to volume replicas, GiB, reported to the
    /// controller (which places replicas by it); 0, the default: no volumes
    /// on this host.
    #[serde(default)]
    pub volume_capacity_gib: u64,
    /// Where this host's ferro-blockd serves the volumes attached to its
    /// instances, one vhost-user socket per volume (`<dir>/<volume>.sock`):
    /// its `--data-dir` and `vhost`.
    #[serde(default = "default_blockd_socket_dir")]
    pub blockd_socket_dir: PathBuf,
    /// The `ferro-vmm` binary.
    pub vmm_path: PathBuf,
    /// Host bridge the TAPs are attached to (until netd exists); none when
    /// absent.
    #[serde(default)]
    pub bridge: Option<String>,
    /// Prefix of the TAP names this agent creates (1 to 6 characters).
    #[serde(default = "default_tap_prefix")]
    pub tap_prefix: String,
    /// cgroup parent under which the per-instance cgroups are created.
    #[serde(default = "default_cgroup_parent")]
    pub cgroup_parent: String,
    /// cgroup filesystem root.
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: PathBuf,
    /// A console log is trimmed to about this many bytes.
    #[serde(default = "default_console_limit")]
    pub console_limit_bytes: u64,
    /// Base kernel command line; an instance's extras are appended.
    #[serde(default = "default_cmdline")]
    pub kernel_cmdline: String,
    /// Memory allowed to a VMM process beyond its guest memory, in MiB.
    #[serde(default = "default_overhead")]
    pub vmm_overhead_mib: u64,
    /// Default graceful-stop timeout, in ms.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_ms: u32,
    /// Restart policy defaults.
    #[serde(default)]
    pub restart: RestartConfig,
    /// `FERRO_LOG` given to the VMMs (their only environment variable
    /// besides `PATH`).
    #[serde(default = "default_vmm_log")]
    pub vmm_log: String,
    /// The controller to heartbeat to, e.g. `http://10.0.0.1:7400`, or
    /// every node of an HA controller cluster separated by commas (a
    /// follower names the leader; a dead node is skipped); no heartbeats
    /// when absent.
    #[serde(default)]
    pub controller: Option<String>,
    /// No longer used (a host joins with `join_token` and keeps its own
    /// credential); refused with a message saying so.
    #[serde(default)]
    pub controller_api_key: Option<String>,
    /// The one-time token from `ferro hosts join <host_id>`: on its first
    /// start the agent trades it (with `controller`) for the host's
    /// credential and certificate, kept in `<state_dir>/credentials/`.
    /// Ignored once joined.
    #[serde(default)]
    pub join_token: Option<String>,
    /// This agent's server certificate (PEM), for an agent whose
    /// certificates an operator manages instead of joining; with
    /// `tls_key_file` and `client_ca_file`.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// The key of `tls_cert_file` (PEM).
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// The CA (PEM) whose client certificates may call this agent.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// The CA (PEM) that signed the controllers' certificates, for
    /// `https://` controller URLs; the system's roots when absent.
    #[serde(default)]
    pub controller_ca_file: Option<PathBuf>,
    /// How often to heartbeat, in ms (the controller may ask for another
    /// interval).
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_ms: u64,
    /// The URL the controller reaches this agent at; defaults to
    /// `https://<listen>` (an unspecified IP is replaced by the controller
    /// with the heartbeat's source address).
    #[serde(default)]
    pub advertise: Option<String>,
}

/// Restart policy defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartConfig {
    /// Policy of instances that do not name one.
    #[serde(default = "default_policy")]
    pub policy: RestartPolicy,
    /// First back-off delay, in ms; doubled per restart.
    #[serde(default = "default_backoff_base")]
    pub backoff_base_ms: u64,
    /// Largest back-off delay, in ms.
    #[serde(default = "default_backoff_max")]
    pub backoff_max_ms: u64,
    /// A VMM that ran this long resets the back-off, in ms.
    #[serde(default = "default_stable")]
    pub stable_after_ms: u64,
}

impl Default for RestartConfig {
    fn default() -> Self {
        Self {
            policy: default_policy(),
            backoff_base_ms: default_backoff_base(),
            backoff_max_ms: default_backoff_max(),
            stable_after_ms: default_stable(),
        }
    }
}

impl RestartConfig {
    /// The back-off parameters.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            base_ms: self.backoff_base_ms,
            max_ms: self.backoff_max_ms,
            stable_ms: self.stable_after_ms,
        }
    }
}

fn default_blockd_socket_dir() -> PathBuf {
    PathBuf::from("/var/lib/ferro-blockd/vhost")
}
fn default_reserved() -> u64 {
    1024
}
fn default_tap_prefix() -> String {
    "fc".into()
}
fn default_cgroup_parent() -> String {
    "ferro".into()
}
fn default_cgroup_root() -> PathBuf {
    PathBuf::from("/sys/fs/cgroup")
}
fn default_console_limit() -> u64 {
    1 << 20
}
fn default_cmdline() -> String {
    "console=ttyS0 reboot=k panic=1".into()
}
fn default_overhead() -> u64 {
    64
}
fn default_stop_timeout() -> u32 {
    10_000
}
fn default_policy() -> RestartPolicy {
    RestartPolicy::OnFailure
}
fn default_backoff_base() -> u64 {
    1000
}
fn default_backoff_max() -> u64 {
    60_000
}
fn default_stable() -> u64 {
    60_000
}
fn default_vmm_log() -> String {
    "warn".into()
}
fn default_heartbeat() -> u64 {
    1000
}

/// The URLs of a `controller` setting: separated by commas, trimmed.
fn split_urls(setting: &str) -> impl Iterator<Item = &str> {
    setting.split(',').map(str::trim).filter(|u| !u.is_empty())
}

impl AgentConfig {
    /// The controller URLs of `controller` (one URL, or several separated
    /// by commas), normalised; `None` without a controller.
    pub fn controllers(&self) -> Option<Vec<String>> {
        let c = self.controller.as_ref()?;
        Some(
            split_urls(c)
                .filter_map(|u| ferro_client::normalize_endpoint(u).ok())
                .collect(),
        )
    }

    /// Read and validate `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, line, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
                line,
            },
            ConfigError::Invalid(m) => ConfigError::InvalidIn(path.to_path_buf(), m),
            other => other,
        })
    }

    /// Parse and validate TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.message().replace('\n', " ").trim().to_string(),
            line: e
                .span()
                .map(|sp| text[..sp.start.min(text.len())].matches('\n').count() + 1),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        let h = &self.host_id;
        if !ferro_pki::valid_host_id(h) {
            return Err(ConfigError::Invalid(format!(
                "host_id {h:?}: must be 1 to 63 letters, digits and '-' (it names the host in its certificate)"
            )));
        }
        if self.controller_api_key.is_some() {
            return bad(
                "controller_api_key is no longer used: a host joins once with \
                 join_token = \"fj_...\" from `ferro hosts join <host_id>` and keeps \
                 its own credential in <state_dir>/credentials",
            );
        }
        let tls = [
            &self.tls_cert_file,
            &self.tls_key_file,
            &self.client_ca_file,
        ];
        let given = tls.iter().filter(|f| f.is_some()).count();
        if given != 0 && given != 3 {
            return bad("tls_cert_file, tls_key_file and client_ca_file go together");
        }
        for p in tls.into_iter().flatten() {
            if let Err(e) = std::fs::read_to_string(p) {
                return Err(ConfigError::Invalid(format!(
                    "cannot read {}: {e}",
                    p.display()
                )));
            }
        }
        if given == 3 && self.controller.is_some() {
            return bad(
                "tls_cert_file, tls_key_file and client_ca_file are for an agent without a \
                 controller; under a controller the host joins (join_token) and gets its \
                 certificate from the cluster CA",
            );
        }
        if self.join_token.is_some() && self.controller.is_none() {
            return bad("join_token needs controller (where to join)");
        }
        if self.vcpus == 0 || self.memory_mib == 0 {
            return bad("vcpus and memory_mib must be positive");
        }
        let p = &self.tap_prefix;
        if p.is_empty() || p.len() > 6 || !p.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return bad("tap_prefix must be 1 to 6 ASCII letters or digits");
        }
        if !self.state_dir.is_absolute() {
            return bad("state_dir must be an absolute path");
        }
        let len = self.state_dir.as_os_str().len();
        if len > MAX_STATE_DIR_LEN {
            return Err(ConfigError::Invalid(format!(
                "state_dir {} is {len} bytes, longer than {MAX_STATE_DIR_LEN} \
                 (control socket paths under it must fit a Unix socket address)",
                self.state_dir.display()
            )));
        }
        if let Some(c) = &self.controller {
            let urls: Vec<&str> = split_urls(c).collect();
            if urls.is_empty() {
                return bad("controller must name at least one URL");
            }
            for u in urls {
                let ok = (u.starts_with("http://") || u.starts_with("https://"))
                    && ferro_client::normalize_endpoint(u).is_ok();
                if !ok {
                    return Err(ConfigError::Invalid(format!(
                        "controller: {u:?} is not an http:// or https:// URL with a port"
                    )));
                }
            }
        }
        if let Some(p) = &self.controller_ca_file {
            if let Err(e) = std::fs::read_to_string(p) {
                return Err(ConfigError::Invalid(format!(
                    "controller_ca_file: cannot read {}: {e}",
                    p.display()
                )));
            }
        }
        if self.heartbeat_interval_ms == 0 {
            return bad("heartbeat_interval_ms must be positive");
        }
        if self.restart.backoff_base_ms == 0 {
            return bad("restart.backoff_base_ms must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        host_id = "h1"
        availability_zone = "az1"
        listen = "127.0.0.1:7420"
        state_dir = "/var/lib/ferro-agent"
        vcpus = 8
        memory_mib = 4096
        vmm_path = "/usr/bin/ferro-vmm"
    "#;

    #[test]
    fn minimal_config_takes_defaults() {
        let c = AgentConfig::parse(MINIMAL).unwrap();
        assert_eq!(c.tap_prefix, "fc");
        assert_eq!(c.restart.policy, RestartPolicy::OnFailure);
        assert_eq!(c.bridge, None);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let e = AgentConfig::parse(&format!("{MINIMAL}\nbogus = 1")).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }));
        let e = AgentConfig::parse(&MINIMAL.replace("vcpus = 8", "vcpus = 0")).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid(_)));
        let text = format!("{MINIMAL}\ntap_prefix = \"toolong7\"");
        assert!(AgentConfig::parse(&text).is_err());
    }

    #[test]
    fn errors_are_one_line_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("agent-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(&path, MINIMAL.replace("vcpus = 8", "")).unwrap();
        let e = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: ", path.display())), "{e}");
        assert!(
            e.contains("missing field `vcpus`") && !e.contains('\n'),
            "{e}"
        );
        std::fs::write(&path, MINIMAL.replace("vcpus = 8", "vcpus = 0")).unwrap();
        let e = AgentConfig::load(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: ", path.display())) && e.contains("vcpus"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_state_dir_too_long_for_socket_paths_is_refused() {
        let long = format!("/var/lib/{}", "x".repeat(30));
        let e = AgentConfig::parse(&MINIMAL.replace("/var/lib/ferro-agent", &long)).unwrap_err();
        assert!(e.to_string().contains("longer than 32"), "{e}");
    }

    #[test]
    fn several_controllers_are_listed() {
        let c = AgentConfig::parse(&format!(
            "{MINIMAL}\ncontroller = \" http://a:1 , https://b:2/,,\""
        ))
        .unwrap();
        assert_eq!(c.controllers().unwrap(), vec!["http://a:1", "https://b:2"]);
        let e = AgentConfig::parse(&format!("{MINIMAL}\ncontroller = \"http://a\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("with a port"), "{e}");
        let e = AgentConfig::parse(&format!("{MINIMAL}\ncontroller = \" , \""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least one URL"), "{e}");
    }

    #[test]
    fn hosts_join_instead_of_sharing_a_key() {
        let text = format!("{MINIMAL}\ncontroller = \"http://127.0.0.1:7400\"");
        let c = AgentConfig::parse(&text).unwrap();
        assert_eq!(c.heartbeat_interval_ms, 1000);
        let e = AgentConfig::parse(&format!("{text}\ncontroller_api_key = \"fk_x\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("join_token") && e.contains("ferro hosts join"),
            "{e}"
        );
        let c = AgentConfig::parse(&format!("{text}\njoin_token = \"fj_x\"")).unwrap();
        assert_eq!(c.join_token.as_deref(), Some("fj_x"));
        let e = AgentConfig::parse(&format!("{MINIMAL}\njoin_token = \"fj_x\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs controller"), "{e}");
        let e = AgentConfig::parse(&format!("{MINIMAL}\ntls_cert_file = \"/etc/hostname\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("go together"), "{e}");
        for bad in ["h_1", "h.1", "-h", ""] {
            let e = AgentConfig::parse(&MINIMAL.replace("\"h1\"", &format!("{bad:?}")))
                .unwrap_err()
                .to_string();
            assert!(e.contains("host_id"), "{bad}: {e}");
        }
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.example.toml");
        AgentConfig::load(&path).unwrap();
    }
}
