//! Replicated volumes over loopback TCP, each "host" a replica directory and
//! server in this process: a primary's writes land identically on every
//! replica; a backup that dies or stalls is removed only through the
//! authority, which raises the epoch; so is one that stalls or answers
//! wrong; a fenced old primary writes nothing; a dead backup at open goes
//! the same way. A backup that comes back is resynced (only the regions it
//! missed, counted) and is then identical to the others, also while writes
//! go on, and after a primary restart (by checksums). A new primary
//! reconciles replicas in sync that an earlier one left different (a
//! fenced primary's write one backup took), unless the one before it
//! closed its serving session clean.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferro_blockd::link::Link;
use ferro_blockd::replica::{Replica, ReplicaServer};
use ferro_blockd::replication::{
    Authority, Backup, Fenced, Options, ReplicatedStore, ReplicationError, Session,
};
use ferro_blockd::store::{LocalFile, Store};
use ferro_blockd::wire::{self, crc32c, Body, Frame, NackCode};

const VOL: &str = "vol-a";
const SIZE: u64 = 16 << 20;
const MIB: u64 = 1 << 20;

/// The controller's part, faked: it holds the epoch and the replica set,
/// and raises the epoch on the remaining replicas before granting it.
struct FakeAuthority {
    state: Mutex<AuthorityState>,
}

struct AuthorityState {
    epoch: u64,
    members: HashMap<String, Arc<Replica>>,
    /// Every replica host, in sync or not.
    all: HashMap<String, Arc<Replica>>,
    calls: Vec<(u64, String)>,
    /// The last serving session, and whether it was closed clean.
    session: u64,
    clean: bool,
}

impl FakeAuthority {
    fn epoch(&self) -> u64 {
        self.state.lock().unwrap().epoch
    }

    fn calls(&self) -> Vec<(u64, String)> {
        self.state.lock().unwrap().calls.clone()
    }

    /// A new epoch that only `on` have taken from their watches so far
    /// (the others take it at [`FakeAuthority::bump`]-like catch-up).
    fn bump_on(&self, on: &[&str]) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.epoch += 1;
        st.clean = false;
        for id in on {
            st.members[*id].set_epoch(VOL, st.epoch).unwrap();
        }
        st.epoch
    }

    /// Every member takes the current epoch.
    fn catch_up(&self) {
        let st = self.state.lock().unwrap();
        for r in st.members.values() {
            r.set_epoch(VOL, st.epoch).unwrap();
        }
    }

    /// Fails the volume over elsewhere: a new epoch on every member.
    fn bump(&self) -> u64 {
        let mut st = self.state.lock().unwrap();
        st.epoch += 1;
        st.clean = false;
        for r in st.members.values() {
            r.set_epoch(VOL, st.epoch).unwrap();
        }
        st.epoch
    }
}

impl Authority for FakeAuthority {
    fn remove_replica(&self, volume: &str, epoch: u64, replica: &str) -> Result<u64, Fenced> {
        let mut st = self.state.lock().unwrap();
        st.calls.push((epoch, replica.to_string()));
        if epoch != st.epoch {
            return Err(Fenced {
                volume: volume.to_string(),
                epoch,
            });
        }
        st.members.remove(replica);
        st.epoch += 1;
        st.clean = false;
        for r in st.members.values() {
            r.set_epoch(volume, st.epoch).unwrap();
        }
        Ok(st.epoch)
    }

    fn add_replica(&self, volume: &str, epoch: u64, replica: &str) -> Result<u64, Fenced> {
        let mut st = self.state.lock().unwrap();
        st.calls.push((epoch, format!("+{replica}")));
        let fenced = Fenced {
            volume: volume.to_string(),
            epoch,
        };
        if epoch != st.epoch || st.members.contains_key(replica) {
            return Err(fenced);
        }
        let r = st.all.get(replica).cloned().ok_or(fenced)?;
        st.members.insert(replica.to_string(), r);
        st.epoch += 1;
        st.clean = false;
        for r in st.members.values() {
            r.set_epoch(volume, st.epoch).unwrap();
        }
        Ok(st.epoch)
    }

    fn open_session(&self, volume: &str, epoch: u64) -> Result<Session, Fenced> {
        let mut st = self.state.lock().unwrap();
        if epoch != st.epoch {
            return Err(Fenced {
                volume: volume.to_string(),
                epoch,
            });
        }
        st.session += 1;
        Ok(Session {
            id: st.session,
            was_clean: std::mem::take(&mut st.clean),
            epoch,
        })
    }

    fn close_session(&self, volume: &str, epoch: u64, session: u64) -> Result<(), Fenced> {
        let mut st = self.state.lock().unwrap();
        if epoch != st.epoch || session != st.session {
            return Err(Fenced {
                volume: volume.to_string(),
                epoch,
            });
        }
        st.clean = true;
        Ok(())
    }
}

/// One "host" holding a replica of the volume.
struct Host {
    id: String,
    replica: Arc<Replica>,
    server: Option<ReplicaServer>,
}

impl Host {
    fn data(&self) -> Vec<u8> {
        std::fs::read(self.replica.data_path(VOL)).unwrap()
    }

