//! Restart safety: the agent dies, VMMs die, and nothing is lost or doubled.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferro_proto::agent::v1 as pb;
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_kill9_agent_keeps_five_instances() {
    let mut agent = Agent::start("kill9", "tr01", "");
    let mut c = agent.client().await;
    agent.register_guest(&mut c).await;
    let mut pids = vec![];
    for n in 0..5 {
        pids.push(launch(&mut c, guest_spec(&format!("vm{n}"))).await.pid);
    }
    pids.sort();
    agent.kill9();
    let mut found = agent.vmm_pids();
    found.sort();
    assert_eq!(found, pids, "every VMM survives kill -9 of the agent");

    agent.spawn();
    let mut c = agent.client().await;
    let list = c
        .list_instances(pb::ListInstancesRequest {})
        .await
        .unwrap()
        .into_inner()
        .instances;
    let mut listed: Vec<_> = list
        .iter()
        .map(|i| (i.spec.as_ref().unwrap().id.clone(), i.state(), i.pid))
        .collect();
    listed.sort();
    assert_eq!(listed.len(), 5, "{listed:?}");
    for (id, state, pid) in &listed {
        assert_eq!(*state, S::Running, "{id}");
        assert!(
            pids.contains(pid),
            "{id} has pid {pid}, not one of {pids:?}"
        );
    }
    // Nothing was started twice, and the agent still watches them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut again = agent.vmm_pids();
    again.sort();
    assert_eq!(again, pids, "no VMM started twice");
    let h = c
        .host_info(pb::HostInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (h.instances, h.vcpus_allocated, h.memory_allocated_mib),
        (5, 5, 320)
    );

    // A re-attached VMM that dies is still noticed, with an unknown status.
    let mut events = c
        .watch_events(pb::WatchEventsRequest {
            instance_id: "vm0".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let vm0 = listed[0].2;
    // SAFETY: kill with a pid of our test's VMM and a valid signal.
    unsafe { libc::kill(vm0 as i32, libc::SIGKILL) };
    let e = tokio::time::timeout(Duration::from_secs(1), events.next())
        .await
        .expect("death noticed within 1 s")
        .unwrap()
        .unwrap();
    assert_eq!(e.to(), S::Failed);
    assert!(!e.exit.unwrap().known);

    for n in 0..5 {
        c.delete_instance(pb::DeleteInstanceRequest {
            id: format!("vm{n}"),
        })
        .await
        .unwrap();
    }
    agent.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_killed_vmm_fails_within_1s_then_restarts() {
    let agent = Agent::start(
        "vmmkill",
        "tr02",
        "[restart]\npolicy = \"on-failure\"\nbackoff_base_ms = 300",
    );
    let mut c = agent.client().await;
    agent.register_guest(&mut c).await;
    let mut spec = guest_spec("crash");
    spec.restart_policy = pb::RestartPolicy::OnFailure as i32;
    let i = launch(&mut c, spec).await;
    agent.wait_console(
        "crash",
        "ferro-guest: selftest done",
        Duration::from_secs(10),
    );
    let mut events = c
        .watch_events(pb::WatchEventsRequest {
            instance_id: "crash".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let killed_at = Instant::now();
    // SAFETY: kill with the pid of our test's VMM and a valid signal.
    unsafe { libc::kill(i.pid as i32, libc::SIGKILL) };
    let e = tokio::time::timeout(Duration::from_secs(1), events.next())
        .await
        .expect("failure reported within 1 s")
        .unwrap()
        .unwrap();
    assert!(killed_at.elapsed() < Duration::from_secs(1));
    assert_eq!((e.from(), e.to()), (S::Running, S::Failed));
    let exit = e.exit.unwrap();
    assert_eq!((exit.known, exit.signal), (true, Some(9)));
    assert!(e.reason.contains("killed by signal 9"), "{}", e.reason);
    assert!(
        e.reason.contains("ferro-guest: selftest done"),
        "last console lines missing: {}",
        e.reason
    );
    let f = get(&mut c, "crash").await;
    assert_eq!(f.state(), S::Failed);
    assert!(f.next_restart_unix_ms > 0);

    // The policy restarts it after the back-off.
    let mut seen = vec![];
    while seen.last() != Some(&S::Running) {
        let e = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("restart")
            .unwrap()
            .unwrap();
        seen.push(e.to());
    }
    assert_eq!(seen, vec![S::Starting, S::Running]);
    let r = get(&mut c, "crash").await;
    assert_eq!(r.restart_count, 1);
    assert_ne!(r.pid, i.pid);
    assert_eq!(agent.vmm_pids(), vec![r.pid]);

    // With the `never` policy it stays failed.
    let mut spec = guest_spec("once");
    spec.restart_policy = pb::RestartPolicy::Never as i32;
    let i = launch(&mut c, spec).await;
    // SAFETY: as above.
    unsafe { libc::kill(i.pid as i32, libc::SIGKILL) };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let f = get(&mut c, "once").await;
    assert_eq!(f.state(), S::Failed);
    assert!(!f.want_running);

    for id in ["crash", "once"] {
        c.delete_instance(pb::DeleteInstanceRequest { id: id.into() })
            .await
            .unwrap();
    }
    agent.assert_nothing_left();
}

/// Stop the agent (SIGTERM leaves VMMs running), let `edit` change the
/// instance's files, restart it, and return what it lists for `id`.
async fn restart_after(
    agent: &mut Agent,
    edit: impl FnOnce(&std::path::Path),
) -> Vec<pb::Instance> {
    assert!(agent.terminate().success());
    edit(&agent.state_dir.join("instances"));
    agent.spawn();
    let mut c = agent.client().await;
    c.list_instances(pb::ListInstancesRequest {})
        .await
        .unwrap()
        .into_inner()
        .instances
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Files an older agent wrote (no `version`, no `restart_policy`, no
/// `cmdline_extra`) load; a field a newer agent added survives this agent
/// rewriting the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_and_newer_state_files_load_and_keep_what_they_hold() {
    let mut agent = Agent::start("formats", "tr03", "");
    let mut c = agent.client().await;
    agent.register_guest(&mut c).await;
    let i = launch(&mut c, guest_spec("old")).await;
    let listed = restart_after(&mut agent, |dir| {
        let spec_path = dir.join("old/spec.json");
        let mut spec = json(&spec_path);
        let m = spec.as_object_mut().unwrap();
        for field in ["version", "restart_policy", "cmdline_extra"] {
            assert!(m.remove(field).is_some(), "spec has no {field}");
        }
        std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
        let state_path = dir.join("old/state.json");
        let mut state = json(&state_path);
        state["from_a_newer_agent"] = serde_json::json!({"kept": [1, 2, 3]});
        std::fs::write(&state_path, serde_json::to_vec(&state).unwrap()).unwrap();
    })
    .await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].state(), S::Running);
    assert_eq!(listed[0].pid, i.pid, "the same VMM, re-attached");
    // A change makes the agent rewrite state.json: the unknown field stays.
    let mut c = agent.client().await;
    c.stop_instance(pb::StopInstanceRequest {
        id: "old".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let state = json(&agent.state_dir.join("instances/old/state.json"));
    assert_eq!(
        state["from_a_newer_agent"]["kept"],
        serde_json::json!([1, 2, 3])
    );
    assert_eq!(state["phase"], "stopped", "{state}");
    c.delete_instance(pb::DeleteInstanceRequest { id: "old".into() })
        .await
        .unwrap();
    agent.assert_nothing_left();
}

/// A state.json that cannot be parsed is kept aside and the running VMM is
/// re-attached, not killed; a spec.json that cannot be parsed quarantines
/// the instance's directory (disk included), leaves its VMM running and
/// reports it as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_files_are_quarantined_never_deleted() {
    let mut agent = Agent::start("corrupt", "tr04", "");
    let mut c = agent.client().await;
    agent.register_guest(&mut c).await;
    let a = launch(&mut c, guest_spec("badstate")).await;
    let mut spec = guest_spec("badspec");
    spec.disks = vec![pb::DiskSpec {
        id: "data".into(),
        size_bytes: 1 << 20,
    }];
    let b = launch(&mut c, spec).await;
    let listed = restart_after(&mut agent, |dir| {
        std::fs::write(dir.join("badstate/state.json"), b"{ torn").unwrap();
        std::fs::write(dir.join("badspec/spec.json"), b"\x00\x01 not json").unwrap();
    })
    .await;
    let find = |id: &str| {
        listed
            .iter()
            .find(|i| i.spec.as_ref().unwrap().id == id)
            .unwrap_or_else(|| panic!("{id} not listed: {listed:?}"))
            .clone()
    };
    let s = find("badstate");
    assert_eq!(s.state(), S::Running, "{s:?}");
    assert_eq!(s.pid, a.pid, "re-attached to the live VMM");
    assert!(
        s.reason.contains("state.json could not be read"),
        "{}",
        s.reason
    );
    let kept: Vec<_> = std::fs::read_dir(agent.state_dir.join("instances/badstate"))
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "the unreadable state.json is kept aside");
    assert_eq!(std::fs::read(kept[0].path()).unwrap(), b"{ torn");

    let q = find("badspec");
    assert_eq!(q.state(), S::Failed);
    assert!(q.reason.contains("quarantined"), "{}", q.reason);
    assert!(
        agent.vmm_pids().contains(&b.pid),
        "the quarantined instance's VMM was killed"
    );
    let qdir: Vec<_> = std::fs::read_dir(agent.state_dir.join("quarantine"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(qdir.len(), 1, "{qdir:?}");
    assert!(qdir[0].join("spec.json").exists() && qdir[0].join("QUARANTINED").exists());
    assert!(
        std::fs::read_dir(&qdir[0])
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("disk-")),
        "the disk moved with it"
    );

    // Clean up by hand what the agent must not touch.
    // SAFETY: kill with the pid of this test's VMM and a valid signal.
    unsafe { libc::kill(b.pid as i32, libc::SIGKILL) };
    let mut c = agent.client().await;
    c.delete_instance(pb::DeleteInstanceRequest {
        id: "badstate".into(),
    })
    .await
    .unwrap();
    let _ = std::fs::remove_dir_all(agent.state_dir.join("quarantine"));
}
