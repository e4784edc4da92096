//! The primary side of replication: [`ReplicatedStore`], a [`Store`] that
//! writes the local copy and every in-sync backup replica, synchronously.
//!
//! # A write's path
//!
//! The primary encodes the write once, sends it to every in-sync backup,
//! writes its local copy meanwhile, then waits for each backup's `Ack`. The
//! write returns `Ok` (and the guest sees it complete) only when the local
//! write and every in-sync backup succeeded. A flush goes the same way: the
//! local `fdatasync` and every backup's, before it returns.
//!
//! The writes of one pass over the virtio queue come as one batch
//! ([`Store::write_batch`]) and are pipelined: every frame of a window (at
//! most 64 frames) goes to every backup before any answer is read; a
//! backup answers a connection's frames in order, so its answers are then
//! read in order and matched by sequence number. Each write's result is
//! still that of a lone write. A barrier such as a flush is the caller's:
//! it calls [`Store::flush`] after the batch returns.
//!
//! # When a backup fails
//!
//! A backup that fails (connection error, timeout, `Nack`) is never just
//! dropped: a primary that could shrink its in-sync set on its own could go
//! on acknowledging writes that a new primary elsewhere never sees (split
//! brain). It asks the [`Authority`] (the controller) to remove it. The
//! authority raises the volume's epoch on the remaining replicas, so any
//! other primary of the old epoch is fenced, and answers with the new epoch;
//! only then does this primary go on, at the new epoch, with the smaller
//! set. If the authority refuses, this primary was itself fenced: the write
//! fails with an I/O error and so does all later I/O.
//!
//! While any backup is out, every written region is marked in a
//! [`DirtyMap`], and so are the regions written since the last flush that
//! reached every replica (a backup that crashed may have lost them): a
//! resync copies exactly those regions.
//!
//! A write that failed may have reached some replicas and not others.
//! Such regions are not acknowledged to the guest; a dropped backup has
//! them in the dirty map, and a resync by a primary without that map
//! compares checksums, so the backup agrees with the good copy once it is
//! back.
//!
//! # Reconcile: the replicas a previous primary left
//!
//! A primary that stopped mid-write (its blockd killed, its host dead, or
//! fenced: its own copy and the backups still at its epoch took a write
//! the others refused) can leave replicas that are all in sync yet differ
//! where a write was never acknowledged. So a new primary compares each
//! in-sync backup with its source (its own copy, else the first backup in
//! sync) by checksums, region by region, and copies the regions that
//! differ under the write lock ([`ReplicatedStore::reconcile`]; the serving
//! daemon runs it on a thread of its own as soon as it serves). Until a
//! backup is reconciled, a resync of it never trusts the dirty map (which
//! only knows what this primary wrote): it compares checksums.
//!
//! # Resync
//!
//! [`ReplicatedStore::resync`] brings a backup that is out of the set (a
//! returning one, or a new one) back: it connects at the current epoch
//! (the controller gives an out-of-sync replica the epoch too, so it takes
//! this primary's frames and still refuses every older one), copies the
//! regions it missed (the dirty map when this primary dropped it itself,
//! else the regions whose checksums differ: [`crate::resync`]) while the
//! volume keeps taking writes, marking those in a map of its own and
//! copying them again, pass after pass, until few are left. The last pass
//! runs under the write lock; the backup flushes; then the [`Authority`]
//! puts it back in sync and raises the epoch (a set change is fenced like a
//! removal), and only with that epoch does the primary take it into its
//! in-sync set.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::dirty::{DirtyMap, DEFAULT_REGION};
use crate::link::Link;
use crate::request::SECTOR_SIZE;
use crate::store::Store;
use crate::wire::{self, valid_volume_id, Body, Frame, MAX_PAYLOAD};

/// How long a primary waits before asking a backup that is behind its
/// epoch again.
const EPOCH_CATCH_UP_PAUSE: Duration = Duration::from_millis(50);
/// How [`check_answer`] names a backup behind the primary's epoch.
const EPOCH_AHEAD: &str = "EpochAhead";

/// The authority refused: this primary's epoch is no longer current.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("volume {volume}: epoch {epoch} was fenced")]
pub struct Fenced {
    /// The volume.
    pub volume: String,
    /// The epoch this primary held.
    pub epoch: u64,
}

/// The configuration authority for a volume's replica set (the controller;
/// tests use a fake).
pub trait Authority: Send + Sync {
    /// Removes `replica` from `volume`'s in-sync set, if `epoch` is still
    /// the volume's current epoch. The authority raises the epoch on the
    /// remaining replicas before it answers, and returns the new epoch.
    fn remove_replica(&self, volume: &str, epoch: u64, replica: &str) -> Result<u64, Fenced>;

    /// Puts `replica`, just resynced by this primary at `epoch`, back in
    /// `volume`'s in-sync set, if `epoch` is still current. The authority
    /// raises the epoch (on every replica in sync, `replica` included)
    /// before it answers, and returns the new epoch.
    fn add_replica(&self, volume: &str, epoch: u64, replica: &str) -> Result<u64, Fenced>;

    /// This primary is about to serve `volume` at `epoch` (before it
    /// opens its store): the authority opens a new serving session, says
    /// whether the previous primary closed the volume clean (its in-sync
    /// replicas then need no comparing) and gives the epoch to serve at
    /// (raised when another host's primary did not close its session
    /// clean: it is fenced). By default there are no sessions: never
    /// clean, the same epoch.
    fn open_session(&self, volume: &str, epoch: u64) -> Result<Session, Fenced> {
        let _ = volume;
        Ok(Session {
            id: 0,
            was_clean: false,
            epoch,
        })
    }

    /// The primary of `session` has stopped writing `volume`, leaving its
    /// in-sync replicas identical ([`ReplicatedStore::retire`]). Refused
    /// when another session began since or the epoch moved. By default a
    /// no-op.
    fn close_session(&self, volume: &str, epoch: u64, session: u64) -> Result<(), Fenced> {
        let _ = (volume, epoch, session);
        Ok(())
    }
}

/// A serving session, as [`Authority::open_session`] answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    /// Its number (0: the authority keeps no sessions).
    pub id: u64,
    /// The previous session was closed clean.
    pub was_clean: bool,
    /// The epoch to serve at.
    pub epoch: u64,
}

/// A backup replica to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backup {
    /// Its id, as the authority knows it (the host).
    pub id: String,
    /// Its replica server.
    pub addr: SocketAddr,
}

/// Tunables.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Longest wait for a backup to connect, take a frame or answer one.
    pub timeout: Duration,
    /// Dirty-map region size in bytes.
    pub region_size: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(5),
            region_size: DEFAULT_REGION,
        }
    }
}

/// Errors opening a replicated volume.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The volume id is not one the wire accepts.
    #[error("bad volume id {0:?}")]
    BadVolumeId(String),
    /// A primary without a copy of its own was given no backup.
    #[error("volume {0}: no replica to write to")]
    NoReplica(String),
    /// A backup was unreachable and the authority refused to remove it.
    #[error("cannot open the replicated volume")]
    Fenced(#[from] Fenced),
}