    fn kill(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

/// A primary, its backups and the authority, under a scratch directory.
struct Cluster {
    dir: PathBuf,
    authority: Arc<FakeAuthority>,
    hosts: Vec<Host>,
}

impl Cluster {
    /// `backups` replica hosts at epoch 1.
    fn new(name: &str, backups: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("blockd-repl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut hosts = Vec::new();
        let mut members = HashMap::new();
        for i in 0..backups {
            let id = format!("host-{i}");
            let hdir = dir.join(&id);
            std::fs::create_dir_all(&hdir).unwrap();
            let replica = Arc::new(Replica::new(&hdir));
            replica.open_volume(VOL, SIZE).unwrap();
            replica.set_epoch(VOL, 1).unwrap();
            let server = ReplicaServer::start(replica.clone(), "127.0.0.1:0").unwrap();
            members.insert(id.clone(), replica.clone());
            hosts.push(Host {
                id,
                replica,
                server: Some(server),
            });
        }
        let authority = Arc::new(FakeAuthority {
            state: Mutex::new(AuthorityState {
                epoch: 1,
                all: members.clone(),
                members,
                calls: Vec::new(),
                session: 0,
                clean: false,
            }),
        });
        Cluster {
            dir,
            authority,
            hosts,
        }
    }

    fn backups(&self) -> Vec<Backup> {
        self.hosts
            .iter()
            .map(|h| Backup {
                id: h.id.clone(),
                addr: h
                    .server
                    .as_ref()
                    .map_or_else(dead_addr, ReplicaServer::local_addr),
            })
            .collect()
    }

    /// Host `i` comes back: its replica server again (a new port), and
    /// the volume's current epoch, as the controller's watch gives a
    /// replica out of sync.
    fn revive(&mut self, i: usize) {
        let h = &mut self.hosts[i];
        h.server = Some(ReplicaServer::start(h.replica.clone(), "127.0.0.1:0").unwrap());
        h.replica.set_epoch(VOL, self.authority.epoch()).unwrap();
    }

    fn backup(&self, i: usize) -> Backup {
        self.backups().swap_remove(i)
    }

    fn primary_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.vol"))
    }

    fn primary(&self, name: &str, options: Options) -> Result<ReplicatedStore, ReplicationError> {
        std::fs::create_dir_all(&self.dir).unwrap();
        let local = LocalFile::open_or_create(&self.primary_path(name), SIZE).unwrap();
        ReplicatedStore::open(
            VOL,
            self.authority.epoch(),
            Box::new(local),
            &self.backups(),
            self.authority.clone(),
            options,
        )
    }
}

impl Cluster {
    /// A primary as `serve` opens one: a session first, then the store at
    /// its epoch, then the session begun; and whether it was clean.
    /// Host "p" serving volumes, its own copy in [`Cluster::primary_path`].
    fn serving(&self) -> ferro_blockd::serve::Serving {
        let primary = self.primary_path("p");
        ferro_blockd::serve::Serving::new(
            &self.dir.join("vhost"),
            "p",
            Box::new(move |_: &str, size: u64| {
                let f = LocalFile::open_or_create(&primary, size).map_err(|e| e.to_string())?;
                Ok(Some(Box::new(f) as Box<dyn Store>))
            }),
            self.authority.clone(),
        )
        .unwrap()
    }

    fn serving_primary(&self, name: &str) -> (ReplicatedStore, bool) {
        let session = self
            .authority
            .open_session(VOL, self.authority.epoch())
            .unwrap();
        let p = self.primary(name, patient()).unwrap();
        assert_eq!(p.epoch(), session.epoch);
        p.begin_session(session);
        (p, session.was_clean)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for h in &mut self.hosts {
            h.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An address nothing listens on.
fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// `len` bytes of a pattern that differs per `seed` and per offset.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ seed)
        .collect()
}

/// Timeouts for tests where a dead backup fails at once (refused or reset):
/// generous, so a healthy backup on a loaded CI machine never misses one.
fn patient() -> Options {
    Options {
        timeout: Duration::from_secs(5),
        ..Options::default()
    }
}

/// The timeout for tests where a backup stalls: it must fire, yet a healthy
/// backup beside it must still answer within it.
const STALL_TIMEOUT: Duration = Duration::from_secs(1);

#[test]
fn two_and_three_replica_writes_are_identical_on_every_replica() {
    for backups in [1, 2] {
        let c = Cluster::new(&format!("identical{backups}"), backups);
        let p = c.primary("p", Options::default()).unwrap();
        assert_eq!(p.in_sync().len(), backups);
        p.write_at(&pattern(1, 4096), 0).unwrap();
        p.write_at(&pattern(2, 512), 3 * MIB - 256).unwrap();
        // Larger than one frame: sent as two.
        p.write_at(&pattern(3, 5 << 20), 7 * MIB).unwrap();
        p.write_at(&pattern(4, 64 << 10), SIZE - (64 << 10))
            .unwrap();
        p.flush().unwrap();
        let primary = std::fs::read(c.primary_path("p")).unwrap();
        assert_eq!(&primary[..4096], &pattern(1, 4096)[..]);
        for h in &c.hosts {
            assert_eq!(crc32c(&h.data()), crc32c(&primary), "{} differs", h.id);
        }
        let mut back = vec![0; 5 << 20];
        p.read_at(&mut back, 7 * MIB).unwrap();
        assert_eq!(back, pattern(3, 5 << 20));
        assert!(c.authority.calls().is_empty());
        assert!(p.dirty().is_clean());
        assert_eq!(p.epoch(), 1);
    }
}

/// A batch of writes (a queue pass) is pipelined to real replica servers,
/// more than a window of them, overlapping ones among them: every replica
/// ends with the primary's bytes, the later write on top.
#[test]
fn a_pipelined_batch_lands_identically_and_in_order_on_every_replica() {
    let c = Cluster::new("batch", 2);
    let p = c.primary("p", Options::default()).unwrap();
    let data: Vec<Vec<u8>> = (0..100u8).map(|i| pattern(i, 4096)).collect();
    // Writes 0..100, each 4 KiB, every tenth onto the same place as the
    // one before it, and one of 5 MiB (two frames) in the middle.
    let mut writes: Vec<(u64, &[u8])> = (0..100u64)
        .map(|i| {
            let slot = if i % 10 == 0 && i > 0 { i - 1 } else { i };
            (slot * 4096, &data[i as usize][..])
        })
        .collect();
    let big = pattern(200, 5 << 20);
    writes.insert(50, (8 * MIB, &big));
    let results = p.write_batch(&writes);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    p.flush().unwrap();
    let primary = std::fs::read(c.primary_path("p")).unwrap();
    assert_eq!(&primary[9 * 4096..10 * 4096], &data[10][..]);
    assert_eq!(&primary[8 * MIB as usize..13 * MIB as usize], &big[..]);
    for h in &c.hosts {
        assert_eq!(crc32c(&h.data()), crc32c(&primary), "{} differs", h.id);
    }
    assert!(c.authority.calls().is_empty());
    assert_eq!(p.in_sync().len(), 2);
}

#[test]
fn a_killed_backup_is_removed_through_the_authority_and_writes_go_on() {
    let mut c = Cluster::new("killed", 2);
    let p = c.primary("p", patient()).unwrap();
    p.write_at(&pattern(1, 4096), 0).unwrap();
    p.flush().unwrap();
    // Written but not yet flushed when the backup dies: it may have lost
    // it, so a resync must copy it too.
    p.write_at(&pattern(2, 4096), MIB).unwrap();
    c.hosts[1].kill();

    p.write_at(&pattern(3, 8192), 3 * MIB + 4096).unwrap();
    assert_eq!(c.authority.calls(), vec![(1, "host-1".to_string())]);
    assert_eq!(p.epoch(), 2);
    assert_eq!(c.hosts[0].replica.epoch(VOL), Some(2));
    assert_eq!(c.hosts[1].replica.epoch(VOL), Some(1));
    assert_eq!(p.in_sync(), vec!["host-0"]);
    assert_eq!(p.out_of_sync(), vec!["host-1"]);

    p.write_at(&pattern(4, 4096), 9 * MIB).unwrap();
    p.flush().unwrap();
    assert_eq!(p.dirty().regions().collect::<Vec<_>>(), vec![1, 3, 9]);

    let primary = std::fs::read(c.primary_path("p")).unwrap();
    assert_eq!(crc32c(&c.hosts[0].data()), crc32c(&primary));
    let dead = c.hosts[1].data();
    assert_ne!(crc32c(&dead), crc32c(&primary));
    // Outside the dirty regions the dead backup is identical.
    let region = p.dirty().region_size() as usize;
    for (r, (a, b)) in primary.chunks(region).zip(dead.chunks(region)).enumerate() {
        if !p.dirty().is_dirty(r as u64) {
            assert_eq!(a, b, "clean region {r} differs");
        }
    }
    // The dead backup took nothing written at the new epoch.
    assert!(dead[9 * MIB as usize..][..4096].iter().all(|b| *b == 0));
}

#[test]
fn a_backup_lost_at_a_flush_leaves_its_unflushed_regions_dirty() {
    let mut c = Cluster::new("lost-at-flush", 2);
    let p = c.primary("p", patient()).unwrap();
    p.write_at(&pattern(1, 4096), 4 * MIB).unwrap();
    p.write_at(&pattern(2, 4096), 6 * MIB).unwrap();
    c.hosts[0].kill();
    p.flush().unwrap();
    assert_eq!(c.authority.calls(), vec![(1, "host-0".to_string())]);
    assert_eq!(p.dirty().regions().collect::<Vec<_>>(), vec![4, 6]);
    // Flushed everywhere left: nothing new joins the map until written.
    p.flush().unwrap();
    assert_eq!(p.dirty().count(), 2);
    assert_eq!(p.in_sync(), vec!["host-1"]);
}

#[test]
fn losing_every_backup_leaves_a_one_copy_volume_that_still_writes() {
    let mut c = Cluster::new("lose-all", 2);
    let p = c.primary("p", patient()).unwrap();
    c.hosts[0].kill();
    c.hosts[1].kill();
    p.write_at(&pattern(1, 4096), 2 * MIB).unwrap();
    assert_eq!(c.authority.calls().len(), 2);
    assert_eq!((p.epoch(), c.authority.epoch()), (3, 3));
    assert!(p.in_sync().is_empty());
    assert_eq!(p.dirty().regions().collect::<Vec<_>>(), vec![2]);
}

/// How a fake replica answers a frame (the bytes to send back).
type Reply = fn(&Frame) -> Vec<u8>;

/// A "replica" that says hello properly, then answers the next frame with
/// `reply(frame)`, or stays silent (holding the connection) if it is empty.
fn misbehaving(reply: Reply) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut link = Link::new(s).unwrap();
        let hello = link.recv().unwrap().unwrap();
        let ack = Frame {
            body: Body::Ack {
                offset: SIZE,
                len: 0,
            },
            ..hello
        };
        link.send(&ack).unwrap();
        if let Ok(Some(next)) = link.recv() {
            let bytes = reply(&next);
            if bytes.is_empty() {
                // Silent, connection held open: only the timeout helps.
                std::thread::sleep(STALL_TIMEOUT * 3);
            } else {
                link.send_bytes(&bytes).unwrap();
            }
        }
    });
    (addr, thread)
}

fn answer(to: &Frame, epoch: u64, seq: u64, body: Body) -> Vec<u8> {
    let f = Frame {
        volume: to.volume.clone(),
        epoch,
        seq,
        body,
    };
    wire::encode(&f).unwrap()
}

fn ack_of(f: &Frame) -> Body {
    match &f.body {
        Body::Write { offset, data } => Body::Ack {
            offset: *offset,
            len: data.len() as u32,
        },
        _ => Body::Ack { offset: 0, len: 0 },
    }
}

#[test]
fn a_backup_that_stalls_or_answers_wrong_is_removed() {
    let replies: [(&str, Reply); 6] = [
        ("silence", |_| Vec::new()),
        ("stale seq", |f| answer(f, f.epoch, f.seq - 1, ack_of(f))),
        ("other epoch", |f| answer(f, f.epoch + 1, f.seq, ack_of(f))),
        ("wrong echo", |f| {
            let body = Body::Ack { offset: 0, len: 1 };
            answer(f, f.epoch, f.seq, body)
        }),
        ("nack", |f| {
            let body = Body::Nack {
                code: NackCode::Io,
                request_epoch: f.epoch,
                message: "disk on fire".into(),
            };
            answer(f, f.epoch, f.seq, body)
        }),
        ("garbage", |_| b"HTTP/1.1 200 OK\r\n\r\n".to_vec()),
    ];
    for (name, reply) in replies {
        let c = Cluster::new(&format!("wrong-{}", name.replace(' ', "-")), 1);
        let (addr, fake) = misbehaving(reply);
        let mut backups = c.backups();
        backups.push(Backup {
            id: "fake".into(),
            addr,
        });
        let local = LocalFile::open_or_create(&c.primary_path("p"), SIZE).unwrap();
        let opts = Options {
            timeout: STALL_TIMEOUT,
            ..Options::default()
        };
        let p = ReplicatedStore::open(VOL, 1, Box::new(local), &backups, c.authority.clone(), opts)
            .unwrap();
        assert_eq!(p.in_sync().len(), 2, "{name}");
        p.write_at(&pattern(5, 4096), 0).unwrap();
        assert_eq!(c.authority.calls(), vec![(1, "fake".to_string())], "{name}");
        assert_eq!(p.in_sync(), vec!["host-0"], "{name}");
        assert_eq!(&c.hosts[0].data()[..4096], &pattern(5, 4096)[..], "{name}");
        fake.join().unwrap();
    }
}

#[test]
fn a_revoked_primary_fails_every_request_and_writes_nothing() {
    let c = Cluster::new("revoked", 2);
    let p = c.primary("p", patient()).unwrap();
    p.write_at(&pattern(1, 4096), 0).unwrap();
    p.flush().unwrap();
    let before: Vec<u32> = c.hosts.iter().map(|h| crc32c(&h.data())).collect();
    let local = std::fs::read(c.primary_path("p")).unwrap();
    p.revoke();
    assert!(p.is_fenced());
    let err = p.write_at(&pattern(2, 4096), 4096).unwrap_err();
    assert!(err.to_string().contains("fenced"), "{err}");
    assert!(p.read_at(&mut [0; 512], 0).is_err());
    assert!(p.flush().is_err());
    let after: Vec<u32> = c.hosts.iter().map(|h| crc32c(&h.data())).collect();
    assert_eq!(before, after, "a revoked primary's write reached a backup");
    assert_eq!(std::fs::read(c.primary_path("p")).unwrap(), local);
    // Nobody was asked: revoking is this host's own decision.
    assert!(c.authority.calls().is_empty());
}

/// A primary that stops with every write flushed everywhere, none failed
/// and its backups compared closes its session clean; the next primary
/// then compares nothing. One that stops with a write not flushed, with a
/// backup not compared, or after another primary opened a session, does
/// not.
#[test]
fn a_session_closed_clean_spares_the_next_primary_the_comparison() {
    let c = Cluster::new("sessions", 2);
    let (first, was_clean) = c.serving_primary("p");
    assert!(!was_clean, "never closed: not clean");
    assert_eq!(first.unreconciled(), vec!["host-0", "host-1"]);
    first.reconcile().unwrap();
    first.write_at(&pattern(1, 4096), 0).unwrap();
    first.flush().unwrap();
    // Another session opened since: the first one's close is refused.
    let (second, was_clean) = c.serving_primary("p");
    assert!(!was_clean);
    assert!(!first.retire(), "a stale session closed clean");
    assert!(first.write_at(&[1; 512], 0).is_err(), "retired, yet wrote");
    // Not compared: not clean, however flushed.
    second.write_at(&pattern(2, 4096), 4096).unwrap();
    second.flush().unwrap();
    assert!(!second.retire(), "closed clean without comparing");

    // Compared, written, flushed: clean.
    let (third, _) = c.serving_primary("p");
    third.reconcile().unwrap();
    assert!(third.unreconciled().is_empty());
    third.write_at(&pattern(3, 8192), MIB).unwrap();
    third.flush().unwrap();
    assert!(third.retire());
    assert!(third.is_fenced());

    // The next primary compares nothing, and its unflushed write keeps
    // the one after it from skipping.
    let (next, was_clean) = c.serving_primary("p");
    assert!(was_clean, "closed clean, yet not seen");
    assert!(next.unreconciled().is_empty());
    next.write_at(&pattern(4, 4096), 2 * MIB).unwrap();
    assert!(!next.retire(), "closed clean with a write not flushed");
    let (last, was_clean) = c.serving_primary("p");
    assert!(!was_clean);
    assert_eq!(last.unreconciled(), vec!["host-0", "host-1"]);
    assert!(c.hosts[0].data() == c.hosts[1].data());
}

/// A primary whose frontend went away (its VMM stopped) flushes what its
/// guest did not and closes its session clean, yet goes on serving: its
/// next write first opens a new session (no longer clean), and after the
/// next idle close, the next primary (the instance started on another
/// host, say) compares nothing.
#[test]
fn a_primary_with_no_frontend_closes_its_session_clean_and_reopens_it_to_write() {
    let c = Cluster::new("idle", 2);
    let clean = || c.authority.state.lock().unwrap().clean;
    let (p, _) = c.serving_primary("p");
    // Not compared yet: left open, then closed once the comparison is
    // done (the frontend still gone).
    assert!(!p.close_idle());
    assert!(!clean());
    p.reconcile().unwrap();
    assert!(p.settle(), "compared, with no frontend: closed");
    assert!(clean());
    p.write_at(&pattern(1, 4096), 0).unwrap();
    assert!(!clean(), "written: a session opened again");
    assert!(!p.settle(), "written since: a frontend is there");
    assert!(p.close_idle(), "flushed and closed");
    assert!(clean());
    let session = c.authority.state.lock().unwrap().session;
    p.write_at(&pattern(2, 4096), 4096).unwrap();
    assert!(!clean(), "written in a closed session");
    assert_eq!(c.authority.state.lock().unwrap().session, session + 1);
    for h in &c.hosts {
        assert_eq!(&h.data()[4096..8192], &pattern(2, 4096)[..]);
    }
    assert!(p.close_idle());
    assert!(p.retire(), "closed while idle, nothing written since");
    assert!(p.write_at(&[1; 512], 0).is_err(), "retired, yet wrote");
    let (next, was_clean) = c.serving_primary("p");
    assert!(was_clean && next.unreconciled().is_empty());
    assert!(c.hosts[0].data() == c.hosts[1].data());
}

/// A resync changes the replica set, so after an idle close it first
/// opens a serving session again, as a write does.
#[test]
fn a_resync_after_an_idle_close_reopens_the_session() {
    let mut c = Cluster::new("idle-resync", 2);
    let (p, _) = c.serving_primary("p");
    p.reconcile().unwrap();
    c.hosts[1].kill();
    p.write_at(&pattern(1, 4096), 0).unwrap();
    assert_eq!(p.out_of_sync(), vec!["host-1"]);
    assert!(p.close_idle());
    let session = c.authority.state.lock().unwrap().session;
    c.revive(1);
    p.resync(&c.backup(1)).unwrap();
    let st = c.authority.state.lock().unwrap();
    assert_eq!(
        st.session,
        session + 1,
        "no session was opened for the resync"
    );
    assert!(!st.clean);
    drop(st);
    assert_eq!(p.in_sync(), vec!["host-0", "host-1"]);
}

#[test]
fn a_fenced_old_primary_writes_nothing_anywhere() {
    let c = Cluster::new("fenced", 2);
    let old = c.primary("old", patient()).unwrap();
    old.write_at(&pattern(1, 4096), 0).unwrap();
    old.flush().unwrap();
    let before: Vec<u32> = c.hosts.iter().map(|h| crc32c(&h.data())).collect();

    // The volume fails over to a new primary: epoch 2 on every replica.
    assert_eq!(c.authority.bump(), 2);
    let err = old.write_at(&pattern(2, 4096), 4096).unwrap_err();
    assert!(err.to_string().contains("fenced"), "{err}");
    assert!(old.is_fenced());
    let after: Vec<u32> = c.hosts.iter().map(|h| crc32c(&h.data())).collect();
    assert_eq!(before, after, "a fenced primary's write landed");
    assert_eq!(c.authority.calls(), vec![(1, "host-0".to_string())]);

    // Everything after is refused without asking anyone.
    assert!(old.flush().is_err());
    assert!(old.read_at(&mut [0; 512], 0).is_err());
    assert!(old.write_at(&[1; 512], 0).is_err());
    assert_eq!(c.authority.calls().len(), 1);

    // The new primary, at epoch 2, writes everywhere.
    let new = c.primary("new", patient()).unwrap();
    new.write_at(&pattern(3, 4096), 4096).unwrap();
    for h in &c.hosts {
        assert_eq!(&h.data()[4096..8192], &pattern(3, 4096)[..]);
    }
}

/// A fenced primary's write that one backup took (still at the old
/// epoch) and the other refused leaves two replicas in sync that differ;
/// the next primary's reconcile makes them agree, copying only that
/// region, and every later write lands on both.
#[test]
fn a_fenced_primarys_unacknowledged_write_is_reconciled_by_the_next_primary() {
    let c = Cluster::new("reconcile-fenced", 2);
    let old = c.primary("old", patient()).unwrap();
    old.write_at(&pattern(1, 8192), 0).unwrap();
    old.flush().unwrap();

    // host-1 has taken the next epoch from its watch, host-0 not yet.
    assert_eq!(c.authority.bump_on(&["host-1"]), 2);
    let err = old.write_at(&pattern(2, 4096), 3 * MIB).unwrap_err();
    assert!(err.to_string().contains("fenced"), "{err}");
    assert!(old.is_fenced());
    let at = 3 * MIB as usize..3 * MIB as usize + 4096;
    assert_eq!(c.hosts[0].data()[at.clone()], pattern(2, 4096)[..]);
    assert!(c.hosts[1].data()[at.clone()].iter().all(|&b| b == 0));

    // The next primary (its instance's host holds no copy) at epoch 2.
    c.authority.catch_up();
    let new =
        ReplicatedStore::open_remote(VOL, 2, SIZE, &c.backups(), c.authority.clone(), patient())
            .unwrap();
    assert_eq!(new.unreconciled(), vec!["host-0", "host-1"]);
    let report = new.reconcile().unwrap();
    assert_eq!(report.backups, 1, "{report:?}");
    assert_eq!((report.regions, report.bytes), (1, MIB), "{report:?}");
    assert!(report.left.is_empty());
    assert!(new.unreconciled().is_empty());
    assert!(c.hosts[0].data() == c.hosts[1].data(), "still different");
    // Nothing left to do, and nothing asked of the authority.
    assert_eq!(new.reconcile().unwrap(), Default::default());
    assert_eq!(c.authority.epoch(), 2);

    new.write_at(&pattern(3, 4096), 5 * MIB).unwrap();
    assert!(c.hosts[0].data() == c.hosts[1].data());
    let mut back = vec![0; 4096];
    new.read_at(&mut back, 3 * MIB).unwrap();
    assert_eq!(back, pattern(2, 4096));
}

/// A primary with its own copy makes its backups agree with it; one it
/// loses before reconciling it comes back by checksum, never by the dirty
/// map (which knows nothing of the earlier difference).
#[test]
fn a_backup_lost_before_it_was_reconciled_is_resynced_by_checksum() {
    let mut c = Cluster::new("reconcile-lost", 2);
    // Left by an earlier primary: host-1 took a write nobody else has.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.hosts[1].replica.data_path(VOL))
            .unwrap();
        f.write_all_at(&pattern(9, 512), 9 * MIB).unwrap();
    }
    let p = c.primary("p", patient()).unwrap();
    c.hosts[1].kill();
    p.write_at(&pattern(1, 4096), 0).unwrap();
    assert_eq!(p.in_sync(), vec!["host-0"]);
    assert_eq!(c.authority.epoch(), 2);
    c.revive(1);
    let report = p.resync(&c.backup(1)).unwrap();
    assert!(report.by_checksum, "{report:?}");
    assert_eq!(report.regions, 2, "{report:?}");
    let primary = std::fs::read(c.primary_path("p")).unwrap();
    assert!(c.hosts[1].data() == primary, "host-1 differs");
    // host-0 was never compared: the reconcile does it, and finds nothing.
    assert_eq!(p.unreconciled(), vec!["host-0"]);
    let r = p.reconcile().unwrap();
    assert_eq!((r.backups, r.regions), (1, 0), "{r:?}");
    assert!(c.hosts[0].data() == primary);
}

