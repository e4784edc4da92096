//! The backup side of replication: a host's replicas of volumes, answering
//! a primary's frames.
//!
//! [`decide`] is the sans-IO rule book; [`Replica`] applies it to each
//! volume's store and epoch; [`ReplicaServer`] is the thin TCP shell, one
//! thread per connection.
//!
//! # Fencing
//!
//! Each volume has an epoch, kept in its [`EpochFile`] beside the data
//! file and raised only by the configuration authority (the controller)
//! through [`Replica::set_epoch`]; it never goes down. A frame is carried
//! out only if it carries exactly the replica's epoch:
//!
//! - an older epoch is answered `Nack(Fenced)` naming both: its sender is a
//!   primary that was replaced and must not write anywhere any more;
//! - a newer one is answered `Nack(EpochAhead)`: no primary may run ahead of
//!   what the authority told this replica;
//! - epoch 0 (a volume never configured, or whose epoch file was lost) takes
//!   no I/O at all.
//!
//! A replica out of sync is given the volume's epoch too (by its watch of
//! the controller): it then takes the frames of the primary resyncing it,
//! still refuses every older primary, and no primary reads from it or
//! counts it until the controller puts it back in sync. `Checksums`
//! (resync's comparison) is a request like `Read`, under the same rules.
//!
//! The check and the I/O happen under the volume's epoch lock, and
//! `set_epoch` takes that lock exclusively, so once `set_epoch` returns no
//! frame of an older epoch can still land.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use crate::link::{Link, LinkError};
use crate::meta::{EpochFile, MetaError};
use crate::request::SECTOR_SIZE;
use crate::store::{LocalFile, Store, StoreError};
use crate::wire::{valid_volume_id, Body, Frame, NackCode};

/// Errors managing a host's replicas.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The volume id is not one the wire accepts.
    #[error("bad volume id {0:?}")]
    BadVolumeId(String),
    /// The data file could not be opened.
    #[error("volume {0}")]
    Store(String, #[source] StoreError),
    /// The epoch file could not be read or written.
    #[error("volume {0}")]
    Meta(String, #[source] MetaError),
    /// No such volume on this host.
    #[error("volume {0} is not on this host")]
    Unknown(String),
    /// The authority asked for a lower epoch than the one held.
    #[error("volume {volume}: epoch {asked} is lower than the current {current}")]
    EpochBackwards {
        /// The volume.
        volume: String,
        /// The epoch held.
        current: u64,
        /// The epoch asked for.
        asked: u64,
    },
}

/// A refusal: the `Nack` code and its message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub code: NackCode,
    /// For the log, naming the values involved.
    pub message: String,
}

fn refuse(code: NackCode, message: String) -> Refusal {
    Refusal { code, message }
}

/// The rule book: may a replica of a `capacity`-byte volume at `epoch`
/// carry out `frame`? Pure; [`Replica::handle`] does the I/O.
pub fn decide(epoch: u64, capacity: u64, frame: &Frame) -> Result<(), Refusal> {
    use NackCode::*;
    if matches!(
        frame.body,
        Body::Ack { .. } | Body::Nack { .. } | Body::ReadData { .. } | Body::Sums { .. }
    ) {
        let kind = frame.body.kind();
        return Err(refuse(BadFrame, format!("{kind:?} is not a request")));
    }
    if frame.epoch < epoch {
        let msg = format!(
            "fenced: epoch {} is older than this replica's {epoch}",
            frame.epoch
        );
        return Err(refuse(Fenced, msg));
    }
    if frame.epoch > epoch {
        let msg = format!("epoch {} is ahead of this replica's {epoch}", frame.epoch);
        return Err(refuse(EpochAhead, msg));
    }
    if epoch == 0 {
        return Err(refuse(Unconfigured, "volume has no epoch yet".into()));
    }
    let (offset, len) = match &frame.body {
        Body::Hello { capacity: theirs } if *theirs != capacity => {
            let msg = format!("primary's capacity {theirs} differs from this replica's {capacity}");
            return Err(refuse(OutOfRange, msg));
        }
        Body::Write { offset, data } => (*offset, data.len() as u64),
        Body::Read { offset, len } | Body::Checksums { offset, len, .. } => {
            (*offset, u64::from(*len))
        }
        _ => return Ok(()),
    };
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => {
            let msg = format!("{len} bytes at {offset} pass the capacity {capacity}");
            Err(refuse(OutOfRange, msg))
        }
    }
}

