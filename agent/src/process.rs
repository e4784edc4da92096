//! ferro-vmm processes: spawning them detached from the agent, watching
//! them through pidfds, and finding them again after an agent restart.
//!
//! A VMM runs in its own session (`setsid`) with a clean environment, in its
//! instance's cgroup (joined before `exec`), so it survives the agent. The
//! agent holds a pidfd for each VMM: it becomes readable when the process
//! exits, whether or not the VMM is the agent's child. Only for its own
//! children can the agent learn the exit status (`waitid(P_PIDFD)`); for a
//! VMM re-attached after an agent restart it cannot.

use std::ffi::{CString, OsString};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::machine::ExitInfo;
use crate::now_ms;

/// Errors spawning or watching a VMM.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// fork/exec failed.
    #[error("cannot spawn {path}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A log file could not be opened.
    #[error("cannot open {path}")]
    Log {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// pidfd_open failed.
    #[error("cannot open a pidfd for pid {pid}")]
    Pidfd {
        /// The process.
        pid: u32,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Everything needed to start one VMM.
#[derive(Clone, Debug)]
pub struct VmmCommand {
    /// The ferro-vmm binary.
    pub binary: PathBuf,
    /// Its arguments (the console and control socket included).
    pub args: Vec<OsString>,
    /// Where its stderr is appended.
    pub stderr_log: PathBuf,
    /// `cgroup.procs` files it joins before exec.
    pub cgroup_procs: Vec<CString>,
    /// Its `FERRO_LOG`.
    pub log_filter: String,
}

/// A VMM process the agent watches.
#[derive(Debug)]
pub struct Vmm {
    /// Its pid.
    pub pid: u32,
    /// Its pidfd.
    pub pidfd: OwnedFd,
    /// Unix ms when the agent started (or re-attached to) it.
    pub since_ms: u64,
}

/// Spawn a VMM in its own session and cgroup; returns once it has exec'd.
pub fn spawn(cmd: &VmmCommand) -> Result<Vmm, ProcessError> {
    let stderr = File::options()
        .create(true)
        .append(true)
        .open(&cmd.stderr_log)
        .map_err(|source| ProcessError::Log {
            path: cmd.stderr_log.clone(),
            source,
        })?;
    let procs = cmd.cgroup_procs.clone();
    let mut c = Command::new(&cmd.binary);
    c.args(&cmd.args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("FERRO_LOG", &cmd.log_filter)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .current_dir("/");
    // SAFETY: the hook runs in the forked child before exec and only makes
    // async-signal-safe calls (setsid, and open/write/close in
    // join_from_pre_exec), allocating nothing.
    unsafe {
        c.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            ferro_hostops::cgroup::join_from_pre_exec(&procs)
        });
    }
    let child = c.spawn().map_err(|source| ProcessError::Spawn {
        path: cmd.binary.clone(),
        source,
    })?;
    let pid = child.id();
    // The Child is dropped without waiting: the pidfd reaps it.
    drop(child);
    let pidfd = pidfd_open(pid)?;
    Ok(Vmm {
        pid,
        pidfd,
        since_ms: now_ms(),
    })
}

/// Open a pidfd for `pid`.
pub fn pidfd_open(pid: u32) -> Result<OwnedFd, ProcessError> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(ProcessError::Pidfd {
            pid,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Send `signal` through a pidfd (never hits a recycled pid).
pub fn signal(pidfd: &OwnedFd, signal: i32) {
    // SAFETY: pidfd is a valid pidfd; a null siginfo is allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(error = %e, "pidfd_send_signal failed");
        }
    }
}

/// Wait until the process behind `pidfd` exits; reap it when it is a child.
pub async fn wait_exit(pidfd: OwnedFd) -> ExitInfo {
    // SAFETY: an OwnedFd stays open and returns the same fd until it is
    // dropped, which happens only when the AsyncFd is dropped.
    let registered = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) };
    match registered {
        Ok(afd) => {
            // A pidfd polls readable once the process has exited.
            let _ = afd.readable().await;
            reap(afd.get_ref())
        }
        Err(e) => {
            let (pidfd, error) = e.into_parts();
            tracing::error!(%error, "cannot watch a pidfd; polling");
            while alive(&pidfd) {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            reap(&pidfd)
        }
    }
}

