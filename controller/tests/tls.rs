//! TLS: three `ferro-controller` processes serving the API and Raft over
//! TLS (certificates made here with `openssl`, signed by a test CA). The
//! cluster elects a leader and commits writes (so Raft between the nodes
//! speaks TLS); the CLI's client with the CA works; a plaintext client and
//! a client trusting another CA are refused. The EC2 endpoint serves HTTPS
//! with the same certificate, and a follower forwards to the leader's over
//! TLS.
//!
//! Needs the `openssl` tool; it never skips: a missing precondition fails
//! the test with a message naming it.

mod common;

use std::path::{Path, PathBuf};

use common::procs::Procs;
use ferro_cli::client::Client;
use ferro_cli::config::Config;
use ferro_proto::compute::v1 as pb;
use ferro_proto::compute::v1::cluster_client::ClusterClient;
use ferro_proto::compute::v1::compute_client::ComputeClient;

const IPS: [&str; 3] = ["127.0.0.21", "127.0.0.22", "127.0.0.23"];

fn openssl(dir: &Path, args: &[&str]) {
    let out = ferro_testkit::tool("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("precondition missing: the `openssl` tool (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA named `name` in `dir`: `<name>.pem`, `<name>.key`.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

/// `node.pem`/`node.key` for the three addresses, signed by `ca`.
fn make_node_cert(dir: &Path, ca: &str) {
    let sans: Vec<String> = IPS.iter().map(|ip| format!("IP:{ip}")).collect();
    std::fs::write(
        dir.join("ext.cnf"),
        format!(
            "subjectAltName={}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=serverAuth,clientAuth\n",
            sans.join(",")
        ),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "node.key",
            "-out",
            "node.csr",
            "-subj",
            "/CN=ferro-controller",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "node.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            "node.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

async fn cluster_status(
    c: &mut Client,
) -> Result<pb::ClusterStatusResponse, ferro_cli::client::ClientError> {
    c.call(|ch| async move {
        ClusterClient::new(ch)
            .cluster_status(pb::ClusterStatusRequest {})
            .await
    })
    .await
}

fn client(endpoints: &[String], key: &str, ca: Option<PathBuf>) -> Client {
    Client::new(&Config {
        endpoint: endpoints[0].clone(),
        endpoints: endpoints.to_vec(),
        api_key: Some(key.into()),
        ca_file: ca,
        endpoint_is_default: false,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_raft_over_tls() {
    let ec2_port = common::procs::free_port(IPS[0]);
    let mut nodes = Procs::new("controller-tls", &IPS, 3, |dir| {
        let d = dir.display();
        format!(
            "tls_cert_file = \"{d}/node.pem\"\ntls_key_file = \"{d}/node.key\"\n\
             tls_ca_file = \"{d}/ca.pem\"\nec2_listen = \"{{ip}}:{ec2_port}\"\n"
        )
    });
    let dir = nodes.dir.clone();
    make_ca(&dir, "ca");
    make_ca(&dir, "other-ca");
    make_node_cert(&dir, "ca");
    for i in 0..3 {
        nodes.spawn(i);
    }
    // The admin key appears once a leader is elected over TLS Raft.
    let key = nodes.admin_key(60).await;

    let https = nodes.urls(&[0, 1, 2]);
    let mut good = client(&https, &key, Some(dir.join("ca.pem")));
    // A write commits (replicated to a TLS peer) and reads back.
    let req = pb::RegisterImageRequest {
        name: "tls-image".into(),
        kernel_path: "/k".into(),
        ..Default::default()
    };
    good.call(|ch| {
        let req = req.clone();
        async move { ComputeClient::new(ch).register_image(req).await }
    })
    .await
    .unwrap_or_else(|e| panic!("RegisterImage over TLS: {e}\n{}", nodes.logs()));
    let images = good
        .call(|ch| async move {
            ComputeClient::new(ch)
                .describe_images(pb::DescribeImagesRequest::default())
                .await
        })
        .await
        .unwrap();
    assert!(images.images.iter().any(|i| i.name == "tls-image"));
    let status = cluster_status(&mut good).await.unwrap();
    assert_eq!(status.members.len(), 3);
    assert!(status.leader.is_some());

    // A client given only a follower follows it to the leader, over TLS.
    let ca = Some(dir.join("ca.pem"));
    let mut follower = None;
    for url in &https {
        let mut one = client(std::slice::from_ref(url), &key, ca.clone());
        let s = cluster_status(&mut one).await.unwrap();
        if s.node.is_some_and(|n| n.role == "follower") {
            follower = Some(url.clone());
            break;
        }
    }
    let follower = follower.expect("no follower among three nodes");
    let mut via_follower = client(&[follower], &key, ca);
    let req = pb::RegisterImageRequest {
        name: "via-follower".into(),
        kernel_path: "/k".into(),
        ..Default::default()
    };
    via_follower
        .call(|ch| {
            let req = req.clone();
            async move { ComputeClient::new(ch).register_image(req).await }
        })
        .await
        .unwrap_or_else(|e| panic!("a write through a follower over TLS: {e}"));
    assert!(via_follower.endpoint().starts_with("https://"));

    // The EC2 endpoint serves HTTPS with the same certificate, on every
    // node; a follower forwards to the leader over TLS.
    let made = good
        .call(|ch| async move {
            ComputeClient::new(ch)
                .create_api_key(pb::CreateApiKeyRequest {
                    name: "ec2-tls".into(),
                    role: "user".into(),
                    ..Default::default()
                })
                .await
        })
        .await
        .unwrap();
    let id = made.key.unwrap().id;
    let secret = made.ec2_secret_access_key;
    let ca_pem = std::fs::read(dir.join("ca.pem")).unwrap();
    let form = "Action=DescribeImages&Version=2016-11-15";
    for ip in IPS {
        let target = format!("{ip}:{ec2_port}");
        let (status, xml) =
            ferro_controller::ec2::post_signed(&target, Some(&ca_pem), form, &id, &secret, "local")
                .await
                .unwrap_or_else(|e| panic!("EC2 over HTTPS at {target}: {e}\n{}", nodes.logs()));
        assert_eq!(status, 200, "{target}: {xml}");
        assert!(xml.contains("<name>via-follower</name>"), "{target}: {xml}");
    }
    let target = format!("{}:{ec2_port}", IPS[0]);
    ferro_controller::ec2::post_signed(&target, None, form, &id, &secret, "local")
        .await
        .expect_err("plain HTTP reached the HTTPS EC2 endpoint");
    let other_ca = std::fs::read(dir.join("other-ca.pem")).unwrap();
    ferro_controller::ec2::post_signed(&target, Some(&other_ca), form, &id, &secret, "local")
        .await
        .expect_err("the EC2 endpoint's certificate passed for another CA's");

    // Plaintext to a TLS port, and TLS trusting another CA: refused.
    let plain = format!("http://{}", nodes.addrs[0]);
    let mut p = client(&[plain], &key, None);
    let e = cluster_status(&mut p)
        .await
        .expect_err("plaintext reached a TLS controller");
    eprintln!("plaintext: {e}");
    let mut other = client(&https[..1], &key, Some(dir.join("other-ca.pem")));
    let e = cluster_status(&mut other)
        .await
        .expect_err("a certificate from an untrusted CA was accepted");
    eprintln!("other CA: {e}");
}
