//! The compute API in-process over `MemReplicator`, with fake agents:
//! authentication, errors, idempotency, pagination and the reconcile loop.

mod common;

use common::*;
use ferro_proto::compute::v1 as pb;
use tonic::Code;

/// Waits until a host has registered.
async fn wait_for_a_host(c: &Client) {
    eventually("the host to register", || {
        let mut c = c.clone();
        async move {
            !c.describe_hosts(pb::DescribeHostsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .hosts
                .is_empty()
        }
    })
    .await;
}

async fn describe(c: &mut Client, ids: Vec<String>) -> Vec<pb::Instance> {
    c.describe_instances(pb::DescribeInstancesRequest {
        instance_ids: ids,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .instances
}

#[tokio::test]
async fn calls_without_a_valid_key_are_unauthenticated() {
    let t = controller(false, 10_000).await;
    let mut bad = client(t.addr, "fk_nope").await;
    let e = bad
        .describe_instance_types(pb::DescribeInstanceTypesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut raw = ferro_proto::compute::v1::compute_client::ComputeClient::connect(format!(
        "http://{}",
        t.addr
    ))
    .await
    .unwrap();
    let e = raw
        .describe_instance_types(pb::DescribeInstanceTypesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut ok = client(t.addr, &t.admin_key).await;
    let types = ok
        .describe_instance_types(pb::DescribeInstanceTypesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .instance_types;
    assert!(types.iter().any(|t| t.name == "f1.small"));
}

#[tokio::test]
async fn non_admin_keys_cannot_manage_keys() {
    let t = controller(false, 10_000).await;
    let mut admin = client(t.addr, &t.admin_key).await;
    let created = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "dev".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut dev = client(t.addr, &created.secret).await;
    dev.describe_images(pb::DescribeImagesRequest::default())
        .await
        .unwrap();
    let e = dev
        .describe_api_keys(pb::DescribeApiKeysRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "dev".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
}

/// Only a host's own credential speaks for it: user and admin keys cannot
/// heartbeat (register a host, move one), a stolen host key cannot speak
/// for another host, a host key reaches nothing else, a revoked one stops.
#[tokio::test]
async fn only_a_hosts_own_credential_speaks_for_it() {
    let t = controller(false, 10_000).await;
    let ctl = [t.addr.to_string()];
    let mut admin = client(t.addr, &t.admin_key).await;
    let user = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "alice".into(),
            role: "user".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(user.key.as_ref().unwrap().role, "user");
    let user = user.secret;
    let h1 = FakeAgent::new("h1", "az-1", 8, 8192);
    let k1 = h1.join(&ctl, &t.admin_key).await;
    let mut hc = hosts_client(t.addr).await;
    beat(&mut hc, &k1, h1.heartbeat("https://10.0.0.1:7420"))
        .await
        .unwrap();
    let h2 = FakeAgent::new("h2", "az-1", 8, 8192);
    for key in [&user, &t.admin_key] {
        // Move h1 to an attacker's address, register a new host.
        for hb in [
            h1.heartbeat("https://6.6.6.6:7420"),
            h2.heartbeat("https://6.6.6.6:1"),
        ] {
            let e = beat(&mut hc, key, hb).await.unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        }
    }
    // h1's key, stolen, cannot speak for h2.
    let e = beat(&mut hc, &k1, h2.heartbeat("https://6.6.6.6:1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("not host \"h2\"'s"), "{}", e.message());
    // No key at all.
    let e = hc
        .heartbeat(h1.heartbeat("https://6.6.6.6:1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // Nothing changed: h1 alone, at its own address.
    let hosts = admin
        .describe_hosts(pb::DescribeHostsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert_eq!(hosts.len(), 1, "{hosts:?}");
    assert_eq!(
        (hosts[0].host_id.as_str(), hosts[0].address.as_str()),
        ("h1", "https://10.0.0.1:7420")
    );
    // A host key reaches nothing of the compute API.
    let mut as_host = client(t.addr, &k1).await;
    let e = as_host
        .describe_instances(pb::DescribeInstancesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // A user key cannot make join tokens, revoke hosts, or make host keys.
    let mut as_user = client(t.addr, &user).await;
    let e = as_user
        .create_join_token(pb::CreateJoinTokenRequest {
            host_id: "h3".into(),
            ttl_seconds: 60,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = as_user
        .revoke_host(pb::RevokeHostRequest {
            host_id: "h1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "fake-host".into(),
            role: "host".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // A join token works once, for its host, and a guess works never.
    let token = admin
        .create_join_token(pb::CreateJoinTokenRequest {
            host_id: "h3".into(),
            ttl_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let pk = ferro_pki::generate_key().unwrap().public_key;
    let join = |host: &str, token: &str| pb::JoinRequest {
        host_id: host.into(),
        token: token.into(),
        public_key: pk.clone(),
    };
    for (host, tok) in [("h4", token.as_str()), ("h3", "fj_guess")] {
        let e = hc.join(join(host, tok)).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    }
    let e = hc
        .join(pb::JoinRequest {
            public_key: vec![4; 10],
            ..join("h3", &token)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let j = hc.join(join("h3", &token)).await.unwrap().into_inner();
    assert!(j.certificate_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    let e = hc.join(join("h3", &token)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "a token works once");
    // Revoked: h1's key stops working; a new join brings it back.
    admin
        .revoke_host(pb::RevokeHostRequest {
            host_id: "h1".into(),
        })
        .await
        .unwrap();
    let e = beat(&mut hc, &k1, h1.heartbeat("https://10.0.0.1:7420"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let k1b = h1.join(&ctl, &t.admin_key).await;
    beat(&mut hc, &k1b, h1.heartbeat("https://10.0.0.1:7420"))
        .await
        .unwrap();
}

#[tokio::test]
async fn errors_carry_codes_and_name_the_field() {
    let t = controller(false, 10_000).await;
    let mut c = client(t.addr, &t.admin_key).await;
    register(&mut c).await;
    let cases = [
        (
            pb::RunInstancesRequest {
                count: 0,
                ..run_req(1)
            },
            Code::InvalidArgument,
            "count",
        ),
        (
            pb::RunInstancesRequest {
                instance_type: "x".into(),
                ..run_req(1)
            },
            Code::NotFound,
            "instance_type",
        ),
        (
            pb::RunInstancesRequest {
                image_id: "x".into(),
                ..run_req(1)
            },
            Code::NotFound,
            "image_id",
        ),
        // No host has heartbeated: no capacity, said as such.
        (
            run_req(1),
            Code::ResourceExhausted,
            "insufficient capacity: no host has room for instance 1 of 1",
        ),
    ];
    for (req, code, field) in cases {
        let e = c.run_instances(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().starts_with(field), "{}", e.message());
    }
    let e = c
        .register_image(pb::RegisterImageRequest {
            name: "guest".into(),
            kernel_path: "/k".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = c
        .terminate_instances(pb::TerminateInstancesRequest {
            instance_ids: vec!["i-0000000000000000".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().starts_with("instance_ids"));
    let e = c
        .import_key_pair(pb::ImportKeyPairRequest {
            key_name: "k".into(),
            public_key: "not a key".into(),
            tags: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("public_key"));
}

#[tokio::test]
async fn key_pairs_round_trip() {
    let t = controller(false, 10_000).await;
    let mut c = client(t.addr, &t.admin_key).await;
    let made = c
        .create_key_pair(pb::CreateKeyPairRequest {
            key_name: "mine".into(),
            tags: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        made.private_key
            .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"),
        "{}",
        made.private_key
    );
    let kp = made.key_pair.unwrap();
    assert!(kp.fingerprint.starts_with("SHA256:"));
    assert!(
        kp.public_key.starts_with("ssh-ed25519 "),
        "{}",
        kp.public_key
    );
    let imported = c
        .import_key_pair(pb::ImportKeyPairRequest {
            key_name: "laptop".into(),
            public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGk2zGHkV1c3g2c5G0uYkT7b5x0b1m7zv4W6xrJtq1Yc me".into(),
            tags: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(imported.fingerprint, kp.fingerprint);
    let all = c
        .describe_key_pairs(pb::DescribeKeyPairsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .key_pairs;
    assert_eq!(all.len(), 2);
    c.delete_key_pair(pb::DeleteKeyPairRequest {
        key_name: "mine".into(),
    })
    .await
    .unwrap();
    let e = c
        .delete_key_pair(pb::DeleteKeyPairRequest {
            key_name: "mine".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

#[tokio::test]
async fn run_is_idempotent_with_a_client_token_and_describe_pages() {
    let t = controller(false, 10_000).await;
    let mut c = client(t.addr, &t.admin_key).await;
    register(&mut c).await;
    let agent = FakeAgent::new("h1", "az-1", 64, 65536);
    let hk = agent.join(&[t.addr.to_string()], &t.admin_key).await;
    let mut hc = hosts_client(t.addr).await;
    beat(&mut hc, &hk, agent.heartbeat("http://127.0.0.1:1"))
        .await
        .unwrap();
    let req = pb::RunInstancesRequest {
        client_token: "tok-1".into(),
        tags: vec![pb::Tag {
            key: "team".into(),
            value: "a".into(),
        }],
        ..run_req(5)
    };
    let a = c.run_instances(req.clone()).await.unwrap().into_inner();
    let b = c.run_instances(req.clone()).await.unwrap().into_inner();
    assert_eq!(a.reservation_id, b.reservation_id);
    let ids = |r: &pb::RunInstancesResponse| -> Vec<String> {
        r.instances.iter().map(|i| i.instance_id.clone()).collect()
    };
    assert_eq!(ids(&a), ids(&b));
    let e = c
        .run_instances(pb::RunInstancesRequest { count: 4, ..req })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    c.run_instances(run_req(3)).await.unwrap();
    // 8 instances, pages of 3.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .describe_instances(pb::DescribeInstancesRequest {
                max_results: 3,
                next_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.instances.len() <= 3);
        seen.extend(page.instances.into_iter().map(|i| i.instance_id));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen.len(), 8);
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "ordered by id, no repeats"
    );
    let tagged = c
        .describe_instances(pb::DescribeInstancesRequest {
            tags: vec![pb::TagFilter {
                key: "team".into(),
                value: "a".into(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .instances;
    assert_eq!(tagged.len(), 5);
    let pending = c
        .describe_instances(pb::DescribeInstancesRequest {
            states: vec![pb::InstanceState::Pending as i32],
            availability_zones: vec!["az-1".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .instances;
    assert_eq!(pending.len(), 8);
}

#[tokio::test]
async fn reconciler_drives_the_agent_through_the_lifecycle() {
    let t = controller(true, 10_000).await;
    let mut c = client(t.addr, &t.admin_key).await;
    register(&mut c).await;
    let agent = FakeAgent::new("h1", "az-1", 8, 8192);
    agent.join(&[t.addr.to_string()], &t.admin_key).await;
    let url = agent.serve().await;
    heartbeat_forever(t.addr, agent.clone(), url);
    wait_for_a_host(&c).await;
    let r = c.run_instances(run_req(2)).await.unwrap().into_inner();
    let ids: Vec<String> = r.instances.iter().map(|i| i.instance_id.clone()).collect();
    let (c0, ids0) = (c.clone(), ids.clone());
    let state_is = move |want: pb::InstanceState| {
        let (c, ids) = (c0.clone(), ids0.clone());
        move || {
            let (mut c, ids) = (c.clone(), ids.clone());
            async move {
                describe(&mut c, ids)
                    .await
                    .iter()
                    .all(|i| i.state == want as i32)
            }
        }
    };
    eventually("running", state_is(pb::InstanceState::Running)).await;
    assert_eq!(agent.state.lock().unwrap().instances.len(), 2);
    c.stop_instances(pb::StopInstancesRequest {
        instance_ids: ids.clone(),
        force: false,
    })
    .await
    .unwrap();
    eventually("stopped", state_is(pb::InstanceState::Stopped)).await;
    c.start_instances(pb::StartInstancesRequest {
        instance_ids: ids.clone(),
    })
    .await
    .unwrap();
    eventually("running again", state_is(pb::InstanceState::Running)).await;
    c.reboot_instances(pb::RebootInstancesRequest {
        instance_ids: ids[..1].to_vec(),
    })
    .await
    .unwrap();
    eventually("rebooted", || {
        let agent = agent.clone();
        let id = ids[0].clone();
        async move {
            agent
                .state
                .lock()
                .unwrap()
                .calls
                .contains(&format!("reboot {id}"))
        }
    })
    .await;
    let out = c
        .get_console_output(pb::GetConsoleOutputRequest {
            instance_id: ids[0].clone(),
            max_bytes: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(String::from_utf8_lossy(&out.output).contains(&ids[0]));
    c.terminate_instances(pb::TerminateInstancesRequest {
        instance_ids: ids.clone(),
    })
    .await
    .unwrap();
    eventually("terminated", state_is(pb::InstanceState::Terminated)).await;
    assert!(
        agent.state.lock().unwrap().instances.is_empty(),
        "nothing left on the host"
    );
    let hosts = c
        .describe_hosts(pb::DescribeHostsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert_eq!(hosts[0].vcpus_allocated, 0);
    // Each instance was created exactly once.
    let calls = agent.state.lock().unwrap().calls.clone();
    for id in &ids {
        assert_eq!(
            calls
                .iter()
                .filter(|c| **c == format!("create {id}"))
                .count(),
            1,
            "{calls:?}"
        );
    }
}

#[tokio::test]
async fn silent_host_goes_unreachable_and_its_instance_never_moves() {
    let t = controller(true, 300).await;
    let mut c = client(t.addr, &t.admin_key).await;
    register(&mut c).await;
    let a = FakeAgent::new("h1", "az-1", 8, 8192);
    let b = FakeAgent::new("h2", "az-1", 8, 8192);
    let ctl = [t.addr.to_string()];
    let ka = a.join(&ctl, &t.admin_key).await;
    b.join(&ctl, &t.admin_key).await;
    let (ua, ub) = (a.serve().await, b.serve().await);
    let mut hc = hosts_client(t.addr).await;
    // Only h1 heartbeats at first, so the instance lands there.
    beat(&mut hc, &ka, a.heartbeat(&ua)).await.unwrap();
    let r = c.run_instances(run_req(1)).await.unwrap().into_inner();
    let id = r.instances[0].instance_id.clone();
    assert_eq!(r.instances[0].host_id, "h1");
    heartbeat_forever(t.addr, b.clone(), ub);
    // h1 stays silent: unreachable, the instance unknown.
    eventually("unknown", || {
        let (mut c, id) = (c.clone(), id.clone());
        async move { describe(&mut c, vec![id]).await[0].state == pb::InstanceState::Unknown as i32 }
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        b.state.lock().unwrap().instances.is_empty(),
        "never started elsewhere"
    );
    // h1 comes back: the instance is created there, once.
    heartbeat_forever(t.addr, a.clone(), ua);
    eventually("running on h1", || {
        let (mut c, id) = (c.clone(), id.clone());
        async move {
            let i = &describe(&mut c, vec![id]).await[0];
            i.state == pb::InstanceState::Running as i32 && i.host_id == "h1"
        }
    })
    .await;
    assert!(b.state.lock().unwrap().instances.is_empty());
}

#[tokio::test]
async fn terminated_instances_are_purged_after_the_retention_time() {
    let t = controller_with(
        true,
        ferro_controller::controller::Settings {
            heartbeat_timeout_ms: 10_000,
            heartbeat_interval_ms: 100,
            terminated_retention_ms: 300,
            ..Default::default()
        },
    )
    .await;
    let mut c = client(t.addr, &t.admin_key).await;
    register(&mut c).await;
    let agent = FakeAgent::new("h1", "az-1", 8, 8192);
    agent.join(&[t.addr.to_string()], &t.admin_key).await;
    let url = agent.serve().await;
    heartbeat_forever(t.addr, agent.clone(), url);
    wait_for_a_host(&c).await;
    let mut req = run_req(1);
    req.client_token = "purge-me".into();
    let first = c.run_instances(req.clone()).await.unwrap().into_inner();
    let id = first.instances[0].instance_id.clone();
    c.terminate_instances(pb::TerminateInstancesRequest {
        instance_ids: vec![id.clone()],
    })
    .await
    .unwrap();
    // Visible as terminated first, then forgotten.
    eventually("terminated", || {
        let (mut c, id) = (c.clone(), id.clone());
        async move {
            describe(&mut c, vec![id])
                .await
                .iter()
                .all(|i| i.state == pb::InstanceState::Terminated as i32)
        }
    })
    .await;
    eventually("purged", || {
        let (mut c, id) = (c.clone(), id.clone());
        async move {
            c.describe_instances(pb::DescribeInstancesRequest {
                instance_ids: vec![id],
                ..Default::default()
            })
            .await
            .is_err_and(|e| e.code() == Code::NotFound)
        }
    })
    .await;
    // The token went with it: the same token now launches anew.
    let again = c.run_instances(req).await.unwrap().into_inner();
    assert_ne!(again.instances[0].instance_id, id);
}

/// `ferro api-keys` with the real binary: an admin makes a user key; the
/// user key works for the compute API and is refused key management.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ferro_api_keys_make_user_keys() {
    let t = controller(false, 10_000).await;
    let ferro = ferro_testkit::workspace_bin("ferro-cli", "ferro");
    let endpoint = format!("http://{}", t.addr);
    let run = move |key: String, args: Vec<&'static str>| {
        let (ferro, endpoint) = (ferro.clone(), endpoint.clone());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(ferro)
                .args(["--endpoint", &endpoint, "--api-key", &key, "-o", "json"])
                .args(args)
                .env_clear()
                .env("HOME", "/nonexistent")
                .output()
                .unwrap()
        })
    };
    let out = run(t.admin_key.clone(), vec!["api-keys", "create", "alice"])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let k: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(k["role"], "user");
    let secret = k["secret"].as_str().unwrap().to_string();
    let out = run(secret.clone(), vec!["instances", "list"])
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(secret, vec!["api-keys", "list"]).await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("an admin API key is required"), "{err}");
    let out = run(t.admin_key.clone(), vec!["api-keys", "list"])
        .await
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let roles: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["role"].as_str().unwrap())
        .collect();
    assert!(
        roles.contains(&"admin") && roles.contains(&"user"),
        "{list}"
    );
}

/// VPCs and subnets: the default VPC (a /20 per zone), a new VPC and its
/// subnets, overlaps and blocks outside the VPC refused naming the field,
/// a VPC with subnets not deleted (DependencyViolation), filters.
#[tokio::test]
async fn vpcs_and_subnets_as_ec2_has_them() {
    let t = controller(false, 10_000).await;
    let mut c = client(t.addr, &t.admin_key).await;
    let vpcs = c
        .describe_vpcs(pb::DescribeVpcsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vpcs;
    assert_eq!(vpcs.len(), 1);
    assert!(
        vpcs[0].is_default && vpcs[0].cidr_block == "172.31.0.0/16",
        "{vpcs:?}"
    );
    let default = c
        .describe_subnets(pb::DescribeSubnetsRequest {
            vpc_ids: vec![vpcs[0].vpc_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .subnets;
    let mut zones: Vec<(&str, &str)> = default
        .iter()
        .map(|s| (s.availability_zone.as_str(), s.cidr_block.as_str()))
        .collect();
    zones.sort();
    assert_eq!(
        zones,
        vec![("az-1", "172.31.0.0/20"), ("az-2", "172.31.16.0/20")]
    );
    assert_eq!(default[0].available_addresses, 4096 - 5);

    let vpc = c
        .create_vpc(pb::CreateVpcRequest {
            cidr_block: "10.0.0.0/16".into(),
            tags: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let sub = |cidr: &str, az: &str| pb::CreateSubnetRequest {
        vpc_id: vpc.vpc_id.clone(),
        cidr_block: cidr.into(),
        availability_zone: az.into(),
        tags: vec![],
    };
    let a = c
        .create_subnet(sub("10.0.1.0/24", "az-1"))
        .await
        .unwrap()
        .into_inner();
    for (cidr, az, want) in [
        ("10.0.1.0/25", "az-1", "overlaps subnet"),
        ("10.1.0.0/24", "az-1", "not inside the VPC"),
        ("10.0.2.0/30", "az-1", "/16 to /28"),
        ("10.0.2.1/24", "az-1", "not a network address"),
    ] {
        let e = c.create_subnet(sub(cidr, az)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{cidr}: {}", e.message());
        assert!(
            e.message().contains(want) && e.message().contains("cidr_block"),
            "{}",
            e.message()
        );
    }
    let e = c
        .create_subnet(sub("10.0.2.0/24", "az-9"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .delete_vpc(pb::DeleteVpcRequest {
            vpc_id: vpc.vpc_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("DependencyViolation"),
        "{}",
        e.message()
    );
    let only_az1 = c
        .describe_subnets(pb::DescribeSubnetsRequest {
            availability_zones: vec!["az-1".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .subnets;
    assert_eq!(only_az1.len(), 2, "{only_az1:?}");
    c.delete_subnet(pb::DeleteSubnetRequest {
        subnet_id: a.subnet_id,
    })
    .await
    .unwrap();
    c.delete_vpc(pb::DeleteVpcRequest { vpc_id: vpc.vpc_id })
        .await
        .unwrap();
}

/// RunInstances gives each instance a primary interface: the default
/// subnet of its zone, or the subnet asked for (which pins the zone) and
/// the address asked for; describe shows them.
#[tokio::test]
async fn instances_get_a_private_address_in_their_subnet() {
    let t = controller(false, 10_000).await;
    let mut c = client(t.addr, &t.admin_key).await;
    register(&mut c).await;
    let agent = FakeAgent::new("h1", "az-1", 64, 65536);
    let hk = agent.join(&[t.addr.to_string()], &t.admin_key).await;
    let mut hc = hosts_client(t.addr).await;
    beat(&mut hc, &hk, agent.heartbeat("https://127.0.0.1:1"))
        .await
        .unwrap();
    let i = c
        .run_instances(run_req(1))
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    assert!(i.private_ip_address.starts_with("172.31.0."), "{i:?}");
    assert!(
        i.mac_address.starts_with("02:fc:") && !i.vpc_id.is_empty(),
        "{i:?}"
    );
    let vpc = c
        .create_vpc(pb::CreateVpcRequest {
            cidr_block: "10.9.0.0/16".into(),
            tags: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let sub = c
        .create_subnet(pb::CreateSubnetRequest {
            vpc_id: vpc.vpc_id.clone(),
            cidr_block: "10.9.1.0/24".into(),
            availability_zone: "az-1".into(),
            tags: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let req = pb::RunInstancesRequest {
        subnet_id: sub.subnet_id.clone(),
        private_ip_address: "10.9.1.77".into(),
        ..run_req(1)
    };
    let j = c
        .run_instances(req.clone())
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    assert_eq!(
        (
            j.private_ip_address.as_str(),
            j.subnet_id.as_str(),
            j.vpc_id.as_str()
        ),
        ("10.9.1.77", sub.subnet_id.as_str(), vpc.vpc_id.as_str())
    );
    let e = c
        .run_instances(pb::RunInstancesRequest {
            client_token: "another".into(),
            ..req
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    assert!(
        e.message().contains("10.9.1.77 is in use"),
        "{}",
        e.message()
    );
}

fn tcp_rule(port: u32, cidr: &str, group: &str) -> pb::SecurityGroupRule {
    pb::SecurityGroupRule {
        protocol: "tcp".into(),
        from_port: port,
        to_port: port,
        cidr: cidr.into(),
        group_id: group.into(),
    }
}

async fn watch(
    hc: &mut ferro_proto::compute::v1::hosts_client::HostsClient<tonic::transport::Channel>,
    key: &str,
    underlay: &str,
) -> Result<tonic::Streaming<pb::HostNetwork>, tonic::Status> {
    let mut r = tonic::Request::new(pb::WatchHostNetworkRequest {
        underlay_ip: underlay.into(),
    });
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    hc.watch_host_network(r).await.map(|s| s.into_inner())
}

/// Security groups through the API: the default group, a new group's
/// egress-only rules, rules added and revoked, a group of another VPC
/// refused, DependencyViolation while in use, groups changed on a running
/// instance; and each host's netd watch: only a host key, for its own host,
/// gets its network state, and a rule change reaches it at once.
#[tokio::test]
async fn security_groups_and_the_host_network_watch() {
    let t = controller(false, 10_000).await;
    let mut c = client(t.addr, &t.admin_key).await;
    register(&mut c).await;
    let agent = FakeAgent::new("h1", "az-1", 64, 65536);
    let hk = agent.join(&[t.addr.to_string()], &t.admin_key).await;
    let mut hc = hosts_client(t.addr).await;
    let e = watch(&mut hc, &hk, "10.99.0.1").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    beat(&mut hc, &hk, agent.heartbeat("https://127.0.0.1:1"))
        .await
        .unwrap();
    let groups = c
        .describe_security_groups(pb::DescribeSecurityGroupsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .security_groups;
    assert_eq!(groups.len(), 1, "the default VPC's default group");
    let default = groups[0].clone();
    assert_eq!(default.group_name, "default");
    assert_eq!(default.ingress[0].group_id, default.group_id);
    let web = c
        .create_security_group(pb::CreateSecurityGroupRequest {
            vpc_id: default.vpc_id.clone(),
            group_name: "web".into(),
            description: "web servers".into(),
            tags: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(web.ingress.is_empty() && web.egress.len() == 1, "{web:?}");
    let other = c
        .create_vpc(pb::CreateVpcRequest {
            cidr_block: "10.9.0.0/16".into(),
            tags: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    let foreign = c
        .create_security_group(pb::CreateSecurityGroupRequest {
            vpc_id: other.vpc_id.clone(),
            group_name: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let rules = |group: &str, rules, egress| pb::SecurityGroupRulesRequest {
        group_id: group.into(),
        egress,
        rules,
    };
    for (r, code, want) in [
        (
            tcp_rule(22, "", &foreign.group_id),
            Code::InvalidArgument,
            "is in vpc-",
        ),
        (
            tcp_rule(22, "1.2.3.4/8", ""),
            Code::InvalidArgument,
            "rules[0]",
        ),
        (
            tcp_rule(70000, "0.0.0.0/0", ""),
            Code::InvalidArgument,
            "above 65535",
        ),
        (
            tcp_rule(22, "0.0.0.0/0", &web.group_id),
            Code::InvalidArgument,
            "exactly one",
        ),
        (
            pb::SecurityGroupRule {
                protocol: "gre".into(),
                ..tcp_rule(22, "0.0.0.0/0", "")
            },
            Code::InvalidArgument,
            "protocol",
        ),
    ] {
        let e = c
            .authorize_security_group_rules(rules(&web.group_id, vec![r], false))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{want}: {}", e.message());
        assert!(e.message().contains(want), "{want}: {}", e.message());
    }
    let i = c
        .run_instances(pb::RunInstancesRequest {
            security_group_ids: vec![web.group_id.clone()],
            ..run_req(1)
        })
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);
    assert_eq!(i.security_group_ids, vec![web.group_id.clone()]);
    let e = c
        .run_instances(pb::RunInstancesRequest {
            security_group_ids: vec![foreign.group_id.clone()],
            ..run_req(1)
        })
        .await
        .unwrap_err();
    assert!(
        e.message().contains("security_group_ids"),
        "{}",
        e.message()
    );
    let e = c
        .delete_security_group(pb::DeleteSecurityGroupRequest {
            group_id: web.group_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("DependencyViolation") && e.message().contains(&i.instance_id),
        "{}",
        e.message()
    );

    // The watch: not for a user key or the admin key.
    let user = c
        .create_api_key(pb::CreateApiKeyRequest {
            name: "u".into(),
            role: "user".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    for key in [&user, &t.admin_key] {
        let e = watch(&mut hc, key, "10.99.0.1").await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    }
    let e = watch(&mut hc, &hk, "nonsense").await.unwrap_err();
    assert!(e.message().contains("underlay_ip"), "{}", e.message());
    let mut w = watch(&mut hc, &hk, "10.99.0.1").await.unwrap();
    let first = w.message().await.unwrap().unwrap();
    assert_eq!(first.host_id, "h1");
    assert_eq!(first.vpcs.len(), 1);
    let local = &first.vpcs[0].local[0];
    assert_eq!(local.instance_id, i.instance_id);
    assert_eq!(local.private_ip, i.private_ip_address);
    assert_eq!(local.security_group_ids, vec![web.group_id.clone()]);
    assert!(first.vpcs[0].vni > 0);
    let hosts = c
        .describe_hosts(pb::DescribeHostsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts;
    assert_eq!(hosts.len(), 1);
    // A rule added to the group in use reaches the host's watch.
    let before = std::time::Instant::now();
    c.authorize_security_group_rules(rules(
        &web.group_id,
        vec![tcp_rule(80, "0.0.0.0/0", "")],
        false,
    ))
    .await
    .unwrap();
    let next = w.message().await.unwrap().unwrap();
    assert!(before.elapsed() < std::time::Duration::from_secs(1));
    assert!(next.revision > first.revision);
    let g = next
        .groups
        .iter()
        .find(|g| g.group.as_ref().unwrap().group_id == web.group_id)
        .unwrap();
    assert_eq!(g.group.as_ref().unwrap().ingress.len(), 1);
    assert_eq!(g.member_ips, vec![i.private_ip_address.clone()]);
    let e = c
        .authorize_security_group_rules(rules(
            &web.group_id,
            vec![tcp_rule(80, "0.0.0.0/0", "")],
            false,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    // Its groups change while it runs; then the group is free to go.
    c.modify_instance_attribute(pb::ModifyInstanceAttributeRequest {
        instance_id: i.instance_id.clone(),
        security_group_ids: vec![default.group_id.clone()],
        ..Default::default()
    })
    .await
    .unwrap();
    let next = w.message().await.unwrap().unwrap();
    assert_eq!(
        next.vpcs[0].local[0].security_group_ids,
        vec![default.group_id.clone()]
    );
    c.delete_security_group(pb::DeleteSecurityGroupRequest {
        group_id: web.group_id.clone(),
    })
    .await
    .unwrap();
}

/// Volumes through the API: created with replicas on distinct hosts of
/// the zone, described with filters, attached to a stopped instance (and
/// shown on it), refused on a running one and while in use, detached and
/// deleted.
#[tokio::test]
async fn volumes_attach_to_stopped_instances_of_their_zone() {
    let t = controller(false, 10_000).await;
    let mut c = client(t.addr, &t.admin_key).await;
    register(&mut c).await;
    let mut hc = hosts_client(t.addr).await;
    let mut keys = Vec::new();
    for (h, disk) in [("h1", 500), ("h2", 300), ("h3", 0)] {
        let mut agent = FakeAgent::new(h, "az-1", 64, 65536);
        agent.disk_gib = disk;
        let hk = agent.join(&[t.addr.to_string()], &t.admin_key).await;
        beat(&mut hc, &hk, agent.heartbeat("https://127.0.0.1:1"))
            .await
            .unwrap();
        keys.push(hk);
    }
    // What the replica hosts' blockd would report: every volume of theirs
    // held at its epoch (or, for `gone`, no longer).
    let (hold_hc, hold_keys) = (hc.clone(), keys.clone());
    let hold = |gone: Vec<String>| {
        let (mut hc, keys) = (hold_hc.clone(), hold_keys.clone());
        async move {
            for k in &keys[..2] {
                let mine = host_volumes(&mut hc, k).await.unwrap();
                let held: Vec<(&str, u64)> = mine
                    .replicas
                    .iter()
                    .filter(|r| !gone.contains(&r.volume_id))
                    .map(|r| (r.volume_id.as_str(), r.epoch))
                    .collect();
                report_replicas(&mut hc, k, &held).await.unwrap();
            }
        }
    };
    let create = |size_gib, volume_type: &str| pb::CreateVolumeRequest {
        size_gib,
        availability_zone: "az-1".into(),
        volume_type: volume_type.into(),
        tags: vec![pb::Tag {
            key: "env".into(),
            value: "ci".into(),
        }],
        client_token: String::new(),
    };
    // Only two hosts report disk: no three replicas; an unknown type.
    let e = c.create_volume(create(8, "durable")).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("reports disk space for 3 replicas"));
    let e = c.create_volume(create(8, "gp3")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("volume_type"), "{}", e.message());
    let vol = c.create_volume(create(8, "")).await.unwrap().into_inner();
    let token = pb::CreateVolumeRequest {
        client_token: "t-1".into(),
        ..create(2, "")
    };
    let once = c.create_volume(token.clone()).await.unwrap().into_inner();
    assert_eq!(c.create_volume(token).await.unwrap().into_inner(), once);
    c.delete_volume(pb::DeleteVolumeRequest {
        volume_id: once.volume_id,
    })
    .await
    .unwrap();
    assert_eq!((vol.state.as_str(), vol.epoch), ("creating", 1));
    assert_eq!(vol.replica_host_ids, ["h1", "h2"]);
    // The replica hosts are told; h3 holds nothing.
    let on_h1 = host_volumes(&mut hc, &keys[0]).await.unwrap();
    assert_eq!(on_h1.host_id, "h1");
    assert_eq!(
        on_h1.replicas,
        [pb::ReplicaOnHost {
            volume_id: vol.volume_id.clone(),
            size_bytes: 8 << 30,
            epoch: 1,
            replica_host_ids: vec!["h1".into(), "h2".into()],
            deleting: false,
            in_sync: true,
            resync: vec![],
            source_path: String::new(),
            incarnation: 0,
            peers: ["h1", "h2"]
                .map(|h| pb::ReplicaPeer {
                    host_id: h.into(),
                    addr: String::new(),
                    in_sync: true,
                })
                .to_vec(),
        }]
    );
    assert!(host_volumes(&mut hc, &keys[2])
        .await
        .unwrap()
        .replicas
        .is_empty());
    // Only a host's own key: a user's key can neither follow nor report.
    let e = host_volumes(&mut hc, &t.admin_key).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    let e = report_replicas(&mut hc, &t.admin_key, &[(&vol.volume_id, 1)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    let e = report_replicas(&mut hc, &keys[0], &[("vol-../x", 1)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("replicas[0].volume_id"));
    // Only a primary (a replica host in sync) may put a resynced replica
    // back, and only one that is out of sync.
    let add = |key: &str, replica: &str| {
        let mut hc = hc.clone();
        let mut r = tonic::Request::new(pb::AddVolumeReplicaRequest {
            volume_id: vol.volume_id.clone(),
            epoch: 1,
            replica_host_id: replica.into(),
        });
        r.metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        async move { hc.add_volume_replica(r).await }
    };
    let e = add(&t.admin_key, "h2").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    let e = add(&keys[2], "h2").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    let e = add(&keys[0], "h2").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    // Serving sessions: only the host serving the volume (none while it is
    // not attached) opens one, and only a session's own host closes it.
    let session = |key: &str, close: Option<u64>| {
        let mut hc = hc.clone();
        let (volume_id, key) = (vol.volume_id.clone(), format!("Bearer {key}"));
        async move {
            let auth = |r: &mut tonic::metadata::MetadataMap| {
                r.insert("authorization", key.parse().unwrap());
            };
            match close {
                None => {
                    let mut r = tonic::Request::new(pb::OpenVolumeSessionRequest {
                        volume_id,
                        epoch: 1,
                    });
                    auth(r.metadata_mut());
                    hc.open_volume_session(r)
                        .await
                        .map(|r| r.into_inner().session)
                }
                Some(session) => {
                    let mut r = tonic::Request::new(pb::CloseVolumeSessionRequest {
                        volume_id,
                        epoch: 1,
                        session,
                    });
                    auth(r.metadata_mut());
                    hc.close_volume_session(r).await.map(|_| session)
                }
            }
        }
    };
    for (key, close, code) in [
        (&t.admin_key, None, Code::PermissionDenied),
        (&keys[0], None, Code::PermissionDenied),
        (&keys[2], None, Code::PermissionDenied),
        (&t.admin_key, Some(0), Code::PermissionDenied),
        (&keys[0], Some(0), Code::FailedPrecondition),
    ] {
        let e = session(key, close).await.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
    }
    // Creating until both replica hosts hold it.
    assert_eq!(
        report_replicas(&mut hc, &keys[0], &[(&vol.volume_id, 1)])
            .await
            .unwrap(),
        1
    );
    let shown = c
        .describe_volumes(pb::DescribeVolumesRequest {
            volume_ids: vec![vol.volume_id.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert_eq!(shown[0].state, "creating", "one of two replicas held");
    hold(vec![]).await;
    let other = c
        .create_volume(create(4, "standard"))
        .await
        .unwrap()
        .into_inner();
    hold(vec![]).await;
    let reader = c.clone();
    let list = |f: pb::DescribeVolumesRequest| {
        let mut c = reader.clone();
        async move { c.describe_volumes(f).await.map(|r| r.into_inner()) }
    };
    let page = list(pb::DescribeVolumesRequest {
        max_results: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(page.volumes.len(), 1);
    assert!(!page.next_token.is_empty());
    let e = list(pb::DescribeVolumesRequest {
        volume_ids: vec!["vol-nope".into()],
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // One instance stopped, one running.
    let ids: Vec<String> = c
        .run_instances(run_req(2))
        .await
        .unwrap()
        .into_inner()
        .instances
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    c.stop_instances(pb::StopInstancesRequest {
        instance_ids: vec![ids[0].clone()],
        force: false,
    })
    .await
    .unwrap();
    let attach = |vol: &str, inst: &str| pb::AttachVolumeRequest {
        volume_id: vol.into(),
        instance_id: inst.into(),
        device: "/dev/vdb".into(),
        delete_on_termination: false,
    };
    let a = c
        .attach_volume(attach(&vol.volume_id, &ids[0]))
        .await
        .unwrap()
        .into_inner()
        .attachment
        .unwrap();
    assert_eq!(
        (a.state.as_str(), a.device.as_str()),
        ("attached", "/dev/vdb")
    );
    let e = c
        .attach_volume(attach(&other.volume_id, &ids[1]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.message(),
        "IncorrectInstanceState: hot-attach comes later; stop the instance first"
    );
    let in_use = list(pb::DescribeVolumesRequest {
        attachment_instance_ids: vec![ids[0].clone()],
        states: vec!["in-use".into()],
        tags: vec![pb::TagFilter {
            key: "env".into(),
            value: "ci".into(),
        }],
        ..Default::default()
    })
    .await
    .unwrap()
    .volumes;
    assert_eq!(in_use.len(), 1);
    assert_eq!(in_use[0].volume_id, vol.volume_id);
    let shown = describe(&mut c, vec![ids[0].clone()]).await;
    assert_eq!(shown[0].block_device_mappings, vec![a.clone()]);
    let e = c
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().starts_with("DependencyViolation"),
        "{}",
        e.message()
    );
    let d = c
        .detach_volume(pb::DetachVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .attachment
        .unwrap();
    assert_eq!(d.state, "detached");
    for v in [&vol, &other] {
        c.delete_volume(pb::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await
        .unwrap();
    }
    // Deleting until the replica hosts report them gone.
    let deleting = list(pb::DescribeVolumesRequest::default())
        .await
        .unwrap()
        .volumes;
    assert!(
        deleting.iter().all(|v| v.state == "deleting"),
        "{deleting:?}"
    );
    let told = host_volumes(&mut hc, &keys[1]).await.unwrap();
    assert!(told.replicas.iter().all(|r| r.deleting), "{told:?}");
    hold(vec![vol.volume_id.clone(), other.volume_id.clone()]).await;
    let left = list(pb::DescribeVolumesRequest::default())
        .await
        .unwrap()
        .volumes;
    assert!(left.is_empty(), "{left:?}");
    let hosts = c
        .describe_hosts(pb::DescribeHostsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .hosts;
    let disk: Vec<(u64, u64)> = hosts
        .iter()
        .map(|h| (h.disk_total_gib, h.disk_allocated_gib))
        .collect();
    assert_eq!(disk, [(500, 0), (300, 0), (0, 0)], "the space is freed");
}

/// Ids of instances and interfaces, for comparing answers.
fn instance_ids(list: &[pb::Instance]) -> Vec<String> {
    list.iter().map(|i| i.instance_id.clone()).collect()
}

/// Interfaces and the interface filters of DescribeInstances, over
/// instances in two VPCs: each filter returns exactly the right ones,
/// pages return each once, bad values name the field, a host key is
/// refused.
#[tokio::test]
async fn network_interfaces_and_instance_filters_by_vpc_subnet_ip_and_group() {
    let t = controller(false, 10_000).await;
    let mut c = client(t.addr, &t.admin_key).await;
    register(&mut c).await;
    let agent = FakeAgent::new("h1", "az-1", 64, 65536);
    let hk = agent.join(&[t.addr.to_string()], &t.admin_key).await;
    let mut hc = hosts_client(t.addr).await;
    beat(&mut hc, &hk, agent.heartbeat("https://127.0.0.1:1"))
        .await
        .unwrap();
    // Two in the default VPC, one in a second VPC's subnet, in group "web".
    let tagged = |k: &str| {
        vec![pb::Tag {
            key: k.into(),
            value: "1".into(),
        }]
    };
    let a = c
        .run_instances(pb::RunInstancesRequest {
            tags: tagged("a"),
            ..run_req(2)
        })
        .await
        .unwrap()
        .into_inner()
        .instances;
    let vpc = c
        .create_vpc(pb::CreateVpcRequest {
            cidr_block: "10.9.0.0/16".into(),
            tags: tagged("b"),
        })
        .await
        .unwrap()
        .into_inner();
    let sub = c
        .create_subnet(pb::CreateSubnetRequest {
            vpc_id: vpc.vpc_id.clone(),
            cidr_block: "10.9.1.0/24".into(),
            availability_zone: "az-1".into(),
            tags: tagged("b"),
        })
        .await
        .unwrap()
        .into_inner();
    let web = c
        .create_security_group(pb::CreateSecurityGroupRequest {
            vpc_id: vpc.vpc_id.clone(),
            group_name: "web".into(),
            tags: tagged("b"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let b = c
        .run_instances(pb::RunInstancesRequest {
            subnet_id: sub.subnet_id.clone(),
            security_group_ids: vec![web.group_id.clone()],
            tags: tagged("b"),
            ..run_req(1)
        })
        .await
        .unwrap()
        .into_inner()
        .instances
        .remove(0);

    // Every instance has one interface, with its record.
    let all = c
        .describe_network_interfaces(pb::DescribeNetworkInterfacesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.network_interfaces.len(), 3);
    let eni = |i: &pb::Instance| format!("eni-{}", &i.instance_id[2..]);
    let x = all
        .network_interfaces
        .iter()
        .find(|x| x.instance_id == b.instance_id)
        .unwrap();
    assert_eq!(x.network_interface_id, eni(&b));
    assert_eq!(
        (
            x.vpc_id.as_str(),
            x.subnet_id.as_str(),
            x.private_ip_address.as_str()
        ),
        (
            vpc.vpc_id.as_str(),
            sub.subnet_id.as_str(),
            b.private_ip_address.as_str()
        )
    );
    assert_eq!(
        (x.mac_address.as_str(), x.status.as_str()),
        (b.mac_address.as_str(), "in-use")
    );
    assert_eq!(
        (
            x.groups[0].group_id.as_str(),
            x.groups[0].group_name.as_str()
        ),
        (web.group_id.as_str(), "web")
    );
    assert_eq!(
        (
            x.host_id.as_str(),
            x.availability_zone.as_str(),
            x.device_index
        ),
        ("h1", "az-1", 0)
    );

    let shared = c.clone();
    let enis = move |f: pb::DescribeNetworkInterfacesRequest| {
        let mut c = shared.clone();
        async move {
            let r = c.describe_network_interfaces(f).await.unwrap().into_inner();
            r.network_interfaces
                .into_iter()
                .map(|x| x.network_interface_id)
                .collect::<Vec<_>>()
        }
    };
    let shared = c.clone();
    let inst = move |f: pb::DescribeInstancesRequest| {
        let mut c = shared.clone();
        async move {
            instance_ids(
                &c.describe_instances(f)
                    .await
                    .unwrap()
                    .into_inner()
                    .instances,
            )
        }
    };
    type F = pb::DescribeNetworkInterfacesRequest;
    type I = pb::DescribeInstancesRequest;
    let (d, di) = (F::default, I::default);
    let (b_id, mut a_ids) = (vec![b.instance_id.clone()], instance_ids(&a));
    a_ids.sort();
    let a0 = vec![a[0].instance_id.clone()];

    // The filters both calls take: each returns exactly these instances
    // (and their interfaces).
    let cases = [
        (
            I {
                vpc_ids: vec![vpc.vpc_id.clone()],
                ..di()
            },
            &b_id,
        ),
        (
            I {
                vpc_ids: vec![a[0].vpc_id.clone()],
                ..di()
            },
            &a_ids,
        ),
        (
            I {
                subnet_ids: vec![sub.subnet_id.clone()],
                ..di()
            },
            &b_id,
        ),
        (
            I {
                private_ip_addresses: vec![a[0].private_ip_address.clone()],
                ..di()
            },
            &a0,
        ),
        (
            I {
                security_group_ids: vec![web.group_id.clone()],
                ..di()
            },
            &b_id,
        ),
        (
            I {
                security_group_names: vec!["web".into()],
                ..di()
            },
            &b_id,
        ),
        (
            I {
                security_group_names: vec!["default".into()],
                ..di()
            },
            &a_ids,
        ),
        (
            I {
                vpc_ids: vec![vpc.vpc_id.clone()],
                subnet_ids: vec![a[0].subnet_id.clone()],
                ..di()
            },
            &vec![],
        ),
    ];
    for (f, want) in cases {
        assert_eq!(&inst(f.clone()).await, want, "{f:?}");
        let as_interfaces = F {
            vpc_ids: f.vpc_ids,
            subnet_ids: f.subnet_ids,
            private_ip_addresses: f.private_ip_addresses,
            security_group_ids: f.security_group_ids,
            security_group_names: f.security_group_names,
            ..d()
        };
        let want_enis: Vec<String> = want.iter().map(|id| format!("eni-{}", &id[2..])).collect();
        assert_eq!(enis(as_interfaces).await, want_enis, "{want:?}");
    }
    assert_eq!(inst(di()).await.len(), 3, "no filter: all");

    // The interface-only filters.
    let just_b = vec![eni(&b)];
    let mut just_a: Vec<String> = a.iter().map(eni).collect();
    just_a.sort();
    let any_a = vec![pb::TagFilter {
        key: "a".into(),
        value: String::new(),
    }];
    let cases = [
        (
            F {
                instance_ids: a0.clone(),
                ..d()
            },
            vec![eni(&a[0])],
        ),
        (
            F {
                mac_addresses: vec![a[0].mac_address.to_uppercase()],
                ..d()
            },
            vec![eni(&a[0])],
        ),
        (
            F {
                network_interface_ids: just_b.clone(),
                ..d()
            },
            just_b.clone(),
        ),
        (F { tags: any_a, ..d() }, just_a.clone()),
        (
            F {
                availability_zones: vec!["az-2".into()],
                ..d()
            },
            vec![],
        ),
    ];
    for (f, want) in cases {
        assert_eq!(enis(f.clone()).await, want, "{f:?}");
    }
    // Pages of one: each interface exactly once.
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .describe_network_interfaces(F {
                max_results: 1,
                next_token: token,
                ..d()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.network_interfaces.len() <= 1);
        paged.extend(
            r.network_interfaces
                .into_iter()
                .map(|x| x.network_interface_id),
        );
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    let mut want: Vec<String> = just_a.iter().chain(&just_b).cloned().collect();
    want.sort();
    assert_eq!(paged, want);

    // Tags and pages on VPCs, subnets and groups.
    let tag_b = || {
        vec![pb::TagFilter {
            key: "b".into(),
            value: "1".into(),
        }]
    };
    let vpcs = c.describe_vpcs(pb::DescribeVpcsRequest {
        tags: tag_b(),
        ..Default::default()
    });
    let vpcs = vpcs.await.unwrap().into_inner().vpcs;
    let subnets = c.describe_subnets(pb::DescribeSubnetsRequest {
        tags: tag_b(),
        ..Default::default()
    });
    let subnets = subnets.await.unwrap().into_inner().subnets;
    let groups = pb::DescribeSecurityGroupsRequest {
        tags: tag_b(),
        ..Default::default()
    };
    let groups = c
        .describe_security_groups(groups)
        .await
        .unwrap()
        .into_inner()
        .security_groups;
    let tagged: [Vec<&String>; 3] = [
        vpcs.iter().map(|v| &v.vpc_id).collect(),
        subnets.iter().map(|s| &s.subnet_id).collect(),
        groups.iter().map(|g| &g.group_id).collect(),
    ];
    assert_eq!(tagged, [[&vpc.vpc_id], [&sub.subnet_id], [&web.group_id]]);
    let first = c
        .describe_subnets(pb::DescribeSubnetsRequest {
            max_results: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let rest = c
        .describe_subnets(pb::DescribeSubnetsRequest {
            next_token: first.next_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            first.subnets.len(),
            rest.subnets.len(),
            rest.next_token.as_str()
        ),
        (2, 1, "")
    );
    assert!(rest.subnets[0].subnet_id > first.subnets[1].subnet_id);

    // Bad values name the field and change nothing.
    let bad = [
        (
            F {
                private_ip_addresses: vec!["10.9.1".into()],
                ..d()
            },
            "private_ip_addresses",
        ),
        (
            F {
                max_results: 1001,
                ..d()
            },
            "max_results",
        ),
        (
            F {
                mac_addresses: vec!["02:fc".into()],
                ..d()
            },
            "mac_addresses",
        ),
        (
            F {
                vpc_ids: vec![sub.subnet_id.clone()],
                ..d()
            },
            "vpc_ids",
        ),
    ];
    for (f, field) in bad {
        let e = c.describe_network_interfaces(f).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().starts_with(field), "{}", e.message());
    }
    let e = c
        .describe_instances(I {
            private_ip_addresses: vec!["10.9.1.300".into()],
            ..di()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("private_ip_addresses"),
        "{}",
        e.message()
    );
    let e = c
        .describe_vpcs(pb::DescribeVpcsRequest {
            max_results: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.code() == Code::InvalidArgument && e.message().starts_with("max_results"));
    let e = c
        .describe_network_interfaces(F {
            network_interface_ids: vec!["eni-0000000000000000".into()],
            ..d()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(enis(d()).await, want, "nothing changed");

    // A host key reaches none of it.
    let mut as_host = client(t.addr, &hk).await;
    let e = as_host.describe_network_interfaces(d()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}