/// Why a resync did not bring a backup back (the backup stays out; it can
/// be tried again).
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    /// The backup is already in the in-sync set.
    #[error("{0} is already in sync")]
    InSync(String),
    /// Another resync of the backup is running.
    #[error("{0} is being resynced already")]
    Busy(String),
    /// This primary was fenced, or the authority refused to take the
    /// backup back.
    #[error("fenced, or refused by the authority")]
    Fenced(#[from] Fenced),
    /// The volume's epoch changed during the resync (another set change).
    #[error("the epoch moved from {from} to {to} during the resync")]
    EpochMoved {
        /// The epoch the resync started at.
        from: u64,
        /// The epoch now.
        to: u64,
    },
    /// A replica could not be reached, refused, or answered wrong.
    #[error("replica {replica}: {why}")]
    Replica {
        /// Its id.
        replica: String,
        /// What went wrong.
        why: String,
    },
    /// The primary's own copy failed.
    #[error("the local copy")]
    Local(#[source] io::Error),
}

/// What a resync copied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResyncReport {
    /// Regions copied (a region written again during the resync and copied
    /// again counts twice).
    pub regions: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Copy passes, the last one under the write lock.
    pub passes: u32,
    /// Whether the first pass compared checksums (no dirty map of this
    /// primary covered the backup).
    pub by_checksum: bool,
    /// The epoch the authority granted with the backup back in sync.
    pub epoch: u64,
}

/// What one [`ReplicatedStore::reconcile`] round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Backups compared with the source (and made to agree with it).
    pub backups: u32,
    /// Regions that differed and were copied.
    pub regions: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// In-sync backups still not reconciled (unreachable, or the epoch
    /// moved): try again.
    pub left: Vec<String>,
}

/// How long a daemon waits before it tries a resync that failed again at
/// the same address (a replica whose blockd is not back yet).
pub const RESYNC_RETRY: Duration = Duration::from_secs(30);

/// Copy passes before the last one is taken under the write lock anyway.
const MAX_PASSES: u32 = 8;
/// Regions left few enough to copy under the write lock.
const FINAL_PASS_REGIONS: u64 = 16;

/// Write frames sent to a backup before its answers are read: their
/// answers (about a hundred bytes each) wait in the socket buffers
/// meanwhile, far from filling them, so a backup never blocks answering
/// while the primary still sends. A queue of depth 32 fits in one window.
const MAX_IN_FLIGHT: usize = 64;
/// Payload bytes of one window, bounding the frames held in memory.
const MAX_WINDOW_BYTES: usize = 16 << 20;

/// A backup that failed a request.
struct PeerFailure {
    id: String,
    why: String,
    /// The first of the frames sent that it did not acknowledge.
    unacked: usize,
}

/// A connected, in-sync backup.
struct Peer {
    id: String,
    addr: SocketAddr,
    link: Link,
}

/// Everything a write changes, under one lock: writes are serialized.
struct State {
    epoch: u64,
    seq: u64,
    in_sync: Vec<Peer>,
    /// Backups removed from the set, in order.
    out: Vec<String>,
    /// Regions written since the last flush every replica completed.
    since_flush: DirtyMap,
    /// Regions a resync of the removed backups must copy.
    dirty: DirtyMap,
    /// Per backup being resynced: the regions written since its last copy
    /// pass began.
    catchup: HashMap<String, DirtyMap>,
    /// Regions copied by each completed resync, by backup.
    resynced: HashMap<String, ResyncReport>,
    /// Backups in the set since open that [`ReplicatedStore::reconcile`]
    /// has not compared with the source yet: they may differ from it where
    /// an earlier primary's write was never acknowledged, so a resync of
    /// one compares checksums rather than trusting the dirty map.
    unreconciled: std::collections::BTreeSet<String>,
    /// The serving session [`ReplicatedStore::begin_session`] took.
    session: Option<Session>,
    /// That session was closed clean while no frontend was connected
    /// ([`ReplicatedStore::close_idle`]); the next write opens a new one.
    closed: bool,
    /// The frontend went away ([`ReplicatedStore::close_idle`] was asked)
    /// and nothing was written since: [`ReplicatedStore::settle`] may
    /// close the session once what kept it open is done.
    no_frontend: bool,
    /// A write or flush failed since open: the copies may differ where
    /// it did not complete.
    failed: bool,
    fenced: bool,
}

/// A volume's primary: the local store plus its in-sync backups.
pub struct ReplicatedStore {
    volume: String,
    timeout: Duration,
    /// The primary's own copy; none when the serving host holds no replica
    /// (reads then come from the first in-sync backup).
    local: Option<Box<dyn Store>>,
    /// Capacity in sectors.
    sectors: u64,
    authority: Arc<dyn Authority>,
    state: Mutex<State>,
}

impl ReplicatedStore {
    /// Opens `volume` at `epoch` over `local`, connecting to `backups` and
    /// greeting each (`Hello`: same epoch, same capacity); one that cannot
    /// be reached or refuses is removed through the authority.
    pub fn open(
        volume: &str,
        epoch: u64,
        local: Box<dyn Store>,
        backups: &[Backup],
        authority: Arc<dyn Authority>,
        options: Options,
    ) -> Result<Self, ReplicationError> {
        let size = local.capacity() * SECTOR_SIZE;
        Self::open_with(
            volume,
            epoch,
            Some(local),
            size,
            backups,
            authority,
            options,
        )
    }

    /// Like [`ReplicatedStore::open`] for a primary without a copy of its
    /// own (the instance's host holds no replica): `size` bytes, every
    /// write to each of `backups`, reads from the first in sync.
    pub fn open_remote(
        volume: &str,
        epoch: u64,
        size: u64,
        backups: &[Backup],
        authority: Arc<dyn Authority>,
        options: Options,
    ) -> Result<Self, ReplicationError> {
        if backups.is_empty() {
            return Err(ReplicationError::NoReplica(volume.to_string()));
        }
        Self::open_with(volume, epoch, None, size, backups, authority, options)
    }

    fn open_with(
        volume: &str,
        epoch: u64,
        local: Option<Box<dyn Store>>,
        size: u64,
        backups: &[Backup],
        authority: Arc<dyn Authority>,
        options: Options,
    ) -> Result<Self, ReplicationError> {
        if !valid_volume_id(volume) {
            return Err(ReplicationError::BadVolumeId(volume.to_string()));
        }
        // A region is copied in one frame.
        let region = options.region_size.min(u64::from(MAX_PAYLOAD));
        let map = DirtyMap::new(size, region);
        let store = ReplicatedStore {
            volume: volume.to_string(),
            timeout: options.timeout,
            local,
            sectors: size / SECTOR_SIZE,
            authority,
            state: Mutex::new(State {
                epoch,
                seq: 0,
                in_sync: Vec::new(),
                out: Vec::new(),
                since_flush: map.clone(),
                dirty: map,
                catchup: HashMap::new(),
                resynced: HashMap::new(),
                unreconciled: backups.iter().map(|b| b.id.clone()).collect(),
                session: None,
                closed: false,
                no_frontend: false,
                failed: false,
                fenced: false,
            }),
        };
        let mut failed = Vec::new();
        {
            let mut st = store.lock();
            for b in backups {
                match store.connect(b, &mut st, options.timeout) {
                    Ok(link) => st.in_sync.push(Peer {
                        id: b.id.clone(),
                        addr: b.addr,
                        link,
                    }),
                    Err(why) => failed.push((b.id.clone(), why)),
                }
            }
            for (id, why) in failed {
                store.remove(&mut st, &id, &why)?;
            }
        }
        Ok(store)
    }

