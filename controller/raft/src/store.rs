//! RocksDB storage: the Raft log, its metadata and the state-machine
//! snapshot, in three column families of one database.
//!
//! * `log`: entry index (big-endian `u64`) → JSON entry.
//! * `meta`: `vote`, `committed`, `last_purged`.
//! * `sm`: `snapshot`, the last snapshot (metadata, which holds the
//!   last-applied log id and membership, plus the serialized state).
//!
//! Appends are written at once (so replication can read them) and reported
//! flushed only after a WAL fsync that covers them. One syncer thread
//! groups the fsyncs of concurrent appends: every append is durable before
//! it is acknowledged, and a burst of proposals shares one fsync.

// openraft's storage traits fix the (large) error type; helpers share it.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder, StorageIOError, Vote,
};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB,
};
use serde::{Deserialize, Serialize};

use crate::types::{LogId, Membership, SnapshotMeta, StorageError, TypeConfig};
use crate::{NodeId, StateMachine};

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const CF_SM: &str = "sm";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_SNAPSHOT: &[u8] = b"snapshot";

type Entry<S> = openraft::Entry<TypeConfig<S>>;

/// Errors opening the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// RocksDB refused to open the database.
    #[error("cannot open the RocksDB database")]
    Open(#[source] rocksdb::Error),
    /// Reading the stored snapshot failed.
    #[error("cannot read the stored snapshot")]
    Snapshot(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The stored snapshot is in a format this build does not read.
    #[error("the stored snapshot cannot be used: {0}")]
    Format(String),
}

/// Counters about the storage, for tests and monitoring.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) snapshots_built: AtomicU64,
    pub(crate) snapshots_installed: AtomicU64,
    pub(crate) wal_syncs: AtomicU64,
}

/// Opens (creating if needed) the database under `dir`.
pub(crate) fn open_db(dir: &Path) -> Result<Arc<DB>, StoreError> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // A node restarted in the same process may find the lock of its
    // previous incarnation held for a moment while its threads wind down.
    let mut attempts = 0;
    loop {
        let cfs =
            [CF_LOG, CF_META, CF_SM].map(|n| ColumnFamilyDescriptor::new(n, Options::default()));
        match DB::open_cf_descriptors(&opts, dir, cfs) {
            Ok(db) => return Ok(Arc::new(db)),
            Err(e) if attempts < 50 && e.to_string().contains("lock") => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => return Err(StoreError::Open(e)),
        }
    }
}

fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    // The column families are created by `open_db`; a missing one is a bug.
    db.cf_handle(name).expect("column family created at open")
}

fn sync_opts() -> WriteOptions {
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    wo
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn read_json<T: for<'de> Deserialize<'de>>(
    db: &DB,
    cfn: &str,
    key: &[u8],
) -> Result<Option<T>, AnyError> {
    match db.get_cf(cf(db, cfn), key).map_err(|e| AnyError::new(&e))? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| AnyError::new(&e)),
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, AnyError> {
    serde_json::to_vec(v).map_err(|e| AnyError::new(&e))
}

/// Reads log entries; shared by the log store and replication tasks.
pub(crate) struct LogReader<S> {
    db: Arc<DB>,
    _s: std::marker::PhantomData<fn() -> S>,
}

impl<S> Clone for LogReader<S> {
    fn clone(&self) -> Self {
        Self {
            db: self.db.clone(),
            _s: std::marker::PhantomData,
        }
    }
}

impl<S: StateMachine> LogReader<S> {
    fn entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry<S>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let key = index_key(start);
        let iter = self.db.iterator_cf(
            cf(&self.db, CF_LOG),
            IteratorMode::From(&key, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(AnyError::new(&e)))?;
            let index =
                u64::from_be_bytes(k.as_ref().try_into().map_err(|_| {
                    StorageIOError::read_logs(AnyError::error("bad log key length"))
                })?);
            if !range.contains(&index) {
                break;
            }
            let entry = serde_json::from_slice(&v).map_err(|e| {
                StorageIOError::read_logs(AnyError::error(format!(
                    "log entry {index} cannot be read by this version (written by a newer controller?): {e}"
                )))
            })?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl<S: StateMachine> RaftLogReader<TypeConfig<S>> for LogReader<S> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<S>>, StorageError> {
        self.entries(range)
    }
}

/// The Raft log and vote, in RocksDB.
pub(crate) struct LogStore<S: StateMachine> {
    reader: LogReader<S>,
    syncer: mpsc::Sender<LogFlushed<TypeConfig<S>>>,
}

impl<S: StateMachine> LogStore<S> {
    /// A log store over `db`, with its WAL syncer thread.
    pub(crate) fn new(db: Arc<DB>, counters: Arc<Counters>) -> Self {
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig<S>>>();
        let sync_db = db.clone();
        std::thread::Builder::new()
            .name("raft-wal-sync".into())
            .spawn(move || wal_syncer(&sync_db, &rx, &counters))
            .expect("spawn the WAL syncer thread");
        Self {
            reader: LogReader {
                db,
                _s: std::marker::PhantomData,
            },
            syncer: tx,
        }
    }

    fn db(&self) -> &DB {
        &self.reader.db
    }
}

/// Acknowledges appends after one WAL fsync per burst.
fn wal_syncer<C: openraft::RaftTypeConfig>(
    db: &DB,
    rx: &mpsc::Receiver<LogFlushed<C>>,
    counters: &Counters,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let result = db.flush_wal(true);
        counters.wal_syncs.fetch_add(1, Ordering::Relaxed);
        for cb in batch {
            cb.log_io_completed(
                result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| std::io::Error::other(e.to_string())),
            );
        }
    }
}

