use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use super::*;
use crate::test_util::{is_root, TempDir};

const MIB: u64 = 1 << 20;

fn limits() -> Limits {
    Limits {
        vcpus: 2,
        memory_bytes: 256 * MIB,
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_string()
}

fn touch(path: &Path, content: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

/// A fake cgroup v2 mount: plain files where cgroupfs has control files.
fn fake_v2(controllers: &str) -> TempDir {
    let root = TempDir::new("cg2");
    touch(&root.path().join("cgroup.controllers"), controllers);
    touch(&root.path().join("cgroup.subtree_control"), "");
    root
}

/// A fake cgroup v1 hybrid mount with the cpu hierarchy at `cpu_dir`.
fn fake_v1(cpu_dir: &str) -> TempDir {
    let root = TempDir::new("cg1");
    touch(&root.path().join(cpu_dir).join("cpu.cfs_quota_us"), "-1");
    touch(
        &root.path().join("memory/memory.limit_in_bytes"),
        "9223372036854771712",
    );
    root
}

#[test]
fn v2_enables_controllers_and_writes_limits() {
    let root = fake_v2("cpuset cpu io memory pids");
    let mgr = CgroupManager::detect(root.path(), "machine/ferro").unwrap();
    assert_eq!(mgr.version(), CgroupVersion::V2);
    for dir in ["", "machine", "machine/ferro"] {
        assert_eq!(
            read(&root.path().join(dir).join("cgroup.subtree_control")),
            "+cpu +memory",
            "{dir}"
        );
    }
    let cg = mgr.create("i-1", &limits()).unwrap();
    let dir = root.path().join("machine/ferro/i-1");
    assert_eq!(cg.dirs(), std::slice::from_ref(&dir));
    assert_eq!(cg.procs_files(), [dir.join("cgroup.procs")]);
    assert_eq!(read(&dir.join("cpu.max")), "200000 100000");
    assert_eq!(read(&dir.join("memory.max")), (256 * MIB).to_string());
    assert_eq!(mgr.list(), ["i-1"]);
    assert_eq!(mgr.open("i-1"), Some(cg));
    assert_eq!(mgr.open("i-2"), None);
}

#[test]
fn v2_leaves_already_delegated_controllers_alone() {
    let root = fake_v2("cpu memory");
    fs::write(root.path().join("cgroup.subtree_control"), "cpu io memory").unwrap();
    CgroupManager::detect(root.path(), "ferro").unwrap();
    assert_eq!(
        read(&root.path().join("cgroup.subtree_control")),
        "cpu io memory"
    );
    assert_eq!(
        read(&root.path().join("ferro/cgroup.subtree_control")),
        "+cpu +memory"
    );
}

#[test]
fn v2_without_memory_controller_is_rejected() {
    let root = fake_v2("cpuset cpu io pids");
    let err = CgroupManager::detect(root.path(), "ferro").unwrap_err();
    assert!(
        matches!(
            err,
            CgroupError::MissingController {
                controller: "memory",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn v1_finds_combined_cpu_cpuacct_mount() {
    let root = fake_v1("cpu,cpuacct");
    let mgr = CgroupManager::detect(root.path(), "ferro").unwrap();
    assert_eq!(mgr.version(), CgroupVersion::V1);
    let expected = [
        root.path().join("cpu,cpuacct/ferro"),
        root.path().join("memory/ferro"),
    ];
    assert_eq!(mgr.parent_dirs(), expected);
    let cg = mgr
        .create(
            "vm_7",
            &Limits {
                vcpus: 3,
                memory_bytes: 64 * MIB,
            },
        )
        .unwrap();
    assert_eq!(read(&cg.dirs()[0].join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(&cg.dirs()[0].join("cpu.cfs_quota_us")), "300000");
    assert_eq!(
        read(&cg.dirs()[1].join("memory.limit_in_bytes")),
        (64 * MIB).to_string()
    );
}

#[test]
fn missing_hierarchies_are_reported() {
    let root = TempDir::new("cg0");
    let err = CgroupManager::detect(root.path(), "ferro").unwrap_err();
    assert!(
        matches!(
            err,
            CgroupError::MissingController {
                controller: "cpu",
                ..
            }
        ),
        "{err}"
    );
    touch(&root.path().join("cpu/cpu.cfs_quota_us"), "-1");
    let err = CgroupManager::detect(root.path(), "ferro").unwrap_err();
    assert!(
        matches!(
            err,
            CgroupError::MissingController {
                controller: "memory",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn bad_parent_and_ids_are_rejected() {
    let root = fake_v1("cpu");
    for parent in ["", "/abs", "..", "a/../b", "a b"] {
        let err = CgroupManager::detect(root.path(), parent).unwrap_err();
        assert!(
            matches!(err, CgroupError::InvalidParent(_)),
            "{parent:?}: {err}"
        );
    }
    let mgr = CgroupManager::detect(root.path(), "ferro").unwrap();
    for id in ["", ".", "..", "../escape", "a/b", "a.b", &"x".repeat(65)] {
        assert!(
            matches!(mgr.create(id, &limits()), Err(CgroupError::InvalidId(_))),
            "{id:?}"
        );
        assert!(
            matches!(mgr.remove(id), Err(CgroupError::InvalidId(_))),
            "{id:?}"
        );
        assert_eq!(mgr.open(id), None, "{id:?}");
    }
    assert!(!root.path().join("escape").exists());
    assert!(mgr.list().is_empty());
}

#[test]
fn zero_limits_are_rejected() {
    let root = fake_v1("cpu");
    let mgr = CgroupManager::detect(root.path(), "ferro").unwrap();
    let zero_cpu = Limits {
        vcpus: 0,
        memory_bytes: MIB,
    };
    let zero_mem = Limits {
        vcpus: 1,
        memory_bytes: 0,
    };
    assert!(matches!(
        mgr.create("a", &zero_cpu),
        Err(CgroupError::InvalidLimits { .. })
    ));
    assert!(matches!(
        mgr.create("a", &zero_mem),
        Err(CgroupError::InvalidLimits { .. })
    ));
    assert_eq!(mgr.open("a"), None);
}

#[test]
fn decimal_formatting_without_allocation() {
    let mut buf = [0u8; 10];
    assert_eq!(format_decimal(0, &mut buf), b"0");
    assert_eq!(format_decimal(7, &mut buf), b"7");
    assert_eq!(format_decimal(4_194_304, &mut buf), b"4194304");
    assert_eq!(format_decimal(u32::MAX, &mut buf), b"4294967295");
}

#[test]
fn pids_are_parsed_leniently() {
    assert_eq!(parse_pids("12\n7\n\n"), [12, 7]);
    assert!(parse_pids("").is_empty());
}

/// A manager on the real `/sys/fs/cgroup` under a unique parent, removed
/// (with every instance cgroup) on drop. Fails the test when not root.
struct RealParent(CgroupManager);

impl RealParent {
    fn new(tag: &str) -> Option<Self> {
        if !is_root() {
            // Tests never skip: a missing precondition fails them.
            panic!("precondition missing: real cgroup tests need root");
        }
        let parent = format!("ferro-test-{}-{tag}", std::process::id());
        Some(RealParent(
            CgroupManager::detect(Path::new("/sys/fs/cgroup"), &parent).unwrap(),
        ))
    }
}

impl Drop for RealParent {
    fn drop(&mut self) {
        for id in self.0.list() {
            let _ = self.0.remove(&id);
        }
        for dir in self.0.parent_dirs() {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// A `sleep` child killed and reaped on drop.
struct Sleeper(Child);

impl Sleeper {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        self.stop();
    }
}

fn expected_version() -> CgroupVersion {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    }
}

#[test]
fn real_create_limits_list_remove() {
    let Some(parent) = RealParent::new("limits") else {
        return;
    };
    let mgr = &parent.0;
    assert_eq!(mgr.version(), expected_version());
    let cg = mgr.create("inst-a", &limits()).unwrap();
    match mgr.version() {
        CgroupVersion::V2 => {
            assert_eq!(read(&cg.dirs()[0].join("cpu.max")), "200000 100000");
            assert_eq!(
                read(&cg.dirs()[0].join("memory.max")),
                (256 * MIB).to_string()
            );
        }
        CgroupVersion::V1 => {
            assert_eq!(read(&cg.dirs()[0].join("cpu.cfs_period_us")), "100000");
            assert_eq!(read(&cg.dirs()[0].join("cpu.cfs_quota_us")), "200000");
            assert_eq!(
                read(&cg.dirs()[1].join("memory.limit_in_bytes")),
                (256 * MIB).to_string()
            );
        }
    }
    // Re-creating updates the limits in place.
    mgr.create(
        "inst-a",
        &Limits {
            vcpus: 1,
            memory_bytes: 128 * MIB,
        },
    )
    .unwrap();
    let quota_file = if mgr.version() == CgroupVersion::V2 {
        "cpu.max"
    } else {
        "cpu.cfs_quota_us"
    };
    assert!(read(&cg.dirs()[0].join(quota_file)).starts_with("100000"));
    mgr.create("inst-b", &limits()).unwrap();
    assert_eq!(mgr.list(), ["inst-a", "inst-b"]);
    assert_eq!(mgr.open("inst-a"), Some(cg.clone()));
    assert!(cg.pids().is_empty());

    mgr.remove("inst-a").unwrap();
    assert!(cg.dirs().iter().all(|d| !d.exists()));
    assert_eq!(mgr.open("inst-a"), None);
    mgr.remove("inst-a").unwrap();
    assert_eq!(mgr.list(), ["inst-b"]);
}

#[test]
fn real_add_pid_then_remove_reports_busy() {
    let Some(parent) = RealParent::new("busy") else {
        return;
    };
    let mgr = &parent.0;
    let cg = mgr.create("inst-busy", &limits()).unwrap();
    let mut child = Sleeper(Command::new("sleep").arg("30").spawn().unwrap());
    let pid = child.0.id();
    cg.add_pid(pid).unwrap();
    assert_eq!(cg.pids(), [pid]);
    let proc_cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(proc_cgroup.contains("/inst-busy"), "{proc_cgroup}");

    let err = mgr.remove("inst-busy").unwrap_err();
    assert!(
        matches!(&err, CgroupError::Busy { pids, .. } if pids == &[pid]),
        "{err}"
    );
    assert!(err.to_string().contains(&pid.to_string()), "{err}");
    assert!(
        mgr.open("inst-busy").is_some(),
        "nothing removed while busy"
    );

    child.stop();
    mgr.remove("inst-busy").unwrap();
    assert_eq!(mgr.open("inst-busy"), None);
}

#[test]
fn real_join_from_pre_exec() {
    let Some(parent) = RealParent::new("preexec") else {
        return;
    };
    let cg = parent.0.create("inst-exec", &limits()).unwrap();
    let files = cg.procs_files_cstr();
    assert_eq!(files.len(), cg.procs_files().len());
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    // SAFETY: the hook only calls join_from_pre_exec, which is
    // async-signal-safe and touches no state shared with the parent.
    unsafe { cmd.pre_exec(move || join_from_pre_exec(&files)) };
    let child = Sleeper(cmd.spawn().unwrap());
    assert_eq!(cg.pids(), [child.0.id()]);
}

#[test]
fn pre_exec_join_failure_aborts_spawn() {
    let files = [CString::new("/nonexistent/cgroup.procs").unwrap()];
    let mut cmd = Command::new("true");
    // SAFETY: as above, the hook is async-signal-safe.
    unsafe { cmd.pre_exec(move || join_from_pre_exec(&files)) };
    let err = cmd.spawn().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
}
