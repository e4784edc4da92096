//! Many instances at once on this 2-core machine.

mod common;

use std::time::Duration;

use common::*;
use ferro_proto::agent::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_twenty_instances_then_nothing_left() {
    let agent = Agent::start("scale", "ts01", "");
    let mut c = agent.client().await;
    agent.register_guest(&mut c).await;
    let mut tasks = vec![];
    for n in 0..20 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut spec = guest_spec(&format!("vm{n:02}"));
            spec.nics = vec![pb::NicSpec::default()];
            spec.disks = vec![pb::DiskSpec {
                id: "data".into(),
                size_bytes: 1 << 20,
            }];
            launch(&mut c, spec).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for n in 0..20 {
        agent.wait_console(
            &format!("vm{n:02}"),
            "ferro-guest: selftest done",
            Duration::from_secs(30),
        );
    }
    assert_eq!(agent.vmm_pids().len(), 20);
    assert_eq!(agent.taps().len(), 20);
    let list = c
        .list_instances(pb::ListInstancesRequest {})
        .await
        .unwrap()
        .into_inner()
        .instances;
    assert_eq!(list.len(), 20);
    assert!(list.iter().all(|i| i.state() == S::Running));
    let console = agent.console("vm07");
    assert!(console.contains("virtio-net mac=0a:"), "{console}");
    assert!(console.contains("virtio-blk serial=data"), "{console}");

    let mut tasks = vec![];
    for n in 0..20 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.delete_instance(pb::DeleteInstanceRequest {
                id: format!("vm{n:02}"),
            })
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let h = c
        .host_info(pb::HostInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (h.instances, h.vcpus_allocated, h.memory_allocated_mib),
        (0, 0, 0)
    );
    agent.assert_nothing_left();
}