#[test]
fn an_unreachable_backup_at_open_is_removed_through_the_authority() {
    let mut c = Cluster::new("open-dead", 2);
    c.hosts[1].kill();
    let p = c.primary("p", patient()).unwrap();
    assert_eq!(p.in_sync(), vec!["host-0"]);
    assert_eq!(p.epoch(), 2);
    p.write_at(&pattern(1, 512), 0).unwrap();
    assert_eq!(&c.hosts[0].data()[..512], &pattern(1, 512)[..]);
}

#[test]
fn a_primary_refused_by_the_authority_at_open_does_not_open() {
    let mut c = Cluster::new("open-fenced", 1);
    c.hosts[0].kill();
    let local = LocalFile::open_or_create(&c.primary_path("p"), SIZE).unwrap();
    let stale = ReplicatedStore::open(
        VOL,
        0,
        Box::new(local),
        &c.backups(),
        c.authority.clone(),
        patient(),
    );
    assert!(matches!(stale, Err(ReplicationError::Fenced(_))));
}

#[test]
fn a_backup_of_another_size_is_not_taken_in_sync() {
    let c = Cluster::new("size", 1);
    let local = LocalFile::open_or_create(&c.primary_path("p"), SIZE / 2).unwrap();
    let p = ReplicatedStore::open(
        VOL,
        1,
        Box::new(local),
        &c.backups(),
        c.authority.clone(),
        patient(),
    )
    .unwrap();
    assert!(p.in_sync().is_empty());
    assert_eq!(c.authority.calls(), vec![(1, "host-0".to_string())]);
}

