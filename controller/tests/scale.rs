//! Scale: 1,000 fake hosts heartbeating over gRPC, 10,000 instances
//! scheduled through RunInstances; no host oversubscribed, spread groups
//! honoured.

mod common;

use std::collections::HashMap;

use common::*;
use ferro_proto::compute::v1 as pb;
use tonic::Code;

const HOSTS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_hosts_ten_thousand_instances() {
    let t = controller(false, 60_000).await;
    let mut c = client(t.addr, &t.admin_key).await;
    c.register_image(pb::RegisterImageRequest {
        name: "guest".into(),
        kernel_path: "/k".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // 1,000 hosts of 16 vCPUs / 16 GiB in two zones, heartbeating twice.
    let agents: Vec<FakeAgent> = (0..HOSTS)
        .map(|i| {
            FakeAgent::new(
                &format!("h{i:04}"),
                if i % 2 == 0 { "az-1" } else { "az-2" },
                16,
                16384,
            )
        })
        .collect();
    let mut tasks = Vec::new();
    for chunk in agents.chunks(HOSTS / 8) {
        let chunk = chunk.to_vec();
        let (addr, key) = (t.addr, t.admin_key.clone());
        tasks.push(tokio::spawn(async move {
            let mut hc = hosts_client(addr).await;
            // Each host joins, then heartbeats with its own credential.
            for a in &chunk {
                a.join(&[addr.to_string()], &key).await;
            }
            for _ in 0..2 {
                for a in &chunk {
                    beat(&mut hc, &a.host_key(), a.heartbeat("http://127.0.0.1:1"))
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let hosts = c
        .describe_hosts(pb::DescribeHostsRequest {
            max_results: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert_eq!(hosts.len(), HOSTS);

    // 10,000 instances need more addresses than the default /20s hold:
    // a /18 more per zone in the default VPC takes over when they are full.
    let default_vpc = c
        .describe_vpcs(pb::DescribeVpcsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vpcs
        .into_iter()
        .find(|v| v.is_default)
        .unwrap();
    for (cidr, az) in [("172.31.64.0/18", "az-1"), ("172.31.128.0/18", "az-2")] {
        c.create_subnet(pb::CreateSubnetRequest {
            vpc_id: default_vpc.vpc_id.clone(),
            cidr_block: cidr.into(),
            availability_zone: az.into(),
            tags: vec![],
        })
        .await
        .unwrap();
    }

    // A spread group: 1,000 members land on 1,000 distinct hosts; one more
    // does not fit.
    c.create_placement_group(pb::CreatePlacementGroupRequest {
        name: "ha".into(),
        strategy: "spread".into(),
        tags: vec![],
    })
    .await
    .unwrap();
    for _ in 0..10 {
        c.run_instances(pb::RunInstancesRequest {
            count: 100,
            instance_type: "f1.nano".into(),
            image_id: "guest".into(),
            placement_group: "ha".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let e = c
        .run_instances(pb::RunInstancesRequest {
            count: 1,
            instance_type: "f1.nano".into(),
            image_id: "guest".into(),
            placement_group: "ha".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);

    // 9,000 more, mixed sizes, until 10,000 in all.
    let types = ["f1.nano", "f1.small", "f1.medium", "f1.large"];
    for n in 0..90 {
        c.run_instances(pb::RunInstancesRequest {
            count: 100,
            instance_type: types[n % types.len()].into(),
            image_id: "guest".into(),
            availability_zone: if n % 3 == 0 {
                "az-2".into()
            } else {
                String::new()
            },
            ..Default::default()
        })
        .await
        .unwrap();
    }

    // Read everything back and check every host's sums.
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .describe_instances(pb::DescribeInstancesRequest {
                max_results: 1000,
                next_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.instances);
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(all.len(), 10_000);
    let addresses: std::collections::HashSet<&str> =
        all.iter().map(|i| i.private_ip_address.as_str()).collect();
    assert_eq!(addresses.len(), 10_000, "one address per instance");
    let mut used: HashMap<&str, (u32, u64)> = HashMap::new();
    let mut spread_hosts = std::collections::HashSet::new();
    for i in &all {
        let u = used.entry(i.host_id.as_str()).or_default();
        u.0 += i.vcpus;
        u.1 += i.memory_mib;
        if i.placement_group == "ha" {
            assert!(
                spread_hosts.insert(i.host_id.clone()),
                "two spread members on {}",
                i.host_id
            );
        }
    }
    for (h, (v, m)) in &used {
        assert!(
            *v <= 16 && *m <= 16384,
            "{h} oversubscribed: {v} vCPUs, {m} MiB"
        );
    }
    assert_eq!(spread_hosts.len(), 1000);
    let hosts = c
        .describe_hosts(pb::DescribeHostsRequest {
            max_results: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .hosts;
    for h in hosts {
        let (v, m) = used.get(h.host_id.as_str()).copied().unwrap_or_default();
        assert_eq!(
            (h.vcpus_allocated, h.memory_allocated_mib),
            (v, m),
            "{}",
            h.host_id
        );
    }
}
