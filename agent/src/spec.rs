//! An instance's spec, validated, as the agent persists it.

use serde::{Deserialize, Serialize};

use crate::machine::RestartPolicy;

/// Largest vCPU count ferro-vmm accepts.
pub const MAX_VCPUS: u32 = 32;
/// Smallest guest memory ferro-vmm accepts, in MiB.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Largest user-data, in bytes.
pub const MAX_USER_DATA: usize = 16 * 1024;
/// Largest extra disk, in bytes.
pub const MAX_DISK_BYTES: u64 = 1 << 40;
/// ferro-vmm's limit on disks plus NICs (PCI slots left).
pub const MAX_DEVICES: usize = 30;

/// Why a spec is refused (`INVALID_ARGUMENT`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// Bad instance id.
    #[error("instance id must be 1 to 64 of [A-Za-z0-9_-]: {0:?}")]
    Id(String),
    /// vCPUs out of range.
    #[error("vcpus must be 1 to {MAX_VCPUS}, got {0}")]
    Vcpus(u32),
    /// Memory too small.
    #[error("memory_mib must be at least {MIN_MEMORY_MIB}, got {0}")]
    Memory(u64),
    /// No image named.
    #[error("image_id is empty")]
    NoImage,
    /// Bad disk.
    #[error("disk {index}: {problem}")]
    Disk {
        /// Position in the spec.
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// Bad MAC.
    #[error("nic {index}: invalid MAC {mac:?} (want a unicast aa:bb:cc:dd:ee:ff)")]
    Mac {
        /// Position in the spec.
        index: usize,
        /// The value given.
        mac: String,
    },
    /// Too many devices.
    #[error("at most {MAX_DEVICES} disks, volumes and NICs in total")]
    TooManyDevices,
    /// User data too large.
    #[error("user_data is {0} bytes, more than {MAX_USER_DATA}")]
    UserData(usize),
    /// Bad attached volume.
    #[error("volume {index}: {problem}")]
    Volume {
        /// Position in the request.
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// Bad root volume id.
    #[error("root_volume_id {0:?} is not vol- and 16 hex digits")]
    RootVolume(String),
    /// Command line extras that would break the VMM's command line.
    #[error("cmdline_extra must be printable ASCII without newlines")]
    Cmdline,
}

/// A blank extra disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Serial the guest sees.
    pub id: String,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// A volume attached for a start: served by this host's ferro-blockd on
/// its vhost-user socket, given to the VMM as a vhost-user-blk disk whose
/// serial is the volume id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedVolume {
    /// The volume (`vol-` and 16 hex digits).
    pub volume_id: String,
    /// Its device name, `/dev/vdb` to `/dev/vdz`; `/dev/vda` for the
    /// instance's root volume.
    pub device: String,
}

/// The device name of a root volume.
pub const ROOT_DEVICE: &str = "/dev/vda";

/// Check the volumes of a start of `spec`, the first problem wins; the
/// checked list comes back in device order (the order the guest sees).
pub fn check_volumes(
    spec: &InstanceSpec,
    mut volumes: Vec<AttachedVolume>,
) -> Result<Vec<AttachedVolume>, SpecError> {
    let root = spec.root_volume_id.as_str();
    for (index, v) in volumes.iter().enumerate() {
        let letter = v.device.strip_prefix("/dev/vd").map(str::as_bytes);
        let is_root = !root.is_empty() && v.volume_id == root;
        let problem = if !ferro_proto::is_volume_id(&v.volume_id) {
            format!("volume_id {:?} is not vol- and 16 hex digits", v.volume_id)
        } else if is_root && v.device != ROOT_DEVICE {
            format!(
                "the root volume {} must be {ROOT_DEVICE}, not {:?}",
                v.volume_id, v.device
            )
        } else if !is_root && !matches!(letter, Some([b'b'..=b'z'])) {
            format!("device {:?} is not one of /dev/vdb to /dev/vdz", v.device)
        } else if volumes[..index].iter().any(|o| o.volume_id == v.volume_id) {
            format!("volume {} is given twice", v.volume_id)
        } else if volumes[..index].iter().any(|o| o.device == v.device) {
            format!("device {} is given twice", v.device)
        } else {
            continue;
        };
        return Err(SpecError::Volume { index, problem });
    }
    if !root.is_empty() && !volumes.iter().any(|v| v.volume_id == root) {
        return Err(SpecError::Volume {
            index: volumes.len(),
            problem: format!("the root volume {root} is missing: the instance boots from it"),
        });
    }
    if spec.disks.len() + spec.nics.len() + volumes.len() + 2 > MAX_DEVICES {
        return Err(SpecError::TooManyDevices);
    }
    volumes.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(volumes)
}

