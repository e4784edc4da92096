//! A harness client speaking vhost-user to blockd directly, no VMM and no
//! KVM: ferro-vmm's own vhost-user-blk frontend over memfd guest memory
//! ([`VhostUserBlkHarness`]), against a volume served in this process.
//! The same harness drives `cargo xtask bench blockd`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferro_blockd::server::Volume;
use ferro_blockd::store::{LocalFile, Store};
use ferro_testkit::scratch;
use ferro_virtio::testing::VhostUserBlkHarness;

const SIZE: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(10);

/// Serves `path` on `socket` for one frontend, on a thread.
fn serve_one(path: &Path, socket: &Path) -> std::thread::JoinHandle<()> {
    let store: Arc<dyn Store> = Arc::new(LocalFile::open_or_create(path, SIZE).unwrap());
    let mut volume = Volume::with_store("vol1", socket, store).unwrap();
    std::thread::spawn(move || volume.serve_one().unwrap())
}

/// Waits for `n` completions, all successful.
fn complete(h: &mut VhostUserBlkHarness, n: usize) -> Vec<(usize, u32, u8)> {
    let mut done = Vec::new();
    while done.len() < n {
        done.extend(h.wait(WAIT).expect("the backend completes"));
    }
    assert!(done.iter().all(|&(_, _, status)| status == 0), "{done:?}");
    done
}

