//! Bad input: one clear error line naming what was wrong, a non-zero exit
//! status, no panic.

mod common;

use std::process::Command;

use common::*;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferro-vmm"))
        .args(args)
        .args(["--serial", "null"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "ferro-vmm panicked: {err}");
    (out.status.code().unwrap_or(-1), err)
}

fn assert_error(args: &[&str], needle: &str) {
    let (code, err) = run(args);
    assert_ne!(code, 0, "{args:?} must fail");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "want one error line, got: {err}");
    assert!(
        lines[0].contains(needle),
        "error `{}` should mention `{needle}`",
        lines[0]
    );
}

#[test]
fn missing_and_garbage_kernels() {
    require_kvm_root();
    assert_error(
        &["--kernel", "/nonexistent/vmlinux"],
        "/nonexistent/vmlinux",
    );
    let dir = scratch("bad-kernel");
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, vec![0x5au8; 64 * 1024]).unwrap();
    assert_error(
        &["--kernel", garbage.to_str().unwrap()],
        "not a loadable ELF vmlinux or bzImage",
    );
    assert_error(&[], "no kernel given");
}

#[test]
fn bad_sizes_and_specs() {
    let elf = guest_elf();
    let k = elf.to_str().unwrap();
    assert_error(&["--kernel", k, "--memory", "4"], "memory must be between");
    assert_error(&["--kernel", k, "--vcpus", "0"], "vcpus must be between");
    assert_error(&["--kernel", k, "--vcpus", "64"], "vcpus must be between");
    assert_error(&["--kernel", k, "--disk", "ro=on"], "missing path");
    assert_error(
        &["--kernel", k, "--net", "tap=t0,mac=zz"],
        "invalid MAC address",
    );
}

#[test]
fn missing_tap_and_unreadable_disk() {
    require_kvm_root();
    let elf = guest_elf();
    let k = elf.to_str().unwrap();
    assert_error(
        &["--kernel", k, "--disk", "path=/nonexistent/disk.img"],
        "cannot open disk /nonexistent/disk.img",
    );
    // A TAP name that cannot exist in a fresh namespace where we may not create it:
    // the VMM opens TAPs it is given, it does not invent them.
    let ns = format!("fvb{}", std::process::id());
    let _ = ferro_testkit::tool("ip")
        .args(["netns", "add", &ns])
        .output();
    let out = ferro_testkit::tool("ip")
        .args([
            "netns",
            "exec",
            &ns,
            env!("CARGO_BIN_EXE_ferro-vmm"),
            "--kernel",
            k,
            "--serial",
            "null",
            "--net",
            "tap=nosuchtap0",
        ])
        .output()
        .unwrap();
    let _ = ferro_testkit::tool("ip")
        .args(["netns", "del", &ns])
        .output();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a missing TAP must fail: {err}");
    assert!(err.contains("nosuchtap0"), "error must name the TAP: {err}");
}

#[test]
fn bad_config_file() {
    let dir = scratch("bad-config");
    let cfg = dir.join("vm.toml");
    std::fs::write(&cfg, "vcpus = 2\nmemroy_mib = 64\n").unwrap();
    assert_error(&["--config", cfg.to_str().unwrap()], "memroy_mib");
}

#[test]
fn bad_vhost_user_blk_specs_and_missing_backend() {
    let elf = guest_elf();
    let k = elf.to_str().unwrap();
    for (spec, needle) in [
        ("id=vol1", "missing socket="),
        ("socket=/run/v.sock", "missing id="),
        ("socket=/run/v.sock,id=vol1,ro=on", "unknown key `ro`"),
        (
            "socket=/run/v.sock,id=abcdefghijklmnopqrstu",
            "longer than 20 bytes",
        ),
    ] {
        assert_error(&["--kernel", k, "--vhost-user-blk", spec], needle);
        let (code, _) = run(&["--kernel", k, "--vhost-user-blk", spec]);
        assert_eq!(code, 2, "a bad --vhost-user-blk is a config error: {spec}");
    }
    require_kvm_root();
    assert_error(
        &[
            "--kernel",
            k,
            "--vhost-user-blk",
            "socket=/nonexistent/v.sock,id=vol1",
        ],
        "vhost-user-blk disk vol1: cannot set up vhost-user-blk backend /nonexistent/v.sock",
    );
}
