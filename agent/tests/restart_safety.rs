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
