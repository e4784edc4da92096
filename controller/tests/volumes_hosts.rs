//! A volume across hosts with every real process: one `ferro-controller`
//! in the root namespace and two "hosts", each a network namespace on a
//! shared underlay running a `ferro-agent`, a `ferro-netd` and a
//! `ferro-blockd`. A standard volume (a replica on each host) is attached
//! to a stopped instance; at its start the agent gives the VMM the
//! volume's vhost-user socket, which the instance host's blockd serves as
//! the volume's primary: the test guest's write lands on both replicas.
//! Detached and attached to an instance on the other host, the guest there
//! reads the same data. Deleting the volume then removes both replicas.
//! Needs KVM and root.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::procs::Procs;
use common::vpc::{authed, guest_image, log_tails, start_hosts, wait_console, HostsSpec};
use ferro_proto::compute::v1 as pb;
use ferro_testkit::KillVmms;
use pb::compute_client::ComputeClient;
use tonic::transport::Channel;

type Client = ComputeClient<Channel>;

async fn instance(c: &mut Client, key: &str, id: &str) -> pb::Instance {
    let req = pb::DescribeInstancesRequest {
        instance_ids: vec![id.into()],
        ..Default::default()
    };
    c.describe_instances(authed(key, req))
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0)
}

async fn wait_state(c: &mut Client, key: &str, id: &str, want: pb::InstanceState, logs: &[&Path]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let i = instance(c, key, id).await;
        if i.state == want as i32 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never became {want:?}: {i:?}\n{}",
            log_tails(logs)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn volume(c: &mut Client, key: &str, id: &str) -> Option<pb::Volume> {
    let req = pb::DescribeVolumesRequest {
        volume_ids: vec![id.into()],
        ..Default::default()
    };
    match c.describe_volumes(authed(key, req)).await {
        Ok(r) => r.into_inner().volumes.into_iter().next(),
        Err(s) if s.code() == tonic::Code::NotFound => None,
        Err(s) => panic!("DescribeVolumes: {s}"),
    }
}

async fn wait_volume(c: &mut Client, key: &str, id: &str, want: Option<&str>, logs: &[&Path]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = volume(c, key, id).await;
        if v.as_ref().map(|v| v.state.as_str()) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "volume {id} never became {want:?}: {v:?}\n{}",
            log_tails(logs)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run(c: &mut Client, key: &str, image: &str) -> pb::Instance {
    let req = pb::RunInstancesRequest {
        count: 1,
        instance_type: "f1.nano".into(),
        image_id: image.into(),
        availability_zone: "az-1".into(),
        strategy: pb::PlacementStrategy::Spread as i32,
        ..Default::default()
    };
    c.run_instances(authed(key, req))
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0)
}

async fn stop(c: &mut Client, key: &str, id: &str, logs: &[&Path]) {
    let req = pb::StopInstancesRequest {
        instance_ids: vec![id.into()],
        force: true,
    };
    c.stop_instances(authed(key, req)).await.unwrap();
    wait_state(c, key, id, pb::InstanceState::Stopped, logs).await;
}

async fn start(c: &mut Client, key: &str, id: &str, logs: &[&Path]) {
    let req = pb::StartInstancesRequest {
        instance_ids: vec![id.into()],
    };
    c.start_instances(authed(key, req)).await.unwrap();
    wait_state(c, key, id, pb::InstanceState::Running, logs).await;
}

async fn attach(c: &mut Client, key: &str, vol: &str, id: &str) {
    let req = pb::AttachVolumeRequest {
        volume_id: vol.into(),
        instance_id: id.into(),
        device: "/dev/vdb".into(),
        delete_on_termination: false,
    };
    c.attach_volume(authed(key, req)).await.unwrap();
}

/// The highest round of a writing `ferro.blkloop=` in `console` whose
/// write and flush were acknowledged.
fn last_round(console: &str) -> u64 {
    console
        .lines()
        .filter(|l| l.contains(" write=0 flush=0 "))
        .filter_map(|l| l.split(" loop=").nth(1)?.split(' ').next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The round number a writing `ferro.blkloop=` left in a replica file
/// (bytes 16..24 of its first block).
fn round_in(path: &Path) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .read_exact_at(&mut b, 16)
        .unwrap();
    u64::from_le_bytes(b)
}

/// Waits (up to 20 s) until `path` is gone.
fn wait_gone(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} is left behind",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// FNV-1a of the first `len` bytes of `path` at `offset`.
fn sum(path: &Path, offset: u64, len: usize) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .read_exact_at(&mut buf, offset)
        .unwrap();
    ferro_testkit::fnv64(&buf)
}

/// Boot from a volume: an instance whose root disk is a volume made from
/// the image's root disk sees the image's bytes on `/dev/vda` (the first
/// disk) and writes over them. Stopped, its host then dying whole, it is
/// started and lands on the other host, where its guest reads what it
/// wrote. The dead host comes back and its stale copy of the instance is
/// deleted; terminating the instance deletes the root volume everywhere.
async fn boot_from_volume_moves_a_stopped_instance(
    c: &mut Client,
    key: &str,
    hosts: &mut [common::vpc::HostProcs],
    dir: &Path,
    guest: &Path,
    logs: &[&Path],
) {
    // A 1 MiB root disk whose first sectors are not zero.
    let image_disk = dir.join("boot-root.raw");
    let mut bytes = vec![0u8; 1 << 20];
    for (k, b) in bytes.iter_mut().take(8192).enumerate() {
        *b = (k % 251) as u8 ^ 0x5a;
    }
    std::fs::write(&image_disk, &bytes).unwrap();
    let mut image = guest_image("boot", guest, "ferro.exit=idle ferro.write=*");
    image.rootdisk_path = image_disk.display().to_string();
    c.register_image(authed(key, image)).await.unwrap();
    let req = pb::RunInstancesRequest {
        count: 1,
        instance_type: "f1.nano".into(),
        image_id: "boot".into(),
        availability_zone: "az-1".into(),
        root_volume: Some(pb::RootVolume {
            volume_size_gib: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let launched = c
        .run_instances(authed(key, req))
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    let id = launched.instance_id.clone();
    let root = launched.root_volume_id.clone();
    assert_eq!(launched.root_device_type, "ebs", "{launched:?}");
    assert!(
        launched
            .block_device_mappings
            .iter()
            .any(|a| a.volume_id == root && a.device == "/dev/vda"),
        "{launched:?}"
    );
    wait_state(c, key, &id, pb::InstanceState::Running, logs).await;
    let first_disk = |serial: &str| format!("virtio-blk serial={serial} sectors=2097152");
    // (The guest hashes the first 4 KiB, the size of its pattern.)
    let pattern = ferro_testkit::guest_write_pattern();
    let image_sum = format!("{:016x}", ferro_testkit::fnv64(&bytes[..pattern.len()]));
    let pattern_sum = format!("{:016x}", ferro_testkit::fnv64(&pattern));
    wait_console(
        c,
        key,
        &id,
        &[
            first_disk(&root),
            format!("blk serial={root} read sector0 fnv64={image_sum}"),
            format!("blk serial={root} write status=0 flush status=0"),
        ],
        logs,
    )
    .await;
    let out = common::vpc::console(c, key, &id).await;
    let first = out
        .lines()
        .find(|l| l.contains("virtio-blk serial="))
        .unwrap_or("");
    assert!(
        first.contains(&root),
        "the root volume is not the first disk: {first}"
    );

    // Stopped; then its host dies whole and is declared unreachable.
    stop(c, key, &id, logs).await;
    let from = instance(c, key, &id).await.host_id;
    let at = hosts.iter().position(|h| h.host_id == from).unwrap();
    {
        let h = &mut hosts[at];
        for d in [&mut h.agent, &mut h.netd, h.blockd.as_mut().unwrap()] {
            let _ = d.proc.0.kill();
            let _ = d.proc.0.wait();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hs = c
            .describe_hosts(authed(key, pb::DescribeHostsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .hosts;
        if hs
            .iter()
            .any(|h| h.host_id == from && h.health == pb::HostHealth::Unreachable as i32)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{from} never became unreachable");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let i = instance(c, key, &id).await;
    assert_eq!(i.state, pb::InstanceState::Stopped as i32, "{i:?}");

    // Started: on the other host (a fresh console there), from the same
    // volume.
    start(c, key, &id, logs).await;
    let to = instance(c, key, &id).await.host_id;
    assert_ne!(to, from, "the instance did not move");
    let read_back = format!("blk serial={root} read sector0 fnv64={pattern_sum}");
    wait_console(c, key, &id, std::slice::from_ref(&read_back), logs).await;
    eprintln!("volumes_hosts: boot from volume {root}: {id} stopped on {from}, started on {to}");

    // The dead host comes back: its stale copy of the instance goes.
    let stale = dir.join(format!("a{}", at + 1)).join("instances").join(&id);
    assert!(stale.exists(), "{} was never there", stale.display());
    {
        let h = &mut hosts[at];
        let ns = h.ns.clone();
        h.agent.restart(&ns);
        h.netd.restart(&ns);
        h.blockd.as_mut().unwrap().restart(&ns);
    }
    wait_gone(&stale);

    // Terminated: the root volume goes with it, from both hosts.
    let req = pb::TerminateInstancesRequest {
        instance_ids: vec![id.clone()],
    };
    c.terminate_instances(authed(key, req)).await.unwrap();
    wait_volume(c, key, &root, None, logs).await;
    for h in hosts.iter() {
        wait_gone(&h.blockd_dir.join("replicas").join(format!("{root}.vol")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_volume_reaches_the_guest_and_follows_it_to_another_host() {
    ferro_testkit::require_kvm_root();
    ferro_testkit::require_tool("ip");
    let guest = ferro_testkit::guest_elf();
    let pid = std::process::id();
    let tag = format!("{:04x}", pid & 0xffff);
    // Short: an agent's state directory must fit 32 bytes.
    let dir = std::path::PathBuf::from(format!("/tmp/fc-vh-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let _vmms = KillVmms(dir.clone());
    let net = 150 + (pid % 40) as u8;
    let underlay = ferro_testkit::Underlay::new(&format!("v{}", &tag[1..]), 2, net);

    let ip = format!("10.{net}.0.254");
    let mut procs = Procs::new("volumes-hosts", &[ip.as_str()], 1, |_| {
        "availability_zones = [\"az-1\"]\nheartbeat_interval_ms = 200\n\
         heartbeat_timeout_ms = 5000\nreconcile_interval_ms = 50\n"
            .into()
    });
    procs.spawn(0);
    let key = procs.admin_key(30).await;
    let ctl_dir = procs.dir.clone();
    let logs = [dir.as_path(), ctl_dir.as_path()];
    let prefix = format!("vh-{tag}");
    let mut hosts = start_hosts(
        &HostsSpec {
            dir: &dir,
            net,
            prefix: &prefix,
            controllers: &procs.addrs,
            admin_key: &key,
            volumes: true,
        },
        &underlay.hosts,
    )
    .await;
    let mut c = ComputeClient::connect(procs.url(0)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let known = c
            .describe_hosts(authed(&key, pb::DescribeHostsRequest::default()))
            .await
            .unwrap()
            .into_inner()
            .hosts;
        if known.len() == 2 && known.iter().all(|h| h.disk_total_gib == 20) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hosts never offered volume space"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A standard volume: one replica on each host.
    let req = pb::CreateVolumeRequest {
        size_gib: 1,
        availability_zone: "az-1".into(),
        volume_type: "standard".into(),
        ..Default::default()
    };
    let vol = c
        .create_volume(authed(&key, req))
        .await
        .unwrap()
        .into_inner()
        .volume_id;
    wait_volume(&mut c, &key, &vol, Some("available"), &logs).await;

    // The writer writes its pattern to the disk whose serial is the
    // volume id; the reader only reads every disk's first sector.
    for (name, cmdline) in [
        ("writer", format!("ferro.exit=idle ferro.write={vol}")),
        (
            "reader",
            format!("ferro.exit=idle ferro.blkloop={vol} ferro.blkwrite=1"),
        ),
    ] {
        c.register_image(authed(&key, guest_image(name, &guest, &cmdline)))
            .await
            .unwrap();
    }
    let writer = run(&mut c, &key, "writer").await.instance_id;
    wait_state(&mut c, &key, &writer, pb::InstanceState::Running, &logs).await;
    let reader = run(&mut c, &key, "reader").await.instance_id;
    wait_state(&mut c, &key, &reader, pb::InstanceState::Running, &logs).await;
    let (wh, rh) = (
        instance(&mut c, &key, &writer).await.host_id,
        instance(&mut c, &key, &reader).await.host_id,
    );
    assert_ne!(wh, rh, "spread put both instances on one host");
    stop(&mut c, &key, &writer, &logs).await;
    stop(&mut c, &key, &reader, &logs).await;

    // Attached while stopped: takes effect at the next start.
    attach(&mut c, &key, &vol, &writer).await;
    start(&mut c, &key, &writer, &logs).await;
    let wrote = format!("blk serial={vol} write status=0 flush status=0");
    wait_console(&mut c, &key, &writer, std::slice::from_ref(&wrote), &logs).await;
    let pattern = ferro_testkit::guest_write_pattern();
    for h in &hosts {
        let replica = h.blockd_dir.join("replicas").join(format!("{vol}.vol"));
        assert_eq!(
            sum(&replica, 0, pattern.len()),
            ferro_testkit::fnv64(&pattern),
            "the guest's write is not on {}'s replica\n{}",
            h.host_id,
            log_tails(&logs)
        );
    }
    let i = instance(&mut c, &key, &writer).await;
    assert!(
        i.block_device_mappings
            .iter()
            .any(|a| a.volume_id == vol && a.device == "/dev/vdb"),
        "DescribeInstances shows no attachment: {i:?}"
    );

    // Stopped, detached, attached to the instance on the other host: its
    // guest reads what the first one wrote.
    stop(&mut c, &key, &writer, &logs).await;
    let req = pb::DetachVolumeRequest {
        volume_id: vol.clone(),
        instance_id: writer.clone(),
        force: false,
    };
    c.detach_volume(authed(&key, req)).await.unwrap();
    attach(&mut c, &key, &vol, &reader).await;
    start(&mut c, &key, &reader, &logs).await;
    let hash = format!("{:016x}", ferro_testkit::fnv64(&pattern));
    let read = format!("blk serial={vol} read sector0 fnv64={hash}");
    wait_console(&mut c, &key, &reader, std::slice::from_ref(&read), &logs).await;

    // kill -9 of the reader host's blockd while its guest reads in a loop:
    // the guest's I/O waits until blockd is back and serves the volume
    // again, then goes on with the same data; the VMM lives on.
    let looped = |n: u64| format!("blk serial={vol} loop={n} write=0 flush=0 fnv64=");
    wait_console(&mut c, &key, &reader, &[looped(3)], &logs).await;
    let rhost = hosts
        .iter_mut()
        .find(|h| h.host_id == rh)
        .expect("the reader's host");
    let blockd = rhost.blockd.as_mut().unwrap();
    let _ = blockd.proc.0.kill();
    let _ = blockd.proc.0.wait();
    let out = common::vpc::console(&mut c, &key, &reader).await;
    let last = last_round(&out);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ns = rhost.ns.clone();
    rhost.blockd.as_mut().unwrap().restart(&ns);
    wait_console(&mut c, &key, &reader, &[looped(last + 15)], &logs).await;
    let i = instance(&mut c, &key, &reader).await;
    assert_eq!(i.state, pb::InstanceState::Running as i32, "{i:?}");

    // A launch with a block device mapping: its blank volume is made on
    // both hosts first, attached from the start, reaches the guest, and
    // goes with the instance (delete on termination by default).
    let req = pb::RunInstancesRequest {
        count: 1,
        instance_type: "f1.nano".into(),
        image_id: "reader".into(),
        block_device_mappings: vec![pb::BlockDeviceMapping {
            device_name: "/dev/vdc".into(),
            volume_size_gib: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    let launched = c
        .run_instances(authed(&key, req))
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    let third = launched.instance_id;
    let mapping = launched
        .block_device_mappings
        .iter()
        .find(|a| a.device == "/dev/vdc")
        .unwrap_or_else(|| panic!("no mapping in {:?}", launched.block_device_mappings))
        .volume_id
        .clone();
    wait_state(&mut c, &key, &third, pb::InstanceState::Running, &logs).await;
    let seen = format!("virtio-blk serial={mapping} sectors=2097152");
    wait_console(&mut c, &key, &third, &[seen], &logs).await;
    assert_eq!(
        volume(&mut c, &key, &mapping).await.unwrap().state,
        "in-use"
    );
    let req = pb::TerminateInstancesRequest {
        instance_ids: vec![third.clone()],
    };
    c.terminate_instances(authed(&key, req)).await.unwrap();
    wait_volume(&mut c, &key, &mapping, None, &logs).await;
    for h in &hosts {
        let replica = h.blockd_dir.join("replicas").join(format!("{mapping}.vol"));
        wait_gone(&replica);
    }

    // The other host dies whole (agent, netd and blockd killed) while the
    // reader's guest writes in a loop: the primary on the reader's host
    // cannot reach that backup, the controller drops it from the in-sync
    // set at a new epoch, and the guest's writes go on. Every round the
    // guest saw acknowledged is on the surviving replica.
    let w = hosts.iter().position(|h| h.host_id != rh).unwrap();
    let r = 1 - w;
    let before = last_round(&common::vpc::console(&mut c, &key, &reader).await);
    {
        let h = &mut hosts[w];
        for d in [&mut h.agent, &mut h.netd, h.blockd.as_mut().unwrap()] {
            let _ = d.proc.0.kill();
            let _ = d.proc.0.wait();
        }
    }
    wait_console(&mut c, &key, &reader, &[looped(before + 10)], &logs).await;
    stop(&mut c, &key, &reader, &logs).await;
    let acked = last_round(&common::vpc::console(&mut c, &key, &reader).await);
    let files: Vec<std::path::PathBuf> = hosts
        .iter()
        .map(|h| h.blockd_dir.join("replicas").join(format!("{vol}.vol")))
        .collect();
    let replica = |h: usize| files[h].clone();
    let on_survivor = round_in(&replica(r));
    assert!(
        on_survivor >= acked,
        "round {acked} was acknowledged, the surviving replica has {on_survivor}"
    );
    // The host comes back: the primary resyncs its replica (only what it
    // missed), which then has the same data as the survivor's.
    {
        let h = &mut hosts[w];
        let ns = h.ns.clone();
        h.agent.restart(&ns);
        h.netd.restart(&ns);
        h.blockd.as_mut().unwrap().restart(&ns);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while sum(&replica(w), 0, 1 << 20) != sum(&replica(r), 0, 1 << 20) {
        assert!(
            Instant::now() < deadline,
            "the returning replica was never resynced\n{}",
            log_tails(&logs)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(round_in(&replica(w)), on_survivor);
    // (Restarted above: its log since then.) The resync logs once the
    // controller took the replica back, just after the bytes match.
    let log_path = dir.join(format!("blockd-{}.restarted.log", r + 1));
    let deadline = Instant::now() + Duration::from_secs(30);
    let blockd_log = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains("replica resynced and back in sync") {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the primary logged no resync:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for l in blockd_log
        .lines()
        .filter(|l| l.contains("replica resynced"))
    {
        eprintln!("volumes_hosts: {l}");
    }
    eprintln!("volumes_hosts: rounds acknowledged {acked}, on the survivor {on_survivor}");

    // Deleting an in-use volume is refused; once detached it goes, with
    // both replicas.
    let del = |v: &str| pb::DeleteVolumeRequest {
        volume_id: v.to_string(),
    };
    let e = c.delete_volume(authed(&key, del(&vol))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    stop(&mut c, &key, &reader, &logs).await;
    let req = pb::DetachVolumeRequest {
        volume_id: vol.clone(),
        instance_id: reader.clone(),
        force: false,
    };
    c.detach_volume(authed(&key, req)).await.unwrap();
    c.delete_volume(authed(&key, del(&vol))).await.unwrap();
    wait_volume(&mut c, &key, &vol, None, &logs).await;
    for h in &hosts {
        wait_gone(&h.blockd_dir.join("replicas").join(format!("{vol}.vol")));
    }

    boot_from_volume_moves_a_stopped_instance(&mut c, &key, &mut hosts, &dir, &guest, &logs).await;

    drop(hosts);
    common::vpc::remove_cgroups(&prefix, 2);
    let _ = std::fs::remove_dir_all(&dir);
}