/// A primary's own host's copy of a volume: the replica this host's
/// replica server holds, shared rather than opened a second time, and
/// written ([`Store::write_batch_at`]) under that replica's epoch lock,
/// as a backup's frames are. A primary whose epoch is older than the one
/// this host's watch gave the replica was fenced, and its writes are
/// refused here too (a backup refuses them as `Fenced`); one whose epoch
/// is newer is ahead of the watch, which catches up a moment later. Reads,
/// flushes and checksums go to the replica's store as they are.
pub struct LocalReplica {
    replica: Arc<Replica>,
    volume: String,
    /// The replica as it was when the primary took it: one closed and
    /// opened again since (its file made again, blank) is not this one.
    opened: Arc<VolumeReplica>,
    sectors: u64,
}

impl Replica {
    /// Volume `volume`'s replica as its primary's local copy; `None` if
    /// this host holds no open replica of it.
    pub fn local(self: &Arc<Self>, volume: &str) -> Option<LocalReplica> {
        let v = self.volume(volume)?;
        Some(LocalReplica {
            replica: self.clone(),
            volume: volume.to_string(),
            sectors: v.store.capacity(),
            opened: v,
        })
    }
}

impl LocalReplica {
    /// The replica, if it is still the one the primary took.
    fn get(&self) -> io::Result<Arc<VolumeReplica>> {
        match self.replica.volume(&self.volume) {
            Some(v) if Arc::ptr_eq(&v, &self.opened) => Ok(v),
            Some(_) => Err(io::Error::other(format!(
                "volume {}: this host's replica was opened again since (its file made again)",
                self.volume
            ))),
            None => Err(io::Error::other(format!(
                "volume {}: this host's replica was closed",
                self.volume
            ))),
        }
    }
}

impl Store for LocalReplica {
    fn capacity(&self) -> u64 {
        self.sectors
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.get()?.store.read_at(buf, offset)
    }

