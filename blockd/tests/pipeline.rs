//! A queue's requests are pipelined to the backups: one pass over the
//! queue sends every write frame before it waits for the first ack, a
//! FLUSH in the pass is a barrier (it waits for the writes before it to be
//! acknowledged everywhere), a backup behind the epoch is sent the frames
//! again in order, and a backup lost mid-batch fails as a lone write would.
//!
//! The backup is a fake over loopback TCP that logs what it receives and
//! answers, holding its acks as told; the primary's own copy logs too, into
//! the same log, so the tests assert on the order of events, never on time.

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ferro_blockd::handler::{Desc, GuestMemoryMmap, RequestHandler};
use ferro_blockd::link::{Link, LinkError};
use ferro_blockd::replication::{Authority, Backup, Fenced, Options, ReplicatedStore};
use ferro_blockd::request::Segment;
use ferro_blockd::server::Volume;
use ferro_blockd::store::Store;
use ferro_blockd::wire::{Body, Frame, Kind, NackCode};
use ferro_testkit::scratch;
use ferro_virtio::testing::VhostUserBlkHarness;
use vm_memory::{Bytes, GuestAddress};

const VOL: &str = "vol-p";
const SIZE: u64 = 1 << 20;
/// How long the fake backup waits, holding acks, for more frames before it
/// gives up and answers (so a primary that waits for each ack is caught by
/// an assertion, not a hang).
const QUIET: Duration = Duration::from_secs(1);

/// What happened, in order, on the fake backup and the primary's copy.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    /// The backup received a frame (kind, offset).
    Recv(Kind, u64),
    /// The backup acknowledged a frame (logged before it is sent).
    Ack(Kind, u64),
    /// The backup answered a write `EpochAhead` (offset).
    Behind(u64),
    /// The backup, holding acks, heard nothing for [`QUIET`].
    Quiet,
    /// The primary wrote its own copy at an offset.
    LocalWrite(u64),
    /// The primary flushed its own copy.
    LocalFlush,
}

type Log = Arc<Mutex<Vec<Event>>>;

fn push(log: &Log, e: Event) {
    log.lock().unwrap().push(e);
}

/// How the fake backup answers.
#[derive(Clone, Default)]
struct Script {
    /// Write acks are held until this many are (and before any other
    /// answer, so answers stay in order); 0 or 1 answers at once.
    hold: usize,
    /// Write frames (by their number, from 0, resends counted) answered
    /// `Nack(EpochAhead)`.
    behind: Vec<usize>,
    /// After this many write frames, the connection is dropped.
    close_after: Option<usize>,
}

/// A fake backup of a `SIZE`-byte volume: answers the primary's hello,
/// then follows `script`, logging into `log`.
fn fake_backup(script: Script, log: Log) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(QUIET)).unwrap();
        let mut link = Link::new(s).unwrap();
        let mut held: Vec<Frame> = Vec::new();
        let mut writes = 0;
        loop {
            let frame = match link.recv() {
                Ok(Some(f)) => f,
                Err(LinkError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if !held.is_empty() {
                        push(&log, Event::Quiet);
                        answer_held(&mut link, &mut held, &log);
                    }
                    continue;
                }
                Ok(None) | Err(_) => return,
            };
            let offset = match &frame.body {
                Body::Write { offset, .. } => *offset,
                _ => 0,
            };
            push(&log, Event::Recv(frame.body.kind(), offset));
            if !matches!(frame.body, Body::Write { .. }) {
                answer_held(&mut link, &mut held, &log);
                answer(&mut link, &frame, &log);
                continue;
            }
            let n = writes;
            writes += 1;
            if script.close_after == Some(n) {
                answer_held(&mut link, &mut held, &log);
                return;
            }
            if script.behind.contains(&n) {
                answer_held(&mut link, &mut held, &log);
                push(&log, Event::Behind(offset));
                let body = Body::Nack {
                    code: NackCode::EpochAhead,
                    request_epoch: frame.epoch,
                    message: "not at that epoch yet".into(),
                };
                let nack = Frame {
                    epoch: frame.epoch - 1,
                    body,
                    ..frame
                };
                link.send(&nack).unwrap();
                continue;
            }
            held.push(frame);
            if held.len() >= script.hold {
                answer_held(&mut link, &mut held, &log);
            }
        }
    });
    (addr, thread)
}

