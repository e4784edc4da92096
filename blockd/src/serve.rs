//! The volumes this host serves to its instances' VMMs, as their primary:
//! the controller's watch lists each volume attached to an instance of
//! this host (`HostVolumes.serve`); blockd opens a
//! [`ReplicatedStore`] over its in-sync replicas (with this host's own
//! replica as the local copy when it holds one in sync) and serves it over
//! vhost-user at `<dir>/<volume>.sock`, where the agent points the VMM.
//! A volume no longer listed stops being served: its store is revoked, so
//! a frontend still connected (a force-detach from a running instance)
//! gets an I/O error for each request, and no new frontend connects.
//!
//! A store that cannot be opened (a replica unreachable and the
//! controller's answer not yet in, or this primary fenced) is logged and
//! tried again at the next round.
//!
//! Before it serves a volume, blockd opens a serving session with the
//! controller ([`Authority::open_session`], then
//! [`ReplicatedStore::begin_session`]); when it stops, it
//! closes the session clean if every write was flushed everywhere and none
//! failed ([`ReplicatedStore::retire`]). A volume its previous primary
//! closed clean has identical in-sync replicas, and is not compared.
//! Otherwise,
//! as soon as a volume is served, its in-sync replicas are reconciled with
//! this primary's source on a thread of its own
//! ([`ReplicatedStore::reconcile`]): a previous primary that stopped
//! mid-write, or was fenced, may have left them different where a write
//! was never acknowledged.
//!
//! Every round, each replica of a served volume that the controller lists
//! out of sync (a returning or new one, with a replica server) is resynced
//! by this primary on a thread of its own
//! ([`ReplicatedStore::resync`]), one at a time per replica; one that
//! fails (its blockd not back yet) is tried again after [`RESYNC_RETRY`],
//! or at once when its replica server moved (a blockd restarted).

use std::collections::{BTreeSet, HashMap};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use ferro_proto::compute::v1::ServedVolume;

use crate::replication::{Authority, Backup, Options, ReplicatedStore, Session, RESYNC_RETRY};
use crate::server::Volume;
use crate::store::Store;

/// One volume being served.
struct Served {
    epoch: u64,
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    /// The store the connection is served from, replaced when the
    /// primary re-learns its replica set.
    switch: Arc<Switch>,
    /// The replicas being resynced now (or lately failed), by host and
    /// replica server.
    resyncing: Arc<Mutex<BTreeSet<(String, String)>>>,
}

/// Opens this host's copy of volume `id` (`size` bytes) for its primary:
/// `None` when the host holds none. The daemon's gives the replica its
/// replica server holds ([`crate::replica::LocalReplica`]), so that the
/// primary's own writes pass that replica's epoch check.
pub type LocalCopy = Box<dyn Fn(&str, u64) -> Result<Option<Box<dyn Store>>, String> + Send + Sync>;

/// The served volumes of this host.
pub struct Serving {
    dir: PathBuf,
    host_id: String,
    /// Opens this host's copy of a volume.
    local_copy: LocalCopy,
    authority: Arc<dyn Authority>,
    served: HashMap<String, Served>,
}

