//! ferro-blockd serving a volume to ferro-vmm over vhost-user-blk, with the
//! project's test guest under real KVM: the guest sees the serial and size,
//! reads the volume's sector 0, writes and flushes its pattern into the
//! file; then `kill -9` of blockd mid-run stalls the guest's I/O, the VMM
//! survives, and a restarted blockd serves the next read.
//!
//! Needs KVM and root; a missing precondition fails the test, naming it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferro_testkit::{fnv64, guest_elf, guest_write_pattern, require_kvm_root, scratch};

const SIZE: u64 = 1 << 20;

/// A child process killed (SIGKILL) and reaped on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_blockd(volume: &Path, socket: &Path, log: &Path) -> Proc {
    let _ = std::fs::remove_file(socket);
    let child = Command::new(env!("CARGO_BIN_EXE_ferro-blockd"))
        .arg("--volume")
        .arg(format!(
            "id=vol1,path={},size={SIZE},socket={}",
            volume.display(),
            socket.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("cannot start ferro-blockd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "ferro-blockd never bound {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Proc(child)
}

/// Console lines of the VMM so far (whole lines only).
fn console(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete.lines().map(str::to_string).collect()
}

/// Waits for a console line matching `pred`, failing if the VMM exits.
fn wait_line(vmm: &mut Proc, log: &Path, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(l) = console(log).into_iter().find(|l| pred(l)) {
            return l;
        }
        if let Ok(Some(status)) = vmm.0.try_wait() {
            panic!(
                "ferro-vmm exited ({status}) before {what}; console:\n{}",
                console(log).join("\n")
            );
        }
        assert!(
            Instant::now() < deadline,
            "no console line with {what} after 30 s; console:\n{}",
            console(log).join("\n")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn loop_hash(line: &str) -> &str {
    line.rsplit("fnv64=").next().unwrap_or_default().trim()
}

#[test]
fn guest_reads_writes_and_survives_a_blockd_restart() {
    require_kvm_root();
    let vmm_bin = ferro_testkit::workspace_bin("ferro-vmm", "ferro-vmm");
    let dir = scratch("blockd-vhost");
    let (volume, socket) = (dir.join("vol1.img"), dir.join("vol1.sock"));
    let (blockd_log, console_log) = (dir.join("blockd.log"), dir.join("console.log"));
    let data: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let file = std::fs::File::create(&volume).unwrap();
    file.set_len(SIZE).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &data, 0).unwrap();
    let mut blockd = start_blockd(&volume, &socket, &blockd_log);

    let mut vmm = Proc(
        Command::new(&vmm_bin)
            .args(["--kernel", guest_elf().to_str().unwrap(), "--memory", "128"])
            .args([
                "--cmdline",
                "console=ttyS0 ferro.write=vol1 ferro.blkloop=vol1",
            ])
            .arg("--vhost-user-blk")
            .arg(format!("socket={},id=vol1", socket.display()))
            .arg("--serial")
            .arg(format!("file:{}", console_log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("vmm.log")).unwrap())
            .spawn()
            .expect("cannot start ferro-vmm"),
    );
    let log = console_log.clone();
    let dev = wait_line(&mut vmm, &log, "the virtio-blk line", |l| {
        l.contains("virtio-blk serial=")
    });
    assert!(
        dev.contains("virtio-blk serial=vol1 sectors=2048 ro=0"),
        "{dev}"
    );

    let read = wait_line(&mut vmm, &log, "the sector 0 read", |l| {
        l.contains("read sector0")
    });
    let want = format!("fnv64={:016x}", fnv64(&data));
    assert!(
        read.contains(&want),
        "guest read the wrong data: {read} (want {want})"
    );

    let w = wait_line(&mut vmm, &log, "the write", |l| {
        l.contains("blk serial=vol1 write")
    });
    assert!(w.contains("write status=0 flush status=0"), "{w}");
    let written = std::fs::read(&volume).unwrap();
    assert_eq!(
        &written[..4096],
        &guest_write_pattern()[..],
        "pattern not in the volume file"
    );
    assert!(
        written[4096..].iter().all(|b| *b == 0),
        "guest wrote past sector 8"
    );

    let first = wait_line(&mut vmm, &log, "a loop read", |l| l.contains("loop=1 "));
    assert_eq!(
        loop_hash(&first),
        format!("{:016x}", fnv64(&guest_write_pattern()))
    );

    // kill -9 mid-run: the guest's next read stalls, the VMM lives on.
    blockd.0.kill().unwrap();
    blockd.0.wait().unwrap();
    let fresh: Vec<u8> = (0..4096u32).map(|i| (i % 13) as u8).collect();
    std::os::unix::fs::FileExt::write_all_at(&file, &fresh, 0).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        vmm.0.try_wait().unwrap().is_none(),
        "ferro-vmm died with its backend; console:\n{}",
        console(&log).join("\n")
    );
    let stalled = console(&log).len();
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        console(&log).len(),
        stalled,
        "guest I/O went on without a backend"
    );

    let _blockd = start_blockd(&volume, &socket, &dir.join("blockd2.log"));
    let want = format!("{:016x}", fnv64(&fresh));
    let resumed = wait_line(&mut vmm, &log, "a read after the restart", |l| {
        l.contains(" loop=") && loop_hash(l) == want
    });
    assert!(resumed.contains("blk serial=vol1"), "{resumed}");
    assert!(
        !console(&log).iter().any(|l| l.contains("panic")),
        "{}",
        console(&log).join("\n")
    );
    let _ = std::fs::remove_dir_all(PathBuf::from(&dir));
}
