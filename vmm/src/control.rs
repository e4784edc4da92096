//! The control socket through which the host agent drives a VMM process.
//!
//! Protocol: a Unix stream socket; each request is one line of JSON, each
//! answer one line of JSON. See `docs/vmm-control.md`.
//!
//! | request | answer |
//! | --- | --- |
//! | `{"op":"status"}` | `{"ok":true,"state":"booting"\|"running"\|"paused"\|"stopped"}` |
//! | `{"op":"pause"}` | `{"ok":true,"state":"paused"}` once every vCPU is parked |
//! | `{"op":"resume"}` | `{"ok":true,"state":"running"}` |
//! | `{"op":"shutdown","timeout_ms":N}` | Ctrl-Alt-Del to the guest; after N ms (default 10000) without a reset, a hard stop. `{"ok":true,"graceful":bool}` |
//! | `{"op":"stop"}` | `{"ok":true,"state":"stopped"}`; the process then exits with status 0 |
//!
//! Anything else gets `{"ok":false,"error":"..."}` naming what was wrong.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::Killable;

use crate::devices::i8042::I8042;
use crate::devices::{ExitReason, ExitSignal};
use crate::vcpu::{kick_signal, RunState, VcpuControl};

/// Longest request line accepted.
const MAX_REQUEST: usize = 4096;
/// Default grace period for `shutdown`.
pub const DEFAULT_SHUTDOWN_TIMEOUT_MS: u64 = 10_000;

/// What the VM is doing, as reported to the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// vCPUs started; the guest has not written to its console yet.
    Booting,
    /// The guest is running.
    Running,
    /// vCPUs are parked.
    Paused,
    /// The VM has ended; the process is exiting.
    Stopped,
}

/// A control request.
#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    /// Report the state.
    Status,
    /// Park all vCPUs.
    Pause,
    /// Un-park them.
    Resume,
    /// Ask the guest to shut down, then stop it after the timeout.
    Shutdown {
        /// Grace period in milliseconds.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// End the VM now.
    Stop,
}

/// A control answer.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The state after the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<VmState>,
    /// For `shutdown`: whether the guest went down by itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graceful: Option<bool>,
    /// What went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The VM-wide handles the control socket acts on.
pub struct VmStatus {
    control: Arc<VcpuControl>,
    first_output: Arc<AtomicBool>,
    i8042: Arc<Mutex<I8042>>,
    exit: ExitSignal,
    vcpu_threads: Vec<libc::pthread_t>,
    stopped: AtomicBool,
    answering: AtomicBool,
    shutdown_asked: AtomicBool,
}

struct Pthread(libc::pthread_t);

// SAFETY: the handle names a vCPU thread of this process; vCPU threads are
// never joined or detached before the process exits, so it stays valid.
unsafe impl Killable for Pthread {
    fn pthread_handle(&self) -> libc::pthread_t {
        self.0
    }
}

impl VmStatus {
    /// Wrap the VM's handles.
    pub fn new(
        control: Arc<VcpuControl>,
        first_output: Arc<AtomicBool>,
        i8042: Arc<Mutex<I8042>>,
        exit: ExitSignal,
        vcpu_threads: Vec<libc::pthread_t>,
    ) -> Self {
        Self {
            control,
            first_output,
            i8042,
            exit,
            vcpu_threads,
            stopped: AtomicBool::new(false),
            answering: AtomicBool::new(false),
            shutdown_asked: AtomicBool::new(false),
        }
    }

    /// Whether a graceful shutdown was asked: a guest that then resets (as
    /// many answer Ctrl-Alt-Del) was stopped, not rebooted.
    pub fn shutdown_asked(&self) -> bool {
        self.shutdown_asked.load(Ordering::SeqCst)
    }

    /// The current state.
    pub fn state(&self) -> VmState {
        if self.stopped.load(Ordering::SeqCst) || self.exit.reason().is_some() {
            VmState::Stopped
        } else if self.control.get() == RunState::Paused {
            VmState::Paused
        } else if self.first_output.load(Ordering::Relaxed) {
            VmState::Running
        } else {
            VmState::Booting
        }
    }