impl<S: StateMachine> RaftLogReader<TypeConfig<S>> for LogStore<S> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<S>>, StorageError> {
        self.reader.entries(range)
    }
}

impl<S: StateMachine> RaftLogStorage<TypeConfig<S>> for LogStore<S> {
    type LogReader = LogReader<S>;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig<S>>, StorageError> {
        let db = self.db();
        let last_purged: Option<LogId> =
            read_json(db, CF_META, KEY_LAST_PURGED).map_err(StorageIOError::read_logs)?;
        let last = match db.iterator_cf(cf(db, CF_LOG), IteratorMode::End).next() {
            None => None,
            Some(item) => {
                let (_, v) = item.map_err(|e| StorageIOError::read_logs(AnyError::new(&e)))?;
                let entry: Entry<S> = serde_json::from_slice(&v)
                    .map_err(|e| StorageIOError::read_logs(AnyError::new(&e)))?;
                Some(entry.log_id)
            }
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> LogReader<S> {
        self.reader.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let v = to_json(vote).map_err(StorageIOError::write_vote)?;
        self.db()
            .put_cf_opt(cf(self.db(), CF_META), KEY_VOTE, v, &sync_opts())
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        read_json(self.db(), CF_META, KEY_VOTE).map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let v = to_json(&committed).map_err(StorageIOError::write)?;
        self.db()
            .put_cf(cf(self.db(), CF_META), KEY_COMMITTED, v)
            .map_err(|e| StorageIOError::write(AnyError::new(&e)).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let c: Option<Option<LogId>> =
            read_json(self.db(), CF_META, KEY_COMMITTED).map_err(StorageIOError::read)?;
        Ok(c.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig<S>>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<S>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let db = self.db();
        let mut batch = WriteBatch::default();
        for entry in entries {
            let v = to_json(&entry).map_err(StorageIOError::write_logs)?;
            batch.put_cf(cf(db, CF_LOG), index_key(entry.log_id.index), v);
        }
        // Visible at once; durable once the syncer has fsynced the WAL.
        db.write(batch)
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        self.syncer.send(callback).map_err(|_| {
            StorageIOError::write_logs(AnyError::error("the WAL syncer has stopped"))
        })?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db();
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf(db, CF_LOG), index_key(log_id.index), index_key(u64::MAX));
        db.write_opt(batch, &sync_opts())
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db();
        let mut batch = WriteBatch::default();
        let v = to_json(&log_id).map_err(StorageIOError::write_logs)?;
        batch.put_cf(cf(db, CF_META), KEY_LAST_PURGED, v);
        batch.delete_range_cf(cf(db, CF_LOG), index_key(0), index_key(log_id.index + 1));
        db.write_opt(batch, &sync_opts())
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)).into())
    }
}

/// The in-memory state machine and what it has applied.
pub(crate) struct SmData<S> {
    pub(crate) state: S,
    pub(crate) last_applied: Option<LogId>,
    pub(crate) membership: Membership,
}

