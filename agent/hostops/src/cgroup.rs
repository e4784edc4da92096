//! Per-instance cgroups with CPU and memory limits.
//!
//! Each instance gets `<root>/<parent>/<id>`: once in the unified hierarchy
//! on cgroup v2, or once in each of the `cpu` and `memory` hierarchies on a
//! v1 (hybrid) host. CPU is limited with CFS bandwidth control (one full
//! 100 ms period per vCPU), memory with a hard limit.
//!
//! The VMM process joins its cgroup either after spawn ([`InstanceCgroup::add_pid`])
//! or, race-free, from a `pre_exec` hook with [`join_from_pre_exec`].

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::names;

/// CFS period used for CPU limits, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// File listing (and accepting) the processes of a cgroup.
const PROCS_FILE: &str = "cgroup.procs";

/// Errors of cgroup operations.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The cgroup id is not 1..=64 characters of `[A-Za-z0-9_-]`.
    #[error("invalid cgroup id {0:?}: expected 1 to 64 characters of [A-Za-z0-9_-]")]
    InvalidId(String),
    /// The parent is not a relative path of plain components.
    #[error("invalid cgroup parent {0:?}: expected a relative path like \"ferro\"")]
    InvalidParent(String),
    /// The limits cannot be expressed (zero vCPUs or zero memory).
    #[error("invalid limits for cgroup {id}: {reason}")]
    InvalidLimits {
        /// Instance id.
        id: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A required controller is not available under the cgroup root.
    #[error("cgroup controller {controller} not found under {root}")]
    MissingController {
        /// Controller name (`cpu` or `memory`).
        controller: &'static str,
        /// The cgroup root searched.
        root: PathBuf,
    },
    /// Creating a cgroup directory failed.
    #[error("failed to create cgroup {path}")]
    Create {
        /// Directory being created.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Writing a control file failed.
    #[error("failed to write {value:?} to {path}")]
    Write {
        /// Control file.
        path: PathBuf,
        /// Value written.
        value: String,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// Reading a control file failed.
    #[error("failed to read {path}")]
    Read {
        /// Control file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// The cgroup still holds processes, so it cannot be removed.
    #[error("cgroup {path} still holds processes {pids:?}")]
    Busy {
        /// Cgroup directory.
        path: PathBuf,
        /// Processes found in it.
        pids: Vec<u32>,
    },
    /// Removing a cgroup directory failed.
    #[error("failed to remove cgroup {path}")]
    Remove {
        /// Cgroup directory.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
}

/// Which cgroup interface the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Legacy or hybrid: one hierarchy per controller.
    V1,
    /// Unified hierarchy.
    V2,
}

/// Resource limits of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Number of vCPUs; the CPU quota is one full period per vCPU.
    pub vcpus: u32,
    /// Hard memory limit in bytes (guest RAM plus VMM overhead).
    pub memory_bytes: u64,
}

impl Limits {
    /// CPU time allowed per [`CPU_PERIOD_US`], in microseconds.
    pub fn cpu_quota_us(&self) -> u64 {
        u64::from(self.vcpus) * CPU_PERIOD_US
    }

    fn check(&self, id: &str) -> Result<(), CgroupError> {
        let reason = match (self.vcpus, self.memory_bytes) {
            (0, _) => "vcpus must be at least 1",
            (_, 0) => "memory_bytes must be at least 1",
            _ => return Ok(()),
        };
        Err(CgroupError::InvalidLimits {
            id: id.to_string(),
            reason,
        })
    }
}

/// The kind of hierarchy a directory belongs to, which decides the limit files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Controller {
    /// cgroup v2: `cpu.max` and `memory.max` in one directory.
    Unified,
    /// cgroup v1 `cpu` hierarchy.
    V1Cpu,
    /// cgroup v1 `memory` hierarchy.
    V1Memory,
}

impl Controller {
    /// The control files and values that apply `limits`, in write order.
    fn limit_files(self, limits: &Limits) -> Vec<(&'static str, String)> {
        let quota = limits.cpu_quota_us();
        let memory = limits.memory_bytes.to_string();
        match self {
            Controller::Unified => vec![
                ("cpu.max", format!("{quota} {CPU_PERIOD_US}")),
                ("memory.max", memory),
            ],
            Controller::V1Cpu => vec![
                ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                ("cpu.cfs_quota_us", quota.to_string()),
            ],
            Controller::V1Memory => vec![("memory.limit_in_bytes", memory)],
        }
    }
}

/// One hierarchy's parent directory (`<mount>/<parent>`).
#[derive(Debug, Clone)]
struct Hierarchy {
    controller: Controller,
    parent: PathBuf,
}

/// Creates, finds and removes instance cgroups under one parent.
#[derive(Debug, Clone)]
pub struct CgroupManager {
    version: CgroupVersion,
    hierarchies: Vec<Hierarchy>,
}

impl CgroupManager {
    /// Detects the cgroup version under `root` (normally `/sys/fs/cgroup`)
    /// and creates the `parent` cgroup (e.g. `ferro`) in every hierarchy used.
    ///
    /// v2 is chosen when `root/cgroup.controllers` exists; `+cpu +memory` is
    /// then enabled in `subtree_control` from the root down to the parent.
    /// Otherwise v1 controllers are looked up at `root/cpu` (or
    /// `root/cpu,cpuacct`) and `root/memory`.
    pub fn detect(root: &Path, parent: &str) -> Result<Self, CgroupError> {
        if !names::is_valid_rel_path(parent) {
            return Err(CgroupError::InvalidParent(parent.to_string()));
        }
        let manager = if root.join("cgroup.controllers").is_file() {
            Self::detect_v2(root, parent)?
        } else {
            Self::detect_v1(root, parent)?
        };
        for h in &manager.hierarchies {
            create_dir_all(&h.parent)?;
        }
        if manager.version == CgroupVersion::V2 {
            enable_v2_controllers(root, parent)?;
        }
        tracing::debug!(root = %root.display(), parent, version = ?manager.version, "cgroups ready");
        Ok(manager)
    }

    fn detect_v2(root: &Path, parent: &str) -> Result<Self, CgroupError> {
        let path = root.join("cgroup.controllers");
        let available =
            fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })?;
        for controller in ["cpu", "memory"] {
            if !available.split_whitespace().any(|c| c == controller) {
                return Err(CgroupError::MissingController {
                    controller,
                    root: root.to_path_buf(),
                });
            }
        }
        let hierarchies = vec![Hierarchy {
            controller: Controller::Unified,
            parent: root.join(parent),
        }];
        Ok(CgroupManager {
            version: CgroupVersion::V2,
            hierarchies,
        })
    }

    fn detect_v1(root: &Path, parent: &str) -> Result<Self, CgroupError> {
        let cpu = find_v1_mount(
            root,
            "cpu",
            &["cpu", "cpu,cpuacct", "cpuacct,cpu"],
            "cpu.cfs_quota_us",
        )?;
        let memory = find_v1_mount(root, "memory", &["memory"], "memory.limit_in_bytes")?;
        let hierarchies = vec![
            Hierarchy {
                controller: Controller::V1Cpu,
                parent: cpu.join(parent),
            },
            Hierarchy {
                controller: Controller::V1Memory,
                parent: memory.join(parent),
            },
        ];
        Ok(CgroupManager {
            version: CgroupVersion::V1,
            hierarchies,
        })
    }

    /// The cgroup interface in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The parent cgroup directory in each hierarchy used (one on v2, the
    /// `cpu` then `memory` ones on v1).
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        self.hierarchies.iter().map(|h| h.parent.clone()).collect()
    }

    /// Creates the cgroup of instance `id` and applies `limits`.
    ///
    /// An existing cgroup with that id is reused and its limits are
    /// rewritten, so a restarted agent may call this again. If applying the
    /// limits fails, the directories are removed again (best effort).
    pub fn create(&self, id: &str, limits: &Limits) -> Result<InstanceCgroup, CgroupError> {
        check_id(id)?;
        limits.check(id)?;
        let cgroup = self.instance(id);
        let result = self
            .hierarchies
            .iter()
            .try_for_each(|h| apply(h, id, limits));
        if let Err(e) = result {
            cgroup.dirs.iter().for_each(|d| drop(fs::remove_dir(d)));
            return Err(e);
        }
        tracing::info!(
            instance = id,
            vcpus = limits.vcpus,
            memory_bytes = limits.memory_bytes,
            "cgroup created"
        );
        Ok(cgroup)
    }

    /// The cgroup of instance `id`, if it exists in every hierarchy.
    ///
    /// Returns `None` for an invalid id.
    pub fn open(&self, id: &str) -> Option<InstanceCgroup> {
        if !names::is_valid_id(id) {
            return None;
        }
        let cgroup = self.instance(id);
        cgroup.dirs.iter().all(|d| d.is_dir()).then_some(cgroup)
    }

    /// Removes the cgroup of instance `id` from every hierarchy.
    ///
    /// Fails with [`CgroupError::Busy`], naming the processes, while any
    /// process remains (nothing is removed then). Succeeds when the cgroup
    /// is already gone, in whole or in part.
    pub fn remove(&self, id: &str) -> Result<(), CgroupError> {
        check_id(id)?;
        let cgroup = self.instance(id);
        for dir in &cgroup.dirs {
            let pids = read_pids(dir);
            if !pids.is_empty() {
                return Err(CgroupError::Busy {
                    path: dir.clone(),
                    pids,
                });
            }
        }
        cgroup.dirs.iter().try_for_each(|d| remove_dir(d))?;
        tracing::info!(instance = id, "cgroup removed");
        Ok(())
    }

    /// Ids of the instance cgroups present under the parent in any
    /// hierarchy, sorted.
    pub fn list(&self) -> Vec<String> {
        let mut ids = BTreeSet::new();
        for h in &self.hierarchies {
            ids.extend(child_cgroups(&h.parent));
        }
        ids.into_iter().collect()
    }

    fn instance(&self, id: &str) -> InstanceCgroup {
        let dirs = self.hierarchies.iter().map(|h| h.parent.join(id)).collect();
        InstanceCgroup {
            id: id.to_string(),
            dirs,
        }
    }
}

