use super::*;
use crate::wire;
use std::io::{Read, Write};

const CAP: u64 = 1 << 20;

fn frame(epoch: u64, body: Body) -> Frame {
    Frame {
        volume: "v".into(),
        epoch,
        seq: 9,
        body,
    }
}

fn write(epoch: u64, offset: u64, data: &[u8]) -> Frame {
    frame(
        epoch,
        Body::Write {
            offset,
            data: data.to_vec(),
        },
    )
}

fn code(r: Result<(), Refusal>) -> Option<NackCode> {
    r.err().map(|r| r.code)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("blockd-replica-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A replica of volume `v` (1 MiB) at `epoch` under a fresh directory.
fn replica(name: &str, epoch: u64) -> (PathBuf, Replica) {
    let dir = scratch(name);
    let r = Replica::new(&dir);
    assert_eq!(r.open_volume("v", CAP).unwrap(), 0);
    if epoch > 0 {
        r.set_epoch("v", epoch).unwrap();
    }
    (dir, r)
}

#[test]
fn decide_carries_out_only_the_current_epoch() {
    let w = |e| write(e, 0, b"x");
    assert_eq!(decide(5, CAP, &w(5)), Ok(()));
    let fenced = decide(5, CAP, &w(4)).unwrap_err();
    assert_eq!(fenced.code, NackCode::Fenced);
    assert!(fenced
        .message
        .contains("epoch 4 is older than this replica's 5"));
    let ahead = decide(5, CAP, &w(6)).unwrap_err();
    assert_eq!(ahead.code, NackCode::EpochAhead);
    assert!(ahead.message.contains('6') && ahead.message.contains('5'));
    assert_eq!(code(decide(0, CAP, &w(0))), Some(NackCode::Unconfigured));
    // Every kind is fenced, reads and hellos too.
    assert_eq!(
        code(decide(5, CAP, &frame(4, Body::Flush))),
        Some(NackCode::Fenced)
    );
    let read = Body::Read { offset: 0, len: 1 };
    assert_eq!(
        code(decide(5, CAP, &frame(4, read))),
        Some(NackCode::Fenced)
    );
}

#[test]
fn decide_checks_ranges_capacity_and_kinds() {
    assert_eq!(decide(1, CAP, &write(1, CAP - 2, b"ab")), Ok(()));
    assert_eq!(
        code(decide(1, CAP, &write(1, CAP - 1, b"ab"))),
        Some(NackCode::OutOfRange)
    );
    let read = Body::Read {
        offset: u64::MAX,
        len: 2,
    };
    assert_eq!(
        code(decide(1, CAP, &frame(1, read))),
        Some(NackCode::OutOfRange)
    );
    let hello = |capacity| frame(1, Body::Hello { capacity });
    assert_eq!(decide(1, CAP, &hello(CAP)), Ok(()));
    assert_eq!(
        code(decide(1, CAP, &hello(CAP * 2))),
        Some(NackCode::OutOfRange)
    );
    let ack = Body::Ack { offset: 0, len: 0 };
    assert_eq!(
        code(decide(1, CAP, &frame(1, ack))),
        Some(NackCode::BadFrame)
    );
}

#[test]
fn writes_reads_and_flushes_through_the_store() {
    let (dir, r) = replica("io", 3);
    let ack = r.handle(&write(3, 4096, b"hello"));
    assert_eq!(
        ack.body,
        Body::Ack {
            offset: 4096,
            len: 5
        }
    );
    assert_eq!((ack.epoch, ack.seq), (3, 9));
    assert_eq!(
        r.handle(&frame(3, Body::Flush)).body,
        Body::Ack { offset: 0, len: 0 }
    );
    let read = r.handle(&frame(
        3,
        Body::Read {
            offset: 4096,
            len: 5,
        },
    ));
    assert_eq!(
        read.body,
        Body::ReadData {
            offset: 4096,
            data: b"hello".to_vec()
        }
    );
    let hello = r.handle(&frame(3, Body::Hello { capacity: CAP }));
    assert_eq!(
        hello.body,
        Body::Ack {
            offset: CAP,
            len: 0
        }
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fenced_write_changes_nothing_and_names_both_epochs() {
    let (dir, r) = replica("fenced", 2);
    let answer = r.handle(&write(1, 0, b"stale"));
    let Body::Nack {
        code,
        request_epoch,
        message,
    } = answer.body
    else {
        panic!("not refused: {answer:?}");
    };
    assert_eq!(
        (code, request_epoch, answer.epoch),
        (NackCode::Fenced, 1, 2)
    );
    assert!(message.contains('1') && message.contains('2'), "{message}");
    let data = std::fs::read(r.data_path("v")).unwrap();
    assert!(data.iter().all(|b| *b == 0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unknown_volumes_are_refused() {
    let (dir, r) = replica("unknown", 1);
    let mut f = write(1, 0, b"x");
    f.volume = "other".into();
    assert!(matches!(
        r.handle(&f).body,
        Body::Nack {
            code: NackCode::UnknownVolume,
            ..
        }
    ));
    assert!(matches!(
        r.set_epoch("other", 1),
        Err(ReplicaError::Unknown(_))
    ));
    assert!(matches!(
        r.open_volume("../escape", CAP),
        Err(ReplicaError::BadVolumeId(_))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn epochs_only_go_up_and_survive_a_restart() {
    let (dir, r) = replica("epochs", 4);
    assert_eq!(r.set_epoch("v", 4).unwrap(), 4);
    assert!(matches!(
        r.set_epoch("v", 3),
        Err(ReplicaError::EpochBackwards {
            current: 4,
            asked: 3,
            ..
        })
    ));
    assert_eq!(r.set_epoch("v", 9).unwrap(), 4);
    drop(r);
    let again = Replica::new(&dir);
    assert_eq!(again.open_volume("v", CAP).unwrap(), 9);
    assert_eq!(again.epoch("v"), Some(9));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupt_epoch_file_is_quarantined_and_the_open_fails() {
    let (dir, r) = replica("corrupt", 4);
    let path = r.epoch_path("v");
    drop(r);
    std::fs::write(
        &path,
        b"ferro-blockd epoch v1\nvolume=v\nepoch=99\ncrc32c=00000000\n",
    )
    .unwrap();
    let again = Replica::new(&dir);
    let err = again.open_volume("v", CAP).unwrap_err();
    let ReplicaError::Meta(_, MetaError::Corrupt { quarantined, .. }) = &err else {
        panic!("not quarantined: {err}");
    };
    assert!(quarantined.exists());
    assert!(!path.exists());
    assert_eq!(
        again.epoch("v"),
        None,
        "a volume whose epoch is unknown is not served"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn over_tcp_a_corrupt_frame_gets_a_nack_then_the_connection_closes() {
    let (dir, r) = replica("tcp", 1);
    let r = Arc::new(r);
    let server = ReplicaServer::start(r.clone(), "127.0.0.1:0").unwrap();
    let mut link = Link::new(TcpStream::connect(server.local_addr()).unwrap()).unwrap();
    link.send(&write(1, 0, b"good")).unwrap();
    let ack = link.recv().unwrap().unwrap();
    assert_eq!(ack.body, Body::Ack { offset: 0, len: 4 });

    let mut bad = wire::encode(&write(1, 512, b"evil")).unwrap();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    link.send_bytes(&bad).unwrap();
    let nack = link.recv().unwrap().unwrap();
    assert!(
        matches!(&nack.body, Body::Nack { code: NackCode::BadFrame, message, .. } if message.contains("data CRC")),
        "{nack:?}"
    );
    assert!(link.recv().unwrap().is_none(), "connection not closed");
    let data = std::fs::read(r.data_path("v")).unwrap();
    assert_eq!(&data[..4], b"good");
    assert!(
        data[512..516].iter().all(|b| *b == 0),
        "corrupt write landed"
    );
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn over_tcp_garbage_is_refused_without_waiting_for_more() {
    let (dir, r) = replica("garbage", 1);
    let server = ReplicaServer::start(Arc::new(r), "127.0.0.1:0").unwrap();
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let (nack, _) = wire::decode(&answer).unwrap().unwrap();
    assert!(matches!(
        nack.body,
        Body::Nack {
            code: NackCode::BadFrame,
            ..
        }
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shutdown_cuts_open_connections() {
    let (dir, r) = replica("shutdown", 1);
    let server = ReplicaServer::start(Arc::new(r), "127.0.0.1:0").unwrap();
    let mut link = Link::new(TcpStream::connect(server.local_addr()).unwrap()).unwrap();
    link.send(&frame(1, Body::Flush)).unwrap();
    assert!(link.recv().unwrap().is_some());
    server.shutdown();
    assert!(!matches!(link.recv(), Ok(Some(_))));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An in-memory store whose writes take a while, counting those started
/// and done; its clones share everything.
#[derive(Clone, Default)]
struct SlowStore {
    data: Arc<Mutex<Vec<u8>>>,
    writes_started: Arc<std::sync::atomic::AtomicU64>,
    writes_done: Arc<std::sync::atomic::AtomicU64>,
}

impl Store for SlowStore {
    fn capacity(&self) -> u64 {
        CAP / SECTOR_SIZE
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let data = self.data.lock().unwrap();
        buf.copy_from_slice(&data[offset as usize..][..buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writes_started.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(200));
        self.data.lock().unwrap()[offset as usize..][..buf.len()].copy_from_slice(buf);
        self.writes_done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn set_epoch_waits_for_a_write_of_the_old_epoch_in_flight() {
    let dir = scratch("race");
    let r = Arc::new(Replica::new(&dir));
    let store = SlowStore::default();
    *store.data.lock().unwrap() = vec![0; CAP as usize];
    r.open_volume_with("v", Box::new(store.clone())).unwrap();
    r.set_epoch("v", 1).unwrap();
    let writer = {
        let r = r.clone();
        std::thread::spawn(move || r.handle(&write(1, 0, b"old")))
    };
    // Wait until the write is past the epoch check and inside the store.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.writes_started.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the write never started"
        );
        std::thread::yield_now();
    }
    r.set_epoch("v", 2).unwrap();
    assert_eq!(
        store.writes_done.load(Ordering::SeqCst),
        1,
        "set_epoch returned while a write of the old epoch was still going on"
    );
    assert!(matches!(writer.join().unwrap().body, Body::Ack { .. }));
    let late = r.handle(&write(1, 0, b"new"));
    assert!(matches!(
        late.body,
        Body::Nack {
            code: NackCode::Fenced,
            ..
        }
    ));
    let mut buf = [0u8; 3];
    store.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"old");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn checksums_cover_each_region_of_the_range_at_the_current_epoch_only() {
    let (dir, r) = replica("sums", 2);
    r.handle(&write(2, 4096, b"changed"));
    let ask = |epoch, offset, len| {
        r.handle(&frame(
            epoch,
            Body::Checksums {
                offset,
                len,
                region_shift: 12,
            },
        ))
        .body
    };
    let zeros = wire::crc32c(&[0; 4096]);
    let mut one = vec![0u8; 4096];
    one[..7].copy_from_slice(b"changed");
    let Body::Sums {
        offset,
        region_shift,
        sums,
    } = ask(2, 0, 3 * 4096 + 100)
    else {
        panic!("no sums");
    };
    assert_eq!((offset, region_shift), (0, 12));
    assert_eq!(
        sums,
        [zeros, wire::crc32c(&one), zeros, wire::crc32c(&[0; 100])]
    );
    // Fenced, ahead, or past the end: refused like a read.
    for (epoch, offset, want) in [
        (1, 0, NackCode::Fenced),
        (3, 0, NackCode::EpochAhead),
        (2, CAP - 4096, NackCode::OutOfRange),
    ] {
        match ask(epoch, offset, 8192) {
            Body::Nack { code, .. } => assert_eq!(code, want),
            other => panic!("{other:?}"),
        }
    }
    // An answer is not a request.
    let sums = Body::Sums {
        offset: 0,
        region_shift: 12,
        sums: vec![],
    };
    assert_eq!(
        code(decide(2, CAP, &frame(2, sums))),
        Some(NackCode::BadFrame)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The primary's own host's copy takes a primary's writes while its
/// replica's epoch is not past the primary's (behind: the watch has not
/// caught up yet), and refuses them once it is (the primary was fenced),
/// as a backup refuses that primary's frames.
#[test]
fn a_local_replica_refuses_the_writes_of_a_fenced_primary() {
    let (dir, r) = replica("local", 3);
    let r = Arc::new(r);
    let local = r.local("v").expect("the replica is open");
    assert_eq!(local.capacity(), CAP / SECTOR_SIZE);
    assert!(r.local("other").is_none());
    let ok = |res: Vec<io::Result<()>>| res.iter().all(Result::is_ok);
    assert!(ok(local.write_batch_at(3, &[(0, &[1; 512])])));
    // A primary ahead of this host's watch (it raised the epoch itself).
    assert!(ok(local.write_batch_at(4, &[(512, &[2; 512])])));
    r.set_epoch("v", 5).unwrap();
    let refused = local.write_batch_at(4, &[(0, &[9; 512]), (1024, &[9; 512])]);
    assert_eq!(refused.len(), 2);
    for e in refused {
        let e = e.unwrap_err().to_string();
        assert!(e.contains("epoch 5") && e.contains("fenced"), "{e}");
    }
    let mut buf = vec![0u8; 1536];
    local.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..512], &[1; 512][..]);
    assert_eq!(&buf[512..1024], &[2; 512][..]);
    assert_eq!(&buf[1024..], &[0; 512][..], "nothing of the fenced primary");
    // Closed under it, or closed and opened again (its file made again):
    // an error, not a write somewhere else.
    r.close_volume("v");
    assert!(local.write_batch_at(5, &[(0, &[3; 512])])[0].is_err());
    r.open_volume("v", CAP).unwrap();
    let e = local
        .write_batch_at(5, &[(0, &[3; 512])])
        .remove(0)
        .unwrap_err();
    assert!(e.to_string().contains("opened again"), "{e}");
    assert!(local.read_at(&mut [0; 512], 0).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
