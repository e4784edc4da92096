//! The instance manager: the registry of instances, exact capacity
//! accounting, create (all-or-nothing), and recovery after an agent restart.
//!
//! Capacity is reserved when an instance is created and released when it is
//! deleted, so the vCPUs and memory of all instances — running or not —
//! never exceed what the host offers. A start fails for capacity only when
//! it makes the instance larger ([`Manager::resize`]).

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
use crate::spec::{InstanceSpec, Resources, SpecError};
use crate::supervisor::{self, InstanceHandle, OpError};
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
    /// The instance refused or failed an operation.
    #[error(transparent)]
    Op(#[from] OpError),
}

/// Capacity held by one instance.
#[derive(Clone, Copy, Debug)]
struct Reservation {
    vcpus: u32,
    memory_mib: u64,
}

/// An instance directory whose spec could not be read at recovery: moved
/// aside whole (disks included), never deleted, its VMM (if any) left
/// running, and reported as a failed instance until an operator deals
/// with it.
#[derive(Clone, Debug)]
pub struct Quarantined {
    /// The instance id (the directory's name).
    pub id: String,
    /// Where the directory now is.
    pub moved_to: std::path::PathBuf,
    /// What could not be read.
    pub reason: String,
}

#[derive(Default)]
struct Registry {
    /// Ready instances.
    instances: BTreeMap<String, Arc<InstanceHandle>>,
    /// Instances quarantined at recovery.
    quarantined: Vec<Quarantined>,
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
    /// One lock per image id being registered: held by the copy-and-hash
    /// work itself, so a caller that gave up (the controller's call timed
    /// out on a large root disk) does not make the next call start the
    /// same work again beside it; that call waits, then finds the image.
    registering: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
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

impl supervisor::Context for Inner {
    fn cfg(&self) -> &AgentConfig {
        &self.cfg
    }
    fn host(&self) -> Host<'_> {
        Inner::host(self)
    }
    fn events(&self) -> &crate::events::EventBus {
        &self.events
    }
    fn forget(&self, id: &str) {
        Inner::forget(self, id)
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
            registering: Mutex::default(),
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
        // Stamped and listed together (see `order`).
        let guard = crate::order::publishing();
        let handle = supervisor::start(
            self.inner.clone() as Arc<dyn supervisor::Context>,
            spec,
            machine,
            None,
        );
        self.inner
            .registry()
            .instances
            .insert(id.clone(), handle.clone());
        drop(guard);
        self.inner.events.emit_created(&id);
        tracing::info!(instance_id = %id, "instance created");
        Ok(handle)
    }

    /// Give instance `h` another size or user data (a start of a stopped
    /// instance carries them): checked as at create, the capacity of the
    /// difference reserved, then stored by its supervisor, which refuses
    /// while a VMM runs. Values equal to its spec's change nothing.
    pub async fn resize(&self, h: &InstanceHandle, r: Resources) -> Result<(), ManagerError> {
        let old = h.spec();
        let new = old.with_resources(r)?;
        if new == *old {
            return Ok(());
        }
        let phase = h.observed().phase;
        if !matches!(
            phase,
            crate::machine::Phase::Created
                | crate::machine::Phase::Stopped
                | crate::machine::Phase::Failed
        ) {
            let op = "change the size or user data of";
            return Err(OpError::from(crate::machine::WrongState { op, phase }).into());
        }
        let id = new.id.clone();
        let before = self.rereserve(&new)?;
        tracing::info!(instance_id = %id, from_vcpus = old.vcpus, to_vcpus = new.vcpus,
            from_memory_mib = old.memory_mib, to_memory_mib = new.memory_mib, "resizing");
        if let Err(e) = h.resize(Arc::new(new)).await {
            if let Some(res) = self.inner.registry().reserved.get_mut(&id) {
                *res = before;
            }
            return Err(e.into());
        }
        Ok(())
    }