impl Serving {
    /// Sockets under `dir`; `local_copy` opens this host's copy of a
    /// volume.
    pub fn new(
        dir: &Path,
        host_id: &str,
        local_copy: LocalCopy,
        authority: Arc<dyn Authority>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            host_id: host_id.to_string(),
            local_copy,
            authority,
            served: HashMap::new(),
        })
    }

    /// The daemon is stopping: every served volume stopped at the end of
    /// its queue pass and its store shut down ([`Switch::shut_down`]:
    /// flushed everywhere, its session closed clean where it can be), all
    /// at once, so that a volume whose pass is stuck (waiting for a
    /// replacement store, or for the controller to remove a backup) holds
    /// up no other. The sockets stay: the VMMs reconnect to them when the
    /// next blockd listens there.
    pub fn shut_down(&mut self) {
        std::thread::scope(|scope| {
            for (id, s) in &self.served {
                scope.spawn(move || {
                    let clean = s.switch.shut_down();
                    s.stop.store(true, Ordering::Release);
                    tracing::info!(volume_id = %id, epoch = s.epoch, clean, "stopping: volume let go");
                });
            }
        });
    }

    /// The store volume `id` is served from, if it is served.
    pub fn store(&self, id: &str) -> Option<Arc<Switch>> {
        self.served.get(id).map(|s| s.switch.clone())
    }

    /// Volume `id`'s socket.
    pub fn socket(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.sock"))
    }

    /// Serve exactly `want`. Blocking (opens connections, may wait on the
    /// controller): run it off the async runtime's workers.
    pub fn converge(&mut self, want: &[ServedVolume]) {
        let listed: std::collections::BTreeSet<&str> =
            want.iter().map(|w| w.volume_id.as_str()).collect();
        let gone: Vec<String> = self
            .served
            .keys()
            .filter(|k| !listed.contains(k.as_str()))
            .cloned()
            .collect();
        for id in gone {
            if let Some(s) = self.served.remove(&id) {
                stop(&id, s);
            }
        }
        for w in want {
            if let Some(s) = self.served.get(&w.volume_id) {
                let current = s.switch.current();
                if current.is_fenced() && w.epoch > current.epoch() {
                    self.relearn(w);
                    continue;
                }
                resync_behind(s, w);
                continue;
            }
            match self.open(w) {
                Ok(s) => {
                    self.served.insert(w.volume_id.clone(), s);
                }
                Err(e) => tracing::warn!(
                    volume_id = %w.volume_id,
                    instance_id = %w.instance_id,
                    "cannot serve the volume yet: {e}"
                ),
            }
        }
    }

    /// The store of a volume still served here was fenced by an epoch the
    /// controller raised without it (a replica's file made again, say):
    /// a new store at the watch's epoch, with its replica set, takes over
    /// under the same connection, and the requests waiting on the old one
    /// ([`Switch`]) go on with it.
    fn relearn(&mut self, w: &ServedVolume) {
        let id = &w.volume_id;
        let opened = self.open_store(w);
        let Some(s) = self.served.get_mut(id) else {
            return;
        };
        match opened {
            Ok((store, session)) => {
                let store = Arc::new(store);
                let old = s.switch.replace(store.clone());
                old.retire();
                s.epoch = session.epoch;
                tracing::warn!(volume_id = %id, epoch = session.epoch, in_sync = ?store.in_sync(),
                    "fenced by a newer epoch while serving: re-learnt the replica set");
                reconcile_in_background(id, store, s.stop.clone());
                resync_behind(s, w);
            }
            Err(e) => {
                tracing::warn!(volume_id = %id, "fenced, and cannot serve at the new epoch yet: {e}")
            }
        }
    }

    /// A primary's store for `w`: a session of its own, this host's copy
    /// when it is in sync here, and the backups in sync.
    fn open_store(&self, w: &ServedVolume) -> Result<(ReplicatedStore, Session), String> {
        let id = &w.volume_id;
        let mine = w
            .peers
            .iter()
            .any(|p| p.host_id == self.host_id && p.in_sync);
        let backups: Vec<Backup> = w
            .peers
            .iter()
            .filter(|p| p.in_sync && p.host_id != self.host_id)
            .map(|p| {
                let addr = p
                    .addr
                    .parse()
                    .map_err(|_| format!("replica {} has no server address yet", p.host_id))?;
                Ok(Backup {
                    id: p.host_id.clone(),
                    addr,
                })
            })
            .collect::<Result<_, String>>()?;
        let options = Options::default();
        // Before anything is written: a session of its own, whether the
        // previous primary left the replicas identical, and the epoch to
        // serve at (raised to fence a primary elsewhere that did not stop
        // clean).
        let session = self
            .authority
            .open_session(id, w.epoch)
            .map_err(|e| e.to_string())?;
        let epoch = session.epoch;
        let local = if mine {
            // In sync here: the writes must reach this copy too, so no
            // serving without it (tried again next round).
            let copy = (self.local_copy)(id, w.size_bytes)?;
            Some(copy.ok_or_else(|| {
                "this host's replica is in sync but not open here (yet)".to_string()
            })?)
        } else {
            None
        };
        let store = if let Some(local) = local {
            ReplicatedStore::open(id, epoch, local, &backups, self.authority.clone(), options)
        } else {
            ReplicatedStore::open_remote(
                id,
                epoch,
                w.size_bytes,
                &backups,
                self.authority.clone(),
                options,
            )
        }
        .map_err(|e| e.to_string())?;
        store.begin_session(session);
        Ok((store, session))
    }

    fn open(&self, w: &ServedVolume) -> Result<Served, String> {
        let id = &w.volume_id;
        let (store, session) = self.open_store(w)?;
        let (epoch, was_clean) = (session.epoch, session.was_clean);
        let (local, backups) = (store.has_local(), store.in_sync().len());
        let store = Arc::new(store);
        let switch = Arc::new(Switch::new(store.clone()));
        let socket = self.socket(id);
        let dyn_store: Arc<dyn Store> = switch.clone();
        let volume = Volume::with_store(id, &socket, dyn_store).map_err(|e| e.to_string())?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let vid = id.clone();
        std::thread::Builder::new()
            .name(format!("serve-{id}"))
            .spawn(move || {
                if let Err(e) = volume.serve_until(&flag) {
                    tracing::error!(volume_id = %vid, "serving ended: {e}");
                }
            })
            .map_err(|e| e.to_string())?;
        tracing::info!(
            volume_id = %id,
            instance_id = %w.instance_id,
            epoch,
            local,
            backups,
            socket = %socket.display(),
            was_clean,
            "serving the volume"
        );
        reconcile_in_background(id, store.clone(), stop.clone());
        let served = Served {
            epoch,
            socket,
            stop,
            switch,
            resyncing: Arc::default(),
        };
        resync_behind(&served, w);
        Ok(served)
    }
}

