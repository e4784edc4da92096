//! Run an ad-hoc Linux-guest scenario: `cargo run -p ferro-linux-guest
//! --example scenario -- L2_SCRIPT L1_SCRIPT [L1_MEMORY_MIB] [L1_CPUS]`.
//! The scripts are files holding the L2 `/init` body and the L1 body (see
//! the crate docs for the helpers both can use). L1 sees the L2 kernels at
//! /l2/vmlinux and /l2/bzImage and the L2 image at /l2/initrd. Uses the
//! release ferro-vmm (`cargo build --release -p ferro-vmm` first); with
//! `FIRECRACKER=PATH` that binary is at /bin/firecracker too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferro_linux_guest::{l2, work_dir, GuestKernel, Qemu, L1, VIRTIO_MODULES};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: scenario L2_SCRIPT L1_SCRIPT [L1_MEMORY_MIB] [L1_CPUS]");
        std::process::exit(2);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let k =
        GuestKernel::locate(&root.join("target/guest-kernel")).unwrap_or_else(|e| panic!("{e}"));
    let dir = work_dir(&root, "scenario");
    let img2 = l2(&k, VIRTIO_MODULES, &read(&args[1]))
        .and_then(|u| u.write(&dir.join("l2.cpio"), "L2"))
        .unwrap_or_else(|e| panic!("{e}"));
    let rel = |name: &str| -> PathBuf { root.join("target/release").join(name) };
    let mut l1 =
        L1::new(&k, &[], &rel("ferro-vmm"), &rel("ferro-vmmctl")).unwrap_or_else(|e| panic!("{e}"));
    // A peer VMM to compare with, e.g. FIRECRACKER=/path/to/firecracker.
    if let Some(fc) = std::env::var_os("FIRECRACKER") {
        l1.userland()
            .binary(Path::new(&fc), "bin/firecracker")
            .unwrap_or_else(|e| panic!("{e}"));
    }
    l1.userland()
        .file(&k.vmlinux, "l2/vmlinux")
        .file(&k.bzimage, "l2/bzImage")
        .file(&img2, "l2/initrd");
    l1.script(&read(&args[2]));
    let img1 = l1
        .write(&dir.join("l1.cpio"))
        .unwrap_or_else(|e| panic!("{e}"));
    let mem = args.get(3).map_or(1024, |s| s.parse().expect("memory MiB"));
    let cpus = args.get(4).map_or(1, |s| s.parse().expect("cpus"));
    let c = Qemu::new(&k.bzimage, &img1)
        .memory_mib(mem)
        .cpus(cpus)
        .timeout(Duration::from_secs(600))
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("L1 run took {:.1} s", c.secs);
}
