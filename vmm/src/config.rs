//! VM configuration: from command-line flags and/or one TOML file, validated
//! before anything is created.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Fewest vCPUs.
pub const MIN_VCPUS: u8 = 1;
/// Most vCPUs.
pub const MAX_VCPUS: u8 = 32;
/// Smallest guest: room for the boot structures, ACPI and a small kernel.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Largest guest this VMM accepts.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Most disks and NICs together: PCI bus 0 has 31 device slots after the
/// host bridge, and virtio-rng takes one.
pub const MAX_DEVICES: usize = 30;
/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Errors in the configuration, each naming what was wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {0}: {1}")]
    File(String, String),
    /// The config file is not valid TOML for this schema.
    #[error("invalid config file {0}: {1}")]
    Parse(String, String),
    /// vCPU count out of range.
    #[error("vcpus must be between {MIN_VCPUS} and {MAX_VCPUS}, got {0}")]
    Vcpus(u64),
    /// Memory size out of range.
    #[error("memory must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB, got {0} MiB")]
    Memory(u64),
    /// No kernel given.
    #[error("no kernel given (--kernel or `kernel` in the config file)")]
    NoKernel,
    /// A `key=value` list could not be parsed.
    #[error("invalid {what} `{spec}`: {why}")]
    Spec {
        /// `--disk` or `--net`.
        what: &'static str,
        /// The offending text.
        spec: String,
        /// What is wrong with it.
        why: String,
    },
    /// A MAC address could not be parsed.
    #[error("invalid MAC address `{0}` (want six hex bytes separated by colons, unicast)")]
    Mac(String),
    /// Too many devices.
    #[error("at most {MAX_DEVICES} disks and NICs together, got {0}")]
    TooManyDevices(usize),
    /// Two disks share an id.
    #[error("disk id `{0}` is used twice")]
    DuplicateDiskId(String),
    /// More than one vhost-user-blk disk says boot=on.
    #[error("at most one --vhost-user-blk may say boot=on")]
    TwoBootDisks,
    /// A disk id is too long for virtio-blk GET_ID.
    #[error("disk id `{0}` is longer than 20 bytes")]
    DiskIdTooLong(String),
    /// A TAP name is empty or too long.
    #[error("TAP name `{0}` must be 1 to 15 bytes")]
    TapName(String),
    /// Serial sink not understood.
    #[error("invalid serial sink `{0}` (want stdout, null or file:PATH)")]
    Serial(String),
    /// The system UUID is not one.
    #[error("invalid system UUID `{0}` (want 8-4-4-4-12 hex digits)")]
    SystemUuid(String),
}

/// One disk.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Backing file (raw).
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub readonly: bool,
    /// Serial returned by GET_ID (at most 20 bytes); defaults to `diskN`.
    #[serde(default)]
    pub id: Option<String>,
}

/// One disk served by a vhost-user-blk backend (such as `ferro-blockd`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VhostUserBlkConfig {
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// Device id for logs (at most 20 bytes, unique among disks); the
    /// guest sees the serial the backend answers to GET_ID.
    pub id: String,
    /// The boot disk: first on the PCI bus, before the file disks (so a
    /// Linux guest names it `/dev/vda`). At most one.
    #[serde(default)]
    pub boot: bool,
}

/// One NIC.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Host TAP interface name.
    pub tap: String,
    /// Guest MAC address; derived from the TAP name when absent.
    #[serde(default)]
    pub mac: Option<String>,
}

/// Where the serial console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialSink {
    /// The VMM's standard output.
    Stdout,
    /// Discarded.
    Null,
    /// Appended to a file.
    File(PathBuf),
}

impl SerialSink {
    /// Parse `stdout`, `null` or `file:PATH`.
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "null" => Ok(Self::Null),
            _ => s
                .strip_prefix("file:")
                .filter(|p| !p.is_empty())
                .map(|p| Self::File(PathBuf::from(p)))
                .ok_or_else(|| ConfigError::Serial(s.to_string())),
        }
    }
}

/// The TOML file's schema (every field optional; flags override).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// vCPUs.
    pub vcpus: Option<u64>,
    /// Memory in MiB.
    pub memory_mib: Option<u64>,
    /// Kernel image.
    pub kernel: Option<PathBuf>,
    /// Initrd image.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// Disks.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// NICs.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// vhost-user-blk disks.
    #[serde(default)]
    pub vhost_user_blks: Vec<VhostUserBlkConfig>,
    /// Serial sink (`stdout`, `null`, `file:PATH`).
    pub serial: Option<String>,
    /// Control socket path.
    pub control_socket: Option<PathBuf>,
    /// The SMBIOS system UUID (and serial number).
    pub system_uuid: Option<String>,
}

