//! A harness client speaking vhost-user to blockd directly, no VMM and no
//! KVM: ferro-vmm's own vhost-user-blk frontend over memfd guest memory
//! ([`VhostUserBlkHarness`]), against a volume served in this process.
//! The same harness drives `cargo xtask bench blockd`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferro_blockd::server::Volume;
use ferro_blockd::store::{LocalFile, Store};
use ferro_testkit::scratch;
use ferro_virtio::testing::VhostUserBlkHarness;

const SIZE: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(10);

/// Serves `path` on `socket` for one frontend, on a thread.
fn serve_one(path: &Path, socket: &Path) -> std::thread::JoinHandle<()> {
    let store: Arc<dyn Store> = Arc::new(LocalFile::open_or_create(path, SIZE).unwrap());
    let mut volume = Volume::with_store("vol1", socket, store).unwrap();
    std::thread::spawn(move || volume.serve_one().unwrap())
}

/// Waits for `n` completions, all successful.
fn complete(h: &mut VhostUserBlkHarness, n: usize) -> Vec<(usize, u32, u8)> {
    let mut done = Vec::new();
    while done.len() < n {
        done.extend(h.wait(WAIT).expect("the backend completes"));
    }
    assert!(done.iter().all(|&(_, _, status)| status == 0), "{done:?}");
    done
}

#[test]
fn requests_at_depth_reach_the_file_and_read_back() {
    let dir = scratch("blockd-harness");
    let (path, socket) = (dir.join("vol1.img"), dir.join("vol1.sock"));
    let server = serve_one(&path, &socket);
    let mut h = VhostUserBlkHarness::connect(&socket, 16, 4096).unwrap();
    assert_eq!(h.capacity(), SIZE / 512);

    for slot in 0..8 {
        h.set_data(slot, &[slot as u8 + 1; 4096]);
        h.push_write(slot, slot as u64 * 8, 4096);
    }
    h.kick().unwrap();
    complete(&mut h, 8);
    let file = std::fs::read(&path).unwrap();
    for i in 0..8 {
        assert_eq!(file[i * 4096..(i + 1) * 4096], [i as u8 + 1; 4096]);
    }

    for slot in 8..16 {
        h.push_read(slot, (15 - slot as u64) * 8, 4096);
    }
    h.kick().unwrap();
    let done = complete(&mut h, 8);
    for (slot, len, _) in done {
        assert_eq!(len, 4096 + 1, "data and status written");
        assert_eq!(h.data(slot, 4096), vec![16 - slot as u8; 4096]);
    }

    // The frontend going away ends the backend's connection.
    drop(h);
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
