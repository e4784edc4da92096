//! The EC2 Query endpoint on a three-node cluster: every node serves it
//! on the same port of its own address, and a follower forwards a signed
//! request to the leader's endpoint and relays its answer (success and
//! EC2's errors alike); the answer is the leader's. A key made on the
//! cluster signs; a wrong secret is refused through the follower too.

mod common;

use common::procs::Procs;
use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::compute_client::ComputeClient;

const IPS: [&str; 3] = ["127.0.0.21", "127.0.0.22", "127.0.0.23"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_ec2_calls_to_the_leader() {
    let port = common::procs::free_port(IPS[0]);
    let mut procs = Procs::new("ec2-ha", &IPS, 3, |_| {
        format!("availability_zones = [\"az-1\", \"az-2\"]\nec2_listen = \"{{ip}}:{port}\"\n")
    });
    for i in 0..3 {
        procs.spawn(i);
    }
    let key = procs.admin_key(30).await;
    let leader = procs.wait_leader(&key, &[0, 1, 2], 30).await;
    let follower = (leader + 1) % 3;
    let ch = tonic::transport::Channel::from_shared(procs.url(leader))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
    let mut c = ComputeClient::with_interceptor(ch, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    let made = c
        .create_api_key(pb::CreateApiKeyRequest {
            name: "ec2-ha".into(),
            role: "user".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = made.key.unwrap().id;
    let secret = made.ec2_secret_access_key;
    assert_eq!(secret.len(), 40, "an EC2 secret comes with the key");
    let form = "Action=DescribeAvailabilityZones&Version=2016-11-15";
    let call = |node: usize, secret: String| {
        let target = format!("{}:{port}", IPS[node]);
        let id = id.clone();
        async move {
            ferro_controller::ec2::post_signed(&target, None, form, &id, &secret, "local")
                .await
                .unwrap_or_else(|e| panic!("EC2 endpoint of node {}: {e}", node + 1))
        }
    };
    for node in [leader, follower] {
        let (status, xml) = call(node, secret.clone()).await;
        assert_eq!(status, 200, "node {}: {xml}\n{}", node + 1, procs.logs());
        assert!(xml.contains("<zoneName>az-1</zoneName>"), "{xml}");
        assert!(xml.contains("<zoneName>az-2</zoneName>"), "{xml}");
    }
    let (status, xml) = call(follower, "0".repeat(40)).await;
    assert_eq!(status, 403, "{xml}");
    assert!(xml.contains("<Code>SignatureDoesNotMatch</Code>"), "{xml}");
    // A write through the follower lands in the replicated state.
    let form_vpc = "Action=CreateVpc&Version=2016-11-15&CidrBlock=10.9.0.0%2F16";
    let target = format!("{}:{port}", IPS[follower]);
    let (status, xml) =
        ferro_controller::ec2::post_signed(&target, None, form_vpc, &id, &secret, "local")
            .await
            .unwrap();
    assert_eq!(status, 200, "{xml}");
    let vpcs = c
        .describe_vpcs(pb::DescribeVpcsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .vpcs;
    assert!(
        vpcs.iter().any(|v| v.cidr_block == "10.9.0.0/16"),
        "{vpcs:?}"
    );
}