/// Rough latency of 4 KiB replicated writes over loopback (no fsync), to
/// catch a pathology such as Nagle's delay; `--ignored` to run, numbers
/// printed. Not a benchmark: that is `cargo xtask bench blockd`.
#[test]
#[ignore]
fn replicated_4k_write_latency() {
    for backups in [0, 1, 2] {
        let c = Cluster::new(&format!("latency{backups}"), backups);
        let p = c.primary("p", Options::default()).unwrap();
        let data = pattern(9, 4096);
        let mut lat: Vec<Duration> = (0..2000u64)
            .map(|i| {
                let t = std::time::Instant::now();
                p.write_at(&data, (i * 4096 * 7) % (SIZE - 4096)).unwrap();
                t.elapsed()
            })
            .collect();
        lat.sort();
        println!(
            "{backups} backup(s): p50 {:?} p99 {:?}",
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100]
        );
    }
}

#[test]
fn a_returning_backup_is_resynced_from_the_dirty_map_and_is_then_identical() {
    let mut c = Cluster::new("resync-map", 2);
    let p = c.primary("p", patient()).unwrap();
    // Compared with the primary's copy first (as serving does): only then
    // is the dirty map the whole story.
    let r = p.reconcile().unwrap();
    assert_eq!((r.backups, r.regions), (2, 0), "{r:?}");
    p.write_at(&pattern(1, 4096), 0).unwrap();
    p.flush().unwrap();
    // Not yet flushed when the backup dies: copied too.
    p.write_at(&pattern(2, 4096), MIB).unwrap();
    c.hosts[1].kill();
    p.write_at(&pattern(3, 8192), 3 * MIB + 4096).unwrap();
    p.write_at(&pattern(4, 4096), 9 * MIB).unwrap();
    p.flush().unwrap();
    assert_eq!(p.dirty().regions().collect::<Vec<_>>(), vec![1, 3, 9]);

    // A resync of a backup still down fails and changes nothing.
    assert!(p.resync(&c.backup(1)).is_err());
    assert_eq!(p.out_of_sync(), vec!["host-1"]);
    assert_eq!(p.epoch(), 2);

    c.revive(1);
    let report = p.resync(&c.backup(1)).unwrap();
    assert_eq!((report.regions, report.bytes), (3, 3 * MIB));
    assert!(!report.by_checksum);
    assert_eq!(report.epoch, 3);
    assert_eq!(p.resynced()["host-1"], report);
    assert_eq!(c.authority.calls().last().unwrap(), &(2, "+host-1".into()));
    assert_eq!(p.epoch(), 3);
    assert_eq!(p.in_sync(), vec!["host-0", "host-1"]);
    assert!(p.out_of_sync().is_empty());
    assert!(p.dirty().is_clean());
    let primary = crc32c(&std::fs::read(c.primary_path("p")).unwrap());
    for h in &c.hosts {
        assert_eq!(crc32c(&h.data()), primary, "{}", h.id);
    }
    // Later writes reach it too; it is in sync, so not resynced again.
    p.write_at(&pattern(5, 4096), 12 * MIB).unwrap();
    p.flush().unwrap();
    assert_eq!(c.hosts[1].replica.epoch(VOL), Some(3));
    let primary = std::fs::read(c.primary_path("p")).unwrap();
    assert_eq!(c.hosts[1].data(), primary);
    assert!(matches!(
        p.resync(&c.backup(1)),
        Err(ferro_blockd::replication::ResyncError::InSync(_))
    ));
}