    /// Connects to `b` and says hello at the current epoch.
    fn connect(&self, b: &Backup, st: &mut State, timeout: Duration) -> Result<Link, String> {
        let stream = TcpStream::connect_timeout(&b.addr, timeout).map_err(|e| e.to_string())?;
        let setup = |s: &TcpStream| {
            s.set_read_timeout(Some(timeout))?;
            s.set_write_timeout(Some(timeout))
        };
        setup(&stream).map_err(|e| e.to_string())?;
        let mut link = Link::new(stream).map_err(|e| e.to_string())?;
        let capacity = self.sectors * SECTOR_SIZE;
        let deadline = Instant::now() + timeout;
        loop {
            st.seq += 1;
            let hello = self.frame(st, Body::Hello { capacity });
            link.send(&hello).map_err(|e| crate::error_chain(&e))?;
            match expect_ack(&mut link, &hello) {
                Ok(Body::Ack { offset, .. }) if offset == capacity => return Ok(link),
                Ok(_) => return Err(format!("replica's capacity differs from {capacity}")),
                // A replica that has not taken the epoch from its own
                // watch yet (a moment after this primary's) is not failed.
                Err(why) if why.contains(EPOCH_AHEAD) && Instant::now() < deadline => {
                    std::thread::sleep(EPOCH_CATCH_UP_PAUSE);
                }
                Err(why) => return Err(why),
            }
        }
    }

    /// The volume's current epoch as this primary holds it.
    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// The ids of the in-sync backups.
    pub fn in_sync(&self) -> Vec<String> {
        self.lock().in_sync.iter().map(|p| p.id.clone()).collect()
    }

    /// The ids of the backups removed from the set.
    pub fn out_of_sync(&self) -> Vec<String> {
        self.lock().out.clone()
    }

    /// The regions a resync of the removed backups must copy.
    pub fn dirty(&self) -> DirtyMap {
        self.lock().dirty.clone()
    }

    /// What the last completed resync of each backup copied.
    pub fn resynced(&self) -> HashMap<String, ResyncReport> {
        self.lock().resynced.clone()
    }

    /// True if the primary writes a copy of its own host's.
    pub fn has_local(&self) -> bool {
        self.local.is_some()
    }

    /// True once the authority refused this primary (or it was revoked).
    pub fn is_fenced(&self) -> bool {
        self.lock().fenced
    }

    /// This host is no longer to serve the volume (detached, forced while
    /// its instance runs; or moved): every request from now on fails with
    /// an I/O error, as the authority's refusal makes it, instead of
    /// writing to replicas another primary may own. Waits for the I/O in
    /// progress (it holds the state).
    pub fn revoke(&self) {
        let mut st = self.lock();
        if !st.fenced {
            st.fenced = true;
            tracing::info!(volume_id = %self.volume, epoch = st.epoch, "revoked: refusing all I/O");
        }
    }

    /// Takes `session` (from [`Authority::open_session`], before this
    /// store was opened at its epoch) as this primary's, before the first
    /// write. When the previous primary closed the volume clean, the
    /// in-sync replicas are identical: none is left to [`Self::reconcile`].
    pub fn begin_session(&self, session: Session) {
        let mut st = self.lock();
        st.session = Some(session);
        if session.was_clean {
            st.unreconciled.clear();
        }
        tracing::info!(
            volume_id = %self.volume,
            epoch = st.epoch,
            session = session.id,
            was_clean = session.was_clean,
            "serving session begun"
        );
    }

    /// No frontend is connected (its VMM stopped or went away): makes every
    /// write durable on every in-sync replica and closes the session clean
    /// under the same conditions as [`Self::retire`], but goes on serving:
    /// the next write first opens a new session ([`Self::reopen`]). An
    /// instance stopped here and started on another host then needs no
    /// comparison there. Whether it closed.
    pub fn close_idle(&self) -> bool {
        let mut st = self.lock();
        st.no_frontend = true;
        let Some(session) = st.session else {
            return false;
        };
        if st.fenced || st.closed {
            return false;
        }
        if !st.since_flush.is_clean() {
            if let Err(e) = self.flush_locked(&mut st) {
                st.failed = true;
                tracing::warn!(volume_id = %self.volume, epoch = st.epoch, "no frontend; flush failed, session left open: {e}");
                return false;
            }
        }
        if st.failed || !st.unreconciled.is_empty() || !st.catchup.is_empty() {
            tracing::info!(volume_id = %self.volume, epoch = st.epoch, "no frontend; session left open (a write failed, or replicas not compared)");
            return false;
        }
        match self
            .authority
            .close_session(&self.volume, st.epoch, session.id)
        {
            Ok(()) => {
                st.closed = true;
                tracing::info!(volume_id = %self.volume, epoch = st.epoch, session = session.id, "no frontend; session closed clean");
                true
            }
            Err(e) => {
                tracing::warn!(volume_id = %self.volume, epoch = st.epoch, session = session.id, "no frontend; session not closed: {e}");
                false
            }
        }
    }

    /// After a reconcile or a resync finished: if the frontend went away
    /// meanwhile (and nothing was written since), closes the session as
    /// [`Self::close_idle`] would have, had they been done then. Whether
    /// it closed.
    pub fn settle(&self) -> bool {
        {
            let st = self.lock();
            if !st.no_frontend || st.closed || st.fenced {
                return false;
            }
        }
        self.close_idle()
    }

    /// Before the first write after [`Self::close_idle`]: a new session at
    /// this store's epoch. One the authority refuses, or at a moved epoch
    /// (another primary took over meanwhile), fences this store.
    fn reopen(&self, st: &mut State) -> io::Result<()> {
        match self.authority.open_session(&self.volume, st.epoch) {
            Ok(s) if s.epoch == st.epoch => {
                st.session = Some(s);
                st.closed = false;
                tracing::info!(volume_id = %self.volume, epoch = st.epoch, session = s.id, was_clean = s.was_clean, "serving session reopened");
                Ok(())
            }
            Ok(s) => {
                st.fenced = true;
                Err(io::Error::other(format!(
                    "volume {}: the epoch moved from {} to {} while no frontend was connected (fenced)",
                    self.volume, st.epoch, s.epoch
                )))
            }
            Err(f) => {
                st.fenced = true;
                Err(io::Error::other(f))
            }
        }
    }

    /// Stops serving for good, as [`Self::revoke`], and closes the session
    /// clean with the authority when the in-sync replicas are identical:
    /// a session was begun, every write since was flushed to every
    /// in-sync replica, none failed, every backup was reconciled, and no
    /// resync is copying (its copy may still land after this returns).
    /// Nothing is sent to the replicas (a flush here could fail a backup
    /// under a primary that already took over). Whether it closed clean.
    pub fn retire(&self) -> bool {
        let (session, epoch) = {
            let mut st = self.lock();
            if st.closed && !st.fenced {
                // Closed clean while idle, and nothing written since.
                st.fenced = true;
                tracing::info!(volume_id = %self.volume, epoch = st.epoch, "revoked: refusing all I/O; closed clean while idle");
                return true;
            }
            let clean = !st.fenced
                && !st.failed
                && st.since_flush.is_clean()
                && st.unreconciled.is_empty()
                && st.catchup.is_empty();
            st.fenced = true;
            match st.session {
                Some(s) if clean => (s.id, st.epoch),
                _ => {
                    tracing::info!(volume_id = %self.volume, epoch = st.epoch, "revoked: refusing all I/O; not closed clean");
                    return false;
                }
            }
        };
        tracing::info!(volume_id = %self.volume, epoch, session, "revoked: refusing all I/O");
        match self.authority.close_session(&self.volume, epoch, session) {
            Ok(()) => {
                tracing::info!(volume_id = %self.volume, epoch, session, "closed clean");
                true
            }
            Err(e) => {
                tracing::warn!(volume_id = %self.volume, epoch, session, "not closed clean: {e}");
                false
            }
        }
    }

