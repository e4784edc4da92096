//! Create, start, stop, reboot and delete round trips against real VMMs,
//! with WatchEvents seeing every transition in order.

mod common;

use std::time::Duration;

use common::*;
use ferro_proto::agent::v1 as pb;
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_round_trip_with_events_in_order() {
    let agent = Agent::start("life", "tl01", "");
    let mut c = agent.client().await;
    agent.register_guest(&mut c).await;
    let mut events = c
        .watch_events(pb::WatchEventsRequest {
            instance_id: "vm1".into(),
        })
        .await
        .unwrap()
        .into_inner();

    let i = launch(&mut c, guest_spec("vm1")).await;
    assert!(i.pid > 0);
    agent.wait_console("vm1", "ferro-guest: hello", Duration::from_secs(10));
    assert_eq!(get(&mut c, "vm1").await.state(), S::Running);

    let req = pb::StopInstanceRequest {
        id: "vm1".into(),
        timeout_ms: 2000,
    };
    let i = c.stop_instance(req).await.unwrap().into_inner();
    assert_eq!(i.state(), S::Stopped, "{}", i.reason);
    assert_eq!(i.pid, 0);
    assert_eq!(i.last_exit.unwrap().code, Some(0));
    assert!(agent.vmm_pids().is_empty());

    let i = c
        .start_instance(pb::StartInstanceRequest {
            id: "vm1".into(),
            volumes: None,
            resources: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(i.state(), S::Running);
    let first_pid = i.pid;
    let req = pb::RebootInstanceRequest {
        id: "vm1".into(),
        timeout_ms: 2000,
    };
    let i = c.reboot_instance(req).await.unwrap().into_inner();
    assert_eq!(i.state(), S::Running, "{}", i.reason);
    assert_ne!(i.pid, first_pid);
    assert_eq!(agent.vmm_pids(), vec![i.pid]);

    let out = c
        .get_console_output(pb::GetConsoleOutputRequest {
            id: "vm1".into(),
            max_bytes: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(String::from_utf8_lossy(&out.data).contains("ferro-guest: hello"));

    c.delete_instance(pb::DeleteInstanceRequest { id: "vm1".into() })
        .await
        .unwrap();
    let err = c
        .get_instance(pb::GetInstanceRequest { id: "vm1".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let want = [
        (S::Unspecified, S::Created),
        (S::Created, S::Starting),
        (S::Starting, S::Running),
        (S::Running, S::Stopping),
        (S::Stopping, S::Stopped),
        (S::Stopped, S::Starting),
        (S::Starting, S::Running),
        (S::Running, S::Rebooting),
        (S::Rebooting, S::Starting),
        (S::Starting, S::Running),
        (S::Running, S::Deleting),
        (S::Deleting, S::Deleted),
    ];
    let mut seen = vec![];
    let mut last_seq = 0;
    while seen.len() < want.len() {
        let e = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .unwrap_or_else(|_| panic!("missing events after {seen:?}"))
            .unwrap()
            .unwrap();
        assert!(e.seq > last_seq);
        last_seq = e.seq;
        seen.push((e.from(), e.to()));
    }
    assert_eq!(seen, want);
    agent.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_graceful_agent_shutdown_leaves_instances_running() {
    let mut agent = Agent::start("term", "tl02", "");
    let mut c = agent.client().await;
    agent.register_guest(&mut c).await;
    let i = launch(&mut c, guest_spec("keep")).await;
    assert!(agent.terminate().success());
    assert_eq!(
        agent.vmm_pids(),
        vec![i.pid],
        "the VMM must survive SIGTERM of the agent"
    );
    agent.spawn();
    let mut c = agent.client().await;
    let j = get(&mut c, "keep").await;
    assert_eq!((j.state(), j.pid), (S::Running, i.pid));
    c.delete_instance(pb::DeleteInstanceRequest { id: "keep".into() })
        .await
        .unwrap();
    agent.assert_nothing_left();
}