#[test]
fn a_restarted_primary_resyncs_by_checksum_only_the_regions_that_differ() {
    let mut c = Cluster::new("resync-sums", 2);
    let p = c.primary("p", patient()).unwrap();
    p.write_at(&pattern(1, 2 * MIB as usize), 0).unwrap();
    p.flush().unwrap();
    c.hosts[1].kill();
    p.write_at(&pattern(2, 4096), 5 * MIB).unwrap();
    p.write_at(&pattern(3, 4096), 7 * MIB + 512).unwrap();
    p.flush().unwrap();
    drop(p);
    // A write that reached the dead backup alone (never acknowledged).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.hosts[1].replica.data_path(VOL))
            .unwrap();
        f.write_all_at(&pattern(9, 512), 11 * MIB).unwrap();
    }
    // The primary starts again (no dirty map) over the backup in sync.
    c.revive(1);
    let local = LocalFile::open_or_create(&c.primary_path("p"), SIZE).unwrap();
    let p = ReplicatedStore::open(
        VOL,
        c.authority.epoch(),
        Box::new(local),
        &[c.backup(0)],
        c.authority.clone(),
        patient(),
    )
    .unwrap();
    let report = p.resync(&c.backup(1)).unwrap();
    assert!(report.by_checksum);
    assert_eq!((report.regions, report.bytes), (3, 3 * MIB), "{report:?}");
    let primary = crc32c(&std::fs::read(c.primary_path("p")).unwrap());
    for h in &c.hosts {
        assert_eq!(crc32c(&h.data()), primary, "{}", h.id);
    }
    assert_eq!(p.in_sync(), vec!["host-0", "host-1"]);
}