    /// The daemon is stopping, the volume's queue stalled (`Switch::shut_down`
    /// in the daemon's `serve`: no request in flight): makes every write durable on every in-sync
    /// replica, then stops for good as [`Self::retire`] does, closing the
    /// session clean under its conditions. A blockd restarted on this host
    /// (an upgrade, `systemctl restart`) then serves the volume without
    /// comparing its replicas. Whether it closed clean.
    pub fn shut_down(&self) -> bool {
        {
            let mut st = self.lock();
            if !st.fenced && !st.closed && !st.since_flush.is_clean() {
                if let Err(e) = self.flush_locked(&mut st) {
                    st.failed = true;
                    tracing::warn!(volume_id = %self.volume, epoch = st.epoch, "stopping; flush failed: {e}");
                }
            }
        }
        self.retire()
    }

    /// The local flush and every in-sync backup's; on success the writes
    /// before it are durable on every replica still in the set.
    fn flush_locked(&self, st: &mut State) -> io::Result<()> {
        st.seq += 1;
        let frame = self.frame(st, Body::Flush);
        let frames = std::slice::from_ref(&frame);
        let (local, failed) = self.replicate(st, frames, || match &self.local {
            Some(l) => l.flush(),
            None => Ok(()),
        })?;
        self.remove_all(st, failed)?;
        local?;
        // Every replica still in the set has made the writes durable.
        st.since_flush.clear();
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn frame(&self, st: &State, body: Body) -> Frame {
        Frame {
            volume: self.volume.clone(),
            epoch: st.epoch,
            seq: st.seq,
            body,
        }
    }

    fn check_fenced(&self, st: &State) -> io::Result<()> {
        if st.fenced {
            return Err(fenced_error(&self.volume, st.epoch));
        }
        Ok(())
    }

    /// Like [`Self::check_fenced`], as the [`Fenced`] error itself.
    fn fenced(&self, st: &State) -> Result<(), Fenced> {
        if st.fenced {
            return Err(Fenced {
                volume: self.volume.clone(),
                epoch: st.epoch,
            });
        }
        Ok(())
    }

    /// Sends `frames` to every in-sync backup, all in one write without
    /// waiting for answers, runs `local` meanwhile, then collects each
    /// backup's answers (a replica answers a connection's frames in order):
    /// the local result and the backups that failed.
    fn replicate<T>(
        &self,
        st: &mut State,
        frames: &[Frame],
        local: impl FnOnce() -> T,
    ) -> io::Result<(T, Vec<PeerFailure>)> {
        let encoded = Encoded::new(frames)?;
        let mut sent = Vec::with_capacity(st.in_sync.len());
        for peer in &mut st.in_sync {
            sent.push(
                peer.link
                    .send_bytes(&encoded.bytes)
                    .map_err(|e| e.to_string()),
            );
        }
        let local = local();
        let mut failed = Vec::new();
        for (peer, sent) in st.in_sync.iter_mut().zip(sent) {
            if let Err((unacked, why)) = self.collect(peer, frames, &encoded, sent) {
                let id = peer.id.clone();
                failed.push(PeerFailure { id, why, unacked });
            }
        }
        Ok((local, failed))
    }

    /// Reads `peer`'s answers to `frames` (`encoded`, `sent` the outcome of
    /// sending them), in order. A backup still behind the epoch
    /// the authority just raised (it takes it from its own watch of the
    /// controller, a moment later) is sent the frames again from the first
    /// it refused, in order so that overlapping writes land as on the
    /// primary, until it has the epoch, within the timeout. On failure, the
    /// index of the first frame not acknowledged, and why.
    fn collect(
        &self,
        peer: &mut Peer,
        frames: &[Frame],
        encoded: &Encoded,
        mut sent: Result<(), String>,
    ) -> Result<(), (usize, String)> {
        let deadline = Instant::now() + self.timeout;
        let mut from = 0;
        loop {
            sent.map_err(|why| (from, why))?;
            let mut behind: Option<(usize, String)> = None;
            for (i, frame) in frames.iter().enumerate().skip(from) {
                match expect_ack(&mut peer.link, frame) {
                    Ok(_) => {}
                    Err(why) if why.contains(EPOCH_AHEAD) => {
                        behind.get_or_insert((i, why));
                    }
                    Err(why) => return Err((behind.map_or(i, |(first, _)| first), why)),
                }
            }
            let Some((first, why)) = behind else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err((first, why));
            }
            std::thread::sleep(EPOCH_CATCH_UP_PAUSE);
            from = first;
            let resent = peer.link.send_bytes(encoded.from(from));
            sent = resent.map_err(|e| e.to_string());
        }
    }

