//! What an instance owns on the host — its directory and disk files, its
//! cgroup, its TAPs — created all-or-nothing at create and removed at
//! delete, and the VMM command line that uses them.
//!
//! All of this is blocking `ferro-hostops` work: callers run it on the
//! blocking thread pool.

use std::ffi::OsString;
use std::path::Path;

use ferro_hostops::cgroup::{CgroupError, CgroupManager, Limits};
use ferro_hostops::images::{ImageError, ImageStore};
use ferro_hostops::tap::{self, TapError};

use crate::config::AgentConfig;
use crate::persist::InstancePaths;
use crate::process::VmmCommand;
use crate::spec::{AttachedVolume, InstanceSpec};

/// Errors preparing or removing an instance's resources.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// Directory or file error.
    #[error("cannot create {path}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Image store error (disk copies).
    #[error("disk preparation failed")]
    Image(#[from] ImageError),
    /// cgroup error.
    #[error("cgroup operation failed")]
    Cgroup(#[from] CgroupError),
    /// TAP or bridge error.
    #[error("TAP operation failed")]
    Tap(#[from] TapError),
    /// A TAP with the derived name exists already (another instance).
    #[error("TAP {0} already exists")]
    TapTaken(String),
    /// An attached volume is not served by this host's ferro-blockd.
    #[error("volume {volume} is not served by this host's ferro-blockd (no socket at {socket})")]
    VolumeNotServed {
        /// The volume.
        volume: String,
        /// Where its socket should be.
        socket: std::path::PathBuf,
    },
}

/// Where this host's ferro-blockd serves `volume_id` over vhost-user.
pub fn volume_socket(cfg: &AgentConfig, volume_id: &str) -> std::path::PathBuf {
    cfg.blockd_socket_dir.join(format!("{volume_id}.sock"))
}

/// The first of `volumes` whose socket is not there, as an error.
pub fn unserved_volume(cfg: &AgentConfig, volumes: &[AttachedVolume]) -> Option<ResourceError> {
    volumes.iter().find_map(|v| {
        let socket = volume_socket(cfg, &v.volume_id);
        let served = std::fs::symlink_metadata(&socket)
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
        (!served).then(|| ResourceError::VolumeNotServed {
            volume: v.volume_id.clone(),
            socket,
        })
    })
}

/// The host-side pieces the agent needs for resources.
pub struct Host<'a> {
    /// Configuration.
    pub cfg: &'a AgentConfig,
    /// cgroups.
    pub cgroups: &'a CgroupManager,
    /// Images.
    pub images: &'a ImageStore,
}

/// The TAP names of an instance.
pub fn taps(cfg: &AgentConfig, spec: &InstanceSpec) -> Vec<String> {
    (0..spec.nics.len())
        .map(|i| spec.tap_name(&cfg.tap_prefix, i))
        .collect()
}

impl Host<'_> {
    /// Create everything `spec` owns. On failure, remove what was created.
    pub fn prepare(&self, spec: &InstanceSpec, paths: &InstancePaths) -> Result<(), ResourceError> {
        let mut created_taps = Vec::new();
        let result = self.try_prepare(spec, paths, &mut created_taps);
        if result.is_err() {
            // Only what this call created: a TAP of the same name that
            // existed before belongs to someone else.
            for name in created_taps {
                let _ = tap::delete_tap(&name);
            }
            self.remove_cgroup(&spec.id);
            let _ = std::fs::remove_dir_all(&paths.dir);
        }
        result
    }

    fn try_prepare(
        &self,
        spec: &InstanceSpec,
        paths: &InstancePaths,
        created_taps: &mut Vec<String>,
    ) -> Result<(), ResourceError> {
        let mkdir = |p: &Path| {
            std::fs::create_dir_all(p).map_err(|source| ResourceError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        mkdir(&paths.dir)?;
        mkdir(paths.socket.parent().unwrap_or(Path::new("/")))?;
        let image = self.images.get(&spec.image_id)?;
        // Booted from a volume: its root disk lives in ferro-blockd.
        if image.rootdisk.is_some() && spec.root_volume_id.is_empty() {
            self.images
                .clone_disk(&spec.image_id, &paths.disk("root"))?;
        }
        for d in &spec.disks {
            self.images
                .create_blank_disk(&paths.disk(&d.id), d.size_bytes)?;
        }
        if !spec.user_data.is_empty() {
            let p = paths.disk("user-data");
            std::fs::write(&p, user_data_disk(&spec.user_data))
                .map_err(|source| ResourceError::Io { path: p, source })?;
        }
        self.cgroups.create(&spec.id, &self.limits(spec))?;
        for name in taps(self.cfg, spec) {
            if tap::tap_exists(&name) {
                return Err(ResourceError::TapTaken(name));
            }
            tap::create_tap(&name)?;
            created_taps.push(name.clone());
            if let Some(bridge) = &self.cfg.bridge {
                tap::attach_to_bridge(&name, bridge)?;
            }
        }
        Ok(())
    }

    /// Make the user-data disk hold `spec`'s user data, zero-padded (none:
    /// no disk). Written only when it differs, atomically (a temporary
    /// file, fsync, rename), so a crash leaves the old or the new disk.
    /// Every spawn calls it: a disk left behind by a resize that did not
    /// finish is brought in line with the stored spec.
    pub fn sync_user_data(
        &self,
        spec: &InstanceSpec,
        paths: &InstancePaths,
    ) -> Result<(), ResourceError> {
        let disk = paths.disk("user-data");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ResourceError::Io { path, source }
        };
        if spec.user_data.is_empty() {
            return match std::fs::remove_file(&disk) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&disk)(e)),
                _ => Ok(()),
            };
        }
        let want = user_data_disk(&spec.user_data);
        if std::fs::read(&disk).is_ok_and(|have| have == want) {
            return Ok(());
        }
        let tmp = paths.dir.join(".disk-user-data.img.tmp");
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            std::io::Write::write_all(&mut f, &want)?;
            f.sync_all()
        });
        written.map_err(io(&tmp))?;
        std::fs::rename(&tmp, &disk).map_err(io(&disk))
    }

    /// Make the host side of `spec` match it after its size or user data
    /// changed (the spec is stored already): the user-data disk and the
    /// cgroup's limits.
    pub fn apply_resources(
        &self,
        spec: &InstanceSpec,
        paths: &InstancePaths,
    ) -> Result<(), ResourceError> {
        self.sync_user_data(spec, paths)?;
        self.cgroups.create(&spec.id, &self.limits(spec))?;
        Ok(())
    }

    /// Remove everything `spec` owns (best effort, logged). The VMM must be
    /// gone already; its cgroup may take a moment to empty.
    pub fn teardown(&self, spec: &InstanceSpec, paths: &InstancePaths) {
        for name in taps(self.cfg, spec) {
            if tap::tap_exists(&name) {
                if let Err(e) = tap::delete_tap(&name) {
                    tracing::warn!(tap = name, error = %crate::chain(&e), "cannot delete TAP");
                }
            }
        }
        self.remove_cgroup(&spec.id);
        let _ = std::fs::remove_file(&paths.socket);
        if let Err(e) = std::fs::remove_dir_all(&paths.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %paths.dir.display(), error = %e, "cannot remove instance directory");
            }
        }
    }

    fn limits(&self, spec: &InstanceSpec) -> Limits {
        Limits {
            vcpus: spec.vcpus,
            memory_bytes: (spec.memory_mib + self.cfg.vmm_overhead_mib) << 20,
        }
    }

    /// Remove cgroup `id`, retrying for up to 2 s while it empties.
    pub fn remove_cgroup(&self, id: &str) {
        for attempt in 0.. {
            match self.cgroups.remove(id) {
                Ok(()) => return,
                Err(CgroupError::Busy { .. }) if attempt < 200 => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => {
                    tracing::warn!(instance_id = id, error = %crate::chain(&e), "cannot remove cgroup");
                    return;
                }
            }
        }
    }

    /// The ferro-vmm command of `spec` with `volumes` attached (each
    /// must be served by this host's ferro-blockd already: the VMM connects
    /// to its socket at start).
    pub fn vmm_command(
        &self,
        spec: &InstanceSpec,
        volumes: &[AttachedVolume],
        paths: &InstancePaths,
    ) -> Result<VmmCommand, ResourceError> {
        if let Some(e) = unserved_volume(self.cfg, volumes) {
            return Err(e);
        }
        let image = self.images.get(&spec.image_id)?;
        self.sync_user_data(spec, paths)?;
        let mut args: Vec<OsString> = Vec::new();
        let mut arg = |k: &str, v: OsString| {
            args.push(k.into());
            args.push(v);
        };
        arg("--kernel", image.kernel.into_os_string());
        if let Some(initrd) = image.initrd {
            arg("--initrd", initrd.into_os_string());
        }
        let mut cmdline = self.cfg.kernel_cmdline.clone();
        if !spec.cmdline_extra.is_empty() {
            cmdline = format!("{cmdline} {}", spec.cmdline_extra);
        }
        arg("--cmdline", cmdline.into());
        arg("--vcpus", spec.vcpus.to_string().into());
        arg("--memory", spec.memory_mib.to_string().into());
        let disk = |serial: &str, ro: bool| {
            let mut s = OsString::from("path=");
            s.push(paths.disk(serial));
            s.push(format!(",id={serial}{}", if ro { ",ro=on" } else { "" }));
            s
        };
        if image.rootdisk.is_some() && spec.root_volume_id.is_empty() {
            arg("--disk", disk("root", false));
        }
        for d in &spec.disks {
            arg("--disk", disk(&d.id, false));
        }
        if !spec.user_data.is_empty() {
            arg("--disk", disk("user-data", true));
        }
        for v in volumes {
            let mut s = OsString::from("socket=");
            s.push(volume_socket(self.cfg, &v.volume_id));
            s.push(format!(",id={}", v.volume_id));
            if v.volume_id == spec.root_volume_id {
                s.push(",boot=on");
            }
            arg("--vhost-user-blk", s);
        }
        for (i, name) in taps(self.cfg, spec).iter().enumerate() {
            arg("--net", format!("tap={name},mac={}", spec.mac(i)).into());
        }
        let mut serial = OsString::from("file:");
        serial.push(paths.console());
        arg("--serial", serial);
        arg("--control-socket", paths.socket.clone().into_os_string());
        arg("--system-uuid", system_uuid(&spec.id).into());
        // Idempotent: recreates the cgroup if it vanished.
        let cgroup_procs = self
            .cgroups
            .create(&spec.id, &self.limits(spec))?
            .procs_files_cstr();
        Ok(VmmCommand {
            binary: self.cfg.vmm_path.clone(),
            args,
            stderr_log: paths.vmm_log(),
            cgroup_procs,
            log_filter: self.cfg.vmm_log.clone(),
        })
    }
}

/// User data as the guest's read-only disk: zero-padded to 512 bytes.
fn user_data_disk(data: &[u8]) -> Vec<u8> {
    let mut disk = data.to_vec();
    disk.resize(data.len().div_ceil(512) * 512, 0);
    disk
}

/// The SMBIOS system UUID (and serial number) of instance `id`: `ec2`
/// and 29 hex digits of the id's sha256, stable across restarts and
/// unique per instance. EC2's instances carry such a UUID, and EC2-aware
/// guests (cloud-init's EC2 datasource) recognise an EC2-compatible cloud
/// by it, then use IMDSv2 as they do on EC2.
pub fn system_uuid(id: &str) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(id.as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let h = format!("ec2{}", &hex[..29]);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod uuid_tests {
    use super::system_uuid;

    #[test]
    fn system_uuids_are_ec2_style_stable_and_distinct() {
        let a = system_uuid("i-0123456789abcdef");
        assert!(a.starts_with("ec2"), "{a}");
        let lens: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(lens, [8, 4, 4, 4, 12]);
        assert!(a.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
        assert_eq!(a, system_uuid("i-0123456789abcdef"));
        assert_ne!(a, system_uuid("i-0123456789abcdee"));
    }
}
