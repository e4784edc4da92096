//! Bad requests get a clear gRPC status, and a failed create leaves
//! nothing behind.

mod common;

use common::*;
use ferro_proto::agent::v1 as pb;
use tonic::Code;

async fn create_err(
    c: &mut pb::agent_client::AgentClient<tonic::transport::Channel>,
    spec: pb::InstanceSpec,
) -> tonic::Status {
    c.create_instance(pb::CreateInstanceRequest { spec: Some(spec) })
        .await
        .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_status_codes() {
    let agent = Agent::start("bad", "tb01", "");
    let mut c = agent.client().await;
    agent.register_guest(&mut c).await;

    let mut s = guest_spec("zero");
    s.vcpus = 0;
    let e = create_err(&mut c, s).await;
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("vcpus"), "{}", e.message());

    let mut s = guest_spec("huge");
    s.memory_mib = 1 << 20;
    let e = create_err(&mut c, s).await;
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("MiB"), "{}", e.message());

    let mut s = guest_spec("noimg");
    s.image_id = "nope".into();
    let e = create_err(&mut c, s).await;
    assert_eq!(e.code(), Code::NotFound);
    assert!(e.message().contains("nope"), "{}", e.message());

    let mut s = guest_spec("badmac");
    s.nics = vec![pb::NicSpec { mac: "zz".into() }];
    assert_eq!(create_err(&mut c, s).await.code(), Code::InvalidArgument);
    assert_eq!(
        create_err(&mut c, guest_spec("../etc")).await.code(),
        Code::InvalidArgument
    );
    // One id rule for the spec, cgroups and the image store: "vm.1" used to
    // pass validation, get its disk cloned, then fail as INTERNAL in cgroup
    // creation.
    let e = create_err(&mut c, guest_spec("vm.1")).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("vm.1"), "{}", e.message());
    assert!(
        !agent.state_dir.join("instances/vm.1").exists(),
        "a refused create left files"
    );
    let e = c
        .create_instance(pb::CreateInstanceRequest { spec: None })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    c.create_instance(pb::CreateInstanceRequest {
        spec: Some(guest_spec("dup")),
    })
    .await
    .unwrap();
    let e = create_err(&mut c, guest_spec("dup")).await;
    assert_eq!(e.code(), Code::AlreadyExists);

    // Wrong state.
    let e = c
        .stop_instance(pb::StopInstanceRequest {
            id: "dup".into(),
            timeout_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let e = c
        .reboot_instance(pb::RebootInstanceRequest {
            id: "dup".into(),
            timeout_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // Bad attached volumes are named and change nothing.
    let vol = |id: &str, dev: &str| pb::AttachedVolume {
        volume_id: id.into(),
        device: dev.into(),
    };
    for (bad, what) in [
        (vol("vol-1", "/dev/vdb"), "volume 0: volume_id"),
        (vol("vol-0123456789abcdef", "/dev/vda"), "volume 0: device"),
    ] {
        let e = c
            .start_instance(pb::StartInstanceRequest {
                id: "dup".into(),
                volumes: Some(pb::VolumeSet { volumes: vec![bad] }),
                resources: None,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(what), "{}", e.message());
    }
    c.start_instance(pb::StartInstanceRequest {
        id: "dup".into(),
        volumes: None,
        resources: None,
    })
    .await
    .unwrap();
    let e = c
        .start_instance(pb::StartInstanceRequest {
            id: "dup".into(),
            volumes: None,
            resources: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("Running"), "{}", e.message());

    let e = c
        .get_instance(pb::GetInstanceRequest { id: "ghost".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .delete_instance(pb::DeleteInstanceRequest { id: "ghost".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Images.
    let e = c
        .register_image(pb::RegisterImageRequest {
            id: "guest".into(),
            kernel_path: guest_elf().display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    let e = c
        .register_image(pb::RegisterImageRequest {
            id: "x".into(),
            kernel_path: "/nonexistent/vmlinux".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    let images = c
        .list_images(pb::ListImagesRequest {})
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].kernel_sha256.len(), 64);

    c.delete_instance(pb::DeleteInstanceRequest { id: "dup".into() })
        .await
        .unwrap();
    agent.assert_nothing_left();
}

/// The TAP name the agent derives (prefix + FNV-1a 32 of the id + index).
fn tap_name(prefix: &str, id: &str, index: usize) -> String {
    let h = id.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("{prefix}{h:08x}{index:x}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_failed_create_leaves_nothing_behind() {
    let agent = Agent::start("rollbk", "tb02", "");
    let mut c = agent.client().await;
    agent.register_guest(&mut c).await;
    // Occupy the name of the second NIC's TAP: the create fails after its
    // disk, cgroup and first TAP exist.
    let taken = tap_name("tb02", "vm", 1);
    sh(&["ip", "tuntap", "add", "dev", &taken, "mode", "tap"]);
    let mut s = guest_spec("vm");
    s.nics = vec![pb::NicSpec::default(), pb::NicSpec::default()];
    s.disks = vec![pb::DiskSpec {
        id: "data".into(),
        size_bytes: 1 << 20,
    }];
    let e = create_err(&mut c, s).await;
    assert!(e.message().contains(&taken), "{}", e.message());
    assert_eq!(
        agent.taps(),
        vec![taken.clone()],
        "only the foreign TAP remains"
    );
    sh(&["ip", "link", "del", &taken]);
    let h = c
        .host_info(pb::HostInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((h.instances, h.vcpus_allocated), (0, 0));
    agent.assert_nothing_left();
    // The id is free again.
    launch(&mut c, guest_spec("vm")).await;
    c.delete_instance(pb::DeleteInstanceRequest { id: "vm".into() })
        .await
        .unwrap();
    agent.assert_nothing_left();
}

fn sh(args: &[&str]) {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether a call over `client` gets an answer.
async fn answers(
    client: Result<
        pb::agent_client::AgentClient<tonic::transport::Channel>,
        tonic::transport::Error,
    >,
) -> bool {
    match client {
        Err(_) => false,
        Ok(mut c) => c.list_instances(pb::ListInstancesRequest {}).await.is_ok(),
    }
}

/// The agent's port serves only mutual TLS with a controller certificate
/// of its CA: a plain client, a TLS client with no certificate, one with a
/// certificate of another CA, and one presenting another host's agent
/// certificate (same CA, server usage only) all get nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_controllers_reach_the_agent() {
    use ferro_testkit::pki;
    use tonic::transport::Identity;
    let agent = Agent::start("mtls", "tm01", "");
    let plain = match tonic::transport::Endpoint::from_shared(
        agent.addr.replacen("https://", "http://", 1),
    )
    .unwrap()
    .connect()
    .await
    {
        Ok(ch) => Ok(pb::agent_client::AgentClient::new(ch)),
        Err(e) => Err(e),
    };
    assert!(!answers(plain).await, "a plain client was answered");
    assert!(
        !answers(agent.client_with(None).await).await,
        "a TLS client without a certificate was answered"
    );
    let other = pki::Ca::load(&pki::Ca::generate("another CA").unwrap())
        .unwrap()
        .issue_controller("intruder")
        .unwrap();
    assert!(
        !answers(
            agent
                .client_with(Some(Identity::from_pem(&other.cert_pem, &other.key_pem)))
                .await
        )
        .await,
        "a certificate of another CA was answered"
    );
    let k = pki::generate_key().unwrap();
    let host_cert = pki::Ca::load(pki::ca())
        .unwrap()
        .issue_agent("test-other", &k.public_key)
        .unwrap();
    assert!(
        !answers(
            agent
                .client_with(Some(Identity::from_pem(&host_cert, &k.key_pem)))
                .await
        )
        .await,
        "another host's agent certificate was answered"
    );
    let id = pki::controller_identity();
    assert!(
        answers(
            agent
                .client_with(Some(Identity::from_pem(&id.cert_pem, &id.key_pem)))
                .await
        )
        .await,
        "the controller's certificate was refused; log:\n{}",
        agent.log()
    );
}