fn alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        ) == 0
    }
}

/// `waitid(P_PIDFD)`: the status of an exited child, unknown otherwise.
fn reap(pidfd: &OwnedFd) -> ExitInfo {
    // SAFETY: an all-zero siginfo_t is a valid value to be overwritten.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: info is a valid, writable siginfo_t; pidfd is a pidfd.
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    let mut exit = ExitInfo {
        known: false,
        code: None,
        signal: None,
        at_unix_ms: now_ms(),
    };
    if r == 0 {
        // SAFETY: waitid filled info for an exited child (si_pid != 0) or
        // left it zeroed; both are readable.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid != 0 {
            exit.known = true;
            if info.si_code == libc::CLD_EXITED {
                exit.code = Some(status);
            } else {
                exit.signal = Some(status);
            }
        }
    }
    exit
}

/// The start time (clock ticks since boot) of `pid`, from `/proc/<pid>/stat`.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), which ends at
    // the last ')'. starttime is field 22, the 20th after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Whether `pid` is a ferro-vmm serving control socket `socket`.
pub fn is_vmm_for(pid: u32, socket: &Path) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    let want = socket.as_os_str().as_encoded_bytes();
    let is_vmm = args
        .first()
        .is_some_and(|a0| a0.ends_with(b"ferro-vmm") || a0.ends_with(b"ferro-vmm (deleted)"));
    is_vmm
        && args
            .windows(2)
            .any(|w| w[0] == b"--control-socket" && w[1] == want)
}

/// Find the live VMM of an instance: first the recorded pid, then any
/// process whose command line names the instance's control socket.
pub fn find_vmm(recorded: Option<u32>, socket: &Path) -> Option<u32> {
    if let Some(pid) = recorded.filter(|p| is_vmm_for(*p, socket)) {
        return Some(pid);
    }
    let dir = std::fs::read_dir("/proc").ok()?;
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| is_vmm_for(*pid, socket))
}

/// Re-attach to a VMM found by [`find_vmm`]: open its pidfd, then check
/// again that the pid still is that VMM (closing the reuse race).
pub fn attach(pid: u32, socket: &Path) -> Option<Vmm> {
    let pidfd = pidfd_open(pid).ok()?;
    is_vmm_for(pid, socket).then(|| Vmm {
        pid,
        pidfd,
        since_ms: now_ms(),
    })
}

/// Read at most the last `max` bytes of a file; also whether it holds more.
pub fn read_tail(path: &Path, max: u64) -> std::io::Result<(Vec<u8>, bool)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity((len - start) as usize);
    f.take(max).read_to_end(&mut buf)?;
    Ok((buf, start > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable() {
        assert!(start_time(std::process::id()).is_some());
    }

    #[test]
    fn this_process_is_not_a_vmm() {
        assert!(!is_vmm_for(std::process::id(), Path::new("/x.sock")));
        assert_eq!(find_vmm(None, Path::new("/nonexistent/ferro.sock")), None);
    }

    #[tokio::test]
    async fn exit_status_of_a_child_is_known() {
        let cmd = VmmCommand {
            binary: "/bin/sh".into(),
            args: vec!["-c".into(), "exit 3".into()],
            stderr_log: std::env::temp_dir().join(format!("ferro-agent-ut-{}", std::process::id())),
            cgroup_procs: vec![],
            log_filter: String::new(),
        };
        let vmm = spawn(&cmd).unwrap();
        let exit = wait_exit(vmm.pidfd).await;
        assert_eq!(exit.code, Some(3));
        let cmd = VmmCommand {
            args: vec!["-c".into(), "kill -9 $$".into()],
            ..cmd
        };
        let vmm = spawn(&cmd).unwrap();
        let exit = wait_exit(vmm.pidfd).await;
        assert_eq!(exit.signal, Some(9));
        let _ = std::fs::remove_file(&cmd.stderr_log);
    }
}