/// A snapshot as stored in the `sm` column family.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The state machine: in memory, made durable by snapshots (the log since
/// the last snapshot is re-applied at start-up).
pub(crate) struct SmStore<S> {
    db: Arc<DB>,
    data: Arc<RwLock<SmData<S>>>,
    counters: Arc<Counters>,
}

impl<S: StateMachine> SmStore<S> {
    /// Loads the last snapshot from `db`, or starts from the default state.
    pub(crate) fn open(db: Arc<DB>, counters: Arc<Counters>) -> Result<Self, StoreError> {
        let stored: Option<StoredSnapshot> =
            read_json(&db, CF_SM, KEY_SNAPSHOT).map_err(|e| StoreError::Snapshot(e.into()))?;
        let mut data = match stored {
            None => SmData {
                state: S::default(),
                last_applied: None,
                membership: Membership::default(),
            },
            Some(s) => SmData {
                state: serde_json::from_slice(&s.data)
                    .map_err(|e| StoreError::Snapshot(e.into()))?,
                last_applied: s.meta.last_log_id,
                membership: s.meta.last_membership,
            },
        };
        data.state.upgrade().map_err(StoreError::Format)?;
        Ok(Self {
            db,
            data: Arc::new(RwLock::new(data)),
            counters,
        })
    }

    /// The shared state, read by the replicator after a read-index check.
    pub(crate) fn shared(&self) -> Arc<RwLock<SmData<S>>> {
        self.data.clone()
    }

    fn save_snapshot(&self, snap: &StoredSnapshot) -> Result<(), StorageError> {
        let sig = Some(snap.meta.signature());
        let v = to_json(snap).map_err(|e| StorageIOError::write_snapshot(sig.clone(), e))?;
        self.db
            .put_cf_opt(cf(&self.db, CF_SM), KEY_SNAPSHOT, v, &sync_opts())
            .map_err(|e| StorageIOError::write_snapshot(sig, AnyError::new(&e)).into())
    }
}

fn poisoned() -> StorageError {
    StorageIOError::read_state_machine(AnyError::error("state machine lock poisoned")).into()
}

impl<S: StateMachine> RaftSnapshotBuilder<TypeConfig<S>> for SmStore<S> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig<S>>, StorageError> {
        let (data, last_applied, membership) = {
            let sm = self.data.read().map_err(|_| poisoned())?;
            let data = to_json(&sm.state).map_err(StorageIOError::read_state_machine)?;
            (data, sm.last_applied, sm.membership.clone())
        };
        let n = self
            .counters
            .snapshots_built
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        let snapshot_id = format!("{}-{n}", last_applied.map_or(0, |l| l.index));
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
            snapshot_id,
        };
        let stored = StoredSnapshot { meta, data };
        self.save_snapshot(&stored)?;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl<S: StateMachine> RaftStateMachine<TypeConfig<S>> for SmStore<S> {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        let sm = self.data.read().map_err(|_| poisoned())?;
        Ok((sm.last_applied, sm.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<S::Response>>, StorageError>
    where
        I: IntoIterator<Item = Entry<S>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut sm = self.data.write().map_err(|_| poisoned())?;
        let mut out = Vec::new();
        for entry in entries {
            sm.last_applied = Some(entry.log_id);
            out.push(match entry.payload {
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Normal(cmds) => cmds.into_iter().map(|c| sm.state.apply(c)).collect(),
                EntryPayload::Membership(m) => {
                    sm.membership = Membership::new(Some(entry.log_id), m);
                    Vec::new()
                }
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self {
        Self {
            db: self.db.clone(),
            data: self.data.clone(),
            counters: self.counters.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let mut state: S = serde_json::from_slice(&data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        // Refused before anything of it is kept or applied.
        state.upgrade().map_err(|m| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::error(m))
        })?;
        self.save_snapshot(&StoredSnapshot {
            meta: meta.clone(),
            data,
        })?;
        let mut sm = self.data.write().map_err(|_| poisoned())?;
        sm.state = state;
        sm.last_applied = meta.last_log_id;
        sm.membership = meta.last_membership.clone();
        self.counters
            .snapshots_installed
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig<S>>>, StorageError> {
        let stored: Option<StoredSnapshot> = read_json(&self.db, CF_SM, KEY_SNAPSHOT)
            .map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