/// An instance's size and user data: what a start of a stopped instance
/// may change (the controller's ModifyInstanceAttribute).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resources {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Data given to the guest as a read-only disk (empty: none).
    pub user_data: Vec<u8>,
}

/// A NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// MAC, lowercase with colons.
    pub mac: String,
}

/// An instance's spec (`spec.json`, written at create; rewritten, the same
/// atomic way, only when a start changes its [`Resources`]).
///
/// Fields added after the first version carry serde defaults so older
/// files load; unknown fields (from a newer agent) are kept in `extra`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Format version of the agent that wrote the file.
    #[serde(default)]
    pub version: u32,
    /// Unique id on this host.
    pub id: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Registered image.
    pub image_id: String,
    /// Extra blank disks.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// NICs.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// Data given to the guest as a read-only disk.
    #[serde(default)]
    pub user_data: Vec<u8>,
    /// Appended to the base kernel command line.
    #[serde(default)]
    pub cmdline_extra: String,
    /// Restart policy (defaults already applied).
    #[serde(default = "default_restart_policy")]
    pub restart_policy: RestartPolicy,
    /// Boot from this volume: the root disk is the volume (served by
    /// ferro-blockd, first on the PCI bus), not a copy of the image's.
    /// Empty: the image's root disk is copied.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub root_volume_id: String,
    /// Fields this version does not know, kept as they were.
    #[serde(flatten, default)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_restart_policy() -> RestartPolicy {
    RestartPolicy::OnFailure
}

/// Whether `id` is a valid instance or image id: the same rule as the
/// cgroup and image-store names it becomes ([`ferro_hostops::valid_id`]),
/// so an id that passes here never fails later with an internal error.
pub fn valid_id(id: &str) -> bool {
    ferro_hostops::valid_id(id)
}

fn valid_serial(s: &str) -> bool {
    (1..=20).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
        && s != "root"
        && s != "user-data"
}

/// Parse a MAC and check it is unicast.
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (parts.next().is_none() && out[0] & 1 == 0).then_some(out)
}