fn answer_held(link: &mut Link, held: &mut Vec<Frame>, log: &Log) {
    for f in held.drain(..) {
        answer(link, &f, log);
    }
}

/// Acknowledges `request`.
fn answer(link: &mut Link, request: &Frame, log: &Log) {
    let (offset, len) = match &request.body {
        Body::Hello { .. } => (SIZE, 0),
        Body::Write { offset, data } => (*offset, data.len() as u32),
        _ => (0, 0),
    };
    if !matches!(request.body, Body::Hello { .. }) {
        push(log, Event::Ack(request.body.kind(), offset));
    }
    let ack = Frame {
        volume: request.volume.clone(),
        epoch: request.epoch,
        seq: request.seq,
        body: Body::Ack { offset, len },
    };
    // A primary that gave up on this backup may be gone already.
    let _ = link.send(&ack);
}

/// The primary's own copy: a volume in memory that logs its writes and
/// flushes.
struct LoggedStore {
    data: Mutex<Vec<u8>>,
    log: Log,
}

impl Store for LoggedStore {
    fn capacity(&self) -> u64 {
        SIZE / 512
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.data.lock().unwrap()[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        push(&self.log, Event::LocalWrite(offset));
        let o = offset as usize;
        self.data.lock().unwrap()[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        push(&self.log, Event::LocalFlush);
        Ok(())
    }
}

/// An authority that removes a replica by raising the epoch (`grant`), or
/// refuses every change; it counts the calls.
struct FakeAuthority {
    grant: bool,
    calls: Mutex<Vec<(u64, String)>>,
}

impl FakeAuthority {
    fn new(grant: bool) -> Arc<Self> {
        Arc::new(FakeAuthority {
            grant,
            calls: Mutex::new(Vec::new()),
        })
    }

    fn answer(&self, volume: &str, epoch: u64, replica: &str) -> Result<u64, Fenced> {
        self.calls
            .lock()
            .unwrap()
            .push((epoch, replica.to_string()));
        let fenced = Fenced {
            volume: volume.to_string(),
            epoch,
        };
        self.grant.then_some(epoch + 1).ok_or(fenced)
    }
}

impl Authority for FakeAuthority {
    fn remove_replica(&self, volume: &str, epoch: u64, replica: &str) -> Result<u64, Fenced> {
        self.answer(volume, epoch, replica)
    }

    fn add_replica(&self, volume: &str, epoch: u64, replica: &str) -> Result<u64, Fenced> {
        self.answer(volume, epoch, replica)
    }
}

/// A primary over a [`LoggedStore`] with the fake backup at `addr`, its
/// dirty map in 64 KiB regions.
fn primary(addr: SocketAddr, authority: Arc<FakeAuthority>, log: &Log) -> ReplicatedStore {
    let local = LoggedStore {
        data: Mutex::new(vec![0; SIZE as usize]),
        log: log.clone(),
    };
    let backup = Backup {
        id: "fake".into(),
        addr,
    };
    ReplicatedStore::open(
        VOL,
        1,
        Box::new(local),
        &[backup],
        authority,
        Options {
            region_size: 64 << 10,
            ..Options::default()
        },
    )
    .unwrap()
}

fn log_of(log: &Log) -> Vec<Event> {
    log.lock().unwrap().clone()
}

fn position(log: &[Event], e: &Event) -> usize {
    log.iter()
        .position(|x| x == e)
        .unwrap_or_else(|| panic!("no {e:?} in {log:?}"))
}

/// Write frames the backup received before it sent its first write ack.
fn in_flight_before_first_ack(log: &[Event]) -> usize {
    log.iter()
        .take_while(|e| !matches!(e, Event::Ack(..)))
        .filter(|e| matches!(e, Event::Recv(Kind::Write, _)))
        .count()
}

#[test]
fn one_queue_pass_sends_every_write_before_the_first_ack() {
    const N: usize = 8;
    let log = Log::default();
    let (addr, fake) = fake_backup(
        Script {
            hold: N,
            ..Script::default()
        },
        log.clone(),
    );
    let store = Arc::new(primary(addr, FakeAuthority::new(false), &log));
    let dir = scratch("blockd-pipeline");
    let socket = dir.join("vol.sock");
    let mut volume = Volume::with_store("vol1", &socket, store).unwrap();
    let server = std::thread::spawn(move || volume.serve_one().unwrap());
    let mut h = VhostUserBlkHarness::connect(&socket, 16, 4096).unwrap();

    // N writes made available, then one kick: one pass over the queue.
    for slot in 0..N {
        h.set_data(slot, &[slot as u8 + 1; 4096]);
        h.push_write(slot, slot as u64 * 8, 4096);
    }
    h.kick().unwrap();
    let mut done = Vec::new();
    while done.len() < N {
        done.extend(
            h.wait(Duration::from_secs(10))
                .expect("the backend completes"),
        );
    }
    assert!(done.iter().all(|&(_, _, status)| status == 0), "{done:?}");

    drop(h);
    server.join().unwrap();
    fake.join().unwrap();
    let log = log_of(&log);
    assert!(!log.contains(&Event::Quiet), "the primary waited: {log:?}");
    assert_eq!(in_flight_before_first_ack(&log), N, "{log:?}");
    let acked = log.iter().filter(|e| matches!(e, Event::Ack(..))).count();
    assert_eq!(acked, N);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A request of a batch laid out in guest memory at its own addresses:
/// header, data (device-writable for a read), status.
fn chain(mem: &GuestMemoryMmap, slot: u64, kind: u32, sector: u64, len: u32) -> Vec<Desc> {
    let base = 0x1_0000 + slot * 0x2000;
    let desc = |addr, len, writable| Desc {
        addr: GuestAddress(addr),
        seg: Segment { len, writable },
    };
    mem.write_obj(kind, GuestAddress(base)).unwrap();
    mem.write_obj(sector, GuestAddress(base + 8)).unwrap();
    mem.write_slice(&vec![slot as u8; len as usize], GuestAddress(base + 0x1000))
        .unwrap();
    let mut descs = vec![desc(base, 16, false)];
    if len > 0 {
        descs.push(desc(base + 0x1000, len, kind == 0));
    }
    descs.push(desc(base + 0x10, 1, true));
    descs
}

fn status(mem: &GuestMemoryMmap, slot: u64) -> u8 {
    mem.read_obj(GuestAddress(0x1_0000 + slot * 0x2000 + 0x10))
        .unwrap()
}

#[test]
fn a_flush_in_a_pass_completes_only_after_the_writes_before_it_are_acked() {
    let log = Log::default();
    let (addr, fake) = fake_backup(
        Script {
            hold: 2,
            ..Script::default()
        },
        log.clone(),
    );
    let store = primary(addr, FakeAuthority::new(false), &log);
    let handler = RequestHandler::new(Arc::new(store), VOL);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (write, flush) = (1, 4);
    let chains = vec![
        chain(&mem, 0, write, 0, 4096),
        chain(&mem, 1, write, 8, 4096),
        chain(&mem, 2, flush, 0, 0),
        chain(&mem, 3, write, 16, 4096),
        chain(&mem, 4, write, 24, 4096),
    ];
    assert_eq!(handler.handle_batch(&mem, &chains), vec![1; 5]);
    assert!((0..5).all(|slot| status(&mem, slot) == 0));
    drop(handler);
    fake.join().unwrap();

    let log = log_of(&log);
    assert!(!log.contains(&Event::Quiet), "the primary waited: {log:?}");
    // The two writes before the flush went out together...
    assert_eq!(in_flight_before_first_ack(&log), 2, "{log:?}");
    // ...and were acknowledged before the flush reached the backup or the
    // primary's own copy.
    let flushed = position(&log, &Event::LocalFlush);
    let flush_sent = position(&log, &Event::Recv(Kind::Flush, 0));
    for offset in [0, 4096] {
        let acked = position(&log, &Event::Ack(Kind::Write, offset));
        assert!(acked < flushed && acked < flush_sent, "{log:?}");
    }
    // The writes after it wait for it.
    let flush_acked = position(&log, &Event::Ack(Kind::Flush, 0));
    assert!(flush_acked < position(&log, &Event::Recv(Kind::Write, 8192)));
    assert!(flush_acked < position(&log, &Event::LocalWrite(8192)));
}

#[test]
fn a_backup_behind_the_epoch_is_sent_the_frames_again_in_order() {
    let log = Log::default();
    // The second and third write frames are refused: all from the second
    // on come again, in order, so overlapping writes land as on the
    // primary.
    let (addr, fake) = fake_backup(
        Script {
            behind: vec![1, 2],
            ..Script::default()
        },
        log.clone(),
    );
    let authority = FakeAuthority::new(false);
    let p = primary(addr, authority.clone(), &log);
    let data = [[1u8; 512], [2; 512], [3; 512], [4; 512]];
    let writes: Vec<(u64, &[u8])> = (0..4).map(|i| (i as u64 * 512, &data[i][..])).collect();
    let results = p.write_batch(&writes);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(authority.calls.lock().unwrap().is_empty());
    assert_eq!(p.in_sync(), vec!["fake"]);
    drop(p);
    fake.join().unwrap();

    let received: Vec<u64> = log_of(&log)
        .iter()
        .filter_map(|e| match e {
            Event::Recv(Kind::Write, o) => Some(*o),
            _ => None,
        })
        .collect();
    assert_eq!(received, vec![0, 512, 1024, 1536, 512, 1024, 1536]);
}

#[test]
fn a_backup_lost_mid_batch_is_removed_and_the_batch_completes() {
    let log = Log::default();
    let (addr, fake) = fake_backup(
        Script {
            close_after: Some(2),
            ..Script::default()
        },
        log.clone(),
    );
    let authority = FakeAuthority::new(true);
    let p = primary(addr, authority.clone(), &log);
    let data = [7u8; 4096];
    let writes: Vec<(u64, &[u8])> = (0..4).map(|i| (i * (1 << 16), &data[..])).collect();
    let results = p.write_batch(&writes);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    fake.join().unwrap();
    assert_eq!(*authority.calls.lock().unwrap(), vec![(1, "fake".into())]);
    assert!(p.in_sync().is_empty());
    assert_eq!(p.out_of_sync(), vec!["fake"]);
    assert_eq!(p.epoch(), 2);
    // Every write of the batch (all since the last flush) is for a resync.
    assert_eq!(p.dirty().regions().collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    // Later writes go on, degraded.
    p.write_at(&data, 0).unwrap();
}

#[test]
fn a_fenced_primary_fails_the_writes_of_a_batch_the_lost_backup_did_not_ack() {
    let log = Log::default();
    let (addr, fake) = fake_backup(
        Script {
            close_after: Some(2),
            ..Script::default()
        },
        log.clone(),
    );
    let authority = FakeAuthority::new(false);
    let p = primary(addr, authority.clone(), &log);
    let data = [7u8; 4096];
    let writes: Vec<(u64, &[u8])> = (0..4).map(|i| (i * 4096, &data[..])).collect();
    let results = p.write_batch(&writes);
    fake.join().unwrap();
    let ok: Vec<bool> = results.iter().map(Result::is_ok).collect();
    assert_eq!(ok, vec![true, true, false, false], "{results:?}");
    let err = results[2].as_ref().unwrap_err().to_string();
    assert!(err.contains("fenced"), "{err}");
    assert!(p.is_fenced());
    // Everything after is refused without asking anyone.
    assert!(p.write_batch(&writes).iter().all(Result::is_err));
    assert!(p.flush().is_err());
    assert_eq!(authority.calls.lock().unwrap().len(), 1);
}