    /// Reserve `spec`'s capacity in place of what its instance holds;
    /// return what it held.
    fn rereserve(&self, spec: &InstanceSpec) -> Result<Reservation, ManagerError> {
        let mut r = self.inner.registry();
        let Some(held) = r.reserved.get(&spec.id).copied() else {
            return Err(ManagerError::NotFound(spec.id.clone()));
        };
        let (cpus, mem) = r.allocated();
        let (cpus, mem) = (
            cpus.saturating_sub(held.vcpus),
            mem.saturating_sub(held.memory_mib),
        );
        self.fits(spec, cpus, mem)?;
        r.reserved.insert(
            spec.id.clone(),
            Reservation {
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
            },
        );
        Ok(held)
    }

    /// Whether `spec` fits beside `cpus` vCPUs and `mem` MiB held by others.
    fn fits(&self, spec: &InstanceSpec, cpus: u32, mem: u64) -> Result<(), ManagerError> {
        let (cpu_total, mem_total) = (self.inner.cfg.vcpus, self.inner.memory_offered_mib);
        if cpus + spec.vcpus > cpu_total {
            return Err(ManagerError::Capacity(format!(
                "{} vCPUs requested, {} of {cpu_total} free",
                spec.vcpus,
                cpu_total.saturating_sub(cpus)
            )));
        }
        if mem + spec.memory_mib > mem_total {
            return Err(ManagerError::Capacity(format!(
                "{} MiB requested, {} of {mem_total} MiB free",
                spec.memory_mib,
                mem_total.saturating_sub(mem)
            )));
        }
        Ok(())
    }