/// Reconciles the in-sync replicas a previous primary may have left
/// different ([`ReplicatedStore::reconcile`]) on a thread of its own while
/// the volume is served, again after [`RECONCILE_RETRY`] for a backup not
/// reached or compared at an epoch that moved, until every one is done or
/// serving stops.
fn reconcile_in_background(id: &str, store: Arc<ReplicatedStore>, stop: Arc<AtomicBool>) {
    let vid = id.to_string();
    let spawned = std::thread::Builder::new()
        .name(format!("reconcile-{id}"))
        .spawn(move || loop {
            if stop.load(Ordering::Acquire) || store.is_fenced() {
                return;
            }
            match store.reconcile() {
                Ok(r) if r.left.is_empty() => {
                    // The frontend may have gone while this ran.
                    store.settle();
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(volume_id = %vid, "reconcile stopped: {e}");
                    return;
                }
            }
            std::thread::sleep(RECONCILE_RETRY);
        });
    if let Err(e) = spawned {
        tracing::error!(volume_id = %id, "cannot start reconciling the replicas: {e}");
    }
}

/// The pause before reconciling a backup again that could not be.
pub const RECONCILE_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Starts a resync of each replica of `w` out of sync that is not being
/// resynced already.
fn resync_behind(s: &Served, w: &ServedVolume) {
    let current = s.switch.current();
    if current.is_fenced() {
        return;
    }
    let in_sync = current.in_sync();
    for p in w.peers.iter().filter(|p| !p.in_sync) {
        if in_sync.contains(&p.host_id) {
            // Back in sync; the controller's word is on its way.
            continue;
        }
        let Ok(addr) = p.addr.parse() else {
            continue;
        };
        let backup = Backup {
            id: p.host_id.clone(),
            addr,
        };
        let fresh = s
            .resyncing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((backup.id.clone(), p.addr.clone()));
        if !fresh {
            continue;
        }
        let key = (backup.id.clone(), p.addr.clone());
        let (store, resyncing) = (current.clone(), s.resyncing.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("resync-{}", w.volume_id))
            .spawn(move || {
                // It logs what it copied, or why it failed; a failure at
                // this address is not tried again for a while.
                if store.resync(&backup).is_err() {
                    std::thread::sleep(RESYNC_RETRY);
                } else {
                    // It opened a session if none was; the frontend may
                    // be gone.
                    store.settle();
                }
                resyncing
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&key);
            });
        if let Err(e) = spawned {
            tracing::warn!(volume_id = %w.volume_id, "cannot start a resync: {e}");
            s.resyncing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&(p.host_id.clone(), p.addr.clone()));
        }
    }
}

/// Stops serving: the store retired (revoked: a frontend still connected
/// — a volume force-detached from a running instance — gets an I/O error
/// for every request from now on, and nothing more is written; and its
/// session closed clean when the replicas are identical), the flag, the
/// socket file gone, and a connection that wakes the listener so that it
/// sees the flag.
fn stop(id: &str, s: Served) {
    let clean = s.switch.retire();
    s.stop.store(true, Ordering::Release);
    let _ = UnixStream::connect(&s.socket);
    let _ = std::fs::remove_file(&s.socket);
    tracing::info!(volume_id = %id, epoch = s.epoch, clean, "no longer serving the volume");
}

/// The store a connection is served from: a primary's [`ReplicatedStore`],
/// replaced ([`Switch::replace`]) when the primary re-learns its replica
/// set at a newer epoch. A request that fails because the store was
/// fenced waits, up to [`RELEARN_WAIT`], for the replacement and is then
/// carried out by it (writing the same bytes again is harmless), so the
/// guest sees a pause, not an error. Once a wait for a store ran out, the
/// requests after it fail at once.
pub struct Switch {
    current: Mutex<Arc<ReplicatedStore>>,
    replaced: std::sync::Condvar,
    /// Set by [`Switch::retire`]: no replacement is coming.
    retired: AtomicBool,
    /// The fenced store a request already waited [`RELEARN_WAIT`] for in
    /// vain (its address): later ones fail at once rather than each wait.
    gave_up: std::sync::atomic::AtomicUsize,
    /// The volume's size in sectors (every replacement serves the same
    /// volume): asked per request, so not looked up through the lock.
    sectors: u64,
    /// Held, shared, by every queue pass ([`Store::passes`]); taken for
    /// good by [`Switch::shut_down`].
    passes: std::sync::RwLock<()>,
}