/// The cgroup of one instance (one directory per hierarchy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceCgroup {
    id: String,
    dirs: Vec<PathBuf>,
}

impl InstanceCgroup {
    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The cgroup directory in each hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves process `pid` (all its threads) into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        let value = pid.to_string();
        self.procs_files()
            .iter()
            .try_for_each(|path| write_file(path, &value))?;
        tracing::debug!(instance = %self.id, pid, "process joined cgroup");
        Ok(())
    }

    /// The `cgroup.procs` file of each hierarchy.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join(PROCS_FILE)).collect()
    }

    /// [`Self::procs_files`] as C strings, ready to hand to
    /// [`join_from_pre_exec`]. Build them before spawning.
    pub fn procs_files_cstr(&self) -> Vec<CString> {
        self.procs_files()
            .iter()
            .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
            .collect()
    }

    /// Processes in this cgroup in any hierarchy, sorted and deduplicated.
    pub fn pids(&self) -> Vec<u32> {
        let all: BTreeSet<u32> = self.dirs.iter().flat_map(|d| read_pids(d)).collect();
        all.into_iter().collect()
    }
}

/// Moves the calling process into the cgroups whose `cgroup.procs` paths
/// are given (see [`InstanceCgroup::procs_files_cstr`]).
///
/// Meant for `std::os::unix::process::CommandExt::pre_exec`: it is
/// async-signal-safe, using only `getpid`, `open`, `write` and `close`, with
/// no allocation, so the child is limited before it execs the VMM.
pub fn join_from_pre_exec(files: &[CString]) -> io::Result<()> {
    let mut buf = [0u8; 10];
    // SAFETY: getpid has no preconditions and is async-signal-safe.
    let pid = unsafe { libc::getpid() };
    // A pid is never negative; "0" would also mean "the writer" to the kernel.
    let digits = format_decimal(u32::try_from(pid).unwrap_or(0), &mut buf);
    files.iter().try_for_each(|f| write_once(f, digits))
}