    fn read_into(&self, bufs: &[vm_memory::VolatileSlice<'_>], offset: u64) -> io::Result<()> {
        self.get()?.store.read_into(bufs, offset)
    }

    fn read_batch(&self, reads: &[(u64, &[vm_memory::VolatileSlice<'_>])]) -> Vec<io::Result<()>> {
        match self.get() {
            Ok(v) => v.store.read_batch(reads),
            Err(e) => reads
                .iter()
                .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
                .collect(),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.get()?.store.write_at(buf, offset)
    }

    /// Unchecked: the epoch comes with [`Store::write_batch_at`].
    fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<io::Result<()>> {
        match self.get() {
            Ok(v) => v.store.write_batch(writes),
            Err(e) => writes
                .iter()
                .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
                .collect(),
        }
    }

    fn write_batch_at(&self, epoch: u64, writes: &[(u64, &[u8])]) -> Vec<io::Result<()>> {
        let fail = |e: io::Error| -> Vec<io::Result<()>> {
            writes
                .iter()
                .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
                .collect()
        };
        let v = match self.get() {
            Ok(v) => v,
            Err(e) => return fail(e),
        };
        let held = read(&v.epoch);
        if held.0 > epoch {
            return fail(io::Error::other(format!(
                "volume {}: this host's replica is at epoch {}, past the primary's {epoch} (fenced)",
                self.volume, held.0
            )));
        }
        let done = v.store.write_batch(writes);
        drop(held);
        done
    }

    fn flush(&self) -> io::Result<()> {
        self.get()?.store.flush()
    }

    fn sums(&self, offset: u64, len: u64, region: u64) -> io::Result<Vec<u32>> {
        self.get()?.store.sums(offset, len, region)
    }
}

/// One volume's replica: its store and its epoch.
struct VolumeReplica {
    store: Box<dyn Store>,
    /// The epoch, and the file that keeps it; see the module docs for why
    /// the I/O holds this lock.
    epoch: RwLock<(u64, EpochFile)>,
}

/// This host's replicas, by volume id.
pub struct Replica {
    dir: PathBuf,
    volumes: RwLock<HashMap<String, Arc<VolumeReplica>>>,
}

impl Replica {
    /// Replicas kept under `dir`: `<id>.vol` data, `<id>.epoch` metadata.
    pub fn new(dir: &Path) -> Self {
        Replica {
            dir: dir.to_path_buf(),
            volumes: RwLock::new(HashMap::new()),
        }
    }

    /// The data file of `volume`.
    pub fn data_path(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("{volume}.vol"))
    }

    /// The epoch file of `volume`.
    pub fn epoch_path(&self, volume: &str) -> PathBuf {
        self.dir.join(format!("{volume}.epoch"))
    }

    /// Opens (creating if missing) the replica of `volume`, `size` bytes,
    /// with the epoch its file holds (0 if it has none). Returns that epoch.
    pub fn open_volume(&self, volume: &str, size: u64) -> Result<u64, ReplicaError> {
        let held = self.load_epoch(volume)?;
        let store = LocalFile::open_or_create(&self.data_path(volume), size)
            .map_err(|e| ReplicaError::Store(volume.to_string(), e))?;
        Ok(self.insert(volume, Box::new(store), held))
    }

    /// Like [`Replica::open_volume`] over a store of the caller's (another
    /// backend, or a test's); the epoch file is still this host's.
    pub fn open_volume_with(
        &self,
        volume: &str,
        store: Box<dyn Store>,
    ) -> Result<u64, ReplicaError> {
        let held = self.load_epoch(volume)?;
        Ok(self.insert(volume, store, held))
    }

    /// Checks the id and reads the epoch file (before any data file is
    /// touched, so a corrupt one stops the open early).
    fn load_epoch(&self, volume: &str) -> Result<(u64, EpochFile), ReplicaError> {
        if !valid_volume_id(volume) {
            return Err(ReplicaError::BadVolumeId(volume.to_string()));
        }
        let meta = EpochFile::new(self.epoch_path(volume), volume);
        let epoch = meta
            .load()
            .map_err(|e| ReplicaError::Meta(volume.to_string(), e))?
            .unwrap_or(0);
        Ok((epoch, meta))
    }

    fn insert(&self, volume: &str, store: Box<dyn Store>, held: (u64, EpochFile)) -> u64 {
        let epoch = held.0;
        let replica = VolumeReplica {
            store,
            epoch: RwLock::new(held),
        };
        tracing::info!(volume, epoch, "replica opened");
        write(&self.volumes).insert(volume.to_string(), Arc::new(replica));
        epoch
    }

    /// Stops serving `volume` (its files stay); whether it was open. Waits
    /// for I/O in flight on it.
    pub fn close_volume(&self, volume: &str) -> bool {
        let v = write(&self.volumes).remove(volume);
        if let Some(v) = &v {
            // Frames in flight hold the epoch lock while they do their I/O.
            drop(write(&v.epoch));
            tracing::info!(volume, "replica closed");
        }
        v.is_some()
    }

    /// The epoch `volume` holds.
    pub fn epoch(&self, volume: &str) -> Option<u64> {
        let v = self.volume(volume)?;
        let epoch = read(&v.epoch).0;
        Some(epoch)
    }

    /// Raises `volume`'s epoch to `epoch` (the configuration authority's
    /// call), durably, and returns the previous one. Equal is a no-op; lower
    /// is refused. Waits for I/O in flight, so once it returns no frame of
    /// an older epoch can be carried out.
    pub fn set_epoch(&self, volume: &str, epoch: u64) -> Result<u64, ReplicaError> {
        let v = self
            .volume(volume)
            .ok_or_else(|| ReplicaError::Unknown(volume.to_string()))?;
        let mut held = write(&v.epoch);
        let current = held.0;
        if epoch < current {
            return Err(ReplicaError::EpochBackwards {
                volume: volume.to_string(),
                current,
                asked: epoch,
            });
        }
        if epoch > current {
            held.1
                .store(epoch)
                .map_err(|e| ReplicaError::Meta(volume.to_string(), e))?;
            held.0 = epoch;
            tracing::info!(volume, from = current, to = epoch, "epoch raised");
        }
        Ok(current)
    }

    /// Carries out `frame` and returns the answer: `Ack`, `ReadData` or
    /// `Nack`. The answer carries this replica's epoch.
    pub fn handle(&self, frame: &Frame) -> Frame {
        let span = tracing::debug_span!("replica", volume = %frame.volume, seq = frame.seq);
        let _enter = span.enter();
        let Some(v) = self.volume(&frame.volume) else {
            let why = format!("volume {} is not on this host", frame.volume);
            return nack(frame, 0, refuse(NackCode::UnknownVolume, why));
        };
        let held = read(&v.epoch);
        let epoch = held.0;
        let capacity = v.store.capacity() * SECTOR_SIZE;
        let result =
            decide(epoch, capacity, frame).and_then(|()| execute(&*v.store, frame, capacity));
        drop(held);
        match result {
            Ok(body) => reply(frame, epoch, body),
            Err(r) => {
                tracing::warn!(code = ?r.code, message = %r.message, "request refused");
                nack(frame, epoch, r)
            }
        }
    }

    /// Answers `frames`, in order, as [`Replica::handle`] answers each; a
    /// run of writes to one volume goes to its store together
    /// ([`Store::write_batch`]: a direct-I/O file has them in flight at
    /// once).
    pub fn handle_batch(&self, frames: &[Frame]) -> Vec<Frame> {
        let mut answers = Vec::with_capacity(frames.len());
        let mut from = 0;
        while from < frames.len() {
            let is_write = |f: &Frame| matches!(f.body, Body::Write { .. });
            let first = &frames[from];
            let mut to = from + 1;
            if is_write(first) {
                while to < frames.len()
                    && is_write(&frames[to])
                    && frames[to].volume == first.volume
                {
                    to += 1;
                }
            }
            match self.volume(&first.volume) {
                Some(v) if to - from > 1 => answers.extend(self.write_run(&v, &frames[from..to])),
                _ => answers.extend(frames[from..to].iter().map(|f| self.handle(f))),
            }
            from = to;
        }
        answers
    }

    /// Writes `run` (write frames of `v`'s volume) as one batch: each is
    /// [`decide`]d under the epoch lock, the accepted ones written together.
    fn write_run(&self, v: &VolumeReplica, run: &[Frame]) -> Vec<Frame> {
        let span =
            tracing::debug_span!("replica_writes", volume = %run[0].volume, writes = run.len());
        let _enter = span.enter();
        let held = read(&v.epoch);
        let epoch = held.0;
        let capacity = v.store.capacity() * SECTOR_SIZE;
        let decided: Vec<Result<(), Refusal>> =
            run.iter().map(|f| decide(epoch, capacity, f)).collect();
        let writes: Vec<(u64, &[u8])> = run
            .iter()
            .zip(&decided)
            .filter(|(_, d)| d.is_ok())
            .filter_map(|(f, _)| match &f.body {
                Body::Write { offset, data } => Some((*offset, &data[..])),
                _ => None,
            })
            .collect();
        let mut done = v.store.write_batch(&writes).into_iter();
        let answers = run
            .iter()
            .zip(decided)
            .map(|(f, d)| {
                let result = d.and_then(|()| {
                    done.next()
                        .unwrap_or_else(|| {
                            Err(io::Error::other("the store left a write unanswered"))
                        })
                        .map_err(|e| refuse(NackCode::Io, e.to_string()))
                });
                match (result, &f.body) {
                    (Ok(()), Body::Write { offset, data }) => reply(
                        f,
                        epoch,
                        Body::Ack {
                            offset: *offset,
                            len: data.len() as u32,
                        },
                    ),
                    (Ok(()), _) => unreachable!("a write run holds only writes"),
                    (Err(r), _) => {
                        tracing::warn!(code = ?r.code, message = %r.message, "request refused");
                        nack(f, epoch, r)
                    }
                }
            })
            .collect();
        drop(held);
        answers
    }

    fn volume(&self, volume: &str) -> Option<Arc<VolumeReplica>> {
        read(&self.volumes).get(volume).cloned()
    }
}

/// Does the I/O of a request [`decide`] accepted.
fn execute(store: &dyn Store, frame: &Frame, capacity: u64) -> Result<Body, Refusal> {
    let io = |e: io::Error| refuse(NackCode::Io, e.to_string());
    Ok(match &frame.body {
        Body::Hello { .. } => Body::Ack {
            offset: capacity,
            len: 0,
        },
        Body::Write { offset, data } => {
            store.write_at(data, *offset).map_err(io)?;
            Body::Ack {
                offset: *offset,
                len: data.len() as u32,
            }
        }
        Body::Flush => {
            store.flush().map_err(io)?;
            Body::Ack { offset: 0, len: 0 }
        }
        Body::Read { offset, len } => {
            let mut data = vec![0; *len as usize];
            store.read_at(&mut data, *offset).map_err(io)?;
            Body::ReadData {
                offset: *offset,
                data,
            }
        }
        Body::Checksums {
            offset,
            len,
            region_shift,
        } => {
            let region = 1u64 << region_shift;
            let sums = store.sums(*offset, u64::from(*len), region).map_err(io)?;
            Body::Sums {
                offset: *offset,
                region_shift: *region_shift,
                sums,
            }
        }
        // decide() refused everything else.
        other => {
            let msg = format!("{:?} is not a request", other.kind());
            return Err(refuse(NackCode::BadFrame, msg));
        }
    })
}

fn reply(request: &Frame, epoch: u64, body: Body) -> Frame {
    Frame {
        volume: request.volume.clone(),
        epoch,
        seq: request.seq,
        body,
    }
}

fn nack(request: &Frame, epoch: u64, r: Refusal) -> Frame {
    let mut message = r.message;
    truncate_utf8(&mut message, crate::wire::MAX_MESSAGE);
    let body = Body::Nack {
        code: r.code,
        request_epoch: request.epoch,
        message,
    };
    reply(request, epoch, body)
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// A TCP server answering primaries for a [`Replica`].
pub struct ReplicaServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Conns>,
    accept: Option<JoinHandle<()>>,
}

/// Open connections, by number, so a server can cut them all.
type Conns = Mutex<HashMap<u64, TcpStream>>;

impl ReplicaServer {
    /// Listens on `addr` and serves each connection on its own thread.
    pub fn start(replica: Arc<Replica>, addr: impl ToSocketAddrs) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(HashMap::new()));
        let (s, c) = (stop.clone(), conns.clone());
        let accept = std::thread::Builder::new()
            .name(format!("replica-{addr}"))
            .spawn(move || accept_loop(&listener, &replica, &s, &c))?;
        tracing::info!(%addr, "replica server listening");
        Ok(ReplicaServer {
            addr,
            stop,
            conns,
            accept: Some(accept),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and cuts every connection, as a host that died.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let conns = std::mem::take(&mut *lock(&self.conns));
        for c in conns.values() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn accept_loop(
    listener: &TcpListener,
    replica: &Arc<Replica>,
    stop: &AtomicBool,
    conns: &Arc<Conns>,
) {
    for (n, stream) in (0u64..).zip(listener.incoming()) {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        if let Ok(c) = stream.try_clone() {
            lock(conns).insert(n, c);
        }
        let (replica, conns) = (replica.clone(), conns.clone());
        let spawned = std::thread::Builder::new()
            .name("replica-conn".into())
            .spawn(move || {
                serve(stream, &replica);
                lock(&conns).remove(&n);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a connection thread");
        }
    }
}

/// Most frames [`serve`] answers as one batch.
const MAX_BATCH_FRAMES: usize = 64;

/// Answers one primary until it goes away or sends something undecodable.
/// Answers wait while the next frame is already read in (a primary that
/// pipelines its writes), and go out together before the next read that
/// could block.
fn serve(stream: TcpStream, replica: &Replica) {
    let peer = stream.peer_addr().ok();
    let span = tracing::info_span!("replica_conn", peer = ?peer);
    let _enter = span.enter();
    let mut link = match Link::new(stream) {
        Ok(l) => l,
        Err(e) => return tracing::warn!(error = %e, "cannot set up connection"),
    };
    loop {
        // The frames already read in, up to a bound, are answered together
        // (a primary pipelining its writes).
        let mut frames = Vec::new();
        let ended = loop {
            match link.recv() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break Some(None),
                Err(LinkError::Wire(e)) => break Some(Some(e)),
                Err(e) => return tracing::debug!(error = %e, "connection ended"),
            }
            if frames.len() >= MAX_BATCH_FRAMES || !link.frame_buffered() {
                break None;
            }
        };
        for answer in replica.handle_batch(&frames) {
            if let Err(e) = link.queue(&answer) {
                return tracing::debug!(error = %e, "cannot answer; closing");
            }
        }
        match ended {
            None => {}
            Some(None) => {
                let _ = link.send_queued();
                return;
            }
            Some(Some(e)) => {
                // The stream cannot be resynchronised: say why, then close.
                tracing::warn!(error = %e, "bad frame; closing");
                let _ = link.send_queued();
                let answer = Frame {
                    volume: "-".into(),
                    epoch: 0,
                    seq: 0,
                    body: Body::Nack {
                        code: NackCode::BadFrame,
                        request_epoch: 0,
                        message: e.to_string(),
                    },
                };
                let _ = link.send(&answer);
                return;
            }
        }
        if let Err(e) = link.send_queued() {
            return tracing::debug!(error = %e, "cannot answer; closing");
        }
    }
}

#[cfg(test)]
mod tests;
