//! The data directory of `ferro up` and the configuration files it writes
//! for the controller and the agent.
//!
//! ```text
//! <data>/controller.toml   <data>/controller/   the controller's state
//!                          <data>/controller/admin.key (made at bootstrap)
//! <data>/agent.toml        <data>/agent/        the agent's state_dir
//! <data>/client.toml       endpoint and admin key for `ferro --config`
//! <data>/logs/{controller,agent}.log
//! ```
//!
//! Host resources get names derived from the data directory, so two
//! all-in-ones (or an all-in-one and a real agent) never touch each
//! other's TAPs and cgroups: TAP prefix `fu<4 hex>`, cgroup parent
//! `ferro-up-<8 hex>`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The agent's state_dir must fit control socket paths in `sun_path`.
const MAX_STATE_DIR: usize = 32;

/// Problems with the data directory.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A directory could not be created.
    #[error("cannot create {}", .0.display())]
    Create(PathBuf, #[source] std::io::Error),
    /// A file could not be read.
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    /// A file could not be written.
    #[error("cannot write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    /// The agent's state directory would be too long.
    #[error("--data-dir: {} is too long: the agent's state directory {} must be at most {MAX_STATE_DIR} bytes", .0.display(), .1.display())]
    TooLong(PathBuf, PathBuf),
    /// No free local port.
    #[error("cannot find a free local port")]
    Port(#[source] std::io::Error),
}

/// Everything `ferro up` places under the data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The data directory, absolute.
    pub root: PathBuf,
    /// Controller gRPC address.
    pub controller_addr: SocketAddr,
    /// Agent gRPC address.
    pub agent_addr: SocketAddr,
    /// The controller's EC2 Query endpoint.
    pub ec2_addr: SocketAddr,
    /// TAP name prefix (at most 6 characters).
    pub tap_prefix: String,
    /// cgroup parent of the instances.
    pub cgroup_parent: String,
    /// netd's device name prefix and VXLAN port (its own, so it never
    /// takes another netd's devices on this machine for stale ones).
    pub netd_prefix: String,
    /// See `netd_prefix`.
    pub vxlan_port: u16,
}

impl Layout {
    /// The layout for `root` with free loopback ports.
    pub fn new(root: &Path) -> Result<Self, FilesError> {
        Self::with_listen(root, "127.0.0.1:0".parse().expect("a socket address"))
    }

    /// The layout for `root`, the controller on `listen` (port 0: a free
    /// one), the agent on a free loopback port.
    pub fn with_listen(root: &Path, listen: SocketAddr) -> Result<Self, FilesError> {
        let root = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
        let (tap_prefix, cgroup_parent) = host_names(&root);
        let hash = fnv1a(root.as_os_str().as_encoded_bytes());
        let netd_prefix = format!("u{:02x}", (hash >> 16) & 0xff);
        let vxlan_port = 20000 + (hash % 10000) as u16;
        let controller_addr = if listen.port() == 0 {
            free_port_on(listen.ip())?
        } else {
            listen
        };
        let layout = Self {
            controller_addr,
            agent_addr: free_port()?,
            ec2_addr: free_port_on(listen.ip())?,
            tap_prefix,
            cgroup_parent,
            netd_prefix,
            vxlan_port,
            root,
        };
        let state = layout.agent_state_dir();
        if state.as_os_str().len() > MAX_STATE_DIR {
            return Err(FilesError::TooLong(layout.root, state));
        }
        Ok(layout)
    }