/// A validated VM configuration.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// vCPUs.
    pub vcpus: u8,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd image.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Disks, with ids filled in.
    pub disks: Vec<DiskConfig>,
    /// NICs, with MACs filled in.
    pub nets: Vec<(String, [u8; 6])>,
    /// vhost-user-blk disks; any of them puts guest RAM in memfds.
    pub vhost_user_blks: Vec<VhostUserBlkConfig>,
    /// Serial sink.
    pub serial: SerialSink,
    /// Control socket path.
    pub control_socket: Option<PathBuf>,
    /// Install seccomp filters (on unless debugging).
    pub seccomp: bool,
    /// The SMBIOS system UUID, also the serial number.
    pub system_uuid: Option<crate::smbios::SystemUuid>,
}

/// Read a TOML config file.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::File(name.clone(), e.to_string()))?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse(name, e.message().to_string()))
}

fn split_spec<'a>(
    what: &'static str,
    spec: &'a str,
    keys: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    let bad = |why: String| ConfigError::Spec {
        what,
        spec: spec.to_string(),
        why,
    };
    spec.split(',')
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("`{kv}` is not key=value")))?;
            if !keys.contains(&k) {
                return Err(bad(format!(
                    "unknown key `{k}` (known: {})",
                    keys.join(", ")
                )));
            }
            Ok((k, v))
        })
        .collect()
}

fn parse_bool(what: &'static str, spec: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::Spec {
            what,
            spec: spec.to_string(),
            why: format!("`{v}` is not on/off"),
        }),
    }
}

/// Parse `--disk path=F[,ro=on][,id=SERIAL]`.
pub fn parse_disk(spec: &str) -> Result<DiskConfig, ConfigError> {
    let mut disk = DiskConfig {
        path: PathBuf::new(),
        readonly: false,
        id: None,
    };
    for (k, v) in split_spec("--disk", spec, &["path", "ro", "readonly", "id"])? {
        match k {
            "path" => disk.path = PathBuf::from(v),
            "id" => disk.id = Some(v.to_string()),
            _ => disk.readonly = parse_bool("--disk", spec, v)?,
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err(ConfigError::Spec {
            what: "--disk",
            spec: spec.to_string(),
            why: "missing path=".into(),
        });
    }
    Ok(disk)
}

/// Parse `--vhost-user-blk socket=PATH,id=ID[,boot=on]`.
pub fn parse_vhost_user_blk(spec: &str) -> Result<VhostUserBlkConfig, ConfigError> {
    const WHAT: &str = "--vhost-user-blk";
    let (mut socket, mut id, mut boot) = (None, None, false);
    for (k, v) in split_spec(WHAT, spec, &["socket", "id", "boot"])? {
        match k {
            "socket" => socket = Some(PathBuf::from(v)),
            "boot" => boot = parse_bool(WHAT, spec, v)?,
            _ => id = Some(v.to_string()),
        }
    }
    let missing = |key: &str| ConfigError::Spec {
        what: WHAT,
        spec: spec.to_string(),
        why: format!("missing {key}="),
    };
    Ok(VhostUserBlkConfig {
        socket: socket
            .filter(|s| !s.as_os_str().is_empty())
            .ok_or_else(|| missing("socket"))?,
        id: id.filter(|i| !i.is_empty()).ok_or_else(|| missing("id"))?,
        boot,
    })
}

/// Parse `--net tap=NAME[,mac=AA:BB:CC:DD:EE:FF]`.
pub fn parse_net(spec: &str) -> Result<NetConfig, ConfigError> {
    let mut net = NetConfig {
        tap: String::new(),
        mac: None,
    };
    for (k, v) in split_spec("--net", spec, &["tap", "mac"])? {
        match k {
            "tap" => net.tap = v.to_string(),
            _ => net.mac = Some(v.to_string()),
        }
    }
    Ok(net)
}

/// Parse a unicast MAC address.
pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    let parts: Vec<&str> = s.split(':').collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        return Err(ConfigError::Mac(s.to_string()));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(ConfigError::Mac(s.to_string()));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| ConfigError::Mac(s.to_string()))?;
    }
    if mac[0] & 1 != 0 {
        return Err(ConfigError::Mac(s.to_string()));
    }
    Ok(mac)
}

/// A stable, locally administered MAC derived from a TAP name.
pub fn mac_for(tap: &str) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in tap.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    [0x06, 0xfe, b[0], b[1], b[2], b[3]]
}

