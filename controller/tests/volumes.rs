//! Volumes with real `ferro-blockd` processes, one per (fake) host: the
//! controller places replicas, each replica host's blockd makes them and
//! reports them held (the volume turns `available`), and deleting a
//! volume removes every replica — also one whose blockd was down at the
//! time, once it is back. A replica file the controller does not list is
//! moved aside, never deleted.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use ferro_proto::compute::v1 as pb;
use ferro_testkit::Proc;

const WAIT: Duration = Duration::from_secs(20);

/// One host's blockd, started again on demand.
struct Blockd {
    host: String,
    key: String,
    args: Vec<String>,
    data: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Blockd {
    fn start(&mut self) {
        let bin = ferro_testkit::workspace_bin("ferro-blockd", "ferro-blockd");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = std::process::Command::new(bin)
            .args(&self.args)
            .env("FERRO_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.proc = Some(Proc(child));
    }

    fn kill(&mut self) {
        // Proc kills (SIGKILL) and reaps on drop.
        self.proc = None;
    }

    fn replica(&self, vol: &str) -> PathBuf {
        self.data.join("replicas").join(format!("{vol}.vol"))
    }
}

async fn volume(c: &mut Client, id: &str) -> Option<pb::Volume> {
    match c
        .describe_volumes(pb::DescribeVolumesRequest {
            volume_ids: vec![id.into()],
            ..Default::default()
        })
        .await
    {
        Ok(r) => r.into_inner().volumes.into_iter().next(),
        Err(s) if s.code() == tonic::Code::NotFound => None,
        Err(s) => panic!("DescribeVolumes: {s}"),
    }
}

async fn wait_state(c: &mut Client, id: &str, want: Option<&str>) -> Option<pb::Volume> {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = volume(c, id).await;
        if v.as_ref().map(|v| v.state.as_str()) == want {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never became {want:?}: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn wait_file(path: &Path, exists: bool) {
    let deadline = Instant::now() + WAIT;
    while path.exists() != exists {
        assert!(
            Instant::now() < deadline,
            "{} never {}",
            path.display(),
            if exists { "appeared" } else { "went" }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Joins fake hosts `hosts` of az-1 (100 GiB for volumes each), heartbeats
/// them, and starts a blockd for each (with a replica server on loopback
/// when `serve`); returns once the controller has them all.
async fn start_hosts(t: &TestController, dir: &Path, hosts: &[&str], serve: bool) -> Vec<Blockd> {
    let mut c = client(t.addr, &t.admin_key).await;
    let mut blockds = Vec::new();
    for h in hosts {
        let h = *h;
        let mut agent = FakeAgent::new(h, "az-1", 8, 8192);
        agent.disk_gib = 100;
        let key = agent.join(&[t.addr.to_string()], &t.admin_key).await;
        heartbeat_forever(t.addr, agent, "https://127.0.0.1:1".into());
        let data = dir.join(h);
        std::fs::create_dir_all(&data).unwrap();
        let key_file = data.join("api-key");
        std::fs::write(&key_file, &key).unwrap();
        let mut args = [
            "--controller",
            &format!("http://{}", t.addr),
            "--host-id",
            h,
            "--api-key-file",
            key_file.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec();
        if serve {
            args.extend(["--replica-listen".to_string(), "127.0.0.1:0".to_string()]);
        }
        let mut b = Blockd {
            host: h.into(),
            key,
            args,
            log: dir.join(format!("{h}.log")),
            data,
            proc: None,
        };
        b.start();
        blockds.push(b);
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let known = c
            .describe_hosts(pb::DescribeHostsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .hosts;
        if known.len() == hosts.len() && known.iter().all(|h| h.disk_total_gib == 100) {
            break;
        }
        assert!(Instant::now() < deadline, "hosts never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    blockds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blockd_makes_replicas_available_and_deleting_removes_every_one() {
    let t = controller(false, 10_000).await;
    let mut c = client(t.addr, &t.admin_key).await;
    let dir = ferro_testkit::scratch("volumes-blockd");
    let mut blockds = start_hosts(&t, &dir, &["h1", "h2", "h3"], false).await;
    // A replica file of a volume nobody knows: moved aside, kept.
    let stray = blockds[0].replica("vol-00000000000000ff");
    std::fs::create_dir_all(stray.parent().unwrap()).unwrap();
    std::fs::write(&stray, b"someone's data").unwrap();

    let create = |size_gib, ty: &str| pb::CreateVolumeRequest {
        size_gib,
        availability_zone: "az-1".into(),
        volume_type: ty.into(),
        ..Default::default()
    };
    let standard = c
        .create_volume(create(1, "standard"))
        .await
        .unwrap()
        .into_inner();
    let durable = c
        .create_volume(create(2, "durable"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(standard.state, "creating");
    for (v, size) in [(&standard, 1u64 << 30), (&durable, 2 << 30)] {
        let v = wait_state(&mut c, &v.volume_id, Some("available"))
            .await
            .unwrap();
        for b in &blockds {
            let path = b.replica(&v.volume_id);
            if v.replica_host_ids.contains(&b.host) {
                let meta = std::fs::metadata(&path).unwrap();
                assert_eq!(meta.len(), size, "{}", path.display());
                use std::os::unix::fs::MetadataExt;
                assert_eq!(meta.blocks(), 0, "sparse: {}", path.display());
            } else {
                assert!(!path.exists(), "{} not a replica host", b.host);
            }
        }
    }
    wait_file(&stray, false);
    let orphans: Vec<_> = std::fs::read_dir(stray.parent().unwrap().join("orphans"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(orphans.len(), 1);
    assert_eq!(std::fs::read(&orphans[0]).unwrap(), b"someone's data");

    // A replica host's blockd is down while the durable volume is deleted:
    // the volume stays `deleting` (its space taken) until it is back.
    blockds[1].kill();
    c.delete_volume(pb::DeleteVolumeRequest {
        volume_id: durable.volume_id.clone(),
    })
    .await
    .unwrap();
    for b in [&blockds[0], &blockds[2]] {
        wait_file(&b.replica(&durable.volume_id), false);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let v = volume(&mut c, &durable.volume_id).await.unwrap();
    assert_eq!(v.state, "deleting");
    assert!(blockds[1].replica(&durable.volume_id).exists());
    blockds[1].start();
    wait_file(&blockds[1].replica(&durable.volume_id), false);
    wait_state(&mut c, &durable.volume_id, None).await;

    c.delete_volume(pb::DeleteVolumeRequest {
        volume_id: standard.volume_id.clone(),
    })
    .await
    .unwrap();
    wait_state(&mut c, &standard.volume_id, None).await;

    // The CLI: `--wait` returns once the volume is available (every
    // replica made), and once it is gone.
    let ferro = |args: &[&str]| {
        let out = std::process::Command::new(ferro_testkit::workspace_bin("ferro-cli", "ferro"))
            .args([
                "--endpoint",
                &format!("http://{}", t.addr),
                "--api-key",
                &t.admin_key,
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ferro {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let made = ferro(&[
        "-o",
        "json",
        "volumes",
        "create",
        "--size",
        "1",
        "--az",
        "az-1",
        "--wait",
        "--timeout",
        "20",
    ]);
    let made = &made[0];
    assert_eq!(made["state"], "available", "{made}");
    let id = made["volume_id"].as_str().unwrap().to_string();
    let hosts: Vec<&str> = made["replica_host_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(|h| h.as_str()).collect())
        .unwrap_or_default();
    for b in blockds.iter().filter(|b| hosts.contains(&b.host.as_str())) {
        assert!(b.replica(&id).exists(), "{} on {}", id, b.host);
    }
    ferro(&[
        "-o",
        "json",
        "volumes",
        "delete",
        &id,
        "--wait",
        "--timeout",
        "20",
    ]);
    assert!(volume(&mut c, &id).await.is_none());
    for b in &blockds {
        assert!(!b.replica(&id).exists());
    }
    for b in &blockds {
        let left: Vec<_> = std::fs::read_dir(b.data.join("replicas"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "orphans")
            .collect();
        assert!(left.is_empty(), "{} left {left:?}", b.host);
    }
    let hosts = c
        .describe_hosts(pb::DescribeHostsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert!(
        hosts.iter().all(|h| h.disk_allocated_gib == 0),
        "the space is freed: {hosts:?}"
    );
    drop(blockds);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A 1 GiB durable volume of az-1, once `available`.
async fn durable_volume(c: &mut Client) -> pb::Volume {
    let vol = c
        .create_volume(pb::CreateVolumeRequest {
            size_gib: 1,
            availability_zone: "az-1".into(),
            volume_type: "durable".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    wait_state(c, &vol.volume_id, Some("available"))
        .await
        .unwrap()
}

/// The peers of the first replica the host with `key` holds, once every
/// one has reported its replica server.
async fn replica_servers(t: &TestController, key: &str) -> Vec<pb::ReplicaPeer> {
    let mut hc = hosts_client(t.addr).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let mine = host_volumes(&mut hc, key).await.unwrap();
        let peers = mine.replicas[0].peers.clone();
        if peers.iter().all(|x| !x.addr.is_empty()) {
            return peers;
        }
        assert!(Instant::now() < deadline, "replica servers never reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An FNV-64 of `len` bytes of `path` at `offset`.
fn sum(path: &Path, offset: u64, len: usize) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    ferro_testkit::fnv64(&buf)
}

/// `s` without its terminal colour codes (`ESC [ ... m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The CRC32C of every 1 MiB region of the file at `path`.
fn file_sums(path: &Path) -> Vec<u32> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    ferro_blockd::resync::region_sums(|b, at| f.read_exact_at(b, at), 0, len, 1 << 20).unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A durable volume's writes go to all three replica hosts' blockd through
/// the wire protocol. A backup's blockd killed mid-stream: the primary asks
/// the controller, which raises the epoch; the surviving backup takes it
/// from its watch and the writes go on, acknowledged by both survivors
/// (byte-identical); the dead one comes back out of sync. A primary still
/// at the old epoch is fenced: it cannot even open the volume, and writes
/// nothing. The first replica host in sync (the volume is attached to no
/// instance) then resyncs the returning one, copying only the regions
/// written since it fell behind (counted, by checksum); the controller
/// puts it back in sync at a higher epoch (fencing the old primary),
/// every replica file has the same checksums, and a primary at the new
/// epoch writes to it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_replicate_through_blockd_and_fail_over_by_the_controllers_epoch() {
    use ferro_blockd::authority::ControllerAuthority;
    use ferro_blockd::replication::{Backup, Options, ReplicatedStore};
    use ferro_blockd::store::{LocalFile, Store};

    let t = controller(false, 10_000).await;
    let mut c = client(t.addr, &t.admin_key).await;
    let dir = ferro_testkit::scratch("volumes-replication");
    let mut blockds = start_hosts(&t, &dir, &["h1", "h2", "h3"], true).await;
    let vol = durable_volume(&mut c).await;
    let id = vol.volume_id.clone();
    let by_host = |h: &str| blockds.iter().position(|b| b.host == h).unwrap();
    let order: Vec<usize> = vol.replica_host_ids.iter().map(|h| by_host(h)).collect();
    let (p, b1, b2) = (order[0], order[1], order[2]);
    // The primary's view: its peers' replica servers.
    let mut hc = hosts_client(t.addr).await;
    let peers = replica_servers(&t, &blockds[p].key).await;
    let backups: Vec<Backup> = peers
        .iter()
        .filter(|x| x.host_id != blockds[p].host)
        .map(|x| Backup {
            id: x.host_id.clone(),
            addr: x.addr.parse().unwrap(),
        })
        .collect();
    assert_eq!(backups.len(), 2);

    // The test plays the primary host's blockd: its local copy is that
    // host's replica file, its authority the controller with its key.
    let (p_key, p_replica) = (blockds[p].key.clone(), blockds[p].replica(&id));
    let open = |epoch: u64, backups: Vec<Backup>| {
        let cfg = ferro_client::ClientConfig::new(
            vec![format!("http://{}", t.addr)],
            Some(p_key.clone()),
        );
        let authority = ControllerAuthority::new(
            ferro_client::Client::new(cfg).unwrap(),
            tokio::runtime::Handle::current(),
        );
        let local = LocalFile::open_or_create(&p_replica, 1 << 30).unwrap();
        let id = id.clone();
        tokio::task::spawn_blocking(move || {
            ReplicatedStore::open(
                &id,
                epoch,
                Box::new(local),
                &backups,
                std::sync::Arc::new(authority),
                Options {
                    timeout: Duration::from_secs(5),
                    ..Options::default()
                },
            )
        })
    };
    let store = std::sync::Arc::new(open(1, backups.clone()).await.unwrap().unwrap());
    let io = |f: Box<dyn FnOnce(&ReplicatedStore) + Send>| {
        let s = store.clone();
        tokio::task::spawn_blocking(move || f(&s))
    };
    const MIB: usize = 1 << 20;
    io(Box::new(|s| {
        s.write_at(&pattern(1, 4 * MIB), 0).unwrap();
        s.write_at(&pattern(2, 4096), 512 * MIB as u64).unwrap();
        s.flush().unwrap();
    }))
    .await
    .unwrap();
    for r in [p, b1, b2] {
        let path = blockds[r].replica(&id);
        assert_eq!(
            sum(&path, 0, 4 * MIB),
            ferro_testkit::fnv64(&pattern(1, 4 * MIB)),
            "{}",
            blockds[r].host
        );
        assert_eq!(
            sum(&path, 512 * MIB as u64, 4096),
            ferro_testkit::fnv64(&pattern(2, 4096))
        );
    }

    // A backup's blockd dies: the next write fails over through the
    // controller and is acknowledged by the two survivors.
    blockds[b1].kill();
    io(Box::new(|s| {
        s.write_at(&pattern(3, MIB), 8 * MIB as u64).unwrap();
        s.flush().unwrap();
        assert_eq!(s.epoch(), 2);
    }))
    .await
    .unwrap();
    assert_eq!(store.out_of_sync(), [blockds[b1].host.clone()]);
    let want = ferro_testkit::fnv64(&pattern(3, MIB));
    for r in [p, b2] {
        assert_eq!(sum(&blockds[r].replica(&id), 8 * MIB as u64, MIB), want);
    }
    assert_ne!(sum(&blockds[b1].replica(&id), 8 * MIB as u64, MIB), want);
    let v = volume(&mut c, &id).await.unwrap();
    assert_eq!((v.epoch, v.state.as_str()), (2, "available"));
    // More writes while it is out: one region, and three (2 MiB from the
    // middle of a region on).
    io(Box::new(|s| {
        s.write_at(&pattern(4, 4096), 100 * MIB as u64).unwrap();
        s.write_at(&pattern(5, 2 * MIB), 200 * MIB as u64 + 512 * 1024)
            .unwrap();
        s.flush().unwrap();
    }))
    .await
    .unwrap();
    // The write that failed over (not flushed everywhere when the backup
    // died) and the three writes since.
    assert_eq!(store.dirty().count(), 5);

    // The dead one comes back out of sync: its replica takes epoch 2, to
    // be resynced at it, but it is not in sync (yet: the primary's host,
    // the first replica in sync, resyncs it as soon as it can reach it).
    blockds[b1].start();
    let told = host_volumes(&mut hc, &blockds[b1].key).await.unwrap();
    assert!(!told.replicas[0].in_sync);
    let epoch_file = blockds[b1]
        .data
        .join("replicas")
        .join(format!("{id}.epoch"));
    let deadline = Instant::now() + WAIT;
    while !["\nepoch=2\n", "\nepoch=3\n"]
        .iter()
        .any(|e| std::fs::read_to_string(&epoch_file).unwrap().contains(e))
    {
        assert!(
            Instant::now() < deadline,
            "the returning replica never took epoch 2"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A primary still at epoch 1 is fenced: the survivors refuse its
    // hello, and the controller refuses it a new epoch.
    let before = sum(&blockds[b2].replica(&id), 0, 4 * MIB);
    let stale = open(1, backups.clone()).await.unwrap();
    assert!(stale.is_err(), "a fenced primary opened the volume");
    assert_eq!(sum(&blockds[b2].replica(&id), 0, 4 * MIB), before);
    let v = volume(&mut c, &id).await.unwrap();
    assert!(v.epoch >= 2, "nothing went back for it");

    // The volume is attached to no instance, so the first replica host in
    // sync (the primary's) resyncs the returning one from its own copy,
    // by checksum: only the regions written since it fell behind. The
    // controller then has it in sync at epoch 3.
    // (Comparing 1 GiB by checksum takes a debug build some seconds.)
    let deadline = Instant::now() + 3 * WAIT;
    loop {
        let told = host_volumes(&mut hc, &blockds[b1].key).await.unwrap();
        if told.replicas[0].in_sync {
            assert_eq!(told.replicas[0].epoch, 3);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the returning replica was never resynced"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Logged once the controller's answer is in (a moment after the
    // controller shows it).
    let deadline = Instant::now() + WAIT;
    let line = loop {
        let log = strip_ansi(&std::fs::read_to_string(&blockds[p].log).unwrap());
        if let Some(l) = log
            .lines()
            .find(|l| l.contains("replica resynced and back in sync"))
        {
            break l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no resync logged by the primary's host:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let regions = store.dirty().count();
    assert!(
        line.contains(&format!("regions={regions} "))
            && line.contains(&format!("bytes={} ", regions * MIB as u64))
            && line.contains("by_checksum=true")
            && line.contains(&blockds[b1].host),
        "{regions} regions: {line}"
    );
    let v = volume(&mut c, &id).await.unwrap();
    assert_eq!((v.epoch, v.state.as_str()), (3, "available"));
    // Byte-identical: every region's checksum, on every replica.
    let sums: Vec<Vec<u32>> = [p, b1, b2]
        .iter()
        .map(|r| file_sums(&blockds[*r].replica(&id)))
        .collect();
    assert_eq!(sums[0].len(), 1024);
    assert!(sums[1] == sums[0], "the resynced replica differs");
    assert!(sums[2] == sums[0], "a survivor differs");

    // The primary at epoch 2 is fenced by the set change; one at epoch 3
    // writes to all three, the resynced one included.
    io(Box::new(|s| {
        // (A flush: a write would land on its own copy before the others
        // refuse it.)
        s.flush().unwrap_err();
    }))
    .await
    .unwrap();
    assert!(store.is_fenced());
    let peers = replica_servers(&t, &blockds[p].key).await;
    let backups: Vec<Backup> = peers
        .iter()
        .filter(|x| x.host_id != blockds[p].host)
        .map(|x| Backup {
            id: x.host_id.clone(),
            addr: x.addr.parse().unwrap(),
        })
        .collect();
    let store = std::sync::Arc::new(open(3, backups).await.unwrap().unwrap());
    assert_eq!(store.in_sync().len(), 2);
    let s = store.clone();
    tokio::task::spawn_blocking(move || {
        s.write_at(&pattern(6, MIB), 300 * MIB as u64).unwrap();
        s.flush().unwrap();
        assert_eq!(s.epoch(), 3);
    })
    .await
    .unwrap();
    assert_eq!(store.in_sync().len(), 2, "nobody dropped");
    let want = ferro_testkit::fnv64(&pattern(6, MIB));
    for r in [p, b1, b2] {
        assert_eq!(sum(&blockds[r].replica(&id), 300 * MIB as u64, MIB), want);
    }
    drop(store);

    // A replica file that vanishes (a replaced disk) is made again blank,
    // with a new incarnation: the controller takes it out of sync (epoch
    // 4) instead of counting a blank copy as a good one, and the first
    // replica host in sync resyncs it by checksum (epoch 5).
    std::fs::remove_file(blockds[b2].replica(&id)).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let v = volume(&mut c, &id).await.unwrap();
        if v.epoch >= 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the remade replica was never taken out of sync"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + 3 * WAIT;
    loop {
        let told = host_volumes(&mut hc, &blockds[b2].key).await.unwrap();
        if told.replicas[0].in_sync && told.replicas[0].epoch == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the remade replica was never resynced (told {:?})",
            told.replicas[0]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sums: Vec<Vec<u32>> = [p, b2]
        .iter()
        .map(|r| file_sums(&blockds[*r].replica(&id)))
        .collect();
    assert!(
        sums[1] == sums[0],
        "the remade replica differs after its resync"
    );
    assert_eq!(sum(&blockds[b2].replica(&id), 300 * MIB as u64, MIB), want);
    drop(blockds);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A ferro-vmm as the agent would start it, the test guest writing (and
/// flushing) a pattern to volume `id` served at `socket`; its console in
/// `<dir>/<name>.console`, its log in `<dir>/<name>.log`.
fn writing_vmm(dir: &Path, socket: &Path, id: &str, name: &str) -> Proc {
    let console = dir.join(format!("{name}.console"));
    Proc(
        std::process::Command::new(ferro_testkit::workspace_bin("ferro-vmm", "ferro-vmm"))
            .args([
                "--kernel",
                ferro_testkit::guest_elf().to_str().unwrap(),
                "--memory",
                "128",
            ])
            .args(["--cmdline", &format!("console=ttyS0 ferro.write={id}")])
            .arg("--vhost-user-blk")
            .arg(format!("socket={},id={id}", socket.display()))
            .arg("--serial")
            .arg(format!("file:{}", console.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// The lines of blockd log `log` about volume `id` with all of `what`.
fn log_lines(log: &Path, id: &str, what: &[&str]) -> usize {
    strip_ansi(&std::fs::read_to_string(log).unwrap_or_default())
        .lines()
        .filter(|l| l.contains(id) && what.iter().all(|w| l.contains(w)))
        .count()
}

/// A durable volume attached to an instance is served by its instance's
/// host's blockd (the primary) over vhost-user, and ferro-vmm running the
/// test guest on that socket writes through it: the guest's pattern, once
/// its write and flush complete, is on all three replica hosts. Needs KVM
/// and root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_volume_is_served_by_its_instance_host_and_replicated() {
    ferro_testkit::require_kvm_root();
    let t = controller(false, 10_000).await;
    let mut c = client(t.addr, &t.admin_key).await;
    let dir = ferro_testkit::scratch("volumes-serve");
    let blockds = start_hosts(&t, &dir, &["h1", "h2", "h3"], true).await;
    register(&mut c).await;
    let inst = c
        .run_instances(pb::RunInstancesRequest {
            availability_zone: "az-1".into(),
            ..run_req(1)
        })
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    c.stop_instances(pb::StopInstancesRequest {
        instance_ids: vec![inst.instance_id.clone()],
        force: false,
    })
    .await
    .unwrap();
    let vol = durable_volume(&mut c).await;
    let id = vol.volume_id.clone();
    // Every replica server known before the attachment is served.
    replica_servers(&t, &blockds[0].key).await;
    let attach = pb::AttachVolumeRequest {
        volume_id: id.clone(),
        instance_id: inst.instance_id.clone(),
        device: "/dev/vdb".into(),
        delete_on_termination: false,
    };
    c.attach_volume(attach.clone()).await.unwrap();
    let host = c
        .describe_instances(pb::DescribeInstancesRequest {
            instance_ids: vec![inst.instance_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0)
        .host_id;
    let server = blockds.iter().find(|b| b.host == host).unwrap();
    let socket = server.data.join("vhost").join(format!("{id}.sock"));
    wait_file(&socket, true);

    // The VMM as the agent would start it, with the volume as its disk.
    let console_log = dir.join("vmm.console");
    let vmm = writing_vmm(&dir, &socket, &id, "vmm");
    let deadline = Instant::now() + Duration::from_secs(60);
    let line = loop {
        let text = std::fs::read_to_string(&console_log).unwrap_or_default();
        if let Some(l) = text
            .lines()
            .find(|l| l.contains(&format!("blk serial={id} write")))
        {
            break l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the guest never wrote; console:\n{text}\nblockd {host}:\n{}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(line.contains("write status=0 flush status=0"), "{line}");
    let want = ferro_testkit::fnv64(&ferro_testkit::guest_write_pattern());
    for b in &blockds {
        assert_eq!(
            sum(&b.replica(&id), 0, 4096),
            want,
            "the guest's write is not on {}",
            b.host
        );
    }

    // A line of the serving blockd's log about the volume with all of `what`.
    let log_has = |what: &[&str]| log_lines(&server.log, &id, what) > 0;
    // The VMM gone (its writes flushed), the primary closes the serving
    // session clean at once, going on serving; detached and attached
    // again, the replicas are not compared.
    drop(vmm);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log_has(&["no frontend; session closed clean"]) {
        assert!(
            Instant::now() < deadline,
            "the session was not closed when the VMM went away; blockd {host}:\n{}",
            std::fs::read_to_string(&server.log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.detach_volume(pb::DetachVolumeRequest {
        volume_id: id.clone(),
        instance_id: inst.instance_id.clone(),
        force: false,
    })
    .await
    .unwrap();
    wait_file(&socket, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !log_has(&["no longer serving the volume"]) {
        assert!(Instant::now() < deadline, "the volume was never let go");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        log_has(&["no longer serving the volume", " clean=true"]),
        "not closed clean; blockd {host}:\n{}",
        std::fs::read_to_string(&server.log).unwrap_or_default()
    );
    c.attach_volume(attach).await.unwrap();
    wait_file(&socket, true);
    assert!(
        log_has(&["serving the volume", "was_clean=true"]),
        "served again, but not as closed clean; blockd {host}:\n{}",
        std::fs::read_to_string(&server.log).unwrap_or_default()
    );

    // A blockd stopped with SIGTERM (an upgrade, `systemctl restart`)
    // while a VMM is connected stalls its queue, flushes, closes the
    // session clean and exits 0; the VMM lives on, and the blockd started
    // again serves the volume without comparing its replicas.
    let console2 = dir.join("vmm2.console");
    let vmm2 = writing_vmm(&dir, &socket, &id, "vmm2");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&console2)
        .unwrap_or_default()
        .contains("write status=0 flush status=0")
    {
        assert!(
            Instant::now() < deadline,
            "the second guest never wrote; console:\n{}",
            std::fs::read_to_string(&console2).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served_as_clean = ["serving the volume", "was_clean=true"];
    let served_clean = log_lines(&server.log, &id, &served_as_clean);
    let si = blockds.iter().position(|b| b.host == host).unwrap();
    let mut blockds = blockds;
    let pid = blockds[si].proc.as_ref().unwrap().0.id();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = blockds[si].proc.as_mut().unwrap().0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "blockd did not stop on SIGTERM; its log:\n{}",
            std::fs::read_to_string(&blockds[si].log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = strip_ansi(&std::fs::read_to_string(&blockds[si].log).unwrap_or_default());
    assert!(
        status.success(),
        "blockd exited {status} on SIGTERM:\n{log}"
    );
    assert!(
        log_lines(
            &blockds[si].log,
            &id,
            &["stopping: volume let go", " clean=true"]
        ) > 0,
        "the volume was not closed clean on SIGTERM:\n{log}"
    );
    blockds[si].start();
    let deadline = Instant::now() + Duration::from_secs(30);
    while log_lines(&blockds[si].log, &id, &served_as_clean) <= served_clean {
        assert!(
            Instant::now() < deadline,
            "the restarted blockd did not serve the volume as closed clean:\n{}",
            strip_ansi(&std::fs::read_to_string(&blockds[si].log).unwrap_or_default())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut vmm2 = vmm2;
    assert!(
        vmm2.0.try_wait().unwrap().is_none(),
        "the VMM died across the blockd restart; its log:\n{}",
        std::fs::read_to_string(dir.join("vmm2.log")).unwrap_or_default()
    );
    drop(vmm2);
    drop(blockds);
    let _ = std::fs::remove_dir_all(&dir);
}