/// Longest a request waits for a fenced store's replacement.
pub const RELEARN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl Switch {
    /// Serving from `store`.
    pub fn new(store: Arc<ReplicatedStore>) -> Self {
        Switch {
            sectors: store.capacity(),
            current: Mutex::new(store),
            replaced: std::sync::Condvar::new(),
            retired: AtomicBool::new(false),
            gave_up: std::sync::atomic::AtomicUsize::new(0),
            passes: std::sync::RwLock::new(()),
        }
    }

    /// The store serving now.
    pub fn current(&self) -> Arc<ReplicatedStore> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Serves from `store` from now on; returns the one it replaces.
    pub fn replace(&self, store: Arc<ReplicatedStore>) -> Arc<ReplicatedStore> {
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let old = std::mem::replace(&mut *cur, store);
        self.replaced.notify_all();
        old
    }

    /// Stops serving for good: the current store retired
    /// ([`ReplicatedStore::retire`]), nobody waits for another.
    pub fn retire(&self) -> bool {
        self.end_with(ReplicatedStore::retire)
    }

    /// No replacement is coming: the current store ended by `end`, and
    /// every request waiting for a replacement woken to give up.
    fn end_with(&self, end: impl FnOnce(&ReplicatedStore) -> bool) -> bool {
        self.retired.store(true, Ordering::Release);
        let clean = end(&self.current());
        let _guard = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        self.replaced.notify_all();
        clean
    }

    /// The daemon is stopping: once the queue pass running now has
    /// signalled its completions, no pass starts again (the requests left
    /// on the ring stay there for the next blockd, which the frontend
    /// reconnects to), and the current store is shut down
    /// ([`ReplicatedStore::shut_down`]); nobody waits for another.
    pub fn shut_down(&self) -> bool {
        let stalled = self.passes.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::forget(stalled);
        self.end_with(ReplicatedStore::shut_down)
    }

    /// After `store` failed a request: the store to try it again with,
    /// when `store` was fenced and a replacement came within
    /// [`RELEARN_WAIT`].
    fn replacement(&self, store: &Arc<ReplicatedStore>) -> Option<Arc<ReplicatedStore>> {
        let id = Arc::as_ptr(store) as usize;
        if !store.is_fenced() || self.gave_up.load(Ordering::Acquire) == id {
            return None;
        }
        let deadline = std::time::Instant::now() + RELEARN_WAIT;
        let mut cur = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if !Arc::ptr_eq(&cur, store) {
                return Some(cur.clone());
            }
            let now = std::time::Instant::now();
            if self.retired.load(Ordering::Acquire) {
                return None;
            }
            if now >= deadline {
                self.gave_up.store(id, Ordering::Release);
                return None;
            }
            cur = self
                .replaced
                .wait_timeout(cur, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Store for Switch {
    fn capacity(&self) -> u64 {
        self.sectors
    }

    fn passes(&self) -> Option<&std::sync::RwLock<()>> {
        Some(&self.passes)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let mut store = self.current();
        loop {
            match store.read_at(buf, offset) {
                Err(e) => match self.replacement(&store) {
                    Some(next) => store = next,
                    None => return Err(e),
                },
                ok => return ok,
            }
        }
    }

    fn read_batch(
        &self,
        reads: &[(u64, &[vm_memory::VolatileSlice<'_>])],
    ) -> Vec<std::io::Result<()>> {
        let mut store = self.current();
        loop {
            let done = store.read_batch(reads);
            if done.iter().all(Result::is_ok) {
                return done;
            }
            match self.replacement(&store) {
                Some(next) => store = next,
                None => return done,
            }
        }
    }

    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<std::io::Result<()>> {
        let mut store = self.current();
        let mut done = store.write_batch(writes);
        while done.iter().any(Result::is_err) {
            let Some(next) = self.replacement(&store) else {
                break;
            };
            store = next;
            let again: Vec<usize> = (0..writes.len()).filter(|&i| done[i].is_err()).collect();
            let retry: Vec<(u64, &[u8])> = again.iter().map(|&i| writes[i]).collect();
            for (i, r) in again.into_iter().zip(store.write_batch(&retry)) {
                done[i] = r;
            }
        }
        done
    }

    fn read_into(&self, bufs: &[vm_memory::VolatileSlice<'_>], offset: u64) -> std::io::Result<()> {
        self.read_batch(&[(offset, bufs)]).pop().unwrap_or(Ok(()))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.write_batch(&[(offset, buf)]).pop().unwrap_or(Ok(()))
    }

    fn flush(&self) -> std::io::Result<()> {
        let mut store = self.current();
        loop {
            match store.flush() {
                Err(e) => match self.replacement(&store) {
                    Some(next) => store = next,
                    None => return Err(e),
                },
                ok => return ok,
            }
        }
    }

    fn idle(&self) {
        self.current().idle();
    }
}