/// Writes the decimal digits of `n` to the end of `buf`, returning them.
fn format_decimal(mut n: u32, buf: &mut [u8; 10]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        // `n % 10` is below 10, so the cast is lossless.
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[start..];
        }
    }
}

/// Opens `path`, writes `bytes` with a single `write`, and closes it, using
/// only async-signal-safe calls.
fn write_once(path: &CStr, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is a valid NUL-terminated string; open is async-signal-safe.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is open and `bytes` is valid for reads of `bytes.len()` bytes.
    let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    let write_error = (written < 0).then(io::Error::last_os_error);
    // SAFETY: `fd` was opened above and is closed exactly once.
    unsafe { libc::close(fd) };
    match write_error {
        Some(e) => Err(e),
        None if written as usize != bytes.len() => Err(io::ErrorKind::WriteZero.into()),
        None => Ok(()),
    }
}

fn check_id(id: &str) -> Result<(), CgroupError> {
    if names::is_valid_id(id) {
        Ok(())
    } else {
        Err(CgroupError::InvalidId(id.to_string()))
    }
}

/// Creates the instance directory in one hierarchy and writes its limits.
fn apply(h: &Hierarchy, id: &str, limits: &Limits) -> Result<(), CgroupError> {
    let dir = h.parent.join(id);
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(CgroupError::Create { path: dir, source }),
    }
    for (file, value) in h.controller.limit_files(limits) {
        write_file(&dir.join(file), &value)?;
    }
    Ok(())
}

