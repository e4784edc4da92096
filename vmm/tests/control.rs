//! The control socket: status, pause, resume, graceful shutdown, stop.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn pause_resume_and_graceful_shutdown() {
    require_kvm_root();
    let dir = scratch("control");
    let mut vmm = VmmBuilder::new(&guest_elf(), &dir)
        .args(&[
            "--memory",
            "64",
            "--cmdline",
            "console=ttyS0 ferro.exit=idle",
        ])
        .spawn();
    vmm.wait_line("ferro-guest: selftest done", Duration::from_secs(30));
    assert_eq!(vmm.control(r#"{"op":"status"}"#)["state"], "running");

    let paused = vmm.control(r#"{"op":"pause"}"#);
    assert_eq!(paused["state"], "paused", "{paused}");
    assert_eq!(vmm.control(r#"{"op":"status"}"#)["state"], "paused");
    assert_eq!(
        vmm.control(r#"{"op":"pause"}"#)["ok"],
        true,
        "pausing twice is harmless"
    );
    let resumed = vmm.control(r#"{"op":"resume"}"#);
    assert_eq!(resumed["state"], "running", "{resumed}");
    assert_eq!(
        vmm.control(r#"{"op":"resume"}"#)["ok"],
        false,
        "resume while running"
    );

    let bad = vmm.control(r#"{"op":"explode"}"#);
    assert_eq!(bad["ok"], false);
    assert!(bad["error"].as_str().unwrap().contains("explode"), "{bad}");

    // The guest answers Ctrl-Alt-Del by resetting: a graceful shutdown.
    let down = vmm.control(r#"{"op":"shutdown","timeout_ms":10000}"#);
    assert_eq!(
        down["graceful"],
        true,
        "{down}\nconsole:\n{}",
        vmm.console_text()
    );
    assert!(vmm.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn hard_stop_ends_the_process() {
    require_kvm_root();
    let dir = scratch("stop");
    let mut vmm = VmmBuilder::new(&guest_elf(), &dir)
        .args(&[
            "--memory",
            "64",
            "--cmdline",
            "console=ttyS0 ferro.exit=idle",
        ])
        .spawn();
    vmm.wait_line("ferro-guest: hello", Duration::from_secs(30));
    assert_eq!(vmm.control(r#"{"op":"stop"}"#)["ok"], true);
    assert!(vmm.wait_exit(Duration::from_secs(10)).success());
}
