//! The instance manager: the registry of instances, exact capacity
//! accounting, create (all-or-nothing), and recovery after an agent restart.
//!
//! Capacity is reserved when an instance is created and released when it is
//! deleted, so the vCPUs and memory of all instances — running or not —
//! never exceed what the host offers, and a start never fails for capacity.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use ferro_hostops::cgroup::{CgroupError, CgroupManager};
use ferro_hostops::images::{Image, ImageError, ImageStore};
use ferro_hostops::tap;

use crate::config::AgentConfig;
use crate::events::EventBus;
use crate::machine::{Machine, Observed};
use crate::persist::{self, InstancePaths, PersistError};
use crate::resources::{Host, ResourceError};
use crate::spec::{InstanceSpec, SpecError};
use crate::supervisor::{self, InstanceHandle};
use crate::{chain, process};

/// Errors of manager operations; the service maps each to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The spec is invalid.
    #[error("invalid instance spec")]
    InvalidSpec(#[from] SpecError),
    /// The image is not registered.
    #[error("image {0} not found")]
    UnknownImage(String),
    /// The id is taken.
    #[error("instance {0} already exists")]
    Duplicate(String),
    /// No such instance.
    #[error("instance {0} not found")]
    NotFound(String),
    /// Not enough free capacity.
    #[error("not enough capacity: {0}")]
    Capacity(String),
    /// Preparing the host resources failed (nothing was left behind).
    #[error("cannot prepare the instance's host resources")]
    Prepare(#[source] ResourceError),
    /// Persisting the spec failed (nothing was left behind).
    #[error("cannot persist the instance")]
    Persist(#[source] PersistError),
    /// Image store error.
    #[error("image store error")]
    Image(#[from] ImageError),
    /// Starting the agent failed.
    #[error("cannot set up cgroups")]
    Cgroup(#[from] CgroupError),
    /// A state directory error at start-up.
    #[error("cannot use the state directory {0}")]
    StateDir(String, #[source] std::io::Error),
}

/// Capacity held by one instance.
#[derive(Clone, Copy, Debug)]
struct Reservation {
    vcpus: u32,
    memory_mib: u64,
}

#[derive(Default)]
struct Registry {
    /// Ready instances.
    instances: BTreeMap<String, Arc<InstanceHandle>>,
    /// Reservations of ready instances and of creates under way.
    reserved: BTreeMap<String, Reservation>,
}

impl Registry {
    fn allocated(&self) -> (u32, u64) {
        self.reserved
            .values()
            .fold((0, 0), |(c, m), r| (c + r.vcpus, m + r.memory_mib))
    }
}

/// What the supervisors share with the manager.
pub struct Inner {
    /// Configuration.
    pub cfg: AgentConfig,
    /// cgroups.
    pub cgroups: CgroupManager,
    /// Images.
    pub images: ImageStore,
    /// State changes.
    pub events: EventBus,
    /// Guest memory offered, in MiB.
    pub memory_offered_mib: u64,
    registry: Mutex<Registry>,
}

impl Inner {
    /// The host operations.
    pub fn host(&self) -> Host<'_> {
        Host {
            cfg: &self.cfg,
            cgroups: &self.cgroups,
            images: &self.images,
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drop a deleted instance and its reservation.
    pub fn forget(&self, id: &str) {
        let mut r = self.registry();
        r.instances.remove(id);
        r.reserved.remove(id);
    }
}

/// The instance manager.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

impl Manager {
    /// Set up the state directory, cgroups and image store, then recover
    /// the instances found in the state directory.
    pub async fn open(cfg: AgentConfig) -> Result<Self, ManagerError> {
        let dir_err = |p: &std::path::Path| {
            let p = p.display().to_string();
            move |e| ManagerError::StateDir(p, e)
        };
        for sub in ["instances", "run", "images"] {
            let d = cfg.state_dir.join(sub);
            std::fs::create_dir_all(&d).map_err(dir_err(&d))?;
        }
        let cgroups = CgroupManager::detect(&cfg.cgroup_root, &cfg.cgroup_parent)?;
        let images = ImageStore::open(&cfg.state_dir.join("images"))?;
        if let Some(bridge) = &cfg.bridge {
            if let Err(e) = tap::ensure_bridge(bridge) {
                tracing::error!(bridge, error = %chain(&e), "cannot set up the bridge");
            }
        }
        let host_room = crate::host::mem_total_mib().saturating_sub(cfg.reserved_memory_mib);
        let inner = Arc::new(Inner {
            memory_offered_mib: cfg.memory_mib.min(host_room),
            cfg,
            cgroups,
            images,
            events: EventBus::default(),
            registry: Mutex::new(Registry::default()),
        });
        let manager = Self { inner };
        manager.recover()?;
        Ok(manager)
    }

    /// The shared state.
    pub fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }

    /// Create an instance: validate, reserve, prepare, persist, supervise.
    pub async fn create(&self, spec: InstanceSpec) -> Result<Arc<InstanceHandle>, ManagerError> {
        spec.validate()?;
        let image = spec.image_id.clone();
        match self.inner.images.get(&image) {
            Ok(_) => {}
            Err(ImageError::NotFound(_) | ImageError::InvalidId(_)) => {
                return Err(ManagerError::UnknownImage(image));
            }
            Err(e) => return Err(e.into()),
        }
        self.reserve(&spec)?;
        let id = spec.id.clone();
        let inner = self.inner.clone();
        let spec = Arc::new(spec);
        let s = spec.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            let paths = InstancePaths::new(&inner.cfg.state_dir, &s.id);
            inner
                .host()
                .prepare(&s, &paths)
                .map_err(ManagerError::Prepare)?;
            let written = persist::write_json(
                &paths.state(),
                &Machine::new(s.restart_policy, inner.cfg.restart.backoff()).observed(),
            )
            .and_then(|()| persist::write_json(&paths.spec(), &*s));
            written.map_err(|e| {
                inner.host().teardown(&s, &paths);
                ManagerError::Persist(e)
            })
        })
        .await
        .unwrap_or_else(|e| {
            Err(ManagerError::StateDir(
                "(task)".into(),
                std::io::Error::other(e),
            ))
        });
        if let Err(e) = prepared {
            self.inner.registry().reserved.remove(&id);
            return Err(e);
        }
        let machine = Machine::new(spec.restart_policy, self.inner.cfg.restart.backoff());
        let handle = supervisor::start(self.inner.clone(), spec, machine, None);
        self.inner
            .registry()
            .instances
            .insert(id.clone(), handle.clone());
        self.inner.events.emit_created(&id);
        tracing::info!(instance_id = %id, "instance created");
        Ok(handle)
    }

    /// Reserve the spec's capacity under its id, refusing duplicates and
    /// what does not fit.
    fn reserve(&self, spec: &InstanceSpec) -> Result<(), ManagerError> {
        let mut r = self.inner.registry();
        if r.reserved.contains_key(&spec.id) {
            return Err(ManagerError::Duplicate(spec.id.clone()));
        }
        let (cpus, mem) = r.allocated();
        let (cpu_total, mem_total) = (self.inner.cfg.vcpus, self.inner.memory_offered_mib);
        if cpus + spec.vcpus > cpu_total {
            return Err(ManagerError::Capacity(format!(
                "{} vCPUs requested, {} of {cpu_total} free",
                spec.vcpus,
                cpu_total - cpus
            )));
        }
        if mem + spec.memory_mib > mem_total {
            return Err(ManagerError::Capacity(format!(
                "{} MiB requested, {} of {mem_total} MiB free",
                spec.memory_mib,
                mem_total.saturating_sub(mem)
            )));
        }
        let res = Reservation {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
        };
        r.reserved.insert(spec.id.clone(), res);
        Ok(())
    }

    /// The instance `id`.
    pub fn get(&self, id: &str) -> Result<Arc<InstanceHandle>, ManagerError> {
        self.inner
            .registry()
            .instances
            .get(id)
            .cloned()
            .ok_or_else(|| ManagerError::NotFound(id.to_string()))
    }

    /// Every instance, by id.
    pub fn list(&self) -> Vec<Arc<InstanceHandle>> {
        self.inner.registry().instances.values().cloned().collect()
    }

    /// vCPUs and MiB held by instances, and the instance count.
    pub fn allocated(&self) -> (u32, u64, usize) {
        let r = self.inner.registry();
        let (c, m) = r.allocated();
        (c, m, r.instances.len())
    }

    /// Register an image.
    pub async fn register_image(
        &self,
        id: String,
        kernel: String,
        initrd: String,
        rootdisk: String,
    ) -> Result<Image, ManagerError> {
        let inner = self.inner.clone();
        let opt = |s: String| (!s.is_empty()).then(|| std::path::PathBuf::from(s));
        tokio::task::spawn_blocking(move || {
            let (initrd, rootdisk) = (opt(initrd), opt(rootdisk));
            inner
                .images
                .register(&id, kernel.as_ref(), initrd.as_deref(), rootdisk.as_deref())
                .map_err(ManagerError::from)
        })
        .await
        .unwrap_or_else(|e| {
            Err(ManagerError::StateDir(
                "(task)".into(),
                std::io::Error::other(e),
            ))
        })
    }

    /// Load every persisted instance, re-attach to its VMM if it lives, and
    /// remove leftovers of creates that never completed.
    fn recover(&self) -> Result<(), ManagerError> {
        let dir = self.inner.cfg.state_dir.join("instances");
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| ManagerError::StateDir(dir.display().to_string(), e))?;
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            let paths = InstancePaths::new(&self.inner.cfg.state_dir, &id);
            match self.load(&paths) {
                Ok((spec, obs)) => self.recover_one(spec, obs, &paths),
                Err(e) => {
                    // Never committed (the agent died inside create): remove.
                    tracing::warn!(instance_id = %id, error = %chain(&e), "removing an incomplete instance");
                    let _ = std::fs::remove_dir_all(&paths.dir);
                }
            }
        }
        self.remove_orphans();
        Ok(())
    }

    fn load(&self, paths: &InstancePaths) -> Result<(InstanceSpec, Observed), PersistError> {
        let spec: InstanceSpec = persist::read_json(&paths.spec())?;
        let obs: Observed = persist::read_json(&paths.state())?;
        Ok((spec, obs))
    }

    fn recover_one(&self, spec: InstanceSpec, obs: Observed, paths: &InstancePaths) {
        let found = process::find_vmm(obs.pid, &paths.socket)
            .and_then(|pid| process::attach(pid, &paths.socket));
        tracing::info!(instance_id = %spec.id, phase = ?obs.phase, vmm = ?found.as_ref().map(|v| v.pid), "recovering");
        let id = spec.id.clone();
        let res = Reservation {
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
        };
        let machine = Machine::restore(obs, spec.restart_policy, self.inner.cfg.restart.backoff());
        let handle = supervisor::start(self.inner.clone(), Arc::new(spec), machine, Some(found));
        let mut r = self.inner.registry();
        r.reserved.insert(id.clone(), res);
        r.instances.insert(id, handle);
    }

    /// Remove TAPs and cgroups of this agent that no instance owns.
    fn remove_orphans(&self) {
        let r = self.inner.registry();
        let owned: Vec<String> = r
            .instances
            .values()
            .flat_map(|h| crate::resources::taps(&self.inner.cfg, &h.spec))
            .collect();
        for name in tap::list_taps(&self.inner.cfg.tap_prefix) {
            if !owned.contains(&name) {
                tracing::warn!(tap = %name, "removing an orphaned TAP");
                let _ = tap::delete_tap(&name);
            }
        }
        for id in self.inner.cgroups.list() {
            if !r.instances.contains_key(&id) {
                tracing::warn!(cgroup = %id, "removing an orphaned cgroup");
                if let Err(e) = self.inner.cgroups.remove(&id) {
                    tracing::warn!(cgroup = %id, error = %chain(&e), "cannot remove an orphaned cgroup");
                }
            }
        }
    }
}