#[test]
fn a_primary_without_a_copy_resyncs_from_a_backup_in_sync() {
    let mut c = Cluster::new("resync-remote", 2);
    let p =
        ReplicatedStore::open_remote(VOL, 1, SIZE, &c.backups(), c.authority.clone(), patient())
            .unwrap();
    p.write_at(&pattern(1, 4096), 0).unwrap();
    p.flush().unwrap();
    c.hosts[1].kill();
    p.write_at(&pattern(2, 4096), 2 * MIB).unwrap();
    p.flush().unwrap();
    c.revive(1);
    let report = p.resync(&c.backup(1)).unwrap();
    assert_eq!(report.regions, 1);
    assert_eq!(c.hosts[0].data(), c.hosts[1].data());
    p.write_at(&pattern(3, 4096), 4 * MIB).unwrap();
    assert_eq!(c.hosts[0].data(), c.hosts[1].data());
}

#[test]
fn writes_during_a_resync_reach_the_returning_backup() {
    let mut c = Cluster::new("resync-live", 2);
    let p = Arc::new(c.primary("p", patient()).unwrap());
    c.hosts[1].kill();
    for r in 0..12u64 {
        p.write_at(&pattern(r as u8, 64 << 10), r * MIB).unwrap();
    }
    p.flush().unwrap();
    c.revive(1);
    // A writer that goes on until the resync is over, started first.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (p, done, written) = (p.clone(), done.clone(), written.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let at = (i * 7 % 16) * MIB + (i % 8) * 4096;
                p.write_at(&pattern((i as u8).wrapping_add(100), 4096), at)
                    .unwrap();
                written.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                i += 1;
            }
        })
    };
    while written.load(std::sync::atomic::Ordering::SeqCst) < 10 {
        std::thread::yield_now();
    }
    let before = written.load(std::sync::atomic::Ordering::SeqCst);
    let report = p.resync(&c.backup(1)).unwrap();
    let during = written.load(std::sync::atomic::Ordering::SeqCst) - before;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().unwrap();
    p.flush().unwrap();
    assert!(during > 0, "no write during the resync");
    // The 12 regions missed, and those written meanwhile at least once.
    assert!(report.regions > 12, "{report:?}");
    assert!(report.passes >= 2, "{report:?}");
    assert_eq!(p.in_sync(), vec!["host-0", "host-1"]);
    let primary = std::fs::read(c.primary_path("p")).unwrap();
    for h in &c.hosts {
        assert!(h.data() == primary, "{} differs", h.id);
    }
}

