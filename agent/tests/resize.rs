//! A start that carries another size and user data (the controller's
//! ModifyInstanceAttribute of a stopped instance): the next VMM runs with
//! them, as the test guest reports on its console, the spec is stored, the
//! cgroup follows, and what cannot be taken changes nothing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferro_proto::agent::v1 as pb;
use tonic::Code;

fn resources(vcpus: u32, memory_mib: u64, user_data: &[u8]) -> Option<pb::Resources> {
    Some(pb::Resources {
        vcpus,
        memory_mib,
        user_data: user_data.to_vec(),
    })
}

fn start(id: &str, r: Option<pb::Resources>) -> pb::StartInstanceRequest {
    pb::StartInstanceRequest {
        id: id.into(),
        volumes: None,
        resources: r,
    }
}

async fn stop(c: &mut AgentClient, id: &str) {
    let i = c
        .stop_instance(pb::StopInstanceRequest {
            id: id.into(),
            timeout_ms: 2000,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(i.state(), S::Stopped, "{}", i.reason);
}

type AgentClient = pb::agent_client::AgentClient<tonic::transport::Channel>;

/// The console of `id` from byte `from` on, once it has `selftest done`.
fn boot_console(agent: &Agent, id: &str, from: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = agent.console(id);
        let new = all.get(from..).unwrap_or_default();
        if new.contains("selftest done") {
            return new.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no second boot on the console:\n{new}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What the guest saw: vCPUs (ACPI), usable RAM in MiB (e820) and the
/// user-data disk's first sector hash, if it had one.
fn seen(console: &str) -> (u32, u64, Option<String>) {
    let field = |prefix: &str, key: &str| {
        console
            .lines()
            .filter(|l| l.contains(prefix))
            .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(key)))
            .map(str::to_string)
    };
    let cpus = field("ferro-guest: acpi", "cpus=").expect("acpi line");
    let ram = field("ferro-guest: e820", "ram_mib=").expect("e820 line");
    let hash = field("blk serial=user-data read", "fnv64=");
    (cpus.parse().unwrap(), ram.parse().unwrap(), hash)
}

/// The hash the guest prints for a user-data disk holding `data`.
fn user_data_hash(data: &[u8]) -> String {
    let mut disk = data.to_vec();
    disk.resize(data.len().div_ceil(512) * 512, 0);
    let h = disk.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// The instance's CPU quota as a number of CPUs, from its cgroup.
fn cgroup_cpus(agent: &Agent, id: &str) -> u64 {
    for dir in agent.cgroups().into_iter().filter(|d| d.ends_with(id)) {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
        if let Some(max) = read("cpu.max") {
            let v: Vec<u64> = max.split_whitespace().map(|x| x.parse().unwrap()).collect();
            return v[0] / v[1];
        }
        if let (Some(q), Some(p)) = (read("cpu.cfs_quota_us"), read("cpu.cfs_period_us")) {
            return q.trim().parse::<u64>().unwrap() / p.trim().parse::<u64>().unwrap();
        }
    }
    panic!("no cpu cgroup of {id} in {:?}", agent.cgroups());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resize_a_start_runs_the_vmm_with_the_new_size_and_user_data() {
    let mut agent = Agent::start("resize", "tr01", "");
    let mut c = agent.client().await;
    agent.register_guest(&mut c).await;
    let spec = pb::InstanceSpec {
        user_data: b"first".to_vec(),
        ..guest_spec("vm1")
    };
    launch(&mut c, spec).await;
    let (cpus, ram, hash) = seen(&boot_console(&agent, "vm1", 0));
    assert_eq!(cpus, 1);
    assert!(ram <= 64, "64 MiB guest saw {ram} MiB");
    assert_eq!(hash.as_deref(), Some(user_data_hash(b"first").as_str()));
    assert_eq!(cgroup_cpus(&agent, "vm1"), 1);

    // Running: other values are refused and change nothing.
    let e = c
        .start_instance(start("vm1", resources(2, 128, b"x")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("size or user data"), "{}", e.message());
    assert_eq!(get(&mut c, "vm1").await.spec.unwrap().vcpus, 1);

    stop(&mut c, "vm1").await;
    // Invalid values, and a size the host has no room for (8192 MiB
    // offered): refused, nothing changed.
    let e = c
        .start_instance(start("vm1", resources(0, 128, b"")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let e = c
        .start_instance(start("vm1", resources(2, 9000, b"")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    let i = get(&mut c, "vm1").await;
    assert_eq!(i.state(), S::Stopped);
    let s = i.spec.unwrap();
    assert_eq!(
        (s.vcpus, s.memory_mib, s.user_data),
        (1, 64, b"first".to_vec())
    );

    // Stopped: the start takes 2 vCPUs, 128 MiB and new user data.
    let second = b"#cloud-config\nsecond user data, longer than the first\n".repeat(12);
    let from = agent.console("vm1").len();
    let i = c
        .start_instance(start("vm1", resources(2, 128, &second)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(i.state(), S::Running, "{}", i.reason);
    let s = i.spec.unwrap();
    assert_eq!((s.vcpus, s.memory_mib), (2, 128));
    assert_eq!(s.user_data, second);
    let (cpus, ram, hash) = seen(&boot_console(&agent, "vm1", from));
    assert_eq!(cpus, 2, "the guest's ACPI CPU count");
    assert!((65..=128).contains(&ram), "128 MiB guest saw {ram} MiB");
    assert_eq!(hash.as_deref(), Some(user_data_hash(&second).as_str()));
    assert_eq!(cgroup_cpus(&agent, "vm1"), 2);

    // The spec is stored: an agent restart reads it back.
    stop(&mut c, "vm1").await;
    agent.kill9();
    agent.spawn();
    let mut c = agent.client().await;
    let s = get(&mut c, "vm1").await.spec.unwrap();
    assert_eq!((s.vcpus, s.memory_mib), (2, 128));
    assert_eq!(s.user_data, second);

    // No user data: the disk goes; absent resources: the spec's, unchanged.
    let from = agent.console("vm1").len();
    c.start_instance(start("vm1", resources(2, 128, b"")))
        .await
        .unwrap();
    let (cpus, _, hash) = seen(&boot_console(&agent, "vm1", from));
    assert_eq!((cpus, hash), (2, None));
    let disk = agent.state_dir.join("instances/vm1/disk-user-data.img");
    assert!(!disk.exists(), "{} is left", disk.display());
    stop(&mut c, "vm1").await;
    let from = agent.console("vm1").len();
    c.start_instance(start("vm1", None)).await.unwrap();
    assert_eq!(seen(&boot_console(&agent, "vm1", from)).0, 2);

    c.delete_instance(pb::DeleteInstanceRequest { id: "vm1".into() })
        .await
        .unwrap();
    agent.assert_nothing_left();
}