    /// Reserve the spec's capacity under its id, refusing duplicates and
    /// what does not fit.
    fn reserve(&self, spec: &InstanceSpec) -> Result<(), ManagerError> {
        let mut r = self.inner.registry();
        if r.reserved.contains_key(&spec.id) {
            return Err(ManagerError::Duplicate(spec.id.clone()));
        }
        let (cpus, mem) = r.allocated();
        self.fits(spec, cpus, mem)?;
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
        let lock = {
            let mut m = inner.registering.lock().unwrap_or_else(|e| e.into_inner());
            m.entry(id.clone()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        tokio::task::spawn_blocking(move || {
            // Held until the work ends, even if this call is dropped.
            let _guard = guard;
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
    /// Rebuild the registry from the state directory after a (re)start.
    ///
    /// Nothing that holds data is deleted for being unreadable: only a
    /// directory with no `spec.json` at all (a create that died before its
    /// commit point, which writes the spec last) is removed. A spec that
    /// cannot be read quarantines the whole directory; a state file that
    /// cannot be read is moved aside and the state rebuilt from the live
    /// VMM, if there is one. Live VMMs are never killed here.
    fn recover(&self) -> Result<(), ManagerError> {
        let dir = self.inner.cfg.state_dir.join("instances");
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| ManagerError::StateDir(dir.display().to_string(), e))?;
        for entry in entries.flatten() {
            let id = entry.file_name().to_string_lossy().into_owned();
            let paths = InstancePaths::new(&self.inner.cfg.state_dir, &id);
            if !paths.spec().exists() {
                tracing::warn!(instance_id = %id, "removing an instance whose create never committed (no spec.json)");
                let _ = std::fs::remove_dir_all(&paths.dir);
                continue;
            }
            let spec: InstanceSpec = match persist::read_json(&paths.spec()) {
                Ok(s) => s,
                Err(e) => {
                    self.quarantine(&id, &paths, &e);
                    continue;
                }
            };
            if spec.version > persist::FORMAT_VERSION {
                tracing::warn!(instance_id = %id, version = spec.version, "spec.json written by a newer agent: reading what this version knows, keeping the rest");
            }
            let obs = match persist::read_json::<Observed>(&paths.state()) {
                Ok(o) => o,
                Err(e) => self.rebuild_state(&spec, &paths, &e),
            };
            self.recover_one(spec, obs, &paths);
        }
        self.remove_orphans();
        Ok(())
    }

    /// Move an instance directory whose spec cannot be read to
    /// `<state>/quarantine/<id>-<unix ms>`, with a `QUARANTINED` note.
    fn quarantine(&self, id: &str, paths: &InstancePaths, err: &PersistError) {
        let qdir = self.inner.cfg.state_dir.join("quarantine");
        let moved_to = qdir.join(format!("{id}-{}", crate::now_ms()));
        let reason = format!("spec.json cannot be read: {}", chain(err));
        let moved =
            std::fs::create_dir_all(&qdir).and_then(|()| std::fs::rename(&paths.dir, &moved_to));
        let (moved_to, reason) = match moved {
            Ok(()) => {
                let _ = std::fs::write(moved_to.join("QUARANTINED"), format!("{reason}\n"));
                (moved_to, reason)
            }
            Err(e) => (
                paths.dir.clone(),
                format!("{reason}; could not move it aside ({e}), left in place"),
            ),
        };
        tracing::error!(instance_id = %id, moved_to = %moved_to.display(), "quarantined an instance: {reason}");
        self.inner.registry().quarantined.push(Quarantined {
            id: id.to_string(),
            moved_to,
            reason,
        });
    }

    /// The observed state of an instance whose `state.json` cannot be read:
    /// the file is kept as `state.json.corrupt-<unix ms>`, and the state is
    /// rebuilt from whether its VMM still runs.
    fn rebuild_state(
        &self,
        spec: &InstanceSpec,
        paths: &InstancePaths,
        err: &PersistError,
    ) -> Observed {
        let kept = paths
            .dir
            .join(format!("state.json.corrupt-{}", crate::now_ms()));
        let _ = std::fs::rename(paths.state(), &kept);
        let vmm = process::find_vmm(None, &paths.socket);
        let what = format!(
            "state.json could not be read ({}; kept as {})",
            chain(err),
            kept.display()
        );
        tracing::error!(instance_id = %spec.id, vmm = ?vmm, "{what}");
        let mut obs = Machine::new(spec.restart_policy, self.inner.cfg.restart.backoff())
            .observed()
            .clone();
        match vmm {
            Some(pid) => {
                obs.phase = crate::machine::Phase::Running;
                obs.intent = crate::machine::Intent::Running;
                obs.pid = Some(pid);
                obs.reason = format!("{what}; re-attached to the running VMM");
            }
            None => {
                obs.phase = crate::machine::Phase::Failed;
                obs.reason = format!("{what}; no VMM was running");
            }
        }
        if let Err(e) = persist::write_json(&paths.state(), &obs) {
            tracing::error!(instance_id = %spec.id, error = %chain(&e), "cannot rewrite state.json");
        }
        obs
    }

    /// Instances quarantined at recovery.
    pub fn quarantined(&self) -> Vec<Quarantined> {
        self.inner.registry().quarantined.clone()
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
        let handle = supervisor::start(
            self.inner.clone() as Arc<dyn supervisor::Context>,
            Arc::new(spec),
            machine,
            Some(found),
        );
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
            .flat_map(|h| crate::resources::taps(&self.inner.cfg, &h.spec()))
            .collect();
        // A quarantined instance's VMM may still run: keep its TAPs (named
        // from its id) and its cgroup.
        let kept_taps: Vec<String> = r
            .quarantined
            .iter()
            .map(|q| crate::spec::tap_stem(&self.inner.cfg.tap_prefix, &q.id))
            .collect();
        for name in tap::list_taps(&self.inner.cfg.tap_prefix) {
            if kept_taps.iter().any(|k| name.starts_with(k.as_str())) {
                continue;
            }
            if !owned.contains(&name) {
                tracing::warn!(tap = %name, "removing an orphaned TAP");
                let _ = tap::delete_tap(&name);
            }
        }
        for id in self.inner.cgroups.list() {
            if !r.instances.contains_key(&id) && !r.quarantined.iter().any(|q| q.id == id) {
                tracing::warn!(cgroup = %id, "removing an orphaned cgroup");
                if let Err(e) = self.inner.cgroups.remove(&id) {
                    tracing::warn!(cgroup = %id, error = %chain(&e), "cannot remove an orphaned cgroup");
                }
            }
        }
    }
}