    /// Removes each failed backup through the authority.
    fn remove_all(&self, st: &mut State, failed: Vec<PeerFailure>) -> io::Result<()> {
        for f in failed {
            self.remove(st, &f.id, &f.why).map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// Asks the authority to remove backup `id`; only with its new epoch
    /// does the primary go on without it.
    fn remove(&self, st: &mut State, id: &str, why: &str) -> Result<(), Fenced> {
        let span = tracing::warn_span!("remove_replica", volume = %self.volume, epoch = st.epoch, replica = id);
        let _enter = span.enter();
        tracing::warn!(%why, "backup failed; asking the authority to remove it");
        st.in_sync.retain(|p| p.id != id);
        let granted = self.authority.remove_replica(&self.volume, st.epoch, id);
        match granted {
            Ok(epoch) if epoch > st.epoch => {
                tracing::warn!(new_epoch = epoch, "backup removed; going on degraded");
                st.epoch = epoch;
                st.out.push(id.to_string());
                let unflushed = st.since_flush.clone();
                st.dirty.merge(&unflushed);
                Ok(())
            }
            Ok(epoch) => {
                tracing::error!(
                    granted = epoch,
                    "authority did not raise the epoch; stopping"
                );
                st.fenced = true;
                Err(Fenced {
                    volume: self.volume.clone(),
                    epoch: st.epoch,
                })
            }
            Err(f) => {
                tracing::error!("fenced by the authority; refusing all I/O");
                st.fenced = true;
                Err(f)
            }
        }
    }

    /// Reads `buf` at `offset` from the first in-sync backup that answers;
    /// one that fails is removed through the authority and the next asked.
    fn read_remote(&self, st: &mut State, buf: &mut [u8], offset: u64) -> io::Result<()> {
        loop {
            let Some(peer) = st.in_sync.first_mut() else {
                return Err(io::Error::other(format!(
                    "volume {}: no replica in sync to read from",
                    self.volume
                )));
            };
            let frame = Frame {
                volume: self.volume.clone(),
                epoch: st.epoch,
                seq: st.seq + 1,
                body: Body::Read {
                    offset,
                    len: buf.len() as u32,
                },
            };
            let answer = peer
                .link
                .send(&frame)
                .map_err(|e| crate::error_chain(&e))
                .and_then(|()| expect_ack(&mut peer.link, &frame));
            let id = peer.id.clone();
            st.seq += 1;
            match answer {
                Ok(Body::ReadData { data, .. }) => {
                    buf.copy_from_slice(&data);
                    return Ok(());
                }
                Ok(other) => {
                    let why = format!("{:?} is not read data", other.kind());
                    self.remove(st, &id, &why).map_err(io::Error::other)?;
                }
                Err(why) => self.remove(st, &id, &why).map_err(io::Error::other)?,
            }
        }
    }

    /// Writes `writes` (each at most [`MAX_PAYLOAD`] bytes) to the local
    /// copy and every in-sync backup, every frame sent before any answer is
    /// awaited; one result per write. A write is `Ok` only once every
    /// backup still in the set acknowledged it.
    fn write_window(&self, st: &mut State, writes: &[(u64, &[u8])]) -> Vec<io::Result<()>> {
        let fail_all = |e: &io::Error| writes.iter().map(|_| Err(copy_error(e))).collect();
        if let Err(e) = self.check_fenced(st) {
            return fail_all(&e);
        }
        // No backup in sync (a single-replica volume, or one degraded to
        // its local copy): nothing to copy, encode or checksum.
        let frames: Vec<Frame> = if st.in_sync.is_empty() {
            Vec::new()
        } else {
            writes
                .iter()
                .map(|&(offset, data)| {
                    st.seq += 1;
                    let data = data.to_vec();
                    self.frame(st, Body::Write { offset, data })
                })
                .collect()
        };
        let epoch = st.epoch;
        let local_writes = || -> Vec<io::Result<()>> {
            let Some(l) = &self.local else {
                return writes.iter().map(|_| Ok(())).collect();
            };
            // Through the local replica's epoch check where it has one:
            // once this host's watch raised it, a fenced primary's writes
            // no longer land even here.
            l.write_batch_at(epoch, writes)
        };
        let (local, failed) = match self.replicate(st, &frames, local_writes) {
            Ok(r) => r,
            Err(e) => return fail_all(&e),
        };
        for &(offset, data) in writes {
            mark_written(st, offset, data.len() as u64);
        }
        // A backup answers in order: every backup still in the set
        // acknowledged the writes before the first a failed one did not.
        let acked = failed.iter().map(|f| f.unacked).min();
        if let Err(e) = self.remove_all(st, failed) {
            let acked = acked.unwrap_or(writes.len());
            return local
                .into_iter()
                .enumerate()
                .map(|(i, r)| if i < acked { r } else { Err(copy_error(&e)) })
                .collect();
        }
        local
    }
}

/// Frames encoded back to back, so a window goes to a backup in one write.
struct Encoded {
    bytes: Vec<u8>,
    /// Where each frame starts in `bytes`.
    starts: Vec<usize>,
}

impl Encoded {
    fn new(frames: &[Frame]) -> io::Result<Self> {
        let mut e = Encoded {
            bytes: Vec::new(),
            starts: Vec::with_capacity(frames.len()),
        };
        for f in frames {
            let b = wire::encode(f).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            e.starts.push(e.bytes.len());
            e.bytes.extend_from_slice(&b);
        }
        Ok(e)
    }

    /// The bytes of frame `i` and every frame after it.
    fn from(&self, i: usize) -> &[u8] {
        &self.bytes[self.starts[i]..]
    }
}

/// Marks a write in the maps that record where the replicas may differ.
fn mark_written(st: &mut State, offset: u64, len: u64) {
    st.since_flush.mark(offset, len);
    if !st.out.is_empty() {
        st.dirty.mark(offset, len);
    }
    for m in st.catchup.values_mut() {
        m.mark(offset, len);
    }
}

/// An error for each of several requests that one failure failed.
fn copy_error(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), crate::error_chain(e))
}