    /// The controller's state directory.
    pub fn controller_dir(&self) -> PathBuf {
        self.root.join("controller")
    }
    /// The agent's state directory.
    pub fn agent_state_dir(&self) -> PathBuf {
        self.root.join("agent")
    }
    /// ferro-blockd's data directory (replicas, and the vhost-user
    /// sockets in `vhost/`).
    pub fn blockd_dir(&self) -> PathBuf {
        self.root.join("blockd")
    }
    /// The key the agent's join brought, which blockd speaks for the host
    /// with.
    pub fn host_key(&self) -> PathBuf {
        self.agent_state_dir().join("credentials").join("host.key")
    }
    /// The admin API key the controller writes when it bootstraps.
    pub fn admin_key(&self) -> PathBuf {
        self.controller_dir().join("admin.key")
    }
    /// The controller's config file.
    pub fn controller_config(&self) -> PathBuf {
        self.root.join("controller.toml")
    }
    /// netd's config file.
    pub fn netd_config(&self) -> PathBuf {
        self.root.join("netd.toml")
    }
    /// The demo key pair's private key.
    pub fn demo_key(&self) -> PathBuf {
        self.root.join("ferro-up.key")
    }
    /// The agent's config file.
    pub fn agent_config(&self) -> PathBuf {
        self.root.join("agent.toml")
    }
    /// A client config for `ferro --config`.
    pub fn client_config(&self) -> PathBuf {
        self.root.join("client.toml")
    }
    /// Log files.
    pub fn log(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(format!("{name}.log"))
    }
    /// The controller's endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.controller_addr)
    }

    /// The EC2 endpoint's URL.
    pub fn ec2_endpoint(&self) -> String {
        format!("http://{}", self.ec2_addr)
    }

    /// The EC2 credentials `ferro up` made (shell `KEY=value` lines for
    /// the AWS clients).
    pub fn ec2_env(&self) -> PathBuf {
        self.root.join("ec2.env")
    }

    /// Creates the directories.
    pub fn create_dirs(&self) -> Result<(), FilesError> {
        for d in [
            self.root.clone(),
            self.controller_dir(),
            self.agent_state_dir(),
            self.blockd_dir(),
            self.root.join("logs"),
        ] {
            std::fs::create_dir_all(&d).map_err(|e| FilesError::Create(d.clone(), e))?;
        }
        Ok(())
    }
}

/// The TAP prefix and cgroup parent of the all-in-one in `root` (an
/// absolute path): `fu<4 hex>` and `ferro-up-<8 hex>` of its FNV-1a hash.
pub fn host_names(root: &Path) -> (String, String) {
    let hash = fnv1a(root.as_os_str().as_encoded_bytes());
    (
        format!("fu{:04x}", hash & 0xffff),
        format!("ferro-up-{:08x}", hash as u32),
    )
}

/// The cgroup directories named `parent` in the v2 root and the usual v1
/// hierarchies.
pub fn cgroup_dirs(parent: &str) -> Vec<PathBuf> {
    ["", "cpu", "cpu,cpuacct", "memory", "pids"]
        .iter()
        .map(|h| Path::new("/sys/fs/cgroup").join(h).join(parent))
        .collect()
}

/// TOML string literal (basic string with escapes).
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The all-in-one's host id.
pub const AIO_HOST_ID: &str = "aio-host-1";

/// The agent's configuration for the all-in-one: it joins the local
/// controller with `join_token` (then heartbeats with its own credential),
/// has no bridge (the TAPs stay unattached) and host resource names tied
/// to the data directory.
pub fn agent_toml(
    l: &Layout,
    vmm: &Path,
    vcpus: u32,
    memory_mib: u64,
    volume_gib: u64,
    join_token: &str,
) -> String {
    let volumes = if volume_gib == 0 {
        String::new()
    } else {
        format!(
            "volume_capacity_gib = {volume_gib}\nblockd_socket_dir = {}\n",
            toml_str(&l.blockd_dir().join("vhost").display().to_string())
        )
    };
    format!(
        "# Written by `ferro up`.\n\
         host_id = \"{AIO_HOST_ID}\"\n\
         availability_zone = \"az-1\"\n\
         listen = \"{agent}\"\n\
         state_dir = {state}\n\
         vcpus = {vcpus}\n\
         memory_mib = {memory_mib}\n\
         reserved_memory_mib = 256\n\
         vmm_path = {vmm}\n\
         tap_prefix = \"{tap}\"\n\
         cgroup_parent = \"{cg}\"\n\
         controller = \"{controller}\"\n\
         join_token = {key}\n\
         {volumes}",
        agent = l.agent_addr,
        state = toml_str(&l.agent_state_dir().display().to_string()),
        vmm = toml_str(&vmm.display().to_string()),
        tap = l.tap_prefix,
        cg = l.cgroup_parent,
        controller = l.endpoint(),
        key = toml_str(join_token),
    )
}

