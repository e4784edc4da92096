//! Until netd exists, the agent attaches every instance TAP to the plain
//! host bridge named in its config, and detaches it on delete.

mod common;

use std::time::Duration;

use common::*;
use ferro_proto::agent::v1 as pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_taps_are_attached_and_removed() {
    let bridge = format!("fbr{}", std::process::id() % 100_000);
    let agent = Agent::start("bridge", "tb01", &format!("bridge = \"{bridge}\""));
    let mut c = agent.client().await;
    agent.register_guest(&mut c).await;
    let mut spec = guest_spec("br1");
    spec.nics = vec![pb::NicSpec::default(), pb::NicSpec::default()];
    launch(&mut c, spec).await;
    agent.wait_console("br1", "ferro-guest: virtio-net", Duration::from_secs(10));

    let taps = agent.taps();
    assert_eq!(taps.len(), 2, "one TAP per NIC: {taps:?}");
    for tap in &taps {
        let master = std::fs::read_link(format!("/sys/class/net/{tap}/master"))
            .unwrap_or_else(|e| panic!("TAP {tap} is not on a bridge: {e}"));
        assert_eq!(
            master.file_name().unwrap().to_string_lossy(),
            bridge,
            "TAP {tap} is on the wrong bridge"
        );
    }

    c.delete_instance(pb::DeleteInstanceRequest { id: "br1".into() })
        .await
        .expect("DeleteInstance");
    let brif = std::fs::read_dir(format!("/sys/class/net/{bridge}/brif"))
        .expect("the bridge stays")
        .count();
    assert_eq!(brif, 0, "TAPs left on the bridge");
    agent.assert_nothing_left();
    let _ = ferro_testkit::tool("ip")
        .args(["link", "del", &bridge])
        .output();
}