/// Finds the v1 mount of `controller` among `candidates` under `root`,
/// recognised by `probe_file`.
fn find_v1_mount(
    root: &Path,
    controller: &'static str,
    candidates: &[&str],
    probe_file: &str,
) -> Result<PathBuf, CgroupError> {
    candidates
        .iter()
        .map(|c| root.join(c))
        .find(|dir| dir.join(probe_file).is_file())
        .ok_or_else(|| CgroupError::MissingController {
            controller,
            root: root.to_path_buf(),
        })
}

/// Enables `+cpu +memory` in `subtree_control` of the root and of every
/// component of `parent`, so instance cgroups get both controllers. Levels
/// that already delegate both are left untouched.
fn enable_v2_controllers(root: &Path, parent: &str) -> Result<(), CgroupError> {
    let mut dir = root.to_path_buf();
    enable_subtree_controllers(&dir)?;
    for component in parent.split('/') {
        dir.push(component);
        enable_subtree_controllers(&dir)?;
    }
    Ok(())
}

fn enable_subtree_controllers(dir: &Path) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&path).unwrap_or_default();
    let has = |c: &str| enabled.split_whitespace().any(|e| e == c);
    if has("cpu") && has("memory") {
        return Ok(());
    }
    write_file(&path, "+cpu +memory")
}

fn create_dir_all(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(path).map_err(|source| CgroupError::Create {
        path: path.to_path_buf(),
        source,
    })
}

/// Removes one cgroup directory; absent counts as removed.
fn remove_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(CgroupError::Busy {
            path: dir.to_path_buf(),
            pids: read_pids(dir),
        }),
        Err(source) => Err(CgroupError::Remove {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// Pids listed in `dir/cgroup.procs`; empty if the cgroup is gone.
fn read_pids(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join(PROCS_FILE))
        .map(|s| parse_pids(&s))
        .unwrap_or_default()
}

fn parse_pids(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Names of the child cgroups of `dir` that are valid instance ids.
fn child_cgroups(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| names::is_valid_id(name))
        .collect()
}

#[cfg(test)]
mod tests;