/// netd's configuration for the all-in-one: the agent's credentials, the
/// loopback as its underlay (there is no other host), its own names.
pub fn netd_toml(l: &Layout) -> String {
    format!(
        "# Written by `ferro up`.\n\
         host_id = \"{AIO_HOST_ID}\"\n\
         controllers = [\"{controller}\"]\n\
         underlay_ip = \"127.0.0.1\"\n\
         credentials_dir = {creds}\n\
         name_prefix = \"{prefix}\"\n\
         vxlan_port = {port}\n",
        controller = l.endpoint(),
        creds = toml_str(
            &l.agent_state_dir()
                .join("credentials")
                .display()
                .to_string()
        ),
        prefix = l.netd_prefix,
        port = l.vxlan_port,
    )
}

/// The controller's configuration for the all-in-one: one node (no
/// peers), one zone. It makes the admin key itself ([`Layout::admin_key`]).
pub fn controller_toml(l: &Layout) -> String {
    format!(
        "# Written by `ferro up`.\n\
         node_id = 1\n\
         listen = \"{addr}\"\n\
         data_dir = {dir}\n\
         region = \"local\"\n\
         availability_zones = [\"az-1\"]\n\
         ec2_listen = \"{ec2}\"\n\
         # One host: a volume's one replica is all it can hold.\n\
         default_volume_type = \"single\"\n",
        addr = l.controller_addr,
        ec2 = l.ec2_addr,
        dir = toml_str(&l.controller_dir().display().to_string()),
    )
}

/// The client config pointing at the all-in-one.
pub fn client_toml(l: &Layout, api_key: &str) -> String {
    format!(
        "endpoint = \"{}\"\napi_key = {}\n",
        l.endpoint(),
        toml_str(api_key)
    )
}

/// Writes `text` to `path`, readable only by the owner (it holds a key).
pub fn write_private(path: &Path, text: &str) -> Result<(), FilesError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e| FilesError::Write(path.to_path_buf(), e);
    let mut f = std::fs::File::options()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

fn free_port() -> Result<SocketAddr, FilesError> {
    free_port_on(std::net::Ipv4Addr::LOCALHOST.into())
}

fn free_port_on(ip: std::net::IpAddr) -> Result<SocketAddr, FilesError> {
    let l = std::net::TcpListener::bind((ip, 0)).map_err(FilesError::Port)?;
    l.local_addr().map_err(FilesError::Port)
}

/// FNV-1a, 64 bits.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_derive_from_the_data_dir() {
        let a = Layout::new(Path::new("/var/lib/ferro")).unwrap();
        let b = Layout::new(Path::new("/tmp/ferro-x")).unwrap();
        assert_ne!(a.tap_prefix, b.tap_prefix);
        assert!(a.tap_prefix.len() <= 6 && a.tap_prefix.starts_with("fu"));
        assert!(a.cgroup_parent.starts_with("ferro-up-"));
        assert_eq!(a.agent_state_dir(), Path::new("/var/lib/ferro/agent"));
        assert_ne!(a.controller_addr, a.agent_addr);
    }

    #[test]
    fn too_long_data_dir_is_refused() {
        let e = Layout::new(Path::new("/tmp/a/very/long/data/directory/indeed")).unwrap_err();
        assert!(e.to_string().starts_with("--data-dir: "), "{e}");
    }

    #[test]
    fn files_are_valid_toml() {
        let l = Layout::new(Path::new("/tmp/ferro \"q\"")).unwrap();
        for text in [
            agent_toml(&l, Path::new("/x/ferro-vmm"), 2, 1024, 0, "fk_1"),
            agent_toml(&l, Path::new("/x/ferro-vmm"), 2, 1024, 20, "fk_1"),
            controller_toml(&l),
            client_toml(&l, "fk_1"),
        ] {
            let v: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert!(!v.is_empty());
        }
        let c = crate::config::parse_file(Path::new("c"), &client_toml(&l, "fk_1")).unwrap();
        assert_eq!(c.endpoint.unwrap(), l.endpoint());
    }
}