/// The serving blockd's part: a served volume whose controller-listed peer
/// is out of sync (and reachable) is resynced by the primary on its own,
/// by checksum (this primary never dropped it), and taken back in sync.
#[test]
fn serving_a_volume_resyncs_its_replica_listed_out_of_sync() {
    use ferro_proto::compute::v1::{ReplicaPeer, ServedVolume};

    let mut c = Cluster::new("resync-serve", 2);
    // Written on the primary's copy and host-0 while host-1 was out.
    let data = pattern(7, 4096);
    let local = LocalFile::open_or_create(&c.primary_path("p"), SIZE).unwrap();
    local.write_at(&data, 6 * MIB).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.hosts[0].replica.data_path(VOL))
            .unwrap();
        f.write_all_at(&data, 6 * MIB).unwrap();
    }
    // And a write an earlier primary left on host-0 alone, never
    // acknowledged: the reconcile undoes it.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.hosts[0].replica.data_path(VOL))
            .unwrap();
        f.write_all_at(&pattern(8, 512), 10 * MIB).unwrap();
    }
    assert_eq!(c.authority.remove_replica(VOL, 1, "host-1"), Ok(2));
    let server0 = c.backup(0).addr;
    c.revive(1);
    let peer = |id: &str, addr: String, in_sync| ReplicaPeer {
        host_id: id.into(),
        addr,
        in_sync,
    };
    let want = ServedVolume {
        volume_id: VOL.into(),
        instance_id: "i-1".into(),
        size_bytes: SIZE,
        epoch: 2,
        peers: vec![
            peer("p", String::new(), true),
            peer("host-0", server0.to_string(), true),
            peer("host-1", c.backup(1).addr.to_string(), false),
        ],
    };
    let mut serving = c.serving();
    serving.converge(std::slice::from_ref(&want));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while c.authority.epoch() != 3 {
        assert!(std::time::Instant::now() < deadline, "never resynced");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.authority.calls().last().unwrap(), &(2, "+host-1".into()));
    let primary = std::fs::read(c.primary_path("p")).unwrap();
    assert!(c.hosts[1].data() == primary, "the resynced replica differs");
    // The reconcile may have met the epoch's move and try again.
    while c.hosts[0].data() != primary {
        assert!(std::time::Instant::now() < deadline, "never reconciled");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Listed in sync now: nothing more to do.
    serving.converge(&[]);
}