/// Splits `chunks` (each `len` bytes) into windows of at most
/// [`MAX_IN_FLIGHT`] frames and [`MAX_WINDOW_BYTES`] bytes, at least one
/// frame each.
fn windows<T>(chunks: &[T], len: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, c) in chunks.iter().enumerate() {
        let full = i - start == MAX_IN_FLIGHT || bytes + len(c) > MAX_WINDOW_BYTES;
        if i > start && full {
            out.push(&chunks[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += len(c);
    }
    if start < chunks.len() {
        out.push(&chunks[start..]);
    }
    out
}

/// A connection of a resync to one replica, at the epoch the resync runs
/// at.
struct ResyncLink {
    id: String,
    volume: String,
    epoch: u64,
    seq: u64,
    link: Link,
}

impl ResyncLink {
    fn error(&self, why: String) -> ResyncError {
        ResyncError::Replica {
            replica: self.id.clone(),
            why,
        }
    }

    /// Sends `body` and returns the checked answer.
    fn request(&mut self, body: Body) -> Result<Body, ResyncError> {
        self.seq += 1;
        let frame = Frame {
            volume: self.volume.clone(),
            epoch: self.epoch,
            seq: self.seq,
            body,
        };
        self.link
            .send(&frame)
            .map_err(|e| crate::error_chain(&e))
            .and_then(|()| expect_ack(&mut self.link, &frame))
            .map_err(|why| self.error(why))
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ResyncError> {
        self.request(Body::Write {
            offset,
            data: data.to_vec(),
        })
        .map(drop)
    }

    fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ResyncError> {
        let len = buf.len() as u32;
        match self.request(Body::Read { offset, len })? {
            Body::ReadData { data, .. } => {
                buf.copy_from_slice(&data);
                Ok(())
            }
            other => Err(self.error(format!("{:?} is not read data", other.kind()))),
        }
    }

    fn sums(&mut self, offset: u64, len: u32, region_shift: u8) -> Result<Vec<u32>, ResyncError> {
        let body = Body::Checksums {
            offset,
            len,
            region_shift,
        };
        match self.request(body)? {
            Body::Sums { sums, .. } => Ok(sums),
            other => Err(self.error(format!("{:?} is not sums", other.kind()))),
        }
    }
}

/// Where a resync copies from: the primary's own copy, or an in-sync
/// backup's.
enum Source<'a> {
    Local(&'a dyn Store),
    Remote(ResyncLink),
}

impl Source<'_> {
    fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ResyncError> {
        match self {
            Source::Local(s) => s.read_at(buf, offset).map_err(ResyncError::Local),
            Source::Remote(l) => l.read(buf, offset),
        }
    }

    fn sums(&mut self, offset: u64, len: u32, region_shift: u8) -> Result<Vec<u32>, ResyncError> {
        match self {
            Source::Local(s) => s
                .sums(offset, u64::from(len), 1 << region_shift)
                .map_err(ResyncError::Local),
            Source::Remote(l) => l.sums(offset, len, region_shift),
        }
    }
}

impl ReplicatedStore {
    /// Brings `backup`, out of the in-sync set, back into it: see the
    /// module docs. Blocking; writes go on meanwhile (they wait only
    /// during the last pass). On error the backup stays out and can be
    /// tried again.
    pub fn resync(&self, backup: &Backup) -> Result<ResyncReport, ResyncError> {
        let span = tracing::info_span!(
            "resync",
            volume_id = %self.volume,
            replica = %backup.id
        );
        let _enter = span.enter();
        let started = Instant::now();
        let (epoch, known, source) = {
            let mut st = self.lock();
            self.fenced(&st)?;
            // A resync changes the replica set: like a write, it needs a
            // serving session (one closed while idle is opened again; a
            // host that no longer serves the volume is refused it).
            if st.closed && self.reopen(&mut st).is_err() {
                self.fenced(&st)?;
            }
            if st.in_sync.iter().any(|p| p.id == backup.id) {
                return Err(ResyncError::InSync(backup.id.clone()));
            }
            if st.catchup.contains_key(&backup.id) {
                return Err(ResyncError::Busy(backup.id.clone()));
            }
            let known = (st.out.contains(&backup.id) && !st.unreconciled.contains(&backup.id))
                .then(|| st.dirty.clone());
            let clean = DirtyMap::new(self.size(), st.dirty.region_size());
            st.catchup.insert(backup.id.clone(), clean);
            let source = st.in_sync.first().map(|p| (p.id.clone(), p.addr));
            (st.epoch, known, source)
        };
        tracing::info!(epoch, dirty_map = known.is_some(), "resyncing the replica");
        let result = self.resync_at(backup, epoch, known, source);
        let mut st = self.lock();
        st.catchup.remove(&backup.id);
        match &result {
            Ok(r) => {
                tracing::info!(
                    regions = r.regions,
                    bytes = r.bytes,
                    passes = r.passes,
                    by_checksum = r.by_checksum,
                    new_epoch = r.epoch,
                    took_ms = started.elapsed().as_millis() as u64,
                    "replica resynced and back in sync"
                );
                st.resynced.insert(backup.id.clone(), r.clone());
            }
            Err(e) => tracing::warn!("resync failed: {}", crate::error_chain(e)),
        }
        result
    }

    fn size(&self) -> u64 {
        self.sectors * SECTOR_SIZE
    }

    /// The in-sync backups not reconciled yet (see [`Self::reconcile`]).
    pub fn unreconciled(&self) -> Vec<String> {
        let st = self.lock();
        st.in_sync
            .iter()
            .filter(|p| st.unreconciled.contains(&p.id))
            .map(|p| p.id.clone())
            .collect()
    }

    /// Makes each in-sync backup not reconciled yet agree with this
    /// primary's source (its own copy, else the first backup in sync):
    /// both are compared by checksums ([`crate::resync`]), region by
    /// region, outside the write lock; each region that differs is then
    /// copied under it (no write is in flight meanwhile, and every write
    /// after it reaches both), and the backup flushes. A region that a
    /// write changed during the comparison may be copied for nothing,
    /// never missed. A backup that cannot be reached, or one compared at
    /// an epoch that moved, is left for the next call
    /// ([`ReconcileReport::left`]); one removed from the set meanwhile is
    /// left to its resync, which then compares checksums. Blocking: it
    /// reads the whole volume on the source and on each backup. Fails only
    /// when this primary is fenced.
    pub fn reconcile(&self) -> Result<ReconcileReport, ResyncError> {
        let span = tracing::info_span!("reconcile", volume_id = %self.volume);
        let _enter = span.enter();
        let started = Instant::now();
        let (epoch, todo, remote_source) = {
            let st = self.lock();
            self.fenced(&st)?;
            let remote_source = match self.local {
                Some(_) => None,
                None => st.in_sync.first().map(|p| (p.id.clone(), p.addr)),
            };
            let todo: Vec<(String, SocketAddr)> = st
                .in_sync
                .iter()
                .filter(|p| st.unreconciled.contains(&p.id))
                .map(|p| (p.id.clone(), p.addr))
                .collect();
            (st.epoch, todo, remote_source)
        };
        let mut report = ReconcileReport::default();
        for (id, addr) in todo {
            if remote_source.as_ref().is_some_and(|(s, _)| *s == id) {
                // The source agrees with itself.
                self.lock().unreconciled.remove(&id);
                continue;
            }
            match self.reconcile_one(&id, addr, epoch, remote_source.clone(), &mut report) {
                Ok(()) => report.backups += 1,
                Err(e @ ResyncError::Fenced(_)) => return Err(e),
                Err(e) => {
                    tracing::warn!(replica = %id, "not reconciled yet: {}", crate::error_chain(&e));
                    report.left.push(id);
                }
            }
        }
        if report.backups > 0 {
            tracing::info!(
                backups = report.backups,
                regions = report.regions,
                bytes = report.bytes,
                took_ms = started.elapsed().as_millis() as u64,
                "replicas compared with the source; the differing regions copied"
            );
        }
        Ok(report)
    }

    /// What a resync or reconcile of replica `target` copies from: this
    /// primary's own copy, else `remote` (the first backup in sync).
    fn source(
        &self,
        target: &str,
        remote: Option<(String, SocketAddr)>,
        epoch: u64,
    ) -> Result<Source<'_>, ResyncError> {
        match (&self.local, remote) {
            (Some(l), _) => Ok(Source::Local(&**l)),
            (None, Some((id, addr))) => Ok(Source::Remote(self.resync_link(&id, addr, epoch)?)),
            (None, None) => Err(ResyncError::Replica {
                replica: target.to_string(),
                why: "no replica in sync to copy from".into(),
            }),
        }
    }

    fn reconcile_one(
        &self,
        id: &str,
        addr: SocketAddr,
        epoch: u64,
        remote_source: Option<(String, SocketAddr)>,
        report: &mut ReconcileReport,
    ) -> Result<(), ResyncError> {
        let mut target = self.resync_link(id, addr, epoch)?;
        let mut source = self.source(id, remote_source, epoch)?;
        let plan = self.differing(&mut source, &mut target)?;
        let mut buf = Vec::new();
        for (offset, len) in crate::resync::copy_extents(&plan, self.size()) {
            let st = self.lock();
            self.fenced(&st)?;
            if st.epoch != epoch {
                return Err(ResyncError::EpochMoved {
                    from: epoch,
                    to: st.epoch,
                });
            }
            if !st.in_sync.iter().any(|p| p.id == id) {
                // Removed meanwhile: its resync compares checksums.
                return Ok(());
            }
            buf.resize(len as usize, 0);
            source.read(&mut buf, offset)?;
            target.write(offset, &buf)?;
            report.regions += 1;
            report.bytes += len;
        }
        target.request(Body::Flush)?;
        // Every region it lacked is copied; every write since reached it
        // (or, once it is removed, the dirty map).
        self.lock().unreconciled.remove(id);
        Ok(())
    }

    /// Connects to a replica for a resync at `epoch` (asking again while
    /// it has not taken that epoch yet, within the timeout).
    fn resync_link(
        &self,
        id: &str,
        addr: SocketAddr,
        epoch: u64,
    ) -> Result<ResyncLink, ResyncError> {
        let error = |why: String| ResyncError::Replica {
            replica: id.to_string(),
            why,
        };
        let stream =
            TcpStream::connect_timeout(&addr, self.timeout).map_err(|e| error(e.to_string()))?;
        let setup = |s: &TcpStream| {
            s.set_read_timeout(Some(self.timeout))?;
            s.set_write_timeout(Some(self.timeout))
        };
        setup(&stream).map_err(|e| error(e.to_string()))?;
        let mut link = ResyncLink {
            id: id.to_string(),
            volume: self.volume.clone(),
            epoch,
            seq: 0,
            link: Link::new(stream).map_err(|e| error(e.to_string()))?,
        };
        let capacity = self.size();
        let deadline = Instant::now() + self.timeout;
        loop {
            match link.request(Body::Hello { capacity }) {
                Ok(Body::Ack { offset, .. }) if offset == capacity => return Ok(link),
                Ok(_) => return Err(error(format!("replica's capacity differs from {capacity}"))),
                Err(ResyncError::Replica { why, .. })
                    if why.contains(EPOCH_AHEAD) && Instant::now() < deadline =>
                {
                    std::thread::sleep(EPOCH_CATCH_UP_PAUSE);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn resync_at(
        &self,
        backup: &Backup,
        epoch: u64,
        known: Option<DirtyMap>,
        source: Option<(String, SocketAddr)>,
    ) -> Result<ResyncReport, ResyncError> {
        let mut target = self.resync_link(&backup.id, backup.addr, epoch)?;
        let mut source = self.source(&backup.id, source, epoch)?;
        let mut report = ResyncReport::default();
        let mut plan = match known {
            Some(map) => map,
            None => {
                report.by_checksum = true;
                self.differing(&mut source, &mut target)?
            }
        };
        loop {
            report.passes += 1;
            self.copy(&plan, &mut source, &mut target, &mut report, true)?;
            let mut st = self.lock();
            self.fenced(&st)?;
            if st.epoch != epoch {
                return Err(ResyncError::EpochMoved {
                    from: epoch,
                    to: st.epoch,
                });
            }
            let clean = DirtyMap::new(self.size(), plan.region_size());
            let next = st
                .catchup
                .insert(backup.id.clone(), clean)
                .unwrap_or_else(|| plan.clone());
            if next.count() > FINAL_PASS_REGIONS && report.passes < MAX_PASSES {
                drop(st);
                tracing::debug!(
                    pass = report.passes,
                    left = next.count(),
                    "written meanwhile; copying again"
                );
                plan = next;
                continue;
            }
            // The last pass: no write can land meanwhile.
            report.passes += 1;
            self.copy(&next, &mut source, &mut target, &mut report, false)?;
            target.request(Body::Flush)?;
            let granted = self
                .authority
                .add_replica(&self.volume, epoch, &backup.id)?;
            if granted <= epoch {
                return Err(ResyncError::Replica {
                    replica: backup.id.clone(),
                    why: format!("the authority granted epoch {granted}, not above {epoch}"),
                });
            }
            st.epoch = granted;
            st.out.retain(|o| *o != backup.id);
            // Copied by checksum, or from the dirty map of a reconciled
            // copy: it agrees with the source.
            st.unreconciled.remove(&backup.id);
            if st.out.is_empty() {
                st.dirty.clear();
            }
            st.in_sync.push(Peer {
                id: backup.id.clone(),
                addr: backup.addr,
                link: target.link,
            });
            report.epoch = granted;
            return Ok(report);
        }
    }

    /// The regions where `target`'s copy differs from `source`'s, by
    /// checksums, a batch of regions at a time.
    fn differing(
        &self,
        source: &mut Source<'_>,
        target: &mut ResyncLink,
    ) -> Result<DirtyMap, ResyncError> {
        let size = self.size();
        let mut map = DirtyMap::new(size, self.lock().dirty.region_size());
        let region = map.region_size();
        let shift = region.trailing_zeros() as u8;
        // MAX_PAYLOAD is a multiple of every region size (both powers of
        // two, the region no larger), so each batch starts a region.
        let batch = u64::from(MAX_PAYLOAD);
        let mut at = 0;
        while at < size {
            let len = (size - at).min(batch) as u32;
            let good = source.sums(at, len, shift)?;
            let theirs = target.sums(at, len, shift)?;
            crate::resync::mark_differing(&mut map, at, &good, &theirs);
            at += u64::from(len);
        }
        tracing::info!(differing = map.count(), "compared the copies by checksum");
        Ok(map)
    }

    /// Copies `plan`'s regions from `source` to `target`; `unlocked`: the
    /// caller does not hold the state, and each region first checks that
    /// this primary is not fenced.
    fn copy(
        &self,
        plan: &DirtyMap,
        source: &mut Source<'_>,
        target: &mut ResyncLink,
        report: &mut ResyncReport,
        unlocked: bool,
    ) -> Result<(), ResyncError> {
        let mut buf = Vec::new();
        for (offset, len) in crate::resync::copy_extents(plan, self.size()) {
            // A retired or fenced primary copies no more (a caller holding
            // the state looked already).
            if unlocked {
                self.fenced(&self.lock())?;
            }
            buf.resize(len as usize, 0);
            source.read(&mut buf, offset)?;
            target.write(offset, &buf)?;
            report.regions += 1;
            report.bytes += len;
        }
        Ok(())
    }
}

impl Store for ReplicatedStore {
    fn capacity(&self) -> u64 {
        self.sectors
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(l) = &self.local {
            // Reads of the local copy do not wait for writes in flight.
            self.check_fenced(&self.lock())?;
            return l.read_at(buf, offset);
        }
        let mut st = self.lock();
        self.check_fenced(&st)?;
        let mut at = offset;
        for chunk in buf.chunks_mut(MAX_PAYLOAD as usize) {
            self.read_remote(&mut st, chunk, at)?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    fn read_into(&self, bufs: &[vm_memory::VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        if let Some(l) = &self.local {
            self.check_fenced(&self.lock())?;
            return l.read_into(bufs, offset);
        }
        crate::store::read_through_buffer(self, bufs, offset)
    }

    fn read_batch(&self, reads: &[(u64, &[vm_memory::VolatileSlice<'_>])]) -> Vec<io::Result<()>> {
        if let Some(l) = &self.local {
            if let Err(e) = self.check_fenced(&self.lock()) {
                return reads.iter().map(|_| Err(copy_error(&e))).collect();
            }
            return l.read_batch(reads);
        }
        reads
            .iter()
            .map(|&(offset, bufs)| crate::store::read_through_buffer(self, bufs, offset))
            .collect()
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut results = self.write_batch(&[(offset, buf)]);
        results.pop().unwrap_or(Ok(()))
    }

    /// Every write's frames go to the backups before any answer is awaited
    /// (a window at a time), so the batch waits about one round trip, not
    /// one per write. Each write succeeds only once every backup still in
    /// the set acknowledged it, as [`Store::write_at`].
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<io::Result<()>> {
        let span =
            tracing::debug_span!("replicated_writes", volume = %self.volume, writes = writes.len());
        let _enter = span.enter();
        let mut st = self.lock();
        if let Err(e) = self.check_fenced(&st) {
            return writes.iter().map(|_| Err(copy_error(&e))).collect();
        }
        st.no_frontend = false;
        if st.closed {
            if let Err(e) = self.reopen(&mut st) {
                return writes.iter().map(|_| Err(copy_error(&e))).collect();
            }
        }
        // Frames of at most MAX_PAYLOAD bytes, each with its write's index.
        let step = MAX_PAYLOAD as usize;
        let chunks: Vec<(usize, u64, &[u8])> = writes
            .iter()
            .enumerate()
            .flat_map(|(i, &(offset, data))| {
                let at = (offset..).step_by(step);
                data.chunks(step).zip(at).map(move |(c, at)| (i, at, c))
            })
            .collect();
        let mut results: Vec<io::Result<()>> = writes.iter().map(|_| Ok(())).collect();
        for window in windows(&chunks, |c| c.2.len()) {
            let pieces: Vec<(u64, &[u8])> = window.iter().map(|&(_, at, c)| (at, c)).collect();
            for (&(i, ..), r) in window.iter().zip(self.write_window(&mut st, &pieces)) {
                if results[i].is_ok() {
                    results[i] = r;
                }
            }
        }
        if results.iter().any(Result::is_err) {
            st.failed = true;
        }
        results
    }

    /// [`ReplicatedStore::close_idle`].
    fn idle(&self) {
        self.close_idle();
    }

    fn flush(&self) -> io::Result<()> {
        let span = tracing::debug_span!("replicated_flush", volume = %self.volume);
        let _enter = span.enter();
        let mut st = self.lock();
        self.check_fenced(&st)?;
        let r = self.flush_locked(&mut st);
        if r.is_err() {
            st.failed = true;
        }
        r
    }
}

/// Reads the answer to `request` and checks it with [`check_answer`].
fn expect_ack(link: &mut Link, request: &Frame) -> Result<Body, String> {
    match link.recv() {
        Ok(Some(answer)) => check_answer(request, answer),
        Ok(None) => Err("connection closed".into()),
        Err(e) => Err(crate::error_chain(&e)),
    }
}

/// The body of `answer` if it is the right answer to `request`: same
/// volume, sequence and epoch, and the `Ack` echoing the request (or the
/// `ReadData` of a `Read`, as long as asked); else why not.
pub fn check_answer(request: &Frame, answer: Frame) -> Result<Body, String> {
    if let Body::Nack { code, message, .. } = &answer.body {
        let epoch = answer.epoch;
        return Err(format!(
            "refused ({code:?}, replica at epoch {epoch}): {message}"
        ));
    }
    let same = answer.seq == request.seq
        && answer.epoch == request.epoch
        && answer.volume == request.volume;
    let fits = match (&request.body, &answer.body) {
        (Body::Hello { .. }, Body::Ack { len: 0, .. }) => true,
        (Body::Flush, Body::Ack { offset: 0, len: 0 }) => true,
        (Body::Write { offset, data }, Body::Ack { offset: o, len }) => {
            o == offset && *len as usize == data.len()
        }
        (Body::Read { offset, len }, Body::ReadData { offset: o, data }) => {
            o == offset && data.len() == *len as usize
        }
        (
            Body::Checksums {
                offset,
                len,
                region_shift,
            },
            Body::Sums {
                offset: o,
                region_shift: s,
                sums,
            },
        ) => {
            o == offset
                && s == region_shift
                && sums.len() as u64
                    == crate::resync::regions_in(u64::from(*len), 1 << region_shift)
        }
        _ => false,
    };
    if same && fits {
        return Ok(answer.body);
    }
    Err(format!(
        "{:?} (seq {}, epoch {}) does not answer {:?} (seq {}, epoch {})",
        answer.body.kind(),
        answer.seq,
        answer.epoch,
        request.body.kind(),
        request.seq,
        request.epoch
    ))
}

fn fenced_error(volume: &str, epoch: u64) -> io::Error {
    io::Error::other(Fenced {
        volume: volume.to_string(),
        epoch,
    })
}

/// The authority of a replica set fixed by flags, with no controller
/// (`ferro-blockd --volume …,backups=…`): it never drops a failed backup,
/// so the primary is fenced and the I/O fails, rather than going on with
/// fewer copies than were asked for.
pub struct StaticReplicas;

impl Authority for StaticReplicas {
    fn remove_replica(&self, volume: &str, epoch: u64, replica: &str) -> Result<u64, Fenced> {
        tracing::error!(
            volume,
            epoch,
            replica,
            "a backup failed; with no controller the replica set cannot change: I/O fails"
        );
        Err(Fenced {
            volume: volume.to_string(),
            epoch,
        })
    }

    /// Never asked: no replica leaves the set, so none comes back.
    fn add_replica(&self, volume: &str, epoch: u64, _replica: &str) -> Result<u64, Fenced> {
        Err(Fenced {
            volume: volume.to_string(),
            epoch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::NackCode;

    fn frame(body: Body) -> Frame {
        Frame {
            volume: "v".into(),
            epoch: 2,
            seq: 5,
            body,
        }
    }

    #[test]
    fn only_the_matching_answer_is_taken() {
        let write = frame(Body::Write {
            offset: 512,
            data: vec![1; 512],
        });
        let ack = |offset, len| frame(Body::Ack { offset, len });
        assert!(check_answer(&write, ack(512, 512)).is_ok());
        assert!(check_answer(&write, ack(0, 512)).is_err());
        assert!(check_answer(&write, ack(512, 511)).is_err());
        let mut late = ack(512, 512);
        late.seq = 4;
        assert!(check_answer(&write, late).is_err());
        let mut other_epoch = ack(512, 512);
        other_epoch.epoch = 3;
        assert!(check_answer(&write, other_epoch).is_err());
        let mut other_volume = ack(512, 512);
        other_volume.volume = "w".into();
        assert!(check_answer(&write, other_volume).is_err());
        assert!(check_answer(&frame(Body::Flush), ack(0, 0)).is_ok());
        assert!(check_answer(&frame(Body::Flush), ack(512, 512)).is_err());
        let read = frame(Body::Read { offset: 0, len: 4 });
        let data = |n| {
            frame(Body::ReadData {
                offset: 0,
                data: vec![0; n],
            })
        };
        assert!(check_answer(&read, data(4)).is_ok());
        assert!(check_answer(&read, data(3)).is_err());
        assert!(check_answer(&read, ack(0, 4)).is_err());
    }

    #[test]
    fn windows_are_bounded_by_frames_and_bytes() {
        let sizes = |ws: Vec<&[usize]>| ws.iter().map(|w| w.len()).collect::<Vec<_>>();
        let small = vec![4096; 150];
        assert_eq!(sizes(windows(&small, |&n| n)), vec![64, 64, 22]);
        let large = vec![4 << 20; 9];
        assert_eq!(sizes(windows(&large, |&n| n)), vec![4, 4, 1]);
        // A frame larger than a window still goes, alone.
        let huge = vec![1, 32 << 20, 1];
        assert_eq!(sizes(windows(&huge, |&n| n)), vec![1, 1, 1]);
        assert!(windows(&[] as &[usize], |&n| n).is_empty());
    }

    #[test]
    fn a_nack_is_a_failure_naming_the_replicas_epoch() {
        let nack = Frame {
            epoch: 3,
            ..frame(Body::Nack {
                code: NackCode::Fenced,
                request_epoch: 2,
                message: "fenced: epoch 2 is older than this replica's 3".into(),
            })
        };
        let why = check_answer(&frame(Body::Flush), nack).unwrap_err();
        assert!(why.contains("Fenced") && why.contains("epoch 3"), "{why}");
    }
}
