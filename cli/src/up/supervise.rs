//! Daemons run by `ferro up` as child processes: spawned in their own
//! process group (so a terminal's Ctrl-C reaches only `ferro`, which then
//! shuts them down in order), logging to a file, stopped with SIGTERM and
//! then SIGKILL, and killed if dropped while running.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A daemon could not be run or stopped.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// Its log file could not be created.
    #[error("cannot create the log file {}", .0.display())]
    Log(PathBuf, #[source] std::io::Error),
    /// The binary could not be started.
    #[error("cannot start {}", .0.display())]
    Spawn(PathBuf, #[source] std::io::Error),
    /// It exited on its own.
    #[error("{name} exited ({status}); last lines of {}:\n{tail}", log.display())]
    Exited {
        /// Which daemon.
        name: String,
        /// How it ended.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
        /// The log's last lines.
        tail: String,
    },
    /// Waiting for it failed.
    #[error("cannot wait for {0}")]
    Wait(String, #[source] std::io::Error),
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `program args…` with stdout and stderr appended to `log`
    /// and `envs` added to the environment.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Result<Self, SuperviseError> {
        use std::os::unix::process::CommandExt;
        let open = || {
            File::options()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|e| SuperviseError::Log(log.to_path_buf(), e))
        };
        let child = Command::new(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(open()?)
            .stderr(open()?)
            .process_group(0)
            .spawn()
            .map_err(|e| SuperviseError::Spawn(program.to_path_buf(), e))?;
        Ok(Self {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    /// Its name, e.g. `ferro-agent`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// An error if it has exited on its own.
    pub fn check(&mut self) -> Result<(), SuperviseError> {
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        match child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.child = None;
                Err(SuperviseError::Exited {
                    name: self.name.clone(),
                    status,
                    log: self.log.clone(),
                    tail: tail(&self.log, 15),
                })
            }
            Err(e) => Err(SuperviseError::Wait(self.name.clone(), e)),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns how it ended (`None`
    /// when it had already been reaped).
    pub fn stop(&mut self, grace: Duration) -> Result<Option<ExitStatus>, SuperviseError> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let wait_err = |e| SuperviseError::Wait(self.name.clone(), e);
        if let Some(status) = child.try_wait().map_err(wait_err)? {
            return Ok(Some(status));
        }
        signal(&child, libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().map_err(wait_err)? {
                return Ok(Some(status));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().map(Some).map_err(wait_err)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(child.id()) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
    // own unreaped child, so it cannot have been reused.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The last `n` lines of a file, or a note that it cannot be read.
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read it: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferro-cli-sup-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn stop_terminates_with_sigterm() {
        let d = tmp("term");
        let log = d.join("log");
        let mut dm = Daemon::spawn(
            "sleeper",
            Path::new("/bin/sh"),
            &["-c".into(), "echo hi; exec sleep 30".into()],
            &[],
            &log,
        )
        .unwrap();
        dm.check().unwrap();
        let t0 = Instant::now();
        while tail(&log, 1) != "hi" && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let st = dm.stop(Duration::from_secs(5)).unwrap().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGTERM));
        assert_eq!(tail(&log, 5), "hi");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn stop_kills_after_the_grace_period() {
        let d = tmp("kill");
        let log = d.join("log");
        let script = "trap '' TERM; echo ready; while :; do sleep 0.05; done";
        let mut dm = Daemon::spawn(
            "stubborn",
            Path::new("/bin/sh"),
            &["-c".into(), script.into()],
            &[],
            &log,
        )
        .unwrap();
        // Let the trap be installed.
        let t0 = Instant::now();
        while tail(&log, 1) != "ready" && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let st = dm.stop(Duration::from_millis(300)).unwrap().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn early_exit_is_reported_with_the_log_tail() {
        let d = tmp("exit");
        let log = d.join("log");
        let mut dm = Daemon::spawn(
            "failing",
            Path::new("/bin/sh"),
            &["-c".into(), "echo bad config >&2; exit 2".into()],
            &[],
            &log,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let msg = dm.check().unwrap_err().to_string();
        assert!(msg.starts_with("failing exited (exit status: 2)"), "{msg}");
        assert!(msg.ends_with("bad config"), "{msg}");
        let _ = std::fs::remove_dir_all(d);
    }
}
