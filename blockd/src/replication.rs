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
//! Not yet handled here: a write that failed may have reached some replicas
//! and not others (including this primary's own copy when it was fenced).
//! Such regions are not acknowledged to the guest, but the replicas differ
//! there until a resync; reconciling them at failover belongs to the resync
//! slice.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

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

/// The backups that failed a request (id, why).
type Failed = Vec<(String, String)>;

/// A connected, in-sync backup.
struct Peer {
    id: String,
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
        let map = DirtyMap::new(size, options.region_size);
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
        st.seq += 1;
        let capacity = self.sectors * SECTOR_SIZE;
        let hello = self.frame(st, Body::Hello { capacity });
        link.send(&hello).map_err(|e| crate::error_chain(&e))?;
        match expect_ack(&mut link, &hello)? {
            Body::Ack { offset, .. } if offset == capacity => Ok(link),
            _ => Err(format!("replica's capacity differs from {capacity}")),
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

    /// True once the authority refused this primary.
    pub fn is_fenced(&self) -> bool {
        self.lock().fenced
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

    /// Sends `frame` to every in-sync backup, runs `local`, and collects
    /// the answers: the local result and the backups that failed.
    fn replicate(
        &self,
        st: &mut State,
        frame: &Frame,
        local: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<(io::Result<()>, Failed)> {
        let bytes =
            wire::encode(frame).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut sent = Vec::with_capacity(st.in_sync.len());
        for peer in &mut st.in_sync {
            sent.push(peer.link.send_bytes(&bytes).map_err(|e| e.to_string()));
        }
        let local = local();
        let mut failed = Vec::new();
        for (peer, sent) in st.in_sync.iter_mut().zip(sent) {
            let mut answer = sent.and_then(|()| expect_ack(&mut peer.link, frame).map(drop));
            // A backup still behind the epoch the authority just raised
            // (it takes it from its own watch of the controller, a moment
            // later) is asked again until it has it, within the timeout.
            let deadline = std::time::Instant::now() + self.timeout;
            while answer.as_ref().is_err_and(|why| why.contains(EPOCH_AHEAD))
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(EPOCH_CATCH_UP_PAUSE);
                answer = peer
                    .link
                    .send_bytes(&bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|()| expect_ack(&mut peer.link, frame).map(drop));
            }
            if let Err(why) = answer {
                failed.push((peer.id.clone(), why));
            }
        }
        Ok((local, failed))
    }

    /// Removes each failed backup through the authority.
    fn remove_all(&self, st: &mut State, failed: Failed) -> io::Result<()> {
        for (id, why) in failed {
            self.remove(st, &id, &why).map_err(io::Error::other)?;
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

    fn write_chunk(&self, st: &mut State, data: &[u8], offset: u64) -> io::Result<()> {
        st.seq += 1;
        let frame = self.frame(
            st,
            Body::Write {
                offset,
                data: data.to_vec(),
            },
        );
        let (local, failed) = self.replicate(st, &frame, || match &self.local {
            Some(l) => l.write_at(data, offset),
            None => Ok(()),
        })?;
        st.since_flush.mark(offset, data.len() as u64);
        if !st.out.is_empty() {
            st.dirty.mark(offset, data.len() as u64);
        }
        self.remove_all(st, failed)?;
        local
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

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let span = tracing::debug_span!("replicated_write", volume = %self.volume, offset, len = buf.len());
        let _enter = span.enter();
        let mut st = self.lock();
        self.check_fenced(&st)?;
        let mut at = offset;
        for chunk in buf.chunks(MAX_PAYLOAD as usize) {
            self.write_chunk(&mut st, chunk, at)?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let span = tracing::debug_span!("replicated_flush", volume = %self.volume);
        let _enter = span.enter();
        let mut st = self.lock();
        self.check_fenced(&st)?;
        st.seq += 1;
        let frame = self.frame(&st, Body::Flush);
        let (local, failed) = self.replicate(&mut st, &frame, || match &self.local {
            Some(l) => l.flush(),
            None => Ok(()),
        })?;
        self.remove_all(&mut st, failed)?;
        local?;
        // Every replica still in the set has made the writes durable.
        st.since_flush.clear();
        Ok(())
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