    /// Wait (bounded) until no control answer is being written, so that the
    /// request that ended the VM still gets its answer before the process
    /// exits.
    pub fn drain(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.answering.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Mark the VM stopped.
    pub fn set_stopped(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// Make every vCPU leave `KVM_RUN` so it sees the new run state.
    pub fn kick_all(&self) {
        for t in &self.vcpu_threads {
            let _ = Pthread(*t).kill(kick_signal());
        }
    }

    fn pause(&self) -> Response {
        if self.state() == VmState::Stopped {
            return err("the VM is stopped");
        }
        self.control.set(RunState::Paused);
        self.kick_all();
        self.control.wait_parked(self.vcpu_threads.len());
        ok(self.state())
    }

    fn resume(&self) -> Response {
        if self.state() != VmState::Paused {
            return err("the VM is not paused");
        }
        self.control.set(RunState::Running);
        ok(self.state())
    }

    fn shutdown(&self, timeout: Duration) -> Response {
        if self.state() == VmState::Stopped {
            return err("the VM is stopped");
        }
        if self.state() == VmState::Paused {
            self.control.set(RunState::Running);
        }
        self.shutdown_asked.store(true, Ordering::SeqCst);
        self.i8042
            .lock()
            .expect("i8042 poisoned")
            .send_ctrl_alt_del();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && self.exit.reason().is_none() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let graceful = self.exit.reason().is_some();
        if !graceful {
            tracing::warn!("guest ignored the shutdown request; stopping it");
            self.exit.request(ExitReason::Stopped);
        }
        Response {
            ok: true,
            state: Some(VmState::Stopped),
            graceful: Some(graceful),
            error: None,
        }
    }

    /// Carry out one request.
    pub fn handle(&self, req: Request) -> Response {
        match req {
            Request::Status => ok(self.state()),
            Request::Pause => self.pause(),
            Request::Resume => self.resume(),
            Request::Shutdown { timeout_ms } => self.shutdown(Duration::from_millis(
                timeout_ms.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT_MS),
            )),
            Request::Stop => {
                self.exit.request(ExitReason::Stopped);
                ok(VmState::Stopped)
            }
        }
    }
}

fn ok(state: VmState) -> Response {
    Response {
        ok: true,
        state: Some(state),
        ..Default::default()
    }
}

fn err(msg: impl Into<String>) -> Response {
    Response {
        ok: false,
        error: Some(msg.into()),
        ..Default::default()
    }
}

/// Parse one request line into a request or an error answer.
pub fn parse_request(line: &str) -> Result<Request, Response> {
    if line.len() > MAX_REQUEST {
        return Err(err(format!("request longer than {MAX_REQUEST} bytes")));
    }
    serde_json::from_str(line).map_err(|e| err(format!("invalid request: {e}")))
}

/// The listening socket and the VM it controls.
pub struct ControlServer {
    listener: UnixListener,
    status: Arc<VmStatus>,
}

impl ControlServer {
    /// Bind `path`, replacing a stale socket file.
    pub fn bind(path: &Path, status: Arc<VmStatus>) -> std::io::Result<Self> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        Ok(Self {
            listener: UnixListener::bind(path)?,
            status,
        })
    }

    /// Serve connections one at a time until the process exits.
    pub fn serve(self) {
        for conn in self.listener.incoming() {
            match conn {
                Ok(stream) => self.serve_one(stream),
                Err(e) => tracing::warn!(error = %e, "control socket accept failed"),
            }
        }
    }

    fn serve_one(&self, stream: UnixStream) {
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        let reader = BufReader::new(stream.take_while_limited());
        for line in reader.lines() {
            let Ok(line) = line else { return };
            if line.trim().is_empty() {
                continue;
            }
            self.status.answering.store(true, Ordering::SeqCst);
            let resp = match parse_request(line.trim()) {
                Ok(req) => self.status.handle(req),
                Err(resp) => resp,
            };
            let mut out = serde_json::to_vec(&resp).expect("response serializes");
            out.push(b'\n');
            let written = writer.write_all(&out);
            self.status.answering.store(false, Ordering::SeqCst);
            if written.is_err() {
                return;
            }
        }
    }
}

trait Limited {
    fn take_while_limited(self) -> std::io::Take<UnixStream>;
}

impl Limited for UnixStream {
    /// Cap what one connection may send, so a client cannot grow our memory.
    fn take_while_limited(self) -> std::io::Take<UnixStream> {
        std::io::Read::take(self, 1 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse_request(r#"{"op":"status"}"#).unwrap(),
            Request::Status
        );
        assert_eq!(
            parse_request(r#"{"op":"shutdown","timeout_ms":5}"#).unwrap(),
            Request::Shutdown {
                timeout_ms: Some(5)
            }
        );
        let e = parse_request(r#"{"op":"explode"}"#).unwrap_err();
        assert!(!e.ok && e.error.unwrap().contains("explode"));
        assert!(parse_request("not json").is_err());
        assert!(parse_request(&"x".repeat(5000))
            .unwrap_err()
            .error
            .unwrap()
            .contains("longer"));
    }

    #[test]
    fn state_transitions() {
        let exit = ExitSignal::new().unwrap();
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kbd = Arc::new(Mutex::new(I8042::new(exit.clone(), irq)));
        let first = Arc::new(AtomicBool::new(false));
        let s = VmStatus::new(
            Arc::new(VcpuControl::default()),
            first.clone(),
            kbd,
            exit.clone(),
            vec![],
        );
        assert_eq!(s.state(), VmState::Booting);
        first.store(true, Ordering::Relaxed);
        assert_eq!(s.handle(Request::Status).state, Some(VmState::Running));
        assert!(!s.handle(Request::Resume).ok, "resume while running");
        assert_eq!(s.handle(Request::Pause).state, Some(VmState::Paused));
        assert_eq!(s.handle(Request::Resume).state, Some(VmState::Running));
        let r = s.handle(Request::Shutdown {
            timeout_ms: Some(20),
        });
        assert_eq!(r.graceful, Some(false), "nobody handled Ctrl-Alt-Del");
        assert_eq!(exit.reason(), Some(ExitReason::Stopped));
        assert_eq!(s.state(), VmState::Stopped);
        assert!(!s.handle(Request::Pause).ok);
    }
}