/// A backup that takes the primary's epoch a moment after the primary
/// (each from its own watch) is waited for at open, not removed.
#[test]
fn a_backup_behind_the_epoch_at_open_is_waited_for() {
    let c = Cluster::new("behind-at-open", 2);
    let replicas: Vec<Arc<Replica>> = c.hosts.iter().map(|h| h.replica.clone()).collect();
    let raise = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        for r in replicas {
            r.set_epoch(VOL, 2).unwrap();
        }
    });
    let local = LocalFile::open_or_create(&c.primary_path("p"), SIZE).unwrap();
    let p = ReplicatedStore::open(
        VOL,
        2,
        Box::new(local),
        &c.backups(),
        c.authority.clone(),
        patient(),
    )
    .unwrap();
    raise.join().unwrap();
    assert_eq!(p.in_sync(), vec!["host-0", "host-1"]);
    assert!(c.authority.calls().is_empty());
    p.write_at(&pattern(1, 4096), 0).unwrap();
    assert_eq!(c.hosts[1].data()[..4096], pattern(1, 4096)[..]);
}

/// An epoch the controller raises without the serving primary (a
/// replica's file made again, say) fences it; the next round of the watch
/// re-learns the replica set at the new epoch under the same connection,
/// and a write that met the fence waits for the new store and lands,
/// instead of failing the guest's I/O.
#[test]
fn a_serving_primary_fenced_by_a_newer_epoch_relearns_its_set() {
    use ferro_proto::compute::v1::{ReplicaPeer, ServedVolume};

    let c = Cluster::new("relearn", 2);
    let peers = vec![
        ReplicaPeer {
            host_id: "p".into(),
            addr: String::new(),
            in_sync: true,
        },
        ReplicaPeer {
            host_id: "host-0".into(),
            addr: c.backup(0).addr.to_string(),
            in_sync: true,
        },
        ReplicaPeer {
            host_id: "host-1".into(),
            addr: c.backup(1).addr.to_string(),
            in_sync: true,
        },
    ];
    let want = |epoch| ServedVolume {
        volume_id: VOL.into(),
        instance_id: "i-1".into(),
        size_bytes: SIZE,
        epoch,
        peers: peers.clone(),
    };
    let mut serving = c.serving();
    serving.converge(&[want(c.authority.epoch())]);
    let store = serving.store(VOL).expect("served");
    store.write_at(&pattern(1, 4096), 0).unwrap();
    // The controller raises the epoch behind the primary's back.
    let epoch = c.authority.bump();
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || store.write_at(&pattern(2, 4096), 4096))
    };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !writer.is_finished(),
        "the write did not wait for the new store"
    );
    serving.converge(&[want(epoch)]);
    writer.join().unwrap().unwrap();
    assert_eq!(store.current().epoch(), epoch);
    for h in &c.hosts {
        assert_eq!(&h.data()[..4096], &pattern(1, 4096)[..], "{}", h.id);
        assert_eq!(&h.data()[4096..8192], &pattern(2, 4096)[..], "{}", h.id);
    }
    serving.converge(&[]);
}