impl InstanceSpec {
    /// Check every field; the first problem wins.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !valid_id(&self.id) {
            return Err(SpecError::Id(self.id.clone()));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(SpecError::Vcpus(self.vcpus));
        }
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(SpecError::Memory(self.memory_mib));
        }
        if self.image_id.is_empty() {
            return Err(SpecError::NoImage);
        }
        if !self.root_volume_id.is_empty() && !ferro_proto::is_volume_id(&self.root_volume_id) {
            return Err(SpecError::RootVolume(self.root_volume_id.clone()));
        }
        self.validate_disks()?;
        for (index, nic) in self.nics.iter().enumerate() {
            if !nic.mac.is_empty() && parse_mac(&nic.mac).is_none() {
                let mac = nic.mac.clone();
                return Err(SpecError::Mac { index, mac });
            }
        }
        if self.disks.len() + self.nics.len() + 2 > MAX_DEVICES {
            return Err(SpecError::TooManyDevices);
        }
        if self.user_data.len() > MAX_USER_DATA {
            return Err(SpecError::UserData(self.user_data.len()));
        }
        if !self
            .cmdline_extra
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b))
        {
            return Err(SpecError::Cmdline);
        }
        Ok(())
    }

    /// Its size and user data.
    pub fn resources(&self) -> Resources {
        Resources {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            user_data: self.user_data.clone(),
        }
    }

    /// This spec with `r` instead of its size and user data, checked as at
    /// create. Everything else (fields a newer agent wrote included) stays.
    pub fn with_resources(&self, r: Resources) -> Result<InstanceSpec, SpecError> {
        let spec = InstanceSpec {
            vcpus: r.vcpus,
            memory_mib: r.memory_mib,
            user_data: r.user_data,
            ..self.clone()
        };
        spec.validate()?;
        Ok(spec)
    }

    fn validate_disks(&self) -> Result<(), SpecError> {
        for (index, d) in self.disks.iter().enumerate() {
            let problem = if !valid_serial(&d.id) {
                "id must be 1 to 20 of [A-Za-z0-9_-], not \"root\" or \"user-data\""
            } else if d.size_bytes == 0 || d.size_bytes % 512 != 0 || d.size_bytes > MAX_DISK_BYTES
            {
                "size_bytes must be a positive multiple of 512, at most 1 TiB"
            } else if self.disks[..index].iter().any(|o| o.id == d.id) {
                "duplicate id"
            } else {
                continue;
            };
            return Err(SpecError::Disk {
                index,
                problem: problem.into(),
            });
        }
        Ok(())
    }

    /// The MAC of NIC `index`: the given one, or one derived from the id.
    pub fn mac(&self, index: usize) -> String {
        let given = &self.nics[index].mac;
        if !given.is_empty() {
            return given.to_ascii_lowercase();
        }
        let h = fnv32(&self.id).to_be_bytes();
        format!(
            "0a:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            h[0], h[1], h[2], h[3], index as u8
        )
    }

    /// The TAP name of NIC `index` with this agent's `prefix` (≤ 6 bytes):
    /// prefix, 8 hex digits of the id's hash, the index as one base-36
    /// digit — at most 15 bytes.
    pub fn tap_name(&self, prefix: &str, index: usize) -> String {
        let digit = char::from_digit(index as u32 % 36, 36).unwrap_or('0');
        format!("{}{digit}", tap_stem(prefix, &self.id))
    }
}

/// What every TAP name of instance `id` starts with: the prefix and 8 hex
/// digits of the id's hash.
pub fn tap_stem(prefix: &str, id: &str) -> String {
    format!("{prefix}{:08x}", fnv32(id))
}

