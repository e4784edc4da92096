//! Image registration of a large root disk: a caller that gives up (the
//! controller's call timing out on a slow host) does not make the next
//! call copy and hash the same image beside the first; that call waits for
//! the work in progress and finds the image.

mod common;

use std::time::Duration;

use common::*;
use ferro_proto::agent::v1 as pb;
use tonic::Code;

/// Work directories of registrations in progress under `images/`.
fn work_dirs(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_given_up_on_is_not_started_again_beside_itself() {
    let agent = Agent::start("images", "fti0", "");
    // 256 MiB of data (no holes, no zero blocks): copying and hashing it
    // takes a while, even optimised.
    let disk = agent.state_dir.join("big.img");
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251 + 1) as u8).collect();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&disk).unwrap();
        for _ in 0..256 {
            f.write_all(&block).unwrap();
        }
    }
    let req = pb::RegisterImageRequest {
        id: "big".into(),
        kernel_path: guest_elf().display().to_string(),
        rootdisk_path: disk.display().to_string(),
        ..Default::default()
    };
    let mut c = agent.client().await;
    let first = tokio::time::timeout(
        Duration::from_millis(100),
        c.clone().register_image(req.clone()),
    )
    .await;
    assert!(
        first.is_err(),
        "registering 256 MiB took under 100 ms: the test needs a larger disk"
    );
    let images = agent.state_dir.join("images");
    let second = tokio::spawn(async move { c.register_image(req).await });
    let mut most = 0;
    while !second.is_finished() {
        most = most.max(work_dirs(&images));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match second.await.unwrap() {
        Ok(_) => {}
        Err(e) => assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message()),
    }
    assert!(most <= 1, "{most} copies of one image were made at once");
    assert_eq!(work_dirs(&images), 0, "a work directory was left behind");
    let mut c = agent.client().await;
    let listed = c
        .list_images(pb::ListImagesRequest {})
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "big");
    assert!(listed[0].rootdisk_sha256.len() == 64);
}