#[test]
fn requests_at_depth_reach_the_file_and_read_back() {
    let dir = scratch("blockd-harness");
    let (path, socket) = (dir.join("vol1.img"), dir.join("vol1.sock"));
    let server = serve_one(&path, &socket);
    let mut h = VhostUserBlkHarness::connect(&socket, 16, 4096).unwrap();
    assert_eq!(h.capacity(), SIZE / 512);

    for slot in 0..8 {
        h.set_data(slot, &[slot as u8 + 1; 4096]);
        h.push_write(slot, slot as u64 * 8, 4096);
    }
    h.kick().unwrap();
    complete(&mut h, 8);
    let file = std::fs::read(&path).unwrap();
    for i in 0..8 {
        assert_eq!(file[i * 4096..(i + 1) * 4096], [i as u8 + 1; 4096]);
    }

    for slot in 8..16 {
        h.push_read(slot, (15 - slot as u64) * 8, 4096);
    }
    h.kick().unwrap();
    let done = complete(&mut h, 8);
    for (slot, len, _) in done {
        assert_eq!(len, 4096 + 1, "data and status written");
        assert_eq!(h.data(slot, 4096), vec![16 - slot as u8; 4096]);
    }

    // The frontend going away ends the backend's connection.
    drop(h);
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_volume_taken_off_the_serve_list_fails_its_connected_frontends_io() {
    use ferro_blockd::replication::StaticReplicas;
    use ferro_blockd::serve::Serving;
    use ferro_proto::compute::v1::{ReplicaPeer, ServedVolume};

    let dir = scratch("blockd-revoke");
    let replica = dir.join("vol1.vol");
    LocalFile::open_or_create(&replica, SIZE).unwrap();
    let path = replica.clone();
    let mut serving = Serving::new(
        &dir,
        "h1",
        Box::new(move |_: &str, size: u64| {
            let f = LocalFile::open_or_create(&path, size).map_err(|e| e.to_string())?;
            Ok(Some(Box::new(f) as Box<dyn Store>))
        }),
        Arc::new(StaticReplicas),
    )
    .unwrap();
    let want = ServedVolume {
        volume_id: "vol1".into(),
        instance_id: "i-1".into(),
        size_bytes: SIZE,
        epoch: 1,
        peers: vec![ReplicaPeer {
            host_id: "h1".into(),
            addr: String::new(),
            in_sync: true,
        }],
    };
    serving.converge(std::slice::from_ref(&want));
    let socket = serving.socket("vol1");
    let mut h = VhostUserBlkHarness::connect(&socket, 4, 4096).unwrap();
    h.set_data(0, &[7; 4096]);
    h.push_write(0, 0, 4096);
    h.kick().unwrap();
    complete(&mut h, 1);
    assert_eq!(std::fs::read(&replica).unwrap()[..4096], [7; 4096]);

    // Detached, forced, while the frontend is connected: each request
    // now fails (VIRTIO_BLK_S_IOERR), and nothing reaches the replica.
    serving.converge(&[]);
    h.set_data(1, &[9; 4096]);
    h.push_write(1, 8, 4096);
    h.push_read(2, 0, 4096);
    h.kick().unwrap();
    let mut done = Vec::new();
    while done.len() < 2 {
        done.extend(h.wait(WAIT).expect("the backend answers"));
    }
    assert!(done.iter().all(|&(_, _, status)| status == 1), "{done:?}");
    assert_eq!(std::fs::read(&replica).unwrap()[4096..8192], [0; 4096]);
    assert!(!socket.exists(), "the socket is gone");
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A child process killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn blockd(args: &[String], log: &Path) -> Child {
    Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_ferro-blockd"))
            .args(args)
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// Waits (10 s) for `what` to hold, naming the log on failure.
fn wait_for(what: &str, log: &Path, ok: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon without a controller: two `--replica` daemons hold backups
/// and a primary names them in `backups=`; every acknowledged write is in
/// all three files, and a backup that dies fails the next write (a fixed
/// replica set cannot shrink) instead of it going on with fewer copies.
#[test]
fn a_fixed_three_replica_set_from_flags_writes_everywhere_and_fails_closed() {
    let dir = scratch("blockd-fixed-set");
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let mut backups = Vec::new();
    let mut names = Vec::new();
    for b in ["b", "c"] {
        let port = free_port();
        let log = dir.join(format!("{b}.log"));
        let child = blockd(
            &[
                "--replica".into(),
                "id=vol0,size=1M,epoch=2".into(),
                "--replica-dir".into(),
                dir.join(b).display().to_string(),
                "--replica-listen".into(),
                format!("127.0.0.1:{port}"),
            ],
            &log,
        );
        wait_for("backup listening", &log, || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("replica server on"))
        });
        names.push(format!("{b}@127.0.0.1:{port}"));
        backups.push(child);
    }
    let socket = dir.join("vol0.sock");
    let plog = dir.join("primary.log");
    let _primary = blockd(
        &[
            "--volume".into(),
            format!(
                "id=vol0,path={},size=1M,socket={},backups={},epoch=2",
                dir.join("a.vol").display(),
                socket.display(),
                names.join("+")
            ),
        ],
        &plog,
    );
    wait_for("primary serving", &plog, || socket.exists());
    let mut h = VhostUserBlkHarness::connect(&socket, 16, 4096).unwrap();
    for slot in 0..8 {
        h.set_data(slot, &[slot as u8 + 0x10; 4096]);
        h.push_write(slot, slot as u64 * 8, 4096);
    }
    h.kick().unwrap();
    complete(&mut h, 8);
    let primary = std::fs::read(dir.join("a.vol")).unwrap();
    assert_eq!(primary[4096 * 7], 0x17);
    for b in ["b", "c"] {
        assert!(
            std::fs::read(dir.join(b).join("vol0.vol")).unwrap() == primary,
            "backup {b} differs from the primary"
        );
    }
    // Backup c dies: the next write fails, it is not acknowledged.
    drop(backups.pop());
    h.set_data(0, &[0xee; 4096]);
    h.push_write(0, 0, 4096);
    h.kick().unwrap();
    let mut done = Vec::new();
    while done.is_empty() {
        done.extend(h.wait(Duration::from_secs(60)).expect("an answer"));
    }
    assert_ne!(done[0].2, 0, "a write with a dead backup was acknowledged");
    let log = std::fs::read_to_string(&plog).unwrap();
    assert!(log.contains("the replica set cannot change"), "{log}");
}