/// FNV-1a 32 of a string: short, stable names derived from ids.
fn fnv32(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            id: "vm-1".into(),
            vcpus: 1,
            memory_mib: 64,
            image_id: "guest".into(),
            disks: vec![],
            nics: vec![NicSpec { mac: String::new() }],
            user_data: vec![],
            cmdline_extra: "ferro.exit=idle".into(),
            version: crate::persist::FORMAT_VERSION,
            extra: Default::default(),
            restart_policy: RestartPolicy::Never,
            root_volume_id: String::new(),
        }
    }

    #[test]
    fn good_spec_passes() {
        spec().validate().unwrap();
    }

    #[test]
    fn bad_fields_are_named() {
        let mut s = spec();
        s.vcpus = 0;
        assert_eq!(s.validate(), Err(SpecError::Vcpus(0)));
        let mut s = spec();
        s.id = "../x".into();
        assert!(matches!(s.validate(), Err(SpecError::Id(_))));
        let mut s = spec();
        s.memory_mib = 1;
        assert_eq!(s.validate(), Err(SpecError::Memory(1)));
        let mut s = spec();
        s.nics[0].mac = "01:00:00:00:00:01".into();
        assert!(matches!(s.validate(), Err(SpecError::Mac { .. })));
        let mut s = spec();
        s.disks = vec![DiskSpec {
            id: "root".into(),
            size_bytes: 512,
        }];
        assert!(matches!(s.validate(), Err(SpecError::Disk { .. })));
        let mut s = spec();
        s.cmdline_extra = "a\nb".into();
        assert_eq!(s.validate(), Err(SpecError::Cmdline));
    }

    #[test]
    fn attached_volumes_are_checked_and_ordered_by_device() {
        let v = |id: &str, dev: &str| AttachedVolume {
            volume_id: id.into(),
            device: dev.into(),
        };
        let (a, b) = ("vol-0123456789abcdef", "vol-00000000000000ff");
        let got = check_volumes(&spec(), vec![v(a, "/dev/vdc"), v(b, "/dev/vdb")]).unwrap();
        assert_eq!(got, vec![v(b, "/dev/vdb"), v(a, "/dev/vdc")]);
        for (bad, what) in [
            (vec![v("vol-1", "/dev/vdb")], "volume_id"),
            (vec![v("../etc/x", "/dev/vdb")], "volume_id"),
            (vec![v(a, "/dev/vda")], "device"),
            (vec![v(a, "/dev/sdf")], "device"),
            (vec![v(a, "/dev/vdb"), v(a, "/dev/vdc")], "twice"),
            (vec![v(a, "/dev/vdb"), v(b, "/dev/vdb")], "twice"),
        ] {
            let e = check_volumes(&spec(), bad).unwrap_err();
            assert!(matches!(e, SpecError::Volume { .. }), "{e}");
            assert!(e.to_string().contains(what), "{e}");
        }
        let many: Vec<AttachedVolume> = (0..25u8)
            .map(|i| {
                v(
                    &format!("vol-{i:016x}"),
                    &format!("/dev/vd{}", (b'b' + i) as char),
                )
            })
            .collect();
        let mut s = spec();
        s.nics = vec![NicSpec { mac: String::new() }; 4];
        assert_eq!(check_volumes(&s, many), Err(SpecError::TooManyDevices));
    }

    #[test]
    fn a_root_volume_is_vda_first_and_required() {
        let v = |id: &str, dev: &str| AttachedVolume {
            volume_id: id.into(),
            device: dev.into(),
        };
        let (root, b) = ("vol-0123456789abcdef", "vol-00000000000000ff");
        let mut s = spec();
        s.root_volume_id = root.into();
        s.validate().unwrap();
        let got = check_volumes(&s, vec![v(b, "/dev/vdb"), v(root, "/dev/vda")]).unwrap();
        assert_eq!(got, vec![v(root, "/dev/vda"), v(b, "/dev/vdb")]);
        for (bad, what) in [
            (
                vec![v(b, "/dev/vdb")],
                "root volume vol-0123456789abcdef is missing",
            ),
            (vec![v(root, "/dev/vdb")], "must be /dev/vda"),
            (
                vec![v(root, "/dev/vda"), v(b, "/dev/vda")],
                "/dev/vdb to /dev/vdz",
            ),
        ] {
            let e = check_volumes(&s, bad).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
        s.root_volume_id = "vol-x".into();
        assert_eq!(s.validate(), Err(SpecError::RootVolume("vol-x".into())));
    }

    #[test]
    fn new_resources_are_checked_as_at_create_and_keep_the_rest() {
        let mut s = spec();
        s.extra.insert("newer".into(), serde_json::json!(1));
        let r = |vcpus, memory_mib, n| Resources {
            vcpus,
            memory_mib,
            user_data: vec![7; n],
        };
        let got = s.with_resources(r(2, 256, 3)).unwrap();
        assert_eq!(got.resources(), r(2, 256, 3));
        assert_eq!((&got.id, &got.nics, &got.extra), (&s.id, &s.nics, &s.extra));
        assert_eq!(s.with_resources(r(0, 256, 0)), Err(SpecError::Vcpus(0)));
        assert_eq!(
            s.with_resources(r(MAX_VCPUS + 1, 256, 0)),
            Err(SpecError::Vcpus(MAX_VCPUS + 1))
        );
        assert_eq!(s.with_resources(r(1, 16, 0)), Err(SpecError::Memory(16)));
        assert_eq!(
            s.with_resources(r(1, 64, MAX_USER_DATA + 1)),
            Err(SpecError::UserData(MAX_USER_DATA + 1))
        );
    }

    #[test]
    fn derived_names_fit() {
        let s = spec();
        let tap = s.tap_name("fc1234", 23);
        assert!(tap.len() <= 15, "{tap}");
        assert!(parse_mac(&s.mac(0)).is_some());
    }
}
