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
        self.data.join("replicas").join(format!("{vol}.img"))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blockd_makes_replicas_available_and_deleting_removes_every_one() {
    let t = controller(false, 10_000).await;
    let mut c = client(t.addr, &t.admin_key).await;
    let dir = ferro_testkit::scratch("volumes-blockd");
    let mut blockds = Vec::new();
    for h in ["h1", "h2", "h3"] {
        let mut agent = FakeAgent::new(h, "az-1", 8, 8192);
        agent.disk_gib = 100;
        let key = agent.join(&[t.addr.to_string()], &t.admin_key).await;
        heartbeat_forever(t.addr, agent, "https://127.0.0.1:1".into());
        let data = dir.join(h);
        std::fs::create_dir_all(&data).unwrap();
        let key_file = data.join("api-key");
        std::fs::write(&key_file, &key).unwrap();
        let args = [
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
        let mut b = Blockd {
            host: h.into(),
            args,
            log: dir.join(format!("{h}.log")),
            data,
            proc: None,
        };
        b.start();
        blockds.push(b);
    }
    // The hosts are registered by their first heartbeat.
    let deadline = Instant::now() + WAIT;
    loop {
        let hosts = c
            .describe_hosts(pb::DescribeHostsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .hosts;
        if hosts.len() == 3 && hosts.iter().all(|h| h.disk_total_gib == 100) {
            break;
        }
        assert!(Instant::now() < deadline, "hosts never registered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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