/// Inputs to [`VmConfig::build`]: the file (if any) and flags (which win).
#[derive(Debug, Default)]
pub struct Overrides {
    /// `--vcpus`.
    pub vcpus: Option<u64>,
    /// `--memory` (MiB).
    pub memory_mib: Option<u64>,
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initrd`.
    pub initrd: Option<PathBuf>,
    /// `--cmdline`.
    pub cmdline: Option<String>,
    /// `--disk`, already parsed.
    pub disks: Vec<DiskConfig>,
    /// `--net`, already parsed.
    pub nets: Vec<NetConfig>,
    /// `--vhost-user-blk`, already parsed.
    pub vhost_user_blks: Vec<VhostUserBlkConfig>,
    /// `--serial`.
    pub serial: Option<String>,
    /// `--control-socket`.
    pub control_socket: Option<PathBuf>,
    /// `--no-seccomp`.
    pub no_seccomp: bool,
    /// `--system-uuid`.
    pub system_uuid: Option<String>,
}

impl VmConfig {
    /// Merge `file` and `flags` (flags win; lists add up) and validate.
    pub fn build(file: FileConfig, flags: Overrides) -> Result<Self, ConfigError> {
        let vcpus = flags.vcpus.or(file.vcpus).unwrap_or(1);
        if !(u64::from(MIN_VCPUS)..=u64::from(MAX_VCPUS)).contains(&vcpus) {
            return Err(ConfigError::Vcpus(vcpus));
        }
        let memory_mib = flags.memory_mib.or(file.memory_mib).unwrap_or(128);
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(ConfigError::Memory(memory_mib));
        }
        let kernel = flags.kernel.or(file.kernel).ok_or(ConfigError::NoKernel)?;
        let mut disks = file.disks;
        disks.extend(flags.disks);
        let mut nets_in = file.nets;
        nets_in.extend(flags.nets);
        let mut vhost_user_blks = file.vhost_user_blks;
        vhost_user_blks.extend(flags.vhost_user_blks);
        let count = disks.len() + nets_in.len() + vhost_user_blks.len();
        if count > MAX_DEVICES {
            return Err(ConfigError::TooManyDevices(count));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in disks.iter_mut().enumerate() {
            let id = d.id.get_or_insert_with(|| format!("disk{i}")).clone();
            if id.len() > 20 {
                return Err(ConfigError::DiskIdTooLong(id));
            }
            if !seen.insert(id.clone()) {
                return Err(ConfigError::DuplicateDiskId(id));
            }
        }
        if vhost_user_blks.iter().filter(|v| v.boot).count() > 1 {
            return Err(ConfigError::TwoBootDisks);
        }
        for v in &vhost_user_blks {
            if v.id.len() > 20 {
                return Err(ConfigError::DiskIdTooLong(v.id.clone()));
            }
            if !seen.insert(v.id.clone()) {
                return Err(ConfigError::DuplicateDiskId(v.id.clone()));
            }
        }
        let mut nets = Vec::new();
        for n in nets_in {
            if n.tap.is_empty() || n.tap.len() > 15 {
                return Err(ConfigError::TapName(n.tap));
            }
            let mac = match &n.mac {
                Some(m) => parse_mac(m)?,
                None => mac_for(&n.tap),
            };
            nets.push((n.tap, mac));
        }
        let serial =
            SerialSink::parse(flags.serial.or(file.serial).as_deref().unwrap_or("stdout"))?;
        let system_uuid = flags
            .system_uuid
            .or(file.system_uuid)
            .map(|u| crate::smbios::SystemUuid::parse(&u).map_err(|_| ConfigError::SystemUuid(u)))
            .transpose()?;
        Ok(Self {
            vcpus: vcpus as u8,
            memory_mib,
            kernel,
            initrd: flags.initrd.or(file.initrd),
            cmdline: flags
                .cmdline
                .or(file.cmdline)
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            disks,
            nets,
            vhost_user_blks,
            serial,
            control_socket: flags.control_socket.or(file.control_socket),
            seccomp: !flags.no_seccomp,
            system_uuid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Overrides {
        Overrides {
            kernel: Some("/k".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_system_uuid_is_checked_and_the_flag_wins() {
        let mut f = flags();
        f.system_uuid = Some("ec2-nope".into());
        assert_eq!(
            VmConfig::build(FileConfig::default(), f).unwrap_err(),
            ConfigError::SystemUuid("ec2-nope".into())
        );
        let file = FileConfig {
            system_uuid: Some("00000000-0000-0000-0000-000000000001".into()),
            ..Default::default()
        };
        let mut f = flags();
        f.system_uuid = Some("EC200000-0000-0000-0000-000000000002".into());
        let c = VmConfig::build(file, f).unwrap();
        let want = crate::smbios::SystemUuid::parse("ec200000-0000-0000-0000-000000000002");
        assert_eq!(c.system_uuid, Some(want.unwrap()));
    }

    #[test]
    fn ranges_are_checked() {
        let mut f = flags();
        f.vcpus = Some(0);
        assert_eq!(
            VmConfig::build(FileConfig::default(), f).unwrap_err(),
            ConfigError::Vcpus(0)
        );
        let mut f = flags();
        f.vcpus = Some(33);
        assert!(VmConfig::build(FileConfig::default(), f).is_err());
        let mut f = flags();
        f.memory_mib = Some(8);
        assert_eq!(
            VmConfig::build(FileConfig::default(), f).unwrap_err(),
            ConfigError::Memory(8)
        );
        assert_eq!(
            VmConfig::build(FileConfig::default(), Overrides::default()).unwrap_err(),
            ConfigError::NoKernel
        );
    }

    #[test]
    fn disk_and_net_specs() {
        let d = parse_disk("path=/a.img,ro=on,id=data").unwrap();
        assert_eq!((d.readonly, d.id.as_deref()), (true, Some("data")));
        assert!(parse_disk("ro=on")
            .unwrap_err()
            .to_string()
            .contains("missing path"));
        assert!(parse_disk("path=/a,bogus=1")
            .unwrap_err()
            .to_string()
            .contains("unknown key"));
        assert!(parse_disk("path=/a,ro=maybe").is_err());
        let n = parse_net("tap=tap0,mac=02:00:00:00:00:01").unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(parse_mac("02:00:00:00:00:01").unwrap(), [2, 0, 0, 0, 0, 1]);
        assert!(parse_mac("01:00:00:00:00:01").is_err(), "multicast");
        assert!(parse_mac("zz:00:00:00:00:01").is_err());
        assert!(parse_mac("02:00:00:00:00").is_err());
        assert_eq!(mac_for("tap0")[0] & 3, 2, "locally administered unicast");
    }

    #[test]
    fn ids_filled_and_unique() {
        let mut f = flags();
        f.disks = vec![
            parse_disk("path=/a").unwrap(),
            parse_disk("path=/b").unwrap(),
        ];
        let c = VmConfig::build(FileConfig::default(), f).unwrap();
        assert_eq!(c.disks[1].id.as_deref(), Some("disk1"));
        let mut f = flags();
        f.disks = vec![
            parse_disk("path=/a,id=x").unwrap(),
            parse_disk("path=/b,id=x").unwrap(),
        ];
        assert_eq!(
            VmConfig::build(FileConfig::default(), f).unwrap_err(),
            ConfigError::DuplicateDiskId("x".into())
        );
    }

    #[test]
    fn vhost_user_blk_specs() {
        let v = parse_vhost_user_blk("socket=/run/v.sock,id=vol1").unwrap();
        assert_eq!(
            (v.socket.to_str(), v.id.as_str()),
            (Some("/run/v.sock"), "vol1")
        );
        let err = |s: &str| parse_vhost_user_blk(s).unwrap_err().to_string();
        assert!(err("id=v").contains("missing socket="), "{}", err("id=v"));
        assert!(err("socket=/s").contains("missing id="));
        assert!(err("socket=/s,id=").contains("missing id="));
        assert!(err("socket=/s,id=v,ro=on").contains("unknown key `ro`"));
        assert!(err("socket=/s,id=v,boot=maybe").contains("`maybe` is not on/off"));
        assert!(parse_vhost_user_blk("socket=/s,id=v,boot=on").unwrap().boot);
        let mut f = flags();
        f.vhost_user_blks = vec![
            parse_vhost_user_blk("socket=/s,id=a,boot=on").unwrap(),
            parse_vhost_user_blk("socket=/t,id=b,boot=on").unwrap(),
        ];
        assert_eq!(
            VmConfig::build(FileConfig::default(), f).unwrap_err(),
            ConfigError::TwoBootDisks
        );
        let mut f = flags();
        f.disks = vec![parse_disk("path=/a,id=x").unwrap()];
        f.vhost_user_blks = vec![parse_vhost_user_blk("socket=/s,id=x").unwrap()];
        assert_eq!(
            VmConfig::build(FileConfig::default(), f).unwrap_err(),
            ConfigError::DuplicateDiskId("x".into())
        );
    }

    #[test]
    fn toml_file_and_unknown_fields() {
        let file: FileConfig = toml::from_str(
            "vcpus = 2\nmemory_mib = 256\nkernel = \"/k\"\n[[disks]]\npath = \"/d\"\nreadonly = true\n",
        )
        .unwrap();
        let c = VmConfig::build(file, Overrides::default()).unwrap();
        assert_eq!((c.vcpus, c.memory_mib, c.disks.len()), (2, 256, 1));
        assert!(toml::from_str::<FileConfig>("vcpu = 2\n").is_err());
    }

    #[test]
    fn serial_sinks() {
        assert_eq!(SerialSink::parse("stdout").unwrap(), SerialSink::Stdout);
        assert_eq!(
            SerialSink::parse("file:/tmp/x").unwrap(),
            SerialSink::File("/tmp/x".into())
        );
        assert!(SerialSink::parse("file:").is_err());
        assert!(SerialSink::parse("tty").is_err());
    }
}
